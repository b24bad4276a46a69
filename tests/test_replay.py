"""The allocator-level replay (benchmarks/allocator_replay.py): request streams and counts."""


import pytest

from kvswitch import BlockGroupAllocator
from kvswitch.bench.replay import BLOCK_SIZE, ReplayConfig, replay
from kvswitch.reuse import ReuseTracker
from kvswitch.trace import Conversation, Turn, load_trace, sample


def test_replay_is_the_same_request_stream_for_both_modes():
    convs = sample(load_trace(), 40, seed=3)
    config = ReplayConfig(preempt_every=20, seed=3)
    grouped = replay(BlockGroupAllocator(1500), convs, config)
    per_block = replay(BlockGroupAllocator.per_block(1500), convs, config)
    assert grouped.outcomes == per_block.outcomes
    assert grouped.swap_out_blocks == per_block.swap_out_blocks > 0
    assert grouped.preemptions == per_block.preemptions > 0
    assert per_block.swap_out_groups > grouped.swap_out_groups


def test_reuse_splits_the_same_swap_outs_into_copied_and_reused_blocks():
    convs = sample(load_trace(), 40, seed=5)
    config = ReplayConfig(preempt_every=25, seed=5)
    plain = replay(BlockGroupAllocator(1500), convs, config)
    tracker = ReuseTracker(BlockGroupAllocator(30_000), block_size=BLOCK_SIZE)
    reused = replay(BlockGroupAllocator(1500), convs, config, tracker)
    assert reused.outcomes == plain.outcomes  # reuse does not change GPU-side decisions
    assert reused.swap_out_blocks + reused.reused_blocks == plain.swap_out_blocks
    assert reused.reused_blocks > 0
    assert reused.swap_in_blocks == plain.swap_in_blocks
    stats = tracker.stats()
    assert stats.blocks_copied == reused.swap_out_blocks
    assert stats.blocks_reused == reused.reused_blocks
    assert len(tracker.host) == 0  # every conversation ended: its CPU copy was dropped


def test_replay_frees_everything_it_allocates():
    convs = sample(load_trace(), 15, seed=0)
    a = BlockGroupAllocator(3000)
    result = replay(a, convs, ReplayConfig(preempt_every=0))
    assert len(a) == 0 and a.num_free_blocks == 3000
    # Every turn ends with a swap-out; without preemption that is all of them.
    assert len(result.free_ns) == sum(len(c.turns) for c in convs)
    a.check_invariants()


def test_replay_rejects_a_turn_larger_than_the_pool():
    conv = Conversation("big", (Turn(10_000, 1),))
    with pytest.raises(RuntimeError, match="admission cap"):
        replay(BlockGroupAllocator(100), [conv], ReplayConfig())


