// HostBackend: copies with memcpy on the calling worker thread (both pools in host
// memory). A 2D copy is a loop of one memcpy per row. The duration of a job is measured
// with std::chrono::steady_clock around its copies.
//
// Streams and events (after=/before=) are not supported: validate() throws
// std::invalid_argument when one is given.
#pragma once

#include "kvswitch/copy_backend.hpp"

namespace kvswitch {

class HostBackend final : public CopyBackend {
  public:
    std::string name() const override { return "host"; }
    void validate(Direction dir, StreamRef after, StreamRef before) const override;
    std::unique_ptr<JobSync> prepare(Direction dir, StreamRef after, StreamRef before) override;
    std::unique_ptr<CopyQueue> open_queue(bool dedicated_thread) override;
};

/// Performs `op` with memcpy (rows one by one when strided).
void host_copy(const CopyOp& op) noexcept;

/// Whether host_copy() was compiled with the SSE2 streaming-store path for rows of 4 KiB
/// and more (off without SSE2, with KVSWITCH_STREAMING_STORES=OFF and in sanitizer builds).
bool host_copy_streaming_stores() noexcept;

}  // namespace kvswitch
