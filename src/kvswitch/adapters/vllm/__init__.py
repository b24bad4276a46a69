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

Parts (one concept per module):

* [`KVSwitchOffloadingSpec`][] (``spec``): the ``OffloadingSpec`` vLLM loads.
* [`KVSwitchOffloadingManager`][] (``manager``): vLLM's CPU offloading manager (LRU and
  ARC eviction, reference counts, events) whose CPU chunks come from a
  [`BlockGroupAllocator`][], so one request's chunks sit in contiguous CPU
  extents.
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

from kvswitch.adapters.vllm.manager import CHUNK_ORDERS, KVSwitchOffloadingManager
from kvswitch.adapters.vllm.spec import KVSwitchOffloadingSpec
from kvswitch.adapters.vllm.worker import KVSwitchOffloadingWorker, coalesce_pairs

__all__ = [
    "CHUNK_ORDERS",
    "KVSwitchOffloadingManager",
    "KVSwitchOffloadingSpec",
    "KVSwitchOffloadingWorker",
    "coalesce_pairs",
]
