"""``kvswitch bench --engine vllm``: a multi-turn trace through vLLM 0.32's own scheduler and
offloading connector, on the bench's virtual clock.

What runs, per configuration ([`VLLM_CONFIGURATIONS`][]):

* vLLM's ``Scheduler`` (``vllm/v1/core/sched/scheduler.py``, or the configuration's
  ``scheduler_cls``: kvswitch's ``BlockGroupScheduler``) with the priority policy and
  prefix caching, its ``KVCacheManager`` allocating the GPU blocks. Priorities follow
  FastSwitch's pattern ([`PriorityScheduler`][kvswitch.bench.priority.PriorityScheduler], Markov or
  Random, updated every ``update_every`` steps): a request's vLLM priority is minus its
  conversation's, so a priority update reorders vLLM's waiting queue and decides which
  running request vLLM preempts when a running one needs a block the pool does not have
  (vLLM 0.32 preempts only then; a waiting request never displaces a running one).
* Offloading configurations: vLLM's ``OffloadingConnector`` on both sides. The scheduler
  side (in vLLM's scheduler) looks up CPU hits and plans stores and loads through the
  spec's manager; the worker side is driven as vLLM's model runner drives it
  (``vllm.v1.worker.gpu.kv_connector.ActiveKVConnector``: preemption flushes, deferred
  stores, loads, finished jobs) and copies through the spec's worker, wrapped in
  [`TimedWorker`][kvswitch.bench.vllm.workers.TimedWorker] (link-modelled time, checks after
  every load). ``offload_prompt_only`` is off, so decode blocks are stored too and a
  preempted request's KV can come back from the CPU.
* A model-runner stand-in ([`RunnerStandIn`][kvswitch.bench.vllm.runner.RunnerStandIn]): no
  weights; the KV cache is CPU tensors holding stamps; each step's time is the cost
  model's.

The clock is virtual: a step advances it by the cost model's step time, a flush that waits
for stores by the link model's remaining time (the stall), and an idle engine jumps to the
next arrival or transfer end. Turns arrive as in the main bench (Poisson conversations,
exponential think times); a turn's prompt is the conversation's history plus its new
input, so vLLM finds the history in its GPU prefix cache or, offloading, in the CPU cache.
Same seed, same figures, on any machine.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import FinishReason
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.gpu.kv_connector import ActiveKVConnector

from kvswitch.adapters.vllm import KVSwitchOffloadingSpec, KVSwitchOffloadingWorker
from kvswitch.bench.cost_model import GPU_PRESETS, MODEL_PRESETS, CostModel
from kvswitch.bench.link_model import LINK_PRESETS
from kvswitch.bench.priority import PriorityScheduler
from kvswitch.bench.serve import ServeConfig, min_gpu_blocks
from kvswitch.bench.virtual_clock import VirtualClock
from kvswitch.bench.vllm.runner import RunnerStandIn
from kvswitch.bench.vllm.stamps import KVStamps
from kvswitch.bench.vllm.workers import NativeCPUOffloadingSpec, TimedWorker, TransferCounts
from kvswitch.trace import Conversation

__all__ = ["VLLM_CONFIGURATIONS", "WALL_S_PER_STEP", "VllmConfiguration", "VllmServeResult",
           "serve_vllm"]


@dataclass(frozen=True)
class VllmConfiguration:
    """One vLLM configuration of the bench.

    Attributes:
        offload: ``None`` (vLLM as shipped: a preempted request recomputes), ``"native"``
            (vLLM's CPU offloading spec and manager) or ``"kvswitch"``
            ([`KVSwitchOffloadingSpec`][kvswitch.adapters.vllm.KVSwitchOffloadingSpec]).
        scheduler_cls: qualified name of a ``Scheduler`` subclass (vLLM's
            ``scheduler_cls``, e.g. kvswitch's
            [`BlockGroupScheduler`][kvswitch.adapters.vllm.BlockGroupScheduler]), or None
            for vLLM's.
    """

    offload: str | None
    scheduler_cls: str | None = None


#: The configurations, side by side in one run.
VLLM_CONFIGURATIONS: dict[str, VllmConfiguration] = {
    "vllm": VllmConfiguration(None),
    "vllm+cpu": VllmConfiguration("native"),
    "vllm+kvswitch": VllmConfiguration("kvswitch"),
    # kvswitch on both sides: the same spec, and GPU blocks from per-request block groups
    "vllm+kvswitch+groups": VllmConfiguration(
        "kvswitch", scheduler_cls="kvswitch.adapters.vllm.BlockGroupScheduler"),
}

#: Wall seconds per engine step at the reference machine speed (``machine_speed() == 1``),
#: for the CLI's duration estimate: the full run of docs/benchmarks.md took 12.8 ms per
#: step (scheduler, connector, stamps, checks, copies) where the machine measured 1.49x.
WALL_S_PER_STEP = 8.6e-3
#: Vocabulary of the stand-in's tokens (Llama 2's size).
VOCAB_SIZE = 32000
#: int64 words per token and layer of the executed KV cache: a 16-token block of one layer
#: is 512 bytes (one KV head of 8 fp16 values, K and V), whatever the preset.
SLOT_WORDS = 4
_HEAD_SIZE = SLOT_WORDS * 8 // 4  # fp16 K and V: 2 tensors x 2 bytes


@dataclass
class VllmServeResult:
    """Figures of one configuration's run; ``*_s`` on the virtual clock."""

    ttft_s: list[float] = field(default_factory=list)  #: per turn
    tbt_s: list[float] = field(default_factory=list)  #: per generated token after the first
    tokens: int = 0
    makespan_s: float = 0.0
    iterations: int = 0
    turns: int = 0  #: turns of the trace
    turns_served: int = 0  #: turns that generated all their output tokens
    failed_requests: int = 0  #: turns vLLM finished with an error (kv_load_failure_policy)
    preemptions: int = 0
    recomputed_tokens: int = 0  #: tokens whose KV was computed again
    prefill_tokens: int = 0
    gpu_prefix_queries: int = 0  #: tokens looked up in vLLM's GPU prefix cache
    gpu_prefix_hits: int = 0
    cpu_prefix_queries: int = 0  #: tokens looked up through the connector (CPU cache)
    cpu_prefix_hits: int = 0
    stall_s: float = 0.0  #: steps blocked on transfers (flushes before block reuse)
    transfers: TransferCounts = field(default_factory=TransferCounts)
    contexts_checked: int = 0  #: scheduled requests whose computed prefix was checked
    context_tokens_checked: int = 0
    scheduler_class: str = ""  #: the scheduler vLLM's config selected
    spec_class: str = ""  #: the offloading spec vLLM instantiated
    worker_class: str = ""  #: the worker that copied
    worker_stats: dict = field(default_factory=dict)  #: kvswitch's worker counters
    wall_s: float = 0.0


def _model_dir(num_layers: int, max_model_len: int) -> str:
    """A Hugging Face config (no weights) of a Llama with the preset's layers and the
    executed KV shape (one KV head of ``_HEAD_SIZE``): what vLLM's ``ModelConfig`` reads."""
    path = tempfile.mkdtemp(prefix="kvswitch-vllm-bench-")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_size": 8 * _HEAD_SIZE, "intermediate_size": 16 * _HEAD_SIZE,
                   "num_attention_heads": 8, "num_key_value_heads": 1,
                   "head_dim": _HEAD_SIZE, "num_hidden_layers": num_layers,
                   "vocab_size": VOCAB_SIZE, "max_position_embeddings": max_model_len,
                   "torch_dtype": "float16", "rms_norm_eps": 1e-5}, f)
    return path


def _layer_names(num_layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]


class _RunnerConnector(ActiveKVConnector):
    """vLLM's model-runner side of a KV connector (``ActiveKVConnector``: preemption
    flushes, metadata, loads, ``wait_for_save``, finished transfers), over the given
    worker-role connector instead of the process-wide one (which needs vLLM's distributed
    groups to be set up)."""

    def __init__(self, vllm_config: VllmConfig, connector: Any,
                 kv_caches: dict[str, torch.Tensor]) -> None:
        self.vllm_config = vllm_config
        self.kv_connector = connector
        connector.register_kv_caches(kv_caches)
        self._pending_load_kwargs = None
        self._disabled = False


class _Loop:
    """One configuration's run (see the module)."""

    def __init__(self, convs: list[Conversation], cfg: ServeConfig, conf: VllmConfiguration,
                 *, fail_load: int | None, kv_load_failure_policy: str,
                 on_progress: Callable[[float], None] | None,
                 on_tokens: Callable[[int], None] | None = None) -> None:
        self.cfg, self.conf, self.convs = cfg, conf, convs
        self.on_progress, self.on_tokens = on_progress, on_tokens
        model = MODEL_PRESETS[cfg.model]
        self.cost = CostModel(model, GPU_PRESETS[cfg.gpu], cfg.efficiency)
        self.clock = VirtualClock()
        self.r = VllmServeResult(turns=sum(len(c.turns) for c in convs))
        bs, layers = cfg.block_size, model.num_layers
        # Each conversation's fixed token sequence (prompts and outputs).
        self.tokens = [np.random.default_rng([cfg.seed, i]).integers(
            0, VOCAB_SIZE, size=c.total_tokens + 1, dtype=np.int64)
            for i, c in enumerate(convs)]
        max_len = max((c.total_tokens for c in convs), default=1) + bs
        self.stamps = KVStamps(layers, cfg.gpu_blocks, bs, SLOT_WORDS)
        names = _layer_names(layers)
        page = self.stamps.page_bytes
        kv_spec = FullAttentionSpec(block_size=bs, num_kv_heads=1, head_size=_HEAD_SIZE,
                                    dtype=torch.float16)
        assert kv_spec.page_size_bytes == page
        kv_cache_config = KVCacheConfig(
            num_blocks=cfg.gpu_blocks,
            kv_cache_tensors=[KVCacheTensor(size=layers * cfg.gpu_blocks * page, layers=names,
                                            layer_stride=cfg.gpu_blocks * page,
                                            block_stride=page)],
            kv_cache_groups=[KVCacheGroupSpec(names, kv_spec)])
        transfer = None
        if conf.offload is not None:
            spec_cls = KVSwitchOffloadingSpec if conf.offload == "kvswitch" \
                else NativeCPUOffloadingSpec
            extra: dict[str, Any] = {
                "spec_name": spec_cls.__name__, "spec_module_path": spec_cls.__module__,
                "cpu_bytes_to_use": cfg.host_blocks * page * layers,
                "offload_prompt_only": False}
            if conf.offload == "kvswitch":
                # copies inline, as the main bench's virtual clock makes them: their time
                # is the link model's, so copy threads would only add hand-offs
                extra["kvswitch_num_workers"] = 0
            transfer = KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both",
                                        kv_connector_extra_config=extra,
                                        kv_load_failure_policy=kv_load_failure_policy)
        self.model_dir = _model_dir(layers, max_len)
        model_config = ModelConfig(model=self.model_dir, tokenizer=self.model_dir,
                                   skip_tokenizer_init=True, max_model_len=max_len,
                                   dtype="float16", seed=cfg.seed)
        sched_config = SchedulerConfig(
            max_model_len=max_len, is_encoder_decoder=False, max_num_seqs=cfg.max_batch,
            max_num_batched_tokens=max(cfg.max_prefill_tokens, max_len),
            max_num_scheduled_tokens=cfg.max_prefill_tokens,
            enable_chunked_prefill=True, policy="priority", watermark=cfg.watermark,
            async_scheduling=False, scheduler_cls=conf.scheduler_cls)
        cache_config = CacheConfig(block_size=bs, enable_prefix_caching=True)
        cache_config.num_gpu_blocks = cfg.gpu_blocks
        self.vllm_config = VllmConfig(model_config=model_config, scheduler_config=sched_config,
                                      cache_config=cache_config, device_config=DeviceConfig("cpu"),
                                      kv_transfer_config=transfer)
        scheduler_cls = sched_config.get_scheduler_cls() if conf.scheduler_cls else Scheduler
        self.scheduler = scheduler_cls(
            self.vllm_config, kv_cache_config, StructuredOutputManager(self.vllm_config),
            block_size=bs, log_stats=True)
        self.r.scheduler_class = type(self.scheduler).__qualname__
        hash_fn = get_hash_fn_by_name(cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self.block_hasher = get_request_block_hasher(bs, hash_fn)
        self.conversation_of: dict[str, int] = {}
        self.runner = RunnerStandIn(self.stamps, self.cost, self.tokens, self.conversation_of)
        self.kv: ActiveKVConnector | None = None
        self.worker: TimedWorker | None = None
        if transfer is not None:
            connector = KVConnectorFactory.create_connector(
                config=self.vllm_config, role=KVConnectorRole.WORKER,
                kv_cache_config=kv_cache_config)
            self.kv = _RunnerConnector(self.vllm_config, connector, dict(
                zip(names, self.stamps.layer_tensors(), strict=True)))
            connector_worker = connector.connector_worker
            inner = connector_worker.worker
            self.r.spec_class = type(connector_worker.spec).__qualname__
            self.r.worker_class = type(inner).__qualname__
            self.worker = TimedWorker(
                inner, self.clock, cfg.link or LINK_PRESETS[cfg.gpu],
                preset_layer_block_bytes=2 * model.region_block_bytes(bs),
                executed_layer_block_bytes=page, refs_per_group=[layers],
                blocks_per_chunk=connector_worker.spec.blocks_per_chunk, stamps=self.stamps,
                conversation_of=self.conversation_of.__getitem__, fail_load=fail_load)
            connector_worker.worker = self.worker  # the connector's worker, on the clock
        self.prio = PriorityScheduler(cfg.pattern, cfg.update_every, seed=cfg.seed)
        arrivals, self.think = random.Random(cfg.seed + 1), random.Random(cfg.seed + 2)
        self.events: list[tuple[float, int]] = []  # (time, conversation): a turn arrives
        t = 0.0
        for i, c in enumerate(convs):
            t += arrivals.expovariate(cfg.arrival_rate)
            heapq.heappush(self.events, (c.arrival_s if c.arrival_s is not None else t, i))
        self.start = self.events[0][0] if self.events else 0.0
        self.turn = [0] * len(convs)
        self.history = [0] * len(convs)  # tokens of the turns before the current one
        self.arrived: dict[str, float] = {}  # request id -> its turn's arrival
        self.last_token: dict[str, float] = {}
        self.finished_convs = 0

    # -- requests -------------------------------------------------------------------------

    def _arrive(self) -> None:
        while self.events and self.events[0][0] <= self.clock.now:
            t, i = heapq.heappop(self.events)
            turn = self.convs[i].turns[self.turn[i]]
            req_id = f"c{i}t{self.turn[i]}"
            prompt = self.tokens[i][:self.history[i] + turn.new_input_tokens].tolist()
            self.conversation_of[req_id] = i
            self.prio.add(i)
            self.scheduler.add_request(Request(
                req_id, prompt, SamplingParams(max_tokens=max(turn.output_tokens, 1),
                                               ignore_eos=True, detokenize=False),
                None, arrival_time=t, priority=-self.prio.priority(i),
                block_hasher=self.block_hasher))
            self.arrived[req_id] = t

    def _update_priorities(self) -> None:
        """A priority update: new priorities on every request vLLM holds; vLLM's waiting
        queues are heaps ordered by priority, so they are refilled after the change."""
        self.prio.update()
        s = self.scheduler
        queues = [s.waiting, s.kv_holding_waiting]
        queued = [[q.pop_request() for _ in range(len(q))] for q in queues]
        for req in s.requests.values():
            req.priority = -self.prio.priority(self.conversation_of[req.request_id])
        for q, reqs in zip(queues, queued, strict=True):
            for req in reqs:
                q.add_request(req)

    def _finish(self, req_id: str, reason: FinishReason) -> None:
        i = self.conversation_of[req_id]
        self.last_token.pop(req_id, None)
        self.runner.forget(req_id)
        turn = self.convs[i].turns[self.turn[i]]
        if reason != FinishReason.LENGTH:  # vLLM gave up on it (a KV load failure)
            self.r.failed_requests += 1
            self.prio.remove(i)
            self.finished_convs += 1
            return
        self.r.turns_served += 1
        self.history[i] += turn.new_input_tokens + turn.output_tokens
        self.turn[i] += 1
        if self.turn[i] == len(self.convs[i].turns):
            self.prio.remove(i)
            self.finished_convs += 1
            return
        think = self.think.expovariate(1 / self.cfg.think_s) if self.cfg.think_s > 0 else 0.0
        heapq.heappush(self.events, (self.clock.now + think, i))

    def _count_hits(self, gpu: Any, cpu: Any) -> None:
        """Add a step's prefix-cache statistics (vLLM's ``PrefixCacheStats``: tokens
        queried and hit, new and preempted requests apart) to the run's."""
        r = self.r
        r.gpu_prefix_queries += gpu.queries + gpu.preempted_queries
        r.gpu_prefix_hits += gpu.hits + gpu.preempted_hits
        if cpu is not None:
            r.cpu_prefix_queries += cpu.queries + cpu.preempted_queries
            r.cpu_prefix_hits += cpu.hits + cpu.preempted_hits

    # -- the loop -------------------------------------------------------------------------

    def _step(self, iteration: int) -> bool:
        """One engine step; False when it had nothing to do."""
        s, r, clock = self.scheduler, self.r, self.clock
        if self.prio.is_update(iteration):
            self._update_priorities()
        so = s.schedule()
        r.preemptions += len(so.preempted_req_ids or ())
        t0 = clock.now
        if self.kv is not None:
            assert self.worker is not None
            self.worker.submit_at = t0
            self.kv.pre_forward(so)  # flushes (stores a preemption must wait for)
            r.stall_s += clock.now - t0
            self.worker.submit_at = clock.now  # loads start with the forward
            self.worker.load_requests.update(
                (job_id, job.req_id) for job_id, job in so.kv_connector_metadata.load_jobs.items())
        outcome = None
        if so.total_num_scheduled_tokens:
            outcome = self.runner.execute(so)
            clock.advance(outcome.step_s)
            mro = outcome.output
            r.recomputed_tokens += outcome.recomputed_tokens
            r.prefill_tokens += outcome.prefill_tokens
        else:
            mro = ModelRunnerOutput(req_ids=[], req_id_to_index={})
        if self.kv is not None:
            assert self.worker is not None
            kvo = self.kv.post_forward(so.finished_req_ids)
            if self.worker.failed_loads:  # the scheduler's failure path for loads
                failed = set(self.worker.failed_loads.values())
                self.worker.failed_loads.clear()
                kvo.failed_recving = set(kvo.failed_recving or ()) | failed
                kvo.finished_recving = set(kvo.finished_recving or ()) | failed
            mro.kv_connector_output = kvo
        engine_outputs = s.update_from_output(so, mro)
        for eco in engine_outputs.values():  # the step's stats ride on one of them
            if (stats := eco.scheduler_stats) is not None:
                self._count_hits(stats.prefix_cache_stats, stats.connector_prefix_cache_stats)
        now = clock.now
        if outcome is not None:
            for req_id in outcome.sampled:
                if req_id in self.last_token:
                    r.tbt_s.append(now - self.last_token[req_id])
                else:
                    r.ttft_s.append(now - self.arrived[req_id])
                self.last_token[req_id] = now
                r.tokens += 1
        self.prio.served(self.conversation_of[q] for q in so.num_scheduled_tokens)
        for eco in engine_outputs.values():
            for out in eco.outputs:
                if out.finish_reason is not None:
                    self._finish(out.request_id, out.finish_reason)
        return bool(so.total_num_scheduled_tokens) or clock.now > t0

    def run(self) -> VllmServeResult:
        r, clock = self.r, self.clock
        wall0 = time.perf_counter()
        clock.advance_to(self.start)
        iteration = idle = 0
        try:
            while self.finished_convs < len(self.convs):
                self._arrive()
                if self._step(iteration):
                    idle = 0
                else:  # nothing to compute: jump to the next arrival or transfer end
                    nexts = [t for t in (self.events[0][0] if self.events else None,
                                         self.worker.next_end() if self.worker else None)
                             if t is not None and t > clock.now]
                    if nexts:
                        clock.advance_to(min(nexts))
                        # an arrival or a finished transfer: vLLM may admit a request only
                        # a step later (a finished load is reported, then scheduled)
                        idle = 0
                    else:
                        idle += 1
                        if idle > 2:  # steps that did nothing, with nothing to wait for
                            raise RuntimeError(self._stall_reason())
                iteration += 1
                if self.on_progress is not None:
                    self.on_progress(clock.now - self.start)
                if self.on_tokens is not None:
                    self.on_tokens(r.tokens)
        finally:
            self._close()
        r.iterations = iteration
        r.makespan_s = clock.now - self.start
        r.contexts_checked = self.runner.contexts_checked
        r.context_tokens_checked = self.runner.context_tokens_checked
        r.wall_s = time.perf_counter() - wall0
        return r

    def _stall_reason(self) -> str:
        """Why vLLM schedules nothing while requests are left and nothing is in flight."""
        s = self.scheduler
        text = (f"vLLM bench stalled at {self.clock.now:.3f} s: "
                f"{s.get_num_unfinished_requests()} requests unfinished and nothing to wait for")
        # vLLM 0.32 adds a request with an asynchronous KV load to Scheduler._inflight_prefills
        # and, when the load fails, frees its blocks but keeps it there: its retry then
        # reserves its own remaining blocks on top of what it asks for (read for this
        # message only)
        stuck = [r.request_id for r in s.kv_holding_waiting
                 if r in getattr(s, "_inflight_prefills", ()) and not s._holds_kv_blocks(r)]
        if stuck:
            text += (f"; {', '.join(stuck)} failed a KV load and vLLM 0.32 kept it among its "
                     f"in-flight prefills (Scheduler._inflight_prefills), whose reservation "
                     f"now includes its own blocks: its retry cannot be admitted and, "
                     f"holding the head of the KV-holding queue, blocks every other request")
        return text

    def _close(self) -> None:
        if self.worker is not None:
            self.r.transfers = self.worker.counts
            if isinstance(self.worker.inner, KVSwitchOffloadingWorker):
                self.r.worker_stats = self.worker.inner.stats()
        if self.kv is not None:
            self.kv.kv_connector.shutdown()
        self.scheduler.shutdown()
        shutil.rmtree(self.model_dir, ignore_errors=True)


def serve_vllm(conversations: list[Conversation], config: ServeConfig,
               configuration: VllmConfiguration, *, fail_load: int | None = None,
               kv_load_failure_policy: str = "recompute",
               on_progress: Callable[[float], None] | None = None,
               on_tokens: Callable[[int], None] | None = None) -> VllmServeResult:
    """Replay ``conversations`` through vLLM's scheduler in one configuration.

    Args:
        conversations: the trace.
        config: the main bench's parameters (pools, presets, arrivals, priorities; the
            host pool is the CPU cache: ``host_blocks`` blocks of ``block_size`` tokens).
            ``time_scale``, ``clock`` and ``backend`` do not apply: the clock is virtual.
        configuration: see [`VLLM_CONFIGURATIONS`][].
        fail_load: index (0-based, in submission order) of a load to fail (its GPU blocks
            garbled; vLLM's failure path must recover); None: none.
        kv_load_failure_policy: vLLM's ``"recompute"`` (a failed load's request is
            rescheduled) or ``"fail"`` (it finishes with an error).
        on_progress: called after every step with the virtual seconds since the first
            arrival.
        on_tokens: called after every step with the tokens generated so far (ends at the
            trace's output tokens).

    Returns:
        A [`VllmServeResult`][].

    Raises:
        ValueError: a conversation larger than the GPU pool, or bad sizes.
        StampMismatchError: a block vLLM used or loaded does not hold its request's KV.
        RuntimeError: the run stalled (a bug: nothing to wait for, requests left).
    """
    if conversations:
        big = max(conversations, key=lambda c: c.total_tokens)
        need = min_gpu_blocks(big.total_tokens, config)
        if config.gpu_blocks < need:
            raise ValueError(f"conversation {big.conversation_id!r} needs {big.total_tokens:,} "
                             f"tokens of KV; gpu_blocks must be at least {need:,}")
    if configuration.offload not in (None, "native", "kvswitch"):
        raise ValueError(f"unknown offload {configuration.offload!r}")
    return _Loop(conversations, config, configuration, fail_load=fail_load,
                 kv_load_failure_policy=kv_load_failure_policy, on_progress=on_progress,
                 on_tokens=on_tokens).run()
