"""A hypothesis state machine that drives a [`SwapManager`][] (with its
[`ReuseTracker`][] and [`AsyncSwapEngine`][]) through random
serving histories with real bytes, and checks after every step that no KV was lost or
corrupted and that every failure surfaced exactly once.

Rules: new sequences, growth, rollback ([`truncate`][kvswitch.SwapManager.truncate]), swap-outs
(full, ending mid-block, or shorter than the CPU copy), swap-ins to new blocks (with
``reserve_blocks``), Algorithm 1 iterations (``poll`` + ``decide``), frees, dropped CPU
copies, priorities that steer which backups are reclaimed when the host pool runs short
(contamination), injected copy failures (the engine's ``_fail_next_jobs`` test hook),
reported at once or left unreported while every method is called on the failed sequence,
and two callers on two threads at once. With ``compaction=True`` (see
[`CompactingSwapManagerStateMachine`][]) swap-ins also compact the GPU pool: other
running sequences' blocks move device to device, their new block tables must be reported
(checked against the manager's tables), their KV must read back intact through the new
tables, an injected failure that hits the migration fails exactly the moved sequences,
sequences still swapping in never move, and ``reserve_blocks`` is held after the table.

Jobs held in flight: the engine is wrapped in a [`HeldEngine`][kvswitch.testing.HeldEngine], and
rules start holding its jobs in the queue, let one run (the newest or the oldest, with
what the engine orders before it), or resume them, so that allocations, compactions,
swap-ins, swap-outs, rollbacks and frees happen while other copies have not run yet. A
held job runs when the manager waits for it, never on a timer: a missing wait (Algorithm 1
step 3.1, a migration) leaves the job queued while the machine reads or writes its blocks,
and a missing ordering dependency in the engine lets a job run before one it must follow.

Each token's KV is a byte pattern of (sequence, token, version); a rollback bumps the
version, so a swap-in that restores old KV, a reused stale block, or a write into a block
an in-flight swap-out still reads shows up as a byte mismatch.

Invariants, checked after every step: every running sequence's KV reads back exactly; every
token a CPU copy claims valid (running, failed, and, after ``synchronize``, swapped-out
sequences) holds that token's KV; a swapped-out sequence's copy holds all its tokens; the
manager's states equal the model's; every injected failure surfaces exactly once (raised
or reported by ``take_failed``, never both); block tables change only by reported
compactions of running sequences; the allocators' own invariants hold.

Engine developers can run it against their own configuration by overriding
[`SwapManagerStateMachine.make_manager`][] (block size, pool sizes, policies, worker
count)::

    from hypothesis import settings
    from kvswitch.testing import SwapManagerStateMachine

    class MyConfig(SwapManagerStateMachine):
        def make_manager(self):
            return build_my_manager()  # -> (SwapManager, [NumPy arrays of the GPU pool])

    TestMyConfig = MyConfig.TestCase
    TestMyConfig.settings = settings(max_examples=100, stateful_step_count=40,
                                     deadline=None)

The GPU pool must be host memory the machine can read and write (NumPy arrays, one per
region, ``[num_blocks, block_size, ...]``, as [`kvswitch.KVLayout.from_tensors`][] takes
them), i.e. the host backend. Determinism: rules draw only from the machine's own model of
the sequences, never from what worker threads have done so far, and every wait happens
inside a rule, so hypothesis replays a failing history exactly.

Requires ``hypothesis`` (``pip install ".[test]"``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvswitch.allocator import BlockGroupAllocator, OutOfBlocksError
from kvswitch.host_pool import HostKVPool
from kvswitch.layout import KVLayout
from kvswitch.manager import SwapManager
from kvswitch.swap import AsyncSwapEngine, SwapError
from kvswitch.testing.held_engine import HeldEngine

__all__ = ["CompactingSwapManagerStateMachine", "SwapManagerStateMachine"]

RUNNING, SWAPPING_IN, SWAPPED_OUT, FAILED = "running", "swapping_in", "swapped_out", "failed"
#: How a rule that injected a failure has it reported (see expect_failed).
REPORTS = ("take", "raise", "later")


def default_manager(*, block_size: int = 4, gpu_blocks: int = 40, host_blocks: int = 48,
                    regions: int = 2, token_bytes: int = 8, num_workers: int = 2,
                    per_block: bool = False, growth_quantum_blocks: int | None = None,
                    **manager_kw: Any) -> tuple[SwapManager, list[np.ndarray]]:
    """A host-backend SwapManager over ``regions`` uint8 arrays
    ``[gpu_blocks, block_size, token_bytes]``; ``per_block`` gives the GPU pool vLLM's
    free-list allocator, else groups of 4 with ``growth_quantum_blocks`` (None: the
    allocator's default, 1 at groups of 4). The host pool is a little larger than the GPU
    pool, so a busy history runs it short and backups get contaminated. ``manager_kw`` go
    to SwapManager."""
    kv = [np.zeros((gpu_blocks, block_size, token_bytes), np.uint8) for _ in range(regions)]
    layout = KVLayout.from_tensors(kv)
    engine = AsyncSwapEngine(layout, HostKVPool(layout, host_blocks, pin=False),
                             backend="host", num_workers=num_workers)
    gpu = (BlockGroupAllocator.per_block(gpu_blocks) if per_block
           else BlockGroupAllocator(gpu_blocks, initial_group_blocks=4,
                                    growth_quantum_blocks=growth_quantum_blocks))
    manager = SwapManager(gpu, engine, BlockGroupAllocator(host_blocks, initial_group_blocks=4),
                          block_size=block_size, **manager_kw)
    return manager, kv


class SwapManagerStateMachine(RuleBasedStateMachine):
    """Random serving histories over a SwapManager, checked byte by byte (see the module
    docstring). Override [`make_manager`][] to test another configuration."""

    def __init__(self) -> None:
        super().__init__()
        self.m, self.kv = self.make_manager()
        # Jobs held in flight on demand (not with an inline engine: nothing to hold).
        self.held: HeldEngine | None = None
        if self.m.engine.num_workers:
            self.held = self.m.engine = HeldEngine(self.m.engine)
        self.bs = self.m.block_size
        self.state: dict[int, str] = {}      # the model: sequence -> expected state
        self.values: dict[int, list[int]] = {}  # sequence -> byte value of each token
        self.version = 0
        self.next_id = 0
        self.injected = 0   # copy failures injected
        self.surfaced = 0   # of those, reported to the caller (raised or take_failed)
        self.unreported: set[int] = set()  # failed, not yet raised or taken
        # Tables that must not change while the sequence swaps in or is failed: the table
        # swap_in returned, or the one it held when it failed.
        self.pinned_tables: dict[int, list[int]] = {}

    def make_manager(self) -> tuple[SwapManager, list[np.ndarray]]:
        """The manager under test and the NumPy arrays of its GPU pool (one per region)."""
        return default_manager()

    def teardown(self) -> None:
        self.m.close()

    # -- the model -----------------------------------------------------------------------

    def seqs(self, *states: str) -> list[int]:
        return sorted(s for s, st_ in self.state.items() if st_ in states)

    def stamp(self, seq: int, lo: int, hi: int) -> None:
        """Write new KV for tokens [lo, hi) of a running sequence (a new version)."""
        self.version += 1
        vals = self.values[seq]
        del vals[lo:]
        vals.extend((seq * 37 + t * 11 + self.version * 53) % 251 + 1 for t in range(lo, hi))
        table = self.m.block_table(seq)
        for t in range(lo, hi):
            for r, a in enumerate(self.kv):
                a[table[t // self.bs], t % self.bs] = (vals[t] + r) % 256

    def grow(self, seq: int, k: int) -> bool:
        """Append k tokens to a running sequence; False if the GPU pool is short."""
        n = len(self.values[seq])
        need = -(-(n + k) // self.bs) - self.m.gpu.num_table_blocks(seq)
        if need > 0:
            try:
                self.m.allocate(seq, need)
            except OutOfBlocksError:
                return False
        self.stamp(seq, n, n + k)
        return True

    def arm_failure(self) -> None:
        self.m.engine._engine._fail_next_jobs(1, "injected copy failure")

    def disarm(self) -> None:
        self.m.engine._engine._fail_next_jobs(0, "")

    def expect_failed(self, seq: int, report: str) -> None:
        """seq failed (an injected failure). ``report``: ``"take"``: take_failed() reports
        it now, with every failure left unreported before, each once; ``"raise"``: a call
        on it raises it (and take_failed() leaves it out); ``"later"``: it stays
        unreported for the next rules."""
        self.state[seq] = FAILED
        self.unreported.add(seq)
        self.pin_table(seq)
        if report == "take":
            self.check_taken()
        elif report == "raise":
            self.call_on(seq, "allocate")

    def pin_table(self, seq: int) -> None:
        if seq in self.m.gpu:
            self.pinned_tables[seq] = self.m.block_table(seq).tolist()

    def fill_pool(self) -> list[int]:
        """New one-block running sequences in every free block; returns them in block
        order."""
        made = []
        while self.m.gpu.num_free_blocks:
            seq = self.next_id
            self.m.allocate(seq, 1)
            self.next_id += 1
            self.state[seq] = RUNNING
            self.values[seq] = []
            self.stamp(seq, 0, 1)
            made.append(seq)
        made.sort(key=lambda s: int(self.m.block_table(s)[0]))
        return made

    def free_running(self, seqs: list[int]) -> None:
        for seq in seqs:
            if self.state.get(seq) == RUNNING:
                self.m.free(seq)
                del self.state[seq], self.values[seq]

    def check_taken(self) -> dict[Hashable, SwapError]:
        """take_failed() reports every failure not yet raised or taken, once each."""
        failed = self.m.take_failed()
        assert set(failed) == self.unreported, (failed, self.unreported)
        for seq, error in failed.items():
            assert "injected copy failure" in str(error), (seq, error)
        self.surfaced += len(failed)
        self.unreported.clear()
        return failed

    def check_cpu_copy(self, seq: int, *, complete: bool) -> None:
        """Every token seq's CPU copy claims valid holds that token's KV (``complete``: the
        copy claims every token, as the only copy of a swapped-out sequence must)."""
        pool = self.m.engine.host_pool
        if not isinstance(pool, HostKVPool):  # a bare host layout: no arrays to read
            return
        if seq not in self.m.tracker:
            assert not complete, (seq, "swapped out without a CPU copy")
            return
        blocks = self.m.tracker.host_block_table(seq)
        valid = self.m.tracker.valid_tokens(seq)
        values = self.values[seq]
        n = len(values)
        for i, (h, k) in enumerate(zip(blocks, valid, strict=True)):
            if complete:
                assert k >= min(self.bs, n - i * self.bs), (seq, i, k, "copy incomplete")
            for t in range(i * self.bs, min(i * self.bs + int(k), n)):
                for r, a in enumerate(pool.arrays):
                    got = a[h, t % self.bs]
                    assert (got == (values[t] + r) % 256).all(), (seq, t, r, "wrong CPU copy")
        if complete:
            assert len(blocks) * self.bs >= n, (seq, "copy too short")

    # -- rules ---------------------------------------------------------------------------

    #: Sequences alive at once: few, so that rules keep coming back to the same ones (a
    #: stale reuse needs a backup, a rollback and a swap of one sequence).
    max_sequences = 5

    @precondition(lambda self: len(self.state) < self.max_sequences)
    @rule(n=st.integers(1, 24))
    def new_sequence(self, n: int) -> None:
        seq = self.next_id
        try:
            self.m.allocate(seq, -(-n // self.bs))
        except OutOfBlocksError:
            return
        self.next_id += 1
        self.state[seq] = RUNNING
        self.values[seq] = []
        self.stamp(seq, 0, n)

    @precondition(lambda self: self.seqs(RUNNING))
    @rule(data=st.data(), k=st.integers(1, 9))
    def grow_sequence(self, data: st.DataObject, k: int) -> None:
        self.grow(data.draw(st.sampled_from(self.seqs(RUNNING)), label="seq"), k)

    @precondition(lambda self: self.seqs(RUNNING))
    @rule(data=st.data())
    def roll_back(self, data: st.DataObject) -> None:
        """Regenerate / rejected speculative tokens: keep a prefix, write new KV after it."""
        seq = data.draw(st.sampled_from(self.seqs(RUNNING)), label="seq")
        n = len(self.values[seq])
        keep = data.draw(st.integers(1, n), label="keep")
        self.m.truncate(seq, keep)
        self.stamp(seq, keep, n)

    @precondition(lambda self: self.seqs(RUNNING))
    @rule(data=st.data(), shorter=st.integers(0, 6), priority=st.floats(0, 1),
          fail=st.booleans(), report=st.sampled_from(REPORTS))
    def swap_out(self, data: st.DataObject, shorter: int, priority: float, fail: bool,
                 report: str = "take") -> None:
        seq = data.draw(st.sampled_from(self.seqs(RUNNING)), label="seq")
        keep = max(1, len(self.values[seq]) - shorter)  # shorter > 0: a rollback
        if fail:
            self.arm_failure()
        try:
            plan = self.m.swap_out(seq, keep, priority=priority)
        except OutOfBlocksError:
            self.disarm()
            return
        except SwapError:  # blocking swap-out: the sequence stays running
            assert fail and self.m.state(seq) == RUNNING
            self.injected += 1
            self.surfaced += 1
            del self.values[seq][keep:]
            return
        del self.values[seq][keep:]
        self.state[seq] = SWAPPED_OUT
        if not fail:
            return
        if plan.copied_blocks == 0:  # every block reused: no job to fail
            self.disarm()
            return
        self.injected += 1
        self.m.synchronize()
        assert self.m.state(seq) == FAILED
        self.expect_failed(seq, report)

    def running_tables(self) -> dict[int, list[int]]:
        return {s: self.m.block_table(s).tolist() for s in self.seqs(RUNNING)}

    def check_table_changes(self, before: dict[int, list[int]]) -> list[int]:
        """After a swap-in: the running sequences whose block table changed (``before``:
        the tables before it) are exactly those reported changed, each with the manager's
        table now; only a migration changes tables. Returns the running sequences a failed
        migration failed (their tables are not reported: they never run again)."""
        changes = self.m.take_block_table_changes()
        lost = [s for s in before if self.m.state(s) == FAILED]
        changed = [s for s, t in before.items()
                   if s not in lost and self.m.block_table(s).tolist() != t]
        assert sorted(changes) == changed, ("changed tables not reported", changes, changed)
        for seq, table in changes.items():
            assert table.dtype == np.int32
            assert table.tolist() == self.m.block_table(seq).tolist()
        if changed or lost:
            assert self.m.stats().migrations > 0, "block tables changed without a migration"
        return lost

    @precondition(lambda self: self.seqs(SWAPPED_OUT))
    @rule(data=st.data(), fail=st.booleans(), reserve=st.integers(0, 4),
          report=st.sampled_from(REPORTS))
    def swap_in(self, data: st.DataObject, fail: bool, reserve: int = 0,
                report: str = "take") -> None:
        seq = data.draw(st.sampled_from(self.seqs(SWAPPED_OUT)), label="seq")
        self.swap_in_seq(seq, fail, reserve, report)

    def swap_in_seq(self, seq: int, fail: bool = False, reserve: int = 0,
                    report: str = "take") -> bool:
        """Swap seq in (left swapping in); False if the GPU pool lacked the blocks."""
        if fail:
            self.arm_failure()
        before = self.running_tables()
        try:
            table = self.m.swap_in(seq, reserve_blocks=reserve)
        except OutOfBlocksError:
            self.disarm()
            return False
        self.state[seq] = SWAPPING_IN
        self.pinned_tables[seq] = table.tolist()
        moved = self.check_table_changes(before)
        if fail and moved:
            # The armed failure hit the migration (the first job): the moved sequences
            # failed (the manager waited for it), the swap-in itself was not ordered after
            # a job still in flight, so it goes on. (A moved sequence is reported failed,
            # not changed: check_table_changes saw it running, at the callback's time.)
            self.injected += len(moved)
            for other in moved:
                self.state[other] = FAILED
                self.unreported.add(other)
                self.pin_table(other)
            if report == "take":
                failed = self.check_taken()
                for other in moved:
                    assert failed[other].direction == "migrate"
            elif report == "raise":
                self.call_on(moved[0], "swap_out")
        elif fail:
            self.injected += 1
            self.m.synchronize()  # every job has ended: poll() reports all other swap-ins
            ready = self.m.poll()
            assert seq not in ready and set(ready) <= set(self.seqs(SWAPPING_IN))
            for other in ready:
                self.state[other] = RUNNING
            self.expect_failed(seq, report)
        elif reserve:
            self.check_reserve(seq, reserve)
        return True

    def check_reserve(self, seq: int, reserve: int) -> None:
        """After ``swap_in(seq, reserve_blocks=reserve)``: with compaction the reserved
        tail after its table holds ``reserve`` blocks, or as many as were free there."""
        if not self.m.compaction:
            return
        start, length = self.m.gpu.reservation(seq)
        if length >= reserve:
            return
        after = (start + length) if length else int(self.m.block_table(seq)[-1]) + 1
        for s, n in self.m.gpu.free_groups():
            assert not s <= after < s + n, (seq, reserve, (start, length), "reserve not held")

    @precondition(lambda self: self.seqs(RUNNING))
    @rule(data=st.data(), shorter=st.integers(0, 6), priority=st.floats(0, 1))
    def round_trip(self, data: st.DataObject, shorter: int, priority: float) -> None:
        """Preempted and resumed at once: swap out (maybe shorter), swap in to new blocks,
        wait. Leaves a backup behind (with reuse), the state later swap-outs build on."""
        seq = data.draw(st.sampled_from(self.seqs(RUNNING)), label="seq")
        keep = max(1, len(self.values[seq]) - shorter)
        try:
            self.m.swap_out(seq, keep, priority=priority)
        except OutOfBlocksError:
            return
        del self.values[seq][keep:]
        self.state[seq] = SWAPPED_OUT
        before = self.running_tables()
        try:
            self.m.swap_in(seq)
        except OutOfBlocksError:
            return
        self.state[seq] = SWAPPING_IN
        assert not self.check_table_changes(before)
        self.m.wait_swap_in(seq)
        self.state[seq] = RUNNING

    @precondition(lambda self: self.held is not None and self.seqs(RUNNING)
                  and self.seqs(SWAPPED_OUT) and len(self.state) < 12)
    @rule(data=st.data())
    def swap_in_over_a_held_swap_out(self, data: st.DataObject) -> None:
        """With the pool full, one sequence swaps out (its copies held) and another swaps
        in into the only free blocks, the ones those copies still read; the swap-in is
        waited for first. The engine must run the swap-out before it (write-after-read),
        or the swap-out copies the newcomer's KV."""
        assert self.held is not None
        leaver = data.draw(st.sampled_from(self.seqs(RUNNING)), label="leaver")
        size = self.m.gpu.num_table_blocks(leaver)
        fits = [s for s in self.seqs(SWAPPED_OUT) if -(-len(self.values[s]) // self.bs) <= size]
        if not fits:
            return
        comer = data.draw(st.sampled_from(fits), label="comer")
        fillers = self.fill_pool()
        was_holding = self.held.holding
        self.held.hold()
        try:
            self.m.swap_out(leaver, len(self.values[leaver]))
        except OutOfBlocksError:  # the host pool is short
            pass
        else:
            self.state[leaver] = SWAPPED_OUT
            if self.swap_in_seq(comer):
                self.m.wait_swap_in(comer)
                self.state[comer] = RUNNING
            self.synchronize()
        finally:
            if not was_holding:
                self.held.resume()
        self.free_running(fillers)

    @precondition(lambda self: self.held is not None and self.seqs(RUNNING))
    @rule(data=st.data(), report=st.sampled_from(REPORTS))
    def swap_in_behind_a_failing_swap_out(self, data: st.DataObject, report: str) -> None:
        """Preempted and resumed at once while the swap-out's copies are held, and they
        fail: the swap-in queued behind them must fail with them (read-after-write), and
        the CPU copy must not claim the blocks they never wrote."""
        assert self.held is not None
        seq = data.draw(st.sampled_from(self.seqs(RUNNING)), label="seq")
        was_holding = self.held.holding
        self.held.hold()
        self.arm_failure()
        plan = None
        try:
            plan = self.m.swap_out(seq, len(self.values[seq]))
        except OutOfBlocksError:
            self.disarm()
        except SwapError:  # blocking swap-out: raised, the sequence stays running
            self.injected += 1
            self.surfaced += 1
        if plan is not None:
            self.state[seq] = SWAPPED_OUT
            if plan.copied_blocks == 0:  # every block reused: no job to fail
                self.disarm()
            else:
                self.injected += 1
                self.swap_in_seq(seq)  # queued behind the held swap-out
        if not was_holding:
            self.held.resume()
        if plan is None or plan.copied_blocks == 0:
            return
        self.m.synchronize()
        ready = self.m.poll()
        assert seq not in ready and set(ready) <= set(self.seqs(SWAPPING_IN))
        for other in ready:
            self.state[other] = RUNNING
        self.expect_failed(seq, report)

    # -- failures: calls on failed sequences, reporting ---------------------------------------

    @precondition(lambda self: self.unreported)
    @rule()
    def take_failed(self) -> None:
        self.check_taken()

    @precondition(lambda self: self.seqs(FAILED))
    @rule(data=st.data(), call=st.sampled_from(
        ["allocate", "swap_out", "swap_in", "wait_swap_in", "truncate", "drop_cpu_copy"]))
    def call_on_failed(self, data: st.DataObject, call: str) -> None:
        self.call_on(data.draw(st.sampled_from(self.seqs(FAILED)), label="seq"), call)

    def call_on(self, seq: int, call: str) -> None:
        """A method on a failed sequence: the first of allocate / swap_out / swap_in /
        wait_swap_in raises its unreported SwapError (take_failed then leaves it out), later
        ones raise ValueError, as truncate always does; drop_cpu_copy releases its CPU copy.
        None changes a pool."""
        m = self.m
        before = (m.gpu.num_free_blocks, m.tracker.host.num_free_blocks)
        calls = {"allocate": lambda: m.allocate(seq, 1),
                 "swap_out": lambda: m.swap_out(seq, 1),
                 "swap_in": lambda: m.swap_in(seq),
                 "wait_swap_in": lambda: m.wait_swap_in(seq),
                 "truncate": lambda: m.truncate(seq, 1),
                 "drop_cpu_copy": lambda: m.drop_cpu_copy(seq)}
        if call == "drop_cpu_copy":
            calls[call]()
            assert m.gpu.num_free_blocks == before[0]
            return
        reports = seq in self.unreported and call != "truncate"
        try:
            calls[call]()
        except SwapError as e:
            assert reports and e.seq_id == seq, (call, seq, e)
            self.unreported.discard(seq)
            self.surfaced += 1
        except ValueError:
            assert not reports, (call, seq, "an unreported failure must be raised")
        else:
            raise AssertionError(f"{call}({seq!r}) on a failed sequence did not raise")
        assert (m.gpu.num_free_blocks, m.tracker.host.num_free_blocks) == before, call
        assert m.state(seq) == FAILED

    # -- jobs held in flight -----------------------------------------------------------------

    @precondition(lambda self: self.held is not None and not self.held.holding and self.state)
    @rule()
    def hold_jobs(self) -> None:
        """From now on copies stay queued until waited for, released or resumed."""
        assert self.held is not None
        self.held.hold()

    @precondition(lambda self: self.held is not None and self.held.held)
    @rule(newest=st.booleans())
    def run_held_job(self, newest: bool) -> None:
        """Let the newest (or oldest) held job run, with what the engine orders before it,
        and wait for it: the newest first runs jobs out of submission order wherever the
        engine recorded no dependency."""
        assert self.held is not None
        job = self.held.held[-1 if newest else 0]
        with contextlib.suppress(SwapError):  # a failure is the manager's to report
            job.wait()

    @precondition(lambda self: self.held is not None and self.held.holding)
    @rule()
    def resume_jobs(self) -> None:
        """Stop holding: the queued copies run while the next rules go on."""
        assert self.held is not None
        self.held.resume()

    @precondition(lambda self: self.seqs(SWAPPED_OUT))
    @rule()
    def synchronize(self) -> None:
        """Wait for every copy, then check every swapped-out sequence's CPU copy: it holds
        all of its KV (a copy written out of order, or not at all, shows here)."""
        self.m.synchronize()
        for seq in self.seqs(SWAPPED_OUT):
            self.check_cpu_copy(seq, complete=True)

    @precondition(lambda self: self.seqs(SWAPPING_IN))
    @rule(batch=st.integers(0, 8))
    def iterate(self, batch: int) -> None:
        """Algorithm 1's steps 1 and 4, then wait for the rest inside the rule. A
        synchronous decision returns every pending sequence (it waited for them)."""
        pending = set(self.seqs(SWAPPING_IN))
        ready = self.m.poll()
        sync_decisions = self.m.stats().sync_decisions
        ready += self.m.decide(batch, 1e-4)
        assert set(ready) <= pending and len(ready) == len(set(ready))
        if self.m.stats().sync_decisions > sync_decisions:
            assert set(ready) == pending, ("a synchronous decision left swap-ins pending",
                                           sorted(pending - set(ready)))
        for seq in sorted(pending):
            if seq not in ready:
                self.m.wait_swap_in(seq)
            self.state[seq] = RUNNING

    @precondition(lambda self: self.state)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.state)), label="seq")
        self.m.free(seq)
        del self.state[seq], self.values[seq]
        if seq in self.unreported:  # free() discards a failure not yet reported
            self.unreported.discard(seq)
            self.surfaced += 1

    @precondition(lambda self: self.seqs(RUNNING))
    @rule(data=st.data())
    def drop_cpu_copy(self, data: st.DataObject) -> None:
        self.m.drop_cpu_copy(data.draw(st.sampled_from(self.seqs(RUNNING)), label="seq"))

    # Not while holding: which thread's call releases the held jobs would depend on timing.
    @precondition(lambda self: len(self.seqs(RUNNING)) >= 2
                  and not (self.held is not None and self.held.holding))
    @rule(data=st.data(), k=st.integers(1, 6))
    def two_threads(self, data: st.DataObject, k: int) -> None:
        """One thread grows a sequence while another swaps a different one out. The pool
        check first makes both succeed in any order, so the model stays deterministic."""
        grower, leaver = data.draw(st.permutations(self.seqs(RUNNING)), label="pair")[:2]
        n = len(self.values[grower])
        if -(-(n + k) // self.bs) - self.m.gpu.num_table_blocks(grower) > \
                self.m.gpu.num_free_blocks:
            return
        outcome: dict[str, Any] = {}
        barrier = threading.Barrier(2)

        def swap() -> None:
            barrier.wait()
            try:
                self.m.swap_out(leaver, len(self.values[leaver]))
                outcome["swap"] = "ok"
            except OutOfBlocksError:
                outcome["swap"] = "full"

        t = threading.Thread(target=swap)
        t.start()
        barrier.wait()
        grew = self.grow(grower, k)
        t.join()
        assert grew
        if outcome["swap"] == "ok":
            self.state[leaver] = SWAPPED_OUT

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def running_kv_is_intact(self) -> None:
        for seq in self.seqs(RUNNING):
            table = self.m.block_table(seq)
            for t, v in enumerate(self.values[seq]):
                for r, a in enumerate(self.kv):
                    got = a[table[t // self.bs], t % self.bs]
                    assert (got == (v + r) % 256).all(), (seq, t, r, got[:4], v)

    @invariant()
    def cpu_copies_hold_what_they_claim(self) -> None:
        """Every token a running or failed sequence's CPU copy claims as valid equals its
        KV: the next swap-out may reuse it without copying. (Running: its last job, a
        swap-in, ended after every job that wrote its copy. Failed: its jobs have ended,
        and a copy that failed must not be claimed.)"""
        for seq in self.seqs(RUNNING, FAILED):
            self.check_cpu_copy(seq, complete=False)

    @invariant()
    def pinned_tables_stay(self) -> None:
        """A sequence still swapping in keeps the blocks swap_in returned (its copies write
        them), a failed one the blocks it held: compaction must not move either."""
        for seq in self.seqs(SWAPPING_IN, FAILED):
            table = self.pinned_tables.get(seq)
            if table is not None and seq in self.m.gpu:
                assert self.m.block_table(seq)[:len(table)].tolist() == table, seq

    @invariant()
    def states_agree(self) -> None:
        for seq, expected in self.state.items():
            assert self.m.state(seq) == expected, (seq, expected, self.m.state(seq))
        assert sorted(self.m.failed) == self.seqs(FAILED)

    @invariant()
    def every_failure_surfaced_once(self) -> None:
        assert self.surfaced + len(self.unreported) == self.injected
        if not self.unreported:
            assert self.m.take_failed() == {}  # nothing reported that was not injected

    @invariant()
    def books_balance(self) -> None:
        s = self.m.stats()
        assert s.swap_out_blocks == s.copied_blocks + s.reused_blocks
        assert s.swap_failures == self.injected
        self.m.gpu.check_invariants()
        self.m.tracker.host.check_invariants()
        known: set[Hashable] = set(self.state)
        assert set(self.m.gpu.sequences()) <= known


class CompactingSwapManagerStateMachine(SwapManagerStateMachine):
    """The same histories with GPU-pool compaction on swap-in (``compaction=True``, a
    generous move cap), plus a rule that scatters the free space into one-block holes so
    that swap-ins need compaction often."""

    def make_manager(self) -> tuple[SwapManager, list[np.ndarray]]:
        # A growth quantum of 3 (1 by default at groups of 4): tail splits take runs.
        return default_manager(compaction=True, compaction_max_moved=8.0, gpu_blocks=24,
                               growth_quantum_blocks=3)

    @precondition(lambda self: self.seqs(SWAPPED_OUT) and len(self.state) < 12)
    @rule(data=st.data(), keep_every=st.integers(2, 3), fail=st.booleans(),
          reserve=st.integers(0, 4), report=st.sampled_from(REPORTS))
    def scatter_then_swap_in(self, data: st.DataObject, keep_every: int, fail: bool,
                             reserve: int = 0, report: str = "take") -> None:
        """Fill the GPU pool with one-block sequences, free all but every
        ``keep_every``-th of them in block order (the free space is left in small holes),
        then swap a sequence in (maybe with an injected failure), which then compacts."""
        made = self.fill_pool()
        for i, seq in enumerate(made):
            if i % keep_every:
                self.m.free(seq)
                del self.state[seq], self.values[seq]
        self.swap_in(data, fail, reserve, report)

    @precondition(lambda self: self.seqs(SWAPPED_OUT) and len(self.state) < 12)
    @rule(data=st.data(), reserve=st.integers(0, 2), fail_first=st.booleans(),
          report=st.sampled_from(REPORTS))
    def compact_next_to_a_pinned_sequence(self, data: st.DataObject, reserve: int,
                                          fail_first: bool, report: str) -> None:
        """A one-block sequence swaps in at the edge of the only free run and stays pending
        (or its swap-in fails: it is then failed, holding the block); another swap-in then
        needs a group one block longer than the run, with a few one-block holes elsewhere.
        Moving the first sequence is the cheapest compaction, and forbidden: its copies
        write that block (or its table must stay as reported)."""
        comer = data.draw(st.sampled_from(self.seqs(SWAPPED_OUT)), label="comer")
        need = max(2, -(-len(self.values[comer]) // self.bs) + reserve)
        first = self.next_id  # a fresh one-block sequence, swapped out
        if not self.m.gpu.num_free_blocks:
            return
        self.next_id += 1
        self.m.allocate(first, 1)
        self.state[first], self.values[first] = RUNNING, []
        self.stamp(first, 0, self.bs)
        try:
            self.m.swap_out(first, self.bs)
        except OutOfBlocksError:
            return
        self.state[first] = SWAPPED_OUT
        fillers = self.fill_pool()
        at = len(fillers) // 3
        if len(fillers) < at + need + 7:
            self.free_running(fillers)
            return
        self.free_running(fillers[at:at + need])  # the run: `need` free blocks
        if not self.swap_in_seq(first, fail_first, 0, report):
            self.free_running(fillers)
            return
        # Two holes far from the run: room to move blocks to.
        self.free_running([fillers[at + need + 3], fillers[at + need + 6]])
        self.swap_in_seq(comer, False, reserve)
        self.free_running(fillers)

    @invariant()
    def migrations_balance(self) -> None:
        s = self.m.stats()
        assert s.migrate_bytes == s.migrated_blocks * self.m.engine.device_layout.bytes_per_block
        assert s.migrations <= s.swap_ins
