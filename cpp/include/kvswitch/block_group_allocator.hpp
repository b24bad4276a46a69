// BlockGroupAllocator: buddy-like allocation of contiguous block groups over one KV pool.
//
// Source: FastSwitch (arXiv 2411.18424), section 3.1 "Dynamic Block Group Manager".
// A sequence's KV lives in a few contiguous runs of block ids (block groups), so that a
// swap moves it in a few large copies instead of one copy per 16-token block.
//
// Every block of the pool is in exactly one of three places:
//   * a sequence's block table (used),
//   * the reserved tail of a sequence's active group (held for contiguity, in no table),
//   * a free group (maximal run of free blocks; adjacent free groups are merged at once).
// Reserved tails count as free: when the free groups alone cannot serve a request, tails
// are split off (largest first, a run of up to the growth quantum at a time), so
// allocation never fails while enough blocks lie outside all block tables.
//
// Thread safety: none; the owner serialises calls (the Python binding holds the GIL).
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace kvswitch {

using BlockId = std::int32_t;
using SeqId = std::int64_t;

/// A run of contiguous block ids [start, start + length).
struct Extent {
    BlockId start = 0;
    BlockId length = 0;
    BlockId end() const { return start + length; }
    bool operator==(const Extent& o) const { return start == o.start && length == o.length; }
};

/// Fewer blocks lie outside all block tables than a request needs. Nothing was changed.
class OutOfBlocks : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

/// The sequence id is not known to the allocator. Nothing was changed.
class UnknownSequence : public std::out_of_range {
  public:
    using std::out_of_range::out_of_range;
};

/// check_invariants() found an inconsistent state (a bug in the allocator).
class InvariantViolation : public std::logic_error {
  public:
    using std::logic_error::logic_error;
};

/// One move of a compaction: blocks [src, src + length) of seq's block table now live at
/// [dst, dst + length) (same table positions, new ids). The KV must be copied device to
/// device before anything reads the new ids.
struct BlockMove {
    SeqId seq = 0;
    BlockId src = 0;
    BlockId dst = 0;
    BlockId length = 0;
};

struct AllocatorStats {
    std::int64_t num_sequences = 0;
    std::int64_t num_groups = 0;            ///< block groups over all block tables
    double mean_group_blocks = 0.0;         ///< mean length of those groups, in blocks
    /// histogram[k] = number of groups whose length lies in [2^k, 2^(k+1)) blocks.
    std::vector<std::int64_t> group_length_histogram;
    std::int64_t num_free_groups = 0;
    BlockId largest_free_group = 0;         ///< blocks
    /// 1 - largest free group / blocks in free groups; 0 when nothing is free.
    double fragmentation = 0.0;
};

class BlockGroupAllocator {
  public:
    /// num_blocks: size of the pool, in blocks (> 0).
    /// initial_group_blocks: expected size of a sequence's first group, in blocks (> 0).
    ///   The paper uses 60 blocks (about 1,000 tokens at block size 16). A value of 1
    ///   selects per-block mode: no groups are planned, no blocks are reserved, and blocks
    ///   come from a FIFO free list like vLLM's block pool (the benchmark's baseline).
    /// growth_quantum_blocks: least size of a new group where a free group that large
    ///   exists, and the run a tail split takes under pressure (>= 0; 0 derives it as
    ///   max(1, initial_group_blocks / 4)). 1 gives the bare policy: a split takes only the
    ///   blocks missing. Ignored in per-block mode.
    /// Throws std::invalid_argument on non-positive sizes or a negative quantum.
    explicit BlockGroupAllocator(BlockId num_blocks, BlockId initial_group_blocks = 60,
                                 BlockId growth_quantum_blocks = 0);

    /// Appends n blocks to seq's block table (creating the sequence if new) and writes
    /// their ids, in table order, to out[0..n). Throws std::invalid_argument if n <= 0 and
    /// OutOfBlocks if fewer than n blocks lie outside all block tables; on a throw nothing
    /// changed.
    void allocate(SeqId seq, BlockId n, BlockId* out);

    /// Releases all of seq's blocks and its reservation; returns the blocks released
    /// from its block table. Throws UnknownSequence.
    BlockId free(SeqId seq);

    /// Releases the given blocks of seq (any order, no duplicates) and removes them from
    /// its block table, keeping the order of the rest. The sequence stays known even when
    /// its table becomes empty. Throws UnknownSequence, or std::invalid_argument for an id
    /// out of range, repeated, or not in seq's table; on a throw nothing changed.
    void free_blocks(SeqId seq, const BlockId* ids, std::size_t n);

    /// Appends the given blocks (any order, no duplicates), each in no block table (in a
    /// free group or any sequence's reserved tail), to seq's block table in the order given
    /// (creating the sequence if new). A reserved tail that holds one of them is cut at the
    /// first such block: the part before it stays the tail, the rest becomes free. For an
    /// engine that picks block ids itself (e.g. a prefix-cache hit on a block the allocator
    /// had free). Throws std::invalid_argument for an id out of range, repeated or in a
    /// block table, and in per-block mode; on a throw nothing changed.
    void claim(SeqId seq, const BlockId* ids, std::size_t n);

    /// Releases seq's reserved tail (its blocks become free); returns its length. For a
    /// sequence that will not grow (e.g. a finished request whose blocks stay cached).
    /// Throws UnknownSequence.
    BlockId release_reservation(SeqId seq);

    /// Grows seq's reserved tail to `num_blocks` blocks from the free group right after it
    /// (or after its last block), as far as that group reaches; returns the blocks added
    /// (0 when the tail is that long already, nothing after it is free, the table is
    /// empty, or in per-block mode). Throws UnknownSequence, std::invalid_argument for a
    /// negative count; on a throw nothing changed.
    BlockId reserve(SeqId seq, BlockId num_blocks);

    /// Compaction: makes one free group of at least `num_blocks` blocks when the blocks in
    /// no block table suffice but the largest free group is smaller. Chooses the window of
    /// `num_blocks` blocks that holds the fewest table blocks (and, among those, the fewest
    /// runs) and no block of a `pinned` sequence; releases the reserved tails inside it and
    /// those of sequences whose last block moves; moves the window's table blocks, run by
    /// run (best fit, largest run first), into free space outside it, splitting reserved
    /// tails there off when the free groups lack room; rewrites the moved sequences' block
    /// tables in place (same order, new ids). Returns the moves sorted by src; nothing
    /// changes when the largest free group already holds `num_blocks` or when every window
    /// would move more than `max_moved` blocks or holds a pinned block.
    /// Throws std::invalid_argument (num_blocks <= 0, max_moved < 0, per-block mode) and
    /// OutOfBlocks (fewer than num_blocks blocks lie outside all block tables); on a throw
    /// nothing changed. O(num_blocks + table blocks).
    /// Returns std::nullopt when nothing changed; an empty vector when releasing reserved
    /// tails alone made the group.
    std::optional<std::vector<BlockMove>> compact(BlockId num_blocks, BlockId max_moved,
                                                  const std::vector<SeqId>& pinned);
    /// The inverse of compact()'s moves, for a caller whose copy of them could not be
    /// issued: moves each move's blocks [dst, dst + length) of seq's table back to
    /// [src, src + length) (same table positions) and frees the dst blocks. Every src range
    /// must lie in one free group (not a reserved tail), the src ranges must not overlap,
    /// and [dst, dst + length) must be consecutive blocks of seq's table, whose last block,
    /// if moved, has no reserved tail behind it: true right after compact() when nothing
    /// else changed. Reserved tails compact() released are not restored.
    /// Throws std::invalid_argument (a move that breaks these rules, per-block mode) and
    /// UnknownSequence; on a throw nothing changed. O(moved blocks + the moved tables).
    void undo_moves(const std::vector<BlockMove>& moves);

    bool contains(SeqId seq) const { return seqs_.count(seq) != 0; }
    /// Throws UnknownSequence.
    const std::vector<BlockId>& block_table(SeqId seq) const;
    /// The sequence's block groups in table order; maximal runs that cover the table.
    const std::vector<Extent>& groups(SeqId seq) const;
    /// The reserved tail of seq's active group (length 0 when none). Throws UnknownSequence.
    Extent reservation(SeqId seq) const;
    /// Free groups sorted by start; reserved tails are not included.
    std::vector<Extent> free_groups() const;
    std::vector<SeqId> sequences() const;

    BlockId num_blocks() const { return num_blocks_; }
    BlockId initial_group_blocks() const { return initial_group_blocks_; }
    BlockId growth_quantum_blocks() const { return growth_quantum_; }
    bool per_block_mode() const { return initial_group_blocks_ == 1; }
    /// Blocks in no block table: free groups plus reserved tails.
    BlockId num_free_blocks() const { return free_in_groups_ + num_reserved_; }
    BlockId num_reserved_blocks() const { return num_reserved_; }
    std::size_t num_sequences() const { return seqs_.size(); }

    AllocatorStats stats() const;

    /// Recomputes every invariant from scratch; throws InvariantViolation with a message
    /// naming the first one broken. O(num_blocks).
    void check_invariants() const;

  private:
    struct Sequence {
        std::vector<BlockId> table;
        std::vector<Extent> groups;
        Extent reserved;  ///< always starts right after table.back()
    };

    Sequence& known(SeqId seq);
    const Sequence& known(SeqId seq) const;
    /// The ids as a set; throws std::invalid_argument, naming `caller`, for an id out of
    /// range or given twice.
    std::unordered_set<BlockId> distinct_ids(const char* caller, const BlockId* ids,
                                             std::size_t n) const;

    // Free groups, indexed by address (for merging) and by (length, start) (for best fit).
    void insert_free(BlockId start, BlockId length);  // merges with free neighbours
    void erase_free(std::map<BlockId, BlockId>::iterator it);
    /// Takes `take` blocks from the start of free group `it`; the rest stays free.
    BlockId carve_free(std::map<BlockId, BlockId>::iterator it, BlockId take);

    void set_reservation(SeqId seq, Sequence& s, Extent r);
    void release_reservation(SeqId seq, Sequence& s);
    /// Splits at least `deficit` blocks off other sequences' reserved tails, largest first.
    void reclaim_reservations(BlockId deficit);

    static void append_run(Sequence& s, BlockId start, BlockId length, BlockId*& out);
    /// Expected size of seq's next group, in blocks, when `needed` more are wanted now.
    BlockId expected_group_blocks(const Sequence& s, BlockId needed) const;

    void allocate_groups(SeqId seq, Sequence& s, BlockId n, BlockId* out);
    /// Removes [start, start + length) from the free group that holds all of it.
    void take_free_range(BlockId start, BlockId length);
    static void rebuild_groups(Sequence& s);
    void allocate_per_block(Sequence& s, BlockId n, BlockId* out);

    BlockId num_blocks_;
    BlockId initial_group_blocks_;
    BlockId growth_quantum_;
    std::unordered_map<SeqId, Sequence> seqs_;

    std::map<BlockId, BlockId> free_by_start_;                // start -> length
    std::set<std::pair<BlockId, BlockId>> free_by_length_;    // (length, start)
    BlockId free_in_groups_ = 0;

    std::set<std::pair<BlockId, SeqId>> reserved_by_length_;  // (length, seq), length > 0
    BlockId num_reserved_ = 0;

    std::deque<BlockId> free_list_;  // per-block mode only: vLLM-style FIFO order
};

}  // namespace kvswitch
