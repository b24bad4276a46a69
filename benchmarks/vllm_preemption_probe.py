"""Why ``kvswitch bench --engine vllm`` preempts as it does: its configurations run with
probes on vLLM's scheduler and prefix cache (issue 23's open question: does the
block-group pool make vLLM preempt more?).

Runs [`serve_vllm`][kvswitch.bench.vllm.serve_vllm] (vLLM 0.32's own ``Scheduler`` and
``OffloadingConnector``, virtual clock) per seed and configuration, and records:

* at every preemption (``Scheduler._preempt_request``): the free blocks vLLM's pool reports
  (``get_num_free_blocks``, what ``allocate_slots`` compared the request against), and
  for a [`BlockGroupPool`][kvswitch.adapters.vllm.BlockGroupPool] the free blocks it holds
  back from block groups (retained cached blocks, the reuse window, reserved tails). A
  pool that preempts while it hides reservable blocks shows a maximum above 0;
* at every GPU prefix lookup (``KVCacheManager.get_computed_blocks``): the blocks hit, and
  the request's blocks still cached *after* the first miss (vLLM's lookup stops at the
  first miss, so those are cached but unreachable);
* the modelled busy time (sum of step times) apart from the makespan (busy plus idle time
  waiting for arrivals and think times).

Configurations: those of ``kvswitch bench --engine vllm``, plus ``groups-window0``
(``reuse_window_blocks=0``), ``groups-vllm-order`` (``block_order="vllm"``: kvswitch's
bookkeeping on vLLM's block order, the control) and ``vllm+kvswitch-link99`` (the link 1%
slower: a perturbation that changes nothing but transfer times, to size run-to-run
divergence).

``--fixed-think``: each (conversation, turn) draws its think time from its own stream
instead of the bench's one stream in the order turns end, so that every configuration
replays the same think times (the bench as shipped does not: from the first turn that ends
at another time, configurations get other think times).

Run: python benchmarks/vllm_preemption_probe.py [--conversations 40] [--gpu-blocks 1000]
[--seeds 0 1 2] [--configs ...] [--fixed-think] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import statistics
import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id
from vllm.v1.core.sched.scheduler import Scheduler

from kvswitch.adapters.vllm import BlockGroupPool
from kvswitch.adapters.vllm.block_pool import BlockGroupConfig
from kvswitch.bench.link_model import LINK_PRESETS
from kvswitch.bench.serve import ServeConfig
from kvswitch.bench.vllm import VLLM_CONFIGURATIONS, serve_vllm
from kvswitch.bench.vllm.runner import RunnerStandIn
from kvswitch.bench.vllm.serve import _Loop
from kvswitch.trace import load_trace, sample

_GROUPS = VLLM_CONFIGURATIONS["vllm+kvswitch+groups"]
#: name -> (bench configuration, block-group settings or None, link bandwidth factor)
CONFIGS: dict[str, tuple[Any, BlockGroupConfig | None, float]] = {
    **{name: (conf, None, 1.0) for name, conf in VLLM_CONFIGURATIONS.items()},
    "groups-window0": (_GROUPS, BlockGroupConfig(reuse_window_blocks=0), 1.0),
    "groups-vllm-order": (_GROUPS, BlockGroupConfig(block_order="vllm"), 1.0),
    "vllm+kvswitch-link99": (VLLM_CONFIGURATIONS["vllm+kvswitch"], None, 0.99),
}


class _Probe:
    """Counters of one run (see the module)."""

    def __init__(self) -> None:
        self.free_at_preemption: list[int] = []
        self.held_back_at_preemption: list[int] = []
        self.lookups = self.hit_blocks = self.unreachable_blocks = 0
        self.busy_s = 0.0

    @contextlib.contextmanager
    def installed(self, fixed_think: bool) -> Iterator[None]:
        probe = self
        preempt = Scheduler._preempt_request
        finish = _Loop._finish
        lookup = KVCacheManager.get_computed_blocks
        execute = RunnerStandIn.execute

        def _preempt_request(sched: Scheduler, request: Any, *args: Any, **kw: Any) -> Any:
            pool = sched.kv_cache_manager.block_pool
            probe.free_at_preemption.append(pool.get_num_free_blocks())
            if isinstance(pool, BlockGroupPool):
                probe.held_back_at_preemption.append(
                    pool.num_retained_blocks + pool.num_window_blocks
                    + pool.allocator.num_reserved_blocks)
            return preempt(sched, request, *args, **kw)

        def get_computed_blocks(mgr: KVCacheManager, request: Any) -> Any:
            out = lookup(mgr, request)
            hit = out[1] // mgr.coordinator.single_type_managers[0].block_size
            cached = mgr.block_pool.cached_block_hash_to_block
            probe.lookups += 1
            probe.hit_blocks += hit
            probe.unreachable_blocks += sum(
                1 for h in request.block_hashes[hit:]
                if cached.get_one_block(make_block_hash_with_group_id(h, 0)) is not None)
            return out

        def run_step(runner: RunnerStandIn, so: Any) -> Any:
            outcome = execute(runner, so)
            probe.busy_s += outcome.step_s
            return outcome

        Scheduler._preempt_request = _preempt_request  # type: ignore[method-assign]
        KVCacheManager.get_computed_blocks = get_computed_blocks  # type: ignore[method-assign]
        def finish_turn(loop: _Loop, req_id: str, reason: Any) -> None:
            i = loop.conversation_of[req_id]
            loop.think = random.Random(f"{loop.cfg.seed}-{i}-{loop.turn[i]}")
            finish(loop, req_id, reason)

        RunnerStandIn.execute = run_step  # type: ignore[method-assign]
        if fixed_think:
            _Loop._finish = finish_turn  # type: ignore[method-assign]
        try:
            yield
        finally:
            Scheduler._preempt_request = preempt  # type: ignore[method-assign]
            KVCacheManager.get_computed_blocks = lookup  # type: ignore[method-assign]
            RunnerStandIn.execute = execute  # type: ignore[method-assign]
            _Loop._finish = finish  # type: ignore[method-assign]


def probe_run(name: str, conversations: list, config: ServeConfig, *,
              fixed_think: bool = False) -> dict[str, Any]:
    """One configuration's run with the probes; its figures as a dict."""
    conf, groups, link_factor = CONFIGS[name]
    if link_factor != 1.0:
        link = config.link or LINK_PRESETS[config.gpu]
        config = replace(config, link=replace(
            link, d2h_bytes_per_s=link.d2h_bytes_per_s * link_factor,
            h2d_bytes_per_s=link.h2d_bytes_per_s * link_factor))
    probe = _Probe()
    default = BlockGroupPool.default_config
    try:
        if groups is not None:
            BlockGroupPool.default_config = groups
        with probe.installed(fixed_think):
            r = serve_vllm(conversations, config, conf)
    finally:
        BlockGroupPool.default_config = default
    return {
        "config": name, "seed": config.seed, "preemptions": r.preemptions,
        "max_free_at_preemption": max(probe.free_at_preemption, default=0),
        "max_held_back_at_preemption": max(probe.held_back_at_preemption, default=0),
        "gpu_prefix_hits": r.gpu_prefix_hits, "cpu_prefix_hits": r.cpu_prefix_hits,
        "lookups": probe.lookups, "unreachable_cached_blocks": probe.unreachable_blocks,
        "loads": r.transfers.loads, "link_s": r.transfers.link_s,
        "busy_s": probe.busy_s, "makespan_s": r.makespan_s,
        "ttft_p50_s": statistics.median(r.ttft_s) if r.ttft_s else 0.0,
        "iterations": r.iterations, "turns_served": r.turns_served}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--conversations", type=int, default=40)
    ap.add_argument("--gpu-blocks", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", default=[
        "vllm+kvswitch", "vllm+kvswitch+groups", "groups-window0", "groups-vllm-order",
        "vllm+kvswitch-link99"], choices=list(CONFIGS))
    ap.add_argument("--fixed-think", action="store_true",
                    help="think times per (conversation, turn), the same in every configuration")
    ap.add_argument("--json", help="also write every run's figures to this file")
    args = ap.parse_args(argv)
    logging.getLogger("vllm").setLevel(logging.ERROR)  # as kvswitch bench does
    trace = load_trace(None)
    rows = []
    cols = ("config", "seed", "preemptions", "max_free_at_preemption",
            "max_held_back_at_preemption", "gpu_prefix_hits", "cpu_prefix_hits",
            "unreachable_cached_blocks", "loads", "busy_s", "makespan_s")
    print("\t".join(cols))
    for seed in args.seeds:
        convs = sample(trace, args.conversations, seed)
        config = ServeConfig(gpu_blocks=args.gpu_blocks, seed=seed)
        for name in args.configs:
            row = probe_run(name, convs, config, fixed_think=args.fixed_think)
            rows.append(row)
            print("\t".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c])
                            for c in cols), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"conversations": args.conversations, "gpu_blocks": args.gpu_blocks,
                       "fixed_think": args.fixed_think, "runs": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
