"""Block-group allocation of a KV pool (FastSwitch section 3.1, "Dynamic Block Group Manager").

A [`BlockGroupAllocator`][] hands out block ids of one pool (the GPU pool or the host pool)
so that each sequence's KV sits in a few contiguous *block groups*. A swap then moves a
sequence in a few large copies instead of one copy per block, per layer, per K/V.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvswitch import _core
from kvswitch._validate import INT32_MAX, as_count

__all__ = ["AllocatorStats", "BlockGroupAllocator", "BlockMoves", "OutOfBlocksError"]

OutOfBlocksError = _core.OutOfBlocksError
"""Raised by [`BlockGroupAllocator.allocate`][] when fewer blocks lie outside all block
tables than requested. A subclass of `MemoryError`. The allocator is unchanged."""

#: Expected size of a sequence's first block group: 60 blocks, about 1,000 tokens at block
#: size 16 (FastSwitch section 3.1).
DEFAULT_INITIAL_GROUP_BLOCKS = 60


@dataclass(frozen=True)
class AllocatorStats:
    """A snapshot of an allocator's block groups.

    Attributes:
        num_sequences: sequences that hold a block table.
        num_groups: block groups over all block tables.
        mean_group_blocks: mean length of those groups, in blocks (0.0 when none). This is
            the mean blocks per copy a swap of every sequence would reach.
        group_length_histogram: entry ``k`` counts groups of ``[2**k, 2**(k+1))`` blocks.
        num_free_groups: free groups (reserved tails not included).
        largest_free_group: length of the largest free group, in blocks.
        fragmentation: ``1 - largest_free_group / blocks in free groups``; 0.0 when nothing
            is free. 0 means all free blocks form one run.
    """

    num_sequences: int
    num_groups: int
    mean_group_blocks: float
    group_length_histogram: tuple[int, ...]
    num_free_groups: int
    largest_free_group: int
    fragmentation: float


@dataclass(frozen=True)
class BlockMoves:
    """The moves of one compaction ([`BlockGroupAllocator.compact`][]), sorted by ``src``.

    Move ``i`` says: blocks ``[src[i], src[i] + length[i])`` of sequence ``seq_ids[i]``'s
    block table now have the ids ``[dst[i], dst[i] + length[i])``, at the same table
    positions. Their KV must be copied (device to device) before anything reads the new ids.

    Attributes:
        seq_ids: the moved sequence of each move (a sequence may appear in several moves).
        src: int32 ``[n]``: first old block id of each move.
        dst: int32 ``[n]``: first new block id of each move.
        length: int32 ``[n]``: blocks in each move (> 0).
    """

    seq_ids: tuple[Hashable, ...]
    src: npt.NDArray[np.int32]
    dst: npt.NDArray[np.int32]
    length: npt.NDArray[np.int32]

    def __len__(self) -> int:
        return len(self.seq_ids)

    @property
    def moved_blocks(self) -> int:
        """Blocks moved in all."""
        return int(self.length.sum())

    @property
    def moved_sequences(self) -> list[Hashable]:
        """The moved sequences, each once, in order of their first move."""
        return list(dict.fromkeys(self.seq_ids))

    def pairs(self) -> npt.NDArray[np.int64]:
        """int64 ``[m, 3]`` rows ``(src_start, dst_start, length)`` for
        [`AsyncSwapEngine.migrate`][], coalesced: moves that continue each other in both
        source and destination (whichever sequence they belong to) form one row."""
        if not len(self.seq_ids):
            return np.zeros((0, 3), dtype=np.int64)
        src = self.src.astype(np.int64)
        dst = self.dst.astype(np.int64)
        length = self.length.astype(np.int64)
        order = np.argsort(src, kind="stable")
        src, dst, length = src[order], dst[order], length[order]
        joins = (src[:-1] + length[:-1] == src[1:]) & (dst[:-1] + length[:-1] == dst[1:])
        first = np.concatenate(([True], ~joins))
        group = np.cumsum(first) - 1
        out = np.zeros((int(group[-1]) + 1, 3), dtype=np.int64)
        out[:, 0] = src[first]
        out[:, 1] = dst[first]
        np.add.at(out[:, 2], group, length)
        return out


class BlockGroupAllocator:
    """Buddy-like allocator of contiguous block groups over one pool of ``num_blocks`` blocks.

    Each sequence (any hashable id, e.g. an engine's request id) owns a *block table*: the
    int32 block ids of its KV in token order, as paged attention consumes it. The table is
    covered by the sequence's *block groups*, maximal runs of contiguous ids.

    Allocation policy (FastSwitch section 3.1):

    * A sequence's most recent group is its *active group*. It may hold a *reserved tail*:
      blocks after the last used one, held for the sequence's growth and in no block table.
      ``allocate`` first takes blocks from that tail, then extends the group in place when
      the blocks after it are free.
    * Otherwise it starts a new group of an expected size: ``initial_group_blocks`` for the
      first group, the sequence's current length for later ones (buddy-like doubling), and
      at most an eighth of the blocks in free groups, so reservations shrink as the pool
      fills. The group is cut by best fit from the free groups (the smallest free group that
      holds the expected size, split at its start); when none is that large, the largest
      free group is taken. A new group is never smaller than the *growth quantum*
      (``growth_quantum_blocks``, by default ``initial_group_blocks // 4``, at least 1) where
      a free group that large exists; the blocks beyond the request become the sequence's
      reserved tail.
    * Reserved tails of other sequences count as free: when the free groups hold fewer
      blocks than needed, tails are split off, largest first, from their far end. The split
      takes at least the blocks missing and up to the growth quantum (at most half of the
      tail), so a sequence that grows past its own tail under pressure gets a run to grow
      into, not one new group per block (issue 14). ``allocate`` therefore fails only when
      fewer blocks than requested lie outside all block tables.
    * Freed blocks merge with adjacent free groups at once.

    * [`compact`][] (opt-in, beyond the paper) moves table blocks to merge free space
      when a request needs a larger free group than there is.

    ``initial_group_blocks=1`` selects *per-block mode*: no reservation, and blocks come from
    a FIFO free list with freed blocks appended in reverse table order, as in vLLM's block
    pool (``vllm/v1/core/block_pool.py``). It is the baseline that the benchmark compares
    against.

    Every method either succeeds or raises and leaves the allocator unchanged.

    Thread safety: the allocator may be called from several threads; calls are serialised
    by one lock (a few tens of nanoseconds per call uncontended). A block table returned
    to one thread is a copy, unaffected by later calls.

    Args:
        num_blocks: blocks in the pool (> 0).
        initial_group_blocks: expected size of a sequence's first group, in blocks (> 0).
        growth_quantum_blocks: least size of a new group, and of the run a reserved-tail
            split takes under pressure, in blocks (> 0); None: ``max(1,
            initial_group_blocks // 4)``, 15 at the default 60. 1 gives the bare policy (a
            split takes only the blocks missing). Ignored in per-block mode. Chosen by
            ``kvswitch bench`` ablation (docs/benchmarks.md, issue 14): at >= 10 blocks a
            Llama-3-8B copy reaches the ~320 KiB where PCIe nears its bandwidth (FastSwitch,
            Challenge 1).

    Raises:
        ValueError: a non-positive size.
        TypeError: a size that is not an integer.
    """

    __slots__ = ("_core", "_ids", "_lock", "_next_id")

    def __init__(
        self,
        num_blocks: int,
        *,
        initial_group_blocks: int = 60,  # == DEFAULT_INITIAL_GROUP_BLOCKS
        growth_quantum_blocks: int | None = None,
    ) -> None:
        quantum = (0 if growth_quantum_blocks is None else
                   as_count(growth_quantum_blocks, "growth_quantum_blocks", maximum=INT32_MAX))
        self._core = _core.BlockGroupAllocator(
            as_count(num_blocks, "num_blocks", maximum=INT32_MAX),
            as_count(initial_group_blocks, "initial_group_blocks", maximum=INT32_MAX),
            quantum,
        )
        # Sequence ids are mapped to dense ints for the C++ core.
        self._ids: dict[Hashable, int] = {}
        self._next_id = 0
        # One lock over _ids/_next_id and the core: without it two threads creating
        # sequences can be given one core id (red-team finding 3). An attribute, so that a
        # benchmark can swap in contextlib.nullcontext() to measure its cost.
        self._lock = threading.Lock()

    @classmethod
    def per_block(cls, num_blocks: int) -> BlockGroupAllocator:
        """An allocator in per-block mode (vLLM's free-list behaviour), the baseline."""
        return cls(num_blocks, initial_group_blocks=1)

    # -- allocation --------------------------------------------------------------------

    def allocate(self, seq_id: Hashable, num_blocks: int) -> npt.NDArray[np.int32]:
        """Append ``num_blocks`` blocks to ``seq_id``'s block table.

        A sequence not seen before is created.

        Args:
            seq_id: the sequence (any hashable).
            num_blocks: blocks to add (an int > 0).

        Returns:
            The new block ids in table order: int32 array of shape ``[num_blocks]``.

        Raises:
            TypeError: ``num_blocks`` is not an int (or is a bool).
            ValueError: ``num_blocks`` is not positive.
            OutOfBlocksError: fewer than ``num_blocks`` blocks lie outside all block tables
                (also any count larger than the pool).
        """
        if type(num_blocks) is not int or num_blocks <= 0:  # fast path: a plain positive int
            num_blocks = as_count(num_blocks, "num_blocks")
        with self._lock:
            if num_blocks > self._core.num_blocks:  # the core takes int32 counts
                raise OutOfBlocksError(
                    f"allocate: {num_blocks} blocks requested but only "
                    f"{self._core.num_free_blocks} of {self._core.num_blocks} lie outside all "
                    f"block tables")
            sid = self._ids.get(seq_id)
            if sid is not None:
                return self._core.allocate(sid, num_blocks)
            sid = self._next_id
            blocks = self._core.allocate(sid, num_blocks)  # raises before any change
            self._next_id += 1
            self._ids[seq_id] = sid
            return blocks

    def free(self, seq_id: Hashable) -> int:
        """Release all blocks of ``seq_id`` and its reserved tail; forget the sequence.

        Returns:
            The number of blocks that were in its block table.

        Raises:
            KeyError: unknown sequence (also on a second free).
        """
        with self._lock:
            released = self._core.free(self._sid(seq_id))
            del self._ids[seq_id]
            return released

    def reserve(self, seq_id: Hashable, num_blocks: int) -> int:
        """Grow ``seq_id``'s reserved tail to ``num_blocks`` blocks, from the free group
        right after it, as far as that group reaches (a growth reservation sized by the
        caller, e.g. from the sequence's history). Like every tail, it counts as free and
        is split off when other requests need it.

        Args:
            seq_id: a known sequence.
            num_blocks: wanted tail length, in blocks (int >= 0).

        Returns:
            Blocks added to the tail (0 when it is that long already, nothing after it is
            free, its table is empty, or in per-block mode).

        Raises:
            KeyError: unknown sequence.
            TypeError: ``num_blocks`` not an int.
            ValueError: negative. (All: nothing changes.)
        """
        num_blocks = min(as_count(num_blocks, "num_blocks", minimum=0), INT32_MAX)
        with self._lock:
            return self._core.reserve(self._sid(seq_id), num_blocks)

    def compact(self, num_blocks: int, *, max_moved: int | None = None,
                pinned: Iterable[Hashable] = ()) -> BlockMoves | None:
        """Make one free group of at least ``num_blocks`` contiguous blocks by moving blocks.

        For a request that the blocks outside all block tables can serve but the largest
        free group cannot (it would land in several groups). Chooses the window of
        ``num_blocks`` blocks holding the fewest table blocks (then the fewest runs of
        them) and no block of a ``pinned`` sequence; releases the reserved tails inside it
        and those of sequences whose last block moves; moves the window's table blocks into
        free space outside it, whole runs by best fit (largest first), splitting runs only
        when no free group holds them and splitting other reserved tails only when the free
        groups lack room; rewrites the moved sequences' block tables in place (same token
        order, new ids) and their groups. A following ``allocate(seq, num_blocks)`` of a
        sequence without a reserved tail then gets one group.

        The caller must copy each move's KV (device to device, e.g.
        [`AsyncSwapEngine.migrate`][] with [`BlockMoves.pairs`][]) and make every
        reader of the moved sequences (paged attention) use their new block tables; if
        the copies cannot be issued, [`undo_moves`][] moves the tables back. Not
        available in per-block mode.

        Args:
            num_blocks: size of the free group wanted, in blocks (int > 0).
            max_moved: most table blocks to move (int >= 0); None: no limit.
            pinned: an iterable of sequence ids (not a ``str`` or ``bytes``, which would be
                taken character by character) whose blocks must not move (e.g. copies
                still in flight); unknown ids (unhashable ones included) are ignored.

        Returns:
            The moves (possibly none, when releasing reserved tails was enough), or None
            when nothing changed: the largest free group already holds ``num_blocks``, or
            every window would move more than ``max_moved`` blocks or holds a pinned block.

        Raises:
            TypeError: a count is not an int; ``pinned`` is a str or bytes, or not
                iterable.
            ValueError: ``num_blocks`` <= 0, ``max_moved`` < 0, or per-block mode.
            OutOfBlocksError: fewer than ``num_blocks`` blocks lie outside all block tables. (All:
                nothing changes.)
        """
        num_blocks = as_count(num_blocks, "num_blocks")
        max_moved = (INT32_MAX if max_moved is None
                     else min(as_count(max_moved, "max_moved", minimum=0), INT32_MAX))
        if isinstance(pinned, (str, bytes)):
            raise TypeError(f"compact: pinned must be an iterable of sequence ids, not a "
                            f"{type(pinned).__name__} ({pinned!r})")
        pinned = list(pinned)  # a generator is read once, before anything changes
        with self._lock:
            if self._core.per_block_mode:
                raise ValueError("compact: compaction is off in per-block mode")
            if num_blocks > self._core.num_blocks:
                raise OutOfBlocksError(
                    f"compact: a free group of {num_blocks} blocks was requested but only "
                    f"{self._core.num_free_blocks} of {self._core.num_blocks} lie outside "
                    f"all block tables")
            ids = self._ids
            pin = []
            for s in pinned:
                try:
                    sid = ids.get(s)
                except TypeError:
                    continue
                if sid is not None:
                    pin.append(sid)
            result = self._core.compact(num_blocks, max_moved, pin)
            if result is None:
                return None
            sids, src, dst, length = result
            names = {v: k for k, v in ids.items()} if len(sids) else {}
            return BlockMoves(tuple(names[int(s)] for s in sids), src, dst, length)

    def undo_moves(self, moves: BlockMoves) -> None:
        """Undo a [`compact`][] whose copies could not be issued: move each move's blocks
        back from ``dst`` to ``src`` in its sequence's table (same positions) and free the
        ``dst`` blocks.

        Valid while nothing has taken the ``src`` blocks or changed the moved tables since
        the compaction (e.g. right after it, under the same lock). Reserved tails the
        compaction released or split stay free blocks; they are not restored.

        Args:
            moves: the moves [`compact`][] returned.

        Raises:
            ValueError: a ``src`` range is not free (or is a reserved tail), a ``dst`` range
                is not consecutive blocks of its sequence's table, the moves overlap, a
                moved last block has a reserved tail behind it, or per-block mode.
            KeyError: a sequence is unknown. (All: nothing changes.)
        """
        with self._lock:
            ids = self._ids
            try:
                sids = [ids[s] for s in moves.seq_ids]
            except KeyError as e:
                raise KeyError(f"undo_moves: unknown sequence {e.args[0]!r}") from None
            self._core.undo_moves(sids, moves.src.tolist(), moves.dst.tolist(),
                                  moves.length.tolist())

    def free_blocks(self, seq_id: Hashable, block_ids: npt.ArrayLike) -> None:
        """Release some blocks of ``seq_id`` and remove them from its block table.

        The rest of the table keeps its order; the sequence stays known even when its table
        becomes empty. The reuse tracker uses this to reclaim part of a CPU copy.

        Args:
            seq_id: the sequence.
            block_ids: integer array-like of shape ``[n]``: ids in the sequence's table,
                each at most once, in any order.

        Raises:
            KeyError: unknown sequence.
            TypeError: ``block_ids`` is not integer.
            ValueError: an id out of ``[0, num_blocks)``, given twice, or not in the
                sequence's block table.
        """
        with self._lock:
            sid = self._sid(seq_id)
            ids = np.asarray(block_ids)
            if ids.ndim != 1:
                raise ValueError(f"block_ids must be one-dimensional, got shape {ids.shape}")
            if ids.size == 0:
                return
            if ids.dtype.kind not in "iu":
                raise TypeError(f"block_ids must be integers, got dtype {ids.dtype}")
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_blocks:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"free_blocks: block id {bad} is out of range [0, {self.num_blocks})"
                )
            self._core.free_blocks(sid, np.ascontiguousarray(ids, dtype=np.int32))

    def claim(self, seq_id: Hashable, block_ids: npt.ArrayLike) -> None:
        """Append the given blocks to ``seq_id``'s block table, in the order given.

        For an engine that chooses a block id itself, e.g. a prefix-cache hit on a block
        the allocator holds as free. Each block must be in no block table: in a free group
        or in a reserved tail. A tail that holds one of them is cut at the first such block
        (the part before it stays the tail; the rest becomes free); ``seq_id``'s own tail
        is released. A sequence not seen before is created.

        Args:
            seq_id: the sequence (any hashable).
            block_ids: integer array-like of shape ``[n]``, each id at most once.

        Raises:
            TypeError: ``block_ids`` is not integer.
            ValueError: an id out of ``[0, num_blocks)``, given twice, or in a block table;
                or per-block mode. (All: nothing changes.)
        """
        ids = np.asarray(block_ids)
        if ids.ndim != 1:
            raise ValueError(f"block_ids must be one-dimensional, got shape {ids.shape}")
        if ids.size and ids.dtype.kind not in "iu":
            raise TypeError(f"block_ids must be integers, got dtype {ids.dtype}")
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_blocks:
                bad = lo if lo < 0 else hi
                raise ValueError(f"claim: block id {bad} is out of range [0, {self.num_blocks})")
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        with self._lock:
            sid = self._ids.get(seq_id)
            if sid is not None:
                self._core.claim(sid, ids)
                return
            sid = self._next_id
            self._core.claim(sid, ids)  # raises before any change
            if ids.size:
                self._next_id += 1
                self._ids[seq_id] = sid

    def release_reservation(self, seq_id: Hashable) -> int:
        """Release ``seq_id``'s reserved tail (its blocks become free), keeping its table.

        For a sequence that will not grow, e.g. a finished request whose blocks stay in an
        engine's prefix cache.

        Returns:
            The tail's length, in blocks (0 when it had none).

        Raises:
            KeyError: unknown sequence.
        """
        with self._lock:
            return self._core.release_reservation(self._sid(seq_id))

    # -- queries -----------------------------------------------------------------------

    def block_table(self, seq_id: Hashable) -> npt.NDArray[np.int32]:
        """The block ids of ``seq_id`` in token order: a new int32 array ``[num_table_blocks]``.

        Raises:
            KeyError: unknown sequence.
        """
        with self._lock:
            return self._core.block_table(self._sid(seq_id))

    def num_table_blocks(self, seq_id: Hashable) -> int:
        """Length of ``seq_id``'s block table, in blocks. Raises KeyError if unknown."""
        with self._lock:
            return self._core.num_table_blocks(self._sid(seq_id))

    def groups(self, seq_id: Hashable) -> list[tuple[int, int]]:
        """``seq_id``'s block groups as ``(start, length)`` in blocks, in table order.

        They are maximal runs of contiguous block ids and cover the block table exactly, so
        ``len(groups)`` is the number of copies per region that a swap of it needs.

        Raises:
            KeyError: unknown sequence.
        """
        with self._lock:
            return self._core.groups(self._sid(seq_id))

    def reservation(self, seq_id: Hashable) -> tuple[int, int]:
        """The reserved tail of ``seq_id``'s active group as ``(start, length)``; length 0 if
        none. Raises KeyError if unknown."""
        with self._lock:
            return self._core.reservation(self._sid(seq_id))

    def free_groups(self) -> list[tuple[int, int]]:
        """Free groups as ``(start, length)``, sorted by start; reserved tails excluded."""
        with self._lock:
            return self._core.free_groups()

    def sequences(self) -> list[Hashable]:
        """The known sequence ids, in the order they were first allocated."""
        with self._lock:
            return list(self._ids)

    def __contains__(self, seq_id: object) -> bool:
        try:
            with self._lock:
                return seq_id in self._ids
        except TypeError:  # unhashable
            return False

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)

    @property
    def num_blocks(self) -> int:
        """Blocks in the pool."""
        return self._core.num_blocks

    @property
    def initial_group_blocks(self) -> int:
        """Expected size of a sequence's first group, in blocks (1 in per-block mode)."""
        return self._core.initial_group_blocks

    @property
    def growth_quantum_blocks(self) -> int:
        """Least size of a new group, and of a tail split under pressure, in blocks."""
        return self._core.growth_quantum_blocks

    @property
    def per_block_mode(self) -> bool:
        """True when the allocator behaves like vLLM's per-block free list."""
        return self._core.per_block_mode

    @property
    def num_free_blocks(self) -> int:
        """Blocks in no block table: free groups plus reserved tails."""
        with self._lock:
            return self._core.num_free_blocks

    @property
    def num_reserved_blocks(self) -> int:
        """Blocks in reserved tails (counted in [`num_free_blocks`][] too)."""
        with self._lock:
            return self._core.num_reserved_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks in block tables."""
        return self.num_blocks - self.num_free_blocks

    def stats(self) -> AllocatorStats:
        """A snapshot of group lengths and free-space fragmentation; O(groups)."""
        with self._lock:
            d = self._core.stats()
        d["group_length_histogram"] = tuple(d["group_length_histogram"])
        return AllocatorStats(**d)

    def check_invariants(self) -> None:
        """Recompute every invariant of the pool from scratch; O(num_blocks).

        Every block is in exactly one place (a block table, a reserved tail, a free group);
        no table holds a block twice; free groups are sorted, disjoint and never adjacent;
        each sequence's groups cover its table exactly; reserved tails follow the last block
        of their table; counters match.

        Raises:
            AssertionError: naming the first invariant broken.
        """
        with self._lock:
            self._core.check_invariants()
            if sorted(self._ids.values()) != self._core.sequences():
                raise AssertionError("sequence id map and core sequences disagree")

    def __repr__(self) -> str:
        mode = "per-block" if self.per_block_mode else f"groups of {self.initial_group_blocks}+"
        return (
            f"BlockGroupAllocator(num_blocks={self.num_blocks}, {mode}, "
            f"free={self.num_free_blocks}, reserved={self.num_reserved_blocks}, "
            f"sequences={len(self)})"
        )

    def _sid(self, seq_id: Hashable) -> int:
        try:
            return self._ids[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None
        except TypeError:
            raise KeyError(f"unknown sequence {seq_id!r} (not hashable)") from None

