#include "kvswitch/host_backend.hpp"

#include <chrono>
#include <cstring>
#include <stdexcept>

namespace kvswitch {

namespace {

struct HostSync final : JobSync {
    double seconds = 0.0;
};

class HostQueue final : public CopyQueue {
  public:
    void issue(const std::vector<CopyOp>& ops, JobSync& sync,
               const std::vector<JobSync*>&) override {
        // Dependencies were complete before issue (host jobs complete on issue).
        const auto t0 = std::chrono::steady_clock::now();
        for (const CopyOp& op : ops) host_copy(op);
        const auto t1 = std::chrono::steady_clock::now();
        static_cast<HostSync&>(sync).seconds = std::chrono::duration<double>(t1 - t0).count();
    }
    bool completes_on_issue() const override { return true; }
    double finish(JobSync& sync) override { return static_cast<HostSync&>(sync).seconds; }
    void synchronize() override {}
};

}  // namespace

void host_copy(const CopyOp& op) noexcept {
    auto* dst = reinterpret_cast<unsigned char*>(op.dst);
    const auto* src = reinterpret_cast<const unsigned char*>(op.src);
    if (op.height == 1) {
        std::memcpy(dst, src, op.width);
        return;
    }
    for (std::size_t i = 0; i < op.height; ++i)
        std::memcpy(dst + i * op.dst_pitch, src + i * op.src_pitch, op.width);
}

std::unique_ptr<JobSync> HostBackend::prepare(Direction, StreamRef after, StreamRef before) {
    if (after.kind != StreamRef::Kind::kNone || before.kind != StreamRef::Kind::kNone)
        throw std::invalid_argument(
            "the host backend has no CUDA streams: after= and before= must be None");
    return std::make_unique<HostSync>();
}

std::unique_ptr<CopyQueue> HostBackend::open_queue() { return std::make_unique<HostQueue>(); }

}  // namespace kvswitch
