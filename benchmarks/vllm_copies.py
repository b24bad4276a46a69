"""GPU block contiguity, copies per store job, prefix hits and scheduler time through vLLM's
own scheduler, with and without kvswitch's block groups (issues 12 and 23).

Replays conversations of the bundled ShareGPT trace through vLLM 0.32's real ``Scheduler``
(``schedule`` / ``update_from_output``: its ``KVCacheManager``, prefix cache, chunked
prefill and preemption) on the CPU, with no model: every scheduled request that finishes its
prefill or decodes gets its next token from its conversation's token stream. Each
conversation's turns are sequential (turn t + 1 arrives when turn t finishes, its prompt the
whole history, so it hits the prefix cache of the turns before); ``--active`` conversations
are in flight at once. The same replay runs, step for step in one loop, through

* ``vllm``: vLLM's ``Scheduler`` as shipped;
* ``kvswitch``: :class:`~kvswitch.adapters.vllm.BlockGroupScheduler` (default settings);
* ``kvswitch-window0``: the same with ``reuse_window_blocks=0`` (cached blocks reused in
  exactly vLLM's order; the other side of the prefix-caching / contiguity policy);
* ``kvswitch-windowN`` for each N of ``--windows``: other reuse windows.

For each it reports: GPU blocks per run of contiguous ids in a request's block table (the
ids vLLM's worker gets in ``SchedulerOutput``); the copies a store of the request's new
blocks issues, one job per request (the preemption flush) and one per step (the connector's
incremental stores), for vLLM's native worker (one per block and layer tensor,
``SingleDirectionOffloadingHandler._estimate_max_copy_ops``) and for kvswitch's worker (one
per extent contiguous on the GPU and the CPU side, CPU chunks from
:class:`~kvswitch.adapters.vllm.KVSwitchOffloadingManager`); the prefix-cache hit rate
(vLLM's own ``PrefixCacheStats``); and the scheduler's Python time per step
(``schedule`` + ``update_from_output``). Counting only; nothing is copied.

Run: python benchmarks/vllm_copies.py [--requests N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from _manager_rounds import machine  # benchmarks/, run as a script
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.kv_offload.base import ReqContext, make_offload_key
from vllm.v1.kv_offload.cpu.gpu_worker import SingleDirectionOffloadingHandler
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from kvswitch.adapters.vllm import (
    BlockGroupConfig,
    BlockGroupScheduler,
    KVSwitchOffloadingManager,
    coalesce_pairs,
)
from kvswitch.trace import load_trace

# A model config only: the scheduler reads the context length and a few flags from it.
MODEL_DIR = (Path(__file__).resolve().parent.parent / "tests" / "vllm_support" / "hf_cache"
             / "hub" / "models--facebook--opt-125m" / "snapshots" / "local")


def runs(ids: list[int]) -> int:
    return 1 + int(np.count_nonzero(np.diff(np.asarray(ids)) != 1)) if ids else 0


def native_copies(blocks: int, refs: int) -> int:
    """vLLM's own count for its direct layout: one descriptor per (block, layer tensor)."""
    handler = SimpleNamespace(layer_refs_per_group=[[None] * refs], _canonical_copy_plans=None)
    return SingleDirectionOffloadingHandler._estimate_max_copy_ops(handler, [blocks])


def make_scheduler(args: argparse.Namespace, scheduler_cls: type,
                   kvswitch: dict | None) -> Scheduler:
    max_len = args.max_model_len
    model = ModelConfig(model=str(MODEL_DIR), skip_tokenizer_init=True, dtype="float16",
                        seed=0, max_model_len=max_len,
                        hf_overrides={"max_position_embeddings": max_len})
    sched = SchedulerConfig(max_num_seqs=args.batch, max_num_batched_tokens=args.max_batched,
                            max_model_len=max_len, is_encoder_decoder=False,
                            enable_chunked_prefill=True, scheduler_cls=scheduler_cls)
    cache = CacheConfig(block_size=args.block_size, enable_prefix_caching=True)
    vllm_config = VllmConfig(scheduler_config=sched, model_config=model, cache_config=cache,
                             additional_config={"kvswitch": kvswitch} if kvswitch else {})
    spec = FullAttentionSpec(block_size=args.block_size, num_kv_heads=1, head_size=1,
                             dtype=torch.float32)
    kv_cache_config = KVCacheConfig(num_blocks=args.gpu_blocks, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    cache.num_gpu_blocks = args.gpu_blocks
    return scheduler_cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                         block_size=args.block_size, log_stats=True,
                         structured_output_manager=StructuredOutputManager(vllm_config))


@dataclass
class Replay:
    """One scheduler driven through the conversations."""

    name: str
    scheduler: Scheduler
    convs: list[list[tuple[int, int]]]  # per conversation: (prompt tokens, output tokens)
    args: argparse.Namespace
    cpu: KVSwitchOffloadingManager = field(init=False)
    next_conv: int = 0
    turn: dict[int, int] = field(default_factory=dict)  # conversation -> next turn
    owner: dict[str, int] = field(default_factory=dict)  # request -> conversation
    requests: dict[str, Request] = field(default_factory=dict)
    tables: dict[str, list[int]] = field(default_factory=dict)  # GPU ids, group 0
    gpu_jobs: dict[str, list[list[int]]] = field(default_factory=dict)  # new ids per step
    cpu_jobs: dict[str, list[list[int]]] = field(default_factory=dict)  # their CPU chunks
    step_s: list[float] = field(default_factory=list)
    run_counts: list[int] = field(default_factory=list)
    block_counts: list[int] = field(default_factory=list)
    copies: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("native_request", "native_step", "kvswitch_request", "kvswitch_step"), 0))
    queries: int = 0
    hits: int = 0
    preemptions: int = 0
    done: int = 0

    def __post_init__(self) -> None:
        self.cpu = KVSwitchOffloadingManager(self.args.cpu_chunks)

    @staticmethod
    def token(conv: int, i: int) -> int:
        """Token i of a conversation's stream (its history and outputs alike)."""
        return (conv * 7919 + i * 104729) % 50000 + 10

    def submit(self, conv: int) -> None:
        t = self.turn.get(conv, 0)
        if t >= len(self.convs[conv]):
            return
        self.turn[conv] = t + 1
        prompt, output = self.convs[conv][t]
        req_id = f"c{conv}t{t}"
        params = SamplingParams(max_tokens=output, ignore_eos=True)
        params.update_from_generation_config({}, eos_token_id=0)
        req = Request(request_id=req_id,
                      prompt_token_ids=[self.token(conv, i) for i in range(prompt)],
                      sampling_params=params, pooling_params=None,
                      block_hasher=get_request_block_hasher(self.args.block_size, sha256))
        self.owner[req_id] = conv
        self.requests[req_id] = req
        self.tables[req_id] = []
        self.gpu_jobs[req_id] = []
        self.cpu_jobs[req_id] = []
        self.cpu.on_new_request(ReqContext(req_id))
        self.scheduler.add_request(req)

    def fill(self) -> None:
        while (self.next_conv < len(self.convs)
               and len(self.owner) < self.args.active):
            self.submit(self.next_conv)
            self.next_conv += 1

    def record(self, req_id: str, ids: list[int], resumed: bool) -> None:
        if resumed:  # after a preemption the request's table starts over
            self.tables[req_id] = []
        if not ids:
            return
        self.tables[req_id].extend(ids)
        first = sum(len(j) for j in self.gpu_jobs[req_id])
        self.gpu_jobs[req_id].append(ids)
        # the connector's store of the step's new blocks: CPU chunks for them
        keys = [make_offload_key(f"{req_id}:{first + j}".encode(), 0) for j in range(len(ids))]
        ctx = ReqContext(req_id)
        out = self.cpu.prepare_store(keys, ctx)
        assert out is not None
        self.cpu_jobs[req_id].append(out.store_spec.block_ids.tolist())
        self.cpu.complete_store(keys, ctx)

    def finish(self, req_id: str) -> None:
        refs = self.args.layer_tensors
        table = self.tables.pop(req_id)
        self.run_counts.append(runs(table))
        self.block_counts.append(len(table))
        gpu_jobs, cpu_jobs = self.gpu_jobs.pop(req_id), self.cpu_jobs.pop(req_id)
        gpu_all = [b for j in gpu_jobs for b in j]
        cpu_all = [b for j in cpu_jobs for b in j]
        c = self.copies
        c["native_request"] += native_copies(len(gpu_all), refs) if gpu_all else 0
        c["native_step"] += sum(native_copies(len(j), refs) for j in gpu_jobs)
        c["kvswitch_request"] += len(coalesce_pairs(gpu_all, cpu_all)) * refs
        c["kvswitch_step"] += sum(len(coalesce_pairs(g, k)) * refs
                                  for g, k in zip(gpu_jobs, cpu_jobs, strict=True))
        self.cpu.on_request_finished(ReqContext(req_id))
        conv = self.owner.pop(req_id)
        self.requests.pop(req_id)
        self.done += 1
        self.submit(conv)

    def step(self) -> bool:
        """One engine step; False when nothing is left."""
        sched = self.scheduler
        if not sched.has_requests():
            return False
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        for new in out.scheduled_new_reqs:
            self.record(new.req_id, list(new.block_ids[0]), resumed=True)
        cached = out.scheduled_cached_reqs
        for req_id, ids in zip(cached.req_ids, cached.new_block_ids, strict=True):
            self.record(req_id, list(ids[0]) if ids else [],
                        resumed=req_id in cached.resumed_req_ids)
        req_ids = list(out.num_scheduled_tokens)
        sampled = []
        for req_id in req_ids:
            req = self.requests[req_id]
            if req.num_computed_tokens >= req.num_tokens:  # prefill done: a token
                sampled.append([self.token(self.owner[req_id], req.num_tokens)])
            else:
                sampled.append([])
        runner = ModelRunnerOutput(req_ids=req_ids,
                                   req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                   sampled_token_ids=sampled)
        t2 = time.perf_counter()
        outputs = sched.update_from_output(out, runner)
        t3 = time.perf_counter()
        self.step_s.append((t1 - t0) + (t3 - t2))
        for eco in outputs.values():
            stats = eco.scheduler_stats
            if stats is not None and stats.prefix_cache_stats is not None:
                self.queries += stats.prefix_cache_stats.queries
                self.hits += stats.prefix_cache_stats.hits
                self.preemptions += stats.prefix_cache_stats.preempted_requests
            for o in eco.outputs:
                if o.finish_reason is not None:
                    self.finish(o.request_id)
        self.fill()
        return True


def load_conversations(args: argparse.Namespace) -> list[list[tuple[int, int]]]:
    convs = load_trace()
    random.Random(args.seed).shuffle(convs)
    out, turns = [], 0
    for conv in convs:
        history, kept = 0, []
        for t in conv.turns:
            prompt = history + t.new_input_tokens
            if prompt + t.output_tokens > args.max_model_len or t.output_tokens < 1:
                break
            kept.append((prompt, t.output_tokens))
            history = prompt + t.output_tokens
        if kept:
            out.append(kept)
            turns += len(kept)
        if turns >= args.requests:
            break
    return out


def summary(r: Replay) -> dict:
    s = sorted(r.step_s)
    return {
        "requests": r.done,
        "steps": len(s),
        "blocks_per_request": statistics.mean(r.block_counts),
        "runs_per_request": statistics.mean(r.run_counts),
        "blocks_per_run": sum(r.block_counts) / sum(r.run_counts),
        "copies": dict(r.copies),
        "prefix_hit_rate": r.hits / r.queries if r.queries else 0.0,
        "preemptions": r.preemptions,
        "step_us_mean": 1e6 * statistics.mean(s),
        "step_us_p50": 1e6 * s[len(s) // 2],
        "step_us_p90": 1e6 * s[int(len(s) * 0.9)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=400, help="turns to replay (about)")
    ap.add_argument("--active", type=int, default=32, help="conversations in flight")
    ap.add_argument("--batch", type=int, default=16, help="max_num_seqs")
    ap.add_argument("--max-batched", type=int, default=8192, help="max_num_batched_tokens")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--gpu-blocks", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--cpu-chunks", type=int, default=1 << 20)
    ap.add_argument("--layer-tensors", type=int, default=32, help="data refs per group")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, nargs="*", default=[],
                    help="more reuse windows to replay with (blocks)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    init_none_hash(sha256)
    convs = load_conversations(args)
    variants = [("vllm", Scheduler, None),
                ("kvswitch", BlockGroupScheduler, {}),
                ("kvswitch-window0", BlockGroupScheduler, {"reuse_window_blocks": 0})]
    variants += [(f"kvswitch-window{w}", BlockGroupScheduler, {"reuse_window_blocks": w})
                 for w in args.windows]
    replays = [Replay(name, make_scheduler(args, cls, cfg), convs, args)
               for name, cls, cfg in variants]
    for r in replays:
        r.fill()
    live = list(replays)
    while live:  # the schedulers take turns, step by step: the same machine noise for all
        live = [r for r in live if r.step()]

    results = {r.name: summary(r) for r in replays}
    base = results["vllm"]
    window = BlockGroupConfig().reuse_window_blocks
    print(machine())
    print(f"{len(convs)} conversations, {base['requests']} requests of the ShareGPT trace "
          f"({args.active} conversations in flight), max_num_seqs {args.batch}, block size "
          f"{args.block_size}, {args.gpu_blocks} GPU blocks, prefix caching on, "
          f"{args.layer_tensors} layer tensors; kvswitch's reuse window: "
          f"{window if window is not None else args.gpu_blocks // 64} blocks")
    head = (f"{'':>17} {'blocks/req':>10} {'runs/req':>9} {'blocks/run':>10} "
            f"{'copies/req-job':>15} {'copies/step-job':>16} {'hit rate':>9} "
            f"{'preempt':>7} {'step us p50':>11} {'mean':>7}")
    print(head)
    for name, s in results.items():
        c = s["copies"]
        kv_req = c["kvswitch_request"] / c["native_request"]
        kv_step = c["kvswitch_step"] / c["native_step"]
        print(f"{name:>17} {s['blocks_per_request']:>10.1f} {s['runs_per_request']:>9.1f} "
              f"{s['blocks_per_run']:>10.2f} {kv_req:>15.3f} {kv_step:>16.3f} "
              f"{100 * s['prefix_hit_rate']:>8.2f}% {s['preemptions']:>7} "
              f"{s['step_us_p50']:>11.1f} {s['step_us_mean']:>7.1f}")
    print("copies/…-job: kvswitch's worker over vLLM's native worker for the same job "
          "(native = 1.000); native copies per request job: "
          + ", ".join(f"{n} {s['copies']['native_request']}" for n, s in results.items()))
    for name, s in results.items():
        if name != "vllm":
            print(f"{name}: step time {s['step_us_mean'] / base['step_us_mean']:.3f}x vLLM "
                  f"(mean), {s['step_us_p50'] / base['step_us_p50']:.3f}x (p50); hit rate "
                  f"{100 * (s['prefix_hit_rate'] - base['prefix_hit_rate']):+.2f} pp")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "machine": machine(), "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
