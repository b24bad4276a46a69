"""vLLM schedulers whose KV cache manager takes block groups, selected with ``scheduler_cls``.

vLLM 0.32 resolves ``SchedulerConfig.scheduler_cls`` (``--scheduler-cls`` /
``LLM(scheduler_cls=...)``) by qualified name in the engine core; that is the public seam.
[`BlockGroupScheduler`][] is vLLM's ``Scheduler``, [`AsyncBlockGroupScheduler`][]
vLLM's ``AsyncScheduler``; after vLLM's own ``__init__`` each calls
[`install_block_groups`][] on its ``KVCacheManager``:

* the manager's ``BlockPool`` becomes a [`BlockGroupPool`][kvswitch.adapters.vllm.BlockGroupPool] in
  place ([`BlockGroupPool.adopt`][]);
* each single-type KV cache manager over that pool becomes a subclass of its own class that
  names the (request, KV-cache group) around the calls that take new blocks or hit cached
  ones (``allocate_new_blocks``, ``allocate_external_computed_blocks``,
  ``add_local_computed_blocks``).

Why in place: vLLM builds the pool and the single-type managers inside
``KVCacheCoordinator.__init__``, itself called from ``KVCacheManager.__init__``, called from
``Scheduler.__init__``, with no factory argument at any level. Changing the class of those
objects (no vLLM module attribute is touched, so other engines in the process keep vLLM's
classes) keeps every reference to them valid: the coordinator's, the managers', the
connector's (``bind_gpu_block_pool``) and the ``KVCacheManager``'s.

Settings come from vLLM's ``additional_config["kvswitch"]`` (keys of
[`BlockGroupConfig`][kvswitch.adapters.vllm.BlockGroupConfig]), e.g.
``--additional-config '{"kvswitch": {"reuse_window_blocks": 0}}'``.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager

from kvswitch.adapters.vllm.block_pool import BlockGroupConfig, BlockGroupPool

__all__ = [
    "AsyncBlockGroupScheduler",
    "BlockGroupKVCacheManager",
    "BlockGroupScheduler",
    "install_block_groups",
]

# A child of vLLM's logger, so that its handlers print the start line in every vLLM process.
logger = init_logger("vllm.kvswitch.block_groups")


def _naming_the_sequence(base: Any) -> Any:
    """``base`` (a single-type manager method whose first argument is the request id),
    run with the manager's pool allocating for (request, KV-cache group). A manager may
    have moved to another pool (vLLM's HiSparse managers bind a host pool): then ``base``
    runs as is. Called for every running request every step, so kept lean."""

    def method(self: Any, request_id: str, *args: Any, **kwargs: Any) -> Any:
        pool = self.block_pool
        if not isinstance(pool, BlockGroupPool):
            return base(self, request_id, *args, **kwargs)
        prev = pool.allocating_for((request_id, self.kv_cache_group_id))
        try:
            return base(self, request_id, *args, **kwargs)
        finally:
            pool.allocating_for(prev)

    method.__name__ = base.__name__
    method.__doc__ = base.__doc__
    return method


@functools.cache
def _with_block_groups(cls: type) -> type:
    """A subclass of vLLM's single-type manager class ``cls`` that names the (request,
    KV-cache group) to its [`BlockGroupPool`][] around the calls that take new blocks
    or touch cached ones. Built with ``cls`` as its only base and no slots of its own, so
    an instance of ``cls`` can take it as its ``__class__``."""
    namespace: dict[str, Any] = {
        "__module__": __name__, "__qualname__": cls.__qualname__, "__slots__": (),
        "_kvswitch_block_groups": True}
    for name in ("allocate_new_blocks", "allocate_external_computed_blocks",
                 "add_local_computed_blocks"):
        namespace[name] = _naming_the_sequence(getattr(cls, name))
    return type(cls.__name__, (cls,), namespace)


def install_block_groups(kv_cache_manager: KVCacheManager,
                         config: BlockGroupConfig | None = None) -> BlockGroupPool:
    """Make ``kv_cache_manager`` take new GPU blocks from block groups (in place).

    Call it before the manager allocates anything (a scheduler's ``__init__``). Calling it
    again returns the installed pool.

    Args:
        kv_cache_manager: a vLLM 0.32 ``KVCacheManager`` that has handed out no block.
        config: block-group settings (None: ``BlockGroupPool.default_config``).

    Returns:
        The manager's pool, now a [`BlockGroupPool`][].

    Raises:
        TypeError: the manager's pool is not exactly vLLM's ``BlockPool`` (see
            [`BlockGroupPool.adopt`][kvswitch.adapters.vllm.BlockGroupPool.adopt]);
            nothing changes.
        ValueError: a block of that pool is in use or cached; nothing changes.
    """
    pool = BlockGroupPool.adopt(kv_cache_manager.block_pool, config)
    for manager in kv_cache_manager.coordinator.single_type_managers:
        if manager.block_pool is pool and not getattr(manager, "_kvswitch_block_groups",
                                                          False):
            assert isinstance(manager, SingleTypeKVCacheManager)
            manager.__class__ = _with_block_groups(type(manager))
    return pool


class BlockGroupKVCacheManager(KVCacheManager):
    """vLLM's ``KVCacheManager`` with [`install_block_groups`][] applied.

    Takes vLLM's arguments, plus ``block_group_config`` (keyword only).
    """

    def __init__(self, *args: Any, block_group_config: BlockGroupConfig | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        install_block_groups(self, block_group_config)


class BlockGroupScheduler(Scheduler):
    """vLLM's ``Scheduler`` whose GPU blocks come in per-request block groups.

    Select it with ``scheduler_cls="kvswitch.adapters.vllm.BlockGroupScheduler"``. Where
    vLLM runs with async scheduling (``scheduler_config.async_scheduling``, vLLM's default
    on GPUs), constructing it gives an [`AsyncBlockGroupScheduler`][] (a subclass of
    both this class and vLLM's ``AsyncScheduler``), so this one name serves both.

    Settings: ``vllm_config.additional_config["kvswitch"]``
    ([`block_group_config_for`][]).

    Attributes:
        block_group_pool: the [`BlockGroupPool`][kvswitch.adapters.vllm.BlockGroupPool] of its KV
            cache manager.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is BlockGroupScheduler:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            sched = getattr(vllm_config, "scheduler_config", None)
            if getattr(sched, "async_scheduling", False):
                cls = AsyncBlockGroupScheduler  # Python then runs its __init__
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)  # vLLM's Scheduler / AsyncScheduler
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        self.block_group_pool = install_block_groups(
            self.kv_cache_manager, self.block_group_config_for(vllm_config))
        self._bind_offloading_stats()
        pool = self.block_group_pool
        logger.info(
            "kvswitch: GPU blocks in block groups (%s): %d blocks, initial group %d, "
            "growth quantum %d, reuse window of %d cached blocks, %s order",
            type(self).__name__, pool.num_gpu_blocks, pool.allocator.initial_group_blocks,
            pool.allocator.growth_quantum_blocks, pool.reuse_window_blocks,
            pool.block_group_config.block_order)

    @classmethod
    def block_group_config_for(cls, vllm_config: Any) -> BlockGroupConfig | None:
        """The settings in ``vllm_config.additional_config["kvswitch"]``; None (the
        pool's ``BlockGroupPool.default_config``) when there
        is no such section.

        Raises:
            ValueError: an unknown key or a bad value.
        """
        extra = getattr(vllm_config, "additional_config", None)
        section = extra.get("kvswitch") if isinstance(extra, dict) else None
        return None if section is None else BlockGroupConfig.from_dict(section)

    def _bind_offloading_stats(self) -> None:
        """Give kvswitch's offloading manager (the OffloadingConnector's, when its spec is
        kvswitch's) the pool, so the connector's stats report block runs."""
        from kvswitch.adapters.vllm.manager import KVSwitchOffloadingManager

        connector_scheduler = getattr(self.connector, "connector_scheduler", None)
        manager = getattr(connector_scheduler, "manager", None)
        if isinstance(manager, KVSwitchOffloadingManager):
            manager.bind_gpu_block_pool(self.block_group_pool)


class AsyncBlockGroupScheduler(BlockGroupScheduler, AsyncScheduler):
    """vLLM's ``AsyncScheduler`` whose GPU blocks come in per-request block groups (see
    [`BlockGroupScheduler`][]; select either name with ``async_scheduling`` on)."""
