"""kvswitch bench: the serving loop, its cost model and priority patterns, and the CLI."""

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvswitch.bench.cost_model import GPU_PRESETS, MODEL_PRESETS, CostModel
from kvswitch.bench.priority import PriorityScheduler
from kvswitch.bench.serve import CONFIGURATIONS, ServeConfig, serve
from kvswitch.cli import main
from kvswitch.trace import Conversation, Turn, load_trace, sample

# Fast settings: small pools that still preempt (virtual clock: nothing is slept).
FAST = ServeConfig(model="small", gpu="a10", gpu_blocks=800, host_blocks=4000,
                   think_s=2.0, update_every=10, arrival_rate=4.0, seed=1)


@pytest.fixture(scope="module")
def convs():
    return sample(load_trace(), 12, seed=2)


@pytest.fixture(scope="module")
def results(convs):
    return {name: serve(convs, FAST, mech) for name, mech in CONFIGURATIONS.items()}


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_counters_agree(name, results, convs):
    r = results[name]
    m = r.manager
    assert m["swap_out_blocks"] == m["copied_blocks"] + m["reused_blocks"] > 0
    moved = m["copied_blocks"] + m["swap_in_blocks"]
    assert m["bytes_copied"] == moved * r.executed_block_bytes
    assert r.engine["bytes"] == m["bytes_copied"]  # every queued copy ran
    assert m["copies"] == (m["swap_out_extents"] + m["swap_in_extents"]) * 2 * 16
    turns = sum(len(c.turns) for c in convs)
    assert r.tokens == sum(t.output_tokens for c in convs for t in c.turns)
    assert len(r.ttft_s) == turns
    assert len(r.tbt_s) == r.tokens - turns
    assert min(r.ttft_s) > 0 and min(r.tbt_s) > 0


def test_priority_updates_preempt(results):
    assert all(r.priority_preemptions > 0 for r in results.values())


def test_mechanisms_change_what_they_should(results):
    base, groups, full = results["baseline"], results["groups"], results["full"]
    # vLLM's path: one copy per block and region.
    bm = base.manager
    assert bm["swap_out_extents"] == bm["copied_blocks"]
    assert bm["swap_in_extents"] == bm["swap_in_blocks"]
    assert groups.manager["copies"] < bm["copies"] / 5
    assert base.manager["reused_blocks"] == groups.manager["reused_blocks"] == 0
    assert full.manager["reused_blocks"] > 0
    assert base.manager["async_decisions"] == 0
    assert base.manager["swap_out_wait_s"] > 0  # blocking swap-outs
    assert results["groups+async"].manager["swap_out_wait_s"] == 0  # never waited for


def test_a_small_host_pool_falls_back_to_recompute(convs):
    cfg = ServeConfig(model="small", gpu_blocks=800, host_blocks=300,
                      think_s=2.0, update_every=10, arrival_rate=4.0, seed=1)
    r = serve(convs, cfg, CONFIGURATIONS["full"])
    assert r.recomputed_tokens > 0 and r.dropped_copies > 0
    assert r.tokens == sum(t.output_tokens for c in convs for t in c.turns)
    m = r.manager
    assert m["swap_out_blocks"] == m["copied_blocks"] + m["reused_blocks"]


def test_serve_rejects_a_conversation_larger_than_the_pool():
    big = [Conversation("big", (Turn(20_000, 10),))]
    with pytest.raises(ValueError, match="GPU pool admits"):
        serve(big, FAST, CONFIGURATIONS["full"])


# -- cost model ----------------------------------------------------------------------------

def test_decode_step_reads_weights_and_kv():
    m = MODEL_PRESETS["llama-3-8b"]
    cost = CostModel(m, GPU_PRESETS["a100"], efficiency=1.0)
    assert m.kv_bytes_per_token == 128 * 1024  # 32 layers x 8 heads x 128 x 2 x bf16
    assert cost.step_s(0, 0) == 0.0
    one = cost.step_s(1, 1)
    assert one == pytest.approx((m.weight_bytes + m.kv_bytes_per_token) / 2039e9)
    longer = cost.step_s(10_000, 1)
    assert longer - one == pytest.approx(9_999 * m.kv_bytes_per_token / 2039e9)


def test_long_prefill_is_compute_bound():
    m = MODEL_PRESETS["small"]
    cost = CostModel(m, GPU_PRESETS["a10"], efficiency=0.5)
    t = cost.step_s(0, 0, [(4096, 0)])
    assert t > m.weight_bytes / (600e9 * 0.5)
    assert t >= 2 * m.num_params * 4096 / (125e12 * 0.5)
    assert cost.step_s(0, 0, [(4096, 4096)]) > t  # attending to a prefix costs more


def test_efficiency_must_be_a_fraction():
    with pytest.raises(ValueError, match="efficiency"):
        CostModel(MODEL_PRESETS["small"], GPU_PRESETS["a10"], efficiency=0)


# -- priority patterns -----------------------------------------------------------------------

def test_updates_happen_at_the_update_frequency():
    p = PriorityScheduler("random", 50)
    assert [i for i in range(201) if p.is_update(i)] == [50, 100, 150, 200]
    with pytest.raises(ValueError):
        PriorityScheduler("random", 0)
    with pytest.raises(ValueError):
        PriorityScheduler("fifo", 10)


def test_markov_favours_recently_served_sequences():
    p = PriorityScheduler("markov", 1, seed=0)
    for s in range(200):
        p.add(s)
    served_high = idle_high = 0
    for _ in range(50):
        p.served(range(100))  # the first half ran since the last update
        p.update()
        served_high += sum(p.priority(s) >= 1 for s in range(100))
        idle_high += sum(p.priority(s) >= 1 for s in range(100, 200))
    assert 0.85 < served_high / 5000 < 0.95  # p_served_high = 0.9
    assert 0.05 < idle_high / 5000 < 0.15  # p_idle_high = 0.1


def test_random_ignores_service_history():
    p = PriorityScheduler("random", 1, seed=0)
    for s in range(200):
        p.add(s)
    wins = 0
    for _ in range(50):
        p.served(range(100))
        p.update()
        order = sorted(range(200), key=p.priority, reverse=True)
        wins += sum(s < 100 for s in order[:100])
    assert 0.45 < wins / 5000 < 0.55


@given(st.sampled_from(["markov", "random"]), st.integers(0, 2**32 - 1),
       st.sets(st.integers(0, 30)), st.sets(st.integers(0, 30)))
def test_priorities_stay_in_range_and_known(pattern, seed, seqs, served):
    p = PriorityScheduler(pattern, 1, seed=seed)
    for s in seqs:
        p.add(s)
    p.served(served)
    p.update()
    assert len(p) == len(seqs)
    hi = 2.0 if pattern == "markov" else 1.0
    assert all(0.0 <= p.priority(s) < hi for s in seqs)
    p.remove(next(iter(seqs), None))
    assert len(p) == max(len(seqs) - 1, 0)


# -- CLI -------------------------------------------------------------------------------------

def test_bench_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--conversations", "6", "--model", "small", "--gpu-blocks", "800",
                 "--host-blocks", "4000", "--think-s", "2",
                 "--arrival-rate", "4", "--json", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    for label in ("copies issued", "TTFT P99.9", "TBT P99.9", "throughput", "full vs baseline"):
        assert label in text
    rows = {line.split("  ")[0]: line.split()[-1] for line in text.splitlines() if line}
    assert rows["copies issued"] == "counted"
    assert rows["stall on swaps (s)"] == "link-modelled"
    assert rows["TTFT P99 (s)"] == "cost+link-modelled"
    assert rows["wall time (s)"] == "measured"
    data = json.loads(out.read_text())
    figures = data["configurations"]
    assert list(figures) == list(CONFIGURATIONS)
    assert data["config"]["clock"] == "virtual"
    assert data["sources"]["ttft_p99_s"] == "cost+link-modelled"
    assert set(data["sources"]) == set(figures["full"])
    for f in figures.values():
        assert f["swap_out_blocks"] == f["swap_out_blocks_copied"] + f["swap_out_blocks_reused"]
        assert f["gran_swap_out_copies"] * f["gran_swap_out_blocks_per_copy"] == pytest.approx(
            f["swap_out_blocks_copied"])
        assert f["gran_swap_in_copies"] * f["gran_swap_in_blocks_per_copy"] == pytest.approx(
            f["swap_in_blocks"])
        assert f["ttft_p50_s"] <= f["ttft_p99_s"] <= f["ttft_p999_s"]
        assert not math.isnan(f["tbt_p999_s"])
    assert set(data["granularity_histograms"]) == set(CONFIGURATIONS)
    assert "swap_out_table_extents" in data["granularity_histograms"]["full"][0]
    block = MODEL_PRESETS["small"].kv_bytes_per_token * 16
    f = figures["full"]
    assert f["preset_bytes_moved"] == (f["swap_out_blocks_copied"] + f["swap_in_blocks"]) * block


def test_bench_cli_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert main(["bench", "--conversations", "3", "--model", "small", "--gpu-blocks", "800",
                 "--host-blocks", "4000", "--configs", "baseline,full",
                 "--plot", str(png), "--no-progress"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_reports_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("conversation_id,turn\n")
    assert main(["bench", "--trace", str(bad), "--no-progress"]) == 2
    assert "missing column" in capsys.readouterr().err
    assert main(["bench", "--configs", "baseline,turbo", "--no-progress"]) == 2
    assert "turbo" in capsys.readouterr().err


# -- backends ----------------------------------------------------------------------------------

def test_serve_checks_the_backend_before_any_work(convs):
    with pytest.raises(ValueError, match="backend must be 'host' or 'cuda'"):
        serve(convs, ServeConfig(backend="tpu"), CONFIGURATIONS["full"])
    with pytest.raises(ValueError, match="time_scale must be 1"):
        serve(convs, ServeConfig(backend="cuda", clock="wall", time_scale=40),
              CONFIGURATIONS["full"])
    with pytest.raises(ValueError, match="wall clock only"):
        serve(convs, ServeConfig(backend="cuda", time_scale=1), CONFIGURATIONS["full"])
    with pytest.raises(ValueError, match="clock must be"):
        serve(convs, ServeConfig(clock="sundial"), CONFIGURATIONS["full"])


def test_serve_on_cuda_without_a_gpu_raises_a_clear_error(convs):
    from kvswitch.cli import cuda_unavailable_reason

    if not cuda_unavailable_reason():
        pytest.skip("this machine has a CUDA GPU")
    cfg = ServeConfig(backend="cuda", clock="wall", time_scale=1, model="small", gpu_blocks=800,
                      host_blocks=100)
    with pytest.raises(RuntimeError, match="the cuda backend needs a CUDA GPU: "):
        serve(convs[:1], cfg, CONFIGURATIONS["full"])


# -- granularity probes (issue 14) -----------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_granularity_fields_are_consistent(name, results):
    r = results[name]
    g, m = r.granularity, r.manager
    # Per direction: blocks per copy times copies is the blocks moved; both add up to the
    # manager's totals.
    assert g["swap_out_copies"] == m["swap_out_extents"]
    assert g["swap_in_copies"] == m["swap_in_extents"]
    assert g["swap_out_blocks_per_copy"] * g["swap_out_copies"] == pytest.approx(
        m["copied_blocks"])
    assert g["swap_in_blocks_per_copy"] * g["swap_in_copies"] == pytest.approx(
        m["swap_in_blocks"])
    h = g["histograms"]
    assert sum(h["swap_out_table_extents"]) == m["swap_outs"]  # one entry per swap-out
    assert sum(h["swap_in_gpu_extents"]) == g["alloc_swap_in_calls"] == m["swap_ins"]
    assert sum(h["swap_out_extent_lengths"]) == pytest.approx(
        g["swap_out_table_extents_mean"] * m["swap_outs"])
    # A swap-in table has at least one extent; several only when it was allocated so.
    assert g["swap_in_gpu_extents_mean"] >= 1
    assert 0 <= g["swap_in_multi_extent_need_gt_largest_free"] <= g["swap_in_multi_extent"]
    assert g["free_samples"] == sum(h["free_groups"]) > 0
    assert g["free_groups_p10"] <= g["free_groups_p50"] <= g["free_groups_p90"]
    assert g["largest_free_group_p90"] <= FAST.gpu_blocks
    grow = g["alloc_grow_blocks"]
    assert g["alloc_grow_calls"] == grow and g["alloc_grow_tail_split_calls"] <= grow
    if not CONFIGURATIONS[name].block_groups:  # per-block mode: no reserved tails to split
        assert g["reserved_blocks_p90"] == 0
        assert g["alloc_grow_tail_blocks_split"] == 0


def test_granularity_probes_do_not_change_allocation(convs):
    """The probed allocator hands out the same blocks as the plain one."""
    import random

    from kvswitch.allocator import BlockGroupAllocator, OutOfBlocksError
    from kvswitch.bench.serve import _ProbedAllocator

    plain = BlockGroupAllocator(400, initial_group_blocks=20)
    probed = _ProbedAllocator(400, initial_group_blocks=20)
    rng = random.Random(3)
    for step in range(2000):
        seq = rng.randrange(12)
        probed.context = rng.choice(["admit", "grow", "swap_in"])
        if seq in plain and rng.random() < 0.1:
            assert plain.free(seq) == probed.free(seq)
            continue
        n = rng.choice([1, 1, 1, 5, 30])
        try:
            a = plain.allocate(seq, n)
        except OutOfBlocksError:
            with pytest.raises(OutOfBlocksError):
                probed.allocate(seq, n)
            continue
        assert (a == probed.allocate(seq, n)).all(), step
    assert plain.free_groups() == probed.free_groups()
