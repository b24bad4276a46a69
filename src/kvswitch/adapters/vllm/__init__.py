"""kvswitch as a vLLM V1 KV offloading spec (vLLM 0.32.x).

Needs vLLM (``pip install 'kvswitch[vllm]'``); importing this package imports it,
``import kvswitch`` does not.

Enable it in vLLM with the ``OffloadingConnector``::

    from vllm import LLM
    from vllm.config import KVTransferConfig

    llm = LLM(model=..., kv_transfer_config=KVTransferConfig(
        kv_connector="OffloadingConnector", kv_role="kv_both",
        kv_connector_extra_config={
            "spec_name": "KVSwitchOffloadingSpec",
            "spec_module_path": "kvswitch.adapters.vllm",
            "cpu_bytes_to_use": 8 << 30,
        }))

The GPU side (block groups in vLLM's own GPU block allocation) is a scheduler class::

    llm = LLM(model=..., scheduler_cls="kvswitch.adapters.vllm.BlockGroupScheduler",
              kv_transfer_config=...)  # the same KVTransferConfig as above

Parts (one concept per module):

* :class:`KVSwitchOffloadingSpec` (``spec``): the ``OffloadingSpec`` vLLM loads.
* :class:`KVSwitchOffloadingManager` (``manager``): vLLM's CPU offloading manager (LRU and
  ARC eviction, reference counts, events) whose CPU chunks come from a
  :class:`~kvswitch.BlockGroupAllocator`, so one request's chunks sit in contiguous CPU
  extents.
* :class:`BlockGroupPool` (``block_pool``): vLLM's GPU ``BlockPool`` whose new blocks come
  from a :class:`~kvswitch.BlockGroupAllocator`, one sequence per (request, KV-cache group).
* :class:`BlockGroupScheduler` / :class:`AsyncBlockGroupScheduler` (``scheduler``): vLLM's
  schedulers with that pool installed in their KV cache manager (:func:`install_block_groups`).
* :class:`KVSwitchOffloadingWorker` (``worker``): the transfers, one
  :class:`~kvswitch.AsyncSwapEngine` per KV-cache group, each job's (GPU block, CPU block)
  pairs coalesced into extents.
"""

try:
    import vllm  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"kvswitch.adapters.vllm needs vLLM ({e}); install it with: "
        f"pip install 'kvswitch[vllm]'") from e

from kvswitch.adapters.vllm.block_pool import (
    BLOCK_ORDERS,
    BlockGroupConfig,
    BlockGroupPool,
    BlockRunStats,
)
from kvswitch.adapters.vllm.manager import CHUNK_ORDERS, KVSwitchOffloadingManager
from kvswitch.adapters.vllm.scheduler import (
    AsyncBlockGroupScheduler,
    BlockGroupKVCacheManager,
    BlockGroupScheduler,
    install_block_groups,
)
from kvswitch.adapters.vllm.spec import KVSwitchOffloadingSpec
from kvswitch.adapters.vllm.worker import KVSwitchOffloadingWorker, coalesce_pairs

__all__ = [
    "BLOCK_ORDERS",
    "CHUNK_ORDERS",
    "AsyncBlockGroupScheduler",
    "BlockGroupConfig",
    "BlockGroupKVCacheManager",
    "BlockGroupPool",
    "BlockGroupScheduler",
    "BlockRunStats",
    "KVSwitchOffloadingManager",
    "KVSwitchOffloadingSpec",
    "KVSwitchOffloadingWorker",
    "coalesce_pairs",
    "install_block_groups",
]
