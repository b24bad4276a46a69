"""vLLM's worker transfer tests (tests/v1/kv_offload/cpu/test_gpu_worker.py of vLLM 0.32.0:
``test_transfer`` and ``test_transfer_multi_group``), rewritten against the public
``OffloadingWorker`` API of :class:`kvswitch.adapters.vllm.KVSwitchOffloadingWorker`.

Same parameters as vLLM's: 64 GPU blocks, 256 CPU chunks, GPU pages of 512 and 1024 bytes,
1 and 3 blocks per chunk, 4 tensors (3 mappings) or 3 groups of 2 tensors (one group
empty, one unaligned), and ``blocks_per_chunk - 1`` blocks skipped at the start of the
first chunk. The check is byte-exact: every destination block holds its source's bytes,
every other destination block is unchanged, the sources are unchanged.

Used by tests/test_vllm_adapter.py (CPU tensors, host backend) and
tests/cuda/test_vllm_worker.py (CUDA tensors, CUDA backend).
"""

from __future__ import annotations

import random

import torch
from vllm.v1.kv_offload.base import (
    CanonicalKVCacheRef,
    CanonicalKVCaches,
    CanonicalKVCacheTensor,
    GPULoadStoreSpec,
)
from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec

from kvswitch.adapters.vllm import KVSwitchOffloadingWorker

NUM_GPU_BLOCKS = 64
NUM_CPU_CHUNKS = 256
GPU_PAGE_SIZES = [512, 1024]
BLOCKS_PER_CHUNK_VALUES = [1, 3]
NUM_TENSORS = 4
NUM_MAPPINGS = 3
NUM_MAPPINGS_PER_GROUP = 2


def make_caches(num_tensors: int, page: int, device: str,
                groups: list[list[int]]) -> CanonicalKVCaches:
    tensors = [CanonicalKVCacheTensor(
        tensor=torch.zeros((NUM_GPU_BLOCKS, page), dtype=torch.int8, device=device),
        page_size_bytes=page) for _ in range(num_tensors)]
    refs = [[CanonicalKVCacheRef(tensor_idx=i, page_size_bytes=page) for i in g]
            for g in groups]
    return CanonicalKVCaches(tensors=tensors, group_data_refs=refs)


def run_job(worker: KVSwitchOffloadingWorker, gpu_to_cpu: bool, gpu_spec: GPULoadStoreSpec,
            cpu_spec: CPULoadStoreSpec, job_id: int = 1):
    """Submit one job, wait for it through the public API, return its TransferResult."""
    if gpu_to_cpu:
        assert worker.submit_store(job_id, gpu_spec, cpu_spec)
    else:
        assert worker.submit_load(job_id, cpu_spec, gpu_spec)
    worker.wait({job_id})
    finished = worker.get_finished()
    assert [r.job_id for r in finished] == [job_id]
    return finished[0]


def randomize(worker: KVSwitchOffloadingWorker, rng: torch.Generator) -> None:
    for t in [*worker.gpu_tensors, *worker.cpu_tensors]:
        t.copy_(torch.randint(-128, 128, t.shape, dtype=torch.int8, generator=rng))


def check_bytes(worker: KVSwitchOffloadingWorker, gpu_to_cpu: bool, page: int,
                tensor_ids: list[int], dst_to_src: dict[int, int],
                orig_gpu: list[torch.Tensor], orig_cpu: list[torch.Tensor]) -> None:
    """Byte-exact check at GPU-page granularity for the tensors in ``tensor_ids``.

    ``dst_to_src`` maps destination blocks to source blocks (CPU blocks counted as
    ``chunk * blocks_per_chunk + j``); tensors outside ``tensor_ids`` must be unchanged.
    """
    for t in range(len(worker.gpu_tensors)):
        gpu = worker.gpu_tensors[t].cpu().reshape(-1, page)
        cpu = worker.cpu_tensors[t].reshape(-1, page)
        og, oc = orig_gpu[t].reshape(-1, page), orig_cpu[t].reshape(-1, page)
        src, dst, orig_src, orig_dst = (gpu, cpu, og, oc) if gpu_to_cpu else (cpu, gpu, oc, og)
        assert torch.equal(src, orig_src), "a source block changed"
        if t not in tensor_ids:
            assert torch.equal(dst, orig_dst), f"tensor {t} is outside the job but changed"
            continue
        expected = orig_dst.clone()
        for d, s in dst_to_src.items():
            expected[d] = orig_src[s]
        assert torch.equal(dst, expected), f"tensor {t}: destination bytes differ"


def case_transfer(device: str, gpu_to_cpu: bool, page: int, bpc: int, seed: int = 0,
                  worker_cls=KVSwitchOffloadingWorker) -> None:
    """vLLM's test_transfer: one group of NUM_TENSORS tensors, NUM_MAPPINGS chunks
    (``worker_cls``: any worker taking ``(kv_caches, blocks_per_chunk=, num_cpu_chunks=)``
    with ``gpu_tensors`` and ``cpu_tensors`` in vLLM's layout)."""
    rnd = random.Random(seed)
    rng = torch.Generator().manual_seed(seed)
    caches = make_caches(NUM_TENSORS, page, device, [list(range(NUM_TENSORS))])
    worker = worker_cls(caches, blocks_per_chunk=bpc, num_cpu_chunks=NUM_CPU_CHUNKS)
    try:
        gpu_blocks = rnd.sample(range(NUM_GPU_BLOCKS), NUM_MAPPINGS * bpc)
        cpu_chunks = rnd.sample(range(NUM_CPU_CHUNKS), NUM_MAPPINGS)
        cpu_expanded = [c * bpc + j for c in cpu_chunks for j in range(bpc)]
        skip = bpc - 1
        gpu_blocks, cpu_expanded = gpu_blocks[skip:], cpu_expanded[skip:]
        gpu_spec = GPULoadStoreSpec(gpu_blocks, group_sizes=(len(gpu_blocks),),
                                    block_indices=(skip,))
        cpu_spec = CPULoadStoreSpec(cpu_chunks)
        dst_to_src = (dict(zip(cpu_expanded, gpu_blocks, strict=True)) if gpu_to_cpu
                      else dict(zip(gpu_blocks, cpu_expanded, strict=True)))
        randomize(worker, rng)
        orig_gpu = [t.cpu().clone() for t in worker.gpu_tensors]
        orig_cpu = [t.clone() for t in worker.cpu_tensors]
        result = run_job(worker, gpu_to_cpu, gpu_spec, cpu_spec)
        assert result.success
        assert result.transfer_size == len(gpu_blocks) * NUM_TENSORS * page
        assert result.transfer_time is not None and result.transfer_time >= 0
        check_bytes(worker, gpu_to_cpu, page, list(range(NUM_TENSORS)), dst_to_src,
                    orig_gpu, orig_cpu)
    finally:
        worker.shutdown()


def case_transfer_multi_group(device: str, gpu_to_cpu: bool, page: int, bpc: int,
                              seed: int = 0, worker_cls=KVSwitchOffloadingWorker) -> None:
    """vLLM's test_transfer_multi_group: 3 groups of 2 tensors; group 0 aligned, group 1
    empty, group 2 starting ``bpc - 1`` blocks into its first chunk."""
    rnd = random.Random(seed)
    rng = torch.Generator().manual_seed(seed)
    groups = [[0, 1], [2, 3], [4, 5]]
    caches = make_caches(6, page, device, groups)
    worker = worker_cls(caches, blocks_per_chunk=bpc, num_cpu_chunks=NUM_CPU_CHUNKS)
    try:
        chunks_per_group = [NUM_MAPPINGS_PER_GROUP, 0, NUM_MAPPINGS_PER_GROUP]
        gpu_all = rnd.sample(range(NUM_GPU_BLOCKS), sum(chunks_per_group) * bpc)
        cpu_all = rnd.sample(range(NUM_CPU_CHUNKS), sum(chunks_per_group))
        gpu_ids: list[int] = []
        sizes: list[int] = []
        indices: list[int] = []
        per_group_pairs: list[dict[int, int]] = []
        g_off = c_off = 0
        for g, n in enumerate(chunks_per_group):
            gpu = gpu_all[g_off:g_off + n * bpc]
            chunks = cpu_all[c_off:c_off + n]
            g_off += n * bpc
            c_off += n
            expanded = [c * bpc + j for c in chunks for j in range(bpc)]
            skip = bpc - 1 if g == 2 else 0
            gpu, expanded = gpu[skip:], expanded[skip:]
            gpu_ids += gpu
            sizes.append(len(gpu))
            indices.append(skip)
            per_group_pairs.append(dict(zip(expanded, gpu, strict=True)) if gpu_to_cpu
                                   else dict(zip(gpu, expanded, strict=True)))
        gpu_spec = GPULoadStoreSpec(gpu_ids, group_sizes=tuple(sizes),
                                    block_indices=tuple(indices))
        cpu_spec = CPULoadStoreSpec(cpu_all)
        randomize(worker, rng)
        orig_gpu = [t.cpu().clone() for t in worker.gpu_tensors]
        orig_cpu = [t.clone() for t in worker.cpu_tensors]
        result = run_job(worker, gpu_to_cpu, gpu_spec, cpu_spec)
        assert result.success
        assert result.transfer_size == sum(sizes) * 2 * page
        # each group's pairs land in that group's tensors only; the empty group's none
        _check_groups(worker, gpu_to_cpu, page, groups, per_group_pairs, orig_gpu, orig_cpu)
    finally:
        worker.shutdown()


def _check_groups(worker, gpu_to_cpu, page, groups, per_group_pairs, orig_gpu, orig_cpu):
    for g, pairs in enumerate(per_group_pairs):
        for t in groups[g]:
            gpu = worker.gpu_tensors[t].cpu().reshape(-1, page)
            cpu = worker.cpu_tensors[t].reshape(-1, page)
            og, oc = orig_gpu[t].reshape(-1, page), orig_cpu[t].reshape(-1, page)
            src, dst, orig_src, orig_dst = ((gpu, cpu, og, oc) if gpu_to_cpu
                                            else (cpu, gpu, oc, og))
            assert torch.equal(src, orig_src), "a source block changed"
            expected = orig_dst.clone()
            for d, s in pairs.items():
                expected[d] = orig_src[s]
            assert torch.equal(dst, expected), f"group {g} tensor {t}: bytes differ"
