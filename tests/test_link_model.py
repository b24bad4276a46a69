"""The benchmark's link model (kvswitch.bench.link_model) and its virtual copy queues."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvswitch.bench.cost_model import GPU_PRESETS
from kvswitch.bench.link_model import (
    LINK_PRESETS,
    CopyQueues,
    LinkModel,
    link_model_from_campaign,
)

ROOT = Path(__file__).resolve().parent.parent
LINK = LinkModel("test", dispatch_s=10e-6, copy_latency_s=2e-6, d2h_bytes_per_s=1e9,
                 h2d_bytes_per_s=2e9, d2d_bytes_per_s=100e9)


def test_every_gpu_preset_has_a_sourced_link_preset():
    assert set(LINK_PRESETS) == set(GPU_PRESETS)
    for name, link in LINK_PRESETS.items():
        assert link.name == name and "FastSwitch" in link.source
    # The paper's figures: a 128 KB copy executes in 10 us over PCIe 4.0 x16 (32 GB/s).
    a10 = LINK_PRESETS["a10"]
    assert a10.copy_latency_s + (128 << 10) / a10.h2d_bytes_per_s == pytest.approx(10e-6)
    assert a10.dispatch_s == 10e-6 and a10.d2h_bytes_per_s == 32e9
    assert LINK_PRESETS["h100"].h2d_bytes_per_s == 2 * a10.h2d_bytes_per_s  # PCIe 5.0


def test_many_small_copies_are_dispatch_bound_few_large_ones_bandwidth_bound():
    small = LINK.job_s("out", [1000] * 500)  # 3 us per copy on the link, 10 us to dispatch
    assert small == pytest.approx(500 * 10e-6 + 2e-6 + 1000 / 1e9)
    big = LINK.job_s("out", [10**7] * 4)  # 10 ms per copy on the link
    assert big == pytest.approx(10e-6 + 4 * (2e-6 + 10**7 / 1e9))
    # The same bytes in one copy instead of 500: dispatch paid once.
    assert LINK.job_s("out", [500_000]) < small / 9
    assert LINK.job_s("in", [10**7]) < LINK.job_s("out", [10**7])  # per-direction bandwidth


@given(st.lists(st.integers(0, 10**7), min_size=1, max_size=60), st.integers(1, 5),
       st.floats(0, 1e-3))
def test_job_time_is_the_serial_pipeline_of_dispatch_and_copies(sizes, repeat, busy):
    # Step by step: copy i is dispatched by (i+1) d, then runs after copy i-1 on the link
    # (busy until `busy` with an earlier job).
    copies = [b for b in sizes for _ in range(repeat)]
    t_link = busy
    for i, b in enumerate(copies):
        t_link = max(t_link, (i + 1) * LINK.dispatch_s) + LINK.copy_latency_s + b / 1e9
    q = CopyQueues(LINK, 1)
    q.link_free["out"] = busy
    assert q.schedule("out", sizes, at=0.0, repeat=repeat) == pytest.approx(
        (0.0, t_link), rel=1e-12, abs=1e-15)
    assert q.worker_free[0] == pytest.approx(len(copies) * LINK.dispatch_s)
    assert LINK.job_s("out", copies) >= max(len(copies) * LINK.dispatch_s, sum(copies) / 1e9)


def test_queues_share_a_direction_overlap_directions_and_respect_order():
    q = CopyQueues(LINK, num_workers=2)
    s1, e1 = q.schedule("out", [10**6], at=0.0)
    s2, e2 = q.schedule("out", [10**6], at=0.0)  # second worker, same link: after the first
    assert s1 == s2 == 0.0 and e2 == pytest.approx(e1 + 2e-6 + 1e-3)
    s3, e3 = q.schedule("in", [10**6], at=0.0)  # the other direction: no wait for the link,
    assert s3 == pytest.approx(10e-6)  # but both workers are dispatching until 10 us
    assert e3 == pytest.approx(10e-6 + 10e-6 + 2e-6 + 0.5e-3)
    s4, e4 = q.schedule("in", [1], at=0.0, ready=1.0)  # after a job over the same blocks
    assert s4 == 1.0 and e4 > 1.0
    assert q.schedule("migrate", [], at=5.0) == (5.0, 5.0)
    with pytest.raises(ValueError, match="direction"):
        q.schedule("sideways", [1], at=0.0)
    with pytest.raises(ValueError, match="num_workers"):
        CopyQueues(LINK, 0)


def test_bad_figures_are_refused():
    with pytest.raises(ValueError, match="d2h_bytes_per_s"):
        LinkModel("x", 1e-6, 0.0, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="dispatch_s"):
        LinkModel("x", float("nan"), 0.0, 1.0, 1.0, 1.0)


# -- loaded from a GPU campaign's campaign.json ------------------------------------------------

def _campaign_module():
    spec = importlib.util.spec_from_file_location("kvswitch_gpu_campaign_lm",
                                                  ROOT / "benchmarks" / "gpu_campaign.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _raw_row(direction: str, api: str, extent: int, submit_us: float, gpu_us: float) -> dict:
    """A row as gpu_campaign.raw_case returns it: 120 blocks x 64 regions of 32 KiB."""
    copies, nbytes = 120 // extent * 64, 120 * 64 * 32768
    return {"direction": direction, "api": api, "extent": extent, "extents": 120 // extent,
            "copies": copies, "bytes": nbytes, "api_name": api,
            "gpu_s": [gpu_us * 1e-6 * copies] * 3, "submit_s": [submit_us * 1e-6 * copies] * 3,
            "gbps_gpu": nbytes / (gpu_us * 1e-6 * copies) / 1e9,
            "submit_us_per_copy": submit_us, "gbps_submit": 1.0}


def test_a_campaign_json_gives_the_measured_link(tmp_path):
    g = _campaign_module()
    campaign = {
        "command": "python3 benchmarks/gpu_campaign.py --out x", "geometry": {},
        "env": {"gpu": {"name": "NVIDIA H100 80GB HBM3"}, "date": "2026-12-01T00:00:00+00:00",
                "commit": "abc1234"},
        "steps": {"ceiling": {"status": "ok"}, "raw_api": {"status": "ok"}},
        "results": {
            "ceiling": {"bytes": 2 << 30, "gbps_out": 50.0, "gbps_in": 55.0, "gbps_both": 90.0},
            "raw_api": {"rows": [
                _raw_row("out", "memcpy", 1, submit_us=3.0, gpu_us=2.0),
                _raw_row("in", "memcpy", 1, submit_us=5.0, gpu_us=2.0),
                _raw_row("out", "batch", 1, submit_us=0.1, gpu_us=1.0),  # not the loop
                _raw_row("out", "memcpy", 60, submit_us=99.0, gpu_us=99.0),  # not per block
            ], "seq_blocks": 120, "note": ""}}}
    g.write_outputs(tmp_path, campaign)  # the campaign's own writer: its real format
    link = link_model_from_campaign(tmp_path / "campaign.json", d2d_bytes_per_s=1e12)
    assert link.name == "NVIDIA H100 80GB HBM3" and "2026-12-01" in link.source
    assert link.d2h_bytes_per_s == 50e9 and link.h2d_bytes_per_s == 55e9
    assert link.dispatch_s == pytest.approx(4e-6)  # median of 3 and 5 us
    # 2 us per 32 KiB copy on the GPU, less 32 KiB at the direction's bandwidth.
    lat = np.median([2e-6 - 32768 / 50e9, 2e-6 - 32768 / 55e9])
    assert link.copy_latency_s == pytest.approx(lat)
    assert link.d2d_bytes_per_s == 1e12
    assert link_model_from_campaign(json.loads((tmp_path / "campaign.json").read_text()),
                                    d2d_bytes_per_s=1e12) == link


def test_a_campaign_without_its_steps_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "campaign.json"
    path.write_text(json.dumps({"env": {}, "steps": {"ceiling": {"status": "skipped"}},
                                "results": {}}))
    with pytest.raises(ValueError, match=r"ceiling.*skipped"):
        link_model_from_campaign(path, d2d_bytes_per_s=1e12)
    path.write_text(json.dumps({"steps": {}, "results": {
        "ceiling": {"gbps_out": 10.0, "gbps_in": 10.0}}}))
    with pytest.raises(ValueError, match=r"raw_api.*absent"):
        link_model_from_campaign(path, d2d_bytes_per_s=1e12)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a GPU campaign"):
        link_model_from_campaign(path, d2d_bytes_per_s=1e12)
    path.write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        link_model_from_campaign(path, d2d_bytes_per_s=1e12)
