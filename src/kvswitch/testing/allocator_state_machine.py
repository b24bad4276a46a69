"""A hypothesis state machine that checks a [`BlockGroupAllocator`][] against a
simple reference model after every step.

Engine developers can reuse it to check an allocator they configure, or a subclass with
their own policy::

    from hypothesis import settings
    from kvswitch.testing import AllocatorStateMachine

    class MyAllocatorMachine(AllocatorStateMachine):
        def make_allocator(self, num_blocks, initial_group_blocks):
            return MyAllocator(num_blocks, initial_group_blocks=initial_group_blocks)

    TestMyAllocator = MyAllocatorMachine.TestCase
    TestMyAllocator.settings = settings(max_examples=200, stateful_step_count=50)

The reference model is the list of block ids each sequence holds in token order. After each
step the machine checks: every block is in exactly one place (a block table, a reserved
tail, a free group); no block table holds a duplicate; free groups are disjoint, sorted and
never adjacent; a sequence's groups cover its table exactly; counters agree; and
``allocate`` raised ``OutOfBlocksError`` exactly when fewer blocks were free than requested.
A call that raised must have left everything unchanged.

[`claim`][kvswitch.BlockGroupAllocator.claim] (blocks outside every table, possibly inside
reserved tails, and bad ids that must change nothing) and
[`release_reservation`][kvswitch.BlockGroupAllocator.release_reservation] are rules too.

Compaction ([`compact`][kvswitch.BlockGroupAllocator.compact]) is a rule too: the model applies
the returned moves to its tables (a moved block keeps its table position and takes its new
id), and the machine checks that pinned sequences did not move, that no more than
``max_moved`` blocks moved, that a compaction which changed something left a free group of
the requested size, that one which returned None changed nothing, and that a following
``allocate`` of that size by a new sequence lands in one group (no false out-of-memory and
no false fragmentation).

Requires ``hypothesis`` (``pip install ".[test]"``).
"""

from __future__ import annotations

import contextlib
from itertools import pairwise
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kvswitch.allocator import BlockGroupAllocator, OutOfBlocksError

__all__ = ["AllocatorStateMachine", "allocator_state"]

def allocator_state(a: Any) -> tuple:
    """Everything observable of an allocator (block tables, reserved tails, free groups,
    counters), to compare before and after a call that must change nothing."""
    return (
        {s: a.block_table(s).tolist() for s in a.sequences()},
        {s: a.reservation(s) for s in a.sequences()},
        a.free_groups(),
        a.num_free_blocks,
        a.num_reserved_blocks,
    )


# A small id space so that rules often hit existing sequences (and sometimes unknown ones).
SEQUENCE_IDS = st.sampled_from(["a", "b", "c", "d", 0, 1, 2, (3, "x")])


class AllocatorStateMachine(RuleBasedStateMachine):
    """Random allocate / free / free_blocks sequences, including bad input, checked against
    a reference model of block tables."""

    def __init__(self) -> None:
        super().__init__()
        self.allocator: Any = None
        self.growth_quantum_blocks: int | None = None
        self.tables: dict[Any, list[int]] = {}  # the reference model

    def make_allocator(self, num_blocks: int, initial_group_blocks: int) -> Any:
        """Build the allocator under test; override to test another configuration. The
        drawn growth quantum (None: the default) is ``self.growth_quantum_blocks``."""
        return BlockGroupAllocator(num_blocks, initial_group_blocks=initial_group_blocks,
                                   growth_quantum_blocks=self.growth_quantum_blocks)

    @initialize(
        num_blocks=st.integers(1, 256),
        initial_group_blocks=st.sampled_from([1, 2, 5, 16, 60]),
        growth_quantum_blocks=st.sampled_from([None, 1, 3, 40]),
    )
    def create(self, num_blocks: int, initial_group_blocks: int,
               growth_quantum_blocks: int | None) -> None:
        self.growth_quantum_blocks = growth_quantum_blocks
        self.allocator = self.make_allocator(num_blocks, initial_group_blocks)
        self.tables = {}

    # -- helpers -----------------------------------------------------------------------

    def snapshot(self) -> tuple:
        return allocator_state(self.allocator)

    def used_blocks(self) -> int:
        return sum(len(t) for t in self.tables.values())

    # -- rules -------------------------------------------------------------------------

    @rule(seq=SEQUENCE_IDS, n=st.integers(1, 80))
    def allocate(self, seq: Any, n: int) -> None:
        before = self.snapshot()
        free = self.allocator.num_blocks - self.used_blocks()
        assert self.allocator.num_free_blocks == free
        in_tables = {b for t in self.tables.values() for b in t}
        try:
            new = self.allocator.allocate(seq, n)
        except OutOfBlocksError:
            assert free < n, f"OutOfBlocksError with {free} free blocks for {n}"
            assert self.snapshot() == before, "a failed allocate changed the allocator"
            return
        assert free >= n
        assert isinstance(new, np.ndarray) and new.dtype == np.int32 and new.shape == (n,)
        ids = new.tolist()
        assert not in_tables & set(ids), "allocate handed out a block already in a table"
        self.tables.setdefault(seq, []).extend(ids)

    @rule(seq=SEQUENCE_IDS, n=st.integers(-3, 0))
    def allocate_non_positive(self, seq: Any, n: int) -> None:
        before = self.snapshot()
        try:
            self.allocator.allocate(seq, n)
        except ValueError:
            pass
        else:
            raise AssertionError(f"allocate({n}) did not raise")
        assert self.snapshot() == before

    @rule(seq=SEQUENCE_IDS)
    def free(self, seq: Any) -> None:
        before = self.snapshot()
        if seq not in self.tables:
            try:
                self.allocator.free(seq)
            except KeyError:
                assert self.snapshot() == before
                return
            raise AssertionError(f"free of unknown sequence {seq!r} did not raise")
        assert self.allocator.free(seq) == len(self.tables.pop(seq))

    @precondition(lambda self: any(self.tables.values()))
    @rule(data=st.data())
    def free_some_blocks(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted((s for s, t in self.tables.items() if t), key=repr)))
        table = self.tables[seq]
        chosen = data.draw(st.lists(st.sampled_from(table), min_size=1, unique=True))
        self.allocator.free_blocks(seq, np.array(chosen, dtype=np.int64))
        gone = set(chosen)
        self.tables[seq] = [b for b in table if b not in gone]

    @precondition(lambda self: any(self.tables.values()))
    @rule(data=st.data(), kind=st.sampled_from(["out_of_range", "not_owned", "twice"]))
    def free_blocks_bad(self, data: st.DataObject, kind: str) -> None:
        seq = data.draw(st.sampled_from(sorted((s for s, t in self.tables.items() if t), key=repr)))
        table = self.tables[seq]
        owned = data.draw(st.lists(st.sampled_from(table), max_size=3, unique=True))
        n = self.allocator.num_blocks
        if kind == "out_of_range":
            bad = [data.draw(st.sampled_from([-1, n, n + 7]))]
        elif kind == "twice":
            bad = [table[0], table[0]]
        else:
            others = [b for b in range(n) if b not in set(table)]
            if not others:
                return
            bad = [data.draw(st.sampled_from(others))]
        before = self.snapshot()
        try:
            self.allocator.free_blocks(seq, owned + bad)
        except ValueError:
            assert self.snapshot() == before, "a failed free_blocks changed the allocator"
            return
        raise AssertionError(f"free_blocks with a bad id ({kind}) did not raise")

    @rule(data=st.data(), max_moved=st.one_of(st.none(), st.integers(0, 40)),
          then_allocate=st.booleans())
    def compact(self, data: st.DataObject, max_moved: int | None, then_allocate: bool) -> None:
        a = self.allocator
        free = a.num_blocks - self.used_blocks()
        n = data.draw(st.integers(1, max(1, free + 2)))
        pinned = data.draw(st.lists(SEQUENCE_IDS, max_size=2, unique_by=repr))
        before = self.snapshot()
        if a.per_block_mode or n > free:
            try:
                a.compact(n, max_moved=max_moved, pinned=pinned)
            except (ValueError, OutOfBlocksError) as e:
                assert isinstance(e, ValueError) == a.per_block_mode
                assert self.snapshot() == before, "a failed compact changed the allocator"
                return
            raise AssertionError("compact did not raise for per-block mode or too few blocks")
        largest_before = max((n_ for _, n_ in a.free_groups()), default=0)
        moves = a.compact(n, max_moved=max_moved, pinned=pinned)
        if moves is None:
            assert self.snapshot() == before, "compact returned None but changed something"
            return
        assert largest_before < n, "compact changed something though a free group fitted"
        assert max_moved is None or moves.moved_blocks <= max_moved
        assert not set(moves.seq_ids) & set(pinned), "a pinned sequence moved"
        assert max(n_ for _, n_ in a.free_groups()) >= n, "compact made no group of n blocks"
        for seq, src, dst, length in zip(moves.seq_ids, moves.src.tolist(), moves.dst.tolist(),
                                         moves.length.tolist(), strict=True):
            table = self.tables[seq]
            for k in range(length):
                table[table.index(src + k)] = dst + k
        if then_allocate and "new" not in self.tables:
            new = a.allocate("new", n).tolist()
            assert new == list(range(new[0], new[0] + n)), "allocate after compact split"
            self.tables["new"] = new

    @rule(seq=SEQUENCE_IDS, n=st.integers(-1, 20))
    def reserve(self, seq: Any, n: int) -> None:
        a = self.allocator
        before = self.snapshot()
        if seq not in self.tables or n < 0:
            with contextlib.suppress(KeyError, ValueError):
                a.reserve(seq, n)
                raise AssertionError(f"reserve({seq!r}, {n}) did not raise")
            assert self.snapshot() == before, "a failed reserve changed the allocator"
            return
        old = a.reservation(seq)[1]
        added = a.reserve(seq, n)
        assert added >= 0 and a.reservation(seq)[1] == old + added
        assert added == 0 or old + added <= n
        assert a.num_free_blocks == before[3], "a reservation changed the free count"

    @rule(data=st.data(), seq=SEQUENCE_IDS,
          kind=st.sampled_from(["ok", "ok", "in_table", "twice", "out_of_range"]))
    def claim(self, data: st.DataObject, seq: Any, kind: str) -> None:
        a = self.allocator
        in_tables = {b for t in self.tables.values() for b in t}
        outside = [b for b in range(a.num_blocks) if b not in in_tables]
        ids = data.draw(st.lists(st.sampled_from(outside), max_size=6, unique=True)
                        if outside else st.just([]))
        if kind == "in_table" and in_tables:
            ids = ids + [data.draw(st.sampled_from(sorted(in_tables)))]
        elif kind == "twice" and ids:
            ids = ids + ids[:1]
        elif kind == "out_of_range":
            ids = ids + [data.draw(st.sampled_from([-1, a.num_blocks, a.num_blocks + 3]))]
        else:
            kind = "ok"
        before = self.snapshot()
        if a.per_block_mode or kind != "ok":
            try:
                a.claim(seq, ids)
            except ValueError:
                assert self.snapshot() == before, "a failed claim changed the allocator"
                return
            raise AssertionError(f"claim ({kind}, per-block {a.per_block_mode}) did not raise")
        a.claim(seq, ids)
        if ids:
            self.tables.setdefault(seq, []).extend(ids)
        assert a.num_free_blocks == before[3] - len(ids)
        if seq in self.tables:
            assert a.reservation(seq)[1] == 0 or not ids, "claim kept the claimer's tail"

    @rule(seq=SEQUENCE_IDS)
    def release_reservation(self, seq: Any) -> None:
        a = self.allocator
        before = self.snapshot()
        if seq not in self.tables:
            with contextlib.suppress(KeyError):
                a.release_reservation(seq)
                raise AssertionError(f"release_reservation({seq!r}) did not raise")
            assert self.snapshot() == before
            return
        tail = a.reservation(seq)[1]
        assert a.release_reservation(seq) == tail
        assert a.reservation(seq) == (0, 0)
        assert a.num_free_blocks == before[3], "releasing a tail changed the free count"
        assert a.num_reserved_blocks == before[4] - tail

    @rule(n=st.integers(-2, 0))
    def compact_non_positive(self, n: int) -> None:
        before = self.snapshot()
        try:
            self.allocator.compact(n)
        except ValueError:
            assert self.snapshot() == before
            return
        raise AssertionError(f"compact({n}) did not raise")

    @rule(seq=SEQUENCE_IDS)
    def free_blocks_unknown(self, seq: Any) -> None:
        if seq in self.tables:
            return
        before = self.snapshot()
        try:
            self.allocator.free_blocks(seq, [0])
        except KeyError:
            assert self.snapshot() == before
            return
        raise AssertionError("free_blocks of an unknown sequence did not raise")

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        if self.allocator is None:
            return
        a = self.allocator
        assert sorted(a.sequences(), key=repr) == sorted(self.tables, key=repr)
        for seq, table in self.tables.items():
            assert a.block_table(seq).tolist() == table
        assert a.num_free_blocks == a.num_blocks - self.used_blocks()

    @invariant()
    def every_block_in_one_place(self) -> None:
        if self.allocator is None:
            return
        a = self.allocator
        place = np.zeros(a.num_blocks, dtype=np.int64)
        free = a.free_groups()
        for (s0, l0), (s1, _) in pairwise(free):
            assert s0 + l0 < s1, f"free groups at {s0} and {s1} overlap or touch"
        for start, length in free:
            assert length > 0
            place[start : start + length] += 1
        reserved = 0
        for seq, table in self.tables.items():
            assert len(set(table)) == len(table), f"{seq!r} holds a block twice"
            covered = [b for s, n in a.groups(seq) for b in range(s, s + n)]
            assert covered == table, f"groups of {seq!r} do not cover its table"
            groups = a.groups(seq)
            for (s0, l0), (s1, _) in pairwise(groups):
                assert s0 + l0 != s1, f"groups of {seq!r} are not maximal runs"
            place[table] += 1
            r_start, r_len = a.reservation(seq)
            if r_len:
                assert table and r_start == table[-1] + 1
                assert not a.per_block_mode, "per-block mode reserved blocks"
                place[r_start : r_start + r_len] += 1
                reserved += r_len
        assert reserved == a.num_reserved_blocks
        assert (place == 1).all(), f"blocks not in exactly one place: {np.flatnonzero(place != 1)}"
        a.check_invariants()
