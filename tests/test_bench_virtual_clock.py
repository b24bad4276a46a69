"""The virtual clock of ``kvswitch bench`` (issue 26): same seed and options, same figures,
whatever the host does; copies really made and their bytes checked; link-modelled waits.

Nothing here asserts on a timing: the host is deliberately disturbed (slowed copies, a
jumping wall clock, a busy CPU) and the figures must not move.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from kvswitch import AsyncSwapEngine, BlockGroupAllocator, HostKVPool, KVLayout, SwapManager
from kvswitch.bench import serve as serve_module
from kvswitch.bench.link_model import LINK_PRESETS, LinkModel
from kvswitch.bench.serve import CONFIGURATIONS, ServeConfig, capacity_rate, serve
from kvswitch.bench.virtual_clock import VirtualClock, VirtualSwapEngine
from kvswitch.cli import main, summarize
from kvswitch.trace import load_trace, sample

FAST = ServeConfig(model="small", gpu="a10", gpu_blocks=800, host_blocks=4000, think_s=2.0,
                   update_every=10, arrival_rate=4.0, seed=1)
TINY = ["--conversations", "5", "--model", "small", "--gpu-blocks", "800", "--host-blocks",
        "4000", "--think-s", "1", "--arrival-rate", "4", "--no-progress"]


@pytest.fixture(scope="module")
def convs():
    return sample(load_trace(), 10, seed=3)


def figures(result) -> str:
    """Every figure of a run except its wall time, as canonical JSON."""
    f = summarize(result)
    del f["wall_s"]
    return json.dumps({"figures": f, "ttft": result.ttft_s, "tbt": result.tbt_s},
                      sort_keys=True)


def test_same_seed_same_figures_however_the_host_is_disturbed(convs, monkeypatch):
    quiet = {name: figures(serve(convs, FAST, mech)) for name, mech in CONFIGURATIONS.items()}
    # Now every real copy is slow and irregular, and every wall-clock read jumps ahead.
    calls = {"n": 0}
    real_out, real_in = AsyncSwapEngine.swap_out, AsyncSwapEngine.swap_in

    def slow(real):
        def call(self, *args, **kwargs):
            calls["n"] += 1
            time.sleep(0.002 * (calls["n"] % 3))
            return real(self, *args, **kwargs)
        return call
    monkeypatch.setattr(AsyncSwapEngine, "swap_out", slow(real_out))
    monkeypatch.setattr(AsyncSwapEngine, "swap_in", slow(real_in))
    jumps = iter(np.cumsum(np.random.default_rng(0).exponential(5.0, 10**6)))
    monkeypatch.setattr(serve_module.time, "perf_counter", lambda: float(next(jumps)))
    disturbed = {name: figures(serve(convs, FAST, mech))
                 for name, mech in CONFIGURATIONS.items()}
    assert calls["n"] > 0
    assert disturbed == quiet


def test_the_wall_clock_follows_the_host(convs, monkeypatch):
    """The control: on --clock wall the same disturbance moves the figures (so the test
    above could fail)."""
    wall = ServeConfig(**{**FAST.__dict__, "clock": "wall", "time_scale": 2000})
    convs = convs[:5]
    quiet = figures(serve(convs, wall, CONFIGURATIONS["baseline"]))
    real_out = AsyncSwapEngine.swap_out

    def slow(self, *args, **kwargs):
        time.sleep(0.002)
        return real_out(self, *args, **kwargs)
    monkeypatch.setattr(AsyncSwapEngine, "swap_out", slow)
    assert figures(serve(convs, wall, CONFIGURATIONS["baseline"])) != quiet


def test_cli_json_is_byte_identical_on_a_busy_and_a_quiet_machine(tmp_path, capsys):
    def run(path) -> str:
        assert main(["bench", *TINY, "--repeats", "2", "--configs", "baseline,full",
                     "--json", str(path)]) == 0
        doc = json.loads(path.read_text())
        for runs in doc["repeats"]["configurations"].values():
            for f in runs:
                del f["wall_s"]
        for f in doc["configurations"].values():
            del f["wall_s"]
        for spread in doc["range"].values():
            del spread["wall_s"]
        return json.dumps(doc, indent=2)

    quiet = run(tmp_path / "quiet.json")
    # Two processes spinning on the CPU for the whole second run.
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        busy = run(tmp_path / "busy.json")
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert busy == quiet
    capsys.readouterr()


def test_a_wrong_byte_after_a_swap_in_is_caught(convs, monkeypatch):
    """Plant a bug: every swap-out's copy lands one block off in the host pool. The stamps
    checked after each swap-in must catch it."""
    real = AsyncSwapEngine.swap_out

    def off_by_one(self, pairs, **kwargs):
        pairs = np.array(pairs, dtype=np.int64)
        handle = real(self, pairs, **kwargs)
        for dst in pairs[:, 1]:  # overwrite the first copied block with its neighbour
            arr = self.host_pool.arrays[0]
            arr[dst] = arr[dst + 1] if dst + 1 < len(arr) else 0
        return handle
    monkeypatch.setattr(AsyncSwapEngine, "swap_out", off_by_one)
    with pytest.raises(RuntimeError, match="differ after its swap-in"):
        serve(convs, FAST, CONFIGURATIONS["full"])


def test_a_stale_reused_copy_is_caught(convs, monkeypatch):
    """Plant a stale copy: after each swap-out, the host copy of the last block says one
    token fewer (as if reuse had kept an old partial block). The next swap-in must see it."""
    real_out = VirtualSwapEngine.swap_out

    def corrupt(self, pairs, **kwargs):
        handle = real_out(self, pairs, **kwargs)
        pairs = np.asarray(pairs, dtype=np.int64)
        if len(pairs):
            stamps = self.host_pool.arrays[0].view(np.int32)
            stamps[pairs[-1, 1] + pairs[-1, 2] - 1, 2] -= 1
        return handle
    monkeypatch.setattr(VirtualSwapEngine, "swap_out", corrupt)
    with pytest.raises(RuntimeError, match="differ after its swap-in"):
        serve(convs, FAST, CONFIGURATIONS["full"])


# -- the virtual swap engine under a SwapManager ------------------------------------------------

LINK = LinkModel("test", dispatch_s=1e-3, copy_latency_s=0.0, d2h_bytes_per_s=1e6,
                 h2d_bytes_per_s=1e6, d2d_bytes_per_s=1e9)


def _manager(workers: int, **kwargs):
    pool = np.zeros((1, 64, 16), np.uint8)
    device = KVLayout.from_tensors(list(pool))
    host = HostKVPool(device, 64, pin=False)
    clock = VirtualClock()
    engine = VirtualSwapEngine(device, host, LINK, clock, num_workers=workers, num_regions=2,
                               region_block_bytes=1000)
    m = SwapManager(BlockGroupAllocator(64, initial_group_blocks=8), engine,
                    BlockGroupAllocator(64), block_size=16, clock=clock, **kwargs)
    return m, engine, clock, pool


def test_async_swaps_take_the_link_models_time_and_overlap():
    m, engine, clock, pool = _manager(2)
    m.allocate("a", 4)
    pool[0, :4, 0] = 7
    m.swap_out("a", 64)  # 4 blocks x 2 regions: 2 copies of 4,000 bytes after 2 ms dispatch
    assert clock.now == 0.0  # asynchronous: nothing waited
    end = 2e-3 + 2 * 4000 / 1e6  # dispatch-pipelined: the first copy starts after 1 ms
    assert engine.next_end("out") == pytest.approx(1e-3 + 2 * 4e-3)
    assert m.state("a") == "swapped_out"
    assert engine.host_pool.arrays[0].view(np.uint8)[:4, 0].tolist() == [7] * 4  # copied
    # The freed blocks are reused at once: the allocation waits for the swap-out.
    m.allocate("b", 4)
    assert clock.now == pytest.approx(1e-3 + 2 * 4e-3) and m.stats().conflicts == 1
    assert m.stats().conflict_wait_s == pytest.approx(clock.now)
    assert end > 0
    table = m.swap_in("a")
    assert m.state("a") == "swapping_in" and m.poll() == []
    clock.advance(1.0)  # a long model step: the swap-in finished meanwhile
    assert m.poll() == ["a"]
    assert pool[0, table, 0].tolist() == [7] * 4
    assert m.stats().stall_s == pytest.approx(1e-3 + 2 * 4e-3)


def test_blocking_swaps_wait_and_a_swap_in_follows_its_swap_out():
    m, engine, clock, _ = _manager(1, async_swap_out=False, swap_in="sync")
    m.allocate("a", 2)
    m.swap_out("a", 32)
    t_out = clock.now
    assert t_out == pytest.approx(1e-3 + 2 * 2e-3) == m.stats().swap_out_wait_s
    m.swap_in("a")
    assert m.decide(batch_size=0, iteration_s=1.0) == ["a"]
    assert clock.now == pytest.approx(t_out + 1e-3 + 2 * 2e-3)
    assert m.stats().swap_in_wait_s == pytest.approx(clock.now - t_out)


def test_inline_workers_wait_at_submission():
    m, engine, clock, _ = _manager(0)
    m.allocate("a", 2)
    m.swap_out("a", 32)
    assert clock.now == pytest.approx(1e-3 + 2 * 2e-3)  # the caller dispatched and copied


# -- load --------------------------------------------------------------------------------------

def test_load_above_capacity_preempts_and_below_does_not():
    convs = sample(load_trace(), 24, seed=5)
    cfg = ServeConfig(model="small", gpu="a10", gpu_blocks=1200, host_blocks=6000,
                      think_s=2.0, update_every=10)
    cap = capacity_rate(convs, cfg)
    light = serve(convs, ServeConfig(**{**cfg.__dict__, "arrival_rate": 0.2 * cap}),
                  CONFIGURATIONS["full"])
    heavy = serve(convs, ServeConfig(**{**cfg.__dict__, "arrival_rate": 5 * cap}),
                  CONFIGURATIONS["full"])
    assert light.priority_preemptions == 0 < heavy.priority_preemptions
    assert np.percentile(heavy.ttft_s, 99) > np.percentile(light.ttft_s, 99)


def test_cli_load_sweep_reports_where_preemptions_start(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    args = [a for a in TINY if a not in ("--arrival-rate", "4")]
    assert main(["bench", *args, "--conversations", "12", "--load", "0.2,6",
                 "--configs", "baseline,full", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "== load 0.2 of the pool's capacity" in text and "== load 6 of" in text
    assert "priority preemptions start:" in text and "full/baseline P99 TTFT" in text
    doc = json.loads(out.read_text())
    assert [p["load"] for p in doc["sweep"]] == [0.2, 6.0]
    rates = [p["arrival_rate"] for p in doc["sweep"]]
    assert rates[1] == pytest.approx(30 * rates[0]) and doc["capacity_rate"] > 0
    for p in doc["sweep"]:
        assert set(p["configurations"]) == {"baseline", "full"}
    heavy = doc["sweep"][1]["configurations"]
    assert heavy["baseline"]["priority_preemptions"] > 0


# -- options --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "option", "message"), [
    (["--time-scale", "40"], "--time-scale", "applies to --clock wall only"),
    (["--clock", "wall", "--link-model", "a10"], "--link-model", "virtual clock only"),
    (["--backend", "cuda", "--clock", "virtual"], "--clock", "wall clock only"),
    (["--link-model", "/nonexistent/campaign.json"], "--link-model", "neither a preset"),
])
def test_clock_options_are_checked_before_any_work(args, option, message, capsys,
                                                   monkeypatch):
    monkeypatch.setattr("kvswitch.cli.serve", lambda *a, **k: pytest.fail("serve() ran"))
    assert main(["bench", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"kvswitch bench: error: argument {option}: " in err and message in err


def test_load_and_arrival_rate_together_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--load", "1", "--arrival-rate", "2"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_link_model_preset_or_campaign_changes_only_the_timed_figures(tmp_path, capsys):
    def run(*extra) -> dict:
        path = tmp_path / "x.json"
        assert main(["bench", *TINY, "--configs", "baseline", "--json", str(path),
                     *extra]) == 0
        return json.loads(path.read_text())
    a10 = run("--link-model", "a10")
    h100 = run("--link-model", "h100")
    fa, fh = a10["configurations"]["baseline"], h100["configurations"]["baseline"]
    assert a10["config"]["link"]["name"] == "a10" and h100["config"]["link"]["name"] == "h100"
    # Twice the bandwidth, same dispatch cost: a per-block baseline is dispatch-bound, so
    # the swap job time barely moves but never grows.
    assert fh["swap_job_s"] <= fa["swap_job_s"]
    assert LINK_PRESETS["h100"].dispatch_s == LINK_PRESETS["a10"].dispatch_s
    capsys.readouterr()
