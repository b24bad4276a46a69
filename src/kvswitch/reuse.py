"""CPU copies of multi-turn conversations that survive partial contamination.

FastSwitch section 3.3 ("KV Cache Reuse Mechanism") and Table 1: after a swap-in, a
sequence's CPU copy is kept as a *backup*. The KV of past tokens never changes, so the next
swap-out copies only the blocks whose CPU copy is missing or stale. When the host pool runs
short, backups of other sequences are *reclaimed* at block-group granularity from their
tail; the reclaimed blocks are *contaminated* and copied again later, the rest stays valid.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from kvswitch import _core
from kvswitch._validate import INT32_MAX, INT64_MAX, as_count
from kvswitch.allocator import BlockGroupAllocator, OutOfBlocksError

__all__ = ["ReuseStats", "ReuseTracker", "SwapPlan", "coalesce_pairs"]


def coalesce_pairs(src: npt.ArrayLike, dst: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Turn per-block copies ``src[i] -> dst[i]`` into copy pairs of extents.

    Consecutive entries whose source and destination both advance by one block merge into
    one extent.

    Args:
        src, dst: int arrays of shape ``[n]``, block ids.

    Returns:
        int64 array ``[m, 3]`` of ``(src_start, dst_start, length)`` in blocks, ``m <= n``,
        in the order of the input, as [`kvswitch.AsyncSwapEngine`][] takes them.
    """
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    if src.shape != dst.shape or src.ndim != 1:
        raise ValueError(f"src and dst must be 1-D of one shape, got {src.shape} and {dst.shape}")
    if src.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    breaks = (np.diff(src) != 1) | (np.diff(dst) != 1)
    starts = np.concatenate(([0], np.flatnonzero(breaks) + 1))
    lengths = np.diff(np.concatenate((starts, [src.size])))
    return np.stack((src[starts], dst[starts], lengths), axis=1)


@dataclass(frozen=True)
class ReuseStats:
    """Counters since the tracker was made (blocks are host-pool blocks)."""

    swap_outs: int
    swap_ins: int
    blocks_copied: int  #: blocks copied GPU -> host by swap-outs
    blocks_reused: int  #: blocks a swap-out found valid in the CPU copy and did not copy
    blocks_reclaimed: int  #: backup blocks taken for other sequences
    contaminations: int  #: reclaim events (one per backup that lost blocks)


def _no_blocks() -> npt.NDArray[np.int32]:
    return np.zeros(0, np.int32)


@dataclass(eq=False)
class SwapPlan:
    """The copies one swap needs; made by [`ReuseTracker.plan_swap_out`][] or
    [`ReuseTracker.plan_swap_in`][] and handed back with [`ReuseTracker.commit`][]
    once its copies are issued (or [`ReuseTracker.cancel`][]), and with
    [`ReuseTracker.fail`][] if those copies failed.

    Attributes:
        seq_id: the sequence.
        direction: ``"out"`` (GPU -> host) or ``"in"`` (host -> GPU).
        pairs: int64 ``[n, 3]`` copy pairs ``(src_start, dst_start, length)`` in blocks,
            coalesced into extents; source is the GPU pool for ``"out"``, the host pool for
            ``"in"``.
        copied_blocks: blocks the pairs copy.
        reused_blocks: blocks whose valid CPU copy made a copy unnecessary (``"out"`` only).
        num_tokens: tokens of KV the swap covers.
    """

    seq_id: Hashable
    direction: Literal["out", "in"]
    pairs: npt.NDArray[np.int64]
    copied_blocks: int
    reused_blocks: int
    num_tokens: int
    _copied_logical: npt.NDArray[np.int64] = field(repr=False)  # logical blocks copied
    _new_host_blocks: npt.NDArray[np.int32] = field(repr=False, default_factory=_no_blocks)
    _priority: float = 0.0
    _state: Literal["pending", "committed", "cancelled", "failed"] = field(
        repr=False, default="pending")


# A sequence's CPU copy (cpp/include/kvswitch/reuse_copy.hpp): per logical block its host
# block id (-1 when none) and the tokens its copy holds, with the plan computations, plus
# the scalars num_tokens (tokens at the last swap-out), swapped_out (the CPU copy is the
# only copy: never reclaimed), priority and last_used.
_CpuCopy = _core.CpuCopy
_TABLE_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))  # taken by _CpuCopy as they are
_NO_BLOCKS = np.zeros(0, np.int32)


class ReuseTracker:
    """Tracks, per sequence, which logical blocks have a valid copy in the host pool.

    Validity per logical block ``i`` (tokens ``[i*block_size, (i+1)*block_size)``): its copy
    is valid while it holds at least the tokens the block holds now. A full block's copy stays
    valid until reclaimed; the last, partly filled block is copied again once it gained
    tokens. This relies on the KV of a token never changing once it was swapped out; an
    engine that rolls a sequence back (regenerates a reply, rejects speculative tokens)
    says so with [`truncate`][], or by swapping it out shorter: every copied token at
    and beyond the new length is then invalid.

    Host space: blocks come from ``host_allocator`` under the sequence's id; its reserved
    tail keeps the next turn's increment next to the existing copy (paper 3.3: "preallocates
    additional memory space ... adjacent"). When the host pool lacks free blocks, backups of
    sequences that are not swapped out are reclaimed, lowest priority first, then least
    recently used, from the tail of each backup (its last logical blocks), taking only the
    blocks still needed so the head of the backup stays valid. The only copy of a swapped-out
    sequence is never reclaimed.

    A plan's life: [`plan_swap_out`][] / [`plan_swap_in`][] (pending) ->
    [`commit`][] once its copies are issued, or [`cancel`][] if they never were ->
    [`fail`][] if its copies failed (before or after the commit): the blocks it was to
    write are then invalid.

    Args:
        host_allocator: allocator of the host pool; the tracker owns its sequences.
        block_size: tokens per block (int > 0).

    Raises:
        TypeError: ``block_size`` is not an int.
        ValueError: it is not positive, or the allocator already holds sequences.

    Every method either succeeds or raises and changes nothing. Thread safety: methods
    may be called from several threads; one lock serialises them.
    """

    def __init__(self, host_allocator: BlockGroupAllocator, *, block_size: int = 16) -> None:
        block_size = as_count(block_size, "block_size", maximum=INT32_MAX)
        if len(host_allocator):
            raise ValueError("host_allocator must be empty: the tracker owns its sequences")
        self.host = host_allocator
        self.block_size = block_size
        self._lock = threading.RLock()
        self._copies: dict[Hashable, _CpuCopy] = {}
        self._blank = _CpuCopy(block_size)  # plans the first swap-out of a sequence
        self._pending: dict[Hashable, SwapPlan] = {}
        self._clock = itertools.count(1)
        self._swap_outs = self._swap_ins = 0
        self._copied = self._reused = self._reclaimed = self._contaminations = 0

    # -- swap-out ------------------------------------------------------------------------

    def plan_swap_out(
        self,
        seq_id: Hashable,
        gpu_block_table: npt.ArrayLike,
        num_tokens: int,
        *,
        priority: float = 0.0,
    ) -> SwapPlan:
        """Plan the swap-out of ``seq_id``'s first ``num_tokens`` tokens.

        Blocks whose CPU copy is valid are reused; host blocks are allocated for the others
        (reclaiming backups of other sequences if needed). Commit the plan once its pairs are
        handed to the swap engine. A ``num_tokens`` below the CPU copy's length is a
        rollback: the commit invalidates every copied token at and beyond it.

        Args:
            seq_id: the sequence.
            gpu_block_table: int array ``[>= ceil(num_tokens / block_size)]``: its GPU
                block ids in token order.
            num_tokens: tokens of KV to keep (> 0).
            priority: the sequence's priority (higher is more important), used to choose
                which backups to reclaim first.

        Returns:
            The plan: ``copied_blocks + reused_blocks == ceil(num_tokens / block_size)``.

        Raises:
            ValueError: bad table or token count, the sequence is already swapped out, or
                it has a plan not yet committed.
            OutOfBlocksError: the host pool cannot hold the copy even after reclaiming every
                backup of other sequences (nothing is reclaimed then).
        """
        if type(num_tokens) is not int or num_tokens <= 0:  # fast path: a plain positive int
            num_tokens = as_count(num_tokens, "num_tokens")
        if type(priority) is not float:  # stored as a C++ double at commit: fail here
            priority = float(priority)
        with self._lock:
            table = gpu_block_table
            if not (type(table) is np.ndarray and table.ndim == 1  # fast path: as it is
                    and table.dtype in _TABLE_DTYPES and table.flags.c_contiguous):
                table = self._table(table)
            if num_tokens > INT64_MAX:  # past what the C++ state takes; no table holds it
                raise ValueError(f"gpu_block_table holds {table.size} blocks but {num_tokens} "
                                 f"tokens need {-(-num_tokens // self.block_size)}")
            copy = self._copies.get(seq_id)
            # Checks the table (size, no negative id); blocks without a host block, the
            # table's blocks beyond the copy included.
            need = (self._blank if copy is None else copy).prepare_out(table, num_tokens)
            if seq_id in self._pending:
                raise ValueError(f"sequence {seq_id!r} has a plan that is not committed yet")
            if copy is not None and copy.swapped_out:
                raise ValueError(f"sequence {seq_id!r} is already swapped out")
            if not need:
                new = _NO_BLOCKS
            else:
                try:  # an allocation that fails changes nothing
                    new = self.host.allocate(seq_id, need)
                except OutOfBlocksError:
                    free = self.host.num_free_blocks
                    if need <= free:
                        raise
                    self._reclaim(need - free, exclude=seq_id)  # or raises
                    new = self.host.allocate(seq_id, need)
            first = copy is None
            if first:
                copy = _CpuCopy(self.block_size)
            # Grows the copy to the table (blocks beyond it are released at commit), gives
            # the missing blocks the new host blocks, and plans the copies of the missing
            # or stale ones (the partly filled block gained tokens). A copy holding more
            # tokens than the block now (a rollback) is still valid for the tokens the block
            # keeps: their KV did not change.
            pairs, copied = copy.plan_out(table, num_tokens, new)
            if first:
                self._copies[seq_id] = copy
            n_copied = len(copied)
            plan = SwapPlan(seq_id, "out", pairs, n_copied,
                            -(-num_tokens // self.block_size) - n_copied, num_tokens, copied,
                            new, priority)
            self._pending[seq_id] = plan
            return plan

    # -- swap-in -------------------------------------------------------------------------

    def plan_swap_in(self, seq_id: Hashable, gpu_block_table: npt.ArrayLike) -> SwapPlan:
        """Plan the swap-in of a swapped-out sequence to ``gpu_block_table``.

        Args:
            seq_id: a swapped-out sequence.
            gpu_block_table: int array ``[>= its blocks]``: the GPU block ids to fill, in
                token order (they may differ from the ones it was swapped out from).

        Returns:
            The plan (host -> GPU pairs for every block). After commit the CPU copy stays as
            a reclaimable backup.

        Raises:
            KeyError: unknown sequence.
            ValueError: not swapped out, a plan pending, or a table too short.
        """
        with self._lock:
            copy = self._known(seq_id)
            if seq_id in self._pending:
                raise ValueError(f"sequence {seq_id!r} has a plan that is not committed yet")
            if not copy.swapped_out:
                raise ValueError(f"sequence {seq_id!r} is not swapped out")
            num_tokens = copy.num_tokens
            pairs = copy.pairs_in(self._table(gpu_block_table), num_tokens)
            n = -(-num_tokens // self.block_size)
            plan = SwapPlan(seq_id, "in", pairs, n, 0, num_tokens,
                            np.arange(n, dtype=np.int64))
            self._pending[seq_id] = plan
            return plan

    # -- plan life cycle -----------------------------------------------------------------

    def commit(self, plan: SwapPlan) -> None:
        """Record a plan whose copies were issued.

        A swap-out's copied blocks become valid, copied tokens at and beyond its length
        become invalid (host blocks wholly beyond it are released), and the sequence counts
        as swapped out (its CPU copy is then never reclaimed). A swap-in makes the copy a
        reclaimable backup. If the copies fail later, call [`fail`][].

        Raises:
            ValueError: the plan is not pending (committed twice, cancelled, or stale).
        """
        with self._lock:
            pending = self._pending
            if pending.get(plan.seq_id) is not plan:
                self._take_pending(plan)  # raises
            del pending[plan.seq_id]
            plan._state = "committed"
            copy = self._copies[plan.seq_id]
            copy.last_used = next(self._clock)
            if plan.direction == "out":
                # Copied tokens at and beyond num_tokens become invalid (a rollback), the
                # copied blocks valid; host blocks wholly beyond it are released.
                beyond = copy.commit_out(plan.num_tokens, plan._copied_logical)
                if beyond is not None:
                    self.host.free_blocks(plan.seq_id, beyond)
                    copy.cut(-(-plan.num_tokens // self.block_size))
                copy.num_tokens = plan.num_tokens
                copy.swapped_out = True
                copy.priority = plan._priority
                self._swap_outs += 1
                self._copied += plan.copied_blocks
                self._reused += plan.reused_blocks
            else:
                copy.swapped_out = False
                self._swap_ins += 1

    def cancel(self, plan: SwapPlan) -> None:
        """Undo an uncommitted plan whose copies were never issued: a swap-out's new host
        blocks are released. (Backups reclaimed for it stay reclaimed.)

        Raises:
            ValueError: the plan is not pending.
        """
        with self._lock:
            self._take_pending(plan)
            plan._state = "cancelled"
            self._release_new_blocks(plan)
            self._forget_if_empty(plan.seq_id)

    def fail(self, plan: SwapPlan) -> None:
        """Record that a plan's copies failed, whether it was committed or still pending.

        A swap-out's copied blocks are invalid (the failed copy may have written part of
        them); a pending swap-out's new host blocks are released; a committed swap-out's
        copy is no longer protected (the sequence's KV it was to hold is lost), so its
        remaining valid blocks become a reclaimable backup. A swap-in reads the host pool
        only: its CPU copy stays as it was.

        Raises:
            ValueError: the plan is neither pending nor committed (cancelled, or failed
                already).
        """
        with self._lock:
            if self._pending.get(plan.seq_id) is plan:
                del self._pending[plan.seq_id]
                was_committed = False
            elif plan._state == "committed" and plan.seq_id in self._copies:
                was_committed = True
            else:
                raise ValueError(f"plan for sequence {plan.seq_id!r} is neither pending nor "
                                 "committed")
            plan._state = "failed"
            if plan.direction == "out":
                copy = self._copies[plan.seq_id]
                copy.invalidate(plan._copied_logical)
                if was_committed:
                    copy.swapped_out = False
                else:
                    # The caller declared its length (maybe a rollback) and the copies were
                    # issued: apply the rollback as commit would. Invalidating is safe.
                    copy.clamp(plan.num_tokens)
                    self._release_new_blocks(plan)
            self._forget_if_empty(plan.seq_id)

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Roll ``seq_id`` back to its first ``num_tokens`` tokens (a regenerated reply,
        rejected speculative tokens, a pruned beam): copied tokens at and beyond
        ``num_tokens`` are invalid from now on, and host blocks wholly beyond it are
        released. A swapped-out sequence keeps only ``num_tokens`` tokens (its swap-in
        restores those). Does nothing for an unknown sequence or a copy already shorter.

        Args:
            seq_id: the sequence.
            num_tokens: tokens that stay (>= 0; 0 drops the whole copy's validity).

        Raises:
            TypeError: ``num_tokens`` is not an int.
            ValueError: negative, or the sequence has a plan pending.
        """
        num_tokens = as_count(num_tokens, "num_tokens", minimum=0)
        with self._lock:
            if seq_id in self._pending:
                raise ValueError(f"sequence {seq_id!r} has a plan that is not committed yet")
            copy = self._copies.get(seq_id)
            if copy is None:
                return
            if copy.swapped_out and num_tokens == 0:
                raise ValueError(f"sequence {seq_id!r} is swapped out: truncating it to 0 "
                                 "tokens would leave nothing to swap in; drop it instead")
            copy.clamp(min(num_tokens, INT64_MAX))  # all tokens of any real copy
            self._release_beyond(seq_id, copy, -(-num_tokens // self.block_size))
            copy.num_tokens = min(copy.num_tokens, num_tokens)
            self._forget_if_empty(seq_id)

    def keep_backup(self, seq_id: Hashable) -> None:
        """Mark a swapped-in sequence's CPU copy as a reclaimable backup (what committing its
        swap-in plan does). Raises KeyError if unknown."""
        with self._lock:
            copy = self._known(seq_id)
            if seq_id in self._pending:
                raise ValueError(f"sequence {seq_id!r} has a plan that is not committed yet")
            copy.swapped_out = False

    def drop(self, seq_id: Hashable) -> int:
        """Forget a sequence (its conversation ended) and release its host blocks.

        Returns:
            Host blocks released. Raises KeyError if unknown, ValueError if a plan is pending.
        """
        with self._lock:
            self._known(seq_id)
            if seq_id in self._pending:
                raise ValueError(f"sequence {seq_id!r} has a plan that is not committed yet")
            del self._copies[seq_id]
            return self.host.free(seq_id) if seq_id in self.host else 0

    # -- queries -------------------------------------------------------------------------

    def valid_blocks(self, seq_id: Hashable) -> npt.NDArray[np.bool_]:
        """Bool array ``[logical blocks]``: True where the CPU copy holds the tokens that the
        block held at the last swap-out. Raises KeyError if unknown."""
        with self._lock:
            return self._known(seq_id).valid_blocks()

    def valid_tokens(self, seq_id: Hashable) -> npt.NDArray[np.int32]:
        """int32 array ``[logical blocks]``: how many leading tokens of each logical block
        the CPU copy holds validly (0 where it holds none). A block is reused by the next
        swap-out when this covers the tokens the block holds then. Raises KeyError if
        unknown."""
        with self._lock:
            return self._known(seq_id).valid_tokens()

    def host_block_table(self, seq_id: Hashable) -> npt.NDArray[np.int32]:
        """int32 array ``[logical blocks]``: host block of each logical block, -1 if none."""
        with self._lock:
            return self._known(seq_id).host_blocks  # a new array

    def is_swapped_out(self, seq_id: Hashable) -> bool:
        with self._lock:
            return self._known(seq_id).swapped_out

    def __contains__(self, seq_id: object) -> bool:
        try:
            return seq_id in self._copies
        except TypeError:  # unhashable
            return False

    def stats(self) -> ReuseStats:
        with self._lock:
            return ReuseStats(self._swap_outs, self._swap_ins, self._copied, self._reused,
                              self._reclaimed, self._contaminations)

    # -- internals (the lock is held) ----------------------------------------------------

    def _known(self, seq_id: Hashable) -> _CpuCopy:
        try:
            return self._copies[seq_id]
        except (KeyError, TypeError):
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    @staticmethod
    def _table(gpu_block_table: npt.ArrayLike) -> npt.NDArray[np.int32] | npt.NDArray[np.int64]:
        """The table as a 1-D C-contiguous int32 or int64 array (the one given when it is
        one already); its size and ids are checked by the _CpuCopy call it goes to."""
        table = gpu_block_table
        if (type(table) is np.ndarray and table.ndim == 1 and table.dtype in _TABLE_DTYPES
                and table.flags.c_contiguous):
            return table  # fast path: no conversion
        table = np.asarray(table)
        if table.ndim != 1 or table.dtype.kind not in "iu":
            raise ValueError(f"gpu_block_table must be a 1-D integer array, got {table.dtype}"
                             f" of shape {table.shape}")
        return np.ascontiguousarray(table, dtype=np.int64)

    def _release_beyond(self, seq_id: Hashable, copy: _CpuCopy, n_logical: int) -> None:
        """Release host blocks of logical blocks >= n_logical and cut the copy there."""
        n_logical = min(n_logical, len(copy))  # a count past the copy changes nothing
        held = copy.held_beyond(n_logical)
        if held.size:
            self.host.free_blocks(seq_id, held)
        copy.cut(n_logical)

    def _release_new_blocks(self, plan: SwapPlan) -> None:
        """A swap-out plan's newly allocated host blocks go back to the host pool."""
        if plan.direction != "out" or not plan._new_host_blocks.size:
            return
        copy = self._copies[plan.seq_id]
        self.host.free_blocks(plan.seq_id, plan._new_host_blocks)
        copy.forget(plan._new_host_blocks)

    def _reclaim(self, deficit: int, exclude: Hashable) -> None:
        victims = [
            (c.priority, c.last_used, s) for s, c in self._copies.items()
            if s != exclude and not c.swapped_out and s not in self._pending
            and s in self.host and self.host.num_table_blocks(s) > 0
        ]
        reclaimable = sum(self.host.num_table_blocks(s) for _, _, s in victims)
        if reclaimable < deficit:
            raise OutOfBlocksError(
                f"host pool: {deficit} more blocks needed but only {reclaimable} are held by "
                "reclaimable backups"
            )
        victims.sort(key=lambda v: (v[0], v[1]))
        for _, _, seq in victims:
            copy = self._copies[seq]
            # From the tail of the backup (highest logical blocks), only what is needed: the
            # allocator merges a backup into maximal runs, so taking a whole group could
            # contaminate a whole conversation for a few blocks.
            take = copy.tail(deficit)
            self.host.free_blocks(seq, take)
            copy.drop_tail(deficit)
            deficit -= take.size
            self._reclaimed += take.size
            self._contaminations += 1
            if deficit <= 0:
                return

    def _take_pending(self, plan: SwapPlan) -> None:
        if self._pending.get(plan.seq_id) is not plan:
            raise ValueError(f"plan for sequence {plan.seq_id!r} is not pending "
                             "(committed twice, cancelled, or superseded)")
        del self._pending[plan.seq_id]

    def _forget_if_empty(self, seq_id: Hashable) -> None:
        copy = self._copies[seq_id]
        if not copy.swapped_out and copy.num_tokens == 0 and copy.empty():
            del self._copies[seq_id]
            if seq_id in self.host:
                self.host.free(seq_id)
