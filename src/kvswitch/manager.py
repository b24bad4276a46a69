"""SwapManager: the per-iteration swap loop of FastSwitch's Algorithm 1.

FastSwitch (arXiv 2411.18424), section 3.2, Algorithm 1 "Multithreading Swap Manager".
An engine calls, once per iteration::

    ready = manager.poll()                       # step 1: finished swap-ins -> running
    manager.swap_in(seq)  /  manager.swap_out(seq, num_tokens, priority=p)   # steps 2-3
    manager.allocate(seq, n)                     # step 3.1: waits only for conflicting jobs
    ready += manager.decide(batch_size, iteration_s)   # step 4: async or sync swap-in

The manager owns the GPU-pool allocator's sequences, a :class:`~kvswitch.ReuseTracker` over
the host-pool allocator, and issues every copy through an
:class:`~kvswitch.AsyncSwapEngine`. Sequence states: ``"running"`` (KV on the GPU, usable),
``"swapping_in"`` (copies queued, not known to be done), ``"swapped_out"`` (the CPU copy is
the only copy).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from kvswitch.allocator import BlockGroupAllocator
from kvswitch.reuse import ReuseTracker, SwapPlan
from kvswitch.swap import AsyncSwapEngine, SwapHandle

__all__ = [
    "SwapInPolicy",
    "SwapManager",
    "SwapManagerStats",
    "SwapState",
    "should_wait_for_swap_ins",
]

SwapState = Literal["running", "swapping_in", "swapped_out"]
SwapInPolicy = Literal["adaptive", "async", "sync"]


@dataclass(frozen=True)
class SwapManagerStats:
    """Counters since the manager was made. Blocks are KV blocks; times are wall seconds
    measured with ``time.perf_counter`` in the calling thread.

    ``swap_out_blocks == copied_blocks + reused_blocks`` always holds.
    """

    swap_outs: int
    swap_ins: int
    swap_out_blocks: int  #: blocks the swapped-out sequences held (copied or reused)
    copied_blocks: int  #: of those, blocks copied GPU -> host
    reused_blocks: int  #: of those, blocks whose valid CPU copy made a copy unnecessary
    swap_in_blocks: int  #: blocks copied host -> GPU
    swap_out_extents: int  #: copy pairs issued by swap-outs (one copy per region each)
    swap_in_extents: int  #: copy pairs issued by swap-ins
    copies: int  #: copy calls issued (pairs x regions), both directions
    bytes_copied: int  #: bytes of every issued copy, both directions
    conflicts: int  #: allocations that waited for an in-flight swap over their blocks
    conflict_wait_s: float  #: time waiting for those
    swap_out_wait_s: float  #: time waiting for synchronous swap-outs
    swap_in_wait_s: float  #: time waiting for swap-ins (synchronous decisions, wait_swap_in)
    sync_decisions: int  #: iterations whose pending swap-ins were waited for
    async_decisions: int  #: iterations whose pending swap-ins proceeded asynchronously

    @property
    def stall_s(self) -> float:
        """Total time the caller was blocked on swaps (conflicts, sync swap-outs and
        swap-ins)."""
        return self.conflict_wait_s + self.swap_out_wait_s + self.swap_in_wait_s


def _per_block_pairs(pairs: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Split extents into one pair per block: the copy granularity of vLLM's swap path."""
    if not len(pairs) or (pairs[:, 2] == 1).all():
        return pairs
    lengths = pairs[:, 2]
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    src = np.repeat(pairs[:, 0], lengths) + offsets
    dst = np.repeat(pairs[:, 1], lengths) + offsets
    return np.stack((src, dst, np.ones_like(src)), axis=1)


def should_wait_for_swap_ins(batch_size: int, iteration_s: float, num_pending: int,
                             estimate_s: float | None) -> bool:
    """The adaptive swap-in decision (see :meth:`SwapManager.decide`).

    Waiting ``estimate_s`` seconds stalls ``batch_size`` running sequences for
    ``estimate_s / iteration_s`` iterations; not waiting costs each of the ``num_pending``
    sequences about one iteration. Wait when the stall costs fewer sequence-iterations:
    ``batch_size * estimate_s < num_pending * iteration_s``. False without an estimate.
    """
    if estimate_s is None or num_pending <= 0:
        return False
    return batch_size * estimate_s < num_pending * iteration_s


class SwapManager:
    """Swap-outs, swap-ins and conflict resolution over one GPU pool, per Algorithm 1.

    Args:
        gpu_allocator: allocator of the GPU pool (empty; the manager owns its sequences).
            In per-block mode (:meth:`BlockGroupAllocator.per_block`) with
            ``coalesce=False`` it reproduces vLLM's swap path.
        engine: the swap engine over the GPU pool's layout and the host pool. Its
            ``device_layout.num_blocks`` must equal ``gpu_allocator.num_blocks`` and its
            host pool must have ``host_allocator.num_blocks`` blocks.
        host_allocator: allocator of the host pool (empty; the manager's tracker owns it).
        reuse: keep a swapped-in sequence's CPU copy as a backup so its next swap-out
            copies only missing or stale blocks (section 3.3). Without it the copy is
            dropped when the swap-in is issued.
        async_swap_out: return from :meth:`swap_out` once the copies are queued; else wait
            for them (vLLM's blocking swap).
        swap_in: ``"async"``: swapped-in sequences join when :meth:`poll` sees their copies
            done; ``"sync"``: :meth:`decide` waits for every pending swap-in; ``"adaptive"``:
            :meth:`decide` chooses per iteration from recent swap bandwidth (see there).
        coalesce: issue one copy per block extent (block group); False issues one copy per
            block, as vLLM does.
        block_size: tokens per block (> 0).
        window: swap jobs remembered for the adaptive decision's bandwidth estimate (> 0).

    Raises:
        ValueError: non-empty allocators, pool sizes that disagree with the engine, a bad
            policy, block size or window.
    """

    def __init__(
        self,
        gpu_allocator: BlockGroupAllocator,
        engine: AsyncSwapEngine,
        host_allocator: BlockGroupAllocator,
        *,
        reuse: bool = True,
        async_swap_out: bool = True,
        swap_in: SwapInPolicy = "adaptive",
        coalesce: bool = True,
        block_size: int = 16,
        window: int = 32,
    ) -> None:
        if len(gpu_allocator):
            raise ValueError("gpu_allocator must be empty: the manager owns its sequences")
        if engine.device_layout.num_blocks != gpu_allocator.num_blocks:
            raise ValueError(
                f"the engine's device layout has {engine.device_layout.num_blocks} blocks, "
                f"the GPU allocator {gpu_allocator.num_blocks}")
        host_blocks = engine.host_pool.num_blocks
        if host_blocks != host_allocator.num_blocks:
            raise ValueError(f"the engine's host pool has {host_blocks} blocks, the host "
                             f"allocator {host_allocator.num_blocks}")
        if swap_in not in ("adaptive", "async", "sync"):
            raise ValueError(f"swap_in must be 'adaptive', 'async' or 'sync', got {swap_in!r}")
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.gpu = gpu_allocator
        self.engine = engine
        self.tracker = ReuseTracker(host_allocator, block_size=block_size)
        self.block_size = block_size
        self.reuse = reuse
        self.async_swap_out = async_swap_out
        self.swap_in_policy: SwapInPolicy = swap_in
        self.coalesce = coalesce
        self._regions = engine.device_layout.num_regions
        self._block_bytes = engine.device_layout.bytes_per_block
        self._swapped: dict[Hashable, int] = {}  # swapped-out sequence -> tokens
        self._swapping_in: dict[Hashable, SwapHandle] = {}  # in submission order
        self._recent: deque[SwapHandle] = deque(maxlen=window)  # r_info of Algorithm 1
        self._unfinished: list[SwapHandle] = []  # jobs not yet seen done (for r_info)
        self._n = dict.fromkeys(
            ("swap_outs", "swap_ins", "swap_out_blocks", "copied_blocks", "reused_blocks",
             "swap_in_blocks", "swap_out_extents", "swap_in_extents", "copies",
             "bytes_copied", "conflicts", "sync_decisions", "async_decisions"), 0)
        self._t = dict.fromkeys(("conflict_wait_s", "swap_out_wait_s", "swap_in_wait_s"), 0.0)

    # -- GPU blocks of running sequences -------------------------------------------------

    def allocate(self, seq_id: Hashable, num_blocks: int) -> npt.NDArray[np.int32]:
        """Append ``num_blocks`` GPU blocks to a running (or new) sequence's block table.

        If an in-flight swap still reads or writes any of the new blocks (a block freed by
        an asynchronous swap-out and handed out again), wait for exactly those jobs before
        returning, so the caller may write the blocks (Algorithm 1, step 3.1).

        Returns:
            int32 array ``[num_blocks]``: the new block ids, in table order.

        A sequence still swapping in may grow too (e.g. for the prefill of its next turn);
        its swap-in does not touch the new blocks.

        Raises:
            ValueError: the sequence is swapped out.
            OutOfBlocksError: the GPU pool lacks free blocks (nothing changes).
        """
        if seq_id in self._swapped:
            raise ValueError(f"sequence {seq_id!r} is swapped out")
        new = self.gpu.allocate(seq_id, num_blocks)
        if self.engine.num_workers and self._unfinished_jobs():
            t0 = time.perf_counter()
            if self.engine.wait_blocks(new):
                self._n["conflicts"] += 1
                self._t["conflict_wait_s"] += time.perf_counter() - t0
        return new

    def block_table(self, seq_id: Hashable) -> npt.NDArray[np.int32]:
        """int32 array ``[blocks]``: the sequence's GPU block ids in token order (a copy).
        Raises KeyError if the sequence holds no GPU blocks."""
        return self.gpu.block_table(seq_id)

    # -- step 3: swap-out ----------------------------------------------------------------

    def swap_out(self, seq_id: Hashable, num_tokens: int, *, priority: float = 0.0,
                 after: Any = None) -> SwapPlan:
        """Preempt a running sequence: copy its first ``num_tokens`` tokens' blocks to the
        host pool (only missing or stale ones with ``reuse``) and free its GPU blocks.

        The GPU blocks are free on return even while the copies run: a later
        :meth:`allocate` over them waits for the copies; a later swap-in into them is
        ordered after them by the engine.

        Args:
            seq_id: a running sequence.
            num_tokens: tokens of KV to keep (> 0, at most the table's capacity).
            priority: higher is more important; backups of low-priority sequences are
                reclaimed first when the host pool runs short.
            after: CUDA only: the compute stream (or an event) whose queued writes the
                copies must follow; passed to :meth:`AsyncSwapEngine.swap_out`.

        Returns:
            The committed :class:`~kvswitch.SwapPlan` (``copied_blocks``, ``reused_blocks``,
            ``pairs``).

        Raises:
            KeyError: unknown sequence. ValueError: not running, bad token count.
            OutOfBlocksError: the host pool cannot hold the copy even after reclaiming every
                backup (nothing changes).
        """
        self._check_not_swapped(seq_id)
        table = self.gpu.block_table(seq_id)
        plan = self.tracker.plan_swap_out(seq_id, table, num_tokens, priority=priority)
        try:
            handle = self._submit("out", plan, after=after)
        except BaseException:
            self.tracker.cancel(plan)  # nothing was queued: leave every pool unchanged
            raise
        self.tracker.commit(plan)
        self.gpu.free(seq_id)
        self._swapped[seq_id] = num_tokens
        self._n["swap_outs"] += 1
        self._n["swap_out_blocks"] += plan.copied_blocks + plan.reused_blocks
        self._n["copied_blocks"] += plan.copied_blocks
        self._n["reused_blocks"] += plan.reused_blocks
        if handle is not None and not self.async_swap_out:
            t0 = time.perf_counter()
            handle.wait()
            self._t["swap_out_wait_s"] += time.perf_counter() - t0
        return plan

    # -- step 2: swap-in -----------------------------------------------------------------

    def swap_in(self, seq_id: Hashable, *, before: Any = None) -> npt.NDArray[np.int32]:
        """Queue a swapped-out sequence's copies back to newly allocated GPU blocks.

        The sequence is ``"swapping_in"`` until :meth:`poll`, :meth:`decide` or
        :meth:`wait_swap_in` reports it running; do not read its blocks before that.

        Args:
            seq_id: a swapped-out sequence.
            before: CUDA only: a consumer stream whose later work waits for the copies;
                passed to :meth:`AsyncSwapEngine.swap_in`.

        Returns:
            int32 array: its new GPU block table (block ids may differ from before).

        Raises:
            KeyError: unknown sequence. ValueError: not swapped out.
            OutOfBlocksError: the GPU pool lacks the blocks (nothing changes).
        """
        if seq_id not in self._swapped:
            if seq_id in self.gpu or seq_id in self._swapping_in:
                raise ValueError(f"sequence {seq_id!r} is not swapped out")
            raise self._unknown(seq_id)
        num_tokens = self._swapped[seq_id]
        table = self.gpu.allocate(seq_id, -(-num_tokens // self.block_size))
        plan = self.tracker.plan_swap_in(seq_id, table)
        try:
            handle = self._submit("in", plan, before=before)
        except BaseException:
            self.tracker.cancel(plan)
            self.gpu.free(seq_id)
            raise
        self.tracker.commit(plan)
        if not self.reuse:
            # The engine orders this job's host reads before any later write to the blocks.
            self.tracker.drop(seq_id)
        del self._swapped[seq_id]
        self._n["swap_ins"] += 1
        self._n["swap_in_blocks"] += plan.copied_blocks
        self._swapping_in[seq_id] = handle
        return table

    # -- step 1 and step 4 ---------------------------------------------------------------

    def poll(self) -> list[Hashable]:
        """Step 1: sequences whose swap-in finished since the last call; they are running.

        Raises:
            SwapError: a swap-in job failed (the sequence stays swapping in).
        """
        ready = [s for s, h in self._swapping_in.items() if h is None or h.done()]
        return self._finish(ready)

    def decide(self, batch_size: int, iteration_s: float) -> list[Hashable]:
        """Step 4: wait for pending swap-ins now (synchronous) or let them finish in the
        background (asynchronous).

        The paper gives the strategy in words only (section 3.2, "Adaptive Swapping
        Strategy": synchronous swap-in pays when many requests are short to swap). kvswitch
        reads it as a token-count trade: waiting ``t`` seconds stalls ``batch_size`` running
        sequences for ``t / iteration_s`` iterations; not waiting delays each pending
        sequence by about one iteration. It waits when
        ``batch_size * t < num_pending * iteration_s``, with ``t`` the pending swap-in
        bytes over the bandwidth of the last ``window`` finished swap jobs. Without any
        finished job yet it does not wait.

        Args:
            batch_size: sequences that will run this iteration without the pending ones.
            iteration_s: expected duration of this iteration's model step, seconds.

        Returns:
            Sequences whose swap-in was waited for (running now); empty when asynchronous
            or nothing was pending.
        """
        pending = [s for s, h in self._swapping_in.items() if h is not None and not h.done()]
        ready = self._finish([s for s in self._swapping_in if s not in pending])
        if not pending:
            return ready
        wait = self.swap_in_policy == "sync"
        if self.swap_in_policy == "adaptive":
            wait = should_wait_for_swap_ins(batch_size, iteration_s, len(pending),
                                            self.estimate_swap_in_s(pending))
        if not wait:
            self._n["async_decisions"] += 1
            return ready
        self._n["sync_decisions"] += 1
        t0 = time.perf_counter()
        for s in pending:
            self._swapping_in[s].wait()
        self._t["swap_in_wait_s"] += time.perf_counter() - t0
        return ready + self._finish(pending)

    def estimate_swap_in_s(self, seq_ids: list[Hashable] | None = None) -> float | None:
        """Seconds the pending swap-ins of ``seq_ids`` (default: all) would take at the
        bandwidth of recent finished jobs; None before any job finished. An upper bound:
        bytes already copied by running jobs are counted again."""
        self._refresh_recent()
        done_bytes = sum(h.nbytes for h in self._recent)
        done_s = sum(h.elapsed_s or 0.0 for h in self._recent)
        if not self._recent or done_s <= 0.0:
            return None
        ids = self._swapping_in if seq_ids is None else seq_ids
        pending = sum(self._swapping_in[s].nbytes for s in ids
                      if self._swapping_in[s] is not None)
        return pending * done_s / done_bytes

    def wait_swap_in(self, seq_id: Hashable) -> None:
        """Block until one swapping-in sequence's copies are done; it is then running.

        Raises:
            ValueError: the sequence is not swapping in. SwapError: the job failed.
        """
        if seq_id not in self._swapping_in:
            raise ValueError(f"sequence {seq_id!r} is not swapping in")
        handle = self._swapping_in[seq_id]
        if handle is not None and not handle.done():
            t0 = time.perf_counter()
            handle.wait()
            self._t["swap_in_wait_s"] += time.perf_counter() - t0
        self._finish([seq_id])

    # -- life cycle ----------------------------------------------------------------------

    def free(self, seq_id: Hashable) -> None:
        """Forget a finished sequence: release its GPU blocks and its CPU copy.

        A sequence still swapping in is waited for first (its blocks are being written).

        Raises:
            KeyError: unknown sequence.
        """
        if seq_id in self._swapping_in:
            self.wait_swap_in(seq_id)
        known = False
        if seq_id in self.gpu:
            self.gpu.free(seq_id)
            known = True
        if seq_id in self.tracker:
            self.tracker.drop(seq_id)
            known = True
        self._swapped.pop(seq_id, None)
        if not known:
            raise self._unknown(seq_id)

    def drop_cpu_copy(self, seq_id: Hashable) -> int:
        """Release a running sequence's backup CPU copy (the next swap-out copies every
        block). Returns the host blocks released; 0 if it had none.

        Raises:
            ValueError: the sequence is swapped out (the copy is its only KV).
        """
        if seq_id in self._swapped:
            raise ValueError(f"sequence {seq_id!r} is swapped out; its CPU copy is its only KV")
        return self.tracker.drop(seq_id) if seq_id in self.tracker else 0

    def state(self, seq_id: Hashable) -> SwapState:
        """``"running"``, ``"swapping_in"`` or ``"swapped_out"``. Raises KeyError if the
        manager does not know the sequence."""
        if seq_id in self._swapped:
            return "swapped_out"
        if seq_id in self._swapping_in:
            return "swapping_in"
        if seq_id in self.gpu:
            return "running"
        raise self._unknown(seq_id)

    def num_tokens_swapped(self, seq_id: Hashable) -> int:
        """Tokens of KV a swapped-out sequence holds in the host pool. Raises KeyError."""
        try:
            return self._swapped[seq_id]
        except KeyError:
            raise self._unknown(seq_id) from None

    @property
    def swapping_in(self) -> list[Hashable]:
        """Sequences whose swap-in is queued and not yet reported running."""
        return list(self._swapping_in)

    @property
    def swapped_out(self) -> list[Hashable]:
        return list(self._swapped)

    def synchronize(self) -> None:
        """Wait for every queued copy (counted as swap-in wait time)."""
        t0 = time.perf_counter()
        self.engine.synchronize()
        self._t["swap_in_wait_s"] += time.perf_counter() - t0

    def stats(self) -> SwapManagerStats:
        return SwapManagerStats(**self._n, **self._t)

    @property
    def stall_s(self) -> float:
        """Seconds the caller has been blocked on swaps so far (``stats().stall_s``)."""
        t = self._t
        return t["conflict_wait_s"] + t["swap_out_wait_s"] + t["swap_in_wait_s"]

    def close(self) -> None:
        """Finish queued copies and close the engine."""
        self.engine.close()

    def __enter__(self) -> SwapManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _submit(self, direction: str, plan: SwapPlan, **stream: Any) -> SwapHandle | None:
        pairs = plan.pairs if self.coalesce else _per_block_pairs(plan.pairs)
        if not len(pairs):
            return None
        submit = self.engine.swap_out if direction == "out" else self.engine.swap_in
        handle = submit(pairs, **{k: v for k, v in stream.items() if v is not None})
        self._n[f"swap_{direction}_extents"] += len(pairs)
        self._n["copies"] += len(pairs) * self._regions
        self._n["bytes_copied"] += int(pairs[:, 2].sum()) * self._block_bytes
        self._unfinished.append(handle)
        return handle

    def _unfinished_jobs(self) -> bool:
        self._refresh_recent()
        return bool(self._unfinished)

    def _refresh_recent(self) -> None:
        still = []
        for h in self._unfinished:
            if h.done():
                self._recent.append(h)
            else:
                still.append(h)
        self._unfinished = still

    def _finish(self, seq_ids: list[Hashable]) -> list[Hashable]:
        for s in seq_ids:
            handle = self._swapping_in[s]
            if handle is not None:
                handle.wait()  # done already; raises SwapError if the job failed
            del self._swapping_in[s]
        return seq_ids

    def _check_not_swapped(self, seq_id: Hashable) -> None:
        if seq_id in self._swapped:
            raise ValueError(f"sequence {seq_id!r} is swapped out")
        if seq_id in self._swapping_in:
            raise ValueError(f"sequence {seq_id!r} is still swapping in")

    @staticmethod
    def _unknown(seq_id: Hashable) -> KeyError:
        return KeyError(f"unknown sequence {seq_id!r}")
