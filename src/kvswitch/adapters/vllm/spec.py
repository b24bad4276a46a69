"""The spec vLLM's ``OffloadingConnector`` loads: ``spec_name="KVSwitchOffloadingSpec"``.

vLLM 0.32 builds offloading specs through ``OffloadingSpecFactory``
(``vllm/v1/kv_offload/factory.py``): ``kv_connector_extra_config["spec_name"]`` names the
class and ``spec_module_path`` the module it is imported from.
"""

from __future__ import annotations

from typing import Any

import vllm.v1.kv_offload.cpu.spec as _vllm_cpu_spec
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    OffloadingCounterMetadata,
    OffloadingManager,
    OffloadingMetricMetadata,
    OffloadingWorker,
)
from vllm.v1.kv_offload.config import OffloadingConfig
from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec

from kvswitch.adapters.vllm.manager import (
    DEFAULT_INITIAL_GROUP_CHUNKS,
    GPU_BLOCK_RUN_METRICS,
    KVSwitchOffloadingManager,
)
from kvswitch.adapters.vllm.worker import KVSwitchOffloadingWorker

__all__ = ["KVSwitchOffloadingSpec"]


class KVSwitchOffloadingSpec(CPUOffloadingSpec):
    """CPU offloading with kvswitch's manager and worker.

    Sizing (``num_chunks``, ``kv_bytes_per_chunk`` from ``cpu_bytes_to_use``), metrics and
    the extra-config keys vLLM's CPU spec reads (``cpu_bytes_to_use``,
    ``eviction_policy``, ``store_threshold``, ``max_tracker_size``, ``block_size``,
    ``offload_prompt_only``) are vLLM's. Extra keys:

    * ``kvswitch_chunk_order``: ``"groups"`` (default) or ``"vllm"``
      ([`CHUNK_ORDERS`][]).
    * ``kvswitch_initial_group_chunks``: expected chunks of a request's first CPU group.
    * ``kvswitch_num_workers``: C++ copy threads per KV-cache group (default 2).

    Differences from vLLM's CPU spec: no ``canonical_layout``; the worker also runs where
    the KV caches are CPU tensors (kvswitch's host backend); a request's chunks come in
    block groups (see [`KVSwitchOffloadingManager`][]).

    Raises:
        Exception: ``cpu_bytes_to_use`` missing (as vLLM's spec).
        ValueError: ``canonical_layout`` requested.
    """

    @classmethod
    def build_metric_definitions(
        cls, extra_config: dict[str, Any]
    ) -> dict[str, OffloadingMetricMetadata]:
        """vLLM's CPU offloading metrics plus kvswitch's GPU block-run counters
        (``kvswitch.adapters.vllm.manager.GPU_BLOCK_RUN_METRICS``)."""
        definitions = dict(super().build_metric_definitions(extra_config))
        for name, (_, doc) in GPU_BLOCK_RUN_METRICS.items():
            definitions[name] = OffloadingCounterMetadata(documentation=doc)
        return definitions

    def __init__(self, config: OffloadingConfig):
        super().__init__(config)
        if getattr(config, "canonical_layout", False):
            raise ValueError("KVSwitchOffloadingSpec does not support canonical_layout")
        self.chunk_order: str = str(self.extra_config.get("kvswitch_chunk_order", "groups"))
        self.initial_group_chunks = int(self.extra_config.get(
            "kvswitch_initial_group_chunks", DEFAULT_INITIAL_GROUP_CHUNKS))
        self.num_workers = int(self.extra_config.get("kvswitch_num_workers", 2))

    def get_manager(self) -> OffloadingManager:
        """The scheduler-side [`KVSwitchOffloadingManager`][] (created once)."""
        if not self._manager:
            self._manager = KVSwitchOffloadingManager(
                num_chunks=self.num_chunks,
                cache_policy=self.eviction_policy,
                cache_policy_module_path=self.cache_policy_module_path,
                enable_events=self.kv_events_config.enable_kv_cache_events,
                store_threshold=int(self.extra_config.get("store_threshold", 0)),
                max_tracker_size=int(self.extra_config.get("max_tracker_size", 64_000)),
                chunk_order=self.chunk_order,
                initial_group_chunks=self.initial_group_chunks,
            )
        return self._manager

    def create_worker(self, kv_caches: CanonicalKVCaches) -> Any:
        """A new [`KVSwitchOffloadingWorker`][] over ``kv_caches``.

        Where vLLM's CPU spec shares one mmap region between the worker ranks of a node
        (CUDA, XPU), so does this one: the region is created as vLLM creates it
        (``SharedOffloadRegion``, read from vLLM's spec module at call time) and the
        worker's CPU tensors are views of it. Elsewhere (e.g. CPU-only tests) each worker
        allocates private CPU tensors; so does every rank with ``blocks_per_chunk > 1``
        (a chunk's GPU-sized sub-blocks in the region's strided rows have no uniform
        block stride for a [`KVLayout`][]).
        """
        mmap_region = None
        if self._uses_shared_region() and self.num_chunks > 0 and self.blocks_per_chunk == 1:
            rank = 0 if self.replicated_layout else self.config.parallel.rank
            mmap_region = _vllm_cpu_spec.SharedOffloadRegion(
                engine_id=self.config.engine_id,
                num_chunks=self.num_chunks,
                rank=rank,
                kv_bytes_per_chunk=self.kv_bytes_per_chunk,
                cpu_page_size=self.cpu_page_size_per_worker,
                barrier=_vllm_cpu_spec._all_workers_barrier,
            )
        try:
            return KVSwitchOffloadingWorker(
                kv_caches, blocks_per_chunk=self.blocks_per_chunk,
                num_cpu_chunks=self.num_chunks, num_workers=self.num_workers,
                mmap_region=mmap_region)
        except Exception:
            if mmap_region is not None:
                mmap_region.cleanup()
            raise

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        """The worker-side [`KVSwitchOffloadingWorker`][] (created once)."""
        if not self._worker:
            self._worker = self.create_worker(kv_caches)
        return self._worker
