"""KVLayouts over SGLang's own KV buffers: the device pool's per-layer tensors and the
HiCache host pool's ``kv_buffer``, for each host layout SGLang offers.

SGLang 0.5.23 (``sglang/srt/mem_cache/pool_host/mha.py`` and ``mla.py``) stores a host
pool in one tensor per pool; per layer and component (K and V for MHA, the latent KV for
MLA) the token rows are:

=====================  ==========================================  ===================
``--hicache-mem-layout``  MHA ``kv_buffer`` (MLA drops the leading 2)  rows of layer ``l``
=====================  ==========================================  ===================
``layer_first``        ``[2, layers, tokens, heads, head_dim]``     contiguous
``page_first``         ``[2, tokens, layers, heads, head_dim]``     one row per token,
                                                                    ``layers`` rows apart
``page_first_direct``  ``[2, pages, layers, page, heads, head_dim]``  one page contiguous,
                                                                    pages apart
=====================  ==========================================  ===================

The device pool keeps one ``[tokens + page, heads, head_dim]`` tensor per layer and
component (NHD; rows may be strided in unified pools).

**Block = token, or page for page_first_direct.** A kvswitch block must be one run of
bytes in every region on both sides, and an extent is a run of blocks consecutive on both
sides. Counted in copies the choice makes no difference where both are possible: one copy
per region and per run of slots consecutive on both sides, whether the run is counted in
tokens or (page-aligned) in pages. A block is therefore one token for ``layer_first``
(rows contiguous: a run is one linear copy per region) and ``page_first`` (layers
interleaved token by token on the host: a run is one strided 2D copy per region), which
also copies runs that are not page-aligned (SGLang's token-granular kernels allow them,
and its CPU test fixtures produce them). ``page_first_direct`` keeps one page of one layer
contiguous and pages ``layers`` pages apart, so there a token run is not one stride: a
block is one page, and device runs must be whole, aligned pages (as SGLang's own
``direct`` kernels assume).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvswitch.layout import KVLayout, KVRegion

__all__ = ["SUPPORTED_LAYOUTS", "Geometry", "build_geometry"]

#: Host layouts the kvswitch host pool copies (``--hicache-mem-layout``).
SUPPORTED_LAYOUTS = ("layer_first", "page_first", "page_first_direct")

_RAW = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32),
        8: np.dtype(np.uint64)}


@dataclass(frozen=True)
class Geometry:
    """The layouts one kvswitch host pool copies between.

    Attributes:
        block_tokens: tokens per kvswitch block (SGLang's page size, or 1).
        device_layers: per layer, the device-side [`KVLayout`][] (one region
            per component: K, V for MHA; KV for MLA).
        host_layers: per layer, the matching host-side layout over SGLang's ``kv_buffer``.
        device_all: every layer's device regions in one layout (backups).
        host_all: every layer's host regions in one layout.
    """

    block_tokens: int
    device_layers: tuple[KVLayout, ...]
    host_layers: tuple[KVLayout, ...]
    device_all: KVLayout
    host_all: KVLayout


def _device_of(t: Any) -> str | tuple[str, int]:
    if t.device.type == "cpu":
        return "cpu"
    if t.device.type == "cuda":
        return ("cuda", int(t.device.index or 0))
    raise ValueError(f"kvswitch copies CPU or CUDA tensors, got a tensor on {t.device}")


def _check_rows(t: Any, lead: int, what: str) -> int:
    """Bytes of one row (the dims after the first ``lead`` ones), which must be packed."""
    item = t.element_size()
    expected = item
    for size, stride in zip(reversed(t.shape[lead:]), reversed(t.stride()[lead:]),
                            strict=True):
        if size != 1 and stride * item != expected:
            raise ValueError(f"{what}: a row (shape {tuple(t.shape[lead:])}, strides "
                             f"{tuple(t.stride()[lead:])}) is not contiguous")
        expected *= size
    return expected


def _region(t: Any, *, tokens_per_block: int, what: str) -> KVRegion:
    """A region over a token-major view ``[tokens, *row]``: one token per block, or
    ``tokens_per_block`` packed rows per block."""
    item = t.element_size()
    dtype = str(t.dtype).removeprefix("torch.")
    if tokens_per_block == 1 or t.dim() < 2:
        row = _check_rows(t, 1, what)
        block_bytes, stride, n = row, t.stride(0) * item, t.shape[0]
        shape = tuple(t.shape[1:])
    else:
        row = _check_rows(t, 1, what)
        if t.stride(0) * item != row:
            raise ValueError(f"{what}: rows are strided ({t.stride(0) * item} bytes apart, "
                             f"{row} bytes each), so a page is not one run of bytes")
        block_bytes = stride = row * tokens_per_block
        n = t.shape[0] // tokens_per_block
        shape = (tokens_per_block, *t.shape[1:])
    return KVRegion(base=int(t.data_ptr()), block_stride=int(stride),
                    block_bytes=int(block_bytes), num_blocks=int(n), device=_device_of(t),
                    block_shape=tuple(int(s) for s in shape), dtype=dtype,
                    numpy_dtype=_RAW.get(item, np.dtype(np.uint8)))


def _paged_region(t: Any, what: str) -> KVRegion:
    """A region over ``[pages, page, *row]`` where one page (``[page, *row]``) is packed."""
    item = t.element_size()
    block_bytes = _check_rows(t, 1, what)
    return KVRegion(base=int(t.data_ptr()), block_stride=int(t.stride(0) * item),
                    block_bytes=int(block_bytes), num_blocks=int(t.shape[0]),
                    device=_device_of(t), block_shape=tuple(int(s) for s in t.shape[1:]),
                    dtype=str(t.dtype).removeprefix("torch."),
                    numpy_dtype=_RAW.get(item, np.dtype(np.uint8)))


def _host_views(kv_buffer: Any, layout: str, layer: int, components: int) -> list[Any]:
    """Per-component host views of one layer: ``[tokens, *row]`` or ``[pages, page, *row]``."""
    parts = [kv_buffer[c] for c in range(components)] if components > 1 else [kv_buffer]
    if layout == "layer_first":
        return [p[layer] for p in parts]
    if layout in ("page_first", "page_first_direct"):
        return [p[:, layer] for p in parts]
    raise ValueError(f"host layout {layout!r} is not supported by kvswitch; supported: "
                     f"{', '.join(SUPPORTED_LAYOUTS)}")


def build_geometry(*, device_buffers: Sequence[Sequence[Any]], kv_buffer: Any, layout: str,
                   page_size: int, components: int) -> Geometry:
    """Layouts over SGLang's device buffers and host ``kv_buffer``.

    Args:
        device_buffers: per layer, the component tensors ``[rows, *row]`` of the device
            pool (``(k, v)`` for MHA, ``(kv,)`` for MLA); CPU or CUDA.
        kv_buffer: the host pool's ``kv_buffer`` (CPU), shaped as in the module table.
        layout: ``layer_first``, ``page_first`` or ``page_first_direct``.
        page_size: SGLang's page size in tokens (>= 1).
        components: 2 (MHA: leading K/V dim in ``kv_buffer``) or 1 (MLA).

    Returns:
        The [`Geometry`][]; its layouts keep the tensors alive.

    Raises:
        ValueError: an unsupported layout, non-contiguous rows, host and device rows of
            different sizes, or a device on neither CPU nor CUDA.
    """
    if layout not in SUPPORTED_LAYOUTS:
        raise ValueError(f"host layout {layout!r} is not supported by kvswitch; supported: "
                         f"{', '.join(SUPPORTED_LAYOUTS)}")
    if kv_buffer.device.type != "cpu":
        raise ValueError(f"the host pool must be in CPU memory, got {kv_buffer.device}")
    device_packed = all(
        b.stride(0) * b.element_size() == _check_rows(b, 1, f"device layer {i}")
        for i, layer in enumerate(device_buffers) for b in layer)
    paged_host = layout == "page_first_direct"
    if page_size > 1 and paged_host and not device_packed:
        raise ValueError("page_first_direct needs packed device rows (a page is one run of "
                         "bytes on the host); this device pool's rows are strided")
    block_tokens = page_size if paged_host else 1
    dev_layers, host_layers = [], []
    for layer, comps in enumerate(device_buffers):
        if len(comps) != components:
            raise ValueError(f"device layer {layer} has {len(comps)} buffers, expected "
                             f"{components}")
        views = _host_views(kv_buffer, layout, layer, components)
        d_regions, h_regions = [], []
        for c, (dev, host) in enumerate(zip(comps, views, strict=True)):
            what = f"layer {layer} component {c}"
            d = _region(dev, tokens_per_block=block_tokens, what=f"device {what}")
            if paged_host:
                h = (_paged_region(host, f"host {what}") if block_tokens > 1
                     else _region(host.reshape(-1, *host.shape[2:]), tokens_per_block=1,
                                  what=f"host {what}"))
            else:
                h = _region(host, tokens_per_block=block_tokens, what=f"host {what}")
            if d.block_bytes != h.block_bytes:
                raise ValueError(f"{what}: a block is {d.block_bytes} bytes on the device and "
                                 f"{h.block_bytes} on the host (head count, head size or "
                                 f"dtype differ)")
            d_regions.append(d)
            h_regions.append(h)
        dev_layers.append(KVLayout(d_regions, keepalive=tuple(comps)))
        host_layers.append(KVLayout(h_regions, keepalive=(kv_buffer,)))
    if not dev_layers:
        raise ValueError("the device pool has no layers")
    device_all = KVLayout([r for lay in dev_layers for r in lay.regions],
                          keepalive=tuple(b for layer in device_buffers for b in layer))
    host_all = KVLayout([r for lay in host_layers for r in lay.regions],
                        keepalive=(kv_buffer,))
    return Geometry(block_tokens=block_tokens, device_layers=tuple(dev_layers),
                    host_layers=tuple(host_layers), device_all=device_all, host_all=host_all)
