// The nanobind module kvswitch._core: one binding file per component.
#include <nanobind/nanobind.h>

#include "bindings.hpp"

NB_MODULE(_core, m) {
    m.doc() = "kvswitch C++ core: block-group allocator, swap engine and backends.";
    kvswitch::bindings::bind_allocator(m);
    kvswitch::bindings::bind_swap(m);
}
