"""Allocator benchmark: replay the bundled multi-turn trace through a GPU-pool allocator.

Measures, for group mode and per-block mode (vLLM's free list) in the same run:

* the Python-level cost of each ``allocate`` and ``free`` call (median, p99; the timer's own
  overhead, measured and printed, is included),
* the cost of ``free`` of a sequence of exactly 100 groups,
* the mean blocks per group that swap-outs see in the replay (the copy granularity of a
  swap), at pool sizes that force preemption,
* that both modes succeed and fail on exactly the same requests (no false out-of-memory).

The replay model is :mod:`kvswitch.bench.replay`'s (allocator-level; no copies).

Run: ``python benchmarks/allocator_replay.py`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from kvswitch import BlockGroupAllocator
from kvswitch.bench.replay import ReplayConfig, replay
from kvswitch.trace import load_trace, sample


def percentile_us(values_ns: list[int], q: float) -> float:
    return float(np.percentile(values_ns, q)) / 1e3 if values_ns else float("nan")


def free_100_groups_us(initial_group_blocks: int, repeats: int) -> list[float]:
    """Cost of free() of a sequence of exactly 100 block groups, in microseconds."""
    out = []
    for _ in range(repeats):
        a = BlockGroupAllocator(100_000, initial_group_blocks=initial_group_blocks)
        a.allocate("s", 200)  # blocks 0..199 in both modes
        a.free_blocks("s", np.arange(1, 200, 2))  # every other block: 100 groups of one
        assert len(a.groups("s")) == 100
        t0 = time.perf_counter_ns()
        a.free("s")
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trace", default=None, help="trace CSV (default: the bundled ShareGPT trace)")
    p.add_argument("--conversations", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-pool-blocks", type=int, default=100_000)
    p.add_argument("--pool-blocks", type=int, nargs="+", default=[4_000, 8_000, 16_000],
                   help="pool sizes for the group-length replay (small enough to preempt)")
    p.add_argument("--occupancy", type=float, default=0.8, help="admission cap (fraction of pool)")
    p.add_argument("--arrival-per-iter", type=float, default=0.05)
    p.add_argument("--think-iters", type=int, default=200)
    p.add_argument("--preempt-every", type=int, default=50,
                   help="iterations between priority preemptions (0: never)")
    p.add_argument("--initial-group-blocks", type=int, default=60)
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args()

    convs = sample(load_trace(args.trace), args.conversations, args.seed)
    config = ReplayConfig(occupancy=args.occupancy, arrival_per_iter=args.arrival_per_iter,
                          think_iters=args.think_iters, preempt_every=args.preempt_every,
                          seed=args.seed)
    t_timer = min(
        -(time.perf_counter_ns() - time.perf_counter_ns()) for _ in range(10000)
    )
    results: dict = {"args": vars(args), "machine": platform.processor() or platform.machine(),
                     "timer_overhead_ns": t_timer, "timing": {}, "replay": {}}

    print(f"# allocator replay: {len(convs)} conversations, timer overhead {t_timer} ns")
    print(f"\n## call cost, pool of {args.timing_pool_blocks} blocks (microseconds)")
    print(f"{'mode':<10} {'alloc(1) p50':>13} {'alloc(1) p99':>13} {'alloc(n) p50':>13} "
          f"{'free p50':>9} {'free p99':>9} {'free 100 groups p50':>20}")
    runs = {}
    for mode, igb in (("groups", args.initial_group_blocks), ("per-block", 1)):
        a = BlockGroupAllocator(args.timing_pool_blocks, initial_group_blocks=igb)
        t = replay(a, convs, config)
        runs[mode] = t
        f100 = free_100_groups_us(igb, 200)
        row = {
            "alloc_one_p50_us": percentile_us(t.alloc_one_ns, 50),
            "alloc_one_p99_us": percentile_us(t.alloc_one_ns, 99),
            "alloc_many_p50_us": percentile_us(t.alloc_many_ns, 50),
            "free_p50_us": percentile_us(t.free_ns, 50),
            "free_p99_us": percentile_us(t.free_ns, 99),
            "free_100_groups_p50_us": statistics.median(f100),
            "calls": len(t.outcomes) + len(t.free_ns),
        }
        results["timing"][mode] = row
        print(f"{mode:<10} {row['alloc_one_p50_us']:>13.2f} {row['alloc_one_p99_us']:>13.2f} "
              f"{row['alloc_many_p50_us']:>13.2f} {row['free_p50_us']:>9.2f} "
              f"{row['free_p99_us']:>9.2f} {row['free_100_groups_p50_us']:>20.2f}")
    same = runs["groups"].outcomes == runs["per-block"].outcomes
    print(f"same allocate outcomes in both modes: {same}")

    print("\n## swap-out granularity in the replay (blocks per group at swap-out)")
    print(f"{'pool blocks':>11} {'mode':<10} {'swap-outs':>9} {'preemptions':>11} "
          f"{'pool full':>9} {'blocks/group':>12} {'failed allocs':>13} {'same outcomes':>13}")
    for pool in args.pool_blocks:
        per_mode = {}
        for mode, igb in (("groups", args.initial_group_blocks), ("per-block", 1)):
            t = replay(BlockGroupAllocator(pool, initial_group_blocks=igb), convs, config)
            per_mode[mode] = t
        same_here = per_mode["groups"].outcomes == per_mode["per-block"].outcomes
        for mode, t in per_mode.items():
            gran = t.swap_out_blocks / max(t.swap_out_groups, 1)
            row = {"swap_outs": len(t.free_ns), "preemptions": t.preemptions,
                   "pool_full_preemptions": t.pool_full_preemptions,
                   "blocks_per_group": gran, "failed_allocs": t.outcomes.count(False),
                   "same_outcomes": same_here}
            results["replay"].setdefault(str(pool), {})[mode] = row
            print(f"{pool:>11} {mode:<10} {row['swap_outs']:>9} {t.preemptions:>11} "
                  f"{t.pool_full_preemptions:>9} "
                  f"{gran:>12.1f} {row['failed_allocs']:>13} {str(same_here):>13}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
