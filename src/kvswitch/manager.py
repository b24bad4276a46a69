"""SwapManager: the per-iteration swap loop of FastSwitch's Algorithm 1.

FastSwitch (arXiv 2411.18424), section 3.2, Algorithm 1 "Multithreading Swap Manager".
An engine calls, once per iteration::

    ready = manager.poll()                       # step 1: finished swap-ins -> running
    for seq, error in manager.take_failed().items():   # copies that failed (rare)
        ...                                      # recompute or abort seq, then free(seq)
    manager.swap_in(seq)  /  manager.swap_out(seq, num_tokens, priority=p)   # steps 2-3
    manager.allocate(seq, n)                     # step 3.1: waits only for conflicting jobs
    ready += manager.decide(batch_size, iteration_s)   # step 4: async or sync swap-in

The manager owns the GPU-pool allocator's sequences, a [`ReuseTracker`][] over
the host-pool allocator, and issues every copy through an
[`AsyncSwapEngine`][]. Sequence states (docs/design.md draws the diagram):

* ``"running"``: KV on the GPU, usable.
* ``"swapping_in"``: copies queued, not yet reported done (do not read its blocks).
* ``"swapped_out"``: the CPU copy is the only copy (its copies may still be in flight).
* ``"failed"``: a copy of its KV failed, so its KV is lost; its blocks stay held until
  [`SwapManager.free`][]. Other sequences are not affected, except those whose own
  copies read blocks the failed copy was writing: they fail too, and their errors name the
  root cause.

GPU-pool compaction (``compaction=True``, beyond the paper): a swap-in whose table would
land in several block groups first moves other running sequences' blocks device to device
([`compact`][kvswitch.BlockGroupAllocator.compact], [`migrate`][kvswitch.AsyncSwapEngine.migrate])
so that it lands in one. The moved sequences' block tables change: the adapter must make
paged attention read the new ids ([`SwapManager.take_block_table_changes`][] or the
``on_block_tables_changed`` callback).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from kvswitch._validate import INT32_MAX, as_count, as_flag, as_fraction
from kvswitch.allocator import BlockGroupAllocator
from kvswitch.reuse import ReuseTracker, SwapPlan
from kvswitch.swap import AsyncSwapEngine, SwapError, SwapHandle

__all__ = [
    "SwapInPolicy",
    "SwapManager",
    "SwapManagerStats",
    "SwapState",
    "should_wait_for_swap_ins",
]

SwapState = Literal["running", "swapping_in", "swapped_out", "failed"]

#: Default cap on the blocks one compaction moves, as a fraction of the swap-in's blocks
#: (chosen with ``kvswitch bench``; see docs/benchmarks.md, issue 14).
DEFAULT_COMPACTION_MAX_MOVED = 1.0
SwapInPolicy = Literal["adaptive", "async", "sync"]


@dataclass(frozen=True)
class SwapManagerStats:
    """Counters since the manager was made. Blocks are KV blocks; times are seconds of the
    manager's ``clock`` measured in the calling thread: wall seconds
    (``time.perf_counter``) unless a clock was given.

    ``swap_out_blocks == copied_blocks + reused_blocks`` always holds.
    """

    swap_outs: int  #: swap-outs whose copies were issued (and, if blocking, succeeded)
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
    swap_failures: int = 0  #: swaps whose copies failed (sequences failed, or raised)
    migrations: int = 0  #: compactions that moved blocks (one migrate job each)
    migrated_blocks: int = 0  #: GPU blocks moved device to device by them
    migrate_extents: int = 0  #: copy pairs of those migrate jobs (one copy per region each)
    migrate_bytes: int = 0  #: bytes those migrate jobs copy device to device
    migrate_failures: int = 0  #: sequences failed because a migration of theirs failed
    migrate_wait_s: float = 0.0  #: time waiting for migrations (no ``before`` stream given)

    @property
    def stall_s(self) -> float:
        """Total time the caller was blocked on swaps (conflicts, sync swap-outs and
        swap-ins)."""
        return (self.conflict_wait_s + self.swap_out_wait_s + self.swap_in_wait_s
                + self.migrate_wait_s)


@dataclass
class _Swap:
    """One swap of one sequence: its plan and the handle of its job (None: no copies, or
    seen finished successfully)."""

    plan: SwapPlan
    handle: SwapHandle | None


@dataclass
class _SwappedOut(_Swap):
    num_tokens: int = 0


@dataclass
class _SwappingIn(_Swap):
    """A swap-in, with the sequence's swap-out it was queued behind while that was still
    in flight (None: none was): if that one fails, the engine fails this one too, and the
    CPU copy's blocks it was to write must then be marked invalid as well."""

    swap_out: _SwappedOut | None = None


def _quiet_wait(handle: SwapHandle) -> None:
    """Block until the job ends; a failure is read from ``handle.error`` afterwards."""
    with contextlib.suppress(SwapError):
        handle.wait()


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
    """The adaptive swap-in decision (see [`SwapManager.decide`][]).

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
            In per-block mode ([`BlockGroupAllocator.per_block`][]) with
            ``coalesce=False`` it reproduces vLLM's swap path.
        engine: the swap engine over the GPU pool's layout and the host pool. Its
            ``device_layout.num_blocks`` must equal ``gpu_allocator.num_blocks`` and its
            host pool must have ``host_allocator.num_blocks`` blocks.
        host_allocator: allocator of the host pool (empty; the manager's tracker owns it).
        reuse: keep a swapped-in sequence's CPU copy as a backup so its next swap-out
            copies only missing or stale blocks (section 3.3). Without it the copy is
            dropped when the swap-in is issued.
        async_swap_out: return from [`swap_out`][] once the copies are queued; else wait
            for them (vLLM's blocking swap).
        swap_in: ``"async"``: swapped-in sequences join when [`poll`][] sees their copies
            done; ``"sync"``: [`decide`][] waits for every pending swap-in; ``"adaptive"``:
            [`decide`][] chooses per iteration from recent swap bandwidth (see there).
        coalesce: issue one copy per block extent (block group); False issues one copy per
            block, as vLLM does.
        block_size: tokens per block (int > 0).
        window: swap jobs remembered for the adaptive decision's bandwidth estimate (> 0).
        compaction: GPU-pool compaction on swap-in (opt-in; needs a block-group GPU
            allocator). When the free blocks suffice for a swap-in but its table would
            land in several groups, [`swap_in`][] moves other sequences' blocks so that
            it lands in one (see there). Turn it on only when the engine's attention reads
            block tables after [`take_block_table_changes`][] or the callback. On the
            CUDA backend a swap-in compacts only when given ``after`` (the compute
            stream): without it a migration could race kernels still writing the moved
            blocks, so such a swap-in lands in several groups, as without compaction.
        compaction_max_moved: cap on the blocks one compaction may move, as a fraction of
            the free group it makes: the swap-in's blocks plus its ``reserve_blocks`` (at
            most the pool's free blocks); the product is rounded down (finite float >= 0).
            A swap-in needing more falls back to several groups.
        on_block_tables_changed: called (under the manager's lock, from [`swap_in`][])
            with ``{seq_id: int32 block table}`` of the running sequences a compaction
            moved: their new tables in full (moved sequences its failed migration made
            ``"failed"`` are left out, possibly leaving it empty). Paged attention must read
            these ids from then on. The same changes are also kept for
            [`take_block_table_changes`][].
        clock: the clock the wait times of [`stats`][] are read from (seconds; default
            ``time.perf_counter``). ``kvswitch bench`` passes its virtual clock, whose time
            a wait on a ``VirtualSwapEngine`` (``kvswitch.bench.virtual_clock``) advances.

    Raises:
        TypeError: ``block_size`` or ``window`` not an int; ``reuse``, ``async_swap_out``,
            ``coalesce`` or ``compaction`` not a bool; ``compaction_max_moved`` not a real
            number (a bool or a str is refused).
        ValueError: non-empty allocators, pool sizes that disagree with the engine, a bad policy,
            block size or window, ``compaction`` with a per-block GPU allocator, a negative or
            non-finite ``compaction_max_moved``.

    Failures (docs/design.md, "Failures and threads"): every job's handle is checked. A
    blocking swap-out whose copies fail raises [`SwapError`][] and the sequence stays
    running on its GPU blocks. Any other failed copy moves its sequence to ``"failed"``:
    [`poll`][] and [`decide`][] leave it out and go on with the others,
    [`take_failed`][] reports it once, [`free`][] releases its blocks. A call that
    raises anything else (bad arguments, out of blocks, a closed engine) changes nothing.

    Thread safety: methods may be called from several threads; one re-entrant lock
    serialises them, waits included (the engine's worker threads never take it).
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
        compaction: bool = False,
        compaction_max_moved: float = 1.0,  # == DEFAULT_COMPACTION_MAX_MOVED
        on_block_tables_changed: Callable[[dict[Hashable, npt.NDArray[np.int32]]], None]
        | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        block_size = as_count(block_size, "block_size", maximum=INT32_MAX)
        window = as_count(window, "window")
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
        reuse = as_flag(reuse, "reuse")
        async_swap_out = as_flag(async_swap_out, "async_swap_out")
        coalesce = as_flag(coalesce, "coalesce")
        compaction = as_flag(compaction, "compaction")
        compaction_max_moved = as_fraction(compaction_max_moved, "compaction_max_moved")
        if compaction and gpu_allocator.per_block_mode:
            raise ValueError("compaction needs a block-group GPU allocator, not per-block mode")
        self.gpu = gpu_allocator
        self.engine = engine
        self.tracker = ReuseTracker(host_allocator, block_size=block_size)
        self.block_size = block_size
        self.reuse = reuse
        self.async_swap_out = async_swap_out
        self.swap_in_policy: SwapInPolicy = swap_in
        self.coalesce = coalesce
        self.compaction = compaction
        self.compaction_max_moved = compaction_max_moved
        self.on_block_tables_changed = on_block_tables_changed
        self._clock: Callable[[], float] = clock if clock is not None else time.perf_counter
        # Sequences whose block table a compaction changed since take_block_table_changes
        # (a dict used as an ordered set; the tables are read when taken).
        self._table_changes: dict[Hashable, None] = {}
        # Migrations not yet seen finished: (handle, the sequences it moved that still hold
        # the moved blocks; free() and swap_out() remove theirs).
        self._migrations: list[tuple[SwapHandle, dict[Hashable, None]]] = []
        self._lock = threading.RLock()
        self._regions = engine.device_layout.num_regions
        self._block_bytes = engine.device_layout.bytes_per_block
        self._swapped: dict[Hashable, _SwappedOut] = {}
        self._outs_in_flight: dict[Hashable, _SwappedOut] = {}  # handle not yet seen done
        self._swapping_in: dict[Hashable, _SwappingIn] = {}  # in submission order
        self._failed: dict[Hashable, SwapError] = {}
        self._unreported: dict[Hashable, SwapError] = {}  # for take_failed()
        self._recent: deque[SwapHandle] = deque(maxlen=window)  # r_info of Algorithm 1
        self._unfinished: list[SwapHandle] = []  # jobs not yet seen done (for r_info)
        self._n = dict.fromkeys(
            ("swap_outs", "swap_ins", "swap_out_blocks", "copied_blocks", "reused_blocks",
             "swap_in_blocks", "swap_out_extents", "swap_in_extents", "copies",
             "bytes_copied", "conflicts", "sync_decisions", "async_decisions",
             "swap_failures", "migrations", "migrated_blocks", "migrate_extents",
             "migrate_bytes", "migrate_failures"), 0)
        self._t = dict.fromkeys(("conflict_wait_s", "swap_out_wait_s", "swap_in_wait_s",
                                 "migrate_wait_s"), 0.0)

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
            ValueError: the sequence is swapped out or failed; ``num_blocks`` <= 0.
            SwapError: the sequence failed and that was not reported yet (reported now).
            TypeError: ``num_blocks`` is not an int.
            OutOfBlocksError: the GPU pool lacks free blocks (nothing changes).
        """
        with self._lock:
            if seq_id in self._swapped:
                raise ValueError(f"sequence {seq_id!r} is swapped out")
            self._check_not_failed(seq_id)
            new = self.gpu.allocate(seq_id, num_blocks)
            if self.engine.num_workers and self._unfinished_jobs():
                t0 = self._clock()
                if self.engine.wait_blocks(new):
                    self._n["conflicts"] += 1
                    self._t["conflict_wait_s"] += self._clock() - t0
            return new

    def block_table(self, seq_id: Hashable) -> npt.NDArray[np.int32]:
        """int32 array ``[blocks]``: the sequence's GPU block ids in token order (a copy).
        Raises KeyError if the sequence holds no GPU blocks."""
        with self._lock:
            return self.gpu.block_table(seq_id)

    # -- step 3: swap-out ----------------------------------------------------------------

    def swap_out(self, seq_id: Hashable, num_tokens: int, *, priority: float = 0.0,
                 after: Any = None) -> SwapPlan:
        """Preempt a running sequence: copy its first ``num_tokens`` tokens' blocks to the
        host pool (only missing or stale ones with ``reuse``) and free its GPU blocks.

        Asynchronous (default): the GPU blocks are free on return even while the copies
        run: a later [`allocate`][] over them waits for the copies; a later swap-in into
        them is ordered after them by the engine. If the copies fail, the sequence becomes
        ``"failed"`` (reported by [`take_failed`][]). Blocking (``async_swap_out=False``):
        returns once the copies are done; if they failed, raises [`SwapError`][] and the
        sequence stays running on its GPU blocks.

        A ``num_tokens`` below what its CPU copy holds is a rollback: the copy's tokens at
        and beyond ``num_tokens`` become invalid (see [`truncate`][]).

        Args:
            seq_id: a running sequence.
            num_tokens: tokens of KV to keep (> 0, at most the table's capacity).
            priority: higher is more important; backups of low-priority sequences are
                reclaimed first when the host pool runs short.
            after: CUDA only: the compute stream (or an event) whose queued writes the
                copies must follow; passed to [`AsyncSwapEngine.swap_out`][].

        A migration that moved the sequence's blocks (compaction) and failed before its
        next [`poll`][] (CUDA: [`swap_in`][] with ``before`` returns with the migration
        pending) left them unwritten: whenever it ended, the swap-out is not committed and
        the sequence becomes ``"failed"`` with the migration's [`SwapError`][]
        (``direction == "migrate"``), keeping its GPU blocks until [`free`][]; async
        mode reports it by [`take_failed`][], blocking mode raises it.

        Returns:
            The [`SwapPlan`][] (``copied_blocks``, ``reused_blocks``, ``pairs``): committed,
            unless a failed migration failed the sequence (above).

        Raises:
            KeyError: unknown sequence.
            ValueError: not running, bad token count, ``after`` the backend cannot take.
            TypeError: bad argument types.
            OutOfBlocksError: the host pool cannot hold the copy even after reclaiming every backup.
            EngineClosedError: the engine is closed. (All: nothing changes.)
            SwapError: blocking mode only: the copies failed; the sequence stays running (or is
                ``"failed"`` when a failed migration was their cause, above). Or the
                sequence had failed and that was not reported yet (reported now).
        """
        with self._lock:
            # _check_running, with the table read in place of its membership test: the
            # allocator raises the same KeyError for an unknown sequence.
            if seq_id in self._swapped:
                raise ValueError(f"sequence {seq_id!r} is swapped out")
            if seq_id in self._swapping_in:
                raise ValueError(f"sequence {seq_id!r} is still swapping in")
            self._check_not_failed(seq_id)
            table = self.gpu.block_table(seq_id)
            if type(num_tokens) is not int or num_tokens <= 0:  # fast path: a positive int
                num_tokens = as_count(num_tokens, "num_tokens")
            # Everything the submit could refuse is checked before the tracker reclaims
            # anyone's backup: a call that raises must change nothing.
            self.engine.check_swap_out(after=after)
            plan = self.tracker.plan_swap_out(seq_id, table, num_tokens, priority=priority)
            try:
                handle = self._submit("out", plan, after=after)
            except BaseException:
                self.tracker.cancel(plan)  # nothing was queued
                raise
            # A migration into its blocks that failed and ended before this job was queued
            # (CUDA: swap_in(before=) returns with it pending) did not order the job: the
            # copies read blocks it never wrote.
            migration = self._failed_migration(seq_id)
            if migration is None and handle is not None and not self.async_swap_out:
                t0 = self._clock()
                _quiet_wait(handle)
                self._t["swap_out_wait_s"] += self._clock() - t0
                if not handle.error:
                    handle = None
                else:  # it failed with such a migration still in flight, or on its own
                    migration = self._failed_migration(seq_id)
                    if migration is None:
                        self.tracker.fail(plan)
                        self._n["swap_failures"] += 1
                        raise self._error(seq_id, "out", handle)
            if migration is not None:
                # Its KV is lost: not committed, the sequence fails with the migration's
                # error (blocking: raised; async: reported by take_failed, like a failed
                # copy of an async swap-out), keeping its GPU blocks until free().
                if handle is not None:
                    _quiet_wait(handle)
                self.tracker.fail(plan)
                error = self._fail_migrated(seq_id, migration)
                if self.async_swap_out:
                    return plan
                del self._unreported[seq_id]
                raise error
            self.tracker.commit(plan)
            self.gpu.free(seq_id)
            self._forget_moves(seq_id)
            record = _SwappedOut(plan, handle, num_tokens)
            self._swapped[seq_id] = record
            if handle is not None:
                self._outs_in_flight[seq_id] = record
            n = self._n
            n["swap_outs"] += 1
            n["swap_out_blocks"] += plan.copied_blocks + plan.reused_blocks
            n["copied_blocks"] += plan.copied_blocks
            n["reused_blocks"] += plan.reused_blocks
            return plan

    # -- step 2: swap-in -----------------------------------------------------------------

    def swap_in(self, seq_id: Hashable, *, before: Any = None, after: Any = None,
                reserve_blocks: int = 0) -> npt.NDArray[np.int32]:
        """Queue a swapped-out sequence's copies back to newly allocated GPU blocks.

        The sequence is ``"swapping_in"`` until [`poll`][], [`decide`][] or
        [`wait_swap_in`][] reports it running (or failed); do not read its blocks before.
        Its swap-out may still be in flight: the engine orders the copies after it, and if
        it fails, so does this swap-in (the sequence becomes ``"failed"``). Should it fail
        and end while this call runs, before the copies are queued behind it, the sequence
        is ``"failed"`` on return all the same (reported by [`take_failed`][], holding
        the returned GPU blocks until [`free`][]): no copy of never-written host blocks
        is ever reported running.

        With ``compaction``: when the GPU pool's free blocks suffice but no free group holds
        the whole table, it first compacts the pool to make a free group of its blocks
        plus ``reserve_blocks`` (at most the free blocks; at most ``compaction_max_moved``
        x that many blocks moved, rounded down; sequences still swapping in or failed never
        move), queues one [`AsyncSwapEngine.migrate`][] job for the moves (coalesced
        extents, with ``after``/``before`` passed on), reports the moved sequences' new
        block tables (the callback, [`take_block_table_changes`][]), then allocates one
        group. Without a ``before`` stream it waits for the migration before returning
        (``migrate_wait_s``), so the new ids hold the KV on return; with one, the consumer
        stream waits for it. If the migration fails, the moved sequences still holding the
        moved blocks become ``"failed"`` (reported by [`take_failed`][],
        ``direction == "migrate"``); jobs that read what it was writing (a swap-out of
        a moved sequence, which reports its own failure) fail with it; this swap-in only
        writes the blocks the migration vacated, so it does not. If the
        migration cannot even be queued (the engine closed by another thread, MemoryError),
        the moves are undone ([`BlockGroupAllocator.undo_moves`][]: every moved sequence
        has its old table and KV again; reserved tails the compaction released stay
        released), nothing is reported, and the exception propagates, this sequence staying
        swapped out. Only if the undo is refused too does every moved sequence become
        ``"failed"`` (reported by [`take_failed`][], ``direction == "migrate"``,
        ``job_id`` None). Never a silent wrong byte.

        On the CUDA backend it compacts only when ``after`` is given: a migration must
        follow the compute kernels that still write running sequences' blocks (the last
        block of each decoding sequence), and kernels already queued write the old block
        ids. Without ``after`` the swap-in lands in several groups, as without compaction.

        Args:
            seq_id: a swapped-out sequence.
            before: CUDA only: a consumer stream whose later work waits for the copies;
                passed to [`AsyncSwapEngine.swap_in`][].
            after: CUDA only: a stream (or event) whose work so far must finish before
                the copies start, e.g. the compute stream that may still read the GPU
                blocks this swap-in is given (freed by another sequence this iteration);
                passed to [`AsyncSwapEngine.swap_in`][] (and to the migration, which
                must follow kernels still writing the moved blocks).
            reserve_blocks: blocks the caller expects to [`allocate`][] for the sequence
                soon (its next turn's prefill, the decode growth its history suggests; int
                >= 0). With ``compaction`` the free group made is that much larger and they
                are held as its reserved tail (free blocks that other requests split off
                under pressure), so they follow the table in the same group.

        Returns:
            int32 array: its new GPU block table (block ids may differ from before).

        Raises:
            KeyError: unknown sequence.
            ValueError: not swapped out, ``before``/``after`` the backend cannot take, negative
                ``reserve_blocks``.
            TypeError: ``reserve_blocks`` not an int.
            OutOfBlocksError: the GPU pool lacks the blocks.
            EngineClosedError: the engine is closed. Anything ``on_block_tables_changed`` raises.
                (All: the sequence stays swapped out and holds no GPU blocks. Without a compaction
                nothing changes. After one, only its effects remain: when the raise came after its
                migration was queued (the callback, the swap-in's own plan or submit), the moved
                sequences keep their new tables and the migration, reported by
                [`take_block_table_changes`][]; when queueing the migration itself raised, the moves
                are undone, as above. Reserved tails the compaction released stay released.)
            SwapError: its swap-out failed (the sequence is ``"failed"``) and that was not reported
                yet: this raise reports it, [`take_failed`][] will not. A failure already reported
                gives ValueError.
        """
        with self._lock:
            if reserve_blocks:
                reserve_blocks = as_count(reserve_blocks, "reserve_blocks", minimum=0)
            self._check_not_failed(seq_id)
            record = self._swapped.get(seq_id)
            if record is None:
                if seq_id in self.gpu or seq_id in self._swapping_in:
                    raise ValueError(f"sequence {seq_id!r} is not swapped out "
                                     f"({self.state(seq_id)})")
                raise self._unknown(seq_id)
            if record.handle is not None and record.handle.done():
                if record.handle.error:
                    error = self._fail_swap_out(seq_id, record)
                    del self._unreported[seq_id]
                    raise error
                self._outs_in_flight.pop(seq_id, None)
                record.handle = None
            self.engine.check_swap_in(before=before, after=after)
            num_blocks = -(-record.num_tokens // self.block_size)
            if self.compaction and num_blocks + reserve_blocks > 1:
                self._compact_for(num_blocks, reserve_blocks, before=before, after=after)
            table = self.gpu.allocate(seq_id, num_blocks)
            try:
                plan = self.tracker.plan_swap_in(seq_id, table)
                try:
                    handle = self._submit("in", plan, before=before, after=after)
                except BaseException:
                    self.tracker.cancel(plan)
                    raise
            except BaseException:
                self.gpu.free(seq_id)
                raise
            out = record.handle  # its swap-out, in flight at the check above (or None)
            if out is not None and out.done() and out.error:
                # It failed and ended after that check but before this job was queued, so
                # the engine did not order this job after it: the host blocks it reads were
                # never written. The sequence fails as its swap-out did (reported once, by
                # take_failed), and holds its new GPU blocks until free(), as any failed
                # sequence does; the job is waited for, so nothing of it is left in flight.
                if handle is not None:
                    _quiet_wait(handle)
                self.tracker.fail(plan)
                self._fail_swap_out(seq_id, record)
                return table
            self.tracker.commit(plan)
            if reserve_blocks and self.compaction:
                self.gpu.reserve(seq_id, reserve_blocks)
            if not self.reuse:
                # The engine orders this job's host reads before any later write to the blocks.
                self.tracker.drop(seq_id)
            # A swap-out still in flight is not lost track of: this swap-in is ordered after
            # it and fails with it (_fail_swap_in then invalidates what it was to write).
            del self._swapped[seq_id]
            self._outs_in_flight.pop(seq_id, None)
            n = self._n
            n["swap_ins"] += 1
            n["swap_in_blocks"] += plan.copied_blocks
            self._swapping_in[seq_id] = _SwappingIn(
                plan, handle, record if out is not None else None)
            return table

    # -- step 1 and step 4 ---------------------------------------------------------------

    def poll(self) -> list[Hashable]:
        """Step 1: sequences whose swap-in finished since the last call; they are running.

        A sequence whose swap-in or asynchronous swap-out failed becomes ``"failed"`` here
        instead (see [`take_failed`][]); the others are unaffected. Never raises
        [`SwapError`][].
        """
        with self._lock:
            self._reap_swap_outs()
            self._reap_migrations()
            return self._finish_swap_ins()

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
            Sequences whose swap-in finished or was waited for (running now); empty when
            asynchronous or nothing was pending. Failed ones are left out, as in
            [`poll`][]. Never raises [`SwapError`][].
        """
        with self._lock:
            self._reap_swap_outs()
            self._reap_migrations()
            ready = self._finish_swap_ins()
            pending = list(self._swapping_in)
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
            t0 = self._clock()
            for s in pending:
                handle = self._swapping_in[s].handle
                if handle is not None:
                    _quiet_wait(handle)
            self._t["swap_in_wait_s"] += self._clock() - t0
            return ready + self._finish_swap_ins()

    def take_failed(self) -> dict[Hashable, SwapError]:
        """Sequences that became ``"failed"`` since the last call, each reported once, with
        the [`SwapError`][] of its copies (attributes ``seq_id``, ``direction``
        (``"out"``/``"in"``), ``job_id`` and ``root_job_id``: the job whose failure caused
        it, possibly another sequence's). A failure already raised to the caller (by
        [`swap_in`][] or [`wait_swap_in`][]) is not repeated here.

        Swap-ins are checked by [`poll`][], [`decide`][] and [`wait_swap_in`][];
        asynchronous swap-outs also here and by [`synchronize`][].
        """
        with self._lock:
            self._reap_swap_outs()
            self._reap_migrations()
            failed, self._unreported = self._unreported, {}
            return failed

    def take_block_table_changes(self) -> dict[Hashable, npt.NDArray[np.int32]]:
        """Block tables that compaction changed since the last call: ``{seq_id: int32
        table}``, each the sequence's full GPU block table as it is now, at this call
        (blocks allocated since the compaction included; sequences no longer holding GPU
        blocks, freed or swapped out since, and failed ones are left out). Paged attention
        must read these ids; the old ids of a moved block may already hold another
        sequence's KV.
        """
        with self._lock:
            ids, self._table_changes = self._table_changes, {}
            return self._current_tables(ids)

    def estimate_swap_in_s(self, seq_ids: list[Hashable] | None = None) -> float | None:
        """Seconds the pending swap-ins of ``seq_ids`` (default: all) would take at the
        bandwidth of recent finished jobs; None before any job finished. An upper bound:
        bytes already copied by running jobs are counted again."""
        with self._lock:
            self._refresh_recent()
            done_bytes = sum(h.nbytes for h in self._recent)
            done_s = sum(h.elapsed_s or 0.0 for h in self._recent)
            if not self._recent or done_s <= 0.0:
                return None
            ids = self._swapping_in if seq_ids is None else seq_ids
            pending = 0
            for s in ids:
                handle = self._swapping_in[s].handle
                if handle is not None:
                    pending += handle.nbytes
            return pending * done_s / done_bytes

    def wait_swap_in(self, seq_id: Hashable) -> None:
        """Block until one swapping-in sequence's copies are done; it is then running.

        Raises:
            ValueError: the sequence is not swapping in.
            SwapError: the copies failed (now or earlier, unreported); the sequence is
                ``"failed"`` and this raise reports it ([`take_failed`][] will not).
        """
        with self._lock:
            self._check_not_failed(seq_id)
            if seq_id not in self._swapping_in:
                state = f" ({self.state(seq_id)})" if self._known(seq_id) else ""
                raise ValueError(f"sequence {seq_id!r} is not swapping in{state}")
            handle = self._swapping_in[seq_id].handle
            if handle is not None and not handle.done():
                t0 = self._clock()
                _quiet_wait(handle)
                self._t["swap_in_wait_s"] += self._clock() - t0
            record = self._swapping_in.pop(seq_id)
            if handle is not None and handle.error:
                error = self._fail_swap_in(seq_id, record)
                del self._unreported[seq_id]
                raise error

    # -- life cycle ----------------------------------------------------------------------

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Roll a sequence back to its first ``num_tokens`` tokens: the engine regenerated
        a reply, rejected speculative tokens, or pruned a beam, and will write new KV from
        token ``num_tokens`` on. Its CPU copy's tokens at and beyond ``num_tokens`` become
        invalid, so no later swap-out reuses them. A swapped-out sequence keeps only
        ``num_tokens`` tokens (its swap-in restores those). The GPU block table is left as
        it is.

        Call it whenever KV of tokens that were already swapped out once can change: the
        tracker otherwise takes a block's past tokens as fixed.

        Raises:
            KeyError: unknown sequence.
            ValueError: failed; swapped out and ``num_tokens`` 0; or negative.
            TypeError: ``num_tokens`` not an int.
        """
        with self._lock:
            num_tokens = as_count(num_tokens, "num_tokens", minimum=0)
            state = self.state(seq_id)
            if state == "failed":
                raise ValueError(f"sequence {seq_id!r} has failed; free() it")
            record = self._swapped.get(seq_id)
            if record is not None and num_tokens == 0:
                raise ValueError(f"sequence {seq_id!r} is swapped out: truncating it to 0 "
                                 "tokens leaves nothing to swap in; free() it instead")
            self._wait_own_jobs(seq_id)  # host blocks they use may be released
            if record is not None:
                self._reap_swap_outs()
                if seq_id in self._failed:
                    return
                record.num_tokens = min(record.num_tokens, num_tokens)
            if seq_id in self.tracker:
                self.tracker.truncate(seq_id, num_tokens)

    def free(self, seq_id: Hashable) -> None:
        """Forget a finished (or failed) sequence: release its GPU blocks and its CPU copy.

        Copies of it still in flight are waited for first (its blocks are being read or
        written). A failure of those copies is no longer reported: the KV is discarded.

        Raises:
            KeyError: unknown sequence.
        """
        with self._lock:
            if not self._known(seq_id):
                raise self._unknown(seq_id)
            self._wait_own_jobs(seq_id)
            self._swapping_in.pop(seq_id, None)
            self._swapped.pop(seq_id, None)
            self._outs_in_flight.pop(seq_id, None)
            self._failed.pop(seq_id, None)
            self._unreported.pop(seq_id, None)
            self._forget_moves(seq_id)
            if seq_id in self.gpu:
                self.gpu.free(seq_id)
            if seq_id in self.tracker:
                self.tracker.drop(seq_id)

    def drop_cpu_copy(self, seq_id: Hashable) -> int:
        """Release a running sequence's backup CPU copy (the next swap-out copies every
        block). Returns the host blocks released; 0 if it had none.

        Raises:
            ValueError: the sequence is swapped out (the copy is its only KV).
        """
        with self._lock:
            if seq_id in self._swapped:
                raise ValueError(f"sequence {seq_id!r} is swapped out; its CPU copy is its "
                                 "only KV")
            if seq_id not in self.tracker:
                return 0
            self._wait_own_jobs(seq_id)  # a swap-in may still read the copy
            return self.tracker.drop(seq_id)

    def state(self, seq_id: Hashable) -> SwapState:
        """``"running"``, ``"swapping_in"``, ``"swapped_out"`` or ``"failed"``. A copy's
        failure shows once [`poll`][], [`decide`][], [`take_failed`][] or
        [`synchronize`][] saw it. Raises KeyError if the manager does not know the
        sequence."""
        with self._lock:
            if not self._known(seq_id):
                raise self._unknown(seq_id)
            if seq_id in self._failed:
                return "failed"
            if seq_id in self._swapped:
                return "swapped_out"
            if seq_id in self._swapping_in:
                return "swapping_in"
            if seq_id in self.gpu:
                return "running"
            raise self._unknown(seq_id)

    def num_tokens_swapped(self, seq_id: Hashable) -> int:
        """Tokens of KV a swapped-out sequence holds in the host pool. Raises KeyError."""
        with self._lock:
            try:
                return self._swapped[seq_id].num_tokens
            except KeyError:
                raise self._unknown(seq_id) from None

    @property
    def swapping_in(self) -> list[Hashable]:
        """Sequences whose swap-in is queued and not yet reported running or failed."""
        with self._lock:
            return list(self._swapping_in)

    @property
    def swapped_out(self) -> list[Hashable]:
        with self._lock:
            return list(self._swapped)

    @property
    def failed(self) -> list[Hashable]:
        """Sequences in the ``"failed"`` state (until [`free`][])."""
        with self._lock:
            return list(self._failed)

    def synchronize(self) -> None:
        """Wait for every queued copy (counted as swap-in wait time); failed asynchronous
        swap-outs are then ``"failed"``."""
        with self._lock:
            t0 = self._clock()
            self.engine.synchronize()
            self._t["swap_in_wait_s"] += self._clock() - t0
            self._reap_swap_outs()
            self._reap_migrations()

    def stats(self) -> SwapManagerStats:
        """The manager's counters and wait times so far ([`SwapManagerStats`][])."""
        with self._lock:
            return SwapManagerStats(**self._n, **self._t)

    @property
    def stall_s(self) -> float:
        """Seconds the caller has been blocked on swaps and migrations so far
        (``stats().stall_s``)."""
        t = self._t
        return (t["conflict_wait_s"] + t["swap_out_wait_s"] + t["swap_in_wait_s"]
                + t["migrate_wait_s"])

    def close(self) -> None:
        """Finish queued copies and close the engine. Serialised with the other methods
        (it takes the manager's lock): a call running in another thread finishes first, and
        a later call that would queue copies raises
        [`EngineClosedError`][kvswitch.EngineClosedError] having changed nothing."""
        with self._lock:
            self.engine.close()

    def __enter__(self) -> SwapManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (the lock is held) ----------------------------------------------------

    def _submit(self, direction: str, plan: SwapPlan, *, before: Any = None,
                after: Any = None) -> SwapHandle | None:
        """Queue a plan's copies (None when it has none); only the streams given are
        passed on. Counts its extents, copies and bytes."""
        pairs = plan.pairs if self.coalesce else _per_block_pairs(plan.pairs)
        n_pairs = len(pairs)
        if not n_pairs:
            return None
        n = self._n
        if direction == "out":
            handle = (self.engine.swap_out(pairs) if after is None
                      else self.engine.swap_out(pairs, after=after))
            n["swap_out_extents"] += n_pairs
        else:
            if before is None and after is None:
                handle = self.engine.swap_in(pairs)
            else:
                stream = {"before": before, "after": after}
                handle = self.engine.swap_in(
                    pairs, **{k: v for k, v in stream.items() if v is not None})
            n["swap_in_extents"] += n_pairs
        n["copies"] += n_pairs * self._regions
        # A plan's pairs copy exactly its copied blocks (per-block pairs as many).
        n["bytes_copied"] += plan.copied_blocks * self._block_bytes
        self._unfinished.append(handle)
        return handle

    def _unfinished_jobs(self) -> bool:
        self._refresh_recent()
        return bool(self._unfinished) or any(not h.done() for h, _ in self._migrations)

    def _compact_for(self, num_blocks: int, reserve: int, *, before: Any, after: Any) -> None:
        """Compaction before a swap-in of ``num_blocks`` blocks followed by ``reserve``
        more (see [`swap_in`][])."""
        gpu = self.gpu
        if num_blocks > gpu.num_free_blocks:
            return  # the allocate raises OutOfBlocksError
        if after is None and self.engine.backend == "cuda":
            # Without the compute stream a migration could copy blocks that kernels still
            # write (a running sequence's last block), and kernels still queued would write
            # the old ids, given to the swap-in: no compaction.
            return
        size = min(num_blocks + reserve, gpu.num_free_blocks)
        streams = {k: v for k, v in (("before", before), ("after", after)) if v is not None}
        self.engine.check_migrate(**streams)
        self._reap_migrations()  # sequences an ended migration failed stay put (pinned)
        # Sequences swapping in (their copies write their blocks) and failed ones stay put.
        pinned = [*self._swapping_in, *self._failed]
        max_moved = int(min(self.compaction_max_moved * size, INT32_MAX))
        moves = gpu.compact(size, max_moved=max_moved, pinned=pinned)
        if not moves:  # None (no change) or only reserved tails released
            return
        pairs = moves.pairs()
        moved = moves.moved_sequences
        try:
            handle = self.engine.migrate(pairs, **streams)
        except BaseException as exc:
            # Nothing was queued: the tables name new blocks that hold no KV. The old ones
            # are still free (the lock is held), so move the tables back. Should that be
            # refused, fail the moved sequences (reported by take_failed) so that nothing
            # reads the new ids as theirs. Either way the caller sees the cause.
            try:
                gpu.undo_moves(moves)
            except Exception:
                self._fail_unmigrated(moved, exc)
            raise
        n = self._n
        n["migrations"] += 1
        n["migrated_blocks"] += moves.moved_blocks
        n["migrate_extents"] += len(pairs)
        n["migrate_bytes"] += moves.moved_blocks * self._block_bytes
        self._table_changes.update(dict.fromkeys(moved))
        self._migrations.append((handle, dict.fromkeys(moved)))
        if before is None:
            t0 = self._clock()
            _quiet_wait(handle)
            self._t["migrate_wait_s"] += self._clock() - t0
            self._reap_migrations()
        if self.on_block_tables_changed is not None:
            # Running ones only: a failed migration (waited for above) failed the others.
            self.on_block_tables_changed(self._current_tables(moved))

    def _fail_unmigrated(self, moved: list[Hashable], cause: BaseException) -> None:
        """Mark failed the sequences a compaction moved whose migration was never queued and
        whose moves could not be undone."""
        for s in moved:
            error = SwapError(f"migration of sequence {s!r} failed: its blocks were moved "
                              f"but the migration could not be queued: {cause!r}")
            error.seq_id = s
            error.direction = "migrate"
            error.job_id = None
            error.root_job_id = None
            self._n["migrate_failures"] += 1
            self._mark_failed(s, error)

    def _current_tables(self, seq_ids: Any) -> dict[Hashable, npt.NDArray[np.int32]]:
        """``{seq_id: its GPU block table now}`` for those still holding GPU blocks and not
        failed (a failed sequence is never run again)."""
        gpu, failed = self.gpu, self._failed
        return {s: gpu.block_table(s) for s in seq_ids if s in gpu and s not in failed}

    def _forget_moves(self, seq_id: Hashable) -> None:
        """The sequence no longer holds its GPU blocks (freed or swapped out): no pending
        migration's failure concerns it (a swap-out of it is ordered after the migration and
        fails with it on its own), and it has no table change to report."""
        self._table_changes.pop(seq_id, None)
        for _, moved in self._migrations:
            moved.pop(seq_id, None)

    def _reap_migrations(self) -> None:
        """Migrations whose job ended: a failed one fails the sequences it moved that still
        hold the moved blocks ([`_forget_moves`][] drops those freed or swapped out since;
        a swap-out of one was ordered after the migration and fails with it, through the
        swap-out path)."""
        if not self._migrations:
            return
        still = []
        for handle, moved in self._migrations:
            if not handle.done():
                still.append((handle, moved))
                continue
            if not handle.error:
                continue
            for s in moved:
                if s in self._failed or s not in self.gpu:
                    continue
                self._fail_migrated(s, handle)
        self._migrations = still

    def _failed_migration(self, seq_id: Hashable) -> SwapHandle | None:
        """A migration not yet reaped that moved the sequence's blocks and ended failed."""
        for handle, moved in self._migrations:
            if seq_id in moved and handle.done() and handle.error:
                return handle
        return None

    def _fail_migrated(self, seq_id: Hashable, handle: SwapHandle) -> SwapError:
        self._n["migrate_failures"] += 1
        return self._mark_failed(seq_id, self._error(seq_id, "migrate", handle))

    def _refresh_recent(self) -> None:
        still = []
        for h in self._unfinished:
            if not h.done():
                still.append(h)
            elif not h.error:  # a failed job says nothing about bandwidth
                self._recent.append(h)
        self._unfinished = still

    def _finish_swap_ins(self) -> list[Hashable]:
        """Swap-ins whose job ended: running ones returned, failed ones marked failed."""
        ready = []
        for s, record in list(self._swapping_in.items()):
            handle = record.handle
            if handle is not None and not handle.done():
                continue
            del self._swapping_in[s]
            if handle is not None and handle.error:
                self._fail_swap_in(s, record)
            else:
                ready.append(s)
        return ready

    def _reap_swap_outs(self) -> None:
        """Asynchronous swap-outs whose job ended: failed ones mark their sequence."""
        for s, record in list(self._outs_in_flight.items()):
            handle = record.handle
            if handle is None or not handle.done():
                continue
            del self._outs_in_flight[s]
            if handle.error:
                self._fail_swap_out(s, record)
            else:
                record.handle = None

    def _fail_swap_out(self, seq_id: Hashable, record: _SwappedOut) -> SwapError:
        assert record.handle is not None
        error = self._error(seq_id, "out", record.handle)
        self._swapped.pop(seq_id, None)
        self._outs_in_flight.pop(seq_id, None)
        self.tracker.fail(record.plan)  # its copies are invalid; the rest is reclaimable
        return self._mark_failed(seq_id, error)

    def _fail_swap_in(self, seq_id: Hashable, record: _SwappingIn) -> SwapError:
        assert record.handle is not None
        error = self._error(seq_id, "in", record.handle)
        if seq_id in self.tracker:
            self.tracker.fail(record.plan)
            out = record.swap_out
            if out is not None and out.handle is not None and out.handle.error:
                # It failed because its swap-out did (the engine ordered it after that one):
                # the CPU copy's blocks that one was to write were never written.
                self.tracker.fail(out.plan)
        return self._mark_failed(seq_id, error)

    def _mark_failed(self, seq_id: Hashable, error: SwapError) -> SwapError:
        self._failed[seq_id] = error
        self._unreported[seq_id] = error
        self._n["swap_failures"] += 1
        return error

    @staticmethod
    def _error(seq_id: Hashable, direction: str, handle: SwapHandle) -> SwapError:
        what = "migration" if direction == "migrate" else f"swap-{direction}"
        error = SwapError(f"{what} of sequence {seq_id!r} failed: swap job "
                          f"{handle.id}: {handle.error}")
        error.seq_id = seq_id
        error.direction = direction
        error.job_id = handle.id
        error.root_job_id = handle.root_job_id
        return error

    def _known(self, seq_id: Hashable) -> bool:
        try:
            hash(seq_id)
        except TypeError:  # an unhashable id is an unknown sequence, as in the allocator
            return False
        return (seq_id in self._failed or seq_id in self._swapped or seq_id in self._swapping_in
                or seq_id in self.gpu or seq_id in self.tracker)

    def _wait_own_jobs(self, seq_id: Hashable) -> None:
        """Wait for the sequence's swap-in and swap-out still in flight (counted as swap-in
        wait), so that releasing its blocks cannot order another sequence's job after a
        job of this one, which would fail with it."""
        for record in (self._swapping_in.get(seq_id), self._swapped.get(seq_id)):
            if record is not None and record.handle is not None and not record.handle.done():
                t0 = self._clock()
                _quiet_wait(record.handle)
                self._t["swap_in_wait_s"] += self._clock() - t0

    def _check_not_failed(self, seq_id: Hashable) -> None:
        """A failed sequence refuses work: with its SwapError while that is unreported
        (raising reports it), else with a ValueError."""
        if seq_id not in self._failed:
            return
        if self._unreported.pop(seq_id, None) is not None:
            raise self._failed[seq_id]
        raise ValueError(f"sequence {seq_id!r} has failed ({self._failed[seq_id]}); free() it")

    def _check_running(self, seq_id: Hashable) -> None:
        if seq_id in self._swapped:
            raise ValueError(f"sequence {seq_id!r} is swapped out")
        if seq_id in self._swapping_in:
            raise ValueError(f"sequence {seq_id!r} is still swapping in")
        self._check_not_failed(seq_id)
        if seq_id not in self.gpu:
            raise self._unknown(seq_id)

    @staticmethod
    def _unknown(seq_id: Hashable) -> KeyError:
        return KeyError(f"unknown sequence {seq_id!r}")
