#include "kvswitch/swap_engine.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

namespace kvswitch {

enum class JobState : int { kQueued, kIssued, kDone, kFailed };

struct SwapJob {
    std::uint64_t id = 0;
    Direction dir = Direction::kOut;
    std::uint64_t nbytes = 0;
    std::uint64_t num_copies = 0;
    struct Row {
        std::int64_t src, dst, len;
    };
    std::vector<Row> rows;                // validated, length > 0; expanded by the worker
    std::vector<BlockSpan> device_spans;  // sorted, merged: every device block it touches
    std::vector<BlockSpan> host_spans;    // sorted, merged
    // Sorted, merged destination blocks of a migration (its device_spans also hold the
    // source blocks, which it only reads); empty for swaps.
    std::vector<BlockSpan> migrate_writes;
    // Sorted, merged source blocks of a migration; empty for swaps.
    std::vector<BlockSpan> migrate_reads;
    // The regions it copies, [region_begin, region_end) (all of them unless submit() was
    // given a RegionRange). Conflicts are found by block, whatever the regions.
    std::size_t region_begin = 0, region_end = 0;
    /// Whether this job writes every region `other` copies: then, where it writes a block,
    /// it replaces all of the bytes `other` reads there.
    bool covers_regions_of(const SwapJob& other) const {
        return region_begin <= other.region_begin && region_end >= other.region_end;
    }
    // An earlier conflicting job. `raw`: this job reads blocks (device or host) whose
    // current bytes that job writes (read-after-write), so its failure fails this job too;
    // the other orderings (write-after-read, write-after-write, and a read of blocks a
    // newer in-flight job overwrites) only order this job after it.
    struct Dep {
        std::shared_ptr<SwapJob> job;
        bool raw = false;
    };
    // Earlier conflicting jobs, kept until this one completes: it completes as failed if
    // a `raw` one fails, even after its own copies were issued (CUDA).
    std::vector<Dep> deps;
    // Set at submission (fail_next_jobs(), or prepare() failed): the worker fails the job
    // with it instead of issuing it.
    std::string fail_before_issue;
    bool released = false;  // guarded by the engine's mu_: release_held() let it run

    mutable std::mutex mu;
    mutable std::condition_variable cv;
    JobState state = JobState::kQueued;      // guarded by mu
    std::shared_ptr<JobSync> sync;           // guarded by mu; released when finished
    double seconds = 0.0;                    // guarded by mu
    std::string error;                       // guarded by mu
    std::uint64_t root_id = 0;               // guarded by mu; see SwapHandle::root_job_id
    std::string root_error;                  // guarded by mu; the root job's own error

    bool finished_locked() const { return state == JobState::kDone || state == JobState::kFailed; }
    bool writes_device() const { return dir != Direction::kOut; }
    bool writes_host() const { return dir == Direction::kOut; }
    bool is_migration() const { return dir == Direction::kMigrate; }
    /// The device blocks it writes: all it touches for a swap-in, the destination blocks
    /// of a migration, none for a swap-out.
    const std::vector<BlockSpan>& device_writes() const {
        static const std::vector<BlockSpan> none;
        if (dir == Direction::kIn) return device_spans;
        return dir == Direction::kMigrate ? migrate_writes : none;
    }
    /// The device blocks it reads: all it touches for a swap-out, the source blocks of a
    /// migration, none for a swap-in.
    const std::vector<BlockSpan>& device_reads() const {
        static const std::vector<BlockSpan> none;
        if (dir == Direction::kOut) return device_spans;
        return dir == Direction::kMigrate ? migrate_reads : none;
    }
    /// The host blocks it reads: all it touches for a swap-in, none otherwise.
    const std::vector<BlockSpan>& host_reads() const {
        static const std::vector<BlockSpan> none;
        return dir == Direction::kIn ? host_spans : none;
    }
    /// The host blocks it writes: all it touches for a swap-out, none otherwise.
    const std::vector<BlockSpan>& host_writes() const {
        static const std::vector<BlockSpan> none;
        return dir == Direction::kOut ? host_spans : none;
    }
};

// ---------------------------------------------------------------- SwapHandle

namespace {
const SwapJob& job_of(const std::shared_ptr<SwapJob>& j) {
    if (!j) throw std::logic_error("empty SwapHandle");
    return *j;
}
}  // namespace

std::uint64_t SwapHandle::id() const { return job_of(job_).id; }
Direction SwapHandle::direction() const { return job_of(job_).dir; }
std::uint64_t SwapHandle::nbytes() const { return job_of(job_).nbytes; }
std::uint64_t SwapHandle::num_copies() const { return job_of(job_).num_copies; }

bool SwapHandle::done() const {
    const SwapJob& j = job_of(job_);
    std::lock_guard<std::mutex> lock(j.mu);
    return j.finished_locked();
}

bool SwapHandle::wait(double timeout_s) const {
    if (std::isnan(timeout_s)) throw std::invalid_argument("timeout must be a number, got NaN");
    const SwapJob& j = job_of(job_);
    std::unique_lock<std::mutex> lock(j.mu);
    auto pred = [&] { return j.finished_locked(); };
    if (timeout_s < 0 || std::isinf(timeout_s)) {
        j.cv.wait(lock, pred);
    } else {
        // Wait in slices of at most an hour: wait_for converts its duration to the clock's
        // integer nanoseconds, which overflows (and returns at once) past ~292 years.
        const auto start = std::chrono::steady_clock::now();
        while (!pred()) {
            const double left =
                timeout_s -
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            if (left <= 0) return false;
            j.cv.wait_for(lock, std::chrono::duration<double>(std::min(left, 3600.0)));
        }
    }
    if (j.state == JobState::kFailed)
        throw SwapError("swap job " + std::to_string(j.id) + " failed: " + j.error);
    return true;
}

std::optional<double> SwapHandle::elapsed_s() const {
    const SwapJob& j = job_of(job_);
    std::lock_guard<std::mutex> lock(j.mu);
    if (j.state != JobState::kDone) return std::nullopt;
    return j.seconds;
}

std::string SwapHandle::error() const {
    const SwapJob& j = job_of(job_);
    std::lock_guard<std::mutex> lock(j.mu);
    return j.error;
}

std::uint64_t SwapHandle::root_job_id() const {
    const SwapJob& j = job_of(job_);
    std::lock_guard<std::mutex> lock(j.mu);
    return j.root_id;
}

// ---------------------------------------------------------------- helpers

namespace {

std::vector<BlockSpan> merged(std::vector<BlockSpan> spans) {
    std::sort(spans.begin(), spans.end(),
              [](const BlockSpan& a, const BlockSpan& b) { return a.start < b.start; });
    std::vector<BlockSpan> out;
    for (const BlockSpan& s : spans) {
        if (!out.empty() && s.start <= out.back().start + out.back().length) {
            const std::int64_t end = std::max(out.back().start + out.back().length,
                                               s.start + s.length);
            out.back().length = end - out.back().start;
        } else {
            out.push_back(s);
        }
    }
    return out;
}

bool overlaps(const std::vector<BlockSpan>& a, const std::vector<BlockSpan>& b) {
    std::size_t i = 0, j = 0;
    while (i < a.size() && j < b.size()) {
        const std::int64_t a_end = a[i].start + a[i].length;
        const std::int64_t b_end = b[j].start + b[j].length;
        if (a[i].start < b_end && b[j].start < a_end) return true;
        if (a_end <= b_end) ++i; else ++j;
    }
    return false;
}

/// Whether one of the jobs writes a block the other reads or writes (RAW, WAR, WAW). A
/// migration reads its source device blocks and writes its destination ones, so two jobs
/// that only read the same device blocks (a swap-out and a migration from them) do not
/// conflict.
bool conflicts(const SwapJob& a, const SwapJob& b) {
    if (a.writes_device() && overlaps(a.device_writes(), b.device_spans)) return true;
    if (b.writes_device() && overlaps(b.device_writes(), a.device_spans)) return true;
    return (a.writes_host() || b.writes_host()) && overlaps(a.host_spans, b.host_spans);
}

/// The blocks of `a` (sorted, merged) that are not in `b` (sorted, merged).
std::vector<BlockSpan> subtract(const std::vector<BlockSpan>& a,
                                const std::vector<BlockSpan>& b) {
    std::vector<BlockSpan> out;
    std::size_t j = 0;
    for (const BlockSpan& s : a) {
        std::int64_t start = s.start;
        const std::int64_t end = s.start + s.length;
        while (j < b.size() && b[j].start + b[j].length <= start) ++j;
        std::size_t k = j;  // b's spans sorted and disjoint: walk those inside [start, end)
        while (start < end && k < b.size() && b[k].start < end) {
            if (b[k].start > start) out.push_back({start, b[k].start - start});
            start = std::max(start, b[k].start + b[k].length);
            ++k;
        }
        if (start < end) out.push_back({start, end - start});
    }
    return out;
}

/// Records in job.deps every job of `in_flight` (submission order) that conflicts with it,
/// in that order. A dep is `raw` when it is the newest in-flight writer of some block the
/// job reads: the bytes the job reads are then that dep's, so its failure is the job's.
/// Each job copies whole blocks in every region, so a newer writer of a block replaces
/// what older writers left there (whether they failed or not): reads are matched newest
/// first and a matched block is taken out of the set still looked for.
void add_deps(SwapJob& job, const std::list<std::shared_ptr<SwapJob>>& in_flight) {
    std::vector<BlockSpan> dev_reads = job.device_reads();
    std::vector<BlockSpan> host_reads = job.host_reads();
    for (auto it = in_flight.rbegin(); it != in_flight.rend(); ++it) {
        const SwapJob& other = **it;
        if (!conflicts(other, job)) continue;
        bool raw = false;
        // A writer of only some of the regions read leaves older writers' bytes in the
        // others: only one that covers them all takes its blocks out of the search.
        const bool covers = other.covers_regions_of(job);
        const auto& dw = other.device_writes();
        if (!dw.empty() && overlaps(dw, dev_reads)) {
            raw = true;
            if (covers) dev_reads = subtract(dev_reads, dw);
        }
        const auto& hw = other.host_writes();
        if (!hw.empty() && overlaps(hw, host_reads)) {
            raw = true;
            if (covers) host_reads = subtract(host_reads, hw);
        }
        job.deps.push_back({*it, raw});
    }
    std::reverse(job.deps.begin(), job.deps.end());
}

int log2_floor(std::uint64_t v) {
    int k = 0;
    while (v >>= 1) ++k;
    return k;
}

/// "[start, end)" of an extent. The extent may come straight from the caller, so the end
/// is computed without overflowing int64 (start + length can exceed it).
std::string extent_str(std::int64_t start, std::int64_t length) {
    const std::int64_t max = std::numeric_limits<std::int64_t>::max();
    const std::string end =
        start >= 0 && length > max - start
            ? std::to_string(static_cast<std::uint64_t>(start) + static_cast<std::uint64_t>(length))
            : std::to_string(start + length);
    return "[" + std::to_string(start) + ", " + end + ")";
}

/// [first byte, one past the last byte) of a region's blocks. KVLayout guarantees the
/// region's size fits int64; the end saturates at the top of the address space.
struct ByteRange {
    std::uint64_t begin, end;
};
ByteRange byte_range(const KVRegion& r, std::int64_t num_blocks) {
    const auto size = static_cast<std::uint64_t>((num_blocks - 1) * r.block_stride + r.block_bytes);
    const std::uint64_t begin = r.base;
    const std::uint64_t top = std::numeric_limits<std::uint64_t>::max();
    return {begin, begin > top - size ? top : begin + size};
}

void wait_finished(const SwapJob& j) {
    std::unique_lock<std::mutex> lock(j.mu);
    j.cv.wait(lock, [&] { return j.finished_locked(); });
}

/// The host layout's memory as one [address, bytes) range per region, for attach_host()
/// (which judges each region and merges what it page-locks itself).
std::vector<std::pair<std::uintptr_t, std::size_t>> host_ranges(const KVLayout& host) {
    std::vector<std::pair<std::uintptr_t, std::size_t>> out;
    for (const KVRegion& r : host.regions()) {
        const ByteRange b = byte_range(r, host.num_blocks());
        out.emplace_back(b.begin, b.end - b.begin);
    }
    return out;
}

}  // namespace

// ---------------------------------------------------------------- engine

AsyncSwapEngine::AsyncSwapEngine(KVLayout device, KVLayout host,
                                 std::shared_ptr<CopyBackend> backend, EngineOptions options)
    : device_(std::move(device)), host_(std::move(host)), backend_(std::move(backend)),
      opts_(options) {
    if (!backend_) throw std::invalid_argument("AsyncSwapEngine: no backend");
    backend_name_ = backend_->name();
    if (opts_.num_workers < 0 || opts_.num_workers > 64)
        throw std::invalid_argument("AsyncSwapEngine: num_workers must be in [0, 64], got " +
                                    std::to_string(opts_.num_workers));
    if (opts_.sync_every < 1)
        throw std::invalid_argument("AsyncSwapEngine: sync_every must be >= 1, got " +
                                    std::to_string(opts_.sync_every));
    if (opts_.max_queue < 1) throw std::invalid_argument("AsyncSwapEngine: max_queue must be >= 1");
    if (host_.device().type != DeviceType::kCPU)
        throw std::invalid_argument("AsyncSwapEngine: the host pool must be in CPU memory, got " +
                                    host_.device().str());
    if (host_.num_regions() != device_.num_regions())
        throw std::invalid_argument(
            "AsyncSwapEngine: host pool has " + std::to_string(host_.num_regions()) +
            " regions, the device layout " + std::to_string(device_.num_regions()));
    for (std::size_t i = 0; i < host_.num_regions(); ++i) {
        const auto hb = host_.regions()[i].block_bytes;
        const auto db = device_.regions()[i].block_bytes;
        if (hb != db)
            throw std::invalid_argument("AsyncSwapEngine: region " + std::to_string(i) +
                                        ": host block_bytes " + std::to_string(hb) +
                                        " != device block_bytes " + std::to_string(db));
    }
    // A host pool that aliases the device pool would copy a pool onto itself (overlapping
    // memcpy on the host backend). Regions of one layout may interleave (K and V per
    // block), so only device-vs-host pairs are compared. O(regions^2), once.
    for (std::size_t i = 0; i < device_.num_regions(); ++i) {
        const ByteRange d = byte_range(device_.regions()[i], device_.num_blocks());
        for (std::size_t k = 0; k < host_.num_regions(); ++k) {
            const ByteRange h = byte_range(host_.regions()[k], host_.num_blocks());
            if (d.begin < h.end && h.begin < d.end)
                throw std::invalid_argument(
                    "AsyncSwapEngine: host pool region " + std::to_string(k) +
                    " shares memory with device region " + std::to_string(i) +
                    ": the host pool must be memory of its own (e.g. a HostKVPool), not a view "
                    "of the device pool");
        }
    }
    host_memory_ = backend_->attach_host(host_ranges(host_), opts_.register_host);
    for (int i = 0; i < opts_.num_workers; ++i) workers_.emplace_back([this] { run_worker(); });
}

AsyncSwapEngine::~AsyncSwapEngine() { close(); }

std::shared_ptr<SwapJob> AsyncSwapEngine::build(Direction dir, const std::int64_t* pairs,
                                                std::size_t n, RegionRange regions) {
    const bool out = dir == Direction::kOut;
    const bool migrate = dir == Direction::kMigrate;
    const KVLayout& src = out || migrate ? device_ : host_;
    const KVLayout& dst = out ? host_ : device_;
    const std::size_t nreg = src.num_regions();
    if (regions.end == SIZE_MAX) regions.end = nreg;
    if (regions.begin >= regions.end || regions.end > nreg)
        throw std::invalid_argument("regions [" + std::to_string(regions.begin) + ", " +
                                    std::to_string(regions.end) + ") is not a non-empty " +
                                    "range within the layouts' " + std::to_string(nreg) +
                                    " regions");
    const char* src_name = out || migrate ? "device pool" : "host pool";
    const char* dst_name = out ? "host pool" : "device pool";

    struct Row {
        std::int64_t src, dst, len;
        std::size_t index;
    };
    std::vector<Row> rows;
    rows.reserve(n);
    const auto* bytes = reinterpret_cast<const unsigned char*>(pairs);
    for (std::size_t i = 0; i < n; ++i) {
        std::int64_t row[3];  // memcpy: no misaligned load even if the caller's rows are
        std::memcpy(row, bytes + i * sizeof row, sizeof row);
        const std::int64_t s = row[0], d = row[1], len = row[2];
        // Messages are built only on error: this loop runs in the caller's thread.
        auto where = [&] {
            return "pairs row " + std::to_string(i) + " (" + std::to_string(s) + ", " +
                   std::to_string(d) + ", " + std::to_string(len) + "): ";
        };
        if (len < 0) throw std::invalid_argument(where() + "negative length");
        if (len == 0) continue;
        if (s < 0 || s > src.num_blocks() - len)
            throw std::invalid_argument(where() + "source extent " + extent_str(s, len) +
                                        " is outside the " + src_name + " of " +
                                        std::to_string(src.num_blocks()) + " blocks");
        if (d < 0 || d > dst.num_blocks() - len)
            throw std::invalid_argument(where() + "destination extent " + extent_str(d, len) +
                                        " is outside the " + dst_name + " of " +
                                        std::to_string(dst.num_blocks()) + " blocks");
        rows.push_back({s, d, len, i});
    }
    // Destination extents must not overlap: the result would depend on copy order.
    std::vector<const Row*> by_dst;
    by_dst.reserve(rows.size());
    for (const Row& r : rows) by_dst.push_back(&r);
    std::sort(by_dst.begin(), by_dst.end(),
              [](const Row* a, const Row* b) { return a->dst < b->dst; });
    for (std::size_t k = 1; k < by_dst.size(); ++k) {
        const Row& a = *by_dst[k - 1];
        const Row& b = *by_dst[k];
        if (b.dst < a.dst + a.len)
            throw std::invalid_argument(
                "destination extents overlap: pairs rows " + std::to_string(a.index) + " " +
                extent_str(a.dst, a.len) + " and " + std::to_string(b.index) + " " +
                extent_str(b.dst, b.len) + " both write block " + std::to_string(b.dst));
    }
    if (migrate) {
        // A migration must not read a block it writes: its copies run in no set order, so
        // the result would depend on it. Sources may overlap each other (one block copied
        // to two places). Sweep: sources by start against the disjoint sorted destinations.
        std::vector<const Row*> by_src(by_dst);
        std::sort(by_src.begin(), by_src.end(),
                  [](const Row* a, const Row* b) { return a->src < b->src; });
        std::size_t i = 0, k = 0;
        while (i < by_src.size() && k < by_dst.size()) {
            const Row& a = *by_src[i];
            const Row& b = *by_dst[k];
            if (a.src < b.dst + b.len && b.dst < a.src + a.len)
                throw std::invalid_argument(
                    "pairs row " + std::to_string(a.index) + " reads device blocks " +
                    extent_str(a.src, a.len) + " that row " + std::to_string(b.index) +
                    " writes " + extent_str(b.dst, b.len) +
                    ": a migration's source and destination extents must not overlap "
                    "(submit chained moves as separate migrations, in order)");
            if (a.src + a.len <= b.dst + b.len) ++i; else ++k;
        }
    }

    auto job = std::make_shared<SwapJob>();
    job->dir = dir;
    job->region_begin = regions.begin;
    job->region_end = regions.end;
    job->rows.reserve(rows.size());
    std::vector<BlockSpan> dev, hst;
    dev.reserve(rows.size());
    hst.reserve(rows.size());
    std::int64_t blocks = 0;
    if (migrate) {
        std::vector<BlockSpan> reads, writes;
        reads.reserve(rows.size());
        writes.reserve(rows.size());
        dev.reserve(2 * rows.size());
        for (const Row& r : rows) {
            dev.push_back({r.src, r.len});
            dev.push_back({r.dst, r.len});
            reads.push_back({r.src, r.len});
            writes.push_back({r.dst, r.len});
            job->rows.push_back({r.src, r.dst, r.len});
            blocks += r.len;
        }
        job->migrate_reads = merged(std::move(reads));
        job->migrate_writes = merged(std::move(writes));
    } else {
        for (const Row& r : rows) {
            (out ? dev : hst).push_back({r.src, r.len});
            (out ? hst : dev).push_back({r.dst, r.len});
            job->rows.push_back({r.src, r.dst, r.len});
            blocks += r.len;
        }
    }
    // blocks <= the destination pool's size (extents do not overlap), but the sum over
    // regions of a hand-built layout can still be huge.
    std::uint64_t bpb = 0;  // bytes per block in the job's regions (KVLayout: no overflow)
    for (std::size_t g = regions.begin; g < regions.end; ++g)
        bpb += static_cast<std::uint64_t>(src.regions()[g].block_bytes);
    const auto nblocks = static_cast<std::uint64_t>(blocks);
    if (nblocks && bpb > std::numeric_limits<std::uint64_t>::max() / nblocks)
        throw std::invalid_argument("the job's size in bytes overflows 64 bits");
    job->nbytes = nblocks * bpb;
    job->num_copies = job->rows.size() * (regions.end - regions.begin);
    job->device_spans = merged(std::move(dev));
    job->host_spans = merged(std::move(hst));
    return job;
}

void AsyncSwapEngine::expand(const SwapJob& job, std::vector<CopyOp>& ops) const {
    const bool out = job.dir == Direction::kOut;
    const bool migrate = job.dir == Direction::kMigrate;
    const KVLayout& src = out || migrate ? device_ : host_;
    const KVLayout& dst = out ? host_ : device_;
    ops.clear();
    ops.reserve(job.rows.size() * (job.region_end - job.region_begin));
    for (const SwapJob::Row& r : job.rows) {
        for (std::size_t g = job.region_begin; g < job.region_end; ++g) {
            const KVRegion& sr = src.regions()[g];
            const KVRegion& dr = dst.regions()[g];
            CopyOp op;
            op.src = src.block_address(g, r.src);
            op.dst = dst.block_address(g, r.dst);
            const auto bb = static_cast<std::size_t>(sr.block_bytes);
            if (r.len == 1 ||
                (sr.block_stride == sr.block_bytes && dr.block_stride == dr.block_bytes)) {
                op.width = bb * static_cast<std::size_t>(r.len);  // one linear copy
                op.height = 1;
                op.src_pitch = op.dst_pitch = op.width;
            } else {
                op.width = bb;  // one 2D copy: len rows of one block each
                op.height = static_cast<std::size_t>(r.len);
                op.src_pitch = static_cast<std::size_t>(sr.block_stride);
                op.dst_pitch = static_cast<std::size_t>(dr.block_stride);
            }
            ops.push_back(op);
        }
    }
}

void AsyncSwapEngine::check(Direction dir, StreamRef after, StreamRef before) const {
    if (closed()) throw EngineClosed("AsyncSwapEngine is closed");
    backend_->validate(dir, after, before);
}

SwapHandle AsyncSwapEngine::submit(Direction dir, const std::int64_t* pairs, std::size_t n,
                                   StreamRef after, StreamRef before, RegionRange regions) {
    check(dir, after, before);
    // throws before anything happens
    std::shared_ptr<SwapJob> job = build(dir, pairs, n, regions);
    // From here on nothing throws but EngineClosed (a close() racing this call): a backend
    // error becomes a failed job, reported on its handle like any copy error.

    // Under submit_mu_: the job's id, and the work prepare() enqueues on the caller's
    // streams (events recorded for after=, flag waits for before=), in one order. Were
    // they apart, two threads could enqueue them in opposite orders: job A's flag wait
    // ahead of job B's after= event on one stream while A, the later id, depends on B --
    // a GPU hang. Workers never take submit_mu_, so a prepare() that blocks in the driver
    // (a consumer's full command queue) cannot stop them from draining it.
    auto start = [&] {
        job->id = next_id_++;
        if (fail_next_ > 0) {  // armed in submission order
            --fail_next_;
            job->fail_before_issue = fail_message_;
        }
        try {
            job->sync = backend_->prepare(dir, after, before);
        } catch (const std::exception& e) {
            job->fail_before_issue =
                std::string("could not order the job against the caller's streams: ") +
                e.what();
        }
    };

    if (opts_.num_workers == 0) {
        std::lock_guard<std::mutex> inline_lock(inline_mu_);
        {
            std::lock_guard<std::mutex> order(submit_mu_);
            if (closed()) throw EngineClosed("AsyncSwapEngine is closed");
            start();
        }
        const auto t0 = std::chrono::steady_clock::now();
        if (!inline_queue_) {
            try {
                inline_queue_ = backend_->open_queue(false);
            } catch (const std::exception& e) {
                abandon(*job);
                complete(job, 0.0, std::string("could not open a copy queue: ") + e.what());
                return SwapHandle(job);
            }
        }
        // The job is complete when run_job returns, so a before= stream needs no order.
        run_job(*inline_queue_, job);
        const double busy = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
                                .count();
        std::lock_guard<std::mutex> lock(mu_);
        if (!job->is_migration()) stats_.busy_s += busy;
        return SwapHandle(job);
    }

    std::shared_ptr<JobSync> sync;  // kept for order_before(): the job may finish first
    {
        std::lock_guard<std::mutex> order(submit_mu_);
        {
            std::unique_lock<std::mutex> lock(mu_);
            space_cv_.wait(lock, [&] { return queue_.size() < opts_.max_queue || closing_; });
            if (closing_) throw EngineClosed("AsyncSwapEngine is closed");
        }
        start();
        sync = job->sync;
        std::lock_guard<std::mutex> lock(mu_);
        try {
            if (closing_) throw EngineClosed("AsyncSwapEngine is closed");  // close() raced
            add_deps(*job, in_flight_);
            queue_.push_back(job);
            try {
                in_flight_.push_back(job);
            } catch (...) {
                queue_.pop_back();
                throw;
            }
        } catch (...) {
            abandon(*job);  // releases a before= flag wait already on the caller's stream
            throw;
        }
        if (!job->is_migration() && ++swaps_in_flight_ == 1)
            busy_since_ = std::chrono::steady_clock::now();
    }
    work_cv_.notify_one();
    if (before.kind == StreamRef::Kind::kStream && sync && backend_->defers_before(*sync)) {
        // The consumer stream can wait only on copies already issued (an event not yet
        // recorded would be waited on as complete): wait for the worker's dispatch.
        JobState state;
        {
            std::unique_lock<std::mutex> lock(job->mu);
            job->cv.wait(lock, [&] { return job->state != JobState::kQueued; });
            state = job->state;
        }
        // A failed job's handle raises. A done one is ordered all the same (a wait on a
        // complete event costs nothing), so what the stream sees does not hang on timing.
        if (state != JobState::kFailed && !backend_->order_before(*sync, before))
            wait_finished(*job);  // the stream could not be ordered: finish before returning
    }
    return SwapHandle(job);
}

void AsyncSwapEngine::set_paused(bool paused) {
    {
        std::lock_guard<std::mutex> lock(mu_);
        paused_ = paused;
    }
    work_cv_.notify_all();
}

void AsyncSwapEngine::set_max_poll_us(long us) {
    if (us < 1) throw std::invalid_argument("max_poll_us must be >= 1, got " + std::to_string(us));
    max_poll_us_.store(us, std::memory_order_relaxed);
}

void AsyncSwapEngine::fail_next_jobs(int n, std::string message) {
    std::lock_guard<std::mutex> lock(submit_mu_);
    fail_next_ = n;
    fail_message_ = std::move(message);
}

std::vector<std::uint64_t> AsyncSwapEngine::release_held(std::uint64_t id) {
    std::vector<std::uint64_t> ids;
    {
        std::lock_guard<std::mutex> lock(mu_);
        // Newest first: a queued job's dependencies are older, so they come later in the
        // walk. A job still queued is not a worker's yet: its deps are safe to read here.
        std::vector<const SwapJob*> wanted;
        for (auto it = queue_.rbegin(); it != queue_.rend(); ++it) {
            SwapJob& j = **it;
            if (id != 0 && j.id != id &&
                std::find(wanted.begin(), wanted.end(), &j) == wanted.end())
                continue;
            j.released = true;
            for (const SwapJob::Dep& d : j.deps) wanted.push_back(d.job.get());
        }
        // Released jobs first, in submission order: a worker takes the front job only.
        std::stable_partition(queue_.begin(), queue_.end(),
                              [](const std::shared_ptr<SwapJob>& j) { return j->released; });
        for (const auto& j : queue_)
            if (j->released) ids.push_back(j->id);
    }
    work_cv_.notify_all();
    return ids;
}

namespace {

/// Waits until every dependency of `job` has left the queue (issued or finished); returns
/// the first read-after-write one that failed, or null. `issued` collects the syncs of
/// those still running. A failed job holds no copies in flight (issue() and finish() of a
/// failing job return only once nothing of it can touch memory), so a failed dep that is
/// not read-after-write needs no further order.
const SwapJob* wait_for_deps_issued(const SwapJob& job,
                                    std::vector<std::shared_ptr<JobSync>>& keep,
                                    std::vector<JobSync*>& issued) {
    for (const auto& d : job.deps) {
        SwapJob& dep = *d.job;
        std::unique_lock<std::mutex> lock(dep.mu);
        dep.cv.wait(lock, [&] { return dep.state != JobState::kQueued; });
        if (dep.state == JobState::kFailed) {
            if (d.raw) return &dep;
            continue;
        }
        if (dep.state == JobState::kIssued && dep.sync) {  // still running: order after it
            keep.push_back(dep.sync);
            issued.push_back(dep.sync.get());
        }
    }
    return nullptr;
}

/// Waits until every dependency of `job` has finished; returns the first read-after-write
/// one that failed.
const SwapJob* wait_for_deps_finished(const SwapJob& job) {
    const SwapJob* failed = nullptr;
    for (const auto& d : job.deps) {
        SwapJob& dep = *d.job;
        std::unique_lock<std::mutex> lock(dep.mu);
        dep.cv.wait(lock, [&] { return dep.finished_locked(); });
        if (dep.state == JobState::kFailed && d.raw && !failed) failed = &dep;
    }
    return failed;
}

}  // namespace

bool AsyncSwapEngine::issue(CopyQueue& q, const std::shared_ptr<SwapJob>& job,
                            std::vector<CopyOp>& ops) {
    std::vector<std::shared_ptr<JobSync>> keep;
    std::vector<JobSync*> issued_deps;
    // A job that reads blocks a failed job was to write (read-after-write) is not run: the
    // bytes it would read were never written. A job ordered after a failed one for another
    // reason (it writes blocks that one read or wrote) runs once that one has finished.
    if (const SwapJob* failed = wait_for_deps_issued(*job, keep, issued_deps)) {
        abandon(*job);
        complete_after_failed(job, *failed);
        return false;
    }
    if (!job->fail_before_issue.empty()) {
        abandon(*job);
        complete(job, 0.0, job->fail_before_issue);
        return false;
    }
    expand(*job, ops);
    try {
        q.issue(ops, *job->sync, issued_deps);
    } catch (const std::exception& e) {
        abandon(*job);
        complete(job, 0.0, e.what());
        return false;
    }
    {
        std::lock_guard<std::mutex> lock(job->mu);
        job->state = JobState::kIssued;
    }
    job->cv.notify_all();
    return true;
}

void AsyncSwapEngine::finish(CopyQueue& q, const std::shared_ptr<SwapJob>& job) {
    double seconds = 0.0;
    try {
        seconds = q.finish(*job->sync);
    } catch (const std::exception& e) {
        abandon(*job);
        complete(job, 0.0, e.what());
        return;
    }
    // Its copies ran after its dependencies' copies; if one that wrote what this job read
    // failed after this job was issued (a CUDA error reported at its end), this job's
    // bytes are not trusted.
    if (const SwapJob* failed = wait_for_deps_finished(*job)) {
        complete_after_failed(job, *failed);
        return;
    }
    complete(job, seconds, "");
}

void AsyncSwapEngine::run_job(CopyQueue& q, const std::shared_ptr<SwapJob>& job) {
    // Inline mode: issue and finish in the calling thread.
    std::vector<CopyOp> ops;
    if (issue(q, job, ops)) finish(q, job);
}

void AsyncSwapEngine::run_worker() {
    std::unique_ptr<CopyQueue> q;
    std::string open_error;
    try {
        q = backend_->open_queue(true);
    } catch (const std::exception& e) {
        open_error = e.what();
    }
    std::deque<std::shared_ptr<SwapJob>> pending;  // issued, not finished (CUDA)
    std::vector<CopyOp> ops;                       // reused across jobs
    // Paper 3.2 bounds the swap stream's queue so that the inference stream's own copies
    // are not stuck behind it: here, at most sync_every jobs in flight per worker.
    const auto max_pending = static_cast<std::size_t>(opts_.sync_every);
    // With jobs in flight and nothing queued, the worker polls their completion with a
    // growing interval instead of blocking on the GPU, so that a job queued meanwhile (a
    // swap-in whose caller waits for its dispatch) is issued at once, not after an
    // earlier job that may itself wait on the caller's compute (after=). The interval
    // stops at max_poll_us() (100 us): a job is seen done at most that long after its end.
    constexpr auto kMinPoll = std::chrono::microseconds(20);
    auto poll = kMinPoll;

    for (;;) {
        while (!pending.empty()) {  // retire what is complete, without blocking
            bool ready = true;
            try {
                ready = q->ready(*pending.front()->sync);
            } catch (const std::exception&) {
                // finish() reports the error
            }
            if (!ready) break;
            finish(*q, pending.front());
            pending.pop_front();
            poll = kMinPoll;
        }
        std::shared_ptr<SwapJob> job;
        bool wait_on_gpu = false;
        {
            std::unique_lock<std::mutex> lock(mu_);
            auto can_take = [&] {
                return !queue_.empty() && (!paused_ || closing_ || queue_.front()->released);
            };
            if (pending.empty()) {
                work_cv_.wait(lock, [&] { return can_take() || closing_; });
            } else if (pending.size() < max_pending && !closing_) {
                work_cv_.wait_for(lock, poll, can_take);
            }
            if (pending.size() < max_pending && can_take()) {
                job = std::move(queue_.front());
                queue_.pop_front();
            } else if (pending.empty()) {
                break;  // closing and drained
            } else {
                // At the bound, or closing with nothing left to take: wait on the GPU.
                wait_on_gpu = pending.size() >= max_pending || closing_;
            }
        }
        if (wait_on_gpu) {
            finish(*q, pending.front());
            pending.pop_front();
            poll = kMinPoll;
            continue;
        }
        if (!job) {  // poll interval passed, nothing queued: look at the GPU again
            poll = std::min(poll * 2, std::chrono::microseconds(max_poll_us()));
            continue;
        }
        poll = kMinPoll;
        space_cv_.notify_one();
        if (!q) {
            abandon(*job);
            complete(job, 0.0, "worker could not open a copy queue: " + open_error);
            continue;
        }
        if (!issue(*q, job, ops)) continue;
        if (q->completes_on_issue()) {
            finish(*q, job);
            continue;
        }
        pending.push_back(std::move(job));
    }
}

void AsyncSwapEngine::abandon(SwapJob& job) noexcept {
    if (job.sync) backend_->abandon(*job.sync);  // no sync: prepare() itself failed
}

void AsyncSwapEngine::complete_after_failed(const std::shared_ptr<SwapJob>& job,
                                            const SwapJob& failed_dep) {
    std::uint64_t root_id;
    std::string root_error;
    {
        std::lock_guard<std::mutex> lock(failed_dep.mu);
        root_id = failed_dep.root_id;
        root_error = failed_dep.root_error;
    }
    complete(job, 0.0,
             "not run: it is ordered after swap job " + std::to_string(root_id) +
                 " over the same blocks, which failed: " + root_error,
             root_id, root_error);
}

void AsyncSwapEngine::complete(const std::shared_ptr<SwapJob>& job, double seconds,
                               std::string error) {
    const std::uint64_t root_id = error.empty() ? 0 : job->id;  // it is its own root cause
    std::string root_error = error;
    complete(job, seconds, std::move(error), root_id, std::move(root_error));
}

void AsyncSwapEngine::complete(const std::shared_ptr<SwapJob>& job, double seconds,
                               std::string error, std::uint64_t root_id,
                               std::string root_error) {
    std::shared_ptr<JobSync> drop;
    std::vector<SwapJob::Row> rows;
    std::vector<SwapJob::Dep> deps;
    {
        std::lock_guard<std::mutex> lock(job->mu);
        drop = std::move(job->sync);
        rows.swap(job->rows);
    }
    deps.swap(job->deps);  // only this job's worker touches deps after submission
    {
        std::lock_guard<std::mutex> lock(mu_);
        // Inline jobs are never in in_flight_ (submit() counts their busy time).
        const auto it = std::find(in_flight_.begin(), in_flight_.end(), job);
        if (it != in_flight_.end()) {
            in_flight_.erase(it);
            if (!job->is_migration() && --swaps_in_flight_ == 0)
                stats_.busy_s += std::chrono::duration<double>(
                                     std::chrono::steady_clock::now() - busy_since_)
                                     .count();
        }
        if (error.empty() && job->is_migration()) {
            ++stats_.num_migrations;
            stats_.migration_copies += job->num_copies;
            stats_.migrated_bytes += job->nbytes;
            stats_.migration_seconds += seconds;
        } else if (error.empty()) {
            ++stats_.num_jobs;
            stats_.num_copies += job->num_copies;
            stats_.bytes += job->nbytes;
            stats_.seconds += seconds;
            auto& hist = stats_.copy_size_histogram;
            for (const SwapJob::Row& r : rows) {
                for (std::size_t i = job->region_begin; i < job->region_end; ++i) {
                    const KVRegion& g = device_.regions()[i];
                    const auto b = static_cast<std::uint64_t>(r.len * g.block_bytes);
                    const auto k = static_cast<std::size_t>(log2_floor(b));
                    if (hist.size() <= k) hist.resize(k + 1);
                    ++hist[k];
                }
            }
        } else {
            ++stats_.num_failed;
        }
        finished_.push_back(job);
        while (finished_.size() > opts_.max_unpolled) finished_.pop_front();
        // Still under mu_ (order: mu_ -> job->mu): a synchronize() that no longer finds
        // the job in in_flight_ must find it finished, with its error and root cause set.
        std::lock_guard<std::mutex> job_lock(job->mu);
        job->state = error.empty() ? JobState::kDone : JobState::kFailed;
        job->seconds = seconds;
        job->error = std::move(error);
        job->root_id = root_id;
        job->root_error = std::move(root_error);
    }
    job->cv.notify_all();
}

std::vector<SwapHandle> AsyncSwapEngine::poll() {
    std::deque<std::shared_ptr<SwapJob>> done;
    {
        std::lock_guard<std::mutex> lock(mu_);
        done.swap(finished_);
    }
    std::vector<SwapHandle> out;
    out.reserve(done.size());
    for (auto& j : done) out.emplace_back(std::move(j));
    return out;
}

std::size_t AsyncSwapEngine::wait_blocks(const std::int64_t* ids, std::size_t n) {
    std::vector<std::int64_t> sorted(n);  // memcpy: the caller's ids may be misaligned
    if (n) std::memcpy(sorted.data(), ids, n * sizeof(std::int64_t));
    std::sort(sorted.begin(), sorted.end());
    std::vector<std::shared_ptr<SwapJob>> hits;
    {
        std::lock_guard<std::mutex> lock(mu_);
        for (const auto& job : in_flight_) {
            for (const BlockSpan& s : job->device_spans) {
                auto it = std::lower_bound(sorted.begin(), sorted.end(), s.start);
                if (it != sorted.end() && *it < s.start + s.length) {
                    hits.push_back(job);
                    break;
                }
            }
        }
    }
    for (const auto& j : hits) wait_finished(*j);
    return hits.size();
}

void AsyncSwapEngine::synchronize() {
    std::vector<std::shared_ptr<SwapJob>> all;
    {
        std::lock_guard<std::mutex> lock(mu_);
        all.assign(in_flight_.begin(), in_flight_.end());
    }
    for (const auto& j : all) wait_finished(*j);
}

SwapStats AsyncSwapEngine::stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    SwapStats s = stats_;
    s.in_flight = in_flight_.size();
    if (swaps_in_flight_ > 0)
        s.busy_s += std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                  busy_since_)
                        .count();
    return s;
}

void AsyncSwapEngine::close() {
    std::lock_guard<std::mutex> close_lock(close_mu_);
    {
        std::lock_guard<std::mutex> lock(mu_);
        closing_ = true;
    }
    work_cv_.notify_all();
    space_cv_.notify_all();
    for (std::thread& t : workers_)
        if (t.joinable()) t.join();
    workers_.clear();
    std::lock_guard<std::mutex> inline_lock(inline_mu_);
    inline_queue_.reset();
    backend_->close();  // every job is complete: nothing copies any more
}

bool AsyncSwapEngine::closed() const {
    std::lock_guard<std::mutex> lock(mu_);
    return closing_;
}

}  // namespace kvswitch
