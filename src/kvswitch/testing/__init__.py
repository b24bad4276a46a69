"""Reusable test tools for engine developers (needs ``hypothesis``: ``kvswitch[test]``).

* [`AllocatorStateMachine`][]: the allocator's invariants against a reference model.
* [`SwapManagerStateMachine`][]: serving histories over a SwapManager with real bytes,
  rollbacks, host-pool pressure, injected copy failures, copies held in flight and
  concurrent callers.
* [`HeldEngine`][]: an AsyncSwapEngine whose jobs stay queued until a test releases them
  or the code under test waits for them (deterministic "still in flight" states).
"""

try:
    import hypothesis  # noqa: F401
except ImportError as e:
    raise ImportError(
        'kvswitch.testing needs hypothesis: pip install "hypothesis>=6.100"') from e

from kvswitch.testing.allocator_state_machine import AllocatorStateMachine
from kvswitch.testing.held_engine import HeldEngine, HeldHandle
from kvswitch.testing.swap_manager_state_machine import (
    CompactingSwapManagerStateMachine,
    SwapManagerStateMachine,
)

__all__ = ["AllocatorStateMachine", "CompactingSwapManagerStateMachine", "HeldEngine",
           "HeldHandle", "SwapManagerStateMachine"]
