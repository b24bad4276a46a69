// The few CUDA driver API types and functions kvswitch uses, loaded at run time.
//
// kvswitch builds without the CUDA toolkit: this header declares the driver API types it
// needs itself (ABI-compatible with cuda.h of CUDA 12.x/13.x; see
// cpp/tests/cuda_abi_check.cpp, built with -DKVSWITCH_CHECK_CUDA_ABI=ON where cuda.h
// exists) and CudaDriver::get() loads libcuda.so.1 with dlopen on first use. Functions are
// resolved with cuGetProcAddress at an explicit ABI version where the driver exports it,
// else with dlsym of the versioned (_v2) export names.
//
// Thread safety: CudaDriver::get() is thread-safe; the table is immutable after loading.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace kvswitch::cu {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
struct CUctx_st;
struct CUstream_st;
struct CUevent_st;
struct CUarray_st;
using CUcontext = CUctx_st*;
using CUstream = CUstream_st*;
using CUevent = CUevent_st*;
using CUarray = CUarray_st*;

constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_NOT_READY = 600;
constexpr CUresult CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712;
constexpr unsigned CU_STREAM_NON_BLOCKING = 0x1;
constexpr unsigned CU_EVENT_DEFAULT = 0x0;
constexpr unsigned CU_EVENT_BLOCKING_SYNC = 0x1;
constexpr unsigned CU_EVENT_DISABLE_TIMING = 0x2;
constexpr unsigned kHostAllocPortable = 0x1;      // CU_MEMHOSTALLOC_PORTABLE (a macro in cuda.h)
constexpr unsigned kHostAllocDeviceMap = 0x2;     // CU_MEMHOSTALLOC_DEVICEMAP
constexpr unsigned kHostRegisterPortable = 0x1;   // CU_MEMHOSTREGISTER_PORTABLE (a macro)
constexpr int CU_GET_PROC_ADDRESS_LEGACY_STREAM = 0x1;
constexpr unsigned CU_STREAM_WAIT_VALUE_GEQ = 0x0;
constexpr unsigned CU_STREAM_WRITE_VALUE_DEFAULT = 0x0;
constexpr int CU_MEMORYTYPE_HOST = 0x1;
constexpr int CU_MEMORYTYPE_DEVICE = 0x2;
constexpr int CU_MEMORYTYPE_UNIFIED = 0x4;
constexpr int CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2;
constexpr int CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9;
constexpr int CU_STREAM_CAPTURE_STATUS_NONE = 0;
constexpr int CU_STREAM_CAPTURE_MODE_RELAXED = 2;  ///< CUstreamCaptureMode
constexpr int CU_MEM_LOCATION_TYPE_DEVICE = 0x1;
constexpr int CU_MEM_LOCATION_TYPE_HOST = 0x2;
constexpr int CU_MEMCPY_SRC_ACCESS_ORDER_STREAM = 0x1;
constexpr unsigned CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE = 0x1;

/// CUDA_MEMCPY2D (the _v2 layout with size_t fields).
struct Memcpy2D {
    std::size_t srcXInBytes;
    std::size_t srcY;
    int srcMemoryType;
    const void* srcHost;
    CUdeviceptr srcDevice;
    CUarray srcArray;
    std::size_t srcPitch;
    std::size_t dstXInBytes;
    std::size_t dstY;
    int dstMemoryType;
    void* dstHost;
    CUdeviceptr dstDevice;
    CUarray dstArray;
    std::size_t dstPitch;
    std::size_t WidthInBytes;
    std::size_t Height;
};

struct MemLocation {
    int type;
    int id;
};

/// CUmemcpyAttributes (CUDA >= 12.8).
struct MemcpyAttributes {
    int srcAccessOrder;
    MemLocation srcLocHint;
    MemLocation dstLocHint;
    unsigned int flags;
};

/// A driver call failed; what() names the call and the driver's error name and string.
class CudaError : public std::runtime_error {
  public:
    CudaError(const std::string& what, CUresult code) : std::runtime_error(what), code_(code) {}
    CUresult code() const { return code_; }

  private:
    CUresult code_;
};

struct CudaDriver {
    /// The process-wide table; loads libcuda.so.1 and calls cuInit(0) on first use.
    /// Never throws: check available().
    static const CudaDriver& get();

    bool available() const { return loaded; }
    /// Why the driver is not available (empty when it is).
    const std::string& reason() const { return why; }
    int version() const { return driver_version; }  ///< e.g. 12080
    int device_count() const { return num_devices; }
    bool has_batch_copy() const { return cuMemcpyBatchAsync != nullptr; }
    /// Whether the 32-bit stream memory operations (the _v2 entry points, CUDA >= 11.7)
    /// resolved. Since 11.7 these need no device attribute: the deprecated
    /// CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1 reports 0 on Hopper GPUs although the
    /// v2 operations work there (cuda.h, "CUdevice_attribute").
    bool has_stream_mem_ops() const { return cuStreamWaitValue32 && cuStreamWriteValue32; }

    /// Throws CudaError("<what>: <NAME> (<string>)") unless r == CUDA_SUCCESS.
    void check(CUresult r, const char* what) const;
    std::string error_string(CUresult r) const;

    // Function table (nullptr when the driver lacks the function).
    CUresult (*cuInit)(unsigned) = nullptr;
    CUresult (*cuDriverGetVersion)(int*) = nullptr;
    CUresult (*cuGetErrorName)(CUresult, const char**) = nullptr;
    CUresult (*cuGetErrorString)(CUresult, const char**) = nullptr;
    CUresult (*cuDeviceGetCount)(int*) = nullptr;
    CUresult (*cuDeviceGet)(CUdevice*, int) = nullptr;
    CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice) = nullptr;
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice) = nullptr;
    CUresult (*cuDevicePrimaryCtxRelease)(CUdevice) = nullptr;
    CUresult (*cuCtxSetCurrent)(CUcontext) = nullptr;
    CUresult (*cuCtxGetCurrent)(CUcontext*) = nullptr;
    CUresult (*cuCtxGetStreamPriorityRange)(int*, int*) = nullptr;
    CUresult (*cuStreamCreateWithPriority)(CUstream*, unsigned, int) = nullptr;
    CUresult (*cuStreamDestroy)(CUstream) = nullptr;
    CUresult (*cuStreamSynchronize)(CUstream) = nullptr;
    CUresult (*cuStreamIsCapturing)(CUstream, int*) = nullptr;  ///< optional
    /// Optional (CUDA >= 10.1); see CaptureModeGuard.
    CUresult (*cuThreadExchangeStreamCaptureMode)(int*) = nullptr;
    CUresult (*cuStreamWaitEvent)(CUstream, CUevent, unsigned) = nullptr;
    /// The _v2 entry points (CUDA >= 11.7); nullptr on older drivers.
    CUresult (*cuStreamWaitValue32)(CUstream, CUdeviceptr, std::uint32_t, unsigned) = nullptr;
    CUresult (*cuStreamWriteValue32)(CUstream, CUdeviceptr, std::uint32_t, unsigned) = nullptr;
    CUresult (*cuEventCreate)(CUevent*, unsigned) = nullptr;
    CUresult (*cuEventDestroy)(CUevent) = nullptr;
    CUresult (*cuEventRecord)(CUevent, CUstream) = nullptr;
    CUresult (*cuEventSynchronize)(CUevent) = nullptr;
    CUresult (*cuEventQuery)(CUevent) = nullptr;
    CUresult (*cuEventElapsedTime)(float*, CUevent, CUevent) = nullptr;
    CUresult (*cuMemcpy)(CUdeviceptr, CUdeviceptr, std::size_t) = nullptr;
    CUresult (*cuMemcpyAsync)(CUdeviceptr, CUdeviceptr, std::size_t, CUstream) = nullptr;
    CUresult (*cuMemcpy2DAsync)(const Memcpy2D*, CUstream) = nullptr;
    /// The CUDA 12.8 signature (with failIdx); resolved at ABI version 12080.
    CUresult (*cuMemcpyBatchAsync)(CUdeviceptr*, CUdeviceptr*, std::size_t*, std::size_t,
                                   MemcpyAttributes*, std::size_t*, std::size_t, std::size_t*,
                                   CUstream) = nullptr;
    CUresult (*cuMemHostAlloc)(void**, std::size_t, unsigned) = nullptr;
    CUresult (*cuMemFreeHost)(void*) = nullptr;
    CUresult (*cuMemHostRegister)(void*, std::size_t, unsigned) = nullptr;
    CUresult (*cuMemHostUnregister)(void*) = nullptr;
    CUresult (*cuMemHostGetDevicePointer)(CUdeviceptr*, void*, unsigned) = nullptr;
    CUresult (*cuPointerGetAttribute)(void*, int, CUdeviceptr) = nullptr;

  private:
    CudaDriver();
    bool loaded = false;
    std::string why;
    int driver_version = 0;
    int num_devices = 0;
};

/// Puts this thread in relaxed stream-capture mode for the scope (cuThreadExchange-
/// StreamCaptureMode, push/pop), restoring its mode after.
///
/// Why: vLLM, SGLang and torch.compile capture CUDA graphs in global capture mode, which
/// prohibits "potentially unsafe" calls (cuEventQuery, cuEventSynchronize,
/// cuStreamSynchronize, allocations, registrations) in every other thread that is in
/// global mode, the default: the call fails with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
/// and the capture is invalidated (cuda.h, cuThreadExchangeStreamCaptureMode). kvswitch's
/// calls never touch a capturing stream (after=/before= streams that are capturing are
/// refused), so they are safe to make in relaxed mode. A thread marked with
/// relax_capture_mode_for_thread() (an engine worker) is relaxed for life and the guard
/// does nothing. Never throws; a driver without the function leaves the mode as it is.
class CaptureModeGuard {
  public:
    explicit CaptureModeGuard(const CudaDriver& d) noexcept;
    ~CaptureModeGuard();
    CaptureModeGuard(const CaptureModeGuard&) = delete;
    CaptureModeGuard& operator=(const CaptureModeGuard&) = delete;

  private:
    const CudaDriver& d_;
    int saved_ = 0;
    bool swapped_ = false;
};

/// Puts the calling thread in relaxed capture mode for the rest of its life (a worker
/// thread that only ever calls the driver for kvswitch). Never throws.
void relax_capture_mode_for_thread(const CudaDriver& d) noexcept;

/// Makes a context current on this thread for the scope, restoring the previous one, in
/// relaxed capture mode (CaptureModeGuard) for the same scope: every kvswitch driver call
/// runs under one.
class ScopedContext {
  public:
    ScopedContext(const CudaDriver& d, CUcontext ctx);
    ~ScopedContext();
    ScopedContext(const ScopedContext&) = delete;
    ScopedContext& operator=(const ScopedContext&) = delete;

  private:
    CaptureModeGuard capture_mode_;  // first: restored last, also when the ctor throws
    const CudaDriver& d_;
    CUcontext prev_ = nullptr;
    bool switched_ = false;
};

}  // namespace kvswitch::cu
