"""kvswitch: KV-cache context switching for LLM serving.

Implements the mechanisms of FastSwitch (Shen et al., arXiv 2411.18424) as reusable parts:

* :class:`BlockGroupAllocator`: contiguous block groups with split and merge (section 3.1).
"""

from kvswitch.allocator import AllocatorStats, BlockGroupAllocator, OutOfBlocksError

__all__ = ["AllocatorStats", "BlockGroupAllocator", "OutOfBlocksError"]
__version__ = "0.1.0"
