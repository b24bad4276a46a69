"""kvswitch: KV-cache context switching for LLM serving (FastSwitch, arXiv 2411.18424)."""

from kvswitch._core import OutOfBlocksError

__all__ = ["OutOfBlocksError"]
__version__ = "0.1.0"
