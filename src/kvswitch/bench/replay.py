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
:class:`ReplayConfig` see the same request sequence; :attr:`ReplayResult.outcomes` lets a
caller check that they succeeded and failed on the same requests.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

from kvswitch.allocator import BlockGroupAllocator, OutOfBlocksError
from kvswitch.trace import Conversation

__all__ = ["BLOCK_SIZE", "ReplayConfig", "ReplayResult", "replay"]


@dataclass(frozen=True)
class ReplayConfig:
    """Parameters of :func:`replay` (iterations are the replay's unit of time)."""

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
    swap_out_blocks: int = 0
    swap_out_groups: int = 0
    preemptions: int = 0  # priority updates
    pool_full_preemptions: int = 0  # the pool could not serve a decode
    outcomes: list[bool] = field(default_factory=list)  # allocate succeeded?


class _Replay:
    """Drives one allocator through the trace; decisions depend only on block counts, so two
    allocators replayed with the same arguments see the same request sequence."""

    def __init__(
        self, alloc: BlockGroupAllocator, convs: list[Conversation], args: ReplayConfig
    ) -> None:
        self.a = alloc
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

    def _swap_out(self, seq: int) -> None:
        self.t.swap_out_blocks += self.a.num_table_blocks(seq)
        self.t.swap_out_groups += len(self.a.groups(seq))
        t0 = time.perf_counter_ns()
        self.a.free(seq)
        self.t.free_ns.append(time.perf_counter_ns() - t0)

    def run(self) -> ReplayResult:
        a, args, convs = self.a, self.args, self.convs
        cap = int(args.occupancy * a.num_blocks)
        context = [0] * len(convs)  # tokens of KV each conversation holds
        turn = [0] * len(convs)
        left = [0] * len(convs)  # tokens still to generate in the current turn
        waiting: list[tuple[int, int]] = []  # (ready iteration, conv), FIFO
        running: dict[int, None] = {}  # admission order
        next_arrival = 0
        finished = 0
        iteration = 0
        while finished < len(convs):
            while next_arrival < len(convs) and self.arrivals[next_arrival][0] <= iteration:
                conv = self.arrivals[next_arrival][1]
                waiting.append((iteration, conv))
                next_arrival += 1
            # Admit ready turns (FIFO) while they fit under the occupancy cap.
            still: list[tuple[int, int]] = []
            for ready, conv in waiting:
                if ready > iteration:
                    still.append((ready, conv))
                    continue
                t = convs[conv].turns[turn[conv]]
                if left[conv] == 0:  # a new turn: its input joins the context
                    context[conv] += t.new_input_tokens
                    left[conv] = t.output_tokens
                need = math.ceil(max(context[conv], 1) / BLOCK_SIZE)
                if a.num_used_blocks + need <= cap and self._alloc(conv, need):
                    running[conv] = None
                else:
                    still.append((ready, conv))
            waiting = still
            # Priority update: preempt one random running sequence.
            if args.preempt_every and iteration % args.preempt_every == 0 and running:
                victim = list(running)[self.rng.randrange(len(running))]
                del running[victim]
                self._swap_out(victim)
                self.t.preemptions += 1
                waiting.append((iteration + 1, victim))
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
                        del running[victim]
                        self._swap_out(victim)
                        self.t.pool_full_preemptions += 1
                        waiting.append((iteration + 1, victim))
                context[conv] += 1
                left[conv] -= 1
                if left[conv] == 0:  # turn done: swap out until the next turn
                    del running[conv]
                    self._swap_out(conv)
                    turn[conv] += 1
                    if turn[conv] < len(convs[conv].turns):
                        waiting.append((iteration + args.think_iters, conv))
                    else:
                        finished += 1
            iteration += 1
        return self.t




def replay(
    allocator: BlockGroupAllocator, conversations: list[Conversation], config: ReplayConfig
) -> ReplayResult:
    """Replay ``conversations`` through ``allocator`` (which must start empty).

    Raises:
        RuntimeError: a single turn's context does not fit the pool.
    """
    return _Replay(allocator, conversations, config).run()
