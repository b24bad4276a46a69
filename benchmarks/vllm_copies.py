"""Copies per store job, kvswitch's vLLM worker vs vLLM's native CPU worker, and the
contiguity of vLLM's own GPU block ids (issue 12, items 3 and the copy-count target).

Replays turns of the bundled ShareGPT trace (context + output tokens) through vLLM 0.32's
``BlockPool`` (``vllm/v1/core/block_pool.py``, the GPU block allocator of its
KVCacheManager) with continuous batching on the CPU: up to ``--batch`` requests run at
once, each takes a new GPU block every ``--block-size`` tokens (prefill blocks at once,
then one per block of decode, interleaved with the other running requests), and a
finished request frees its blocks as vLLM does. For every request it records

* runs of contiguous GPU block ids in its block table (vLLM's contiguity), and
* the copies a store of its blocks to CPU issues: vLLM's native worker issues one per
  (GPU block, layer tensor) (``SingleDirectionOffloadingHandler._estimate_max_copy_ops``,
  exact for the direct layout); kvswitch's issues one per (extent, layer tensor), where
  extents are the maximal runs contiguous on both the GPU side (vLLM's ids) and the CPU
  side (chunks from :class:`KVSwitchOffloadingManager`, or from vLLM's native manager for
  comparison). Two job shapes: one job per request (the preemption flush or a finished
  request's store) and one job per scheduler step (the connector's incremental stores).

Counting only; nothing is copied. Run: python benchmarks/vllm_copies.py [--requests N]
[--gpu-allocator vllm|kvswitch].
"""

from __future__ import annotations

import argparse
import random
import statistics
from types import SimpleNamespace

import numpy as np
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.kv_offload.base import ReqContext, make_offload_key
from vllm.v1.kv_offload.cpu.gpu_worker import SingleDirectionOffloadingHandler
from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

from kvswitch import BlockGroupAllocator
from kvswitch.adapters.vllm import KVSwitchOffloadingManager, coalesce_pairs
from kvswitch.trace import load_trace


def runs(ids: list[int]) -> int:
    return 1 + int(np.count_nonzero(np.diff(np.asarray(ids)) != 1)) if ids else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--gpu-blocks", type=int, default=8192)
    ap.add_argument("--cpu-chunks", type=int, default=65536)
    ap.add_argument("--layer-tensors", type=int, default=32, help="data refs per group")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu-allocator", choices=("vllm", "kvswitch"), default="vllm",
                    help="vllm: vLLM's BlockPool; kvswitch: a counterfactual in which the "
                         "GPU block ids come from a BlockGroupAllocator (block groups per "
                         "request), what ordering vLLM's free queue per request would give")
    args = ap.parse_args()

    turns = []  # (context tokens: history + new input, output tokens) per turn
    for conv in load_trace():
        history = 0
        for t in conv.turns:
            turns.append((history + t.new_input_tokens, t.output_tokens))
            history += t.new_input_tokens + t.output_tokens
    rnd = random.Random(args.seed)
    turns = rnd.sample(turns, args.requests)
    bs = args.block_size
    max_blocks = args.gpu_blocks // args.batch
    need = [min(-(-(c + o) // bs), max_blocks) for c, o in turns]
    prompt = [min(-(-c // bs), n) for (c, _), n in zip(turns, need, strict=True)]

    pool = BlockPool(args.gpu_blocks, enable_caching=False, hash_block_size=bs)
    gpu_alloc = BlockGroupAllocator(args.gpu_blocks)

    def new_blocks(i: int, n: int) -> list:
        if args.gpu_allocator == "vllm":
            return pool.get_new_blocks(n)
        return [SimpleNamespace(block_id=b) for b in gpu_alloc.allocate(i, n).tolist()]

    def free(i: int) -> None:
        if args.gpu_allocator == "vllm":
            pool.free_blocks(reversed(tables[i]))
        else:
            gpu_alloc.free(i)
    managers = {"kvswitch": KVSwitchOffloadingManager(args.cpu_chunks),
                "vllm": CPUOffloadingManager(args.cpu_chunks)}
    tables: dict[int, list] = {}
    step_jobs: dict[int, list[list[int]]] = {}
    pending = list(range(len(turns)))
    running: list[int] = []
    gpu_runs, block_counts = [], []
    copies = {k: {"request": 0, "step": 0} for k in ("native", "kvswitch", "kvswitch_vllm_cpu")}

    cpu_ids: dict[str, dict[int, list[int]]] = {name: {} for name in managers}

    def offer(i: int, gpu_ids: list[int]) -> None:
        """The connector's store of a step's new blocks: one prepare_store per manager,
        interleaved across running requests as the scheduler issues them."""
        step_jobs[i].append(gpu_ids)
        first = sum(len(j) for j in step_jobs[i][:-1])
        keys = [make_offload_key(f"{i}:{first + j}".encode(), 0) for j in range(len(gpu_ids))]
        for name, m in managers.items():
            ctx = contexts[name][i]
            out = m.prepare_store(keys, ctx)
            assert out is not None
            cpu_ids[name].setdefault(i, []).extend(out.store_spec.block_ids.tolist())
            m.complete_store(keys, ctx)

    def finish(i: int) -> None:
        ids = [b.block_id for b in tables[i]]
        gpu_runs.append(runs(ids))
        block_counts.append(len(ids))
        for name, m in managers.items():
            m.on_request_finished(contexts[name][i])
        refs = args.layer_tensors
        # vLLM's own count for its direct layout: one descriptor per (block, ref)
        native = SingleDirectionOffloadingHandler._estimate_max_copy_ops(
            SimpleNamespace(layer_refs_per_group=[[None] * refs], _canonical_copy_plans=None),
            [len(ids)])
        copies["native"]["request"] += native
        copies["native"]["step"] += sum(
            SingleDirectionOffloadingHandler._estimate_max_copy_ops(
                SimpleNamespace(layer_refs_per_group=[[None] * refs],
                                _canonical_copy_plans=None), [len(job)])
            for job in step_jobs[i])
        for label, name in (("kvswitch", "kvswitch"), ("kvswitch_vllm_cpu", "vllm")):
            cpu = cpu_ids[name].pop(i)
            copies[label]["request"] += len(coalesce_pairs(ids, cpu)) * refs
            off = 0
            for job in step_jobs[i]:
                copies[label]["step"] += len(coalesce_pairs(job, cpu[off:off + len(job)])) * refs
                off += len(job)

    contexts: dict[str, dict[int, ReqContext]] = {name: {} for name in managers}
    while pending or running:
        while pending and len(running) < args.batch:
            i = pending.pop(0)
            for name, m in managers.items():
                contexts[name][i] = ReqContext(f"r{i}")
                m.on_new_request(contexts[name][i])
            tables[i] = new_blocks(i, prompt[i])
            step_jobs[i] = []
            offer(i, [b.block_id for b in tables[i]])
            running.append(i)
        for i in list(running):  # one decode block per running request per round
            if len(tables[i]) < need[i]:
                new = new_blocks(i, 1)
                tables[i] += new
                offer(i, [new[0].block_id])
            else:
                finish(i)
                free(i)
                running.remove(i)
        # the finished requests' CPU chunks stay cached; evict nothing (pool is large)

    n = len(block_counts)
    print(f"GPU block ids from: {args.gpu_allocator}")
    print(f"{n} requests of the ShareGPT trace, block size {bs}, batch {args.batch}, "
          f"{args.gpu_blocks} GPU blocks, {args.layer_tensors} layer tensors")
    print(f"blocks per request: mean {statistics.mean(block_counts):.1f}, "
          f"median {statistics.median(block_counts):.0f}")
    print(f"vLLM GPU block-id runs per request: mean {statistics.mean(gpu_runs):.1f}, "
          f"median {statistics.median(gpu_runs):.0f}; blocks per run "
          f"{sum(block_counts) / sum(gpu_runs):.2f}")
    for label in ("native", "kvswitch", "kvswitch_vllm_cpu"):
        c = copies[label]
        print(f"copies {label:>18}: one job per request {c['request']:>9}  "
              f"({c['request'] / copies['native']['request']:.3f} of native)   "
              f"one job per step {c['step']:>9}  "
              f"({c['step'] / copies['native']['step']:.3f} of native)")


if __name__ == "__main__":
    main()
