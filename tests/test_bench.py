"""kvswitch bench and the allocator replay: a short end-to-end run whose figures agree."""

import json

import pytest

from kvswitch import BlockGroupAllocator
from kvswitch.bench.replay import BLOCK_SIZE, ReplayConfig, replay
from kvswitch.cli import LLAMA3_8B_REGIONS, main
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


def test_bench_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--conversations", "30", "--gpu-blocks", "2000",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "mean blocks per copy" in table and "baseline" in table
    figures = json.loads(out.read_text())["configurations"]
    base, groups, full = figures["baseline"], figures["groups"], figures["groups+reuse"]
    assert base["swap_out_blocks"] == groups["swap_out_blocks"] > 0
    assert full["swap_out_blocks"] + full["reused_blocks"] == base["swap_out_blocks"]
    for f in (base, groups):
        assert f["copies_llama3_8b"] == f["swap_out_groups"] * LLAMA3_8B_REGIONS
        assert f["blocks_per_copy"] == pytest.approx(f["swap_out_blocks"] / f["swap_out_groups"])
    assert base["blocks_per_copy"] < groups["blocks_per_copy"]


def test_bench_cli_reports_a_bad_trace(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("conversation_id,turn\n")
    assert main(["bench", "--trace", str(bad)]) == 2
    assert "missing column" in capsys.readouterr().err
