"""Build and drive the fake libcuda.so.1 (tests/fake_cuda/fake_cuda.cpp) from tests.

The fake is an asynchronous driver model (see the header comment of fake_cuda.cpp): it is
loaded by the dynamic linker in place of the real driver, so every test that uses it runs
its body in a subprocess whose LD_LIBRARY_PATH points at the folder build_fake_driver()
returns. Tests take that folder from the session fixture ``fake`` (tests/conftest.py:
built once, skipped without a C++ compiler). Typical use::

    from _fake_cuda import run_with_fake

    def test_copy(fake):
        run_with_fake(fake, '''
            s = new_stream()
            src, dst = pinned(64), pinned(64)
            buf(src, 64)[:] = bytes(range(64))
            check(lib.cuMemcpyAsync(dst, src, 64, s), "copy")
            check(lib.cuStreamSynchronize(s))
            assert bytes(buf(dst, 64)) == bytes(range(64))
        ''')

run_with_fake() prepends PRELUDE_CTYPES (ctypes signatures for the fake_* control API and
the cu* functions, the Counters struct as `C`, small helpers, a current context on the
main thread) and appends a print of the FAKE-OK marker; it fails the test on a non-zero
exit, a missing marker, or a timeout. Nothing here imports kvswitch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

SOURCE = Path(__file__).parent / "fake_cuda" / "fake_cuda.cpp"
CXX = shutil.which("c++") or shutil.which("g++")
MARKER = "FAKE-OK"
BLOCK_MARKER = "FAKE-BLOCKING"  # printed by about_to_block() in PRELUDE_CTYPES

# Field order of `struct Counters` in fake_cuda.cpp (the first 14 are the old fake's).
COUNTER_NAMES = [
    "memcpy_async", "memcpy_2d", "batch_calls", "batch_copies", "host_alloc",
    "streams_created", "stream_priority", "wait_value", "write_value", "wait_event",
    "event_record", "ctx_retain", "ctx_release", "no_context_errors",
    "spin_waits", "stale_flag_waits", "pageable_copies", "host_register", "host_unregister",
    "proc_legacy_flag", "proc_other_flag", "ctx_synchronize", "batch_prefer_overlap",
    "events_blocking_sync", "stream_is_capturing_calls", "stale_flag_writes",
    "memcpy_2d_dtod", "batch_dtod_copies",
    "captured_ops", "capture_violations", "proc_stub_resolutions", "sticky_refusals",
    "pageable_sync_calls",
]

# Environment variables that change the fake's behaviour: not inherited by run_with_fake's
# subprocess unless passed explicitly.
_FAKE_ENV = ("CUDA_DEVICE_MAX_CONNECTIONS", "FAKE_CUDA_")


def build_fake_driver(out_dir: Path) -> Path:
    """Compiles the fake into out_dir/libcuda.so.1 and returns out_dir."""
    if CXX is None:
        raise RuntimeError("no C++ compiler (c++ or g++) to build the fake CUDA driver")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", "-o",
           str(out_dir / "libcuda.so.1"), str(SOURCE)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building the fake CUDA driver failed: {' '.join(cmd)}\n{r.stderr}")
    return out_dir


PRELUDE_CTYPES = textwrap.dedent('''
    import ctypes, os, sys, threading, time
    from ctypes import POINTER, byref, c_char_p, c_float, c_int, c_long, c_size_t, c_uint
    from ctypes import c_uint32, c_ulonglong, c_void_p
    COUNTER_NAMES = __COUNTER_NAMES__

    class Counters(ctypes.Structure):
        _fields_ = [(n, c_long) for n in COUNTER_NAMES]

    class Memcpy2D(ctypes.Structure):  # CUDA_MEMCPY2D_v2
        _fields_ = [("srcXInBytes", c_size_t), ("srcY", c_size_t), ("srcMemoryType", c_int),
                    ("srcHost", c_void_p), ("srcDevice", c_ulonglong), ("srcArray", c_void_p),
                    ("srcPitch", c_size_t), ("dstXInBytes", c_size_t), ("dstY", c_size_t),
                    ("dstMemoryType", c_int), ("dstHost", c_void_p),
                    ("dstDevice", c_ulonglong), ("dstArray", c_void_p), ("dstPitch", c_size_t),
                    ("WidthInBytes", c_size_t), ("Height", c_size_t)]

    class MemLocation(ctypes.Structure):
        _fields_ = [("type", c_int), ("id", c_int)]

    class MemcpyAttributes(ctypes.Structure):  # CUmemcpyAttributes (CUDA 12.8)
        _fields_ = [("srcAccessOrder", c_int), ("srcLocHint", MemLocation),
                    ("dstLocHint", MemLocation), ("flags", c_uint)]

    lib = ctypes.CDLL("libcuda.so.1")
    u64, H = c_ulonglong, c_void_p  # H: a stream/event/context handle (any int, 0 = NULL)
    _SIGS = {
        # control API
        "fake_counters": (POINTER(Counters),),
        "fake_reset_counters": (None,),
        "fake_set_delay_us": (None, c_char_p, c_long),
        "fake_gate_close": (c_long, u64),
        "fake_gate_open": (None, c_long),
        "fake_stream_pending": (c_long, u64),
        "fake_consumer_copy": (c_int, u64, u64, u64, c_size_t),
        "fake_set_capturing": (None, u64, c_int),
        "fake_pending_waits_satisfied": (c_int, u64),
        "fake_fail": (c_int, c_char_p, c_long, c_long),
        "fake_fault_copy": (None, c_long, c_int),
        "fake_proc_requests": (c_long, c_char_p, c_long),
        # driver API
        "cuInit": (c_int, c_uint),
        "cuDriverGetVersion": (c_int, POINTER(c_int)),
        "cuGetErrorName": (c_int, c_int, POINTER(c_char_p)),
        "cuGetErrorString": (c_int, c_int, POINTER(c_char_p)),
        "cuGetProcAddress_v2": (c_int, c_char_p, POINTER(c_void_p), c_int, u64, POINTER(c_int)),
        "cuDeviceGetCount": (c_int, POINTER(c_int)),
        "cuDeviceGet": (c_int, POINTER(c_int), c_int),
        "cuDeviceGetAttribute": (c_int, POINTER(c_int), c_int, c_int),
        "cuDeviceGetName": (c_int, c_char_p, c_int, c_int),
        "cuDeviceGetPCIBusId": (c_int, c_char_p, c_int, c_int),
        "cuDeviceTotalMem_v2": (c_int, POINTER(c_size_t), c_int),
        "cuDevicePrimaryCtxRetain": (c_int, POINTER(c_void_p), c_int),
        "cuDevicePrimaryCtxRelease_v2": (c_int, c_int),
        "cuDevicePrimaryCtxReset_v2": (c_int, c_int),
        "cuThreadExchangeStreamCaptureMode": (c_int, POINTER(c_int)),
        "cuStreamBeginCapture_v2": (c_int, H, c_int),
        "cuStreamEndCapture": (c_int, H, POINTER(c_void_p)),
        "cuCtxSetCurrent": (c_int, H),
        "cuCtxGetCurrent": (c_int, POINTER(c_void_p)),
        "cuCtxGetStreamPriorityRange": (c_int, POINTER(c_int), POINTER(c_int)),
        "cuCtxSynchronize": (c_int,),
        "cuStreamCreate": (c_int, POINTER(c_void_p), c_uint),
        "cuStreamCreateWithPriority": (c_int, POINTER(c_void_p), c_uint, c_int),
        "cuStreamDestroy_v2": (c_int, H),
        "cuStreamSynchronize": (c_int, H),
        "cuStreamIsCapturing": (c_int, H, POINTER(c_int)),
        "cuStreamWaitEvent": (c_int, H, H, c_uint),
        "cuStreamWaitValue32_v2": (c_int, H, u64, c_uint32, c_uint),
        "cuStreamWriteValue32_v2": (c_int, H, u64, c_uint32, c_uint),
        "cuEventCreate": (c_int, POINTER(c_void_p), c_uint),
        "cuEventDestroy_v2": (c_int, H),
        "cuEventRecord": (c_int, H, H),
        "cuEventQuery": (c_int, H),
        "cuEventSynchronize": (c_int, H),
        "cuEventElapsedTime": (c_int, POINTER(c_float), H, H),
        "cuMemcpy": (c_int, u64, u64, c_size_t),
        "cuMemcpyAsync": (c_int, u64, u64, c_size_t, H),
        "cuMemcpy2DAsync_v2": (c_int, POINTER(Memcpy2D), H),
        "cuMemcpyBatchAsync": (c_int, POINTER(u64), POINTER(u64), POINTER(c_size_t), c_size_t,
                               POINTER(MemcpyAttributes), POINTER(c_size_t), c_size_t,
                               POINTER(c_size_t), H),
        "cuMemHostAlloc": (c_int, POINTER(c_void_p), c_size_t, c_uint),
        "cuMemFreeHost": (c_int, H),
        "cuMemHostRegister_v2": (c_int, H, c_size_t, c_uint),
        "cuMemHostUnregister": (c_int, H),
        "cuMemHostGetDevicePointer_v2": (c_int, POINTER(u64), H, c_uint),
        "cuMemAlloc_v2": (c_int, POINTER(u64), c_size_t),
        "cuMemFree_v2": (c_int, u64),
        "cuPointerGetAttribute": (c_int, c_void_p, c_int, u64),
    }
    for _name, (_res, *_args) in _SIGS.items():
        _f = getattr(lib, _name)
        _f.restype, _f.argtypes = _res, _args
    C = lib.fake_counters().contents

    SUCCESS, INVALID_VALUE, INVALID_CONTEXT, INVALID_HANDLE = 0, 1, 201, 400
    NOT_FOUND, NOT_READY, ILLEGAL_ADDRESS, UNKNOWN = 500, 600, 700, 999
    CAPTURE_UNSUPPORTED, CAPTURE_INVALIDATED, CAPTURED_EVENT = 900, 901, 907
    EVENT_BLOCKING_SYNC, EVENT_DISABLE_TIMING = 0x1, 0x2
    MODE_GLOBAL, MODE_THREAD_LOCAL, MODE_RELAXED = 0, 1, 2  # CUstreamCaptureMode
    SIZE_MAX = 2**64 - 1

    def check(r, what="driver call"):
        if r != SUCCESS:
            raise RuntimeError(f"{what}: CUresult {r} ({error_name(r)})")

    def error_name(r):
        s = c_char_p()
        lib.cuGetErrorName(r, byref(s))
        return s.value.decode() if s.value else None

    def use_context():
        """Retains device 0's primary context and makes it current on this thread."""
        ctx = c_void_p()
        check(lib.cuDevicePrimaryCtxRetain(byref(ctx), 0), "cuDevicePrimaryCtxRetain")
        check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        return ctx.value

    def new_stream(priority=None):
        s = c_void_p()
        if priority is None:
            check(lib.cuStreamCreate(byref(s), 0), "cuStreamCreate")
        else:
            check(lib.cuStreamCreateWithPriority(byref(s), 1, priority), "cuStreamCreate")
        return s.value

    def new_event(flags=0):
        e = c_void_p()
        check(lib.cuEventCreate(byref(e), flags), "cuEventCreate")
        return e.value

    def pinned(n):
        """Zeroed page-locked host memory (cuMemHostAlloc); returns its address."""
        p = c_void_p()
        check(lib.cuMemHostAlloc(byref(p), n, 0), "cuMemHostAlloc")
        ctypes.memset(p.value, 0, n)
        return p.value

    def buf(addr, n):
        """The n bytes at addr as a writable ctypes array (bytes(buf(...)) to compare)."""
        return (ctypes.c_ubyte * n).from_address(addr)

    def word(addr):
        """The 32-bit word at addr; .value reads or writes it from the host."""
        return c_uint32.from_address(addr)

    def sym(name):
        """Address of an exported symbol of the fake (what dlsym returns)."""
        return ctypes.cast(getattr(lib, name), c_void_p).value

    def in_thread(fn, *args):
        """Runs fn(*args) on a daemon thread with the context current; returns the thread,
        whose .result is fn's return value once it ends."""
        def body():
            use_context()
            t.result = fn(*args)
        t = threading.Thread(target=body, daemon=True)
        t.result = None
        t.start()
        return t

    def assert_blocked(t, seconds=0.3):
        """t has not finished after `seconds` (it is blocked on a gate or a wait)."""
        t.join(seconds)
        assert t.is_alive(), "expected the call to block"

    def assert_finishes(t, seconds=20):
        t.join(seconds)
        assert not t.is_alive(), "the call did not finish"
        return t.result

    def capture_mode(mode):
        """Sets this thread's capture interaction mode; returns the previous one."""
        m = c_int(mode)
        check(lib.cuThreadExchangeStreamCaptureMode(byref(m)), "cuThreadExchangeStreamCaptureMode")
        return m.value

    def end_capture(stream):
        """(CUresult, graph handle or None) of cuStreamEndCapture."""
        g = c_void_p()
        r = lib.cuStreamEndCapture(stream, byref(g))
        return r, g.value

    def proc_requests():
        """The cuGetProcAddress requests so far as (name, version) pairs, in call order."""
        n = lib.fake_proc_requests(None, 0)
        b = ctypes.create_string_buffer(n + 1)
        lib.fake_proc_requests(b, n + 1)
        return [(x.split("@")[0], int(x.split("@")[1]))
                for x in b.value.decode().split("\\n") if x]

    def about_to_block():
        """For run_expecting_hang: the next call is the one that must hang."""
        print("FAKE-BLOCKING", flush=True)

    CTX = use_context()
''').replace("__COUNTER_NAMES__", repr(COUNTER_NAMES))


def fake_env(fake_dir: Path, **env: str) -> dict[str, str]:
    """The environment of a subprocess that loads the fake: this one's, without the
    variables that change the fake, with LD_LIBRARY_PATH pointing at it, plus `env`."""
    return _env(fake_dir, env)


def _env(fake_dir: Path, env: dict[str, str]) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(_FAKE_ENV)}
    ld = e.get("LD_LIBRARY_PATH")
    e["LD_LIBRARY_PATH"] = str(fake_dir) + (os.pathsep + ld if ld else "")
    e.update(env)
    return e


def _script(code: str, prelude: str) -> str:
    return prelude + "\n" + textwrap.dedent(code) + f"\nprint({MARKER!r}, flush=True)\n"


def run_with_fake(fake_dir: Path, code: str, timeout: float = 60, *,
                  prelude: str = PRELUDE_CTYPES, **env: str) -> subprocess.CompletedProcess:
    """Runs `python -c prelude+code` against the fake with extra environment `env`.

    Fails the calling test on a non-zero exit, a missing FAKE-OK marker (printed after
    `code`) or a timeout (a hang fails the test instead of stalling CI). Variables that
    change the fake (CUDA_DEVICE_MAX_CONNECTIONS, FAKE_CUDA_*) are not inherited.
    """
    try:
        r = subprocess.run([sys.executable, "-c", _script(code, prelude)],
                           env=_env(fake_dir, env), capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout} s (a hang?)\n{_text(e.stdout)}{_text(e.stderr)}")
    if r.returncode != 0 or MARKER not in r.stdout:
        pytest.fail(f"exit status {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def run_expecting_hang(fake_dir: Path, code: str, seconds: float = 3, *,
                       prelude: str = PRELUDE_CTYPES, **env: str) -> None:
    """Fails the calling test unless `code` reaches about_to_block() (which prints
    BLOCK_MARKER) within 60 s and is then still running `seconds` later; it is then
    killed. For a deadlock that must be real in the fake: counting from the marker keeps
    a slow interpreter start from passing for a hang."""
    p = subprocess.Popen([sys.executable, "-c", _script(code, prelude)],
                         env=_env(fake_dir, env), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reached = threading.Event()

    def read() -> None:
        for line in p.stdout:
            lines.append(line)
            if line.strip() == BLOCK_MARKER:
                reached.set()
        reached.set()  # EOF: the process ended

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        reached.wait(60)
        if BLOCK_MARKER not in (line.strip() for line in list(lines)):
            pytest.fail("never reached about_to_block()\n" + "".join(lines))
        try:
            p.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return  # still blocked: the hang is real
        reader.join(5)
        pytest.fail(f"expected a hang, but it ended (status {p.returncode})\n" + "".join(lines))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b if isinstance(b, str) else b.decode(errors="replace")
