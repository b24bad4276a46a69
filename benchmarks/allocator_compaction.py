"""Allocator micro-benchmark for GPU-pool compaction (issue 14).

Measures from Python, on one allocator:

* ``allocate(seq, 1)`` per call (p50, p99), the decode path that compaction must not slow
  down (target: p50 <= 2 us),
* ``compact(n)`` per call on a fragmented pool (free space in small holes between many
  short sequences): wall time, blocks moved and moves returned,
* ``reserve(seq, n)`` per call.

Timings include the timer's own overhead (printed). Run:
``python benchmarks/allocator_compaction.py [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import numpy as np

from kvswitch import BlockGroupAllocator


def pct_us(values_ns: list[int], q: float) -> float:
    return float(np.percentile(values_ns, q)) / 1e3


def allocate_one(pool: int, sequences: int, rounds: int) -> list[int]:
    a = BlockGroupAllocator(pool)
    out = []
    for _ in range(rounds):
        for s in range(sequences):
            t0 = time.perf_counter_ns()
            a.allocate(s, 1)
            out.append(time.perf_counter_ns() - t0)
        if a.num_free_blocks < sequences:
            break
    return out


def fragmented(pool: int, rng: random.Random) -> BlockGroupAllocator:
    """A pool filled with 1-8 block sequences, then every other one freed."""
    a = BlockGroupAllocator(pool)
    seq = 0
    while a.num_free_blocks:
        a.allocate(seq, min(rng.randint(1, 8), a.num_free_blocks))
        seq += 1
    for s in range(0, seq, 2):
        a.free(s)
    return a


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool-blocks", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rng = random.Random(args.seed)
    t_timer = min(-(time.perf_counter_ns() - time.perf_counter_ns()) for _ in range(10000))
    res: dict = {"args": vars(args), "machine": platform.processor() or platform.machine(),
                 "timer_overhead_ns": t_timer}
    print(f"# allocator compaction benchmark; timer overhead {t_timer} ns")

    ns = allocate_one(100_000, 64, 1000)
    res["allocate_one"] = {"calls": len(ns), "p50_us": pct_us(ns, 50), "p99_us": pct_us(ns, 99)}
    print(f"allocate(seq, 1): {len(ns):,} calls, p50 {pct_us(ns, 50):.2f} us, "
          f"p99 {pct_us(ns, 99):.2f} us")

    res["compact"] = []
    for n in (16, 60, 200, 1000):
        times, moved, moves = [], [], []
        for _ in range(args.repeats):
            a = fragmented(args.pool_blocks, rng)
            t0 = time.perf_counter_ns()
            m = a.compact(n)
            times.append(time.perf_counter_ns() - t0)
            a.check_invariants()
            moved.append(m.moved_blocks if m else 0)
            moves.append(len(m.pairs()) if m else 0)
        row = {"num_blocks": n, "p50_us": statistics.median(times) / 1e3,
               "moved_blocks_mean": statistics.mean(moved),
               "migrate_pairs_mean": statistics.mean(moves)}
        res["compact"].append(row)
        print(f"compact({n:>4}) on a fragmented {args.pool_blocks:,}-block pool: "
              f"p50 {row['p50_us']:.1f} us, moved {row['moved_blocks_mean']:.1f} blocks in "
              f"{row['migrate_pairs_mean']:.1f} migrate pairs (mean of {args.repeats})")

    a = BlockGroupAllocator(100_000)
    times = []
    for s in range(2000):
        a.allocate(s, 1)
        t0 = time.perf_counter_ns()
        a.reserve(s, 8)
        times.append(time.perf_counter_ns() - t0)
    res["reserve_p50_us"] = pct_us(times, 50)
    print(f"reserve(seq, 8): p50 {pct_us(times, 50):.2f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
