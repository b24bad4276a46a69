"""The figures ``kvswitch bench --engine vllm`` prints and writes: one dict per
configuration (JSON-ready), the rows of its table, and its comparison line.

The table is the main bench's (``kvswitch.cli.format_table``) with these rows. Every time
is on the virtual clock: compute from the cost model, transfers from the link model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from kvswitch.bench.vllm.serve import VllmServeResult

__all__ = ["PAIRS", "ROWS", "compare", "summarize"]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(result: VllmServeResult, layer_tensors: int) -> dict[str, float]:
    """The figures of one configuration's run.

    Args:
        result: the run.
        layer_tensors: KV tensors a block spans (one copy per extent and tensor), for
            the mean blocks per copy.
    """
    t = result.transfers
    moved = t.store_blocks + t.load_blocks
    return {
        "stores": t.stores,
        "store_blocks": t.store_blocks,
        "loads": t.loads,
        "load_blocks": t.load_blocks,
        "copies": t.copies,
        "blocks_per_copy": moved * layer_tensors / t.copies if t.copies else 0.0,
        "preset_bytes_moved": t.preset_bytes,
        "executed_bytes_moved": t.executed_bytes,
        "link_s": t.link_s,
        "stall_s": result.stall_s,
        "ttft_p50_s": _pct(result.ttft_s, 50),
        "ttft_p95_s": _pct(result.ttft_s, 95),
        "ttft_p99_s": _pct(result.ttft_s, 99),
        "ttft_p999_s": _pct(result.ttft_s, 99.9),
        "tbt_p50_s": _pct(result.tbt_s, 50),
        "tbt_p99_s": _pct(result.tbt_s, 99),
        "tbt_p999_s": _pct(result.tbt_s, 99.9),
        "throughput_tok_s": result.tokens / result.makespan_s if result.makespan_s else 0.0,
        "tokens": result.tokens,
        "makespan_s": result.makespan_s,
        "iterations": result.iterations,
        "preemptions": result.preemptions,
        "recomputed_tokens": result.recomputed_tokens,
        "prefill_tokens": result.prefill_tokens,
        "gpu_prefix_hits": result.gpu_prefix_hits,
        "gpu_prefix_queries": result.gpu_prefix_queries,
        "cpu_prefix_hits": result.cpu_prefix_hits,
        "cpu_prefix_queries": result.cpu_prefix_queries,
        "turns": result.turns,
        "turns_served": result.turns_served,
        "failed_requests": result.failed_requests,
        "loads_checked": t.loads_checked,
        "blocks_checked": t.blocks_checked,
        "failed_loads": t.failed_loads,
        "contexts_checked": result.contexts_checked,
        "context_tokens_checked": result.context_tokens_checked,
        "wall_s": result.wall_s,
    }


#: (label, key, format) of the table (formats as in ``kvswitch.cli``; "srv", "hit" and
#: "chk" are pairs).
ROWS = [
    ("stores, GPU -> CPU (jobs)", "stores", "{:,.0f}"),
    ("  blocks stored", "store_blocks", "{:,.0f}"),
    ("loads, CPU -> GPU (jobs)", "loads", "{:,.0f}"),
    ("  blocks loaded", "load_blocks", "{:,.0f}"),
    ("copies issued", "copies", "{:,.0f}"),
    ("mean blocks per copy", "blocks_per_copy", "{:,.2f}"),
    ("KV moved, preset bytes (GiB)", "preset_bytes_moved", "gib"),
    ("transfer time (s, link model)", "link_s", "{:,.2f}"),
    ("stall on transfers (s)", "stall_s", "{:,.3f}"),
    ("TTFT P50 (s)", "ttft_p50_s", "{:,.3f}"),
    ("TTFT P95 (s)", "ttft_p95_s", "{:,.3f}"),
    ("TTFT P99 (s)", "ttft_p99_s", "{:,.3f}"),
    ("TTFT P99.9 (s)", "ttft_p999_s", "{:,.3f}"),
    ("TBT P50 (s)", "tbt_p50_s", "{:,.4f}"),
    ("TBT P99 (s)", "tbt_p99_s", "{:,.4f}"),
    ("TBT P99.9 (s)", "tbt_p999_s", "{:,.4f}"),
    ("throughput (tokens/s)", "throughput_tok_s", "{:,.0f}"),
    ("preemptions (vLLM: pool full)", "preemptions", "{:,.0f}"),
    ("recomputed tokens", "recomputed_tokens", "{:,.0f}"),
    ("prefix hits, tokens (GPU / CPU cache)", "hits", "hit"),
    ("turns served / of", "turns", "srv"),
    ("failed requests (vLLM failure path)", "failed_requests", "{:,.0f}"),
    ("loads checked / blocks checked", "loads_checked", "chk"),
    ("contexts checked", "contexts_checked", "{:,.0f}"),
    ("wall time (s)", "wall_s", "{:,.1f}"),
]

#: The pairs of [`ROWS`][] (for ``kvswitch.cli._PAIRS``).
PAIRS = {"srv": ("turns_served", "turns"),
         "hit": ("gpu_prefix_hits", "cpu_prefix_hits"),
         "chk": ("loads_checked", "blocks_checked")}


def compare(figures: dict[str, dict[str, float]]) -> list[str]:
    """One line per offloading configuration against vLLM as shipped and its native
    offloading: copies, TTFT P99, TBT P99.9, throughput."""
    def ratio(x: float, y: float) -> str:
        return f"{x / y:.2f}x" if y and math.isfinite(x / y) else "n/a"

    lines = []
    for name, f in figures.items():
        bases = [b for b in ("vllm+cpu", "vllm") if b in figures and b != name
                 and not (name == "vllm" or (name == "vllm+cpu" and b != "vllm"))]
        for base in bases:
            b = figures[base]
            copies = f"{ratio(f['copies'], b['copies'])} the copies; " if b["copies"] else ""
            lines.append(
                f"{name} vs {base}: {copies}TTFT P99 {ratio(f['ttft_p99_s'], b['ttft_p99_s'])}, "
                f"TBT P99.9 {ratio(f['tbt_p999_s'], b['tbt_p999_s'])}, throughput "
                f"{ratio(f['throughput_tok_s'], b['throughput_tok_s'])}.")
    return lines
