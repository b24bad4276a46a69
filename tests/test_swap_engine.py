"""AsyncSwapEngine on the host backend: byte-exact swaps, ordering, conflicts, GIL, errors."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvswitch
from kvswitch import AsyncSwapEngine, EngineClosedError, HostKVPool, KVLayout, SwapError


# ---------------------------------------------------------------------------- fixtures
class Pools:
    """A device pool in host memory (with its region views) and a host pool."""

    def __init__(self, kind: str, num_blocks: int, host_blocks: int, *, layers: int = 2,
                 block: tuple[int, ...] = (4, 2, 3), dtype=np.float16, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.kind = kind
        if kind == "kv_first":  # vLLM [2, N, ...]: contiguous regions
            self.tensors = [rng.standard_normal((2, num_blocks, *block)).astype(dtype)
                            for _ in range(layers)]
            self.layout = KVLayout.from_vllm(self.tensors)
        elif kind == "blocks_first":  # [N, 2, ...]: strided regions
            self.tensors = [rng.standard_normal((num_blocks, 2, *block)).astype(dtype)
                            for _ in range(layers)]
            self.layout = KVLayout.from_vllm(self.tensors, kv_dim=1)
        elif kind == "cross_layer":
            self.tensors = [rng.standard_normal((num_blocks, layers, 2, *block)).astype(dtype)]
            self.layout = KVLayout.cross_layer(self.tensors[0])
        else:
            raise AssertionError(kind)
        self.pool = HostKVPool(self.layout, host_blocks, pin=False)
        for a in self.pool.arrays:
            a[...] = rng.standard_normal(a.shape).astype(dtype)

    def device_views(self, tensors=None) -> list[np.ndarray]:
        ts = self.tensors if tensors is None else tensors
        if self.kind == "kv_first":
            return [t[kv] for t in ts for kv in (0, 1)]
        if self.kind == "blocks_first":
            return [t[:, kv] for t in ts for kv in (0, 1)]
        return [ts[0]]

    def snapshot(self):
        return [t.copy() for t in self.tensors], [a.copy() for a in self.pool.arrays]

    def apply(self, state, direction: str, pairs) -> None:
        """Expected effect of a job on a snapshot (reference implementation)."""
        dev, host = state
        dviews = self.device_views(dev)
        for s, d, n in pairs:
            for dv, hv in zip(dviews, host, strict=True):
                if direction == "out":
                    hv[d:d + n] = dv[s:s + n]
                else:
                    dv[d:d + n] = hv[s:s + n]

    def assert_state(self, state) -> None:
        dev, host = state
        for got, want in zip(self.tensors, dev, strict=True):
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
        for got, want in zip(self.pool.arrays, host, strict=True):
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


KINDS = ["kv_first", "blocks_first", "cross_layer"]


@st.composite
def jobs(draw, src_blocks: int, dst_blocks: int, max_rows: int = 6):
    """Pairs with non-overlapping destination extents, in random order."""
    rows, pos = [], 0
    for _ in range(draw(st.integers(0, max_rows))):
        gap = draw(st.integers(0, 3))
        length = draw(st.integers(1, 5))
        dst = pos + gap
        if dst + length > dst_blocks or length > src_blocks:
            break
        src = draw(st.integers(0, src_blocks - length))
        rows.append((src, dst, length))
        pos = dst + length
    return draw(st.permutations(rows))


# ---------------------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(KINDS), direction=st.sampled_from(["out", "in"]),
       num_blocks=st.integers(4, 20), host_blocks=st.integers(4, 20),
       num_workers=st.sampled_from([0, 1, 2]))
def test_random_job_is_byte_exact(data, kind, direction, num_blocks, host_blocks, num_workers):
    p = Pools(kind, num_blocks, host_blocks, seed=num_blocks * 31 + host_blocks)
    src_n, dst_n = (num_blocks, host_blocks) if direction == "out" else (host_blocks, num_blocks)
    pairs = data.draw(jobs(src_n, dst_n))
    expected = p.snapshot()
    p.apply(expected, direction, pairs)
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=num_workers) as eng:
        arr = np.array(pairs, dtype=np.int64).reshape(-1, 3)
        h = eng.swap_out(arr) if direction == "out" else eng.swap_in(arr)
        assert h.wait(timeout=30)
        assert h.done() and h.direction == direction
        nblocks = sum(n for _, _, n in pairs)
        assert h.nbytes == nblocks * p.layout.bytes_per_block
        assert h.num_copies == len(pairs) * p.layout.num_regions
        assert h.elapsed_s is not None and h.elapsed_s >= 0
    p.assert_state(expected)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(KINDS), num_workers=st.sampled_from([1, 2, 3]))
def test_queued_jobs_equal_sequential_application(data, kind, num_workers):
    """Many swap-outs and swap-ins queued back to back, touching overlapping blocks across
    jobs: the result equals applying them one by one in submission order."""
    p = Pools(kind, 16, 12, seed=7)
    expected = p.snapshot()
    eng = AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=num_workers)
    eng._engine._set_paused(True)  # queue everything first, so the jobs really overlap
    handles = []
    for _ in range(data.draw(st.integers(1, 12))):
        direction = data.draw(st.sampled_from(["out", "in"]))
        src_n, dst_n = (16, 12) if direction == "out" else (12, 16)
        pairs = data.draw(jobs(src_n, dst_n, max_rows=4))
        p.apply(expected, direction, pairs)
        fn = eng.swap_out if direction == "out" else eng.swap_in
        handles.append(fn(np.array(pairs, dtype=np.int64).reshape(-1, 3)))
    eng._engine._set_paused(False)
    eng.synchronize()
    assert all(h.done() for h in handles)
    p.assert_state(expected)
    eng.close()


# ---------------------------------------------------------------------------- basics
def test_handle_properties_and_strided_2d_copies():
    p = Pools("blocks_first", 8, 8)
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=1) as eng:
        h = eng.swap_out([[0, 0, 3], [5, 4, 1]])
        assert h.wait()
        assert h.num_copies == 2 * p.layout.num_regions  # one 2D copy per region for len 3
        st_ = eng.stats()
        assert st_["num_jobs"] == 1 and st_["num_copies"] == h.num_copies
        assert st_["bytes"] == h.nbytes == 4 * p.layout.bytes_per_block
        assert st_["in_flight"] == 0 and st_["num_failed"] == 0
        hist = st_["copy_size_histogram"]
        assert sum(hist.values()) == h.num_copies
        for bucket in hist:
            assert bucket & (bucket - 1) == 0  # powers of two
        block = p.layout.regions[0].block_bytes
        assert hist[1 << (3 * block).bit_length() - 1] >= 1
        assert eng.backend == "host"
        assert eng.backend_reason == "backend='host' requested"
    with AsyncSwapEngine(p.layout, p.pool) as auto:
        assert auto.backend == "host" and "host memory" in auto.backend_reason


def test_accepts_lists_and_other_int_dtypes():
    p = Pools("kv_first", 6, 6)
    expected = p.snapshot()
    p.apply(expected, "out", [(1, 2, 2)])
    p.apply(expected, "in", [(0, 5, 1)])
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=0) as eng:
        assert eng.swap_out([(1, 2, 2)]).done()
        assert eng.swap_in(np.array([[0, 5, 1]], dtype=np.uint8)).done()
    p.assert_state(expected)


def test_empty_and_zero_length_jobs_are_done_noops():
    p = Pools("kv_first", 6, 6)
    expected = p.snapshot()
    with AsyncSwapEngine(p.layout, p.pool, backend="host") as eng:
        for pairs in ([], np.zeros((0, 3), np.int64), [(0, 0, 0)]):
            h = eng.swap_out(pairs)
            assert h.wait(timeout=10) and h.nbytes == 0 and h.num_copies == 0
    p.assert_state(expected)


def test_inline_mode_returns_finished_handle():
    p = Pools("cross_layer", 6, 6)
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=0) as eng:
        h = eng.swap_out([[0, 0, 6]])
        assert h.done() and h.elapsed_s is not None
        assert eng.num_workers == 0


def test_poll_returns_each_finished_handle_once():
    p = Pools("kv_first", 8, 8)
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=2) as eng:
        hs = [eng.swap_out([[i, i, 1]]) for i in range(6)]
        eng.synchronize()
        polled = eng.poll()
        assert sorted(h.id for h in polled) == sorted(h.id for h in hs)
        assert eng.poll() == []


def test_concurrent_submitters_from_python_threads():
    p = Pools("kv_first", 32, 32, layers=3)
    expected = p.snapshot()
    for t in range(4):  # thread t owns device/host blocks [8t, 8t + 8)
        p.apply(expected, "out", [(8 * t + i, 8 * t + i, 1) for i in range(0, 8, 2)])
        p.apply(expected, "in", [(8 * t + i, 8 * t + i, 1) for i in range(1, 8, 2)])
    eng = AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=2)
    errors = []

    def submit(t: int) -> None:
        try:
            hs = [eng.swap_out([[8 * t + i, 8 * t + i, 1]]) for i in range(0, 8, 2)]
            hs += [eng.swap_in([[8 * t + i, 8 * t + i, 1]]) for i in range(1, 8, 2)]
            for h in hs:
                h.wait()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=submit, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    eng.close()
    assert not errors
    p.assert_state(expected)
    assert eng.stats()["num_jobs"] == 32


# ---------------------------------------------------------------------------- conflicts
def test_wait_blocks_waits_only_for_conflicting_jobs():
    p = Pools("kv_first", 16, 16)
    eng = AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=1)
    eng._engine._set_paused(True)  # jobs stay queued: in flight, deterministically
    h_out = eng.swap_out([[0, 0, 4]])       # reads device blocks 0..3
    h_in = eng.swap_in([[8, 8, 2]])         # writes device blocks 8, 9
    assert eng.wait_blocks([12, 13, 15]) == 0  # nothing touches these: returns at once
    assert not h_out.done() and not h_in.done()

    result = {}
    waiter = threading.Thread(target=lambda: result.setdefault("n", eng.wait_blocks([9])))
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive()  # blocked on h_in (queued behind the pause)
    eng._engine._set_paused(False)
    waiter.join(timeout=30)
    assert not waiter.is_alive() and result["n"] == 1
    assert h_in.done()
    assert eng.wait_blocks(np.arange(16)) <= 1
    eng.close()
    assert h_out.done()


def test_wait_blocks_validates_ids():
    p = Pools("kv_first", 4, 4)
    with AsyncSwapEngine(p.layout, p.pool, backend="host") as eng:
        with pytest.raises(ValueError, match="block_ids"):
            eng.wait_blocks([4])
        with pytest.raises(TypeError, match="integers"):
            eng.wait_blocks([1.5])
        assert eng.wait_blocks([]) == 0


# ---------------------------------------------------------------------------- GIL
def test_wait_releases_the_gil_deterministic():
    """handle.wait() blocks while another Python thread runs: the other thread is the one
    that lets the job proceed, so a wait holding the GIL would never return."""
    p = Pools("kv_first", 4, 4)
    eng = AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=1)
    eng._engine._set_paused(True)
    h = eng.swap_out([[0, 0, 4]])
    counter = [0]

    def spin() -> None:
        while counter[0] < 1000:
            counter[0] += 1
        eng._engine._set_paused(False)

    t = threading.Thread(target=spin)
    t.start()
    assert h.wait(timeout=60)
    t.join()
    assert counter[0] == 1000
    eng.close()


def test_other_thread_runs_during_large_host_copy():
    """A large host copy with num_workers=1: a counting thread advances while the main
    thread waits on the handle."""
    nblocks = 16
    dev = np.ones((nblocks, 4 << 20), dtype=np.uint8)  # 4 MiB blocks, 64 MiB in all
    layout = KVLayout.from_tensors([dev])
    pool = HostKVPool(layout, nblocks, pin=False)
    stop = threading.Event()
    counter = [0]

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    with AsyncSwapEngine(layout, pool, backend="host", num_workers=1) as eng:
        t = threading.Thread(target=spin)
        t.start()
        before = counter[0]
        h = eng.swap_out([[0, 0, nblocks]])
        assert h.wait(timeout=60)
        after = counter[0]
        stop.set()
        t.join()
    assert after > before
    assert int(pool.arrays[0][nblocks - 1, -1]) == 1


# ---------------------------------------------------------------------------- errors
BAD_PAIRS = [
    (np.array([[0, 0, 1]], dtype=np.float64), TypeError, "integers"),
    (np.ones((1, 3), dtype=bool), TypeError, "integers"),
    ([["0", "0", "1"]], TypeError, "integers"),
    (np.zeros((2, 2), np.int64), ValueError, r"\[n, 3\]"),
    (np.zeros(3, np.int64), ValueError, r"\[n, 3\]"),
    ([[0, 0, 1], [1, 1, -1]], ValueError, "negative length"),
    ([[0, 0, 1], [7, 1, 2]], ValueError, "source extent"),
    ([[-1, 0, 1]], ValueError, "source extent"),
    ([[0, 0, 1], [1, 7, 2]], ValueError, "destination extent"),
    ([[0, 0, 3], [4, 2, 1]], ValueError, "overlap"),
    ([[0, 0, 1], [1, 0, 1]], ValueError, "overlap"),
    ([[2**62, 0, 2**62]], ValueError, "source extent"),
    (np.array([[2**63, 0, 1]], dtype=np.uint64), ValueError, "out of range"),
]


@pytest.mark.parametrize("direction", ["out", "in"])
@pytest.mark.parametrize(("pairs", "exc", "match"), BAD_PAIRS)
def test_bad_pairs_raise_and_copy_nothing(direction, pairs, exc, match):
    p = Pools("blocks_first", 8, 8)
    expected = p.snapshot()
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=1) as eng:
        fn = eng.swap_out if direction == "out" else eng.swap_in
        with pytest.raises(exc, match=match):
            fn(pairs)
        eng.synchronize()
        assert eng.stats()["num_jobs"] == 0
    p.assert_state(expected)


def test_streams_rejected_on_host_backend():
    p = Pools("kv_first", 4, 4)
    expected = p.snapshot()
    with AsyncSwapEngine(p.layout, p.pool, backend="host") as eng:
        with pytest.raises(ValueError, match="after= and before="):
            eng.swap_out([[0, 0, 1]], after=0)
        with pytest.raises(ValueError, match="after= and before="):
            eng.swap_in([[0, 0, 1]], before=kvswitch.CudaEvent(1))
        with pytest.raises(ValueError, match="after= and before="):
            eng.swap_in([[0, 0, 1]], after=0)
        with pytest.raises(ValueError, match="after= and before="):
            eng.check_swap_in(after=0)
        with pytest.raises(ValueError, match="after= and before="):
            eng.swap_out([[0, 0, 1]], before=0)
        with pytest.raises(ValueError, match="after= and before="):
            eng.check_swap_out(before=0)
        with pytest.raises(TypeError, match="stream"):
            eng.swap_out([[0, 0, 1]], after="stream")
        with pytest.raises(TypeError, match="stream"):
            eng.swap_in([[0, 0, 1]], after="stream")
    p.assert_state(expected)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(["kv_first", "blocks_first"]),
       direction=st.sampled_from(["out", "in"]), num_workers=st.sampled_from([0, 1, 2]))
def test_a_region_range_copies_exactly_those_regions(data, kind, direction, num_workers):
    """swap_in/swap_out(regions=range(b, e)) copies the extents in regions [b, e) only
    (one layer's K and V for a layer-by-layer load), byte-exact, and leaves the others."""
    p = Pools(kind, 10, 10, layers=3)
    nreg = p.layout.num_regions
    b = data.draw(st.integers(0, nreg - 1))
    e = data.draw(st.integers(b + 1, nreg))
    pairs = data.draw(jobs(10, 10))
    expected = p.snapshot()
    dev, host = expected
    dviews = p.device_views(dev)
    for s, d, n in pairs:
        for r in range(b, e):
            if direction == "out":
                host[r][d:d + n] = dviews[r][s:s + n]
            else:
                dviews[r][d:d + n] = host[r][s:s + n]
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=num_workers) as eng:
        submit = eng.swap_out if direction == "out" else eng.swap_in
        h = submit(pairs, regions=range(b, e))
        assert h.wait(10)
        blocks = sum(n for _, _, n in pairs)
        assert h.num_copies == len(pairs) * (e - b)
        assert h.nbytes == blocks * sum(r.block_bytes for r in p.layout.regions[b:e])
    p.assert_state(expected)


@pytest.mark.parametrize("regions, exc", [(range(0), ValueError), (range(0, 7), ValueError),
                                          (range(0, 4, 2), ValueError), ([0, 1], TypeError),
                                          (range(-1, 2), ValueError)])
def test_bad_region_ranges_raise_and_queue_nothing(regions, exc):
    p = Pools("kv_first", 4, 4)  # 4 regions
    expected = p.snapshot()
    with AsyncSwapEngine(p.layout, p.pool, backend="host") as eng:
        with pytest.raises(exc, match="regions"):
            eng.swap_in([[0, 0, 1]], regions=regions)
        with pytest.raises(exc, match="regions"):
            eng.swap_out([[0, 0, 1]], regions=regions)
        assert eng.stats()["num_jobs"] == 0
    p.assert_state(expected)


def test_a_failed_write_of_some_regions_fails_a_later_reader_of_all():
    """Layer 0's load into device block 2 fails; layer 1's load into the same block then
    succeeds; a swap-out of block 2 (every region) reads layer 0's never-written bytes, so
    it fails too: a writer of some regions does not stand in for older writers of others."""
    p = Pools("kv_first", 4, 4)  # regions 0-1: layer 0, 2-3: layer 1
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=1) as eng:
        eng._engine._set_paused(True)  # all queued before any is issued
        eng._engine._fail_next_jobs(1, "injected")
        layer0 = eng.swap_in([[0, 2, 1]], regions=range(0, 2))
        layer1 = eng.swap_in([[1, 2, 1]], regions=range(2, 4))
        backup = eng.swap_out([[2, 3, 1]])
        eng._engine._set_paused(False)
        with pytest.raises(SwapError, match="injected"):
            layer0.wait(10)
        assert layer1.wait(10)
        with pytest.raises(SwapError, match=f"swap job {layer0.id}"):
            backup.wait(10)
        assert backup.root_job_id == layer0.id


def test_completion_poll_sleeps_at_most_100_us_by_default():
    """A worker with jobs in flight and nothing queued looks at their completion at least
    every 100 us (issue 22: it backed off to 1 ms, adding up to 1 ms to every done() and
    about 3% to a 2 GB round). The benchmark hook changes it; nonsense is refused."""
    p = Pools("kv_first", 4, 4)
    with AsyncSwapEngine(p.layout, p.pool, backend="host") as eng:
        assert eng._engine._max_poll_us == 100
        eng._engine._set_max_poll_us(1000)
        assert eng._engine._max_poll_us == 1000
        with pytest.raises(ValueError, match=">= 1"):
            eng._engine._set_max_poll_us(0)
        assert eng.swap_out([[0, 0, 1]]).wait(10)


def test_closed_engine_rejects_jobs_and_close_is_idempotent():
    p = Pools("kv_first", 4, 4)
    expected = p.snapshot()
    eng = AsyncSwapEngine(p.layout, p.pool, backend="host")
    eng.close()
    eng.close()
    assert eng.closed
    with pytest.raises(EngineClosedError, match="closed"):
        eng.swap_out([[0, 0, 1]])
    with pytest.raises(RuntimeError):
        eng.swap_in([[0, 0, 1]])
    p.assert_state(expected)


def test_mismatched_host_pool_rejected():
    p = Pools("kv_first", 4, 4, layers=2)
    other = Pools("kv_first", 4, 4, layers=3)
    wider = Pools("kv_first", 4, 4, layers=2, block=(4, 2, 4))
    with pytest.raises(ValueError, match="regions"):
        AsyncSwapEngine(p.layout, other.pool, backend="host")
    with pytest.raises(ValueError, match="bytes per block"):
        AsyncSwapEngine(p.layout, wider.pool, backend="host")
    with pytest.raises(TypeError, match="HostKVPool"):
        AsyncSwapEngine(p.layout, p.pool.arrays, backend="host")
    with pytest.raises(ValueError, match="backend"):
        AsyncSwapEngine(p.layout, p.pool, backend="gpu")
    with pytest.raises(ValueError, match="num_workers"):
        AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=-1)
    with pytest.raises(ValueError, match="sync_every"):
        AsyncSwapEngine(p.layout, p.pool, backend="host", sync_every=0)


def test_cuda_backend_without_driver_says_why():
    if kvswitch._core.cuda_driver_info()["available"]:
        pytest.skip("a CUDA driver is present")
    p = Pools("kv_first", 4, 4)
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable: .*libcuda"):
        AsyncSwapEngine(p.layout, p.pool, backend="cuda")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_worker_error_surfaces_from_wait_and_engine_stays_usable(num_workers):
    p = Pools("kv_first", 6, 6)
    expected = p.snapshot()
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=num_workers) as eng:
        eng._engine._fail_next_jobs(1, "injected copy failure")
        h = eng.swap_out([[0, 0, 2]])
        with pytest.raises(SwapError, match="injected copy failure"):
            h.wait(timeout=30)
        assert h.done() and h.elapsed_s is None and "injected" in h.error
        p.assert_state(expected)  # the failed job copied nothing
        h2 = eng.swap_out([[0, 0, 2]])
        assert h2.wait(timeout=30)
        p.apply(expected, "out", [(0, 0, 2)])
        p.assert_state(expected)
        s = eng.stats()
        assert s["num_failed"] == 1 and s["num_jobs"] == 1


def test_wait_timeout_returns_false_while_queued():
    p = Pools("kv_first", 4, 4)
    eng = AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=1)
    eng._engine._set_paused(True)
    h = eng.swap_out([[0, 0, 1]])
    assert h.wait(timeout=0) is False
    assert not h.done()
    with pytest.raises(ValueError, match="timeout"):
        h.wait(timeout=-1)
    eng.close()  # drains despite the pause
    assert h.done()


# ---------------------------------------------------------------------------- lifetime
def test_close_drains_queued_jobs():
    p = Pools("cross_layer", 32, 32)
    expected = p.snapshot()
    eng = AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=2, max_queue=4)
    hs = []
    for i in range(32):
        hs.append(eng.swap_out([[i, 31 - i, 1]]))
        p.apply(expected, "out", [(i, 31 - i, 1)])
    eng.close()
    assert all(h.done() for h in hs)
    p.assert_state(expected)


def test_dropping_engine_with_jobs_in_flight_drains_them():
    p = Pools("kv_first", 16, 16)
    expected = p.snapshot()
    eng = AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=2)
    hs = [eng.swap_in([[i, i, 1]]) for i in range(16)]
    for i in range(16):
        p.apply(expected, "in", [(i, i, 1)])
    del eng
    gc.collect()
    assert all(h.done() for h in hs)
    p.assert_state(expected)


# ---------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("offset", [0, 1, 16, 63])
@pytest.mark.parametrize("block_bytes", [4096, 4100, 6007])
@pytest.mark.parametrize("pad", [0, 13])
def test_large_blocks_at_any_alignment_are_byte_exact(offset, block_bytes, pad):
    """Blocks of 4 KiB and more at every mutual alignment of source and destination (the
    host backend's copy loop has a separate path for them), contiguous and strided."""
    rng = np.random.default_rng(offset + block_bytes + pad)
    n = 6
    raw = rng.integers(0, 256, size=offset + n * (block_bytes + pad), dtype=np.uint8)
    dev = raw[offset:].reshape(n, block_bytes + pad)[:, :block_bytes]
    layout = KVLayout.from_tensors([dev])
    pool = HostKVPool(layout, n, pin=False)
    pool.arrays[0][...] = rng.integers(0, 256, size=pool.arrays[0].shape, dtype=np.uint8)
    pairs = [(0, 3, 2), (4, 0, 1), (2, 1, 2)]
    before_raw = raw.copy()
    with AsyncSwapEngine(layout, pool, backend="host", num_workers=1) as eng:
        assert eng.swap_out(pairs).wait(timeout=30)
        want = pool.arrays[0].copy()
        for s, d, k in pairs:
            np.testing.assert_array_equal(pool.arrays[0][d:d + k], dev[s:s + k])
        np.testing.assert_array_equal(raw, before_raw)  # source untouched
        back = [(3, 1, 2), (0, 4, 1)]
        assert eng.swap_in(back).wait(timeout=30)
    expected = before_raw.copy()
    exp_dev = expected[offset:].reshape(n, block_bytes + pad)[:, :block_bytes]
    for s, d, k in back:
        exp_dev[d:d + k] = want[s:s + k]
    np.testing.assert_array_equal(raw, expected)  # padding and other blocks untouched
