"""The scheduler side: vLLM's CPU offloading manager over a kvswitch block-group allocator.

vLLM 0.32's ``CPUOffloadingManager`` (``vllm/v1/kv_offload/cpu/manager.py``) keeps the
cache state (keys, reference counts, LRU/ARC policies, events, metrics) and hands out CPU
chunk ids from a counter and a LIFO free list. [`KVSwitchOffloadingManager`][] keeps
all of that and replaces only the chunk pool: chunks come from a
[`BlockGroupAllocator`][] in which every request is a sequence, so the chunks
one request stores over its lifetime (prefill, decode, a preemption flush) extend one
block group and sit in contiguous CPU extents; the worker then moves them in few copies.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable
from typing import Any

import numpy as np
from vllm.v1.kv_offload.base import OffloadKey, PrepareStoreOutput, ReqContext
from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager
from vllm.v1.kv_offload.cpu.policies.base import ChunkStatus

from kvswitch.allocator import BlockGroupAllocator

__all__ = [
    "CHUNK_ORDERS",
    "DEFAULT_INITIAL_GROUP_CHUNKS",
    "GPU_BLOCK_RUN_METRICS",
    "KVSwitchOffloadingManager",
]

#: Counters the manager adds to the connector's stats when a
#: [`BlockGroupScheduler`][kvswitch.adapters.vllm.BlockGroupScheduler] runs (its GPU pool's
#: [`BlockRunStats`][kvswitch.adapters.vllm.BlockRunStats] since the previous stats): name ->
#: (attribute, description).
GPU_BLOCK_RUN_METRICS = {
    "kvswitch:gpu_blocks_allocated": (
        "blocks_allocated", "GPU blocks handed out by kvswitch's block-group pool."),
    "kvswitch:gpu_block_runs_started": (
        "runs_started", "GPU blocks handed out that did not continue their block "
        "table's previous block (blocks per run = allocated / runs started)."),
    "kvswitch:gpu_blocks_reused_out_of_order": (
        "reused_out_of_order", "Cached GPU blocks reused (their prefix evicted) while an "
        "older cached free block stayed cached (the block-group pool's reuse window)."),
}

#: Chunk orders: ``"groups"`` (block groups per request, the default) and ``"vllm"``
#: (vLLM's own pool: fresh ids in order, then a LIFO free list; for comparisons and for
#: tests that assert vLLM's exact chunk ids).
CHUNK_ORDERS = ("groups", "vllm")

#: Expected chunks of a request's first CPU group. Smaller than the allocator's default
#: (60 blocks): a CPU chunk is ``blocks_per_chunk`` GPU blocks, and a reservation only
#: shapes where a request's next chunks go (reserved chunks count as free).
DEFAULT_INITIAL_GROUP_CHUNKS = 16


class KVSwitchOffloadingManager(CPUOffloadingManager):
    """vLLM's ``OffloadingManager`` whose CPU chunks come in per-request block groups.

    Behaviour (lookup, prepare_load, touch, complete_load, prepare_store, complete_store,
    on_new_request, on_request_finished, take_events, reset_cache, get_stats) is vLLM's:
    this class inherits it and overrides only the chunk pool. A store that needs more
    chunks than are free evicts with vLLM's policy (``"lru"`` or ``"arc"``) exactly as
    vLLM does; the chunks freed return to the allocator, which merges them with their free
    neighbours.

    In ``"groups"`` order each request (``ReqContext.req_id``) is one allocator sequence;
    its stores extend its active group, so a request's chunk ids form few runs. Chunks
    outlive their request (the cache keeps them); a chunk evicted later leaves the
    request's table, and a table left empty is released with its reserved tail.

    Args:
        num_chunks: CPU chunks in the cache (>= 0).
        cache_policy: ``"lru"``, ``"arc"`` or a registered policy name (vLLM's factory).
        cache_policy_module_path: module of an out-of-tree policy (vLLM's factory).
        enable_events: collect ``OffloadingEvent`` objects for ``take_events``.
        store_threshold: offers a key needs before it is stored (< 2: no filter).
        max_tracker_size: entries of the offer tracker (``store_threshold >= 2``).
        chunk_order: one of [`CHUNK_ORDERS`][].
        initial_group_chunks: expected size of a request's first CPU group, in chunks.

    Raises:
        ValueError: an unknown ``chunk_order``, a negative ``num_chunks`` or a
            non-positive ``initial_group_chunks``.

    Thread safety: as vLLM's manager, one scheduler thread calls it.
    """

    def __init__(
        self,
        num_chunks: int,
        cache_policy: str = "lru",
        cache_policy_module_path: str | None = None,
        enable_events: bool = False,
        store_threshold: int = 1,
        max_tracker_size: int = 64_000,
        *,
        chunk_order: str = "groups",
        initial_group_chunks: int = 16,  # == DEFAULT_INITIAL_GROUP_CHUNKS
    ):
        if chunk_order not in CHUNK_ORDERS:
            raise ValueError(f"chunk_order must be one of {CHUNK_ORDERS}, got {chunk_order!r}")
        if type(num_chunks) is not int or num_chunks < 0:
            raise ValueError(f"num_chunks must be an int >= 0, got {num_chunks!r}")
        if type(initial_group_chunks) is not int or initial_group_chunks <= 0:
            raise ValueError(
                f"initial_group_chunks must be an int > 0, got {initial_group_chunks!r}")
        super().__init__(
            num_chunks=num_chunks,
            cache_policy=cache_policy,
            cache_policy_module_path=cache_policy_module_path,
            enable_events=enable_events,
            store_threshold=store_threshold,
            max_tracker_size=max_tracker_size,
        )
        self.chunk_order = chunk_order
        self.initial_group_chunks = initial_group_chunks
        self._groups = chunk_order == "groups"
        self._allocator: BlockGroupAllocator | None = None
        # chunk id -> the allocator sequence (request) whose table holds it
        self._chunk_owner: dict[int, Hashable] = {}
        self._pending_free: list[int] = []
        # chunks in each request's allocator table (saves a locked query per free)
        self._held: dict[Hashable, int] = {}
        self._store_seq: Hashable = ""
        self._gpu_pool: Any = None
        self._new_allocator()

    # -- the chunk pool ------------------------------------------------------------------

    def _new_allocator(self) -> None:
        self._chunk_owner.clear()
        self._pending_free.clear()
        self._held = {}
        self._allocator = (
            BlockGroupAllocator(self._num_chunks, initial_group_blocks=self.initial_group_chunks)
            if self._groups and self._num_chunks > 0 else None)

    @property
    def allocator(self) -> BlockGroupAllocator | None:
        """The allocator of CPU chunk ids (None in ``"vllm"`` order or with 0 chunks)."""
        return self._allocator

    def chunk_runs(self, req_id: Hashable) -> list[tuple[int, int]]:
        """The request's cached chunks as ``(first chunk id, length)`` runs, in table order.

        Returns an empty list for an unknown request or in ``"vllm"`` order.
        """
        self._flush_frees()
        if self._allocator is None or req_id not in self._allocator:
            return []
        return self._allocator.groups(req_id)

    def _flush_frees(self) -> None:
        """Return the chunks freed since the last flush to the allocator, per request."""
        if not self._pending_free:
            return
        alloc = self._allocator
        assert alloc is not None
        by_seq: dict[Hashable, list[int]] = {}
        owner = self._chunk_owner
        for chunk_id in self._pending_free:
            by_seq.setdefault(owner.pop(chunk_id), []).append(chunk_id)
        self._pending_free.clear()
        held = self._held
        for seq, ids in by_seq.items():
            left = held[seq] - len(ids)
            if left == 0:
                del held[seq]
                alloc.free(seq)  # also releases the request's reserved tail
            else:
                held[seq] = left
                alloc.free_blocks(seq, np.array(ids, dtype=np.int32))

    def _get_num_free_chunks(self) -> int:
        if not self._groups:
            return super()._get_num_free_chunks()
        if self._allocator is None:
            return 0
        # freed chunks still in the allocator's tables (see _free_chunk) count as free
        return self._allocator.num_free_blocks + len(self._pending_free)

    def _allocate_chunks(self, keys: list[OffloadKey]) -> list[ChunkStatus]:
        if not self._groups:
            return super()._allocate_chunks(keys)
        assert self._allocator is not None
        if len(keys) > self._allocator.num_free_blocks:
            self._flush_frees()  # the freed chunks are needed now
        seq = self._store_seq
        ids = self._allocator.allocate(seq, len(keys)).tolist()
        owner = self._chunk_owner
        for chunk_id in ids:
            owner[chunk_id] = seq
        self._held[seq] = self._held.get(seq, 0) + len(ids)
        return [ChunkStatus(chunk_id) for chunk_id in ids]

    def _free_chunk(self, chunk: ChunkStatus) -> None:
        if not self._groups:
            super()._free_chunk(chunk)
            return
        # Deferred: freed chunks go back to the allocator in batches, one call per request,
        # when an allocation needs them or the pool is inspected (stats, chunk_runs), so
        # that evictions over many steps cost few allocator calls. Until then they stay in
        # their request's table and count as free (_get_num_free_chunks).
        self._pending_free.append(int(chunk.chunk_id))

    # -- OffloadingManager overrides ------------------------------------------------------

    def prepare_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext
    ) -> PrepareStoreOutput | None:
        """vLLM's ``prepare_store``; new chunks extend the request's CPU block group."""
        self._store_seq = req_context.req_id
        return super().prepare_store(keys, req_context)

    def reset_cache(self) -> None:
        """vLLM's ``reset_cache``; the allocator starts empty."""
        super().reset_cache()
        if self._groups:
            self._new_allocator()

    def bind_gpu_block_pool(self, pool: Any) -> None:
        """Report ``pool``'s block runs (a
        [`BlockGroupPool`][kvswitch.adapters.vllm.BlockGroupPool]; its
        ``take_block_run_stats``) in [`get_stats`][], as the counters of
        ``GPU_BLOCK_RUN_METRICS``.
        [`BlockGroupScheduler`][kvswitch.adapters.vllm.BlockGroupScheduler] calls it."""
        self._gpu_pool = pool

    def get_stats(self) -> Any:
        """vLLM's ``OffloadingConnectorStats`` for the period since the last call, plus the
        GPU pool's block runs when one is bound ([`bind_gpu_block_pool`][])."""
        if self._groups and self._allocator is not None:
            self._flush_frees()
            # vLLM's usage gauge reads these: allocated minus free-listed chunks
            self._num_allocated_chunks = self._allocator.num_used_blocks
            self._free_list = []
        stats = super().get_stats()
        if self._gpu_pool is not None and stats is not None:
            runs = self._gpu_pool.take_block_run_stats()
            for name, (attr, _) in GPU_BLOCK_RUN_METRICS.items():
                stats.increase_counter(name, getattr(runs, attr))
        return stats
