// CpuCopy: see kvswitch/reuse_copy.hpp.
#include "kvswitch/reuse_copy.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <unordered_set>

namespace kvswitch {

CpuCopy::CpuCopy(std::int64_t block_size) : block_size_(block_size) {
    if (block_size <= 0)
        throw std::invalid_argument("block_size must be positive, got " + std::to_string(block_size));
}

std::int32_t CpuCopy::held(std::int64_t num_tokens, std::size_t i) const {
    const std::int64_t left = num_tokens - static_cast<std::int64_t>(i) * block_size_;
    return static_cast<std::int32_t>(std::clamp<std::int64_t>(left, 0, block_size_));
}

std::size_t CpuCopy::blocks_for(std::int64_t num_tokens) const {
    if (num_tokens <= 0) return 0;
    // ceil without the overflow of num_tokens + block_size - 1 near INT64_MAX
    return static_cast<std::size_t>(num_tokens / block_size_ + (num_tokens % block_size_ != 0));
}

template <typename T>
std::size_t CpuCopy::check_table(const T* table, std::size_t size, std::int64_t num_tokens) const {
    const std::size_t n = blocks_for(num_tokens);
    if (size < n)
        throw std::invalid_argument("gpu_block_table holds " + std::to_string(size) + " blocks but " +
                                    std::to_string(num_tokens) + " tokens need " + std::to_string(n));
    for (std::size_t i = 0; i < n; ++i)
        if (table[i] < 0) throw std::invalid_argument("gpu_block_table holds a negative block id");
    return n;
}

std::size_t CpuCopy::count_missing(std::size_t n) const {
    std::size_t missing = n > host_.size() ? n - host_.size() : 0;
    const std::size_t m = std::min(n, host_.size());
    for (std::size_t i = 0; i < m; ++i) missing += host_[i] < 0;
    return missing;
}

template <typename T>
void CpuCopy::plan_out(const T* table, std::size_t n, std::int64_t num_tokens,
                       const std::int32_t* fresh, std::size_t n_fresh,
                       std::vector<std::int64_t>& copied, std::vector<std::int64_t>& pairs) {
    if (n != blocks_for(num_tokens))
        throw std::invalid_argument("plan_out: the table must hold the blocks of num_tokens");
    if (n_fresh != count_missing(n))
        throw std::invalid_argument("plan_out: " + std::to_string(n_fresh) + " new host blocks for " +
                                    std::to_string(count_missing(n)) + " missing ones");
    for (std::size_t k = 0; k < n_fresh; ++k)
        if (fresh[k] < 0) throw std::invalid_argument("plan_out: a negative host block id");
    if (host_.size() < n) {  // grown to cover the table; blocks beyond it go at commit
        host_.resize(n, -1);
        tokens_.resize(n, 0);
    }
    std::size_t k = 0;
    copied.clear();
    for (std::size_t i = 0; i < n; ++i) {
        if (host_[i] < 0) host_[i] = fresh[k++];
        // Missing (0 tokens copied) or stale (the partly filled block gained tokens). A copy
        // holding more tokens than the block now (a rollback) is still valid for the tokens
        // the block keeps: their KV did not change.
        if (tokens_[i] < held(num_tokens, i)) copied.push_back(static_cast<std::int64_t>(i));
    }
    pairs.clear();
    std::size_t i = 0;
    const std::size_t m = copied.size();
    while (i < m) {  // coalesce_into over table[copied] -> host_[copied]
        const std::size_t first = static_cast<std::size_t>(copied[i]);
        std::size_t j = i + 1;
        while (j < m) {
            const auto prev = static_cast<std::size_t>(copied[j - 1]);
            const auto cur = static_cast<std::size_t>(copied[j]);
            if (static_cast<std::int64_t>(table[cur]) != static_cast<std::int64_t>(table[prev]) + 1 ||
                static_cast<std::int64_t>(host_[cur]) != static_cast<std::int64_t>(host_[prev]) + 1)
                break;
            ++j;
        }
        pairs.push_back(static_cast<std::int64_t>(table[first]));
        pairs.push_back(static_cast<std::int64_t>(host_[first]));
        pairs.push_back(static_cast<std::int64_t>(j - i));
        i = j;
    }
}

template <typename T>
void CpuCopy::pairs_in(const T* table, std::size_t n, std::vector<std::int64_t>& pairs) const {
    if (host_.size() < n)
        throw std::invalid_argument("src and dst must be 1-D of one shape, got (" +
                                    std::to_string(host_.size()) + ",) and (" + std::to_string(n) +
                                    ",)");
    pairs.clear();
    coalesce_into(host_.data(), table, n, pairs);
}

void CpuCopy::clamp(std::int64_t num_tokens) {
    for (std::size_t i = 0; i < tokens_.size(); ++i) tokens_[i] = std::min(tokens_[i], held(num_tokens, i));
}

void CpuCopy::mark_copied(const std::int64_t* logical, std::size_t n, std::int64_t num_tokens) {
    for (std::size_t k = 0; k < n; ++k)
        if (logical[k] < 0 || static_cast<std::size_t>(logical[k]) >= tokens_.size())
            throw std::invalid_argument("mark_copied: logical block " + std::to_string(logical[k]) +
                                        " is out of range");
    for (std::size_t k = 0; k < n; ++k) {
        const auto i = static_cast<std::size_t>(logical[k]);
        tokens_[i] = held(num_tokens, i);
    }
}

void CpuCopy::invalidate(const std::int64_t* logical, std::size_t n) {
    for (std::size_t k = 0; k < n; ++k)
        if (logical[k] < 0) throw std::invalid_argument("invalidate: a negative logical block");
    for (std::size_t k = 0; k < n; ++k)
        if (static_cast<std::size_t>(logical[k]) < tokens_.size()) tokens_[static_cast<std::size_t>(logical[k])] = 0;
}

std::vector<std::int32_t> CpuCopy::held_beyond(std::size_t n) const {
    std::vector<std::int32_t> out;
    for (std::size_t i = n; i < host_.size(); ++i)
        if (host_[i] >= 0) out.push_back(host_[i]);
    return out;
}

void CpuCopy::cut(std::size_t n) {
    if (n < host_.size()) {
        host_.resize(n);
        tokens_.resize(n);
    }
}

void CpuCopy::forget(const std::int32_t* ids, std::size_t n) {
    if (n == 0) return;
    const std::unordered_set<std::int32_t> gone(ids, ids + n);
    for (std::size_t i = 0; i < host_.size(); ++i)
        if (gone.count(host_[i])) {
            host_[i] = -1;
            tokens_[i] = 0;
        }
}

std::vector<std::int32_t> CpuCopy::tail(std::size_t count) const {
    std::vector<std::int32_t> out;
    for (std::size_t i = host_.size(); i-- > 0 && out.size() < count;)
        if (host_[i] >= 0) out.push_back(host_[i]);
    std::reverse(out.begin(), out.end());
    return out;
}

std::size_t CpuCopy::drop_tail(std::size_t count) {
    std::size_t taken = 0;
    for (std::size_t i = host_.size(); i-- > 0 && taken < count;)
        if (host_[i] >= 0) {
            host_[i] = -1;
            tokens_[i] = 0;
            ++taken;
        }
    return taken;
}

bool CpuCopy::empty() const {
    return std::all_of(host_.begin(), host_.end(), [](std::int32_t b) { return b < 0; });
}

std::vector<std::uint8_t> CpuCopy::valid_blocks() const {
    std::vector<std::uint8_t> out(host_.size());
    for (std::size_t i = 0; i < host_.size(); ++i) {
        const std::int32_t h = held(num_tokens, i);
        out[i] = host_[i] >= 0 && tokens_[i] >= h && h > 0;
    }
    return out;
}

std::vector<std::int32_t> CpuCopy::valid_tokens() const {
    std::vector<std::int32_t> out(host_.size());
    for (std::size_t i = 0; i < host_.size(); ++i) out[i] = host_[i] >= 0 ? tokens_[i] : 0;
    return out;
}

template std::size_t CpuCopy::check_table<std::int32_t>(const std::int32_t*, std::size_t, std::int64_t) const;
template std::size_t CpuCopy::check_table<std::int64_t>(const std::int64_t*, std::size_t, std::int64_t) const;
template void CpuCopy::plan_out<std::int32_t>(const std::int32_t*, std::size_t, std::int64_t,
                                              const std::int32_t*, std::size_t,
                                              std::vector<std::int64_t>&, std::vector<std::int64_t>&);
template void CpuCopy::plan_out<std::int64_t>(const std::int64_t*, std::size_t, std::int64_t,
                                              const std::int32_t*, std::size_t,
                                              std::vector<std::int64_t>&, std::vector<std::int64_t>&);
template void CpuCopy::pairs_in<std::int32_t>(const std::int32_t*, std::size_t, std::vector<std::int64_t>&) const;
template void CpuCopy::pairs_in<std::int64_t>(const std::int64_t*, std::size_t, std::vector<std::int64_t>&) const;

}  // namespace kvswitch
