"""The benchmark's virtual clock and a swap engine whose jobs take the link model's time.

[`VirtualSwapEngine`][] stands in for [`AsyncSwapEngine`][] under a
[`SwapManager`][]: every job is really copied, inline and at once, by a
host-backend engine (so the bytes can be checked), but its handle reports *done* only
when the [`VirtualClock`][] reaches the end the
[`CopyQueues`][kvswitch.bench.link_model.CopyQueues] gave it, and a wait on it moves the
clock there instead of sleeping. A job
starts no earlier than the end of earlier jobs over any of the same GPU or host blocks
(the engine's ordering) and is timed for the preset's bytes, not the executed ones. The
manager reads its wait times from the same clock (``SwapManager(clock=...)``), so stalls,
conflicts and swap-in decisions are all on the virtual clock: nothing depends on how fast
or how loaded this machine is.

Not thread-safe: one loop drives the clock, the engine and the manager.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvswitch.bench.link_model import CopyQueues, LinkModel
from kvswitch.host_pool import HostKVPool
from kvswitch.layout import KVLayout
from kvswitch.manager import _per_block_pairs
from kvswitch.swap import AsyncSwapEngine

__all__ = ["ModelledLayout", "VirtualClock", "VirtualHandle", "VirtualSwapEngine"]


class VirtualClock:
    """Seconds of modelled time; only [`advance`][] and [`advance_to`][] move it.

    Calling it returns the time, so it can stand in for ``time.perf_counter``.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move forward by ``seconds`` (>= 0)."""
        if not seconds >= 0:
            raise ValueError(f"the clock only moves forward, got {seconds}")
        self.now += seconds

    def advance_to(self, t: float) -> None:
        """Move to ``t`` if that is later (a wait for something that ends at ``t``)."""
        if t > self.now:
            self.now = t


class VirtualHandle:
    """A job's handle on the virtual clock: the attributes of [`kvswitch.SwapHandle`][]
    that the manager reads (``done``, ``wait``, ``error``, ``nbytes``, ``elapsed_s``, ...).
    ``nbytes`` are the preset's bytes (what the link model timed)."""

    __slots__ = ("_clock", "_real", "direction", "end", "nbytes", "num_copies", "start")

    def __init__(self, clock: VirtualClock, real: Any, direction: str, nbytes: int,
                 num_copies: int, start: float, end: float) -> None:
        self._clock, self._real = clock, real
        self.direction, self.nbytes, self.num_copies = direction, nbytes, num_copies
        self.start, self.end = start, end

    def done(self) -> bool:
        return self._clock.now >= self.end

    def wait(self, timeout: float | None = None) -> bool:
        """Advance the clock to the job's end (at most ``timeout`` seconds); True when
        done. Raises SwapError if the copies failed."""
        if timeout is not None and not (timeout >= 0):
            raise ValueError(f"timeout must be >= 0, got {timeout}")
        if timeout is not None and math.isfinite(timeout) and self._clock.now + timeout < self.end:
            self._clock.advance(timeout)
            return False
        self._clock.advance_to(self.end)
        self._real.wait()  # finished already (inline): raises if the copy failed
        return True

    @property
    def error(self) -> str:
        return self._real.error if self.done() else ""

    @property
    def elapsed_s(self) -> float | None:
        return self.end - self.start if self.done() else None

    @property
    def id(self) -> int:
        return self._real.id

    @property
    def root_job_id(self) -> int | None:
        return self._real.root_job_id if self.done() else None


@dataclass(frozen=True)
class ModelledLayout:
    """What a SwapManager reads of its engine's device layout, for the modelled GPU pool:
    its blocks and regions (the copy calls it counts: extents x ``num_regions``), and the
    bytes of one block of the executed pool (``bytes_copied``)."""

    num_blocks: int
    num_regions: int
    bytes_per_block: int


class VirtualSwapEngine:
    """The parts of [`AsyncSwapEngine`][] a SwapManager uses, with real
    copies (host backend, inline) and link-modelled time (see the module).

    The executed pools may have fewer regions than the modelled GPU (e.g. one stamp per
    block): each executed extent copy stands for the ``num_regions`` copy calls of the
    modelled pool, which the link model times and [`device_layout`][] reports.

    Args:
        device_layout: the executed GPU pool stand-in (host memory).
        host_pool: the executed host pool.
        link: the link model.
        clock: the virtual clock (shared with the loop and the manager).
        num_workers: modelled worker streams (>= 0); 0 models inline copies: the submitting
            call waits for its job, as ``AsyncSwapEngine(num_workers=0)`` does.
        num_regions: regions of the modelled pool (one copy call per extent and region).
        region_block_bytes: the preset's bytes of one block in one region (what a copy of
            one block moves on the modelled GPU).

    Raises:
        ValueError: a region count or size that is not positive, negative workers.
    """

    backend = "host"

    def __init__(self, device_layout: KVLayout, host_pool: HostKVPool, link: LinkModel,
                 clock: VirtualClock, *, num_workers: int, num_regions: int,
                 region_block_bytes: int) -> None:
        if num_regions < 1 or region_block_bytes < 1:
            raise ValueError(f"num_regions and region_block_bytes must be positive, got "
                             f"{num_regions} and {region_block_bytes}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self._real = AsyncSwapEngine(device_layout, host_pool, backend="host", num_workers=0)
        self._layout = ModelledLayout(device_layout.num_blocks, num_regions,
                                      device_layout.bytes_per_block)
        self.clock = clock
        self.link = link
        self.num_workers = num_workers
        self.queues = CopyQueues(link, max(num_workers, 1))
        self._regions, self._region_bytes = num_regions, region_block_bytes
        self._gpu_busy = np.zeros(device_layout.num_blocks)  # end of the last job per block
        self._host_busy = np.zeros(host_pool.num_blocks)
        self._last_end = 0.0
        self._ends: dict[str, list[float]] = {"out": [], "in": [], "migrate": []}  # heaps
        # Link-modelled totals, per direction: jobs, copies, preset bytes, job seconds.
        self._n = {d: {"jobs": 0, "copies": 0, "bytes": 0, "seconds": 0.0}
                   for d in ("out", "in", "migrate")}

    @property
    def device_layout(self) -> ModelledLayout:
        return self._layout

    @property
    def host_pool(self) -> HostKVPool | KVLayout:
        return self._real.host_pool

    @property
    def closed(self) -> bool:
        return self._real.closed

    @property
    def sync_every(self) -> int:
        return self._real.sync_every

    # -- jobs ------------------------------------------------------------------------------

    def _job(self, direction: str, pairs: Any, real: Any) -> VirtualHandle:
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 3)
        pairs = pairs[pairs[:, 2] > 0]
        lengths = pairs[:, 2]
        blocks = _per_block_pairs(pairs)  # every (source, destination) block
        src, dst = blocks[:, 0], blocks[:, 1]
        gpu_ids = {"out": (src,), "in": (dst,), "migrate": (src, dst)}[direction]
        host_ids = {"out": dst, "in": src, "migrate": None}[direction]
        ready = max([float(self._gpu_busy[ids].max(initial=0.0)) for ids in gpu_ids]
                    + ([float(self._host_busy[host_ids].max(initial=0.0))]
                       if host_ids is not None else []))
        extent_bytes = lengths * self._region_bytes  # one copy per region of each
        start, end = self.queues.schedule(direction, extent_bytes, at=self.clock.now,
                                          ready=ready, repeat=self._regions)
        for ids in gpu_ids:
            self._gpu_busy[ids] = end
        if host_ids is not None:
            self._host_busy[host_ids] = end
        self._last_end = max(self._last_end, end)
        heapq.heappush(self._ends[direction], end)
        nbytes, copies = int(extent_bytes.sum()) * self._regions, len(pairs) * self._regions
        n = self._n[direction]
        n["jobs"] += 1
        n["copies"] += copies
        n["bytes"] += nbytes
        n["seconds"] += end - start
        handle = VirtualHandle(self.clock, real, direction, nbytes, copies, start, end)
        if self.num_workers == 0:  # inline: the caller dispatches and waits
            self.clock.advance_to(end)
        return handle

    def swap_out(self, pairs: Any, *, after: Any = None) -> VirtualHandle:
        real = (self._real.swap_out(pairs) if after is None
                else self._real.swap_out(pairs, after=after))
        return self._job("out", pairs, real)

    def swap_in(self, pairs: Any, *, before: Any = None, after: Any = None) -> VirtualHandle:
        streams = {k: v for k, v in (("before", before), ("after", after)) if v is not None}
        return self._job("in", pairs, self._real.swap_in(pairs, **streams))

    def migrate(self, pairs: Any, *, after: Any = None, before: Any = None) -> VirtualHandle:
        streams = {k: v for k, v in (("before", before), ("after", after)) if v is not None}
        return self._job("migrate", pairs, self._real.migrate(pairs, **streams))

    def check_swap_out(self, *, after: Any = None) -> None:
        self._real.check_swap_out(after=after)

    def check_swap_in(self, *, before: Any = None, after: Any = None) -> None:
        self._real.check_swap_in(before=before, after=after)

    def check_migrate(self, *, after: Any = None, before: Any = None) -> None:
        self._real.check_migrate(after=after, before=before)

    def wait_blocks(self, gpu_block_ids: Any) -> int:
        """Advance the clock to the end of the last job over these GPU blocks; 1 if that
        was a wait, else 0."""
        ids = np.asarray(gpu_block_ids, dtype=np.int64).reshape(-1)
        t = float(self._gpu_busy[ids].max(initial=0.0))
        if t > self.clock.now:
            self.clock.advance_to(t)
            return 1
        return 0

    def next_end(self, direction: str) -> float | None:
        """The earliest end, after now, of a job of ``direction``; None if none is running."""
        ends, now = self._ends[direction], self.clock.now
        while ends and ends[0] <= now:
            heapq.heappop(ends)
        return ends[0] if ends else None

    def synchronize(self) -> None:
        """Advance the clock to the end of every job submitted so far."""
        self.clock.advance_to(self._last_end)

    def stats(self) -> dict[str, Any]:
        """The real engine's counters (executed jobs, copies and bytes: ``num_jobs``,
        ``num_copies``, ``bytes``, ...) without its wall times, plus the link model's
        (modelled copy calls and the preset's bytes):
        ``link_s`` (seconds of swap jobs, first dispatch to last copy), ``link_copies``,
        ``link_bytes`` (the preset's bytes) and ``link_migration_s``."""
        real = self._real.stats()
        for k in ("seconds", "busy_s", "gbps", "migration_seconds", "copy_size_histogram"):
            real.pop(k, None)
        n = self._n
        return {**real,
                "link_s": n["out"]["seconds"] + n["in"]["seconds"],
                "link_copies": n["out"]["copies"] + n["in"]["copies"],
                "link_bytes": n["out"]["bytes"] + n["in"]["bytes"],
                "link_migration_s": n["migrate"]["seconds"],
                "link_by_direction": {d: dict(v) for d, v in n.items()}}

    def close(self) -> None:
        self._real.close()

