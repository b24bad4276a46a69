// CpuCopy: the per-sequence state of kvswitch.ReuseTracker (src/kvswitch/reuse.py), with
// the computations of its swap plans, so that a swap-out or swap-in plan costs one or two
// calls from Python instead of a dozen small NumPy operations.
//
// Source: FastSwitch (arXiv 2411.18424), section 3.3 "KV Cache Reuse Mechanism": a CPU
// copy kept after a swap-in is valid block by block; the next swap-out copies only the
// blocks whose copy is missing or stale.
//
// State, per logical block i (tokens [i * block_size, (i + 1) * block_size)):
//   host_blocks[i]   host block id holding its copy, -1 when none;
//   copied_tokens[i] tokens of the block that copy holds (valid for those tokens).
// plus the scalars the tracker keeps per sequence (num_tokens, swapped_out, priority,
// last_used). The host allocator is not touched here: the tracker allocates and frees
// host blocks and hands the ids in and out.
//
// Every method either succeeds or throws (std::invalid_argument) before changing anything.
// Thread safety: none; the tracker's lock serialises every call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvswitch {

class CpuCopy {
  public:
    /// block_size: tokens per block (> 0). Throws std::invalid_argument otherwise.
    explicit CpuCopy(std::int64_t block_size);

    std::int64_t block_size() const { return block_size_; }
    std::size_t size() const { return host_.size(); }  ///< logical blocks tracked
    const std::vector<std::int32_t>& host_blocks() const { return host_; }
    const std::vector<std::int32_t>& copied_tokens() const { return tokens_; }

    /// Tokens logical block i holds in a sequence of num_tokens tokens (0..block_size).
    std::int32_t held(std::int64_t num_tokens, std::size_t i) const;

    /// Blocks a table must hold for num_tokens tokens: ceil(num_tokens / block_size).
    std::size_t blocks_for(std::int64_t num_tokens) const;

    /// Checks a GPU block table for num_tokens tokens (its size and no negative id in the
    /// first blocks_for(num_tokens) entries); returns blocks_for(num_tokens). Throws
    /// std::invalid_argument with ReuseTracker's wording.
    template <typename T>
    std::size_t check_table(const T* table, std::size_t size, std::int64_t num_tokens) const;

    /// Logical blocks in [0, n) without a host block (blocks beyond size() count).
    std::size_t count_missing(std::size_t n) const;

    /// A swap-out of num_tokens tokens from `table` (n = blocks_for(num_tokens) entries,
    /// checked): grows the state to n logical blocks, gives the missing ones (in logical
    /// order) the host blocks `fresh` (exactly count_missing(n) ids), and returns in
    /// `copied` the logical blocks whose copy is missing or stale (holds fewer tokens than
    /// the block) and in `pairs` (flattened [m, 3]) their copies coalesced into extents
    /// (src_start, dst_start, length), as kvswitch.reuse.coalesce_pairs does.
    template <typename T>
    void plan_out(const T* table, std::size_t n, std::int64_t num_tokens,
                  const std::int32_t* fresh, std::size_t n_fresh,
                  std::vector<std::int64_t>& copied, std::vector<std::int64_t>& pairs);

    /// Pairs host_blocks[:n] -> table[:n], coalesced. Throws if fewer than n are tracked.
    template <typename T>
    void pairs_in(const T* table, std::size_t n, std::vector<std::int64_t>& pairs) const;

    /// copied_tokens = min(copied_tokens, held(num_tokens)): a rollback to num_tokens.
    void clamp(std::int64_t num_tokens);
    /// copied_tokens[l] = held(num_tokens, l) for each l (all < size(), checked first).
    void mark_copied(const std::int64_t* logical, std::size_t n, std::int64_t num_tokens);
    /// copied_tokens[l] = 0 for each l < size() (others ignored; negatives rejected).
    void invalidate(const std::int64_t* logical, std::size_t n);
    /// Host blocks of logical blocks >= n that hold one, in logical order.
    std::vector<std::int32_t> held_beyond(std::size_t n) const;
    /// Keep only the first n logical blocks (no-op when fewer are tracked).
    void cut(std::size_t n);
    /// Logical blocks whose host block is one of `ids` lose it (-1, 0 tokens).
    void forget(const std::int32_t* ids, std::size_t n);
    /// Host blocks of the last min(count, live) logical blocks that hold one (reclaim
    /// takes a backup from its tail), in logical order.
    std::vector<std::int32_t> tail(std::size_t count) const;
    /// Those logical blocks lose their host block (-1, 0 tokens); returns how many.
    std::size_t drop_tail(std::size_t count);
    /// True when no logical block holds a host block.
    bool empty() const;
    /// Per logical block: 1 when the copy holds the tokens the block held at num_tokens.
    std::vector<std::uint8_t> valid_blocks() const;
    /// Per logical block: copied_tokens where a host block is held, else 0.
    std::vector<std::int32_t> valid_tokens() const;

    // The tracker's per-sequence scalars (read and written from Python).
    std::int64_t num_tokens = 0;  ///< tokens of the sequence at its last swap-out
    bool swapped_out = false;     ///< the CPU copy is the only copy: never reclaimed
    double priority = 0.0;
    std::int64_t last_used = 0;

  private:
    std::int64_t block_size_;
    std::vector<std::int32_t> host_;
    std::vector<std::int32_t> tokens_;
};

/// Appends the extents of the copies src[i] -> dst[i] (i < n) to pairs, flattened
/// (src_start, dst_start, length): consecutive entries whose source and destination both
/// advance by one merge.
template <typename S, typename D>
void coalesce_into(const S* src, const D* dst, std::size_t n, std::vector<std::int64_t>& pairs) {
    std::size_t i = 0;
    while (i < n) {
        std::size_t j = i + 1;
        while (j < n && static_cast<std::int64_t>(src[j]) == static_cast<std::int64_t>(src[j - 1]) + 1 &&
               static_cast<std::int64_t>(dst[j]) == static_cast<std::int64_t>(dst[j - 1]) + 1)
            ++j;
        pairs.push_back(static_cast<std::int64_t>(src[i]));
        pairs.push_back(static_cast<std::int64_t>(dst[i]));
        pairs.push_back(static_cast<std::int64_t>(j - i));
        i = j;
    }
}

}  // namespace kvswitch
