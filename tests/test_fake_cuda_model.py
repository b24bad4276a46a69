"""The fake CUDA driver's own semantics (tests/fake_cuda/fake_cuda.cpp), through ctypes.

Tests of kvswitch against the fake are only as good as the fake's model of a GPU: these
check that model (stream order, concurrency between streams, events, stream memory
operations, the single hardware queue of CUDA_DEVICE_MAX_CONNECTIONS=1, failure injection,
memory registry, cuGetProcAddress versioning, exit with blocked streams). No kvswitch
import. Every case runs in a subprocess with a timeout (run_with_fake). Results never
depend on thread timing: ordering is forced with gates and waits; delays only widen races
(each case that uses one is also run with delay 0); "still blocked after 0.3 s" checks can
only fail if the fake is wrong.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from _fake_cuda import (
    CXX,
    PRELUDE_CTYPES,
    fake_env,
    run_expecting_hang,
    run_with_fake,
)

pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler to build the fake")



@pytest.mark.parametrize("delay_us", [0, 3000])
def test_stream_runs_ops_in_order_when_they_execute(fake, delay_us):
    run_with_fake(fake, f'''
        lib.fake_set_delay_us(b"copy", {delay_us})
        s = new_stream()
        a, b, c = pinned(256), pinned(256), pinned(256)
        buf(a, 256)[:] = bytes(range(256))
        gate = lib.fake_gate_close(s)
        check(lib.cuMemcpyAsync(b, a, 256, s))
        check(lib.cuMemcpyAsync(c, b, 256, s))  # reads what the first copy wrote
        # bytes move when a copy executes, not when it is enqueued
        assert lib.fake_stream_pending(s) == 3 and bytes(buf(b, 256)) == bytes(256)
        lib.fake_gate_open(gate)
        check(lib.cuStreamSynchronize(s))
        assert lib.fake_stream_pending(s) == 0
        assert bytes(buf(c, 256)) == bytes(range(256))
        assert C.memcpy_async == 2 and C.pageable_copies == 0
    ''')


@pytest.mark.parametrize("delay_us", [0, 2000])
def test_batch_and_2d_copies_run_in_stream_order(fake, delay_us):
    run_with_fake(fake, f'''
        lib.fake_set_delay_us(b"copy", {delay_us})
        s = new_stream()
        a, b, c = pinned(64), pinned(64), pinned(64)
        buf(a, 64)[:] = bytes(range(1, 65))
        gate = lib.fake_gate_close(s)
        # batch: a[0:16] -> b[0:16], a[32:48] -> b[32:48]
        dsts, srcs = (u64 * 2)(b, b + 32), (u64 * 2)(a, a + 32)
        sizes, idx, fail = (c_size_t * 2)(16, 16), c_size_t(0), c_size_t(7)
        attr = MemcpyAttributes(1, MemLocation(1, 0), MemLocation(2, 0), 0x1)
        check(lib.cuMemcpyBatchAsync(dsts, srcs, sizes, 2, byref(attr), byref(idx), 1,
                                     byref(fail), s))
        # 2D: 4 rows of 8 bytes from b (pitch 16) to c (pitch 8): the batch's bytes
        m = Memcpy2D(srcMemoryType=4, srcDevice=b, srcPitch=16, dstMemoryType=4,
                     dstDevice=c, dstPitch=8, WidthInBytes=8, Height=4)
        check(lib.cuMemcpy2DAsync_v2(byref(m), s))
        assert bytes(buf(b, 64)) == bytes(64)
        lib.fake_gate_open(gate)
        check(lib.cuStreamSynchronize(s))
        src = bytes(range(1, 65))
        assert bytes(buf(b, 64)) == src[0:16] + bytes(16) + src[32:48] + bytes(16)
        assert bytes(buf(c, 32)) == src[0:8] + bytes(8) + src[32:40] + bytes(8)
        assert (C.batch_calls, C.batch_copies, C.memcpy_2d) == (1, 2, 1)
        assert C.batch_prefer_overlap == 1
        # bad attributes: order not STREAM
        attr.srcAccessOrder = 3
        assert lib.cuMemcpyBatchAsync(dsts, srcs, sizes, 2, byref(attr), byref(idx), 1,
                                      byref(fail), s) == INVALID_VALUE
    ''')


def test_two_streams_run_concurrently(fake):
    run_with_fake(fake, '''
        s1, s2 = new_stream(), new_stream()
        a, b1, b2 = pinned(64), pinned(64), pinned(64)
        buf(a, 64)[:] = b"x" * 64
        gate = lib.fake_gate_close(s1)
        check(lib.cuMemcpyAsync(b1, a, 64, s1))
        check(lib.cuMemcpyAsync(b2, a, 64, s2))
        check(lib.cuStreamSynchronize(s2))  # s2 is not behind s1's gate
        assert bytes(buf(b2, 64)) == b"x" * 64
        assert lib.fake_stream_pending(s1) == 2 and bytes(buf(b1, 64)) == bytes(64)
        t = in_thread(lib.cuStreamSynchronize, s1)
        assert_blocked(t)
        lib.fake_gate_open(gate)
        assert assert_finishes(t) == SUCCESS and bytes(buf(b1, 64)) == b"x" * 64
    ''')


def test_foreign_handles_are_streams_and_consumer_copy_needs_no_context(fake):
    run_with_fake(fake, '''
        a, b, c = pinned(16), pinned(16), pinned(16)
        buf(a, 16)[:] = b"k" * 16
        gate = lib.fake_gate_close(0x1234)  # a consumer stream nobody created
        assert lib.fake_consumer_copy(0x1234, b, a, 16) == 0
        check(lib.cuMemcpyAsync(c, a, 16, 0))  # the legacy stream 0: just another stream
        check(lib.cuStreamSynchronize(0))
        assert bytes(buf(c, 16)) == b"k" * 16 and lib.fake_stream_pending(0x1234) == 2
        lib.cuCtxSetCurrent(None)
        lib.fake_gate_open(gate)
        while lib.fake_stream_pending(0x1234):  # control API: no context needed
            time.sleep(0.001)
        assert bytes(buf(b, 16)) == b"k" * 16 and C.memcpy_async == 1
        assert lib.cuStreamSynchronize(0x1234) == INVALID_CONTEXT and C.no_context_errors == 1
        assert lib.cuStreamDestroy_v2(0x1234) == INVALID_HANDLE  # not ours to destroy
    ''')


@pytest.mark.parametrize("delay_us", [0, 2000])
def test_wait_event_blocks_until_the_recorded_event_completes(fake, delay_us):
    run_with_fake(fake, f'''
        lib.fake_set_delay_us(b"copy", {delay_us})
        producer, consumer, other = new_stream(), new_stream(), new_stream()
        a, b, c = pinned(64), pinned(64), pinned(64)
        e = new_event(EVENT_DISABLE_TIMING)
        gate = lib.fake_gate_close(producer)
        buf(a, 64)[:] = b"p" * 64
        check(lib.cuMemcpyAsync(b, a, 64, producer))
        check(lib.cuEventRecord(e, producer))
        assert lib.cuEventQuery(e) == NOT_READY
        check(lib.cuStreamWaitEvent(consumer, e, 0))
        check(lib.cuMemcpyAsync(c, b, 64, consumer))  # must see the producer's copy
        # a later record does not move the wait's target (captured at call time)
        gate2 = lib.fake_gate_close(other)
        check(lib.cuEventRecord(e, other))
        t = in_thread(lib.cuStreamSynchronize, consumer)
        assert_blocked(t)
        assert bytes(buf(c, 64)) == bytes(64)
        lib.fake_gate_open(gate)
        assert assert_finishes(t) == SUCCESS
        assert bytes(buf(c, 64)) == b"p" * 64
        assert lib.cuEventQuery(e) == NOT_READY  # its latest record is still gated
        lib.fake_gate_open(gate2)
        check(lib.cuEventSynchronize(e))
        assert lib.cuEventQuery(e) == SUCCESS
        assert C.wait_event == 1 and C.event_record == 2
    ''')


def test_wait_on_a_never_recorded_event_is_a_no_op(fake):
    run_with_fake(fake, '''
        s = new_stream()
        e = new_event()
        check(lib.cuStreamWaitEvent(s, e, 0))
        check(lib.cuStreamWaitEvent(s, 0x99, 0))  # a caller's raw handle: foreign event
        assert lib.fake_stream_pending(s) == 0 and C.wait_event == 2
        check(lib.cuStreamSynchronize(s))
        assert lib.cuEventQuery(e) == SUCCESS  # never recorded: complete, as in CUDA
        for call in (lambda: lib.cuEventRecord(None, s), lambda: lib.cuEventQuery(None),
                     lambda: lib.cuEventSynchronize(None),
                     lambda: lib.cuStreamWaitEvent(s, None, 0)):
            assert call() == INVALID_HANDLE
    ''')


@pytest.mark.parametrize("delay_us", [0, 2000])
def test_wait_value_blocks_until_a_host_write_or_a_write_value(fake, delay_us):
    run_with_fake(fake, f'''
        lib.fake_set_delay_us(b"write_value", {delay_us})
        consumer, producer = new_stream(), new_stream()
        flag, a, b = pinned(4), pinned(8), pinned(8)
        buf(a, 8)[:] = b"12345678"
        check(lib.cuStreamWaitValue32_v2(consumer, flag, 1, 0))
        check(lib.cuMemcpyAsync(b, a, 8, consumer))
        t = in_thread(lib.cuStreamSynchronize, consumer)
        assert_blocked(t)
        assert bytes(buf(b, 8)) == bytes(8) and lib.fake_pending_waits_satisfied(consumer) == 0
        word(flag).value = 1  # the host writes the word directly
        assert assert_finishes(t) == SUCCESS and bytes(buf(b, 8)) == b"12345678"

        check(lib.cuStreamWaitValue32_v2(consumer, flag, 2, 0))
        check(lib.fake_consumer_copy(consumer, b, flag, 4))
        gate = lib.fake_gate_close(producer)
        check(lib.cuStreamWriteValue32_v2(producer, flag, 2, 0))
        t = in_thread(lib.cuStreamSynchronize, consumer)
        assert_blocked(t)
        assert word(flag).value == 1  # the write runs when executed, not when enqueued
        lib.fake_gate_open(gate)
        assert assert_finishes(t) == SUCCESS and word(b).value == 2
        assert C.wait_value == 2 and C.write_value == 1 and C.stale_flag_waits == 0
        assert lib.cuStreamWaitValue32_v2(consumer, flag, 1, 0x1) == INVALID_VALUE  # only GEQ
    ''')


def test_wait_value_compares_cyclically_and_stale_words_pass(fake):
    run_with_fake(fake, '''
        s = new_stream()
        flag = pinned(4)
        word(flag).value = 5
        for value, ok in [(3, 1), (5, 1), (0xFFFFFFFE, 1), (6, 0), (0x80000006, 1),
                          (0x80000005, 0)]:
            gate = lib.fake_gate_close(s)  # keeps the wait pending while it is inspected
            check(lib.cuStreamWaitValue32_v2(s, flag, value, 0))
            assert lib.fake_pending_waits_satisfied(s) == ok, hex(value)
            lib.fake_gate_open(gate)
            if not ok:
                word(flag).value = value  # release it
            check(lib.cuStreamSynchronize(s))
            word(flag).value = 5
        # a wait on a freed word: counted, and satisfied (the memory is gone)
        stale = pinned(4)
        gate = lib.fake_gate_close(s)
        check(lib.cuStreamWaitValue32_v2(s, stale, 1, 0))
        check(lib.cuMemFreeHost(stale))
        lib.fake_gate_open(gate)
        check(lib.cuStreamSynchronize(s))
        assert C.stale_flag_waits == 1
    ''')


SERIALIZED_DEADLOCK = '''
    consumer, producer = new_stream(), new_stream()
    flag = pinned(4)
    check(lib.cuStreamWaitValue32_v2(consumer, flag, 1, 0))   # enqueued first
    check(lib.cuStreamWriteValue32_v2(producer, flag, 1, 0))  # would release it
    about_to_block()
    check(lib.cuStreamSynchronize(producer))
    check(lib.cuStreamSynchronize(consumer))
    assert word(flag).value == 1
'''


def test_single_hardware_queue_deadlock_is_real(fake):
    """CUDA_DEVICE_MAX_CONNECTIONS=1: the wait enqueued first blocks the write behind it
    on another stream, for ever."""
    run_expecting_hang(fake, SERIALIZED_DEADLOCK, seconds=3, CUDA_DEVICE_MAX_CONNECTIONS="1")


def test_same_sequence_completes_with_a_queue_per_stream(fake):
    run_with_fake(fake, SERIALIZED_DEADLOCK, timeout=30)


def test_serialized_mode_runs_all_streams_in_global_enqueue_order(fake):
    run_with_fake(fake, '''
        s1, s2 = new_stream(), new_stream()
        a, b = pinned(8), pinned(8)
        buf(a, 8)[:] = b"abcdefgh"
        gate = lib.fake_gate_close(s1)
        check(lib.cuMemcpyAsync(b, a, 8, s2))  # another stream, but behind the gate
        t = in_thread(lib.cuStreamSynchronize, s2)
        assert_blocked(t)
        assert lib.fake_stream_pending(s2) == 1 and bytes(buf(b, 8)) == bytes(8)
        lib.fake_gate_open(gate)
        assert assert_finishes(t) == SUCCESS and bytes(buf(b, 8)) == b"abcdefgh"
        check(lib.cuStreamDestroy_v2(s1))  # the shared executor goes on
        check(lib.cuMemcpyAsync(a, b, 8, s2))
        check(lib.cuStreamSynchronize(s2))
    ''', CUDA_DEVICE_MAX_CONNECTIONS="1")


def test_event_query_synchronize_and_elapsed_time(fake):
    run_with_fake(fake, '''
        s = new_stream()
        start, end = new_event(), new_event(EVENT_BLOCKING_SYNC)
        untimed, never = new_event(EVENT_DISABLE_TIMING), new_event()
        assert C.events_blocking_sync == 1
        ms = c_float()
        assert lib.cuEventElapsedTime(byref(ms), start, never) == INVALID_HANDLE
        gate = lib.fake_gate_close(s)
        check(lib.cuEventRecord(start, s))
        lib.fake_set_delay_us(b"copy", 50000)
        a, b = pinned(8), pinned(8)
        check(lib.cuMemcpyAsync(b, a, 8, s))
        check(lib.cuEventRecord(end, s))
        check(lib.cuEventRecord(untimed, s))
        assert lib.cuEventQuery(start) == NOT_READY
        assert lib.cuEventElapsedTime(byref(ms), start, end) == NOT_READY
        t = in_thread(lib.cuEventSynchronize, end)
        assert_blocked(t)
        lib.fake_gate_open(gate)
        assert assert_finishes(t) == SUCCESS
        assert lib.cuEventQuery(start) == SUCCESS and lib.cuEventQuery(end) == SUCCESS
        check(lib.cuEventElapsedTime(byref(ms), start, end))
        assert ms.value >= 49.9, ms.value  # the copy slept 50 ms between the records
        assert lib.cuEventElapsedTime(byref(ms), start, untimed) == INVALID_HANDLE
        # only an event without BLOCKING_SYNC would spin a CPU core
        assert C.spin_waits == 0
        check(lib.cuEventSynchronize(untimed))
        check(lib.cuEventSynchronize(never))
        assert C.spin_waits == 2
        check(lib.cuEventDestroy_v2(start))
        assert lib.cuEventDestroy_v2(start) == INVALID_HANDLE
    ''')


def test_ctx_synchronize_stream_destroy_and_capturing(fake):
    run_with_fake(fake, '''
        s1, s2 = new_stream(priority=0), new_stream(priority=-5)
        assert C.streams_created == 2 and C.stream_priority == 1
        gate = lib.fake_gate_close(s2)
        t = in_thread(lib.cuCtxSynchronize)
        assert_blocked(t)
        lib.fake_gate_open(gate)
        assert assert_finishes(t) == SUCCESS and C.ctx_synchronize == 1
        a, b = pinned(8), pinned(8)
        buf(a, 8)[:] = b"destroy!"
        gate = lib.fake_gate_close(s1)
        check(lib.cuMemcpyAsync(b, a, 8, s1))
        t = in_thread(lib.cuStreamDestroy_v2, s1)  # drains first
        assert_blocked(t)
        lib.fake_gate_open(gate)
        assert assert_finishes(t) == SUCCESS and bytes(buf(b, 8)) == b"destroy!"
        status = c_int(7)
        check(lib.cuStreamIsCapturing(s2, byref(status)))
        assert status.value == 0
        lib.fake_set_capturing(s2, 1)
        check(lib.cuStreamIsCapturing(s2, byref(status)))
        assert status.value == 1 and C.stream_is_capturing_calls == 2
    ''')


def test_failure_injection_skips_then_fails_count_calls(fake):
    run_with_fake(fake, '''
        s = new_stream()
        e = new_event()
        assert lib.fake_fail(b"cuEventRecord", 1, 2) == 0
        results = [lib.cuEventRecord(e, s) for _ in range(4)]
        assert results == [SUCCESS, UNKNOWN, UNKNOWN, SUCCESS], results
        assert C.event_record == 2  # failed calls did nothing
        assert error_name(UNKNOWN) == "CUDA_ERROR_UNKNOWN"
        lib.fake_fail(b"cuMemcpyBatchAsync", 0, 1)
        a, b = pinned(8), pinned(8)
        dsts, srcs, sizes = (u64 * 1)(b), (u64 * 1)(a), (c_size_t * 1)(8)
        attr, idx, fail = MemcpyAttributes(srcAccessOrder=1), c_size_t(0), c_size_t(5)
        args = (dsts, srcs, sizes, 1, byref(attr), byref(idx), 1, byref(fail), s)
        # an error about no copy in particular: failIdx is SIZE_MAX (cuda.h)
        assert lib.cuMemcpyBatchAsync(*args) == UNKNOWN and fail.value == SIZE_MAX
        assert lib.cuMemcpyBatchAsync(*args) == SUCCESS and C.batch_calls == 1
        assert lib.fake_fail(b"cuNoSuchCall", 0, 1) == INVALID_VALUE
        names = {r: error_name(r) for r in (0, 1, 201, 400, 600, 999, 9999, 2)}
        assert names == {0: "CUDA_SUCCESS", 1: "CUDA_ERROR_INVALID_VALUE",
                         201: "CUDA_ERROR_INVALID_CONTEXT", 400: "CUDA_ERROR_INVALID_HANDLE",
                         600: "CUDA_ERROR_NOT_READY", 999: "CUDA_ERROR_UNKNOWN",
                         9999: "CUDA_ERROR_FAKE", 2: "CUDA_ERROR_FAKE"}, names
    ''')


def test_failure_injection_from_the_environment(fake):
    run_with_fake(fake, '''
        s = new_stream()
        host = ctypes.create_string_buffer(8192)
        addr = ctypes.addressof(host)
        assert lib.cuMemHostRegister_v2(addr, 8192, 0) == UNKNOWN
        check(lib.cuMemHostRegister_v2(addr, 8192, 0))
        flag = pinned(4)
        word(flag).value = 1
        check(lib.cuStreamWaitValue32_v2(s, flag, 1, 0))
        assert lib.cuStreamWaitValue32_v2(s, flag, 1, 0) == UNKNOWN
        check(lib.cuStreamWaitValue32_v2(s, flag, 1, 0))
        check(lib.cuStreamSynchronize(s))
        assert C.host_register == 1 and C.wait_value == 2
    ''', FAKE_CUDA_FAIL="cuMemHostRegister:0:1,cuStreamWaitValue32:1:1")


def test_legacy_failure_variables(fake):
    run_with_fake(fake, '''
        s = new_stream()
        a, b = pinned(8), pinned(8)
        e = new_event()
        assert lib.cuMemcpyAsync(b, a, 8, s) == SUCCESS
        r = lib.cuMemcpyAsync(b, a, 8, s)  # the second copy call fails, once
        assert error_name(r) == "CUDA_ERROR_FAKE", r
        assert lib.cuMemcpyAsync(b, a, 8, s) == SUCCESS
        assert lib.cuEventRecord(e, 0xBAD) == INVALID_HANDLE
        check(lib.cuEventRecord(e, s))
    ''', FAKE_CUDA_FAIL_COPY_AFTER="1", FAKE_CUDA_FAIL_RECORD_ON="0xBAD")


def test_pointer_memory_type_and_host_ranges(fake):
    run_with_fake(fake, '''
        MEMORY_TYPE, DEVICE_ORDINAL = 2, 9
        def mtype(p):
            out = c_uint(77)
            r = lib.cuPointerGetAttribute(byref(out), MEMORY_TYPE, p)
            return out.value if r == SUCCESS else ("error", r)
        pin = pinned(4096)
        assert mtype(pin) == 1 and mtype(pin + 4095) == 1  # CU_MEMORYTYPE_HOST
        host = ctypes.create_string_buffer(8192)
        addr = ctypes.addressof(host)
        assert mtype(addr) == ("error", INVALID_VALUE)  # pageable: unknown to the driver
        check(lib.cuMemHostRegister_v2(addr, 8192, 0))
        assert mtype(addr + 100) == 1 and C.host_register == 1
        assert lib.cuMemHostRegister_v2(addr + 16, 16, 0) == 712  # already registered
        check(lib.cuMemHostUnregister(addr))
        assert mtype(addr) == ("error", INVALID_VALUE) and C.host_unregister == 1
        assert lib.cuMemHostUnregister(addr) == 713  # not registered
        dev = u64()
        check(lib.cuMemAlloc_v2(byref(dev), 1024))
        assert mtype(dev.value) == 2  # CU_MEMORYTYPE_DEVICE
        ordinal = c_int(-1)
        check(lib.cuPointerGetAttribute(byref(ordinal), DEVICE_ORDINAL, addr))
        assert ordinal.value == 0
        mapped = u64()
        check(lib.cuMemHostGetDevicePointer_v2(byref(mapped), pin, 0))
        assert mapped.value == pin
        # copies with neither end page-locked would be synchronous on a real driver
        s = new_stream()
        other = ctypes.create_string_buffer(64)
        check(lib.cuMemcpyAsync(ctypes.addressof(other), addr, 64, s))
        check(lib.cuMemcpyAsync(pin, addr, 64, s))
        check(lib.cuMemcpyAsync(dev.value, pin, 64, s))
        check(lib.cuStreamSynchronize(s))
        assert C.pageable_copies == 1
        check(lib.cuMemFree_v2(dev.value))
        assert mtype(dev.value) == ("error", INVALID_VALUE)
        assert lib.cuMemFree_v2(dev.value) == INVALID_VALUE
        check(lib.cuMemFreeHost(pin))
        assert C.host_alloc == 1
    ''')


def test_device_queries(fake):
    run_with_fake(fake, '''
        n, d, v = c_int(), c_int(), c_int()
        check(lib.cuDeviceGetCount(byref(n)))
        assert n.value == 2
        check(lib.cuDeviceGet(byref(d), 1))
        assert d.value == 1 and lib.cuDeviceGet(byref(d), 2) == 101
        attrs = {92: 0, 93: 0, 94: 0, 122: 1, 123: 1, 75: 9, 76: 0, 16: 132, 33: 0x1b,
                 34: 0, 50: 0, 134: 0, 1: 0}
        for attr, want in attrs.items():
            check(lib.cuDeviceGetAttribute(byref(v), attr, 0))
            assert v.value == want, (attr, v.value)
        name = ctypes.create_string_buffer(64)
        check(lib.cuDeviceGetName(name, 64, 0))
        assert name.value == b"Fake NVIDIA H100 80GB HBM3"
        check(lib.cuDeviceGetPCIBusId(name, 64, 0))
        assert name.value == b"0000:1B:00.0"
        mem = c_size_t()
        check(lib.cuDeviceTotalMem_v2(byref(mem), 0))
        assert mem.value == 80 << 30
        least, greatest = c_int(), c_int()
        check(lib.cuCtxGetStreamPriorityRange(byref(least), byref(greatest)))
        assert (least.value, greatest.value) == (0, -5)
        ver = c_int()
        check(lib.cuDriverGetVersion(byref(ver)))
        assert ver.value == 12080
        def no_ctx():
            p = c_void_p()
            return lib.cuMemHostAlloc(byref(p), 16, 0)
        t = threading.Thread(target=lambda: setattr(t, "r", no_ctx()))
        t.start()
        t.join(10)
        assert t.r == INVALID_CONTEXT and C.no_context_errors == 1  # context is per thread
    ''', FAKE_CUDA_DEVICE_COUNT="2")


def test_proc_address_versions_and_flags(fake):
    run_with_fake(fake, '''
        def proc(name, version, flags=0):
            fn, status = c_void_p(), c_int(-1)
            r = lib.cuGetProcAddress_v2(name.encode(), byref(fn), version, flags, byref(status))
            return fn.value if r == SUCCESS else None
        # below 11070 the v1 memory operations: a stub kvswitch must never get
        assert proc("cuStreamWaitValue32", 11060) == sym("fake_stub_cuStreamMemOp_v1")
        assert C.proc_stub_resolutions == 1
        assert proc("cuStreamWaitValue32", 11070) == sym("cuStreamWaitValue32_v2")
        assert proc("cuStreamWriteValue32", 12000) == sym("cuStreamWriteValue32_v2")
        assert proc("cuMemcpyBatchAsync", 12070) is None
        assert proc("cuMemcpyBatchAsync", 12080) == sym("cuMemcpyBatchAsync")
        for base, export in [("cuMemAlloc", "cuMemAlloc_v2"), ("cuMemFree", "cuMemFree_v2"),
                             ("cuDeviceTotalMem", "cuDeviceTotalMem_v2"),
                             ("cuStreamDestroy", "cuStreamDestroy_v2"),
                             ("cuCtxSynchronize", "cuCtxSynchronize"),
                             ("cuStreamCreate", "cuStreamCreate"),
                             ("cuStreamIsCapturing", "cuStreamIsCapturing"),
                             ("cuDeviceGetName", "cuDeviceGetName"),
                             ("cuDeviceGetPCIBusId", "cuDeviceGetPCIBusId")]:
            assert proc(base, 12000) == sym(export), base
        assert proc("cuNoSuchFunction", 12080) is None
        lib.fake_reset_counters()
        proc("cuInit", 12000, 1)
        proc("cuInit", 12000, 0)
        proc("cuInit", 12000, 2)
        assert (C.proc_legacy_flag, C.proc_other_flag) == (1, 2)
        lib.fake_reset_counters()
        assert all(getattr(C, n) == 0 for n in COUNTER_NAMES)
    ''')


@pytest.mark.parametrize("env", [{"FAKE_CUDA_NO_BATCH": "1"},
                                 {"FAKE_CUDA_DRIVER_VERSION": "12060"}])
def test_older_driver_has_no_batch_copy(fake, env):
    run_with_fake(fake, '''
        ver = c_int()
        check(lib.cuDriverGetVersion(byref(ver)))
        assert ver.value in (12040, 12060), ver.value
        fn, status = c_void_p(), c_int()
        r = lib.cuGetProcAddress_v2(b"cuMemcpyBatchAsync", byref(fn), 12080, 0, byref(status))
        assert r == NOT_FOUND and fn.value is None
    ''', **env)


@pytest.mark.parametrize("serialized", [False, True])
def test_exit_with_blocked_streams_neither_hangs_nor_crashes(fake, serialized):
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if serialized else {}
    run_with_fake(fake, '''
        s1, s2 = new_stream(), new_stream()
        a, b, flag = pinned(64), pinned(64), pinned(4)
        lib.fake_gate_close(s1)
        check(lib.cuMemcpyAsync(b, a, 64, s1))
        check(lib.cuStreamWaitValue32_v2(s2, flag, 1, 0))  # never written
        e = new_event()
        check(lib.cuEventRecord(e, s1))
        t = in_thread(lib.cuEventSynchronize, e)  # a thread blocked in the driver at exit
        assert_blocked(t, 0.1)
    ''', timeout=30, **env)


def test_many_threads_many_streams(fake):
    """Thread safety: 4 threads, each a stream chained on the previous thread's events."""
    run_with_fake(fake, '''
        N, ROUNDS = 4, 50
        data = [pinned(64) for _ in range(N + 1)]
        buf(data[0], 64)[:] = bytes(range(64))
        events = [[new_event(EVENT_DISABLE_TIMING) for _ in range(ROUNDS)] for _ in range(N)]
        streams = [new_stream() for _ in range(N)]
        recorded = [threading.Event() for _ in range(N)]
        errors = []
        def worker(i):
            try:
                use_context()
                if i:
                    recorded[i - 1].wait(30)
                for r in range(ROUNDS):
                    if i:
                        check(lib.cuStreamWaitEvent(streams[i], events[i - 1][r], 0))
                    check(lib.cuMemcpyAsync(data[i + 1], data[i], 64, streams[i]))
                    check(lib.cuEventRecord(events[i][r], streams[i]))
                recorded[i].set()
                check(lib.cuStreamSynchronize(streams[i]))
            except Exception as exc:
                errors.append(exc)
        ts = [threading.Thread(target=worker, args=(i,)) for i in range(N)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not errors and not any(t.is_alive() for t in ts), errors
        assert bytes(buf(data[N], 64)) == bytes(range(64))
        assert C.memcpy_async == N * ROUNDS and C.event_record == N * ROUNDS
    ''')


# -- issue 22: fidelity of the fake (each case fails on a fake without that behaviour) ------

def test_proc_address_resolves_each_abi_by_the_version_asked_for(fake):
    """cuMemcpyBatchAsync has two ABIs: 12.8/12.9 (with failIdx) for versions in [12080,
    13000), 13.0's 8-argument one from 13000. A driver answers the newer one to a request
    at 13000 without complaint, so the fake answers a stub (counted, aborts if called)."""
    run_with_fake(fake, '''
        def proc(name, version):
            fn, status = c_void_p(), c_int(-1)
            r = lib.cuGetProcAddress_v2(name.encode(), byref(fn), version, 1, byref(status))
            return (fn.value, status.value) if r == SUCCESS else (None, status.value)
        v1 = sym("cuMemcpyBatchAsync")
        assert proc("cuMemcpyBatchAsync", 12080) == (v1, 0)
        assert proc("cuMemcpyBatchAsync", 12090) == (v1, 0)
        assert C.proc_stub_resolutions == 0
        assert proc("cuMemcpyBatchAsync", 13000) == (sym("fake_stub_cuMemcpyBatchAsync_v2"), 0)
        assert proc("cuMemcpyBatchAsync", 13010)[0] == sym("fake_stub_cuMemcpyBatchAsync_v2")
        assert C.proc_stub_resolutions == 2
        assert proc("cuMemcpyBatchAsync", 13020)[1] == 2  # above the driver: not sufficient
        assert proc("cuThreadExchangeStreamCaptureMode", 11000)[0] == sym(
            "cuThreadExchangeStreamCaptureMode")
        assert proc_requests()[-2:] == [("cuMemcpyBatchAsync", 13020),
                                        ("cuThreadExchangeStreamCaptureMode", 11000)]
    ''', FAKE_CUDA_DRIVER_VERSION="13010")


def test_the_13_0_batch_abi_stub_stops_the_process_loudly(fake):
    r = subprocess.run([sys.executable, "-c", PRELUDE_CTYPES + textwrap.dedent('''
        fn, status = c_void_p(), c_int()
        check(lib.cuGetProcAddress_v2(b"cuMemcpyBatchAsync", byref(fn), 13000, 1, byref(status)))
        ctypes.CFUNCTYPE(c_int)(fn.value)()
    ''')], env=fake_env(fake, FAKE_CUDA_DRIVER_VERSION="13000"), capture_output=True,
        text=True, timeout=60)
    assert r.returncode != 0 and "ABI (8 arguments, no failIdx)" in r.stderr, r.stderr


@pytest.mark.parametrize("api", ["memcpy", "2d", "batch"])
def test_pageable_copies_are_synchronous_inside_the_call(fake, api):
    """Neither end page-locked: the call drains the stream's earlier work and runs the copy
    before it returns (a GPU stages it through a bounce buffer); a pinned copy returns
    while its stream is still gated."""
    run_with_fake(fake, f'''
        s = new_stream()
        a, b = ctypes.create_string_buffer(b"p" * 64, 64), ctypes.create_string_buffer(64)
        src, dst = ctypes.addressof(a), ctypes.addressof(b)
        def copy(dst, src):
            if "{api}" == "memcpy":
                return lib.cuMemcpyAsync(dst, src, 64, s)
            if "{api}" == "2d":
                m = Memcpy2D(srcMemoryType=4, srcDevice=src, srcPitch=64, dstMemoryType=4,
                             dstDevice=dst, dstPitch=64, WidthInBytes=64, Height=1)
                return lib.cuMemcpy2DAsync_v2(byref(m), s)
            attr, idx, fail = MemcpyAttributes(srcAccessOrder=1), c_size_t(0), c_size_t(0)
            return lib.cuMemcpyBatchAsync((u64 * 1)(dst), (u64 * 1)(src), (c_size_t * 1)(64),
                                          1, byref(attr), byref(idx), 1, byref(fail), s)
        gate = lib.fake_gate_close(s)
        t = in_thread(copy, dst, src)
        assert_blocked(t)  # waits for the gate ahead of it on the stream
        assert b.raw == bytes(64)
        lib.fake_gate_open(gate)
        assert assert_finishes(t) == SUCCESS
        assert b.raw == b"p" * 64  # copied when the call returned
        assert C.pageable_sync_calls == 1 and C.pageable_copies == 1
        pin = pinned(64)
        gate = lib.fake_gate_close(s)
        check(copy(pin, src))  # one end page-locked: asynchronous
        assert bytes(buf(pin, 64)) == bytes(64) and C.pageable_sync_calls == 1
        lib.fake_gate_open(gate)
        check(lib.cuStreamSynchronize(s))
        assert bytes(buf(pin, 64)) == b"p" * 64
    ''')


def test_a_global_capture_prohibits_unsafe_calls_in_global_mode_threads(fake):
    """cuda.h (cuThreadExchangeStreamCaptureMode): while a thread captures in GLOBAL mode,
    another thread in GLOBAL mode may not make a potentially unsafe call (it fails with
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and the capture is invalidated); one in RELAXED
    or THREAD_LOCAL mode may. Work enqueued on the capturing stream is not run."""
    run_with_fake(fake, '''
        cap, other = new_stream(), new_stream()
        e = new_event()
        check(lib.cuEventRecord(e, other))
        check(lib.cuStreamSynchronize(other))  # e complete: its queries answer SUCCESS
        a, b = pinned(16), pinned(16)
        buf(a, 16)[:] = b"c" * 16
        def unsafe_calls():  # each a "potentially unsafe" call
            return [lib.cuEventQuery(e), lib.cuEventSynchronize(e),
                    lib.cuStreamSynchronize(other)]
        for mode in (MODE_RELAXED, MODE_THREAD_LOCAL):
            check(lib.cuStreamBeginCapture_v2(cap, MODE_GLOBAL))
            t = in_thread(lambda m=mode: (capture_mode(m), unsafe_calls())[1])
            assert assert_finishes(t) == [SUCCESS] * 3, (mode, t.result)
            status = c_int()
            check(lib.cuStreamIsCapturing(cap, byref(status)))
            assert status.value == 1  # still active
            assert end_capture(cap)[0] == SUCCESS
        check(lib.cuStreamBeginCapture_v2(cap, MODE_GLOBAL))
        check(lib.cuMemcpyAsync(b, a, 16, cap))  # into the graph: not run
        t = in_thread(unsafe_calls)  # a new thread starts in GLOBAL mode
        assert assert_finishes(t) == [CAPTURE_UNSUPPORTED] * 3, t.result
        status = c_int()
        check(lib.cuStreamIsCapturing(cap, byref(status)))
        assert status.value == 2  # invalidated
        assert end_capture(cap) == (CAPTURE_INVALIDATED, None)
        assert C.capture_violations == 3 and C.captured_ops == 1
        check(lib.cuStreamSynchronize(cap))
        assert bytes(buf(b, 16)) == bytes(16)
        # the capturing thread itself, and an event recorded inside the capture
        check(lib.cuStreamBeginCapture_v2(cap, MODE_THREAD_LOCAL))
        assert lib.cuStreamSynchronize(other) == CAPTURE_UNSUPPORTED
        assert end_capture(cap)[0] == CAPTURE_INVALIDATED
        check(lib.cuStreamBeginCapture_v2(cap, MODE_RELAXED))
        captured = new_event()
        check(lib.cuEventRecord(captured, cap))
        assert lib.cuStreamSynchronize(other) == SUCCESS  # a relaxed capture allows it
        assert lib.cuEventQuery(captured) == CAPTURED_EVENT  # even in relaxed mode
        r, graph = end_capture(cap)
        assert r == SUCCESS and graph
        assert capture_mode(MODE_GLOBAL) == MODE_GLOBAL  # this thread's mode unchanged
    ''')


def test_a_fault_is_sticky_until_the_context_is_reset(fake):
    """A copy that faults when it executes (an illegal address) leaves every later call
    that uses the context failing with that error, blocked waits included, until
    cuDevicePrimaryCtxReset; calls that do not use it keep working."""
    run_with_fake(fake, '''
        s = new_stream()
        a, b, c = pinned(16), pinned(16), pinned(16)
        buf(a, 16)[:] = b"f" * 16
        e = new_event(EVENT_BLOCKING_SYNC)
        lib.fake_fault_copy(1, ILLEGAL_ADDRESS)  # the second copy to execute faults
        gate = lib.fake_gate_close(s)
        check(lib.cuMemcpyAsync(b, a, 16, s))
        check(lib.cuMemcpyAsync(c, a, 16, s))  # enqueued fine: the fault shows later
        check(lib.cuEventRecord(e, s))
        t = in_thread(lib.cuEventSynchronize, e)
        assert_blocked(t)
        lib.fake_gate_open(gate)
        assert assert_finishes(t) == ILLEGAL_ADDRESS  # a blocked wait returns the error
        assert bytes(buf(b, 16)) == b"f" * 16 and bytes(buf(c, 16)) == bytes(16)
        for _ in range(2):  # every call, not once
            assert lib.cuEventQuery(e) == ILLEGAL_ADDRESS
            assert lib.cuStreamSynchronize(s) == ILLEGAL_ADDRESS
            assert lib.cuMemcpyAsync(c, a, 16, s) == ILLEGAL_ADDRESS
            assert lib.cuEventRecord(e, s) == ILLEGAL_ADDRESS
            assert lib.cuStreamCreate(byref(c_void_p()), 0) == ILLEGAL_ADDRESS
        assert error_name(ILLEGAL_ADDRESS) == "CUDA_ERROR_ILLEGAL_ADDRESS"
        n = c_int()
        check(lib.cuDeviceGetCount(byref(n)))  # no context used
        assert C.sticky_refusals >= 10
        check(lib.cuDevicePrimaryCtxReset_v2(0))
        check(lib.cuStreamSynchronize(s))
        check(lib.cuMemcpyAsync(c, a, 16, s))
        check(lib.cuStreamSynchronize(s))
        assert bytes(buf(c, 16)) == b"f" * 16
    ''')


def test_batch_fail_idx_names_the_copy_or_none(fake):
    run_with_fake(fake, '''
        s = new_stream()
        a, b = pinned(64), pinned(64)
        attr, idx, fail = MemcpyAttributes(srcAccessOrder=1), c_size_t(0), c_size_t(7)
        def batch(dsts, n=3):
            return lib.cuMemcpyBatchAsync((u64 * n)(*dsts), (u64 * n)(a, a + 16, a + 32),
                                          (c_size_t * n)(16, 16, 16), n, byref(attr),
                                          byref(idx), 1, byref(fail), s)
        assert batch([b, 0, b + 32]) == INVALID_VALUE and fail.value == 1  # that copy
        assert batch([b, b + 16, b + 32]) == SUCCESS
        lib.fake_fail(b"cuMemcpyBatchAsync", 0, 1)
        assert batch([b, b + 16, b + 32]) == UNKNOWN and fail.value == SIZE_MAX  # no copy
        assert lib.cuMemcpyBatchAsync((u64 * 1)(b), (u64 * 1)(a), (c_size_t * 1)(16), 1,
                                      byref(attr), byref(idx), 1, byref(fail),
                                      None) == INVALID_VALUE  # the legacy NULL stream
        assert fail.value == SIZE_MAX
    ''')
