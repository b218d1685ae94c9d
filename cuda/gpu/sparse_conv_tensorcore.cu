// Tensor-core 1x1 sparse convolution over a per-filter union plan, design kSlab (see the header).
//
// One block (4 warps) stages a tile of NP pixels of the input, all Cin channels, into
// shared memory channel-major ([ci][pixel], row pitch NP + 8 elements so that rows of
// different channels start on different banks), once, and its warps then take groups of
// 16 output channels. Per k-step of a group a warp loads the packed 16 x k weight tile (the
// mma's A operand, row-major as the plan stores it) and gathers the group's union columns
// from the staged slab: for bf16/f16 with `ldmatrix.trans`, each lane giving the address
// of one union channel's row of 8 pixels (the gather costs shared-memory wavefronts, no
// FLOPs); for TF32 with 32-bit shared loads. So an input byte read from L2 feeds every
// group of the block, not one group (the calibration kernel's L2 bound, issue 14).
// mma.sync (not wgmma): the B operand is a per-lane gather, which wgmma's descriptor-based
// shared-memory operands cannot express; and m16n8 tiles keep 16-row groups exact.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <mutex>

#include "gpu/element_io.cuh"
#include "gpu/dynamic_smem.h"
#include "gpu/tensorcore_mma.cuh"
#include "gpu/sparse_conv_tensorcore.h"

namespace jaxsparse {
namespace tensorcore {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;                 // output channels per group (the mma m)
constexpr int kSlabBudget = 96 * 1024;    // shared bytes of the slab for two blocks per SM
constexpr int kSlabMax = 220 * 1024;      // one block per SM: 16 pixels of up to 2048 f32 channels

struct Args {
  int pixels, in_c, out_c, groups;
  int pitch;             // slab row pitch in elements (NP + 8)
  int groups_per_block;  // groups of one blockIdx.y
  int relu, has_bias, vec;
  int stage_out;  // 1: results staged in shared memory [pixel][Cout] and written as one
                  // contiguous NHWC chunk (needs every group in the block: one split)
};

// Compile-time configuration (Sputnik style): element type and pixels per block.
template <typename T, int kPixels>
struct TcConfig {
  using Element = T;
  static constexpr int kNP = kPixels;
  static constexpr bool kTf32 = sizeof(T) == 4;
  static constexpr int kK = kTf32 ? 8 : 16;  // mma k, and the plan's k multiple
  static constexpr int kVec = 16 / sizeof(T);
  static_assert(kNP % 16 == 0 && kNP >= 16 && kNP <= 128, "pixels per block: 16..128, multiple of 16");
  static_assert(((kNP + 8) * sizeof(T)) % 16 == 0, "ldmatrix rows must stay 16-byte aligned");
};

template <class Config>
__global__ void __launch_bounds__(kThreads)
TensorCoreSpmmKernel(Args a, const typename Config::Element* __restrict__ x,
                     const typename Config::Element* __restrict__ packed,
                     const int32_t* __restrict__ columns, const int32_t* __restrict__ col_offsets,
                     const int32_t* __restrict__ channels, const typename Config::Element* __restrict__ bias,
                     typename Config::Element* __restrict__ out) {
  using T = typename Config::Element;
  constexpr int NP = Config::kNP;
  constexpr int NT = NP / 8;  // n-tiles of 8 pixels
  constexpr int V = Config::kVec;
  extern __shared__ float4 smem_raw[];
  T* slab = reinterpret_cast<T*>(smem_raw);
  T* stage = slab + a.in_c * a.pitch;  // staged outputs (stage_out), after the slab

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int p0 = blockIdx.x * NP;

  // ---- 1. slab[ci][p] = x[p0 + p][ci], zero past the last pixel. Threads run over pixels
  // fastest, so the transposed shared stores of a warp hit consecutive addresses.
  if (a.vec) {
    const int cv = a.in_c / V;
    for (int i = tid; i < cv * NP; i += kThreads) {
      const int v = i / NP, p = i - v * NP;
      alignas(16) T e[V];
      if (p0 + p < a.pixels) {
        *reinterpret_cast<float4*>(e) =
            __ldg(reinterpret_cast<const float4*>(x + static_cast<int64_t>(p0 + p) * a.in_c + v * V));
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) e[j] = T(0.0f);
      }
#pragma unroll
      for (int j = 0; j < V; ++j) slab[(v * V + j) * a.pitch + p] = e[j];
    }
  } else {
    for (int i = tid; i < a.in_c * NP; i += kThreads) {
      const int c = i / NP, p = i - c * NP;
      slab[c * a.pitch + p] = p0 + p < a.pixels ? x[static_cast<int64_t>(p0 + p) * a.in_c + c] : T(0.0f);
    }
  }
  __syncthreads();

  // ---- 2. groups of 16 output channels, one warp each at a time.
  const int g_lo = blockIdx.y * a.groups_per_block;
  const int g_hi = min(a.groups, g_lo + a.groups_per_block);
  const int r0 = lane >> 2, q = lane & 3;
  for (int g = g_lo + warp; g < g_hi; g += kWarps) {
    const int kb = __ldg(col_offsets + g), kp = __ldg(col_offsets + g + 1) - kb;
    const T* tile = packed + static_cast<int64_t>(kRows) * kb;
    float acc[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;

    for (int k0 = 0; k0 < kp; k0 += Config::kK) {
      uint32_t af[4];
      LoadAFragment(tile, k0 / Config::kK, lane, af);
      if constexpr (Config::kTf32) {
        // B: rows k = q and q + 4 of the union, pixel r0 of each n-tile.
        const int c0 = min(max(__ldg(columns + kb + k0 + q), 0), a.in_c - 1);
        const int c1 = min(max(__ldg(columns + kb + k0 + q + 4), 0), a.in_c - 1);
        const float* s0 = reinterpret_cast<const float*>(slab) + c0 * a.pitch + r0;
        const float* s1 = reinterpret_cast<const float*>(slab) + c1 * a.pitch + r0;
#pragma unroll
        for (int t = 0; t < NT; ++t) Mma1688Tf32(acc[t], af, ToTf32(s0[8 * t]), ToTf32(s1[8 * t]));
      } else {
        // ldmatrix.x4.trans: lanes 0-7 / 8-15 give the rows (union channels) k0..k0+7 /
        // k0+8..k0+15 of pixels 0-7 of an n-pair, lanes 16-31 the same for pixels 8-15.
        const int kl = (lane & 7) + ((lane >> 3) & 1) * 8;
        const int c = min(max(__ldg(columns + kb + k0 + kl), 0), a.in_c - 1);
        const uint32_t row = SmemAddr(slab + c * a.pitch + (lane >> 4) * 8);
#pragma unroll
        for (int j = 0; j < NT / 2; ++j) {
          uint32_t b0, b1, b2, b3;
          LdMatrixX4Trans(row + j * 16 * static_cast<uint32_t>(sizeof(T)), b0, b1, b2, b3);
          Mma16816<T>(acc[2 * j], af, b0, b1);
          Mma16816<T>(acc[2 * j + 1], af, b2, b3);
        }
      }
    }

    // ---- 3. C fragment: rows r0 / r0 + 8 of the group, pixels 2q, 2q + 1 of each n-tile,
    // into the staging tile, or (no staging) straight to the group's scattered channels.
    const int ch0 = __ldg(channels + g * kRows + r0), ch1 = __ldg(channels + g * kRows + r0 + 8);
    const float bias0 = a.has_bias && ch0 >= 0 ? LoadAsFloat(bias + ch0) : 0.0f;
    const float bias1 = a.has_bias && ch1 >= 0 ? LoadAsFloat(bias + ch1) : 0.0f;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int p = p0 + 8 * t + 2 * q + e;
        if (p >= a.pixels) continue;
        T* dst = a.stage_out ? stage + (p - p0) * a.out_c : out + static_cast<int64_t>(p) * a.out_c;
        float v0 = acc[t][e] + bias0, v1 = acc[t][2 + e] + bias1;
        if (a.relu) { v0 = ReluKeepNan(v0); v1 = ReluKeepNan(v1); }
        if (ch0 >= 0 && ch0 < a.out_c) StoreFromFloat(dst + ch0, v0);
        if (ch1 >= 0 && ch1 < a.out_c) StoreFromFloat(dst + ch1, v1);
      }
    }
  }
  if (a.stage_out) {
    // ---- 4. the tile's outputs are one contiguous run of NHWC memory: copy it coalesced.
    __syncthreads();
    const int64_t n = static_cast<int64_t>(min(NP, a.pixels - p0)) * a.out_c;
    T* dst = out + static_cast<int64_t>(p0) * a.out_c;
    for (int64_t i = tid; i < n; i += kThreads) dst[i] = stage[i];
  }
}

int ElemBytes(ElementType type) { return type == ElementType::kF32 ? 4 : 2; }

int64_t SlabBytes(const TensorCoreShape& s, ElementType type, int np) {
  return s.in_c * (np + 8) * ElemBytes(type);
}
int64_t StageBytes(const TensorCoreShape& s, ElementType type, int np) {
  return static_cast<int64_t>(np) * s.out_c * ElemBytes(type);
}

// Pixel tile: with staged outputs, the largest tile that fits two blocks per SM and still
// gives two blocks per SM (else the fitting tile with the most blocks, if that is at least
// one per SM); without staging (Cout too large, or too few pixels), the largest slab that
// fits, its groups split over blockIdx.y; else 16 pixels in one block's worth of shared
// memory. 0: not even that.
int PixelsPerBlock(const TensorCoreShape& s, ElementType type, bool* stage_out) {
  *stage_out = true;
  int fitting = 0;
  for (int np : {128, 64, 32, 16}) {
    if (SlabBytes(s, type, np) + StageBytes(s, type, np) > kSlabBudget) continue;
    fitting = np;
    if ((s.pixels + np - 1) / np >= 264) return np;
  }
  if (fitting && (s.pixels + fitting - 1) / fitting >= 132) return fitting;  // a block per SM at least
  *stage_out = false;  // too few pixel tiles: split the groups over blocks instead
  for (int np : {128, 64, 32, 16})
    if (SlabBytes(s, type, np) <= kSlabBudget) return np;
  return SlabBytes(s, type, 16) <= kSlabMax ? 16 : 0;
}

template <class Config>
cudaError_t LaunchConfig(cudaStream_t stream, const TensorCoreShape& s, const TensorCoreOperands& op,
                         bool stage_out) {
  using T = typename Config::Element;
  constexpr int NP = Config::kNP;
  auto kernel = TensorCoreSpmmKernel<Config>;
  if (cudaError_t e = AllowDynamicSmem(reinterpret_cast<const void*>(kernel), kSlabMax); e != cudaSuccess)
    return e;
  Args a{};
  a.pixels = static_cast<int>(s.pixels);
  a.in_c = static_cast<int>(s.in_c);
  a.out_c = static_cast<int>(s.out_c);
  a.groups = static_cast<int>(s.groups);
  a.pitch = NP + 8;
  a.relu = s.relu ? 1 : 0;
  a.has_bias = op.bias != nullptr ? 1 : 0;
  a.vec = (s.in_c % Config::kVec == 0 && reinterpret_cast<uintptr_t>(op.x) % 16 == 0) ? 1 : 0;
  const int64_t tiles = (s.pixels + NP - 1) / NP;
  // Without staging, enough blocks for two per SM: split the groups over blockIdx.y, at
  // least one group per warp.
  int64_t splits = stage_out ? 1 : std::max<int64_t>(1, std::min<int64_t>((s.groups + kWarps - 1) / kWarps,
                                                                          (264 + tiles - 1) / tiles));
  a.groups_per_block = static_cast<int>((s.groups + splits - 1) / splits);
  splits = (s.groups + a.groups_per_block - 1) / a.groups_per_block;
  a.stage_out = stage_out ? 1 : 0;
  const size_t smem = static_cast<size_t>(s.in_c) * a.pitch * sizeof(T) +
                      (stage_out ? static_cast<size_t>(NP) * s.out_c * sizeof(T) : 0);
  kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(splits)), kThreads, smem, stream>>>(
      a, static_cast<const T*>(op.x), static_cast<const T*>(op.packed), op.columns, op.col_offsets,
      op.channels, static_cast<const T*>(op.bias), static_cast<T*>(op.out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchTyped(cudaStream_t stream, const TensorCoreShape& s, ElementType type,
                        const TensorCoreOperands& op) {
  bool stage_out = false;
  switch (PixelsPerBlock(s, type, &stage_out)) {
    case 128: return LaunchConfig<TcConfig<T, 128>>(stream, s, op, stage_out);
    case 64: return LaunchConfig<TcConfig<T, 64>>(stream, s, op, stage_out);
    case 32: return LaunchConfig<TcConfig<T, 32>>(stream, s, op, stage_out);
    case 16: return LaunchConfig<TcConfig<T, 16>>(stream, s, op, stage_out);
  }
  return cudaErrorInvalidConfiguration;
}

}  // namespace
}  // namespace tensorcore

bool SlabTensorCoreFits(const TensorCoreShape& s, ElementType type) {
  return s.conv.pointwise() && s.pixels > 0 && s.in_c > 0 && s.out_c > 0 && s.groups > 0 &&
         s.pixels <= INT32_MAX && s.pixels * s.out_c <= (int64_t{1} << 40) &&
         (s.groups + 1) * 16 <= INT32_MAX && [&] {
           bool stage_out = false;
           return tensorcore::PixelsPerBlock(s, type, &stage_out) > 0;
         }();
}

cudaError_t LaunchSlabTensorCore(cudaStream_t stream, const TensorCoreShape& s, ElementType type,
                                 const TensorCoreOperands& op) {
  if (!SlabTensorCoreFits(s, type)) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(op.packed) % 16 != 0) return cudaErrorMisalignedAddress;  // LoadAFragment
  switch (type) {
    case ElementType::kF32: return tensorcore::LaunchTyped<float>(stream, s, type, op);
    case ElementType::kBF16: return tensorcore::LaunchTyped<__nv_bfloat16>(stream, s, type, op);
    case ElementType::kF16: return tensorcore::LaunchTyped<__half>(stream, s, type, op);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jaxsparse
