"""The allocator's invariants under random operation sequences (hypothesis stateful)."""

from hypothesis import HealthCheck, settings

from kvswitch.testing import AllocatorStateMachine

TestAllocatorStateMachine = AllocatorStateMachine.TestCase
# The issue asks CI for at least 200 examples of 50 steps.
TestAllocatorStateMachine.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
