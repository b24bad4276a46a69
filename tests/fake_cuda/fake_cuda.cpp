// A fake libcuda.so.1 for testing kvswitch's cuda backend on machines without a GPU.
//
// Every "device" address is a host address; copies happen synchronously inside the API
// call; events store a steady-clock timestamp; stream waits are no-ops (everything is
// already complete). It checks what it can (a context is current, handles are valid) and
// counts calls, so tests can see which driver paths the backend took. Built by
// tests/test_fake_cuda_driver.py; never part of the package.
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

extern "C" {

typedef int CUresult;
struct Counters {
    long memcpy_async, memcpy_2d, batch_calls, batch_copies, host_alloc, streams_created,
        stream_priority, wait_value, write_value, wait_event, event_record, ctx_retain,
        ctx_release, no_context_errors;
};
static Counters g_counters;
static std::mutex g_mu;
static thread_local void* g_current = nullptr;
static int g_primary_ctx_dummy;
static const int kNotInitialized = 3, kInvalidValue = 1, kInvalidContext = 201;

Counters* fake_counters() { return &g_counters; }

static long fail_after() {  // FAKE_CUDA_FAIL_COPY_AFTER=n: the (n+1)-th copy call fails once
    const char* s = std::getenv("FAKE_CUDA_FAIL_COPY_AFTER");
    return s ? std::atol(s) : -1;
}
static long g_copy_calls = 0;
static bool copy_fails() {
    std::lock_guard<std::mutex> lock(g_mu);
    const long limit = fail_after();
    return limit >= 0 && g_copy_calls++ == limit;
}
static bool need_ctx() {
    if (g_current) return true;
    std::lock_guard<std::mutex> lock(g_mu);
    ++g_counters.no_context_errors;
    return false;
}

CUresult cuInit(unsigned) { return 0; }
// FAKE_CUDA_NO_BATCH: pretend to be a 12.4 driver (no cuMemcpyBatchAsync).
CUresult cuDriverGetVersion(int* v) { *v = std::getenv("FAKE_CUDA_NO_BATCH") ? 12040 : 12080; return 0; }
CUresult cuGetErrorName(CUresult r, const char** s) {
    *s = r == 0 ? "CUDA_SUCCESS" : "CUDA_ERROR_FAKE";
    return 0;
}
CUresult cuGetErrorString(CUresult, const char** s) { *s = "fake driver error"; return 0; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return 0; }
CUresult cuDeviceGet(int* d, int ordinal) { if (ordinal != 0) return kInvalidValue; *d = 0; return 0; }
CUresult cuDeviceGetAttribute(int* v, int attr, int) { *v = attr == 92 ? 1 : 0; return 0; }
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) {
    std::lock_guard<std::mutex> lock(g_mu);
    ++g_counters.ctx_retain;
    *ctx = &g_primary_ctx_dummy;
    return 0;
}
CUresult cuDevicePrimaryCtxRelease_v2(int) {
    std::lock_guard<std::mutex> lock(g_mu);
    ++g_counters.ctx_release;
    return 0;
}
CUresult cuCtxSetCurrent(void* c) { g_current = c; return 0; }
CUresult cuCtxGetCurrent(void** c) { *c = g_current; return 0; }
CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) { *least = 0; *greatest = -5; return 0; }
CUresult cuStreamCreateWithPriority(void** s, unsigned, int priority) {
    if (!need_ctx()) return kInvalidContext;
    std::lock_guard<std::mutex> lock(g_mu);
    ++g_counters.streams_created;
    if (priority == 0) ++g_counters.stream_priority;  // lowest priority requested
    *s = new int(1);
    return 0;
}
CUresult cuStreamDestroy_v2(void* s) { delete static_cast<int*>(s); return 0; }
CUresult cuStreamSynchronize(void*) { return need_ctx() ? 0 : kInvalidContext; }
CUresult cuStreamWaitEvent(void*, void*, unsigned) {
    std::lock_guard<std::mutex> lock(g_mu);
    ++g_counters.wait_event;
    return 0;
}
CUresult cuStreamWaitValue32_v2(void*, unsigned long long, unsigned, unsigned) {
    std::lock_guard<std::mutex> lock(g_mu);
    ++g_counters.wait_value;
    return 0;
}
CUresult cuStreamWriteValue32_v2(void*, unsigned long long addr, unsigned value, unsigned) {
    *reinterpret_cast<volatile unsigned*>(addr) = value;
    std::lock_guard<std::mutex> lock(g_mu);
    ++g_counters.write_value;
    return 0;
}
struct Event { double t = 0; bool recorded = false; };
CUresult cuEventCreate(void** e, unsigned) {
    if (!need_ctx()) return kInvalidContext;
    *e = new Event();
    return 0;
}
CUresult cuEventDestroy_v2(void* e) { delete static_cast<Event*>(e); return 0; }
// FAKE_CUDA_FAIL_RECORD_ON=<stream handle>: cuEventRecord on that stream fails
// (CUDA_ERROR_INVALID_HANDLE), as for a caller's after= stream that is not a valid stream.
CUresult cuEventRecord(void* e, void* stream) {
    if (const char* s = std::getenv("FAKE_CUDA_FAIL_RECORD_ON");
        s && reinterpret_cast<std::uintptr_t>(stream) == std::strtoull(s, nullptr, 0))
        return 400;
    auto* ev = static_cast<Event*>(e);
    ev->t = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
    ev->recorded = true;
    std::lock_guard<std::mutex> lock(g_mu);
    ++g_counters.event_record;
    return 0;
}
CUresult cuEventSynchronize(void*) { return 0; }
CUresult cuEventQuery(void*) { return 0; }
CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    auto* s = static_cast<Event*>(a);
    auto* e = static_cast<Event*>(b);
    if (!s->recorded || !e->recorded) return kInvalidValue;
    *ms = static_cast<float>((e->t - s->t) * 1e3);
    return 0;
}
CUresult cuMemcpy(unsigned long long dst, unsigned long long src, size_t n) {
    std::memcpy(reinterpret_cast<void*>(dst), reinterpret_cast<void*>(src), n);
    return 0;
}
CUresult cuMemcpyAsync(unsigned long long dst, unsigned long long src, size_t n, void*) {
    if (!need_ctx()) return kInvalidContext;
    if (copy_fails()) return 999;
    std::memcpy(reinterpret_cast<void*>(dst), reinterpret_cast<void*>(src), n);
    std::lock_guard<std::mutex> lock(g_mu);
    ++g_counters.memcpy_async;
    return 0;
}
struct Memcpy2D {
    size_t srcXInBytes, srcY; int srcMemoryType; const void* srcHost;
    unsigned long long srcDevice; void* srcArray; size_t srcPitch;
    size_t dstXInBytes, dstY; int dstMemoryType; void* dstHost;
    unsigned long long dstDevice; void* dstArray; size_t dstPitch;
    size_t WidthInBytes, Height;
};
CUresult cuMemcpy2DAsync_v2(const Memcpy2D* m, void*) {
    if (!need_ctx()) return kInvalidContext;
    if (m->srcMemoryType != 4 || m->dstMemoryType != 4) return kInvalidValue;
    if (m->srcPitch < m->WidthInBytes || m->dstPitch < m->WidthInBytes) return kInvalidValue;
    if (copy_fails()) return 999;
    for (size_t i = 0; i < m->Height; ++i)
        std::memcpy(reinterpret_cast<char*>(m->dstDevice) + i * m->dstPitch,
                    reinterpret_cast<const char*>(m->srcDevice) + i * m->srcPitch, m->WidthInBytes);
    std::lock_guard<std::mutex> lock(g_mu);
    ++g_counters.memcpy_2d;
    return 0;
}
struct MemcpyAttributes { int order; int st, si, dt, di; unsigned flags; };
CUresult cuMemcpyBatchAsync(unsigned long long* dsts, unsigned long long* srcs, size_t* sizes,
                            size_t count, MemcpyAttributes* attrs, size_t* idxs, size_t nattrs,
                            size_t* fail_idx, void*) {
    if (!need_ctx()) return kInvalidContext;
    if (!attrs || !idxs || nattrs < 1 || idxs[0] != 0 || attrs[0].order != 1) return kInvalidValue;
    if (copy_fails()) { *fail_idx = 0; return 999; }
    for (size_t i = 0; i < count; ++i)
        std::memcpy(reinterpret_cast<void*>(dsts[i]), reinterpret_cast<void*>(srcs[i]), sizes[i]);
    std::lock_guard<std::mutex> lock(g_mu);
    ++g_counters.batch_calls;
    g_counters.batch_copies += static_cast<long>(count);
    return 0;
}
CUresult cuMemHostAlloc(void** p, size_t n, unsigned) {
    if (!need_ctx()) return kInvalidContext;
    if (posix_memalign(p, 4096, n ? n : 1) != 0) return 2;
    std::lock_guard<std::mutex> lock(g_mu);
    ++g_counters.host_alloc;
    return 0;
}
CUresult cuMemFreeHost(void* p) { std::free(p); return 0; }
CUresult cuMemHostRegister_v2(void*, size_t, unsigned) { return 0; }
CUresult cuMemHostUnregister(void*) { return 0; }
CUresult cuMemHostGetDevicePointer_v2(unsigned long long* d, void* p, unsigned) {
    *d = reinterpret_cast<unsigned long long>(p);
    return 0;
}
CUresult cuPointerGetAttribute(void* out, int attr, unsigned long long) {
    if (attr != 9) return kInvalidValue;
    *static_cast<int*>(out) = 0;
    return 0;
}

// cuGetProcAddress_v2: the symbols above by base name, honouring the requested version.
CUresult cuGetProcAddress_v2(const char* name, void** fn, int version, unsigned long long,
                             int* status) {
    static const std::map<std::string, void*> table = {
        {"cuGetErrorName", (void*)cuGetErrorName}, {"cuGetErrorString", (void*)cuGetErrorString},
        {"cuDeviceGetCount", (void*)cuDeviceGetCount}, {"cuDeviceGet", (void*)cuDeviceGet},
        {"cuDeviceGetAttribute", (void*)cuDeviceGetAttribute},
        {"cuDevicePrimaryCtxRetain", (void*)cuDevicePrimaryCtxRetain},
        {"cuDevicePrimaryCtxRelease", (void*)cuDevicePrimaryCtxRelease_v2},
        {"cuCtxSetCurrent", (void*)cuCtxSetCurrent}, {"cuCtxGetCurrent", (void*)cuCtxGetCurrent},
        {"cuCtxGetStreamPriorityRange", (void*)cuCtxGetStreamPriorityRange},
        {"cuStreamCreateWithPriority", (void*)cuStreamCreateWithPriority},
        {"cuStreamDestroy", (void*)cuStreamDestroy_v2},
        {"cuStreamSynchronize", (void*)cuStreamSynchronize},
        {"cuStreamWaitEvent", (void*)cuStreamWaitEvent},
        {"cuStreamWaitValue32", (void*)cuStreamWaitValue32_v2},
        {"cuStreamWriteValue32", (void*)cuStreamWriteValue32_v2},
        {"cuEventCreate", (void*)cuEventCreate}, {"cuEventDestroy", (void*)cuEventDestroy_v2},
        {"cuEventRecord", (void*)cuEventRecord}, {"cuEventSynchronize", (void*)cuEventSynchronize},
        {"cuEventQuery", (void*)cuEventQuery}, {"cuEventElapsedTime", (void*)cuEventElapsedTime},
        {"cuMemcpy", (void*)cuMemcpy}, {"cuMemcpyAsync", (void*)cuMemcpyAsync},
        {"cuMemcpy2DAsync", (void*)cuMemcpy2DAsync_v2},
        {"cuMemHostAlloc", (void*)cuMemHostAlloc}, {"cuMemFreeHost", (void*)cuMemFreeHost},
        {"cuMemHostRegister", (void*)cuMemHostRegister_v2},
        {"cuMemHostUnregister", (void*)cuMemHostUnregister},
        {"cuMemHostGetDevicePointer", (void*)cuMemHostGetDevicePointer_v2},
        {"cuPointerGetAttribute", (void*)cuPointerGetAttribute},
    };
    if (std::string(name) == "cuMemcpyBatchAsync") {
        if (version < 12080 || std::getenv("FAKE_CUDA_NO_BATCH")) { *fn = nullptr; return 500; }
        *fn = (void*)cuMemcpyBatchAsync;
        if (status) *status = 0;
        return 0;
    }
    auto it = table.find(name);
    if (it == table.end()) { *fn = nullptr; return 500; }
    *fn = it->second;
    if (status) *status = 0;
    return 0;
}

}  // extern "C"
