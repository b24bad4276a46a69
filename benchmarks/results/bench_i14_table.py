"""Granularity table of one ``kvswitch bench --json`` run, configurations side by side.

Run: ``python benchmarks/results/bench_i14_table.py RUN.json`` (issue 14; docs/benchmarks.md).
Counts are measured; throughput and TTFT are on the bench's modelled clock.
"""

import json
import sys

ROWS = [
    ("swap-out blocks per copy", "gran_swap_out_blocks_per_copy", "{:.1f}"),
    ("swap-in blocks per copy", "gran_swap_in_blocks_per_copy", "{:.1f}"),
    ("mean blocks per copy (both)", "blocks_per_copy", "{:.1f}"),
    ("copies issued (swaps)", "copies", "{:,.0f}"),
    ("copy pairs per swap-out (mean)", "gran_swap_out_pairs_mean", "{:.1f}"),
    ("GPU table extents at swap-out (mean)", "gran_swap_out_table_extents_mean", "{:.1f}"),
    ("decode-growth allocations / new extents", None, None),
    ("  of them splitting another's tail", "gran_alloc_grow_tail_split_calls", "{:,.0f}"),
    ("migrations / blocks moved", None, None),
    ("migrate time on the preset GPU (s, modelled)", "gran_migrate_s_modelled", "{:.2f}"),
    ("reserved blocks p50", "gran_reserved_blocks_p50", "{:,.0f}"),
    ("swap-outs", "swap_outs", "{:,.0f}"),
    ("tokens served", "tokens", "{:,.0f}"),
    ("throughput (tok/s, modelled clock)", "throughput_tok_s", "{:,.0f}"),
    ("stall on swaps (s, measured)", "stall_s_measured", "{:.2f}"),
    ("TTFT P99 (s, modelled clock)", "ttft_p99_s", "{:.2f}"),
    ("wall (s)", "wall_s", "{:.0f}"),
]


def cell(d: dict, label: str, key: str | None, fmt: str | None) -> str:
    if label.startswith("decode-growth"):
        calls, new = d.get("gran_alloc_grow_calls", 0), d.get("gran_alloc_grow_new_extents", 0)
        return f"{calls:,} / {new:,}"
    if label.startswith("migrations"):
        return f"{d['gran_migrations']:,} / {d['gran_migrated_blocks']:,}"
    return fmt.format(d[key])


def main() -> None:
    with open(sys.argv[1]) as f:
        run = json.load(f)["configurations"]
    names = list(run)
    print("| | " + " | ".join(names) + " |")
    print("|---" + "|---:" * len(names) + "|")
    for label, key, fmt in ROWS:
        print(f"| {label} | " + " | ".join(cell(run[n], label, key, fmt) for n in names) + " |")
    if "baseline" in run:
        base = run["baseline"]["copies"]
        for n in names:
            if n == "baseline":
                continue
            d = run[n]
            with_migrate = d["copies"] + d["gran_migrate_copies"]
            print(f"- {n}: baseline copies / its copies {base / d['copies']:.1f}x "
                  f"({base / with_migrate:.1f}x counting migrate copies)")


if __name__ == "__main__":
    main()
