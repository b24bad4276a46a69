"""kvswitch: KV-cache context switching for LLM serving (FastSwitch, arXiv 2411.18424)."""

from kvswitch._core import OutOfBlocksError
from kvswitch.host_pool import HostKVPool
from kvswitch.layout import KVLayout, KVRegion
from kvswitch.swap import (
    AsyncSwapEngine,
    CudaEvent,
    EngineClosedError,
    SwapError,
    SwapHandle,
)

__all__ = [
    "AsyncSwapEngine",
    "CudaEvent",
    "EngineClosedError",
    "HostKVPool",
    "KVLayout",
    "KVRegion",
    "OutOfBlocksError",
    "SwapError",
    "SwapHandle",
]
__version__ = "0.1.0"
