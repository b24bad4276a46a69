"""The vLLM bench's transfers: vLLM's offloading workers on the virtual clock.

Every store and load the ``OffloadingConnector`` submits is really copied by the
configuration's worker: kvswitch's
[`KVSwitchOffloadingWorker`][kvswitch.adapters.vllm.KVSwitchOffloadingWorker] (host
backend, one copy per extent and layer tensor) or, for vLLM's native CPU offloading,
vLLM's ``CPUOffloadingWorker`` where it can run (CUDA or XPU KV caches) and otherwise
[`VllmCpuWorkerStandIn`][], which issues vLLM's copies (one per GPU block and layer
tensor, at the addresses vLLM's ``compute_sub_block_ptrs`` gives) on CPU tensors.

[`TimedWorker`][] sits between the connector and that worker. It takes each job's
*time* from the link model ([`CopyQueues`][kvswitch.bench.link_model.CopyQueues], for the
preset's bytes), reports a job finished only once the virtual clock has reached its end,
and turns a connector's wait (the flush before a preempted request's blocks are reused)
into a move of the clock. It also checks every load: the loaded GPU blocks must hold the
checksums recorded when their CPU blocks were stored, and the stamps of the logical blocks
their request expects there ([`kvswitch.bench.vllm.stamps`][]). A load failure (a failed
copy, or one injected with ``fail_load``) is reported by [`TimedWorker.failed_loads`][]
for the scheduler's failure path (``KVConnectorOutput.failed_recving``): vLLM 0.32's
offloading connector itself asserts that every transfer succeeds
(``offloading/worker.py``: "we currently do not support job failures").

Dispatch is charged once per job, not per copy: vLLM 0.32's CPU worker submits a job's
copies in one ``swap_blocks_batch`` call (``cuMemcpyBatchAsync``), as kvswitch's engine
does on CUDA 12.8+; each copy still pays the link model's per-copy latency and bandwidth.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import torch
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)
from vllm.v1.kv_offload.cpu.gpu_worker import compute_sub_block_ptrs
from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec

from kvswitch.adapters.vllm.worker import (
    KVSwitchOffloadingWorker,
    coalesce_pairs,
    expand_cpu_blocks,
)
from kvswitch.bench.link_model import CopyQueues, LinkModel
from kvswitch.bench.virtual_clock import VirtualClock
from kvswitch.bench.vllm.stamps import KVStamps, StampMismatchError

__all__ = ["NativeCPUOffloadingSpec", "TimedWorker", "VllmCpuWorkerStandIn", "copy_lengths"]


def _groups(gpu_spec: GPULoadStoreSpec, cpu_spec: LoadStoreSpec, blocks_per_chunk: int,
            ) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]]:
    """Per KV-cache group of a job: its GPU block ids, the CPU chunk ids it spans (the
    first ``ceil((skip + blocks) / blocks_per_chunk)`` left), and the blocks of its first
    chunk to skip (``block_indices[g] % blocks_per_chunk``)."""
    assert isinstance(cpu_spec, BlockIDsLoadStoreSpec)
    gpu = np.asarray(gpu_spec.block_ids, dtype=np.int64)
    chunks = np.asarray(cpu_spec.block_ids, dtype=np.int64)
    out, g_off, c_off = [], 0, 0
    for size, index in zip(gpu_spec.group_sizes, gpu_spec.block_indices, strict=True):
        size, skip = int(size), int(index) % blocks_per_chunk
        n_chunks = -(-(size + skip) // blocks_per_chunk) if size else 0
        out.append((gpu[g_off:g_off + size], chunks[c_off:c_off + n_chunks], skip))
        g_off += size
        c_off += n_chunks
    return out


def _group_pairs(gpu_spec: GPULoadStoreSpec, cpu_spec: LoadStoreSpec, blocks_per_chunk: int,
                 ) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """Per KV-cache group: its GPU block ids and the CPU block ids (GPU-block granularity,
    ``chunk * blocks_per_chunk + j``) they pair with."""
    return [(gpu, expand_cpu_blocks(chunks, blocks_per_chunk, skip, len(gpu)))
            for gpu, chunks, skip in _groups(gpu_spec, cpu_spec, blocks_per_chunk)]


def copy_lengths(worker: OffloadingWorker, gpu_spec: GPULoadStoreSpec,
                 cpu_spec: LoadStoreSpec, refs_per_group: list[int], blocks_per_chunk: int,
                 ) -> npt.NDArray[np.int64]:
    """Blocks moved by each copy of a job, in issue order: one copy per (extent, layer
    tensor) for kvswitch's worker, an extent being a run contiguous on both sides; one per
    (GPU block, layer tensor) for vLLM's workers."""
    lengths = []
    for (gpu, cpu), refs in zip(_group_pairs(gpu_spec, cpu_spec, blocks_per_chunk),
                                   refs_per_group, strict=True):
        if not len(gpu):
            continue
        if isinstance(worker, KVSwitchOffloadingWorker):
            runs = coalesce_pairs(gpu, cpu)[:, 2]
        else:
            runs = np.ones(len(gpu), dtype=np.int64)
        lengths.append(np.repeat(runs, refs))
    return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)


class VllmCpuWorkerStandIn(OffloadingWorker):
    """vLLM's ``CPUOffloadingWorker`` transfers where vLLM's worker cannot run: KV caches in
    CPU memory (vLLM 0.32's worker asserts CUDA or XPU tensors and copies with CUDA ops).

    Same CPU cache (per canonical tensor ``[num_cpu_chunks, page * blocks_per_chunk]``
    int8, chunk ``c`` holding GPU-sized blocks ``c * blocks_per_chunk + j``), same copies:
    one per (GPU block, data reference), at the addresses vLLM's own
    ``compute_sub_block_ptrs`` gives, each a ``memmove``; jobs run at submission (so in
    submission order, as vLLM's per-direction stream chain orders them) and are reported
    by the next [`get_finished`][].

    Args:
        kv_caches: vLLM's canonical KV caches (CPU tensors).
        blocks_per_chunk: GPU blocks per CPU chunk (>= 1).
        num_cpu_chunks: chunks of the CPU cache.

    """

    def __init__(self, kv_caches: CanonicalKVCaches, blocks_per_chunk: int,
                 num_cpu_chunks: int) -> None:
        self.blocks_per_chunk = blocks_per_chunk
        self.gpu_tensors = [t.tensor.view(torch.int8).view(-1, t.page_size_bytes)
                            for t in kv_caches.tensors]
        self.cpu_tensors = [torch.zeros((num_cpu_chunks, g.shape[1] * blocks_per_chunk),
                                        dtype=torch.int8) for g in self.gpu_tensors]
        # the refs' canonical mappings are ignored: the direct layout, as vLLM's worker
        # copies it without canonical_layout
        self.group_refs = [list(refs) for refs in kv_caches.group_data_refs]
        self._finished: list[TransferResult] = []
        self.num_copies = 0

    def _copy(self, job_id: int, gpu_spec: GPULoadStoreSpec, cpu_spec: LoadStoreSpec,
              store: bool) -> bool:
        bpc = self.blocks_per_chunk
        num_bytes = 0
        for g, (gpu, cpu, skip) in enumerate(_groups(gpu_spec, cpu_spec, bpc)):
            size = len(gpu)
            if not size:
                continue
            for ref in self.group_refs[g]:
                gpu_ptr = np.empty(size, dtype=np.uint64)
                cpu_ptr = np.empty(size, dtype=np.uint64)
                compute_sub_block_ptrs(gpu, 1, gpu_ptr, self.gpu_tensors[ref.tensor_idx])
                compute_sub_block_ptrs(cpu, bpc, cpu_ptr, self.cpu_tensors[ref.tensor_idx],
                                       skip_count=skip)
                src, dst = (gpu_ptr, cpu_ptr) if store else (cpu_ptr, gpu_ptr)
                for s, d in zip(src.tolist(), dst.tolist(), strict=True):
                    ctypes.memmove(d, s, ref.page_size_bytes)
                self.num_copies += size
                num_bytes += size * ref.page_size_bytes
        self._finished.append(TransferResult(job_id=job_id, success=True,
                                             transfer_size=num_bytes, transfer_time=0.0))
        return True

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec,
                     dst_spec: LoadStoreSpec) -> bool:
        """Copy GPU -> CPU now; reported by the next [`get_finished`][]."""
        return self._copy(job_id, src_spec, dst_spec, store=True)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec,
                    dst_spec: GPULoadStoreSpec) -> bool:
        """Copy CPU -> GPU now; reported by the next [`get_finished`][]."""
        return self._copy(job_id, dst_spec, src_spec, store=False)

    def get_finished(self) -> list[TransferResult]:
        done, self._finished = self._finished, []
        return done

    def wait(self, job_ids: set[int]) -> None:
        """Nothing to wait for: jobs are copied at submission."""

    def shutdown(self) -> None:
        self._finished.clear()


class NativeCPUOffloadingSpec(CPUOffloadingSpec):
    """vLLM's ``CPUOffloadingSpec`` (its sizing and its ``CPUOffloadingManager``), whose
    worker is vLLM's ``CPUOffloadingWorker`` where that runs (CUDA or XPU KV caches) and
    [`VllmCpuWorkerStandIn`][] on CPU KV caches (vLLM's ``get_worker`` refuses them)."""

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if not self._worker:
            if any(t.tensor.device.type != "cpu" for t in kv_caches.tensors):
                return super().get_worker(kv_caches)
            self._worker = VllmCpuWorkerStandIn(kv_caches, self.blocks_per_chunk,  # type: ignore[assignment]
                                                self.num_chunks)
        return self._worker  # type: ignore[return-value]


@dataclass
class _Job:
    job_id: int
    load: bool
    gpu_spec: GPULoadStoreSpec
    cpu_spec: LoadStoreSpec
    blocks: int
    copies: int
    start: float
    end: float
    load_index: int | None  #: loads submitted before this one (None for a store)


@dataclass
class TransferCounts:
    """Totals of one run's transfers (``preset_bytes``: what the link model timed)."""

    stores: int = 0
    store_blocks: int = 0
    loads: int = 0
    load_blocks: int = 0
    copies: int = 0
    preset_bytes: int = 0
    executed_bytes: int = 0
    link_s: float = 0.0  #: seconds of jobs on the link model, first dispatch to last copy
    loads_checked: int = 0
    blocks_checked: int = 0
    failed_loads: int = 0


class TimedWorker(OffloadingWorker):
    """The connector's worker on the virtual clock, with a check after every load.

    Args:
        inner: the worker that copies (kvswitch's, vLLM's or the stand-in).
        clock: the bench's virtual clock; jobs submitted at [`submit_at`][], finished
            when ``clock.now`` reaches their end.
        link: the link model.
        preset_layer_block_bytes: bytes of one GPU block of one layer tensor on the
            modelled GPU (what one block of a copy moves there).
        executed_layer_block_bytes: the same, as executed here.
        refs_per_group: data references (layer tensors) per KV-cache group.
        blocks_per_chunk: GPU blocks per CPU chunk.
        stamps: the KV cache's stamps (for the load checks).
        conversation_of: request id -> conversation index.
        fail_load: index (0-based) of a load to fail: its GPU blocks are overwritten with
            garbage and it is reported in [`failed_loads`][]; None: no injection.

    Raises (from [`get_finished`][]):
        StampMismatchError: a loaded block does not hold its checksum or its stamps.
        RuntimeError: a store failed (vLLM 0.32's connector has no path for it).
    """

    def __init__(self, inner: OffloadingWorker, clock: VirtualClock, link: LinkModel, *,
                 preset_layer_block_bytes: int, executed_layer_block_bytes: int,
                 refs_per_group: list[int], blocks_per_chunk: int, stamps: KVStamps,
                 conversation_of: Callable[[str], int], fail_load: int | None = None) -> None:
        self.inner, self.clock = inner, clock
        # One dispatch per job (batched submission; see the module), so none per copy.
        self._dispatch_s = link.dispatch_s
        self.queues = CopyQueues(replace(link, dispatch_s=0.0), 1)
        self._preset_bytes = preset_layer_block_bytes
        self._executed_bytes = executed_layer_block_bytes
        self._refs = refs_per_group
        self._bpc = blocks_per_chunk
        self.stamps = stamps
        self._conversation_of = conversation_of
        self.fail_load = fail_load
        self.submit_at = 0.0  #: virtual time at which the next submissions happen
        self.load_requests: dict[int, str] = {}  #: load job id -> request id (the loop's)
        self.failed_loads: dict[int, str] = {}  #: failed load job id -> request id
        self.counts = TransferCounts()
        self._jobs: dict[int, _Job] = {}
        self._real: dict[int, TransferResult] = {}
        self._stored: dict[int, int] = {}  # CPU block (GPU granularity) -> checksum stored

    # -- submission ----------------------------------------------------------------------

    def _schedule(self, job_id: int, load: bool, gpu_spec: GPULoadStoreSpec,
                  cpu_spec: LoadStoreSpec) -> None:
        lengths = copy_lengths(self.inner, gpu_spec, cpu_spec, self._refs, self._bpc)
        blocks = len(gpu_spec.block_ids)
        start, end = self.queues.schedule("in" if load else "out",
                                          lengths * self._preset_bytes,
                                          at=self.submit_at + self._dispatch_s)
        c = self.counts
        self._jobs[job_id] = _Job(job_id, load, gpu_spec, cpu_spec, blocks, len(lengths),
                                  start, end, c.loads if load else None)
        refs = sum(self._refs)
        if load:
            c.loads, c.load_blocks = c.loads + 1, c.load_blocks + blocks
        else:
            c.stores, c.store_blocks = c.stores + 1, c.store_blocks + blocks
        c.copies += len(lengths)
        c.preset_bytes += blocks * refs * self._preset_bytes
        c.executed_bytes += blocks * refs * self._executed_bytes
        c.link_s += end - start + self._dispatch_s

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec,
                     dst_spec: LoadStoreSpec) -> bool:
        """Record the source blocks' checksums under their CPU blocks, then submit."""
        for gpu, cpu in _group_pairs(src_spec, dst_spec, self._bpc):
            self._stored.update(zip(cpu.tolist(), self.stamps.checksums(gpu).tolist(),
                                    strict=True))
        ok = self.inner.submit_store(job_id, src_spec, dst_spec)
        self._schedule(job_id, False, src_spec, dst_spec)
        return ok

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec,
                    dst_spec: GPULoadStoreSpec) -> bool:
        ok = self.inner.submit_load(job_id, src_spec, dst_spec)
        self._schedule(job_id, True, dst_spec, src_spec)
        return ok

    # -- completion ----------------------------------------------------------------------

    def _real_result(self, job_id: int) -> TransferResult:
        if job_id not in self._real:
            self.inner.wait({job_id})
            for r in self.inner.get_finished():
                self._real[r.job_id] = r
        return self._real.pop(job_id)

    def _check_load(self, job: _Job, req_id: str) -> None:
        conversation = self._conversation_of(req_id)
        what = f"load job {job.job_id} of request {req_id}"
        for (gpu, cpu), index in zip(_group_pairs(job.gpu_spec, job.cpu_spec, self._bpc),
                                        job.gpu_spec.block_indices, strict=True):
            if not len(gpu):
                continue
            stored = np.asarray([self._stored.get(c, 0) for c in cpu.tolist()])
            got = self.stamps.checksums(gpu)
            if not np.array_equal(got, stored):
                bad = int(np.flatnonzero(got != stored)[0])
                raise StampMismatchError(f"{what}: GPU block {int(gpu[bad])} does not hold the "
                                    f"bytes stored in CPU block {int(cpu[bad])}")
            self.stamps.check_blocks(conversation, gpu, int(index), what)
            self.counts.blocks_checked += len(gpu)
        self.counts.loads_checked += 1

    def get_finished(self) -> list[TransferResult]:
        """Results of the jobs whose modelled end has passed, in submission order: the
        preset's bytes and the modelled seconds. A failed load is reported as done to
        the connector (which asserts success) and in [`failed_loads`][]."""
        for r in self.inner.get_finished():
            self._real[r.job_id] = r
        now, out = self.clock.now, []
        for job in [j for j in self._jobs.values() if j.end <= now]:
            del self._jobs[job.job_id]
            real = self._real_result(job.job_id)
            if job.load:
                req_id = self.load_requests.pop(job.job_id)
                if real.success and job.load_index == self.fail_load:  # injected
                    self.stamps.corrupt(job.gpu_spec.block_ids)
                    real = replace(real, success=False)
                if not real.success:
                    self.failed_loads[job.job_id] = req_id
                    self.counts.failed_loads += 1
                else:
                    self._check_load(job, req_id)
            elif not real.success:
                raise RuntimeError(f"store job {job.job_id} failed; vLLM 0.32's offloading "
                                   f"connector has no failure path for stores")
            out.append(TransferResult(job_id=job.job_id, success=True,
                                      transfer_size=job.blocks * sum(self._refs)
                                      * self._preset_bytes,
                                      transfer_time=job.end - job.start))
        return out

    def wait(self, job_ids: set[int]) -> None:
        """Move the clock to the end of the given jobs (a flush); the real copies are
        waited for as well."""
        ends = [self._jobs[j].end for j in job_ids if j in self._jobs]
        if ends:
            self.clock.advance_to(max(ends))
        self.inner.wait(job_ids)

    def next_end(self) -> float | None:
        """The earliest modelled end of a job in flight; None if none is."""
        return min((j.end for j in self._jobs.values()), default=None)

    def shutdown(self) -> None:
        self.inner.shutdown()
