"""KVLayout and HostKVPool: regions from NumPy / DLPack / CUDA array interface objects."""

from __future__ import annotations

import ctypes
import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvswitch
from kvswitch import HostKVPool, KVLayout, KVRegion
from kvswitch import layout as layout_mod


def block_bytes_at(region: KVRegion, block: int) -> bytes:
    return ctypes.string_at(region.base + block * region.block_stride, region.block_bytes)


# ---------------------------------------------------------------------------- from_tensors
def test_from_tensors_contiguous_regions():
    a = np.arange(6 * 4 * 3, dtype=np.float32).reshape(6, 4, 3)
    b = np.zeros((6, 2), dtype=np.int16)
    layout = KVLayout.from_tensors([a, b])
    assert layout.num_regions == 2
    assert layout.num_blocks == 6
    assert layout.device == "cpu"
    r0, r1 = layout.regions
    assert (r0.base, r0.block_stride, r0.block_bytes) == (a.ctypes.data, 48, 48)
    assert (r1.block_stride, r1.block_bytes) == (4, 4)
    assert r0.block_shape == (4, 3) and r0.dtype == "float32"
    assert layout.bytes_per_block == 52
    assert layout.nbytes == 6 * 52
    assert layout.is_contiguous
    assert block_bytes_at(r0, 5) == a[5].tobytes()


def test_strided_view_has_stride_larger_than_block_bytes():
    t = np.arange(5 * 2 * 8, dtype=np.float16).reshape(5, 2, 8)
    layout = KVLayout.from_tensors([t[:, 0], t[:, 1]])
    k, v = layout.regions
    assert k.block_stride == 32 and k.block_bytes == 16
    assert v.base == k.base + 16
    assert not layout.is_contiguous
    for b in range(5):
        assert block_bytes_at(k, b) == t[b, 0].tobytes()
        assert block_bytes_at(v, b) == t[b, 1].tobytes()


def test_layout_keeps_tensors_alive():
    layout = KVLayout.from_tensors([np.full((4, 16), 7, dtype=np.uint8)])
    gc.collect()
    assert block_bytes_at(layout.regions[0], 3) == bytes([7] * 16)
    assert len(layout.tensors) == 1


def test_single_block_region_ignores_stride():
    t = np.zeros((1, 8), dtype=np.uint8)
    assert KVLayout.from_tensors([t]).regions[0].block_stride == 8


@pytest.mark.parametrize(
    ("tensors", "exc", "match"),
    [
        ([], ValueError, "empty"),
        ("abc", TypeError, "list of arrays"),
        ([[1, 2, 3]], TypeError, "expected an array"),
        ([np.float32(1.0)], ValueError, "block dimension"),
        ([np.zeros((0, 4))], ValueError, "no blocks"),
        ([np.zeros((4, 0))], ValueError, "empty"),
        ([np.zeros((4, 3)), np.zeros((5, 3))], ValueError, "number of blocks"),
        ([np.zeros((4, 6))[:, ::2]], ValueError, "not contiguous"),
        ([np.zeros((4, 6)).T], ValueError, "not contiguous"),
        ([np.zeros((4, 2))[::-1]], ValueError, "smaller than one block"),
    ],
)
def test_from_tensors_errors(tensors, exc, match):
    with pytest.raises(exc, match=match):
        KVLayout.from_tensors(tensors)


def test_read_only_array_rejected():
    a = np.zeros((4, 4))
    a.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        KVLayout.from_tensors([a])


def test_regions_must_agree_on_device():
    a = np.zeros((4, 4), dtype=np.uint8)
    r = KVLayout.from_tensors([a]).regions[0]
    gpu = KVRegion(base=r.base, block_stride=4, block_bytes=4, num_blocks=4,
                   device=("cuda", 0), block_shape=(4,), dtype="uint8",
                   numpy_dtype=np.dtype(np.uint8))
    with pytest.raises(ValueError, match="device"):
        KVLayout([r, gpu], keepalive=[a])


# ---------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("as_dict", [False, True])
def test_from_vllm_kv_first(as_dict):
    layers = [np.random.default_rng(i).standard_normal((2, 7, 4, 2, 3)).astype(np.float16)
              for i in range(3)]
    caches = {f"layer.{i}": t for i, t in enumerate(layers)} if as_dict else layers
    layout = KVLayout.from_vllm(caches)
    assert layout.num_regions == 6 and layout.num_blocks == 7
    assert layout.is_contiguous  # K and V halves are each contiguous
    for i, t in enumerate(layers):
        for kv in (0, 1):
            r = layout.regions[2 * i + kv]
            assert r.block_shape == (4, 2, 3)
            for b in range(7):
                assert block_bytes_at(r, b) == t[kv, b].tobytes()


def test_from_vllm_blocks_first_is_strided():
    t = np.arange(5 * 2 * 4 * 2 * 3, dtype=np.float32).reshape(5, 2, 4, 2, 3)
    layout = KVLayout.from_vllm([t])
    k, v = layout.regions
    assert k.block_bytes == 4 * 2 * 3 * 4
    assert k.block_stride == 2 * k.block_bytes
    for b in range(5):
        assert block_bytes_at(k, b) == t[b, 0].tobytes()
        assert block_bytes_at(v, b) == t[b, 1].tobytes()


def test_from_vllm_errors():
    with pytest.raises(ValueError, match="no layers"):
        KVLayout.from_vllm([])
    with pytest.raises(ValueError, match="ambiguous"):
        KVLayout.from_vllm([np.zeros((2, 2, 4, 1, 2))])
    assert KVLayout.from_vllm([np.zeros((2, 2, 4, 1, 2))], kv_dim=1).num_regions == 2
    with pytest.raises(ValueError, match="no K/V dimension"):
        KVLayout.from_vllm([np.zeros((3, 5, 4, 1, 2))])
    with pytest.raises(ValueError, match="kv_dim"):
        KVLayout.from_vllm([np.zeros((2, 5, 4))], kv_dim=2)
    with pytest.raises(ValueError, match="not 2"):
        KVLayout.from_vllm([np.zeros((3, 5, 4))], kv_dim=0)
    with pytest.raises(ValueError, match="number of blocks"):
        KVLayout.from_vllm([np.zeros((2, 5, 4)), np.zeros((2, 6, 4))])


def test_cross_layer_one_region_per_block_id():
    t = np.zeros((6, 4, 2, 16, 2, 8), dtype=np.uint16)
    layout = KVLayout.cross_layer(t)
    assert layout.num_regions == 1
    assert layout.regions[0].block_bytes == 4 * 2 * 16 * 2 * 8 * 2
    first_two_layers = KVLayout.cross_layer(t[:, :2]).regions[0]  # strided, still valid
    assert first_two_layers.block_stride == 2 * first_two_layers.block_bytes
    with pytest.raises(ValueError, match="not contiguous"):
        KVLayout.cross_layer(t[:, :, :1])  # K only: per-block part not contiguous


# ---------------------------------------------------------------------------- other protocols
class FakeCudaArray:
    """An object exposing only __cuda_array_interface__ (backed by host memory here)."""

    def __init__(self, arr: np.ndarray, readonly: bool = False, strides: bool = True):
        self._arr = arr
        self.__cuda_array_interface__ = {
            "shape": arr.shape,
            "typestr": arr.dtype.str,
            "data": (arr.ctypes.data, readonly),
            "strides": arr.strides if strides else None,
            "version": 3,
        }


def test_cuda_array_interface_parsed(monkeypatch):
    # No driver here: pretend the pointer belongs to device 1.
    monkeypatch.setattr(layout_mod._core, "cuda_pointer_device", lambda ptr: 1)
    t = np.zeros((4, 2, 8), dtype=np.float16)
    layout = KVLayout.from_tensors([FakeCudaArray(t[:, 0]), FakeCudaArray(t[:, 1])])
    assert layout.device == ("cuda", 1)
    k, v = layout.regions
    assert (k.block_stride, k.block_bytes, v.base - k.base) == (32, 16, 16)
    c = KVLayout.from_tensors([FakeCudaArray(t, strides=False)]).regions[0]
    assert (c.block_stride, c.block_bytes) == (32, 32)
    with pytest.raises(ValueError, match="read-only"):
        KVLayout.from_tensors([FakeCudaArray(t, readonly=True)])


def test_dlpack_object_without_numpy_type():
    class Wrapper:  # only the DLPack protocol
        def __init__(self, a):
            self._a = a

        def __dlpack__(self, **kw):
            return self._a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self._a.__dlpack_device__()

    t = np.arange(12, dtype=np.int32).reshape(3, 4)
    r = KVLayout.from_tensors([Wrapper(t)]).regions[0]
    assert (r.base, r.block_bytes, r.dtype) == (t.ctypes.data, 16, "int32")


def test_dtypes_numpy_lacks_map_to_same_size_raw_bytes():
    assert layout_mod._dtype_from_dlpack(4, 16, 1, "x") == ("bfloat16", np.dtype(np.uint16))
    assert layout_mod._dtype_from_dlpack(10, 8, 1, "x") == ("float8_e4m3fn", np.dtype(np.uint8))
    assert layout_mod._dtype_from_dlpack(2, 16, 1, "x") == ("float16", np.dtype(np.float16))
    with pytest.raises(TypeError, match="lanes"):
        layout_mod._dtype_from_dlpack(2, 16, 2, "x")
    with pytest.raises(TypeError, match="bits"):
        layout_mod._dtype_from_dlpack(2, 12, 1, "x")


# ---------------------------------------------------------------------------- HostKVPool
def test_host_pool_arrays_match_layout():
    layers = [np.zeros((5, 2, 4, 2, 3), dtype=np.float16) for _ in range(2)]
    dev = KVLayout.from_vllm(layers)
    pool = HostKVPool(dev, 9)
    assert len(pool.arrays) == 4
    for arr, r in zip(pool.arrays, dev.regions, strict=True):
        assert arr.shape == (9, *r.block_shape) and arr.dtype == np.float16
        assert arr.flags.c_contiguous and arr.flags.writeable
    assert pool.layout.device == "cpu" and pool.layout.num_blocks == 9
    assert pool.layout.is_contiguous
    assert pool.nbytes >= 9 * dev.bytes_per_block
    for arr, r in zip(pool.arrays, pool.layout.regions, strict=True):
        assert arr.ctypes.data == r.base
        assert r.base % 4096 == 0
    assert isinstance(pool.pinned, bool) and pool.pin_reason


def test_host_pool_not_pinned_without_driver_says_why():
    pool = HostKVPool(KVLayout.from_tensors([np.zeros((2, 8), np.uint8)]), 2, pin=False)
    assert not pool.pinned and "pin=False" in pool.pin_reason
    info = kvswitch._core.cuda_driver_info()
    if not info["available"]:
        pool = HostKVPool(KVLayout.from_tensors([np.zeros((2, 8), np.uint8)]), 2)
        assert not pool.pinned and "not pinned" in pool.pin_reason


def test_host_pool_arrays_keep_memory_alive():
    pool = HostKVPool(KVLayout.from_tensors([np.zeros((2, 64), np.uint8)]), 3)
    arr = pool.arrays[0]
    arr[:] = 5
    del pool
    gc.collect()
    assert int(arr.sum()) == 5 * 3 * 64


def test_host_pool_errors():
    layout = KVLayout.from_tensors([np.zeros((2, 8), np.uint8)])
    with pytest.raises(ValueError, match="positive"):
        HostKVPool(layout, 0)
    with pytest.raises(TypeError, match="integer"):
        HostKVPool(layout, 2.5)
    with pytest.raises(TypeError, match="KVLayout"):
        HostKVPool([np.zeros((2, 8))], 2)


# ---------------------------------------------------------------------------- property
@settings(max_examples=60, deadline=None)
@given(
    num_blocks=st.integers(1, 9),
    inner=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    pad=st.integers(0, 3),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    offset=st.integers(0, 2),
)
def test_regions_address_exactly_the_block_bytes(num_blocks, inner, pad, itemsize, offset):
    """A block-strided view of a padded buffer: every block's bytes are found at
    base + b * block_stride, block_bytes long."""
    dtype = np.dtype(f"u{itemsize}")
    width = int(np.prod(inner)) if inner else 1
    rng = np.random.default_rng(num_blocks * 100 + width)
    buf = rng.integers(0, 2**8, size=(num_blocks, offset + width + pad), dtype=np.uint8)
    buf = buf.astype(dtype)
    view = buf[:, offset:offset + width].reshape((num_blocks, *inner))
    region = KVLayout.from_tensors([view]).regions[0]
    assert region.block_bytes == width * itemsize
    assert region.block_shape == tuple(inner)
    for b in range(num_blocks):
        assert block_bytes_at(region, b) == view[b].tobytes()
