"""Swap bandwidth of AsyncSwapEngine vs one large copy of the same bytes.

Llama-3-8B-shaped KV (32 layers, 8 KV heads, head dim 128, 2-byte elements, block size
16: 32 KiB per block per layer and K/V, 2 MiB per block id) in two layouts:

* per-layer: vLLM's ``[2, num_blocks, 16, 8, 128]`` per layer -> 64 regions, so every
  extent becomes 64 copies;
* cross-layer: one ``[num_blocks, 32, 2, 16, 8, 128]`` tensor -> one copy per extent.

A 2,000-token sequence (125 blocks, 250 MiB) is swapped out and in, laid out as
(a) scattered single blocks, (b) block groups of 4, 20 and 60 blocks (FastSwitch,
arXiv 2411.18424, section 3.1: larger transfer granularity). Each is compared with one
large copy of the same number of bytes in the same run (host: ``numpy.copyto`` of a
contiguous buffer; cuda: one ``cuMemcpy`` between pinned host memory and the device).
A second table gives the Python-side time of ``swap_out`` (until it returns) for a
64-extent job (paper 3.2: dispatch must not block the serving loop).

Examples::

    python benchmarks/swap_bandwidth.py --backend host --repeats 5
    python benchmarks/swap_bandwidth.py --backend cuda --pool-blocks 1024 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

import kvswitch
from kvswitch import AsyncSwapEngine, HostKVPool, KVLayout

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, ELEM = 32, 8, 128, 16, 2
SEQ_BLOCKS = 125  # 2,000 tokens
PATTERNS = {"scattered": 1, "groups of 4": 4, "groups of 20": 20, "groups of 60": 60}


@dataclass
class Row:
    layout: str
    pattern: str
    direction: str
    extents: int
    copies: int
    mib: float
    seconds: float  # median of the job's elapsed_s (copies only, measured by the engine)
    gbps: float  # bytes / seconds
    e2e_gbps: float  # bytes / median wall time from the swap call to wait() returning
    baseline_gbps: float  # one large copy of the same bytes
    ratio: float  # gbps / baseline_gbps
    e2e_ratio: float  # e2e_gbps / baseline_gbps
    call_us: float  # median time of the swap_out/swap_in call itself


@dataclass
class CallRow:
    layout: str
    mode: str  # "cold" (after a previous swap) or "burst of 32" (back-to-back calls)
    extents: int
    copies: int
    call_us_median: float
    call_us_p90: float
    call_us_min: float


def place(rng: np.random.Generator, pool_blocks: int, lengths: list[int]) -> list[int]:
    """Random non-overlapping starts for extents of `lengths` in a pool."""
    free = pool_blocks - sum(lengths)
    if free < 0:
        raise SystemExit(f"pool of {pool_blocks} blocks is too small for {sum(lengths)}")
    gaps = np.sort(rng.integers(0, free + 1, size=len(lengths)))
    order = rng.permutation(len(lengths))
    starts, pos, prev_gap = [0] * len(lengths), 0, 0
    for i, k in enumerate(order):  # extents in random address order
        pos += int(gaps[i]) - prev_gap
        prev_gap = int(gaps[i])
        starts[k] = pos
        pos += lengths[k]
    return starts


def make_pairs(rng: np.random.Generator, group: int, src_blocks: int, dst_blocks: int):
    lengths = [group] * (SEQ_BLOCKS // group)
    if SEQ_BLOCKS % group:
        lengths.append(SEQ_BLOCKS % group)
    src = place(rng, src_blocks, lengths)
    dst = place(rng, dst_blocks, lengths)
    return np.array(list(zip(src, dst, lengths, strict=True)), dtype=np.int64)


class HostSide:
    """Device pool stand-in in host memory, for the host backend."""

    def __init__(self, kind: str, pool_blocks: int):
        block = (BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        if kind == "per-layer":
            self.tensors = [np.ones((2, pool_blocks, *block), dtype=np.uint16)
                            for _ in range(LAYERS)]
            self.layout = KVLayout.from_vllm(self.tensors)
        else:
            self.tensors = [np.ones((pool_blocks, LAYERS, 2, *block), dtype=np.uint16)]
            self.layout = KVLayout.cross_layer(self.tensors[0])
        nbytes = SEQ_BLOCKS * self.layout.bytes_per_block
        self.src = np.ones(nbytes, dtype=np.uint8)
        self.dst = np.zeros(nbytes, dtype=np.uint8)

    def baseline(self, direction: str) -> float:
        t0 = time.perf_counter()
        np.copyto(self.dst, self.src)
        return time.perf_counter() - t0


class CudaSide:
    """Device pool as torch bf16 tensors; baseline is one cuMemcpy pinned <-> device."""

    def __init__(self, kind: str, pool_blocks: int):
        import torch  # benchmark-only dependency for the cuda backend

        block = (BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        if kind == "per-layer":
            self.tensors = [torch.ones((2, pool_blocks, *block), dtype=torch.bfloat16,
                                       device="cuda") for _ in range(LAYERS)]
            self.layout = KVLayout.from_vllm(self.tensors)
        else:
            self.tensors = [torch.ones((pool_blocks, LAYERS, 2, *block), dtype=torch.bfloat16,
                                       device="cuda")]
            self.layout = KVLayout.cross_layer(self.tensors[0])
        nbytes = SEQ_BLOCKS * self.layout.bytes_per_block
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        big = KVLayout.from_tensors([self.dev.view(SEQ_BLOCKS, -1)])
        self.pinned = HostKVPool(big, SEQ_BLOCKS)
        if not self.pinned.pinned:
            raise SystemExit(f"baseline buffer not pinned: {self.pinned.pin_reason}")
        self.ordinal = self.layout.device[1]
        torch.cuda.synchronize()

    def baseline(self, direction: str) -> float:
        host = self.pinned.layout.regions[0].base
        dev = self.dev.data_ptr()
        n = self.dev.numel()
        if direction == "out":
            return kvswitch._core.cuda_timed_memcpy(self.ordinal, host, dev, n)
        return kvswitch._core.cuda_timed_memcpy(self.ordinal, dev, host, n)


def run(args: argparse.Namespace) -> tuple[list[Row], list[CallRow], dict]:
    rng = np.random.default_rng(args.seed)
    rows: list[Row] = []
    calls: list[CallRow] = []
    meta: dict = {}
    for kind in args.layouts:
        side = (CudaSide if args.backend == "cuda" else HostSide)(kind, args.pool_blocks)
        pool = HostKVPool(side.layout, args.pool_blocks)
        for a in pool.arrays:  # touch every page before timing
            a.fill(0)
        backend = "host" if args.backend == "host" else "auto"
        with AsyncSwapEngine(side.layout, pool, backend=backend,
                             num_workers=args.num_workers) as eng:
            if args.backend == "cuda" and eng.backend != "cuda":
                raise SystemExit(f"cuda requested but engine chose: {eng.backend_reason}")
            meta.update(backend=eng.backend, backend_reason=eng.backend_reason,
                        pinned=pool.pinned, pin_reason=pool.pin_reason)
            nbytes = SEQ_BLOCKS * side.layout.bytes_per_block
            for pattern, group in PATTERNS.items():
                for direction in ("out", "in"):
                    src_n = dst_n = args.pool_blocks
                    pairs = make_pairs(rng, group, src_n, dst_n)
                    swap = eng.swap_out if direction == "out" else eng.swap_in
                    walls, copies, call_ns, base = [], [], [], []
                    for r in range(args.repeats + 1):
                        t0 = time.perf_counter_ns()
                        h = swap(pairs)
                        t1 = time.perf_counter_ns()
                        h.wait()
                        t2 = time.perf_counter_ns()
                        b = side.baseline(direction)
                        if r == 0:
                            continue  # warm-up
                        walls.append((t2 - t0) * 1e-9)
                        copies.append(h.elapsed_s)
                        call_ns.append(t1 - t0)
                        base.append(b)
                    sec = statistics.median(copies)
                    gbps = nbytes / sec / 1e9
                    e2e = nbytes / statistics.median(walls) / 1e9
                    base_gbps = nbytes / statistics.median(base) / 1e9
                    rows.append(Row(kind, pattern, direction, len(pairs), h.num_copies,
                                    nbytes / 2**20, sec, gbps, e2e, base_gbps,
                                    gbps / base_gbps, e2e / base_gbps,
                                    statistics.median(call_ns) / 1e3))
                    print(f"  {kind:11s} {pattern:13s} {direction:3s} {gbps:6.2f} GB/s "
                          f"(large copy {base_gbps:6.2f})", file=sys.stderr)
            # Python-side time of a 64-extent swap_out call (until it returns), with the
            # workers held by the engine's test hook so that no copy competes with the
            # caller for a CPU core: the figure is the call's own cost.
            #   cold:  right after a previous 64-extent swap finished (its copies have
            #          flushed the CPU caches; the worst case);
            #   burst: 32 calls back to back (a scheduler iteration issuing several swaps;
            #          later calls also check conflicts against the queued ones).
            pairs = make_pairs(rng, 1, args.pool_blocks, args.pool_blocks)[:64]
            cold, burst = [], []
            for r in range(args.call_repeats + 5):
                eng._engine._set_paused(True)
                t0 = time.perf_counter_ns()
                h = eng.swap_out(pairs)
                t1 = time.perf_counter_ns()
                eng._engine._set_paused(False)
                h.wait()
                if r >= 5:
                    cold.append((t1 - t0) / 1e3)
            for _ in range(max(1, args.call_repeats // 32)):
                eng._engine._set_paused(True)
                hs = []
                for _ in range(32):
                    t0 = time.perf_counter_ns()
                    hs.append(eng.swap_out(pairs))
                    burst.append((time.perf_counter_ns() - t0) / 1e3)
                eng._engine._set_paused(False)
                eng.synchronize()
            for mode, samples in (("cold", cold), ("burst of 32", burst)):
                samples.sort()
                calls.append(CallRow(kind, mode, len(pairs), h.num_copies,
                                     statistics.median(samples),
                                     samples[int(0.9 * (len(samples) - 1))], samples[0]))
        del side, pool
    return rows, calls, meta


def table(rows: list[Row], calls: list[CallRow]) -> str:
    out = ["| layout | pattern | dir | extents | copies/swap | MiB | copy GB/s | end-to-end "
           "GB/s | large copy GB/s | ratio (copy) | ratio (end-to-end) | swap call (us) |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.layout} | {r.pattern} | {r.direction} | {r.extents} | {r.copies} | "
                   f"{r.mib:.0f} | {r.gbps:.2f} | {r.e2e_gbps:.2f} | {r.baseline_gbps:.2f} | "
                   f"{r.ratio:.2f} | {r.e2e_ratio:.2f} | {r.call_us:.1f} |")
    out += ["", "| layout | mode | extents | copies | swap_out call median (us) | p90 (us) "
            "| min (us) |", "|---|---|---:|---:|---:|---:|---:|"]
    for c in calls:
        out.append(f"| {c.layout} | {c.mode} | {c.extents} | {c.copies} | "
                   f"{c.call_us_median:.1f} | {c.call_us_p90:.1f} | {c.call_us_min:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["host", "cuda", "auto"], default="auto",
                    help="auto: cuda when torch sees a GPU, else host")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per case (median)")
    ap.add_argument("--call-repeats", type=int, default=200,
                    help="repeats of the 64-extent swap_out call-latency probe")
    ap.add_argument("--pool-blocks", type=int, default=512,
                    help="blocks of the device pool and of the host pool (2 MiB each)")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--layouts", nargs="+", default=["per-layer", "cross-layer"],
                    choices=["per-layer", "cross-layer"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.backend == "auto":
        try:
            import torch

            args.backend = "cuda" if torch.cuda.is_available() else "host"
        except ImportError:
            args.backend = "host"
    if args.pool_blocks < SEQ_BLOCKS:
        ap.error(f"--pool-blocks must be >= {SEQ_BLOCKS}")
    rows, calls, meta = run(args)
    print(f"backend: {meta['backend']} ({meta['backend_reason']})")
    print(f"host pool: {'pinned' if meta['pinned'] else 'not pinned'} ({meta['pin_reason']})")
    print(f"python {platform.python_version()}, kvswitch {kvswitch.__version__}, "
          f"pool {args.pool_blocks} blocks x 2 MiB, repeats {args.repeats}, "
          f"workers {args.num_workers}")
    print(table(rows, calls))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "meta": meta, "rows": [asdict(r) for r in rows],
                       "calls": [asdict(c) for c in calls]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
