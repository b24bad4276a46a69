"""The GPU side: vLLM's block pool handing out block groups (FastSwitch section 3.1).

vLLM 0.32's ``BlockPool`` (``vllm/v1/core/block_pool.py``) gives every request the next
blocks of one free queue, whoever asks: under interleaved decoding a request's block table
falls apart into runs of one or two blocks (docs/benchmarks.md), so every swap of it is one
copy per block per layer. [`BlockGroupPool`][] keeps all of vLLM's pool (ref counts,
the prefix cache and its hash map, the free queue and its eviction order, KV cache events,
metrics, reuse watchers) and changes one decision: *which* free blocks a request gets. They
come from a [`BlockGroupAllocator`][kvswitch.BlockGroupAllocator] in which every
(request, KV-cache group) is a sequence, so a request's blocks extend its active block
group (reserved tail, growth quantum, tails split under pressure).

**Prefix caching and contiguity.** vLLM reuses a cached free block only when it is the
least recently used one; a block group wants the free blocks next to it. The policy: a free
block that holds a cached prefix (or that a reader still watches, ``unpin_blocks``) is
*retained*, in the allocator's table of the request that wrote it, out of reach of block
groups; it stays retained if a connector evicts its prefix meanwhile (``evict_blocks``), as
vLLM leaves such a block at its place in the free queue. Block groups are cut from vLLM's
uncached free blocks while these suffice. When the free groups fall short of a request plus
``reuse_window_blocks`` (the pool is full of cache), the least recently used retained
blocks, in vLLM's order, join the allocator's free space: the *reuse window*. Groups and
reserved tails may cover them, yet they stay in the prefix cache, hit like any cached
block, until a request's growth actually takes one (then its prefix is evicted, as vLLM
evicts at reuse). So a window block may go before an older one (counted as
``reused_out_of_order``), and the window's runs are taken from their lowest id.
``reuse_window_blocks=0`` opens the window only by what a request lacks and reuses
cached blocks in exactly vLLM's order (same hits, same KV cache events); both sides are
measured in docs/benchmarks.md.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import KVCacheBlock

from kvswitch.allocator import DEFAULT_INITIAL_GROUP_BLOCKS, BlockGroupAllocator

__all__ = ["BLOCK_ORDERS", "BlockGroupConfig", "BlockGroupPool", "BlockRunStats"]

#: Block orders: ``"groups"`` (block groups per request and KV-cache group, the default)
#: and ``"vllm"`` (vLLM's free-queue order, with the rest of kvswitch's bookkeeping: the
#: control for tests that assert vLLM's exact block ids).
BLOCK_ORDERS = ("groups", "vllm")

#: The default reuse window, as a fraction of the pool: 1/64 (128 of 8,192 blocks).
DEFAULT_REUSE_WINDOW_DIVISOR = 64

# The allocator sequence of the null block, and of allocations made outside a request
# (a caller of get_new_blocks that is not a KV cache manager of this pool, e.g. a test).
_NULL_SEQ = ("kvswitch", "null block")
_ANONYMOUS_SEQ = ("kvswitch", "no request")


@dataclass(frozen=True)
class BlockGroupConfig:
    """Settings of a [`BlockGroupPool`][].

    Attributes:
        initial_group_blocks: expected blocks of a request's first group (the allocator's
            ``initial_group_blocks``; FastSwitch's 60 blocks, about 1,000 tokens at block
            size 16).
        growth_quantum_blocks: least size of a new group (the allocator's; None: its
            default, ``initial_group_blocks // 4``).
        reuse_window_blocks: the free groups block groups may cut from, in blocks (>= 0),
            opened from the least recently used cached free blocks when the pool is full
            of cache; None: ``num_blocks // 64``. See the module docstring.
        block_order: one of [`BLOCK_ORDERS`][].
    """

    initial_group_blocks: int = DEFAULT_INITIAL_GROUP_BLOCKS
    growth_quantum_blocks: int | None = None
    reuse_window_blocks: int | None = None
    block_order: str = "groups"

    def __post_init__(self) -> None:
        if self.block_order not in BLOCK_ORDERS:
            raise ValueError(
                f"block_order must be one of {BLOCK_ORDERS}, got {self.block_order!r}")
        # 1 would be the allocator's per-block mode: vLLM's own pool does that already.
        if type(self.initial_group_blocks) is not int or self.initial_group_blocks < 2:
            raise ValueError(
                f"initial_group_blocks must be an int >= 2, got {self.initial_group_blocks!r}")
        q = self.growth_quantum_blocks
        if q is not None and (type(q) is not int or q <= 0):
            raise ValueError(f"growth_quantum_blocks must be an int > 0 or None, got {q!r}")
        w = self.reuse_window_blocks
        if w is not None and (type(w) is not int or w < 0):
            raise ValueError(f"reuse_window_blocks must be an int >= 0 or None, got {w!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> BlockGroupConfig:
        """From a dict of the attribute names (e.g. vLLM's ``additional_config["kvswitch"]``).

        Raises:
            ValueError: an unknown key or a bad value.
        """
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown kvswitch block-group settings: {sorted(unknown)}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


@dataclass(frozen=True)
class BlockRunStats:
    """Contiguity of the blocks a [`BlockGroupPool`][] handed out.

    Attributes:
        blocks_allocated: blocks handed out by ``get_new_blocks`` (and claimed on a
            prefix hit of a block the allocator held free).
        runs_started: of those, blocks that did not continue their block table's previous
            block (id + 1): each starts a new run, so a swap of the table makes one more
            copy per layer.
        reused_out_of_order: cached blocks handed out (their prefix evicted) while an older
            cached free block stayed cached: vLLM would have reused that one first (the
            reuse window; see [`BlockGroupConfig`][]).
    """

    blocks_allocated: int
    runs_started: int
    reused_out_of_order: int

    @property
    def blocks_per_run(self) -> float:
        """Mean blocks per run of the blocks handed out (0.0 when none)."""
        return self.blocks_allocated / self.runs_started if self.runs_started else 0.0


class BlockGroupPool(BlockPool):
    """vLLM's ``BlockPool`` whose new blocks come in per-request block groups.

    Construct it as vLLM's pool (same arguments, plus ``config``), or upgrade the pool a
    ``KVCacheManager`` built with [`adopt`][]. Everything but the choice of block ids is
    vLLM's (inherited): ``get_new_blocks`` checks, evicts, counts references, notifies
    reuse watchers and records metrics as vLLM does, on the blocks the allocator chose.

    Who asks: a KV cache manager upgraded by
    [`install_block_groups`][kvswitch.adapters.vllm.install_block_groups] names the
    (request, KV-cache group) around its calls ([`allocating_for`][]); other callers of
    ``get_new_blocks`` share one sequence.

    Invariants ([`check_block_groups`][]): a block with ``ref_cnt > 0``, or retained
    (free, and cached, watched, or stripped of its prefix by ``evict_blocks`` while
    retained), is in exactly one allocator table; every other block but the null block is
    in no table and in vLLM's free queue; the free queue holds exactly the allocator's free
    blocks (free groups and reserved tails) and the retained blocks, these last, in the
    retained order (so vLLM's ``popleft`` order would take every allocator-free block
    before the first retained one); the reuse window's blocks are free in the allocator,
    and cached or watched.

    Thread safety: as vLLM's pool, one scheduler thread calls it.
    """

    #: The settings of a pool built or adopted without ``config``.
    default_config: BlockGroupConfig = BlockGroupConfig()

    # -- construction --------------------------------------------------------------------

    def __init__(self, *args: Any, config: BlockGroupConfig | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._init_block_groups(config or self.default_config)

    @classmethod
    def adopt(cls, pool: BlockPool, config: BlockGroupConfig | None = None) -> BlockGroupPool:
        """Upgrade vLLM's ``pool`` in place into a [`BlockGroupPool`][].

        vLLM 0.32 builds its pool inside ``KVCacheCoordinator.__init__`` (no factory
        argument) and hands the object to the coordinator, every single-type manager and
        the ``KVCacheManager``; changing the object's class keeps every one of those
        references valid. Only a pool that has handed out nothing can be adopted.

        Returns:
            ``pool`` itself (now a [`BlockGroupPool`][]); a pool that already is one is
            returned unchanged.

        Raises:
            TypeError: ``pool`` is not exactly vLLM's ``BlockPool`` (a subclass may depend
                on the order it hands blocks out in).
            ValueError: a block is in use or cached.
        """
        if isinstance(pool, BlockGroupPool):
            return pool
        if type(pool) is not BlockPool:
            raise TypeError(f"can only adopt vLLM's BlockPool, got {type(pool).__name__}")
        if (pool.get_num_free_blocks() != pool.num_gpu_blocks - 1
                or len(pool.cached_block_hash_to_block)):
            raise ValueError("can only adopt a block pool that has handed out no block")
        pool.__class__ = cls
        assert isinstance(pool, BlockGroupPool)
        pool._init_block_groups(config or cls.default_config)
        return pool

    def _init_block_groups(self, config: BlockGroupConfig) -> None:
        self.block_group_config = config
        self._vllm_order = config.block_order == "vllm"
        self.reuse_window_blocks = (
            self.num_gpu_blocks // DEFAULT_REUSE_WINDOW_DIVISOR
            if config.reuse_window_blocks is None else config.reuse_window_blocks)
        self._context: Hashable | None = None
        self._blocks_allocated = 0
        self._runs_started = 0
        self._out_of_order = 0
        self._reset_block_groups()

    def _reset_block_groups(self) -> None:
        cfg = self.block_group_config
        self.allocator = BlockGroupAllocator(
            self.num_gpu_blocks, initial_group_blocks=cfg.initial_group_blocks,
            growth_quantum_blocks=cfg.growth_quantum_blocks)
        # The owner sequence of each block in an allocator table (None: allocator-free).
        self._owner: list[Hashable | None] = [None] * self.num_gpu_blocks
        self._held: dict[Hashable, int] = {}  # blocks in each sequence's table
        # Free blocks kept out of the allocator (cached or watched, or evicted by a
        # connector while kept), least recently freed first: the tail of vLLM's free
        # queue, in the order it evicts them.
        self._retained: OrderedDict[int, None] = OrderedDict()
        # The reuse window: cached (or watched) free blocks in the allocator's free space,
        # oldest first; all older than every retained block.
        self._window: OrderedDict[int, None] = OrderedDict()
        # The last block id of each sequence's table, for runs_started.
        self._last: dict[Hashable, int] = {}
        # A new sequence's last prefix-hit block (its table's start lies in other
        # sequences' tables): its first new block continues right after it when free.
        self._anchor: dict[Hashable, int] = {}
        self._claim(_NULL_SEQ, [self.null_block.block_id])

    # -- who asks ------------------------------------------------------------------------

    def allocating_for(self, seq: Hashable | None) -> Hashable | None:
        """Name the allocator sequence (e.g. ``(request_id, kv_cache_group_id)``) whose
        table the next ``get_new_blocks`` calls extend; None: the shared sequence.

        Returns:
            The previous one, to restore after the call.
        """
        prev = self._context
        self._context = seq
        return prev

    # -- bookkeeping ---------------------------------------------------------------------

    def _note_runs(self, seq: Hashable, ids: list[int]) -> None:
        last = self._last.get(seq, -2)
        runs = 0
        for b in ids:
            runs += b != last + 1
            last = b
        self._last[seq] = last
        self._runs_started += runs
        self._blocks_allocated += len(ids)

    def _own(self, seq: Hashable, ids: list[int]) -> None:
        owner = self._owner
        for b in ids:
            owner[b] = seq
        self._held[seq] = self._held.get(seq, 0) + len(ids)

    def _claim(self, seq: Hashable, ids: list[int]) -> None:
        self.allocator.claim(seq, np.asarray(ids, dtype=np.int32))
        self._own(seq, ids)

    def _release(self, ids: Iterable[int]) -> None:
        """Return blocks to the allocator (they become allocator-free), one call per
        sequence."""
        by_seq: dict[Hashable, list[int]] = {}
        owner = self._owner
        for b in ids:
            seq = owner[b]
            assert seq is not None, f"block {b} is not in an allocator table"
            owner[b] = None
            by_seq.setdefault(seq, []).append(b)
        held = self._held
        alloc = self.allocator
        for seq, seq_ids in by_seq.items():
            left = held[seq] - len(seq_ids)
            if left == 0:
                del held[seq]
                self._last.pop(seq, None)
                alloc.free(seq)  # also its reserved tail
                continue
            held[seq] = left
            last = self._last.get(seq)
            if last is None or last not in seq_ids:
                alloc.free_blocks(seq, np.asarray(seq_ids, dtype=np.int32))
                continue
            # The table's last block goes (a finished request's partial block): the
            # allocator drops the tail with it; reserve it again after the new last block,
            # for the request's next turn or its resumption (_continue_after_hits).
            tail = alloc.reservation(seq)[1]
            alloc.free_blocks(seq, np.asarray(seq_ids, dtype=np.int32))
            self._last[seq] = int(alloc.block_table(seq)[-1])
            if tail:
                alloc.reserve(seq, tail + len(seq_ids))

    def _open_window(self, count: int) -> None:
        """Move the ``count`` least recently used retained blocks into the reuse window:
        into the allocator's free space, still cached."""
        retained = self._retained
        ids = [retained.popitem(last=False)[0] for _ in range(count)]
        window, blocks = self._window, self.blocks
        for b in ids:
            if blocks[b].block_hash is not None or b in self._reuse_watchers:
                window[b] = None  # (else a connector evicted its prefix: plain free space)
        self._release(ids)

    def _reuse(self, ids: list[int]) -> None:
        """Evict the prefixes of the window's blocks among ``ids`` (about to be handed
        out), in the window's order, as vLLM's free queue would evict them; count those
        an older cached block outlives."""
        window = self._window
        taken = [b for b in ids if b in window]
        if not taken:
            return
        if len(taken) > 1:
            chosen = set(taken)
            taken = [b for b in window if b in chosen][:len(chosen)]
        oldest = list(itertools.islice(window, len(taken)))
        self._out_of_order += len(taken) - len(set(oldest).intersection(taken))
        blocks = [self.blocks[b] for b in taken]
        for b in taken:
            del window[b]
        if self._reuse_watchers:
            self._notify_reuse(blocks)
        for block in blocks:
            self._maybe_evict_cached_block(block)

    # -- BlockPool overrides -------------------------------------------------------------

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """vLLM's ``get_new_blocks`` on the blocks of the asking sequence's block group
        (see [`allocating_for`][]).

        Raises:
            ValueError: more blocks than are free (vLLM's check; nothing changes).
        """
        if num_blocks > self.get_num_free_blocks():
            raise ValueError(f"Cannot get {num_blocks} free blocks from the pool")
        if num_blocks <= 0:
            return []
        seq = _ANONYMOUS_SEQ if self._context is None else self._context
        if self._vllm_order:
            ret = self._take_vllm_order(seq, num_blocks)
        else:
            ret = self._take_groups(seq, num_blocks)

        if self._reuse_watchers:
            self._notify_reuse(ret)
        # vLLM's own per-block steps (its get_new_blocks after popleft_n)
        metrics = self.metrics_collector
        caching = self.enable_caching
        for block in ret:
            if caching:
                self._maybe_evict_cached_block(block)
            assert block.ref_cnt == 0
            block.ref_cnt += 1
            if metrics:
                metrics.on_block_allocated(block)
        return ret

    def _take_groups(self, seq: Hashable, n: int) -> list[KVCacheBlock]:
        alloc = self.allocator
        # Open the window (the least recently used cached blocks) as far as the free
        # blocks fall short of the request, and as far as the free groups fall short of
        # it plus reuse_window_blocks: room for new groups when the pool is full of cache
        # (reserved tails are the running requests' room, not new groups').
        retained = self._retained
        if retained:
            free = alloc.num_free_blocks
            window = self.reuse_window_blocks
            more = max(n - free, n + window - (free - alloc.num_reserved_blocks)
                       if window else 0)
            if more > 0:
                self._open_window(min(more, len(retained)))
        ids = self._continue_after_hits(seq, n)
        ids += alloc.allocate(seq, n - len(ids)).tolist() if n > len(ids) else []
        if self._window:
            self._reuse(ids)
        self._own(seq, ids)
        self._note_runs(seq, ids)
        blocks = self.blocks
        queue = self.free_block_queue
        ret = [blocks[b] for b in ids]
        for block in ret:
            queue.remove(block)
        return ret

    def _continue_after_hits(self, seq: Hashable, n: int) -> list[int]:
        """A new sequence whose request hit cached blocks (a later turn of a conversation,
        a resumed request) takes the free block right after its last hit block, so that
        its block table goes on in one run; the allocator then extends it in place.
        Returns the block claimed ([] when there is none or it is not plain free)."""
        anchor = self._anchor.pop(seq, None)
        if anchor is None or seq in self._held:
            return []
        b = anchor + 1
        if (b >= self.num_gpu_blocks or self._owner[b] is not None or b in self._window
                or self.blocks[b].ref_cnt != 0 or self.blocks[b].is_null):
            return []
        self.allocator.claim(seq, np.asarray([b], dtype=np.int32))
        return [b]

    def _take_vllm_order(self, seq: Hashable, n: int) -> list[KVCacheBlock]:
        ret = self.free_block_queue.popleft_n(n)
        ids = [b.block_id for b in ret]
        retained, window = self._retained, self._window
        gone = [b for b in ids if b in retained]
        for b in gone:
            del retained[b]
        if gone:
            self._release(gone)  # leaves the prefix cache below, as in vLLM
        for b in ids:
            window.pop(b, None)
        self._claim(seq, ids)
        self._note_runs(seq, ids)
        return ret

    def touch(self, blocks: Sequence[KVCacheBlock]) -> None:
        """vLLM's ``touch``; a free block hit by a request leaves the retained blocks, or
        the reuse window (a block the allocator holds free, also one a connector hit
        without a prefix, is claimed for the asking sequence, cutting a reserved tail
        that covers it)."""
        retained, window = self._retained, self._window
        owner = self._owner
        claim = []
        for block in blocks:
            if block.ref_cnt == 0 and not block.is_null:
                b = block.block_id
                if b in retained:
                    del retained[b]
                elif owner[b] is None and b not in claim:
                    window.pop(b, None)
                    claim.append(b)
        seq = self._context
        if claim:
            claimer = _ANONYMOUS_SEQ if seq is None else seq
            self._claim(claimer, claim)
            self._note_runs(claimer, claim)
        if seq is not None and blocks and not self._vllm_order and seq not in self._held:
            last = blocks[-1]
            if not last.is_null:
                self._anchor[seq] = last.block_id
        super().touch(blocks)

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """vLLM's ``free_blocks``: a block whose last reference goes returns to the
        allocator when it holds no prefix (or caching is off), else it is retained until
        evicted in vLLM's order."""
        ordered = list(ordered_blocks)
        super().free_blocks(ordered)
        caching = self.enable_caching
        retained = self._retained
        to_allocator = []
        for block in ordered:
            if block.ref_cnt != 0 or block.is_null or (
                    block.pool is not None and block.pool is not self):
                continue
            b = block.block_id
            if b in retained or self._owner[b] is None:
                continue  # listed twice
            if caching and block.block_hash is not None:
                retained[b] = None
            else:
                to_allocator.append(b)
        if to_allocator:
            self._release(to_allocator)

    def unpin_blocks(self, blocks: Iterable[KVCacheBlock], on_reuse: Any) -> None:
        """vLLM's ``unpin_blocks``; released blocks stay readable, so they are retained
        (last to go, in vLLM's order) rather than given to block groups."""
        blocks = list(blocks)
        super().unpin_blocks(blocks, on_reuse)
        for block in blocks:
            if block.ref_cnt == 0 and block.block_id not in self._retained:
                self._retained[block.block_id] = None

    def evict_blocks(self, block_ids: set[int]) -> None:
        """vLLM's ``evict_blocks`` (a connector invalidating cached blocks). A retained
        block left without a prefix stays retained: vLLM leaves it where it was in its
        free queue, behind older cached blocks, so handing it out first would spare a
        prefix that vLLM evicts (other hits, other KV cache events). A reuse-window block
        left without a prefix and not watched leaves the window (plain free space)."""
        super().evict_blocks(block_ids)
        for b in block_ids:
            if self.blocks[b].block_hash is None and b not in self._reuse_watchers:
                self._window.pop(b, None)

    def reset_prefix_cache(self) -> bool:
        """vLLM's ``reset_prefix_cache``; on success the allocator starts empty too."""
        if not super().reset_prefix_cache():
            return False
        self._reset_block_groups()
        return True

    # -- inspection ----------------------------------------------------------------------

    def block_run_stats(self) -> BlockRunStats:
        """Counters since construction (or the last [`take_block_run_stats`][])."""
        return BlockRunStats(self._blocks_allocated, self._runs_started, self._out_of_order)

    def take_block_run_stats(self) -> BlockRunStats:
        """The counters of [`block_run_stats`][], then reset them (for periodic stats)."""
        stats = self.block_run_stats()
        self._blocks_allocated = self._runs_started = self._out_of_order = 0
        return stats

    @property
    def num_retained_blocks(self) -> int:
        """Free blocks kept out of the allocator: cached (or watched) and evictable."""
        return len(self._retained)

    @property
    def num_window_blocks(self) -> int:
        """Cached (or watched) free blocks in the reuse window (in the allocator's free
        space)."""
        return len(self._window)

    def check_block_groups(self) -> None:
        """Check the invariants of the class docstring against vLLM's state; O(blocks).

        Raises:
            AssertionError: naming the first one broken.
        """
        self.allocator.check_invariants()
        queue = [b.block_id for b in self.free_block_queue.get_all_free_blocks()]
        in_queue = set(queue)
        retained, window = self._retained, self._window
        assert queue[len(queue) - len(retained):] == list(retained), (
            "the retained blocks are not the free queue's tail in its order")
        tables: dict[int, Hashable] = {}
        for seq in self.allocator.sequences():
            for b in self.allocator.block_table(seq).tolist():
                tables[b] = seq
        for block in self.blocks:
            b = block.block_id
            if block.is_null:
                assert tables.get(b) == _NULL_SEQ, "the null block is not held"
                continue
            owner = self._owner[b]
            assert tables.get(b) == owner, f"block {b}: owner {owner!r} != table"
            if block.ref_cnt > 0:
                assert owner is not None and b not in in_queue and b not in retained, (
                    f"block {b} in use but free or unowned")
            elif b in retained:
                assert owner is not None and b in in_queue, f"retained block {b} lost"
            else:
                assert owner is None and b in in_queue, (
                    f"free block {b} is in a table or not in the free queue")
                if b in window:
                    assert block.block_hash is not None or b in self._reuse_watchers, (
                        f"window block {b} holds no prefix and no reader watches it")
        assert not set(window) & set(retained), "a block is retained and in the window"
        assert all(self.blocks[b].ref_cnt == 0 for b in window), "a window block is in use"
        assert len(in_queue) == self.allocator.num_free_blocks + len(retained), (
            "free queue and allocator disagree")
        assert sum(self._held.values()) == len(tables), "held counts disagree"
