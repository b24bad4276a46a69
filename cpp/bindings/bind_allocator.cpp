// Binding of kvswitch::BlockGroupAllocator. Block ids cross as int32 NumPy arrays that own
// their buffer (filled in place, no second copy); sequence ids as int64.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <memory>

#include "bindings.hpp"
#include "kvswitch/block_group_allocator.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvswitch::bindings {

namespace {

using BlockArray = nb::ndarray<nb::numpy, BlockId, nb::ndim<1>, nb::c_contig>;
using BlockIdsIn = nb::ndarray<const BlockId, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

/// A new int32 NumPy array of n elements; `fill` writes the ids into its buffer.
template <typename Fill>
BlockArray new_block_array(std::size_t n, Fill&& fill) {
    std::unique_ptr<BlockId[]> data(new BlockId[n ? n : 1]);
    fill(data.get());
    BlockId* raw = data.release();
    nb::capsule owner(raw, [](void* p) noexcept { delete[] static_cast<BlockId*>(p); });
    return BlockArray(raw, {n}, owner);
}

using SeqArray = nb::ndarray<nb::numpy, SeqId, nb::ndim<1>, nb::c_contig>;

SeqArray new_seq_array(const std::vector<BlockMove>& moves) {
    std::unique_ptr<SeqId[]> data(new SeqId[moves.empty() ? 1 : moves.size()]);
    for (std::size_t i = 0; i < moves.size(); ++i) data[i] = moves[i].seq;
    SeqId* raw = data.release();
    nb::capsule owner(raw, [](void* p) noexcept { delete[] static_cast<SeqId*>(p); });
    return SeqArray(raw, {moves.size()}, owner);
}

nb::list extents_to_list(const std::vector<Extent>& extents) {
    nb::list out;
    for (const Extent& e : extents) out.append(nb::make_tuple(e.start, e.length));
    return out;
}

}  // namespace

void bind_allocator(nb::module_& m) {
    static nb::exception<OutOfBlocks> out_of_blocks(m, "OutOfBlocksError", PyExc_MemoryError);
    nb::register_exception_translator([](const std::exception_ptr& p, void*) {
        try {
            std::rethrow_exception(p);
        } catch (const UnknownSequence& e) {
            PyErr_SetString(PyExc_KeyError, e.what());
        } catch (const InvariantViolation& e) {
            PyErr_SetString(PyExc_AssertionError, e.what());
        }
    });

    nb::class_<BlockGroupAllocator>(m, "BlockGroupAllocator")
        .def(nb::init<BlockId, BlockId, BlockId>(), "num_blocks"_a,
             "initial_group_blocks"_a = 60, "growth_quantum_blocks"_a = 0)
        .def(
            "allocate",
            [](BlockGroupAllocator& a, SeqId seq, BlockId n) {
                if (n <= 0)  // checked here too: the array below must not be sized from it
                    throw std::invalid_argument(
                        "allocate: number of blocks must be positive, got " +
                        std::to_string(n));
                return new_block_array(static_cast<std::size_t>(n),
                                       [&](BlockId* out) { a.allocate(seq, n, out); });
            },
            "seq_id"_a, "num_blocks"_a)
        .def("free", &BlockGroupAllocator::free, "seq_id"_a)
        .def("reserve", &BlockGroupAllocator::reserve, "seq_id"_a, "num_blocks"_a)
        .def(
            "compact",
            [](BlockGroupAllocator& a, BlockId n, BlockId max_moved,
               const std::vector<SeqId>& pinned) -> nb::object {
                auto moves = a.compact(n, max_moved, pinned);
                if (!moves) return nb::none();
                const auto& m = *moves;
                auto column = [&](BlockId BlockMove::*field) {
                    return new_block_array(m.size(), [&](BlockId* out) {
                        for (std::size_t i = 0; i < m.size(); ++i) out[i] = m[i].*field;
                    });
                };
                return nb::make_tuple(new_seq_array(m), column(&BlockMove::src),
                                      column(&BlockMove::dst), column(&BlockMove::length));
            },
            "num_blocks"_a, "max_moved"_a, "pinned"_a)
        .def(
            "undo_moves",
            [](BlockGroupAllocator& a, const std::vector<SeqId>& seqs,
               const std::vector<BlockId>& src, const std::vector<BlockId>& dst,
               const std::vector<BlockId>& length) {
                if (src.size() != seqs.size() || dst.size() != seqs.size() ||
                    length.size() != seqs.size())
                    throw std::invalid_argument("undo_moves: columns of different lengths");
                std::vector<BlockMove> moves(seqs.size());
                for (std::size_t i = 0; i < seqs.size(); ++i)
                    moves[i] = BlockMove{seqs[i], src[i], dst[i], length[i]};
                a.undo_moves(moves);
            },
            "seq_ids"_a, "src"_a, "dst"_a, "length"_a)
        .def(
            "free_blocks",
            [](BlockGroupAllocator& a, SeqId seq, BlockIdsIn ids) {
                a.free_blocks(seq, ids.data(), ids.shape(0));
            },
            "seq_id"_a, "block_ids"_a)
        .def(
            "claim",
            [](BlockGroupAllocator& a, SeqId seq, BlockIdsIn ids) {
                a.claim(seq, ids.data(), ids.shape(0));
            },
            "seq_id"_a, "block_ids"_a)
        .def("release_reservation",
             nb::overload_cast<SeqId>(&BlockGroupAllocator::release_reservation), "seq_id"_a)
        .def(
            "block_table",
            [](const BlockGroupAllocator& a, SeqId seq) {
                const auto& table = a.block_table(seq);
                return new_block_array(table.size(), [&](BlockId* out) {
                    if (!table.empty())
                        std::memcpy(out, table.data(), table.size() * sizeof(BlockId));
                });
            },
            "seq_id"_a)
        .def("num_table_blocks",
             [](const BlockGroupAllocator& a, SeqId seq) { return a.block_table(seq).size(); },
             "seq_id"_a)
        .def("groups",
             [](const BlockGroupAllocator& a, SeqId seq) { return extents_to_list(a.groups(seq)); },
             "seq_id"_a)
        .def("reservation",
             [](const BlockGroupAllocator& a, SeqId seq) {
                 const Extent r = a.reservation(seq);
                 return nb::make_tuple(r.start, r.length);
             },
             "seq_id"_a)
        .def("free_groups",
             [](const BlockGroupAllocator& a) { return extents_to_list(a.free_groups()); })
        .def("contains", &BlockGroupAllocator::contains, "seq_id"_a)
        .def("sequences", &BlockGroupAllocator::sequences)
        .def_prop_ro("num_blocks", &BlockGroupAllocator::num_blocks)
        .def_prop_ro("initial_group_blocks", &BlockGroupAllocator::initial_group_blocks)
        .def_prop_ro("growth_quantum_blocks", &BlockGroupAllocator::growth_quantum_blocks)
        .def_prop_ro("per_block_mode", &BlockGroupAllocator::per_block_mode)
        .def_prop_ro("num_free_blocks", &BlockGroupAllocator::num_free_blocks)
        .def_prop_ro("num_reserved_blocks", &BlockGroupAllocator::num_reserved_blocks)
        .def_prop_ro("num_sequences", &BlockGroupAllocator::num_sequences)
        .def("stats",
             [](const BlockGroupAllocator& a) {
                 const AllocatorStats s = a.stats();
                 nb::dict d;
                 d["num_sequences"] = s.num_sequences;
                 d["num_groups"] = s.num_groups;
                 d["mean_group_blocks"] = s.mean_group_blocks;
                 d["group_length_histogram"] = s.group_length_histogram;
                 d["num_free_groups"] = s.num_free_groups;
                 d["largest_free_group"] = s.largest_free_group;
                 d["fragmentation"] = s.fragmentation;
                 return d;
             })
        .def("check_invariants", &BlockGroupAllocator::check_invariants);
}

}  // namespace kvswitch::bindings
