"""GPU scenarios of the cuda backend, each run in a process of its own.

Run one with ``python tests/cuda/scenarios.py NAME`` (``--list`` prints the names). A
scenario prints ``SCENARIO-OK`` and exits 0 when it passes, prints ``SCENARIO-SKIP: why``
and exits 77 when it cannot run here (no GPU, no CuPy, one device, an API this kvswitch
lacks), and fails with a traceback otherwise. ``REPORT: {json}`` lines carry facts for the
campaign (benchmarks/gpu_campaign.py), never timed assertions.

tests/cuda/test_cuda_scenarios.py runs each in a subprocess with a timeout, so a hang (a
stream waiting forever on a flag, a close() that never returns) fails the test instead of
the whole session; the campaign does the same without pytest when pytest is absent.

Only the standard library is imported at module level: listing works on any machine.
Sources: FastSwitch (arXiv 2411.18424) section 3.2 (ordering of swaps against compute,
conflict resolution); CUDA Driver API reference (stream memory operations, cuMemcpy2D's
pitch limit CU_DEVICE_ATTRIBUTE_MAX_PITCH).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

SKIP_EXIT = 77
OK_MARKER = "SCENARIO-OK"
SKIP_MARKER = "SCENARIO-SKIP:"
REPORT_MARKER = "REPORT:"


class Skip(Exception):
    """The scenario cannot run on this machine."""


def report(**facts: object) -> None:
    print(REPORT_MARKER, json.dumps(facts, default=str), flush=True)


# ---------------------------------------------------------------------------- helpers

def need_torch_cuda():
    try:
        import torch
    except ImportError:
        raise Skip("torch is not installed") from None
    if not torch.cuda.is_available():
        raise Skip("no CUDA device (torch.cuda.is_available() is False)")
    return torch


def supports_before_wait() -> bool:
    """Whether this kvswitch's AsyncSwapEngine takes ``before_wait=`` ("event"/"flag")."""
    from kvswitch import AsyncSwapEngine

    return "before_wait" in inspect.signature(AsyncSwapEngine.__init__).parameters


def make_engine(layout, pool, *, before_wait: str | None = None, **kw):
    """AsyncSwapEngine on the cuda backend. ``before_wait``: "event" or "flag"; without
    the option (kvswitch before the event mode) "flag" is the only behaviour there is and
    "event" skips the scenario."""
    from kvswitch import AsyncSwapEngine

    if before_wait is not None:
        if supports_before_wait():
            kw["before_wait"] = before_wait
        elif before_wait != "flag":
            raise Skip(f"this kvswitch's AsyncSwapEngine has no before_wait= option "
                       f"(needed: before_wait={before_wait!r})")
    eng = AsyncSwapEngine(layout, pool, backend="cuda", **kw)
    assert eng.backend == "cuda", eng.backend_reason
    return eng


@dataclass
class Pools:
    """A vLLM-style device pool (bf16, [2, blocks, 16, heads, dim] per layer) and a
    pinned host pool of the same block shape; ``views[r]`` is region r on the device."""

    tensors: list
    views: list
    layout: object
    pool: object
    torch: object = field(repr=False)

    def dev(self, r: int, start: int, n: int):
        """Device blocks [start, start + n) of region r as int16 (bitwise compares)."""
        return self.views[r][start:start + n].view(self.torch.int16)

    def host(self, r: int, start: int, n: int):
        """Host blocks [start, start + n) of region r, copied to the device as int16."""
        import numpy as np

        a = self.pool.arrays[r][start:start + n].view(np.int16)
        return self.torch.from_numpy(a.copy()).to(self.views[r].device)

    def same(self, host_start: int, dev_start: int, n: int) -> bool:
        self.torch.cuda.synchronize()
        return all(self.torch.equal(self.dev(r, dev_start, n), self.host(r, host_start, n))
                   for r in range(len(self.views)))

    def randomize_host(self, seed: int) -> None:
        import numpy as np

        rng = np.random.default_rng(seed)
        for a in self.pool.arrays:
            b = a.reshape(-1).view(np.uint8)
            b[:] = np.frombuffer(rng.bytes(b.size), dtype=np.uint8)

    def randomize_device(self) -> None:
        torch = self.torch
        for t in self.tensors:
            t.view(torch.int16).copy_(torch.randint(-32768, 32767, t.shape, dtype=torch.int16,
                                                    device=t.device))
        torch.cuda.synchronize()


def make_pools(torch, *, layers: int = 4, blocks: int = 256, host_blocks: int | None = None,
               heads: int = 8, dim: int = 128, device: str = "cuda:0", pin: bool = True) -> Pools:
    from kvswitch import HostKVPool, KVLayout

    tensors = [torch.zeros((2, blocks, 16, heads, dim), dtype=torch.bfloat16, device=device)
               for _ in range(layers)]
    views = [t[kv] for t in tensors for kv in (0, 1)]
    layout = KVLayout.from_vllm(tensors)
    pool = HostKVPool(layout, host_blocks or blocks, pin=pin)
    if pin:
        assert pool.pinned, pool.pin_reason
    for a in pool.arrays:
        a.fill(0)
    torch.cuda.synchronize()  # torch.zeros ran on the default stream; engine streams don't wait
    return Pools(tensors, views, layout, pool, torch)


def bf16_bits(torch, value: float) -> int:
    """Raw 16 bits of ``value`` in bfloat16 (how host pool arrays hold bf16)."""
    return int(torch.tensor([value], dtype=torch.bfloat16).view(torch.int16).item()) & 0xFFFF


def expect_failure(handle, what: str) -> str:
    from kvswitch import SwapError

    try:
        handle.wait(timeout=60)
    except SwapError as e:
        return str(e)
    raise AssertionError(f"{what}: the job succeeded")


# ---------------------------------------------------------------------------- scenarios

def cross_worker_raw_war() -> None:
    """Jobs on two workers that conflict over device blocks run in submission order:
    read-after-write (swap-in to D, then swap-out of D sees the new bytes) and
    write-after-read (swap-out of D, then swap-in to D: the swap-out sees the old bytes).
    Extents of 128 blocks x 16 regions (64 MiB per job) so the copies would overlap if the
    engine let them; the workers are held while both jobs are queued, then released."""
    torch = need_torch_cuda()
    p = make_pools(torch, layers=8, blocks=512)
    p.randomize_host(1)
    n, rounds = 128, 8
    with make_engine(p.layout, p.pool, num_workers=2) as eng:
        paused = hasattr(eng._engine, "_set_paused")
        for i in range(rounds):
            hold = paused and i % 2 == 0
            # read after write: host [0,128) -> dev D, then dev D -> host [256, 384)
            d = 128 * (i % 3)
            for t in p.tensors:
                t.fill_(0)
            torch.cuda.synchronize()
            if hold:
                eng._engine._set_paused(True)
            w = eng.swap_in([[0, d, n]])
            r = eng.swap_out([[d, 256, n]])
            if hold:
                eng._engine._set_paused(False)
            assert w.wait(timeout=60) and r.wait(timeout=60)
            assert p.same(256, d, n), f"round {i}: swap-out did not see the swap-in's bytes"
            assert p.same(0, d, n)
            # write after read: dev D (random) -> host [384, 512) while host [128, 256)
            # -> dev D is queued right behind it
            p.randomize_device()
            old = [p.dev(k, d, n).clone() for k in range(len(p.views))]
            torch.cuda.synchronize()  # the clones (default stream) before the engine's copies
            if hold:
                eng._engine._set_paused(True)
            r = eng.swap_out([[d, 384, n]])
            w = eng.swap_in([[128, d, n]])
            if hold:
                eng._engine._set_paused(False)
            assert r.wait(timeout=60) and w.wait(timeout=60)
            torch.cuda.synchronize()
            for k in range(len(p.views)):
                assert torch.equal(p.host(k, 384, n), old[k]), \
                    f"round {i}, region {k}: swap-out read bytes the later swap-in wrote"
            assert p.same(128, d, n), f"round {i}: swap-in did not land"
        report(rounds=rounds, held_workers=paused, stats=eng.stats())


def _threads_before_after(mode: str) -> None:
    """Two threads share one torch stream: thread A swaps in with before=stream and reads
    the blocks on that stream; thread B writes blocks on the stream and swaps them out with
    after=stream. Nothing may hang (a stream waiting on a flag a queued job never writes)
    and every read must see its bytes."""
    torch = need_torch_cuda()
    p = make_pools(torch, layers=4, blocks=512)
    s = torch.cuda.Stream()
    try:
        eng = make_engine(p.layout, p.pool, num_workers=2, before_wait=mode)
        if hasattr(eng, "check_swap_in"):
            eng.check_swap_in(before=s)  # a device without stream memory ops refuses flags
    except ValueError as e:
        raise Skip(f"before_wait={mode!r} refused on this device: {e}") from None
    N, n = 40, 4
    elements = n * p.views[0][0].numel()
    for i in range(N):  # A's host blocks [4i, 4i+4) hold i + 1
        for a in p.pool.arrays:
            a[n * i:n * (i + 1)] = bf16_bits(torch, float(i + 1))
    sums = torch.zeros(N, dtype=torch.float32, device="cuda")
    errors: list[BaseException] = []
    handles_b = []

    def thread_a():
        try:
            for i in range(N):
                dev = n * i  # device blocks [0, 160)
                h = eng.swap_in([[n * i, dev, n]], before=s)
                with torch.cuda.stream(s):
                    sums[i] = p.views[0][dev:dev + n].float().sum()
                h.wait(timeout=60)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    def thread_b():
        try:
            for j in range(N):
                dev = 256 + n * j  # device blocks [256, 416), host [256, 416)
                with torch.cuda.stream(s):
                    for v in p.views:
                        v[dev:dev + n].fill_(float(j + 100))
                handles_b.append((j, eng.swap_out([[dev, dev, n]], after=s)))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    with eng:
        threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
            assert not t.is_alive(), "a submitting thread hung"
        if errors:
            raise errors[0]
        for _, h in handles_b:
            assert h.wait(timeout=60)
        s.synchronize()
        torch.cuda.synchronize()
        expected = torch.tensor([float(i + 1) * elements for i in range(N)], device="cuda")
        assert torch.equal(sums, expected), (sums - expected).nonzero()
        for j, _ in handles_b:
            bits = bf16_bits(torch, float(j + 100))
            for a in p.pool.arrays:
                blk = a[256 + n * j:256 + n * (j + 1)]
                assert (blk == bits).all(), f"swap-out {j} missed the stream's write"
        report(mode=mode, option=supports_before_wait(), stats=eng.stats())


def threads_before_after_event() -> None:
    """_threads_before_after with before_wait="event" (the consumer waits on the job's end
    event, recorded once the copies are dispatched)."""
    _threads_before_after("event")


def threads_before_after_flag() -> None:
    """_threads_before_after with before_wait="flag" (the consumer waits on a flag the swap
    stream sets; on a kvswitch without the option, its only before= behaviour)."""
    _threads_before_after("flag")


def max_connections_1() -> None:
    """With CUDA_DEVICE_MAX_CONNECTIONS=1 (one hardware queue for all streams) a stream
    waiting on a flag would block the swap stream that sets it: the default (event) mode
    must still complete swap_in(before=), and before_wait="flag" must be refused."""
    assert os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1", \
        "run with CUDA_DEVICE_MAX_CONNECTIONS=1 in the environment"
    torch = need_torch_cuda()
    if not supports_before_wait():
        raise Skip("this kvswitch's AsyncSwapEngine has no before_wait= option: before= "
                   "always waits on a flag, which can deadlock with one connection")
    p = make_pools(torch, layers=2, blocks=64, host_blocks=128)
    consumer = torch.cuda.Stream()
    for i, a in enumerate(p.pool.arrays):
        a[:64] = bf16_bits(torch, float(i + 1))
    with make_engine(p.layout, p.pool, num_workers=2) as eng:
        for k in range(10):
            h = eng.swap_in([[0, 0, 64]], before=consumer)
            with torch.cuda.stream(consumer):
                total = p.views[1].float().sum()
                p.views[1].fill_(0.0)
            consumer.synchronize()
            assert float(total) == 2.0 * p.views[1].numel(), (k, float(total))
            assert h.wait(timeout=60)
            out = eng.swap_out([[0, 64, 32]], after=consumer)  # host blocks never read
            assert out.wait(timeout=60)
    refused = None
    try:
        eng = make_engine(p.layout, p.pool, num_workers=1, before_wait="flag")
        with eng:
            eng.swap_in([[0, 0, 1]], before=consumer)
    except ValueError as e:
        refused = str(e)
    assert refused is not None, "before_wait='flag' was accepted with one connection"
    report(flag_refused=refused)


def failure_partial_enqueue() -> None:
    """A job fails after part of it was enqueued, then a conflicting job queued behind it
    fails too (naming it as the root) and the engine goes on. The failure is a real driver
    error: a 2D copy whose device pitch exceeds CU_DEVICE_ATTRIBUTE_MAX_PITCH
    (cuMemcpy2DAsync refuses it; the copies of the region before it are already queued)."""
    torch = need_torch_cuda()
    from kvswitch import HostKVPool, KVLayout, _core

    max_pitch = int(_core.cuda_device_attributes(0).get("max_pitch", 2**31 - 1))
    block = 4096
    pitch = (max_pitch // block + 1) * block  # > max_pitch
    if pitch + block > torch.cuda.mem_get_info()[0] // 2:
        raise Skip(f"needs {pitch + block:,} bytes of free device memory")
    ok0 = torch.randint(0, 255, (2, 2, block), dtype=torch.uint8, device="cuda")
    big = torch.zeros(pitch + block, dtype=torch.uint8, device="cuda")
    huge = big.as_strided((2, block), (pitch, 1))
    ok2 = torch.randint(0, 255, (2, 2, block), dtype=torch.uint8, device="cuda")
    layout = KVLayout.from_tensors([ok0[:, 0], huge, ok2[:, 1]])
    pool = HostKVPool(layout, 2)
    torch.cuda.synchronize()
    with make_engine(layout, pool, num_workers=2) as eng:
        paused = hasattr(eng._engine, "_set_paused")
        if paused:
            eng._engine._set_paused(True)
        first = eng.swap_out([[0, 0, 2]])  # 2 blocks: one 2D copy per region
        second = eng.swap_in([[0, 0, 1]])  # reads host block 0, which `first` writes
        if paused:
            eng._engine._set_paused(False)
        try:
            first.wait(timeout=60)
        except Exception as e:  # noqa: BLE001 - the expected SwapError
            err = str(e)
        else:
            raise Skip(f"the driver accepted a 2D copy with pitch {pitch:,} > max_pitch "
                       f"{max_pitch:,}: no partial-enqueue failure to provoke here (the "
                       f"_fail_next_jobs scenario covers the contract)")
        assert "cuMemcpy2DAsync" in err, err
        second_err = expect_failure(second, "the job ordered after the failed one")
        assert second.root_job_id == first.id, (second.root_job_id, first.id, second_err)
        # single blocks are linear copies (no pitch): the engine still works
        assert eng.swap_out([[0, 0, 1], [1, 1, 1]]).wait(timeout=60)
        torch.cuda.synchronize()
        import numpy as np

        for r, t in enumerate((ok0[:, 0], huge, ok2[:, 1])):
            np.testing.assert_array_equal(pool.arrays[r], t.cpu().numpy(), err_msg=f"region {r}")
        report(error=err, second_error=second_err, stats=eng.stats())


def failure_injected_then_conflict() -> None:
    """The same contract through the engine's test hook _fail_next_jobs, which fails a job
    before any copy is enqueued (a real GPU gives no portable way to fail one on demand;
    failure_partial_enqueue provokes a real driver error where the driver allows)."""
    torch = need_torch_cuda()
    p = make_pools(torch, layers=2, blocks=64)
    p.randomize_device()
    with make_engine(p.layout, p.pool, num_workers=2) as eng:
        if not hasattr(eng._engine, "_fail_next_jobs"):
            raise Skip("this kvswitch has no _fail_next_jobs test hook")
        paused = hasattr(eng._engine, "_set_paused")
        if paused:
            eng._engine._set_paused(True)
        eng._engine._fail_next_jobs(1, "injected by the GPU scenario")
        first = eng.swap_out([[0, 0, 32]])
        second = eng.swap_in([[16, 40, 8]])  # reads host blocks `first` writes
        third = eng.swap_out([[40, 48, 8]])  # reads device blocks `second` writes
        if paused:
            eng._engine._set_paused(False)
        assert "injected" in expect_failure(first, "the injected failure")
        expect_failure(second, "the job after the failed one")
        expect_failure(third, "the job after that")
        assert second.root_job_id == first.id and third.root_job_id == first.id
        assert eng.swap_out([[0, 0, 32]]).wait(timeout=60)
        assert p.same(0, 0, 32)
        report(stats=eng.stats())


def close_with_stalled_stream() -> None:
    """close() with 100 jobs ordered after a stream held by a spin kernel: it returns once
    all of them finished, and every copy saw the write queued after the spin."""
    torch = need_torch_cuda()
    p = make_pools(torch, layers=2, blocks=256)
    s = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU clock cycles
        for v in p.views:
            v.fill_(7.0)
    eng = make_engine(p.layout, p.pool, num_workers=2)
    handles = [eng.swap_out([[2 * i, 2 * i, 2]], after=s) for i in range(100)]
    eng.close()
    assert all(h.done() for h in handles), "close() returned with jobs unfinished"
    assert all(h.wait(timeout=0) for h in handles)
    bits = bf16_bits(torch, 7.0)
    for a in p.pool.arrays:
        assert (a[:200] == bits).all(), "a swap-out ran before the stream's write"
    report(stats=eng.stats())


def capture_beside_swaps() -> None:
    """While this thread captures a CUDA graph in global mode (torch's default
    capture_error_mode), another thread stalls a stream and queues swaps after it: the
    engine's worker polls their end events (cuEventQuery) during the capture. kvswitch's
    calls run in relaxed capture mode, so no job fails with
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and the capture stays valid (issue 22)."""
    import time

    torch = need_torch_cuda()
    p = make_pools(torch, layers=2, blocks=256)
    eng = make_engine(p.layout, p.pool, num_workers=2)
    stalled = torch.cuda.Stream()
    began, queued = threading.Event(), threading.Event()
    handles: list = []

    def swaps_during_the_capture() -> None:
        began.wait(30)
        with torch.cuda.stream(stalled):
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock: jobs stay in flight
            for v in p.views:
                v.fill_(3.0)
        handles.extend(eng.swap_out([[2 * i, 2 * i, 2]], after=stalled) for i in range(16))
        queued.set()

    t = threading.Thread(target=swaps_during_the_capture)
    t.start()
    x = torch.ones(1024, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture_error_mode="global"
        began.set()
        assert queued.wait(30), "the swaps were not queued"
        time.sleep(0.3)  # the worker polls its in-flight jobs meanwhile
        y = x * 2 + 10
    t.join(30)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.full_like(x, 12.0)), "the captured graph computes garbage"
    for h in handles:
        assert h.wait(timeout=60), h.error
    bits = bf16_bits(torch, 3.0)
    for a in p.pool.arrays:
        assert (a[:32] == bits).all(), "a swap-out ran before the stalled stream's write"
    eng.close()
    report(capture="global", jobs=len(handles))


def pageable_host_pool() -> None:
    """A host pool that is not pinned (pin=False) still swaps correctly both ways."""
    torch = need_torch_cuda()
    p = make_pools(torch, layers=4, blocks=128, pin=False)
    assert not p.pool.pinned
    p.randomize_device()
    with make_engine(p.layout, p.pool, num_workers=2) as eng:
        assert eng.swap_out([[0, 10, 20], [40, 50, 5], [100, 0, 8]]).wait(timeout=60)
        assert p.same(10, 0, 20) and p.same(50, 40, 5) and p.same(0, 100, 8)
        p.randomize_host(3)
        assert eng.swap_in([[60, 64, 30]]).wait(timeout=60)
        assert p.same(60, 64, 30)
        stats = eng.stats()
        if "host_memory" in stats:
            assert stats["host_memory"] != "pinned", stats["host_memory"]
        report(host_memory=stats.get("host_memory", "(no such stat)"),
               pin_reason=p.pool.pin_reason, stats=stats)


def torch_and_cupy() -> None:
    """One process, two frameworks: a CuPy pool (through __cuda_array_interface__ only)
    and a torch pool, each with its own engine, swapped both ways with the frameworks'
    own streams as after=/before=."""
    torch = need_torch_cuda()
    try:
        import cupy as cp
    except ImportError:
        raise Skip("cupy is not installed") from None
    import numpy as np

    from kvswitch import HostKVPool, KVLayout

    class CAIOnly:
        def __init__(self, x):
            self._x = x
            self.__cuda_array_interface__ = x.__cuda_array_interface__

    a = cp.random.standard_normal((2, 32, 16, 8, 64), dtype=cp.float32)
    cp.cuda.Device().synchronize()  # generated on CuPy's stream; cs and the engine don't wait
    layout = KVLayout.from_tensors([CAIOnly(a[0]), CAIOnly(a[1])])
    pool = HostKVPool(layout, 32)
    tp = make_pools(torch, layers=2, blocks=32)
    tp.randomize_device()
    cs = cp.cuda.Stream(non_blocking=True)
    with make_engine(layout, pool) as ce, make_engine(tp.layout, tp.pool) as te:
        with cs:
            a[:, 0:8] += 1.0
        h1 = ce.swap_out([[0, 0, 8]], after=cs)
        h2 = te.swap_out([[0, 0, 32]], after=torch.cuda.current_stream())
        assert h1.wait(timeout=60) and h2.wait(timeout=60)
        np.testing.assert_array_equal(pool.arrays[0][:8], cp.asnumpy(a[0, :8]))
        np.testing.assert_array_equal(pool.arrays[1][:8], cp.asnumpy(a[1, :8]))
        assert tp.same(0, 0, 32)
        pool.arrays[0][8:16] = 5.0
        pool.arrays[1][8:16] = 6.0
        try:
            h3 = ce.swap_in([[8, 16, 8]], before=cs)
            used_before = True
        except ValueError:  # before= unsupported on this device (flag mode only)
            h3 = ce.swap_in([[8, 16, 8]])
            used_before = False
        with cs:
            total = a[:, 16:24].sum()
        cs.synchronize()
        assert h3.wait(timeout=60)
        if not used_before:
            total = a[:, 16:24].sum()
        assert float(total) == (5.0 + 6.0) * a[0, 16:24].size, float(total)
        report(cupy=cp.__version__, before_with_cupy_stream=used_before)


def second_device() -> None:
    """A pool on cuda:1 (where present) swaps through cuda:1's primary context."""
    torch = need_torch_cuda()
    if torch.cuda.device_count() < 2:
        raise Skip(f"one CUDA device ({torch.cuda.get_device_name(0)})")
    p = make_pools(torch, layers=2, blocks=64, device="cuda:1")
    assert p.layout.device == ("cuda", 1)
    with torch.cuda.device(1):
        p.randomize_device()
        s = torch.cuda.Stream(device=1)
        with make_engine(p.layout, p.pool) as eng:
            assert eng.swap_out([[0, 0, 64]], after=s).wait(timeout=60)
            assert p.same(0, 0, 64)
            p.randomize_host(5)
            assert eng.swap_in([[0, 0, 64]]).wait(timeout=60)
            assert p.same(0, 0, 64)
    report(devices=torch.cuda.device_count(), name=torch.cuda.get_device_name(1))


def device_report() -> None:
    """Stream priority range, stream memory operations, copy engines, NUMA ids and which
    before= modes the engine accepts on this device (reported; sanity-checked only)."""
    torch = need_torch_cuda()
    from kvswitch import _core

    attrs = _core.cuda_device_attributes(0)
    info = _core.cuda_driver_info()
    assert info["available"] and attrs["driver_version"] == info["driver_version"]
    assert attrs["stream_priority_greatest"] <= attrs["stream_priority_least"], attrs
    assert attrs.get("can_use_stream_mem_ops_v1", 0) in (0, 1), attrs
    assert attrs["compute_capability_major"] >= 3, attrs
    modes = {}
    p = make_pools(torch, layers=1, blocks=8)
    s = torch.cuda.Stream()
    for mode in ("event", "flag"):
        try:
            with make_engine(p.layout, p.pool, num_workers=1, before_wait=mode) as eng:
                assert eng.swap_in([[0, 0, 8]], before=s).wait(timeout=60)
                s.synchronize()
            modes[mode] = "accepted"
        except Skip as e:
            modes[mode] = f"not available: {e}"
        except ValueError as e:
            modes[mode] = f"refused: {e}"
    report(attributes=attrs, driver=info, before_wait=modes,
           torch=torch.__version__, torch_cuda=torch.version.cuda,
           name=torch.cuda.get_device_name(0))


# ---------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Scenario:
    fn: Callable[[], None]
    env: dict[str, str] = field(default_factory=dict)  #: added to the subprocess env
    timeout_s: float = 90.0


SCENARIOS: dict[str, Scenario] = {
    "cross_worker_raw_war": Scenario(cross_worker_raw_war),
    "threads_before_after_event": Scenario(threads_before_after_event),
    "threads_before_after_flag": Scenario(threads_before_after_flag),
    "max_connections_1": Scenario(max_connections_1, {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}),
    "failure_partial_enqueue": Scenario(failure_partial_enqueue),
    "failure_injected_then_conflict": Scenario(failure_injected_then_conflict),
    "close_with_stalled_stream": Scenario(close_with_stalled_stream),
    "capture_beside_swaps": Scenario(capture_beside_swaps),
    "pageable_host_pool": Scenario(pageable_host_pool),
    "torch_and_cupy": Scenario(torch_and_cupy),
    "second_device": Scenario(second_device),
    "device_report": Scenario(device_report),
}


@dataclass
class Outcome:
    name: str
    status: str  #: "passed", "skipped", "failed" or "timeout"
    detail: str = ""
    reports: list = field(default_factory=list)
    seconds: float = 0.0


def run_in_subprocess(name: str, *, python: str | None = None,
                      timeout_s: float | None = None) -> Outcome:
    """Run scenario ``name`` in a new interpreter with its environment and timeout."""
    import subprocess
    import time

    sc = SCENARIOS[name]
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    env.update(sc.env)
    t0 = time.monotonic()
    try:
        r = subprocess.run([python or sys.executable, os.path.abspath(__file__), name],
                           env=env, capture_output=True, text=True,
                           timeout=timeout_s or sc.timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return Outcome(name, "timeout", f"no result after {timeout_s or sc.timeout_s:.0f} s "
                       f"(hung?)\n{out[-2000:]}", seconds=time.monotonic() - t0)
    out = r.stdout + r.stderr
    reports = [json.loads(line[len(REPORT_MARKER):]) for line in r.stdout.splitlines()
               if line.startswith(REPORT_MARKER)]
    dt = time.monotonic() - t0
    if r.returncode == SKIP_EXIT:
        why = next((line[len(SKIP_MARKER):].strip() for line in r.stdout.splitlines()
                    if line.startswith(SKIP_MARKER)), "skipped")
        return Outcome(name, "skipped", why, reports, dt)
    if r.returncode == 0 and OK_MARKER in r.stdout:
        return Outcome(name, "passed", "", reports, dt)
    return Outcome(name, "failed", f"exit status {r.returncode}\n{out[-4000:]}", reports, dt)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0])
        print("usage: scenarios.py NAME | --list")
        return 2
    if argv[0] == "--list":
        print("\n".join(SCENARIOS))
        return 0
    if argv[0] not in SCENARIOS:
        print(f"unknown scenario {argv[0]!r}; --list prints them", file=sys.stderr)
        return 2
    try:
        SCENARIOS[argv[0]].fn()
    except Skip as e:
        print(SKIP_MARKER, e, flush=True)
        return SKIP_EXIT
    print(OK_MARKER, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
