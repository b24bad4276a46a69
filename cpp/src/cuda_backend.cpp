#include "kvswitch/cuda_backend.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <deque>
#include <map>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "kvswitch/cuda_driver.hpp"

namespace kvswitch {

using namespace kvswitch::cu;

namespace {
constexpr std::size_t kNumFlags = 4096;  // before= wait flags (one per in-flight job)

/// The events a job uses. kEnd: timed and blocking-sync (a worker waits on it and must
/// sleep, not spin a core). kStart: timed only (nothing waits on it; it only gives
/// cuEventElapsedTime its start). kPlain: ordering only (after=, consumer marks).
enum class EventKind : int { kEnd = 0, kStart = 1, kPlain = 2 };
constexpr unsigned event_flags(EventKind k) {
    return k == EventKind::kEnd     ? CU_EVENT_BLOCKING_SYNC
           : k == EventKind::kStart ? CU_EVENT_DEFAULT
                                    : CU_EVENT_DISABLE_TIMING;
}
}  // namespace

struct CudaBackend::Shared {
    const CudaDriver& d;
    CUdevice dev = 0;
    int ordinal = 0;
    CUcontext ctx = nullptr;
    int lowest_priority = 0;

    std::mutex mu;
    std::vector<CUevent> events[3];  // free events by EventKind
    std::vector<CUevent>& plain_events = events[static_cast<int>(EventKind::kPlain)];

    // before= flags (BeforeWait::kFlag): device-mapped pinned words; values only increase
    // (cuStreamWaitValue32 compares cyclically: (int32_t)(*flag - value) >= 0).
    std::uint32_t* flags = nullptr;
    CUdeviceptr flags_dev = 0;
    std::atomic<bool> busy[kNumFlags] = {};
    std::uint32_t next_value = 0;  // guarded by mu
    std::size_t next_flag = 0;     // guarded by mu

    Shared(const CudaDriver& drv, int ord) : d(drv), ordinal(ord) {}

    // Flag mode: after each flag wait, a plain event recorded on the consumer stream, kept
    // until it completes. The flags may be freed once every mark has completed: no
    // consumer waits on them any more. Guarded by mu.
    std::deque<CUevent> consumer_marks;
    bool untracked_wait = false;  // a wait whose mark could not be recorded: never free

    /// Returns completed marks to the pool. Context current; mu held.
    void prune_marks_locked() noexcept {
        while (!consumer_marks.empty() && d.cuEventQuery(consumer_marks.front()) == CUDA_SUCCESS) {
            plain_events.push_back(consumer_marks.front());
            consumer_marks.pop_front();
        }
    }

    /// Frees the flags if no consumer stream can still wait on them; else leaks them (16
    /// KiB) rather than block on the caller's streams. Context current; no job in flight.
    void free_flags() noexcept {
        if (!flags) return;
        bool idle;
        {
            std::lock_guard<std::mutex> lock(mu);
            prune_marks_locked();
            idle = consumer_marks.empty() && !untracked_wait;
        }
        if (idle) d.cuMemFreeHost(flags);
        flags = nullptr;
        flags_dev = 0;
    }

    CUevent get_event(EventKind kind) {
        {
            std::lock_guard<std::mutex> lock(mu);
            auto& pool = events[static_cast<int>(kind)];
            if (!pool.empty()) {
                CUevent e = pool.back();
                pool.pop_back();
                return e;
            }
        }
        CUevent e = nullptr;
        ScopedContext scope(d, ctx);
        d.check(d.cuEventCreate(&e, event_flags(kind)), "cuEventCreate");
        return e;
    }
    void put_event(CUevent e, EventKind kind) noexcept {
        if (!e) return;
        std::lock_guard<std::mutex> lock(mu);
        events[static_cast<int>(kind)].push_back(e);
    }

    ~Shared() {
        try {
            ScopedContext scope(d, ctx);
            free_flags();
            for (const auto& pool : events)
                for (CUevent e : pool) d.cuEventDestroy(e);
            for (CUevent e : consumer_marks) d.cuEventDestroy(e);  // freed once complete
        } catch (...) {
        }
        if (ctx) d.cuDevicePrimaryCtxRelease(dev);
    }
};

namespace {

struct CudaSync final : JobSync {
    std::shared_ptr<CudaBackend::Shared> s;
    Direction dir = Direction::kOut;
    CUevent start = nullptr;
    CUevent end = nullptr;
    CUevent after_event = nullptr;     // ours, recorded on the caller's stream
    CUevent after_external = nullptr;  // the caller's event
    std::atomic<bool> end_recorded{false};
    long flag = -1;                    // index into Shared::flags, -1 for none
    std::uint32_t flag_value = 0;
    bool order_on_issue = false;       // before= is ordered by order_before() (event)

    ~CudaSync() override {
        s->put_event(start, EventKind::kStart);
        s->put_event(end, EventKind::kEnd);
        s->put_event(after_event, EventKind::kPlain);
    }
};

/// Sets the job's before= flag from the host (when the GPU will not) and frees the slot.
void release_flag(CudaSync& sync, bool host_write) noexcept {
    if (sync.flag < 0) return;
    if (host_write) __atomic_store_n(&sync.s->flags[sync.flag], sync.flag_value, __ATOMIC_SEQ_CST);
    sync.s->busy[sync.flag].store(false, std::memory_order_release);
    sync.flag = -1;
}

class CudaQueue final : public CopyQueue {
  public:
    CudaQueue(std::shared_ptr<CudaBackend::Shared> s, bool dedicated_thread) : s_(std::move(s)) {
        // A worker thread keeps the primary context current, and relaxed stream-capture
        // mode (CaptureModeGuard), for its whole life, so the ScopedContext of each call
        // below switches nothing. An inline queue runs on the caller's thread: its
        // ScopedContexts push and pop both around each call.
        if (dedicated_thread) {
            relax_capture_mode_for_thread(s_->d);
            s_->d.check(s_->d.cuCtxSetCurrent(s_->ctx), "cuCtxSetCurrent");
        }
        ScopedContext scope(s_->d, s_->ctx);
        s_->d.check(s_->d.cuStreamCreateWithPriority(&stream_, CU_STREAM_NON_BLOCKING,
                                                     s_->lowest_priority),
                    "cuStreamCreateWithPriority");
    }
    ~CudaQueue() override {
        try {
            ScopedContext scope(s_->d, s_->ctx);
            s_->d.cuStreamSynchronize(stream_);
            s_->d.cuStreamDestroy(stream_);
        } catch (...) {
        }
    }

    bool completes_on_issue() const override { return false; }

    void issue(const std::vector<CopyOp>& ops, JobSync& js,
               const std::vector<JobSync*>& deps) override {
        try {
            issue_copies(ops, js, deps);
        } catch (...) {
            // Copies enqueued before the failing call may still run: wait for them, so the
            // job is reported failed only once nothing of it can touch memory any more.
            ScopedContext scope(s_->d, s_->ctx);
            s_->d.cuStreamSynchronize(stream_);
            throw;
        }
    }

  private:
    void issue_copies(const std::vector<CopyOp>& ops, JobSync& js,
                      const std::vector<JobSync*>& deps) {
        const CudaDriver& d = s_->d;
        auto& sync = static_cast<CudaSync&>(js);
        ScopedContext scope(d, s_->ctx);
        for (JobSync* dep : deps) {
            auto* ds = static_cast<CudaSync*>(dep);
            if (ds->end_recorded.load(std::memory_order_acquire))
                d.check(d.cuStreamWaitEvent(stream_, ds->end, 0), "cuStreamWaitEvent(dependency)");
        }
        if (sync.after_event)
            d.check(d.cuStreamWaitEvent(stream_, sync.after_event, 0), "cuStreamWaitEvent(after)");
        if (sync.after_external)
            d.check(d.cuStreamWaitEvent(stream_, sync.after_external, 0),
                    "cuStreamWaitEvent(after)");
        d.check(d.cuEventRecord(sync.start, stream_), "cuEventRecord(start)");

        dsts_.clear();
        srcs_.clear();
        sizes_.clear();
        // A migration's ends are both device memory: said so in the 2D copies' memory
        // types and the batch's location hints. Swaps name unified addresses (the host
        // pool may be pinned or registered memory; the driver resolves either).
        const bool dtod = sync.dir == Direction::kMigrate;
        const int mem_type = dtod ? CU_MEMORYTYPE_DEVICE : CU_MEMORYTYPE_UNIFIED;
        for (const CopyOp& op : ops) {
            if (op.height == 1) {
                dsts_.push_back(op.dst);
                srcs_.push_back(op.src);
                sizes_.push_back(op.width);
                continue;
            }
            Memcpy2D m{};
            m.srcMemoryType = mem_type;
            m.srcDevice = op.src;
            m.srcPitch = op.src_pitch;
            m.dstMemoryType = mem_type;
            m.dstDevice = op.dst;
            m.dstPitch = op.dst_pitch;
            m.WidthInBytes = op.width;
            m.Height = op.height;
            d.check(d.cuMemcpy2DAsync(&m, stream_), "cuMemcpy2DAsync");
        }
        if (sizes_.size() >= 2 && d.cuMemcpyBatchAsync) {
            MemcpyAttributes attr{};
            attr.srcAccessOrder = CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
            attr.flags = CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE;  // swaps overlap compute
            const MemLocation dev{CU_MEM_LOCATION_TYPE_DEVICE, s_->ordinal};
            const MemLocation host{CU_MEM_LOCATION_TYPE_HOST, 0};
            attr.srcLocHint = sync.dir == Direction::kIn ? host : dev;
            attr.dstLocHint = sync.dir == Direction::kOut ? host : dev;
            std::size_t attr_idx = 0;
            std::size_t fail_idx = SIZE_MAX;
            const CUresult r = d.cuMemcpyBatchAsync(dsts_.data(), srcs_.data(), sizes_.data(),
                                                    sizes_.size(), &attr, &attr_idx, 1,
                                                    &fail_idx, stream_);
            if (r != CUDA_SUCCESS) {
                // failIdx: the copy that failed, or SIZE_MAX when the error is not one
                // copy's (cuda.h, cuMemcpyBatchAsync).
                const std::string where =
                    fail_idx < sizes_.size()
                        ? "cuMemcpyBatchAsync (copy " + std::to_string(fail_idx) + " of " +
                              std::to_string(sizes_.size()) + ": " +
                              std::to_string(sizes_[fail_idx]) + " bytes)"
                        : "cuMemcpyBatchAsync (" + std::to_string(sizes_.size()) + " copies)";
                d.check(r, where.c_str());
            }
        } else {
            for (std::size_t i = 0; i < sizes_.size(); ++i)
                d.check(d.cuMemcpyAsync(dsts_[i], srcs_[i], sizes_[i], stream_),
                        "cuMemcpyAsync");
        }
        // The flag goes before the end event: once finish() has seen the end, the GPU has
        // written the flag, so the slot can be reused (and the host never overwrites it).
        if (sync.flag >= 0)
            d.check(d.cuStreamWriteValue32(stream_, s_->flags_dev + 4 * sync.flag,
                                           sync.flag_value, CU_STREAM_WRITE_VALUE_DEFAULT),
                    "cuStreamWriteValue32(before)");
        d.check(d.cuEventRecord(sync.end, stream_), "cuEventRecord(end)");
        sync.end_recorded.store(true, std::memory_order_release);
    }

  public:
    bool ready(JobSync& js) override {
        auto& sync = static_cast<CudaSync&>(js);
        ScopedContext scope(s_->d, s_->ctx);
        // Anything but NOT_READY (success or an error) lets finish() report it.
        return s_->d.cuEventQuery(sync.end) != CUDA_ERROR_NOT_READY;
    }

    double finish(JobSync& js) override {
        const CudaDriver& d = s_->d;
        auto& sync = static_cast<CudaSync&>(js);
        ScopedContext scope(d, s_->ctx);
        d.check(d.cuEventSynchronize(sync.end), "cuEventSynchronize");
        release_flag(sync, false);
        float ms = 0.0f;
        d.check(d.cuEventElapsedTime(&ms, sync.start, sync.end), "cuEventElapsedTime");
        return static_cast<double>(ms) * 1e-3;
    }

  private:
    std::shared_ptr<CudaBackend::Shared> s_;
    CUstream stream_ = nullptr;
    std::vector<CUdeviceptr> dsts_, srcs_;
    std::vector<std::size_t> sizes_;
};

}  // namespace

std::string cuda_unavailable_reason(int ordinal) {
    const CudaDriver& d = CudaDriver::get();
    if (!d.available()) return d.reason();
    if (ordinal < 0 || ordinal >= d.device_count())
        return "no CUDA device " + std::to_string(ordinal) + " (the driver reports " +
               std::to_string(d.device_count()) + ")";
    return "";
}

namespace {

/// CUDA_DEVICE_MAX_CONNECTIONS=1 gives the context one hardware work queue: a stream wait
/// enqueued ahead of what it waits for then blocks that, too (the flag path's deadlock).
bool one_hardware_queue() {
    const char* v = std::getenv("CUDA_DEVICE_MAX_CONNECTIONS");
    return v && std::strtol(v, nullptr, 10) == 1;
}

/// Writes and waits on a flag once on a private stream: the memory operations resolved,
/// but the device or platform may still refuse them (CUDA_ERROR_NOT_SUPPORTED).
void probe_stream_mem_ops(const CudaDriver& d, CUdeviceptr flag) {
    CUstream probe = nullptr;
    d.check(d.cuStreamCreateWithPriority(&probe, CU_STREAM_NON_BLOCKING, 0),
            "cuStreamCreateWithPriority(probe)");
    CUresult r = d.cuStreamWriteValue32(probe, flag, 1, CU_STREAM_WRITE_VALUE_DEFAULT);
    if (r == CUDA_SUCCESS) r = d.cuStreamWaitValue32(probe, flag, 1, CU_STREAM_WAIT_VALUE_GEQ);
    const CUresult sync = d.cuStreamSynchronize(probe);
    d.cuStreamDestroy(probe);
    d.check(r, "stream memory operations (cuStreamWriteValue32/cuStreamWaitValue32)");
    d.check(sync, "cuStreamSynchronize(probe)");
}

}  // namespace

CudaBackend::CudaBackend(int ordinal, BeforeWait before_wait) : before_wait_(before_wait) {
    const std::string why = cuda_unavailable_reason(ordinal);
    if (!why.empty()) throw std::runtime_error("cuda backend unavailable: " + why);
    const CudaDriver& d = CudaDriver::get();
    if (before_wait == BeforeWait::kFlag) {
        if (!d.has_stream_mem_ops())
            throw std::invalid_argument(
                "before_wait='flag' needs CUDA stream memory operations "
                "(cuStreamWaitValue32_v2, driver >= 11.7); this driver (" +
                std::to_string(d.version()) + ") lacks them: use before_wait='event'");
        if (one_hardware_queue())
            throw std::invalid_argument(
                "before_wait='flag' can deadlock with CUDA_DEVICE_MAX_CONNECTIONS=1 (the "
                "consumer's flag wait would sit ahead of the copies it waits for in the one "
                "hardware queue): use before_wait='event'");
    }
    auto s = std::make_shared<Shared>(d, ordinal);
    d.check(d.cuDeviceGet(&s->dev, ordinal), "cuDeviceGet");
    d.check(d.cuDevicePrimaryCtxRetain(&s->ctx, s->dev), "cuDevicePrimaryCtxRetain");
    ScopedContext scope(d, s->ctx);
    int least = 0, greatest = 0;
    d.check(d.cuCtxGetStreamPriorityRange(&least, &greatest), "cuCtxGetStreamPriorityRange");
    s->lowest_priority = least;  // numerically largest = lowest priority (also the default)
    if (before_wait == BeforeWait::kFlag) {
        void* p = nullptr;
        d.check(d.cuMemHostAlloc(&p, kNumFlags * sizeof(std::uint32_t),
                                 kHostAllocPortable | kHostAllocDeviceMap),
                "cuMemHostAlloc(flags)");
        s->flags = static_cast<std::uint32_t*>(p);
        for (std::size_t i = 0; i < kNumFlags; ++i) s->flags[i] = 0;
        d.check(d.cuMemHostGetDevicePointer(&s->flags_dev, p, 0), "cuMemHostGetDevicePointer");
        try {
            probe_stream_mem_ops(d, s->flags_dev);
        } catch (const CudaError& e) {
            throw std::invalid_argument(std::string("before_wait='flag' is unavailable on "
                                                    "this device: ") +
                                        e.what() + "; use before_wait='event'");
        }
        s->flags[0] = 0;
    }
    shared_ = std::move(s);
}

CudaBackend::~CudaBackend() { close(); }

std::string CudaBackend::copy_api() const {
    return shared_->d.cuMemcpyBatchAsync ? "cuMemcpyBatchAsync" : "cuMemcpyAsync";
}

void CudaBackend::validate(Direction, StreamRef after, StreamRef before) const {
    if (before.kind == StreamRef::Kind::kEvent)
        throw std::invalid_argument("before= must be a stream (the consumer), not an event");
    if (after.kind == StreamRef::Kind::kEvent && after.handle == 0)
        throw std::invalid_argument(
            "after= is an event that was never recorded (handle 0): a torch.cuda.Event gets "
            "its CUDA event at its first record(); record it before passing it");
    const CudaDriver& d = shared_->d;
    if (!d.cuStreamIsCapturing) return;
    // A stream capturing a CUDA graph records our event and waits into the graph instead
    // of ordering the copies now. A failing query is left to prepare(), which reports the
    // driver error on the job's handle.
    ScopedContext scope(d, shared_->ctx);
    for (const auto& [ref, what] : {std::pair{after, "after="}, std::pair{before, "before="}}) {
        if (ref.kind != StreamRef::Kind::kStream) continue;
        int status = CU_STREAM_CAPTURE_STATUS_NONE;
        if (d.cuStreamIsCapturing(reinterpret_cast<CUstream>(ref.handle), &status) ==
                CUDA_SUCCESS &&
            status != CU_STREAM_CAPTURE_STATUS_NONE)
            throw std::invalid_argument(
                std::string(what) + " stream is capturing a CUDA graph: swaps cannot be "
                "ordered against a capture; pass a stream outside the capture");
    }
}

std::unique_ptr<JobSync> CudaBackend::prepare(Direction dir, StreamRef after, StreamRef before) {
    Shared& s = *shared_;
    const CudaDriver& d = s.d;
    auto sync = std::make_unique<CudaSync>();
    sync->s = shared_;
    sync->dir = dir;
    sync->start = s.get_event(EventKind::kStart);
    sync->end = s.get_event(EventKind::kEnd);
    ScopedContext scope(d, s.ctx);
    if (after.kind == StreamRef::Kind::kStream) {
        sync->after_event = s.get_event(EventKind::kPlain);
        d.check(d.cuEventRecord(sync->after_event, reinterpret_cast<CUstream>(after.handle)),
                "cuEventRecord(after stream)");
    } else if (after.kind == StreamRef::Kind::kEvent) {
        sync->after_external = reinterpret_cast<CUevent>(after.handle);
    }
    if (before.kind == StreamRef::Kind::kStream && before_wait_ == BeforeWait::kEvent)
        sync->order_on_issue = true;
    if (before.kind == StreamRef::Kind::kStream && before_wait_ == BeforeWait::kFlag) {
        // A free slot, without blocking: prepare() runs in submission order, and the slot
        // of a job in flight is freed by a worker only once its copies completed.
        std::size_t idx = kNumFlags;
        std::uint32_t value = 0;
        {
            std::lock_guard<std::mutex> lock(s.mu);
            for (std::size_t k = 0; k < kNumFlags; ++k) {
                const std::size_t i = (s.next_flag + k) % kNumFlags;
                if (!s.busy[i].load(std::memory_order_acquire)) {
                    idx = i;
                    break;
                }
            }
            if (idx < kNumFlags) {
                s.next_flag = (idx + 1) % kNumFlags;
                s.busy[idx].store(true, std::memory_order_relaxed);
                value = ++s.next_value;
            }
        }
        if (idx == kNumFlags) {
            // Every slot is in flight: order this job as in event mode rather than fail it
            // (a consumer that does not wait on the handle would read stale blocks).
            sync->order_on_issue = true;
            return sync;
        }
        sync->flag = static_cast<long>(idx);
        sync->flag_value = value;
        const auto consumer = reinterpret_cast<CUstream>(before.handle);
        const CUresult r =
            d.cuStreamWaitValue32(consumer, s.flags_dev + 4 * idx, value, CU_STREAM_WAIT_VALUE_GEQ);
        if (r != CUDA_SUCCESS) {
            release_flag(*sync, true);
            d.check(r, "cuStreamWaitValue32(before stream)");
        }
        // Marks where the consumer passed its wait, so close() frees the flags only then.
        CUevent mark = nullptr;
        try {
            mark = s.get_event(EventKind::kPlain);
        } catch (const CudaError&) {
        }
        const bool marked = mark && d.cuEventRecord(mark, consumer) == CUDA_SUCCESS;
        std::lock_guard<std::mutex> lock(s.mu);
        if (marked) {
            s.consumer_marks.push_back(mark);
            s.prune_marks_locked();
        } else {
            s.untracked_wait = true;
            if (mark) s.plain_events.push_back(mark);
        }
    }
    return sync;
}

bool CudaBackend::defers_before(const JobSync& js) const {
    return static_cast<const CudaSync&>(js).order_on_issue;
}

bool CudaBackend::order_before(JobSync& js, StreamRef before) noexcept {
    auto& sync = static_cast<CudaSync&>(js);
    if (before.kind != StreamRef::Kind::kStream) return true;
    if (!sync.end_recorded.load(std::memory_order_acquire)) return false;
    const CudaDriver& d = shared_->d;
    try {
        ScopedContext scope(d, shared_->ctx);
        return d.cuStreamWaitEvent(reinterpret_cast<CUstream>(before.handle), sync.end, 0) ==
               CUDA_SUCCESS;
    } catch (...) {
        return false;
    }
}

namespace {

// Host ranges kvswitch page-locked, process-wide: two engines over one host pool share the
// registration, and the last one to close undoes it (one engine's close() must not turn
// another's in-flight copies pageable).
struct Registration {
    std::size_t nbytes = 0;
    int engines = 0;
};
std::mutex& registry_mu() {
    static std::mutex mu;
    return mu;
}
std::map<std::uintptr_t, Registration>& registry() {
    static auto* r = new std::map<std::uintptr_t, Registration>;  // never destroyed: exit order
    return *r;
}

}  // namespace

namespace {

/// Ranges merged where they share a page (sorted by address): page-locking works on whole
/// pages, and two registrations may not overlap.
std::vector<std::pair<std::uintptr_t, std::size_t>> merge_by_page(
    std::vector<std::pair<std::uintptr_t, std::size_t>> rs) {
    std::sort(rs.begin(), rs.end());
    const long page_size = sysconf(_SC_PAGESIZE);  // 64 KiB on some Arm hosts (GH200)
    const std::uintptr_t page = page_size > 0 ? static_cast<std::uintptr_t>(page_size) : 4096;
    std::vector<std::pair<std::uintptr_t, std::size_t>> out;
    for (const auto& [addr, n] : rs) {
        if (!out.empty()) {
            auto& [b, m] = out.back();
            if (addr / page <= (b + m - 1) / page) {
                m = std::max(b + m, addr + n) - b;
                continue;
            }
        }
        out.emplace_back(addr, n);
    }
    return out;
}

/// The registration (key of registry()) that covers [addr, addr + n), or 0. registry_mu held.
std::uintptr_t covering_registration(std::uintptr_t addr, std::size_t n) {
    auto it = registry().upper_bound(addr);
    if (it == registry().begin()) return 0;
    --it;
    return addr + n <= it->first + it->second.nbytes ? it->first : 0;
}

}  // namespace

HostMemory CudaBackend::attach_host(
    const std::vector<std::pair<std::uintptr_t, std::size_t>>& byte_ranges,
    bool may_register) noexcept {
    const CudaDriver& d = shared_->d;
    HostMemory out;
    out.kind = "pinned";
    try {
        ScopedContext scope(d, shared_->ctx);
        std::lock_guard<std::mutex> lock(registry_mu());
        // Each region is judged on its own: two regions may share a page (and so one
        // merged range) while only one of them lies in page-locked memory.
        auto page_locked = [&](std::uintptr_t a) {
            unsigned type = 0;  // pinned and registered memory report CU_MEMORYTYPE_HOST;
            return d.cuPointerGetAttribute &&  // the driver does not know pageable memory
                   d.cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                                           static_cast<CUdeviceptr>(a)) == CUDA_SUCCESS &&
                   type == CU_MEMORYTYPE_HOST;
        };
        std::vector<std::uintptr_t> shared;  // registrations of other engines that cover some
        std::vector<std::pair<std::uintptr_t, std::size_t>> pageable;
        for (const auto& [addr, nbytes] : byte_ranges) {
            if (!nbytes) continue;
            if (const std::uintptr_t key = covering_registration(addr, nbytes)) {
                if (std::find(shared.begin(), shared.end(), key) == shared.end())
                    shared.push_back(key);
            } else if (!page_locked(addr) || !page_locked(addr + nbytes - 1)) {
                pageable.emplace_back(addr, nbytes);
            }
        }
        for (std::uintptr_t key : shared) {
            ++registry()[key].engines;  // registered by another engine: share it
            registered_.push_back(key);
            out.kind = "registered";
        }
        if (!pageable.empty() && (!may_register || !d.cuMemHostRegister)) {
            out.kind = "pageable";
            out.detail = may_register ? "this driver lacks cuMemHostRegister"
                                      : "not page-locked (register_host=False)";
        }
        if (out.kind == "pageable") pageable.clear();
        for (const auto& [addr, nbytes] : merge_by_page(std::move(pageable))) {
            const CUresult r =
                d.cuMemHostRegister(reinterpret_cast<void*>(addr), nbytes, kHostRegisterPortable);
            if (r != CUDA_SUCCESS) {
                // ALREADY_REGISTERED here: part of the range (a page shared with a region
                // pinned by someone else) is page-locked already -- only partly page-locked.
                out.kind = "pageable";
                out.detail = "cuMemHostRegister of " + std::to_string(nbytes) +
                             " bytes failed: " + d.error_string(r);
                break;
            }
            registry()[addr] = Registration{nbytes, 1};
            registered_.push_back(addr);
            out.kind = "registered";
        }
    } catch (const std::exception& e) {
        out.kind = "pageable";
        out.detail = e.what();
    }
    if (out.kind == "pageable") {
        unregister_host();
    } else if (out.kind == "registered") {
        out.detail = "page-locked by kvswitch with cuMemHostRegister (" +
                     std::to_string(registered_.size()) + " range(s)) until close()";
    } else {
        out.detail = "page-locked memory (cuMemHostAlloc or registered by its owner)";
    }
    return out;
}

void CudaBackend::unregister_host() noexcept {
    if (registered_.empty()) return;
    const CudaDriver& d = shared_->d;
    try {
        ScopedContext scope(d, shared_->ctx);
        std::lock_guard<std::mutex> lock(registry_mu());
        for (std::uintptr_t addr : registered_) {
            auto it = registry().find(addr);
            if (it == registry().end() || --it->second.engines > 0) continue;
            d.cuMemHostUnregister(reinterpret_cast<void*>(addr));
            registry().erase(it);
        }
    } catch (...) {
    }
    registered_.clear();
}

void CudaBackend::close() noexcept {
    unregister_host();
    // No job can use the flags after the engine closed; a consumer stream may still wait
    // on one (free_flags() leaks them then).
    try {
        ScopedContext scope(shared_->d, shared_->ctx);
        shared_->free_flags();
    } catch (...) {
    }
}

std::unique_ptr<CopyQueue> CudaBackend::open_queue(bool dedicated_thread) {
    return std::make_unique<CudaQueue>(shared_, dedicated_thread);
}

void CudaBackend::abandon(JobSync& sync) noexcept { release_flag(static_cast<CudaSync&>(sync), true); }

int cuda_pointer_device(std::uintptr_t ptr) {
    const CudaDriver& d = CudaDriver::get();
    if (!d.available()) throw std::runtime_error("no CUDA driver: " + d.reason());
    int ordinal = -1;
    d.check(d.cuPointerGetAttribute(&ordinal, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                                    static_cast<CUdeviceptr>(ptr)),
            "cuPointerGetAttribute(DEVICE_ORDINAL)");
    return ordinal;
}

double cuda_timed_memcpy(int ordinal, std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes) {
    const std::string why = cuda_unavailable_reason(ordinal);
    if (!why.empty()) throw std::runtime_error("cuda unavailable: " + why);
    const CudaDriver& d = CudaDriver::get();
    CUdevice dev = 0;
    CUcontext ctx = nullptr;
    d.check(d.cuDeviceGet(&dev, ordinal), "cuDeviceGet");
    d.check(d.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    double seconds = 0.0;
    try {
        ScopedContext scope(d, ctx);
        const auto t0 = std::chrono::steady_clock::now();
        d.check(d.cuMemcpy(dst, src, nbytes), "cuMemcpy");
        seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    } catch (...) {
        d.cuDevicePrimaryCtxRelease(dev);
        throw;
    }
    d.cuDevicePrimaryCtxRelease(dev);
    return seconds;
}

}  // namespace kvswitch
