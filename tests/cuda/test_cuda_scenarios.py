"""GPU scenarios of the cuda backend (tests/cuda/scenarios.py), one subprocess each.

Each scenario runs in its own interpreter with a timeout, so a hang (a consumer stream
waiting on a flag that is never written, a close() that never returns) fails its test
instead of stalling the session, and CUDA_DEVICE_MAX_CONNECTIONS can be set per scenario
(the driver reads it when the context is created). Skipped without torch or a GPU.
Nothing is timed in an assertion; facts a scenario reports (device attributes, before=
modes accepted) are attached to the test as junit properties.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

pytestmark = pytest.mark.cuda

_spec = importlib.util.spec_from_file_location("kvswitch_gpu_scenarios",
                                               Path(__file__).with_name("scenarios.py"))
scenarios = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = scenarios  # dataclasses look their module up by name
_spec.loader.exec_module(scenarios)


@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_scenario(name, record_property):
    out = scenarios.run_in_subprocess(name)
    for i, facts in enumerate(out.reports):
        record_property(f"report{i}", facts)
    if out.status == "skipped":
        pytest.skip(out.detail)
    assert out.status == "passed", f"{name} {out.status}: {out.detail}"
