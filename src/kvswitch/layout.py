"""KV layouts: how a block id of a KV pool maps to bytes.

A [`KVLayout`][] is a list of *regions* (typically one per layer and K/V). In a region,
block ``b`` occupies ``block_bytes`` contiguous bytes starting at
``base + b * block_stride``. The swap engine turns an extent of blocks into one copy per
region (FastSwitch, arXiv 2411.18424, sections 3.1 and 3.2), so a layout is all it needs
to know about an engine's KV tensors.

Tensors from any framework are accepted without copies: objects with ``__dlpack__``
(PyTorch, CuPy, JAX, ...), raw DLPack capsules, NumPy arrays, buffer-protocol objects, and
objects with ``__cuda_array_interface__``. Read-only memory is refused: swap-in writes into
the pool. A layout keeps references to the tensors it was built from and to their imports,
so their memory stays valid while the layout (or an engine using it) lives.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvswitch import _core

#: Where a pool lives: ``"cpu"`` or ``("cuda", ordinal)``.
Device = str | tuple[str, int]

__all__ = ["Device", "KVLayout", "KVRegion"]

# DLPack device types (dlpack.h): CPU, CUDA, CUDA pinned host, CUDA managed.
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13
# DLPack dtype codes (dlpack.h).
_DL_INT, _DL_UINT, _DL_FLOAT, _DL_BFLOAT, _DL_COMPLEX, _DL_BOOL = 0, 1, 2, 4, 5, 6
_DL_FLOAT8_NAMES = {
    7: "float8_e3m4",
    8: "float8_e4m3",
    9: "float8_e4m3b11fnuz",
    10: "float8_e4m3fn",
    11: "float8_e4m3fnuz",
    12: "float8_e5m2",
    13: "float8_e5m2fnuz",
    14: "float8_e8m0fnu",
}
_RAW = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32),
        8: np.dtype(np.uint64)}


@dataclass(frozen=True)
class KVRegion:
    """One region of a pool: block ``b`` is ``[base + b * block_stride, + block_bytes)``.

    Attributes:
        base: address of block 0 (host or device virtual address).
        block_stride: bytes between block ``b`` and block ``b + 1`` (>= ``block_bytes``;
            larger for strided views such as K and V interleaved per block).
        block_bytes: bytes of one block in this region; they are contiguous.
        num_blocks: blocks in the region (the same for every region of a layout).
        device: ``"cpu"`` or ``("cuda", ordinal)``.
        block_shape: shape of one block, in elements (the tensor's shape without its
            first, block dimension).
        dtype: element type name, e.g. ``"float16"`` or ``"bfloat16"``.
        numpy_dtype: the NumPy dtype host arrays of this region use. Equal to ``dtype``
            where NumPy has it; for types NumPy lacks (``bfloat16``, float8 variants) an
            unsigned integer of the same size (``uint16`` for bfloat16) holding the raw
            bytes.
    """

    base: int
    block_stride: int
    block_bytes: int
    num_blocks: int
    device: Device
    block_shape: tuple[int, ...]
    dtype: str
    numpy_dtype: np.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the region's blocks (``num_blocks * block_bytes``)."""
        return self.num_blocks * self.block_bytes


@dataclass(frozen=True)
class _ArrayInfo:
    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # bytes
    itemsize: int
    dtype: str
    numpy_dtype: np.dtype
    device: Device
    read_only: bool
    owner: object  # holds the import (e.g. a raw DLPack capsule's memory) while referenced


def _dtype_from_dlpack(code: int, bits: int, lanes: int, what: str) -> tuple[str, np.dtype]:
    if lanes != 1:
        raise TypeError(f"{what}: vector dtypes (lanes={lanes}) are not supported")
    nbytes = bits // 8
    if bits % 8 or nbytes not in _RAW:
        raise TypeError(f"{what}: element size of {bits} bits is not supported")
    if code == _DL_BFLOAT:
        return "bfloat16", _RAW[nbytes]
    if code in _DL_FLOAT8_NAMES and nbytes == 1:
        return _DL_FLOAT8_NAMES[code], _RAW[1]
    kind = {_DL_INT: "i", _DL_UINT: "u", _DL_FLOAT: "f", _DL_COMPLEX: "c", _DL_BOOL: "b"}.get(code)
    if kind is not None:
        try:
            dt = np.dtype(f"{kind}{nbytes}") if kind != "b" else np.dtype(np.bool_)
            return dt.name, dt
        except TypeError:
            pass
    return f"dlpack(code={code},bits={bits})", _RAW[nbytes]


def _describe_cai(obj: Any, cai: Mapping[str, Any], what: str) -> _ArrayInfo:
    try:
        shape = tuple(int(s) for s in cai["shape"])
        typestr = cai["typestr"]
        ptr, readonly = cai["data"]
    except (KeyError, TypeError, ValueError) as e:
        raise TypeError(f"{what}: malformed __cuda_array_interface__ ({e})") from None
    dt = np.dtype(typestr)
    strides = cai.get("strides")
    if strides is None:  # C-contiguous
        acc, out = dt.itemsize, []
        for s in reversed(shape):
            out.append(acc)
            acc *= s
        strides = tuple(reversed(out))
    else:
        strides = tuple(int(s) for s in strides)
    ordinal = _core.cuda_pointer_device(int(ptr)) if ptr else 0
    return _ArrayInfo(int(ptr), shape, strides, dt.itemsize, dt.name, dt, ("cuda", ordinal),
                      bool(readonly), obj)


def _describe(obj: Any, what: str) -> _ArrayInfo:
    """Pointer, shape, byte strides, dtype and device of an array, without copying it."""
    try:
        (ptr, shape, strides, code, bits, lanes, dev_type, dev_id, read_only,
         owner) = _core.describe_array(obj)
    except TypeError as e:
        cai = getattr(obj, "__cuda_array_interface__", None)
        if cai is not None:
            return _describe_cai(obj, cai, what)
        if isinstance(obj, np.ndarray):
            raise TypeError(f"{what}: NumPy dtype {obj.dtype} is not supported (KV tensors "
                            f"hold numbers: integer, float, complex or bool)") from None
        if type(obj).__name__ == "PyCapsule":
            raise TypeError(f"{what}: {e}") from None
        raise TypeError(
            f"{what}: expected an array with __dlpack__ or __cuda_array_interface__, a NumPy "
            f"array or a buffer, got {type(obj).__module__}.{type(obj).__qualname__}"
        ) from None
    dtype, np_dtype = _dtype_from_dlpack(code, bits, lanes, what)
    if dev_type in (_DL_CPU, _DL_CUDA_HOST):
        device: Device = "cpu"
    elif dev_type in (_DL_CUDA, _DL_CUDA_MANAGED):
        device = ("cuda", int(dev_id))
    else:
        raise TypeError(f"{what}: DLPack device type {dev_type} is not supported (cpu or cuda)")
    return _ArrayInfo(ptr, tuple(shape), tuple(strides), bits // 8, dtype, np_dtype, device,
                      bool(read_only), owner)


def _region(info: _ArrayInfo, what: str, *, base: int, num_blocks: int, block_stride: int,
            block_shape: tuple[int, ...], inner_strides: tuple[int, ...]) -> KVRegion:
    """A region whose blocks have `block_shape` with byte strides `inner_strides`."""
    if info.read_only:
        raise ValueError(f"{what}: the memory is read-only; a KV pool must be writable "
                         f"(swap-in writes into it)")
    if num_blocks <= 0:
        raise ValueError(f"{what}: has no blocks (block dimension of size {num_blocks})")
    block_bytes = info.itemsize * math.prod(block_shape)
    if block_bytes == 0:
        raise ValueError(f"{what}: blocks are empty (block shape {block_shape})")
    expected = info.itemsize
    for size, stride in zip(reversed(block_shape), reversed(inner_strides), strict=True):
        if size != 1 and stride != expected:
            raise ValueError(
                f"{what}: one block (shape {block_shape}, byte strides {inner_strides}) is not "
                f"contiguous; kvswitch copies each block as one run of bytes. Make the "
                f"per-block dimensions contiguous (the block dimension may be strided)."
            )
        expected *= size
    if num_blocks == 1:
        block_stride = block_bytes
    if block_stride < block_bytes:
        raise ValueError(
            f"{what}: block stride of {block_stride} bytes is smaller than one block "
            f"({block_bytes} bytes): blocks overlap, or the block id is not the outermost "
            f"dimension of the view"
        )
    return KVRegion(base=base, block_stride=block_stride, block_bytes=block_bytes,
                    num_blocks=num_blocks, device=info.device, block_shape=block_shape,
                    dtype=info.dtype, numpy_dtype=info.numpy_dtype)


def _region_of(info: _ArrayInfo, what: str) -> KVRegion:
    if len(info.shape) < 1:
        raise ValueError(f"{what}: needs a block dimension first, got a 0-d array")
    return _region(info, what, base=info.ptr, num_blocks=info.shape[0],
                   block_stride=info.strides[0], block_shape=info.shape[1:],
                   inner_strides=info.strides[1:])


def _device_str(d: Device) -> str:
    return d if isinstance(d, str) else f"{d[0]}:{d[1]}"


class KVLayout:
    """The bytes of a KV pool: regions of equal block count on one device.

    Build one with [`from_tensors`][], [`from_vllm`][] or [`cross_layer`][], or
    directly from [`KVRegion`][] objects (then pass the objects owning the memory as
    ``keepalive``).

    Args:
        regions: at least one region; all with the same ``num_blocks`` and ``device``.
        keepalive: objects that own the memory (held by the layout).

    Raises:
        ValueError: no regions, or regions that disagree on block count or device.

    Attributes:
        regions: tuple of [`KVRegion`][].
        num_blocks: blocks in the pool.
        device: ``"cpu"`` or ``("cuda", ordinal)``.

    Thread safety: immutable once built; share it between threads freely. It keeps the
    memory it describes alive, not its contents consistent: the swap engine orders its own
    copies, other writers order themselves against it.
    """

    def __init__(self, regions: Iterable[KVRegion], *, keepalive: Iterable[object] = ()):
        regions = tuple(regions)
        if not regions:
            raise ValueError("KVLayout needs at least one region")
        for i, r in enumerate(regions):
            if not isinstance(r, KVRegion):
                raise TypeError(f"region {i}: expected KVRegion, got {type(r).__name__}")
        first = regions[0]
        for i, r in enumerate(regions[1:], start=1):
            if r.num_blocks != first.num_blocks:
                raise ValueError(
                    f"regions disagree on the number of blocks: region 0 has "
                    f"{first.num_blocks}, region {i} has {r.num_blocks}"
                )
            if r.device != first.device:
                raise ValueError(
                    f"regions disagree on the device: region 0 is on "
                    f"{_device_str(first.device)}, region {i} on {_device_str(r.device)}"
                )
        self._regions = regions
        self._tensors = tuple(keepalive)
        self._keepalive = self._tensors  # plus the imports of the from_* constructors
        dev_type = 0 if first.device == "cpu" else 1
        ordinal = 0 if first.device == "cpu" else int(first.device[1])
        self._core = _core.KVLayoutCore(
            [(r.base, r.block_stride, r.block_bytes) for r in regions],
            first.num_blocks, dev_type, ordinal)

    @classmethod
    def _of_arrays(cls, regions: list[KVRegion], tensors: Sequence[Any],
                   infos: Iterable[_ArrayInfo]) -> KVLayout:
        layout = cls(regions, keepalive=tensors)
        # The imports own the memory when the tensor does not (a raw DLPack capsule, or a
        # producer that exports a temporary): keep them as long as the layout.
        layout._keepalive += tuple(info.owner for info in infos)
        return layout

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_tensors(cls, tensors: Sequence[Any]) -> KVLayout:
        """One region per tensor; the first dimension of each tensor is the block id.

        Args:
            tensors: writable arrays ``[num_blocks, *block_shape]`` (``__dlpack__``
                objects, raw DLPack capsules, NumPy arrays, buffers or
                ``__cuda_array_interface__``), all with the same ``num_blocks`` and on
                the same device. Strided views are fine as long as each block's own
                elements are contiguous (the block stride may exceed the block bytes).
                A raw capsule is consumed: the layout then owns its memory.

        Raises:
            TypeError: an object is not an array, has an unsupported dtype or device, or is
                a DLPack capsule that was already consumed.
            ValueError: empty list, read-only memory (a read-only NumPy array, ``bytes``,
                a read-only buffer or DLPack export), non-contiguous blocks, or tensors
                that disagree on block count or device.
        """
        if isinstance(tensors, (str, bytes)) or not isinstance(tensors, Sequence):
            raise TypeError(f"from_tensors takes a list of arrays, got {type(tensors).__name__}")
        if len(tensors) == 0:
            raise ValueError("from_tensors: empty list of tensors")
        infos = [_describe(t, f"tensor {i}") for i, t in enumerate(tensors)]
        regions = [_region_of(info, f"tensor {i}") for i, info in enumerate(infos)]
        return cls._of_arrays(regions, tensors, infos)

    @classmethod
    def from_vllm(cls, kv_caches: Sequence[Any] | Mapping[str, Any], *,
                  kv_dim: int | None = None) -> KVLayout:
        """Layout of vLLM's per-layer KV caches: two regions (K, V) per layer.

        Args:
            kv_caches: one tensor per layer (a list, or a dict of layer name -> tensor,
                taken in iteration order), shaped ``[2, num_blocks, block_size,
                num_kv_heads, head_dim]`` (``kv_dim=0``, vLLM's FlashAttention layout) or
                ``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` (``kv_dim=1``, e.g.
                FlashInfer). With ``kv_dim=1`` K and V of one block are interleaved, so
                each region's block stride is twice its block bytes.
            kv_dim: which dimension holds K/V; None guesses from the shape (the
                dimension of size 2 among the first two).

        Regions are ordered layer 0 K, layer 0 V, layer 1 K, ...

        Raises:
            ValueError: no layers, a shape without a K/V dimension of size 2, an ambiguous
                shape (both first dims are 2: pass ``kv_dim``), or the errors of
                [`from_tensors`][].
        """
        layers = list(kv_caches.values()) if isinstance(kv_caches, Mapping) else list(kv_caches)
        if not layers:
            raise ValueError("from_vllm: no layers")
        if kv_dim not in (None, 0, 1):
            raise ValueError(f"from_vllm: kv_dim must be 0, 1 or None, got {kv_dim!r}")
        regions, infos = [], []
        for i, t in enumerate(layers):
            what = f"layer {i}"
            info = _describe(t, what)
            infos.append(info)
            if len(info.shape) < 3:
                raise ValueError(
                    f"{what}: expected [2, num_blocks, block_size, heads, head_dim] or "
                    f"[num_blocks, 2, ...], got shape {info.shape}")
            dim = kv_dim
            if dim is None:
                if info.shape[0] == 2 and info.shape[1] == 2:
                    raise ValueError(
                        f"{what}: shape {info.shape} is ambiguous (both of the first two "
                        f"dims are 2); pass kv_dim=0 or kv_dim=1")
                dim = 0 if info.shape[0] == 2 else 1 if info.shape[1] == 2 else None
                if dim is None:
                    raise ValueError(
                        f"{what}: shape {info.shape} has no K/V dimension of size 2 among "
                        f"its first two dims")
            if info.shape[dim] != 2:
                raise ValueError(f"{what}: dimension {dim} of shape {info.shape} is not 2 (K, V)")
            blk = 1 - dim
            for kv, name in ((0, "K"), (1, "V")):
                regions.append(_region(
                    info, f"{what} {name}", base=info.ptr + kv * info.strides[dim],
                    num_blocks=info.shape[blk], block_stride=info.strides[blk],
                    block_shape=info.shape[2:], inner_strides=info.strides[2:]))
        return cls._of_arrays(regions, layers, infos)

    @classmethod
    def cross_layer(cls, tensor: Any) -> KVLayout:
        """Layout of one tensor in which a block id spans all layers (a single region).

        Args:
            tensor: ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``
                (any shape whose first dimension is the block id works), with each block
                contiguous. One block's bytes for every layer are adjacent, so a block
                group moves in one copy.

        Raises:
            TypeError: as [`from_tensors`][].
            ValueError: as [`from_tensors`][].
        """
        info = _describe(tensor, "cross-layer tensor")
        return cls._of_arrays([_region_of(info, "cross-layer tensor")], (tensor,), (info,))

    # ------------------------------------------------------------------ properties
    @property
    def regions(self) -> tuple[KVRegion, ...]:
        return self._regions

    @property
    def num_regions(self) -> int:
        return len(self._regions)

    @property
    def num_blocks(self) -> int:
        return self._regions[0].num_blocks

    @property
    def device(self) -> Device:
        return self._regions[0].device

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id stands for (sum of ``block_bytes`` over regions)."""
        return sum(r.block_bytes for r in self._regions)

    @property
    def nbytes(self) -> int:
        """Bytes of all blocks of the pool (``num_blocks * bytes_per_block``)."""
        return self.num_blocks * self.bytes_per_block

    @property
    def is_contiguous(self) -> bool:
        """True when every region's block stride equals its block bytes."""
        return all(r.block_stride == r.block_bytes for r in self._regions)

    @property
    def tensors(self) -> tuple[object, ...]:
        """The tensors (or ``keepalive`` objects) the layout was built from.

        The layout also keeps their DLPack/buffer imports alive, which own the memory where
        the tensor does not (a raw DLPack capsule, consumed by the import).
        """
        return self._tensors

    def __repr__(self) -> str:
        return (f"KVLayout({self.num_regions} regions, {self.num_blocks} blocks x "
                f"{self.bytes_per_block} bytes, device={_device_str(self.device)!r})")
