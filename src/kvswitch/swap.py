"""AsyncSwapEngine: GPU <-> CPU KV swaps dispatched from C++ worker threads.

FastSwitch (arXiv 2411.18424), section 3.2 "Multithreading Swap Manager": the Python call
only validates a job and queues it; C++ worker threads issue the copy API calls (never
under the GIL) and end each job with an event. A worker keeps at most ``sync_every``
jobs in flight on its stream (the paper synchronizes after that many dispatches) so the
inference stream's own copies are not stuck behind a long swap queue; it never blocks on
the GPU while it could take a new job. Each in-flight job remembers the device blocks it
touches, so that a new allocation over them waits for exactly those jobs
([`AsyncSwapEngine.wait_blocks`][], KV cache conflict resolution).
[`AsyncSwapEngine.migrate`][] moves blocks device -> device within the device layout
(GPU-pool compaction), ordered against swaps by the same conflict tracking.

Backends:

* ``"cuda"``: CUDA driver API loaded at run time (``libcuda.so.1``), primary context of
  the device layout's GPU (shared with PyTorch/CuPy), one non-blocking stream per worker;
  all linear copies of a job in one ``cuMemcpyBatchAsync`` where the driver has it (CUDA
  >= 12.8), strided extents as ``cuMemcpy2DAsync``. The host pool must be page-locked for
  copies to be asynchronous: the engine checks it (``cuPointerGetAttribute``), page-locks
  pageable memory itself (``cuMemHostRegister``) and warns when it cannot.
* ``"host"``: ``memcpy`` on the worker threads, for host-memory layouts (tests, CPU-only
  machines, benchmarks of the dispatch path). ``num_workers=0`` runs every job inline in
  the calling thread (deterministic).

Example (vLLM-style per-layer KV tensors on the GPU)::

    layout = kvswitch.KVLayout.from_vllm(kv_caches)      # 2 regions per layer
    pool = kvswitch.HostKVPool(layout, num_blocks=4096)  # pinned when a driver answers
    engine = kvswitch.AsyncSwapEngine(layout, pool)      # backend="auto"
    # device blocks [120, 180) -> host blocks [0, 60), after the compute stream's writes
    out = engine.swap_out(np.array([[120, 0, 60]]), after=torch.cuda.current_stream())
    ...
    engine.wait_blocks(new_block_ids)  # before reusing blocks an in-flight job touches
    # host blocks [0, 60) -> device blocks [300, 360), visible to the compute stream
    back = engine.swap_in([[0, 300, 60]], before=torch.cuda.current_stream())
    for handle in engine.poll():       # jobs finished since the last poll
        handle.wait()                  # raises SwapError if the job failed
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvswitch import _core
from kvswitch._validate import INT32_MAX, INT64_MAX, as_count
from kvswitch.host_pool import HostKVPool
from kvswitch.layout import KVLayout

__all__ = ["AsyncSwapEngine", "CudaEvent", "EngineClosedError", "SwapError", "SwapHandle"]

#: A job failed inside a worker (e.g. a CUDA error); raised by ``SwapHandle.wait()``.
SwapError = _core.SwapError
#: The engine is closed; raised by ``swap_out``/``swap_in``/``migrate`` after ``close()``.
EngineClosedError = _core.EngineClosedError
#: Handle of one queued job: ``done()``, ``wait(timeout=None) -> bool`` (GIL released;
#: None or ``inf``: no limit; raises SwapError if the job failed, ValueError for a negative
#: or NaN timeout), ``nbytes``, ``num_copies``, ``elapsed_s`` (seconds, None until done),
#: ``direction`` (``"out"``/``"in"``/``"migrate"``), ``id``, ``error`` (``""`` unless failed) and
#: ``root_job_id`` (the job whose failure made this one fail; None unless failed).
SwapHandle = _core.SwapHandle

_NONE, _STREAM, _EVENT = 0, 1, 2
# Job directions as the C++ engine numbers them (Direction in swap_engine.hpp).
_OUT, _IN, _MIGRATE = 0, 1, 2


@dataclass(frozen=True)
class CudaEvent:
    """A raw ``CUevent``/``cudaEvent_t`` handle, for ``after=`` when the event comes from
    neither PyTorch (``torch.cuda.Event`` is recognised) nor CuPy."""

    handle: int


def _stream_ref(obj: Any, what: str) -> tuple[int, int]:
    """(kind, raw handle) of a stream or event given as ``after=``/``before=``."""
    if obj is None:
        return _NONE, 0
    if isinstance(obj, CudaEvent):
        return _EVENT, int(obj.handle)
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        return _STREAM, int(obj)
    if hasattr(obj, "__cuda_stream__"):  # CUDA stream protocol: (version, handle)
        return _STREAM, int(obj.__cuda_stream__()[1])
    if hasattr(obj, "cuda_event"):  # torch.cuda.Event
        return _EVENT, int(obj.cuda_event)
    if hasattr(obj, "cuda_stream"):  # torch.cuda.Stream
        return _STREAM, int(obj.cuda_stream)
    module = type(obj).__module__ or ""
    if module.startswith("cupy") and hasattr(obj, "ptr"):
        kind = _EVENT if type(obj).__name__ == "Event" else _STREAM
        return kind, int(obj.ptr)
    raise TypeError(
        f"{what} must be a CUDA stream (object with __cuda_stream__ or .cuda_stream, or an "
        f"int handle) or an event (torch.cuda.Event, cupy Event, kvswitch.CudaEvent), got "
        f"{type(obj).__name__}")


def _stream_args(after: Any, before: Any) -> tuple[int, int, int, int]:
    """(after kind, after handle, before kind, before handle) as the engine's submit() and
    check() take them; ``before`` is checked first."""
    b_kind, b_handle = _stream_ref(before, "before")
    return (*_stream_ref(after, "after"), b_kind, b_handle)


def _region_range(regions: range | None, num_regions: int) -> tuple[int, int]:
    """(begin, end) of a ``regions=`` argument as the engine's submit() takes it; (0, -1):
    every region."""
    if regions is None:
        return 0, -1
    if not isinstance(regions, range):
        raise TypeError(f"regions must be a range of region indices, got "
                        f"{type(regions).__name__}")
    if regions.step != 1 or not regions or regions.start < 0 or regions.stop > num_regions:
        raise ValueError(f"regions must be a non-empty range with step 1 within "
                         f"[0, {num_regions}), got {regions}")
    return regions.start, regions.stop


def _as_int64(values: Any, what: str) -> np.ndarray:
    """``values`` as an aligned, C-contiguous int64 array (a copy only where needed).

    Raises TypeError for non-integers (bools included) and ValueError for integers outside
    int64: NumPy turns Python ints past 2**63 into an object array.
    """
    arr = np.asarray(values)
    if arr.dtype == object:
        flat = arr.reshape(-1)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in flat):
            raise TypeError(f"{what} must be integers, got {arr.dtype} values")
        bad = next((int(v) for v in flat if not -INT64_MAX - 1 <= int(v) <= INT64_MAX), None)
        if bad is not None:
            raise ValueError(f"{what}: {bad} is out of range (int64)")
        arr = arr.astype(np.int64)
    elif arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > INT64_MAX:
        raise ValueError(f"{what}: {int(arr.max())} is out of range (int64)")
    # "A": aligned, so the submit's fast path (and NumPy's own math) never sees a
    # C-contiguous view at an odd byte offset.
    return np.require(arr, dtype=np.int64, requirements=("C", "A"))


_INT64 = np.dtype(np.int64)


def _as_pairs(pairs: Any) -> np.ndarray:
    # Fast path, no conversion: an int64 [n, 3]-like array already C-contiguous and aligned
    # (``carray``: also writeable; a read-only one takes the path below, which returns it
    # as it is). Comparing with a dtype instance is cheaper than with ``np.int64``.
    if (type(pairs) is np.ndarray and pairs.ndim == 2 and pairs.dtype == _INT64
            and pairs.flags.carray):
        return pairs
    arr = np.asarray(pairs)
    if arr.size == 0 and arr.ndim <= 2:
        return np.zeros((0, 3), dtype=np.int64)
    arr = _as_int64(arr, "pairs (src_start, dst_start, length)")
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"pairs must have shape [n, 3] (src_start, dst_start, length), got "
                         f"{list(arr.shape)}")
    return arr


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _device_name(device: Any) -> str:
    return device if isinstance(device, str) else f"{device[0]}:{device[1]}"


class AsyncSwapEngine:
    """Swaps KV blocks between a device layout and a host pool on C++ worker threads.

    Args:
        device_layout: the GPU pool ([`KVLayout`][]); on the host backend a
            layout in host memory standing in for it.
        host_pool: a [`HostKVPool`][] made from ``device_layout`` (or any
            host-memory KVLayout with the same regions).
        backend: ``"auto"`` (cuda when a CUDA driver loads, a device answers and the device
            layout is on that device; else host), ``"cuda"`` or ``"host"``.
        num_workers: C++ worker threads (>= 0, at most 64). 0 runs each job inline in the
            calling thread (GIL released) and returns a finished handle.
        sync_every: at most this many jobs in flight on a worker's stream (paper 3.2
            synchronizes after that many dispatches; >= 1). No effect on the host backend
            (copies are synchronous).
        max_queue: jobs that may wait for a worker; ``swap_out``/``swap_in`` block (GIL
            released) while the queue is full.
        before_wait: cuda only; how a ``before=`` consumer stream of [`swap_in`][] waits
            for the copies. ``"event"`` (default): once a worker has issued the job, the
            stream waits on its end event (``cuStreamWaitEvent``); ``swap_in`` returns
            after that dispatch: at once when a worker is free, else when a worker's
            stream has fewer than ``sync_every`` jobs in flight or the job's earlier
            conflicting jobs are dispatched. Safe everywhere, including
            ``CUDA_DEVICE_MAX_CONNECTIONS=1``. ``"flag"``: the stream waits on a flag the
            swap stream sets (``cuStreamWaitValue32``), enqueued before ``swap_in``
            returns at once. That wait sits in the consumer's queue ahead of the copies,
            which deadlocks where the consumer shares a hardware queue with a swap stream:
            refused with ``CUDA_DEVICE_MAX_CONNECTIONS=1`` or without stream memory
            operations, and possible when more streams are active than the device has
            queues (8 by default). An opt-in for loops that must not wait for a worker.
        register_host: cuda only; page-lock a pageable host pool with ``cuMemHostRegister``
            until [`close`][] (default), so copies stay asynchronous. ``False`` leaves it
            pageable (``stats()["host_memory"] == "pageable"``, no warning): a control for
            benchmarks, or memory the caller must not have locked.

    Raises:
        TypeError: wrong argument types.
        ValueError: the host pool does not match the layout (region count, block bytes),
            the host pool is not in CPU memory, ``backend="host"`` with a CUDA layout,
            ``backend="cuda"`` with a host layout, or options out of range.
        RuntimeError: ``backend="cuda"`` (or ``"auto"`` with a CUDA layout) without a
            usable driver/device; the message says why.
        ValueError: ``before_wait`` not ``"event"``/``"flag"``, or ``"flag"`` where it is
            refused (see above; the message says why).

    Warns:
        RuntimeWarning: cuda backend with a host pool that is not page-locked and could not
            be registered (``register_host=True``): every copy is then synchronous and
            several times slower (``stats()["host_memory"] == "pageable"``).

    Jobs (swaps and [`migrate`][]) that touch overlapping blocks (device or host) where
    one of them writes run in submission order; others run concurrently.

    Failures: a copy that fails inside a worker (a CUDA error) is reported on its handle:
    ``handle.wait()`` raises [`SwapError`][], ``handle.error`` holds the text and
    ``handle.root_job_id`` the job that failed first. Every job queued while it was in
    flight that reads device or host blocks it was to write (read-after-write: those bytes
    were never written) fails too, without copying anything, and its error names that root
    job; a read is matched against the newest in-flight writer of each block (jobs copy
    whole blocks, so a later writer replaces what a failed one left). A job ordered after
    the failed one only because it writes blocks that one read or wrote (write-after-read,
    write-after-write: a swap-in or migration into the blocks of a failed swap-out) still
    runs after it, and runs normally. The engine stays usable.
    A call that raises (``swap_out``, ``swap_in``, ``migrate``, ``check_*``) queues nothing.

    Thread safety: every method may be called from any thread; jobs from several threads
    are ordered by submission. Waits release the GIL.
    """

    def __init__(self, device_layout: KVLayout, host_pool: HostKVPool | KVLayout, *,
                 backend: str = "auto", num_workers: int = 2, sync_every: int = 64,
                 max_queue: int = 1024, before_wait: str = "event",
                 register_host: bool = True):
        if not isinstance(device_layout, KVLayout):
            raise TypeError(f"device_layout must be a KVLayout, got "
                            f"{type(device_layout).__name__}")
        if isinstance(host_pool, HostKVPool):
            host_layout = host_pool.layout
        elif isinstance(host_pool, KVLayout):
            host_layout = host_pool
        else:
            raise TypeError(f"host_pool must be a HostKVPool (or a host KVLayout), got "
                            f"{type(host_pool).__name__}")
        num_workers = as_count(num_workers, "num_workers", minimum=0, maximum=64)
        sync_every = as_count(sync_every, "sync_every", maximum=INT32_MAX)
        max_queue = as_count(max_queue, "max_queue", maximum=INT64_MAX)
        if host_layout.device != "cpu":
            raise ValueError(f"the host pool must be in CPU memory, got "
                             f"{_device_name(host_layout.device)}")
        if host_layout.num_regions != device_layout.num_regions:
            raise ValueError(
                f"host pool does not match the device layout: {host_layout.num_regions} "
                f"regions vs {device_layout.num_regions}")
        for i, (h, d) in enumerate(zip(host_layout.regions, device_layout.regions, strict=True)):
            if h.block_bytes != d.block_bytes:
                raise ValueError(
                    f"host pool does not match the device layout: region {i} has "
                    f"{h.block_bytes} bytes per block on the host, {d.block_bytes} on the device")
        if not isinstance(register_host, bool):
            raise TypeError(f"register_host must be a bool, got {type(register_host).__name__}")
        if before_wait not in ("event", "flag"):
            raise ValueError(f"before_wait must be 'event' or 'flag', got {before_wait!r}")
        name, reason = self._select_backend(backend, device_layout)
        self._device_layout = device_layout
        self._host_pool = host_pool
        self._host_layout = host_layout
        self._backend_reason = reason
        self._before_wait = before_wait
        self._engine = _core.SwapEngineCore(device_layout._core, host_layout._core, name,
                                            num_workers, sync_every, max_queue, before_wait,
                                            register_host)
        kind, detail = self._engine.host_memory
        if kind == "pageable" and register_host:
            warnings.warn(
                f"AsyncSwapEngine: the host pool is pageable memory ({detail}): every CUDA "
                f"copy to or from it is synchronous and several times slower. Allocate it "
                f"pinned (HostKVPool(pin=True), the default) or free pinned memory.",
                RuntimeWarning, stacklevel=2)

    @staticmethod
    def _select_backend(backend: str, layout: KVLayout) -> tuple[str, str]:
        if backend not in ("auto", "cuda", "host"):
            raise ValueError(f"backend must be 'auto', 'cuda' or 'host', got {backend!r}")
        on_cuda = layout.device != "cpu"
        ordinal = layout.device[1] if on_cuda else 0
        info = _core.cuda_driver_info()
        if backend == "host":
            if on_cuda:
                raise ValueError(
                    f"backend='host' copies with memcpy and cannot reach a device layout on "
                    f"{_device_name(layout.device)}; use backend='cuda' or 'auto'")
            return "host", "backend='host' requested"
        why = _core.cuda_unavailable_reason(ordinal)
        if backend == "cuda":
            if why:
                raise RuntimeError(f"backend='cuda' is unavailable: {why}")
            if not on_cuda:
                raise ValueError("backend='cuda' needs a device layout on a CUDA device; this "
                                 "one is in host memory (use backend='host' or 'auto')")
        elif not on_cuda:
            driver = (f"CUDA driver {_version(info['driver_version'])} present"
                      if not why else f"no CUDA backend either: {why}")
            return "host", f"auto: the device layout is in host memory ({driver})"
        elif why:
            raise RuntimeError(f"the device layout is on {_device_name(layout.device)} but "
                               f"the cuda backend is unavailable: {why}")
        api = "cuMemcpyBatchAsync" if info["batch_copy"] else "cuMemcpyAsync per copy"
        return "cuda", (f"{backend}: device layout on cuda:{ordinal}, CUDA driver "
                        f"{_version(info['driver_version'])} with {info['device_count']} "
                        f"device(s); linear copies via {api}")

    # ------------------------------------------------------------------ jobs
    def swap_out(self, pairs: Any, *, after: Any = None, before: Any = None,
                 regions: range | None = None) -> SwapHandle:
        """Queue a device -> host copy of block extents; returns once queued.

        Args:
            pairs: integer array ``[n, 3]`` of ``(src_start, dst_start, length)`` in
                blocks: device blocks ``[src_start, src_start + length)`` go to host
                blocks ``[dst_start, dst_start + length)``. Rows of length 0 are skipped.
                Each row becomes one copy per region (a 2D copy when a region is strided
                and the row spans more than one block).
            after: CUDA only. A stream (object with ``__cuda_stream__`` or
                ``.cuda_stream``, or an int handle): the copies start only after the work
                queued on it so far (an event is recorded on it before this call
                returns). Or an event (``torch.cuda.Event``, CuPy event,
                [`CudaEvent`][]): the copies start after it; it must have been recorded
                (a ``torch.cuda.Event`` has no CUDA event before its first ``record()``),
                and must not be re-recorded until the handle is done.
            before: CUDA only. A stream (as ``after``) whose work queued after this call
                waits for the copies, as ``before`` of [`swap_in`][] (same
                ``before_wait`` modes, same return point): the stream that will write new
                KV into the swapped-out device blocks, so that their reuse is ordered on
                the GPU after the copies read them, instead of by [`wait_blocks`][] on
                the host. If the job fails the stream is released all the same and the
                handle raises.
            regions: copy only these regions of each extent (a ``range`` of region
                indices of the layouts, step 1), e.g. ``range(2 * i, 2 * i + 2)`` for layer
                ``i``'s K and V in a vLLM layout; default every region. The job is still
                ordered against others by the blocks it touches, whatever their regions.

        Returns:
            A [`SwapHandle`][] (finished already when ``num_workers=0``).

        Raises:
            TypeError: pairs not integers, ``after``/``before`` of an unknown type.
            ValueError: pairs not ``[n, 3]``, a value outside int64, negative length, an
                extent outside the device layout or the host pool, overlapping destination
                extents, ``after``/``before`` on the host backend, an ``after`` event never
                recorded, ``before`` an event, a stream capturing a CUDA graph, ``regions``
                empty, with a step, or past the layouts' regions. Nothing is queued.
            EngineClosedError: the engine is closed.

        A driver error while ordering the job against ``after`` does not raise: the job is
        queued as failed and its handle reports it, like a failed copy.
        """
        if after is None and before is None and regions is None:  # fast path
            return self._engine.submit(_OUT, _as_pairs(pairs), _NONE, 0, _NONE, 0)
        streams = _stream_args(after, before)  # checked before the pairs
        return self._engine.submit(_OUT, _as_pairs(pairs), *streams,
                                   *_region_range(regions, self._device_layout.num_regions))

    def check_swap_out(self, *, after: Any = None, before: Any = None) -> None:
        """Raise what [`swap_out`][] would raise for ``after``/``before`` or a closed
        engine, without queueing anything, so a caller can validate before it changes its
        own state.

        Raises:
            TypeError: ``after``/``before`` of an unknown type.
            ValueError: ``after`` or ``before`` on the host backend, ``before`` an event.
            EngineClosedError: the engine is closed.
        """
        self._engine.check(_OUT, *_stream_args(after, before))

    def swap_in(self, pairs: Any, *, before: Any = None, after: Any = None,
                regions: range | None = None) -> SwapHandle:
        """Queue a host -> device copy of block extents; returns once queued.

        Args:
            pairs: integer array ``[n, 3]`` of ``(src_start, dst_start, length)`` in
                blocks: host blocks ``[src_start, +length)`` go to device blocks
                ``[dst_start, +length)``. See [`swap_out`][].
            before: CUDA only. A consumer stream (as ``after`` in [`swap_out`][]): work
                queued on it after this call waits for the copies. With
                ``before_wait="event"`` (default) this call returns once a worker has
                issued the copies and the stream waits on the job's end event; with
                ``"flag"`` it returns at once and the stream waits on a flag the swap
                stream sets (see the class). If the job fails, the stream is released
                all the same (it never hangs) and the handle raises: the blocks then
                hold no valid data. If the stream cannot be ordered (a driver error),
                this call waits for the copies on the host instead.
            after: CUDA only, as in [`swap_out`][]: the copies start only after the
                work queued on that stream (or the event) so far. Needed when the
                destination blocks were just freed by a sequence whose kernels may still
                be reading them (a write-after-read on the GPU the engine cannot see).
            regions: as in [`swap_out`][]: only these regions (one layer's, for a
                layer-by-layer load whose handle and ``before`` ordering are per layer).

        Returns / Raises: as [`swap_out`][] (``before`` must be a stream, not an event,
        and not one capturing a CUDA graph).
        """
        if before is None and after is None and regions is None:  # fast path
            return self._engine.submit(_IN, _as_pairs(pairs), _NONE, 0, _NONE, 0)
        streams = _stream_args(after, before)  # checked before the pairs
        return self._engine.submit(_IN, _as_pairs(pairs), *streams,
                                   *_region_range(regions, self._device_layout.num_regions))

    def check_swap_in(self, *, before: Any = None, after: Any = None) -> None:
        """Raise what [`swap_in`][] would raise for ``before``/``after`` or a closed
        engine, without queueing anything. Raises: as [`check_swap_out`][]."""
        self._engine.check(_IN, *_stream_args(after, before))

    def migrate(self, pairs: Any, *, after: Any = None, before: Any = None) -> SwapHandle:
        """Queue a device -> device copy of block extents within the device layout.

        For GPU-pool compaction: moving blocks merges free space. On a GPU the copies run
        at HBM bandwidth (tens of times PCIe's), so moving a block costs a few percent of
        swapping it. The job is ordered by the engine's conflict tracking like a swap: it
        reads its source device blocks and writes its destination device blocks, so it
        runs after earlier jobs that write its sources or touch its destinations (a
        swap-in into its sources, a swap-out of its destinations), and later jobs that
        touch its destinations, or write its sources, run after it.
        [`wait_blocks`][] covers both its source and its destination blocks. If an
        earlier job that writes its sources fails, it fails too without copying; one
        that fails while only reading or writing its destinations does not fail it (see
        the class).

        Args:
            pairs: integer array ``[n, 3]`` of ``(src_start, dst_start, length)`` in
                device blocks: device blocks ``[src_start, +length)`` are copied to device
                blocks ``[dst_start, +length)``. Rows of length 0 are skipped. Each row
                becomes one copy per region (a 2D copy when a region is strided and the
                row spans more than one block). Destination extents must not overlap each
                other, and no source extent may overlap any destination extent (of its own
                row or another): the copies of one job run in no set order. A chain of
                moves (``a -> b`` then ``b -> c``, or a shift of an extent onto itself) is
                submitted as separate migrations in that order; the engine orders them.
                Sources may overlap each other (a block copied to two places).
            after: CUDA only, as in [`swap_in`][]: the copies start only after the work
                queued on that stream (or the event) so far, e.g. kernels still reading
                the destination blocks or writing the source blocks.
            before: CUDA only, as in [`swap_in`][]: a consumer stream whose later work
                waits for the copies (attention reading the moved blocks at their new
                ids).

        Returns:
            A [`SwapHandle`][] with ``direction == "migrate"`` (finished already when
            ``num_workers=0``).

        Raises:
            TypeError: pairs not integers, ``after``/``before`` of an unknown type.
            ValueError: pairs not ``[n, 3]``, a value outside int64, negative length, an
                extent outside the device layout, overlapping destination extents, a
                source extent overlapping a destination extent, ``after``/``before`` on
                the host backend, ``before`` an event, an ``after`` event never recorded,
                a stream capturing a CUDA graph. Nothing is queued and no pool changes.
            EngineClosedError: the engine is closed.
        """
        streams = _stream_args(after, before)  # checked before the pairs
        return self._engine.submit(_MIGRATE, _as_pairs(pairs), *streams)

    def check_migrate(self, *, after: Any = None, before: Any = None) -> None:
        """Raise what [`migrate`][] would raise for ``after``/``before`` or a closed
        engine, without queueing anything. Raises: as [`check_swap_in`][]."""
        self._engine.check(_MIGRATE, *_stream_args(after, before))

    def poll(self) -> list[SwapHandle]:
        """Handles of jobs finished (successfully or not) since the previous poll, in
        completion order. At most the newest 65,536 are kept between polls."""
        return self._engine.poll()

    def wait_blocks(self, gpu_block_ids: Any) -> int:
        """Block (GIL released) until every queued or running job that reads or writes
        one of these device blocks is done; other jobs keep running.

        Args:
            gpu_block_ids: integer block ids of the device layout (any shape, flattened).

        Returns:
            The number of jobs waited for. Job errors are not raised here; see the
            handles.

        Raises:
            TypeError: ids not integers.
            ValueError: ids outside ``[0, num_blocks)``.
        """
        ids = _as_int64(np.asarray(gpu_block_ids).reshape(-1), "gpu_block_ids")
        if ids.size and (ids.min() < 0 or ids.max() >= self._device_layout.num_blocks):
            raise ValueError(f"gpu_block_ids must lie in [0, {self._device_layout.num_blocks})")
        return int(self._engine.wait_blocks(ids))

    def synchronize(self) -> None:
        """Block (GIL released) until every job submitted so far is done."""
        self._engine.synchronize()

    def stats(self) -> dict[str, Any]:
        """Counters over finished jobs.

        Swaps and migrations ([`migrate`][]) are counted apart, so that the swap
        figures (``bytes``, ``busy_s``, ``gbps``) measure the host link only.

        Returns:
            dict with ``num_jobs`` (successful swap jobs), ``num_failed`` (failed jobs,
            migrations included), ``num_copies``, ``bytes``, ``seconds`` (sum of swap
            jobs' ``elapsed_s``: device time on cuda, jobs on several workers overlap),
            ``busy_s`` (wall seconds during which at least one swap job was queued or
            running), ``gbps`` (throughput over that time, ``bytes / busy_s / 1e9``, GB =
            1e9 bytes; time a job waits on an ``after=`` stream counts, so this is not the
            link's bandwidth), ``copy_size_histogram`` ({bucket: count}: swap copies of
            ``[bucket, 2 * bucket)`` bytes, buckets powers of 2), ``in_flight`` (jobs,
            migrations included, queued or running now), ``host_memory`` (``"pinned"``,
            ``"registered"``: page-locked by kvswitch until ``close()``, ``"pageable"``:
            copies are synchronous, or ``"n/a"`` on the host backend), and for
            migrations ``num_migrations`` (successful ones), ``migration_copies``,
            ``migrated_bytes`` and ``migration_seconds`` (sum of their ``elapsed_s``).
        """
        return self._engine.stats()

    def close(self) -> None:
        """Finish queued and running jobs, join the workers (GIL released). Idempotent;
        later swap_out/swap_in/migrate raise EngineClosedError."""
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()

    def __enter__(self) -> AsyncSwapEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Drain before the layouts (and the memory they keep alive) are released.
        with contextlib.suppress(Exception):
            self.close()

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> str:
        """``"cuda"`` or ``"host"``."""
        return str(self._engine.backend)

    @property
    def backend_reason(self) -> str:
        """Why this backend was chosen."""
        return self._backend_reason

    @property
    def before_wait(self) -> str:
        """``"event"`` or ``"flag"``: how ``swap_in(before=...)`` orders the consumer."""
        return self._before_wait

    @property
    def host_memory(self) -> str:
        """How copies reach the host pool: ``"pinned"``, ``"registered"``, ``"pageable"``
        or ``"n/a"`` (host backend); see [`stats`][]."""
        return str(self._engine.host_memory[0])

    @property
    def closed(self) -> bool:
        return bool(self._engine.closed)

    @property
    def num_workers(self) -> int:
        return int(self._engine.num_workers)

    @property
    def sync_every(self) -> int:
        return int(self._engine.sync_every)

    @property
    def device_layout(self) -> KVLayout:
        return self._device_layout

    @property
    def host_pool(self) -> HostKVPool | KVLayout:
        return self._host_pool

    def __repr__(self) -> str:
        return (f"AsyncSwapEngine(backend={self.backend!r}, num_workers={self.num_workers}, "
                f"{self._device_layout!r}, closed={self.closed})")
