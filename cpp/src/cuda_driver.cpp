#include "kvswitch/cuda_driver.hpp"

#include <dlfcn.h>

#include <cstdint>

namespace kvswitch::cu {

namespace {

// cuGetProcAddress_v2 (CUDA >= 12.0) and cuGetProcAddress (CUDA 11.3 - 12.x).
using GetProcV2 = CUresult (*)(const char*, void**, int, std::uint64_t, int*);
using GetProcV1 = CUresult (*)(const char*, void**, int, std::uint64_t);

struct Resolver {
    void* lib = nullptr;
    GetProcV2 v2 = nullptr;
    GetProcV1 v1 = nullptr;
    int driver_version = 0;

    /// `name` without version suffix, resolved at ABI `version` with the legacy default
    /// stream semantics (kvswitch passes explicit streams; the flag is stated rather than
    /// left to the driver's default); falls back to dlsym of `export_name` (the versioned
    /// symbol, e.g. "cuMemcpy2DAsync_v2").
    template <typename F>
    void operator()(F& fn, const char* name, int version, const char* export_name) const {
        void* p = nullptr;
        if (version <= driver_version) {
            if (v2) {
                int status = 0;
                if (v2(name, &p, version, CU_GET_PROC_ADDRESS_LEGACY_STREAM, &status) !=
                    CUDA_SUCCESS)
                    p = nullptr;
            } else if (v1) {
                if (v1(name, &p, version, CU_GET_PROC_ADDRESS_LEGACY_STREAM) != CUDA_SUCCESS)
                    p = nullptr;
            }
        }
        if (!p && version <= driver_version) p = dlsym(lib, export_name);
        fn = reinterpret_cast<F>(p);
    }
};

}  // namespace

const CudaDriver& CudaDriver::get() {
    static const CudaDriver driver;
    return driver;
}

CudaDriver::CudaDriver() {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        const char* e = dlerror();
        why = std::string("libcuda.so.1 could not be loaded (") + (e ? e : "no error text") +
              "): no NVIDIA driver on this machine";
        return;
    }
    Resolver r;
    r.lib = lib;
    cuDriverGetVersion = reinterpret_cast<decltype(cuDriverGetVersion)>(
        dlsym(lib, "cuDriverGetVersion"));
    cuInit = reinterpret_cast<decltype(cuInit)>(dlsym(lib, "cuInit"));
    if (!cuDriverGetVersion || !cuInit) {
        why = "libcuda.so.1 lacks cuInit/cuDriverGetVersion";
        return;
    }
    if (cuDriverGetVersion(&driver_version) != CUDA_SUCCESS) driver_version = 0;
    r.driver_version = driver_version;
    r.v2 = reinterpret_cast<GetProcV2>(dlsym(lib, "cuGetProcAddress_v2"));
    if (!r.v2) r.v1 = reinterpret_cast<GetProcV1>(dlsym(lib, "cuGetProcAddress"));

    const int base = 11000;  // ABI of the plain functions below is unchanged since 11.0
    r(cuGetErrorName, "cuGetErrorName", base, "cuGetErrorName");
    r(cuGetErrorString, "cuGetErrorString", base, "cuGetErrorString");
    r(cuDeviceGetCount, "cuDeviceGetCount", base, "cuDeviceGetCount");
    r(cuDeviceGet, "cuDeviceGet", base, "cuDeviceGet");
    r(cuDeviceGetAttribute, "cuDeviceGetAttribute", base, "cuDeviceGetAttribute");
    r(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", base, "cuDevicePrimaryCtxRetain");
    r(cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease", base,
      "cuDevicePrimaryCtxRelease_v2");
    r(cuCtxSetCurrent, "cuCtxSetCurrent", base, "cuCtxSetCurrent");
    r(cuCtxGetCurrent, "cuCtxGetCurrent", base, "cuCtxGetCurrent");
    r(cuCtxGetStreamPriorityRange, "cuCtxGetStreamPriorityRange", base,
      "cuCtxGetStreamPriorityRange");
    r(cuStreamCreateWithPriority, "cuStreamCreateWithPriority", base,
      "cuStreamCreateWithPriority");
    r(cuStreamDestroy, "cuStreamDestroy", base, "cuStreamDestroy_v2");
    r(cuStreamSynchronize, "cuStreamSynchronize", base, "cuStreamSynchronize");
    r(cuStreamIsCapturing, "cuStreamIsCapturing", base, "cuStreamIsCapturing");
    r(cuThreadExchangeStreamCaptureMode, "cuThreadExchangeStreamCaptureMode", base,
      "cuThreadExchangeStreamCaptureMode");
    r(cuStreamWaitEvent, "cuStreamWaitEvent", base, "cuStreamWaitEvent");
    // The _v2 memory operations exist from 11.7 (11070); asking at 12000 missed them on
    // 11.7 - 11.8 drivers.
    r(cuStreamWaitValue32, "cuStreamWaitValue32", 11070, "cuStreamWaitValue32_v2");
    r(cuStreamWriteValue32, "cuStreamWriteValue32", 11070, "cuStreamWriteValue32_v2");
    r(cuEventCreate, "cuEventCreate", base, "cuEventCreate");
    r(cuEventDestroy, "cuEventDestroy", base, "cuEventDestroy_v2");
    r(cuEventRecord, "cuEventRecord", base, "cuEventRecord");
    r(cuEventSynchronize, "cuEventSynchronize", base, "cuEventSynchronize");
    r(cuEventQuery, "cuEventQuery", base, "cuEventQuery");
    r(cuEventElapsedTime, "cuEventElapsedTime", base, "cuEventElapsedTime");
    r(cuMemcpy, "cuMemcpy", base, "cuMemcpy");
    r(cuMemcpyAsync, "cuMemcpyAsync", base, "cuMemcpyAsync");
    r(cuMemcpy2DAsync, "cuMemcpy2DAsync", base, "cuMemcpy2DAsync_v2");
    r(cuMemcpyBatchAsync, "cuMemcpyBatchAsync", 12080, "cuMemcpyBatchAsync");
    r(cuMemHostAlloc, "cuMemHostAlloc", base, "cuMemHostAlloc");
    r(cuMemFreeHost, "cuMemFreeHost", base, "cuMemFreeHost");
    r(cuMemHostRegister, "cuMemHostRegister", base, "cuMemHostRegister_v2");
    r(cuMemHostUnregister, "cuMemHostUnregister", base, "cuMemHostUnregister");
    r(cuMemHostGetDevicePointer, "cuMemHostGetDevicePointer", base,
      "cuMemHostGetDevicePointer_v2");
    r(cuPointerGetAttribute, "cuPointerGetAttribute", base, "cuPointerGetAttribute");

    const void* required[] = {
        reinterpret_cast<void*>(cuDeviceGetCount), reinterpret_cast<void*>(cuDeviceGet),
        reinterpret_cast<void*>(cuDevicePrimaryCtxRetain),
        reinterpret_cast<void*>(cuDevicePrimaryCtxRelease),
        reinterpret_cast<void*>(cuCtxSetCurrent), reinterpret_cast<void*>(cuCtxGetCurrent),
        reinterpret_cast<void*>(cuCtxGetStreamPriorityRange),
        reinterpret_cast<void*>(cuStreamCreateWithPriority),
        reinterpret_cast<void*>(cuStreamDestroy), reinterpret_cast<void*>(cuStreamSynchronize),
        reinterpret_cast<void*>(cuStreamWaitEvent), reinterpret_cast<void*>(cuEventCreate),
        reinterpret_cast<void*>(cuEventDestroy), reinterpret_cast<void*>(cuEventRecord),
        reinterpret_cast<void*>(cuEventSynchronize), reinterpret_cast<void*>(cuEventQuery),
        reinterpret_cast<void*>(cuEventElapsedTime),
        reinterpret_cast<void*>(cuMemcpyAsync), reinterpret_cast<void*>(cuMemcpy2DAsync),
        reinterpret_cast<void*>(cuMemHostAlloc), reinterpret_cast<void*>(cuMemFreeHost),
        reinterpret_cast<void*>(cuMemHostGetDevicePointer)};
    for (const void* p : required) {
        if (!p) {
            why = "libcuda.so.1 (driver version " + std::to_string(driver_version) +
                  ") lacks a required driver API function";
            return;
        }
    }
    const CUresult init = cuInit(0);
    if (init != CUDA_SUCCESS) {
        why = "cuInit failed: " + error_string(init);
        return;
    }
    if (cuDeviceGetCount(&num_devices) != CUDA_SUCCESS) num_devices = 0;
    if (num_devices <= 0) {
        why = "the CUDA driver reports no device";
        return;
    }
    loaded = true;
}

std::string CudaDriver::error_string(CUresult r) const {
    const char* name = nullptr;
    const char* text = nullptr;
    if (cuGetErrorName) cuGetErrorName(r, &name);
    if (cuGetErrorString) cuGetErrorString(r, &text);
    std::string s = name ? name : ("CUresult " + std::to_string(r));
    if (text) s += std::string(" (") + text + ")";
    return s;
}

void CudaDriver::check(CUresult r, const char* what) const {
    if (r != CUDA_SUCCESS) throw CudaError(std::string(what) + ": " + error_string(r), r);
}

namespace {
thread_local bool t_relaxed_for_life = false;
}  // namespace

CaptureModeGuard::CaptureModeGuard(const CudaDriver& d) noexcept : d_(d) {
    if (t_relaxed_for_life || !d_.cuThreadExchangeStreamCaptureMode) return;
    saved_ = CU_STREAM_CAPTURE_MODE_RELAXED;
    swapped_ = d_.cuThreadExchangeStreamCaptureMode(&saved_) == CUDA_SUCCESS;
}

CaptureModeGuard::~CaptureModeGuard() {
    if (swapped_) d_.cuThreadExchangeStreamCaptureMode(&saved_);
}

void relax_capture_mode_for_thread(const CudaDriver& d) noexcept {
    if (t_relaxed_for_life || !d.cuThreadExchangeStreamCaptureMode) return;
    int mode = CU_STREAM_CAPTURE_MODE_RELAXED;
    t_relaxed_for_life = d.cuThreadExchangeStreamCaptureMode(&mode) == CUDA_SUCCESS;
}

ScopedContext::ScopedContext(const CudaDriver& d, CUcontext ctx) : capture_mode_(d), d_(d) {
    d_.check(d_.cuCtxGetCurrent(&prev_), "cuCtxGetCurrent");
    if (prev_ != ctx) {
        d_.check(d_.cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
        switched_ = true;
    }
}

ScopedContext::~ScopedContext() {
    if (switched_) d_.cuCtxSetCurrent(prev_);
}

}  // namespace kvswitch::cu
