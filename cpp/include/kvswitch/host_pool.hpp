// HostPool: the host memory of a host KV pool, owned by kvswitch.
//
// One allocation holds every region back to back (each region starts at a 4096-byte
// boundary and holds num_blocks * block_bytes contiguous bytes, so block stride == block
// bytes). With `pin` and a CUDA driver and device present, the memory is pinned through the
// driver (cuMemHostAlloc, portable and device-mapped, in the device's primary context), so
// GPU copies run at full link speed and asynchronously; otherwise it is page-aligned
// plain memory (posix_memalign; pools of 4 MiB and more are 2 MiB aligned and advised for
// transparent huge pages) and pin_reason() says why.
//
// Contents are uninitialised (like numpy.empty). Source: FastSwitch (arXiv 2411.18424),
// section 3 (the CPU side of swap-out/swap-in).
//
// Thread safety: immutable after construction; the bytes themselves are not synchronised.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kvswitch/kv_layout.hpp"

namespace kvswitch {

class HostPool {
  public:
    /// region_block_bytes: bytes of one block in each region (all > 0, at least one).
    /// num_blocks: blocks in the pool (> 0).
    /// pin: pin through the CUDA driver when one is present.
    /// cuda_ordinal: device whose primary context pins the memory (the memory is
    ///   portable: usable from every context).
    /// Throws std::invalid_argument on bad sizes, std::bad_alloc when memory is short.
    HostPool(const std::vector<std::int64_t>& region_block_bytes, std::int64_t num_blocks,
             bool pin, int cuda_ordinal = 0);
    ~HostPool();
    HostPool(const HostPool&) = delete;
    HostPool& operator=(const HostPool&) = delete;

    void* data() const { return data_; }
    std::size_t nbytes() const { return nbytes_; }   ///< bytes allocated (with alignment)
    bool pinned() const { return pinned_; }
    /// How the memory was obtained ("cuMemHostAlloc on cuda:0") or why it is not pinned.
    const std::string& pin_reason() const { return pin_reason_; }
    std::int64_t num_blocks() const { return layout_.num_blocks(); }
    /// Byte offset of region `i` from data().
    std::size_t region_offset(std::size_t i) const { return offsets_[i]; }
    /// The pool as a KVLayout on the CPU (contiguous regions).
    const KVLayout& layout() const { return layout_; }

  private:
    void* data_ = nullptr;
    std::size_t nbytes_ = 0;
    bool pinned_ = false;
    bool driver_allocated_ = false;
    int ordinal_ = 0;
    std::string pin_reason_;
    std::vector<std::size_t> offsets_;
    KVLayout layout_;
};

}  // namespace kvswitch
