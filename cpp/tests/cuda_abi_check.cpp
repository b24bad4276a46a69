// Compile-time check that kvswitch's own CUDA driver declarations (cuda_driver.hpp) match
// the toolkit's cuda.h. Built only with -DKVSWITCH_CHECK_CUDA_ABI=ON; produces no code.
#include <cuda.h>

#include <cstddef>
#include <type_traits>

#include "kvswitch/cuda_driver.hpp"

namespace cu = kvswitch::cu;

#define SAME_FIELD(ours, theirs, field) \
    static_assert(offsetof(ours, field) == offsetof(theirs, field), #field)

static_assert(sizeof(cu::Memcpy2D) == sizeof(CUDA_MEMCPY2D_v2), "CUDA_MEMCPY2D size");
SAME_FIELD(cu::Memcpy2D, CUDA_MEMCPY2D_v2, srcMemoryType);
SAME_FIELD(cu::Memcpy2D, CUDA_MEMCPY2D_v2, srcDevice);
SAME_FIELD(cu::Memcpy2D, CUDA_MEMCPY2D_v2, srcPitch);
SAME_FIELD(cu::Memcpy2D, CUDA_MEMCPY2D_v2, dstMemoryType);
SAME_FIELD(cu::Memcpy2D, CUDA_MEMCPY2D_v2, dstDevice);
SAME_FIELD(cu::Memcpy2D, CUDA_MEMCPY2D_v2, dstPitch);
SAME_FIELD(cu::Memcpy2D, CUDA_MEMCPY2D_v2, WidthInBytes);
SAME_FIELD(cu::Memcpy2D, CUDA_MEMCPY2D_v2, Height);
static_assert(sizeof(cu::MemcpyAttributes) == sizeof(CUmemcpyAttributes), "CUmemcpyAttributes");
SAME_FIELD(cu::MemcpyAttributes, CUmemcpyAttributes, srcLocHint);
SAME_FIELD(cu::MemcpyAttributes, CUmemcpyAttributes, dstLocHint);
SAME_FIELD(cu::MemcpyAttributes, CUmemcpyAttributes, flags);
static_assert(sizeof(cu::MemLocation) == sizeof(CUmemLocation), "CUmemLocation");
static_assert(std::is_same_v<cu::CUdeviceptr, CUdeviceptr>, "CUdeviceptr");
static_assert(sizeof(cu::CUresult) == sizeof(CUresult), "CUresult");
static_assert(cu::CUDA_ERROR_NOT_READY == CUDA_ERROR_NOT_READY, "");
static_assert(cu::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED ==
                  CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED, "");
static_assert(cu::CU_STREAM_NON_BLOCKING == CU_STREAM_NON_BLOCKING, "");
static_assert(cu::CU_EVENT_DISABLE_TIMING == CU_EVENT_DISABLE_TIMING, "");
static_assert(cu::kHostAllocPortable == CU_MEMHOSTALLOC_PORTABLE, "");
static_assert(cu::kHostAllocDeviceMap == CU_MEMHOSTALLOC_DEVICEMAP, "");
static_assert(cu::CU_MEMORYTYPE_UNIFIED == CU_MEMORYTYPE_UNIFIED, "");
static_assert(cu::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL == CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, "");
static_assert(cu::CU_POINTER_ATTRIBUTE_MEMORY_TYPE == CU_POINTER_ATTRIBUTE_MEMORY_TYPE, "");
static_assert(cu::CU_MEMORYTYPE_HOST == CU_MEMORYTYPE_HOST, "");
static_assert(cu::CU_MEMORYTYPE_DEVICE == CU_MEMORYTYPE_DEVICE, "");  // migrations (2D DtoD)
static_assert(cu::CU_EVENT_BLOCKING_SYNC == CU_EVENT_BLOCKING_SYNC, "");
static_assert(cu::kHostRegisterPortable == CU_MEMHOSTREGISTER_PORTABLE, "");
static_assert(cu::CU_GET_PROC_ADDRESS_LEGACY_STREAM == CU_GET_PROC_ADDRESS_LEGACY_STREAM, "");
static_assert(cu::CU_STREAM_CAPTURE_STATUS_NONE == CU_STREAM_CAPTURE_STATUS_NONE, "");
static_assert(cu::CU_STREAM_CAPTURE_MODE_RELAXED == CU_STREAM_CAPTURE_MODE_RELAXED, "");
static_assert(sizeof(int) == sizeof(CUstreamCaptureMode), "cuThreadExchangeStreamCaptureMode");
static_assert(cu::CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE ==
                  CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE, "");
static_assert(cu::CU_MEM_LOCATION_TYPE_DEVICE == CU_MEM_LOCATION_TYPE_DEVICE, "");
static_assert(cu::CU_MEM_LOCATION_TYPE_HOST == CU_MEM_LOCATION_TYPE_HOST, "");
static_assert(cu::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM == CU_MEMCPY_SRC_ACCESS_ORDER_STREAM, "");
static_assert(cu::CU_STREAM_WAIT_VALUE_GEQ == CU_STREAM_WAIT_VALUE_GEQ, "");

// Function prototypes are not compared: cuda.h returns the enum CUresult and uses its own
// opaque handle types, so the types differ nominally; the ABI versions are chosen in
// cuda_driver.cpp (cuGetProcAddress version / _v2 export names).
