"""The cuda backend's ordering and failure contract, against the asynchronous fake driver.

tests/fake_cuda/fake_cuda.cpp runs each stream's work on its own thread, in order; events
complete when their stream reaches them; stream waits really block; copies really copy
when they execute (with a per-copy delay here, so that a missing wait shows as wrong
bytes); CUDA_DEVICE_MAX_CONNECTIONS=1 puts every stream in one queue. Each case runs in a
subprocess with a timeout, so a GPU-side deadlock fails the test instead of stalling CI.

Every case checks one rule of docs/design.md ("The CUDA backend: ordering on the GPU") and
fails when that rule's code is reverted (checked once by hand for each, see the issue 11
closing note). Delays and gates only widen races: with the rules in place the results
do not depend on thread timing.
"""

from __future__ import annotations

import textwrap

import pytest
from _fake_cuda import CXX, PRELUDE_CTYPES, run_with_fake

pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler to build the fake")

PRELUDE = PRELUDE_CTYPES + textwrap.dedent('''
    import dataclasses, gc, math, warnings
    import numpy as np
    import kvswitch as K

    CONSUMER, GATED = 0xC0, 0x6A7E  # the caller's streams (the fake makes them on first use)

    def on_cuda(layout):
        regions = [dataclasses.replace(r, device=("cuda", 0)) for r in layout.regions]
        return K.KVLayout(regions, keepalive=layout.tensors)

    def vllm(kv_dim=0, n=16, layers=1, seed=0):
        """vLLM-style KV tensors in host memory standing in for the GPU pool."""
        rng = np.random.default_rng(seed)
        shape = (2, n, 4, 2, 8) if kv_dim == 0 else (n, 2, 4, 2, 8)
        ts = [rng.integers(0, 2**16, size=shape, dtype=np.uint16) for _ in range(layers)]
        views = [t[kv] if kv_dim == 0 else t[:, kv] for t in ts for kv in (0, 1)]
        return views, on_cuda(K.KVLayout.from_vllm(ts, kv_dim=kv_dim))

    def wait_idle(stream, timeout=20):
        """Until the stream has run everything enqueued on it (polls the fake)."""
        deadline = time.monotonic() + timeout
        while lib.fake_stream_pending(stream):
            assert time.monotonic() < deadline, f"stream {stream:#x} never became idle"
            time.sleep(0.005)

    def consumer_read(stream, view):
        """What a kernel on `stream` enqueued now reads from `view` (device blocks)."""
        out = np.empty_like(view)
        assert view.flags.c_contiguous
        check(lib.fake_consumer_copy(stream, out.ctypes.data, view.ctypes.data, view.nbytes))
        return out
''')



def run(fake, body: str, timeout: float = 90, **env: str) -> None:
    run_with_fake(fake, body, timeout, prelude=PRELUDE, **env)


def test_jobs_on_two_workers_keep_read_write_order(fake):
    """Rule 1: a job that writes blocks an earlier job on another worker's stream reads
    (and one that reads what an earlier one writes) waits for it on the GPU."""
    run(fake, '''
        views, layout = vllm(n=16)
        pool = K.HostKVPool(layout, 16)
        old = [v.copy() for v in views]
        for a in pool.arrays:
            a[0:4] = 7
        lib.fake_set_delay_us(b"copy", 30000)
        # sync_every=1: a worker holds at most one job in flight, so the next job lands
        # on the other worker's stream
        with K.AsyncSwapEngine(layout, pool, num_workers=2, sync_every=1) as eng:
            out = eng.swap_out([(0, 8, 4)])  # reads device 0..3
            inn = eng.swap_in([(0, 0, 4)])   # overwrites them: write-after-read
            assert out.wait(30) and inn.wait(30)
            for v, o, a in zip(views, old, pool.arrays):
                assert (a[8:12] == o[0:4]).all(), "the swap-out read overwritten blocks"
                assert (v[0:4] == 7).all()
            for a in pool.arrays:
                a[4:8] = 9
            inn = eng.swap_in([(4, 4, 4)])    # writes device 4..7
            out = eng.swap_out([(4, 12, 4)])  # reads them: read-after-write
            assert inn.wait(30) and out.wait(30)
            for a in pool.arrays:
                assert (a[12:16] == 9).all(), "the swap-out read blocks before the swap-in"
    ''')


@pytest.mark.parametrize("mode", ["event", "flag"])
def test_consumer_stream_waits_for_the_swap_in(fake, mode):
    """before=: a kernel enqueued on the consumer stream after swap_in returns sees the
    swapped-in bytes, even while the copies are slow."""
    run(fake, f'''
        views, layout = vllm(n=8, layers=8)  # 16 regions: 16 delayed copies per job
        pool = K.HostKVPool(layout, 8)
        for i, a in enumerate(pool.arrays):
            a[0:4] = 100 + i
        lib.fake_set_delay_us(b"copy", 20000)
        with K.AsyncSwapEngine(layout, pool, num_workers=2, before_wait="{mode}") as eng:
            h = eng.swap_in([(0, 2, 4)], before=CONSUMER)
            got = consumer_read(CONSUMER, views[-1][2:6])  # the last region lands last
            wait_idle(CONSUMER)
            assert h.wait(30)
            assert (got == 100 + len(views) - 1).all(), "the consumer read before the copies"
    ''')


@pytest.mark.parametrize("mode", ["event", "flag"])
def test_two_threads_before_and_after_on_one_stream_do_not_deadlock(fake, mode):
    """Rule 2: thread 1's swap-in (before=C) is inside prepare, its flag wait already on
    C, when thread 2's conflicting swap-out (after=C) arrives. Were ids assigned apart from
    prepare, the swap-out would get the smaller id, the swap-in would depend on it, and
    the swap-out would wait (through C) for the swap-in's flag: a GPU deadlock."""
    run(fake, f'''
        views, layout = vllm(n=16)
        pool = K.HostKVPool(layout, 16)
        lib.fake_set_delay_us(b"call:cuStreamWaitValue32", 300000)  # a slow prepare
        with K.AsyncSwapEngine(layout, pool, num_workers=2, before_wait="{mode}") as eng:
            res = {{}}
            def swap_in():
                res["in"] = eng.swap_in([(0, 0, 4)], before=CONSUMER)
            def swap_out():
                res["out"] = eng.swap_out([(0, 8, 4)], after=CONSUMER)
            t1 = threading.Thread(target=swap_in)
            t1.start()
            time.sleep(0.1)
            t2 = threading.Thread(target=swap_out)
            t2.start()
            t1.join(30)
            t2.join(30)
            assert not t1.is_alive() and not t2.is_alive()
            assert res["in"].wait(20) and res["out"].wait(20), "deadlocked on the GPU"
            wait_idle(CONSUMER)
            for v, a in zip(views, pool.arrays):  # the swap-out came second: new bytes
                assert (a[8:12] == v[0:4]).all()
    ''')


def test_one_hardware_queue_event_mode_works_and_flag_mode_is_refused(fake):
    """CUDA_DEVICE_MAX_CONNECTIONS=1: every wait of the default mode is enqueued after
    what it waits for, so one queue cannot deadlock; the flag mode could, and is refused."""
    run(fake, '''
        views, layout = vllm(n=16)
        pool = K.HostKVPool(layout, 32)
        for a in pool.arrays:
            a[...] = np.arange(32, dtype=np.uint16)[:, None, None, None]
        try:
            K.AsyncSwapEngine(layout, pool, before_wait="flag")
            raise AssertionError("flag mode accepted with one hardware queue")
        except ValueError as e:
            assert "CUDA_DEVICE_MAX_CONNECTIONS" in str(e), e
        lib.fake_set_delay_us(b"copy", 5000)
        with K.AsyncSwapEngine(layout, pool, num_workers=2) as eng:
            for i in range(4):
                eng.swap_out([(4 * i, 16 + 4 * i, 4)], after=CONSUMER)
                h = eng.swap_in([(4 * i, 4 * i, 4)], before=CONSUMER)
                got = consumer_read(CONSUMER, views[1][4 * i:4 * i + 4])
                wait_idle(CONSUMER)
                want = np.arange(4 * i, 4 * i + 4)[:, None, None, None]
                assert h.wait(20) and (got == want).all()
    ''', CUDA_DEVICE_MAX_CONNECTIONS="1")


def test_failure_after_a_partial_enqueue_is_reported_after_its_copies(fake):
    """Rule 3: the job's 2D copies are enqueued (behind a stalled after= stream) when its
    batch copy fails. It must be reported failed only once those copies ran: a job queued
    after the failure has no dependency on it, and the late copies would overwrite its
    blocks."""
    run(fake, '''
        views, layout = vllm(kv_dim=1, n=16)  # strided: a 3-block extent is one 2D copy
        pool = K.HostKVPool(layout, 16)
        gate = lib.fake_gate_close(GATED)
        lib.fake_fail(b"cuMemcpyBatchAsync", 0, 1)
        with K.AsyncSwapEngine(layout, pool, num_workers=2) as eng:
            h = eng.swap_out([(0, 0, 3), (5, 6, 1)], after=GATED)
            threading.Timer(0.5, lib.fake_gate_open, (gate,)).start()
            try:
                h.wait(30)
                raise AssertionError("no error")
            except K.SwapError as e:
                # an error about no copy in particular (failIdx SIZE_MAX) blames none
                assert "cuMemcpyBatchAsync (2 copies)" in str(e), e
            reported = [a.copy() for a in pool.arrays]
            wait_idle(GATED)
            check(lib.cuCtxSynchronize())
            for a, r in zip(pool.arrays, reported):
                assert (a == r).all(), "a failed job's copies ran after it was reported"
            # a conflicting job afterwards runs, and its bytes stay
            assert eng.swap_out([(8, 0, 3)]).wait(30)
            check(lib.cuCtxSynchronize())
            for v, a in zip(views, pool.arrays):
                assert (a[0:3] == v[8:11]).all()
    ''')


def test_close_drains_100_jobs_gated_on_a_stalled_stream(fake):
    run(fake, '''
        views, layout = vllm(n=128)
        pool = K.HostKVPool(layout, 128)
        gate = lib.fake_gate_close(GATED)
        eng = K.AsyncSwapEngine(layout, pool, num_workers=2)
        hs = [eng.swap_out([(i, 127 - i, 1)], after=GATED) for i in range(100)]
        closer = threading.Thread(target=eng.close)
        closer.start()
        closer.join(0.3)
        assert closer.is_alive(), "close() returned with jobs still gated"
        lib.fake_gate_open(gate)
        closer.join(30)
        assert not closer.is_alive(), "close() hung"
        assert all(h.done() and h.wait(0) for h in hs)
        s = eng.stats()
        assert s["num_jobs"] == 100 and s["num_failed"] == 0 and s["in_flight"] == 0
        for v, a in zip(views, pool.arrays):
            assert (a[127:27:-1] == v[0:100]).all()
    ''')


def test_pageable_host_pool_is_registered_or_reported(fake):
    run(fake, '''
        views, layout = vllm(n=16)
        pinned_pool = K.HostKVPool(layout, 16)
        with K.AsyncSwapEngine(layout, pinned_pool) as eng:
            assert eng.host_memory == "pinned" and C.host_register == 0
        pool = K.HostKVPool(layout, 16, pin=False)
        with K.AsyncSwapEngine(layout, pool) as eng:
            assert eng.host_memory == "registered" == eng.stats()["host_memory"]
            assert C.host_register >= 1
            assert eng.swap_out([(0, 0, 16)]).wait(30)
            assert C.pageable_copies == 0
        assert C.host_unregister == C.host_register  # close() undid it
        for v, a in zip(views, pool.arrays):
            assert (a == v).all()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # register_host=False: a choice, not warned
            with K.AsyncSwapEngine(layout, pool, register_host=False) as eng:
                assert eng.host_memory == "pageable" and C.host_register == C.host_unregister
                assert eng.swap_out([(0, 0, 1)]).wait(30) and C.pageable_copies > 0
        lib.fake_fail(b"cuMemHostRegister", 0, 1000)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eng = K.AsyncSwapEngine(layout, pool)
        assert [w for w in caught if issubclass(w.category, RuntimeWarning)
                and "pageable" in str(w.message)], [str(w.message) for w in caught]
        assert eng.stats()["host_memory"] == "pageable"
        for a in pool.arrays:
            a[...] = 3
        assert eng.swap_in([(0, 0, 16)]).wait(30)  # slow, but correct
        assert C.pageable_copies > 0 and all((v == 3).all() for v in views)
        eng.close()
    ''')


def test_flag_is_written_before_the_job_is_done_and_freed_after_its_waits(fake):
    """Rule 3, flag mode: the flag write precedes the end event, so a done handle means
    the consumer's wait is satisfied; the flags outlive every queued consumer wait."""
    run(fake, '''
        views, layout = vllm(n=16)
        pool = K.HostKVPool(layout, 16)
        lib.fake_set_delay_us(b"write_value", 200000)
        eng = K.AsyncSwapEngine(layout, pool, num_workers=1, before_wait="flag")
        h = eng.swap_in([(0, 0, 2)], before=CONSUMER)
        assert h.wait(30)
        assert lib.fake_pending_waits_satisfied(CONSUMER) == 1, "done before the flag was set"
        lib.fake_set_delay_us(b"write_value", 0)
        stalled = 0xC1
        gate = lib.fake_gate_close(stalled)  # this consumer reaches its wait later
        assert eng.swap_in([(2, 2, 2)], before=stalled).wait(30)
        threading.Timer(0.5, lib.fake_gate_open, (gate,)).start()
        eng.close()  # frees the flags: only once the stalled consumer ran its wait
        del eng, h
        gc.collect()
        wait_idle(stalled)
        assert C.stale_flag_waits == 0, "a consumer waited on freed flag memory"
    ''')


def test_driver_usage_blocking_events_legacy_lookup_overlap_hint_and_capture(fake):
    run(fake, '''
        views, layout = vllm(n=16)
        pool = K.HostKVPool(layout, 16)
        attr = c_int()
        check(lib.cuDeviceGetAttribute(byref(attr), 92, 0))
        assert attr.value == 0  # as on Hopper: v1 memory operations are off
        assert K._core.cuda_driver_info()["stream_mem_ops"]
        with K.AsyncSwapEngine(layout, pool, num_workers=2) as eng:
            hs = [eng.swap_out([(i, i, 1), (i + 8, i + 8, 1)]) for i in range(8)]
            assert all(h.wait(30) for h in hs)
            s = eng.stats()
            assert 0 < s["busy_s"] and math.isclose(s["gbps"], s["bytes"] / s["busy_s"] / 1e9)
            lib.fake_set_capturing(0xCA, 1)
            for call in (lambda: eng.swap_in([(0, 0, 1)], before=0xCA),
                         lambda: eng.swap_out([(0, 0, 1)], after=0xCA)):
                try:
                    call()
                    raise AssertionError("a capturing stream was accepted")
                except ValueError as e:
                    assert "capturing" in str(e), e
            assert s["num_jobs"] == 8 and eng.stats()["in_flight"] == 0  # nothing queued
        assert C.spin_waits == 0 and C.events_blocking_sync > 0
        assert C.proc_other_flag == 0 and C.proc_legacy_flag > 0
        assert C.batch_calls > 0 and C.batch_prefer_overlap == C.batch_calls
        with K.AsyncSwapEngine(layout, pool, before_wait="flag") as eng:  # v2 memory ops
            assert eng.swap_in([(0, 0, 1)], before=CONSUMER).wait(30)
    ''')


def test_driver_without_v2_memory_ops(fake):
    """Below 11.7 the _v2 stream memory operations do not exist: flag mode is refused with
    the reason; the default mode needs none."""
    run(fake, '''
        assert not K._core.cuda_driver_info()["stream_mem_ops"]
        views, layout = vllm(n=16)
        pool = K.HostKVPool(layout, 16)
        try:
            K.AsyncSwapEngine(layout, pool, before_wait="flag")
            raise AssertionError("flag mode accepted")
        except ValueError as e:
            assert "11.7" in str(e), e
        with K.AsyncSwapEngine(layout, pool) as eng:
            assert eng.swap_in([(0, 0, 2)], before=CONSUMER).wait(30)
    ''', FAKE_CUDA_DRIVER_VERSION="11060")


def test_event_mode_swap_in_is_not_held_by_a_job_waiting_on_compute(fake):
    """The worker's only job waits on a stalled after= stream (compute that has not
    finished): an unrelated swap_in(before=) is still dispatched at once, because a worker
    never blocks on the GPU while it could take a job."""
    run(fake, '''
        views, layout = vllm(n=16)
        pool = K.HostKVPool(layout, 16)
        gate = lib.fake_gate_close(GATED)
        with K.AsyncSwapEngine(layout, pool, num_workers=1) as eng:
            out = eng.swap_out([(0, 0, 4)], after=GATED)
            res = {}
            t = threading.Thread(target=lambda: res.update(h=eng.swap_in([(8, 8, 4)],
                                                                          before=CONSUMER)))
            t.start()
            t.join(10)
            returned = not t.is_alive()
            lib.fake_gate_open(gate)
            t.join(30)
            assert returned, "swap_in(before=) waited for a job gated on compute"
            assert res["h"].wait(30) and out.wait(30)
    ''')


def test_flag_mode_with_every_flag_in_flight_orders_by_event(fake):
    """4,096 flag-mode swap-ins in flight hold every flag: the next one is ordered through
    its end event instead of failing (a consumer that does not wait on the handle would
    read stale blocks)."""
    run(fake, '''
        views, layout = vllm(n=16)
        pool = K.HostKVPool(layout, 16)
        gate = lib.fake_gate_close(GATED)
        with K.AsyncSwapEngine(layout, pool, num_workers=1, before_wait="flag",
                               max_queue=5000) as eng:
            eng.swap_out([(0, 0, 1)], after=GATED)  # every swap-in below waits for it
            hs = [eng.swap_in([(0, 0, 1)], before=CONSUMER) for _ in range(4096)]
            waits, events = C.wait_value, C.wait_event
            threading.Timer(0.5, lib.fake_gate_open, (gate,)).start()
            last = eng.swap_in([(0, 0, 1)], before=CONSUMER)  # returns once dispatched
            assert C.wait_value == waits and C.wait_event > events
            # It could be dispatched only after the gated jobs ran (each worker holds at
            # most sync_every): a swap_in that returned at once would have left it unordered.
            assert lib.fake_stream_pending(GATED) == 0
            assert last.wait(60) and all(h.wait(60) for h in hs)
            wait_idle(CONSUMER)
    ''', timeout=180)


def test_engines_sharing_a_pageable_pool_share_its_registration(fake):
    run(fake, '''
        views, layout = vllm(n=16)
        pool = K.HostKVPool(layout, 16, pin=False)
        a = K.AsyncSwapEngine(layout, pool)
        b = K.AsyncSwapEngine(layout, pool)
        assert a.host_memory == b.host_memory == "registered"
        registered = C.host_register
        a.close()
        assert C.host_unregister == 0  # b still copies to it
        assert b.swap_out([(0, 0, 16)]).wait(30) and C.pageable_copies == 0
        b.close()
        assert C.host_unregister == registered
    ''')


def test_swap_in_after_a_stream_waits_for_its_readers(fake):
    """swap_in(after=compute): device blocks freed by a sequence whose kernel may still read
    them are overwritten only after that kernel (a write-after-read the engine cannot see)."""
    run(fake, '''
        views, layout = vllm(n=16)
        pool = K.HostKVPool(layout, 16)
        for a in pool.arrays:
            a[0:4] = 6
        old = views[0][0:4].copy()
        gate = lib.fake_gate_close(GATED)             # the compute stream is still busy...
        got = consumer_read(GATED, views[0][0:4])     # ...and will then read the old blocks
        with K.AsyncSwapEngine(layout, pool, num_workers=2) as eng:
            eng.check_swap_in(after=GATED, before=CONSUMER)
            h = eng.swap_in([(0, 0, 4)], after=GATED, before=CONSUMER)
            threading.Timer(0.3, lib.fake_gate_open, (gate,)).start()
            assert h.wait(30)
            wait_idle(GATED)
            assert (got == old).all(), "the swap-in overwrote blocks a kernel still read"
            assert (views[0][0:4] == 6).all()
    ''')
