// CudaBackend: GPU <-> host copies through the CUDA driver API (loaded with dlopen).
//
// * Context: the device's primary context (cuDevicePrimaryCtxRetain), the one PyTorch and
//   CuPy use, so device pointers from those frameworks are valid here. Each worker thread
//   makes it current.
// * Streams: one non-blocking stream per worker, created with the lowest priority of the
//   context (cuCtxGetStreamPriorityRange), so compute streams win the scheduler.
// * Copies: per job, all linear copies go out in one cuMemcpyBatchAsync where the driver
//   exports it (CUDA >= 12.8), else one cuMemcpyAsync each; strided extents use one
//   cuMemcpy2DAsync each. A start and an end event (timed) bracket the job.
// * after=stream: an event is recorded on that stream in the calling thread (prepare),
//   and the worker makes the swap stream wait on it. after=event: the swap stream waits
//   on the caller's event as recorded when the worker issues the job, so the caller must
//   not re-record it until the handle is done.
// * before=stream: in the calling thread, that stream is made to wait (cuStreamWaitValue32)
//   for a 32-bit flag in device-mapped pinned memory that the swap stream sets
//   (cuStreamWriteValue32) after the job's copies. A failed job sets the flag from the host
//   so the consumer never hangs (its data is then invalid; the handle raises).
//
// Source: FastSwitch (arXiv 2411.18424), section 3.2.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kvswitch/copy_backend.hpp"

namespace kvswitch {

class CudaBackend final : public CopyBackend {
  public:
    /// Throws std::runtime_error with the reason when no driver or no such device.
    explicit CudaBackend(int ordinal);
    ~CudaBackend() override;

    std::string name() const override { return "cuda"; }
    void validate(Direction dir, StreamRef after, StreamRef before) const override;
    std::unique_ptr<JobSync> prepare(Direction dir, StreamRef after, StreamRef before) override;
    std::unique_ptr<CopyQueue> open_queue(bool dedicated_thread) override;
    void abandon(JobSync& sync) noexcept override;

    /// "cuMemcpyBatchAsync" or "cuMemcpyAsync" (how linear copies of a job go out).
    std::string copy_api() const;
    /// Whether before= is supported (stream memory operations).
    bool supports_before() const;

    struct Shared;  // context, event pools, wait flags; outlives the backend while jobs live

  private:
    std::shared_ptr<Shared> shared_;
};

/// Why the cuda backend cannot run on `ordinal`, or "" when it can.
std::string cuda_unavailable_reason(int ordinal);

/// Device ordinal owning the device pointer `ptr` (CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL).
/// Throws std::runtime_error when no driver or the pointer is unknown to it.
int cuda_pointer_device(std::uintptr_t ptr);

/// One synchronous cuMemcpy of `nbytes` from `src` to `dst` (unified addresses) in the
/// primary context of `ordinal`; returns its wall time in seconds (steady clock).
/// The benchmark's physical limit of a swap.
double cuda_timed_memcpy(int ordinal, std::uintptr_t dst, std::uintptr_t src,
                         std::size_t nbytes);

}  // namespace kvswitch
