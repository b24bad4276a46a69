// A fake, ASYNCHRONOUS libcuda.so.1 for testing kvswitch's cuda backend without a GPU.
//
// Built by tests/_fake_cuda.py (build_fake_driver); never part of the package:
//   c++ -std=c++17 -O1 -shared -fPIC -pthread -o libcuda.so.1 fake_cuda.cpp
//
// The model
// ---------
// * Every address, "device" ones too, is a host address.
// * A stream is a FIFO of operations (copy, event record, wait on an event, wait on a
//   32-bit value, write a 32-bit value, test gate) run IN ORDER by an executor thread.
//   Enqueueing returns at once: bytes move when the copy EXECUTES, as on a GPU, so a
//   missing wait or event shows up as wrong bytes or a hang instead of passing by luck.
// * Streams from cuStreamCreate[WithPriority] are real objects. Any other handle value
//   where a stream is expected (0x1234, or 0 = the legacy default stream) is a "foreign"
//   stream, created on first use and kept by handle value (tests use such handles as
//   stand-ins for a consumer's stream). Handle 0 is an ordinary stream here: the legacy
//   default stream's implicit synchronization with other streams is NOT modelled.
//   Unknown non-null event handles are likewise foreign events (never recorded until
//   someone records them), so a caller's raw event handle can be waited on.
// * Each stream has its own executor thread, so streams run concurrently. With
//   CUDA_DEVICE_MAX_CONNECTIONS=1 set at load, ONE executor runs the operations of all
//   streams in global enqueue order, like a GPU with a single hardware queue: a blocked
//   wait blocks every later operation of every stream.
// * Waits on values poll memory (the host may write the word directly); everything else
//   is woken through one condition variable. State lives in one heap object that is never
//   destroyed and executor threads are never joined at exit, so a process may exit with
//   streams blocked forever (a test's gate) without hanging or crashing. (A copy still
//   RUNNING while the interpreter frees its buffers at exit would write freed memory, as
//   on a GPU: synchronize before exiting, or leave the stream gated.)
// * A 2D copy endpoint typed CU_MEMORYTYPE_DEVICE that lies in page-locked host memory
//   (cuMemHostAlloc/registered) is refused (CUDA_ERROR_INVALID_VALUE), as a real driver
//   refuses a host pointer given as device memory. Device-to-device copies are counted
//   (memcpy_2d_dtod, batch_dtod_copies) as the caller declared them.
// * Stream memory operations only touch live memory: a wait on a word outside any
//   cuMemHostAlloc/registered range passes (counted: stale_flag_waits), a write outside
//   any page-locked or cuMemAlloc range is dropped (counted: stale_flag_writes).
// * A copy with neither end page-locked (pageable host memory; not a declared
//   device-to-device copy) is synchronous, as on a GPU: the API call drains the stream's
//   earlier work and runs the copy before it returns (pageable_sync_calls).
// * cuGetProcAddress answers per (name, asked-for version range): the CUDA 13.0 ABI of
//   cuMemcpyBatchAsync (>= 13000, no failIdx) and the v1 stream memory operations (< 11070)
//   are stubs that abort loudly if called; every request is logged (fake_proc_requests).
// * Stream capture: cuStreamBeginCapture/EndCapture and cuThreadExchangeStreamCaptureMode.
//   Work enqueued on a capturing stream goes into the graph (dropped, captured_ops). A
//   "potentially unsafe" call (synchronize, event query, allocation, registration) made
//   while a GLOBAL-mode capture runs on another thread, unless the calling thread's mode
//   is relaxed (or thread-local), fails with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and
//   invalidates that capture, as cuda.h describes.
// * Sticky errors (fake_fault_copy): a copy faults when it executes; from then on every
//   call that uses the context fails with that error, blocked waits included, until
//   cuDevicePrimaryCtxReset; faulted streams run nothing more.
// * cuMemcpyBatchAsync's failIdx names the copy an error is about, or is SIZE_MAX.
// * Tests steer it through the fake_* control functions at the end (no context needed):
//   counters, per-operation delays to widen races, gates that block a stream, failure
//   injection for any call. FAKE_CUDA_* environment variables are read at load.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

extern "C" {
// The first 14 fields are those of the old synchronous fake, in the same order: tests
// written against it read a prefix of this struct.
struct Counters {
    long memcpy_async, memcpy_2d, batch_calls, batch_copies, host_alloc, streams_created,
        stream_priority, wait_value, write_value, wait_event, event_record, ctx_retain,
        ctx_release, no_context_errors;
    long spin_waits, stale_flag_waits, pageable_copies, host_register, host_unregister,
        proc_legacy_flag, proc_other_flag, ctx_synchronize, batch_prefer_overlap,
        events_blocking_sync, stream_is_capturing_calls, stale_flag_writes;
    // Device-to-device copies as the caller declared them: 2D copies with
    // CU_MEMORYTYPE_DEVICE on both ends, batch copies with device location hints on both.
    long memcpy_2d_dtod, batch_dtod_copies;
    // Issue 22: ops dropped into a capture (not run), unsafe calls refused during a capture,
    // cuGetProcAddress answers that were a stub ABI, calls refused by a sticky error,
    // copies that ran synchronously inside their API call (pageable memory).
    long captured_ops, capture_violations, proc_stub_resolutions, sticky_refusals,
        pageable_sync_calls;
};
}

namespace {

using CUresult = int;
constexpr CUresult kSuccess = 0, kInvalidValue = 1, kOutOfMemory = 2, kInvalidDevice = 101,
                   kInvalidContext = 201, kInvalidHandle = 400, kNotFound = 500,
                   kNotReady = 600, kIllegalAddress = 700, kAlreadyRegistered = 712,
                   kNotRegistered = 713, kCaptureUnsupported = 900,
                   kCaptureInvalidated = 901, kCaptureUnmatched = 903,
                   kCaptureIsolation = 905, kCapturedEvent = 907, kCaptureWrongThread = 908,
                   kUnknown = 999;
// CUstreamCaptureMode and CUstreamCaptureStatus (cuda.h)
constexpr int kModeGlobal = 0, kModeThreadLocal = 1, kModeRelaxed = 2;
constexpr int kCapNone = 0, kCapActive = 1, kCapInvalidated = 2;
// FAKE_CUDA_FAIL_COPY_AFTER's error: no real code, so cuGetErrorName says CUDA_ERROR_FAKE
// (an existing test looks for that name).
constexpr CUresult kLegacyFakeError = 9999;

constexpr unsigned kEventBlockingSync = 0x1, kEventDisableTiming = 0x2;
constexpr int kMemHost = 1, kMemDevice = 2;  // CUmemorytype
constexpr auto kPoll = std::chrono::microseconds(30);  // wait-value polling period

Counters g_counters;  // POD: nothing runs at exit
thread_local void* g_current = nullptr;
thread_local int g_capture_mode = kModeGlobal;  // cuThreadExchangeStreamCaptureMode

void bump(long& c, long n = 1) { __atomic_fetch_add(&c, n, __ATOMIC_RELAXED); }

struct Stream;
struct Event {
    unsigned flags = 0;
    long recorded = 0;   // generation of the latest cuEventRecord call
    long completed = 0;  // highest generation whose record op has executed
    double stamp = 0;    // steady clock, seconds, when `completed` was set
    bool captured = false;  // last recorded inside a capture sequence (never runs)
};
struct Segment {  // one copy: `height` rows of `width` bytes
    char* dst;
    const char* src;
    std::size_t width, height, dpitch, spitch;
};
enum class Kind { kCopy, kRecord, kWaitEvent, kWaitValue, kWriteValue, kGate };
struct Op {
    explicit Op(Kind k) : kind(k) {}
    Kind kind;
    Stream* stream = nullptr;
    std::vector<Segment> segs;     // kCopy
    std::shared_ptr<Event> event;  // kRecord, kWaitEvent
    long gen = 0;                  // kRecord, kWaitEvent
    std::uintptr_t addr = 0;       // kWaitValue, kWriteValue
    std::uint32_t value = 0;       // kWaitValue, kWriteValue
    long gate = 0;                 // kGate
};
struct Executor {
    std::deque<Op*> queue;  // front = executing or blocked; popped once complete
    bool stop = false;
    bool running = false;  // the front op runs with the lock released
    std::thread thread;
};
// Streams are never deleted (destroy stops the thread): a pointer taken under the lock by
// cuCtxSynchronize or an executor stays valid whatever other threads do.
struct Stream {
    Executor* ex = nullptr;
    long enqueued = 0, completed = 0;  // FIFO: the first `completed` ops are done
    int capturing = 0;                 // fake_set_capturing (status only, nothing dropped)
    bool foreign = false;
    // A capture sequence (cuStreamBeginCapture): ops enqueued meanwhile go into the graph
    // (dropped here), as on a GPU.
    int cap_status = kCapNone;
    int cap_mode = kModeGlobal;
    std::thread::id cap_thread;
};
struct Range {
    std::size_t size;
    int type;         // kMemHost (page-locked) or kMemDevice (cuMemAlloc)
    bool host_alloc;  // from cuMemHostAlloc (vs cuMemHostRegister)
};
struct FailRule {
    long skip, count;
};

long env_long(const char* name, long dflt) {
    const char* s = std::getenv(name);
    return s && *s ? std::strtol(s, nullptr, 0) : dflt;
}

struct State {
    std::mutex mu;  // guards everything below except the atomics
    std::condition_variable cv;  // any op completed, event completed, gate opened, enqueue
    std::unordered_map<std::uintptr_t, Stream*> streams;
    std::unordered_map<std::uintptr_t, std::shared_ptr<Event>> events;
    std::map<std::uintptr_t, Range> ranges;  // by start address
    std::map<long, bool> gates;              // id -> open
    long next_gate = 0;
    std::map<std::string, FailRule> fails;
    bool any_fail = false;  // fast path: no lock when nothing is armed (atomic access)
    long copy_delay_us = 0, write_delay_us = 0;  // atomic access
    std::map<std::string, long> call_delay_us;  // "call:<name>": sleep inside that API call
    Executor* global = nullptr;  // serialized mode's single executor, made on first use
    long legacy_copy_calls = 0;
    // Sticky error (fake_fault_copy): the copy op executed after `fault_skip` more copies
    // faults; from then on every call that uses the context returns `sticky` until
    // cuDevicePrimaryCtxReset. Atomic access for `sticky`.
    int sticky = 0;
    long fault_skip = -1;
    int fault_code = kIllegalAddress;
    // cuGetProcAddress requests as "name@version" in call order.
    std::vector<std::string> proc_requests;

    // Read once at load.
    bool serialized = false;
    int device_count = 1;
    int driver_version = 12080;
    bool no_batch = false;
    long fail_copy_after = -1;
    bool fail_record_set = false;
    std::uintptr_t fail_record_on = 0;
    char* ctx_dummies = nullptr;  // one primary "context" per device

    State() {
        const char* conn = std::getenv("CUDA_DEVICE_MAX_CONNECTIONS");
        serialized = conn && std::atoi(conn) == 1;
        device_count = static_cast<int>(env_long("FAKE_CUDA_DEVICE_COUNT", 1));
        if (device_count < 0) device_count = 0;
        no_batch = std::getenv("FAKE_CUDA_NO_BATCH") != nullptr;
        driver_version = static_cast<int>(
            env_long("FAKE_CUDA_DRIVER_VERSION", no_batch ? 12040 : 12080));
        fail_copy_after = env_long("FAKE_CUDA_FAIL_COPY_AFTER", -1);
        if (const char* s = std::getenv("FAKE_CUDA_FAIL_RECORD_ON")) {
            fail_record_set = true;
            fail_record_on = std::strtoull(s, nullptr, 0);
        }
        ctx_dummies = new char[device_count > 0 ? device_count : 1];
        parse_fail_spec(std::getenv("FAKE_CUDA_FAIL"));
    }

    // "name:skip:count[,name:skip:count...]"
    void parse_fail_spec(const char* spec) {
        if (!spec) return;
        std::string s(spec);
        std::size_t pos = 0;
        while (pos <= s.size()) {
            std::size_t end = s.find(',', pos);
            if (end == std::string::npos) end = s.size();
            std::string item = s.substr(pos, end - pos);
            std::size_t c1 = item.find(':'), c2 = item.rfind(':');
            if (c1 != std::string::npos && c2 != c1) {
                fails[item.substr(0, c1)] = {std::atol(item.c_str() + c1 + 1),
                                             std::atol(item.c_str() + c2 + 1)};
                any_fail = true;
            } else if (!item.empty()) {
                std::fprintf(stderr, "fake_cuda: ignoring FAKE_CUDA_FAIL item '%s'\n",
                             item.c_str());
            }
            pos = end + 1;
        }
    }
};

State& S() {
    static State* s = new State();  // never destroyed: threads may use it during exit
    return *s;
}
__attribute__((constructor)) void read_env_at_load() { S(); }

double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// fake_fail / FAKE_CUDA_FAIL: true when this call of `name` must fail.
bool injected_failure(const char* name) {
    State& g = S();
    if (!__atomic_load_n(&g.any_fail, __ATOMIC_ACQUIRE)) return false;
    std::lock_guard<std::mutex> lock(g.mu);
    auto it = g.fails.find(name);
    if (it == g.fails.end()) return false;
    if (it->second.skip > 0) {
        --it->second.skip;
        return false;
    }
    if (it->second.count > 0) {
        --it->second.count;
        return true;
    }
    return false;
}
int sticky_code() { return __atomic_load_n(&S().sticky, __ATOMIC_ACQUIRE); }

// Every call that uses the context: an injected failure, or the sticky error after a
// fault (a real driver fails every such call until the context is reset).
#define FAKE_ENTRY(name)                                \
    do {                                                \
        if (injected_failure(name)) return kUnknown;    \
        if (int sticky_ = sticky_code()) {              \
            bump(g_counters.sticky_refusals);           \
            return sticky_;                             \
        }                                               \
    } while (0)
// Calls that do not use the context (versions, error strings, device queries, context
// binding): only injected failures.
#define FAKE_ENTRY_NO_CONTEXT(name)                     \
    do {                                                \
        if (injected_failure(name)) return kUnknown;    \
    } while (0)

// Stream capture (cuda.h, cuThreadExchangeStreamCaptureMode): a "potentially unsafe" call
// (a synchronization, an event query, an allocation or registration) is prohibited
// while this thread has a capture not begun in relaxed mode, or, unless this thread's
// mode is THREAD_LOCAL or RELAXED, while any other thread has a GLOBAL-mode capture. A
// prohibited call fails with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidates those
// captures (cuStreamEndCapture then returns CUDA_ERROR_STREAM_CAPTURE_INVALIDATED).
bool capture_prohibits() {
    if (g_capture_mode == kModeRelaxed) return false;
    State& g = S();
    std::lock_guard<std::mutex> lock(g.mu);
    const auto me = std::this_thread::get_id();
    bool prohibited = false;
    for (auto& kv : g.streams) {
        Stream* s = kv.second;
        if (s->cap_status == kCapNone) continue;
        const bool own = s->cap_thread == me && s->cap_mode != kModeRelaxed;
        const bool other_global = s->cap_thread != me && s->cap_mode == kModeGlobal &&
                                  g_capture_mode == kModeGlobal;
        if (own || other_global) {
            s->cap_status = kCapInvalidated;
            prohibited = true;
        }
    }
    if (prohibited) bump(g_counters.capture_violations);
    return prohibited;
}
#define FAKE_UNSAFE_DURING_CAPTURE()                    \
    do {                                                \
        if (capture_prohibits()) return kCaptureUnsupported; \
    } while (0)

bool need_ctx() {
    if (g_current) return true;
    bump(g_counters.no_context_errors);
    return false;
}

// FAKE_CUDA_FAIL_COPY_AFTER=n: the (n+1)-th copy call fails, once.
bool legacy_copy_fails() {
    State& g = S();
    if (g.fail_copy_after < 0) return false;
    std::lock_guard<std::mutex> lock(g.mu);
    return g.legacy_copy_calls++ == g.fail_copy_after;
}

bool valid_device(int dev) { return dev >= 0 && dev < S().device_count; }

// ---- memory ranges (lock held) ----
const Range* find_range(std::uintptr_t a) {
    auto& r = S().ranges;
    auto it = r.upper_bound(a);
    if (it == r.begin()) return nullptr;
    --it;
    return a < it->first + (it->second.size ? it->second.size : 1) ? &it->second : nullptr;
}
bool is_pinned(std::uintptr_t a) {
    const Range* r = find_range(a);
    return r && r->type == kMemHost;
}
bool overlaps(std::uintptr_t a, std::size_t n) {
    auto& r = S().ranges;
    auto it = r.lower_bound(a);
    if (it != r.end() && it->first < a + n) return true;
    if (it == r.begin()) return false;
    --it;
    return it->first + it->second.size > a;
}

// ---- streams and events (lock held) ----
void exec_loop(Executor* ex);

Executor* new_executor() {
    State& g = S();
    if (g.serialized) {
        if (!g.global) {
            g.global = new Executor();
            g.global->thread = std::thread(exec_loop, g.global);
        }
        return g.global;
    }
    auto* ex = new Executor();
    ex->thread = std::thread(exec_loop, ex);
    return ex;
}

// Real streams are keyed by their address, foreign ones by the caller's handle value.
Stream* create_stream(bool foreign, std::uintptr_t handle) {
    auto* s = new Stream();
    s->foreign = foreign;
    s->ex = new_executor();
    S().streams[foreign ? handle : reinterpret_cast<std::uintptr_t>(s)] = s;
    return s;
}

Stream* stream_for(std::uintptr_t h) {
    auto& streams = S().streams;
    auto it = streams.find(h);
    return it != streams.end() ? it->second : create_stream(true, h);
}
Stream* stream_for(void* h) { return stream_for(reinterpret_cast<std::uintptr_t>(h)); }

std::shared_ptr<Event> event_for(void* h) {  // h != nullptr
    auto& evs = S().events;
    const auto key = reinterpret_cast<std::uintptr_t>(h);
    auto it = evs.find(key);
    if (it != evs.end()) return it->second;
    auto e = std::make_shared<Event>();  // foreign: default flags, never recorded
    evs[key] = e;
    return e;
}

// On a stream that is capturing, the op goes into the graph: it is not run (dropped here).
void enqueue(Stream* s, Op* op) {
    if (s->cap_status != kCapNone) {
        bump(g_counters.captured_ops);
        delete op;
        return;
    }
    op->stream = s;
    ++s->enqueued;
    s->ex->queue.push_back(op);
    S().cv.notify_all();
}

// Blocks until the first `target` ops of s completed; returns the sticky error if the
// context faulted meanwhile (its work never completes then).
CUresult wait_stream(Stream* s, long target, std::unique_lock<std::mutex>& lk) {
    S().cv.wait(lk, [&] { return s->completed >= target || sticky_code(); });
    return sticky_code();
}

// Copies with neither end page-locked (nor declared device-to-device): "pageable". Each
// such segment is counted in pageable_copies.
bool count_pageable(const std::vector<Segment>& segs) {
    bool any = false;
    for (const Segment& c : segs)
        if (!is_pinned(reinterpret_cast<std::uintptr_t>(c.src)) &&
            !is_pinned(reinterpret_cast<std::uintptr_t>(c.dst))) {
            bump(g_counters.pageable_copies);
            any = true;
        }
    return any;
}

// Enqueues a copy of `segs` on s. A pageable copy is synchronous, as on a GPU (the driver
// stages it through a bounce buffer inside the call): the call drains the stream's earlier
// work and runs the copy before it returns. Lock held.
CUresult enqueue_copy(Stream* s, std::vector<Segment> segs, bool may_be_pageable,
                      std::unique_lock<std::mutex>& lk) {
    const bool pageable = may_be_pageable && count_pageable(segs);
    auto* op = new Op(Kind::kCopy);
    op->segs = std::move(segs);
    enqueue(s, op);
    if (!pageable) return kSuccess;
    bump(g_counters.pageable_sync_calls);
    return wait_stream(s, s->enqueued, lk);
}

// cyclic >=, as CU_STREAM_WAIT_VALUE_GEQ; a word outside any live page-locked range reads
// as satisfied (`stale`): its memory is gone, a GPU would read garbage.
bool wait_value_satisfied(const Op& op, bool* stale) {
    if (!is_pinned(op.addr) || !is_pinned(op.addr + 3)) {
        *stale = true;
        return true;
    }
    const std::uint32_t v =
        __atomic_load_n(reinterpret_cast<const std::uint32_t*>(op.addr), __ATOMIC_ACQUIRE);
    return static_cast<std::int32_t>(v - op.value) >= 0;
}

bool op_ready(const Op& op) {  // lock held
    State& g = S();
    switch (op.kind) {
        case Kind::kWaitEvent:
            return op.event->completed >= op.gen;
        case Kind::kGate:
            return g.gates[op.gate];
        case Kind::kWaitValue: {
            bool stale = false;
            const bool ok = wait_value_satisfied(op, &stale);
            if (stale) bump(g_counters.stale_flag_waits);
            return ok;
        }
        default:
            return true;
    }
}

void sleep_us(long us) {
    if (us > 0) std::this_thread::sleep_for(std::chrono::microseconds(us));
}

// fake_set_delay_us("call:<name>", us): the API call <name> sleeps after it enqueued its
// work, before it returns -- widens a race window in the caller (lock not held).
void call_delay(const char* name) {
    long us = 0;
    {
        State& g = S();
        std::lock_guard<std::mutex> lock(g.mu);
        auto it = g.call_delay_us.find(name);
        if (it != g.call_delay_us.end()) us = it->second;
    }
    sleep_us(us);
}

// Runs op; false when it faulted instead (fake_fault_copy): the context is then sticky
// and the op never completes. Lock held on entry and exit.
bool run_op(Executor* ex, Op& op, std::unique_lock<std::mutex>& lk) {
    State& g = S();
    switch (op.kind) {
        case Kind::kCopy:
            if (g.fault_skip >= 0 && g.fault_skip-- == 0) {
                __atomic_store_n(&g.sticky, g.fault_code, __ATOMIC_RELEASE);
                g.cv.notify_all();
                return false;
            }
            ex->running = true;
            lk.unlock();  // other streams run meanwhile
            for (const Segment& c : op.segs) {
                sleep_us(__atomic_load_n(&g.copy_delay_us, __ATOMIC_RELAXED));
                for (std::size_t row = 0; row < c.height; ++row)
                    std::memmove(c.dst + row * c.dpitch, c.src + row * c.spitch, c.width);
            }
            lk.lock();
            ex->running = false;
            break;
        case Kind::kRecord:
            if (op.gen > op.event->completed) {
                op.event->completed = op.gen;
                op.event->stamp = now_s();
            }
            break;
        case Kind::kWriteValue: {
            const long delay = __atomic_load_n(&g.write_delay_us, __ATOMIC_RELAXED);
            if (delay > 0) {
                ex->running = true;
                lk.unlock();
                sleep_us(delay);
                lk.lock();
                ex->running = false;
            }
            // Only into live memory: a write into freed heap memory would corrupt malloc.
            const Range* r = find_range(op.addr);
            if (r && find_range(op.addr + 3) == r)
                __atomic_store_n(reinterpret_cast<std::uint32_t*>(op.addr), op.value,
                                 __ATOMIC_RELEASE);
            else
                bump(g_counters.stale_flag_writes);
            break;
        }
        default:
            break;
    }
    return true;
}

void exec_loop(Executor* ex) {
    State& g = S();
    std::unique_lock<std::mutex> lk(g.mu);
    for (;;) {
        if (sticky_code()) {  // a faulted context runs nothing until it is reset
            g.cv.wait(lk);
            continue;
        }
        if (ex->queue.empty()) {
            if (ex->stop) return;
            g.cv.wait(lk);
            continue;
        }
        Op* op = ex->queue.front();
        if (!op_ready(*op)) {
            // The host may write a waited-on word without telling us: poll those.
            if (op->kind == Kind::kWaitValue)
                g.cv.wait_for(lk, kPoll);
            else
                g.cv.wait(lk);
            continue;
        }
        if (!run_op(ex, *op, lk)) continue;
        ex->queue.pop_front();
        ++op->stream->completed;
        delete op;
        g.cv.notify_all();
    }
}


struct Memcpy2D {  // CUDA_MEMCPY2D_v2
    std::size_t srcXInBytes, srcY;
    int srcMemoryType;
    const void* srcHost;
    unsigned long long srcDevice;
    void* srcArray;
    std::size_t srcPitch;
    std::size_t dstXInBytes, dstY;
    int dstMemoryType;
    void* dstHost;
    unsigned long long dstDevice;
    void* dstArray;
    std::size_t dstPitch;
    std::size_t WidthInBytes, Height;
};
struct MemLocation {
    int type, id;
};
struct MemcpyAttributes {  // CUmemcpyAttributes (CUDA 12.8)
    int srcAccessOrder;
    MemLocation srcLocHint, dstLocHint;
    unsigned flags;
};
constexpr int kMemUnified = 4;
constexpr int kLocDevice = 1;  // CU_MEM_LOCATION_TYPE_DEVICE
constexpr unsigned kPreferOverlapWithCompute = 0x1;

// Address of a CUDA_MEMCPY2D endpoint: host, device or unified memory (all host here).
bool endpoint_2d(int type, const void* host, unsigned long long dev, std::size_t x,
                 std::size_t y, std::size_t pitch, char** out) {
    char* base;
    if (type == kMemHost)
        base = static_cast<char*>(const_cast<void*>(host));
    else if (type == kMemDevice || type == kMemUnified)
        base = reinterpret_cast<char*>(dev);
    else
        return false;  // arrays are not modelled
    *out = base + y * pitch + x;
    return true;
}

}  // namespace

extern "C" {

// ---------------------------------------------------------------- init, errors, version
CUresult cuInit(unsigned) {
    FAKE_ENTRY_NO_CONTEXT("cuInit");
    return kSuccess;
}
CUresult cuDriverGetVersion(int* v) {
    FAKE_ENTRY_NO_CONTEXT("cuDriverGetVersion");
    *v = S().driver_version;
    return kSuccess;
}
CUresult cuGetErrorName(CUresult r, const char** s) {
    FAKE_ENTRY_NO_CONTEXT("cuGetErrorName");
    switch (r) {
        case kSuccess: *s = "CUDA_SUCCESS"; break;
        case kInvalidValue: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case kInvalidContext: *s = "CUDA_ERROR_INVALID_CONTEXT"; break;
        case kInvalidHandle: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case kNotReady: *s = "CUDA_ERROR_NOT_READY"; break;
        case kIllegalAddress: *s = "CUDA_ERROR_ILLEGAL_ADDRESS"; break;
        case kCaptureUnsupported: *s = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
        case kCaptureInvalidated: *s = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
        case kCaptureUnmatched: *s = "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED"; break;
        case kCaptureIsolation: *s = "CUDA_ERROR_STREAM_CAPTURE_ISOLATION"; break;
        case kCapturedEvent: *s = "CUDA_ERROR_CAPTURED_EVENT"; break;
        case kCaptureWrongThread: *s = "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD"; break;
        case kUnknown: *s = "CUDA_ERROR_UNKNOWN"; break;
        default: *s = "CUDA_ERROR_FAKE"; break;
    }
    return kSuccess;
}
CUresult cuGetErrorString(CUresult r, const char** s) {
    FAKE_ENTRY_NO_CONTEXT("cuGetErrorString");
    switch (r) {
        case kUnknown: *s = "fake driver: injected failure"; break;
        case kNotReady: *s = "fake driver: not ready"; break;
        case kInvalidHandle: *s = "fake driver: invalid handle"; break;
        case kInvalidValue: *s = "fake driver: invalid value"; break;
        case kInvalidContext: *s = "fake driver: no current context"; break;
        case kIllegalAddress: *s = "fake driver: injected fault (sticky until reset)"; break;
        case kCaptureUnsupported:
            *s = "operation not permitted when stream is capturing";
            break;
        default: *s = "fake driver error"; break;
    }
    return kSuccess;
}

// ---------------------------------------------------------------- devices and contexts
CUresult cuDeviceGetCount(int* n) {
    FAKE_ENTRY_NO_CONTEXT("cuDeviceGetCount");
    *n = S().device_count;
    return kSuccess;
}
CUresult cuDeviceGet(int* d, int ordinal) {
    FAKE_ENTRY_NO_CONTEXT("cuDeviceGet");
    if (!valid_device(ordinal)) return kInvalidDevice;
    *d = ordinal;
    return kSuccess;
}
// What an H100 SXM reports (CUDA 12.x/13 driver): the v1 stream memory-op attributes
// (92-94) are 0 although cuStreamWaitValue32_v2 works; 122/123 are the v2 ones.
CUresult cuDeviceGetAttribute(int* v, int attr, int dev) {
    FAKE_ENTRY_NO_CONTEXT("cuDeviceGetAttribute");
    if (!valid_device(dev)) return kInvalidDevice;
    switch (attr) {
        case 16: *v = 132; break;               // MULTIPROCESSOR_COUNT
        case 33: *v = 0x1b + dev; break;        // PCI_BUS_ID
        case 75: *v = 9; break;                 // COMPUTE_CAPABILITY_MAJOR
        case 122: case 123: *v = 1; break;      // 64-bit mem ops, WAIT_VALUE_NOR
        default: *v = 0; break;                 // 92-94, 34, 50, 76, 134, ...
    }
    return kSuccess;
}
CUresult cuDeviceGetName(char* name, int len, int dev) {
    FAKE_ENTRY_NO_CONTEXT("cuDeviceGetName");
    if (!valid_device(dev)) return kInvalidDevice;
    if (!name || len <= 0) return kInvalidValue;
    std::snprintf(name, static_cast<std::size_t>(len), "Fake NVIDIA H100 80GB HBM3");
    return kSuccess;
}
CUresult cuDeviceGetPCIBusId(char* id, int len, int dev) {
    FAKE_ENTRY_NO_CONTEXT("cuDeviceGetPCIBusId");
    if (!valid_device(dev)) return kInvalidDevice;
    if (!id || len <= 0) return kInvalidValue;
    std::snprintf(id, static_cast<std::size_t>(len), "0000:%02X:00.0", 0x1b + dev);
    return kSuccess;
}
CUresult cuDeviceTotalMem_v2(std::size_t* bytes, int dev) {
    FAKE_ENTRY_NO_CONTEXT("cuDeviceTotalMem");
    if (!valid_device(dev)) return kInvalidDevice;
    *bytes = std::size_t(80) << 30;
    return kSuccess;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) {
    FAKE_ENTRY_NO_CONTEXT("cuDevicePrimaryCtxRetain");
    if (!valid_device(dev)) return kInvalidDevice;
    bump(g_counters.ctx_retain);
    *ctx = &S().ctx_dummies[dev];
    return kSuccess;
}
CUresult cuDevicePrimaryCtxRelease_v2(int dev) {
    FAKE_ENTRY_NO_CONTEXT("cuDevicePrimaryCtxRelease");
    if (!valid_device(dev)) return kInvalidDevice;
    bump(g_counters.ctx_release);
    return kSuccess;
}
// Clears a sticky error. Work queued before is dropped (its records count as complete,
// so nothing waits for ever); streams, events and memory stay usable (a real reset
// destroys them: a test must not rely on that).
CUresult cuDevicePrimaryCtxReset_v2(int dev) {
    FAKE_ENTRY_NO_CONTEXT("cuDevicePrimaryCtxReset");
    if (!valid_device(dev)) return kInvalidDevice;
    State& g = S();
    std::lock_guard<std::mutex> lock(g.mu);
    std::vector<Executor*> executors;
    for (auto& kv : g.streams) {
        Executor* ex = kv.second->ex;
        if (ex && std::find(executors.begin(), executors.end(), ex) == executors.end())
            executors.push_back(ex);
        kv.second->cap_status = kCapNone;
    }
    for (Executor* ex : executors) {
        const std::size_t keep = ex->running ? 1 : 0;  // finishes and pops itself
        while (ex->queue.size() > keep) {
            Op* op = ex->queue.back();
            ex->queue.pop_back();
            ++op->stream->completed;
            delete op;
        }
    }
    for (auto& kv : g.events) kv.second->completed = kv.second->recorded;
    g.fault_skip = -1;
    __atomic_store_n(&g.sticky, 0, __ATOMIC_RELEASE);
    g.cv.notify_all();
    return kSuccess;
}
CUresult cuThreadExchangeStreamCaptureMode(int* mode) {
    FAKE_ENTRY("cuThreadExchangeStreamCaptureMode");
    if (!mode || *mode < kModeGlobal || *mode > kModeRelaxed) return kInvalidValue;
    std::swap(*mode, g_capture_mode);
    return kSuccess;
}
CUresult cuCtxSetCurrent(void* c) {
    FAKE_ENTRY_NO_CONTEXT("cuCtxSetCurrent");
    g_current = c;
    return kSuccess;
}
CUresult cuCtxGetCurrent(void** c) {
    FAKE_ENTRY_NO_CONTEXT("cuCtxGetCurrent");
    *c = g_current;
    return kSuccess;
}
CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    FAKE_ENTRY("cuCtxGetStreamPriorityRange");
    *least = 0;
    *greatest = -5;
    return kSuccess;
}
// Waits for every op enqueued on any stream before the call.
CUresult cuCtxSynchronize() {
    FAKE_ENTRY("cuCtxSynchronize");
    if (!need_ctx()) return kInvalidContext;
    FAKE_UNSAFE_DURING_CAPTURE();
    bump(g_counters.ctx_synchronize);
    State& g = S();
    std::unique_lock<std::mutex> lk(g.mu);
    std::vector<std::pair<Stream*, long>> targets;
    for (auto& kv : g.streams) targets.emplace_back(kv.second, kv.second->enqueued);
    for (auto& t : targets)
        if (CUresult r = wait_stream(t.first, t.second, lk)) return r;
    return kSuccess;
}

// ---------------------------------------------------------------- streams
CUresult cuStreamCreateWithPriority(void** s, unsigned, int priority) {
    FAKE_ENTRY("cuStreamCreateWithPriority");
    if (!need_ctx()) return kInvalidContext;
    bump(g_counters.streams_created);
    if (priority == 0) bump(g_counters.stream_priority);  // the lowest priority requested
    std::lock_guard<std::mutex> lock(S().mu);
    *s = create_stream(false, 0);
    return kSuccess;
}
CUresult cuStreamCreate(void** s, unsigned) {
    FAKE_ENTRY("cuStreamCreate");
    if (!need_ctx()) return kInvalidContext;
    bump(g_counters.streams_created);
    std::lock_guard<std::mutex> lock(S().mu);
    *s = create_stream(false, 0);
    return kSuccess;
}
// Drains the stream, then stops its thread (the Stream object itself is kept).
CUresult cuStreamDestroy_v2(void* h) {
    FAKE_ENTRY("cuStreamDestroy");
    State& g = S();
    std::unique_lock<std::mutex> lk(g.mu);
    auto it = g.streams.find(reinterpret_cast<std::uintptr_t>(h));
    if (it == g.streams.end() || it->second->foreign) return kInvalidHandle;
    Stream* s = it->second;
    g.streams.erase(it);
    if (CUresult r = wait_stream(s, s->enqueued, lk)) return r;  // faulted meanwhile
    if (g.serialized) return kSuccess;  // the shared executor goes on
    Executor* ex = s->ex;
    ex->stop = true;
    g.cv.notify_all();
    lk.unlock();
    ex->thread.join();
    delete ex;
    s->ex = nullptr;  // unreachable now: it left the registry
    return kSuccess;
}
CUresult cuStreamSynchronize(void* h) {
    FAKE_ENTRY("cuStreamSynchronize");
    if (!need_ctx()) return kInvalidContext;
    FAKE_UNSAFE_DURING_CAPTURE();
    std::unique_lock<std::mutex> lk(S().mu);
    Stream* s = stream_for(h);
    return wait_stream(s, s->enqueued, lk);
}
// A capture sequence's status, else what fake_set_capturing set.
CUresult cuStreamIsCapturing(void* h, int* status) {
    FAKE_ENTRY("cuStreamIsCapturing");
    bump(g_counters.stream_is_capturing_calls);
    std::lock_guard<std::mutex> lock(S().mu);
    Stream* s = stream_for(h);
    *status = s->cap_status != kCapNone ? s->cap_status : s->capturing;
    return kSuccess;
}
// From now on work enqueued on h goes into a graph (dropped here, counted captured_ops)
// until cuStreamEndCapture; `mode` governs which unsafe calls other threads may make.
CUresult cuStreamBeginCapture_v2(void* h, int mode) {
    FAKE_ENTRY("cuStreamBeginCapture");
    if (!need_ctx()) return kInvalidContext;
    if (mode < kModeGlobal || mode > kModeRelaxed) return kInvalidValue;
    std::lock_guard<std::mutex> lock(S().mu);
    Stream* s = stream_for(h);
    if (s->cap_status != kCapNone) return kCaptureUnsupported;  // already capturing
    s->cap_status = kCapActive;
    s->cap_mode = mode;
    s->cap_thread = std::this_thread::get_id();
    return kSuccess;
}
// *graph: a non-null dummy, or null when the capture was invalidated (then 901).
CUresult cuStreamEndCapture(void* h, void** graph) {
    FAKE_ENTRY("cuStreamEndCapture");
    if (!graph) return kInvalidValue;
    *graph = nullptr;
    std::lock_guard<std::mutex> lock(S().mu);
    Stream* s = stream_for(h);
    if (s->cap_status == kCapNone) return kCaptureUnmatched;
    if (s->cap_mode != kModeRelaxed && s->cap_thread != std::this_thread::get_id())
        return kCaptureWrongThread;
    const bool valid = s->cap_status == kCapActive;
    s->cap_status = kCapNone;
    if (!valid) return kCaptureInvalidated;
    static char dummy_graph;
    *graph = &dummy_graph;
    return kSuccess;
}
// The wait captures the event's latest record at CALL time, as CUDA does.
CUresult cuStreamWaitEvent(void* h, void* e, unsigned) {
    FAKE_ENTRY("cuStreamWaitEvent");
    if (!e) return kInvalidHandle;
    bump(g_counters.wait_event);
    std::lock_guard<std::mutex> lock(S().mu);
    auto ev = event_for(e);
    Stream* s = stream_for(h);
    // An event recorded inside a capture is a graph node: a stream outside the capture
    // cannot wait on it.
    if (ev->captured && s->cap_status == kCapNone) return kCaptureIsolation;
    if (ev->recorded == 0) return kSuccess;  // never recorded: nothing to wait for
    auto* op = new Op(Kind::kWaitEvent);
    op->event = ev;
    op->gen = ev->recorded;
    enqueue(s, op);
    return kSuccess;
}
CUresult cuStreamWaitValue32_v2(void* h, unsigned long long addr, unsigned value,
                                unsigned flags) {
    FAKE_ENTRY("cuStreamWaitValue32");
    if (flags != 0) return kInvalidValue;  // only CU_STREAM_WAIT_VALUE_GEQ is modelled
    bump(g_counters.wait_value);
    {
        std::lock_guard<std::mutex> lock(S().mu);
        auto* op = new Op(Kind::kWaitValue);
        op->addr = addr;
        op->value = value;
        enqueue(stream_for(h), op);
    }
    call_delay("cuStreamWaitValue32");
    return kSuccess;
}
CUresult cuStreamWriteValue32_v2(void* h, unsigned long long addr, unsigned value,
                                 unsigned flags) {
    FAKE_ENTRY("cuStreamWriteValue32");
    if (flags & ~1u) return kInvalidValue;  // DEFAULT or NO_MEMORY_BARRIER
    bump(g_counters.write_value);
    std::lock_guard<std::mutex> lock(S().mu);
    auto* op = new Op(Kind::kWriteValue);
    op->addr = addr;
    op->value = value;
    enqueue(stream_for(h), op);
    return kSuccess;
}

// ---------------------------------------------------------------- events
CUresult cuEventCreate(void** e, unsigned flags) {
    FAKE_ENTRY("cuEventCreate");
    if (!need_ctx()) return kInvalidContext;
    if (flags & kEventBlockingSync) bump(g_counters.events_blocking_sync);
    auto ev = std::make_shared<Event>();
    ev->flags = flags;
    std::lock_guard<std::mutex> lock(S().mu);
    *e = ev.get();
    S().events[reinterpret_cast<std::uintptr_t>(ev.get())] = ev;
    return kSuccess;
}
// Pending ops keep the event alive (shared_ptr), as CUDA defers the release.
CUresult cuEventDestroy_v2(void* e) {
    FAKE_ENTRY("cuEventDestroy");
    if (!e) return kInvalidHandle;
    std::lock_guard<std::mutex> lock(S().mu);
    return S().events.erase(reinterpret_cast<std::uintptr_t>(e)) ? kSuccess : kInvalidHandle;
}
// FAKE_CUDA_FAIL_RECORD_ON=<stream handle>: cuEventRecord on that stream fails
// (CUDA_ERROR_INVALID_HANDLE), as for a caller's after= stream that is not a valid stream.
CUresult cuEventRecord(void* e, void* h) {
    FAKE_ENTRY("cuEventRecord");
    State& g = S();
    if (!e) return kInvalidHandle;
    if (g.fail_record_set && reinterpret_cast<std::uintptr_t>(h) == g.fail_record_on)
        return kInvalidHandle;
    bump(g_counters.event_record);
    std::lock_guard<std::mutex> lock(g.mu);
    auto ev = event_for(e);
    Stream* s = stream_for(h);
    if (s->cap_status != kCapNone) {  // a graph node now: never completes outside a launch
        ev->captured = true;
        bump(g_counters.captured_ops);
        return kSuccess;
    }
    ev->captured = false;
    auto* op = new Op(Kind::kRecord);
    op->event = ev;
    op->gen = ++ev->recorded;
    enqueue(s, op);
    return kSuccess;
}
CUresult cuEventQuery(void* e) {
    FAKE_ENTRY("cuEventQuery");
    if (!e) return kInvalidHandle;
    FAKE_UNSAFE_DURING_CAPTURE();
    std::lock_guard<std::mutex> lock(S().mu);
    auto ev = event_for(e);
    if (ev->captured) return kCapturedEvent;  // prohibited even in relaxed mode
    return ev->completed >= ev->recorded ? kSuccess : kNotReady;
}
CUresult cuEventSynchronize(void* e) {
    FAKE_ENTRY("cuEventSynchronize");
    if (!e) return kInvalidHandle;
    FAKE_UNSAFE_DURING_CAPTURE();
    State& g = S();
    std::unique_lock<std::mutex> lk(g.mu);
    auto ev = event_for(e);
    if (ev->captured) return kCapturedEvent;
    // Without BLOCKING_SYNC a real driver spins a CPU core until the event completes.
    if (!(ev->flags & kEventBlockingSync)) bump(g_counters.spin_waits);
    const long target = ev->recorded;
    g.cv.wait(lk, [&] { return ev->completed >= target || sticky_code(); });
    return sticky_code();
}
CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    FAKE_ENTRY("cuEventElapsedTime");
    if (!a || !b) return kInvalidHandle;
    std::lock_guard<std::mutex> lock(S().mu);
    auto s = event_for(a), t = event_for(b);
    if ((s->flags | t->flags) & kEventDisableTiming) return kInvalidHandle;
    if (s->recorded == 0 || t->recorded == 0) return kInvalidHandle;
    if (s->completed < s->recorded || t->completed < t->recorded) return kNotReady;
    *ms = static_cast<float>((t->stamp - s->stamp) * 1e3);
    return kSuccess;
}

// ---------------------------------------------------------------- copies
CUresult cuMemcpy(unsigned long long dst, unsigned long long src, std::size_t n) {
    FAKE_ENTRY("cuMemcpy");
    FAKE_UNSAFE_DURING_CAPTURE();
    // Synchronous, and (unlike CUDA) not ordered after the legacy default stream.
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return kSuccess;
}
CUresult cuMemcpyAsync(unsigned long long dst, unsigned long long src, std::size_t n,
                       void* h) {
    FAKE_ENTRY("cuMemcpyAsync");
    if (!need_ctx()) return kInvalidContext;
    if (legacy_copy_fails()) return kLegacyFakeError;
    bump(g_counters.memcpy_async);
    std::unique_lock<std::mutex> lk(S().mu);
    return enqueue_copy(stream_for(h),
                        {{reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(src), n,
                          1, 0, 0}},
                        true, lk);
}
CUresult cuMemcpy2DAsync_v2(const Memcpy2D* m, void* h) {
    FAKE_ENTRY("cuMemcpy2DAsync");
    if (!need_ctx()) return kInvalidContext;
    if (!m) return kInvalidValue;
    char *src = nullptr, *dst = nullptr;
    if (!endpoint_2d(m->srcMemoryType, m->srcHost, m->srcDevice, m->srcXInBytes, m->srcY,
                     m->srcPitch, &src) ||
        !endpoint_2d(m->dstMemoryType, m->dstHost, m->dstDevice, m->dstXInBytes, m->dstY,
                     m->dstPitch, &dst))
        return kInvalidValue;
    if (m->Height > 1 && (m->srcPitch < m->WidthInBytes || m->dstPitch < m->WidthInBytes))
        return kInvalidValue;
    if (legacy_copy_fails()) return kLegacyFakeError;
    std::unique_lock<std::mutex> lk(S().mu);
    if ((m->srcMemoryType == kMemDevice && is_pinned(reinterpret_cast<std::uintptr_t>(src))) ||
        (m->dstMemoryType == kMemDevice && is_pinned(reinterpret_cast<std::uintptr_t>(dst))))
        return kInvalidValue;  // page-locked host memory named as device memory
    bump(g_counters.memcpy_2d);
    const bool dtod = m->srcMemoryType == kMemDevice && m->dstMemoryType == kMemDevice;
    if (dtod) bump(g_counters.memcpy_2d_dtod);
    return enqueue_copy(stream_for(h),
                        {{dst, src, m->WidthInBytes, m->Height, m->dstPitch, m->srcPitch}},
                        !dtod, lk);
}
// The CUDA 12.8/12.9 ABI (9 arguments, with failIdx). failIdx: the index of the copy an
// error is about, or SIZE_MAX when it is about none of them (cuda.h).
CUresult cuMemcpyBatchAsync(unsigned long long* dsts, unsigned long long* srcs,
                            std::size_t* sizes, std::size_t count, MemcpyAttributes* attrs,
                            std::size_t* idxs, std::size_t nattrs, std::size_t* fail_idx,
                            void* h) {
    if (fail_idx) *fail_idx = SIZE_MAX;
    FAKE_ENTRY("cuMemcpyBatchAsync");
    if (!need_ctx()) return kInvalidContext;
    // kvswitch passes one attribute for all copies, ordered after the stream's prior work.
    if (!dsts || !srcs || !sizes || count == 0 || !attrs || !idxs || nattrs < 1 ||
        idxs[0] != 0 || attrs[0].srcAccessOrder != 1)
        return kInvalidValue;
    if (h == nullptr) return kInvalidValue;  // "Must not be legacy NULL stream"
    for (std::size_t i = 0; i < count; ++i) {
        if (!dsts[i] || !srcs[i] || !sizes[i]) {  // one copy is wrong: it is named
            if (fail_idx) *fail_idx = i;
            return kInvalidValue;
        }
    }
    if (legacy_copy_fails()) return kLegacyFakeError;
    bump(g_counters.batch_calls);
    bump(g_counters.batch_copies, static_cast<long>(count));
    for (std::size_t i = 0; i < nattrs; ++i)
        if (attrs[i].flags & kPreferOverlapWithCompute) {
            bump(g_counters.batch_prefer_overlap);
            break;
        }
    const bool dtod =
        attrs[0].srcLocHint.type == kLocDevice && attrs[0].dstLocHint.type == kLocDevice;
    if (dtod) bump(g_counters.batch_dtod_copies, static_cast<long>(count));
    std::vector<Segment> segs;
    segs.reserve(count);
    for (std::size_t i = 0; i < count; ++i)
        segs.push_back({reinterpret_cast<char*>(dsts[i]),
                        reinterpret_cast<const char*>(srcs[i]), sizes[i], 1, 0, 0});
    std::unique_lock<std::mutex> lk(S().mu);
    return enqueue_copy(stream_for(h), std::move(segs), !dtod, lk);
}

// The CUDA 13.0 ABI of cuMemcpyBatchAsync (cuMemcpyBatchAsync_v2: 8 arguments, no
// failIdx), which cuGetProcAddress returns for versions >= 13000. kvswitch declares the
// 12.8 signature: calling this through it would shift every argument after numAttrs, so
// the stub stops the process loudly instead of copying garbage.
CUresult fake_stub_cuMemcpyBatchAsync_v2(unsigned long long*, unsigned long long*,
                                         std::size_t*, std::size_t, MemcpyAttributes*,
                                         std::size_t*, std::size_t, void*) {
    std::fprintf(stderr, "fake_cuda: cuMemcpyBatchAsync was resolved at CUDA >= 13.0, whose "
                         "ABI (8 arguments, no failIdx) kvswitch must not call\n");
    std::abort();
}
// The v1 stream memory operations (cuGetProcAddress below 11070): they need the
// deprecated CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1, which Hopper reports as 0.
CUresult fake_stub_cuStreamMemOp_v1(void*, unsigned long long, unsigned, unsigned) {
    std::fprintf(stderr, "fake_cuda: a v1 stream memory operation (cuGetProcAddress below "
                         "11070) was called; kvswitch must request the _v2 ones\n");
    std::abort();
}

// ---------------------------------------------------------------- memory
CUresult cuMemHostAlloc(void** p, std::size_t n, unsigned) {
    FAKE_ENTRY("cuMemHostAlloc");
    FAKE_UNSAFE_DURING_CAPTURE();
    if (!need_ctx()) return kInvalidContext;
    if (posix_memalign(p, 4096, n ? n : 1) != 0) return kOutOfMemory;
    bump(g_counters.host_alloc);
    std::lock_guard<std::mutex> lock(S().mu);
    S().ranges[reinterpret_cast<std::uintptr_t>(*p)] = {n, kMemHost, true};
    return kSuccess;
}
CUresult cuMemFreeHost(void* p) {
    FAKE_ENTRY("cuMemFreeHost");
    FAKE_UNSAFE_DURING_CAPTURE();
    {
        std::lock_guard<std::mutex> lock(S().mu);
        auto it = S().ranges.find(reinterpret_cast<std::uintptr_t>(p));
        if (it == S().ranges.end() || !it->second.host_alloc) return kInvalidValue;
        S().ranges.erase(it);  // from now on waits on it are stale
    }
    std::free(p);
    return kSuccess;
}
CUresult cuMemHostRegister_v2(void* p, std::size_t n, unsigned) {
    FAKE_ENTRY("cuMemHostRegister");
    FAKE_UNSAFE_DURING_CAPTURE();
    if (!p || n == 0) return kInvalidValue;
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    std::lock_guard<std::mutex> lock(S().mu);
    if (overlaps(a, n)) return kAlreadyRegistered;
    S().ranges[a] = {n, kMemHost, false};
    bump(g_counters.host_register);
    return kSuccess;
}
CUresult cuMemHostUnregister(void* p) {
    FAKE_ENTRY("cuMemHostUnregister");
    FAKE_UNSAFE_DURING_CAPTURE();
    std::lock_guard<std::mutex> lock(S().mu);
    auto it = S().ranges.find(reinterpret_cast<std::uintptr_t>(p));
    if (it == S().ranges.end() || it->second.type != kMemHost || it->second.host_alloc)
        return kNotRegistered;
    S().ranges.erase(it);
    bump(g_counters.host_unregister);
    return kSuccess;
}
CUresult cuMemHostGetDevicePointer_v2(unsigned long long* d, void* p, unsigned) {
    FAKE_ENTRY("cuMemHostGetDevicePointer");
    *d = reinterpret_cast<unsigned long long>(p);
    return kSuccess;
}
CUresult cuMemAlloc_v2(unsigned long long* d, std::size_t n) {
    FAKE_ENTRY("cuMemAlloc");
    FAKE_UNSAFE_DURING_CAPTURE();
    if (!need_ctx()) return kInvalidContext;
    if (n == 0) return kInvalidValue;
    void* p = nullptr;
    if (posix_memalign(&p, 4096, n) != 0) return kOutOfMemory;
    std::lock_guard<std::mutex> lock(S().mu);
    S().ranges[reinterpret_cast<std::uintptr_t>(p)] = {n, kMemDevice, false};
    *d = reinterpret_cast<unsigned long long>(p);
    return kSuccess;
}
CUresult cuMemFree_v2(unsigned long long d) {
    FAKE_ENTRY("cuMemFree");
    FAKE_UNSAFE_DURING_CAPTURE();
    {
        std::lock_guard<std::mutex> lock(S().mu);
        auto it = S().ranges.find(static_cast<std::uintptr_t>(d));
        if (it == S().ranges.end() || it->second.type != kMemDevice) return kInvalidValue;
        S().ranges.erase(it);
    }
    std::free(reinterpret_cast<void*>(d));
    return kSuccess;
}
CUresult cuPointerGetAttribute(void* out, int attr, unsigned long long ptr) {
    FAKE_ENTRY("cuPointerGetAttribute");
    if (attr == 9) {  // DEVICE_ORDINAL: device 0 for any pointer
        *static_cast<int*>(out) = 0;
        return kSuccess;
    }
    if (attr == 2) {  // MEMORY_TYPE; pageable memory is not known to the driver
        std::lock_guard<std::mutex> lock(S().mu);
        const Range* r = find_range(static_cast<std::uintptr_t>(ptr));
        if (!r) return kInvalidValue;
        *static_cast<unsigned*>(out) = static_cast<unsigned>(r->type);
        return kSuccess;
    }
    return kInvalidValue;
}

// ---------------------------------------------------------------- cuGetProcAddress
namespace {
// One entry per ABI of a name: [min_version, end_version) of the version asked for. A
// `stub` is an ABI kvswitch must never request (a different signature or semantics than
// kvswitch declares): a real driver would return it without complaint, so the fake does
// too, counts it (proc_stub_resolutions) and aborts loudly if it is ever called.
constexpr int kNoEnd = 1 << 30;
struct ProcEntry {
    void* fn;
    int min_version;          // asked-for versions below it get another entry (or none)
    int end_version = kNoEnd;
    bool stub = false;
};
const std::multimap<std::string, ProcEntry>& proc_table() {
    static const auto* t = new std::multimap<std::string, ProcEntry>{
        {"cuInit", {(void*)cuInit, 0}},
        {"cuDriverGetVersion", {(void*)cuDriverGetVersion, 0}},
        {"cuGetErrorName", {(void*)cuGetErrorName, 0}},
        {"cuGetErrorString", {(void*)cuGetErrorString, 0}},
        {"cuDeviceGetCount", {(void*)cuDeviceGetCount, 0}},
        {"cuDeviceGet", {(void*)cuDeviceGet, 0}},
        {"cuDeviceGetAttribute", {(void*)cuDeviceGetAttribute, 0}},
        {"cuDeviceGetName", {(void*)cuDeviceGetName, 0}},
        {"cuDeviceGetPCIBusId", {(void*)cuDeviceGetPCIBusId, 0}},
        {"cuDeviceTotalMem", {(void*)cuDeviceTotalMem_v2, 0}},
        {"cuDevicePrimaryCtxRetain", {(void*)cuDevicePrimaryCtxRetain, 0}},
        {"cuDevicePrimaryCtxRelease", {(void*)cuDevicePrimaryCtxRelease_v2, 0}},
        {"cuCtxSetCurrent", {(void*)cuCtxSetCurrent, 0}},
        {"cuCtxGetCurrent", {(void*)cuCtxGetCurrent, 0}},
        {"cuCtxGetStreamPriorityRange", {(void*)cuCtxGetStreamPriorityRange, 0}},
        {"cuCtxSynchronize", {(void*)cuCtxSynchronize, 0}},
        {"cuStreamCreate", {(void*)cuStreamCreate, 0}},
        {"cuStreamCreateWithPriority", {(void*)cuStreamCreateWithPriority, 0}},
        {"cuStreamDestroy", {(void*)cuStreamDestroy_v2, 0}},
        {"cuStreamSynchronize", {(void*)cuStreamSynchronize, 0}},
        {"cuStreamIsCapturing", {(void*)cuStreamIsCapturing, 0}},
        {"cuStreamWaitEvent", {(void*)cuStreamWaitEvent, 0}},
        {"cuStreamWaitValue32", {(void*)fake_stub_cuStreamMemOp_v1, 0, 11070, true}},
        {"cuStreamWaitValue32", {(void*)cuStreamWaitValue32_v2, 11070}},
        {"cuStreamWriteValue32", {(void*)fake_stub_cuStreamMemOp_v1, 0, 11070, true}},
        {"cuStreamWriteValue32", {(void*)cuStreamWriteValue32_v2, 11070}},
        {"cuEventCreate", {(void*)cuEventCreate, 0}},
        {"cuEventDestroy", {(void*)cuEventDestroy_v2, 0}},
        {"cuEventRecord", {(void*)cuEventRecord, 0}},
        {"cuEventSynchronize", {(void*)cuEventSynchronize, 0}},
        {"cuEventQuery", {(void*)cuEventQuery, 0}},
        {"cuEventElapsedTime", {(void*)cuEventElapsedTime, 0}},
        {"cuMemcpy", {(void*)cuMemcpy, 0}},
        {"cuMemcpyAsync", {(void*)cuMemcpyAsync, 0}},
        {"cuMemcpy2DAsync", {(void*)cuMemcpy2DAsync_v2, 0}},
        {"cuMemcpyBatchAsync", {(void*)cuMemcpyBatchAsync, 12080, 13000}},
        {"cuMemcpyBatchAsync", {(void*)fake_stub_cuMemcpyBatchAsync_v2, 13000, kNoEnd, true}},
        {"cuMemHostAlloc", {(void*)cuMemHostAlloc, 0}},
        {"cuMemFreeHost", {(void*)cuMemFreeHost, 0}},
        {"cuMemHostRegister", {(void*)cuMemHostRegister_v2, 0}},
        {"cuMemHostUnregister", {(void*)cuMemHostUnregister, 0}},
        {"cuMemHostGetDevicePointer", {(void*)cuMemHostGetDevicePointer_v2, 0}},
        {"cuMemAlloc", {(void*)cuMemAlloc_v2, 0}},
        {"cuMemFree", {(void*)cuMemFree_v2, 0}},
        {"cuPointerGetAttribute", {(void*)cuPointerGetAttribute, 0}},
        {"cuDevicePrimaryCtxReset", {(void*)cuDevicePrimaryCtxReset_v2, 11000}},
        {"cuThreadExchangeStreamCaptureMode", {(void*)cuThreadExchangeStreamCaptureMode, 10010}},
        {"cuStreamBeginCapture", {(void*)cuStreamBeginCapture_v2, 10010}},
        {"cuStreamEndCapture", {(void*)cuStreamEndCapture, 0}},
    };
    return *t;
}
}  // namespace

// By base name, honouring the requested ABI version (an entry of the driver's own version
// or older); flags are counted, requests logged (fake_proc_requests).
CUresult cuGetProcAddress_v2(const char* name, void** fn, int version,
                             unsigned long long flags, int* status) {
    FAKE_ENTRY_NO_CONTEXT("cuGetProcAddress");
    bump(flags == 1 ? g_counters.proc_legacy_flag : g_counters.proc_other_flag);
    *fn = nullptr;
    const std::string key = name ? name : "";
    State& g = S();
    {
        std::lock_guard<std::mutex> lock(g.mu);
        g.proc_requests.push_back(key + "@" + std::to_string(version));
    }
    if (version > g.driver_version) {
        if (status) *status = 2;  // CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT
        return kNotFound;
    }
    const bool batch_hidden =
        key == "cuMemcpyBatchAsync" && (g.no_batch || g.driver_version < 12080);
    const auto range = proc_table().equal_range(key);
    for (auto it = range.first; it != range.second && !batch_hidden; ++it) {
        const ProcEntry& e = it->second;
        if (version < e.min_version || version >= e.end_version) continue;
        if (e.stub) bump(g_counters.proc_stub_resolutions);
        *fn = e.fn;
        if (status) *status = 0;
        return kSuccess;
    }
    if (status) *status = 1;  // CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND
    return kNotFound;
}

// ---------------------------------------------------------------- control API (tests)
Counters* fake_counters() { return &g_counters; }

void fake_reset_counters() {
    long* c = reinterpret_cast<long*>(&g_counters);
    for (std::size_t i = 0; i < sizeof(Counters) / sizeof(long); ++i)
        __atomic_store_n(&c[i], 0L, __ATOMIC_RELAXED);
}

// kind "copy": sleep before each copy executes; "write_value": before each write-value;
// "call:<name>": inside the API call <name> after it enqueued (only cuStreamWaitValue32).
void fake_set_delay_us(const char* kind, long us) {
    State& g = S();
    const std::string k = kind ? kind : "";
    if (k == "copy")
        __atomic_store_n(&g.copy_delay_us, us, __ATOMIC_RELAXED);
    else if (k == "write_value")
        __atomic_store_n(&g.write_delay_us, us, __ATOMIC_RELAXED);
    else if (k.rfind("call:", 0) == 0) {
        std::lock_guard<std::mutex> lock(g.mu);
        g.call_delay_us[k.substr(5)] = us;
    } else
        std::fprintf(stderr, "fake_cuda: unknown delay kind '%s'\n", k.c_str());
}

// Enqueues a gate on the stream: it (and, serialized, everything) blocks until opened.
long fake_gate_close(unsigned long long stream) {
    State& g = S();
    std::lock_guard<std::mutex> lock(g.mu);
    const long id = ++g.next_gate;
    g.gates[id] = false;
    auto* op = new Op(Kind::kGate);
    op->gate = id;
    enqueue(stream_for(static_cast<std::uintptr_t>(stream)), op);
    return id;
}

void fake_gate_open(long id) {
    State& g = S();
    std::lock_guard<std::mutex> lock(g.mu);
    g.gates[id] = true;
    g.cv.notify_all();
}

long fake_stream_pending(unsigned long long stream) {
    std::lock_guard<std::mutex> lock(S().mu);
    Stream* s = stream_for(static_cast<std::uintptr_t>(stream));
    return s->enqueued - s->completed;
}

// A stand-in for a consumer's kernel that reads or writes KV blocks: a copy on `stream`,
// without a context and not counted with the copy counters.
int fake_consumer_copy(unsigned long long stream, unsigned long long dst,
                       unsigned long long src, std::size_t n) {
    std::lock_guard<std::mutex> lock(S().mu);
    auto* op = new Op(Kind::kCopy);
    op->segs = {{reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(src), n, 1, 0, 0}};
    enqueue(stream_for(static_cast<std::uintptr_t>(stream)), op);
    return kSuccess;
}

void fake_set_capturing(unsigned long long stream, int status) {
    std::lock_guard<std::mutex> lock(S().mu);
    stream_for(static_cast<std::uintptr_t>(stream))->capturing = status;
}

// 1 when every wait-value op of the stream not yet completed would pass on memory now.
int fake_pending_waits_satisfied(unsigned long long stream) {
    std::lock_guard<std::mutex> lock(S().mu);
    Stream* s = stream_for(static_cast<std::uintptr_t>(stream));
    for (const Op* op : s->ex->queue) {
        if (op->stream != s || op->kind != Kind::kWaitValue) continue;
        bool stale = false;
        if (!wait_value_satisfied(*op, &stale)) return 0;
    }
    return 1;
}

// Sticky error: the copy op EXECUTED after `skip` more copies faults (copies nothing, as a
// kernel touching an illegal address), and from then on every call that uses the context
// returns `code` (e.g. 700, CUDA_ERROR_ILLEGAL_ADDRESS), blocked waits included, until
// cuDevicePrimaryCtxReset. The call that enqueued the copy succeeded: the fault shows later.
void fake_fault_copy(long skip, int code) {
    State& g = S();
    std::lock_guard<std::mutex> lock(g.mu);
    g.fault_skip = skip;
    g.fault_code = code;
}

// The cuGetProcAddress requests so far, "name@version" one per line, into buf (len bytes,
// NUL-terminated); returns the length of the whole text.
long fake_proc_requests(char* buf, long len) {
    std::string text;
    {
        std::lock_guard<std::mutex> lock(S().mu);
        for (const std::string& r : S().proc_requests) text += r + "\n";
    }
    if (buf && len > 0) {
        const std::size_t n = std::min<std::size_t>(text.size(), static_cast<std::size_t>(len - 1));
        std::memcpy(buf, text.data(), n);
        buf[n] = 0;
    }
    return static_cast<long>(text.size());
}

// The next `count` calls of `name` (base name, e.g. "cuEventRecord") after `skip` calls
// return CUDA_ERROR_UNKNOWN (999) and do nothing. 1 (invalid value) for an unknown name.
int fake_fail(const char* name, long skip, long count) {
    if (!name || (!proc_table().count(name) && std::string(name) != "cuGetProcAddress")) {
        std::fprintf(stderr, "fake_cuda: fake_fail: unknown function '%s'\n",
                     name ? name : "(null)");
        return kInvalidValue;
    }
    State& g = S();
    std::lock_guard<std::mutex> lock(g.mu);
    g.fails[name] = {skip, count};
    __atomic_store_n(&g.any_fail, true, __ATOMIC_RELEASE);
    return kSuccess;
}

}  // extern "C"
