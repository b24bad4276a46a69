// Bindings of the raw copy timing helper (cpp/include/kvswitch/cuda_bench.hpp), used by
// benchmarks/gpu_campaign.py and tests/cuda. Not part of the public Python API: no wrapper
// in src/kvswitch, names as in the C++ header. The GIL is released while copies run.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>

#include <string>
#include <vector>

#include "bindings.hpp"
#include "kvswitch/cuda_bench.hpp"
#include "kvswitch/cuda_driver.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvswitch::bindings {

namespace {

using U64 = nb::ndarray<const std::uint64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

Direction parse_direction(const std::string& d) {
    if (d == "out") return Direction::kOut;
    if (d == "in") return Direction::kIn;
    throw std::invalid_argument("direction must be 'out' (device -> host) or 'in' "
                                "(host -> device), got '" + d + "'");
}

BenchApi parse_api(const std::string& api) {
    if (api == "memcpy") return BenchApi::kMemcpyAsync;
    if (api == "batch") return BenchApi::kBatch;
    throw std::invalid_argument("api must be 'memcpy' (one cuMemcpyAsync per copy) or 'batch' "
                                "(one cuMemcpyBatchAsync), got '" + api + "'");
}

BenchCopyList make_list(U64 dst, U64 src, U64 sizes, const std::string& direction) {
    BenchCopyList l;
    l.dst.assign(dst.data(), dst.data() + dst.shape(0));
    l.src.assign(src.data(), src.data() + src.shape(0));
    l.size.assign(sizes.data(), sizes.data() + sizes.shape(0));
    l.dir = parse_direction(direction);
    return l;
}

nb::list floats(const std::vector<double>& v) {
    nb::list out;
    for (double x : v) out.append(x);
    return out;
}

}  // namespace

void bind_bench(nb::module_& m) {
    static nb::exception<cu::CudaError> cuda_error(m, "CudaError", PyExc_RuntimeError);

    m.def(
        "cuda_copy_bench",
        [](int ordinal, U64 dst, U64 src, U64 sizes, const std::string& direction,
           const std::string& api, int warmup, int repeats) {
            const BenchCopyList list = make_list(dst, src, sizes, direction);
            const BenchApi a = parse_api(api);
            BenchTimes t;
            {
                nb::gil_scoped_release release;
                t = cuda_copy_bench(ordinal, list, a, warmup, repeats);
            }
            nb::dict out;
            out["gpu_s"] = floats(t.gpu_s);
            out["submit_s"] = floats(t.submit_s);
            out["copies"] = t.copies;
            out["bytes"] = t.bytes;
            out["api"] = t.api;
            return out;
        },
        "ordinal"_a, "dst"_a, "src"_a, "sizes"_a, "direction"_a, "api"_a = "memcpy",
        "warmup"_a = 3, "repeats"_a = 10,
        "Time a list of copies (uint64 arrays of unified addresses dst, src and byte sizes) "
        "on a new stream in the primary context of device `ordinal`: `warmup` untimed, then "
        "`repeats` timed repetitions. api 'memcpy': one cuMemcpyAsync per copy (a list of "
        "one copy is the link's ceiling); 'batch': one cuMemcpyBatchAsync (direction 'out' "
        "or 'in' sets its location hints). Returns {'gpu_s': [seconds between events per "
        "repetition], 'submit_s': [seconds of the enqueue calls], 'copies', 'bytes', 'api'}. "
        "Raises ValueError (bad arguments), RuntimeError (no driver or device, no batch "
        "API) and CudaError (a driver call failed).");

    m.def(
        "cuda_copy_bench_concurrent",
        [](int ordinal, U64 a_dst, U64 a_src, U64 a_sizes, const std::string& a_direction,
           U64 b_dst, U64 b_src, U64 b_sizes, const std::string& b_direction,
           const std::string& api, int warmup, int repeats) {
            const BenchCopyList a = make_list(a_dst, a_src, a_sizes, a_direction);
            const BenchCopyList b = make_list(b_dst, b_src, b_sizes, b_direction);
            const BenchApi which = parse_api(api);
            BenchConcurrentTimes t;
            {
                nb::gil_scoped_release release;
                t = cuda_copy_bench_concurrent(ordinal, a, b, which, warmup, repeats);
            }
            nb::dict out;
            out["wall_s"] = floats(t.wall_s);
            out["a_s"] = floats(t.a_s);
            out["b_s"] = floats(t.b_s);
            out["submit_a_s"] = floats(t.submit_a_s);
            out["submit_b_s"] = floats(t.submit_b_s);
            out["bytes_a"] = t.bytes_a;
            out["bytes_b"] = t.bytes_b;
            out["api"] = t.api;
            return out;
        },
        "ordinal"_a, "a_dst"_a, "a_src"_a, "a_sizes"_a, "a_direction"_a, "b_dst"_a, "b_src"_a,
        "b_sizes"_a, "b_direction"_a, "api"_a = "memcpy", "warmup"_a = 3, "repeats"_a = 10,
        "Time lists a and b at once on two streams (b enqueued by a helper thread, both "
        "after one start event). Returns {'wall_s': [start -> later end], 'a_s', 'b_s', "
        "'submit_a_s', 'submit_b_s', 'bytes_a', 'bytes_b', 'api'} (seconds, bytes). Raises "
        "as cuda_copy_bench.");

    m.def(
        "cuda_device_attributes",
        [](int ordinal) {
            nb::gil_scoped_release release;
            return cuda_device_attributes(ordinal);
        },
        "ordinal"_a = 0,
        "{name: int} of device `ordinal`: compute capability, PCI domain/bus/device ids, "
        "copy engines (async_engine_count), NUMA ids, stream memory operation support "
        "(can_use_stream_mem_ops_v1), max_pitch, the stream priority range "
        "(stream_priority_least, stream_priority_greatest), driver_version, batch_copy. "
        "Attributes the driver does not answer are left out. Raises RuntimeError without a "
        "driver or device.");
}

}  // namespace kvswitch::bindings
