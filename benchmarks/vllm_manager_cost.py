"""Python cost of the offloading manager's hot calls: kvswitch's vs vLLM's native manager.

vLLM's scheduler calls ``lookup`` per block of every new request and ``prepare_store`` /
``complete_store`` per request per step. Both managers run the same deterministic
workload side by side (interleaved per call, so machine noise hits both alike):
requests of ``--blocks`` keys each, stored in steps of ``--step`` keys, on a cache of
``--chunks`` chunks that fills and then evicts (LRU or ARC), and a lookup of every stored
key of an earlier request. Reports the median (p50) and p90 time per call in
microseconds and the ratio kvswitch / vLLM (issue 12's target: within 1.2x).

Run: python benchmarks/vllm_manager_cost.py [--policy lru|arc] [--requests N]
"""

from __future__ import annotations

import argparse
import statistics
import time

from vllm.v1.kv_offload.base import ReqContext, make_offload_key
from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

from kvswitch.adapters.vllm import KVSwitchOffloadingManager


def pct(xs: list[int], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] / 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--blocks", type=int, default=64, help="keys per request")
    ap.add_argument("--step", type=int, default=16, help="keys per prepare_store")
    ap.add_argument("--chunks", type=int, default=4096)
    ap.add_argument("--policy", default="lru")
    args = ap.parse_args()

    managers = {"vllm": CPUOffloadingManager(args.chunks, cache_policy=args.policy),
                "kvswitch": KVSwitchOffloadingManager(args.chunks, cache_policy=args.policy)}
    samples = {name: {"prepare_store": [], "complete_store": [], "lookup": []}
               for name in managers}
    pc = time.perf_counter_ns
    for r in range(args.requests):
        keys = [make_offload_key(f"{r}:{j}".encode(), 0) for j in range(args.blocks)]
        old = [make_offload_key(f"{r - 3}:{j}".encode(), 0) for j in range(args.blocks)]
        for name, m in managers.items():
            ctx = ReqContext(f"r{r}")
            m.on_new_request(ctx)
            s = samples[name]
            for k in old[: args.step]:
                t0 = pc()
                m.lookup(k, ctx)
                s["lookup"].append(pc() - t0)
            for off in range(0, args.blocks, args.step):
                part = keys[off:off + args.step]
                t0 = pc()
                out = m.prepare_store(part, ctx)
                t1 = pc()
                m.complete_store(part, ctx)
                t2 = pc()
                assert out is not None
                s["prepare_store"].append(t1 - t0)
                s["complete_store"].append(t2 - t1)
            m.on_request_finished(ctx)

    print(f"{args.requests} requests x {args.blocks} keys, prepare_store of {args.step} keys, "
          f"{args.chunks} chunks, policy {args.policy}")
    print(f"{'call':>15} {'vLLM p50 us':>12} {'kvswitch p50 us':>16} {'ratio':>6} "
          f"{'vLLM p90':>9} {'kvswitch p90':>13}")
    for call in ("prepare_store", "complete_store", "lookup"):
        a, b = samples["vllm"][call], samples["kvswitch"][call]
        print(f"{call:>15} {pct(a, .5):>12.2f} {pct(b, .5):>16.2f} "
              f"{pct(b, .5) / pct(a, .5):>6.2f} {pct(a, .9):>9.2f} {pct(b, .9):>13.2f}")
    kv = managers["kvswitch"]
    runs = [len(kv.chunk_runs(f"r{r}")) for r in range(args.requests - 50, args.requests)]
    print(f"kvswitch CPU runs per cached request (last 50): mean {statistics.mean(runs):.2f}")


if __name__ == "__main__":
    main()
