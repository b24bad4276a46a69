#pragma once
#include <nanobind/nanobind.h>

namespace kvswitch::bindings {
void bind_allocator(nanobind::module_& m);
void bind_swap(nanobind::module_& m);  // layouts, host pools, swap engine
void bind_bench(nanobind::module_& m);  // raw copy timing (benchmarks/gpu_campaign.py)
void bind_reuse(nanobind::module_& m);  // CpuCopy, ReuseTracker's per-sequence state
}  // namespace kvswitch::bindings
