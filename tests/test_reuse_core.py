"""ReuseTracker over its C++ per-sequence state (kvswitch._core.CpuCopy) agrees with a plain
NumPy model of the reuse rules (section 3.3 of the paper, as docs/design.md states them)
over random operation sequences: the same plans, host blocks, validity, statistics and
errors, on two host allocators that see the same calls."""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvswitch import BlockGroupAllocator, OutOfBlocksError
from kvswitch._core import CpuCopy
from kvswitch.reuse import ReuseTracker, coalesce_pairs

BLOCK = 4
HOST_BLOCKS = 24
SEQS = ("a", "b", "c", "d")


# -- the model ------------------------------------------------------------------------------


@dataclass
class _Copy:
    host: np.ndarray  # logical block -> host block, -1 when none
    tokens: np.ndarray  # tokens valid in each logical block's copy
    num_tokens: int = 0
    swapped_out: bool = False
    priority: float = 0.0
    last_used: int = 0


@dataclass
class _Plan:
    seq: Hashable
    direction: str
    pairs: np.ndarray
    copied: np.ndarray
    new: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    num_tokens: int = 0
    priority: float = 0.0
    state: str = "pending"


def held(num_tokens: int, n: int) -> np.ndarray:
    """Tokens each of n logical blocks holds in a sequence of num_tokens tokens."""
    return np.clip(num_tokens - np.arange(n) * BLOCK, 0, BLOCK).astype(np.int32)


class Model:
    """The reuse rules with NumPy arrays, one step at a time (no lock, no fast path)."""

    def __init__(self, host: BlockGroupAllocator) -> None:
        self.host = host
        self.copies: dict[Hashable, _Copy] = {}
        self.pending: dict[Hashable, _Plan] = {}
        self.clock = itertools.count(1)
        self.counts = dict.fromkeys(("outs", "ins", "copied", "reused", "reclaimed",
                                     "contaminations"), 0)

    def _table(self, table: np.ndarray, num_tokens: int) -> np.ndarray:
        n = -(-num_tokens // BLOCK)
        if table.size < n or (table[:n] < 0).any():
            raise ValueError("bad table")
        return table[:n].astype(np.int64)

    def plan_out(self, seq, table, num_tokens, priority):
        table = self._table(table, num_tokens)
        if seq in self.pending or (seq in self.copies and self.copies[seq].swapped_out):
            raise ValueError("pending or swapped out")
        n = len(table)
        c = self.copies.get(seq)
        host = np.full(n, -1, np.int32) if c is None else c.host.copy()
        tokens = np.zeros(n, np.int32) if c is None else c.tokens.copy()
        if len(host) < n:
            host = np.concatenate((host, np.full(n - len(host), -1, np.int32)))
            tokens = np.concatenate((tokens, np.zeros(n - len(tokens), np.int32)))
        missing = np.flatnonzero(host[:n] < 0)
        copied = np.flatnonzero(tokens[:n] < held(num_tokens, n))
        if missing.size > self.host.num_free_blocks:
            self._reclaim(missing.size - self.host.num_free_blocks, seq)
        new = self.host.allocate(seq, missing.size) if missing.size else np.zeros(0, np.int32)
        host[missing] = new
        if c is None:
            c = self.copies[seq] = _Copy(host, tokens)
        c.host, c.tokens = host, tokens
        plan = _Plan(seq, "out", coalesce_pairs(table[copied], host[copied]), copied, new,
                     num_tokens, priority)
        self.pending[seq] = plan
        return plan

    def plan_in(self, seq, table):
        c = self.copies[seq]
        if seq in self.pending or not c.swapped_out:
            raise ValueError("pending or not swapped out")
        table = self._table(table, c.num_tokens)
        n = len(table)
        plan = _Plan(seq, "in", coalesce_pairs(c.host[:n], table), np.arange(n),
                     num_tokens=c.num_tokens)
        self.pending[seq] = plan
        return plan

    def commit(self, plan):
        if self.pending.get(plan.seq) is not plan:
            raise ValueError("not pending")
        del self.pending[plan.seq]
        plan.state = "committed"
        c = self.copies[plan.seq]
        c.last_used = next(self.clock)
        if plan.direction == "in":
            c.swapped_out = False
            self.counts["ins"] += 1
            return
        h = held(plan.num_tokens, len(c.host))
        c.tokens = np.minimum(c.tokens, h)
        c.tokens[plan.copied] = h[plan.copied]
        self._cut(plan.seq, c, -(-plan.num_tokens // BLOCK))
        c.num_tokens, c.swapped_out, c.priority = plan.num_tokens, True, plan.priority
        self.counts["outs"] += 1
        self.counts["copied"] += plan.copied.size
        self.counts["reused"] += -(-plan.num_tokens // BLOCK) - plan.copied.size

    def cancel(self, plan):
        if self.pending.get(plan.seq) is not plan:
            raise ValueError("not pending")
        del self.pending[plan.seq]
        plan.state = "cancelled"
        self._release_new(plan)
        self._forget_if_empty(plan.seq)

    def fail(self, plan):
        if self.pending.get(plan.seq) is plan:
            del self.pending[plan.seq]
            committed = False
        elif plan.state == "committed" and plan.seq in self.copies:
            committed = True
        else:
            raise ValueError("neither pending nor committed")
        plan.state = "failed"
        if plan.direction == "out":
            c = self.copies[plan.seq]
            c.tokens[plan.copied[plan.copied < len(c.tokens)]] = 0
            if committed:
                c.swapped_out = False
            else:
                c.tokens = np.minimum(c.tokens, held(plan.num_tokens, len(c.tokens)))
                self._release_new(plan)
        self._forget_if_empty(plan.seq)

    def truncate(self, seq, num_tokens):
        if seq in self.pending:
            raise ValueError("pending")
        c = self.copies.get(seq)
        if c is None:
            return
        if c.swapped_out and num_tokens == 0:
            raise ValueError("swapped out")
        c.tokens = np.minimum(c.tokens, held(num_tokens, len(c.tokens)))
        self._cut(seq, c, -(-num_tokens // BLOCK))
        c.num_tokens = min(c.num_tokens, num_tokens)
        self._forget_if_empty(seq)

    def drop(self, seq):
        if seq in self.pending:
            raise ValueError("pending")
        del self.copies[seq]
        return self.host.free(seq) if seq in self.host else 0

    def valid_blocks(self, seq):
        c = self.copies[seq]
        h = held(c.num_tokens, len(c.host))
        return (c.host >= 0) & (c.tokens >= h) & (h > 0)

    def valid_tokens(self, seq):
        c = self.copies[seq]
        return np.where(c.host >= 0, c.tokens, 0)

    def _cut(self, seq, c, n):
        beyond = c.host[n:]
        if (beyond >= 0).any():
            self.host.free_blocks(seq, beyond[beyond >= 0])
        c.host, c.tokens = c.host[:n].copy(), c.tokens[:n].copy()

    def _release_new(self, plan):
        if plan.direction != "out" or not plan.new.size:
            return
        c = self.copies[plan.seq]
        self.host.free_blocks(plan.seq, plan.new)
        gone = np.isin(c.host, plan.new)
        c.host[gone], c.tokens[gone] = -1, 0

    def _reclaim(self, deficit, exclude):
        victims = sorted(
            ((c.priority, c.last_used, s) for s, c in self.copies.items()
             if s != exclude and not c.swapped_out and s not in self.pending
             and s in self.host and self.host.num_table_blocks(s) > 0),
            key=lambda v: (v[0], v[1]))
        if sum(self.host.num_table_blocks(s) for *_, s in victims) < deficit:
            raise OutOfBlocksError("host pool")
        for *_, s in victims:
            c = self.copies[s]
            live = np.flatnonzero(c.host >= 0)
            take = live[live.size - min(deficit, live.size):]
            self.host.free_blocks(s, c.host[take])
            c.host[take], c.tokens[take] = -1, 0
            deficit -= take.size
            self.counts["reclaimed"] += take.size
            self.counts["contaminations"] += 1
            if deficit <= 0:
                return

    def _forget_if_empty(self, seq):
        c = self.copies[seq]
        if not c.swapped_out and (c.host < 0).all() and c.num_tokens == 0:
            del self.copies[seq]
            if seq in self.host:
                self.host.free(seq)


# -- the comparison -------------------------------------------------------------------------


def outcome(fn, *args):
    """(result, None) or (None, exception type)."""
    try:
        return fn(*args), None
    except (ValueError, KeyError, OutOfBlocksError) as e:
        return None, type(e)


class TrackerAgreesWithModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tracker = ReuseTracker(BlockGroupAllocator(HOST_BLOCKS, initial_group_blocks=4),
                                    block_size=BLOCK)
        self.model = Model(BlockGroupAllocator(HOST_BLOCKS, initial_group_blocks=4))
        self.plans: list[tuple[object, _Plan]] = []  # (tracker plan, model plan)

    def _both(self, name, *args):
        got, err = outcome(getattr(self.tracker, name), *args)
        return got, err

    @rule(seq=st.sampled_from(SEQS), num_tokens=st.integers(1, 40),
          extra=st.integers(0, 3), base=st.integers(0, 50), gaps=st.booleans(),
          priority=st.sampled_from([0.0, 1.0, 2.5]), dtype=st.sampled_from(["int32", "int64"]))
    def swap_out(self, seq, num_tokens, extra, base, gaps, priority, dtype):
        n = -(-num_tokens // BLOCK) + extra
        step = 2 if gaps else 1  # a table with gaps: extents break on the GPU side
        table = (base + step * np.arange(n)).astype(dtype)
        got, err = outcome(lambda: self.tracker.plan_swap_out(seq, table, num_tokens,
                                                              priority=priority))
        want, werr = outcome(self.model.plan_out, seq, table, num_tokens, priority)
        assert err == werr
        if got is not None:
            self.check_plan(got, want)
            self.plans.append((got, want))

    @rule(seq=st.sampled_from(SEQS), base=st.integers(0, 50), extra=st.integers(0, 2))
    def swap_in(self, seq, base, extra):
        if seq not in self.model.copies:
            with pytest.raises(KeyError):
                self.tracker.plan_swap_in(seq, np.arange(base, base + 20))
            return
        n = -(-self.model.copies[seq].num_tokens // BLOCK) + extra
        table = np.arange(base, base + n, dtype=np.int64)
        got, err = outcome(self.tracker.plan_swap_in, seq, table)
        want, werr = outcome(self.model.plan_in, seq, table)
        assert err == werr
        if got is not None:
            self.check_plan(got, want)
            self.plans.append((got, want))

    @precondition(lambda self: self.plans)
    @rule(i=st.integers(0, 100), op=st.sampled_from(["commit", "cancel", "fail"]))
    def finish(self, i, op):
        got, want = self.plans[i % len(self.plans)]
        _, err = outcome(getattr(self.tracker, op), got)
        _, werr = outcome(getattr(self.model, op), want)
        assert err == werr

    @rule(seq=st.sampled_from(SEQS), num_tokens=st.integers(0, 40))
    def truncate(self, seq, num_tokens):
        _, err = outcome(self.tracker.truncate, seq, num_tokens)
        _, werr = outcome(self.model.truncate, seq, num_tokens)
        assert err == werr

    @rule(seq=st.sampled_from(SEQS))
    def drop(self, seq):
        got, err = outcome(self.tracker.drop, seq)
        want, werr = outcome(self.model.drop, seq)
        assert (got, err) == (want, werr)

    def check_plan(self, got, want):
        assert got.seq_id == want.seq and got.direction == want.direction
        assert got.pairs.dtype == np.int64 and got.pairs.shape == want.pairs.shape
        assert got.pairs.tolist() == want.pairs.tolist()
        assert got.copied_blocks == want.copied.size
        n = -(-want.num_tokens // BLOCK)
        assert got.reused_blocks == (n - want.copied.size if want.direction == "out" else 0)
        assert got.num_tokens == want.num_tokens

    @invariant()
    def same_state(self):
        t, m = self.tracker, self.model
        assert sorted(map(str, t.host.sequences())) == sorted(map(str, m.host.sequences()))
        assert t.host.num_free_blocks == m.host.num_free_blocks
        for seq in SEQS:
            assert (seq in t) == (seq in m.copies)
            if seq not in m.copies:
                continue
            c = m.copies[seq]
            assert t.host_block_table(seq).tolist() == c.host.tolist()
            assert t.valid_tokens(seq).tolist() == m.valid_tokens(seq).tolist()
            assert t.valid_blocks(seq).tolist() == m.valid_blocks(seq).tolist()
            assert t.is_swapped_out(seq) == c.swapped_out
            if seq in t.host:
                assert t.host.block_table(seq).tolist() == m.host.block_table(seq).tolist()
        s = t.stats()
        k = m.counts
        assert (s.swap_outs, s.swap_ins, s.blocks_copied, s.blocks_reused, s.blocks_reclaimed,
                s.contaminations) == (k["outs"], k["ins"], k["copied"], k["reused"],
                                      k["reclaimed"], k["contaminations"])
        t.host.check_invariants()


TestTrackerAgreesWithModel = TrackerAgreesWithModel.TestCase
TestTrackerAgreesWithModel.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])


# -- CpuCopy on its own ---------------------------------------------------------------------


def test_cpu_copy_coalesces_copied_blocks_that_are_not_adjacent():
    c = CpuCopy(4)
    table = np.array([10, 11, 12, 13], np.int32)
    assert c.prepare_out(table, 16) == 4
    pairs, copied = c.plan_out(table, 16, np.array([0, 1, 2, 3], np.int32))
    assert pairs.tolist() == [[10, 0, 4]] and copied.tolist() == [0, 1, 2, 3]
    assert c.commit_out(16, copied) is None
    c.num_tokens = 16
    c.invalidate(np.array([1, 2], np.int64))  # logical 0 and 3 stay valid
    table = np.array([20, 30, 31, 40], np.int64)
    assert c.prepare_out(table, 16) == 0
    pairs, copied = c.plan_out(table, 16, np.zeros(0, np.int32))
    # Blocks 1 and 2 are copied, and 30 -> 1, 31 -> 2 advance together: one extent.
    assert copied.tolist() == [1, 2] and pairs.tolist() == [[30, 1, 2]]


def test_cpu_copy_rejects_bad_tables_and_block_counts_without_change():
    c = CpuCopy(4)
    with pytest.raises(ValueError, match="holds 1 blocks but 8 tokens need 2"):
        c.prepare_out(np.array([1], np.int32), 8)
    with pytest.raises(ValueError, match="negative block id"):
        c.prepare_out(np.array([1, -1], np.int64), 8)
    with pytest.raises(ValueError, match="missing"):
        c.plan_out(np.array([1, 2], np.int32), 8, np.array([5], np.int32))
    assert len(c) == 0 and c.host_blocks.tolist() == []
    with pytest.raises(TypeError):  # other dtypes are converted by ReuseTracker, not here
        c.prepare_out(np.array([1, 2], np.int16), 8)
    with pytest.raises(ValueError):
        CpuCopy(0)


def test_tracker_takes_any_integer_table():
    t = ReuseTracker(BlockGroupAllocator(16), block_size=4)
    for i, table in enumerate(([3, 4], np.array([3, 4], np.uint16), np.arange(8)[::4],
                               np.array([3, 4], np.int32))):
        plan = t.plan_swap_out(i, table, 8)
        assert plan.pairs[:, 0].tolist()[0] == int(np.asarray(table)[0])
        t.cancel(plan)
    with pytest.raises(ValueError, match="1-D integer array"):
        t.plan_swap_out("x", np.array([1.0, 2.0]), 8)
    with pytest.raises(ValueError, match="1-D integer array"):
        t.plan_swap_out("x", np.array([True, False]), 8)
    assert "x" not in t and len(t.host) == 0
