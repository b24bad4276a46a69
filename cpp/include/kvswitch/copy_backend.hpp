// CopyBackend: how the swap engine moves bytes (interface).
//
// The engine turns a job into CopyOps (one per extent and region) and hands them to a
// CopyQueue, one per worker thread. Two backends implement it: HostBackend (memcpy on the
// worker thread) and CudaBackend (driver API on a low-priority stream per worker).
//
// Call sequence for one job:
//   calling thread: validate()          -- rejects streams the backend cannot take
//   calling thread: prepare()           -- orders the job after/before the caller's streams
//   worker thread:  queue.issue()       -- dispatches the copies (host: performs them)
//   worker thread:  queue.finish()      -- blocks until they are complete; returns seconds
//   on failure:     backend.abandon()   -- releases anything that waits on the job
//
// Source: FastSwitch (arXiv 2411.18424), section 3.2 "Multithreading Swap Manager".
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace kvswitch {

/// One copy: `height` rows of `width` bytes; row i goes from src + i * src_pitch to
/// dst + i * dst_pitch. height == 1 is a linear copy of `width` bytes.
struct CopyOp {
    std::uintptr_t src = 0;
    std::uintptr_t dst = 0;
    std::size_t src_pitch = 0;  ///< bytes
    std::size_t dst_pitch = 0;  ///< bytes
    std::size_t width = 0;      ///< bytes per row
    std::size_t height = 1;     ///< rows
    std::size_t bytes() const { return width * height; }
};

enum class Direction : int {
    kOut = 0,  ///< device -> host (swap-out)
    kIn = 1,   ///< host -> device (swap-in)
};

/// A CUDA stream or event given by the caller, as a raw driver handle.
struct StreamRef {
    enum class Kind : int { kNone = 0, kStream = 1, kEvent = 2 };
    Kind kind = Kind::kNone;
    std::uintptr_t handle = 0;  ///< CUstream or CUevent; 0 is the legacy default stream
};

/// Backend-private state of one job (events, wait slots). Owned by the job.
class JobSync {
  public:
    virtual ~JobSync() = default;
};

/// Dispatches copies from one worker thread; created and used on that thread only.
class CopyQueue {
  public:
    virtual ~CopyQueue() = default;
    /// Dispatch `ops`. `deps`: syncs of earlier jobs that touch the same blocks, all
    /// already issued; the copies must not start before theirs complete. Throws on error.
    virtual void issue(const std::vector<CopyOp>& ops, JobSync& sync,
                       const std::vector<JobSync*>& deps) = 0;
    /// True when issue() returns only after the copies are complete (host backend).
    virtual bool completes_on_issue() const = 0;
    /// Non-blocking: whether the copies issued with `sync` are complete (then finish()
    /// returns at once). Lets a busy worker retire finished jobs between dispatches.
    virtual bool ready(JobSync& sync) { (void)sync; return true; }
    /// Block until the copies issued with `sync` are complete; return their duration in
    /// seconds (device time between start and end events on CUDA). Throws on error.
    virtual double finish(JobSync& sync) = 0;
    /// Block until everything issued on this queue is complete.
    virtual void synchronize() = 0;
};

class CopyBackend {
  public:
    virtual ~CopyBackend() = default;
    virtual std::string name() const = 0;
    /// Throws std::invalid_argument when this backend cannot take these streams (kinds it
    /// does not support). No side effects: the engine calls it before changing anything.
    virtual void validate(Direction dir, StreamRef after, StreamRef before) const = 0;
    /// Calling thread, before the job is queued, after validate(). `after`: the copies
    /// start only after the work queued on that stream (or the event) so far. `before`:
    /// that stream's later work waits for the copies. Throws on a driver error; the engine
    /// then fails the job on its handle.
    virtual std::unique_ptr<JobSync> prepare(Direction dir, StreamRef after,
                                             StreamRef before) = 0;
    /// A queue for the calling thread. `dedicated_thread`: the thread is an engine worker
    /// that may keep per-thread state (the CUDA context stays current); false for inline
    /// mode, where the queue runs on the caller's thread and must leave it as it was.
    virtual std::unique_ptr<CopyQueue> open_queue(bool dedicated_thread) = 0;
    /// The job failed or was never issued: release whatever waits on it (never throws).
    virtual void abandon(JobSync& sync) noexcept { (void)sync; }
};

}  // namespace kvswitch
