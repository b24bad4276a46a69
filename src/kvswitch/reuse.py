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

from kvswitch._validate import INT32_MAX, as_count
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
        in the order of the input, as :class:`kvswitch.AsyncSwapEngine` takes them.
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
    """The copies one swap needs; made by :meth:`ReuseTracker.plan_swap_out` or
    :meth:`ReuseTracker.plan_swap_in` and handed back with :meth:`ReuseTracker.commit`
    once its copies are issued (or :meth:`ReuseTracker.cancel`), and with
    :meth:`ReuseTracker.fail` if those copies failed.

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


@dataclass
class _CpuCopy:
    host_blocks: npt.NDArray[np.int32]  # logical block -> host block id, -1 when none
    copied_tokens: npt.NDArray[np.int32]  # tokens valid in each logical block's copy
    num_tokens: int = 0  # tokens of the sequence at its last swap-out
    swapped_out: bool = False  # the CPU copy is the only copy: never reclaimed
    priority: float = 0.0
    last_used: int = 0


class ReuseTracker:
    """Tracks, per sequence, which logical blocks have a valid copy in the host pool.

    Validity per logical block ``i`` (tokens ``[i*block_size, (i+1)*block_size)``): its copy
    is valid while it holds at least the tokens the block holds now. A full block's copy stays
    valid until reclaimed; the last, partly filled block is copied again once it gained
    tokens. This relies on the KV of a token never changing once it was swapped out; an
    engine that rolls a sequence back (regenerates a reply, rejects speculative tokens)
    says so with :meth:`truncate`, or by swapping it out shorter: every copied token at
    and beyond the new length is then invalid.

    Host space: blocks come from ``host_allocator`` under the sequence's id; its reserved
    tail keeps the next turn's increment next to the existing copy (paper 3.3: "preallocates
    additional memory space ... adjacent"). When the host pool lacks free blocks, backups of
    sequences that are not swapped out are reclaimed, lowest priority first, then least
    recently used, from the tail of each backup (its last logical blocks), taking only the
    blocks still needed so the head of the backup stays valid. The only copy of a swapped-out
    sequence is never reclaimed.

    A plan's life: :meth:`plan_swap_out` / :meth:`plan_swap_in` (pending) ->
    :meth:`commit` once its copies are issued, or :meth:`cancel` if they never were ->
    :meth:`fail` if its copies failed (before or after the commit): the blocks it was to
    write are then invalid.

    Args:
        host_allocator: allocator of the host pool; the tracker owns its sequences.
        block_size: tokens per block (int > 0).

    Raises:
        TypeError: ``block_size`` is not an int. ValueError: it is not positive, or the
            allocator already holds sequences.

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
        with self._lock:
            table = self._table(gpu_block_table, num_tokens)
            if seq_id in self._pending:
                raise ValueError(f"sequence {seq_id!r} has a plan that is not committed yet")
            copy = self._copies.get(seq_id)
            if copy is not None and copy.swapped_out:
                raise ValueError(f"sequence {seq_id!r} is already swapped out")
            n_logical = len(table)
            if copy is None:
                host_blocks = np.full(n_logical, -1, np.int32)
                copied_tokens = np.zeros(n_logical, np.int32)
            else:  # grown to cover the table; blocks beyond it are released at commit
                host_blocks, copied_tokens = self._grown(copy, n_logical)
            held = self._tokens_per_block(num_tokens, len(host_blocks))
            # Missing (0 tokens copied) or stale (the partly filled block gained tokens). A
            # copy holding more tokens than the block now (a rollback) is still valid for
            # the tokens the block keeps: their KV did not change.
            stale = np.flatnonzero(copied_tokens[:n_logical] < held[:n_logical])
            missing = np.flatnonzero(host_blocks[:n_logical] < 0)
            need = int(missing.size)
            if need > self.host.num_free_blocks:
                self._reclaim(need - self.host.num_free_blocks, exclude=seq_id)  # or raises
            new = self.host.allocate(seq_id, need) if need else np.zeros(0, np.int32)
            host_blocks[missing] = new
            copied = stale
            pairs = coalesce_pairs(table[copied], host_blocks[copied])
            if copy is None:
                copy = _CpuCopy(host_blocks, copied_tokens)
                self._copies[seq_id] = copy
            else:
                copy.host_blocks = host_blocks
                copy.copied_tokens = copied_tokens
            plan = SwapPlan(
                seq_id, "out", pairs, int(copied.size), n_logical - int(copied.size),
                num_tokens, _copied_logical=copied, _new_host_blocks=new, _priority=priority,
            )
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
            table = self._table(gpu_block_table, copy.num_tokens)
            n = len(table)
            pairs = coalesce_pairs(copy.host_blocks[:n], table)
            plan = SwapPlan(seq_id, "in", pairs, n, 0, copy.num_tokens,
                            _copied_logical=np.arange(n, dtype=np.int64))
            self._pending[seq_id] = plan
            return plan

    # -- plan life cycle -----------------------------------------------------------------

    def commit(self, plan: SwapPlan) -> None:
        """Record a plan whose copies were issued.

        A swap-out's copied blocks become valid, copied tokens at and beyond its length
        become invalid (host blocks wholly beyond it are released), and the sequence counts
        as swapped out (its CPU copy is then never reclaimed). A swap-in makes the copy a
        reclaimable backup. If the copies fail later, call :meth:`fail`.

        Raises:
            ValueError: the plan is not pending (committed twice, cancelled, or stale).
        """
        with self._lock:
            self._take_pending(plan)
            plan._state = "committed"
            copy = self._copies[plan.seq_id]
            copy.last_used = next(self._clock)
            if plan.direction == "out":
                n_logical = -(-plan.num_tokens // self.block_size)
                held = self._tokens_per_block(plan.num_tokens, len(copy.host_blocks))
                np.minimum(copy.copied_tokens, held, out=copy.copied_tokens)  # rollback
                copy.copied_tokens[plan._copied_logical] = held[plan._copied_logical]
                self._release_beyond(plan.seq_id, copy, n_logical)
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
                logical = plan._copied_logical[plan._copied_logical < len(copy.copied_tokens)]
                copy.copied_tokens[logical] = 0
                if was_committed:
                    copy.swapped_out = False
                else:
                    # The caller declared its length (maybe a rollback) and the copies were
                    # issued: apply the rollback as commit would. Invalidating is safe.
                    held = self._tokens_per_block(plan.num_tokens, len(copy.copied_tokens))
                    np.minimum(copy.copied_tokens, held, out=copy.copied_tokens)
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
            TypeError: ``num_tokens`` is not an int. ValueError: negative, or the sequence
                has a plan pending.
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
            held = self._tokens_per_block(num_tokens, len(copy.host_blocks))
            np.minimum(copy.copied_tokens, held, out=copy.copied_tokens)
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
            copy = self._known(seq_id)
            held = self._tokens_per_block(copy.num_tokens, len(copy.host_blocks))
            return (copy.host_blocks >= 0) & (copy.copied_tokens >= held) & (held > 0)

    def valid_tokens(self, seq_id: Hashable) -> npt.NDArray[np.int32]:
        """int32 array ``[logical blocks]``: how many leading tokens of each logical block
        the CPU copy holds validly (0 where it holds none). A block is reused by the next
        swap-out when this covers the tokens the block holds then. Raises KeyError if
        unknown."""
        with self._lock:
            copy = self._known(seq_id)
            return np.where(copy.host_blocks >= 0, copy.copied_tokens, 0).astype(np.int32)

    def host_block_table(self, seq_id: Hashable) -> npt.NDArray[np.int32]:
        """int32 array ``[logical blocks]``: host block of each logical block, -1 if none."""
        with self._lock:
            return self._known(seq_id).host_blocks.copy()

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

    def _table(self, gpu_block_table: npt.ArrayLike, num_tokens: int) -> npt.NDArray[np.int64]:
        num_tokens = as_count(num_tokens, "num_tokens")
        table = np.asarray(gpu_block_table)
        if table.ndim != 1 or table.dtype.kind not in "iu":
            raise ValueError(f"gpu_block_table must be a 1-D integer array, got {table.dtype}"
                             f" of shape {table.shape}")
        n = -(-num_tokens // self.block_size)
        if table.size < n:
            raise ValueError(f"gpu_block_table holds {table.size} blocks but {num_tokens} "
                             f"tokens need {n}")
        if (table[:n] < 0).any():
            raise ValueError("gpu_block_table holds a negative block id")
        return table[:n].astype(np.int64)

    def _tokens_per_block(self, num_tokens: int, n_logical: int) -> npt.NDArray[np.int32]:
        starts = np.arange(n_logical, dtype=np.int64) * self.block_size
        return np.clip(num_tokens - starts, 0, self.block_size).astype(np.int32)

    @staticmethod
    def _grown(copy: _CpuCopy, n: int) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """Copies of the copy's arrays, extended to at least n logical blocks."""
        extra = max(0, n - len(copy.host_blocks))
        host = np.concatenate((copy.host_blocks, np.full(extra, -1, np.int32)))
        tokens = np.concatenate((copy.copied_tokens, np.zeros(extra, np.int32)))
        return host, tokens

    def _release_beyond(self, seq_id: Hashable, copy: _CpuCopy, n_logical: int) -> None:
        """Release host blocks of logical blocks >= n_logical and cut the arrays there."""
        beyond = copy.host_blocks[n_logical:]
        held = beyond[beyond >= 0]
        if held.size:
            self.host.free_blocks(seq_id, held)
        copy.host_blocks = copy.host_blocks[:n_logical].copy()
        copy.copied_tokens = copy.copied_tokens[:n_logical].copy()

    def _release_new_blocks(self, plan: SwapPlan) -> None:
        """A swap-out plan's newly allocated host blocks go back to the host pool."""
        if plan.direction != "out" or not plan._new_host_blocks.size:
            return
        copy = self._copies[plan.seq_id]
        self.host.free_blocks(plan.seq_id, plan._new_host_blocks)
        gone = np.isin(copy.host_blocks, plan._new_host_blocks)
        copy.host_blocks[gone] = -1
        copy.copied_tokens[gone] = 0

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
            live = np.flatnonzero(copy.host_blocks >= 0)
            take = live[live.size - min(deficit, live.size) :]
            self.host.free_blocks(seq, copy.host_blocks[take])
            copy.host_blocks[take] = -1
            copy.copied_tokens[take] = 0
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
        if not copy.swapped_out and (copy.host_blocks < 0).all() and copy.num_tokens == 0:
            del self._copies[seq_id]
            if seq_id in self.host:
                self.host.free(seq_id)
