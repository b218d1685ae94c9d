// mma.sync wrappers and helpers shared by the tensor-core kernel designs (device code).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace jaxsparse {
namespace tensorcore {

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// float32 -> TF32 bits, rounded to nearest (ties away), as XLA's TF32 convolutions round.
__device__ __forceinline__ uint32_t ToTf32(float f) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
  return r;
}

// c += a * b, m16n8k16, 16-bit operands, float32 accumulation.
template <typename T>
__device__ __forceinline__ void Mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void Mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void Mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c += a * b, m16n8k8, TF32 operands (bits from ToTf32), float32 accumulation.
__device__ __forceinline__ void Mma1688Tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The calling lane's A fragment of k-step `step` of a group's packed tile (tc_plan.py's
// `tile_offset`: a k-step's 16 x k weights are stored in fragment order, 32 lanes x 4
// registers): one 16-byte load, a warp's loads one contiguous 512-byte run. TF32 rounds
// the float32 weights here. `tile` must be 16-byte aligned (a tile starts at 16 * k_padded
// elements of a 16-byte aligned buffer).
template <typename T>
__device__ __forceinline__ void LoadAFragment(const T* __restrict__ tile, int step, int lane, uint32_t (&a)[4]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(tile) + step * 32 + lane);
  if constexpr (sizeof(T) == 4) {
    a[0] = ToTf32(__uint_as_float(v.x));
    a[1] = ToTf32(__uint_as_float(v.y));
    a[2] = ToTf32(__uint_as_float(v.z));
    a[3] = ToTf32(__uint_as_float(v.w));
  } else {
    a[0] = v.x;
    a[1] = v.y;
    a[2] = v.z;
    a[3] = v.w;
  }
}

// ldmatrix.x4.trans: four 8x8 16-bit matrices, lane i giving the shared address of row i.
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t addr, uint32_t& b0, uint32_t& b1, uint32_t& b2,
                                                uint32_t& b3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
               : "r"(addr));
}

// 16-byte asynchronous copy global -> shared (L2 only, .cg); `src_bytes` 0 writes zeros and
// reads nothing.
__device__ __forceinline__ void CpAsync16(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(SmemAddr(smem_dst)), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

}  // namespace tensorcore
}  // namespace jaxsparse
