"""Reusable test tools for engine developers (needs ``hypothesis``: ``kvswitch[test]``)."""

try:
    import hypothesis  # noqa: F401
except ImportError as e:
    raise ImportError(
        'kvswitch.testing needs hypothesis: pip install "kvswitch[test]"') from e

from kvswitch.testing.allocator_state_machine import AllocatorStateMachine

__all__ = ["AllocatorStateMachine"]
