"""CPU smoke test of the GPU campaign (benchmarks/gpu_campaign.py) and of tests/cuda.

A GPU session is rare and short, so a typo in the campaign must not wait for one. Here:

* the campaign's pure-Python parts (placement, copy lists, parsing of nvidia-smi, sysfs,
  pytest output and junit XML, target checks, Markdown and JSON) with made-up inputs;
* its measurement drivers (raw copy lists through the C++ timing helper, engine rounds,
  both directions, call latency, byte verification) end to end against the fake
  libcuda.so.1 of tests/fake_cuda, with NumPy arrays as "device" memory (the fake treats
  every address as host memory), in a subprocess;
* ``--help`` without a GPU, and a clear non-zero exit without one;
* tests/cuda/scenarios.py lists its scenarios and skips each cleanly without a GPU.

Timings from the fake mean nothing and are never asserted on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_campaign.py"
CXX = shutil.which("c++") or shutil.which("g++")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


G = _load("kvswitch_gpu_campaign", SCRIPT)
SC = _load("kvswitch_gpu_scenarios", ROOT / "tests" / "cuda" / "scenarios.py")


# -- pure parts -------------------------------------------------------------------------------

def test_extents_are_scattered_and_never_adjacent():
    rng = np.random.default_rng(0)
    for length, count in [(1, 960), (4, 240), (20, 48), (60, 16)]:
        starts = np.sort(G.place_extents(rng, 2048, length, count))
        assert len(set(starts.tolist())) == count
        assert (np.diff(starts) >= length + 1).all() and starts[-1] + length <= 2048
    with pytest.raises(ValueError, match="non-adjacent extents"):
        G.place_extents(rng, 100, 1, 51)


def test_jobs_cover_disjoint_blocks_on_both_sides():
    g = G.Geometry()
    rng = np.random.default_rng(1)
    for ext in g.extents:
        jobs = G.make_jobs(rng, g.pool_blocks, g.pool_blocks, ext, g.jobs, g.seq_blocks)
        assert len(jobs) == g.jobs
        src, dst = G.expand(np.concatenate(jobs))
        assert len(src) == len(set(src.tolist())) == g.jobs * g.seq_blocks
        assert len(dst) == len(set(dst.tolist()))
        assert all(j.shape == (g.seq_blocks // ext, 3) for j in jobs)


def test_copy_list_is_one_copy_per_extent_and_region_when_contiguous():
    from kvswitch import KVLayout

    ts = [np.zeros((2, 32, 4, 2, 8), np.uint16) for _ in range(3)]
    dev = KVLayout.from_vllm(ts)  # contiguous regions
    host = KVLayout.from_vllm([np.zeros((2, 32, 4, 2, 8), np.uint16) for _ in range(3)])
    pairs = np.array([[0, 5, 3], [10, 20, 1]])
    dst, src, sizes = G.copy_list(dev, host, pairs)
    bb = dev.regions[0].block_bytes
    assert len(sizes) == 2 * dev.num_regions and dst.dtype == np.uint64
    assert sizes.tolist() == [3 * bb] * 6 + [bb] * 6
    assert src[0] == dev.regions[0].base and dst[0] == host.regions[0].base + 5 * bb
    strided = KVLayout.from_vllm([np.zeros((32, 2, 4, 2, 8), np.uint16)  # K/V interleaved
                                  for _ in range(3)])
    dst, src, sizes = G.copy_list(strided, host, pairs[:1])
    assert len(sizes) == 3 * strided.num_regions  # one copy per block where strided
    assert src[1] - src[0] == strided.regions[0].block_stride


SMI = """index, name, pci.bus_id, driver_version, pcie.link.gen.current, \
pcie.link.width.current, pcie.link.gen.max, pcie.link.width.max, memory.total [MiB]
0, NVIDIA H100 80GB HBM3, 00000000:1B:00.0, 570.86.15, 5, 16, 5, 16, 81559 MiB
"""


def test_nvidia_smi_and_sysfs_parsing(tmp_path):
    rows = G.parse_smi_csv(SMI)
    assert rows[0]["name"] == "NVIDIA H100 80GB HBM3" and rows[0]["memory.total"] == "81559 MiB"
    assert rows[0]["pcie.link.gen.max"] == "5"
    assert G.parse_smi_csv("") == []
    assert G.sysfs_bus_id(rows[0]["pci.bus_id"]) == "0000:1b:00.0"
    d = tmp_path / "0000:1b:00.0"
    d.mkdir()
    (d / "numa_node").write_text("1\n")
    (d / "current_link_speed").write_text("32.0 GT/s PCIe\n")
    info = G.read_sysfs_pci("0000:1b:00.0", tmp_path)
    assert info == {"numa_node": "1", "current_link_speed": "32.0 GT/s PCIe"}


def test_numa_reexec_runs_once_and_only_with_a_node():
    argv = ["--out", "x"]
    cmd = G.numa_reexec_argv(1, argv, {}, "/usr/bin/numactl")
    assert cmd[:3] == ["/usr/bin/numactl", "--cpunodebind=1", "--membind=1"]
    assert cmd[-2:] == argv and cmd[3] == sys.executable
    assert G.numa_reexec_argv(1, argv, {G.NUMA_GUARD: "1"}, "/usr/bin/numactl") is None
    assert G.numa_reexec_argv(-1, argv, {}, "/usr/bin/numactl") is None
    assert G.numa_reexec_argv(None, argv, {}, "/usr/bin/numactl") is None
    assert G.numa_reexec_argv(0, argv, {}, None) is None


def test_pytest_outcomes_from_verbose_output_and_junit(tmp_path):
    text = textwrap.dedent("""\
        tests/cuda/test_a.py::test_x PASSED                                   [ 33%]
        tests/cuda/test_a.py::test_y[cross_worker_raw_war] FAILED             [ 66%]
        tests/cuda/test_a.py::test_z SKIPPED (no cupy)                        [100%]
        """)
    r = G.parse_pytest_verbose(text)
    assert (r["passed"], r["failed"], r["skipped"]) == (1, 1, 1)
    assert list(r["failures"]) == ["tests/cuda/test_a.py::test_y[cross_worker_raw_war]"]
    # a real junit file from a tiny pytest run
    (tmp_path / "test_t.py").write_text(textwrap.dedent("""\
        import pytest
        def test_ok(record_property):
            record_property("report0", {"a": 1})
        def test_bad():
            assert 1 == 2, "one is not two"
        def test_skip():
            pytest.skip("no GPU here")
        """))
    xml = tmp_path / "out.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    str(tmp_path / "test_t.py"), f"--junitxml={xml}"], cwd=tmp_path,
                   capture_output=True, check=False)
    j = G.parse_junit(xml)
    assert (j["passed"], j["failed"], j["skipped"], j["errors"]) == (1, 1, 1, 0)
    (name, why), = j["failures"].items()
    assert name.endswith("::test_bad") and "one is not two" in why
    assert list(j["skips"].values()) == ["no GPU here"]
    assert any("'a': 1" in v[0] for v in j["reports"].values())


def _results(ceiling_out=50.0, eng=48.0, loop=2.0, ratio=1.7, p50=12.0, slow=0.02,
             migrate=900.0):
    engine = [{"direction": d, "extent": e, "workers": w, "gbps_wall": eng if e >= 20 else 30.0}
              for d in ("out", "in") for e in (1, 4, 20, 60) for w in (1, 2)]
    raw = [{"direction": d, "extent": e, "api": "memcpy", "gbps_gpu": loop, "copies": 7680,
            "per_block": e > 1} for d in ("out", "in") for e in (1, 20, 60)]
    raw += [{"direction": d, "extent": 20, "api": "memcpy", "gbps_gpu": 45.0, "copies": 384,
             "per_block": False} for d in ("out", "in")]  # one copy per extent: not the loop
    return {
        "ceiling": {"gbps_out": ceiling_out, "gbps_in": 50.0, "bytes": 2 * G.GIB, "warmup": 3,
                    "repeats": 20, "gbps_both": 90.0, "ratio_both": 1.8},
        "engine": {"rows": engine, "jobs": 8, "seq_blocks": 120, "rounds": 5},
        "raw_api": {"rows": raw, "seq_blocks": 120},
        "migrate": {"rows": [{"what": "engine.migrate", "extent": e, "gbps_wall": migrate}
                             for e in (1, 20)]
                    + [{"what": "torch index_copy_ (SM kernels)", "extent": 20,
                        "gbps_wall": 5.0}]},
        "bidirectional": {"rows": [{"extent": 60, "workers": 4, "ratio": ratio,
                                    "gbps_both": 80.0, "gbps_out": 47.0, "gbps_in": 46.0}]},
        "submit_latency": {"rows": [{"direction": "out", "held": False, "extents": 64,
                                     "copies": 4096, "p50_us": p50, "p90_us": p50,
                                     "min_us": p50}]},
        "gemm": {"slowdown": slow, "gbps_during_gemm": 20.0},
    }


LOOP = "group swaps (extents >= 20) vs per-block cuMemcpyAsync loop, same bytes, {}"


def test_targets_pass_fail_and_not_measured():
    t = {x.name: x for x in G.evaluate_targets(_results())}
    info = [x for x in t.values() if x.informational]
    assert len(t) == 10 and len(info) == 2 and all(x.passed is None for x in info)
    assert all(x.passed for x in t.values() if not x.informational), t
    # the granularity target compares extents >= 20 with the per-block loop over them
    assert t[LOOP.format("out")].measured == "24.0x"
    assert t["engine vs per-block loop at single-block extents, out"].measured == "15.0x"
    t = {x.name: x for x in G.evaluate_targets(
        _results(ceiling_out=60.0, loop=20.0, ratio=1.5, p50=25.0, slow=0.08, migrate=400.0))}
    assert t["group swaps (extents >= 20) vs one large copy, out"].passed is False
    assert t["group swaps (extents >= 20) vs one large copy, in"].passed is True
    assert t[LOOP.format("in")].measured == "2.4x" and t[LOOP.format("in")].passed is False
    assert t["migrate (20-block extents) vs the PCIe ceiling"].measured == "8.0x"
    assert not any(x.passed for n, x in t.items() if "one large copy" not in n)
    empty = G.evaluate_targets({})
    assert len(empty) == 8 and all(x.passed is None for x in empty)
    assert all(x.measured == "not measured" for x in empty)


def test_markdown_and_json_end_with_the_targets(tmp_path):
    campaign = {"command": "python3 benchmarks/gpu_campaign.py --out x",
                "env": {"gpu": {"name": "NVIDIA H100"}, "date": "2026-11-21"},
                "steps": {"ceiling": {"status": "ok", "seconds": 3.0},
                          "gemm": {"status": "error", "error": "RuntimeError: boom\nmore"}},
                "results": _results()}
    G.write_outputs(tmp_path, campaign)
    data = json.loads((tmp_path / "campaign.json").read_text())
    assert len(data["targets"]) == 10 and data["results"]["ceiling"]["gbps_out"] == 50.0
    md = (tmp_path / "campaign.md").read_text()
    assert md.rstrip().splitlines()[-1].startswith("| GEMM slowdown during swaps")
    assert md.index("## Targets") > md.index("## Ceiling") > md.index("## Steps")
    assert "PASS" in md and "RuntimeError: boom" in md and "more" not in md
    assert "nan" not in md.lower().replace("n/a", "")
    assert not list(tmp_path.glob(".*.tmp"))
    # an empty campaign (every step skipped) still renders
    assert "## Targets" in G.render_markdown({})


def test_a_hung_step_process_and_its_children_are_ended_at_the_timeout(tmp_path):
    """run_logged (tests/cuda, the bench CLI) kills the process group it started, so a
    grandchild left blocked (a scenario stuck on a GPU wait) cannot hold the campaign."""
    code = ("import subprocess, sys, time; print('started', flush=True); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "time.sleep(120)")
    rc, text = G.run_logged([sys.executable, "-c", code], tmp_path / "log", timeout=2)
    assert rc is None and "started" in text
    rc, text = G.run_logged([sys.executable, "-c", "print('done')"], tmp_path / "log2", 30)
    assert (rc, text.strip()) == (0, "done")


def test_the_watchdog_ends_a_hung_step_with_its_outputs_written(tmp_path):
    """A step that never returns (a driver or engine hang) cannot hold the campaign past
    its hard limit: the step is recorded as an error, the outputs are written, exit 1."""
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("g", {str(SCRIPT)!r})
        G = importlib.util.module_from_spec(spec)
        sys.modules["g"] = G
        spec.loader.exec_module(G)
        argv = ["--out", {str(out)!r}]
        c = G.Campaign(G.parse_args(argv), argv)
        c.start_watchdog(1.0)
        c.step("fine", lambda: {{"x": 1}}, need_s=0)
        c.step("hangs", lambda: time.sleep(60), need_s=0)
        print("not reached")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1, r.stderr
    assert "not reached" not in r.stdout and "# kvswitch GPU campaign" in r.stdout
    data = json.loads((out / "campaign.json").read_text())
    assert data["steps"]["fine"]["status"] == "ok"
    assert data["steps"]["hangs"]["status"] == "error"
    assert "watchdog" in data["steps"]["hangs"]["error"]
    assert (out / "campaign.md").exists() and (out / "watchdog_traceback.txt").exists()


# -- the script without a GPU -----------------------------------------------------------------

def test_help_works_without_a_gpu():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--out" in r.stdout and "--budget-s" in r.stdout


def test_without_a_gpu_it_exits_2_with_one_clear_line(tmp_path):
    if not G.gpu_unavailable_reason():
        pytest.skip("this machine has a GPU: the campaign would run")
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "o"), "--no-numa"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("gpu_campaign: needs a CUDA GPU: ")
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


# -- tests/cuda scenarios without a GPU -------------------------------------------------------

def test_scenarios_list_and_skip_cleanly_without_a_gpu(monkeypatch):
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "cuda" / "scenarios.py"), "--list"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == list(SC.SCENARIOS)
    assert all(s.fn.__doc__ for s in SC.SCENARIOS.values())
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tests/cuda runs the scenarios")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # max_connections_1 checks it
    for sc in SC.SCENARIOS.values():
        with pytest.raises(SC.Skip, match="no CUDA device"):
            sc.fn()
    out = SC.run_in_subprocess("device_report")
    assert out.status == "skipped" and "no CUDA device" in out.detail, out


# -- the measurement drivers against the fake driver ------------------------------------------


def run_fake(fake: Path, body: str, **env: str) -> str:
    prelude = textwrap.dedent(f'''
        import dataclasses, importlib.util, json, sys
        import numpy as np
        import kvswitch as K
        spec = importlib.util.spec_from_file_location("kvswitch_gpu_campaign", {str(SCRIPT)!r})
        G = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = G
        spec.loader.exec_module(G)

        def numpy_pools(g, seed=0):
            rng = np.random.default_rng(seed)
            shape = (2, g.pool_blocks, g.block_size, g.kv_heads, g.head_dim)
            ts = [rng.integers(0, 2**16, size=shape, dtype=np.uint16) for _ in range(g.layers)]
            cpu = K.KVLayout.from_vllm(ts)
            regions = [dataclasses.replace(r, device=("cuda", 0)) for r in cpu.regions]
            layout = K.KVLayout(regions, keepalive=ts)
            host = K.HostKVPool(layout, g.pool_blocks)
            assert host.pinned, host.pin_reason
            for a in host.arrays:
                a[...] = rng.integers(0, 2**16, size=a.shape, dtype=np.uint16)
            views = [t[kv] for t in ts for kv in (0, 1)]
            return G.Pools(layout, host, G.NumpyRegions(views), 0, ts)

        g = G.Geometry(layers=2, kv_heads=2, head_dim=8, pool_blocks=256, seq_blocks=12,
                       jobs=3, extents=(1, 4), workers=(1, 2))
        p = numpy_pools(g)
        rng = np.random.default_rng(0)
    ''')
    e = dict(os.environ, LD_LIBRARY_PATH=str(fake), **env)
    e.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
    r = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)
                        + "\nprint('FAKE-OK')\n"], env=e, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0 and "FAKE-OK" in r.stdout, r.stdout + r.stderr
    return r.stdout


def test_timing_helper_against_the_fake_driver(fake):
    run_fake(fake, '''
        from kvswitch import _core
        src = np.arange(1 << 16, dtype=np.uint8)
        dst = np.zeros_like(src)
        d = np.array([dst.ctypes.data + 256 * i for i in range(256)], np.uint64)
        s = np.array([src.ctypes.data + 256 * i for i in range(256)], np.uint64)
        z = np.full(256, 256, np.uint64)
        for api, name in (("memcpy", "cuMemcpyAsync"), ("batch", "cuMemcpyBatchAsync")):
            dst[:] = 0
            t = _core.cuda_copy_bench(0, d, s, z, "in", api, 1, 3)
            assert (dst == src).all() and t["api"] == name
            assert len(t["gpu_s"]) == len(t["submit_s"]) == 3 and t["copies"] == 256
            assert t["bytes"] == src.nbytes and min(t["gpu_s"] + t["submit_s"]) >= 0
        dst[:] = 0
        t = _core.cuda_copy_bench_concurrent(0, d[:100], s[:100], z[:100], "out", d[100:],
                                             s[100:], z[100:], "in", "batch", 1, 2)
        assert (dst == src).all() and len(t["wall_s"]) == 2
        assert t["bytes_a"] + t["bytes_b"] == src.nbytes
        assert all(w >= max(a, b) for w, a, b in zip(t["wall_s"], t["a_s"], t["b_s"]))
        attrs = _core.cuda_device_attributes(0)
        assert attrs["driver_version"] == 12080 and attrs["batch_copy"] == 1
        assert attrs["stream_priority_greatest"] <= attrs["stream_priority_least"]
        for call, kind, text in [
                (lambda: _core.cuda_copy_bench(0, d[:3], s, z, "out"), ValueError, "differ"),
                (lambda: _core.cuda_copy_bench(0, d, s, z * 0, "out"), ValueError, "size 0"),
                (lambda: _core.cuda_copy_bench(0, d, s, z, "up"), ValueError, "direction"),
                (lambda: _core.cuda_copy_bench(0, d, s, z, "out", "x"), ValueError, "api"),
                (lambda: _core.cuda_copy_bench(0, d, s, z, "out", repeats=0), ValueError,
                 "repeats"),
                (lambda: _core.cuda_copy_bench(7, d, s, z, "out"), RuntimeError, "device 7")]:
            try:
                call()
                raise AssertionError(f"no error ({text})")
            except kind as e:
                assert text in str(e), e
    ''')


def test_batch_mode_without_the_batch_api_is_a_clear_error(fake):
    run_fake(fake, '''
        from kvswitch import _core
        a = np.zeros(64, np.uint8)
        one = lambda x: np.array([x], np.uint64)
        try:
            _core.cuda_copy_bench(0, one(a.ctypes.data), one(a.ctypes.data + 32), one(16),
                                  "out", "batch")
            raise AssertionError("no error")
        except RuntimeError as e:
            assert "cuMemcpyBatchAsync is unavailable" in str(e) and "12040" in str(e), e
        t = _core.cuda_copy_bench(0, one(a.ctypes.data), one(a.ctypes.data + 32), one(16),
                                  "out", "memcpy", 0, 1)
        assert t["api"] == "cuMemcpyAsync"
    ''', FAKE_CUDA_NO_BATCH="1")


def test_measurement_drivers_end_to_end_on_the_fake_driver(fake, tmp_path):
    out = run_fake(fake, f'''
        results = {{"raw_api": {{"rows": [], "seq_blocks": g.seq_blocks}},
                   "engine": {{"rows": [], "jobs": g.jobs, "seq_blocks": g.seq_blocks,
                              "rounds": 2}}, "bidirectional": {{"rows": []}},
                   "submit_latency": {{"rows": []}}}}
        # raw copy lists: both APIs, both directions, bytes verified
        for ext in g.extents:
            for d in ("out", "in"):
                pairs = G.make_jobs(rng, g.pool_blocks, g.pool_blocks, ext, 1, g.seq_blocks)[0]
                for api in ("memcpy", "batch"):
                    r = G.raw_case(p, pairs, d, api, warmup=1, repeats=2, check=True)
                    assert r["verify"] == "ok", r
                    assert r["copies"] == len(pairs) * g.num_regions
                    assert r["bytes"] == g.seq_blocks * g.block_bytes
                    results["raw_api"]["rows"].append(r)
                # vLLM's loop over the same blocks: one copy per block and region
                r = G.raw_case(p, pairs, d, "memcpy", warmup=1, repeats=2, check=True,
                               per_block=True)
                assert r["verify"] == "ok" and r["per_block"], r
                assert r["copies"] == g.seq_blocks * g.num_regions
                assert r["bytes"] == g.seq_blocks * g.block_bytes
        # migrations: sources and destinations disjoint, bytes verified on the device
        results["migrate"] = {{"rows": []}}
        with G.new_engine(p, 2) as eng:
            for ext in (1, 4):
                jobs = G.migrate_jobs(rng, g.pool_blocks, ext, 2, g.seq_blocks)
                src, dst = G.expand(np.concatenate(jobs))
                assert not set(src.tolist()) & set(dst.tolist())
                r = G.migrate_case(eng, jobs, rounds=2, warmup=1, pools=p)
                assert r["verify"] == "ok" and r["bytes"] == 2 * g.seq_blocks * g.block_bytes
                results["migrate"]["rows"].append(r)
            assert eng.stats()["num_migrations"] == 2 * 2 * (1 + 1 + 2)  # 2 extents
        # the verification catches a copy that did not happen
        pairs = G.make_jobs(rng, g.pool_blocks, g.pool_blocks, 1, 1, g.seq_blocks)[0]
        G.poison("out", p, pairs)
        assert "differ" in G.verify("out", p, pairs)
        G.poison("in", p, pairs)
        assert "differ" in G.verify("in", p, pairs)
        # the engine: rounds of jobs, verified, per worker count
        for w in g.workers:
            with G.new_engine(p, w) as eng:
                for ext in g.extents:
                    for d in ("out", "in"):
                        jobs = G.make_jobs(rng, g.pool_blocks, g.pool_blocks, ext, g.jobs,
                                           g.seq_blocks)
                        r = G.engine_case(eng, jobs, d, rounds=2, warmup=1, pools=p,
                                          regions=G.sample_regions(g.num_regions, rng, 3))
                        assert r["verify"] == "ok", r
                        assert r["bytes"] == g.jobs * g.seq_blocks * g.block_bytes
                        assert r["workers"] == w and len(r["wall_s"]) == 2
                        results["engine"]["rows"].append(r)
                both = G.make_jobs(rng, g.pool_blocks, g.pool_blocks, 4, 4, g.seq_blocks)
                r = G.bidirectional_case(eng, both[:2], [j[:, [1, 0, 2]] for j in both[2:]],
                                         rounds=2, warmup=1, pools=p)
                assert r["verify"] == "ok" and r["ratio"] > 0, r
                results["bidirectional"]["rows"].append(r)
                pairs = G.make_jobs(rng, g.pool_blocks, g.pool_blocks, 1, 1, 64)[0]
                for held in (False, True):
                    r = G.call_latency(eng, pairs, n=5, hold=held)
                    assert r["extents"] == 64 and r["copies"] == 64 * g.num_regions
                    results["submit_latency"]["rows"].append(r)
                try:  # a fake device without stream memory operations refuses flag waits
                    r = G.call_latency(eng, pairs, n=3, hold=False, direction="in",
                                       before=0x77)
                    assert r["direction"] == "in" and r["n"] == 3
                except ValueError as e:
                    assert "before=" in str(e), e
        results["ceiling"] = {{"gbps_out": 1.0, "gbps_in": 1.0, "bytes": G.GIB, "warmup": 0,
                              "repeats": 1}}
        campaign = {{"command": "smoke", "env": {{}}, "steps": {{}}, "results": results}}
        G.write_outputs(__import__("pathlib").Path({str(tmp_path)!r}), campaign)
        print("TARGETS", json.dumps([t["passed"] for t in campaign["targets"]]))
    ''')
    passed = json.loads(next(line for line in out.splitlines()
                             if line.startswith("TARGETS"))[len("TARGETS"):])
    assert len(passed) == 10 and passed[-1] is None  # no GEMM on the fake
    md = (tmp_path / "campaign.md").read_text()
    for heading in ("## Raw copy APIs", "## AsyncSwapEngine", "## Both directions at once",
                    "## Call time of swap_out", "## Migration", "## Targets"):
        assert heading in md
    assert "| ok |" in md


def test_the_dry_run_runs_every_step_end_to_end_on_the_fake_driver(fake, tmp_path):
    """``gpu_campaign.py --dry-run``: the whole campaign as on a GPU machine (versions line,
    tests/cuda, ceiling, pools, raw APIs, engine, migrate, both directions, call time,
    GEMMs beside swaps, pageable pool, outputs), at toy sizes, torch CPU tensors standing
    in for device memory, kvswitch's cuda backend on the fake driver. It must end within
    its stated time (DRY_RUN_STATED_S, docs/benchmarks.md) with every step ok, every byte
    check ok, and at most 7 files in the output folder (a GPU machine returns 8). Nothing
    timed is checked."""
    pytest.importorskip("torch")
    out_dir = tmp_path / "out"
    env = dict(os.environ, LD_LIBRARY_PATH=str(fake))
    env.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
    try:
        r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out_dir)],
                           env=env, capture_output=True, text=True, cwd=ROOT,
                           timeout=G.DRY_RUN_STATED_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the dry run took more than its stated {G.DRY_RUN_STATED_S} s\n"
                    f"{(e.stderr or b'')[-3000:]!r}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first = r.stderr.splitlines()[0]
    assert first.startswith("[campaign] python ") and "kvswitch" in first and "commit" in first
    data = json.loads((out_dir / "campaign.json").read_text())
    steps = {k: v["status"] for k, v in data["steps"].items()}
    assert steps == {k: "ok" for k in ("environment", "tests", "ceiling", "setup", "raw_api",
                                       "engine", "migrate", "bidirectional", "submit_latency",
                                       "gemm", "pageable")}, data["steps"]
    res = data["results"]
    assert res["tests"]["runner"] == "pytest tests/cuda" and res["tests"]["failed"] == 0
    checks = [row.get("verify") for k in ("raw_api", "engine", "bidirectional", "pageable",
                                         "migrate") for row in res[k]["rows"] if "verify" in row]
    assert checks and set(checks) == {"ok"}, checks
    assert any(row.get("per_block") for row in res["raw_api"]["rows"])
    assert {row["what"] for row in res["migrate"]["rows"]} == {
        "engine.migrate", "torch index_copy_ (SM kernels)"}
    assert res["pageable"]["pinned"] is False and res["gemm"]["verify"] == "ok"
    assert len(data["targets"]) == 10
    files = sorted(p.name for p in out_dir.iterdir())
    assert len(files) <= 7 and {"campaign.json", "campaign.md", "tests_cuda.log"} <= set(files)
    assert r.stdout.rstrip().splitlines()[-1].startswith("| GEMM slowdown during swaps")
