// The nanobind module kvswitch._core: one binding file per component.
#include <nanobind/nanobind.h>

#include <nanobind/stl/string.h>

#include <string>

#include "bindings.hpp"
#include "kvswitch/host_backend.hpp"

namespace {

/// How this extension was compiled, for `kvswitch info`: recorded by the compiler itself,
/// so it is right for a wheel as much as for an in-tree build.
nanobind::dict build_info() {
    nanobind::dict d;
#if defined(__clang__)
    d["compiler"] = std::string("Clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("GCC ") + __VERSION__;
#elif defined(_MSC_VER)
    d["compiler"] = "MSVC " + std::to_string(_MSC_VER);
#else
    d["compiler"] = "unknown";
#endif
    const long std_version = __cplusplus;
    d["cxx_standard"] = std_version >= 202002L ? "C++20" : std_version >= 201703L ? "C++17" : "older";
    d["streaming_stores"] = kvswitch::host_copy_streaming_stores();
#ifdef NDEBUG
    d["optimized"] = true;  // NDEBUG: Release or RelWithDebInfo
#else
    d["optimized"] = false;
#endif
    std::string sanitize;
#if defined(__SANITIZE_ADDRESS__)
    sanitize += "address";
#endif
#if defined(__SANITIZE_THREAD__)
    sanitize += sanitize.empty() ? "thread" : ",thread";
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer) && !defined(__SANITIZE_ADDRESS__)
    sanitize += sanitize.empty() ? "address" : ",address";
#endif
#if __has_feature(thread_sanitizer) && !defined(__SANITIZE_THREAD__)
    sanitize += sanitize.empty() ? "thread" : ",thread";
#endif
#endif
    d["sanitize"] = sanitize;
    return d;
}

}  // namespace

using namespace nanobind::literals;

NB_MODULE(_core, m) {
    m.doc() = "kvswitch C++ core: block-group allocator, swap engine and backends.";
    kvswitch::bindings::bind_allocator(m);
    kvswitch::bindings::bind_swap(m);
    m.def("build_info", &build_info,
          "How this extension was compiled: compiler, cxx_standard, streaming_stores, "
          "optimized, sanitize.");
    kvswitch::bindings::bind_bench(m);
    kvswitch::bindings::bind_reuse(m);
    // For kvswitch's exit hook: objects held by daemon threads still running at exit are
    // never released, and nanobind would report them as leaks caused by the bindings.
    m.def("_set_leak_warnings", &nanobind::set_leak_warnings, "enabled"_a,
          "Turn nanobind's leaked-instance report at interpreter exit on or off.");
}
