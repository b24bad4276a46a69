"""SGLang HiCache host pools whose device <-> host copies are kvswitch's.

[`KvswitchMHATokenToKVPoolHost`][] and [`KvswitchMLATokenToKVPoolHost`][] are
SGLang's own host pools (same buffers, allocator, page accessors, storage hooks) with the
two transfer methods replaced: ``backup_from_device_all_layer`` and
``load_to_device_per_layer`` copy straight into / out of SGLang's ``kv_buffer`` through
kvswitch ([`LayerTransfer`][]): extents of pages
(or tokens), one copy per extent and region, on kvswitch's host (memcpy) or CUDA backend.
SGLang's ``--hicache-io-backend`` (``kernel``/``direct``) only decides where SGLang puts
the index tensors; kvswitch copies either way.

Imports torch and SGLang (``pip install ".[sglang]"``); tested with sglang 0.5.23.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

from kvswitch.adapters.sglang.geometry import SUPPORTED_LAYOUTS, build_geometry
from kvswitch.adapters.sglang.transfer import LayerTransfer

__all__ = ["KvswitchMHATokenToKVPoolHost", "KvswitchMLATokenToKVPoolHost"]

logger = logging.getLogger(__name__)


def _check_layout(pool: Any) -> None:
    if pool.layout not in SUPPORTED_LAYOUTS:
        raise ValueError(
            f"kvswitch host pool: --hicache-mem-layout {pool.layout!r} is not supported; "
            f"use one of {', '.join(SUPPORTED_LAYOUTS)} (or SGLang's own host pool)")


def _stream_of(transfer: LayerTransfer) -> Any:
    """SGLang's current (load or write) stream on CUDA, else None."""
    if transfer.backend != "cuda":
        return None
    return torch.cuda.current_stream()


def _unpinned_on_cpu(base: type, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The constructor arguments with ``pin_memory=False`` when the device pool is on the
    CPU: SGLang pins with ``cudaHostRegister``, which fails without a CUDA driver, and a
    CPU "device" pool gains nothing from pinned memory."""
    bound = inspect.signature(base.__init__).bind(None, *args, **kwargs)
    info = bound.arguments["buffer_info"]
    device = getattr(info, "device", None)
    if getattr(device, "type", None) == "cpu" and bound.arguments.get("pin_memory", True):
        bound.arguments["pin_memory"] = False
        logger.info("kvswitch host pool: device pool on the CPU, host pool not pinned")
    return bound.args[1:], bound.kwargs


class _KvswitchCopies:
    """Shared part of the kvswitch host pools: the transfer object and its life cycle."""

    kvswitch: LayerTransfer

    def _init_kvswitch(self, device_buffers: list[tuple[Any, ...]], components: int) -> None:
        self.kvswitch = LayerTransfer(build_geometry(
            device_buffers=device_buffers, kv_buffer=self.kv_buffer, layout=self.layout,
            page_size=self.page_size, components=components))
        if self.kvswitch.backend == "cuda" and not self.pin_memory:
            logger.warning("kvswitch host pool: pin_memory=False on CUDA; copies from "
                           "pageable memory are synchronous and several times slower")
        logger.info("kvswitch host pool: %s layout, %d layers, %d token(s) per block, %s "
                    "backend", self.layout, self.kvswitch.num_layers,
                    self.kvswitch.block_tokens, self.kvswitch.backend)

    def kvswitch_synchronize(self) -> None:
        """Wait for every kvswitch copy of this pool; raise SwapError if one failed."""
        self.kvswitch.synchronize()

    def destroy(self) -> None:
        transfer = getattr(self, "kvswitch", None)
        if transfer is not None:
            transfer.close()
        super().destroy()  # type: ignore[misc]


class KvswitchMHATokenToKVPoolHost(_KvswitchCopies, MHATokenToKVPoolHost):
    """SGLang's ``MHATokenToKVPoolHost`` with kvswitch copies.

    Takes SGLang's constructor arguments (``buffer_info`` of the device pool,
    ``host_to_device_ratio``, ``host_size``, ``page_size``, ``layout``, ``pin_memory``,
    ``device`` and the keyword-only ones); ``pin_memory`` is forced to False when the
    device pool is on the CPU (SGLang pins through CUDA). Device buffers must be NHD
    (SGLang's default; ``SGLANG_USE_HND_KVCACHE`` is refused) with
    ``head_dim == v_head_dim``.

    Raises:
        ValueError: a layout other than ``layer_first``, ``page_first``,
            ``page_first_direct`` (before any host memory is allocated), a device pool
            layout other than NHD, or buffers kvswitch cannot describe.
    """

    def init_kv_buffer(self):  # called by SGLang's __init__ before any allocation
        _check_layout(self)
        layout = getattr(self._buffer_infos[0].buffers.layout, "value", "nhd")
        if layout != "nhd":
            raise ValueError(f"kvswitch host pool: device KV layout {layout!r} is not "
                             f"supported (NHD only)")
        return super().init_kv_buffer()

    def __init__(self, *args: Any, **kwargs: Any):
        args, kwargs = _unpinned_on_cpu(MHATokenToKVPoolHost, args, kwargs)
        super().__init__(*args, **kwargs)
        self._init_kvswitch(list(zip(self.device_k_buffers, self.device_v_buffers,
                                     strict=True)), components=2)

    def backup_from_device_all_layer(self, device_pool, host_indices, device_indices,
                                     io_backend):
        """Copy every layer of ``device_indices`` to ``host_indices`` (token slots).
        ``io_backend`` is ignored.

        On the CPU returns once the bytes are in the host pool. On CUDA returns once the
        copy is dispatched: it starts after the current (write) stream's queued work, and
        that stream's later work (SGLang's backup-done event) waits for it.

        Raises:
            kvswitch.SwapError: this copy (CPU) or an earlier one failed.
            ValueError: bad indices; nothing copied.
        """
        self.kvswitch.backup(host_indices, device_indices,
                             after=_stream_of(self.kvswitch))

    def load_to_device_per_layer(self, device_pool, host_indices, device_indices, layer_id,
                                 io_backend, *, is_draft: bool = False):
        """Copy layer ``layer_id`` of ``host_indices`` to ``device_indices``. Layers past
        the target layers are skipped unless ``is_draft`` (as SGLang's own pool does).

        On CUDA returns once queued; the current (load) stream's later work, i.e. SGLang's
        per-layer event, waits for this layer's copy only.

        Raises:
            kvswitch.SwapError: this copy (host backend) or an earlier one failed.
            ValueError: bad indices; nothing queued.
        """
        if not is_draft and not 0 <= layer_id < self.target_layer_num:
            return
        self.kvswitch.load(host_indices, device_indices, layer_id,
                           stream=_stream_of(self.kvswitch))


class KvswitchMLATokenToKVPoolHost(_KvswitchCopies, MLATokenToKVPoolHost):
    """SGLang's ``MLATokenToKVPoolHost`` with kvswitch copies (one latent-KV region per
    layer). Same constructor as SGLang's.

    Supported: plain MLA device pools (one ``[rows, 1, kv_cache_dim]`` tensor per layer),
    packed draft layers, the three layouts. Refused (ValueError at construction):
    allocator-only (dummy) pools, decode context parallelism (``dcp_size > 1``),
    layer-sharded pools, split (DSA index) buffers.
    """

    def init_kv_buffer(self):
        _check_layout(self)
        if self.dcp_size != 1 or self._layer_shard_enabled:
            raise ValueError("kvswitch MLA host pool: decode context parallelism and layer "
                             "sharding are not supported")
        if self._native_buffers is not None:
            raise ValueError("kvswitch MLA host pool: split (indexer) device buffers are "
                             "not supported")
        return super().init_kv_buffer()

    def __init__(self, *args: Any, **kwargs: Any):
        args, kwargs = _unpinned_on_cpu(MLATokenToKVPoolHost, args, kwargs)
        super().__init__(*args, **kwargs)
        if self._is_dummy:
            raise ValueError("kvswitch MLA host pool: allocator-only (dummy) pools hold no "
                             "KV to copy; use SGLang's MLATokenToKVPoolHost")
        by_host = sorted((host, self._buffer_index_by_layer[layer])
                         for layer, host in self._host_layer_by_controller.items())
        # load() passes the host layer index as LayerTransfer's position in this list.
        hosts = [host for host, _ in by_host]
        if hosts != list(range(len(hosts))):
            raise ValueError("kvswitch MLA host pool: host layer indices must be exactly "
                             f"0..{len(hosts) - 1}, got {hosts}")
        self._init_kvswitch([(self.device_kv_buffers[i],) for _, i in by_host],
                            components=1)

    def backup_from_device_all_layer(self, device_pool, host_indices, device_indices,
                                     io_backend):
        """As [`KvswitchMHATokenToKVPoolHost.backup_from_device_all_layer`][]."""
        self.kvswitch.backup(host_indices, device_indices,
                             after=_stream_of(self.kvswitch))

    def load_to_device_per_layer(self, device_pool, host_indices, device_indices, layer_id,
                                 io_backend, *, is_draft: bool = False):
        """As [`KvswitchMHATokenToKVPoolHost.load_to_device_per_layer`][]; ``layer_id``
        is SGLang's controller layer id, mapped to the host layer as SGLang does."""
        if not is_draft and layer_id not in self._target_layer_indices:
            return
        self.kvswitch.load(host_indices, device_indices,
                           self._host_layer_by_controller[layer_id],
                           stream=_stream_of(self.kvswitch))
