// Loads and stores of the supported element types as float32 (device code).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace jaxsparse {

__device__ __forceinline__ float LoadAsFloat(const float* p) { return *p; }
__device__ __forceinline__ float LoadAsFloat(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float LoadAsFloat(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void StoreFromFloat(float* p, float v) { *p = v; }
__device__ __forceinline__ void StoreFromFloat(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void StoreFromFloat(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

}  // namespace jaxsparse
