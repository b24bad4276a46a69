// Stress test of AsyncSwapEngine without Python: several submitter threads, random jobs
// (swap-outs, swap-ins and device-to-device migrations) with overlapping extents, wait_blocks, poll and close racing with workers. Phase 1 (host
// backend) and phase 3 (a deferred backend whose copies complete after issue(), as on
// CUDA) check the final bytes against a sequential replay per submitter (each submitter
// owns its blocks). Phase 2 arms failures while threads submit jobs over shared
// blocks: every job must end, and every failed job must name a root job that failed by
// itself, no later than it. Meant to run under sanitizers (CI: .ci/sanitizers.sh), e.g.
//   cmake -S . -B build/tsan -DKVSWITCH_PYTHON=OFF -DKVSWITCH_CPP_TESTS=ON \
//         -DKVSWITCH_SANITIZE=thread -DCMAKE_BUILD_TYPE=RelWithDebInfo
//   cmake --build build/tsan && ctest --test-dir build/tsan --output-on-failure
// or KVSWITCH_SANITIZE=address,undefined (not thread with address). Sanitizer builds turn
// KVSWITCH_STREAMING_STORES off: ASan does not check the SSE stores of host_backend.cpp.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "kvswitch/host_backend.hpp"
#include "kvswitch/swap_engine.hpp"

using namespace kvswitch;

// Phase 2: failures armed at random while 4 threads submit jobs over 8 shared blocks
// (so most jobs depend on others). Bytes are not checked (failed jobs copy nothing);
// what is: no job hangs, the counts add up, and root causes are consistent.
bool failures_phase(const std::vector<KVRegion>& dev_regions,
                    const std::vector<KVRegion>& host_regions, std::int64_t blocks) {
    constexpr int kThreads = 4, kJobs = 200;
    EngineOptions o;
    o.num_workers = 3;
    o.max_queue = 8;
    AsyncSwapEngine eng(KVLayout(dev_regions, blocks, {DeviceType::kCPU, 0}),
                        KVLayout(host_regions, blocks, {DeviceType::kCPU, 0}),
                        std::make_shared<HostBackend>(), o);
    std::vector<std::vector<SwapHandle>> handles(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t] {
            std::mt19937_64 g(500 + t);
            for (int j = 0; j < kJobs; ++j) {
                if (g() % 13 == 0) eng.fail_next_jobs(1, "injected");
                const std::int64_t len = 1 + g() % 3;
                const std::int64_t s = g() % (8 - len + 1);
                std::int64_t d = g() % (8 - len + 1);
                auto dir = static_cast<Direction>(g() % 3);
                // A migration's source must not overlap its destination: move it past.
                if (dir == Direction::kMigrate && s < d + len && d < s + len)
                    d = s + len <= 8 - len ? s + len : (s >= len ? s - len : -1);
                if (d < 0) dir = Direction::kOut;  // no room: a swap-out instead
                if (d < 0) d = s;
                const std::int64_t pairs[3] = {s, d, len};
                handles[t].push_back(eng.submit(dir, pairs, 1));
                if (j % 41 == 0) eng.poll();
            }
        });
    }
    for (auto& th : threads) th.join();
    eng.synchronize();
    std::map<std::uint64_t, SwapHandle> by_id;
    for (const auto& hs : handles)
        for (const SwapHandle& h : hs) by_id[h.id()] = h;
    std::uint64_t failed = 0, done = 0;
    bool ok = by_id.size() == kThreads * kJobs;
    for (const auto& [id, h] : by_id) {
        ok = ok && h.done();
        if (h.error().empty()) {
            ok = ok && h.root_job_id() == 0;
            ++done;
            continue;
        }
        ++failed;
        // The root came first and failed by itself (it is its own root).
        const auto root = by_id.find(h.root_job_id());
        ok = ok && h.root_job_id() <= id && root != by_id.end() &&
             root->second.root_job_id() == root->first;
    }
    eng.close();
    const SwapStats st = eng.stats();
    ok = ok && failed > 0 && st.num_failed == failed &&
         st.num_jobs + st.num_migrations == done && st.num_migrations > 0 && st.in_flight == 0;
    std::printf("%s: failures phase, %llu jobs done, %llu failed\n", ok ? "OK" : "MISMATCH",
                static_cast<unsigned long long>(done), static_cast<unsigned long long>(failed));
    return ok;
}

// Phase 3 backend: copies run later on a "device" thread per queue, in order, each after
// the jobs it depends on -- so jobs stay in flight after issue() as on CUDA, and the
// worker's polling, its in-flight bound and submit()'s wait for the dispatch of a job with
// a before= stream (defers_before) run under the sanitizers.
struct DeferredSync final : JobSync {
    std::shared_ptr<std::atomic<bool>> done = std::make_shared<std::atomic<bool>>(false);
};

class DeferredQueue final : public CopyQueue {
  public:
    DeferredQueue() : device_([this] { run(); }) {}
    ~DeferredQueue() override {
        {
            std::lock_guard<std::mutex> lock(mu_);
            stop_ = true;
        }
        cv_.notify_all();
        device_.join();
    }
    void issue(const std::vector<CopyOp>& ops, JobSync& js,
               const std::vector<JobSync*>& deps) override {
        // Like cuStreamWaitEvent: capture the dependencies' completion now (their syncs
        // may be released before this job runs).
        std::vector<std::shared_ptr<std::atomic<bool>>> after;
        for (JobSync* d : deps) after.push_back(static_cast<DeferredSync*>(d)->done);
        auto done = static_cast<DeferredSync&>(js).done;
        {
            std::lock_guard<std::mutex> lock(mu_);
            work_.push_back([ops, after, done] {
                for (const auto& a : after)
                    while (!a->load(std::memory_order_acquire)) std::this_thread::yield();
                std::this_thread::sleep_for(std::chrono::microseconds(30));
                for (const CopyOp& op : ops) host_copy(op);
                done->store(true, std::memory_order_release);
            });
        }
        cv_.notify_one();
    }
    bool completes_on_issue() const override { return false; }
    bool ready(JobSync& js) override {
        return static_cast<DeferredSync&>(js).done->load(std::memory_order_acquire);
    }
    double finish(JobSync& js) override {
        while (!ready(js)) std::this_thread::sleep_for(std::chrono::microseconds(20));
        return 0.0;
    }
  private:
    void run() {
        for (;;) {
            std::function<void()> f;
            {
                std::unique_lock<std::mutex> lock(mu_);
                cv_.wait(lock, [&] { return stop_ || !work_.empty(); });
                if (work_.empty()) return;
                f = std::move(work_.front());
                work_.pop_front();
            }
            f();
        }
    }
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<std::function<void()>> work_;
    bool stop_ = false;
    std::thread device_;
};

class DeferredBackend final : public CopyBackend {
  public:
    std::string name() const override { return "deferred-test"; }
    void validate(Direction, StreamRef, StreamRef) const override {}
    std::unique_ptr<JobSync> prepare(Direction, StreamRef, StreamRef) override {
        return std::make_unique<DeferredSync>();
    }
    std::unique_ptr<CopyQueue> open_queue(bool) override {
        return std::make_unique<DeferredQueue>();
    }
    bool defers_before(const JobSync&) const override { return true; }
};

// Phases 1 and 3: 4 threads submit random jobs, each over blocks of its own; the final
// bytes must equal a sequential replay per thread.
bool replay_phase(const char* name, std::shared_ptr<CopyBackend> backend, int sync_every,
                  bool with_before) {
    constexpr int kThreads = 4, kPerThread = 16, kRegions = 3, kJobs = 300;
    constexpr std::int64_t kBlocks = kThreads * kPerThread, kBlockBytes = 4160;
    // Device regions strided (block stride 2x block bytes), host regions contiguous.
    std::vector<std::vector<unsigned char>> dev(kRegions), host(kRegions);
    std::vector<KVRegion> dev_regions, host_regions;
    std::mt19937_64 rng(1);
    for (int r = 0; r < kRegions; ++r) {
        dev[r].resize(kBlocks * kBlockBytes * 2);
        host[r].resize(kBlocks * kBlockBytes);
        for (auto& b : dev[r]) b = static_cast<unsigned char>(rng());
        for (auto& b : host[r]) b = static_cast<unsigned char>(rng());
        dev_regions.push_back({reinterpret_cast<std::uintptr_t>(dev[r].data()), 2 * kBlockBytes,
                               kBlockBytes});
        host_regions.push_back({reinterpret_cast<std::uintptr_t>(host[r].data()), kBlockBytes,
                                kBlockBytes});
    }
    auto exp_dev = dev;
    auto exp_host = host;
    EngineOptions o;
    o.num_workers = 3;
    o.sync_every = sync_every;
    o.max_queue = 8;
    AsyncSwapEngine eng(KVLayout(dev_regions, kBlocks, {DeviceType::kCPU, 0}),
                        KVLayout(host_regions, kBlocks, {DeviceType::kCPU, 0}),
                        std::move(backend), o);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t] {
            std::mt19937_64 g(100 + t);
            const std::int64_t base = t * kPerThread;
            for (int j = 0; j < kJobs; ++j) {
                const auto dir = static_cast<Direction>(g() % 3);
                const bool out = dir == Direction::kOut;
                const std::int64_t len = 1 + g() % 4;
                const std::int64_t s = base + g() % (kPerThread - len + 1);
                std::int64_t d = base + g() % (kPerThread - len + 1);
                // A migration's extents must not overlap (kPerThread >= 2 * 4 leaves room).
                while (dir == Direction::kMigrate && s < d + len && d < s + len)
                    d = base + g() % (kPerThread - len + 1);
                const std::int64_t pairs[3] = {s, d, len};
                // Every third swap-in names a consumer stream: submit() waits for dispatch.
                StreamRef before;
                if (with_before && !out && j % 3 == 0) before = {StreamRef::Kind::kStream, 1};
                if (with_before && dir == Direction::kMigrate && j % 3 == 1)
                    before = {StreamRef::Kind::kStream, 1};
                eng.submit(dir, pairs, 1, {}, before);
                for (int r = 0; r < kRegions; ++r)  // sequential replay of this thread's jobs
                    for (std::int64_t k = 0; k < len; ++k) {
                        if (dir == Direction::kMigrate) {
                            std::memcpy(&exp_dev[r][(d + k) * 2 * kBlockBytes],
                                        &exp_dev[r][(s + k) * 2 * kBlockBytes], kBlockBytes);
                            continue;
                        }
                        unsigned char* hp = &exp_host[r][(out ? d : s) * kBlockBytes + k * kBlockBytes];
                        unsigned char* dp = &exp_dev[r][(out ? s : d) * 2 * kBlockBytes + k * 2 * kBlockBytes];
                        if (out) std::memcpy(hp, dp, kBlockBytes);
                        else std::memcpy(dp, hp, kBlockBytes);
                    }
                if (j % 37 == 0) {
                    const std::int64_t ids[2] = {base, base + 3};
                    eng.wait_blocks(ids, 2);
                }
                if (j % 53 == 0) eng.poll();
            }
        });
    }
    for (auto& th : threads) th.join();
    eng.close();
    const SwapStats st = eng.stats();
    bool ok = st.num_jobs + st.num_migrations == kThreads * kJobs && st.num_migrations > 0 &&
              st.in_flight == 0;
    for (int r = 0; r < kRegions; ++r) ok = ok && dev[r] == exp_dev[r] && host[r] == exp_host[r];
    std::printf("%s: %s phase, %llu swaps, %llu copies, %llu migrations\n",
                ok ? "OK" : "MISMATCH", name, static_cast<unsigned long long>(st.num_jobs),
                static_cast<unsigned long long>(st.num_copies),
                static_cast<unsigned long long>(st.num_migrations));
    return ok;
}

int main() {
    // Regions for the failures phase (bytes are not checked there).
    constexpr std::int64_t kBlocks = 8, kBlockBytes = 256;
    std::vector<unsigned char> dev(kBlocks * kBlockBytes), host(kBlocks * kBlockBytes);
    const std::vector<KVRegion> dev_regions{
        {reinterpret_cast<std::uintptr_t>(dev.data()), kBlockBytes, kBlockBytes}};
    const std::vector<KVRegion> host_regions{
        {reinterpret_cast<std::uintptr_t>(host.data()), kBlockBytes, kBlockBytes}};
    bool ok = replay_phase("host", std::make_shared<HostBackend>(), 4, false);
    ok = replay_phase("deferred", std::make_shared<DeferredBackend>(), 2, true) && ok;
    return ok && failures_phase(dev_regions, host_regions, kBlocks) ? 0 : 1;
}
