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

std::size_t round_up(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

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
    const auto max = static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max());
    for (std::size_t i = 0; i < block_bytes.size(); ++i) {
        if (block_bytes[i] <= 0)
            throw std::invalid_argument("HostPool: region " + std::to_string(i) +
                                        ": block_bytes must be positive");
        const auto bb = static_cast<std::size_t>(block_bytes[i]);
        if (bb > max / static_cast<std::size_t>(num_blocks))
            throw std::invalid_argument("HostPool: pool size overflows");
        p.offsets.push_back(p.total);
        p.total = round_up(p.total + bb * static_cast<std::size_t>(num_blocks));
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
          data_ = a.data;
          nbytes_ = p.total;
          pinned_ = a.pinned;
          driver_allocated_ = a.driver;
          pin_reason_ = a.reason;
          offsets_ = p.offsets;
          return KVLayout(regions_at(data_, region_block_bytes, offsets_), num_blocks,
                          Device{DeviceType::kCPU, 0});
      }()) {
    ordinal_ = cuda_ordinal;
}

HostPool::~HostPool() {
    if (!data_) return;
    if (driver_allocated_) {
        const cu::CudaDriver& d = cu::CudaDriver::get();
        cu::CUdevice dev = 0;
        cu::CUcontext ctx = nullptr;
        if (d.cuDeviceGet(&dev, ordinal_) == cu::CUDA_SUCCESS &&
            d.cuDevicePrimaryCtxRetain(&ctx, dev) == cu::CUDA_SUCCESS) {
            try {
                cu::ScopedContext scope(d, ctx);
                d.cuMemFreeHost(data_);
            } catch (...) {
            }
            d.cuDevicePrimaryCtxRelease(dev);  // this call's retain
            d.cuDevicePrimaryCtxRelease(dev);  // the constructor's retain
        }
    } else {
        std::free(data_);
    }
}

}  // namespace kvswitch
