"""kvswitch: KV-cache context switching for LLM serving.

Implements the mechanisms of FastSwitch (Shen et al., arXiv 2411.18424) as reusable parts:

* :class:`BlockGroupAllocator`: contiguous block groups with split and merge (section 3.1).
* :class:`AsyncSwapEngine` over a :class:`KVLayout` and a :class:`HostKVPool`: GPU<->CPU
  swaps dispatched from C++ worker threads, off the GIL (section 3.2).
* :class:`ReuseTracker`: CPU copies reused across swap-outs, surviving contamination (3.3).
* :class:`SwapManager`: the per-iteration swap loop over all three (Algorithm 1).
"""

from kvswitch.allocator import AllocatorStats, BlockGroupAllocator, OutOfBlocksError
from kvswitch.host_pool import HostKVPool
from kvswitch.layout import KVLayout, KVRegion
from kvswitch.manager import SwapManager, SwapManagerStats
from kvswitch.reuse import ReuseStats, ReuseTracker, SwapPlan
from kvswitch.swap import (
    AsyncSwapEngine,
    CudaEvent,
    EngineClosedError,
    SwapError,
    SwapHandle,
)

__all__ = [
    "AllocatorStats",
    "AsyncSwapEngine",
    "BlockGroupAllocator",
    "CudaEvent",
    "EngineClosedError",
    "HostKVPool",
    "KVLayout",
    "KVRegion",
    "OutOfBlocksError",
    "ReuseStats",
    "ReuseTracker",
    "SwapError",
    "SwapHandle",
    "SwapManager",
    "SwapManagerStats",
    "SwapPlan",
]
__version__ = "0.1.0"
