"""What the CUDA driver's own contract demands of the cuda backend (issue 22).

Against the fake driver (tests/fake_cuda/fake_cuda.cpp), whose model of each rule is
checked by tests/test_fake_cuda_model.py:

* stream capture: vLLM, SGLang and torch.compile capture CUDA graphs in global mode, which
  prohibits event queries and synchronizations in every other thread left in global mode;
  kvswitch's workers and calls run in relaxed mode, so swaps beside a capture neither fail
  nor invalidate it;
* ABI versions: every entry point is requested at the version whose signature kvswitch
  declares (cuMemcpyBatchAsync at 12080: the 13.0 ABI has no failIdx), also on a 13.x
  driver;
* sticky errors: after a fault every call fails until the context is reset; every job
  reports it and nothing hangs;
* events: the start event of a job is timing-only (no blocking sync), the end event blocks;
* page-locked memory is judged for each host region, not for the first byte of a run of
  regions that share a page;
* swap_out(before=stream) orders the reuse of swapped-out device blocks on the GPU.

Each case fails when its fix is reverted (checked by hand, issue 22). Gates and delays only
widen races; results do not depend on thread timing.
"""

from __future__ import annotations

import pytest
from _fake_cuda import CXX, run_with_fake
from test_cuda_ordering import PRELUDE  # the fake's ctypes, kvswitch, vllm(), wait_idle()

pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler to build the fake")



def run(fake, body: str, timeout: float = 120, **env: str) -> None:
    run_with_fake(fake, body, timeout, prelude=PRELUDE, **env)


@pytest.mark.parametrize("mode", ["event", "flag", "inline"])
def test_swaps_beside_a_global_mode_capture_neither_fail_nor_invalidate_it(fake, mode):
    """Another thread captures a CUDA graph in GLOBAL mode (the default of torch's
    CUDAGraph) for the whole run: engines are built, swap in and out with after=/before=
    streams, and close. Nothing fails and the capture ends valid."""
    run(fake, f'''
        views, layout = vllm(n=16)
        pool = K.HostKVPool(layout, 16)
        for a in pool.arrays:
            a[8:16] = 3
        began, stop, result = threading.Event(), threading.Event(), {{}}
        def capture():
            use_context()
            cap = new_stream()
            check(lib.cuStreamBeginCapture_v2(cap, MODE_GLOBAL))
            began.set()
            stop.wait(60)
            result["end"] = end_capture(cap)
        t = threading.Thread(target=capture, daemon=True)
        t.start()
        assert began.wait(30)
        kw = {{"num_workers": 0}} if "{mode}" == "inline" else {{"before_wait": "{mode}"}}
        with K.AsyncSwapEngine(layout, pool, **kw) as eng:
            out = eng.swap_out([(0, 0, 4)], after=GATED)
            back = eng.swap_in([(8, 8, 4)], before=CONSUMER)
            assert out.wait(30) and back.wait(30), (out.error, back.error)
            for i in range(8):  # enough jobs that workers poll their completion
                eng.swap_out([(i, i, 1)])
            eng.synchronize()
            assert eng.stats()["num_failed"] == 0
        wait_idle(CONSUMER)
        assert (views[0][8:12] == 3).all() and (pool.arrays[0][0:4] == views[0][0:4]).all()
        stop.set()
        t.join(30)
        r, graph = result["end"]
        assert r == SUCCESS and graph, f"the capture was invalidated ({{error_name(r)}})"
        assert C.capture_violations == 0
    ''')


def test_entry_points_are_requested_at_the_abi_kvswitch_declares(fake):
    """Every cuGetProcAddress request of kvswitch, on a CUDA 13.1 driver: the batch copy at
    12080 (its 13.0 ABI has no failIdx and would shift kvswitch's arguments), the _v2
    stream memory operations at 11070, the rest at 11000; none resolves to a stub ABI, and
    batch copies still work."""
    run(fake, '''
        info = K._core.cuda_driver_info()
        assert info["available"] and info["batch_copy"] and info["driver_version"] == 13010
        requested = dict(proc_requests())
        special = {"cuMemcpyBatchAsync": 12080, "cuStreamWaitValue32": 11070,
                   "cuStreamWriteValue32": 11070}
        for name, version in requested.items():
            assert version == special.get(name, 11000), (name, version)
        assert set(special) <= set(requested)
        assert "cuThreadExchangeStreamCaptureMode" in requested
        assert C.proc_stub_resolutions == 0
        views, layout = vllm(n=16)
        pool = K.HostKVPool(layout, 16)
        with K.AsyncSwapEngine(layout, pool, num_workers=1) as eng:
            assert eng.swap_out([(0, 0, 2), (4, 4, 2)]).wait(30)  # calls the batch copy
        assert C.batch_calls == 1 and (pool.arrays[1][4:6] == views[1][4:6]).all()
    ''', FAKE_CUDA_DRIVER_VERSION="13010")


def test_a_sticky_fault_fails_every_job_and_nothing_hangs(fake):
    """A copy faults on the GPU (illegal address): the context is unusable until reset.
    Every job (in flight, queued, submitted after, with after=/before= streams) reports the
    error on its handle, submit() returns, close() returns; after a reset a new engine
    copies again."""
    run(fake, '''
        views, layout = vllm(n=16)
        pool = K.HostKVPool(layout, 16)
        lib.fake_fault_copy(0, ILLEGAL_ADDRESS)  # the first copy to execute faults
        gate = lib.fake_gate_close(GATED)
        eng = K.AsyncSwapEngine(layout, pool, num_workers=2)
        hs = [eng.swap_out([(0, 0, 4)], after=GATED), eng.swap_out([(4, 4, 4)]),
              eng.swap_in([(8, 8, 4)], before=CONSUMER)]
        lib.fake_gate_open(gate)
        hs += [eng.swap_in([(12, 12, 2)], before=CONSUMER), eng.swap_out([(1, 1, 1)])]
        for h in hs:
            try:
                h.wait(30)
                raise AssertionError(f"job {h.id} did not fail")
            except K.SwapError as e:
                assert "CUDA_ERROR_ILLEGAL_ADDRESS" in str(e), e
        eng.close()  # returns: nothing waits for work a dead context never runs
        assert eng.stats()["num_failed"] == len(hs)
        try:
            K.AsyncSwapEngine(layout, pool)
            raise AssertionError("an engine was built on a faulted context")
        except RuntimeError as e:
            assert "CUDA_ERROR_ILLEGAL_ADDRESS" in str(e), e
        check(lib.cuDevicePrimaryCtxReset_v2(0))
        with K.AsyncSwapEngine(layout, pool) as eng:
            assert eng.swap_out([(2, 2, 2)]).wait(30)
        assert (pool.arrays[0][2:4] == views[0][2:4]).all()
    ''')


def test_start_events_are_timing_only_and_end_events_block(fake):
    """A worker waits on a job's end event (blocking sync: it sleeps instead of spinning a
    core) and never on its start event, which only times the job."""
    run(fake, '''
        views, layout = vllm(n=16)
        pool = K.HostKVPool(layout, 16)
        with K.AsyncSwapEngine(layout, pool, num_workers=0) as eng:
            h = eng.swap_out([(0, 0, 4)])  # inline: one start and one end event
            assert h.done() and h.elapsed_s is not None and h.elapsed_s >= 0
        assert C.events_blocking_sync == 1, C.events_blocking_sync
        assert C.spin_waits == 0
    ''')


def test_page_locked_memory_is_judged_for_each_host_region(fake):
    """Two host regions share a page: the first lies in memory its owner page-locked, the
    second runs on into pageable memory. The run of regions starts page-locked, but the
    second region is not: the engine must not report the pool as pinned."""
    run(fake, '''
        views, layout = vllm(n=8)
        raw = np.zeros(64 << 10, np.uint8)
        base = (raw.ctypes.data + 4095) & ~4095
        check(lib.cuMemHostRegister_v2(base, 4096, 0))  # its owner page-locked one page
        bb = layout.regions[0].block_bytes  # 128
        r0 = dataclasses.replace(layout.regions[0], base=base, device="cpu")  # [0, 1 KiB)
        r1 = dataclasses.replace(layout.regions[1], base=base + 2048, block_stride=512,
                                 device="cpu")  # [2 KiB, 2 KiB + 7 * 512 + 128): past it
        assert 8 * bb <= 2048 and 2048 + 7 * 512 + bb > 4096
        host = K.KVLayout([r0, r1], keepalive=(raw,))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            eng = K.AsyncSwapEngine(layout, host, num_workers=1)
        assert eng.host_memory == "pageable", eng.host_memory
        detail = eng._engine.host_memory[1]
        assert "cuMemHostRegister" in detail, detail  # the overlapping page refused it
        assert any("pageable" in str(x.message) for x in w), [str(x.message) for x in w]
        assert eng.swap_out([(0, 0, 8)]).wait(30)  # still correct, only synchronous
        second = raw[base - raw.ctypes.data + 2048:][:bb]
        assert (second == views[1][0].view(np.uint8).reshape(-1)).all()
        eng.close()
        # the page-aligned case: the second region in a page of its own is registered
        r1 = dataclasses.replace(r1, base=base + 4096)
        with K.AsyncSwapEngine(layout, K.KVLayout([r0, r1], keepalive=(raw,))) as eng:
            assert eng.host_memory == "registered" and C.host_register == 2
    ''')


def test_swap_out_before_orders_the_reuse_of_its_blocks_on_the_gpu(fake):
    """swap_out(before=stream): a kernel enqueued on that stream after the call (writing
    new KV into the swapped-out device blocks) runs only after the copies read them, with
    no host wait; the swapped-out bytes are the old ones."""
    run(fake, '''
        views, layout = vllm(n=16)
        pool = K.HostKVPool(layout, 16)
        old = views[0][0:4].copy()
        new = np.full_like(old, 9)
        gate = lib.fake_gate_close(GATED)  # the copies wait for compute still running
        for mode in ("event", "flag"):
            with K.AsyncSwapEngine(layout, pool, num_workers=1, before_wait=mode) as eng:
                eng.check_swap_out(after=GATED, before=CONSUMER)
                h = eng.swap_out([(0, 0, 4)], after=GATED, before=CONSUMER)
                # the consumer reuses the blocks: new KV into device blocks 0..3
                check(lib.fake_consumer_copy(CONSUMER, views[0].ctypes.data, new.ctypes.data,
                                             new.nbytes))
                time.sleep(0.2)  # room for an unordered write to land first (it must not)
                if mode == "event":
                    lib.fake_gate_open(gate)
                else:
                    threading.Timer(0.1, lib.fake_gate_open, (gate,)).start()
                assert h.wait(30)
                wait_idle(CONSUMER)
                assert (pool.arrays[0][0:4] == old).all(), "the reuse overtook the swap-out"
                assert (views[0][0:4] == new).all()
                views[0][0:4] = old
                gate = lib.fake_gate_close(GATED)
        lib.fake_gate_open(gate)
        with K.AsyncSwapEngine(layout, pool, backend="cuda") as eng:
            try:
                eng.swap_out([(0, 0, 1)], before=K.CudaEvent(0x55))
                raise AssertionError("an event was accepted as before=")
            except ValueError as e:
                assert "before= must be a stream" in str(e), e
    ''')
