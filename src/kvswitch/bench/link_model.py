"""The benchmark's link model: how long KV copies take between a GPU and host memory.

``kvswitch bench`` on its virtual clock (the default) makes every copy for real through the
host backend, but takes its *time* from this model, so that the same seed gives the same
figures on any machine. A copy job (one swap-out, swap-in or migration) is a list of copy
calls, one per block extent and region, as [`AsyncSwapEngine`][] issues them.
Each call costs

* ``dispatch_s`` of CPU time on the thread that issues it (the host-side cost of one
  ``cudaMemcpyAsync``), one call after another on that thread, and then
* ``copy_latency_s + bytes / bandwidth`` on the link (the copy engine executing it),
  one copy after another per direction; a copy starts once it is dispatched and the copy
  before it on the link is done.

So a job of many small copies is dispatch-bound (``n * dispatch_s``) and a job of a few
large ones is bandwidth-bound (``bytes / bandwidth``), as the paper measured (FastSwitch,
arXiv 2411.18424, section 2.2, Challenge #1). [`CopyQueues`][] schedules jobs on a
virtual clock: one dispatch queue per worker stream (a job goes to the worker that frees
first), one link per direction (GPU -> host, host -> GPU: PCIe is full duplex) and one for
device-to-device migrations (HBM). Not modelled: the engine's ``sync_every`` throttle,
``cuMemcpyBatchAsync`` (one dispatch for a whole batch: the model charges every copy, as
vLLM's per-copy loop pays), contention between the copies and the model's own kernels.

Presets ([`LINK_PRESETS`][], one per GPU preset of the cost model) and their sources:

* ``dispatch_s = 10 us`` and ``copy_latency_s = 5.9 us``: the paper, section 2.2: for a
  128 KB copy "the dispatch overhead for each cudaMemcpyAsync call exceeds its 10 us
  execution time" (A10, PCIe 4.0). The latency is what is left of those 10 us after
  128 KiB at 32 GB/s (4.1 us). The paper measured them on an A10; the H100 and H200
  presets keep them for want of a published figure (a GPU campaign replaces them:
  [`link_model_from_campaign`][]).
* Host link bandwidth per direction, theoretical: A10 and A100: PCIe 4.0 x16, 32 GB/s
  (the paper, section 4; NVIDIA's A10 and A100 datasheets: "PCIe Gen4 64 GB/s",
  both directions together). H100 SXM and H200 SXM: PCIe 5.0 x16, 64 GB/s (NVIDIA's
  H100 and H200 datasheets: "PCIe Gen5 128 GB/s", both directions together).
* Device-to-device (migrations): each byte is read and written once in HBM, at 70% of the
  datasheet's HBM bandwidth (the cost model's efficiency assumption, not a measurement):
  ``0.7 * hbm / 2``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np
import numpy.typing as npt

from kvswitch.bench.cost_model import GPU_PRESETS

__all__ = ["LINK_PRESETS", "CopyQueues", "LinkModel", "link_model_from_campaign"]

#: Directions of a copy job, as ``SwapHandle.direction`` names them.
DIRECTIONS = ("out", "in", "migrate")


@dataclass(frozen=True)
class LinkModel:
    """Time of copy calls between a GPU's memory and host memory (see the module).

    Attributes:
        name: what it models (a GPU preset name, or the GPU a campaign ran on).
        dispatch_s: seconds of CPU time to issue one copy call (``cudaMemcpyAsync``), on
            the issuing thread.
        copy_latency_s: seconds a copy occupies the link beyond ``bytes / bandwidth``.
        d2h_bytes_per_s: GPU -> host bandwidth (swap-out), bytes per second.
        h2d_bytes_per_s: host -> GPU bandwidth (swap-in), bytes per second.
        d2d_bytes_per_s: device -> device copy rate (migration), bytes per second.
        source: where the figures come from.

    Raises:
        ValueError: a negative or non-finite time, or a bandwidth that is not > 0.
    """

    name: str
    dispatch_s: float
    copy_latency_s: float
    d2h_bytes_per_s: float
    h2d_bytes_per_s: float
    d2d_bytes_per_s: float
    source: str = ""

    def __post_init__(self) -> None:
        for field in ("dispatch_s", "copy_latency_s"):
            x = getattr(self, field)
            if not (math.isfinite(x) and x >= 0):
                raise ValueError(f"{field} must be finite and >= 0, got {x}")
        for field in ("d2h_bytes_per_s", "h2d_bytes_per_s", "d2d_bytes_per_s"):
            x = getattr(self, field)
            if not (math.isfinite(x) and x > 0):
                raise ValueError(f"{field} must be finite and > 0, got {x}")

    def bytes_per_s(self, direction: str) -> float:
        """Bandwidth of ``"out"`` (GPU -> host), ``"in"`` or ``"migrate"``."""
        try:
            return {"out": self.d2h_bytes_per_s, "in": self.h2d_bytes_per_s,
                    "migrate": self.d2d_bytes_per_s}[direction]
        except KeyError:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}") from None

    def job_s(self, direction: str, copy_bytes: npt.ArrayLike) -> float:
        """Seconds from the first dispatch to the last copy's end of a job of copies of
        ``copy_bytes`` bytes each (in issue order), alone on an idle worker and link."""
        return CopyQueues(self, 1).schedule(direction, copy_bytes, at=0.0)[1]


def _preset(gpu: str, d2h_h2d: float, pcie: str) -> LinkModel:
    hbm = GPU_PRESETS[gpu].hbm_bytes_per_s
    return LinkModel(
        name=gpu, dispatch_s=10e-6, copy_latency_s=10e-6 - (128 << 10) / 32e9,
        d2h_bytes_per_s=d2h_h2d, h2d_bytes_per_s=d2h_h2d, d2d_bytes_per_s=0.7 * hbm / 2,
        source=(f"{pcie}; dispatch 10 us and 128 KB in 10 us per cudaMemcpyAsync: FastSwitch "
                f"section 2.2 (A10); device-to-device 70% of the datasheet HBM bandwidth, "
                f"read and written"))


#: One link model per GPU preset of the cost model (see the module for the sources).
LINK_PRESETS: dict[str, LinkModel] = {
    "a10": _preset("a10", 32e9, "PCIe 4.0 x16, 32 GB/s per direction (FastSwitch section 4, "
                                "NVIDIA A10 datasheet)"),
    "a100": _preset("a100", 32e9, "PCIe 4.0 x16, 32 GB/s per direction (FastSwitch section 4, "
                                  "NVIDIA A100 datasheet)"),
    "h100": _preset("h100", 64e9, "PCIe 5.0 x16, 64 GB/s per direction (NVIDIA H100 datasheet: "
                                  "PCIe Gen5 128 GB/s both ways)"),
    "h200": _preset("h200", 64e9, "PCIe 5.0 x16, 64 GB/s per direction (NVIDIA H200 datasheet: "
                                  "PCIe Gen5 128 GB/s both ways)"),
}


def _median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=float)))


def link_model_from_campaign(campaign: str | PathLike[str] | dict[str, Any], *,
                             d2d_bytes_per_s: float) -> LinkModel:
    """A link model measured by ``benchmarks/gpu_campaign.py`` (its ``campaign.json``).

    Read from it:

    * bandwidth per direction: ``results.ceiling.gbps_out`` / ``gbps_in`` (one 2 GiB
      pinned ``cuMemcpyAsync``, GB = 1e9 bytes);
    * ``dispatch_s``: the median of ``submit_us_per_copy`` over the ``results.raw_api.rows``
      with ``api == "memcpy"`` and ``extent == 1`` (CPU time per ``cuMemcpyAsync`` in the
      per-block loop, both directions);
    * ``copy_latency_s``: in those rows, the GPU time per copy (median of ``gpu_s`` over
      ``copies``) less ``bytes / copies`` at the direction's bandwidth; 0 when negative.

    Args:
        campaign: the path of ``campaign.json``, or its parsed content.
        d2d_bytes_per_s: device-to-device rate (the campaign does not measure migrations);
            e.g. that of the GPU preset: ``LINK_PRESETS["h100"].d2d_bytes_per_s``.

    Raises:
        ValueError: the file is not a campaign, or lacks the ceiling or the per-copy rows
            (the steps did not run; their status is in ``steps``).
        OSError: the file cannot be read.
    """
    where = "the campaign"
    if not isinstance(campaign, dict):
        where = str(campaign)
        with open(campaign) as f:
            try:
                campaign = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(campaign, dict) or not isinstance(campaign.get("results"), dict):
        raise ValueError(f"{where}: not a GPU campaign's campaign.json (no 'results')")
    results, steps = campaign["results"], campaign.get("steps") or {}

    def missing(step: str, what: str) -> ValueError:
        status = (steps.get(step) or {}).get("status", "absent")
        return ValueError(f"{where}: no {what} (step {step!r}: {status})")

    ceiling = results.get("ceiling") or {}
    gbps = {d: ceiling.get(f"gbps_{d}") for d in ("out", "in")}
    if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0
               for x in gbps.values()):
        raise missing("ceiling", "bandwidth per direction (results.ceiling.gbps_out/gbps_in)")
    rows = [r for r in (results.get("raw_api") or {}).get("rows", [])
            if r.get("api") == "memcpy" and r.get("extent") == 1 and r.get("copies")]
    if not rows:
        raise missing("raw_api", "per-copy cuMemcpyAsync rows (results.raw_api.rows)")
    dispatch = _median([float(r["submit_us_per_copy"]) * 1e-6 for r in rows])
    latency = _median([max(0.0, _median(r["gpu_s"]) / r["copies"]
                           - r["bytes"] / r["copies"] / (gbps[r["direction"]] * 1e9))
                       for r in rows])
    env = campaign.get("env") or {}
    gpu = (env.get("gpu") or {}).get("name", "unknown GPU")
    return LinkModel(
        name=gpu, dispatch_s=dispatch, copy_latency_s=latency,
        d2h_bytes_per_s=gbps["out"] * 1e9, h2d_bytes_per_s=gbps["in"] * 1e9,
        d2d_bytes_per_s=d2d_bytes_per_s,
        source=(f"GPU campaign on {gpu} ({env.get('date', 'undated')}, commit "
                f"{env.get('commit', '?')}): ceiling GB/s per direction, per-copy submit "
                f"time and GPU time of the per-block cuMemcpyAsync loop"))


class CopyQueues:
    """Copy jobs scheduled on a virtual clock: one dispatch queue per worker stream, one
    link per direction (see the module). Deterministic: times depend only on the calls.

    Args:
        link: the link model.
        num_workers: worker streams (>= 1); each job goes to the one that frees first
            (lowest index on a tie).

    Not thread-safe (one caller: the benchmark's loop).
    """

    def __init__(self, link: LinkModel, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.link = link
        self.worker_free = [0.0] * num_workers  #: when each worker's dispatch queue frees
        self.link_free = dict.fromkeys(DIRECTIONS, 0.0)  #: when each direction's link frees
        self.busy_s = dict.fromkeys(DIRECTIONS, 0.0)  #: job seconds (dispatch to end)

    def schedule(self, direction: str, copy_bytes: npt.ArrayLike, *, at: float,
                 ready: float = 0.0, repeat: int = 1) -> tuple[float, float]:
        """Place one job: submitted at ``at``, not to start before ``ready`` (the end of
        earlier jobs over the same blocks). Returns ``(start, end)``: its first dispatch and
        its last copy's end; ``(start, start)`` for a job of no copies.

        Args:
            direction: ``"out"``, ``"in"`` or ``"migrate"``.
            copy_bytes: bytes of each copy call, in issue order (1-D, >= 0).
            repeat: each entry stands for this many consecutive copies of its size (one
                per region of an extent), so that a job costs one operation per extent.
        """
        bw = self.link.bytes_per_s(direction)
        sizes = np.asarray(copy_bytes, dtype=np.float64).reshape(-1)
        w = min(range(len(self.worker_free)), key=self.worker_free.__getitem__)
        start = max(at, ready, self.worker_free[w])
        if sizes.size == 0 or repeat < 1:
            return start, start
        n, d = sizes.size * repeat, self.link.dispatch_s
        execute = self.link.copy_latency_s + sizes / bw  # one copy of each entry
        # Copy i is dispatched by start + (i+1) d and runs after copy i-1 on the link, so the
        # last ends at max(link free + all copies, max_i(dispatch_i + copies i..n-1)). Within
        # an entry's run of equal copies that term moves by d - execute per copy: its
        # maximum is at the run's first or last copy.
        after = np.cumsum((execute * repeat)[::-1])[::-1]  # copies from each run's first on
        first = start + d * (np.arange(sizes.size, dtype=np.float64) * repeat + 1) + after
        last = first + (repeat - 1) * (d - execute)
        link_free = max(self.link_free[direction], start)
        end = max(link_free + float(after[0]), float(np.max(np.maximum(first, last))))
        self.worker_free[w] = start + n * d
        self.link_free[direction] = end
        self.busy_s[direction] += end - start
        return start, end
