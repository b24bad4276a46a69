// Timing of raw copy lists through the CUDA driver API (benchmarks/gpu_campaign.py).
//
// The physical limits a swap engine is measured against: the same bytes copied
//   (a) with one cuMemcpyAsync per copy (vLLM's per-block swap loop, in C++: its best case),
//   (b) with one cuMemcpyBatchAsync for the whole list (CUDA >= 12.8),
//   (c) as one large cuMemcpyAsync: pass a list of one copy (the ceiling of the link).
// Each repetition is bracketed by two timed events on a stream this helper creates in the
// device's primary context (the one PyTorch and CuPy use), so pointers from those
// frameworks are valid. GPU seconds come from cuEventElapsedTime (resolution about 0.5 us),
// submit seconds from std::chrono::steady_clock around the enqueue calls only.
//
// Sources: CUDA Driver API reference, "Memory Management" (cuMemcpyAsync,
// cuMemcpyBatchAsync) and "Event Management" (cuEventElapsedTime); FastSwitch
// (arXiv 2411.18424), section 3.1 (dispatch overhead of many small copies).
//
// Not used by the swap engine; nothing here is on a hot path. Every function retains the
// primary context for the duration of the call and releases it before returning.
// Thread safety: the functions may be called from several threads (each call has its own
// streams and events); GIL-free (the bindings release it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "kvswitch/copy_backend.hpp"

namespace kvswitch {

/// How a copy list is enqueued.
enum class BenchApi : int {
    kMemcpyAsync = 0,  ///< one cuMemcpyAsync per copy
    kBatch = 1,        ///< one cuMemcpyBatchAsync for the list (srcAccessOrder STREAM)
};

/// A list of linear copies between unified addresses (bytes), all in one direction.
/// dir only selects the location hints of cuMemcpyBatchAsync (device -> host for kOut).
struct BenchCopyList {
    std::vector<std::uint64_t> dst;
    std::vector<std::uint64_t> src;
    std::vector<std::size_t> size;  ///< bytes, each > 0
    Direction dir = Direction::kOut;

    std::size_t bytes() const;
    /// Throws std::invalid_argument: empty list, lengths differ, a size of 0.
    void validate(const char* what) const;
};

/// Per-repetition times of one list (warm-ups excluded), seconds.
struct BenchTimes {
    std::vector<double> gpu_s;     ///< start event -> end event
    std::vector<double> submit_s;  ///< steady clock around the enqueue calls
    std::size_t copies = 0;
    std::size_t bytes = 0;
    std::string api;  ///< "cuMemcpyAsync" or "cuMemcpyBatchAsync"
};

/// Copies `list` `warmup` untimed then `repeats` timed times (each repetition is waited
/// for before the next starts) on one non-blocking stream of default priority in the
/// primary context of device `ordinal`.
/// Throws std::invalid_argument (bad list, warmup < 0, repeats < 1), std::runtime_error
/// (no driver or device; kBatch where the driver lacks cuMemcpyBatchAsync) and
/// cu::CudaError (a driver call failed; what() names the call and the driver's error).
BenchTimes cuda_copy_bench(int ordinal, const BenchCopyList& list, BenchApi api, int warmup,
                           int repeats);

/// Per-repetition times of two lists run at once, seconds from the common start event.
struct BenchConcurrentTimes {
    std::vector<double> wall_s;  ///< start -> the later of the two end events
    std::vector<double> a_s;     ///< start -> end of list a
    std::vector<double> b_s;     ///< start -> end of list b
    std::vector<double> submit_a_s, submit_b_s;
    std::size_t bytes_a = 0, bytes_b = 0;
    std::string api;
};

/// Runs `a` on stream A (this thread) and `b` on stream B (a helper thread that enqueues at
/// the same time) per repetition: a start event is recorded on A, B waits on it, each list
/// is enqueued and followed by its own end event; both are waited for before the next
/// repetition. wall_s is the time from the start to the later end (e.g. both directions of
/// the link at once). Throws as cuda_copy_bench.
BenchConcurrentTimes cuda_copy_bench_concurrent(int ordinal, const BenchCopyList& a,
                                                const BenchCopyList& b, BenchApi api,
                                                int warmup, int repeats);

/// Device facts for reports and tests: compute capability, PCI ids, copy engines, NUMA ids,
/// stream-memory-operation support, the context's stream priority range (least, greatest;
/// greatest is numerically smaller), the driver version and whether it has
/// cuMemcpyBatchAsync. Attributes the driver does not answer (older drivers) are left out.
/// Throws std::runtime_error when no driver or no such device.
std::map<std::string, long long> cuda_device_attributes(int ordinal);

}  // namespace kvswitch
