// Stress test of AsyncSwapEngine on the host backend without Python: several submitter
// threads, random jobs with overlapping extents, wait_blocks, poll and close racing with
// workers. Phase 1 checks the final bytes against a sequential replay per submitter (each
// submitter owns its blocks). Phase 2 arms failures while threads submit jobs over shared
// blocks: every job must end, and every failed job must name a root job that failed by
// itself, no later than it. Meant to run under sanitizers (CI: .ci/sanitizers.sh), e.g.
//   cmake -S . -B build/tsan -DKVSWITCH_PYTHON=OFF -DKVSWITCH_CPP_TESTS=ON \
//         -DKVSWITCH_SANITIZE=thread -DCMAKE_BUILD_TYPE=RelWithDebInfo
//   cmake --build build/tsan && ctest --test-dir build/tsan --output-on-failure
// or KVSWITCH_SANITIZE=address,undefined (not thread with address). Sanitizer builds turn
// KVSWITCH_STREAMING_STORES off: ASan does not check the SSE stores of host_backend.cpp.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
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
                const std::int64_t s = g() % (8 - len + 1), d = g() % (8 - len + 1);
                const std::int64_t pairs[3] = {s, d, len};
                handles[t].push_back(
                    eng.submit(g() & 1 ? Direction::kOut : Direction::kIn, pairs, 1));
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
    ok = ok && failed > 0 && st.num_failed == failed && st.num_jobs == done &&
         st.in_flight == 0;
    std::printf("%s: failures phase, %llu jobs done, %llu failed\n", ok ? "OK" : "MISMATCH",
                static_cast<unsigned long long>(done), static_cast<unsigned long long>(failed));
    return ok;
}

int main() {
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
    o.sync_every = 4;
    o.max_queue = 8;
    AsyncSwapEngine eng(KVLayout(dev_regions, kBlocks, {DeviceType::kCPU, 0}),
                        KVLayout(host_regions, kBlocks, {DeviceType::kCPU, 0}),
                        std::make_shared<HostBackend>(), o);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t] {
            std::mt19937_64 g(100 + t);
            const std::int64_t base = t * kPerThread;
            for (int j = 0; j < kJobs; ++j) {
                const bool out = g() & 1;
                const std::int64_t len = 1 + g() % 4;
                const std::int64_t s = base + g() % (kPerThread - len + 1);
                const std::int64_t d = base + g() % (kPerThread - len + 1);
                const std::int64_t pairs[3] = {s, d, len};
                eng.submit(out ? Direction::kOut : Direction::kIn, pairs, 1);
                for (int r = 0; r < kRegions; ++r)  // sequential replay of this thread's jobs
                    for (std::int64_t k = 0; k < len; ++k) {
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
    bool ok = st.num_jobs == kThreads * kJobs && st.in_flight == 0;
    for (int r = 0; r < kRegions; ++r) ok = ok && dev[r] == exp_dev[r] && host[r] == exp_host[r];
    std::printf("%s: %llu jobs, %llu copies\n", ok ? "OK" : "MISMATCH",
                static_cast<unsigned long long>(st.num_jobs),
                static_cast<unsigned long long>(st.num_copies));
    return ok && failures_phase(dev_regions, host_regions, kBlocks) ? 0 : 1;
}
