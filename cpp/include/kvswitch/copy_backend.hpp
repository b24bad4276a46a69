// CopyBackend: how the swap engine moves bytes (interface).
//
// The engine turns a job into CopyOps (one per extent and region) and hands them to a
// CopyQueue, one per worker thread. Two backends implement it: HostBackend (memcpy on the
// worker thread) and CudaBackend (driver API on a low-priority stream per worker).
//
// Call sequence for one job:
//   engine construction: attach_host()  -- checks (and page-locks) the host pool's memory
//   calling thread: validate()          -- rejects streams the backend cannot take
//   calling thread: prepare()           -- orders the job after/before the caller's streams;
//                                          under the submission lock, in job id order
//   worker thread:  queue.issue()       -- dispatches the copies (host: performs them)
//   calling thread: order_before()      -- only where defers_before(): once issued, makes
//                                          the caller's before= stream wait for the copies
//   worker thread:  queue.finish()      -- blocks until they are complete; returns seconds
//   on failure:     backend.abandon()   -- releases anything that waits on the job
//   engine close:   close()             -- undoes attach_host(), frees what consumer streams
//                                          may still wait on
//
// Source: FastSwitch (arXiv 2411.18424), section 3.2 "Multithreading Swap Manager".
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
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
    /// device -> device within the device layout (compaction); both ends are device blocks
    kMigrate = 2,
};

/// A CUDA stream or event given by the caller, as a raw driver handle.
struct StreamRef {
    enum class Kind : int { kNone = 0, kStream = 1, kEvent = 2 };
    Kind kind = Kind::kNone;
    std::uintptr_t handle = 0;  ///< CUstream or CUevent; 0 is the legacy default stream
};

/// How the host pool's memory is reached by copies (CopyBackend::attach_host).
struct HostMemory {
    /// "pinned" (page-locked already), "registered" (page-locked by the backend until
    /// close()), "pageable" (could not be page-locked: the driver stages each copy
    /// through a bounce buffer, synchronously) or "n/a" (the backend copies with memcpy).
    std::string kind = "n/a";
    std::string detail;  ///< why, for messages (the driver error where it failed)
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
};

class CopyBackend {
  public:
    virtual ~CopyBackend() = default;
    virtual std::string name() const = 0;
    /// Throws std::invalid_argument when this backend cannot take these streams (kinds it
    /// does not support). No side effects: the engine calls it before changing anything.
    virtual void validate(Direction dir, StreamRef after, StreamRef before) const = 0;
    /// Calling thread, before the job is queued, after validate(), under the engine's
    /// submission lock that assigns job ids (workers never take it): so work enqueued on
    /// the caller's streams follows job id order, and a job never waits (through a
    /// caller's stream) on a later job that depends on it. `after`: the copies start only
    /// after the work queued on that stream (or the event) so far. `before`: that stream's
    /// later work waits for the copies (here, or in order_before() where defers_before()).
    /// May block in the driver, never on the engine. Throws on a driver error; the engine
    /// then fails the job on its handle.
    virtual std::unique_ptr<JobSync> prepare(Direction dir, StreamRef after,
                                             StreamRef before) = 0;
    /// Whether this job's before= is ordered by order_before() once it is issued, rather
    /// than in prepare(). The engine's submit() then returns only after the job is issued.
    virtual bool defers_before(const JobSync& sync) const {
        (void)sync;
        return false;
    }
    /// Calling thread, once the job's copies are issued (never for a failed job): makes
    /// `before`'s later work wait for them. Returns false when it could not (a driver
    /// error); the engine then waits for the job on the host before submit() returns, so
    /// the caller's stream still never reads the blocks early. Never throws.
    virtual bool order_before(JobSync& sync, StreamRef before) noexcept {
        (void)sync, (void)before;
        return true;
    }
    /// Engine construction: checks how copies will reach the host pool's memory
    /// (`byte_ranges`: [address, bytes) of each region of the host layout, in region order;
    /// regions may share pages or interleave) and, where `may_register`, page-locks what
    /// is not. Never throws.
    virtual HostMemory attach_host(
        const std::vector<std::pair<std::uintptr_t, std::size_t>>& byte_ranges,
        bool may_register) noexcept {
        (void)byte_ranges, (void)may_register;
        return {};
    }
    /// Engine close, after every job completed, without the GIL: undoes attach_host() and
    /// frees what the caller's streams can no longer wait on (never blocks on them).
    /// Idempotent; never throws.
    virtual void close() noexcept {}
    /// A queue for the calling thread. `dedicated_thread`: the thread is an engine worker
    /// that may keep per-thread state (the CUDA context stays current); false for inline
    /// mode, where the queue runs on the caller's thread and must leave it as it was.
    virtual std::unique_ptr<CopyQueue> open_queue(bool dedicated_thread) = 0;
    /// The job failed or was never issued: release whatever waits on it (never throws).
    virtual void abandon(JobSync& sync) noexcept { (void)sync; }
};

}  // namespace kvswitch
