"""The copies of a kvswitch host pool: backups of every layer and per-layer loads.

One [`AsyncSwapEngine`][] over every layer's regions does both: a backup is
one job over all regions (device -> host), a load of layer ``i`` one job over that layer's
regions only (``swap_in(..., regions=...)``), so it has its own handle and its own end
event: on CUDA the load stream waits for exactly that job before SGLang records layer
``i``'s event, and the forward pass starts layer ``i`` while later layers are still
copying. One engine means one worker thread and one CUDA stream per host pool, whatever
the number of layers (it was one engine, thread and stream per layer, plus one).

No SGLang import here; torch only through the index tensors SGLang passes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from kvswitch.adapters.sglang.extents import as_index_array, coalesce
from kvswitch.adapters.sglang.geometry import Geometry
from kvswitch.swap import AsyncSwapEngine, SwapError, SwapHandle

__all__ = ["STATS_LOG_INTERVAL_S", "LayerTransfer"]

logger = logging.getLogger(__name__)

STATS_LOG_INTERVAL_S = 60.0
"""Seconds between two INFO lines of a pool's copy counters. The first backup and the first
load are logged at once, so a server's log shows kvswitch doing the host-pool copies."""
_now = time.monotonic  # the clock of those lines (a test replaces it)


class LayerTransfer:
    """Backups and per-layer loads between SGLang's device pool and host ``kv_buffer``.

    Args:
        geometry: the layouts
            ([`build_geometry`][kvswitch.adapters.sglang.geometry.build_geometry]).
        num_workers: worker threads of the engine; None picks 0 on the host backend
            (each copy runs inline and is done when the call returns: SGLang's CPU events
            are no-ops, so nothing could wait for it later) and 1 on CUDA (one thread and
            one stream per pool: layer loads run in order on it, as SGLang issues them).

    Backend: ``host`` (memcpy) when the device buffers are CPU tensors, ``cuda`` when they
    are CUDA tensors. On CUDA the host buffer is used as SGLang allocated it (pinned by
    SGLang's ``cudaHostRegister`` when ``pin_memory=True``); kvswitch does not register it
    again.

    Failures: a copy that fails raises [`SwapError`][] from the call that
    waits for it: a backup or load on the host backend, or, for a CUDA backup or load
    (which returns once the copy is dispatched and ordered before the stream's next
    work), the next [`backup`][], [`load`][] or [`synchronize`][] after it finished.
    Bad indices raise ValueError/TypeError before anything is queued.

    Thread safety: one SGLang cache controller drives a host pool; calls from several
    threads are safe for the engine but the load-index cache assumes one caller.
    """

    def __init__(self, geometry: Geometry, *, num_workers: int | None = None):
        on_cuda = geometry.device_all.device != "cpu"
        self.backend = "cuda" if on_cuda else "host"
        workers = (1 if on_cuda else 0) if num_workers is None else num_workers
        self.geometry = geometry
        self.block_tokens = geometry.block_tokens
        kw: dict[str, Any] = {"backend": self.backend, "num_workers": workers}
        if on_cuda:
            kw["register_host"] = False
        self._engine = AsyncSwapEngine(geometry.device_all, geometry.host_all, **kw)
        # Layer i's regions in the engine's layouts (its components, in layer order).
        starts = np.cumsum([0] + [d.num_regions for d in geometry.device_layers])
        self._layer_regions = tuple(range(int(a), int(b))
                                    for a, b in zip(starts[:-1], starts[1:], strict=True))
        self._pending: list[SwapHandle] = []
        # Load-index cache (see _pairs_for_load): one key per index argument, and the
        # extents coalesced from them.
        self._load_key: tuple[Any, Any] | None = None
        self._load_pairs = np.zeros((0, 3), dtype=np.int64)
        #: Handle of the latest load job per layer (None before the first load).
        self.layer_handles: list[SwapHandle | None] = [None] * len(self._layer_regions)
        self.counters = {"backups": 0, "backup_extents": 0, "backup_copies": 0,
                         "backup_bytes": 0, "loads": 0, "load_extents": 0,
                         "load_copies": 0, "load_bytes": 0}
        self._logged_at: float | None = None

    @property
    def num_layers(self) -> int:
        return len(self._layer_regions)

    @property
    def engine(self) -> AsyncSwapEngine:
        """The engine that does every copy of this pool (backups and loads)."""
        return self._engine

    def layer_regions(self, layer: int) -> range:
        """Region indices of layer ``layer`` in [`engine`][]'s layouts."""
        return self._layer_regions[layer]

    # ------------------------------------------------------------------ copies
    def backup(self, host_indices: Any, device_indices: Any, *, after: Any = None) -> SwapHandle:
        """Copy every layer of device slots ``device_indices`` to host slots
        ``host_indices``.

        SGLang takes a backup as done when its write stream passes the point after this
        call. With a stream (CUDA) the copies start after that stream's queued work and
        its later work waits for them (``swap_out(after=, before=)``): the call returns
        once the job is dispatched, without a host wait. Without one (the host backend,
        or no stream) it returns once the bytes are in the host pool.

        Args:
            host_indices: host token slots ``[n]`` (torch tensor, NumPy array or ints).
            device_indices: device token slots ``[n]``.
            after: CUDA only: SGLang's current (write) stream, whose queued work (the
                model's writes) the copies start after and whose later work waits for them.

        Returns:
            The job's [`SwapHandle`][] (finished unless ``after`` is a stream).

        Raises:
            SwapError: the copy failed (host backend, or no stream), or an earlier copy did.
            ValueError: bad indices (lengths differ, not page-aligned, out of range); nothing
                copied.
            TypeError: bad indices (lengths differ, not page-aligned, out of range); nothing copied.
        """
        self.raise_failed()
        pairs = coalesce(as_index_array(device_indices, "device_indices"),
                         as_index_array(host_indices, "host_indices"), self.block_tokens)
        handle = self._engine.swap_out(pairs, after=after, before=after)
        if after is None:
            handle.wait()
        else:
            self._pending.append(handle)
        c = self.counters
        c["backups"] += 1
        c["backup_extents"] += int(pairs.shape[0])
        c["backup_copies"] += int(handle.num_copies)
        c["backup_bytes"] += int(handle.nbytes)
        self._log_counters("first backup" if c["backups"] == 1 else "")
        return handle

    def load(self, host_indices: Any, device_indices: Any, layer: int, *,
             stream: Any = None) -> SwapHandle:
        """Copy one layer of host slots ``host_indices`` to device slots
        ``device_indices``.

        On the host backend the copy is done when this returns. On CUDA it returns once
        the job is queued, after ``stream``'s queued work, and ``stream``'s later work
        (SGLang's per-layer event) waits for it.

        Args:
            host_indices: host token slots ``[n]``.
            device_indices: device token slots ``[n]``; the same slots for every layer
                of one load are coalesced once (NumPy arrays, lists and CPU tensors are
                compared by content, so a buffer rewritten in place is coalesced again;
                a CUDA tensor is matched by identity and ``_version`` until the last
                layer's load, which drops the cache).
            layer: layer index in ``[0, num_layers)``.
            stream: CUDA only: SGLang's load stream (current stream of the call).

        Returns:
            The job's [`SwapHandle`][] (also in ``layer_handles``).

        Raises:
            SwapError: this (host backend) or an earlier copy failed.
            ValueError: layer out of range or bad indices; nothing queued.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside [0, {self.num_layers})")
        self.raise_failed()
        pairs = self._pairs_for_load(host_indices, device_indices)
        if layer == self.num_layers - 1:
            # The last layer ends a load batch: forget its indices (and stop keeping
            # SGLang's index tensors alive).
            self._load_key = None
        handle = self._engine.swap_in(pairs, after=stream, before=stream,
                                      regions=self._layer_regions[layer])
        self.layer_handles[layer] = handle
        c = self.counters
        c["loads"] += 1
        c["load_extents"] += int(pairs.shape[0])
        if self.backend == "host":
            handle.wait()
        else:
            self._pending.append(handle)
        c["load_copies"] += int(handle.num_copies)
        c["load_bytes"] += int(handle.nbytes)
        self._log_counters("first load" if c["loads"] == 1 else "")
        return handle

    def _log_counters(self, first: str) -> None:
        """One INFO line of the counters: at ``first`` (a first backup or load), else at
        most every [`STATS_LOG_INTERVAL_S`][] seconds."""
        now = _now()
        if not first and self._logged_at is not None and \
                now - self._logged_at < STATS_LOG_INTERVAL_S:
            return
        self._logged_at = now
        c = self.counters
        logger.info("kvswitch host pool copies%s: %d backup(s) device -> host (%d extents, "
                    "%d copies, %d bytes); %d layer load(s) host -> device (%d extents, "
                    "%d copies, %d bytes); %s backend",
                    f" ({first})" if first else "", c["backups"], c["backup_extents"],
                    c["backup_copies"], c["backup_bytes"], c["loads"], c["load_extents"],
                    c["load_copies"], c["load_bytes"], self.backend)

    def _pairs_for_load(self, host_indices: Any, device_indices: Any) -> np.ndarray:
        """The extents of one layer's load, coalesced once per load batch.

        Each index argument is keyed on its content (a copy of its int64 slots), except a
        CUDA tensor, keyed on identity and ``_version`` (reading its content would cost a
        device-to-host copy per layer, which the cache exists to avoid); [`load`][]
        drops the cache after the last layer, so such a key never outlives one batch.
        """
        keys = (_index_key(host_indices, "host_indices"),
                _index_key(device_indices, "device_indices"))
        last = self._load_key
        if last is not None and all(map(_same_key, last, keys)):
            return self._load_pairs
        arrays = [k if isinstance(k, np.ndarray) else as_index_array(k[0], what)
                  for k, what in zip(keys, ("host_indices", "device_indices"), strict=True)]
        pairs = coalesce(arrays[0], arrays[1], self.block_tokens)
        # Copies: the caller may rewrite its arrays in place before the next call.
        self._load_key = tuple(k.copy() if isinstance(k, np.ndarray) else k for k in keys)
        self._load_pairs = pairs
        return pairs

    # ------------------------------------------------------------------ failures
    def raise_failed(self) -> None:
        """Raise [`SwapError`][] for a finished CUDA load that failed (each
        failure once); forget finished successful ones."""
        if not self._pending:
            return
        still, failed = [], []
        for h in self._pending:
            if not h.done():
                still.append(h)
            elif h.error:
                failed.append(h)
        self._pending = still
        if failed:
            raise SwapError("kvswitch: a HiCache load failed; the device KV of that load is "
                            "invalid: " + "; ".join(h.error for h in failed))

    def synchronize(self) -> None:
        """Wait for every queued copy; raise [`SwapError`][] if one failed."""
        self._engine.synchronize()
        self.raise_failed()

    def close(self) -> None:
        """Finish queued copies and stop the engine's worker (idempotent)."""
        self._engine.close()

    def stats(self) -> dict[str, Any]:
        """Counters: backups/loads, their extents, copies (engine copies: extents x
        regions) and bytes, plus ``block_tokens`` and ``backend``."""
        return {**self.counters, "block_tokens": self.block_tokens, "backend": self.backend}


def _index_key(indices: Any, what: str) -> Any:
    """Cache key of one load index argument: ``(tensor, _version)`` for a CUDA tensor, else
    its slots as an int64 array (a view of the caller's memory where no conversion is
    needed; the cache stores a copy)."""
    device = getattr(indices, "device", None)
    if device is not None and getattr(device, "type", "cpu") != "cpu" and hasattr(
            indices, "_version"):
        return (indices, indices._version)
    return as_index_array(indices, what)


def _same_key(a: Any, b: Any) -> bool:
    """Whether two [`_index_key`][] results name the same slots."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                and a.shape == b.shape and bool(np.array_equal(a, b)))
    return a[0] is b[0] and a[1] == b[1]
