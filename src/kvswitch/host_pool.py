"""Host KV pools: CPU memory laid out like a device pool, owned by kvswitch.

The host pool is where swapped-out KV lives (FastSwitch, arXiv 2411.18424, section 3).
Copies between a GPU and pinned host memory run at full link speed and asynchronously;
copies from pageable memory do not. kvswitch therefore pins the pool through the CUDA
driver when one is present (``cuMemHostAlloc``, portable and device-mapped) and otherwise
uses page-aligned plain memory (the host backend, tests, CPU-only machines).
"""

from __future__ import annotations

import numpy as np

from kvswitch import _core
from kvswitch._validate import INT64_MAX, as_count
from kvswitch.layout import KVLayout, KVRegion

__all__ = ["HostKVPool"]


class HostKVPool:
    """Host memory with the same per-block shape as each region of a layout.

    Args:
        layout: the device pool's [`KVLayout`][]; the host pool gets one
            region per region of it, with the same block shape and dtype.
        num_blocks: blocks in the host pool (an int > 0); independent of the device pool's
            size.
        pin: pin the memory through the CUDA driver when a driver and device answer
            (on the layout's device when it is a CUDA device, else device 0). Without a
            driver the pool silently uses plain memory; ``pinned`` and
            ``pin_reason`` say what happened.

    Attributes:
        arrays: one NumPy array per region, ``[num_blocks, *block_shape]``, views of the
            pool's memory (no copies; they keep the memory alive). Their dtype is the
            region's ``numpy_dtype``: the same as the device tensor's where NumPy has it;
            for types NumPy lacks the raw bytes with a same-size unsigned integer dtype
            (``bfloat16`` -> ``uint16``, float8 -> ``uint8``). Contents start
            uninitialised, like ``numpy.empty``.
        layout: the host pool itself as a [`KVLayout`][] on ``"cpu"``
            (contiguous regions: block stride == block bytes).
        pinned: whether the memory is page-locked by the CUDA driver.
        pin_reason: how the memory was obtained, or why it is not pinned.
        nbytes: bytes allocated (each region is 4096-byte aligned).

    Raises:
        TypeError: ``layout`` is not a KVLayout, or ``num_blocks`` is not an int (a bool or
            a float such as ``16.0`` included).
        ValueError: ``num_blocks`` <= 0 or above 2**63 - 1, or a pool size past 2**63 - 1
            bytes.
        MemoryError: the allocation failed.

    Thread safety: the object is immutable once built and may be shared between threads.
    The bytes of ``arrays`` are not synchronised: a swap job writes them on a worker
    thread, so read them only after its handle is done.
    """

    def __init__(self, layout: KVLayout, num_blocks: int, *, pin: bool = True):
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a KVLayout, got {type(layout).__name__}")
        num_blocks = as_count(num_blocks, "num_blocks", maximum=INT64_MAX)
        ordinal = layout.device[1] if layout.device != "cpu" else 0
        self._core = _core.HostPoolCore(
            [r.block_bytes for r in layout.regions], num_blocks, bool(pin), int(ordinal))
        buf = self._core.buffer()  # uint8 view of the whole allocation, owns a reference
        base = self._core.data_ptr
        arrays, regions = [], []
        for i, r in enumerate(layout.regions):
            off = self._core.region_offset(i)
            a = buf[off:off + num_blocks * r.block_bytes].view(r.numpy_dtype)
            arrays.append(a.reshape((num_blocks, *r.block_shape)))
            regions.append(KVRegion(base=base + off, block_stride=r.block_bytes,
                                    block_bytes=r.block_bytes, num_blocks=num_blocks,
                                    device="cpu", block_shape=r.block_shape, dtype=r.dtype,
                                    numpy_dtype=r.numpy_dtype))
        self._arrays: tuple[np.ndarray, ...] = tuple(arrays)
        self._layout = KVLayout(regions, keepalive=(self._core,))

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return self._arrays

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def num_blocks(self) -> int:
        return self._layout.num_blocks

    @property
    def pinned(self) -> bool:
        return bool(self._core.pinned)

    @property
    def pin_reason(self) -> str:
        return str(self._core.pin_reason)

    @property
    def nbytes(self) -> int:
        return int(self._core.nbytes)

    def __repr__(self) -> str:
        return (f"HostKVPool({self._layout.num_regions} regions, {self.num_blocks} blocks, "
                f"{self.nbytes} bytes, pinned={self.pinned})")
