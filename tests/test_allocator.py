"""BlockGroupAllocator behaviour: the group policy, per-block mode, and every error path."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvswitch import BlockGroupAllocator, OutOfBlocksError


def state(a: BlockGroupAllocator):
    return (
        {s: a.block_table(s).tolist() for s in a.sequences()},
        {s: a.reservation(s) for s in a.sequences()},
        a.free_groups(),
        a.num_free_blocks,
    )


# -- group policy -------------------------------------------------------------------------


def test_first_group_reserves_initial_size_and_grows_in_place():
    a = BlockGroupAllocator(1000, initial_group_blocks=60)
    first = a.allocate("s", 3)
    assert first.dtype == np.int32
    assert first.tolist() == [0, 1, 2]
    assert a.reservation("s") == (3, 57)
    assert a.num_reserved_blocks == 57
    assert a.num_free_blocks == 997  # reserved blocks are in no block table
    for _ in range(57):  # decode: one block at a time, all from the reserved tail
        a.allocate("s", 1)
    assert a.groups("s") == [(0, 60)]
    assert a.reservation("s")[1] == 0
    a.allocate("s", 1)  # the blocks after the group are free: extend in place
    assert a.groups("s") == [(0, 61)]
    a.check_invariants()


def test_interleaved_sequences_each_stay_in_one_group():
    a = BlockGroupAllocator(10_000, initial_group_blocks=60)
    for _ in range(50):
        for seq in range(8):
            a.allocate(seq, 1)
    for seq in range(8):
        assert len(a.groups(seq)) == 1, a.groups(seq)
    assert a.stats().mean_group_blocks == 50.0
    a.check_invariants()


def test_later_groups_grow_with_the_sequence():
    a = BlockGroupAllocator(10_000, initial_group_blocks=4)
    a.allocate("s", 4)
    a.allocate("blocker", 1)  # takes the block after s's group: no in-place growth
    a.allocate("s", 1)
    (s0, l0), (s1, l1) = a.groups("s")
    assert (s0, l0) == (0, 4) and l1 == 1
    assert a.reservation("s")[1] == 3  # a new group as large as the sequence was (4)


def test_reserved_tails_are_split_off_under_pressure():
    a = BlockGroupAllocator(64, initial_group_blocks=60)
    a.allocate("a", 1)
    assert a.reservation("a")[1] > 0
    reserved = a.num_reserved_blocks
    # Ask for everything outside a's table: only possible by taking a's reserved tail.
    a.allocate("b", 63)
    assert a.num_free_blocks == 0
    assert a.num_reserved_blocks == 0
    assert reserved > 0
    a.check_invariants()


def test_reserved_tail_is_split_from_its_far_end():
    a = BlockGroupAllocator(100, initial_group_blocks=60)
    a.allocate("a", 1)  # group [0, 12): expected size capped at free/8
    start, length = a.reservation("a")
    a.allocate("b", 100 - 1 - length)  # all free groups
    a.allocate("c", 2)  # must come from a's tail, its far end
    # c takes a run to grow into: its growth quantum (60 // 4), at most half of a's tail,
    # and at least what it needs; what it does not use now is its own tail.
    taken = max(2, min(length // 2, 60 // 4))
    assert taken > 2
    assert a.reservation("a") == (start, length - taken)
    assert a.block_table("c").tolist() == [start + length - taken, start + length - taken + 1]
    assert a.reservation("c") == (start + length - taken + 2, taken - 2)
    a.check_invariants()


@pytest.mark.parametrize(("quantum", "groups"), [(None, 1), (5, 2), (1, 10)])
def test_growth_past_a_split_tail(quantum, groups):
    # Under pressure a sequence that grows one block at a time past its own tail gets its
    # next blocks as runs of the growth quantum from another's tail (issue 14). With a
    # quantum of 1 (the bare policy) it takes that tail's far end block by block, in falling
    # order: one new group per block, one copy per block at its next swap-out.
    a = BlockGroupAllocator(200, initial_group_blocks=40, growth_quantum_blocks=quantum)
    assert a.growth_quantum_blocks == (10 if quantum is None else quantum)
    a.allocate("big", 1)
    a.reserve("big", 199)  # every block outside big's table is its tail
    assert a.num_free_blocks == 199 and a.free_groups() == []
    for _ in range(10):
        a.allocate("g", 1)
    assert len(a.groups("g")) == groups
    assert a.num_free_blocks == 189  # the quantum is reserved, never lost
    a.check_invariants()


@pytest.mark.parametrize("bad", [0, -1])
def test_growth_quantum_must_be_positive(bad):
    with pytest.raises(ValueError, match="growth_quantum_blocks"):
        BlockGroupAllocator(10, growth_quantum_blocks=bad)
    with pytest.raises(TypeError):
        BlockGroupAllocator(10, growth_quantum_blocks=True)


def test_per_block_mode_has_no_growth_quantum():
    a = BlockGroupAllocator(20, initial_group_blocks=1)
    assert a.growth_quantum_blocks == 1
    a.allocate("a", 3)
    assert a.reservation("a")[1] == 0


def test_free_merges_adjacent_free_groups():
    a = BlockGroupAllocator(300, initial_group_blocks=10)
    for seq in "abc":
        a.allocate(seq, 10)
    a.free("b")
    a.free("a")
    a.free("c")
    assert a.free_groups() == [(0, 300)]
    assert a.num_free_blocks == 300
    assert len(a) == 0


def test_free_returns_table_length_and_releases_reservation():
    a = BlockGroupAllocator(200)
    a.allocate("s", 5)
    assert a.num_reserved_blocks > 0
    assert a.free("s") == 5
    assert a.num_reserved_blocks == 0
    assert a.free_groups() == [(0, 200)]


def test_free_blocks_keeps_order_and_regroups():
    a = BlockGroupAllocator(100, initial_group_blocks=10)
    a.allocate("s", 8)
    a.free_blocks("s", [2, 3])
    assert a.block_table("s").tolist() == [0, 1, 4, 5, 6, 7]
    assert a.groups("s") == [(0, 2), (4, 4)]
    assert a.reservation("s")[1] > 0  # last block kept: the tail stays
    a.free_blocks("s", np.array([7], dtype=np.int64))
    assert a.reservation("s") == (0, 0)  # last block gone: tail released
    a.free_blocks("s", [0, 1, 4, 5, 6])
    assert "s" in a and a.num_table_blocks("s") == 0
    assert a.free_groups() == [(0, 100)]
    a.allocate("s", 1)  # an emptied sequence can grow again
    a.check_invariants()


def test_free_blocks_of_nothing_is_a_no_op():
    a = BlockGroupAllocator(10)
    a.allocate("s", 2)
    before = state(a)
    a.free_blocks("s", [])
    assert state(a) == before


def test_any_hashable_sequence_id():
    a = BlockGroupAllocator(100, initial_group_blocks=2)
    ids = ["req-1", 7, ("conv", 3), None]
    for i, seq in enumerate(ids):
        a.allocate(seq, i + 1)
    assert a.sequences() == ids
    assert [a.num_table_blocks(s) for s in ids] == [1, 2, 3, 4]
    assert ["x"] not in a  # unhashable: simply not there


def test_stats_histogram_and_fragmentation():
    a = BlockGroupAllocator(100, initial_group_blocks=1)
    for seq in range(10):
        a.allocate(seq, 10)
    for seq in range(0, 10, 2):
        a.free(seq)
    st_ = a.stats()
    assert st_.num_sequences == 5
    assert st_.num_groups == 5
    assert st_.mean_group_blocks == 10.0
    assert st_.group_length_histogram == (0, 0, 0, 5)  # 10 blocks: bucket [8, 16)
    assert st_.num_free_groups == 5
    assert st_.largest_free_group == 10
    assert st_.fragmentation == pytest.approx(1 - 10 / 50)


# -- per-block mode (the vLLM baseline) ------------------------------------------------------


def test_per_block_mode_is_a_fifo_free_list():
    a = BlockGroupAllocator.per_block(8)
    assert a.per_block_mode
    assert a.allocate("a", 3).tolist() == [0, 1, 2]
    assert a.allocate("b", 2).tolist() == [3, 4]
    assert a.num_reserved_blocks == 0
    a.free("a")  # appended to the free list in reverse table order: 2, 1, 0
    assert a.allocate("c", 5).tolist() == [5, 6, 7, 2, 1]
    assert a.groups("c") == [(5, 3), (2, 1), (1, 1)]
    a.check_invariants()


def test_per_block_mode_scatters_interleaved_sequences():
    a = BlockGroupAllocator.per_block(1000)
    for _ in range(20):
        for seq in range(4):
            a.allocate(seq, 1)
    assert all(len(a.groups(seq)) == 20 for seq in range(4))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 40), st.booleans()), max_size=60))
def test_groups_serve_every_request_per_block_mode_serves(ops):
    """Same operations on both modes: group mode never fails where per-block mode succeeds."""
    grouped = BlockGroupAllocator(128, initial_group_blocks=60)
    per_block = BlockGroupAllocator.per_block(128)
    for seq, n, release in ops:
        outcomes = []
        for a in (grouped, per_block):
            if release and seq in a:
                a.free(seq)
                outcomes.append("freed")
                continue
            try:
                a.allocate(seq, n)
                outcomes.append("ok")
            except OutOfBlocksError:
                outcomes.append("oom")
        assert outcomes[0] == outcomes[1], (seq, n, outcomes)
    grouped.check_invariants()
    per_block.check_invariants()


# -- errors leave the allocator unchanged ----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error"),
    [((0,), ValueError), ((-5,), ValueError), ((10.0,), TypeError), ((True,), TypeError),
     ((2**31,), ValueError)],
)
def test_constructor_rejects_bad_sizes(args, error):
    with pytest.raises(error):
        BlockGroupAllocator(*args)


@pytest.mark.parametrize("initial", [0, -1])
def test_constructor_rejects_bad_initial_group(initial):
    with pytest.raises(ValueError, match="initial_group_blocks"):
        BlockGroupAllocator(10, initial_group_blocks=initial)


@pytest.fixture
def busy():
    a = BlockGroupAllocator(50, initial_group_blocks=8)
    a.allocate("a", 10)
    a.allocate("b", 7)
    a.free_blocks("a", [1])
    return a


def test_out_of_blocks_is_a_memory_error_and_changes_nothing(busy):
    before = state(busy)
    with pytest.raises(OutOfBlocksError, match="only 34 of 50 lie outside all block tables"):
        busy.allocate("c", 35)
    with pytest.raises(MemoryError):
        busy.allocate("a", 35)
    assert state(busy) == before
    assert "c" not in busy


@pytest.mark.parametrize("n", [0, -1])
def test_allocate_non_positive(busy, n):
    before = state(busy)
    with pytest.raises(ValueError, match="positive"):
        busy.allocate("a", n)
    assert state(busy) == before


def test_allocate_non_integer_count(busy):
    with pytest.raises(TypeError):
        busy.allocate("a", 1.5)


@pytest.mark.parametrize(
    "call",
    [
        lambda a: a.free("zzz"),
        lambda a: a.free_blocks("zzz", [0]),
        lambda a: a.block_table("zzz"),
        lambda a: a.groups("zzz"),
        lambda a: a.reservation("zzz"),
        lambda a: a.num_table_blocks("zzz"),
        lambda a: a.free(["unhashable"]),
    ],
)
def test_unknown_sequence_raises_key_error(busy, call):
    before = state(busy)
    with pytest.raises(KeyError, match="unknown sequence"):
        call(busy)
    assert state(busy) == before


def test_double_free_raises_key_error(busy):
    busy.free("b")
    before = state(busy)
    with pytest.raises(KeyError):
        busy.free("b")
    assert state(busy) == before


@pytest.mark.parametrize(
    ("ids", "error", "match"),
    [
        ([0, 50], ValueError, "out of range"),
        ([-1], ValueError, "out of range"),
        ([2**40], ValueError, "out of range"),
        ([0, 0], ValueError, "twice"),
        ([0, 12], ValueError, "not in the sequence's block table"),  # b's block
        ([1], ValueError, "not in the sequence's block table"),  # freed already
        ([0.0], TypeError, "integers"),
        ([[0]], ValueError, "one-dimensional"),
    ],
)
def test_free_blocks_bad_ids_change_nothing(busy, ids, error, match):
    before = state(busy)
    with pytest.raises(error, match=match):
        busy.free_blocks("a", ids)
    assert state(busy) == before
    busy.check_invariants()


@settings(max_examples=200, deadline=None)
@given(
    num_blocks=st.integers(8, 200),
    initial=st.sampled_from([2, 8, 20, 60]),
    quantum=st.sampled_from([None, 1, 4, 16]),
    ops=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 30), st.booleans()),
                 max_size=40),
)
def test_a_new_group_holds_the_growth_quantum_where_the_pool_has_it(
        num_blocks, initial, quantum, ops):
    # Invariant of the growth quantum Q (issue 14): a sequence that starts a group for one
    # block holds (in its table and tail) at least min(Q, largest free group) blocks when a
    # free group exists, and at least min(half the largest reserved tail, Q) when every
    # block outside the tables is in reserved tails.
    a = BlockGroupAllocator(num_blocks, initial_group_blocks=initial,
                            growth_quantum_blocks=quantum)
    q = a.growth_quantum_blocks
    for seq, n, drop in ops:
        if drop and seq in a:
            a.free_blocks(seq, a.block_table(seq)[::2])
        elif n <= a.num_free_blocks:
            a.allocate(seq, n)
    if a.num_free_blocks == 0:
        return
    largest_free = max((n for _, n in a.free_groups()), default=0)
    largest_tail = max((a.reservation(s)[1] for s in a.sequences()), default=0)
    a.allocate("new", 1)
    held = 1 + a.reservation("new")[1]
    if largest_free:
        assert held >= min(q, largest_free)
    else:
        assert held >= max(1, min(largest_tail // 2, q))
    a.check_invariants()
