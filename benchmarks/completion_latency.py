#!/usr/bin/env python3
"""How long after a job's end a swap handle is done: the worker's completion poll (issue 22).

A worker with jobs in flight and nothing queued looks at their end events with a growing
sleep between looks; it stopped at 1 ms, now at 100 us (``AsyncSwapEngine`` test hook
``_set_max_poll_us``). Measured side by side in one run, for each cap:

* **fake driver, latency**: a job waits on a gated stream (``after=``) long enough for the
  worker's sleep to reach its cap, plus a random part (uniform over two caps, so the end
  falls anywhere in the worker's sleep, as a real job's end does); the gate opens at t0
  and ``handle.wait()`` returns at t1. t1 - t0: the fake runs the copy and records the
  end event (tens of microseconds) plus the worker's detection delay (up to one sleep).
* **fake driver, round**: 8 jobs of 2 copies of 2 ms each (the fake's per-copy delay) on
  one worker, submitted back to back; time from the first submit to ``synchronize()``
  returning (one detection delay at the end of the round).
* **fake driver, CPU**: process CPU seconds while one job waits 1 s on a gated stream
  (the polling worker's cost).
* **host backend**: submit -> ``wait()`` of a one-block job; host jobs complete when
  issued, so the cap does not apply (a control).

The fake (tests/fake_cuda) is built here and loaded by a child process (libcuda.so.1 is
found through LD_LIBRARY_PATH at process start). Its times are host-thread times, not a
GPU's: what they show is the detection delay, which does not depend on the device.

Usage: python benchmarks/completion_latency.py [--samples 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _manager_rounds import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CAPS_US = (1000, 200, 100)  # the old cap first
GATED = 0x6A7E


def stats_us(xs: list[float]) -> dict[str, float]:
    us = np.asarray(xs) * 1e6
    return {"p50_us": float(np.percentile(us, 50)), "p90_us": float(np.percentile(us, 90)),
            "mean_us": float(us.mean()), "n": len(xs)}


def pools(num_blocks: int = 64, on_cuda: bool = False):
    import kvswitch as K

    rng = np.random.default_rng(0)
    ts = [rng.integers(0, 2**16, size=(2, num_blocks, 4, 2, 8), dtype=np.uint16)]
    layout = K.KVLayout.from_vllm(ts)
    if on_cuda:
        regions = [dataclasses.replace(r, device=("cuda", 0)) for r in layout.regions]
        layout = K.KVLayout(regions, keepalive=layout.tensors)
    return layout, K.HostKVPool(layout, num_blocks, pin=on_cuda)


def host_part(samples: int) -> dict[str, dict[str, float]]:
    from kvswitch import AsyncSwapEngine

    layout, pool = pools()
    out = {}
    with AsyncSwapEngine(layout, pool, backend="host", num_workers=1) as eng:
        for cap in CAPS_US:
            eng._engine._set_max_poll_us(cap)
            xs = []
            for i in range(samples):
                t0 = time.perf_counter()
                eng.swap_out([(i % 64, i % 64, 1)]).wait()
                xs.append(time.perf_counter() - t0)
            out[str(cap)] = stats_us(xs)
    return out


def fake_part(samples: int) -> dict[str, dict[str, dict[str, float]]]:
    """Runs in the child process that loaded the fake driver."""
    from kvswitch import AsyncSwapEngine

    lib = ctypes.CDLL("libcuda.so.1")
    lib.fake_gate_close.restype = ctypes.c_long
    lib.fake_gate_close.argtypes = [ctypes.c_ulonglong]
    lib.fake_gate_open.argtypes = [ctypes.c_long]
    lib.fake_set_delay_us.argtypes = [ctypes.c_char_p, ctypes.c_long]
    layout, pool = pools(on_cuda=True)
    res: dict[str, dict[str, dict[str, float]]] = {"latency": {}, "round": {}, "cpu": {}}
    rng = np.random.default_rng(0)
    with AsyncSwapEngine(layout, pool, backend="cuda", num_workers=1) as eng:
        lat: dict[int, list[float]] = {c: [] for c in CAPS_US}
        rounds: dict[int, list[float]] = {c: [] for c in CAPS_US}
        for i in range(samples):  # interleaved: drift hits every cap alike
            for cap in CAPS_US:
                eng._engine._set_max_poll_us(cap)
                gate = lib.fake_gate_close(GATED)
                h = eng.swap_out([(i % 64, i % 64, 1)], after=GATED)
                # the worker's sleep grows to the cap meanwhile; the random part puts the
                # gate's opening anywhere in one of its sleeps
                time.sleep(0.01 + rng.uniform(0, 2 * cap * 1e-6))
                t0 = time.perf_counter()
                lib.fake_gate_open(gate)
                h.wait()
                lat[cap].append(time.perf_counter() - t0)
        lib.fake_set_delay_us(b"copy", 2000)
        for _ in range(max(5, samples // 10)):
            for cap in CAPS_US:
                eng._engine._set_max_poll_us(cap)
                t0 = time.perf_counter()
                for j in range(8):
                    eng.swap_out([(8 * j, 8 * j, 8)])  # disjoint: no ordering between them
                eng.synchronize()
                rounds[cap].append(time.perf_counter() - t0)
        lib.fake_set_delay_us(b"copy", 0)
        for cap in CAPS_US:
            eng._engine._set_max_poll_us(cap)
            gate = lib.fake_gate_close(GATED)
            h = eng.swap_out([(0, 0, 1)], after=GATED)
            time.sleep(0.05)
            c0, t0 = time.process_time(), time.perf_counter()
            time.sleep(1.0)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            lib.fake_gate_open(gate)
            h.wait()
            res["cpu"][str(cap)] = {"cpu_s_per_s": cpu / wall}
        for cap in CAPS_US:
            res["latency"][str(cap)] = stats_us(lat[cap])
            r = rounds[cap]
            res["round"][str(cap)] = {"median_ms": statistics.median(r) * 1e3,
                                      "min_ms": min(r) * 1e3, "n": len(r)}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=200, help="latency samples per cap")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--fake-part", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fake_part:  # the child: print the fake's figures as JSON
        print(json.dumps(fake_part(args.samples)))
        return 0
    sys.path.insert(0, str(ROOT / "tests"))
    from _fake_cuda import build_fake_driver, fake_env

    with tempfile.TemporaryDirectory() as tmp:
        fake = build_fake_driver(Path(tmp))
        child = subprocess.run([sys.executable, __file__, "--fake-part", "--samples",
                                str(args.samples)], env=fake_env(fake), capture_output=True,
                               text=True, check=False)
    if child.returncode != 0:
        print(child.stdout + child.stderr, file=sys.stderr)
        return 1
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "command": "python benchmarks/completion_latency.py " + " ".join(
                  a for a in (argv if argv is not None else sys.argv[1:])),
              "caps_us": list(CAPS_US), "fake": json.loads(child.stdout),
              "host": host_part(args.samples)}
    f, h = result["fake"], result["host"]
    print(f"# {result['machine']}, {result['date']}")
    print("| poll cap | fake: end -> done p50 / p90 (us) | fake: round of 8 jobs x 2 x 2 ms "
          "(ms, median) | fake: worker CPU while a job waits (s/s) | host: submit -> done "
          "p50 (us) |")
    print("|---|---|---|---|---|")
    for cap in map(str, CAPS_US):
        print(f"| {cap} us | {f['latency'][cap]['p50_us']:.0f} / "
              f"{f['latency'][cap]['p90_us']:.0f} | {f['round'][cap]['median_ms']:.2f} | "
              f"{f['cpu'][cap]['cpu_s_per_s']:.3f} | {h[cap]['p50_us']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
