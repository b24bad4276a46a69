"""Allocator-level replay of a multi-turn trace: the request stream that the benchmarks drive.

Replay model (no copies, no model compute): conversations arrive in the given order,
``arrival_per_iter`` per iteration on average (Poisson). A turn is admitted when its whole
context (history + new input) fits under ``occupancy`` of the pool; it then allocates its
context at once (prefill or swap-in) and one block per ``BLOCK_SIZE`` generated tokens
(decode), one token per iteration. When the pool cannot serve a decode, the most recently
admitted other sequence is preempted (freed and requeued), as vLLM does. Every
``preempt_every`` iterations one random running sequence is preempted too (a priority
update, FastSwitch section 4). A finished turn is swapped out (freed) until its next turn
arrives ``think_iters`` later.

Decisions depend only on block counts, so two allocators replayed with the same
[`ReplayConfig`][] see the same request sequence; [`ReplayResult.outcomes`][] lets a
caller check that they succeeded and failed on the same requests.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field

from kvswitch.allocator import BlockGroupAllocator, OutOfBlocksError
from kvswitch.reuse import ReuseTracker
from kvswitch.trace import Conversation

__all__ = ["BLOCK_SIZE", "ReplayConfig", "ReplayResult", "replay"]


@dataclass(frozen=True)
class ReplayConfig:
    """Parameters of [`replay`][] (iterations are the replay's unit of time)."""

    occupancy: float = 0.8  #: admission cap, fraction of the pool
    arrival_per_iter: float = 0.05  #: mean conversation arrivals per iteration
    think_iters: int = 200  #: iterations between a turn's end and the next turn
    preempt_every: int = 50  #: iterations between priority preemptions (0: never)
    seed: int = 0


BLOCK_SIZE = 16  # tokens per block (vLLM default)


@dataclass
class ReplayResult:
    """Per-call timings (nanoseconds, ``time.perf_counter_ns``) and swap-out counts."""

    alloc_one_ns: list[int] = field(default_factory=list)
    alloc_many_ns: list[int] = field(default_factory=list)
    free_ns: list[int] = field(default_factory=list)
    swap_out_blocks: int = 0  # blocks copied GPU -> host
    swap_out_groups: int = 0  # copies per region those blocks needed (extents)
    reused_blocks: int = 0  # blocks a swap-out did not copy: valid CPU copy (reuse only)
    swap_in_blocks: int = 0
    preemptions: int = 0  # priority updates
    pool_full_preemptions: int = 0  # the pool could not serve a decode
    outcomes: list[bool] = field(default_factory=list)  # allocate succeeded?


class _Replay:
    """Drives one allocator through the trace; decisions depend only on block counts, so two
    allocators replayed with the same arguments see the same request sequence."""

    def __init__(
        self,
        alloc: BlockGroupAllocator,
        convs: list[Conversation],
        args: ReplayConfig,
        reuse: ReuseTracker | None,
    ) -> None:
        self.a = alloc
        self.reuse = reuse
        self.saved_tokens = [0] * len(convs)  # tokens swapped out, to swap in again
        self.args = args
        self.t = ReplayResult()
        self.rng = random.Random(args.seed)
        arrival_rng = random.Random(args.seed + 1)
        at = 0.0
        self.arrivals: list[tuple[int, int]] = []  # (iteration, conversation index)
        for i in range(len(convs)):
            at += arrival_rng.expovariate(args.arrival_per_iter)
            self.arrivals.append((int(at), i))
        self.convs = convs

    def _alloc(self, seq: int, n: int) -> bool:
        t0 = time.perf_counter_ns()
        try:
            self.a.allocate(seq, n)
            ok = True
        except OutOfBlocksError:
            ok = False
        dt = time.perf_counter_ns() - t0
        if ok:
            (self.t.alloc_one_ns if n == 1 else self.t.alloc_many_ns).append(dt)
        self.t.outcomes.append(ok)
        return ok

    def _swap_out(self, seq: int, num_tokens: int) -> None:
        if self.reuse is None or num_tokens == 0:
            self.t.swap_out_blocks += self.a.num_table_blocks(seq)
            self.t.swap_out_groups += len(self.a.groups(seq))
        else:
            plan = self.reuse.plan_swap_out(seq, self.a.block_table(seq), num_tokens)
            self.reuse.commit(plan)
            self.t.swap_out_blocks += plan.copied_blocks
            self.t.swap_out_groups += len(plan.pairs)
            self.t.reused_blocks += plan.reused_blocks
        self.saved_tokens[seq] = num_tokens
        t0 = time.perf_counter_ns()
        self.a.free(seq)
        self.t.free_ns.append(time.perf_counter_ns() - t0)

    def run(self) -> ReplayResult:
        a, args, convs = self.a, self.args, self.convs
        cap = int(args.occupancy * a.num_blocks)
        context = [0] * len(convs)  # tokens of KV each conversation holds
        turn = [0] * len(convs)
        left = [0] * len(convs)  # tokens still to generate in the current turn
        pending: list[tuple[int, int, int]] = []  # heap of (ready iteration, order, conv)
        ready: deque[int] = deque()  # FIFO of turns that may be admitted now
        running: dict[int, None] = {}  # admission order
        order = 0
        for at, conv in self.arrivals:
            heapq.heappush(pending, (at, order, conv))
            order += 1
        finished = 0
        iteration = 0

        def swap_out_and_requeue(victim: int, front: bool) -> None:
            del running[victim]
            self._swap_out(victim, context[victim])
            (ready.appendleft if front else ready.append)(victim)

        while finished < len(convs):
            if not running and not ready:  # idle: skip to the next arrival or turn
                iteration = max(iteration, pending[0][0])
            while pending and pending[0][0] <= iteration:
                ready.append(heapq.heappop(pending)[2])
            # Admit ready turns first come, first served while they fit under the cap.
            while ready:
                conv = ready[0]
                if left[conv] == 0:  # a new turn: its input joins the context
                    t = convs[conv].turns[turn[conv]]
                    context[conv] += t.new_input_tokens
                    left[conv] = t.output_tokens
                need = math.ceil(max(context[conv], 1) / BLOCK_SIZE)
                if need > cap:
                    raise RuntimeError(
                        f"a turn needs {need} blocks but the admission cap is {cap} blocks"
                    )
                if a.num_used_blocks + need > cap or not self._alloc(conv, need):
                    break
                ready.popleft()
                running[conv] = None
                if self.saved_tokens[conv]:  # swap-in of the history
                    self.t.swap_in_blocks += math.ceil(self.saved_tokens[conv] / BLOCK_SIZE)
                    if self.reuse is not None:
                        self.reuse.commit(self.reuse.plan_swap_in(conv, a.block_table(conv)))
                    self.saved_tokens[conv] = 0
            # Priority update: preempt one random running sequence (back of the queue).
            if args.preempt_every and iteration % args.preempt_every == 0 and running:
                victim = list(running)[self.rng.randrange(len(running))]
                swap_out_and_requeue(victim, front=False)
                self.t.preemptions += 1
            # Decode one token for every running sequence.
            for conv in list(running):
                if conv not in running:  # preempted earlier in this iteration
                    continue
                # The token at position `context` needs a new block at a block boundary.
                if context[conv] % BLOCK_SIZE == 0 and context[conv] > 0:
                    while not self._alloc(conv, 1):
                        victim = next((c for c in reversed(running) if c != conv), None)
                        if victim is None:
                            raise RuntimeError("a single sequence does not fit the pool")
                        swap_out_and_requeue(victim, front=True)  # vLLM: front of queue
                        self.t.pool_full_preemptions += 1
                context[conv] += 1
                left[conv] -= 1
                if left[conv] == 0:  # turn done: swap out until the next turn
                    del running[conv]
                    self._swap_out(conv, context[conv])
                    turn[conv] += 1
                    if turn[conv] < len(convs[conv].turns):
                        heapq.heappush(pending, (iteration + args.think_iters, order, conv))
                        order += 1
                    else:
                        finished += 1
                        self.saved_tokens[conv] = 0
                        if self.reuse is not None and conv in self.reuse:
                            self.reuse.drop(conv)
            iteration += 1
        return self.t




def replay(
    allocator: BlockGroupAllocator,
    conversations: list[Conversation],
    config: ReplayConfig,
    reuse: ReuseTracker | None = None,
) -> ReplayResult:
    """Replay ``conversations`` through ``allocator`` (the GPU pool, empty at the start).

    With ``reuse``, every swap-out is planned by the tracker (only blocks without a valid CPU
    copy are counted as copied) and every swap-in keeps the CPU copy as a backup; without
    it every swap-out copies the sequence's whole block table.

    Raises:
        RuntimeError: a single turn's context does not fit the pool.
        OutOfBlocksError: with ``reuse``, the host pool cannot hold the swapped-out
            sequences even after reclaiming every backup.
    """
    return _Replay(allocator, conversations, config, reuse).run()
