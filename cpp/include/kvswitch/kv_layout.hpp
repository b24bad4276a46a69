// KVLayout: how a block id of one pool maps to bytes.
//
// A pool is a list of regions (typically one per layer and K/V). In region r, block b
// occupies the `block_bytes` contiguous bytes starting at `base + b * block_stride`.
// The stride may exceed the block bytes (K and V of one layer interleaved per block, or a
// strided view); the per-block part itself must be contiguous.
//
// Source: FastSwitch (arXiv 2411.18424), section 3.1 (granularity of transfers) and 3.2
// (swap manager). The swap engine turns an extent of blocks into one copy per region.
//
// Thread safety: immutable after construction.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kvswitch {

enum class DeviceType : int { kCPU = 0, kCUDA = 1 };

/// Where the bytes of a pool live: host memory, or CUDA device `ordinal`.
struct Device {
    DeviceType type = DeviceType::kCPU;
    int ordinal = 0;  ///< CUDA device ordinal; 0 for the CPU
    bool operator==(const Device& o) const { return type == o.type && ordinal == o.ordinal; }
    bool operator!=(const Device& o) const { return !(*this == o); }
    std::string str() const;  ///< "cpu" or "cuda:<ordinal>"
};

/// One region of a pool: block b is [base + b * block_stride, + block_bytes).
struct KVRegion {
    std::uintptr_t base = 0;        ///< address of block 0 (host or device virtual address)
    std::int64_t block_stride = 0;  ///< bytes between block b and block b + 1
    std::int64_t block_bytes = 0;   ///< bytes of one block in this region (contiguous)
};

class KVLayout {
  public:
    /// regions: at least one; each with base != 0, block_bytes > 0 and
    ///   block_stride >= block_bytes (blocks of a region never overlap).
    /// num_blocks: blocks in the pool (> 0); every region holds this many.
    /// Throws std::invalid_argument naming the offending region otherwise.
    KVLayout(std::vector<KVRegion> regions, std::int64_t num_blocks, Device device);

    const std::vector<KVRegion>& regions() const { return regions_; }
    std::size_t num_regions() const { return regions_.size(); }
    std::int64_t num_blocks() const { return num_blocks_; }
    const Device& device() const { return device_; }
    /// Sum of block_bytes over regions: bytes one block id stands for.
    std::int64_t bytes_per_block() const { return bytes_per_block_; }

    /// Address of block `block` in region `region` (no bounds check).
    std::uintptr_t block_address(std::size_t region, std::int64_t block) const {
        const KVRegion& r = regions_[region];
        return r.base + static_cast<std::uintptr_t>(block * r.block_stride);
    }

  private:
    std::vector<KVRegion> regions_;
    std::int64_t num_blocks_ = 0;
    Device device_;
    std::int64_t bytes_per_block_ = 0;
};

}  // namespace kvswitch
