// Loads and stores of the supported element types as float32 (device code).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>  // CUDART_NAN_F, the poison of malformed CSR rows

namespace jaxsparse {

__device__ __forceinline__ float LoadAsFloat(const float* p) { return *p; }
__device__ __forceinline__ float LoadAsFloat(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float LoadAsFloat(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void StoreFromFloat(float* p, float v) { *p = v; }
__device__ __forceinline__ void StoreFromFloat(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void StoreFromFloat(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// ReLU that keeps NaN, as XLA's max(x, 0) and the CPU kernel do (fmaxf would turn NaN into 0,
// hiding both NaN inputs and the NaN poison of malformed filter rows).
__device__ __forceinline__ float ReluKeepNan(float v) { return v < 0.0f ? 0.0f : v; }

// Loads 16 bytes of `T` (4 floats or 8 halves) through the read-only path and
// converts them to float32. `p` must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ void LoadVec16(const T* p, float* out);
template <>
__device__ __forceinline__ void LoadVec16<float>(const float* p, float* out) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
}
template <>
__device__ __forceinline__ void LoadVec16<__half>(const __half* p, float* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    out[2 * i] = f.x; out[2 * i + 1] = f.y;
  }
}
template <>
__device__ __forceinline__ void LoadVec16<__nv_bfloat16>(const __nv_bfloat16* p, float* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 -> f32 is a shift into the high half
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

}  // namespace jaxsparse
