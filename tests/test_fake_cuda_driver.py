"""The cuda backend against a fake libcuda.so.1 (tests/fake_cuda/fake_cuda.cpp).

No GPU needed: the fake driver treats device addresses as host addresses and copies
synchronously, and counts calls. This checks what can be checked without hardware: that
the driver table resolves (cuGetProcAddress), that every worker has the context current,
which copy APIs a job uses (cuMemcpyBatchAsync, cuMemcpy2DAsync, cuMemcpyAsync), stream
priorities, after=/before= stream operations, pinned host pools, error propagation, and
that primary-context retains are balanced. Each case runs in a subprocess whose
LD_LIBRARY_PATH points at the fake driver. Timing and real concurrency with a GPU are NOT
covered here (see tests/cuda).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _fake_cuda import CXX

pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler to build the fake")

PRELUDE = textwrap.dedent('''
    import ctypes, dataclasses, gc
    import numpy as np
    import kvswitch as K
    NAMES = ["memcpy_async", "memcpy_2d", "batch_calls", "batch_copies", "host_alloc",
             "streams_created", "stream_priority", "wait_value", "write_value", "wait_event",
             "event_record", "ctx_retain", "ctx_release", "no_context_errors"]
    class Counters(ctypes.Structure):
        _fields_ = [(n, ctypes.c_long) for n in NAMES]
    lib = ctypes.CDLL("libcuda.so.1")
    lib.fake_counters.restype = ctypes.POINTER(Counters)
    C = lib.fake_counters().contents

    def on_cuda(layout):
        regions = [dataclasses.replace(r, device=("cuda", 0)) for r in layout.regions]
        return K.KVLayout(regions, keepalive=layout.tensors)

    def vllm(kv_dim, n=12, layers=2, seed=0):
        rng = np.random.default_rng(seed)
        shape = (2, n, 4, 2, 8) if kv_dim == 0 else (n, 2, 4, 2, 8)
        ts = [rng.integers(0, 2**16, size=shape, dtype=np.uint16) for _ in range(layers)]
        views = [t[kv] if kv_dim == 0 else t[:, kv] for t in ts for kv in (0, 1)]
        return ts, views, on_cuda(K.KVLayout.from_vllm(ts, kv_dim=kv_dim))
''')



def run(fake: Path, body: str, **env: str) -> None:
    e = dict(os.environ, LD_LIBRARY_PATH=str(fake), **env)
    code = PRELUDE + textwrap.dedent(body) + "\nprint('FAKE-OK')\n"
    r = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "FAKE-OK" in r.stdout, r.stdout + r.stderr


def test_driver_loads_and_auto_picks_cuda(fake):
    run(fake, '''
        info = K._core.cuda_driver_info()
        assert info["available"] and info["batch_copy"], info
        assert info["driver_version"] == 12080 and info["device_count"] == 1
        ts, views, layout = vllm(0)
        pool = K.HostKVPool(layout, 8)
        assert pool.pinned and "cuMemHostAlloc" in pool.pin_reason, pool.pin_reason
        assert C.host_alloc == 1
        with K.AsyncSwapEngine(layout, pool, num_workers=2) as eng:
            assert eng.backend == "cuda", eng.backend_reason
            assert "cuMemcpyBatchAsync" in eng.backend_reason
        # after close() every worker has opened (and closed) its stream
        assert C.streams_created == 2 and C.stream_priority == C.streams_created
    ''')


def test_contiguous_regions_go_out_in_one_batch_per_job(fake):
    run(fake, '''
        ts, views, layout = vllm(0)
        pool = K.HostKVPool(layout, 10)
        for a in pool.arrays:
            a[...] = 7
        pairs = [(0, 0, 3), (5, 4, 1), (8, 6, 4)]
        with K.AsyncSwapEngine(layout, pool, num_workers=2) as eng:
            h = eng.swap_out(pairs)
            assert h.wait(timeout=30) and h.elapsed_s is not None and h.elapsed_s >= 0
            assert h.num_copies == 3 * layout.num_regions
            assert C.batch_calls == 1 and C.batch_copies == h.num_copies
            assert C.memcpy_2d == 0 and C.memcpy_async == 0
            for v, a in zip(views, pool.arrays):
                for s, d, n in pairs:
                    assert (a[d:d + n] == v[s:s + n]).all()
            before = [v.copy() for v in views]
            assert eng.swap_in([(0, 9, 3)]).wait(timeout=30)
            for v, b, a in zip(views, before, pool.arrays):
                assert (v[9:12] == a[0:3]).all() and (v[:9] == b[:9]).all()
            assert C.no_context_errors == 0
    ''')


def test_strided_regions_use_2d_copies(fake):
    run(fake, '''
        ts, views, layout = vllm(1)
        pool = K.HostKVPool(layout, 10)
        with K.AsyncSwapEngine(layout, pool, num_workers=1) as eng:
            h = eng.swap_out([(0, 0, 3), (6, 5, 1)])  # 3 blocks: 2D; 1 block: linear
            assert h.wait(timeout=30)
            assert C.memcpy_2d == layout.num_regions
            # one linear copy per region left: a batch of 4 copies
            assert C.batch_calls == 1 and C.batch_copies == layout.num_regions
            for v, a in zip(views, pool.arrays):
                assert (a[0:3] == v[0:3]).all() and (a[5] == v[6]).all()
    ''')


def test_without_batch_api_each_copy_is_one_memcpy_async(fake):
    run(fake, '''
        assert not K._core.cuda_driver_info()["batch_copy"]
        ts, views, layout = vllm(0)
        pool = K.HostKVPool(layout, 10)
        with K.AsyncSwapEngine(layout, pool, num_workers=0) as eng:
            assert "cuMemcpyAsync per copy" in eng.backend_reason
            h = eng.swap_out([(0, 0, 2), (4, 3, 2)])
            assert h.done() and C.memcpy_async == h.num_copies and C.batch_calls == 0
            for v, a in zip(views, pool.arrays):
                assert (a[0:2] == v[0:2]).all() and (a[3:5] == v[4:6]).all()
    ''', FAKE_CUDA_NO_BATCH="1")


def test_after_and_before_streams(fake):
    run(fake, '''
        ts, views, layout = vllm(0)
        pool = K.HostKVPool(layout, 10)
        with K.AsyncSwapEngine(layout, pool, num_workers=2) as eng:
            assert eng.before_wait == "event"
            waits = C.wait_event
            assert eng.swap_out([(0, 0, 2)], after=0x1234).wait(timeout=30)
            assert C.wait_event == waits + 1  # swap stream waited on the recorded event
            assert eng.swap_out([(2, 2, 2)], after=K.CudaEvent(0x99)).wait(timeout=30)
            assert C.wait_event == waits + 2
            # event mode: the consumer waits on the job's end event, enqueued by swap_in
            h = eng.swap_in([(0, 0, 2)], before=0x5678)
            assert C.wait_event == waits + 3 and C.wait_value == 0
            assert h.wait(timeout=30)
            class StreamProto:
                def __cuda_stream__(self):
                    return (0, 0x4321)
            assert eng.swap_in([(2, 4, 1)], before=StreamProto()).wait(timeout=30)
            assert C.wait_event == waits + 4 and C.wait_value == 0
            try:
                eng.swap_in([(0, 0, 1)], before=K.CudaEvent(1))
                raise AssertionError("event as before= accepted")
            except ValueError as e:
                assert "stream" in str(e)
            try:  # a torch.cuda.Event before its first record() has no CUDA event
                eng.swap_out([(0, 0, 1)], after=K.CudaEvent(0))
                raise AssertionError("unrecorded event accepted")
            except ValueError as e:
                assert "never recorded" in str(e)
        with K.AsyncSwapEngine(layout, pool, num_workers=2, before_wait="flag") as eng:
            assert eng.before_wait == "flag"
            values, writes = C.wait_value, C.write_value  # after the construction probe
            h = eng.swap_in([(0, 0, 2)], before=0x5678)
            assert C.wait_value == values + 1  # enqueued on the consumer before swap_in returned
            assert h.wait(timeout=30) and C.write_value == writes + 1
    ''')


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_error_at_submit_fails_the_job_on_its_handle(fake, workers):
    """A driver error while ordering the job after the caller's stream (prepare) is not
    raised by swap_out: the job is queued as failed, reported on its handle, and the engine
    goes on. (With worker threads this dereferenced the missing job sync.)"""
    run(fake, f'''
        ts, views, layout = vllm(0)
        pool = K.HostKVPool(layout, 8)
        with K.AsyncSwapEngine(layout, pool, num_workers={workers}) as eng:
            h = eng.swap_out([(0, 0, 2)], after=0xBAD)
            try:
                h.wait(timeout=30)
                raise AssertionError("no error")
            except K.SwapError as e:
                assert "could not order the job" in str(e), e
            assert h.root_job_id == h.id and eng.stats()["num_failed"] == 1
            assert eng.swap_out([(0, 0, 2)], after=0x1234).wait(timeout=30)
    ''', FAKE_CUDA_FAIL_RECORD_ON="0xBAD")


def test_copy_error_surfaces_from_wait_and_engine_recovers(fake):
    run(fake, '''
        ts, views, layout = vllm(0)
        pool = K.HostKVPool(layout, 10)
        for a in pool.arrays:
            a[...] = 3
        with K.AsyncSwapEngine(layout, pool, num_workers=1, before_wait="flag") as eng:
            writes = C.write_value  # the construction's probe wrote one
            h = eng.swap_in([(0, 0, 2)], before=0x77)
            try:
                h.wait(timeout=30)
                raise AssertionError("no error")
            except K.SwapError as e:
                assert "cuMemcpyBatchAsync" in str(e) and "CUDA_ERROR_FAKE" in str(e), e
            assert C.write_value == writes  # the GPU never set the flag, the host did
            assert eng.stats()["num_failed"] == 1
            assert eng.swap_in([(0, 0, 2)]).wait(timeout=30)
            for v in views:
                assert (v[0:2] == 3).all()
    ''', FAKE_CUDA_FAIL_COPY_AFTER="0")


def test_cuda_array_interface_and_many_jobs_with_sync_every(fake):
    run(fake, '''
        t = np.arange(32 * 64, dtype=np.float32).reshape(32, 64)
        class CAI:
            def __init__(self, a):
                self._a = a
                self.__cuda_array_interface__ = {"shape": a.shape, "typestr": a.dtype.str,
                    "data": (a.ctypes.data, False), "strides": None, "version": 3}
        layout = K.KVLayout.from_tensors([CAI(t)])
        assert layout.device == ("cuda", 0)
        pool = K.HostKVPool(layout, 32)
        with K.AsyncSwapEngine(layout, pool, num_workers=2, sync_every=1) as eng:
            hs = [eng.swap_out([(i, 31 - i, 1)]) for i in range(32)]
            assert eng.wait_blocks([3]) <= 1 and hs[3].done()
            eng.synchronize()
            assert all(h.done() for h in hs) and eng.stats()["num_jobs"] == 32
        assert (pool.arrays[0][::-1] == t).all()
    ''')


def test_primary_context_retains_are_balanced(fake):
    run(fake, '''
        ts, views, layout = vllm(0)
        pool = K.HostKVPool(layout, 4)
        eng = K.AsyncSwapEngine(layout, pool)
        eng.swap_out([(0, 0, 1)]).wait()
        K._core.cuda_timed_memcpy(0, pool.layout.regions[0].base, layout.regions[0].base, 16)
        eng.close()
        del eng, pool
        gc.collect()
        assert C.ctx_retain > 0 and C.ctx_retain == C.ctx_release, (C.ctx_retain, C.ctx_release)
    ''')
