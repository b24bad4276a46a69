"""kvswitch: KV-cache context switching for LLM serving.

Implements the mechanisms of FastSwitch (Shen et al., arXiv 2411.18424) as reusable parts:

* :class:`BlockGroupAllocator`: contiguous block groups with split and merge (section 3.1).
* :class:`ReuseTracker`: CPU copies reused across swap-outs, surviving contamination (3.3).
"""

from kvswitch.allocator import AllocatorStats, BlockGroupAllocator, OutOfBlocksError
from kvswitch.reuse import ReuseStats, ReuseTracker, SwapPlan

__all__ = [
    "AllocatorStats",
    "BlockGroupAllocator",
    "OutOfBlocksError",
    "ReuseStats",
    "ReuseTracker",
    "SwapPlan",
]
__version__ = "0.1.0"
