"""A hypothesis state machine that drives a [`SwapManager`][] (with its
[`ReuseTracker`][] and [`AsyncSwapEngine`][]) through random
serving histories with real bytes, and checks after every step that no KV was lost or
corrupted and that every failure surfaced exactly once.

Rules: new sequences, growth, rollback ([`truncate`][kvswitch.SwapManager.truncate]), swap-outs
(full, ending mid-block, or shorter than the CPU copy), swap-ins to new blocks, Algorithm 1
iterations (``poll`` + ``decide``), frees, dropped CPU copies, priorities that steer which
backups are reclaimed when the host pool runs short (contamination), injected copy
failures (the engine's ``_fail_next_jobs`` test hook), and two callers on two threads at
once. With ``compaction=True`` (see [`CompactingSwapManagerStateMachine`][]) swap-ins
also compact the GPU pool: other running sequences' blocks move device to device, their
new block tables must be reported (checked against the manager's tables), their KV must
read back intact through the new tables, and an injected failure that hits the migration
fails exactly the moved sequences.

Each token's KV is a byte pattern of (sequence, token, version); a rollback bumps the
version, so a swap-in that restores old KV, a reused stale block, or a write into a block
an in-flight swap-out still reads shows up as a byte mismatch.

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

__all__ = ["CompactingSwapManagerStateMachine", "SwapManagerStateMachine"]

RUNNING, SWAPPING_IN, SWAPPED_OUT, FAILED = "running", "swapping_in", "swapped_out", "failed"


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
        self.bs = self.m.block_size
        self.state: dict[int, str] = {}      # the model: sequence -> expected state
        self.values: dict[int, list[int]] = {}  # sequence -> byte value of each token
        self.version = 0
        self.next_id = 0
        self.injected = 0   # copy failures injected
        self.surfaced = 0   # of those, reported to the caller (raised or take_failed)

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

    def expect_reported(self, seq: int) -> None:
        """The only failure outstanding is seq's: take_failed() reports it, once."""
        failed = self.m.take_failed()
        assert set(failed) == {seq}, (seq, failed)
        assert "injected copy failure" in str(failed[seq])
        self.surfaced += 1
        self.state[seq] = FAILED

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
          fail=st.booleans())
    def swap_out(self, data: st.DataObject, shorter: int, priority: float, fail: bool) -> None:
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
        self.expect_reported(seq)

    def check_table_changes(self, migrations_before: int) -> list[int]:
        """The block tables a compaction changed: reported for running sequences only, each
        equal to the manager's table now. Returns the moved sequences of this step."""
        changes = self.m.take_block_table_changes()
        if self.m.stats().migrations == migrations_before:
            assert changes == {}, "block tables reported changed without a migration"
            return []
        assert changes, "a migration reported no changed block table"
        for seq, table in changes.items():
            assert self.state.get(seq) == RUNNING, (seq, self.state.get(seq))
            assert table.dtype == np.int32
            assert table.tolist() == self.m.block_table(seq).tolist()
        return sorted(changes)

    @precondition(lambda self: self.seqs(SWAPPED_OUT))
    @rule(data=st.data(), fail=st.booleans())
    def swap_in(self, data: st.DataObject, fail: bool) -> None:
        seq = data.draw(st.sampled_from(self.seqs(SWAPPED_OUT)), label="seq")
        if fail:
            self.arm_failure()
        migrations = self.m.stats().migrations
        try:
            self.m.swap_in(seq)
        except OutOfBlocksError:
            self.disarm()
            return
        self.state[seq] = SWAPPING_IN
        moved = self.check_table_changes(migrations)
        if fail and moved:
            # The armed failure hit the migration (the first job): the moved sequences
            # failed (the manager waited for it), the swap-in itself was not ordered after
            # a job still in flight, so it goes on.
            self.injected += len(moved)
            failed = self.m.take_failed()
            assert set(failed) == set(moved), (moved, failed)
            for other in moved:
                assert failed[other].direction == "migrate"
                assert "injected copy failure" in str(failed[other])
                self.state[other] = FAILED
            self.surfaced += len(moved)
        elif fail:
            self.injected += 1
            self.m.synchronize()  # every job has ended: poll() reports all other swap-ins
            ready = self.m.poll()
            assert seq not in ready and set(ready) <= set(self.seqs(SWAPPING_IN))
            for other in ready:
                self.state[other] = RUNNING
            self.expect_reported(seq)

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
        migrations = self.m.stats().migrations
        try:
            self.m.swap_in(seq)
        except OutOfBlocksError:
            return
        self.state[seq] = SWAPPING_IN
        self.check_table_changes(migrations)
        self.m.wait_swap_in(seq)
        self.state[seq] = RUNNING

    @rule(batch=st.integers(0, 8))
    def iterate(self, batch: int) -> None:
        """Algorithm 1's steps 1 and 4, then wait for the rest inside the rule."""
        pending = set(self.seqs(SWAPPING_IN))
        ready = self.m.poll() + self.m.decide(batch, 1e-4)
        assert set(ready) <= pending and len(ready) == len(set(ready))
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

    @precondition(lambda self: self.seqs(RUNNING))
    @rule(data=st.data())
    def drop_cpu_copy(self, data: st.DataObject) -> None:
        self.m.drop_cpu_copy(data.draw(st.sampled_from(self.seqs(RUNNING)), label="seq"))

    @precondition(lambda self: len(self.seqs(RUNNING)) >= 2)
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
        """Every token a running sequence's CPU copy claims as valid equals the KV the
        sequence holds now: the next swap-out may reuse it without copying. (Running: its
        last job, a swap-in, ended after every job that wrote its copy.)"""
        pool = self.m.engine.host_pool
        if not isinstance(pool, HostKVPool):  # a bare host layout: no arrays to read
            return
        host = pool.arrays
        for seq in self.seqs(RUNNING):
            if seq not in self.m.tracker:
                continue
            blocks = self.m.tracker.host_block_table(seq)
            valid = self.m.tracker.valid_tokens(seq)
            n = len(self.values[seq])
            for i, (h, k) in enumerate(zip(blocks, valid, strict=True)):
                for t in range(i * self.bs, min(i * self.bs + int(k), n)):
                    for r, a in enumerate(host):
                        got = a[h, t % self.bs]
                        assert (got == (self.values[seq][t] + r) % 256).all(), \
                            (seq, t, r, "stale CPU copy")

    @invariant()
    def states_agree(self) -> None:
        for seq, expected in self.state.items():
            assert self.m.state(seq) == expected, (seq, expected, self.m.state(seq))
        assert sorted(self.m.failed) == self.seqs(FAILED)

    @invariant()
    def every_failure_surfaced_once(self) -> None:
        assert self.surfaced == self.injected
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
    @rule(data=st.data(), keep_every=st.integers(2, 3), fail=st.booleans())
    def scatter_then_swap_in(self, data: st.DataObject, keep_every: int, fail: bool) -> None:
        """Fill the GPU pool with one-block sequences, free all but every
        ``keep_every``-th of them in block order (the free space is left in small holes),
        then swap a sequence in (maybe with an injected failure), which then compacts."""
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
        for i, seq in enumerate(made):
            if i % keep_every:
                self.m.free(seq)
                del self.state[seq], self.values[seq]
        self.swap_in(data, fail)

    @invariant()
    def migrations_balance(self) -> None:
        s = self.m.stats()
        assert s.migrate_bytes == s.migrated_blocks * self.m.engine.device_layout.bytes_per_block
        assert s.migrations <= s.swap_ins
