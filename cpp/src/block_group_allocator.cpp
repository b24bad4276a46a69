#include "kvswitch/block_group_allocator.hpp"

#include <algorithm>
#include <iterator>
#include <limits>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

namespace kvswitch {

namespace {

std::string seq_name(SeqId seq) { return "sequence " + std::to_string(seq); }

// Under memory pressure a new group reserves at most this fraction of the blocks in free
// groups, so reservations shrink as the pool fills instead of pushing other sequences into
// scattered blocks (paper 3.1: the size adapts to "the current availability of free KV").
constexpr BlockId kFreeShareDivisor = 8;

// The default growth quantum is this fraction of initial_group_blocks. A new group holds at
// least the quantum where the pool has it, taking it from the largest reserved tail (at most
// half of it) under pressure. Without it a sequence growing past its tail under pressure
// got one block per new group, so decode growth made one copy per block at the next
// swap-out (issue 14: 48% of one-block growth allocations started a new extent at bench
// defaults; docs/benchmarks.md).
constexpr BlockId kGrowthQuantumDivisor = 4;

}  // namespace

BlockGroupAllocator::BlockGroupAllocator(BlockId num_blocks, BlockId initial_group_blocks,
                                         BlockId growth_quantum_blocks)
    : num_blocks_(num_blocks),
      initial_group_blocks_(initial_group_blocks),
      growth_quantum_(growth_quantum_blocks > 0
                          ? growth_quantum_blocks
                          : std::max<BlockId>(1, initial_group_blocks / kGrowthQuantumDivisor)) {
    if (num_blocks <= 0)
        throw std::invalid_argument("num_blocks must be positive, got " +
                                    std::to_string(num_blocks));
    if (initial_group_blocks <= 0)
        throw std::invalid_argument("initial_group_blocks must be positive, got " +
                                    std::to_string(initial_group_blocks));
    if (growth_quantum_blocks < 0)
        throw std::invalid_argument("growth_quantum_blocks must not be negative, got " +
                                    std::to_string(growth_quantum_blocks));
    insert_free(0, num_blocks);
    if (per_block_mode())
        for (BlockId b = 0; b < num_blocks; ++b) free_list_.push_back(b);
}

// ---------------------------------------------------------------------------------------
// Free groups

// Index updates reuse tree nodes (C++17 node handles) instead of freeing and allocating
// them: merging and splitting are on the per-block decode path and in free().

void BlockGroupAllocator::insert_free(BlockId start, BlockId length) {
    free_in_groups_ += length;
    auto next = free_by_start_.lower_bound(start);
    const bool merge_next = next != free_by_start_.end() && next->first == start + length;
    auto prev = next == free_by_start_.begin() ? free_by_start_.end() : std::prev(next);
    const bool merge_prev = prev != free_by_start_.end() && prev->first + prev->second == start;

    if (merge_prev) {  // grow the previous group in place: its start (the key) stays
        auto node = free_by_length_.extract({prev->second, prev->first});
        prev->second += length;
        if (merge_next) {
            prev->second += next->second;
            free_by_length_.erase({next->second, next->first});
            free_by_start_.erase(next);
        }
        node.value() = {prev->second, prev->first};
        free_by_length_.insert(std::move(node));
    } else if (merge_next) {  // the next group now starts earlier: re-key its nodes
        auto node = free_by_start_.extract(next);
        auto by_length = free_by_length_.extract({node.mapped(), node.key()});
        node.key() = start;
        node.mapped() += length;
        by_length.value() = {node.mapped(), start};
        free_by_start_.insert(std::move(node));
        free_by_length_.insert(std::move(by_length));
    } else {
        free_by_start_.emplace(start, length);
        free_by_length_.emplace(length, start);
    }
}

void BlockGroupAllocator::erase_free(std::map<BlockId, BlockId>::iterator it) {
    free_in_groups_ -= it->second;
    free_by_length_.erase({it->second, it->first});
    free_by_start_.erase(it);
}

BlockId BlockGroupAllocator::carve_free(std::map<BlockId, BlockId>::iterator it, BlockId take) {
    const BlockId start = it->first;
    const BlockId length = it->second;
    if (take == length) {
        erase_free(it);
        return start;
    }
    // The remainder keeps the nodes; it has no free neighbour (free groups never touch).
    auto node = free_by_start_.extract(it);
    auto by_length = free_by_length_.extract({length, start});
    node.key() = start + take;
    node.mapped() = length - take;
    by_length.value() = {length - take, start + take};
    free_by_start_.insert(std::move(node));
    free_by_length_.insert(std::move(by_length));
    free_in_groups_ -= take;
    return start;
}

// ---------------------------------------------------------------------------------------
// Reservations (reserved tails of active groups)

void BlockGroupAllocator::set_reservation(SeqId seq, Sequence& s, Extent r) {
    num_reserved_ += r.length - s.reserved.length;
    if (s.reserved.length > 0 && r.length > 0) {
        auto node = reserved_by_length_.extract({s.reserved.length, seq});
        node.value().first = r.length;
        reserved_by_length_.insert(std::move(node));
    } else if (s.reserved.length > 0) {
        reserved_by_length_.erase({s.reserved.length, seq});
    } else if (r.length > 0) {
        reserved_by_length_.emplace(r.length, seq);
    }
    s.reserved = r.length > 0 ? r : Extent{};  // an empty tail reads as (0, 0)
}

void BlockGroupAllocator::release_reservation(SeqId seq, Sequence& s) {
    const Extent r = s.reserved;
    if (r.length == 0) return;
    set_reservation(seq, s, Extent{r.start, 0});
    insert_free(r.start, r.length);
}

void BlockGroupAllocator::reclaim_reservations(BlockId deficit) {
    while (deficit > 0 && !reserved_by_length_.empty()) {
        const auto [length, victim] = *reserved_by_length_.rbegin();
        Sequence& v = seqs_.at(victim);
        const BlockId take = std::min(length, deficit);
        // Split off the far end of the tail: the part next to the victim's table stays.
        const Extent kept{v.reserved.start, length - take};
        set_reservation(victim, v, kept);
        insert_free(kept.end(), take);
        deficit -= take;
    }
}

// ---------------------------------------------------------------------------------------
// Allocation

void BlockGroupAllocator::append_run(Sequence& s, BlockId start, BlockId length,
                                     BlockId*& out) {
    for (BlockId b = start; b < start + length; ++b) {
        s.table.push_back(b);
        *out++ = b;
    }
    if (!s.groups.empty() && s.groups.back().end() == start)
        s.groups.back().length += length;
    else
        s.groups.push_back(Extent{start, length});
}

BlockId BlockGroupAllocator::expected_group_blocks(const Sequence& s, BlockId needed) const {
    // First group: the configured size. Later groups: as large as the sequence already is
    // (buddy-like doubling), since a long sequence tends to keep growing.
    const BlockId by_length =
        std::max<BlockId>(initial_group_blocks_, static_cast<BlockId>(s.table.size()));
    const BlockId by_free = free_in_groups_ / kFreeShareDivisor;
    return std::max(needed, std::min(by_length, by_free));
}

void BlockGroupAllocator::allocate(SeqId seq, BlockId n, BlockId* out) {
    if (n <= 0)
        throw std::invalid_argument("allocate: number of blocks must be positive, got " +
                                    std::to_string(n));
    if (n > num_free_blocks())
        throw OutOfBlocks("allocate: " + std::to_string(n) + " blocks requested but only " +
                          std::to_string(num_free_blocks()) +
                          " of " + std::to_string(num_blocks_) +
                          " lie outside all block tables");
    // From here on the request is served in full; nothing below throws but bad_alloc.
    Sequence& s = seqs_[seq];
    if (per_block_mode())
        allocate_per_block(s, n, out);
    else
        allocate_groups(seq, s, n, out);
}

void BlockGroupAllocator::allocate_per_block(Sequence& s, BlockId n, BlockId* out) {
    for (BlockId i = 0; i < n; ++i) {
        const BlockId b = free_list_.front();
        free_list_.pop_front();
        auto it = std::prev(free_by_start_.upper_bound(b));  // the free group holding b
        const BlockId start = it->first, length = it->second;
        erase_free(it);
        if (b > start) {
            free_by_start_.emplace(start, b - start);
            free_by_length_.emplace(b - start, start);
            free_in_groups_ += b - start;
        }
        if (b + 1 < start + length) {
            free_by_start_.emplace(b + 1, start + length - b - 1);
            free_by_length_.emplace(start + length - b - 1, b + 1);
            free_in_groups_ += start + length - b - 1;
        }
        append_run(s, b, 1, out);
    }
}

void BlockGroupAllocator::allocate_groups(SeqId seq, Sequence& s, BlockId n, BlockId* out) {
    BlockId remaining = n;

    // 1. The reserved tail of the active group.
    if (s.reserved.length > 0) {
        const BlockId take = std::min(remaining, s.reserved.length);
        append_run(s, s.reserved.start, take, out);
        set_reservation(seq, s, Extent{s.reserved.start + take, s.reserved.length - take});
        remaining -= take;
    }
    if (remaining == 0) return;

    // 2. Extend the active group in place when the blocks after it are free.
    if (!s.table.empty()) {
        auto it = free_by_start_.find(s.table.back() + 1);
        if (it != free_by_start_.end()) {
            const BlockId take = std::min(it->second, expected_group_blocks(s, remaining));
            const BlockId start = carve_free(it, take);
            const BlockId used = std::min(remaining, take);
            append_run(s, start, used, out);
            set_reservation(seq, s, Extent{start + used, take - used});
            remaining -= used;
        }
    }

    // 3. New groups: best fit over free groups, splitting reserved tails off under pressure.
    while (remaining > 0) {
        if (free_in_groups_ < remaining) {
            BlockId deficit = remaining - free_in_groups_;
            if (!reserved_by_length_.empty()) {  // a run to grow into, not one block per group
                const BlockId half_largest = reserved_by_length_.rbegin()->first / 2;
                deficit = std::max(deficit, std::min(half_largest, growth_quantum_));
            }
            reclaim_reservations(deficit);
        }
        BlockId expected = expected_group_blocks(s, remaining);
        if (!free_by_length_.empty())
            expected = std::max(expected,
                                std::min(growth_quantum_, free_by_length_.rbegin()->first));
        auto fit = free_by_length_.lower_bound({expected, 0});
        if (fit == free_by_length_.end()) fit = std::prev(free_by_length_.end());  // largest
        const BlockId take = std::min(fit->first, expected);
        const BlockId start = carve_free(free_by_start_.find(fit->second), take);
        const BlockId used = std::min(remaining, take);
        append_run(s, start, used, out);
        set_reservation(seq, s, Extent{start + used, take - used});
        remaining -= used;
    }
}

// ---------------------------------------------------------------------------------------
// Release

BlockGroupAllocator::Sequence& BlockGroupAllocator::known(SeqId seq) {
    auto it = seqs_.find(seq);
    if (it == seqs_.end()) throw UnknownSequence(seq_name(seq) + " is not allocated");
    return it->second;
}

const BlockGroupAllocator::Sequence& BlockGroupAllocator::known(SeqId seq) const {
    auto it = seqs_.find(seq);
    if (it == seqs_.end()) throw UnknownSequence(seq_name(seq) + " is not allocated");
    return it->second;
}

BlockId BlockGroupAllocator::free(SeqId seq) {
    Sequence& s = known(seq);
    const BlockId released = static_cast<BlockId>(s.table.size());
    release_reservation(seq, s);
    for (const Extent& g : s.groups) insert_free(g.start, g.length);
    if (per_block_mode())
        // vLLM frees in reverse so that a sequence's tail blocks are reused first.
        free_list_.insert(free_list_.end(), s.table.rbegin(), s.table.rend());
    seqs_.erase(seq);
    return released;
}

std::unordered_set<BlockId> BlockGroupAllocator::distinct_ids(const char* caller,
                                                              const BlockId* ids,
                                                              std::size_t n) const {
    std::unordered_set<BlockId> chosen;
    chosen.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
        const BlockId b = ids[i];
        if (b < 0 || b >= num_blocks_)
            throw std::invalid_argument(std::string(caller) + ": block id " +
                                        std::to_string(b) + " is out of range [0, " +
                                        std::to_string(num_blocks_) + ")");
        if (!chosen.insert(b).second)
            throw std::invalid_argument(std::string(caller) + ": block id " +
                                        std::to_string(b) + " is given twice");
    }
    return chosen;
}

void BlockGroupAllocator::free_blocks(SeqId seq, const BlockId* ids, std::size_t n) {
    Sequence& s = known(seq);
    const std::unordered_set<BlockId> chosen = distinct_ids("free_blocks", ids, n);
    std::size_t found = 0;
    for (BlockId b : s.table) found += chosen.count(b);
    if (found != chosen.size()) {
        std::unordered_set<BlockId> owned(s.table.begin(), s.table.end());
        for (std::size_t i = 0; i < n; ++i)
            if (!owned.count(ids[i]))
                throw std::invalid_argument("free_blocks: block id " + std::to_string(ids[i]) +
                                            " is not in the sequence's block table");
    }
    if (n == 0) return;

    // Validated: now change state. The reservation must stay adjacent to the last block.
    const BlockId old_last = s.table.back();
    std::vector<BlockId> kept;
    kept.reserve(s.table.size() - n);
    std::vector<BlockId> gone;
    gone.reserve(n);
    for (BlockId b : s.table) (chosen.count(b) ? gone : kept).push_back(b);
    if (kept.empty() || kept.back() != old_last) release_reservation(seq, s);

    s.table = std::move(kept);
    rebuild_groups(s);
    // Release the freed blocks as runs, so each run costs one merge.
    std::sort(gone.begin(), gone.end());
    for (std::size_t i = 0; i < gone.size();) {
        std::size_t j = i + 1;
        while (j < gone.size() && gone[j] == gone[j - 1] + 1) ++j;
        insert_free(gone[i], static_cast<BlockId>(j - i));
        i = j;
    }
    if (per_block_mode()) free_list_.insert(free_list_.end(), gone.rbegin(), gone.rend());
}

void BlockGroupAllocator::rebuild_groups(Sequence& s) {
    s.groups.clear();
    for (BlockId b : s.table) {
        if (!s.groups.empty() && s.groups.back().end() == b)
            ++s.groups.back().length;
        else
            s.groups.push_back(Extent{b, 1});
    }
}

BlockId BlockGroupAllocator::reserve(SeqId seq, BlockId n) {
    if (n < 0)
        throw std::invalid_argument("reserve: number of blocks must not be negative, got " +
                                    std::to_string(n));
    Sequence& s = known(seq);
    if (per_block_mode() || s.table.empty() || s.reserved.length >= n) return 0;
    const BlockId start = s.table.back() + 1;
    auto it = free_by_start_.find(start + s.reserved.length);
    if (it == free_by_start_.end()) return 0;
    const BlockId take = std::min(it->second, n - s.reserved.length);
    carve_free(it, take);
    set_reservation(seq, s, Extent{start, s.reserved.length + take});
    return take;
}

BlockId BlockGroupAllocator::release_reservation(SeqId seq) {
    Sequence& s = known(seq);
    const BlockId length = s.reserved.length;
    release_reservation(seq, s);
    return length;
}

void BlockGroupAllocator::claim(SeqId seq, const BlockId* ids, std::size_t n) {
    if (per_block_mode())
        throw std::invalid_argument("claim: not available in per-block mode");
    const std::unordered_set<BlockId> chosen = distinct_ids("claim", ids, n);
    // Every id must lie in a free group or a reserved tail (not in a block table).
    auto in_free_group = [&](BlockId b) {
        auto it = free_by_start_.upper_bound(b);
        if (it == free_by_start_.begin()) return false;
        --it;
        return b < it->first + it->second;
    };
    // The tails that hold a chosen id: (seq, first chosen id in it).
    std::unordered_map<SeqId, BlockId> cut;
    for (const auto& [length, owner] : reserved_by_length_) {
        const Extent r = seqs_.at(owner).reserved;
        for (BlockId b : chosen)
            if (b >= r.start && b < r.end()) {
                auto [it, fresh] = cut.emplace(owner, b);
                if (!fresh) it->second = std::min(it->second, b);
            }
    }
    for (BlockId b : chosen) {
        if (in_free_group(b)) continue;
        bool in_tail = false;
        for (const auto& [owner, first] : cut) {
            const Extent r = seqs_.at(owner).reserved;
            in_tail = in_tail || (b >= r.start && b < r.end());
        }
        if (!in_tail)
            throw std::invalid_argument("claim: block id " + std::to_string(b) +
                                        " is in a block table");
    }
    if (n == 0) return;

    // Validated: now change state. Cut tails first, so every chosen id is in a free group.
    for (const auto& [owner, first] : cut) {
        Sequence& v = seqs_.at(owner);
        const Extent r = v.reserved;
        set_reservation(owner, v, Extent{r.start, first - r.start});
        insert_free(first, r.end() - first);
    }
    Sequence& s = seqs_[seq];
    // seq's own tail must stay right after its last block; the claimed blocks come after it.
    release_reservation(seq, s);
    for (std::size_t i = 0; i < n; ++i) {
        take_free_range(ids[i], 1);
        BlockId sink;  // append_run reports the ids; the caller has them already
        BlockId* out = &sink;
        append_run(s, ids[i], 1, out);
    }
}

// ---------------------------------------------------------------------------------------
// Compaction

void BlockGroupAllocator::take_free_range(BlockId start, BlockId length) {
    auto it = std::prev(free_by_start_.upper_bound(start));  // the free group holding start
    const BlockId group_start = it->first, group_end = it->first + it->second;
    erase_free(it);
    // The pieces left over touch no other free group (free groups never touch).
    if (start > group_start) {
        free_by_start_.emplace(group_start, start - group_start);
        free_by_length_.emplace(start - group_start, group_start);
        free_in_groups_ += start - group_start;
    }
    const BlockId end = start + length;
    if (end < group_end) {
        free_by_start_.emplace(end, group_end - end);
        free_by_length_.emplace(group_end - end, end);
        free_in_groups_ += group_end - end;
    }
}

std::optional<std::vector<BlockMove>> BlockGroupAllocator::compact(
    BlockId n, BlockId max_moved, const std::vector<SeqId>& pinned) {
    if (n <= 0)
        throw std::invalid_argument("compact: number of blocks must be positive, got " +
                                    std::to_string(n));
    if (max_moved < 0)
        throw std::invalid_argument("compact: max_moved must not be negative, got " +
                                    std::to_string(max_moved));
    if (per_block_mode())
        throw std::invalid_argument("compact: compaction is off in per-block mode");
    if (n > num_free_blocks())
        throw OutOfBlocks("compact: a free group of " + std::to_string(n) +
                          " blocks was requested but only " +
                          std::to_string(num_free_blocks()) + " of " +
                          std::to_string(num_blocks_) + " lie outside all block tables");
    if (!free_by_length_.empty() && free_by_length_.rbegin()->first >= n) return std::nullopt;

    // 1. A map of the pool: which sequence's table holds each block, and at which position.
    const std::size_t N = static_cast<std::size_t>(num_blocks_);
    std::unordered_set<SeqId> pinned_set(pinned.begin(), pinned.end());
    std::vector<std::pair<SeqId, Sequence*>> owners;
    owners.reserve(seqs_.size());
    std::vector<std::int32_t> owner(N, -1);
    std::vector<BlockId> pos(N, 0);
    std::vector<std::uint8_t> is_pinned(N, 0);
    for (auto& [id, s] : seqs_) {
        const auto index = static_cast<std::int32_t>(owners.size());
        owners.emplace_back(id, &s);
        const std::uint8_t p = pinned_set.count(id) ? 1 : 0;
        for (std::size_t i = 0; i < s.table.size(); ++i) {
            const BlockId b = s.table[i];
            owner[b] = index;
            pos[b] = static_cast<BlockId>(i);
            is_pinned[b] = p;
        }
    }
    auto used = [&](std::size_t b) { return owner[b] >= 0; };
    // A block that starts a run: table blocks of one sequence at consecutive ids and
    // consecutive table positions form one run (a move keeps a run contiguous).
    auto run_start = [&](std::size_t b) {
        return used(b) && !(b > 0 && owner[b - 1] == owner[b] && pos[b - 1] + 1 == pos[b]);
    };

    // 2. The window [w, w + n) with the fewest table blocks, then the fewest runs.
    const std::size_t W = static_cast<std::size_t>(n);
    std::size_t n_used = 0, n_pinned = 0, n_starts = 0;  // over the window; starts after w
    for (std::size_t b = 0; b < W; ++b) {
        n_used += used(b);
        n_pinned += is_pinned[b];
        if (b > 0) n_starts += run_start(b);
    }
    bool found = false;
    std::size_t best_w = 0, best_used = 0, best_runs = 0;
    for (std::size_t w = 0;; ++w) {
        const std::size_t runs = n_starts + (used(w) ? 1 : 0);
        if (n_pinned == 0 && (!found || n_used < best_used ||
                              (n_used == best_used && runs < best_runs))) {
            found = true;
            best_w = w;
            best_used = n_used;
            best_runs = runs;
        }
        if (w + W >= N) break;
        n_used += used(w + W);
        n_used -= used(w);
        n_pinned += is_pinned[w + W];
        n_pinned -= is_pinned[w];
        n_starts += run_start(w + W);
        n_starts -= run_start(w + 1);
    }
    if (!found || best_used > static_cast<std::size_t>(max_moved)) return std::nullopt;
    const BlockId win_start = static_cast<BlockId>(best_w);
    const BlockId win_end = win_start + n;

    // From here on nothing throws but bad_alloc.
    // 3. The window's runs, and the reserved tails to release: those inside the window,
    // and those of sequences whose last block moves (a tail must follow the last block).
    struct Run {
        std::int32_t owner;
        BlockId src, pos, length;
    };
    std::vector<Run> runs;
    for (BlockId b = win_start; b < win_end; ++b) {
        if (!used(b)) continue;
        if (!runs.empty() && b != win_start && !run_start(b) && runs.back().src +
                                                                     runs.back().length == b)
            ++runs.back().length;
        else
            runs.push_back(Run{owner[b], b, pos[b], 1});
    }
    for (auto& [id, s] : seqs_) {
        const Extent r = s.reserved;
        const bool in_window = r.length > 0 && r.start < win_end && r.end() > win_start;
        const bool last_moves = !s.table.empty() && s.table.back() >= win_start &&
                                s.table.back() < win_end;
        if (in_window || last_moves) release_reservation(id, s);
    }

    // 4. Room outside the window; split reserved tails (all outside it now) if short.
    auto room_outside = [&]() {
        std::set<std::pair<BlockId, BlockId>> room;  // (length, start)
        BlockId total = 0;
        for (const auto& [start, length] : free_by_start_) {
            const BlockId end = start + length;
            if (start < win_start) {
                const BlockId e = std::min(end, win_start);
                room.emplace(e - start, start);
                total += e - start;
            }
            if (end > win_end) {
                const BlockId b = std::max(start, win_end);
                room.emplace(end - b, b);
                total += end - b;
            }
        }
        return std::make_pair(std::move(room), total);
    };
    auto [room, room_total] = room_outside();
    if (room_total < static_cast<BlockId>(best_used)) {
        reclaim_reservations(static_cast<BlockId>(best_used) - room_total);
        std::tie(room, room_total) = room_outside();
    }

    // 5. Place runs, largest first, by best fit; a run no free extent holds is split over
    // the largest ones.
    std::sort(runs.begin(), runs.end(), [](const Run& a, const Run& b) {
        return a.length != b.length ? a.length > b.length : a.src < b.src;
    });
    std::vector<BlockMove> moves;
    std::vector<std::pair<std::int32_t, BlockId>> move_pos;  // (owner, table position)
    for (const Run& r : runs) {
        BlockId done = 0;
        while (done < r.length) {
            const BlockId want = r.length - done;
            auto fit = room.lower_bound({want, 0});
            if (fit == room.end()) fit = std::prev(room.end());
            const auto [length, start] = *fit;
            room.erase(fit);
            const BlockId take = std::min(length, want);
            if (length > take) room.emplace(length - take, start + take);
            moves.push_back(BlockMove{owners[r.owner].first, r.src + done, start, take});
            move_pos.emplace_back(r.owner, r.pos + done);
            done += take;
        }
    }

    // 6. Apply: take the destinations, rewrite the tables, free the sources.
    std::vector<std::int32_t> touched;
    for (std::size_t i = 0; i < moves.size(); ++i) {
        const BlockMove& m = moves[i];
        take_free_range(m.dst, m.length);
        Sequence& s = *owners[move_pos[i].first].second;
        for (BlockId k = 0; k < m.length; ++k) s.table[move_pos[i].second + k] = m.dst + k;
        touched.push_back(move_pos[i].first);
    }
    for (const BlockMove& m : moves) insert_free(m.src, m.length);
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    for (std::int32_t t : touched) rebuild_groups(*owners[t].second);
    std::sort(moves.begin(), moves.end(),
              [](const BlockMove& a, const BlockMove& b) { return a.src < b.src; });
    return moves;
}

void BlockGroupAllocator::undo_moves(const std::vector<BlockMove>& moves) {
    if (per_block_mode())
        throw std::invalid_argument("undo_moves: compaction is off in per-block mode");
    // 1. Check every move before changing anything.
    std::vector<std::pair<BlockId, BlockId>> srcs, dsts;  // (start, length)
    std::vector<BlockId> first_pos(moves.size(), 0);
    std::unordered_map<SeqId, std::unordered_map<BlockId, BlockId>> positions;
    for (std::size_t i = 0; i < moves.size(); ++i) {
        const BlockMove& m = moves[i];
        const std::string where = "undo_moves: move " + std::to_string(i) + " ";
        if (m.length <= 0 || m.src < 0 || m.dst < 0 || m.src > num_blocks_ - m.length ||
            m.dst > num_blocks_ - m.length)
            throw std::invalid_argument(where + "is out of range");
        const Sequence& s = known(m.seq);
        auto [pos_it, fresh] = positions.try_emplace(m.seq);
        if (fresh)
            for (std::size_t p = 0; p < s.table.size(); ++p)
                pos_it->second.emplace(s.table[p], static_cast<BlockId>(p));
        const auto& pos = pos_it->second;
        auto at = pos.find(m.dst);
        if (at == pos.end())
            throw std::invalid_argument(where + "names blocks not in the sequence's table");
        const BlockId p0 = at->second;
        if (static_cast<std::size_t>(p0 + m.length) > s.table.size())
            throw std::invalid_argument(where + "names blocks not in the sequence's table");
        for (BlockId k = 0; k < m.length; ++k)
            if (s.table[static_cast<std::size_t>(p0 + k)] != m.dst + k)
                throw std::invalid_argument(where + "names blocks not in the sequence's table");
        if (s.reserved.length > 0 && static_cast<std::size_t>(p0 + m.length) == s.table.size())
            throw std::invalid_argument(where + "moves a last block with a reserved tail");
        auto it = free_by_start_.upper_bound(m.src);
        if (it == free_by_start_.begin() || std::prev(it)->first + std::prev(it)->second <
                                                m.src + m.length)
            throw std::invalid_argument(where + "returns to blocks that are not free");
        first_pos[i] = p0;
        srcs.emplace_back(m.src, m.length);
        dsts.emplace_back(m.dst, m.length);
    }
    for (auto* ranges : {&srcs, &dsts}) {
        std::sort(ranges->begin(), ranges->end());
        for (std::size_t i = 1; i < ranges->size(); ++i)
            if ((*ranges)[i - 1].first + (*ranges)[i - 1].second > (*ranges)[i].first)
                throw std::invalid_argument("undo_moves: moves overlap");
    }
    // 2. Apply: take the sources, rewrite the tables, free the destinations.
    std::vector<SeqId> touched;
    for (std::size_t i = 0; i < moves.size(); ++i) {
        const BlockMove& m = moves[i];
        take_free_range(m.src, m.length);
        Sequence& s = seqs_.at(m.seq);
        for (BlockId k = 0; k < m.length; ++k)
            s.table[static_cast<std::size_t>(first_pos[i] + k)] = m.src + k;
        touched.push_back(m.seq);
    }
    for (const BlockMove& m : moves) insert_free(m.dst, m.length);
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    for (SeqId t : touched) rebuild_groups(seqs_.at(t));
}

// ---------------------------------------------------------------------------------------
// Queries

const std::vector<BlockId>& BlockGroupAllocator::block_table(SeqId seq) const {
    return known(seq).table;
}

const std::vector<Extent>& BlockGroupAllocator::groups(SeqId seq) const {
    return known(seq).groups;
}

Extent BlockGroupAllocator::reservation(SeqId seq) const { return known(seq).reserved; }

std::vector<Extent> BlockGroupAllocator::free_groups() const {
    std::vector<Extent> out;
    out.reserve(free_by_start_.size());
    for (const auto& [start, length] : free_by_start_) out.push_back(Extent{start, length});
    return out;
}

std::vector<SeqId> BlockGroupAllocator::sequences() const {
    std::vector<SeqId> out;
    out.reserve(seqs_.size());
    for (const auto& kv : seqs_) out.push_back(kv.first);
    std::sort(out.begin(), out.end());
    return out;
}

AllocatorStats BlockGroupAllocator::stats() const {
    AllocatorStats st;
    st.num_sequences = static_cast<std::int64_t>(seqs_.size());
    std::int64_t used = 0;
    for (const auto& kv : seqs_) {
        for (const Extent& g : kv.second.groups) {
            ++st.num_groups;
            used += g.length;
            std::size_t bucket = 0;
            while ((BlockId{2} << bucket) <= g.length) ++bucket;
            if (st.group_length_histogram.size() <= bucket)
                st.group_length_histogram.resize(bucket + 1, 0);
            ++st.group_length_histogram[bucket];
        }
    }
    st.mean_group_blocks = st.num_groups ? static_cast<double>(used) / st.num_groups : 0.0;
    st.num_free_groups = static_cast<std::int64_t>(free_by_start_.size());
    st.largest_free_group = free_by_length_.empty() ? 0 : free_by_length_.rbegin()->first;
    st.fragmentation =
        free_in_groups_ ? 1.0 - static_cast<double>(st.largest_free_group) / free_in_groups_
                        : 0.0;
    return st;
}

void BlockGroupAllocator::check_invariants() const {
    auto fail = [](const std::string& what) { throw InvariantViolation(what); };
    // Where each block is: 0 nowhere yet, 1 free group, 2 reserved tail, 3 block table.
    std::vector<std::uint8_t> place(static_cast<std::size_t>(num_blocks_), 0);
    auto mark = [&](BlockId start, BlockId length, std::uint8_t where, const char* what) {
        if (length <= 0 || start < 0 || start + length > num_blocks_)
            fail(std::string(what) + " [" + std::to_string(start) + ", +" +
                 std::to_string(length) + ") is empty or out of range");
        for (BlockId b = start; b < start + length; ++b) {
            if (place[b] != 0)
                fail("block " + std::to_string(b) + " is in two places (" + what + ")");
            place[b] = where;
        }
    };

    BlockId free_total = 0;
    BlockId prev_end = -1;
    for (const auto& [start, length] : free_by_start_) {
        if (start <= prev_end)
            fail("free groups adjacent or overlapping at block " + std::to_string(start));
        if (!free_by_length_.count({length, start}))
            fail("free group at " + std::to_string(start) + " missing from length index");
        mark(start, length, 1, "free group");
        free_total += length;
        prev_end = start + length;
    }
    if (free_by_length_.size() != free_by_start_.size())
        fail("free length index has stale entries");
    if (free_total != free_in_groups_) fail("free block count is stale");

    BlockId reserved_total = 0;
    for (const auto& [seq, s] : seqs_) {
        std::unordered_set<BlockId> seen;
        for (BlockId b : s.table)
            if (!seen.insert(b).second)
                fail(seq_name(seq) + " holds block " + std::to_string(b) + " twice");
        std::size_t i = 0;
        for (std::size_t g = 0; g < s.groups.size(); ++g) {
            const Extent e = s.groups[g];
            if (g > 0 && s.groups[g - 1].end() == e.start)
                fail(seq_name(seq) + ": groups " + std::to_string(g - 1) + " and " +
                     std::to_string(g) + " are one run");
            mark(e.start, e.length, 3, "block group");
            for (BlockId b = e.start; b < e.end(); ++b, ++i)
                if (i >= s.table.size() || s.table[i] != b)
                    fail(seq_name(seq) + ": groups do not cover the block table");
        }
        if (i != s.table.size()) fail(seq_name(seq) + ": groups do not cover the block table");
        if (s.reserved.length > 0) {
            if (s.table.empty() || s.reserved.start != s.table.back() + 1)
                fail(seq_name(seq) + ": reserved tail is not after its last block");
            if (!reserved_by_length_.count({s.reserved.length, seq}))
                fail(seq_name(seq) + ": reserved tail missing from index");
            mark(s.reserved.start, s.reserved.length, 2, "reserved tail");
            reserved_total += s.reserved.length;
        }
    }
    if (reserved_total != num_reserved_) fail("reserved block count is stale");
    for (const auto& [length, seq] : reserved_by_length_) {
        auto it = seqs_.find(seq);
        if (it == seqs_.end() || it->second.reserved.length != length)
            fail("reservation index has a stale entry for " + seq_name(seq));
    }
    for (BlockId b = 0; b < num_blocks_; ++b)
        if (place[b] == 0) fail("block " + std::to_string(b) + " is lost");
    if (per_block_mode()) {
        if (free_list_.size() != static_cast<std::size_t>(free_total))
            fail("free list and free groups disagree in size");
        for (BlockId b : free_list_)
            if (place[b] != 1) fail("free list holds block " + std::to_string(b) +
                                    " that is not free");
    }
}

}  // namespace kvswitch
