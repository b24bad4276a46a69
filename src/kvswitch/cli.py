"""The ``kvswitch`` command line. ``kvswitch bench`` replays the bundled multi-turn trace.

This is the allocator-level stage of the benchmark: it replays real conversations through
the GPU-pool allocator in per-block mode (vLLM's free list, the baseline) and in group mode,
and reports how many copies a swap-out of each preempted or finished sequence needs. Copies
are counted from block groups, not executed: the swap engine, the reuse tracker and the
SwapManager join this command as they land.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import numpy as np

from kvswitch.allocator import DEFAULT_INITIAL_GROUP_BLOCKS, BlockGroupAllocator, OutOfBlocksError
from kvswitch.bench.replay import BLOCK_SIZE, ReplayConfig, replay
from kvswitch.reuse import ReuseTracker
from kvswitch.trace import TraceError, load_trace, sample

#: Regions a swap copies per block group in a Llama-3-8B per-layer layout (32 layers, K and V).
LLAMA3_8B_REGIONS = 64


def _bench(args: argparse.Namespace) -> int:
    try:
        conversations = sample(load_trace(args.trace), args.conversations, args.seed)
    except TraceError as e:
        print(f"kvswitch bench: {e}", file=sys.stderr)
        return 2
    config = ReplayConfig(
        occupancy=args.occupancy,
        preempt_every=args.preempt_every,
        think_iters=args.think_iters,
        arrival_per_iter=args.arrival_per_iter,
        seed=args.seed,
    )
    host_blocks = args.host_blocks or 16 * args.gpu_blocks
    # name -> (initial group blocks of the GPU pool, CPU copies reused?)
    configurations = {
        "baseline": (1, False),
        "groups": (args.initial_group_blocks, False),
        "groups+reuse": (args.initial_group_blocks, True),
    }
    print(
        f"kvswitch bench: {len(conversations)} conversations from "
        f"{args.trace or 'the bundled ShareGPT trace'}, GPU pool {args.gpu_blocks} blocks "
        f"of {BLOCK_SIZE} tokens, admission at {args.occupancy:.0%}, a priority preemption "
        f"every {args.preempt_every} iterations",
        file=sys.stderr,
    )
    figures: dict[str, dict[str, float]] = {}
    for name, (initial, reuse) in configurations.items():
        allocator = BlockGroupAllocator(args.gpu_blocks, initial_group_blocks=initial)
        tracker = ReuseTracker(BlockGroupAllocator(host_blocks)) if reuse else None
        t0 = time.perf_counter()
        try:
            result = replay(allocator, conversations, config, tracker)
        except OutOfBlocksError as e:
            print(f"kvswitch bench: {name}: {e}; raise --host-blocks", file=sys.stderr)
            return 2
        wall = time.perf_counter() - t0
        calls_ns = result.alloc_one_ns + result.alloc_many_ns + result.free_ns
        figures[name] = {
            "swap_outs": len(result.free_ns),
            "preemptions": result.preemptions + result.pool_full_preemptions,
            "swap_out_blocks": result.swap_out_blocks,
            "reused_blocks": result.reused_blocks,
            "swap_in_blocks": result.swap_in_blocks,
            "reclaimed_blocks": tracker.stats().blocks_reclaimed if tracker else 0,
            "contaminations": tracker.stats().contaminations if tracker else 0,
            "swap_out_groups": result.swap_out_groups,
            "blocks_per_copy": result.swap_out_blocks / max(result.swap_out_groups, 1),
            "copies_llama3_8b": result.swap_out_groups * LLAMA3_8B_REGIONS,
            "allocator_calls": len(calls_ns),
            "allocator_call_p50_us": float(np.median(calls_ns)) / 1e3,
            "replay_wall_s": wall,
        }
        print(f"  {name}: done in {wall:.1f} s", file=sys.stderr)

    rows = [
        ("swap-outs (turn ends + preemptions)", "swap_outs", "{:,.0f}"),
        ("preemptions", "preemptions", "{:,.0f}"),
        ("swap-out blocks copied", "swap_out_blocks", "{:,.0f}"),
        ("swap-out blocks reused (CPU copy valid)", "reused_blocks", "{:,.0f}"),
        ("backup blocks reclaimed (contaminated)", "reclaimed_blocks", "{:,.0f}"),
        ("contaminations", "contaminations", "{:,.0f}"),
        ("swap-in blocks", "swap_in_blocks", "{:,.0f}"),
        ("copies per region (block groups)", "swap_out_groups", "{:,.0f}"),
        ("mean blocks per copy", "blocks_per_copy", "{:,.1f}"),
        (f"copies, Llama-3-8B layout ({LLAMA3_8B_REGIONS} regions)", "copies_llama3_8b",
         "{:,.0f}"),
        ("allocator call p50 (us, measured)", "allocator_call_p50_us", "{:,.2f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':<{width}}  " + "  ".join(f"{n:>14}" for n in figures))
    for label, key, fmt in rows:
        cells = "  ".join(f"{fmt.format(f[key]):>14}" for f in figures.values())
        print(f"{label:<{width}}  {cells}")
    base, grp, full = figures["baseline"], figures["groups"], figures["groups+reuse"]
    print(
        f"\ngroups vs baseline: {base['swap_out_groups'] / max(grp['swap_out_groups'], 1):.1f}x "
        "fewer copies for the same swap-out blocks.\n"
        f"groups+reuse vs baseline: "
        f"{1 - full['swap_out_blocks'] / max(base['swap_out_blocks'], 1):.0%} fewer swap-out "
        f"blocks, {base['swap_out_groups'] / max(full['swap_out_groups'], 1):.1f}x fewer copies.\n"
        "Blocks and copies are counted from the allocators' and the reuse tracker's plans; "
        "the copies are not executed at this stage (the swap engine joins this command next)."
    )
    if args.json:
        with open(args.json, "w") as f:
            config_args = {k: v for k, v in vars(args).items() if k != "func"}
            json.dump({"config": config_args, "configurations": figures}, f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvswitch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="replay a multi-turn trace and compare configurations")
    bench.add_argument("--trace", default=None,
                       help="CSV with conversation_id, turn, new_input_tokens, output_tokens "
                            "(default: the bundled ShareGPT trace)")
    bench.add_argument("--conversations", type=int, default=1000,
                       help="conversations sampled from the trace (default 1000)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--gpu-blocks", type=int, default=8000,
                       help="GPU pool size in blocks of 16 tokens (default 8000)")
    bench.add_argument("--host-blocks", type=int, default=None,
                       help="host pool size in blocks for CPU copies (default 16x --gpu-blocks)")
    bench.add_argument("--occupancy", type=float, default=0.8,
                       help="admit turns while the pool is below this fraction (default 0.8)")
    bench.add_argument("--preempt-every", type=int, default=50,
                       help="iterations between priority preemptions; 0 for none "
                            "(default 50: the paper's frequency 0.02)")
    bench.add_argument("--think-iters", type=int, default=200,
                       help="iterations between a turn's end and the next turn (default 200)")
    bench.add_argument("--arrival-per-iter", type=float, default=0.05,
                       help="mean conversation arrivals per iteration (default 0.05)")
    bench.add_argument("--initial-group-blocks", type=int, default=DEFAULT_INITIAL_GROUP_BLOCKS)
    bench.add_argument("--json", default=None, help="also write the figures to this JSON file")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
