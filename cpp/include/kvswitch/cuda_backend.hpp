// CudaBackend: GPU <-> host copies through the CUDA driver API (loaded with dlopen).
//
// * Context: the device's primary context (cuDevicePrimaryCtxRetain), the one PyTorch and
//   CuPy use, so device pointers from those frameworks are valid here. Each worker thread
//   makes it current.
// * Streams: one non-blocking stream per worker, at the context's lowest priority, which
//   is also the default priority (0): stream priorities order kernel scheduling, not
//   copies (cuda.h, cuStreamCreateWithPriority), so they neither help nor hurt swaps.
// * Copies: per job, all linear copies go out in one cuMemcpyBatchAsync where the driver
//   exports it (CUDA >= 12.8; flag CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE), else one
//   cuMemcpyAsync each; strided extents use one cuMemcpy2DAsync each. A start and an end
//   event bracket the job: the end event with CU_EVENT_BLOCKING_SYNC (a worker waiting on
//   it sleeps instead of spinning a core), the start event timing-only (nothing waits on
//   it). A migration (device -> device)
//   goes out the same way on the worker's stream, its 2D copies with
//   CU_MEMORYTYPE_DEVICE on both ends and its batch with device location hints on both.
// * after=stream: an event is recorded on that stream in the calling thread (prepare),
//   and the worker makes the swap stream wait on it. after=event: the swap stream waits
//   on the caller's event as recorded when the worker issues the job, so the caller must
//   not re-record it until the handle is done. An event never recorded (handle 0, as a
//   torch.cuda.Event before its first record()) is refused.
// * before=stream, BeforeWait::kEvent (default; any direction: a swap-in's consumer, or
//   the stream that reuses a swap-out's blocks): once a worker has issued the job, the
//   calling thread makes that stream wait on the job's end event (cuStreamWaitEvent), so
//   submit() returns after the dispatch. Every wait is enqueued after what it waits for,
//   so it is safe where streams share one hardware queue (CUDA_DEVICE_MAX_CONNECTIONS=1).
// * before=stream, BeforeWait::kFlag: in the calling thread, that stream is made to wait
//   (cuStreamWaitValue32) for a 32-bit flag in device-mapped pinned memory that the swap
//   stream sets (cuStreamWriteValue32) after the job's copies and before its end event.
//   submit() returns at once, but the wait sits in the consumer's queue ahead of the
//   copies it waits for: with one hardware queue that deadlocks, so kFlag is refused when
//   CUDA_DEVICE_MAX_CONNECTIONS=1. It can also deadlock where more streams are active
//   than the device has hardware queues (8 by default) and the consumer shares one with
//   a swap stream (cuda.h, "Stream Memory Operations": the order these waits set "is not
//   visible to CUDA"): an opt-in for loops that must not wait for a worker. A failed job
//   sets the flag from the host so the consumer never hangs (its data is then invalid;
//   the handle raises). With all 4096 flags in flight a job is ordered as in kEvent. The
//   flags are freed at close() once no consumer can still wait on them, else leaked.
// * before=/after= on a stream that is capturing a CUDA graph are refused: a capture
//   records the wait into the graph, not into the stream's queue now.
// * Graph captures elsewhere: every driver call runs in relaxed stream-capture mode
//   (CaptureModeGuard in cuda_driver.hpp: workers for life, the caller's thread around
//   each call), so a global-mode capture on another thread neither fails kvswitch's
//   event queries and synchronizations nor is invalidated by them.
// * Host memory (attach_host): each host region is judged on its own (first and last
//   byte page-locked?); the pageable ones are registered, merged where they share a page.
//
// Source: FastSwitch (arXiv 2411.18424), section 3.2; CUDA driver API, "Stream Memory
// Operations" and "Event Management" (cuda.h of CUDA 13.0).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kvswitch/copy_backend.hpp"

namespace kvswitch {

/// How a before= consumer stream is made to wait for a swap-in (see above).
enum class BeforeWait : int {
    kEvent = 0,  ///< cuStreamWaitEvent on the job's end event, once issued (default)
    kFlag = 1,   ///< cuStreamWaitValue32 on a flag, enqueued before submit() returns
};

class CudaBackend final : public CopyBackend {
  public:
    /// Throws std::runtime_error with the reason when no driver or no such device;
    /// std::invalid_argument when `before_wait` is kFlag and the driver lacks stream
    /// memory operations, they fail on this device, or CUDA_DEVICE_MAX_CONNECTIONS=1.
    explicit CudaBackend(int ordinal, BeforeWait before_wait = BeforeWait::kEvent);
    ~CudaBackend() override;

    std::string name() const override { return "cuda"; }
    void validate(Direction dir, StreamRef after, StreamRef before) const override;
    std::unique_ptr<JobSync> prepare(Direction dir, StreamRef after, StreamRef before) override;
    std::unique_ptr<CopyQueue> open_queue(bool dedicated_thread) override;
    void abandon(JobSync& sync) noexcept override;
    bool defers_before(const JobSync& sync) const override;
    bool order_before(JobSync& sync, StreamRef before) noexcept override;
    HostMemory attach_host(const std::vector<std::pair<std::uintptr_t, std::size_t>>& byte_ranges,
                           bool may_register) noexcept override;
    void close() noexcept override;

    /// "cuMemcpyBatchAsync" or "cuMemcpyAsync" (how linear copies of a job go out).
    std::string copy_api() const;
    BeforeWait before_wait() const { return before_wait_; }

    struct Shared;  // context, event pools, wait flags; outlives the backend while jobs live

  private:
    void unregister_host() noexcept;

    std::shared_ptr<Shared> shared_;
    BeforeWait before_wait_;
    std::vector<std::uintptr_t> registered_;  // host ranges this backend holds page-locked
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
