"""Reusable test tools for engine developers (needs ``hypothesis``: ``kvswitch[test]``)."""

from kvswitch.testing.allocator_state_machine import AllocatorStateMachine

__all__ = ["AllocatorStateMachine"]
