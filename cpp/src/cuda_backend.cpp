#include "kvswitch/cuda_backend.hpp"

#include <atomic>
#include <chrono>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "kvswitch/cuda_driver.hpp"

namespace kvswitch {

using namespace kvswitch::cu;

namespace {
constexpr std::size_t kNumFlags = 4096;  // before= wait flags (one per in-flight job)
}

struct CudaBackend::Shared {
    const CudaDriver& d;
    CUdevice dev = 0;
    int ordinal = 0;
    CUcontext ctx = nullptr;
    int lowest_priority = 0;
    bool memops = false;

    std::mutex mu;
    std::vector<CUevent> timed_events;
    std::vector<CUevent> plain_events;

    // before= flags: device-mapped pinned words, each only ever increases.
    std::uint32_t* flags = nullptr;
    CUdeviceptr flags_dev = 0;
    std::atomic<bool> busy[kNumFlags] = {};
    std::uint32_t next_value = 0;  // guarded by mu
    std::size_t next_flag = 0;     // guarded by mu

    Shared(const CudaDriver& drv, int ord) : d(drv), ordinal(ord) {}

    CUevent get_event(bool timed) {
        {
            std::lock_guard<std::mutex> lock(mu);
            auto& pool = timed ? timed_events : plain_events;
            if (!pool.empty()) {
                CUevent e = pool.back();
                pool.pop_back();
                return e;
            }
        }
        CUevent e = nullptr;
        ScopedContext scope(d, ctx);
        d.check(d.cuEventCreate(&e, timed ? CU_EVENT_DEFAULT : CU_EVENT_DISABLE_TIMING),
                "cuEventCreate");
        return e;
    }
    void put_event(CUevent e, bool timed) noexcept {
        if (!e) return;
        std::lock_guard<std::mutex> lock(mu);
        (timed ? timed_events : plain_events).push_back(e);
    }

    ~Shared() {
        try {
            ScopedContext scope(d, ctx);
            for (CUevent e : timed_events) d.cuEventDestroy(e);
            for (CUevent e : plain_events) d.cuEventDestroy(e);
            if (flags) d.cuMemFreeHost(flags);
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

    ~CudaSync() override {
        s->put_event(start, true);
        s->put_event(end, true);
        s->put_event(after_event, false);
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
        // A worker thread keeps the primary context current for its whole life, so the
        // ScopedContext of each call below finds it current and switches nothing.
        if (dedicated_thread) s_->d.check(s_->d.cuCtxSetCurrent(s_->ctx), "cuCtxSetCurrent");
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
        for (const CopyOp& op : ops) {
            if (op.height == 1) {
                dsts_.push_back(op.dst);
                srcs_.push_back(op.src);
                sizes_.push_back(op.width);
                continue;
            }
            Memcpy2D m{};
            m.srcMemoryType = CU_MEMORYTYPE_UNIFIED;
            m.srcDevice = op.src;
            m.srcPitch = op.src_pitch;
            m.dstMemoryType = CU_MEMORYTYPE_UNIFIED;
            m.dstDevice = op.dst;
            m.dstPitch = op.dst_pitch;
            m.WidthInBytes = op.width;
            m.Height = op.height;
            d.check(d.cuMemcpy2DAsync(&m, stream_), "cuMemcpy2DAsync");
        }
        if (sizes_.size() >= 2 && d.cuMemcpyBatchAsync) {
            MemcpyAttributes attr{};
            attr.srcAccessOrder = CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
            const MemLocation dev{CU_MEM_LOCATION_TYPE_DEVICE, s_->ordinal};
            const MemLocation host{CU_MEM_LOCATION_TYPE_HOST, 0};
            attr.srcLocHint = sync.dir == Direction::kOut ? dev : host;
            attr.dstLocHint = sync.dir == Direction::kOut ? host : dev;
            std::size_t attr_idx = 0;
            std::size_t fail_idx = 0;
            d.check(d.cuMemcpyBatchAsync(dsts_.data(), srcs_.data(), sizes_.data(),
                                         sizes_.size(), &attr, &attr_idx, 1, &fail_idx,
                                         stream_),
                    "cuMemcpyBatchAsync");
        } else {
            for (std::size_t i = 0; i < sizes_.size(); ++i)
                d.check(d.cuMemcpyAsync(dsts_[i], srcs_[i], sizes_[i], stream_),
                        "cuMemcpyAsync");
        }
        d.check(d.cuEventRecord(sync.end, stream_), "cuEventRecord(end)");
        sync.end_recorded.store(true, std::memory_order_release);
        if (sync.flag >= 0)
            d.check(d.cuStreamWriteValue32(stream_, s_->flags_dev + 4 * sync.flag,
                                           sync.flag_value, CU_STREAM_WRITE_VALUE_DEFAULT),
                    "cuStreamWriteValue32(before)");
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

    void synchronize() override {
        ScopedContext scope(s_->d, s_->ctx);
        s_->d.check(s_->d.cuStreamSynchronize(stream_), "cuStreamSynchronize");
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

CudaBackend::CudaBackend(int ordinal) {
    const std::string why = cuda_unavailable_reason(ordinal);
    if (!why.empty()) throw std::runtime_error("cuda backend unavailable: " + why);
    const CudaDriver& d = CudaDriver::get();
    auto s = std::make_shared<Shared>(d, ordinal);
    d.check(d.cuDeviceGet(&s->dev, ordinal), "cuDeviceGet");
    d.check(d.cuDevicePrimaryCtxRetain(&s->ctx, s->dev), "cuDevicePrimaryCtxRetain");
    ScopedContext scope(d, s->ctx);
    int least = 0, greatest = 0;
    d.check(d.cuCtxGetStreamPriorityRange(&least, &greatest), "cuCtxGetStreamPriorityRange");
    s->lowest_priority = least;  // numerically largest = lowest priority
    int memops = 0;
    if (d.cuStreamWaitValue32 && d.cuStreamWriteValue32 && d.cuDeviceGetAttribute &&
        d.cuDeviceGetAttribute(&memops, CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1,
                               s->dev) == CUDA_SUCCESS)
        s->memops = memops != 0;
    if (s->memops) {
        void* p = nullptr;
        d.check(d.cuMemHostAlloc(&p, kNumFlags * sizeof(std::uint32_t),
                                 kHostAllocPortable | kHostAllocDeviceMap),
                "cuMemHostAlloc(flags)");
        s->flags = static_cast<std::uint32_t*>(p);
        for (std::size_t i = 0; i < kNumFlags; ++i) s->flags[i] = 0;
        d.check(d.cuMemHostGetDevicePointer(&s->flags_dev, p, 0), "cuMemHostGetDevicePointer");
    }
    shared_ = std::move(s);
}

CudaBackend::~CudaBackend() = default;

std::string CudaBackend::copy_api() const {
    return shared_->d.cuMemcpyBatchAsync ? "cuMemcpyBatchAsync" : "cuMemcpyAsync";
}

bool CudaBackend::supports_before() const { return shared_->memops; }

void CudaBackend::validate(Direction, StreamRef, StreamRef before) const {
    if (before.kind == StreamRef::Kind::kEvent)
        throw std::invalid_argument("before= must be a stream (the consumer), not an event");
    if (before.kind == StreamRef::Kind::kStream && !shared_->memops)
        throw std::invalid_argument(
            "before= needs CUDA stream memory operations, which this driver/device lacks; "
            "wait on the handle instead");
}

std::unique_ptr<JobSync> CudaBackend::prepare(Direction dir, StreamRef after, StreamRef before) {
    Shared& s = *shared_;
    const CudaDriver& d = s.d;
    auto sync = std::make_unique<CudaSync>();
    sync->s = shared_;
    sync->dir = dir;
    sync->start = s.get_event(true);
    sync->end = s.get_event(true);
    ScopedContext scope(d, s.ctx);
    if (after.kind == StreamRef::Kind::kStream) {
        sync->after_event = s.get_event(false);
        d.check(d.cuEventRecord(sync->after_event, reinterpret_cast<CUstream>(after.handle)),
                "cuEventRecord(after stream)");
    } else if (after.kind == StreamRef::Kind::kEvent) {
        sync->after_external = reinterpret_cast<CUevent>(after.handle);
    }
    if (before.kind == StreamRef::Kind::kStream) {
        std::size_t idx;
        std::uint32_t value;
        for (;;) {
            {
                std::lock_guard<std::mutex> lock(s.mu);
                idx = s.next_flag;
                if (!s.busy[idx].load(std::memory_order_acquire)) {
                    s.next_flag = (s.next_flag + 1) % kNumFlags;
                    s.busy[idx].store(true, std::memory_order_relaxed);
                    value = ++s.next_value;
                    break;
                }
            }
            std::this_thread::yield();  // the job that used this flag 4096 jobs ago runs
        }
        sync->flag = static_cast<long>(idx);
        sync->flag_value = value;
        const CUresult r = d.cuStreamWaitValue32(reinterpret_cast<CUstream>(before.handle),
                                                 s.flags_dev + 4 * idx, value,
                                                 CU_STREAM_WAIT_VALUE_GEQ);
        if (r != CUDA_SUCCESS) {
            release_flag(*sync, true);
            d.check(r, "cuStreamWaitValue32(before stream)");
        }
    }
    return sync;
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
