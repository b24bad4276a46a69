"""Regression tests for the red-team input-check findings 1, 2, 3, 13, 14 and 16.

Each test names its finding and repro (../shared/redteam/repro_N.py at the time of the
red-team run, against kvswitch 0.1.0).
"""

from __future__ import annotations

import ctypes
import gc
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvswitch import (
    AsyncSwapEngine,
    BlockGroupAllocator,
    HostKVPool,
    KVLayout,
    KVRegion,
    OutOfBlocksError,
    _core,
)
from kvswitch._validate import as_count


def region_bytes(layout: KVLayout) -> bytes:
    r = layout.regions[0]
    return ctypes.string_at(r.base, r.nbytes)


def swap_in_all(layout: KVLayout, fill: int) -> None:
    """Host pool filled with `fill`, then every host block copied into `layout`."""
    host = HostKVPool(layout, layout.num_blocks)
    for a in host.arrays:
        a.view(np.uint8)[...] = fill
    with AsyncSwapEngine(layout, host, num_workers=0) as e:
        e.swap_in([[0, 0, layout.num_blocks]]).wait()


class DLPackOnly:
    """A producer with only the DLPack protocol (like a JAX array)."""

    def __init__(self, a: np.ndarray):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def read_only(shape=(4, 16)) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    a.flags.writeable = False
    return a


# ------------------------------------------------------------------------------ finding 1
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: bytes(64), id="bytes"),
        pytest.param(lambda: memoryview(read_only()), id="memoryview-ro"),
        pytest.param(lambda: memoryview(bytearray(64)).toreadonly(), id="toreadonly"),
        pytest.param(lambda: DLPackOnly(read_only()), id="dlpack-ro"),
        pytest.param(lambda: read_only().__dlpack__(max_version=(1, 0)), id="capsule-ro"),
        pytest.param(lambda: read_only(), id="numpy-ro"),
    ],
)
@pytest.mark.parametrize("position", [0, 1])
def test_read_only_memory_is_rejected(make, position):
    """Red-team finding 1 (repro_1): read-only memory is rejected on every input route,
    naming the tensor, and its bytes are never written."""
    obj = make()
    writable = np.zeros((4, 16), np.uint8)
    tensors = [obj, writable] if position == 0 else [writable, obj]
    with pytest.raises(ValueError, match=rf"tensor {position}: .*read-only.*must be writable"):
        KVLayout.from_tensors(tensors)
    if isinstance(obj, (bytes, memoryview)):
        assert bytes(obj) == bytes(64)


def test_read_only_memory_is_rejected_by_from_vllm_and_cross_layer():
    """Red-team finding 1 (repro_1): the other constructors reject read-only memory too."""
    ro = read_only((2, 4, 16, 1, 1))
    with pytest.raises(ValueError, match="layer 0 K: .*read-only"):
        KVLayout.from_vllm([DLPackOnly(ro)])
    with pytest.raises(ValueError, match="cross-layer tensor: .*read-only"):
        KVLayout.cross_layer(memoryview(ro))


def test_writable_buffers_are_accepted_and_host_arrays_stay_writable():
    """Red-team finding 1 (repro_1): writable buffers still work; host arrays are writable."""
    buf = bytearray(64)
    layout = KVLayout.from_tensors([memoryview(buf).cast("B", (4, 16))])
    swap_in_all(layout, 0xAB)
    assert buf == bytearray([0xAB] * 64)
    host = HostKVPool(layout, 4)
    assert all(a.flags.writeable for a in host.arrays)
    assert all(a.flags.writeable for a in HostKVPool(layout, 4).arrays)


# ------------------------------------------------------------------------------ finding 2
PATTERN = (np.arange(16 * 1024) % 251).astype(np.uint8).reshape(16, 1024)


class TemporaryExport:
    """A DLPack producer whose export owns the memory (nothing else references it)."""

    def __dlpack__(self, **kw):
        return PATTERN.copy().__dlpack__(**kw)

    def __dlpack_device__(self):
        return PATTERN.__dlpack_device__()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: PATTERN.copy().__dlpack__(), id="capsule"),
        pytest.param(lambda: PATTERN.copy().__dlpack__(max_version=(1, 0)), id="capsule-v1"),
        pytest.param(TemporaryExport, id="temporary-export"),
        pytest.param(lambda: DLPackOnly(PATTERN.copy()), id="dlpack"),
        pytest.param(lambda: memoryview(bytearray(PATTERN.tobytes())).cast("B", (16, 1024)),
                     id="buffer"),
    ],
)
def test_layout_keeps_imported_memory_alive(make):
    """Red-team finding 2 (repro_2): the memory a layout points at stays allocated as long
    as the layout, whatever owned it (a raw capsule, a temporary DLPack export, a buffer)."""
    layout = KVLayout.from_tensors([make()])
    gc.collect()
    victims = [np.full((16, 1024), 7, np.uint8) for _ in range(64)]
    assert region_bytes(layout) == PATTERN.tobytes()
    assert layout.regions[0].base not in {v.ctypes.data for v in victims}
    swap_in_all(layout, 0xCD)
    assert all((v == 7).all() for v in victims)
    assert region_bytes(layout) == bytes([0xCD]) * PATTERN.nbytes


def test_consumed_capsule_is_a_clear_type_error():
    """Red-team finding 2 (repro_2): a DLPack capsule can be imported once; a second use
    says so."""
    cap = PATTERN.copy().__dlpack__()
    layout = KVLayout.from_tensors([cap])
    with pytest.raises(TypeError, match="tensor 0: .*capsule was already consumed"):
        KVLayout.from_tensors([cap])
    assert region_bytes(layout) == PATTERN.tobytes()


# ------------------------------------------------------------------------------ finding 3
def test_allocator_is_thread_safe():
    """Red-team finding 3 (repro_3): concurrent allocate calls give every new sequence its
    own block table (8 threads x 200 new sequences, tiny switch interval)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(20):  # 0.1.0 fails about 8 trials in 10
            a = BlockGroupAllocator(1 << 20)
            barrier = threading.Barrier(8)

            def work(t, a=a, barrier=barrier):
                barrier.wait()
                for i in range(200):
                    a.allocate((t, i), 1)

            threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(a) == 1600
            assert all(a.num_table_blocks(s) == 1 for s in a.sequences())
            a.check_invariants()
    finally:
        sys.setswitchinterval(old)


def test_allocator_lock_is_an_instance_attribute():
    """Red-team finding 3 (repro_3): the lock is `_lock` (a benchmark swaps it out)."""
    a = BlockGroupAllocator(8)
    assert hasattr(a._lock, "__enter__") and hasattr(a._lock, "__exit__")
    assert "several threads" in BlockGroupAllocator.__doc__


# ------------------------------------------------------------------------------ finding 13
U8 = np.dtype(np.uint8)
THIRD = ((1 << 63) - 1) // 3


def fake_region(block_bytes: int) -> KVRegion:
    return KVRegion(4096, block_bytes, block_bytes, 1, "cpu", (block_bytes,), "uint8", U8)


def test_layout_bytes_per_block_overflow_is_a_value_error():
    """Red-team finding 13 (repro_13): regions whose block bytes sum past 2**63 - 1."""
    big = (1 << 63) - 1
    with pytest.raises(ValueError, match="overflow"):
        KVLayout([fake_region(big), fake_region(big), fake_region(4096)])


def test_host_pool_total_size_overflow_is_a_value_error():
    """Red-team finding 13 (repro_13): region sizes that each fit but sum (with 4096-byte
    rounding) past 2**64 raise ValueError instead of allocating a small pool."""
    layout = KVLayout([fake_region(THIRD), fake_region(THIRD), fake_region(4096)])
    with pytest.raises(ValueError, match="overflow"):
        HostKVPool(layout, 3)
    big = (1 << 63) - 1
    with pytest.raises(ValueError, match="overflow"):
        _core.HostPoolCore([big, big, 4096], 1, False)
    ok = HostKVPool(KVLayout([fake_region(4096)]), 2, pin=False)  # the sane case still works
    assert ok.nbytes == 8192


# ------------------------------------------------------------------------------ finding 14
@given(st.one_of(st.integers(-(2**70), 2**70), st.booleans(), st.floats(allow_nan=True),
                 st.text(max_size=3), st.none()),
       st.integers(-5, 5), st.one_of(st.none(), st.integers(5, 2**66)))
def test_as_count_accepts_exactly_the_integers_in_range(value, minimum, maximum):
    """Red-team finding 14 (repro_14): as_count takes ints in [minimum, maximum] and
    rejects bools and floats with TypeError, other ints with ValueError naming the range."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int:
        with pytest.raises(TypeError, match="n must be an integer"):
            as_count(value, "n", minimum=minimum, maximum=maximum)
    elif value < minimum or (maximum is not None and value > maximum):
        with pytest.raises(ValueError, match="n must be") as info:
            as_count(value, "n", minimum=minimum, maximum=maximum)
        if maximum is not None:
            assert f"at most {maximum:,}" in str(info.value)
    else:
        assert as_count(np.int64(value) if abs(value) < 2**62 else value, "n",
                        minimum=minimum, maximum=maximum) == value


def test_object_dtype_is_named():
    """Red-team finding 14 (repro_14): an object-dtype array says its dtype is unsupported."""
    with pytest.raises(TypeError, match="tensor 0: .*dtype object is not supported"):
        KVLayout.from_tensors([np.zeros((4, 4), object)])


def allocator_state(a: BlockGroupAllocator):
    return (a.sequences(), a.num_free_blocks, a.free_groups(),
            [a.block_table(s).tolist() for s in a.sequences()])


@pytest.mark.parametrize(
    ("count", "error", "match"),
    [(2**31, OutOfBlocksError, "2147483648 blocks requested"),
     (2**70, OutOfBlocksError, "blocks requested"),
     (9, OutOfBlocksError, "only 5 of 8"),
     (True, TypeError, "num_blocks must be an integer, got bool"),
     (2.0, TypeError, "num_blocks must be an integer, got float"),
     (0, ValueError, "positive"),
     (-(2**40), ValueError, "positive")],
)
def test_allocate_count_errors_change_nothing(count, error, match):
    """Red-team finding 14 (repro_14): allocate(seq, 2**31) is OutOfBlocksError like any
    request for more blocks than are free; bools/floats TypeError; <= 0 ValueError."""
    a = BlockGroupAllocator(8, initial_group_blocks=2)
    a.allocate("a", 3)
    before = allocator_state(a)
    with pytest.raises(error, match=match):
        a.allocate("s", count)
    with pytest.raises(error, match=match):
        a.allocate("a", count)
    assert allocator_state(a) == before
    a.check_invariants()


@pytest.mark.parametrize(
    ("option", "value", "error", "match"),
    [("num_workers", 2**40, ValueError, r"num_workers must be >= 0 and at most 64"),
     ("num_workers", -1, ValueError, r"num_workers must be >= 0 and at most 64"),
     ("num_workers", True, TypeError, "num_workers must be an integer, got bool"),
     ("num_workers", 2.0, TypeError, "num_workers must be an integer, got float"),
     ("sync_every", 0, ValueError, r"sync_every must be positive and at most"),
     ("sync_every", 2**40, ValueError, r"sync_every must be positive and at most"),
     ("sync_every", True, TypeError, "sync_every must be an integer"),
     ("max_queue", 0, ValueError, r"max_queue must be positive and at most"),
     ("max_queue", 2**70, ValueError, r"max_queue must be positive and at most"),
     ("max_queue", 1.0, TypeError, "max_queue must be an integer")],
)
def test_engine_options_are_checked(option, value, error, match):
    """Red-team finding 14 (repro_14): engine options out of range name the allowed range."""
    layout = KVLayout.from_tensors([np.zeros((4, 4), np.float32)])
    host = HostKVPool(layout, 4)
    with pytest.raises(error, match=match):
        AsyncSwapEngine(layout, host, backend="host", **{option: value})


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [(lambda lay: HostKVPool(lay, True), TypeError, "num_blocks must be an integer, got bool"),
     (lambda lay: HostKVPool(lay, 16.0), TypeError, "num_blocks must be an integer, got float"),
     (lambda lay: HostKVPool(lay, 0), ValueError, "num_blocks must be positive"),
     (lambda lay: HostKVPool(lay, 2**64), ValueError, "num_blocks must be positive and at most"),
     (lambda lay: BlockGroupAllocator(True), TypeError, "num_blocks must be an integer"),
     (lambda lay: BlockGroupAllocator(16.0), TypeError, "num_blocks must be an integer"),
     (lambda lay: BlockGroupAllocator(8, initial_group_blocks=True), TypeError,
      "initial_group_blocks must be an integer")],
)
def test_counts_reject_bools_and_floats(make, error, match):
    """Red-team finding 14 (repro_14): True is never taken as 1, nor 16.0 as 16."""
    layout = KVLayout.from_tensors([np.zeros((4, 4), np.float32)])
    with pytest.raises(error, match=match):
        make(layout)


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; it must exit with status 0."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def test_testing_without_hypothesis_names_the_extra():
    """Red-team finding 14 (repro_14): kvswitch.testing without hypothesis says what to
    install."""
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "try:\n    import kvswitch.testing\n"
            "except ImportError as e:\n    print('ImportError:', e)\n")
    r = run_python(code)
    assert 'ImportError: kvswitch.testing needs hypothesis: pip install "hypothesis>=6.100"' \
        in r.stdout


# ------------------------------------------------------------------------------ finding 16
DAEMON_WAIT = """
import threading
import numpy as np
from kvswitch import AsyncSwapEngine, HostKVPool, KVLayout
lay = KVLayout.from_tensors([np.zeros((64, 4096), np.float32)]); host = HostKVPool(lay, 64)
e = AsyncSwapEngine(lay, host, backend="host"); e._engine._set_paused(True)
h = e.swap_out([[0, 0, 64]])
started = threading.Event()
def wait():
    started.set()
    h.wait()
threading.Thread(target=wait, daemon=True).start()
started.wait()
print("exiting")
"""

NO_DAEMON = """
import numpy as np
from kvswitch import AsyncSwapEngine, HostKVPool, KVLayout
lay = KVLayout.from_tensors([np.zeros((64, 4096), np.float32)]); host = HostKVPool(lay, 64)
with AsyncSwapEngine(lay, host, backend="host") as e:
    e.swap_out([[0, 0, 64]]).wait()
print("exiting")
"""


@pytest.mark.parametrize("script", [DAEMON_WAIT, NO_DAEMON], ids=["daemon-wait", "no-daemon"])
def test_exit_with_daemon_thread_in_wait_is_quiet(script):
    """Red-team finding 16 (repro_16): a daemon thread blocked in SwapHandle.wait() at exit
    prints no nanobind leak report; a clean exit stays clean."""
    r = run_python(textwrap.dedent(script))
    assert r.stdout.strip().endswith("exiting")
    assert "leaked" not in r.stderr


def test_leak_warnings_off_only_while_daemon_threads_live():
    """Red-team finding 16 (repro_16): the exit hook turns leak warnings off only when
    daemon threads are alive (the warnings catch real reference-counting bugs otherwise)."""
    code = textwrap.dedent("""
        import threading, kvswitch
        calls = []
        kvswitch._core._set_leak_warnings = calls.append
        kvswitch._quiet_leak_warnings_at_exit()
        print(calls)
        release = threading.Event()
        t = threading.Thread(target=release.wait, daemon=True)
        t.start()
        kvswitch._quiet_leak_warnings_at_exit()
        print(calls)
        release.set(); t.join()
    """)
    r = run_python(code)
    assert r.stdout.strip().splitlines()[-2:] == ["[]", "[False]"]


def test_real_leaks_are_still_reported():
    """Red-team finding 16 (repro_16): without daemon threads, a real reference leak of a
    kvswitch object is still reported at exit."""
    code = ("import ctypes, kvswitch\n"
            "a = kvswitch.BlockGroupAllocator(8)\n"
            "ctypes.pythonapi.Py_IncRef(ctypes.py_object(a._core))\n")
    r = run_python(code)
    assert "leaked instance" in r.stderr and "kvswitch._core.BlockGroupAllocator" in r.stderr
