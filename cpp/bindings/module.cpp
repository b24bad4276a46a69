// The nanobind module kvswitch._core: one binding file per component.
#include <nanobind/nanobind.h>

#include "bindings.hpp"

using namespace nanobind::literals;

NB_MODULE(_core, m) {
    m.doc() = "kvswitch C++ core: block-group allocator, swap engine and backends.";
    kvswitch::bindings::bind_allocator(m);
    kvswitch::bindings::bind_swap(m);
    kvswitch::bindings::bind_bench(m);
    // For kvswitch's exit hook: objects held by daemon threads still running at exit are
    // never released, and nanobind would report them as leaks caused by the bindings.
    m.def("_set_leak_warnings", &nanobind::set_leak_warnings, "enabled"_a,
          "Turn nanobind's leaked-instance report at interpreter exit on or off.");
}
