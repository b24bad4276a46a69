"""Timed loops shared by ``lock_cost.py`` and ``manager_call_cost.py``: the machine line,
a ReuseTracker's plan + commit, and SwapManager swap-out/swap-in bursts with the engine's
workers held (test hook ``_set_paused``), so that a call's time is its own bookkeeping and
not a copy. Not a script: the two benchmarks import it from their own folder."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from typing import Any

import numpy as np

clock = time.perf_counter_ns


def machine() -> str:
    """CPU model, core count and Python version, for a result's header line."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def tracker_plans(tracker: Any, sequences: int) -> list[int]:
    """Nanoseconds of ``plan_swap_out`` + ``commit`` of a 30-block table, per sequence."""
    table = np.arange(30, dtype=np.int32)
    out = []
    for s in range(sequences):
        t0 = clock()
        plan = tracker.plan_swap_out(s, table, 30 * 16)
        tracker.commit(plan)
        out.append(clock() - t0)
    return out


def manager_bursts(m: Any, sequences: int) -> tuple[list[int], list[int]]:
    """Nanoseconds of each ``swap_out`` and ``swap_in`` of ``sequences`` 30-block
    sequences (block size 16) in 3 bursts each, with the workers held during a burst;
    every swap-out copies all 30 blocks (the backups are dropped between bursts). Closes
    ``m``."""
    outs: list[int] = []
    ins: list[int] = []
    for s in range(sequences):
        m.allocate(s, 30)
    m.synchronize()
    pause = m.engine._engine._set_paused  # workers copy only between the timed bursts
    for _ in range(3):
        pause(True)
        for s in range(sequences):
            t0 = clock()
            m.swap_out(s, 30 * 16)
            outs.append(clock() - t0)
        pause(False)
        m.synchronize()
        pause(True)
        for s in range(sequences):
            t0 = clock()
            m.swap_in(s)
            ins.append(clock() - t0)
        pause(False)
        m.synchronize()
        m.poll()
        for s in range(sequences):  # drop the backups: every swap-out copies again
            m.drop_cpu_copy(s)
    m.close()
    return outs, ins
