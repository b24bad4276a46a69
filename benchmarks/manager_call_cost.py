"""Python cost of one SwapManager.swap_out / swap_in call (issue 14 item 4): p50 and p90.

The setup of ``benchmarks/lock_cost.py``: 64 sequences of 30 blocks (block size 16), a
GPU pool and a host pool of 64 x 30 blocks, 64 regions of 256-byte blocks, host backend
with 2 worker threads, ``swap_in="async"``. Each round makes a new manager and runs 3
bursts: every sequence swapped out (each swap-out copies all 30 blocks: the backups are
dropped between bursts), then every sequence swapped in. Only the calls are timed, each
alone with ``perf_counter_ns`` (the timer's overhead is printed and included): the
workers are held (the engine's ``_set_paused`` test hook) during a burst and copy between
bursts, so they do not compete for the cores. Also timed: ``ReuseTracker.plan_swap_out``
+ ``commit`` of a 30-block sequence on its own (300 sequences per round).

``--breakdown`` adds one more set of rounds of this checkout in which the engine's
``swap_out``/``swap_in`` (Python wrapper and C++ submit) and the tracker's plans and
commits are timed inside the manager's calls (wrappers on the instances; their own
overhead, about 0.1 us each, lands in the totals of those rounds only, not in the table
above them).

``--before REF`` also times the Python of git revision ``REF`` (its ``reuse.py``,
``swap.py`` and ``manager.py``, read with ``git show`` and loaded as separate modules over
this checkout's C++ core), in rounds alternating with this checkout's, so both are measured
in one run on one machine state.

Run: ``python benchmarks/manager_call_cost.py [--rounds 10] [--before main] [--breakdown]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _manager_rounds import clock, machine, manager_bursts, tracker_plans

import kvswitch.manager
import kvswitch.reuse
import kvswitch.swap
from kvswitch import BlockGroupAllocator, HostKVPool, KVLayout

ROOT = Path(__file__).resolve().parent.parent


def load_revision(ref: str) -> types.SimpleNamespace:
    """``reuse``, ``swap`` and ``manager`` modules of git revision ``ref``, loaded under
    private names (their imports of each other redirected) next to the installed ones."""
    mods = {}
    for name in ("reuse", "swap", "manager"):
        src = subprocess.run(["git", "show", f"{ref}:src/kvswitch/{name}.py"], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout
        for dep in mods:
            src = src.replace(f"from kvswitch.{dep} import", f"from _before_{dep} import")
        mod = types.ModuleType(f"_before_{name}")
        sys.modules[mod.__name__] = mod  # dataclasses look their module up
        exec(compile(src, f"{ref}:src/kvswitch/{name}.py", "exec"), mod.__dict__)
        mods[name] = mod
    return types.SimpleNamespace(ReuseTracker=mods["reuse"].ReuseTracker,
                                 AsyncSwapEngine=mods["swap"].AsyncSwapEngine,
                                 SwapManager=mods["manager"].SwapManager)


def tracker_round(api: types.SimpleNamespace, sequences: int = 300) -> dict[str, list[int]]:
    t = api.ReuseTracker(BlockGroupAllocator(sequences * 30), block_size=16)
    return {"plan_swap_out + commit": tracker_plans(t, sequences)}


def timed(obj: object, name: str, label: str, into: dict[str, list[int]]) -> None:
    """Replace the bound method ``obj.name`` by one that records its duration."""
    method = getattr(obj, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        t0 = clock()
        try:
            return method(*args, **kwargs)
        finally:
            into.setdefault(label, []).append(clock() - t0)

    setattr(obj, name, wrapper)


def manager_round(api: types.SimpleNamespace, sequences: int = 64, regions: int = 64,
                  parts: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    blocks = sequences * 30
    kv = [np.zeros((blocks, 256), np.uint8) for _ in range(regions)]
    layout = KVLayout.from_tensors(kv)
    engine = api.AsyncSwapEngine(layout, HostKVPool(layout, blocks, pin=False),
                                 backend="host", num_workers=2)
    m = api.SwapManager(BlockGroupAllocator(blocks), engine, BlockGroupAllocator(blocks),
                        block_size=16, swap_in="async")
    if parts is not None:
        for obj, name in ((engine, "swap_out"), (engine, "swap_in"), (m.tracker, "plan_swap_out"),
                          (m.tracker, "plan_swap_in"), (m.tracker, "commit")):
            timed(obj, name, f"  {type(obj).__name__}.{name}", parts)
    outs, ins = manager_bursts(m, sequences)
    return {"SwapManager.swap_out": outs, "SwapManager.swap_in": ins}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10, help="rounds per variant (alternating)")
    p.add_argument("--before", metavar="REF",
                   help="also time the Python of this git revision (e.g. main)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the engine and tracker calls inside the manager's")
    args = p.parse_args()
    timer = min(-(clock() - clock()) for _ in range(10_000))
    variants = {"this checkout": types.SimpleNamespace(
        ReuseTracker=kvswitch.reuse.ReuseTracker, AsyncSwapEngine=kvswitch.swap.AsyncSwapEngine,
        SwapManager=kvswitch.manager.SwapManager)}
    if args.before:
        variants = {f"before ({args.before})": load_revision(args.before), **variants}
    rounds: list[Callable[[types.SimpleNamespace], dict[str, list[int]]]] = [
        manager_round, tracker_round]
    times: dict[tuple[str, str], list[int]] = {}
    for api in variants.values():
        for fn in rounds:
            fn(api)  # warm-up
    for _ in range(args.rounds):
        for fn in rounds:
            for label, api in variants.items():
                for name, ns in fn(api).items():
                    times.setdefault((name, label), []).extend(ns)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip() or "?"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, "
          f"load average {load} at the end")
    print(f"# {' '.join(['python', 'benchmarks/' + os.path.basename(sys.argv[0]), *sys.argv[1:]])}"
          f" at {head}: {args.rounds} alternating rounds per variant, timer overhead "
          f"{timer} ns (included)")
    print("# 64 sequences x 30 blocks (block size 16), 64 regions, host backend, 2 workers "
          "paused during the timed bursts")
    print(f"{'call (30 blocks)':<24} {'variant':<16} {'calls':>6} {'p50':>9} {'p90':>9}")
    for name in dict.fromkeys(n for n, _ in times):
        for label in variants:
            ns = times[name, label]
            p50 = statistics.median(ns) / 1e3
            p90 = float(np.percentile(ns, 90)) / 1e3
            print(f"{name:<24} {label:<16} {len(ns):>6} {p50:>6.2f} us {p90:>6.2f} us")
    if args.breakdown:
        parts: dict[str, list[int]] = {}
        api = variants["this checkout"]
        for _ in range(args.rounds):
            for name, ns in manager_round(api, parts=parts).items():
                parts.setdefault(name, []).extend(ns)
        print(f"# breakdown, this checkout, {args.rounds} more rounds with the inner calls "
              "timed too (commit: swap-outs' and swap-ins' together)")
        for name, ns in parts.items():
            p50 = statistics.median(ns) / 1e3
            p90 = float(np.percentile(ns, 90)) / 1e3
            print(f"{name:<41} {len(ns):>6} {p50:>6.2f} us {p90:>6.2f} us")


if __name__ == "__main__":
    main()
