"""Side-by-side table of two kvswitch bench JSON files (before / after)."""
import json, sys
def load(p):
    return json.load(open(p))["configurations"]
b, a = load(sys.argv[1]), load(sys.argv[2])
names = list(a)
rows = [
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
head = "| | " + " | ".join(f"{n} before | {n} after" for n in names) + " |"
print(head)
print("|---" * (1 + 2 * len(names)) + "|")
for label, key, fmt in rows:
    cells = []
    for n in names:
        for d in (b, a):
            v = d.get(n, {}).get(key)
            cells.append("n/a" if v is None else fmt.format(v))
    print(f"| {label} | " + " | ".join(cells) + " |")
base = a.get("baseline", {}).get("copies")
if base:
    for n in names:
        if n != "baseline":
            print(f"- {n}: baseline copies / {n} copies = before {b['baseline']['copies']/b[n]['copies']:.1f}x, after {base/a[n]['copies']:.1f}x; "
                  f"after incl. migrate copies {base/(a[n]['copies']+a[n].get('gran_migrate_copies',0)):.1f}x")
