#!/usr/bin/env python3
"""GPU campaign: prove kvswitch's cuda backend and measure the paper's claims, in one command.

On a GPU machine (no network needed), from a fresh copy of the repository, in one 600 s
command (docs/benchmarks.md gives it whole: versions first, the build's log to /tmp)::

    python3 -m pip install --no-build-isolation --no-deps . > /tmp/kvswitch_build.log 2>&1 \
        && python3 benchmarks/gpu_campaign.py --out $OUT

writes ``$OUT/campaign.json`` (everything, raw per-repetition times included) and
``$OUT/campaign.md`` (tables) after every step, and prints the Markdown last; at most 7
files in ``$OUT`` (logs of tests/cuda and of the bench CLI beside them; scratch files go
to a temporary folder). The first line printed gives the versions. Steps, in order, each
skipped when the time budget (``--budget-s``, 330 s: the build plus the run fit 600 s) is
spent; a watchdog ends a hung run 30 s after the budget with its outputs written:

1. environment: GPU, driver, PCIe link (nvidia-smi and sysfs), NUMA node of the GPU (the
   run re-executes itself under ``numactl --cpunodebind=N --membind=N`` once when numactl
   exists), versions, date, host;
2. tests: ``pytest tests/cuda`` in a subprocess (each scenario in a subprocess of its own,
   so a hang fails a test); without pytest, the scenarios of tests/cuda/scenarios.py alone;
3. ceiling: one large pinned ``cuMemcpyAsync`` per direction and both at once;
4. Llama-3-8B blocks (16 tokens x 8 KV heads x 128 x bf16 = 32 KiB per block and region,
   64 regions): per-copy ``cuMemcpyAsync`` vs one ``cuMemcpyBatchAsync`` per job, and at
   extents of 20 blocks or more vLLM's per-block loop over the same bytes;
5. AsyncSwapEngine with 1/2/4 workers, extents of 1/4/20/60 blocks, each direction;
6. migrate: ``engine.migrate`` (device -> device) at extents of 1 and 20 blocks, and
   torch's SM-kernel copy of the same moves for reference;
7. both directions at once (engine); 8. ``swap_out`` call time for a 64-extent job;
9. swaps during bf16 8192^3 GEMMs; 10. pageable host pool (control);
11. ``kvswitch bench --backend cuda`` (a short synthetic trace, baseline and full);
12. targets (pass/fail) against the measurements, the paper's claims among them: group
    swaps vs one large copy (the ceiling) and vs the per-block loop over the same bytes,
    migration vs PCIe, both directions, GEMM overlap.

``--dry-run`` runs every step end to end without a GPU at toy sizes (torch CPU tensors as
device memory, the fake driver of tests/fake_cuda as libcuda.so.1 in CI), in about 40 s.

Every copy mode's bytes are checked once (destination poisoned, compared with the source)
so that a fast wrong copy cannot pass. GB = 1e9 bytes; GPU times come from CUDA events,
CPU times from perf_counter_ns / steady_clock. Nothing here is modelled.

Sources: FastSwitch (arXiv 2411.18424) sections 3.1 (transfer granularity, dispatch
overhead), 3.2 (asynchronous swaps beside compute) and 4.3 (Figure 10, coarse-grained
context switching up to 3.11x faster); CUDA Driver API reference (cuMemcpyAsync,
cuMemcpyBatchAsync, events).

Functions that need neither torch nor a GPU (parsing, placement, copy lists, the
measurement drivers given pools, targets, Markdown/JSON) are importable anywhere and are
tested on the CPU (tests/test_gpu_campaign_smoke.py, with a fake libcuda.so.1).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
GIB = 1 << 30
NUMA_GUARD = "KVSWITCH_CAMPAIGN_NUMA"  # set in the re-executed child
#: torch device of the pools and buffers. The CPU smoke test sets "cpu" and relabels the
#: layouts as device 0 (device_layout) to run these steps against a fake libcuda.so.1.
DEVICE = "cuda:0"


def device_layout(layout: Any) -> Any:
    """The layout of tensors on DEVICE as kvswitch sees it (identity on a GPU)."""
    return layout


def torch_sync() -> None:
    """torch.cuda.synchronize() where DEVICE is a GPU."""
    if DEVICE.startswith("cuda"):
        import torch

        torch.cuda.synchronize()

# Targets of the issue (on H100/H200), checked in `evaluate_targets`.
TARGET_GROUP_OF_CEILING = 0.95  # extents >= 20 blocks: >= 95% of one large copy
# The paper's claim on granularity: group swaps (extents >= 20 blocks) against vLLM's
# per-block copies of the same bytes. FastSwitch section 4.3 (Figure 10): "up to 3.11x
# context switching speedup"; at extent 1 both sides issue the same copies (batching only
# removes submit cost), so that row is informational.
TARGET_ENGINE_VS_LOOP = 3.0
# Compaction moves blocks device -> device: docs/design.md claims "at HBM bandwidth, tens
# of times PCIe's"; measured: migrate GB/s at 20-block extents over the PCIe ceiling.
TARGET_MIGRATE_VS_PCIE = 10.0
TARGET_BIDIR = 1.6  # both directions at once >= 1.6x one direction
TARGET_SWAP_OUT_CALL_US = 20.0  # swap_out of a 64-extent job returns in <= 20 us (p50)
TARGET_GEMM_SLOWDOWN = 0.05  # GEMM slowdown while swapping <= 5%


@dataclass(frozen=True)
class Geometry:
    """Sizes of the Llama-3-8B KV pools and of the swap jobs (bytes derived from these)."""

    layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16  # tokens per block
    elem_bytes: int = 2  # bf16
    pool_blocks: int = 2048  # device pool and host pool, blocks (2 MiB each: 4 GiB)
    seq_blocks: int = 120  # blocks per job (1,920 tokens); divisible by every extent
    jobs: int = 8  # jobs per engine round
    extents: tuple[int, ...] = (1, 4, 20, 60)
    workers: tuple[int, ...] = (1, 2, 4)

    @property
    def region_block_bytes(self) -> int:
        """Bytes of one block in one region (one layer's K or V): 32 KiB for Llama-3-8B."""
        return self.block_size * self.kv_heads * self.head_dim * self.elem_bytes

    @property
    def num_regions(self) -> int:
        return 2 * self.layers

    @property
    def block_bytes(self) -> int:
        """Bytes one block id stands for (all regions): 2 MiB for Llama-3-8B."""
        return self.region_block_bytes * self.num_regions


# =============================================================================== helpers

def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


def gbps(nbytes: float, seconds: float) -> float:
    """GB/s with GB = 1e9 bytes; nan for a non-positive time."""
    return nbytes / seconds / GB if seconds and seconds > 0 else float("nan")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def place_extents(rng: np.random.Generator, pool_blocks: int, length: int,
                  count: int) -> np.ndarray:
    """Start ids of ``count`` extents of ``length`` blocks in a pool, in random order, with
    at least one free block between any two, so that no two extents are adjacent (an
    engine could not merge them). Raises ValueError when the pool is too small."""
    slots = pool_blocks // (length + 1)
    if count > slots:
        raise ValueError(f"a pool of {pool_blocks} blocks holds {slots} non-adjacent extents "
                         f"of {length} blocks, {count} requested")
    chosen = rng.choice(slots, size=count, replace=False)
    return (chosen * (length + 1)).astype(np.int64)


def make_jobs(rng: np.random.Generator, src_blocks: int, dst_blocks: int, length: int,
              jobs: int, seq_blocks: int) -> list[np.ndarray]:
    """``jobs`` pair arrays ``[n, 3]`` (src_start, dst_start, length) of ``seq_blocks``
    blocks each in extents of ``length`` blocks, scattered (non-adjacent) over both pools;
    no two extents of all jobs share a block on either side."""
    per_job = -(-seq_blocks // length)
    src = place_extents(rng, src_blocks, length, per_job * jobs)
    dst = place_extents(rng, dst_blocks, length, per_job * jobs)
    out = []
    for j in range(jobs):
        s = src[j * per_job:(j + 1) * per_job]
        d = dst[j * per_job:(j + 1) * per_job]
        out.append(np.stack([s, d, np.full_like(s, length)], axis=1))
    return out


def expand(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block ids (src, dst) that pairs (src_start, dst_start, length) cover, in order."""
    src = np.concatenate([np.arange(s, s + n) for s, _, n in pairs]).astype(np.int64)
    dst = np.concatenate([np.arange(d, d + n) for _, d, n in pairs]).astype(np.int64)
    return src, dst


def copy_list(src_layout: Any, dst_layout: Any, pairs: np.ndarray, *, per_block: bool = False
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dst, src, sizes) uint64 arrays of the linear copies a swap of ``pairs`` needs:
    per extent and region one copy of ``length * block_bytes`` where both regions are
    contiguous, else one copy per block (no 2D copies: the raw timing helper issues linear
    copies only). ``per_block``: one copy per block and region whatever the extents (vLLM's
    swap loop over the same bytes). Extent-major, region-minor (the engine's order)."""
    dsts, srcs, sizes = [], [], []
    regions = list(zip(src_layout.regions, dst_layout.regions, strict=True))
    for s, d, n in pairs:
        for rs, rd in regions:
            bb = rs.block_bytes
            if rs.block_stride == bb and rd.block_stride == bb and not per_block:
                srcs.append(rs.base + int(s) * rs.block_stride)
                dsts.append(rd.base + int(d) * rd.block_stride)
                sizes.append(int(n) * bb)
            else:
                for k in range(int(n)):
                    srcs.append(rs.base + (int(s) + k) * rs.block_stride)
                    dsts.append(rd.base + (int(d) + k) * rd.block_stride)
                    sizes.append(bb)
    as64 = lambda v: np.asarray(v, dtype=np.uint64)  # noqa: E731
    return as64(dsts), as64(srcs), as64(sizes)


# ------------------------------------------------------------------------- pools

class NumpyRegions:
    """Device regions given as NumPy arrays ``[blocks, ...]`` (the fake driver, tests)."""

    def __init__(self, arrays: Sequence[np.ndarray]):
        self.arrays = [a.view(np.uint16) if a.dtype.itemsize == 2 else a for a in arrays]

    def read(self, r: int, ids: np.ndarray) -> np.ndarray:
        return self.arrays[r][ids]

    def poison(self, r: int, ids: np.ndarray) -> None:
        self.arrays[r][ids] = 0x5A5A if self.arrays[r].dtype == np.uint16 else 0x5A

    def synchronize(self) -> None:
        pass


class TorchRegions:
    """Device regions as torch CUDA tensors ``[blocks, ...]`` (compared bitwise as int16)."""

    def __init__(self, tensors: Sequence[Any]):
        import torch

        self.torch = torch
        self.t = [x.view(torch.int16) for x in tensors]

    def _idx(self, r: int, ids: np.ndarray):
        return self.torch.as_tensor(ids, dtype=self.torch.int64, device=self.t[r].device)

    def read(self, r: int, ids: np.ndarray) -> np.ndarray:
        return self.t[r].index_select(0, self._idx(r, ids)).cpu().numpy().view(np.uint16)

    def poison(self, r: int, ids: np.ndarray) -> None:
        self.t[r].index_fill_(0, self._idx(r, ids), 0x5A5A)

    def synchronize(self) -> None:
        torch_sync()


@dataclass
class Pools:
    """A device pool (layout + region accessor) and a host pool of the same shape."""

    layout: Any  # kvswitch.KVLayout on ("cuda", ordinal)
    host: Any  # kvswitch.HostKVPool
    dev: Any  # NumpyRegions or TorchRegions, one entry per region
    ordinal: int = 0
    keep: list = field(default_factory=list)  # tensors owning the memory


def host_arrays(host: Any) -> list[np.ndarray]:
    return [a.view(np.uint16) if a.dtype.itemsize == 2 else a for a in host.arrays]


def poison(direction: str, pools: Pools, pairs: np.ndarray) -> None:
    """Overwrite the destination blocks of a swap so that a copy that did not happen (or
    went elsewhere) shows as wrong bytes."""
    _, dst = expand(pairs)
    if direction == "out":
        for a in host_arrays(pools.host):
            a[dst] = 0xA5A5 if a.dtype == np.uint16 else 0xA5
    else:
        for r in range(pools.layout.num_regions):
            pools.dev.poison(r, dst)
        pools.dev.synchronize()


def verify(direction: str, pools: Pools, pairs: np.ndarray,
           regions: Sequence[int] | None = None) -> str:
    """'' when the destination blocks of ``pairs`` equal their sources in ``regions`` (all
    by default), else what differs."""
    pools.dev.synchronize()
    src, dst = expand(pairs)
    hosts = host_arrays(pools.host)
    for r in regions if regions is not None else range(pools.layout.num_regions):
        if direction == "out":
            got, want = hosts[r][dst], pools.dev.read(r, src)
        else:
            got, want = pools.dev.read(r, dst), hosts[r][src]
        if not np.array_equal(got, want):
            bad = int(np.count_nonzero(np.any((got != want).reshape(len(dst), -1), axis=1)))
            return f"region {r}: {bad} of {len(dst)} blocks differ"
    return ""


def sample_regions(num_regions: int, rng: np.random.Generator, k: int = 8) -> list[int]:
    """First, last and random regions: enough to catch a wrong address computation."""
    if num_regions <= k:
        return list(range(num_regions))
    rest = rng.choice(np.arange(1, num_regions - 1), size=k - 2, replace=False)
    return sorted({0, num_regions - 1, *map(int, rest)})


def _before_wait_supported() -> bool:
    from kvswitch import AsyncSwapEngine

    return "before_wait" in inspect.signature(AsyncSwapEngine.__init__).parameters


def new_engine(pools: Pools, workers: int, **kw: Any) -> Any:
    from kvswitch import AsyncSwapEngine

    eng = AsyncSwapEngine(pools.layout, pools.host, backend="cuda", num_workers=workers,
                          max_queue=kw.pop("max_queue", 4096), **kw)
    if eng.backend != "cuda":
        raise RuntimeError(f"the engine is not on the cuda backend: {eng.backend_reason}")
    return eng


def _stats(eng: Any) -> dict[str, Any]:
    return {k: v for k, v in eng.stats().items() if k != "copy_size_histogram"}


# ============================================================== measurement drivers

def raw_case(pools: Pools, pairs: np.ndarray, direction: str, api: str, *, warmup: int,
             repeats: int, check: bool, per_block: bool = False) -> dict[str, Any]:
    """One copy list (the copies a swap of ``pairs`` needs, or with ``per_block`` one copy
    per block and region) timed by the C++ helper."""
    from kvswitch import _core

    src_l, dst_l = ((pools.layout, pools.host.layout) if direction == "out"
                    else (pools.host.layout, pools.layout))
    dst, src, sizes = copy_list(src_l, dst_l, pairs, per_block=per_block)
    row: dict[str, Any] = {"direction": direction, "api": api, "extent": int(pairs[0, 2]),
                           "extents": len(pairs), "per_block": per_block}
    if check:
        poison(direction, pools, pairs)
        _core.cuda_copy_bench(pools.ordinal, dst, src, sizes, direction, api, 0, 1)
        row["verify"] = verify(direction, pools, pairs) or "ok"
    t = _core.cuda_copy_bench(pools.ordinal, dst, src, sizes, direction, api, warmup, repeats)
    g, sub = median(t["gpu_s"]), median(t["submit_s"])
    row.update(copies=t["copies"], bytes=t["bytes"], api_name=t["api"], gpu_s=t["gpu_s"],
               submit_s=t["submit_s"], gbps_gpu=gbps(t["bytes"], g),
               submit_us_per_copy=sub / t["copies"] * 1e6, gbps_submit=gbps(t["bytes"], sub))
    return row


def engine_round(eng: Any, jobs: Sequence[np.ndarray] | Sequence[tuple[str, np.ndarray]],
                 direction: str | None = None) -> dict[str, Any]:
    """Submit ``jobs`` back to back, then synchronize. Jobs are pair arrays in
    ``direction`` or (direction, pairs) tuples. Returns bytes, wall seconds (first submit
    to synchronize returning), per-call seconds, per-job device seconds and bytes, and the
    engine's busy seconds for the round where it reports them."""
    items = [(direction, j) if direction else j for j in jobs]
    before = eng.stats()
    handles, calls = [], []
    t0 = time.perf_counter_ns()
    for d, pairs in items:
        c0 = time.perf_counter_ns()
        handles.append(eng.swap_out(pairs) if d == "out" else eng.swap_in(pairs))
        calls.append((time.perf_counter_ns() - c0) * 1e-9)
    eng.synchronize()
    wall = (time.perf_counter_ns() - t0) * 1e-9
    for h in handles:
        h.wait()  # raises SwapError for a failed job
    after = eng.stats()
    busy = (after["busy_s"] - before["busy_s"]) if "busy_s" in after else None
    return {"bytes": sum(h.nbytes for h in handles), "wall_s": wall, "call_s": calls,
            "job_s": [h.elapsed_s for h in handles], "job_bytes": [h.nbytes for h in handles],
            "busy_s": busy}


def engine_case(eng: Any, jobs: Sequence[np.ndarray], direction: str, *, rounds: int,
                warmup: int, pools: Pools | None = None,
                regions: Sequence[int] | None = None) -> dict[str, Any]:
    """``warmup`` + ``rounds`` rounds of ``jobs``; with ``pools``, a first round whose
    destinations were poisoned is verified (in ``regions``)."""
    row: dict[str, Any] = {"direction": direction, "extent": int(jobs[0][0, 2]),
                           "jobs": len(jobs), "workers": eng.num_workers}
    if pools is not None:
        allp = np.concatenate(jobs)
        poison(direction, pools, allp)
        engine_round(eng, jobs, direction)
        row["verify"] = verify(direction, pools, allp, regions) or "ok"
    for _ in range(warmup):
        engine_round(eng, jobs, direction)
    rs = [engine_round(eng, jobs, direction) for _ in range(rounds)]
    nbytes = rs[0]["bytes"]
    job_gbps = [b / s / GB for r in rs for b, s in zip(r["job_bytes"], r["job_s"], strict=True)
                if s]
    busy = [r["busy_s"] for r in rs if r["busy_s"]]
    row.update(bytes=nbytes, wall_s=[r["wall_s"] for r in rs],
               gbps_wall=gbps(nbytes, median([r["wall_s"] for r in rs])),
               gbps_busy=gbps(nbytes, median(busy)) if busy else None,
               gbps_job=median(job_gbps),
               call_us_p50=median([c for r in rs for c in r["call_s"]]) * 1e6)
    return row


def bidirectional_case(eng: Any, out_jobs: Sequence[np.ndarray], in_jobs: Sequence[np.ndarray],
                       *, rounds: int, warmup: int, pools: Pools | None = None,
                       regions: Sequence[int] | None = None) -> dict[str, Any]:
    """Swap-outs and swap-ins over disjoint blocks, interleaved in one round, against each
    direction alone in the same run. ratio = both-at-once GB/s / the faster single one."""
    both = [x for pair in zip([("out", j) for j in out_jobs], [("in", j) for j in in_jobs],
                              strict=True) for x in pair]
    row: dict[str, Any] = {"extent": int(out_jobs[0][0, 2]), "workers": eng.num_workers,
                           "jobs_per_direction": len(out_jobs)}
    if pools is not None:
        for d, js in (("out", out_jobs), ("in", in_jobs)):
            poison(d, pools, np.concatenate(js))
        engine_round(eng, both)
        bad = [verify(d, pools, np.concatenate(js), regions)
               for d, js in (("out", out_jobs), ("in", in_jobs))]
        row["verify"] = "; ".join(b for b in bad if b) or "ok"
    res: dict[str, list[float]] = {"out": [], "in": [], "both": []}
    nbytes: dict[str, int] = {}
    for i in range(warmup + rounds):
        for key, items in (("out", [("out", j) for j in out_jobs]),
                           ("in", [("in", j) for j in in_jobs]), ("both", both)):
            r = engine_round(eng, items)
            nbytes[key] = r["bytes"]
            if i >= warmup:
                res[key].append(r["wall_s"])
    g = {k: gbps(nbytes[k], median(v)) for k, v in res.items()}
    row.update(gbps_out=g["out"], gbps_in=g["in"], gbps_both=g["both"],
               ratio=g["both"] / max(g["out"], g["in"]), wall_s=res, bytes=nbytes)
    return row


def migrate_jobs(rng: np.random.Generator, pool_blocks: int, length: int, jobs: int,
                 seq_blocks: int) -> list[np.ndarray]:
    """``jobs`` migration pair arrays ``[n, 3]`` (src_start, dst_start, length) of
    ``seq_blocks`` blocks each within one device pool, in extents of ``length`` blocks:
    sources and destinations scattered, non-adjacent, and no source extent overlapping any
    destination extent (a migration must not read a block it writes)."""
    per_job = -(-seq_blocks // length)
    starts = place_extents(rng, pool_blocks, length, 2 * per_job * jobs)
    src, dst = starts[:per_job * jobs], starts[per_job * jobs:]
    return [np.stack([src[j * per_job:(j + 1) * per_job], dst[j * per_job:(j + 1) * per_job],
                      np.full(per_job, length, np.int64)], axis=1) for j in range(jobs)]


def migrate_case(eng: Any, jobs: Sequence[np.ndarray], *, rounds: int, warmup: int,
                 pools: Pools | None = None,
                 regions: Sequence[int] | None = None) -> dict[str, Any]:
    """``engine.migrate`` of ``jobs`` (device -> device) submitted back to back, then
    synchronize; ``warmup`` + ``rounds`` rounds. GB/s counts the bytes moved once (HBM
    traffic is twice that: each byte is read and written). With ``pools``, a first round
    whose destinations were poisoned is verified against the sources (in ``regions``)."""
    row: dict[str, Any] = {"what": "engine.migrate", "extent": int(jobs[0][0, 2]),
                           "jobs": len(jobs), "workers": eng.num_workers}
    if pools is not None:
        src, dst = expand(np.concatenate(jobs))
        regs = list(regions) if regions is not None else range(pools.layout.num_regions)
        want = {r: pools.dev.read(r, src) for r in regs}
        for r in regs:
            pools.dev.poison(r, dst)
        pools.dev.synchronize()
        for h in [eng.migrate(j) for j in jobs]:
            h.wait()
        pools.dev.synchronize()
        bad = [r for r in regs if not np.array_equal(pools.dev.read(r, dst), want[r])]
        row["verify"] = f"regions {bad} differ" if bad else "ok"
    walls, job_gbps, nbytes = [], [], 0
    for i in range(warmup + rounds):
        t0 = time.perf_counter_ns()
        handles = [eng.migrate(j) for j in jobs]
        eng.synchronize()
        wall = (time.perf_counter_ns() - t0) * 1e-9
        for h in handles:
            h.wait()  # raises SwapError for a failed job
        nbytes = sum(h.nbytes for h in handles)
        if i >= warmup:
            walls.append(wall)
            job_gbps += [gbps(h.nbytes, h.elapsed_s) for h in handles if h.elapsed_s]
    row.update(bytes=nbytes, wall_s=walls, gbps_wall=gbps(nbytes, median(walls)),
               gbps_job=median(job_gbps))
    return row


def kernel_copy_case(pools: Pools, pairs: np.ndarray, *, rounds: int) -> dict[str, Any]:
    """Reference for a migration: the same block moves as one gather and one scatter per
    region with torch (``index_copy_`` of ``index_select``: SM kernels, not the copy
    engines), on the current stream, timed with torch.cuda events (median of ``rounds``
    after one warm-up)."""
    import torch

    src, dst = expand(pairs)
    tensors = pools.dev.t
    si = torch.as_tensor(src, dtype=torch.int64, device=tensors[0].device)
    di = torch.as_tensor(dst, dtype=torch.int64, device=tensors[0].device)
    seconds = []
    for i in range(1 + rounds):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        for t in tensors:
            t.index_copy_(0, di, t.index_select(0, si))
        e1.record()
        e1.synchronize()
        if i:
            seconds.append(e0.elapsed_time(e1) / 1e3)
    nbytes = len(src) * sum(r.block_bytes for r in pools.layout.regions)
    return {"what": "torch index_copy_ (SM kernels)", "extent": int(pairs[0, 2]),
            "bytes": nbytes, "wall_s": seconds, "gbps_wall": gbps(nbytes, median(seconds))}


def call_latency(eng: Any, pairs: np.ndarray, *, n: int, hold: bool,
                 direction: str = "out", before: Any = None,
                 after_call: Callable[[], None] | None = None) -> dict[str, Any]:
    """Seconds for swap_out/swap_in(pairs) to return, ``n`` calls, each job finished
    before the next call (a serving loop issuing one swap per iteration). ``hold``: the
    workers are held (engine test hook) while the call runs, so only the call is measured."""
    can_hold = hold and hasattr(eng._engine, "_set_paused")
    samples = []
    for _ in range(n):
        if can_hold:
            eng._engine._set_paused(True)
        t0 = time.perf_counter_ns()
        if direction == "out":
            h = eng.swap_out(pairs)
        else:
            h = eng.swap_in(pairs, before=before) if before is not None else eng.swap_in(pairs)
        samples.append((time.perf_counter_ns() - t0) * 1e-9)
        if can_hold:
            eng._engine._set_paused(False)
        h.wait()
        if after_call:
            after_call()
    us = np.asarray(samples) * 1e6
    return {"direction": direction, "extents": len(pairs), "copies": h.num_copies,
            "held": can_hold, "n": n, "p50_us": pct(us, 50), "p90_us": pct(us, 90),
            "min_us": float(us.min())}


# ================================================================= targets & output

@dataclass
class Target:
    name: str
    threshold: str
    measured: str
    passed: bool | None  # None: not measured (or informational)
    detail: str = ""
    informational: bool = False  # a figure shown beside the targets, no threshold


def evaluate_targets(results: dict[str, Any]) -> list[Target]:
    """The targets against this run's measurements (all measured, none modelled).

    * group swaps: per direction, the engine's end-to-end GB/s (best worker count) at
      each extent of 20 blocks or more, the worse one, over the one-large-copy ceiling;
    * engine vs loop (the paper's granularity claim): per direction, the engine (best
      worker count) at each extent of 20 blocks or more over the per-block
      cuMemcpyAsync loop over the same blocks (GPU time), the worse one; at single-block
      extents (the same copies on both sides) an informational row;
    * migration: engine.migrate at 20-block extents over the PCIe ceiling (the worse
      direction);
    * both directions: engine both at once over the faster direction alone (largest
      extent, most workers);
    * swap_out call: p50 for a 64-extent job, workers running (not held);
    * GEMM slowdown while swapping.
    """
    out: list[Target] = []
    ceiling = results.get("ceiling", {})
    engine = results.get("engine", {}).get("rows", [])
    raw = results.get("raw_api", {}).get("rows", [])
    coarse = sorted({r["extent"] for r in engine if r["extent"] >= 20})

    def best(direction: str, extent: int) -> float | None:
        xs = [r["gbps_wall"] for r in engine if r["direction"] == direction
              and r["extent"] == extent and _finite(r.get("gbps_wall"))]
        return max(xs) if xs else None

    def loop(direction: str, extent: int) -> float | None:
        """GB/s of one cuMemcpyAsync per block and region over that extent's job."""
        xs = [r["gbps_gpu"] for r in raw if r["direction"] == direction and r["api"] == "memcpy"
              and r["extent"] == extent and (r.get("per_block") or extent == 1)
              and _finite(r.get("gbps_gpu"))]
        return xs[0] if xs else None

    def add(name: str, threshold: str, measured: tuple[str, bool, str] | None) -> None:
        """A target from (measured, passed, detail), or "not measured" when None."""
        out.append(Target(name, threshold, *measured) if measured is not None
                   else Target(name, threshold, "not measured", None))

    for d in ("out", "in"):
        ceil = ceiling.get(f"gbps_{d}")
        vals = [(best(d, e), e) for e in coarse]
        measured = None
        if _finite(ceil) and vals and all(v is not None for v, _ in vals):
            worst, ext = min(vals)
            measured = (f"{worst / ceil:.1%}", worst / ceil >= TARGET_GROUP_OF_CEILING,
                        f"engine {worst:.2f} GB/s at extent {ext}, ceiling {ceil:.2f} GB/s")
        add(f"group swaps (extents >= 20) vs one large copy, {d}",
            f">= {TARGET_GROUP_OF_CEILING:.0%}", measured)
        ratios = [(best(d, e) / loop(d, e), e) for e in coarse
                  if best(d, e) is not None and loop(d, e)]
        measured = None
        if ratios and len(ratios) == len(coarse):
            ratio, ext = min(ratios)
            measured = (f"{ratio:.1f}x", ratio >= TARGET_ENGINE_VS_LOOP,
                        f"extent {ext}: engine {best(d, ext):.2f} GB/s, loop "
                        f"{loop(d, ext):.2f} GB/s")
        add(f"group swaps (extents >= 20) vs per-block cuMemcpyAsync loop, same bytes, {d}",
            f">= {TARGET_ENGINE_VS_LOOP:.0f}x", measured)
        eng1, loop1 = best(d, 1), loop(d, 1)
        if eng1 is not None and loop1:
            out.append(Target(f"engine vs per-block loop at single-block extents, {d}",
                              "informational", f"{eng1 / loop1:.1f}x", None,
                              f"the same copies on both sides: engine {eng1:.2f} GB/s, loop "
                              f"{loop1:.2f} GB/s", informational=True))
    mig = [r for r in results.get("migrate", {}).get("rows", [])
           if r.get("what") == "engine.migrate" and r["extent"] >= 20
           and _finite(r.get("gbps_wall"))]
    pcie = [ceiling.get(f"gbps_{d}") for d in ("out", "in")]
    measured = None
    if mig and all(_finite(x) for x in pcie):
        r = min(mig, key=lambda r: r["gbps_wall"])
        ratio = r["gbps_wall"] / min(pcie)
        measured = (f"{ratio:.1f}x", ratio >= TARGET_MIGRATE_VS_PCIE,
                    f"migrate {r['gbps_wall']:.1f} GB/s (bytes moved once), PCIe "
                    f"{min(pcie):.1f} GB/s")
    add("migrate (20-block extents) vs the PCIe ceiling", f">= {TARGET_MIGRATE_VS_PCIE:.0f}x",
        measured)
    bi = [r for r in results.get("bidirectional", {}).get("rows", []) if _finite(r.get("ratio"))]
    measured = None
    if bi:
        r = max(bi, key=lambda r: (r["extent"], r["workers"]))
        measured = (f"{r['ratio']:.2f}x", r["ratio"] >= TARGET_BIDIR,
                    f"extent {r['extent']}, {r['workers']} workers: both "
                    f"{r['gbps_both']:.2f} GB/s, out {r['gbps_out']:.2f}, in {r['gbps_in']:.2f}")
    add("both directions at once vs one direction (engine)", f">= {TARGET_BIDIR}x", measured)
    live = [r for r in results.get("submit_latency", {}).get("rows", [])
            if r.get("direction") == "out" and not r.get("held") and r.get("extents") == 64]
    measured = None
    if live:
        p50 = live[0]["p50_us"]
        measured = (f"{p50:.1f} us", p50 <= TARGET_SWAP_OUT_CALL_US,
                    f"{live[0]['copies']} copies")
    add("swap_out call, 64-extent job (p50)", f"<= {TARGET_SWAP_OUT_CALL_US:.0f} us", measured)
    g = results.get("gemm", {})
    measured = None
    if _finite(g.get("slowdown")):
        measured = (f"{g['slowdown']:.1%}", g["slowdown"] <= TARGET_GEMM_SLOWDOWN,
                    f"copies meanwhile >= {g.get('gbps_during_gemm', float('nan')):.2f} GB/s")
    add("GEMM slowdown during swaps", f"<= {TARGET_GEMM_SLOWDOWN:.0%}", measured)
    return out


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "n/a"
    return fmt.format(x) if isinstance(x, (int, float)) else str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(c: dict[str, Any]) -> str:
    """campaign.md: environment, each step's table, and the targets table last."""
    env, res, steps = c.get("env", {}), c.get("results", {}), c.get("steps", {})
    gpu = env.get("gpu", {})
    link = env.get("pcie", {})
    L: list[str] = ["# kvswitch GPU campaign", ""]
    L.append(f"Command: `{c.get('command', '')}`  ")
    L.append(f"Date: {env.get('date', '?')}; host {env.get('hostname', '?')}; "
             f"commit {env.get('commit', '?')}  ")
    L.append(f"GPU: {gpu.get('name', '?')} (cc {gpu.get('capability', '?')}, "
             f"{_f(gpu.get('memory_gib'), '{:.0f}')} GiB), driver "
             f"{env.get('driver_version', '?')}, torch {env.get('torch', '?')} (CUDA "
             f"{env.get('torch_cuda', '?')}), CuPy {env.get('cupy', 'absent')}, kvswitch "
             f"{env.get('kvswitch', '?')}  ")
    L.append(f"PCIe: gen {link.get('gen_current', '?')} x{link.get('width_current', '?')} "
             f"at idle (max gen {link.get('gen_max', '?')} x{link.get('width_max', '?')}); "
             f"under load: {link.get('under_load', 'not read')}  ")
    L.append(f"NUMA: GPU on node {env.get('numa_node', '?')}; binding: "
             f"{env.get('numa_binding', 'none')}  ")
    L.append(f"CPU: {env.get('cpu', '?')}; {env.get('cpus', '?')} CPUs, "
             f"{_f(env.get('mem_gib'), '{:.0f}')} GiB  ")
    L.append("All figures are measured in this run (GB = 1e9 bytes; GPU times from CUDA "
             "events, call times from perf_counter_ns). Nothing is modelled.")
    L.append("")
    L += ["## Steps", ""]
    L += _table(["step", "status", "seconds", "note"],
                [[k, v.get("status"), _f(v.get("seconds"), "{:.1f}"),
                  (v.get("error") or v.get("note") or "").splitlines()[0][:120]
                  if (v.get("error") or v.get("note")) else ""] for k, v in steps.items()])
    t = res.get("tests")
    if t:
        L += ["", "## tests/cuda", "",
              f"{t.get('runner', '?')}: {t.get('passed', 0)} passed, {t.get('failed', 0)} "
              f"failed, {t.get('skipped', 0)} skipped, {t.get('errors', 0)} errors"
              + (" (timed out)" if t.get("timed_out") else "")]
        for name, why in t.get("failures", {}).items():
            L.append(f"- FAILED {name}: {why.splitlines()[0][:200] if why else ''}")
        for name, why in t.get("skips", {}).items():
            L.append(f"- skipped {name}: {why[:200]}")
    ce = res.get("ceiling")
    if ce:
        L += ["", f"## Ceiling: one large pinned cuMemcpyAsync ({ce['bytes'] / GIB:.3g} GiB, "
              f"median of {ce['repeats']} after {ce['warmup']} warm-ups)", ""]
        L += _table(["direction", "GB/s", "verified"],
                    [["device -> host (out)", _f(ce.get("gbps_out")), ce.get("verify_out")],
                     ["host -> device (in)", _f(ce.get("gbps_in")), ce.get("verify_in")],
                     ["both at once (halves)", _f(ce.get("gbps_both")),
                      f"{_f(ce.get('ratio_both'))}x the faster half alone"]])
    raw = res.get("raw_api", {}).get("rows")
    if raw:
        geo = Geometry(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in c.get("geometry", {}).items()})
        L += ["", f"## Raw copy APIs on {geo.num_regions}-region blocks (one job: "
              f"{res['raw_api'].get('seq_blocks')} blocks x {geo.num_regions} regions x "
              f"{geo.region_block_bytes / 1024:g} KiB; Llama-3-8B unless --dry-run)", ""]
        L += _table(["extent (blocks)", "dir", "API", "copies", "GB/s (GPU)",
                     "submit us/copy", "verified"],
                    [[r["extent"], r["direction"],
                      r.get("api_name", r["api"]) + (" per block" if r.get("per_block") else ""),
                      r.get("copies"), _f(r.get("gbps_gpu")),
                      _f(r.get("submit_us_per_copy"), "{:.3f}"), r.get("verify", "")]
                     for r in raw])
    eng = res.get("engine", {}).get("rows")
    if eng:
        ceil = res.get("ceiling", {})
        L += ["", "## AsyncSwapEngine (per round: "
              f"{res['engine'].get('jobs')} jobs x {res['engine'].get('seq_blocks')} blocks; "
              f"median of {res['engine'].get('rounds')} rounds)", "",
              "GB/s end-to-end: bytes / (first swap call -> synchronize() returned); busy: "
              "bytes / the engine's busy seconds (where reported); per job: median of "
              "bytes / the job's event time.", ""]
        L += _table(["workers", "extent", "dir", "GB/s end-to-end", "% of ceiling",
                     "GB/s busy", "GB/s per job", "call p50 (us)", "verified"],
                    [[r["workers"], r["extent"], r["direction"], _f(r.get("gbps_wall")),
                      _f(r["gbps_wall"] / ceil[f"gbps_{r['direction']}"] * 100, "{:.0f}%")
                      if _finite(ceil.get(f"gbps_{r['direction']}")) else "-",
                      _f(r.get("gbps_busy")), _f(r.get("gbps_job")),
                      _f(r.get("call_us_p50"), "{:.1f}"), r.get("verify", "")] for r in eng])
    bi = res.get("bidirectional", {}).get("rows")
    if bi:
        L += ["", "## Both directions at once (engine)", ""]
        L += _table(["workers", "extent", "out alone GB/s", "in alone GB/s", "both GB/s",
                     "ratio", "verified"],
                    [[r["workers"], r["extent"], _f(r["gbps_out"]), _f(r["gbps_in"]),
                      _f(r["gbps_both"]), _f(r["ratio"]) + "x", r.get("verify", "")]
                     for r in bi])
    mg = res.get("migrate", {}).get("rows")
    if mg:
        L += ["", "## Migration (device -> device, compaction) at HBM speed", "",
              "GB/s counts the bytes moved once (HBM traffic is twice that). engine.migrate: "
              "the copy engines through the swap engine's queue; torch index_copy_: a "
              "gather and a scatter per region on the SMs, for reference.", ""]
        L += _table(["what", "extent", "GB/s", "x PCIe ceiling", "verified"],
                    [[r["what"], r["extent"], _f(r.get("gbps_wall")),
                      _f(r["gbps_wall"] / min(res["ceiling"]["gbps_out"],
                                              res["ceiling"]["gbps_in"]), "{:.1f}x")
                      if _finite(res.get("ceiling", {}).get("gbps_out"))
                      and _finite(res.get("ceiling", {}).get("gbps_in")) else "-",
                      r.get("verify", "")] for r in mg])
    pg = res.get("pageable")
    if pg and pg.get("rows"):
        mem = ", ".join(f"{k[len('host_memory_'):]}: {v}" for k, v in pg.items()
                        if k.startswith("host_memory_")) or "?"
        L += ["", f"## Pageable host pool (control; host_memory {mem}; "
              f"{pg.get('pin_reason', '')})", ""]
        L += _table(["what", "extent", "dir", "GB/s", "verified"],
                    [[r.get("what"), r["extent"], r["direction"],
                      _f(r.get("gbps_wall", r.get("gbps_gpu"))), r.get("verify", "")]
                     for r in pg["rows"]])
    sl = res.get("submit_latency", {}).get("rows")
    if sl:
        L += ["", "## Call time of swap_out / swap_in (64 scattered single-block extents)", ""]
        L += _table(["call", "workers held", "copies", "p50 (us)", "p90 (us)", "min (us)"],
                    [[r.get("label", r["direction"]), "yes" if r["held"] else "no",
                      r["copies"], _f(r["p50_us"], "{:.1f}"), _f(r["p90_us"], "{:.1f}"),
                      _f(r["min_us"], "{:.1f}")] for r in sl])
    g = res.get("gemm")
    if g and _finite(g.get("gemm_alone_s")):
        L += ["", f"## GEMM (bf16 {g['n']}^3 x {g['iters']} on the default stream) during "
              "swaps", ""]
        L += _table(["GEMM alone (s)", "GEMM with swaps (s)", "slowdown",
                     "copy GB/s during GEMM (completed jobs)", "swap GB/s overall", "verified"],
                    [[_f(g["gemm_alone_s"], "{:.4f}"), _f(g["gemm_with_s"], "{:.4f}"),
                      _f(g["slowdown"] * 100, "{:.1f}%"), _f(g.get("gbps_during_gemm")),
                      _f(g.get("gbps_swaps")), g.get("verify", "")]])
    b = res.get("bench_cli")
    if b:
        L += ["", "## kvswitch bench --backend cuda (short run)", "",
              f"`{b.get('command', '')}`: exit status {b.get('returncode')}"]
        for name, f in (b.get("figures") or {}).items():
            job_s = f.get("swap_job_s", f.get("swap_job_s_measured"))  # key before issue 26
            L.append(f"- {name}: {f.get('swap_outs', '?')} swap-outs, "
                     f"{_f(job_s, '{:.3f}')} s of swap jobs, stall "
                     f"{_f(f.get('stall_s_measured'), '{:.3f}')} s (measured)")
    L += ["", "## Targets (issues 11 and 22; on H100/H200)", ""]
    L += _table(["target", "threshold", "measured", "result", "detail"],
                [[t["name"], t["threshold"], t["measured"],
                  "info" if t.get("informational")
                  else {True: "PASS", False: "FAIL", None: "not measured"}[t["passed"]],
                  t["detail"]] for t in c.get("targets", [])])
    return "\n".join(L) + "\n"


def write_outputs(out_dir: Path, campaign: dict[str, Any]) -> None:
    """campaign.json and campaign.md, written through temporary files (a run killed
    mid-write leaves the previous complete version)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        campaign["targets"] = [asdict(t) for t in evaluate_targets(campaign.get("results", {}))]
    except Exception as e:  # noqa: BLE001 - a bad row must not lose the measurements
        campaign["targets"] = []
        campaign["targets_error"] = f"{type(e).__name__}: {e}"
    for name, render in (("campaign.json", lambda: json.dumps(campaign, indent=2, default=str)),
                         ("campaign.md", lambda: render_markdown(campaign))):
        try:
            text = render()
        except Exception as e:  # noqa: BLE001 - the JSON still has everything
            text = (f"# kvswitch GPU campaign\n\nrendering {name} failed: "
                    f"{type(e).__name__}: {e}\n\n```\n{traceback.format_exc()[-3000:]}```\n")
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)


# ============================================================ environment parsing

def parse_smi_csv(text: str) -> list[dict[str, str]]:
    """Rows of ``nvidia-smi --query-gpu=... --format=csv`` (with header) as dicts keyed by
    the query field names (units in the header such as " [MiB]" dropped)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return []
    keys = [re.sub(r"\s*\[.*\]$", "", k.strip()) for k in lines[0].split(",")]
    return [dict(zip(keys, (v.strip() for v in ln.split(",")), strict=False))
            for ln in lines[1:]]


def sysfs_bus_id(smi_bus_id: str) -> str:
    """nvidia-smi's ``00000000:1B:00.0`` as the sysfs name ``0000:1b:00.0``."""
    parts = smi_bus_id.strip().split(":")
    if len(parts) != 3:
        return smi_bus_id.strip().lower()
    return f"{parts[0][-4:]}:{parts[1]}:{parts[2]}".lower()


def read_sysfs_pci(bus_id: str, root: Path = Path("/sys/bus/pci/devices")) -> dict[str, str]:
    """current/max link speed and width, numa_node and local_cpulist of a PCI device
    (missing files are left out)."""
    out = {}
    d = root / bus_id
    for name in ("current_link_speed", "current_link_width", "max_link_speed",
                 "max_link_width", "numa_node", "local_cpulist"):
        with contextlib.suppress(OSError):
            out[name] = (d / name).read_text().strip()
    return out


def numa_reexec_argv(node: int | None, argv: Sequence[str], env: dict[str, str],
                     numactl: str | None) -> list[str] | None:
    """The command that re-runs this campaign bound to the GPU's NUMA node, or None (no
    numactl, unknown node, or already re-executed)."""
    if numactl is None or node is None or node < 0 or env.get(NUMA_GUARD):
        return None
    return [numactl, f"--cpunodebind={node}", f"--membind={node}", sys.executable,
            os.path.abspath(__file__), *argv]


def parse_pytest_verbose(text: str) -> dict[str, Any]:
    """Outcomes from ``pytest -v`` lines (``path::test PASSED [ 10%]``), for a run cut off
    before its summary."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failures: dict[str, str] = {}
    for m in re.finditer(r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)",
                         text, re.M):
        outcome = m.group(2)
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed",
               "SKIPPED": "skipped", "XFAIL": "skipped", "ERROR": "errors"}[outcome]
        counts[key] += 1
        if key in ("failed", "errors"):
            failures[m.group(1)] = outcome
    return {**counts, "failures": failures, "skips": {}}


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts, failing tests (with their messages), skip reasons and scenario reports
    (junit properties) from pytest's ``--junitxml`` file."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failures: dict[str, str] = {}
    skips: dict[str, str] = {}
    reports: dict[str, list[str]] = {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        failed = case.find("failure")
        error = case.find("error")
        skipped = case.find("skipped")
        if failed is not None:
            counts["failed"] += 1
            failures[name] = (failed.get("message") or "") + "\n" + (failed.text or "")[-3000:]
        elif error is not None:
            counts["errors"] += 1
            failures[name] = (error.get("message") or "") + "\n" + (error.text or "")[-3000:]
        elif skipped is not None:
            counts["skipped"] += 1
            skips[name] = skipped.get("message") or ""
        else:
            counts["passed"] += 1
        props = [p.get("value", "") for p in case.iter("property")]
        if props:
            reports[name] = props
    return {**counts, "failures": failures, "skips": skips, "reports": reports}


# ================================================================== the campaign

class Campaign:
    """State of one run: output folder, deadline, results, and the steps' records."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str]):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.data: dict[str, Any] = {
            "command": " ".join([os.path.basename(sys.executable), "benchmarks/gpu_campaign.py",
                                 *argv]),
            "geometry": asdict(args.geometry), "env": {}, "steps": {}, "results": {}}
        # Files only the run itself reads (pytest's junit XML, the bench trace): the output
        # folder holds at most 7 files (a GPU machine returns at most 8).
        self.scratch = Path(tempfile.mkdtemp(prefix="kvswitch_campaign_"))
        self.torch: Any = None
        self.pools: Pools | None = None
        self.rng = np.random.default_rng(args.seed)
        self.current: str | None = None  # the step running now (for the watchdog)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def consumer_stream(self) -> Any:
        """A torch stream for before= (a raw handle in the CPU smoke test)."""
        return self.torch.cuda.Stream()

    def save(self) -> None:
        write_outputs(self.out, self.data)

    def step(self, name: str, fn: Callable[[], dict[str, Any] | None], *, need_s: float) -> None:
        """Run one step unless fewer than ``need_s`` seconds of the budget are left; record
        its status, time and error (the campaign goes on after a failed step)."""
        rec: dict[str, Any] = {"status": "skipped"}
        self.data["steps"][name] = rec
        if self.left() < need_s:
            rec["note"] = f"budget: {self.left():.0f} s left, the step needs about {need_s:.0f}"
            print(f"[campaign] {name}: skipped ({rec['note']})", file=sys.stderr, flush=True)
            self.save()
            return
        print(f"[campaign] {name} ... ({self.left():.0f} s of budget left)", file=sys.stderr,
              flush=True)
        rec["status"] = "running"
        self.current = name
        t0 = time.monotonic()
        try:
            result = fn()
            if result is not None:
                self.data["results"][name] = result
            rec["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded; the campaign goes on
            rec["status"] = "error"
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc()[-4000:]
            print(f"[campaign] {name}: {rec['error']}", file=sys.stderr, flush=True)
        rec["seconds"] = time.monotonic() - t0
        self.current = None
        self.save()

    def start_watchdog(self, limit_s: float) -> threading.Event:
        """A daemon thread that ends the process ``limit_s`` seconds after the start when
        the campaign has not finished (a step hung in the driver or the engine): the running
        step is recorded as an error with every thread's stack (watchdog_traceback.txt),
        children started by run_logged are killed, the outputs are written and the
        Markdown printed, then the process exits with status 1. Set the returned event to
        disarm it."""
        done = threading.Event()

        def fire() -> None:
            if done.wait(max(0.0, self.t0 + limit_s - time.monotonic())):
                return
            import faulthandler
            import signal

            name = self.current
            tb = self.out / "watchdog_traceback.txt"
            with contextlib.suppress(Exception), open(tb, "w") as f:
                faulthandler.dump_traceback(file=f, all_threads=True)
            for pgid in list(_CHILD_GROUPS):
                with contextlib.suppress(OSError):
                    os.killpg(pgid, signal.SIGKILL)
            msg = (f"watchdog: the campaign was still running {limit_s:.0f} s after its "
                   f"start (step {name!r}); stacks in {tb.name}")
            print(f"[campaign] {msg}", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                if name is not None:
                    rec = self.data["steps"][name]
                    rec.update(status="error", error=msg,
                               seconds=time.monotonic() - self.t0)
                self.data["watchdog"] = msg
                self.data["total_s"] = time.monotonic() - self.t0
                self.save()
                print(render_markdown(self.data), flush=True)
            os._exit(1)

        threading.Thread(target=fire, name="campaign-watchdog", daemon=True).start()
        return done


#: process groups started by run_logged and still running (ended by the watchdog)
_CHILD_GROUPS: set[int] = set()


def run_logged(cmd: Sequence[str], log: Path, timeout: float, cwd: Path | None = None
               ) -> tuple[int | None, str]:
    """Run ``cmd`` with its output in the file ``log`` (no pipes: a grandchild left behind
    cannot block the campaign), in a session of its own; after ``timeout`` seconds the whole
    process group is killed. Returns (exit status or None on timeout, the output)."""
    import signal

    with open(log, "w") as f:
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        _CHILD_GROUPS.add(proc.pid)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group of the process started here
            proc.wait()
            rc = None
        finally:
            _CHILD_GROUPS.discard(proc.pid)
    return rc, log.read_text(errors="replace")


def _run(cmd: Sequence[str], timeout: float = 20) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


SMI_FIELDS = ("index,name,pci.bus_id,driver_version,pcie.link.gen.current,"
              "pcie.link.width.current,pcie.link.gen.max,pcie.link.width.max,memory.total")
SMI_LINK = "pcie.link.gen.current,pcie.link.width.current,pcie.link.gen.max,pcie.link.width.max"


def smi_query(fields: str = SMI_FIELDS) -> list[dict[str, str]]:
    if not shutil.which("nvidia-smi"):
        return []
    rows = parse_smi_csv(_run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"]))
    if not rows and fields != SMI_LINK:  # an older nvidia-smi lacks a field: the minimum
        rows = parse_smi_csv(_run(["nvidia-smi", f"--query-gpu=pci.bus_id,{SMI_LINK}",
                                   "--format=csv"]))
    return rows


def gpu_numa_node() -> tuple[int | None, dict[str, Any]]:
    """NUMA node of GPU 0 from sysfs (via nvidia-smi's bus id); None when unknown."""
    rows = smi_query()
    if not rows or "pci.bus_id" not in rows[0]:
        return None, {"smi": rows}
    bus = sysfs_bus_id(rows[0]["pci.bus_id"])
    pci = read_sysfs_pci(bus)
    try:
        node = int(pci.get("numa_node", "-1"))
    except ValueError:
        node = -1
    return node, {"smi": rows, "sysfs_bus_id": bus, "sysfs": pci}


def gpu_unavailable_reason(*, dry_run: bool = False) -> str:
    """'' when torch sees a CUDA device and kvswitch's cuda backend can run on device 0
    (``dry_run``: only the latter, which the fake driver satisfies)."""
    try:
        from kvswitch import _core
        from kvswitch.bench.serve import cuda_unavailable_reason
    except ImportError as e:
        return f"kvswitch is not installed or not built ({e}); run pip install first"
    return _core.cuda_unavailable_reason(0) if dry_run else cuda_unavailable_reason()


def step_environment(c: Campaign, numa: dict[str, Any]) -> dict[str, Any]:
    import torch

    import kvswitch
    from kvswitch import _core

    env = c.data["env"]
    env.update(numa)
    env["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    env["hostname"] = socket.gethostname()
    env["python"] = platform.python_version()
    env["platform"] = platform.platform()
    env["torch"], env["torch_cuda"] = torch.__version__, torch.version.cuda
    env["kvswitch"] = kvswitch.__version__
    env["kvswitch_path"] = os.path.dirname(kvswitch.__file__)
    try:
        import cupy

        env["cupy"] = cupy.__version__
    except Exception:  # noqa: BLE001 - absent or broken: recorded as absent
        env["cupy"] = "absent"
    env["commit"] = _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).strip() or "?"
    with contextlib.suppress(OSError):
        cpu = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        env["cpu"] = cpu.group(1) if cpu else "?"
        mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        env["mem_gib"] = int(mem.group(1)) / 2**20 if mem else None
    env["cpus"] = os.cpu_count()
    env["affinity"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    env["CUDA_DEVICE_MAX_CONNECTIONS"] = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    p = torch.cuda.get_device_properties(0)
    env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                  "memory_gib": p.total_memory / GIB, "count": torch.cuda.device_count(),
                  "sms": p.multi_processor_count}
    env["driver"] = _core.cuda_driver_info()
    env["driver_version"] = env["driver"]["driver_version"]
    env["attributes"] = _core.cuda_device_attributes(0)
    env["before_wait_option"] = _before_wait_supported()
    smi = (numa.get("smi") or [{}])[0]
    pci = numa.get("sysfs", {})
    env["pcie"] = {"gen_current": smi.get("pcie.link.gen.current"),
                   "width_current": smi.get("pcie.link.width.current"),
                   "gen_max": smi.get("pcie.link.gen.max"),
                   "width_max": smi.get("pcie.link.width.max"),
                   "sysfs_speed": pci.get("current_link_speed"),
                   "sysfs_width": pci.get("current_link_width"),
                   "sysfs_max_speed": pci.get("max_link_speed")}
    env["driver_smi"] = smi.get("driver_version")
    env["numa_node"] = pci.get("numa_node")
    env["numa_binding"] = os.environ.get(NUMA_GUARD) or numa.get("numa_binding", "none")
    c.torch = torch
    return {"ok": True}


def run_tests(c: Campaign) -> dict[str, Any]:
    """pytest tests/cuda in a subprocess (timeout); without pytest, the scenarios alone."""
    timeout = max(30.0, min(c.args.tests_timeout_s, c.left() - 150))
    log = c.out / "tests_cuda.log"
    if importlib.util.find_spec("pytest") is None:
        spec = importlib.util.spec_from_file_location(
            "kvswitch_gpu_scenarios", ROOT / "tests" / "cuda" / "scenarios.py")
        sc = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = sc
        spec.loader.exec_module(sc)
        res: dict[str, Any] = {"runner": "tests/cuda/scenarios.py (pytest is not installed: "
                               "test_cuda_swap.py not run)", "passed": 0, "failed": 0,
                               "skipped": 0, "errors": 0, "failures": {}, "skips": {},
                               "reports": {}}
        end = time.monotonic() + timeout
        lines = []
        for name in sc.SCENARIOS:
            left = end - time.monotonic()
            if left < 10:
                res["timed_out"] = True
                break
            o = sc.run_in_subprocess(name, timeout_s=min(left, sc.SCENARIOS[name].timeout_s))
            lines.append(f"{name}: {o.status} ({o.seconds:.1f} s)\n{o.detail}")
            key = {"passed": "passed", "skipped": "skipped"}.get(o.status, "failed")
            res[key] += 1
            if key == "failed":
                res["failures"][name] = f"{o.status}: {o.detail}"
            elif key == "skipped":
                res["skips"][name] = o.detail
            if o.reports:
                res["reports"][name] = o.reports
        log.write_text("\n".join(lines))
        return res
    xml = c.scratch / "tests_cuda.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/cuda", "-v", "-rA", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    rc, text = run_logged(cmd, log, timeout, cwd=ROOT)
    timed_out = rc is None
    res = parse_junit(xml) if xml.exists() and not timed_out else parse_pytest_verbose(text)
    res.update(runner="pytest tests/cuda", returncode=rc, timed_out=timed_out,
               timeout_s=timeout, tail=text[-3000:])
    return res


def make_gpu_pools(c: Campaign, num_blocks: int, *, pin: bool = True) -> Pools:
    """Device pool: one vLLM tensor [2, blocks, 16, 8, 128] bf16 per layer on cuda:0,
    random bytes; host pool: HostKVPool (pinned unless ``pin=False``), filled from the
    device pool shifted by one region (so no host block equals its device twin)."""
    import torch

    from kvswitch import HostKVPool, KVLayout, _core

    g = c.args.geometry
    shape = (2, num_blocks, g.block_size, g.kv_heads, g.head_dim)
    tensors = []
    for _ in range(g.layers):
        t = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE)
        t.view(torch.int16).random_(-32768, 32767)
        tensors.append(t)
    torch_sync()
    layout = device_layout(KVLayout.from_vllm(tensors, kv_dim=0))
    host = HostKVPool(layout, num_blocks, pin=pin)
    if pin and not host.pinned:
        raise RuntimeError(f"host pool not pinned: {host.pin_reason}")
    n = layout.num_regions
    dst = np.array([host.layout.regions[(r + 1) % n].base for r in range(n)], np.uint64)
    src = np.array([r.base for r in layout.regions], np.uint64)
    sizes = np.array([r.nbytes for r in layout.regions], np.uint64)
    _core.cuda_copy_bench(0, dst, src, sizes, "out", "memcpy", 0, 1)
    views = [t[kv] for t in tensors for kv in (0, 1)]
    return Pools(layout, host, TorchRegions(views), 0, tensors)


def step_ceiling(c: Campaign) -> dict[str, Any]:
    import torch

    from kvswitch import HostKVPool, KVLayout, _core

    nbytes = int(c.args.ceiling_gib * GIB)
    blocks = 64
    dev = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dev.random_(0, 255)
    torch_sync()
    big = device_layout(KVLayout.from_tensors([dev.view(blocks, -1)]))
    host = HostKVPool(big, blocks)
    if not host.pinned:
        raise RuntimeError(f"ceiling buffer not pinned: {host.pin_reason}")
    h = int(host.layout.regions[0].base)
    d = int(dev.data_ptr())
    hbuf = host.arrays[0].reshape(-1)
    one = lambda x: np.array([x], np.uint64)  # noqa: E731
    res: dict[str, Any] = {"bytes": nbytes, "warmup": 3, "repeats": 20}
    # correctness once per direction: poisoned destination, compared with the source
    hbuf[:] = 0xA5
    _core.cuda_copy_bench(0, one(h), one(d), one(nbytes), "out", "memcpy", 0, 1)
    res["verify_out"] = ("ok" if torch.equal(torch.from_numpy(hbuf).to(dev.device), dev)
                         else "MISMATCH")
    dev.fill_(0x5A)
    torch_sync()
    _core.cuda_copy_bench(0, one(d), one(h), one(nbytes), "in", "memcpy", 0, 1)
    res["verify_in"] = ("ok" if torch.equal(torch.from_numpy(hbuf).to(dev.device), dev)
                        else "MISMATCH")
    link: dict[str, Any] = {}

    def read_link():  # nvidia-smi during the copies: the link trains up under load
        time.sleep(0.3)
        rows = smi_query(SMI_LINK)
        if rows:
            link.update(rows[0])

    th = threading.Thread(target=read_link, daemon=True)
    th.start()
    for direction, dst, src in (("out", h, d), ("in", d, h)):
        t = _core.cuda_copy_bench(0, one(dst), one(src), one(nbytes), direction, "memcpy", 3, 20)
        res[f"gpu_s_{direction}"] = t["gpu_s"]
        res[f"gbps_{direction}"] = gbps(nbytes, median(t["gpu_s"]))
    th.join(timeout=10)
    if link:
        c.data["env"].setdefault("pcie", {})["under_load"] = (
            f"gen {link.get('pcie.link.gen.current')} x{link.get('pcie.link.width.current')}")
    half = nbytes // 2
    singles = {}
    for direction, dst, src in (("out", h, d), ("in", d + half, h + half)):
        t = _core.cuda_copy_bench(0, one(dst), one(src), one(half), direction, "memcpy", 2, 10)
        singles[direction] = gbps(half, median(t["gpu_s"]))
    t = _core.cuda_copy_bench_concurrent(0, one(h), one(d), one(half), "out", one(d + half),
                                         one(h + half), one(half), "in", "memcpy", 3, 10)
    res["gbps_both"] = gbps(2 * half, median(t["wall_s"]))
    res["gbps_half_out"], res["gbps_half_in"] = singles["out"], singles["in"]
    res["ratio_both"] = res["gbps_both"] / max(singles.values())
    res["wall_s_both"] = t["wall_s"]
    del dev, host, big
    torch.cuda.empty_cache()
    return res


def step_raw(c: Campaign) -> dict[str, Any]:
    from kvswitch import _core

    g, p = c.args.geometry, c.pools
    rows = []
    apis = ["memcpy"] + (["batch"] if _core.cuda_driver_info()["batch_copy"] else [])
    for ext in g.extents:
        for d in ("out", "in"):
            pairs = make_jobs(c.rng, g.pool_blocks, g.pool_blocks, ext, 1, g.seq_blocks)[0]
            # At extents >= 20 also vLLM's loop over the same bytes: one copy per block.
            cases = [(api, False) for api in apis] + ([("memcpy", True)] if ext >= 20 else [])
            for api, per_block in cases:
                rows.append(raw_case(p, pairs, d, api, warmup=2, repeats=c.args.repeats,
                                     check=ext == g.extents[0] or per_block,
                                     per_block=per_block))
                label = api + (" per block" if per_block else "")
                print(f"  raw {label:16s} extent {ext:3d} {d:3s} "
                      f"{rows[-1]['gbps_gpu']:7.2f} GB/s", file=sys.stderr, flush=True)
    return {"rows": rows, "seq_blocks": g.seq_blocks,
            "note": "" if "batch" in apis else "the driver has no cuMemcpyBatchAsync"}


def step_migrate(c: Campaign) -> dict[str, Any]:
    """engine.migrate at extents of 1 and 20 blocks (2 workers), and torch's SM-kernel
    copy of the same moves for reference where the pools are torch tensors."""
    g, p = c.args.geometry, c.pools
    rows = []
    regions = sample_regions(g.num_regions, c.rng)
    jobs_n = max(1, g.jobs // 4)
    with new_engine(p, 2) as eng:
        for ext in (1, 20):
            jobs = migrate_jobs(c.rng, g.pool_blocks, ext, jobs_n, g.seq_blocks)
            rows.append(migrate_case(eng, jobs, rounds=c.args.repeats, warmup=1, pools=p,
                                     regions=regions))
            print(f"  migrate extent {ext:3d} {rows[-1]['gbps_wall']:8.1f} GB/s",
                  file=sys.stderr, flush=True)
            if isinstance(p.dev, TorchRegions):
                rows.append(kernel_copy_case(p, np.concatenate(jobs), rounds=c.args.repeats))
                print(f"  torch index_copy_ extent {ext:3d} {rows[-1]['gbps_wall']:8.1f} GB/s",
                      file=sys.stderr, flush=True)
    return {"rows": rows, "jobs": jobs_n, "seq_blocks": g.seq_blocks}


def step_engine(c: Campaign) -> dict[str, Any]:
    g, p = c.args.geometry, c.pools
    rows = []
    regions = sample_regions(g.num_regions, c.rng)
    for w in g.workers:
        with new_engine(p, w) as eng:
            for i, ext in enumerate(g.extents):
                for d in ("out", "in"):
                    jobs = make_jobs(c.rng, g.pool_blocks, g.pool_blocks, ext, g.jobs,
                                     g.seq_blocks)
                    rows.append(engine_case(eng, jobs, d, rounds=c.args.repeats, warmup=1,
                                            pools=p if i == 0 else None, regions=regions))
                    r = rows[-1]
                    print(f"  engine w={w} extent {ext:3d} {d:3s} {r['gbps_wall']:7.2f} GB/s "
                          f"(per job {r['gbps_job']:.2f})", file=sys.stderr, flush=True)
            stats = _stats(eng)
    return {"rows": rows, "jobs": g.jobs, "seq_blocks": g.seq_blocks, "rounds": c.args.repeats,
            "last_stats": stats, "verified_regions": regions}


def step_bidirectional(c: Campaign) -> dict[str, Any]:
    g, p = c.args.geometry, c.pools
    rows = []
    regions = sample_regions(g.num_regions, c.rng)
    jobs = max(1, g.jobs // 2)
    for w in sorted({2, max(g.workers)}):
        with new_engine(p, w) as eng:
            for ext in (g.extents[0], g.extents[-1]):
                both = make_jobs(c.rng, g.pool_blocks, g.pool_blocks, ext, 2 * jobs,
                                 g.seq_blocks)
                out_jobs, in_jobs = both[:jobs], [j[:, [1, 0, 2]] for j in both[jobs:]]
                rows.append(bidirectional_case(eng, out_jobs, in_jobs, rounds=c.args.repeats,
                                               warmup=1, pools=p if ext == g.extents[-1]
                                               else None, regions=regions))
                r = rows[-1]
                print(f"  both w={w} extent {ext:3d}: {r['gbps_both']:.2f} GB/s "
                      f"({r['ratio']:.2f}x)", file=sys.stderr, flush=True)
    return {"rows": rows}


def step_pageable(c: Campaign) -> dict[str, Any]:
    g = c.args.geometry
    blocks = max(256, g.pool_blocks // 2)
    pg = make_gpu_pools(c, blocks, pin=False)
    jobs_n = max(1, g.jobs // 2)
    rows: list[dict[str, Any]] = []
    res: dict[str, Any] = {"pin_reason": pg.host.pin_reason, "pinned": pg.host.pinned}
    # register_host=False keeps the pool pageable (the control); the default page-locks it
    # (cuMemHostRegister), which should bring it back to the pinned figures.
    from kvswitch import AsyncSwapEngine

    can_register = "register_host" in inspect.signature(AsyncSwapEngine.__init__).parameters
    modes = [("pageable", {"register_host": False}), ("registered", {})] if can_register \
        else [("pageable", {})]
    for label, kw in modes:
        with new_engine(pg, 2, **kw) as eng:
            for ext in (g.extents[-1], g.extents[0]):
                for d in ("out", "in"):
                    jobs = make_jobs(c.rng, blocks, blocks, ext, jobs_n, g.seq_blocks)
                    r = engine_case(eng, jobs, d, rounds=2, warmup=1, pools=pg,
                                    regions=sample_regions(g.num_regions, c.rng))
                    r["what"] = f"engine, 2 workers, {label}"
                    rows.append(r)
                    print(f"  {label} engine extent {ext:3d} {d:3s} "
                          f"{r['gbps_wall']:.2f} GB/s", file=sys.stderr, flush=True)
            res[f"host_memory_{label}"] = eng.stats().get(
                "host_memory", "(not reported by this kvswitch)")
    for d in ("out", "in"):
        pairs = make_jobs(c.rng, blocks, blocks, g.extents[-1], 1, g.seq_blocks)[0]
        r = raw_case(pg, pairs, d, "memcpy", warmup=1, repeats=3, check=True)
        r["what"] = "cuMemcpyAsync per extent and region"
        rows.append(r)
    res["rows"] = rows
    return res


def step_submit_latency(c: Campaign) -> dict[str, Any]:
    g, p = c.args.geometry, c.pools
    n = c.args.call_repeats
    pairs_out = make_jobs(c.rng, g.pool_blocks, g.pool_blocks, 1, 1, 64)[0]
    pairs_in = make_jobs(c.rng, g.pool_blocks, g.pool_blocks, 1, 1, 64)[0]
    rows = []
    with new_engine(p, 2) as eng:
        for _ in range(20):  # warm caches, allocate the engine's events
            eng.swap_out(pairs_out).wait()
        for held in (False, True):
            r = call_latency(eng, pairs_out, n=n, hold=held)
            r["label"] = "swap_out (no streams)"
            rows.append(r)
    modes = ["event", "flag"] if _before_wait_supported() else [None]
    s = c.consumer_stream()
    sync = getattr(s, "synchronize", lambda: None)
    for mode in modes:
        kw = {"before_wait": mode} if mode else {}
        label = f"swap_in(before=stream), before_wait={mode or 'flag (this kvswitch)'}"
        try:
            with new_engine(p, 2, **kw) as eng:
                r = call_latency(eng, pairs_in, n=max(20, n // 2), hold=False, direction="in",
                                 before=s, after_call=sync)
        except (ValueError, RuntimeError) as e:
            rows.append({"label": label, "direction": "in", "held": False, "copies": "-",
                         "p50_us": float("nan"), "p90_us": float("nan"),
                         "min_us": float("nan"), "error": str(e)})
            continue
        r["label"] = label
        rows.append(r)
    return {"rows": rows}


def step_gemm(c: Campaign) -> dict[str, Any]:
    torch = c.torch
    g, p = c.args.geometry, c.pools
    n = c.args.gemm_n
    a = torch.randn(n, n, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=DEVICE)
    out = torch.empty(n, n, dtype=torch.bfloat16, device=DEVICE)
    stream = torch.cuda.current_stream()

    def gemm_loop(iters: int) -> tuple[Any, Any]:  # (start, end) torch.cuda.Event
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(stream)
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        e1.record(stream)
        return e0, e1

    e0, e1 = gemm_loop(5)
    e1.synchronize()
    e0, e1 = gemm_loop(10)
    e1.synchronize()
    per = e0.elapsed_time(e1) / 1e3 / 10
    iters = max(10, int(c.args.gemm_s / per))
    # swaps: a chain of swap-outs and a chain of swap-ins over fixed disjoint blocks (jobs
    # of one chain are ordered by their shared blocks), lasting longer than the GEMMs
    both = make_jobs(c.rng, g.pool_blocks, g.pool_blocks, g.extents[-1], 2, g.seq_blocks)
    out_job, in_job = both[0], both[1][:, [1, 0, 2]]
    job_bytes = g.seq_blocks * g.block_bytes
    rate = max(c.data["results"].get("ceiling", {}).get("gbps_out") or 25.0, 1.0) * GB
    per_chain = min(1000, max(4, math.ceil(1.5 * iters * per * rate / job_bytes)))
    res: dict[str, Any] = {"n": n, "iters": iters, "gemm_one_s": per, "jobs_per_direction":
                           per_chain, "alone_s": [], "with_s": [], "during": [], "overall": []}
    workers = max(g.workers)
    with new_engine(p, workers) as eng:
        poison("out", p, out_job)
        poison("in", p, in_job)
        engine_round(eng, [("out", out_job), ("in", in_job)])
        bad = [verify("out", p, out_job), verify("in", p, in_job)]
        res["verify"] = "; ".join(x for x in bad if x) or "ok"
        for _ in range(c.args.gemm_rounds):
            e0, e1 = gemm_loop(iters)
            e1.synchronize()
            res["alone_s"].append(e0.elapsed_time(e1) / 1e3)
            t0 = time.perf_counter()
            handles = []
            for _ in range(per_chain):
                handles.append(eng.swap_out(out_job))
                handles.append(eng.swap_in(in_job))
            e0, e1 = gemm_loop(iters)
            e1.synchronize()
            t1 = time.perf_counter()
            finished = [h for h in handles if h.done()]
            done = sum(h.nbytes for h in finished)
            res["jobs_done_at_gemm_end"] = f"{len(finished)} of {len(handles)}"
            eng.synchronize()
            t2 = time.perf_counter()
            for h in handles:
                h.wait()
            res["with_s"].append(e0.elapsed_time(e1) / 1e3)
            res["during"].append(gbps(done, t1 - t0))
            res["overall"].append(gbps(sum(h.nbytes for h in handles), t2 - t0))
    res["gemm_alone_s"], res["gemm_with_s"] = median(res["alone_s"]), median(res["with_s"])
    res["slowdown"] = res["gemm_with_s"] / res["gemm_alone_s"] - 1
    res["gbps_during_gemm"], res["gbps_swaps"] = median(res["during"]), median(res["overall"])
    res["note"] = ("copy GB/s during GEMM counts jobs completed when the GEMMs ended (a "
                   "lower bound); the swap chains outlast the GEMMs")
    return res


def write_bench_trace(path: Path, conversations: int, seed: int = 0) -> None:
    """A short multi-turn trace for the CLI step: ``conversations`` conversations of 3 turns,
    400 to 1,200 new input tokens (25 to 75 blocks of KV swapped per turn end) and 32 output
    tokens each, so that a run at time scale 1 takes seconds, not minutes."""
    rng = np.random.default_rng(seed)
    rows = ["conversation_id,turn,new_input_tokens,output_tokens"]
    rows += [f"c{i},{t},{int(rng.integers(400, 1201))},32"
             for i in range(conversations) for t in range(3)]
    path.write_text("\n".join(rows) + "\n")


def step_bench_cli(c: Campaign) -> dict[str, Any]:
    js = c.out / "bench_cuda.json"
    trace = c.scratch / "bench_trace.csv"
    write_bench_trace(trace, c.args.bench_conversations, c.args.seed)
    gpu = "h200" if "H200" in c.data["env"].get("gpu", {}).get("name", "") else "a100"
    cmd = [sys.executable, "-m", "kvswitch.cli", "bench", "--backend", "cuda",
           "--trace", str(trace), "--conversations", str(c.args.bench_conversations),
           "--arrival-rate", "4", "--think-s", "0.5", "--gpu", gpu, "--gpu-blocks", "1024",
           "--host-blocks", "1024", "--configs", "baseline,full", "--no-progress",
           "--json", str(js)]
    timeout = max(20.0, min(c.args.bench_timeout_s, c.left() - 10))
    res: dict[str, Any] = {"command": " ".join(["python3", *cmd[1:]]), "timeout_s": timeout}
    rc, text = run_logged(cmd, c.out / "bench_cuda.log", timeout, cwd=c.scratch)
    res.update(returncode=rc, output=text[-6000:])
    if rc is None:
        raise RuntimeError(f"kvswitch bench --backend cuda: no result after {timeout:.0f} s")
    if js.exists():
        res["figures"] = json.loads(js.read_text()).get("configurations")
    if rc != 0:
        last = [ln for ln in text.strip().splitlines() if "kvswitch bench" in ln][-1:]
        raise RuntimeError(f"kvswitch bench --backend cuda exited {rc}: "
                           f"{last[0] if last else text.strip()[-300:]}")
    return res


#: The toy geometry of --dry-run (every step in seconds on a CPU).
DRY_RUN_GEOMETRY = Geometry(layers=2, kv_heads=2, head_dim=8, pool_blocks=512, seq_blocks=40,
                            jobs=4, extents=(1, 4, 20), workers=(1, 2))
#: What --dry-run takes on CI's 2 shared cores (tests/test_gpu_campaign_smoke.py ends it
#: after this long): about 60 s measured (docs/benchmarks.md).
DRY_RUN_STATED_S = 240


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="gpu_campaign.py", description=__doc__.split("\n\n")[0],
        epilog="Writes OUT/campaign.json and OUT/campaign.md (at most 7 files in OUT); prints "
               "the Markdown last. Exit status: 0 every step ran and every test passed, 1 "
               "otherwise, 2 no GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="wall-time budget of the whole campaign; a step that would not fit "
                         "is skipped (with the build, one 600 s command on a GPU machine)")
    ap.add_argument("--hard-limit-s", type=float, default=None,
                    help="end the run (outputs written, exit status 1) this many seconds "
                         "after its start even when a step hangs; default budget + 30")
    ap.add_argument("--tests-timeout-s", type=float, default=150.0,
                    help="timeout of pytest tests/cuda")
    ap.add_argument("--skip-tests", action="store_true", help="do not run tests/cuda")
    ap.add_argument("--skip-bench-cli", action="store_true",
                    help="do not run kvswitch bench --backend cuda")
    ap.add_argument("--no-numa", action="store_true",
                    help="do not re-execute under numactl bound to the GPU's NUMA node")
    ap.add_argument("--pool-blocks", type=int, default=2048,
                    help="device and host pool blocks (2 MiB each)")
    ap.add_argument("--ceiling-gib", type=float, default=2.0,
                    help="size of the one-large-copy ceiling, GiB")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions per case")
    ap.add_argument("--call-repeats", type=int, default=200,
                    help="swap calls timed for the call-time figure")
    ap.add_argument("--gemm-n", type=int, default=8192, help="GEMM size (n x n x n, bf16)")
    ap.add_argument("--gemm-s", type=float, default=0.4, help="seconds of GEMMs per timing")
    ap.add_argument("--gemm-rounds", type=int, default=3)
    ap.add_argument("--bench-conversations", type=int, default=8)
    ap.add_argument("--bench-timeout-s", type=float, default=90.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true",
                    help="every step end to end without a GPU, at toy sizes: torch CPU tensors "
                         "stand in for device memory (named device 0 to kvswitch), a few "
                         "torch.cuda calls are stood in for, and kvswitch's cuda backend uses "
                         "whatever libcuda.so.1 loads (in CI the fake driver of "
                         "tests/fake_cuda); the bench CLI step is skipped. Figures mean "
                         "nothing. For CI: proves the campaign runs before a GPU session")
    args = ap.parse_args(argv)
    args.geometry = Geometry(pool_blocks=args.pool_blocks)
    if args.dry_run:
        args.geometry = DRY_RUN_GEOMETRY
        args.ceiling_gib, args.repeats, args.call_repeats = 1 / 1024, 2, 4
        args.gemm_n, args.gemm_s, args.gemm_rounds = 64, 0.01, 2
        args.skip_bench_cli = args.no_numa = True
        args.budget_s = min(args.budget_s, DRY_RUN_STATED_S - 30)
    return args


def enter_dry_run() -> None:
    """--dry-run: torch CPU tensors stand in for device memory (layouts relabelled as
    device 0, so kvswitch's cuda backend copies them through the loaded driver), and the
    few torch.cuda calls the steps make get host stand-ins (events on the host clock,
    device properties of a fake H100, an int handle as the consumer stream)."""
    global DEVICE, device_layout
    import dataclasses

    import torch

    from kvswitch import KVLayout

    DEVICE = "cpu"

    def relabel(layout: Any) -> Any:
        regions = [dataclasses.replace(r, device=("cuda", 0)) for r in layout.regions]
        return KVLayout(regions, keepalive=(layout,))

    class Props:
        name, major, minor, total_memory, multi_processor_count = (
            "dry run (no GPU)", 9, 0, 80 << 30, 132)

    class Event:  # torch.cuda.Event on the host clock
        def __init__(self, enable_timing: bool = False):
            self.t = 0.0

        def record(self, stream: Any = None) -> None:
            self.t = time.perf_counter()

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, other: Any) -> float:
            return (other.t - self.t) * 1e3

    device_layout = relabel
    cuda = torch.cuda
    cuda.get_device_properties = lambda i=0: Props()
    cuda.device_count = lambda: 1
    cuda.Event = Event
    cuda.current_stream = lambda *a, **k: None
    cuda.Stream = lambda *a, **k: 0x77  # a raw handle: the fake makes the stream
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None


def print_versions() -> None:
    """One line first, before anything can fail: what this run is made of."""
    parts = [f"python {platform.python_version()}"]
    for mod in ("torch", "cupy", "kvswitch"):
        try:
            m = __import__(mod)
            parts.append(f"{mod} {m.__version__}")
            if mod == "torch":
                parts.append(f"torch CUDA {m.version.cuda}")
        except Exception as e:  # noqa: BLE001 - reported, the run says why later
            parts.append(f"{mod} absent ({type(e).__name__})")
    with contextlib.suppress(Exception):
        from kvswitch import _core

        info = _core.cuda_driver_info()
        parts.append(f"CUDA driver {info['driver_version']} "
                     f"({'available' if info['available'] else info['reason']})")
    commit = _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).strip()
    parts.append(f"commit {commit or '?'}")
    print("[campaign] " + "; ".join(parts), file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    print_versions()
    numa_info: dict[str, Any] = {}
    if args.dry_run:
        enter_dry_run()
    elif not args.no_numa and not os.environ.get(NUMA_GUARD):
        node, numa_info = gpu_numa_node()
        cmd = numa_reexec_argv(node, argv, dict(os.environ), shutil.which("numactl"))
        if cmd is not None:
            probe = subprocess.run([*cmd[:3], "true"], capture_output=True, text=True)
            if probe.returncode == 0:
                print(f"[campaign] re-executing bound to NUMA node {node}: {' '.join(cmd[:3])}",
                      file=sys.stderr, flush=True)
                os.environ[NUMA_GUARD] = f"numactl --cpunodebind={node} --membind={node}"
                sys.stdout.flush()
                os.execv(cmd[0], cmd)
            numa_info["numa_binding"] = f"numactl refused: {probe.stderr.strip()[:200]}"
        elif node is not None and node >= 0:
            numa_info["numa_binding"] = "none (numactl not installed)"
    elif os.environ.get(NUMA_GUARD):
        _, numa_info = gpu_numa_node()
    why = gpu_unavailable_reason(dry_run=args.dry_run)
    if why:
        print(f"gpu_campaign: needs a CUDA GPU: {why}", file=sys.stderr)
        return 2
    c = Campaign(args, argv)
    watchdog = c.start_watchdog(args.hard_limit_s if args.hard_limit_s is not None
                                else args.budget_s + 30)
    c.step("environment", lambda: step_environment(c, numa_info), need_s=0)
    if not args.skip_tests:
        c.step("tests", lambda: run_tests(c), need_s=120 if not args.dry_run else 0)

    def setup():
        c.pools = make_gpu_pools(c, args.geometry.pool_blocks)
        return {"pool_blocks": args.geometry.pool_blocks,
                "device_bytes": c.pools.layout.nbytes, "host_bytes": c.pools.host.nbytes,
                "pin_reason": c.pools.host.pin_reason}

    c.step("ceiling", lambda: step_ceiling(c), need_s=20)
    c.step("setup", setup, need_s=20)
    if c.pools is not None:
        c.step("raw_api", lambda: step_raw(c), need_s=20)
        c.step("engine", lambda: step_engine(c), need_s=30)
        c.step("migrate", lambda: step_migrate(c), need_s=10)
        c.step("bidirectional", lambda: step_bidirectional(c), need_s=15)
        c.step("submit_latency", lambda: step_submit_latency(c), need_s=10)
        c.step("gemm", lambda: step_gemm(c), need_s=15)
        c.step("pageable", lambda: step_pageable(c), need_s=20)
        c.pools = None
        if c.torch is not None:
            c.torch.cuda.empty_cache()
    if not args.skip_bench_cli:
        c.step("bench_cli", lambda: step_bench_cli(c), need_s=40)
    c.data["total_s"] = time.monotonic() - c.t0
    watchdog.set()
    c.save()
    shutil.rmtree(c.scratch, ignore_errors=True)
    print(render_markdown(c.data))
    tests = c.data["results"].get("tests", {})
    bad_steps = [k for k, v in c.data["steps"].items() if v["status"] == "error"]
    bad_tests = tests.get("failed", 0) + tests.get("errors", 0) + bool(tests.get("timed_out"))
    return 1 if bad_steps or bad_tests else 0


if __name__ == "__main__":
    raise SystemExit(main())
