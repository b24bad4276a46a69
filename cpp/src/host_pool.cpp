#include "kvswitch/host_pool.hpp"

#include <sys/mman.h>

#include <cstdlib>
#include <limits>
#include <new>
#include <stdexcept>

#include "kvswitch/cuda_driver.hpp"

namespace kvswitch {

namespace {

constexpr std::size_t kAlign = 4096;
// Sizes stay within int64 (they reach Python and pointer arithmetic as signed values).
constexpr auto kMaxBytes = static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max());

[[noreturn]] void overflow() {
    throw std::invalid_argument("HostPool: pool size overflows (more than 2**63 - 1 bytes)");
}

/// a + b rounded up to kAlign, or overflow() past kMaxBytes.
std::size_t add_rounded(std::size_t a, std::size_t b) {
    if (a > kMaxBytes || b > kMaxBytes - a || a + b > kMaxBytes - (kAlign - 1)) overflow();
    return (a + b + kAlign - 1) / kAlign * kAlign;
}

struct Plan {
    std::vector<std::size_t> offsets;
    std::size_t total = 0;
};

Plan plan(const std::vector<std::int64_t>& block_bytes, std::int64_t num_blocks) {
    if (block_bytes.empty()) throw std::invalid_argument("HostPool: needs at least one region");
    if (num_blocks <= 0)
        throw std::invalid_argument("HostPool: num_blocks must be positive, got " +
                                    std::to_string(num_blocks));
    Plan p;
    for (std::size_t i = 0; i < block_bytes.size(); ++i) {
        if (block_bytes[i] <= 0)
            throw std::invalid_argument("HostPool: region " + std::to_string(i) +
                                        ": block_bytes must be positive");
        const auto bb = static_cast<std::size_t>(block_bytes[i]);
        if (bb > kMaxBytes / static_cast<std::size_t>(num_blocks)) overflow();
        p.offsets.push_back(p.total);
        p.total = add_rounded(p.total, bb * static_cast<std::size_t>(num_blocks));
    }
    return p;
}

std::vector<KVRegion> regions_at(void* data, const std::vector<std::int64_t>& block_bytes,
                                 const std::vector<std::size_t>& offsets) {
    std::vector<KVRegion> regions;
    for (std::size_t i = 0; i < block_bytes.size(); ++i)
        regions.push_back({reinterpret_cast<std::uintptr_t>(data) + offsets[i], block_bytes[i],
                           block_bytes[i]});
    return regions;
}

// Allocates the memory first, so that layout_ can be built in the initialiser list.
struct Allocation {
    void* data = nullptr;
    bool pinned = false;
    bool driver = false;
    std::string reason;
};

/// Frees what allocate() returned (and the primary-context retain of a pinned allocation).
void release(void* data, bool driver, int ordinal) noexcept {
    if (!data) return;
    if (!driver) {
        std::free(data);
        return;
    }
    const cu::CudaDriver& d = cu::CudaDriver::get();
    cu::CUdevice dev = 0;
    cu::CUcontext ctx = nullptr;
    if (d.cuDeviceGet(&dev, ordinal) == cu::CUDA_SUCCESS &&
        d.cuDevicePrimaryCtxRetain(&ctx, dev) == cu::CUDA_SUCCESS) {
        try {
            cu::ScopedContext scope(d, ctx);
            d.cuMemFreeHost(data);
        } catch (...) {
        }
        d.cuDevicePrimaryCtxRelease(dev);  // this call's retain
        d.cuDevicePrimaryCtxRelease(dev);  // allocate()'s retain
    }
}

Allocation allocate(std::size_t nbytes, bool pin, int ordinal) {
    Allocation a;
    if (pin) {
        const cu::CudaDriver& d = cu::CudaDriver::get();
        if (!d.available()) {
            a.reason = "not pinned: " + d.reason();
        } else if (ordinal < 0 || ordinal >= d.device_count()) {
            a.reason = "not pinned: no CUDA device " + std::to_string(ordinal);
        } else {
            cu::CUdevice dev = 0;
            cu::CUcontext ctx = nullptr;
            cu::CUresult r = d.cuDeviceGet(&dev, ordinal);
            if (r == cu::CUDA_SUCCESS) r = d.cuDevicePrimaryCtxRetain(&ctx, dev);
            if (r == cu::CUDA_SUCCESS) {
                {
                    cu::ScopedContext scope(d, ctx);
                    r = d.cuMemHostAlloc(&a.data, nbytes,
                                         cu::kHostAllocPortable |
                                             cu::kHostAllocDeviceMap);
                }
                // Portable pinned memory outlives the retain; the context stays alive as
                // long as any other user (the swap engine, PyTorch) retains it.
                if (r == cu::CUDA_SUCCESS) {
                    a.pinned = a.driver = true;
                    a.reason = "pinned with cuMemHostAlloc on cuda:" + std::to_string(ordinal);
                    return a;  // context released by the destructor after cuMemFreeHost
                }
                d.cuDevicePrimaryCtxRelease(dev);
            }
            a.data = nullptr;
            a.reason = "not pinned: cuMemHostAlloc failed: " + d.error_string(r);
        }
    } else {
        a.reason = "not pinned: pin=False";
    }
    // Large pools: 2 MiB aligned and marked for transparent huge pages (as NumPy does for
    // its own large arrays), so that block copies do not pay a TLB miss every 4 KiB.
    const std::size_t huge = std::size_t{2} << 20;
    const bool large = nbytes >= 2 * huge;
    if (posix_memalign(&a.data, large ? huge : kAlign, nbytes) != 0 || !a.data)
        throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (large) madvise(a.data, nbytes, MADV_HUGEPAGE);  // advisory; failure is harmless
#endif
    return a;
}

}  // namespace

HostPool::HostPool(const std::vector<std::int64_t>& region_block_bytes, std::int64_t num_blocks,
                   bool pin, int cuda_ordinal)
    : layout_([&] {
          Plan p = plan(region_block_bytes, num_blocks);
          Allocation a = allocate(p.total, pin, cuda_ordinal);
          // The destructor does not run when a constructor throws: free the memory here if
          // building the layout (or copying the offsets) fails.
          try {
              KVLayout layout(regions_at(a.data, region_block_bytes, p.offsets), num_blocks,
                              Device{DeviceType::kCPU, 0});
              offsets_ = std::move(p.offsets);
              pin_reason_ = std::move(a.reason);
              data_ = a.data;
              nbytes_ = p.total;
              pinned_ = a.pinned;
              driver_allocated_ = a.driver;
              return layout;
          } catch (...) {
              release(a.data, a.driver, cuda_ordinal);
              throw;
          }
      }()) {
    ordinal_ = cuda_ordinal;
}

HostPool::~HostPool() { release(data_, driver_allocated_, ordinal_); }

}  // namespace kvswitch
