// Timing of raw copy lists through the CUDA driver API; see cuda_bench.hpp.
#include "kvswitch/cuda_bench.hpp"

#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>

#include "kvswitch/cuda_backend.hpp"
#include "kvswitch/cuda_driver.hpp"

namespace kvswitch {

using namespace kvswitch::cu;

std::size_t BenchCopyList::bytes() const {
    std::size_t n = 0;
    for (std::size_t s : size) n += s;
    return n;
}

void BenchCopyList::validate(const char* what) const {
    if (size.empty()) throw std::invalid_argument(std::string(what) + ": no copies");
    if (dst.size() != size.size() || src.size() != size.size())
        throw std::invalid_argument(std::string(what) + ": dst, src and sizes differ in length (" +
                                    std::to_string(dst.size()) + ", " +
                                    std::to_string(src.size()) + ", " +
                                    std::to_string(size.size()) + ")");
    for (std::size_t i = 0; i < size.size(); ++i)
        if (size[i] == 0)
            throw std::invalid_argument(std::string(what) + ": copy " + std::to_string(i) +
                                        " has size 0");
}

namespace {

void check_counts(int warmup, int repeats) {
    if (warmup < 0) throw std::invalid_argument("warmup must be >= 0, got " + std::to_string(warmup));
    if (repeats < 1)
        throw std::invalid_argument("repeats must be >= 1, got " + std::to_string(repeats));
}

/// The primary context of one device plus the streams and events of one call; everything
/// is released (after the streams drain) when the session ends, also on errors.
class Session {
  public:
    explicit Session(int ordinal) : d(CudaDriver::get()), ordinal_(ordinal) {
        const std::string why = cuda_unavailable_reason(ordinal);
        if (!why.empty()) throw std::runtime_error("cuda unavailable: " + why);
        d.check(d.cuDeviceGet(&dev, ordinal), "cuDeviceGet");
        d.check(d.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    }
    ~Session() {
        try {
            ScopedContext scope(d, ctx);
            for (CUstream s : streams_) {
                d.cuStreamSynchronize(s);
                d.cuStreamDestroy(s);
            }
            for (CUevent e : events_) d.cuEventDestroy(e);
        } catch (...) {
        }
        d.cuDevicePrimaryCtxRelease(dev);
    }
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;

    void require(BenchApi api) const {
        if (api == BenchApi::kBatch && !d.cuMemcpyBatchAsync)
            throw std::runtime_error(
                "cuMemcpyBatchAsync is unavailable: CUDA driver " +
                std::to_string(d.version()) + " lacks it (it needs 12080, CUDA 12.8)");
    }
    /// Call with the context current.
    CUstream new_stream() {
        CUstream s = nullptr;
        d.check(d.cuStreamCreateWithPriority(&s, CU_STREAM_NON_BLOCKING, 0),
                "cuStreamCreateWithPriority");
        streams_.push_back(s);
        return s;
    }
    CUevent new_event() {
        CUevent e = nullptr;
        d.check(d.cuEventCreate(&e, CU_EVENT_DEFAULT), "cuEventCreate");
        events_.push_back(e);
        return e;
    }
    double elapsed(CUevent a, CUevent b) const {
        float ms = 0.0f;
        d.check(d.cuEventElapsedTime(&ms, a, b), "cuEventElapsedTime");
        return static_cast<double>(ms) * 1e-3;
    }
    int ordinal() const { return ordinal_; }

    const CudaDriver& d;
    CUdevice dev = 0;
    CUcontext ctx = nullptr;

  private:
    int ordinal_;
    std::vector<CUstream> streams_;
    std::vector<CUevent> events_;
};

/// Enqueues one list on a stream; returns the submit time (steady clock, seconds).
class Enqueuer {
  public:
    Enqueuer(const Session& s, const BenchCopyList& list, BenchApi api)
        : d_(s.d), api_(api), dst_(list.dst.begin(), list.dst.end()),
          src_(list.src.begin(), list.src.end()), size_(list.size) {
        attr_.srcAccessOrder = CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
        const MemLocation dev{CU_MEM_LOCATION_TYPE_DEVICE, s.ordinal()};
        const MemLocation host{CU_MEM_LOCATION_TYPE_HOST, 0};
        attr_.srcLocHint = list.dir == Direction::kOut ? dev : host;
        attr_.dstLocHint = list.dir == Direction::kOut ? host : dev;
        attr_.flags = 0;
    }

    double enqueue(CUstream stream) {
        const auto t0 = std::chrono::steady_clock::now();
        if (api_ == BenchApi::kBatch) {
            std::size_t attr_idx = 0;
            std::size_t fail_idx = 0;
            const CUresult r =
                d_.cuMemcpyBatchAsync(dst_.data(), src_.data(), size_.data(), size_.size(),
                                      &attr_, &attr_idx, 1, &fail_idx, stream);
            if (r != CUDA_SUCCESS)
                throw CudaError("cuMemcpyBatchAsync (" + std::to_string(size_.size()) +
                                    " copies, failIdx " + std::to_string(fail_idx) +
                                    "): " + d_.error_string(r),
                                r);
        } else {
            for (std::size_t i = 0; i < size_.size(); ++i) {
                const CUresult r = d_.cuMemcpyAsync(dst_[i], src_[i], size_[i], stream);
                if (r != CUDA_SUCCESS)
                    throw CudaError("cuMemcpyAsync (copy " + std::to_string(i) + " of " +
                                        std::to_string(size_.size()) +
                                        "): " + d_.error_string(r),
                                    r);
            }
        }
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }

  private:
    const CudaDriver& d_;
    BenchApi api_;
    std::vector<CUdeviceptr> dst_, src_;  // mutable copies: the batch API takes non-const
    std::vector<std::size_t> size_;
    MemcpyAttributes attr_{};
};

const char* api_name(BenchApi api) {
    return api == BenchApi::kBatch ? "cuMemcpyBatchAsync" : "cuMemcpyAsync";
}

/// A thread with the context current that runs one job per go() and reports its error.
class Helper {
  public:
    explicit Helper(const Session& s) : thread_([this, &s] { loop(s); }) {}
    ~Helper() {
        {
            std::lock_guard<std::mutex> lock(mu_);
            stop_ = true;
        }
        cv_.notify_all();
        thread_.join();
    }
    Helper(const Helper&) = delete;
    Helper& operator=(const Helper&) = delete;

    void go(std::function<void()> job) {
        {
            std::lock_guard<std::mutex> lock(mu_);
            job_ = std::move(job);
            ++started_;
        }
        cv_.notify_all();
    }
    /// Waits for the job of the last go(); rethrows its exception.
    void join() {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return finished_ == started_; });
        if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
    }

  private:
    void loop(const Session& s) {
        const bool ctx_ok = s.d.cuCtxSetCurrent(s.ctx) == CUDA_SUCCESS;
        std::unique_lock<std::mutex> lock(mu_);
        for (;;) {
            cv_.wait(lock, [this] { return stop_ || finished_ != started_; });
            if (finished_ == started_) return;  // stop_ with nothing left to run
            auto job = std::move(job_);
            lock.unlock();
            std::exception_ptr err;
            try {
                if (!ctx_ok) throw std::runtime_error("cuCtxSetCurrent failed on the helper thread");
                job();
            } catch (...) {
                err = std::current_exception();
            }
            lock.lock();
            error_ = err;
            ++finished_;
            cv_.notify_all();
        }
    }

    std::mutex mu_;
    std::condition_variable cv_;
    std::function<void()> job_;
    std::exception_ptr error_;
    long started_ = 0, finished_ = 0;
    bool stop_ = false;
    std::thread thread_;  // last: starts after the members above exist
};

}  // namespace

BenchTimes cuda_copy_bench(int ordinal, const BenchCopyList& list, BenchApi api, int warmup,
                           int repeats) {
    list.validate("copy list");
    check_counts(warmup, repeats);
    Session s(ordinal);
    s.require(api);
    const CudaDriver& d = s.d;
    ScopedContext scope(d, s.ctx);
    CUstream stream = s.new_stream();
    CUevent start = s.new_event(), end = s.new_event();
    Enqueuer q(s, list, api);
    BenchTimes t;
    t.copies = list.size.size();
    t.bytes = list.bytes();
    t.api = api_name(api);
    for (int i = 0; i < warmup + repeats; ++i) {
        d.check(d.cuEventRecord(start, stream), "cuEventRecord(start)");
        const double submit = q.enqueue(stream);
        d.check(d.cuEventRecord(end, stream), "cuEventRecord(end)");
        d.check(d.cuEventSynchronize(end), "cuEventSynchronize(end)");
        if (i < warmup) continue;
        t.gpu_s.push_back(s.elapsed(start, end));
        t.submit_s.push_back(submit);
    }
    return t;
}

BenchConcurrentTimes cuda_copy_bench_concurrent(int ordinal, const BenchCopyList& a,
                                                const BenchCopyList& b, BenchApi api,
                                                int warmup, int repeats) {
    a.validate("copy list a");
    b.validate("copy list b");
    check_counts(warmup, repeats);
    Session s(ordinal);
    s.require(api);
    const CudaDriver& d = s.d;
    ScopedContext scope(d, s.ctx);
    CUstream sa = s.new_stream(), sb = s.new_stream();
    CUevent start = s.new_event(), end_a = s.new_event(), end_b = s.new_event();
    Enqueuer qa(s, a, api), qb(s, b, api);
    BenchConcurrentTimes t;
    t.bytes_a = a.bytes();
    t.bytes_b = b.bytes();
    t.api = api_name(api);
    Helper helper(s);  // destroyed (joined) before the session drains its streams
    for (int i = 0; i < warmup + repeats; ++i) {
        d.check(d.cuEventRecord(start, sa), "cuEventRecord(start)");
        d.check(d.cuStreamWaitEvent(sb, start, 0), "cuStreamWaitEvent(start)");
        double submit_b = 0.0;
        helper.go([&] {
            submit_b = qb.enqueue(sb);
            d.check(d.cuEventRecord(end_b, sb), "cuEventRecord(end b)");
        });
        double submit_a = 0.0;
        std::exception_ptr err;
        try {
            submit_a = qa.enqueue(sa);
            d.check(d.cuEventRecord(end_a, sa), "cuEventRecord(end a)");
        } catch (...) {
            err = std::current_exception();
        }
        helper.join();  // rethrows b's error; a's after it is known that b is done
        if (err) std::rethrow_exception(err);
        d.check(d.cuEventSynchronize(end_a), "cuEventSynchronize(end a)");
        d.check(d.cuEventSynchronize(end_b), "cuEventSynchronize(end b)");
        if (i < warmup) continue;
        const double ta = s.elapsed(start, end_a), tb = s.elapsed(start, end_b);
        t.a_s.push_back(ta);
        t.b_s.push_back(tb);
        t.wall_s.push_back(ta > tb ? ta : tb);
        t.submit_a_s.push_back(submit_a);
        t.submit_b_s.push_back(submit_b);
    }
    return t;
}

std::map<std::string, long long> cuda_device_attributes(int ordinal) {
    Session s(ordinal);
    const CudaDriver& d = s.d;
    // CUdevice_attribute values of cuda.h (stable ABI; checked against CUDA 13.0's header).
    static const std::pair<const char*, int> kAttrs[] = {
        {"compute_capability_major", 75}, {"compute_capability_minor", 76},
        {"multiprocessor_count", 16},     {"pci_domain_id", 50},
        {"pci_bus_id", 33},               {"pci_device_id", 34},
        {"async_engine_count", 40},       {"unified_addressing", 41},
        {"can_map_host_memory", 19},      {"stream_priorities_supported", 78},
        {"pageable_memory_access", 88},   {"can_use_stream_mem_ops_v1", 92},
        {"host_register_supported", 99},  {"can_use_64_bit_stream_mem_ops", 122},
        {"max_pitch", 11},                {"numa_config", 130},
        {"numa_id", 131},                 {"host_numa_id", 134},
    };
    std::map<std::string, long long> out;
    for (const auto& [name, attr] : kAttrs) {
        int v = 0;
        if (d.cuDeviceGetAttribute && d.cuDeviceGetAttribute(&v, attr, s.dev) == CUDA_SUCCESS)
            out[name] = v;
    }
    ScopedContext scope(d, s.ctx);
    int least = 0, greatest = 0;
    if (d.cuCtxGetStreamPriorityRange(&least, &greatest) == CUDA_SUCCESS) {
        out["stream_priority_least"] = least;
        out["stream_priority_greatest"] = greatest;
    }
    out["driver_version"] = d.version();
    out["batch_copy"] = d.has_batch_copy() ? 1 : 0;
    out["ordinal"] = ordinal;
    return out;
}

}  // namespace kvswitch
