// AsyncSwapEngine: GPU <-> host KV swaps dispatched from C++ worker threads.
//
// Source: FastSwitch (arXiv 2411.18424), section 3.2 "Multithreading Swap Manager":
// dispatch of the copy API calls happens on a C++ thread pool, never under the Python GIL;
// each job ends with an event; a worker keeps at most `sync_every` jobs in flight on its
// stream (the paper synchronizes after that many dispatches) so that the inference
// stream's own copies are not stuck behind a long swap queue; in-flight jobs remember the device blocks they touch, so that a new allocation
// over them waits for exactly those jobs (KV cache conflict resolution).
//
// A job is a list of copy pairs (src_start, dst_start, length) in blocks between the device
// layout and the host layout (a swap-out copies device -> host, a swap-in host -> device).
// Each pair becomes one CopyOp per region: a linear copy of length * block_bytes when both
// sides are contiguous for the extent, else one 2D copy (length rows of block_bytes). The
// calling thread only validates the pairs and records the extents (O(pairs)); the worker
// expands them into CopyOps (O(pairs x regions)).
//
// A migration (Direction::kMigrate) is a job whose pairs are both device blocks: it copies
// device -> device within the device layout (GPU-pool compaction), one CopyOp per pair and
// region like a swap. It reads its source blocks and writes its destination blocks; its
// source extents must not overlap its destination extents (a chain of moves is submitted
// as separate migrations, in order).
//
// Ordering: jobs that touch overlapping blocks (device or host) where at least one of them
// writes them run in submission order (read-after-write, write-after-read,
// write-after-write), whichever workers they land on. Others run concurrently.
//
// Failures: a job that fails is reported on its handle (SwapHandle::wait throws SwapError)
// and counted in stats().num_failed; its copies are never reported done. A job submitted
// while it was queued or running that READS blocks (device or host) it was to write
// (read-after-write: the bytes it would read were never written) fails too, without
// copying, and its error names the root cause: the first failed job of the chain. What a
// job reads is matched against the newest in-flight writer of each block: a job copies
// whole blocks, so a later writer replaces whatever a failed earlier writer left there,
// and a job that reads the blocks after it reads its bytes. Write-after-read and
// write-after-write orderings still order a job after a failed one (it runs once that one
// has finished; a failed job has no copies in flight), but do not fail it: e.g. a swap-in
// or a migration into the blocks of a failed swap-out runs. A call that throws (bad pairs,
// bad streams, closed engine) queues nothing.
//
// Thread safety: every public member is thread-safe.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kvswitch/copy_backend.hpp"
#include "kvswitch/kv_layout.hpp"

namespace kvswitch {

/// A job failed inside a worker (copy API error); raised by SwapHandle::wait().
class SwapError : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

/// The engine is closed (or closing): no new jobs.
class EngineClosed : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

/// An extent of blocks [start, start + length).
struct BlockSpan {
    std::int64_t start = 0;
    std::int64_t length = 0;
};

struct SwapJob;  // engine-internal

/// The caller's view of one job. Copyable; all copies refer to the same job.
class SwapHandle {
  public:
    SwapHandle() = default;
    explicit SwapHandle(std::shared_ptr<SwapJob> job) : job_(std::move(job)) {}

    std::uint64_t id() const;
    Direction direction() const;
    std::uint64_t nbytes() const;      ///< bytes the job copies
    std::uint64_t num_copies() const;  ///< copy operations (linear or 2D) it issues
    /// True when the job has finished (successfully or not). Never blocks.
    bool done() const;
    /// Blocks until done or `timeout_s` seconds pass (negative or +infinity: no limit; any
    /// finite value, however large, is honoured). Returns whether it is done. Throws
    /// SwapError when the job failed, std::invalid_argument when `timeout_s` is NaN.
    bool wait(double timeout_s = -1.0) const;
    /// Seconds the copies took (CUDA events on cuda, steady clock on host); empty until
    /// the job is done or when it failed.
    std::optional<double> elapsed_s() const;
    /// The error text of a failed job ("" otherwise).
    std::string error() const;
    /// Id of the job whose failure made this one fail: its own id when it failed itself,
    /// an earlier job's when it was not run because that one failed; 0 when not failed.
    std::uint64_t root_job_id() const;

  private:
    std::shared_ptr<SwapJob> job_;
};

/// Swaps (kOut, kIn) and migrations (kMigrate) are counted apart, so that swap bandwidth
/// figures (bytes / busy_s) are not skewed by device-to-device copies.
struct SwapStats {
    std::uint64_t num_jobs = 0;     ///< swap jobs completed successfully
    std::uint64_t num_failed = 0;   ///< jobs (swaps and migrations) that failed
    std::uint64_t num_copies = 0;   ///< copy operations of completed swap jobs
    std::uint64_t bytes = 0;        ///< bytes of completed swap jobs
    double seconds = 0.0;           ///< sum of completed swap jobs' elapsed_s
    /// Wall seconds (steady clock) during which at least one swap job was queued or
    /// running: jobs on several workers overlap, so bytes / busy_s is the achieved
    /// bandwidth, where bytes / seconds would count overlapping jobs' time twice.
    double busy_s = 0.0;
    /// copy_size_histogram[k]: copies of swap jobs of [2^k, 2^(k+1)) bytes.
    std::vector<std::uint64_t> copy_size_histogram;
    std::uint64_t in_flight = 0;    ///< jobs (swaps and migrations) queued or running now
    std::uint64_t num_migrations = 0;    ///< migrations completed successfully
    std::uint64_t migration_copies = 0;  ///< copy operations of completed migrations
    std::uint64_t migrated_bytes = 0;    ///< bytes of completed migrations
    double migration_seconds = 0.0;      ///< sum of completed migrations' elapsed_s
};

struct EngineOptions {
    int num_workers = 2;        ///< 0: run every job inline in the calling thread
    int sync_every = 64;        ///< at most this many jobs in flight per worker (its stream)
    std::size_t max_queue = 1024;  ///< submit() blocks while this many jobs wait for a worker
    std::size_t max_unpolled = 65536;  ///< finished handles kept for poll() (oldest dropped)
    bool register_host = true;  ///< page-lock a pageable host pool (CopyBackend::attach_host)
};

/// A range of region indices [begin, end) of an engine's layouts; end = SIZE_MAX: to the
/// last region.
struct RegionRange {
    std::size_t begin = 0;
    std::size_t end = SIZE_MAX;
};

class AsyncSwapEngine {
  public:
    /// device: the GPU pool (or a host pool on the host backend); host: the host pool.
    /// Throws std::invalid_argument when the layouts do not match (region count, block
    /// bytes per region), the host layout is not on the CPU, a host region shares bytes
    /// with a device region (a swap would copy a pool onto itself), or options are out of
    /// range.
    AsyncSwapEngine(KVLayout device, KVLayout host, std::shared_ptr<CopyBackend> backend,
                    EngineOptions options = {});
    ~AsyncSwapEngine();  ///< close()
    AsyncSwapEngine(const AsyncSwapEngine&) = delete;
    AsyncSwapEngine& operator=(const AsyncSwapEngine&) = delete;

    /// Queue a job. pairs: n rows of (src_start, dst_start, length) in blocks, row-major
    /// (read bytewise: any alignment); for kMigrate both are device blocks. Validates
    /// everything first (std::invalid_argument: negative length, extent out of range,
    /// overlapping destination extents, for kMigrate a source extent overlapping a
    /// destination extent, streams the backend does not take; EngineClosed) and then
    /// queues nothing on error. A backend
    /// error after validation (a driver call that fails) does not throw: the job is queued
    /// as failed and its handle reports it. Length-0 rows are skipped. Returns once the
    /// job is queued (inline mode: once it is done; a `before` stream where the backend
    /// defers_before(): once a worker issued it). Blocks while the queue is full.
    /// `regions`: the job copies only these regions of each extent (both layouts' regions
    /// [begin, end)), e.g. one layer's K and V; the default is every region
    /// (std::invalid_argument for an empty range or one past the layouts' regions). Jobs
    /// are still ordered by the blocks they touch, whatever their regions.
    SwapHandle submit(Direction dir, const std::int64_t* pairs, std::size_t n,
                      StreamRef after = {}, StreamRef before = {}, RegionRange regions = {});
    /// Throws what submit() would throw for these streams or a closed engine, without
    /// queueing anything: lets a caller validate before it changes its own state.
    void check(Direction dir, StreamRef after = {}, StreamRef before = {}) const;

    /// Handles finished since the previous poll(), in completion order.
    std::vector<SwapHandle> poll();
    /// Blocks until every job queued or running now that reads or writes one of the
    /// device blocks `ids` is done. Job errors are not raised here (see the handles).
    /// Returns the number of jobs waited for.
    std::size_t wait_blocks(const std::int64_t* ids, std::size_t n);
    /// Blocks until every job submitted so far is done.
    void synchronize();
    SwapStats stats() const;
    /// Drains queued and running jobs, joins the workers. Idempotent.
    void close();
    bool closed() const;

    const std::string& backend_name() const { return backend_name_; }
    const KVLayout& device_layout() const { return device_; }
    const KVLayout& host_layout() const { return host_; }
    const EngineOptions& options() const { return opts_; }
    /// How copies reach the host pool's memory (CopyBackend::attach_host), checked once at
    /// construction; host memory the backend page-locked is released by close().
    const HostMemory& host_memory() const { return host_memory_; }

    /// Test hook (paused engine): lets the workers take the queued job `id` and the queued
    /// jobs it depends on, directly or through others (every queued job when `id` is 0),
    /// ahead of the rest, in submission order; the others stay held. Returns the ids it
    /// released (none when the job is not queued). What runs is exactly what the engine
    /// orders before the job, so a dependency it failed to record shows as a job that runs
    /// before one it must follow (kvswitch.testing holds jobs this way and releases each
    /// when the code under test waits for it).
    std::vector<std::uint64_t> release_held(std::uint64_t id);

    /// Test hook: the next `n` jobs submitted fail when a worker would issue them, with
    /// `message` (nothing copied). Counted at submission, so which jobs fail does not
    /// depend on thread timing. n = 0 disarms.
    void fail_next_jobs(int n, std::string message);
    /// Test hook: while paused, workers take no new job from the queue (close() still
    /// drains it). Makes "job still in flight" states deterministic in tests. A submit()
    /// with a `before` stream on a backend that defers_before() waits for the dispatch,
    /// so it blocks until resumed.
    void set_paused(bool paused);

    /// Longest sleep of a worker between two looks at its in-flight jobs' completion
    /// (cuEventQuery) while nothing is queued: bounds the delay from a job's end on the
    /// GPU to its handle being done. Issue 22: was 1 ms, up to ~3% of a 2 GB round.
    static constexpr long kDefaultMaxPollUs = 100;
    /// Benchmark hook (benchmarks/completion_latency.py): the longest poll sleep, in
    /// microseconds (>= 1); read by workers at each poll.
    void set_max_poll_us(long us);
    long max_poll_us() const { return max_poll_us_.load(std::memory_order_relaxed); }

  private:
    std::shared_ptr<SwapJob> build(Direction dir, const std::int64_t* pairs, std::size_t n,
                                   RegionRange regions);
    /// The job's CopyOps (one per row and region); run by the worker, not the caller.
    void expand(const SwapJob& job, std::vector<CopyOp>& ops) const;
    void run_worker();
    void run_job(CopyQueue& q, const std::shared_ptr<SwapJob>& job);
    /// Issues `job` on `q` once its dependencies are issued; false when it failed (then it
    /// is already completed as failed).
    bool issue(CopyQueue& q, const std::shared_ptr<SwapJob>& job, std::vector<CopyOp>& ops);
    /// Blocks until `job`'s copies are complete, then completes it (done or failed).
    void finish(CopyQueue& q, const std::shared_ptr<SwapJob>& job);
    /// Completes `job`: done when `error` is empty, else failed with itself as root cause.
    void complete(const std::shared_ptr<SwapJob>& job, double seconds, std::string error);
    void complete(const std::shared_ptr<SwapJob>& job, double seconds, std::string error,
                  std::uint64_t root_id, std::string root_error);
    /// Releases what waits on a job that will not be issued (backend_->abandon; nothing
    /// when prepare() failed and the job has no sync).
    void abandon(SwapJob& job) noexcept;
    /// Completes `job` as not run because `failed_dep` failed (root cause carried over).
    void complete_after_failed(const std::shared_ptr<SwapJob>& job, const SwapJob& failed_dep);

    KVLayout device_;
    KVLayout host_;
    std::shared_ptr<CopyBackend> backend_;
    std::string backend_name_;
    EngineOptions opts_;

    mutable std::mutex mu_;
    std::condition_variable work_cv_;   // workers: queue not empty or closing
    std::condition_variable space_cv_;  // submitters: queue has space
    std::deque<std::shared_ptr<SwapJob>> queue_;
    std::list<std::shared_ptr<SwapJob>> in_flight_;  // queued or running, submission order
    std::deque<std::shared_ptr<SwapJob>> finished_;  // for poll()
    std::vector<std::thread> workers_;
    std::unique_ptr<CopyQueue> inline_queue_;
    std::mutex inline_mu_;
    // Serializes submissions (ids, prepare(), queueing); workers never take it. Lock
    // order: inline_mu_ -> submit_mu_ -> mu_ -> a job's mu.
    std::mutex submit_mu_;
    std::mutex close_mu_;
    bool closing_ = false;
    bool paused_ = false;
    std::uint64_t next_id_ = 1;  // guarded by submit_mu_
    std::size_t swaps_in_flight_ = 0;  // guarded by mu_: swap jobs in in_flight_ (busy_s)
    SwapStats stats_;
    HostMemory host_memory_;
    std::chrono::steady_clock::time_point busy_since_;  // guarded by mu_; see busy_s
    std::atomic<long> max_poll_us_{kDefaultMaxPollUs};
    int fail_next_ = 0;          // guarded by submit_mu_
    std::string fail_message_;   // guarded by submit_mu_
};

}  // namespace kvswitch
