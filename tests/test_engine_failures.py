"""AsyncSwapEngine: failures surface on handles and stop dependent jobs; inputs that would
corrupt memory are refused. Regression tests of the red-team findings against 0.1.0
(../shared/redteam/): 4, 10, 11, 12, and the engine half of 5 and 6.

Jobs are held in the queue with the engine's ``_set_paused`` test hook, so "job B was
queued while job A was in flight" holds by construction, not by thread timing.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvswitch import AsyncSwapEngine, EngineClosedError, HostKVPool, KVLayout, SwapError
from kvswitch.swap import _as_pairs

BLOCKS = 32
BLOCK_BYTES = 256


@pytest.fixture
def pools():
    rng = np.random.default_rng(7)
    device = [rng.integers(0, 256, (BLOCKS, BLOCK_BYTES), dtype=np.uint8) for _ in range(2)]
    layout = KVLayout.from_tensors(device)
    host = HostKVPool(layout, BLOCKS, pin=False)
    for a in host.arrays:
        a[:] = rng.integers(0, 256, a.shape, dtype=np.uint8)
    return device, host, layout


def engine(layout, host, workers=2):
    return AsyncSwapEngine(layout, host, backend="host", num_workers=workers)


def test_jobs_that_read_what_a_failed_job_writes_fail_and_name_it(pools):
    """Finding 5 at the engine: a swap-in that reads host blocks a failed swap-out was to
    write must not run (it would restore stale bytes); its error names the root cause. A
    job that only overwrites blocks the failed job read (write-after-read) runs."""
    device, host, layout = pools
    before = [a.copy() for a in device]
    host_before = [a.copy() for a in host.arrays]
    with engine(layout, host) as e:
        e._engine._set_paused(True)
        e._engine._fail_next_jobs(1, "simulated cudaErrorIllegalAddress")
        out = e.swap_out([[0, 0, 4]])                  # fails (injected)
        back = e.swap_in([[0, 8, 4]])                  # reads host [0, 4): ordered after out
        again = e.swap_out([[8, 16, 4]])               # reads device [8, 12): after back
        overwrite = e.swap_in([[20, 0, 2]])            # writes device [0, 2): out reads it
        unrelated = e.swap_out([[24, 24, 4]])          # touches nothing of the above
        e._engine._set_paused(False)
        e.synchronize()
        with pytest.raises(SwapError, match="simulated cudaErrorIllegalAddress"):
            out.wait()
        for h in (back, again):
            with pytest.raises(SwapError, match=f"swap job {out.id} .*simulated"):
                h.wait()
            assert h.root_job_id == out.id
        assert out.root_job_id == out.id
        for h in (overwrite, unrelated):  # write-after-read, and no tie at all
            assert h.wait() and h.root_job_id is None and h.error == ""
        stats = e.stats()
    assert stats["num_failed"] == 3 and stats["num_jobs"] == 2
    # Nothing of the failed chain touched the device pool; the overwrite did.
    for g, (a, b) in enumerate(zip(device, before, strict=True)):
        np.testing.assert_array_equal(a[0:2], host_before[g][20:22])
        np.testing.assert_array_equal(a[2:], b[2:])
        np.testing.assert_array_equal(host.arrays[g][24:28], a[24:28])


def test_a_read_after_a_full_overwrite_of_a_failed_jobs_blocks_runs(pools):
    """Write-after-write does not propagate a failure: the later writer replaces every byte
    of the blocks, so a job that reads them afterwards reads the later writer's bytes."""
    device, host, layout = pools
    with engine(layout, host) as e:
        e._engine._set_paused(True)
        e._engine._fail_next_jobs(1, "boom")
        out = e.swap_out([[0, 0, 4]])    # fails (injected): host [0, 4) never written
        redo = e.swap_out([[8, 0, 4]])   # writes host [0, 4) again (WAW): runs
        back = e.swap_in([[0, 16, 4]])   # reads host [0, 4): the bytes are redo's
        part = e.swap_in([[2, 20, 4]])   # reads host [2, 6): [4, 6) untouched, [2, 4) redo's
        e._engine._set_paused(False)
        e.synchronize()
        with pytest.raises(SwapError, match="boom"):
            out.wait()
        for h in (redo, back, part):
            assert h.wait() and h.root_job_id is None and h.error == ""
        stats = e.stats()
    assert stats["num_failed"] == 1 and stats["num_jobs"] == 3
    for g, a in enumerate(device):
        np.testing.assert_array_equal(a[16:20], a[8:12])
        np.testing.assert_array_equal(host.arrays[g][0:4], a[8:12])
        np.testing.assert_array_equal(a[20:24], host.arrays[g][2:6])


def test_a_read_of_blocks_partly_left_by_a_failed_writer_fails(pools):
    """A reader fails when any block it reads was last written by a failed job, even when a
    later job overwrote the others."""
    device, host, layout = pools
    before = [a.copy() for a in device]
    with engine(layout, host) as e:
        e._engine._set_paused(True)
        e._engine._fail_next_jobs(1, "boom")
        out = e.swap_out([[0, 0, 4]])    # fails (injected)
        redo = e.swap_out([[8, 0, 2]])   # rewrites host [0, 2) only
        back = e.swap_in([[0, 16, 4]])   # host [2, 4) are still out's: fails with it
        e._engine._set_paused(False)
        e.synchronize()
        assert redo.wait()
        with pytest.raises(SwapError, match=f"swap job {out.id} .*boom"):
            back.wait()
        assert back.root_job_id == out.id
    for a, b in zip(device, before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_job_queued_after_the_failed_job_finished_runs(pools):
    device, host, layout = pools
    with engine(layout, host) as e:
        e._engine._fail_next_jobs(1, "boom")
        failed = e.swap_out([[0, 0, 4]])
        with pytest.raises(SwapError):
            failed.wait()
        ok = e.swap_out([[0, 0, 4]])  # the failed job is no longer in flight
        assert ok.wait()
    np.testing.assert_array_equal(host.arrays[1][:4], device[1][:4])


def test_injected_failures_count_submissions_not_worker_timing(pools):
    _, host, layout = pools
    with engine(layout, host, workers=3) as e:
        e._engine._set_paused(True)
        e._engine._fail_next_jobs(2, "boom")
        handles = [e.swap_out([[i, i, 1]]) for i in range(6)]  # disjoint: no dependencies
        e._engine._fail_next_jobs(0, "")                        # disarm: nothing left anyway
        e._engine._set_paused(False)
        e.synchronize()
        assert [bool(h.error) for h in handles] == [True, True] + [False] * 4


def test_inline_engine_reports_injected_failure_on_the_handle(pools):
    device, host, layout = pools
    with engine(layout, host, workers=0) as e:
        e._engine._fail_next_jobs(1, "inline boom")
        h = e.swap_in([[0, 0, 4]])
        assert h.done()
        with pytest.raises(SwapError, match="inline boom"):
            h.wait()
    assert not np.array_equal(device[0][:4], host.arrays[0][:4])  # nothing copied


@pytest.mark.parametrize("timeout", [float("inf"), 1e18, 2.0**70])
def test_huge_timeouts_wait_for_the_job(pools, timeout):
    """Finding 4: wait(timeout=inf / 1e18 / 2**70) returned False at once (the duration
    overflowed); it must wait like wait()."""
    _, host, layout = pools
    with engine(layout, host) as e:
        e._engine._set_paused(True)
        h = e.swap_out([[0, 0, 1]])
        assert h.wait(timeout=0.01) is False  # paused: certainly not done
        threading.Timer(0.05, e._engine._set_paused, args=(False,)).start()
        assert h.wait(timeout=timeout) is True


@pytest.mark.parametrize("timeout", [float("nan"), -1.0, -float("inf")])
def test_nan_and_negative_timeouts_are_rejected(pools, timeout):
    _, host, layout = pools
    with engine(layout, host) as e:
        h = e.swap_out([[0, 0, 1]])
        with pytest.raises(ValueError, match="timeout"):
            h.wait(timeout=timeout)
        assert h.wait()


def test_check_validates_without_queueing(pools):
    _, host, layout = pools
    e = engine(layout, host)
    e.check_swap_out()
    e.check_swap_in()
    with pytest.raises(ValueError, match="host backend"):
        e.check_swap_out(after=0)
    with pytest.raises(ValueError, match="host backend"):
        e.check_swap_in(before=0)
    with pytest.raises(TypeError, match="after"):
        e.check_swap_out(after="stream")
    assert e.stats()["num_jobs"] == 0 and e.stats()["in_flight"] == 0
    e.close()
    with pytest.raises(EngineClosedError):
        e.check_swap_out()


@pytest.mark.parametrize("block_bytes", [64, 4096])
def test_host_pool_aliasing_the_device_pool_is_refused(block_bytes):
    """Finding 10: the same memory as device layout and host pool made memcpy copy onto an
    overlapping range (smeared blocks, ASan memcpy-param-overlap)."""
    a = np.zeros((16, block_bytes), np.uint8)
    lay = KVLayout.from_tensors([a])
    with pytest.raises(ValueError, match="shares memory"):
        AsyncSwapEngine(lay, lay, num_workers=0)
    # A host "pool" over the second half of the device array still overlaps it.
    half = KVLayout.from_tensors([a[8:]])
    whole = KVLayout.from_tensors([a[:12]])
    with pytest.raises(ValueError, match="shares memory"):
        AsyncSwapEngine(whole, half, num_workers=0)
    # Adjacent halves of one array do not share a byte: accepted.
    first = KVLayout.from_tensors([a[:8]])
    AsyncSwapEngine(first, half, num_workers=0).close()


def test_interleaved_regions_of_one_layout_are_accepted():
    """K and V interleaved per block (vLLM's FlashInfer layout) overlap as byte ranges
    within the device layout; only device-vs-host sharing is refused."""
    kv = [np.zeros((8, 2, 4, 16), np.float16)]
    layout = KVLayout.from_vllm(kv, kv_dim=1)
    AsyncSwapEngine(layout, HostKVPool(layout, 8, pin=False), num_workers=0).close()


@pytest.mark.parametrize("pairs, end", [
    ([[2**63 - 1, 0, 1]], "9223372036854775808"),
    ([[0, 2**63 - 1, 2]], "9223372036854775809"),
    ([[2**63 - 1, 2**63 - 1, 2**63 - 1]], "18446744073709551614"),
])
def test_out_of_range_extents_are_reported_without_overflow(pools, pairs, end):
    """Finding 11: the message computed start + length in int64 (signed overflow, UB) and
    showed negative block numbers."""
    _, host, layout = pools
    with engine(layout, host) as e:
        with pytest.raises(ValueError, match="outside") as info:
            e.swap_out(np.array(pairs, np.int64))
        msg = str(info.value)
        assert f", {end})" in msg and "-" not in msg.split("extent")[1]
        assert e.stats()["num_jobs"] == 0


def misaligned_int64(rows):
    rows = np.asarray(rows, np.int64)
    buf = bytearray(rows.nbytes + 1)
    view = np.frombuffer(buf, dtype=np.int64, offset=1, count=rows.size).reshape(rows.shape)
    view[:] = rows
    assert not view.flags.aligned and view.flags.c_contiguous
    return view


def test_misaligned_pairs_are_copied_to_aligned_memory(pools):
    """Finding 12: a C-contiguous but misaligned int64 array took the no-copy fast path and
    the core read it with misaligned loads (UB; UBSan reports it in the sanitizer stage)."""
    device, host, layout = pools
    pairs = misaligned_int64([[3, 5, 2]])
    converted = _as_pairs(pairs)
    assert converted.flags.aligned and converted.tolist() == [[3, 5, 2]]
    with engine(layout, host) as e:
        assert e.swap_out(pairs).wait()
        assert e.wait_blocks(misaligned_int64([3, 4])) == 0
    np.testing.assert_array_equal(host.arrays[0][5:7], device[0][3:5])


@pytest.mark.parametrize("pairs, exc, match", [
    ([[2**70, 0, 1]], ValueError, "out of range"),
    ([[0, 0, True]], TypeError, "integers"),
    ([[0.0, 0, 1]], TypeError, "integers"),
])
def test_values_that_are_not_int64_are_rejected(pools, pairs, exc, match):
    """Finding 14: a Python int past 2**63 was reported as 'got dtype object'."""
    _, host, layout = pools
    with engine(layout, host) as e:
        with pytest.raises(exc, match=match):
            e.swap_out(np.array(pairs, dtype=object) if exc is TypeError else pairs)
        assert e.stats()["num_jobs"] == 0
