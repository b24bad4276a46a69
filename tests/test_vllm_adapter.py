"""kvswitch.adapters.vllm on CPU tensors (host backend): vLLM's worker transfer tests
ported to the public API (byte-exact), extent coalescing, failures, the manager's
per-request CPU extents, and a preemption round trip. Skipped without vLLM."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

# the submodule is what tells an installed vLLM apart
pytest.importorskip("vllm.v1.kv_offload.base")
torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent / "vllm_support"))

import transfer_cases as cases  # noqa: E402
from vllm.v1.kv_offload.base import (  # noqa: E402
    GPULoadStoreSpec,
    LookupResult,
    ReqContext,
    make_offload_key,
)
from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec  # noqa: E402
from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager  # noqa: E402

from kvswitch.adapters.vllm import (  # noqa: E402
    KVSwitchOffloadingManager,
    KVSwitchOffloadingWorker,
    coalesce_pairs,
)
from kvswitch.adapters.vllm.worker import expand_cpu_blocks  # noqa: E402


@pytest.mark.parametrize("gpu_to_cpu", [True, False])
@pytest.mark.parametrize("page", cases.GPU_PAGE_SIZES)
@pytest.mark.parametrize("bpc", cases.BLOCKS_PER_CHUNK_VALUES)
def test_transfer(gpu_to_cpu, page, bpc):
    cases.case_transfer("cpu", gpu_to_cpu, page, bpc)


@pytest.mark.parametrize("gpu_to_cpu", [True, False])
@pytest.mark.parametrize("page", cases.GPU_PAGE_SIZES)
@pytest.mark.parametrize("bpc", cases.BLOCKS_PER_CHUNK_VALUES)
def test_transfer_multi_group(gpu_to_cpu, page, bpc):
    cases.case_transfer_multi_group("cpu", gpu_to_cpu, page, bpc)


def test_coalesce_pairs():
    ext = coalesce_pairs(np.array([4, 5, 6, 9, 10, 2]), np.array([0, 1, 2, 3, 4, 8]))
    assert ext.tolist() == [[4, 0, 3], [9, 3, 2], [2, 8, 1]]
    assert coalesce_pairs(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).shape \
        == (0, 3)
    # a run must ascend on both sides
    assert coalesce_pairs(np.array([1, 2, 3]), np.array([7, 9, 10])).tolist() == [
        [1, 7, 1], [2, 9, 2]]


def test_expand_cpu_blocks_skips_into_first_chunk():
    assert expand_cpu_blocks(np.array([5, 2]), 3, 2, 4).tolist() == [17, 6, 7, 8]
    assert expand_cpu_blocks(np.array([5, 2]), 1, 0, 2).tolist() == [5, 2]


def _worker(num_tensors=2, page=256, bpc=1, groups=None):
    caches = cases.make_caches(num_tensors, page, "cpu", groups or [list(range(num_tensors))])
    return KVSwitchOffloadingWorker(caches, blocks_per_chunk=bpc, num_cpu_chunks=32)


def test_contiguous_job_is_one_copy_per_tensor():
    """GPU blocks 10..17 to CPU chunks 4..11: one extent, so one copy per layer tensor,
    where vLLM's worker issues one per block per tensor (8 x 2)."""
    worker = _worker(num_tensors=2)
    try:
        spec = GPULoadStoreSpec(list(range(10, 18)), group_sizes=(8,), block_indices=(0,))
        result = cases.run_job(worker, True, spec, CPULoadStoreSpec(list(range(4, 12))))
        assert result.success
        assert worker.stats()["copies"] == 2
        assert worker.stats()["pairs"] == 8
    finally:
        worker.shutdown()


def test_bad_spec_raises_and_queues_nothing():
    worker = _worker()
    try:
        with pytest.raises(ValueError):
            worker.submit_store(1, GPULoadStoreSpec([1, 2], group_sizes=(2,),
                                                    block_indices=(0,)),
                                CPULoadStoreSpec([0]))  # one chunk for two blocks
        with pytest.raises(ValueError):
            worker.submit_store(2, GPULoadStoreSpec([1, 99], group_sizes=(2,),
                                                    block_indices=(0,)),
                                CPULoadStoreSpec([0, 1]))  # GPU block out of range
        assert worker.get_finished() == []
        assert worker.stats()["jobs"] == 0
    finally:
        worker.shutdown()


def test_failed_submission_is_a_failed_result():
    """A job kvswitch cannot run (here: its engine is closed) finishes as a failed
    TransferResult, never as a silent success."""
    worker = _worker()
    worker.shutdown()
    spec = GPULoadStoreSpec([1, 2], group_sizes=(2,), block_indices=(0,))
    assert worker.submit_store(7, spec, CPULoadStoreSpec([0, 1]))
    (result,) = worker.get_finished()
    assert result.job_id == 7 and result.success is False
    assert result.transfer_size is None


def _key(i: int, group: int = 0):
    return make_offload_key(f"h{i}".encode(), group)


def test_manager_request_chunks_are_contiguous_across_stores():
    """Two requests storing alternately (as the scheduler offloads each step's new
    blocks) each get one CPU extent; vLLM's pool interleaves them."""
    kv = KVSwitchOffloadingManager(64)
    native = CPUOffloadingManager(64)
    a, b = ReqContext("a"), ReqContext("b")
    ids = {"kv": {"a": [], "b": []}, "native": {"a": [], "b": []}}
    for step in range(4):
        for ctx in (a, b):
            keys = [_key(100 * ord(ctx.req_id) + 2 * step + j) for j in range(2)]
            for name, m in (("kv", kv), ("native", native)):
                out = m.prepare_store(keys, ctx)
                assert out is not None
                ids[name][ctx.req_id] += out.store_spec.block_ids.tolist()
                m.complete_store(keys, ctx)

    def runs(x):
        return 1 + int(np.count_nonzero(np.diff(x) != 1))

    assert runs(ids["kv"]["a"]) == 1 and runs(ids["kv"]["b"]) == 1
    assert runs(ids["native"]["a"]) == 4
    assert kv.chunk_runs("a") == [(ids["kv"]["a"][0], 8)]
    kv.allocator.check_invariants()


@pytest.mark.parametrize("policy", ["lru", "arc"])
def test_manager_eviction_returns_chunks_to_allocator(policy):
    m = KVSwitchOffloadingManager(4, cache_policy=policy, enable_events=True)
    ctx = ReqContext("r")
    keys = [_key(i) for i in range(4)]
    m.prepare_store(keys, ctx)
    m.complete_store(keys, ctx)
    out = m.prepare_store([_key(9)], ReqContext("s"))
    assert out is not None and len(out.evicted_keys) == 1
    m.complete_store([_key(9)], ReqContext("s"))
    assert m.lookup(_key(9), ctx) == LookupResult.HIT
    assert m.lookup(out.evicted_keys[0], ctx) == LookupResult.MISS
    m.allocator.check_invariants()
    assert m.allocator.num_used_blocks == 4
    events = list(m.take_events())
    assert [e.removed for e in events] == [False, True, False]


def test_manager_failed_store_frees_chunks():
    m = KVSwitchOffloadingManager(8)
    ctx = ReqContext("r")
    keys = [_key(i) for i in range(3)]
    m.prepare_store(keys, ctx)
    m.complete_store(keys, ctx, success=False)
    assert m.chunk_runs("r") == []  # returns freed chunks to the allocator first
    assert m.allocator.num_used_blocks == 0
    assert all(m.lookup(k, ctx) == LookupResult.MISS for k in keys)
    m.allocator.check_invariants()


def test_manager_rejects_bad_options():
    with pytest.raises(ValueError):
        KVSwitchOffloadingManager(4, chunk_order="fifo")
    with pytest.raises(ValueError):
        KVSwitchOffloadingManager(4, initial_group_chunks=0)


def test_preempted_request_resumes_from_cpu_blocks():
    """A request preempted with offload_prompt_only=False (prompt and decode blocks
    stored) resumes from CPU: the scheduler-side manager finds every block (HIT), the
    worker reloads them into other GPU blocks, and the bytes are exactly those stored,
    though the request's old GPU blocks were overwritten by another request meanwhile.
    """
    page, bpc = 256, 1
    worker = _worker(num_tensors=2, page=page, bpc=bpc)
    manager = KVSwitchOffloadingManager(32)
    ctx = ReqContext("req-0")
    try:
        rng = torch.Generator().manual_seed(3)
        for t in worker.gpu_tensors:
            t.copy_(torch.randint(-128, 128, t.shape, dtype=torch.int8, generator=rng))
        # prompt blocks 3..7 (stored at prefill), decode blocks 20, 21 (stored at the
        # preemption flush, as offload_prompt_only=False does)
        prompt, decode = [3, 4, 5, 6, 7], [20, 21]
        stored = {}
        job = 0
        for gpu_blocks, first in ((prompt, 0), (decode, len(prompt))):
            keys = [_key(first + i) for i in range(len(gpu_blocks))]
            out = manager.prepare_store(keys, ctx)
            assert out is not None and out.keys_to_store == keys
            job += 1
            result = cases.run_job(worker, True, GPULoadStoreSpec(
                gpu_blocks, group_sizes=(len(gpu_blocks),), block_indices=(first,)),
                out.store_spec, job_id=job)
            assert result.success
            manager.complete_store(keys, ctx)
            for i, b in enumerate(gpu_blocks):
                stored[first + i] = [t[b].clone() for t in worker.gpu_tensors]
        # the request's CPU chunks form one extent although stored in two jobs
        assert len(manager.chunk_runs("req-0")) == 1
        # preemption: GPU blocks freed and reused by another request
        for t in worker.gpu_tensors:
            t[prompt + decode] = 0
        # resume: lookup, then load into fresh GPU blocks 40..46
        keys = [_key(i) for i in range(7)]
        assert all(manager.lookup(k, ctx) == LookupResult.HIT for k in keys)
        load = manager.prepare_load(keys, ctx)
        new_blocks = list(range(40, 47))
        job += 1
        result = cases.run_job(worker, False, GPULoadStoreSpec(
            new_blocks, group_sizes=(7,), block_indices=(0,)), load, job_id=job)
        assert result.success
        manager.complete_load(keys, ctx)
        for i, b in enumerate(new_blocks):
            for t, want in zip(worker.gpu_tensors, stored[i], strict=True):
                assert torch.equal(t[b], want), f"block {i} differs after reload"
    finally:
        worker.shutdown()


def test_spec_loads_through_vllm_factory():
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

    from kvswitch.adapters.vllm import KVSwitchOffloadingSpec

    cls = OffloadingSpecFactory.get_spec_cls({
        "spec_name": "KVSwitchOffloadingSpec", "spec_module_path": "kvswitch.adapters.vllm"})
    assert cls is KVSwitchOffloadingSpec


def _replicated_spec(rank, bpc, cpu_bytes, page, num_tensors, engine_id):
    from vllm.v1.kv_offload.config import (
        OffloadingCacheConfig,
        OffloadingConfig,
        OffloadingGroupConfig,
        OffloadingModelConfig,
        OffloadingParallelConfig,
    )

    from kvswitch.adapters.vllm import KVSwitchOffloadingSpec

    return KVSwitchOffloadingSpec(OffloadingConfig(
        groups=(OffloadingGroupConfig(16, ("layer",), 0),),
        worker_kv_bytes_per_block=page * num_tensors, enable_kv_cache_events=False,
        extra_config={"cpu_bytes_to_use": cpu_bytes}, engine_id=engine_id,
        model=OffloadingModelConfig(name="mla-test", dtype="bfloat16"),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=bpc),
        parallel=OffloadingParallelConfig(
            rank=rank, world_size=8, tp_size=8, pp_size=1, pcp_size=1, dcp_size=1,
            data_parallel_index=0, data_parallel_size=1, data_parallel_rank_local=None,
            is_parallelism_agnostic=False),
        replicated_layout=True))


@pytest.mark.parametrize("bpc", [1, 2, 3])
def test_replicated_layout_ranks_share_one_cpu_copy(bpc, monkeypatch):
    """A replicated layout (one MLA KV copy for all tensor-parallel ranks), 8 ranks: all of
    them map one shared region of at most cpu_bytes_to_use and allocate nothing private,
    whatever the blocks per chunk (vLLM's spec holds 1x; each rank used to allocate the
    whole budget privately when blocks_per_chunk > 1, 8x). What rank 0 stores, rank 7
    loads."""
    import os
    import uuid

    import vllm.v1.kv_offload.cpu.spec as vllm_cpu_spec
    from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion

    from kvswitch.adapters.vllm import KVSwitchOffloadingSpec

    # vLLM enables the replicated layout only where its workers share an mmap region
    # (CUDA, XPU): that platform, simulated. One process plays the node's 8 ranks, so no
    # barrier (it would unlink the file before the next rank opens it).
    monkeypatch.setattr(KVSwitchOffloadingSpec, "_uses_shared_region", lambda self: True)
    monkeypatch.setattr(vllm_cpu_spec, "SharedOffloadRegion",
                        lambda **kw: SharedOffloadRegion(**{**kw, "barrier": None}))
    page, num_tensors, cpu_bytes = 512, 2, 1 << 20
    engine_id = f"kvswitch-test-{uuid.uuid4().hex}"
    workers = []
    try:
        for rank in range(8):
            spec = _replicated_spec(rank, bpc, cpu_bytes, page, num_tensors, engine_id)
            assert spec.replicated_layout and spec.num_chunks > 0
            caches = cases.make_caches(num_tensors, page, "cpu", [list(range(num_tensors))])
            workers.append(spec.create_worker(caches))
        private, files = 0, {}
        for w in workers:
            region = w._mmap_region
            base = region.base_tensor.data_ptr() if region is not None else 0
            for t in w.cpu_tensors:
                inside = region is not None and base <= t.data_ptr() < base + \
                    region.total_size_bytes
                private += 0 if inside else t.untyped_storage().nbytes()
            if region is not None:
                files[os.fstat(region.fd).st_ino] = region.total_size_bytes
        host_bytes = private + sum(files.values())
        assert private == 0 and len(files) == 1, (private, files)
        assert host_bytes <= cpu_bytes
        # rank 0 stores GPU blocks 5..12 to chunks from 1; rank 7 loads them into 30..37
        n = 8
        first, last = workers[0], workers[7]
        rng = torch.Generator().manual_seed(bpc)
        for t in first.gpu_tensors:
            t.copy_(torch.randint(-128, 128, t.shape, dtype=torch.int8, generator=rng))
        chunks = CPULoadStoreSpec(list(range(1, 1 + -(-n // bpc))))
        assert cases.run_job(first, True, GPULoadStoreSpec(
            list(range(5, 5 + n)), group_sizes=(n,), block_indices=(0,)), chunks).success
        assert cases.run_job(last, False, GPULoadStoreSpec(
            list(range(30, 30 + n)), group_sizes=(n,), block_indices=(0,)), chunks).success
        for src, dst in zip(first.gpu_tensors, last.gpu_tensors, strict=True):
            assert torch.equal(src[5:5 + n], dst[30:30 + n])
    finally:
        for w in workers:
            w.shutdown()
    assert not os.path.exists(f"/dev/shm/vllm_offload_{engine_id}.mmap")
