// Bindings of the swap side of the core: KV layouts (raw regions), host pools, the swap
// engine and its handles, and a few CUDA driver queries. The Python API in
// src/kvswitch/layout.py, host_pool.py and swap.py wraps these; see their docstrings.
//
// Every call that can block (waits, submit when the queue is full, close) releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "bindings.hpp"
#include "kvswitch/cuda_backend.hpp"
#include "kvswitch/cuda_driver.hpp"
#include "kvswitch/host_backend.hpp"
#include "kvswitch/host_pool.hpp"
#include "kvswitch/kv_layout.hpp"
#include "kvswitch/swap_engine.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvswitch::bindings {

namespace {

using Pairs = nb::ndarray<const std::int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Ids = nb::ndarray<const std::int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

Device make_device(int type, int ordinal) {
    if (type != 0 && type != 1) throw std::invalid_argument("device type must be 0 (cpu) or 1 (cuda)");
    return Device{type == 0 ? DeviceType::kCPU : DeviceType::kCUDA, ordinal};
}

nb::tuple device_tuple(const Device& d) {
    return nb::make_tuple(d.type == DeviceType::kCPU ? "cpu" : "cuda", d.ordinal);
}

StreamRef stream_ref(int kind, std::uintptr_t handle) {
    if (kind < 0 || kind > 2) throw std::invalid_argument("stream kind must be 0, 1 or 2");
    return StreamRef{static_cast<StreamRef::Kind>(kind), handle};
}

const char* direction_name(Direction d) {
    switch (d) {
        case Direction::kOut: return "out";
        case Direction::kIn: return "in";
        case Direction::kMigrate: return "migrate";
    }
    return "?";
}

/// 0: swap-out, 1: swap-in, 2: migration (device -> device).
Direction direction_of(int d) {
    if (d < 0 || d > 2)
        throw std::invalid_argument("direction must be 0 (out), 1 (in) or 2 (migrate), got " +
                                    std::to_string(d));
    return static_cast<Direction>(d);
}

/// describe_array's tuple for an imported array. The import is moved into the returned
/// `owner` capsule: a raw DLPack capsule's memory is freed by its deleter, which must run
/// only when the layout built on it drops the owner, not when this call returns.
template <typename Array>
nb::tuple describe(Array a, bool read_only) {
    nb::list shape, strides;
    const auto dt = a.dtype();
    const std::int64_t itemsize = (static_cast<std::int64_t>(dt.bits) * dt.lanes + 7) / 8;
    for (std::size_t i = 0; i < a.ndim(); ++i) {
        shape.append(a.shape(i));
        strides.append(a.stride(i) * itemsize);
    }
    const auto ptr = reinterpret_cast<std::uintptr_t>(a.data());
    const int device_type = a.device_type(), device_id = a.device_id();
    auto held = std::make_unique<Array>(std::move(a));
    nb::capsule owner(held.get(), "kvswitch.array_import",
                      [](void* p) noexcept { delete static_cast<Array*>(p); });
    held.release();
    return nb::make_tuple(ptr, nb::tuple(shape), nb::tuple(strides), static_cast<int>(dt.code),
                          static_cast<int>(dt.bits), static_cast<int>(dt.lanes), device_type,
                          device_id, read_only, owner);
}

}  // namespace

void bind_swap(nb::module_& m) {
    static nb::exception<SwapError> swap_error(m, "SwapError", PyExc_RuntimeError);
    static nb::exception<EngineClosed> engine_closed(m, "EngineClosedError", PyExc_RuntimeError);

    // ---------------------------------------------------------------- arrays
    m.def(
        "describe_array",
        [](nb::handle obj) {
            // Writable import first: nanobind refuses it for a DLPack export flagged read-only
            // and for a read-only buffer; the read-only import then says which case it was.
            if (nb::ndarray<> w; nb::try_cast(obj, w)) return describe(w, false);
            if (nb::ndarray<nb::ro> r; nb::try_cast(obj, r)) return describe(r, true);
            if (PyCapsule_CheckExact(obj.ptr())) {
                const char* name = PyCapsule_GetName(obj.ptr());
                if (!name) PyErr_Clear();
                const std::string n = name ? name : "";
                if (n == "used_dltensor" || n == "used_dltensor_versioned")
                    throw nb::type_error(
                        "this DLPack capsule was already consumed (a capsule can be imported "
                        "once); pass the array itself, which exports a new capsule each time");
                throw nb::type_error(("a capsule named '" + n + "' is not a DLPack tensor").c_str());
            }
            throw nb::type_error("not an array (no __dlpack__ or buffer protocol)");
        },
        "array"_a,
        "(data_ptr, shape, strides_bytes, dlpack_dtype_code, bits, lanes, dlpack_device_type, "
        "device_id, read_only, owner) of a DLPack capsule, __dlpack__ object or buffer, without "
        "copying it. `owner` holds the import: keep it as long as data_ptr is used. Raises "
        "TypeError when the object is none of these (or a consumed capsule).");

    // ---------------------------------------------------------------- layout
    nb::class_<KVLayout>(m, "KVLayoutCore",
                         "Raw KV layout: regions (base, block_stride, block_bytes) in bytes.")
        .def("__init__",
             [](KVLayout* self, const std::vector<std::tuple<std::uintptr_t, std::int64_t,
                                                             std::int64_t>>& regions,
                std::int64_t num_blocks, int device_type, int ordinal) {
                 std::vector<KVRegion> rs;
                 rs.reserve(regions.size());
                 for (const auto& [base, stride, bytes] : regions) rs.push_back({base, stride, bytes});
                 new (self) KVLayout(std::move(rs), num_blocks, make_device(device_type, ordinal));
             },
             "regions"_a, "num_blocks"_a, "device_type"_a, "ordinal"_a)
        .def_prop_ro("regions",
                     [](const KVLayout& l) {
                         nb::list out;
                         for (const KVRegion& r : l.regions())
                             out.append(nb::make_tuple(r.base, r.block_stride, r.block_bytes));
                         return out;
                     })
        .def_prop_ro("num_blocks", &KVLayout::num_blocks)
        .def_prop_ro("bytes_per_block", &KVLayout::bytes_per_block)
        .def_prop_ro("device", [](const KVLayout& l) { return device_tuple(l.device()); });

    // ---------------------------------------------------------------- host pool
    nb::class_<HostPool>(m, "HostPoolCore", "Host memory of a host KV pool (see HostKVPool).")
        .def(nb::init<const std::vector<std::int64_t>&, std::int64_t, bool, int>(),
             "region_block_bytes"_a, "num_blocks"_a, "pin"_a, "cuda_ordinal"_a = 0,
             nb::call_guard<nb::gil_scoped_release>())
        .def_prop_ro("nbytes", &HostPool::nbytes)
        .def_prop_ro("pinned", &HostPool::pinned)
        .def_prop_ro("pin_reason", &HostPool::pin_reason)
        .def_prop_ro("num_blocks", &HostPool::num_blocks)
        .def_prop_ro("data_ptr", [](const HostPool& p) { return reinterpret_cast<std::uintptr_t>(p.data()); })
        .def("region_offset", &HostPool::region_offset, "region"_a)
        .def_prop_ro("layout", [](const HostPool& p) { return p.layout(); })
        .def("buffer",
             [](nb::handle self) {
                 HostPool& p = nb::cast<HostPool&>(self);
                 std::size_t shape[1] = {p.nbytes()};
                 return nb::ndarray<nb::numpy, std::uint8_t, nb::ndim<1>>(p.data(), 1, shape, self);
             },
             "The whole allocation as a 1-D uint8 NumPy array that keeps the pool alive.");

    // ---------------------------------------------------------------- handles
    nb::class_<SwapHandle>(m, "SwapHandle",
                           "One queued job (see AsyncSwapEngine.swap_out/swap_in/migrate).")
        .def("done", &SwapHandle::done,
             "True when the job has finished (successfully or not). Never blocks.")
        .def(
            "wait",
            [](const SwapHandle& h, std::optional<double> timeout) {
                if (timeout && !(*timeout >= 0))  // also rejects NaN
                    throw std::invalid_argument("timeout must be >= 0 seconds or None, got " +
                                                std::to_string(*timeout));
                nb::gil_scoped_release release;
                return h.wait(timeout ? *timeout : -1.0);
            },
            "timeout"_a = nb::none(),
            "Block (GIL released) until the job is done or `timeout` seconds pass (None or "
            "inf: no limit). Returns whether it is done; raises SwapError when the job failed "
            "and ValueError for a negative or NaN timeout.")
        .def_prop_ro("id", &SwapHandle::id)
        .def_prop_ro("nbytes", &SwapHandle::nbytes, "Bytes the job copies.")
        .def_prop_ro("num_copies", &SwapHandle::num_copies,
                     "Copy operations (linear or 2D) the job issues.")
        .def_prop_ro("elapsed_s", &SwapHandle::elapsed_s,
                     "Seconds the copies took (CUDA events / steady clock); None until done "
                     "or when the job failed.")
        .def_prop_ro("direction", [](const SwapHandle& h) { return direction_name(h.direction()); },
                     "'out' (device -> host), 'in' (host -> device) or 'migrate' (device -> "
                     "device).")
        .def_prop_ro("error", &SwapHandle::error, "Error text of a failed job, else ''.")
        .def_prop_ro("root_job_id",
                     [](const SwapHandle& h) -> std::optional<std::uint64_t> {
                         const std::uint64_t id = h.root_job_id();
                         if (id == 0) return std::nullopt;
                         return id;
                     },
                     "Id of the job whose failure made this one fail (its own id when it "
                     "failed itself); None unless the job failed.")
        .def("__repr__", [](const SwapHandle& h) {
            return "<SwapHandle id=" + std::to_string(h.id()) + " " +
                   direction_name(h.direction()) + " " + std::to_string(h.num_copies()) +
                   " copies " + std::to_string(h.nbytes()) + " bytes" +
                   (h.done() ? " done>" : " pending>");
        });

    // ---------------------------------------------------------------- engine
    nb::class_<AsyncSwapEngine>(m, "SwapEngineCore", "C++ swap engine (see AsyncSwapEngine).")
        .def("__init__",
             [](AsyncSwapEngine* self, const KVLayout& device, const KVLayout& host,
                const std::string& backend, int num_workers, int sync_every,
                std::size_t max_queue, const std::string& before_wait, bool register_host) {
                 BeforeWait bw;
                 if (before_wait == "event") {
                     bw = BeforeWait::kEvent;
                 } else if (before_wait == "flag") {
                     bw = BeforeWait::kFlag;
                 } else {
                     throw std::invalid_argument("before_wait must be 'event' or 'flag', got '" +
                                                 before_wait + "'");
                 }
                 std::shared_ptr<CopyBackend> b;
                 if (backend == "host") {
                     b = std::make_shared<HostBackend>();
                 } else if (backend == "cuda") {
                     nb::gil_scoped_release release;
                     b = std::make_shared<CudaBackend>(device.device().ordinal, bw);
                 } else {
                     throw std::invalid_argument("backend must be 'host' or 'cuda', got '" + backend + "'");
                 }
                 EngineOptions o;
                 o.num_workers = num_workers;
                 o.sync_every = sync_every;
                 o.max_queue = max_queue;
                 o.register_host = register_host;
                 // Page-locking a pageable host pool (attach_host) can take seconds.
                 nb::gil_scoped_release release;
                 new (self) AsyncSwapEngine(device, host, std::move(b), o);
             },
             "device_layout"_a, "host_layout"_a, "backend"_a, "num_workers"_a, "sync_every"_a,
             "max_queue"_a, "before_wait"_a = "event", "register_host"_a = true)
        .def(
            "submit",
            [](AsyncSwapEngine& e, int direction, Pairs pairs, int after_kind,
               std::uintptr_t after_handle, int before_kind, std::uintptr_t before_handle,
               std::int64_t region_begin, std::int64_t region_end) {
                if (pairs.shape(1) != 3)
                    throw std::invalid_argument("pairs must have shape [n, 3], got [" +
                                                std::to_string(pairs.shape(0)) + ", " +
                                                std::to_string(pairs.shape(1)) + "]");
                const Direction dir = direction_of(direction);
                const StreamRef after = stream_ref(after_kind, after_handle);
                const StreamRef before = stream_ref(before_kind, before_handle);
                if (region_begin < 0 || region_end < -1)
                    throw std::invalid_argument("regions must not be negative");
                RegionRange regions;  // region_end -1: to the last region
                regions.begin = static_cast<std::size_t>(region_begin);
                if (region_end >= 0) regions.end = static_cast<std::size_t>(region_end);
                nb::gil_scoped_release release;
                return e.submit(dir, pairs.data(), pairs.shape(0), after, before, regions);
            },
            "direction"_a, "pairs"_a, "after_kind"_a = 0, "after_handle"_a = 0,
            "before_kind"_a = 0, "before_handle"_a = 0, "region_begin"_a = 0,
            "region_end"_a = -1)
        .def(
            "check",
            [](const AsyncSwapEngine& e, int direction, int after_kind,
               std::uintptr_t after_handle, int before_kind, std::uintptr_t before_handle) {
                e.check(direction_of(direction),
                        stream_ref(after_kind, after_handle),
                        stream_ref(before_kind, before_handle));
            },
            "direction"_a, "after_kind"_a = 0, "after_handle"_a = 0, "before_kind"_a = 0,
            "before_handle"_a = 0)
        .def("poll", &AsyncSwapEngine::poll)
        .def(
            "wait_blocks",
            [](AsyncSwapEngine& e, Ids ids) {
                nb::gil_scoped_release release;
                return e.wait_blocks(ids.data(), ids.shape(0));
            },
            "block_ids"_a)
        .def("synchronize", &AsyncSwapEngine::synchronize, nb::call_guard<nb::gil_scoped_release>())
        .def("close", &AsyncSwapEngine::close, nb::call_guard<nb::gil_scoped_release>())
        .def_prop_ro("closed", &AsyncSwapEngine::closed)
        .def_prop_ro("backend", &AsyncSwapEngine::backend_name)
        .def_prop_ro("num_workers", [](const AsyncSwapEngine& e) { return e.options().num_workers; })
        .def_prop_ro("sync_every", [](const AsyncSwapEngine& e) { return e.options().sync_every; })
        .def_prop_ro("host_memory",
                     [](const AsyncSwapEngine& e) {
                         return std::make_tuple(e.host_memory().kind, e.host_memory().detail);
                     })
        .def("stats",
             [](const AsyncSwapEngine& e) {
                 const SwapStats s = e.stats();
                 nb::dict d;
                 d["num_jobs"] = s.num_jobs;
                 d["num_failed"] = s.num_failed;
                 d["num_copies"] = s.num_copies;
                 d["bytes"] = s.bytes;
                 d["seconds"] = s.seconds;
                 d["busy_s"] = s.busy_s;
                 d["gbps"] = s.busy_s > 0 ? static_cast<double>(s.bytes) / s.busy_s / 1e9 : 0.0;
                 d["host_memory"] = e.host_memory().kind;
                 nb::dict hist;
                 for (std::size_t k = 0; k < s.copy_size_histogram.size(); ++k)
                     if (s.copy_size_histogram[k])
                         hist[nb::int_(std::uint64_t{1} << k)] = s.copy_size_histogram[k];
                 d["copy_size_histogram"] = hist;
                 d["in_flight"] = s.in_flight;
                 d["num_migrations"] = s.num_migrations;
                 d["migration_copies"] = s.migration_copies;
                 d["migrated_bytes"] = s.migrated_bytes;
                 d["migration_seconds"] = s.migration_seconds;
                 return d;
             })
        .def("_release_held", &AsyncSwapEngine::release_held, "job_id"_a)
        .def("_fail_next_jobs", &AsyncSwapEngine::fail_next_jobs, "n"_a, "message"_a)
        .def("_set_paused", &AsyncSwapEngine::set_paused, "paused"_a)
        .def("_set_max_poll_us", &AsyncSwapEngine::set_max_poll_us, "us"_a)
        .def_prop_ro("_max_poll_us", &AsyncSwapEngine::max_poll_us);

    // ---------------------------------------------------------------- cuda driver
    m.def("cuda_unavailable_reason", &cuda_unavailable_reason, "ordinal"_a = 0,
          nb::call_guard<nb::gil_scoped_release>(),
          "Why the cuda backend cannot run on device `ordinal`; '' when it can.");
    m.def("cuda_driver_info", [] {
        const cu::CudaDriver& d = cu::CudaDriver::get();
        nb::dict info;
        info["available"] = d.available();
        info["reason"] = d.reason();
        info["driver_version"] = d.version();
        info["device_count"] = d.device_count();
        info["batch_copy"] = d.available() && d.has_batch_copy();
        info["stream_mem_ops"] = d.available() && d.has_stream_mem_ops();
        return info;
    });
    m.def("cuda_pointer_device", &cuda_pointer_device, "ptr"_a);
    m.def("cuda_timed_memcpy", &cuda_timed_memcpy, "ordinal"_a, "dst"_a, "src"_a, "nbytes"_a,
          nb::call_guard<nb::gil_scoped_release>());
}

}  // namespace kvswitch::bindings
