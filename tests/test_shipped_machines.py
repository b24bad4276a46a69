"""kvswitch.testing's manager state machines exactly as an engine developer runs them:
hypothesis's default settings (100 examples of up to 50 steps), deadline off (copies and
thread hand-offs vary in time). .ci/mutants.py runs these against planted manager and
engine bugs (red-team round 2's repro_3 list and more) and requires every one caught."""

from hypothesis import settings

from kvswitch.testing import CompactingSwapManagerStateMachine, SwapManagerStateMachine

TestSwapManagerStateMachine = SwapManagerStateMachine.TestCase
TestSwapManagerStateMachine.settings = settings(deadline=None)
TestCompactingSwapManagerStateMachine = CompactingSwapManagerStateMachine.TestCase
TestCompactingSwapManagerStateMachine.settings = settings(deadline=None)
