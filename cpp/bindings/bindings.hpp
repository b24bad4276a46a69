#pragma once
#include <nanobind/nanobind.h>

namespace kvswitch::bindings {
void bind_allocator(nanobind::module_& m);
}  // namespace kvswitch::bindings
