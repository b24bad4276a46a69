"""Cost of thread safety: p50 call times from Python with the locks and without them.

BlockGroupAllocator, ReuseTracker and SwapManager each serialise their calls with one lock
held in ``self._lock``. This script times the same calls with those locks and with
``contextlib.nullcontext()`` swapped in, in alternating rounds of one run (same machine
state), and prints the medians and their ratios:

* ``allocate(seq, 1)`` on a 100,000-block pool (the allocator's lock);
* ``ReuseTracker.plan_swap_out`` + ``commit`` of a 30-block sequence (tracker + host
  allocator locks);
* ``SwapManager.swap_out`` and ``swap_in`` of 64 sequences of 30 blocks over 64 regions,
  host backend, 2 worker threads (manager + tracker + both allocators' locks). Only the
  calls are timed: the workers are held (the engine's ``_set_paused`` test hook) during a
  burst of calls and copy between bursts, so they do not compete for the cores.

Each call is timed alone with ``perf_counter_ns``; the timer's overhead is printed and
included in every figure.

Run: ``python benchmarks/lock_cost.py [--rounds 10]``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
from collections.abc import Callable

import numpy as np
from _manager_rounds import clock, machine, manager_bursts, tracker_plans

from kvswitch import (
    AsyncSwapEngine,
    BlockGroupAllocator,
    HostKVPool,
    KVLayout,
    ReuseTracker,
    SwapManager,
)

NO_LOCK = contextlib.nullcontext()


def unlock(*objs: object) -> None:
    for o in objs:
        o._lock = NO_LOCK  # type: ignore[attr-defined]


def allocate_round(locked: bool, calls: int = 20_000) -> dict[str, list[int]]:
    a = BlockGroupAllocator(100_000)
    if not locked:
        unlock(a)
    out = []
    for i in range(calls):
        t0 = clock()
        a.allocate(i % 200, 1)
        out.append(clock() - t0)
    return {"allocate(1)": out}


def tracker_round(locked: bool, sequences: int = 300) -> dict[str, list[int]]:
    host = BlockGroupAllocator(sequences * 30)
    t = ReuseTracker(host, block_size=16)
    if not locked:
        unlock(t, host)
    return {"plan_swap_out + commit (30 blocks)": tracker_plans(t, sequences)}


def manager_round(locked: bool, sequences: int = 64, regions: int = 64) -> dict[str, list[int]]:
    blocks = sequences * 30
    kv = [np.zeros((blocks, 256), np.uint8) for _ in range(regions)]
    layout = KVLayout.from_tensors(kv)
    engine = AsyncSwapEngine(layout, HostKVPool(layout, blocks, pin=False), backend="host",
                             num_workers=2)
    m = SwapManager(BlockGroupAllocator(blocks), engine, BlockGroupAllocator(blocks),
                    block_size=16, swap_in="async")
    if not locked:
        unlock(m, m.tracker, m.gpu, m.tracker.host)
    outs, ins = manager_bursts(m, sequences)
    return {"SwapManager.swap_out (30 blocks)": outs, "SwapManager.swap_in (30 blocks)": ins}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10, help="rounds per variant (alternating)")
    args = p.parse_args()
    timer = min(-(clock() - clock()) for _ in range(10_000))
    rounds: list[Callable[[bool], dict[str, list[int]]]] = [
        allocate_round, tracker_round, manager_round]
    times: dict[tuple[str, bool], list[int]] = {}
    for fn in rounds:
        fn(True)  # warm-up
    for _ in range(args.rounds):
        for fn in rounds:
            for locked in (True, False):
                for name, ns in fn(locked).items():
                    times.setdefault((name, locked), []).extend(ns)
    print(f"# {datetime.date.today().isoformat()}, {machine()}")
    print(f"# {' '.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}: {args.rounds} "
          f"alternating rounds per variant, timer overhead {timer} ns (included)")
    print(f"{'call':<36} {'p50 locked':>11} {'p50 no lock':>12} {'ratio':>6}")
    for name in dict.fromkeys(n for n, _ in times):
        on = statistics.median(times[name, True]) / 1e3
        off = statistics.median(times[name, False]) / 1e3
        print(f"{name:<36} {on:>8.2f} us {off:>9.2f} us {on / off:>6.3f}")


if __name__ == "__main__":
    main()
