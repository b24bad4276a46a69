"""The worker side: vLLM offloading transfers as kvswitch swap jobs.

vLLM 0.32's ``CPUOffloadingWorker`` (``vllm/v1/kv_offload/cpu/gpu_worker.py``) issues one
copy per (GPU block, layer tensor) of a transfer. [`KVSwitchOffloadingWorker`][] takes
the same inputs (the ``CanonicalKVCaches`` tensors, ``GPULoadStoreSpec`` and the CPU chunk
ids of ``CPULoadStoreSpec``) and issues one copy per (extent, layer tensor): the job's
(GPU block, CPU block) pairs are coalesced into maximal runs in which both ids ascend by
one, and each run is one ``AsyncSwapEngine`` extent, copied by C++ worker threads off the
GIL.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)

from kvswitch.layout import KVLayout
from kvswitch.swap import AsyncSwapEngine

__all__ = ["KVSwitchOffloadingWorker", "coalesce_pairs", "expand_cpu_blocks"]

# Under vLLM's logger: vLLM configures only "vllm" (handler, level, propagate=False), so a
# logger outside it would print nothing at INFO in a vLLM process.
logger = logging.getLogger("vllm.kvswitch")


def coalesce_pairs(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Coalesce aligned block-id pairs into extents.

    Args:
        src: int array ``[n]`` of source block ids.
        dst: int array ``[n]`` of destination block ids; ``src[i]`` goes to ``dst[i]``.

    Returns:
        int64 array ``[m, 3]`` of ``(src_start, dst_start, length)``: the maximal runs in
        which both ``src`` and ``dst`` ascend by one, in input order (``m <= n``).
    """
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    n = len(src)
    if n == 0:
        return np.zeros((0, 3), dtype=np.int64)
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [n])))
    return np.ascontiguousarray(np.stack((src[starts], dst[starts], lengths), axis=1))


def expand_cpu_blocks(chunk_ids: np.ndarray, blocks_per_chunk: int, skip: int,
                      count: int) -> np.ndarray:
    """CPU block ids (GPU-block granularity) of ``count`` blocks starting ``skip`` blocks
    into the first chunk: block ``j`` of chunk ``c`` is ``c * blocks_per_chunk + j``.

    Args:
        chunk_ids: int array ``[k]`` of CPU chunk ids.
        blocks_per_chunk: GPU blocks per CPU chunk (>= 1).
        skip: blocks of the first chunk to skip (``< blocks_per_chunk``).
        count: blocks wanted (``skip + count <= k * blocks_per_chunk``).

    Returns:
        int64 array ``[count]``.
    """
    chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
    if blocks_per_chunk == 1:
        return chunk_ids[:count]
    flat = (chunk_ids[:, None] * blocks_per_chunk
            + np.arange(blocks_per_chunk, dtype=np.int64)[None, :]).ravel()
    return flat[skip:skip + count]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class _Job:
    job_id: int
    handles: list[Any]
    num_bytes: int
    submitted: float
    failed: str = ""
    extents: int = 0
    copies: list[int] = field(default_factory=list)


class KVSwitchOffloadingWorker(OffloadingWorker):
    """vLLM's ``OffloadingWorker`` over kvswitch swap engines (one per KV-cache group).

    The CPU cache holds, per canonical tensor, ``[num_cpu_chunks, page_size_bytes *
    blocks_per_chunk]`` bytes, like vLLM's worker: CPU chunk ``c`` holds GPU-sized blocks
    ``c * blocks_per_chunk + j``. Each KV-cache group gets a [`KVLayout`][]
    over its layers' GPU tensors (one region per data reference, ``page_size_bytes`` per
    block), a matching host layout over the CPU tensors, and an
    [`AsyncSwapEngine`][] (the CUDA backend for GPU tensors, the host backend
    for CPU tensors, e.g. tests).

    A job's copies start after the work queued so far on the current CUDA stream (stores
    read what the model wrote; loads overwrite blocks earlier kernels may read). Jobs over
    overlapping blocks run in submission order (the engine's ordering); vLLM's connector
    waits for ``get_finished`` before it uses loaded blocks or reuses stored ones.

    A job whose kvswitch handle fails (a CUDA error, or a job ordered behind a failed one)
    finishes as ``TransferResult(success=False)``; a job that cannot be queued (a closed
    engine) too, reported by the next ``get_finished``.

    Args:
        kv_caches: vLLM's canonical KV caches (``tensors`` with ``[num_blocks, ...]`` and
            ``page_size_bytes``; ``group_data_refs``, one list per KV-cache group).
        blocks_per_chunk: GPU blocks per CPU chunk (>= 1).
        num_cpu_chunks: chunks of the CPU cache (>= 0).
        pin_memory: page-lock the CPU tensors (default: when the KV tensors are on CUDA).
        num_workers: C++ copy threads per engine.
        mmap_region: vLLM's ``SharedOffloadRegion`` to take the CPU tensors from (as
            vLLM's worker does on CUDA) when ``blocks_per_chunk == 1`` (a chunk's
            sub-blocks in its strided rows are not one uniform block stride); else, or
            when None, private tensors.

    Raises:
        ValueError: a bad ``blocks_per_chunk``, a data reference larger than its tensor's
            page, or a data reference with a canonical-layout mapping (not supported).
    """

    def __init__(self, kv_caches: CanonicalKVCaches, blocks_per_chunk: int,
                 num_cpu_chunks: int, *, pin_memory: bool | None = None,
                 num_workers: int = 2, mmap_region: Any = None):
        if type(blocks_per_chunk) is not int or blocks_per_chunk < 1:
            raise ValueError(f"blocks_per_chunk must be an int >= 1, got {blocks_per_chunk!r}")
        self.blocks_per_chunk = blocks_per_chunk
        self.num_cpu_chunks = int(num_cpu_chunks)
        gpu_views: list[torch.Tensor] = []
        cpu_tensors: list[torch.Tensor] = []
        on_cuda = False
        for t in kv_caches.tensors:
            view = t.tensor.view(torch.int8).view((-1, t.page_size_bytes))
            on_cuda = on_cuda or view.is_cuda
            gpu_views.append(view)
        pin = on_cuda if pin_memory is None else bool(pin_memory)
        for view in gpu_views:
            page = view.shape[1] * blocks_per_chunk
            if mmap_region is not None and blocks_per_chunk == 1:  # vLLM's shared region
                cpu_tensors.append(mmap_region.create_next_worker_view(page))
            else:
                cpu_tensors.append(torch.zeros((self.num_cpu_chunks, page), dtype=torch.int8,
                                               device="cpu", pin_memory=pin))
        self._mmap_region = mmap_region
        self.gpu_tensors = gpu_views
        self.cpu_tensors = cpu_tensors
        self.group_refs = [list(refs) for refs in kv_caches.group_data_refs]
        self.engines: list[AsyncSwapEngine | None] = []
        for g, refs in enumerate(self.group_refs):
            if not refs or self.num_cpu_chunks == 0:
                self.engines.append(None)
                continue
            dev, host = [], []
            for ref in refs:
                if ref.mapping is not None:
                    raise ValueError(
                        f"group {g}: canonical-layout mappings are not supported by the "
                        f"kvswitch worker (leave 'canonical_layout' off)")
                gpu, cpu = gpu_views[ref.tensor_idx], cpu_tensors[ref.tensor_idx]
                if ref.page_size_bytes > gpu.shape[1]:
                    raise ValueError(
                        f"group {g}: page_size_bytes {ref.page_size_bytes} exceeds tensor "
                        f"{ref.tensor_idx}'s page of {gpu.shape[1]} bytes")
                dev.append(gpu[:, :ref.page_size_bytes])
                # Host block c * blocks_per_chunk + j: sub-block j of chunk c. With one
                # block per chunk the rows may be strided (vLLM's shared region).
                rows = cpu if blocks_per_chunk == 1 else cpu.view(-1, gpu.shape[1])
                host.append(rows[:, :ref.page_size_bytes])
            self.engines.append(AsyncSwapEngine(
                KVLayout.from_tensors(dev), KVLayout.from_tensors(host),
                backend="auto", num_workers=num_workers))
        self._bytes_per_block = [sum(r.page_size_bytes for r in refs) for refs in self.group_refs]
        self._jobs: dict[int, _Job] = {}
        self.num_jobs = 0
        self.num_copies = 0
        self.num_pairs = 0
        # The line a vLLM user looks for to see that kvswitch does the transfers.
        backends = sorted({e.backend for e in self.engines if e is not None})
        logger.info("kvswitch offloading worker: %d KV-cache group(s), %d layer tensor(s), "
                    "%d CPU chunk(s) of %d block(s), %s backend, %d copy thread(s) per group",
                    len(self.group_refs), sum(map(len, self.group_refs)), self.num_cpu_chunks,
                    blocks_per_chunk, "/".join(backends) or "no", num_workers)

    # -- planning ------------------------------------------------------------------------

    def plan(self, gpu_spec: GPULoadStoreSpec, cpu_spec: LoadStoreSpec,
             ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per KV-cache group, the job's GPU and CPU block ids, aligned pairwise.

        Honours ``group_sizes`` (the GPU blocks of each group, in order),
        ``block_indices`` (the first GPU block of group ``g`` is block ``block_indices[g]``
        of the request, so ``block_indices[g] % blocks_per_chunk`` blocks of its first CPU
        chunk are skipped) and the CPU chunk ids (``cdiv(skip + group_size,
        blocks_per_chunk)`` chunks per group, in order).

        Returns:
            One ``(gpu_ids, cpu_ids)`` pair of int64 arrays per group.

        Raises:
            TypeError: specs of the wrong type.
            ValueError: sizes that do not add up, or block ids outside the GPU or CPU
                cache.
        """
        if not isinstance(gpu_spec, GPULoadStoreSpec):
            raise TypeError(f"expected a GPULoadStoreSpec, got {type(gpu_spec).__name__}")
        if not isinstance(cpu_spec, BlockIDsLoadStoreSpec):
            raise TypeError(f"expected a CPU BlockIDsLoadStoreSpec, got "
                            f"{type(cpu_spec).__name__}")
        gpu_ids = np.asarray(gpu_spec.block_ids, dtype=np.int64)
        chunk_ids = np.asarray(cpu_spec.block_ids, dtype=np.int64)
        group_sizes: Sequence[int] = gpu_spec.group_sizes
        block_indices: Sequence[int] = gpu_spec.block_indices
        if len(group_sizes) != len(self.group_refs) or len(block_indices) != len(group_sizes):
            raise ValueError(
                f"spec has {len(group_sizes)} group sizes and {len(block_indices)} block "
                f"indices; the KV cache has {len(self.group_refs)} groups")
        bpc = self.blocks_per_chunk
        out = []
        g_off = c_off = 0
        for size, index in zip(group_sizes, block_indices, strict=True):
            size = int(size)
            if size == 0:
                out.append((gpu_ids[:0], gpu_ids[:0]))
                continue
            skip = int(index) % bpc
            n_chunks = _cdiv(size + skip, bpc)
            gpu = gpu_ids[g_off:g_off + size]
            chunks = chunk_ids[c_off:c_off + n_chunks]
            if len(gpu) != size or len(chunks) != n_chunks:
                raise ValueError("spec block ids do not cover its group sizes")
            out.append((gpu, expand_cpu_blocks(chunks, bpc, skip, size)))
            g_off += size
            c_off += n_chunks
        if g_off != len(gpu_ids) or c_off != len(chunk_ids):
            raise ValueError(
                f"spec has {len(gpu_ids)} GPU blocks and {len(chunk_ids)} CPU chunks; its "
                f"group sizes use {g_off} and {c_off}")
        for (gpu, cpu), tensor_ok in zip(out, self.engines, strict=True):
            if not len(gpu):
                continue
            if tensor_ok is None:
                raise ValueError("a transfer for a KV-cache group without CPU cache")
            if gpu.min() < 0 or gpu.max() >= tensor_ok.device_layout.num_blocks:
                raise ValueError("GPU block id out of range")
            if cpu.min() < 0 or cpu.max() >= tensor_ok.host_pool.num_blocks:
                raise ValueError("CPU chunk id out of range")
        return out

    # -- OffloadingWorker ----------------------------------------------------------------

    def _submit(self, job_id: int, gpu_spec: GPULoadStoreSpec, cpu_spec: LoadStoreSpec,
                store: bool) -> bool:
        if job_id in self._jobs:
            raise ValueError(f"job {job_id} is already in flight")
        plan = self.plan(gpu_spec, cpu_spec)
        job = _Job(job_id, [], 0, time.perf_counter())
        after = torch.cuda.current_stream() if any(
            e is not None and e.backend == "cuda" for e in self.engines) else None
        for g, (gpu, cpu) in enumerate(plan):
            if not len(gpu):
                continue
            engine = self.engines[g]
            assert engine is not None
            extents = coalesce_pairs(gpu, cpu) if store else coalesce_pairs(cpu, gpu)
            job.num_bytes += len(gpu) * self._bytes_per_block[g]
            job.extents += len(extents)
            self.num_pairs += len(gpu)
            try:
                kw = {"after": after} if engine.backend == "cuda" else {}
                handle = engine.swap_out(extents, **kw) if store else engine.swap_in(extents, **kw)
            except Exception as e:  # e.g. EngineClosedError: the job fails, visibly
                job.failed = f"{type(e).__name__}: {e}"
                break
            job.handles.append(handle)
        self._jobs[job_id] = job
        self.num_jobs += 1
        return True

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec,
                     dst_spec: LoadStoreSpec) -> bool:
        """Queue GPU -> CPU copies of ``src_spec``'s blocks into ``dst_spec``'s chunks.

        Returns:
            True once queued.

        Raises:
            TypeError: see [`plan`][]; nothing is queued.
            ValueError: see [`plan`][]; nothing is queued.
        """
        return self._submit(job_id, src_spec, dst_spec, store=True)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec,
                    dst_spec: GPULoadStoreSpec) -> bool:
        """Queue CPU -> GPU copies of ``src_spec``'s chunks into ``dst_spec``'s blocks.

        Returns / Raises: as [`submit_store`][].
        """
        return self._submit(job_id, dst_spec, src_spec, store=False)

    def _result(self, job: _Job) -> TransferResult:
        errors = [h.error for h in job.handles if h.error]
        ok = not job.failed and not errors
        copies = sum(int(h.num_copies) for h in job.handles)
        self.num_copies += copies
        elapsed = [h.elapsed_s for h in job.handles if h.elapsed_s is not None]
        return TransferResult(
            job_id=job.job_id, success=ok,
            transfer_size=job.num_bytes if ok else None,
            transfer_time=(max(elapsed) if elapsed else 0.0) if ok else None)

    def get_finished(self) -> list[TransferResult]:
        """Results of the jobs finished since the last call, in submission order.

        Returns:
            ``TransferResult`` per job: ``success`` False when a copy failed or the job
            could not be queued; ``transfer_size`` in bytes and ``transfer_time`` in
            seconds (the longest of the job's per-group copy times) when it succeeded.
        """
        done = [job for job in self._jobs.values() if all(h.done() for h in job.handles)]
        results = []
        for job in done:
            del self._jobs[job.job_id]
            results.append(self._result(job))
        return results

    def wait(self, job_ids: set[int]) -> None:
        """Block (GIL released) until the given jobs are done; unknown ids are ignored.
        Failures are reported by [`get_finished`][], not raised."""
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is None:
                continue
            for h in job.handles:
                with contextlib.suppress(Exception):  # reported by get_finished
                    h.wait()

    def shutdown(self) -> None:
        """Finish queued jobs and stop the engines' threads."""
        for engine in self.engines:
            if engine is not None:
                engine.close()
        if self._mmap_region is not None:
            self._mmap_region.cleanup()
            self._mmap_region = None

    def stats(self) -> dict[str, int]:
        """Counters: ``jobs`` submitted, ``pairs`` (GPU blocks moved, per group),
        ``copies`` issued by finished jobs (extents x layer tensors)."""
        return {"jobs": self.num_jobs, "pairs": self.num_pairs, "copies": self.num_copies}
