"""ReuseTracker: CPU copies reused across swap-outs, surviving contamination, byte-exact."""

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kvswitch import AsyncSwapEngine, BlockGroupAllocator, HostKVPool, KVLayout, OutOfBlocksError
from kvswitch.reuse import ReuseTracker, coalesce_pairs

BLOCK = 4  # tokens per block: small, so partly filled blocks are common
POISON = -7


def true_kv(seq: int, num_tokens: int) -> np.ndarray:
    return seq * 1_000_003 + np.arange(num_tokens, dtype=np.int64) + 1


# -- unit tests ------------------------------------------------------------------------------


def test_coalesce_pairs_merges_runs_in_both_pools():
    pairs = coalesce_pairs([5, 6, 7, 9, 10, 3], [0, 1, 2, 3, 5, 6])
    assert pairs.tolist() == [[5, 0, 3], [9, 3, 1], [10, 5, 1], [3, 6, 1]]
    assert coalesce_pairs([], []).shape == (0, 3)
    with pytest.raises(ValueError):
        coalesce_pairs([1, 2], [1])


@pytest.fixture
def tracker():
    return ReuseTracker(BlockGroupAllocator(32, initial_group_blocks=4), block_size=BLOCK)


def test_second_swap_out_copies_only_new_and_grown_blocks(tracker):
    plan = tracker.plan_swap_out("a", [10, 11, 12], 10)  # 2 full blocks + 2 tokens
    assert plan.copied_blocks == 3 and plan.reused_blocks == 0
    tracker.commit(plan)
    tracker.commit(tracker.plan_swap_in("a", [20, 21, 22]))
    plan = tracker.plan_swap_out("a", [20, 21, 22, 23], 14)
    # Blocks 0, 1 reused; block 2 grew from 2 to 4 tokens; block 3 is new.
    assert (plan.copied_blocks, plan.reused_blocks) == (2, 2)
    host = tracker.host_block_table("a")
    assert plan.pairs.tolist() == [[22, host[2], 2]]  # one extent: the copy stays contiguous
    tracker.commit(plan)
    s = tracker.stats()
    assert (s.swap_outs, s.swap_ins, s.blocks_copied, s.blocks_reused) == (2, 1, 5, 2)


def test_backups_are_reclaimed_lowest_priority_first(tracker):
    for seq, prio in (("low", 0), ("high", 5)):
        plan = tracker.plan_swap_out(seq, np.arange(12), 48, priority=prio)
        tracker.commit(plan)
        tracker.commit(tracker.plan_swap_in(seq, np.arange(12)))
    # 24 of 32 host blocks held by backups; 12 more needed: 'low' loses its tail groups.
    tracker.commit(tracker.plan_swap_out("new", np.arange(12), 48))
    assert tracker.valid_blocks("high").all()
    low = tracker.valid_blocks("low")
    assert not low.all() and low[0]  # the tail was reclaimed, the head stays valid
    assert list(low) == sorted(low, reverse=True)
    assert tracker.stats().contaminations == 1
    # The reclaimed blocks are copied again on the next swap-out, the rest reused.
    plan = tracker.plan_swap_out("low", np.arange(12), 48)
    assert plan.reused_blocks == int(low.sum())
    assert plan.copied_blocks == 12 - int(low.sum())


def test_only_copy_of_a_swapped_out_sequence_is_never_reclaimed(tracker):
    tracker.commit(tracker.plan_swap_out("a", np.arange(20), 80))  # swapped out: 20 blocks
    before = (tracker.host.free_groups(), tracker.host_block_table("a").tolist())
    with pytest.raises(OutOfBlocksError, match="reclaimable backups"):
        tracker.plan_swap_out("b", np.arange(20), 80)
    assert (tracker.host.free_groups(), tracker.host_block_table("a").tolist()) == before
    assert "b" not in tracker


def test_cancel_releases_new_host_blocks(tracker):
    plan = tracker.plan_swap_out("a", np.arange(3), 12)
    tracker.cancel(plan)
    assert "a" not in tracker and tracker.host.num_free_blocks == 32
    with pytest.raises(ValueError, match="not pending"):
        tracker.commit(plan)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda t: t.plan_swap_in("zz", [0]), KeyError, "unknown sequence"),
        (lambda t: t.drop("zz"), KeyError, "unknown sequence"),
        (lambda t: t.valid_blocks("zz"), KeyError, "unknown sequence"),
        (lambda t: t.plan_swap_out("b", [1, 2], 9), ValueError, "need 3"),
        (lambda t: t.plan_swap_out("b", [[1]], 1), ValueError, "1-D integer"),
        (lambda t: t.plan_swap_out("b", [1.0], 1), ValueError, "1-D integer"),
        (lambda t: t.plan_swap_out("b", [-1], 1), ValueError, "negative"),
        (lambda t: t.plan_swap_out("b", [1], 0), ValueError, "positive"),
        (lambda t: t.plan_swap_out("a", [1, 2, 3], 9), ValueError, "already swapped out"),
        (lambda t: t.plan_swap_in("a", [1, 2]), ValueError, "need 3"),
    ],
)
def test_bad_input_changes_nothing(tracker, call, error, match):
    tracker.commit(tracker.plan_swap_out("a", [4, 5, 6], 9))
    before = (tracker.host.free_groups(), tracker.host_block_table("a").tolist(), tracker.stats())
    with pytest.raises(error, match=match):
        call(tracker)
    assert (tracker.host.free_groups(), tracker.host_block_table("a").tolist(),
            tracker.stats()) == before


def test_commit_twice_and_pending_plans(tracker):
    plan = tracker.plan_swap_out("a", [1], 3)
    with pytest.raises(ValueError, match="not committed yet"):
        tracker.plan_swap_out("a", [1], 3)
    with pytest.raises(ValueError, match="not committed yet"):
        tracker.drop("a")
    tracker.commit(plan)
    with pytest.raises(ValueError, match="not pending"):
        tracker.commit(plan)


def test_tracker_needs_an_empty_host_allocator():
    host = BlockGroupAllocator(8)
    host.allocate("x", 1)
    with pytest.raises(ValueError, match="empty"):
        ReuseTracker(host)


# -- state machine with real bytes -----------------------------------------------------------


class ReuseMachine(RuleBasedStateMachine):
    """Conversations grow, swap out, swap in to other GPU blocks, get contaminated by other
    sequences' swap-outs, and end. Host blocks that hold no valid copy are poisoned after
    every step, so reusing an invalid block shows up as wrong bytes after a swap-in."""

    @initialize(host_blocks=st.integers(8, 48), workers=st.sampled_from([0, 1, 2]))
    def setup(self, host_blocks, workers):
        self.gpu = BlockGroupAllocator(256, initial_group_blocks=4)
        self.gpu_kv = np.full((256, BLOCK), POISON, np.int64)
        # Real copies: a host-backend swap engine between the "GPU" pool and a host pool.
        host_pool = HostKVPool(KVLayout.from_tensors([self.gpu_kv]), host_blocks, pin=False)
        self.host_kv = host_pool.arrays[0]
        self.host_kv[:] = POISON
        self.engine = AsyncSwapEngine(KVLayout.from_tensors([self.gpu_kv]), host_pool,
                                      backend="host", num_workers=workers)
        self.tracker = ReuseTracker(
            BlockGroupAllocator(host_blocks, initial_group_blocks=4), block_size=BLOCK
        )
        self.tokens: dict[int, int] = {}  # the model: tokens of each live conversation
        self.running: set[int] = set()
        self.next_seq = 0

    def write_tokens(self, seq, start, stop):
        table = self.gpu.block_table(seq)
        kv = true_kv(seq, stop)
        for t in range(start, stop):
            self.gpu_kv[table[t // BLOCK], t % BLOCK] = kv[t]

    def ensure_blocks(self, seq, num_tokens):
        have = self.gpu.num_table_blocks(seq) if seq in self.gpu else 0
        need = -(-num_tokens // BLOCK) - have
        if need > 0:
            self.gpu.allocate(seq, need)

    @precondition(lambda self: len(self.tokens) < 6)
    @rule(n=st.integers(1, 40))
    def new_conversation(self, n):
        seq = self.next_seq
        self.next_seq += 1
        self.ensure_blocks(seq, n)
        self.write_tokens(seq, 0, n)
        self.tokens[seq] = n
        self.running.add(seq)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), k=st.integers(1, 9))
    def grow(self, data, k):
        seq = data.draw(st.sampled_from(sorted(self.running)))
        old = self.tokens[seq]
        self.ensure_blocks(seq, old + k)
        self.write_tokens(seq, old, old + k)
        self.tokens[seq] = old + k

    @precondition(lambda self: self.running)
    @rule(data=st.data(), priority=st.integers(0, 3))
    def swap_out(self, data, priority):
        seq = data.draw(st.sampled_from(sorted(self.running)))
        table = self.gpu.block_table(seq)
        before = self.tracker_state()
        try:
            plan = self.tracker.plan_swap_out(seq, table, self.tokens[seq], priority=priority)
        except OutOfBlocksError:
            assert self.tracker_state() == before
            return
        assert plan.copied_blocks + plan.reused_blocks == len(table)
        handle = self.engine.swap_out(plan.pairs)
        self.tracker.commit(plan)
        handle.wait()  # before the GPU blocks are freed and overwritten
        self.gpu_kv[table] = POISON  # the GPU blocks go to other sequences
        self.gpu.free(seq)
        self.running.discard(seq)

    @precondition(lambda self: set(self.tokens) - self.running)
    @rule(data=st.data())
    def swap_in(self, data):
        seq = data.draw(st.sampled_from(sorted(set(self.tokens) - self.running)))
        self.gpu.allocate(("spacer", seq, self.next_seq), 1)  # so the new ids differ
        self.next_seq += 1
        self.ensure_blocks(seq, self.tokens[seq])
        table = self.gpu.block_table(seq)
        plan = self.tracker.plan_swap_in(seq, table)
        self.engine.swap_in(plan.pairs).wait()
        self.tracker.commit(plan)
        self.running.add(seq)
        n = self.tokens[seq]
        got = self.gpu_kv[table].reshape(-1)[:n]
        assert (got == true_kv(seq, n)).all(), f"sequence {seq} came back corrupted"

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def end(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        if seq in self.tracker:
            self.tracker.drop(seq)
        if seq in self.running:
            self.gpu.free(seq)
            self.running.discard(seq)
        del self.tokens[seq]

    @precondition(lambda self: self.running)
    @rule(data=st.data(), kind=st.sampled_from(["short", "unknown"]))
    def bad_input_changes_nothing(self, data, kind):
        seq = data.draw(st.sampled_from(sorted(self.running)))
        table = self.gpu.block_table(seq)
        before = self.tracker_state()
        with pytest.raises((ValueError, KeyError)):
            if kind == "short":
                self.tracker.plan_swap_out(seq, table[:-1], self.tokens[seq])
            else:
                self.tracker.plan_swap_in(("nobody",), table)
        assert self.tracker_state() == before

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def commit_twice(self, data):
        """Back up a running sequence (swap-out copy, then keep it as a backup), then commit
        the same plan again: that must raise and change nothing."""
        seq = data.draw(st.sampled_from(sorted(self.running)))
        try:
            plan = self.tracker.plan_swap_out(seq, self.gpu.block_table(seq), self.tokens[seq])
        except OutOfBlocksError:
            return
        self.engine.swap_out(plan.pairs).wait()
        self.tracker.commit(plan)
        self.tracker.keep_backup(seq)  # still running: the copy is now a backup
        before = self.tracker_state()
        with pytest.raises(ValueError, match="not pending"):
            self.tracker.commit(plan)
        assert self.tracker_state() == before

    def tracker_state(self):
        t = self.tracker
        seqs = sorted(s for s in self.tokens if s in t)
        return (t.host.free_groups(), [t.host_block_table(s).tolist() for s in seqs], t.stats())

    def teardown(self):
        if hasattr(self, "engine"):
            self.engine.close()

    @invariant()
    def poison_invalid_host_blocks(self):
        """Every host block outside a valid copy gets garbage: it must never be reused."""
        if not hasattr(self, "tracker"):
            return
        valid = np.zeros(len(self.host_kv), bool)
        for seq in self.tokens:
            if seq in self.tracker:
                ok = self.tracker.valid_blocks(seq)
                host = self.tracker.host_block_table(seq)[: ok.size]
                valid[host[ok]] = True
                if self.tracker.is_swapped_out(seq):
                    assert ok[: -(-self.tokens[seq] // BLOCK)].all(), "a swapped-out copy lost"
        self.host_kv[~valid] = POISON
        self.tracker.host.check_invariants()


TestReuseMachine = ReuseMachine.TestCase
TestReuseMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
