"""kvswitch: KV-cache context switching for LLM serving.

Implements the mechanisms of FastSwitch (Shen et al., arXiv 2411.18424) as reusable parts:

* [`BlockGroupAllocator`][]: contiguous block groups with split and merge (section 3.1).
* [`AsyncSwapEngine`][] over a [`KVLayout`][] and a [`HostKVPool`][]: GPU<->CPU
  swaps dispatched from C++ worker threads, off the GIL (section 3.2).
* [`ReuseTracker`][]: CPU copies reused across swap-outs, surviving contamination (3.3).
* [`SwapManager`][]: the per-iteration swap loop over all three (Algorithm 1).
"""

import atexit as _atexit
import threading as _threading

from kvswitch import _core
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


def _quiet_leak_warnings_at_exit() -> None:
    """At exit, non-daemon threads have been joined; a thread still alive is a daemon whose
    frames (e.g. one blocked in SwapHandle.wait()) hold kvswitch objects that are never
    released. nanobind would report them as leaks "caused by the binding code": silence that
    report then, and only then (otherwise it catches real reference-counting bugs)."""
    if any(t.daemon and t.is_alive() for t in _threading.enumerate()):
        _core._set_leak_warnings(False)


_atexit.register(_quiet_leak_warnings_at_exit)
