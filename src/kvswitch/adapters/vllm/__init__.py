"""kvswitch as a vLLM V1 KV offloading spec (vLLM 0.32.x).

Needs vLLM (``pip install ".[vllm]"`` from a kvswitch checkout); importing this package imports it,
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

* [`KVSwitchOffloadingSpec`][] (``spec``): the ``OffloadingSpec`` vLLM loads.
* [`KVSwitchOffloadingManager`][] (``manager``): vLLM's CPU offloading manager (LRU and
  ARC eviction, reference counts, events) whose CPU chunks come from a
  [`BlockGroupAllocator`][], so one request's chunks sit in contiguous CPU
  extents.
* [`BlockGroupPool`][] (``block_pool``): vLLM's GPU ``BlockPool`` whose new blocks come
  from a [`BlockGroupAllocator`][], one sequence per (request, KV-cache group).
* [`BlockGroupScheduler`][] / [`AsyncBlockGroupScheduler`][] (``scheduler``): vLLM's
  schedulers with that pool installed in their KV cache manager ([`install_block_groups`][]).
* [`KVSwitchOffloadingWorker`][] (``worker``): the transfers, one
  [`AsyncSwapEngine`][] per KV-cache group, each job's (GPU block, CPU block)
  pairs coalesced into extents.
"""

try:
    import vllm  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"kvswitch.adapters.vllm needs vLLM ({e}); install it with: "
        f"pip install 'vllm>=0.32,<0.33' (the kvswitch extra 'vllm')") from e

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
