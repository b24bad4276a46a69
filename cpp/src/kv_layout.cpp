#include "kvswitch/kv_layout.hpp"

#include <limits>
#include <stdexcept>
#include <utility>

namespace kvswitch {

std::string Device::str() const {
    return type == DeviceType::kCPU ? std::string("cpu") : "cuda:" + std::to_string(ordinal);
}

KVLayout::KVLayout(std::vector<KVRegion> regions, std::int64_t num_blocks, Device device)
    : regions_(std::move(regions)), num_blocks_(num_blocks), device_(device) {
    if (regions_.empty()) throw std::invalid_argument("KVLayout: needs at least one region");
    if (num_blocks_ <= 0)
        throw std::invalid_argument("KVLayout: num_blocks must be positive, got " +
                                    std::to_string(num_blocks_));
    if (device_.ordinal < 0)
        throw std::invalid_argument("KVLayout: negative device ordinal");
    for (std::size_t i = 0; i < regions_.size(); ++i) {
        const KVRegion& r = regions_[i];
        const std::string where = "KVLayout: region " + std::to_string(i) + ": ";
        if (r.base == 0) throw std::invalid_argument(where + "base address is 0");
        if (r.block_bytes <= 0)
            throw std::invalid_argument(where + "block_bytes must be positive, got " +
                                        std::to_string(r.block_bytes));
        if (r.block_stride < r.block_bytes)
            throw std::invalid_argument(
                where + "block_stride (" + std::to_string(r.block_stride) +
                " bytes) is smaller than block_bytes (" + std::to_string(r.block_bytes) +
                " bytes): blocks would overlap");
        // The last byte of the region must be addressable without overflow.
        const auto max = std::numeric_limits<std::int64_t>::max();
        if ((num_blocks_ - 1) > (max - r.block_bytes) / r.block_stride)
            throw std::invalid_argument(where + "region size overflows 64 bits");
        if (r.block_bytes > max - bytes_per_block_)
            throw std::invalid_argument(
                where + "bytes per block (the sum of block_bytes over regions) overflows 64 bits");
        bytes_per_block_ += r.block_bytes;
    }
}

}  // namespace kvswitch
