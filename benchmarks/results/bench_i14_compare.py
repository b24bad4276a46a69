"""Side-by-side table of two ``kvswitch bench --json`` files (before / after compaction).

Run: ``python benchmarks/results/bench_i14_compare.py BEFORE.json AFTER.json``.
"""

import json
import sys

ROWS = [
    ("swap-out blocks per copy", "gran_swap_out_blocks_per_copy", "{:.1f}"),
    ("swap-in blocks per copy", "gran_swap_in_blocks_per_copy", "{:.1f}"),
    ("mean blocks per copy (both)", "blocks_per_copy", "{:.1f}"),
    ("copies issued (swaps)", "copies", "{:,.0f}"),
    ("migrations", "gran_migrations", "{:,.0f}"),
    ("migrated blocks", "gran_migrated_blocks", "{:,.0f}"),
    ("migrate copies (pairs x regions)", "gran_migrate_copies", "{:,.0f}"),
    ("migrate wait (s, measured)", "gran_migrate_wait_s_measured", "{:.2f}"),
    ("migrate time on the preset GPU (s, modelled)", "gran_migrate_s_modelled", "{:.3f}"),
    ("swap-outs", "swap_outs", "{:,.0f}"),
    ("tokens served", "tokens", "{:,.0f}"),
    ("throughput (tok/s, modelled clock)", "throughput_tok_s", "{:,.0f}"),
    ("stall on swaps (s, measured)", "stall_s_measured", "{:.2f}"),
    ("TTFT P99 (s, modelled clock)", "ttft_p99_s", "{:.2f}"),
    ("reserved blocks p50", "gran_reserved_blocks_p50", "{:,.0f}"),
    ("wall (s)", "wall_s", "{:.0f}"),
]


def main() -> None:
    with open(sys.argv[1]) as f:
        b = json.load(f)["configurations"]
    with open(sys.argv[2]) as f:
        a = json.load(f)["configurations"]
    names = list(a)
    print("| | " + " | ".join(f"{n} before | {n} after" for n in names) + " |")
    print("|---" * (1 + 2 * len(names)) + "|")
    for label, key, fmt in ROWS:
        cells = []
        for n in names:
            for d in (b, a):
                v = d.get(n, {}).get(key)
                cells.append("n/a" if v is None else fmt.format(v))
        print(f"| {label} | " + " | ".join(cells) + " |")
    base_b, base_a = b["baseline"]["copies"], a["baseline"]["copies"]
    for n in names:
        if n == "baseline":
            continue
        with_migrations = a[n]["copies"] + a[n].get("gran_migrate_copies", 0)
        print(f"- {n}: baseline copies / {n} copies: before {base_b / b[n]['copies']:.1f}x, "
              f"after {base_a / a[n]['copies']:.1f}x "
              f"({base_a / with_migrations:.1f}x counting migrate copies)")


if __name__ == "__main__":
    main()
