"""BlockGroupAllocator.compact: the compaction planner and applier (issue 14)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvswitch.allocator import BlockGroupAllocator, BlockMoves, OutOfBlocksError
from kvswitch.testing.allocator_state_machine import allocator_state as _state


def _striped() -> BlockGroupAllocator:
    """12 blocks; sequence "a" holds [0, 1, 4, 5, 8, 9]; free groups (2,2), (6,2), (10,2)."""
    a = BlockGroupAllocator(12, initial_group_blocks=4)
    a.allocate("a", 12)
    a.free_blocks("a", [2, 3, 6, 7, 10, 11])
    assert a.free_groups() == [(2, 2), (6, 2), (10, 2)]
    assert a.num_reserved_blocks == 0
    return a


def test_moves_the_fewest_blocks_and_keeps_table_order() -> None:
    a = _striped()
    moves = a.compact(4)
    assert isinstance(moves, BlockMoves)
    # Every 4-block window holds 2 table blocks; [0, 4) holds one run of them (0, 1), the
    # lowest such window. The run goes whole to the best-fitting free group, (6, 2).
    assert moves.seq_ids == ("a",)
    assert moves.src.tolist() == [0] and moves.dst.tolist() == [6]
    assert moves.length.tolist() == [2] and moves.moved_blocks == 2
    assert moves.src.dtype == np.int32 and moves.dst.dtype == np.int32
    assert a.block_table("a").tolist() == [6, 7, 4, 5, 8, 9]
    assert a.groups("a") == [(6, 2), (4, 2), (8, 2)]
    assert a.free_groups() == [(0, 4), (10, 2)]
    assert moves.pairs().tolist() == [[0, 6, 2]]
    a.check_invariants()
    assert a.allocate("b", 4).tolist() == [0, 1, 2, 3]


def test_nothing_to_do_returns_none_and_changes_nothing() -> None:
    a = _striped()
    before = _state(a)
    assert a.compact(2) is None  # a free group of 2 exists
    assert a.compact(4, max_moved=1) is None  # every window moves 2
    assert a.compact(4, pinned=["a", "unknown", ["unhashable"]]) is None
    assert _state(a) == before


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"num_blocks": 0}, ValueError),
        ({"num_blocks": -3}, ValueError),
        ({"num_blocks": 4, "max_moved": -1}, ValueError),
        ({"num_blocks": 7}, OutOfBlocksError),  # 6 blocks are free
        ({"num_blocks": 1000}, OutOfBlocksError),
        ({"num_blocks": 2**40}, OutOfBlocksError),
        ({"num_blocks": 4.0}, TypeError),
        ({"num_blocks": True}, TypeError),
        ({"num_blocks": 4, "max_moved": "2"}, TypeError),
    ],
)
def test_bad_input_raises_and_changes_nothing(kwargs: dict, error: type) -> None:
    a = _striped()
    before = _state(a)
    n = kwargs.pop("num_blocks")
    with pytest.raises(error):
        a.compact(n, **kwargs)
    assert _state(a) == before
    a.check_invariants()


def test_per_block_mode_has_no_compaction() -> None:
    a = BlockGroupAllocator.per_block(8)
    a.allocate("a", 8)
    a.free_blocks("a", [1, 3, 5, 7])
    before = _state(a)
    with pytest.raises(ValueError, match="per-block"):
        a.compact(2)
    with pytest.raises(ValueError, match="per-block"):
        a.compact(100)
    assert _state(a) == before


def test_reserved_tails_in_the_window_are_released() -> None:
    # "a" holds [0, 4) with a reserved tail; the rest of the pool is scattered.
    a = BlockGroupAllocator(64, initial_group_blocks=8)
    a.allocate("a", 4)
    assert a.reservation("a") == (4, 4)
    a.allocate("b", 56)  # [8, 64)
    a.free_blocks("b", list(range(8, 64, 2)))
    assert len(a.free_groups()) == 28
    moves = a.compact(6)
    # [3, 9) holds a's last block, its tail and free block 8: one block moves (the
    # lowest of the one-block windows; [4, 10) would move block 9).
    assert moves is not None and moves.moved_blocks == 1 and moves.src.tolist() == [3]
    assert a.reservation("a")[1] == 0
    a.check_invariants()
    assert (4, 6) in a.free_groups() or max(n for _, n in a.free_groups()) >= 6
    assert a.num_free_blocks == 32  # moving and releasing keeps the count
    # A window that holds only a reserved tail and free blocks moves nothing.
    c = BlockGroupAllocator(64, initial_group_blocks=8)
    c.allocate("x", 2)  # [0, 2), tail [2, 8)
    assert c.reservation("x") == (2, 6)
    c.allocate("y", 56)  # [8, 64)
    c.free_blocks("y", [8])
    assert c.free_groups() == [(8, 1)]
    moves = c.compact(7)
    assert moves is not None and len(moves) == 0 and moves.pairs().shape == (0, 3)
    assert c.reservation("x")[1] == 0
    assert c.free_groups() == [(2, 7)]
    c.check_invariants()


def test_a_run_no_free_group_holds_is_split_in_order() -> None:
    # "a" holds [4, 8) in one run; the free space is 4 single blocks elsewhere.
    a = BlockGroupAllocator(16, initial_group_blocks=4)
    a.allocate("f", 4)  # [0, 4)
    a.allocate("a", 4)  # [4, 8)
    a.allocate("g", 8)  # [8, 16)
    a.free_blocks("f", [0, 2])
    a.free_blocks("g", [9, 11])
    a.free("f")  # [0, 4) free now: one group of 4, so compact(4) is a no-op
    assert a.compact(4) is None
    a.allocate("h", 4)
    a.free_blocks("h", [0, 2])
    assert a.free_groups() == [(0, 1), (2, 1), (9, 1), (11, 1)]
    table_before = {s: a.block_table(s).tolist() for s in a.sequences()}
    moves = a.compact(3)
    assert moves is not None
    a.check_invariants()
    assert max(n for _, n in a.free_groups()) >= 3
    # The model: applying the moves to the old tables gives the new ones.
    for seq, table in table_before.items():
        for s, src, dst, n in zip(moves.seq_ids, moves.src, moves.dst, moves.length,
                                  strict=True):
            if s == seq:
                for k in range(int(n)):
                    table[table.index(int(src) + k)] = int(dst) + k
        assert a.block_table(seq).tolist() == table


def test_pairs_coalesce_moves_of_neighbouring_sequences() -> None:
    moves = BlockMoves(("a", "b", "c"), np.array([0, 2, 9], np.int32),
                       np.array([10, 12, 20], np.int32), np.array([2, 3, 1], np.int32))
    assert moves.pairs().tolist() == [[0, 10, 5], [9, 20, 1]]
    assert moves.pairs().dtype == np.int64
    assert moves.moved_sequences == ["a", "b", "c"]


@settings(max_examples=150, deadline=None)
@given(
    num_blocks=st.integers(8, 200),
    initial=st.sampled_from([2, 4, 16, 60]),
    quantum=st.sampled_from([None, 1, 7]),
    ops=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 12), st.booleans()),
                 max_size=40),
    want=st.floats(0.0, 1.0),
    pin=st.lists(st.integers(0, 5), max_size=2),
    undo=st.booleans(),
)
def test_compaction_against_a_model(num_blocks: int, initial: int, quantum: int | None,
                                    ops: list, want: float, pin: list[int],
                                    undo: bool) -> None:
    a = BlockGroupAllocator(num_blocks, initial_group_blocks=initial,
                            growth_quantum_blocks=quantum)
    for seq, n, drop in ops:
        if drop and seq in a:
            table = a.block_table(seq)
            a.free_blocks(seq, table[::2])
        elif n <= a.num_free_blocks:
            a.allocate(seq, n)
    free = a.num_free_blocks
    if free == 0:
        return
    n = max(1, int(want * free))
    tables = {s: a.block_table(s).tolist() for s in a.sequences()}
    original = {s: list(t) for s, t in tables.items()}
    largest = max((k for _, k in a.free_groups()), default=0)
    before = _state(a)
    moves = a.compact(n, pinned=pin)
    a.check_invariants()
    if moves is None:
        assert _state(a) == before
        # Only a fitting group or pinned blocks in every window stop an unbounded compact.
        assert largest >= n or pin
        return
    assert max(k for _, k in a.free_groups()) >= n
    assert a.num_free_blocks == free
    assert not set(moves.seq_ids) & set(pin)
    for seq, table in tables.items():
        for s, src, dst, k in zip(moves.seq_ids, moves.src, moves.dst, moves.length,
                                  strict=True):
            if s == seq:
                for i in range(int(k)):
                    table[table.index(int(src) + i)] = int(dst) + i
        assert a.block_table(seq).tolist() == table
    # Sources are inside the new free space, destinations outside it.
    p = moves.pairs()
    src = {int(b) for s0, _, k in p for b in range(s0, s0 + k)}
    dst = {int(b) for _, d0, k in p for b in range(d0, d0 + k)}
    assert not src & dst
    if undo:  # the inverse: every table as before the compaction, no block lost
        a.undo_moves(moves)
        a.check_invariants()
        assert {s: a.block_table(s).tolist() for s in a.sequences()} == original
        assert a.num_free_blocks == free
        return
    new = a.allocate("new", n).tolist()
    assert new == list(range(new[0], new[0] + n))


# -- growth reservations --------------------------------------------------------------


def test_reserve_grows_the_tail_from_the_free_group_after_it() -> None:
    a = BlockGroupAllocator(64, initial_group_blocks=8)
    a.allocate("a", 4)  # [0, 4), tail [4, 8)
    assert a.reservation("a") == (4, 4)
    assert a.reserve("a", 2) == 0  # already that long
    assert a.reserve("a", 10) == 6
    assert a.reservation("a") == (4, 10)
    a.check_invariants()
    assert a.allocate("a", 10).tolist() == list(range(4, 14))
    a.allocate("b", 50)  # [14, 64): nothing after "a" is free any more
    assert a.reservation("a")[1] == 0
    assert a.reserve("a", 5) == 0 and a.reservation("a")[1] == 0
    a.check_invariants()


def test_reserve_bad_input_and_per_block_mode() -> None:
    a = BlockGroupAllocator(16, initial_group_blocks=4)
    a.allocate("a", 2)
    before = _state(a)
    with pytest.raises(KeyError):
        a.reserve("zzz", 3)
    with pytest.raises(ValueError):
        a.reserve("a", -1)
    with pytest.raises(TypeError):
        a.reserve("a", 2.5)
    assert _state(a) == before
    p = BlockGroupAllocator.per_block(8)
    p.allocate("a", 2)
    assert p.reserve("a", 4) == 0 and p.num_reserved_blocks == 0


# -- the manager: compaction on swap-in ------------------------------------------------


def _fragmented_manager(**kw):
    """A 24-block pool where sequence 0 (5 blocks) is swapped out and the free space is
    in one-block holes between running one-block sequences."""
    from kvswitch.testing.swap_manager_state_machine import default_manager

    m, kv = default_manager(gpu_blocks=24, num_workers=0, **kw)
    m.allocate(0, 5)
    for r, a in enumerate(kv):
        a[m.block_table(0)] = 100 + r
    m.swap_out(0, 20)
    fillers = []
    seq = 1
    while m.gpu.num_free_blocks:
        m.allocate(seq, 1)
        fillers.append(seq)
        seq += 1
    fillers.sort(key=lambda s: int(m.block_table(s)[0]))
    kept = []
    for i, s in enumerate(fillers):
        if i % 2:
            m.free(s)
        else:
            kept.append(s)
    for s in kept:  # each kept sequence's one block holds its own id
        for a in kv:
            a[m.block_table(s)] = s
    assert max(n for _, n in m.gpu.free_groups()) < 5 <= m.gpu.num_free_blocks
    return m, kv, kept


def test_swap_in_compacts_reports_tables_and_keeps_every_byte() -> None:
    seen = []
    m, kv, kept = _fragmented_manager(compaction=True, compaction_max_moved=4.0,
                                      on_block_tables_changed=seen.append)
    table = m.swap_in(0)
    assert table.tolist() == list(range(table[0], table[0] + 5))  # one group
    s = m.stats()
    assert s.migrations == 1 and s.migrated_blocks >= 1 and s.migrate_extents >= 1
    assert s.migrate_bytes == s.migrated_blocks * m.engine.device_layout.bytes_per_block
    assert len(seen) == 1
    changes = m.take_block_table_changes()
    assert set(changes) == set(seen[0]) and set(changes) <= set(kept)
    assert m.take_block_table_changes() == {}
    m.wait_swap_in(0)
    for r, a in enumerate(kv):
        assert (a[m.block_table(0)] == 100 + r).all()
        for q in kept:  # moved or not, each reads its own bytes through its table
            assert (a[m.block_table(q)] == q).all()
    m.gpu.check_invariants()
    m.close()


def test_swap_in_without_compaction_lands_in_several_groups() -> None:
    m, _, _ = _fragmented_manager()
    table = m.swap_in(0)
    assert len(m.gpu.groups(0)) > 1 and len(table) == 5
    assert m.stats().migrations == 0 and m.take_block_table_changes() == {}
    m.close()


def test_the_cap_on_moved_blocks_is_respected() -> None:
    m, _, _ = _fragmented_manager(compaction=True, compaction_max_moved=0.0)
    m.swap_in(0)
    assert m.stats().migrations == 0 and len(m.gpu.groups(0)) > 1
    m.close()


def test_a_failed_migration_fails_the_moved_sequences() -> None:
    """The moved sequences fail; no block-table report names them (red-team round 2,
    repro_5: the callback and take_block_table_changes named the failed ones)."""
    seen = []
    m, kv, kept = _fragmented_manager(compaction=True, compaction_max_moved=4.0,
                                      on_block_tables_changed=seen.append)
    before = {s: m.block_table(s).tolist() for s in kept}
    m.engine._engine._fail_next_jobs(1, "injected copy failure")
    m.swap_in(0)
    moved = {s for s in kept if m.block_table(s).tolist() != before[s]}
    assert moved
    assert seen == [{}] and m.take_block_table_changes() == {}
    failed = m.take_failed()
    assert set(failed) == moved
    for s, error in failed.items():
        assert error.direction == "migrate" and error.seq_id == s
        assert m.state(s) == "failed"
    assert m.stats().migrate_failures == len(moved)
    m.wait_swap_in(0)  # its own copies were not ordered after the finished migration
    for r, a in enumerate(kv):
        assert (a[m.block_table(0)] == 100 + r).all()
    for s in moved:
        m.free(s)
    m.gpu.check_invariants()
    m.close()


def test_manager_compaction_options_are_checked() -> None:
    from kvswitch.testing.swap_manager_state_machine import default_manager

    with pytest.raises(ValueError, match="per-block"):
        default_manager(per_block=True, compaction=True)
    with pytest.raises(ValueError, match="compaction_max_moved"):
        default_manager(compaction=True, compaction_max_moved=-1.0)
    m, _, _ = _fragmented_manager(compaction=True)
    free = m.gpu.free_groups()
    with pytest.raises(ValueError):
        m.swap_in(0, reserve_blocks=-1)
    with pytest.raises(TypeError):
        m.swap_in(0, reserve_blocks=1.5)
    assert m.state(0) == "swapped_out" and m.gpu.free_groups() == free
    m.close()


# -- review findings: compaction failures, reports, caps and streams ----------------------


def _tables(m) -> dict:
    return {s: m.block_table(s).tolist() for s in m.gpu.sequences()}


def _migrate_cannot_be_queued(m, cause: str) -> type:
    """Make the next migration's submit raise, as a close by another thread between the
    check and the submit would, or a MemoryError; returns the exception type."""
    from kvswitch import EngineClosedError

    if cause == "closed":
        check = m.engine.check_migrate

        def check_then_close(**kw):
            check(**kw)
            m.engine.close()
        m.engine.check_migrate = check_then_close
        return EngineClosedError

    def no_memory(*args, **kw):
        raise MemoryError("no memory for the migration")
    m.engine.migrate = no_memory
    return MemoryError


@pytest.mark.parametrize("cause", ["closed", "memory"])
def test_a_migration_that_cannot_be_queued_is_undone(cause: str) -> None:
    """gpu.compact() rewrote the tables, then queueing the migration raised: the moves are
    undone, so every sequence reads its own bytes through its (old) table again."""
    m, kv, kept = _fragmented_manager(compaction=True, compaction_max_moved=4.0)
    before = _tables(m)
    with pytest.raises(_migrate_cannot_be_queued(m, cause)):
        m.swap_in(0)
    assert _tables(m) == before
    assert m.state(0) == "swapped_out" and 0 not in m.gpu
    assert m.take_block_table_changes() == {} and m.take_failed() == {}
    assert m.failed == [] and m.stats().migrations == 0
    for q in kept:
        assert m.state(q) == "running"
        for a in kv:
            assert (a[m.block_table(q)] == q).all()
    m.gpu.check_invariants()
    if cause == "memory":  # the next swap-in compacts and lands in one group
        del m.engine.migrate
        m.swap_in(0)
        m.wait_swap_in(0)
        assert len(m.gpu.groups(0)) == 1 and m.stats().migrations == 1
        for r, a in enumerate(kv):
            assert (a[m.block_table(0)] == 100 + r).all()
            for q in kept:
                assert (a[m.block_table(q)] == q).all()
    m.close()


@pytest.mark.parametrize("cause", ["closed", "memory"])
def test_a_migration_that_cannot_be_queued_nor_undone_fails_every_moved_sequence(
        cause: str, monkeypatch) -> None:
    """The fallback: if the allocator refused the undo, the moved sequences' new blocks
    were never filled, so they must be failed, never left running."""
    m, kv, kept = _fragmented_manager(compaction=True, compaction_max_moved=4.0)
    before = _tables(m)

    def refuse(self, moves):
        raise ValueError("undo refused")
    monkeypatch.setattr(BlockGroupAllocator, "undo_moves", refuse)
    with pytest.raises(_migrate_cannot_be_queued(m, cause)):
        m.swap_in(0)
    after = _tables(m)
    moved = {s for s in before if s in after and after[s] != before[s]}
    assert moved  # the allocator did move blocks
    assert m.state(0) == "swapped_out" and 0 not in m.gpu
    assert m.take_block_table_changes() == {}
    failed = m.take_failed()
    assert set(failed) == moved
    for s, e in failed.items():
        assert e.direction == "migrate" and e.seq_id == s and e.job_id is None
        assert m.state(s) == "failed"
    assert m.stats().migrate_failures == len(moved) and m.stats().migrations == 0
    for q in kept:  # every sequence still running reads its own bytes
        if m.state(q) == "running":
            for a in kv:
                assert (a[m.block_table(q)] == q).all()
    for s in moved:
        m.free(s)
    m.gpu.check_invariants()
    m.close()


def test_block_table_changes_are_the_tables_at_the_time_they_are_taken() -> None:
    seen = []
    m, _, _ = _fragmented_manager(compaction=True, compaction_max_moved=4.0,
                                  on_block_tables_changed=seen.append)
    m.swap_in(0)
    m.wait_swap_in(0)
    assert len(seen) == 1 and len(seen[0]) >= 2
    for s, table in seen[0].items():  # the callback's tables: current when it ran
        assert table.dtype == np.int32 and table.tolist() == m.block_table(s).tolist()
    grown, gone = list(seen[0])[:2]
    m.allocate(grown, 2)  # grows after the compaction, before the adapter takes the changes
    m.swap_out(gone, m.block_size)
    changes = m.take_block_table_changes()
    assert gone not in changes  # holds no GPU blocks any more
    assert set(changes) == set(seen[0]) - {gone}
    for s, table in changes.items():
        assert table.dtype == np.int32 and table.tolist() == m.block_table(s).tolist()
    assert len(changes[grown]) == 3
    assert m.take_block_table_changes() == {}
    m.close()


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), -1.0])
def test_compaction_max_moved_must_be_finite_and_non_negative(value: float) -> None:
    from kvswitch.testing.swap_manager_state_machine import default_manager

    with pytest.raises(ValueError, match="compaction_max_moved"):
        default_manager(compaction=True, compaction_max_moved=value)


def test_a_huge_finite_compaction_cap_means_no_limit() -> None:
    m, kv, kept = _fragmented_manager(compaction=True, compaction_max_moved=1e300)
    table = m.swap_in(0)
    assert len(m.gpu.groups(0)) == 1 and len(table) == 5
    m.wait_swap_in(0)
    for q in kept:
        for a in kv:
            assert (a[m.block_table(q)] == q).all()
    m.close()


@pytest.mark.parametrize("reserve", [0, 2])
def test_the_cap_is_a_fraction_of_the_swap_in_blocks_plus_the_reserve(
        reserve: int, monkeypatch) -> None:
    """The documented meaning of compaction_max_moved: floor(cap x (the swap-in's blocks +
    reserve_blocks, at most the free blocks)) blocks, for a free group of that size."""
    m, _, _ = _fragmented_manager(compaction=True, compaction_max_moved=0.7)
    calls = []
    compact = BlockGroupAllocator.compact

    def spy(self, num_blocks, **kw):
        calls.append((num_blocks, kw["max_moved"]))
        return compact(self, num_blocks, **kw)

    monkeypatch.setattr(BlockGroupAllocator, "compact", spy)
    size = min(5 + reserve, m.gpu.num_free_blocks)
    m.swap_in(0, reserve_blocks=reserve)
    assert calls == [(size, int(0.7 * size))]
    m.close()


def test_cuda_backend_without_after_does_not_compact(monkeypatch) -> None:
    """On a stream backend a migration without ``after`` could race the compute kernels
    that still write the running sequences' blocks: such a swap-in must not compact. The
    rule is keyed on the engine's backend (a host engine made to report "cuda")."""
    from kvswitch import AsyncSwapEngine

    m, kv, kept = _fragmented_manager(compaction=True, compaction_max_moved=4.0)
    monkeypatch.setattr(AsyncSwapEngine, "backend", property(lambda self: "cuda"))
    before = _tables(m)
    table = m.swap_in(0)
    assert len(m.gpu.groups(0)) > 1 and len(table) == 5
    assert m.stats().migrations == 0 and m.take_block_table_changes() == {}
    assert {s: t for s, t in _tables(m).items() if s != 0} == before
    monkeypatch.undo()  # the same pool on the host backend compacts (the control)
    m2, _, _ = _fragmented_manager(compaction=True, compaction_max_moved=4.0)
    m2.swap_in(0)
    assert m2.stats().migrations == 1 and len(m2.gpu.groups(0)) == 1
    m.close()
    m2.close()


class _PendingMigration:
    """A migrate job the test finishes by hand (the host backend always waits for a real
    one in swap_in, so a migration still pending is only reachable with a stand-in)."""

    id = root_job_id = 999
    nbytes = 0
    elapsed_s = None

    def __init__(self) -> None:
        self.error = None
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def wait(self) -> None:  # what swap_in does without ``before``: returns, still pending
        pass

    def fail(self, why: str) -> None:
        self.error = why
        self.finished = True


@pytest.mark.parametrize("how", ["freed_and_reused", "swapped_out_and_in"])
def test_an_old_migration_fails_only_sequences_still_holding_the_moved_blocks(
        how: str) -> None:
    m, kv, _ = _fragmented_manager(compaction=True, compaction_max_moved=4.0)
    pending = _PendingMigration()
    m.engine.migrate = lambda pairs, **kw: pending
    m.swap_in(0)
    moved = list(m.take_block_table_changes())
    assert len(moved) >= 2
    other, untouched = moved[0], moved[1:]
    del m.engine.migrate  # the real engine from here on
    if how == "freed_and_reused":
        m.free(other)
        m.allocate(other, 1)  # a new sequence under the old id, on other blocks
    else:
        m.swap_out(other, m.block_size)
        m.synchronize()
        m.swap_in(other)
        m.wait_swap_in(other)  # its KV came from the host copy
    assert m.state(other) == "running"
    pending.fail("injected migration failure")
    m.poll()
    failed = m.take_failed()
    assert set(failed) == set(untouched)  # the control: those still hold the moved blocks
    assert all(e.direction == "migrate" for e in failed.values())
    assert m.state(other) == "running" and other not in m.failed
    m.close()


# -- undo_moves: the inverse of a compaction whose copies could not be issued -------------


def _busy() -> BlockGroupAllocator:
    """16 blocks; "a" and "b" interleaved with holes, "c" holding a reserved tail."""
    a = BlockGroupAllocator(16, initial_group_blocks=2)
    for s in ("a", "b", "a", "b", "c"):
        a.allocate(s, 2)
    a.free_blocks("a", a.block_table("a")[:1])
    a.free_blocks("b", a.block_table("b")[1:2])
    a.reserve("c", 2)
    a.check_invariants()
    return a


@pytest.mark.parametrize(("maker", "num_blocks"), [(_striped, 4), (_striped, 6), (_busy, 7),
                                                  (_busy, 8)])
def test_undo_moves_restores_every_table(maker, num_blocks: int) -> None:
    a = maker()
    before = _state(a)
    groups = {s: a.groups(s) for s in a.sequences()}
    moves = a.compact(num_blocks)
    assert moves
    assert _state(a)[0] != before[0]
    a.undo_moves(moves)
    a.check_invariants()
    after = _state(a)
    assert after[0] == before[0]  # every table, block for block
    assert after[3] == before[3]  # as many blocks outside all tables
    assert {s: a.groups(s) for s in a.sequences()} == groups


def test_undo_moves_refuses_what_it_cannot_undo_and_changes_nothing() -> None:
    a = _striped()
    moves = a.compact(4)
    assert moves
    state = _state(a)
    n = len(moves)

    def variant(**kw) -> BlockMoves:
        fields = {"seq_ids": moves.seq_ids, "src": moves.src, "dst": moves.dst,
                  "length": moves.length, **kw}
        return BlockMoves(**fields)

    bad = [
        (variant(seq_ids=("nobody",) * n), KeyError),
        (variant(src=moves.dst), ValueError),  # the sources are not free
        (variant(dst=moves.src), ValueError),  # not in the table
        (variant(length=moves.length + 100), ValueError),
        (BlockMoves(moves.seq_ids * 2, np.concatenate([moves.src] * 2),
                    np.concatenate([moves.dst] * 2), np.concatenate([moves.length] * 2)),
         ValueError),  # overlapping moves
    ]
    for wrong, error in bad:
        with pytest.raises(error):
            a.undo_moves(wrong)
        assert _state(a) == state
    a.undo_moves(moves)
    with pytest.raises(ValueError):  # done already: the sources are in the table again
        a.undo_moves(moves)
    per_block = BlockGroupAllocator.per_block(4)
    with pytest.raises(ValueError, match="per-block"):
        per_block.undo_moves(BlockMoves((), np.zeros(0, np.int32), np.zeros(0, np.int32),
                                        np.zeros(0, np.int32)))
