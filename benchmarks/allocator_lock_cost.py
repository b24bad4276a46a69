"""Cost of BlockGroupAllocator's lock: allocate(1) p50 from Python, with and without it.

The allocator serialises calls with one ``threading.Lock`` (``self._lock``). This script
times ``allocate(seq, 1)`` with that lock and with ``contextlib.nullcontext()`` swapped in,
in alternating rounds of the same run (same machine state), and prints both medians and
their ratio. Each call is timed alone with ``perf_counter_ns``; the timer's own overhead is
printed and included in both figures. The project's target is allocate(1) p50 <= 2 us.

Run: ``python benchmarks/allocator_lock_cost.py [--rounds 10] [--calls 20000]``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time

from kvswitch import BlockGroupAllocator


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def one_round(locked: bool, calls: int, sequences: int) -> list[int]:
    """Per-call nanoseconds of `calls` allocate(seq, 1), round-robin over `sequences`."""
    a = BlockGroupAllocator(100_000)
    if not locked:
        a._lock = contextlib.nullcontext()
    out = []
    clock = time.perf_counter_ns
    for i in range(calls):
        seq = i % sequences
        t0 = clock()
        a.allocate(seq, 1)
        out.append(clock() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10, help="rounds per variant (alternating)")
    p.add_argument("--calls", type=int, default=20_000, help="allocate calls per round")
    p.add_argument("--sequences", type=int, default=200, help="sequences per round")
    args = p.parse_args()
    timer = min(-(time.perf_counter_ns() - time.perf_counter_ns()) for _ in range(10_000))
    times: dict[bool, list[int]] = {True: [], False: []}
    one_round(True, 1000, args.sequences)  # warm-up
    for _ in range(args.rounds):
        for locked in (True, False):
            times[locked] += one_round(locked, args.calls, args.sequences)
    with_lock = statistics.median(times[True]) / 1e3
    without = statistics.median(times[False]) / 1e3
    print(f"# {datetime.date.today().isoformat()}, {machine()}")
    print(f"# {' '.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}: "
          f"{args.rounds} x {args.calls} calls per variant, timer overhead {timer} ns (included)")
    print(f"allocate(1) p50 with lock:    {with_lock:.3f} us")
    print(f"allocate(1) p50 without lock: {without:.3f} us")
    print(f"ratio with/without:           {with_lock / without:.3f}")


if __name__ == "__main__":
    main()
