// Binding of kvswitch::CpuCopy, the per-sequence state of kvswitch.ReuseTracker
// (src/kvswitch/reuse.py wraps it; see its docstrings for the rules). Block tables cross as
// int32 or int64 NumPy arrays (one overload each, no conversion in between); every array
// returned is a new NumPy array that owns its buffer.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "bindings.hpp"
#include "kvswitch/reuse_copy.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvswitch::bindings {

namespace {

template <typename T>
using TableIn = nb::ndarray<const T, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Int32In = nb::ndarray<const std::int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Int64In = nb::ndarray<const std::int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

template <typename Out>
using Array1 = nb::ndarray<nb::numpy, Out, nb::ndim<1>, nb::c_contig>;
using PairsOut = nb::ndarray<nb::numpy, std::int64_t, nb::shape<-1, 3>, nb::c_contig>;

/// A new buffer holding `values` (converted to Out) and the capsule that frees it.
template <typename Out, typename In>
std::pair<Out*, nb::capsule> new_buffer(const std::vector<In>& values) {
    std::unique_ptr<Out[]> data(new Out[values.empty() ? 1 : values.size()]);
    for (std::size_t i = 0; i < values.size(); ++i) data[i] = static_cast<Out>(values[i]);
    Out* raw = data.release();
    return {raw, nb::capsule(raw, [](void* p) noexcept { delete[] static_cast<Out*>(p); })};
}

/// A new 1-D NumPy array holding `values`, owning its buffer.
template <typename Out, typename In>
Array1<Out> new_array(const std::vector<In>& values) {
    auto [raw, owner] = new_buffer<Out>(values);
    return Array1<Out>(raw, {values.size()}, owner);
}

/// A new [m, 3] int64 NumPy array of flattened copy pairs, owning its buffer.
PairsOut pairs_array(const std::vector<std::int64_t>& flat) {
    auto [raw, owner] = new_buffer<std::int64_t>(flat);
    return PairsOut(raw, {flat.size() / 3, 3}, owner);
}

template <typename T>
void bind_table_methods(nb::class_<CpuCopy>& c) {
    c.def(
         "prepare_out",
         [](const CpuCopy& self, TableIn<T> table, std::int64_t num_tokens) {
             const std::size_t n = self.check_table(table.data(), table.shape(0), num_tokens);
             return self.count_missing(n);
         },
         "table"_a.noconvert(), "num_tokens"_a)
        .def(
            "plan_out",
            [](CpuCopy& self, TableIn<T> table, std::int64_t num_tokens, Int32In fresh) {
                const std::size_t n = self.check_table(table.data(), table.shape(0), num_tokens);
                std::vector<std::int64_t> copied, pairs;
                self.plan_out(table.data(), n, num_tokens, fresh.data(), fresh.shape(0), copied,
                              pairs);
                return nb::make_tuple(pairs_array(pairs),
                                      new_array<std::int64_t>(copied));
            },
            "table"_a.noconvert(), "num_tokens"_a, "fresh"_a)
        .def(
            "pairs_in",
            [](const CpuCopy& self, TableIn<T> table, std::int64_t num_tokens) {
                const std::size_t n = self.check_table(table.data(), table.shape(0), num_tokens);
                std::vector<std::int64_t> pairs;
                self.pairs_in(table.data(), n, pairs);
                return pairs_array(pairs);
            },
            "table"_a.noconvert(), "num_tokens"_a);
}

}  // namespace

void bind_reuse(nb::module_& m) {
    nb::class_<CpuCopy> c(m, "CpuCopy",
                          "One sequence's CPU copy for ReuseTracker: host block and copied "
                          "tokens per logical block, and the tracker's per-sequence scalars.");
    c.def(nb::init<std::int64_t>(), "block_size"_a)
        .def_rw("num_tokens", &CpuCopy::num_tokens)
        .def_rw("swapped_out", &CpuCopy::swapped_out)
        .def_rw("priority", &CpuCopy::priority)
        .def_rw("last_used", &CpuCopy::last_used)
        .def_prop_ro("block_size", &CpuCopy::block_size)
        .def("__len__", &CpuCopy::size)
        .def_prop_ro("host_blocks",
                     [](const CpuCopy& self) {
                         return new_array<std::int32_t>(self.host_blocks());
                     }, nb::rv_policy::move)
        .def_prop_ro("copied_tokens",
                     [](const CpuCopy& self) {
                         return new_array<std::int32_t>(self.copied_tokens());
                     }, nb::rv_policy::move)
        .def("blocks_for", &CpuCopy::blocks_for, "num_tokens"_a)
        .def("count_missing", &CpuCopy::count_missing, "n"_a);
    bind_table_methods<std::int32_t>(c);
    bind_table_methods<std::int64_t>(c);
    c.def(
         "commit_out",
         [](CpuCopy& self, std::int64_t num_tokens,
            Int64In copied) -> std::optional<Array1<std::int32_t>> {
             self.clamp(num_tokens);  // rollback: tokens at and beyond num_tokens are invalid
             self.mark_copied(copied.data(), copied.shape(0), num_tokens);
             const std::size_t n = self.blocks_for(num_tokens);
             std::vector<std::int32_t> beyond = self.held_beyond(n);
             if (beyond.empty()) {
                 self.cut(n);
                 return std::nullopt;
             }
             return new_array<std::int32_t>(beyond);
         },
         "num_tokens"_a, "copied"_a,
         "Commit a swap-out: clamp to num_tokens, mark `copied` valid; returns the host blocks "
         "held beyond the new length (free them, then cut()) or None (already cut).")
        .def("clamp", &CpuCopy::clamp, "num_tokens"_a)
        .def(
            "invalidate",
            [](CpuCopy& self, Int64In logical) { self.invalidate(logical.data(), logical.shape(0)); },
            "logical"_a)
        .def(
            "held_beyond",
            [](const CpuCopy& self, std::size_t n) {
                const std::vector<std::int32_t> b = self.held_beyond(n);
                return new_array<std::int32_t>(b);
            },
            "n"_a)
        .def("cut", &CpuCopy::cut, "n"_a)
        .def(
            "forget",
            [](CpuCopy& self, Int32In ids) { self.forget(ids.data(), ids.shape(0)); }, "ids"_a)
        .def(
            "tail",
            [](const CpuCopy& self, std::size_t count) {
                const std::vector<std::int32_t> t = self.tail(count);
                return new_array<std::int32_t>(t);
            },
            "count"_a)
        .def("drop_tail", &CpuCopy::drop_tail, "count"_a)
        .def("empty", &CpuCopy::empty)
        .def("valid_blocks",
             [](const CpuCopy& self) {
                 const std::vector<std::uint8_t> v = self.valid_blocks();
                 return new_array<bool>(v);
             })
        .def("valid_tokens", [](const CpuCopy& self) {
            const std::vector<std::int32_t> v = self.valid_tokens();
            return new_array<std::int32_t>(v);
        });
}

}  // namespace kvswitch::bindings
