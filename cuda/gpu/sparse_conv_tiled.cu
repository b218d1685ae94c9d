// Shared-memory tiled sparse convolution: the direct KxK kernel and the 1x1
// SpMM kernel (the same body under two configurations). See tiled_plan.h for
// the design; NOTES.md for measurements.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include "gpu/element_io.cuh"
#include "gpu/dynamic_smem.h"
#include "gpu/sparse_conv_kernels.h"
#include "gpu/tiled_plan.h"

namespace jaxsparse {
namespace tiled {
namespace {

// Compile-time configuration of one kernel instantiation (Sputnik style).
template <typename T, int kPixelsPerThread, bool kAffine, Variant kVariant>
struct TileConfig {
  using Element = T;
  static constexpr int kP = kPixelsPerThread;
  static constexpr bool kAffinePixels = kAffine;
  static constexpr bool kStaged = kVariant == Variant::kStaged;    // filter rows staged in shared memory
  static constexpr bool kCluster = kVariant == Variant::kCluster;  // Cin chunks summed across a cluster
  static constexpr bool kHalf = kVariant == Variant::kHalfWindow;   // 2-byte window, pixel pairs
  static constexpr int kWarpsPerBlock = kWarps;
  static constexpr int kThreadsPerBlock = kThreads;
  // 16-byte vector of the element type, used to fill the input window.
  static constexpr int kVecElems = 16 / sizeof(T);
  static_assert(kP == 1 || kP == 2 || kP == 4 || kP == 8, "pixels per thread must be 1, 2, 4 or 8");
  static_assert(kThreadsPerBlock <= 1024 && kThreadsPerBlock % 32 == 0, "bad block size");
  static_assert(kVecElems * sizeof(T) == 16, "vector width must be 16 bytes");
  static_assert(sizeof(int2) == 8 && kMetaBytes == kWarpsPerBlock * 32 * 8, "metadata staging size");
  static_assert(kMetaBytes % 16 == 0, "the staged rows after the per-warp metadata must stay 16-byte aligned");
  static_assert(!(kStaged && kCluster), "one variant at a time");
  static_assert(!kHalf || (sizeof(T) == 2 && kAffine && kP >= 2),
                "half-width windows: bf16/f16, stride-1 virtual pixels, whole pixel pairs");
};

// A tap's window offset (in elements of the window) as the byte offset the inner loop adds
// to a lane's pixel address (one integer add per load, no scaling). Half-width variant: the
// offset of a 32-bit word; even offsets read the window itself, odd ones the copy shifted
// by one element, where element o + v of the window sits at the even index half_copy + o - 1 + v.
template <class Config>
__device__ __forceinline__ int ByteOffset(const TileArgs& a, int offset) {
  if constexpr (Config::kHalf) return 2 * ((offset & 1) ? a.half_copy + offset - 1 : offset);
  return 4 * offset;
}

// The two 2-byte values of a 32-bit shared word as float32 (low half first).
template <typename T>
__device__ __forceinline__ float2 UnpackPair(uint32_t w);
template <>
__device__ __forceinline__ float2 UnpackPair<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
template <>
__device__ __forceinline__ float2 UnpackPair<__half>(uint32_t w) {
  return __half22float2(*reinterpret_cast<const __half2*>(&w));
}

// Decodes filter column `c` into its offset in the shared input window (channel-major,
// pre-scaled by the window's strides). False for a column outside [0, taps).
__device__ __forceinline__ bool DecodeColumn(const TileArgs& a, int c, int* offset) {
  if (c < 0 || c >= a.taps) return false;
  const int k = static_cast<int>(a.div_cin.Div(static_cast<uint32_t>(c)));
  const int ci = c - k * a.in_c;
  const int kh = static_cast<int>(a.div_kw.Div(static_cast<uint32_t>(k)));
  const int kw = k - kh * a.kernel_w;
  *offset = ci * a.chan_stride + kh * a.dil_h * a.tile_cols + kw * a.dil_w;
  return true;
}

// Cluster variant: as DecodeColumn for a window of channels [ci_lo, ci_lo + cin_n);
// `*keep` says whether the column's channel lies in that chunk.
__device__ __forceinline__ bool DecodeColumnInChunk(const TileArgs& a, int c, int ci_lo, int cin_n,
                                                    int* offset, bool* keep) {
  *keep = false;
  if (c < 0 || c >= a.taps) return false;
  const int k = static_cast<int>(a.div_cin.Div(static_cast<uint32_t>(c)));
  const int ci = c - k * a.in_c - ci_lo;
  const int kh = static_cast<int>(a.div_kw.Div(static_cast<uint32_t>(k)));
  const int kw = k - kh * a.kernel_w;
  *keep = static_cast<unsigned>(ci) < static_cast<unsigned>(cin_n);
  *offset = ci * a.chan_stride + kh * a.dil_h * a.tile_cols + kw * a.dil_w;
  return true;
}

// Half-width variant: the input window as the input's own 2-byte elements, channel-major
// [ci][row][col] with zero padding, the gaps and the slack zeroed, then (when planned) the
// copy shifted by one element (tiled_plan.h). Ends before the caller's barrier.
template <class Config>
__device__ __forceinline__ void FillHalfWindow(const TileArgs& a, const typename Config::Element* xn,
                                               uint16_t* w, int win, int ih0, int iw0, int cin_n, int ci_lo) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int len = a.half_copy ? a.half_copy : 2 * a.tile_floats;  // elements of one copy
  const int chan = a.chan_stride;
  auto in_offset = [&](int pos, int ci, bool* inb) {  // element offset of (window position, channel)
    const int t = pos / a.tile_cols, c = pos - t * a.tile_cols;
    const int ih = ih0 + t, iw = iw0 + c;
    *inb = ih >= 0 && ih < a.in_h && iw >= 0 && iw < a.in_w;
    return (static_cast<int64_t>(ih) * a.in_w + iw) * a.in_c + ci_lo + ci;
  };
  if (a.vec_fill) {
    // A warp covers 8 window positions x 4 vectors of 8 channels; 4 loads in flight per thread.
    constexpr int kFillBatch = 4;
    const int cinv = cin_n / 8, cvb = (cinv + 3) >> 2;
    const int units = ((win + 7) >> 3) * cvb;
    const int p_lo = lane & 7, c_lo = lane >> 3;
    for (int u0 = warp; u0 < units; u0 += kFillBatch * Config::kWarpsPerBlock) {
      uint4 f[kFillBatch];
      int dst[kFillBatch];
#pragma unroll
      for (int k = 0; k < kFillBatch; ++k) {
        const int u = u0 + k * Config::kWarpsPerBlock;
        const int pb = u / cvb, cb = u - pb * cvb;
        const int pos = pb * 8 + p_lo, cv = cb * 4 + c_lo;
        const bool ok = u < units && pos < win && cv < cinv;
        dst[k] = ok ? cv * 8 * chan + pos : -1;
        f[k] = make_uint4(0u, 0u, 0u, 0u);
        bool inb = false;
        const int64_t off = ok ? in_offset(pos, cv * 8, &inb) : 0;
        if (inb) f[k] = __ldg(reinterpret_cast<const uint4*>(xn + off));
      }
#pragma unroll
      for (int k = 0; k < kFillBatch; ++k)
        if (dst[k] >= 0) {
          const uint32_t v[4] = {f[k].x, f[k].y, f[k].z, f[k].w};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            w[dst[k] + 2 * i * chan] = static_cast<uint16_t>(v[i] & 0xffffu);
            w[dst[k] + (2 * i + 1) * chan] = static_cast<uint16_t>(v[i] >> 16);
          }
        }
    }
  } else {
    // 32 consecutive channels of one position per warp, 8 positions in flight per thread.
    constexpr int kFillBatch = 8;
    const uint16_t* xr = reinterpret_cast<const uint16_t*>(xn);
    const int cb32 = (cin_n + 31) >> 5;
    const int units = win * cb32;
    for (int u0 = warp; u0 < units; u0 += kFillBatch * Config::kWarpsPerBlock) {
      uint16_t f[kFillBatch];
      int dst[kFillBatch];
#pragma unroll
      for (int k = 0; k < kFillBatch; ++k) {
        const int u = u0 + k * Config::kWarpsPerBlock;
        const int pos = u / cb32, ci = (u - pos * cb32) * 32 + lane;
        const bool ok = u < units && ci < cin_n;
        dst[k] = ok ? ci * chan + pos : -1;
        bool inb = false;
        const int64_t off = ok ? in_offset(pos, ci, &inb) : 0;
        f[k] = inb ? __ldg(xr + off) : uint16_t{0};
      }
#pragma unroll
      for (int k = 0; k < kFillBatch; ++k)
        if (dst[k] >= 0) w[dst[k]] = f[k];
    }
  }
  const int gap = chan - win;
  for (int i = tid; i < cin_n * gap; i += Config::kThreadsPerBlock) {
    const int ci = i / gap;
    w[ci * chan + win + (i - ci * gap)] = 0;
  }
  for (int i = cin_n * chan + tid; i < len; i += Config::kThreadsPerBlock) w[i] = 0;
  if (a.half_copy) {
    __syncthreads();
    // Word k of the copy holds elements 2k + 1 and 2k + 2 of the window.
    uint32_t* w32 = reinterpret_cast<uint32_t*>(w);
    const int words = len >> 1;
    for (int k = tid; k < words; k += Config::kThreadsPerBlock)
      w32[words + k] = __funnelshift_r(w32[k], k + 1 < words ? w32[k + 1] : 0u, 16);
  }
}

template <class Config>
__global__ void __launch_bounds__(Config::kThreadsPerBlock)
TiledSparseConvKernel(TileArgs a, const typename Config::Element* __restrict__ x,
                      const typename Config::Element* __restrict__ values,
                      const int32_t* __restrict__ indices, const int32_t* __restrict__ indptr,
                      const typename Config::Element* __restrict__ bias,
                      typename Config::Element* __restrict__ out) {
  using T = typename Config::Element;
  constexpr int P = Config::kP;
  constexpr int V = Config::kVecElems;
  extern __shared__ float4 smem_raw[];
  float* tile = reinterpret_cast<float*>(smem_raw);
  float* stage = tile + a.tile_floats;
  int4* meta_all = reinterpret_cast<int4*>(stage + a.out_floats);
  // Staged variant: the group's row pointers, then its decoded (offset, value) pairs.
  int* group_ptr = reinterpret_cast<int*>(meta_all + kMetaBytes / 16);
  int2* group_meta = reinterpret_cast<int2*>(group_ptr + a.ptr_ints);
  __shared__ int task_counter;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  int4* meta4 = meta_all + warp * 16;  // 32 (offset, value) pairs of this warp
  int2* meta2 = reinterpret_cast<int2*>(meta4);

  // Which Cin chunk (cluster variant: the block's rank in its cluster), tile and group.
  int b = blockIdx.x;
  int chunk_i = 0;
  if constexpr (Config::kCluster) {
    chunk_i = b % a.cin_chunks;
    b /= a.cin_chunks;
  }
  const int ci_lo = Config::kCluster ? chunk_i * a.cin_chunk : 0;
  const int cin_n = Config::kCluster ? min(a.cin_chunk, a.in_c - ci_lo) : a.in_c;  // window channels
  const int grp = b % a.groups; b /= a.groups;
  const int tw_i = b % a.tiles_w; b /= a.tiles_w;
  const int th_i = b % a.tiles_h;
  const int n = b / a.tiles_h;
  const int oh0 = th_i * a.tile_h, ow0 = tw_i * a.tile_w;
  const int th_n = min(a.tile_h, a.out_h - oh0), tw_n = min(a.tile_w, a.out_w - ow0);
  const int ih0 = oh0 * a.stride_h - a.pad_h, iw0 = ow0 * a.stride_w - a.pad_w;
  const int win = a.tile_rows * a.tile_cols;  // window positions per channel

  if (tid == 0) task_counter = 0;
  const int r_lo = grp * a.rows_per_group;
  const int nrows = min(a.rows_per_group, a.out_c - r_lo);
  if constexpr (Config::kStaged) {  // loads in flight together with the window fill below
    for (int i = tid; i <= nrows; i += Config::kThreadsPerBlock) group_ptr[i] = __ldg(indptr + r_lo + i);
  }

  // ---- 1. input window -> shared memory, float32, [ci][row][col], zero padded.
  // Loads are batched (kFillBatch independent 16-byte loads per thread before
  // any store) so the fill costs a few L2 round trips, not one per iteration.
  // Vector path: a warp covers 8 window positions x 4 channel vectors (64
  // contiguous bytes per position); the planner picks the channel stride so
  // the transposed shared stores of such a warp hit 32 distinct banks.
  const T* xn = x + static_cast<int64_t>(n) * a.in_h * a.in_w * a.in_c;
  if constexpr (Config::kHalf) {
    FillHalfWindow<Config>(a, xn, reinterpret_cast<uint16_t*>(tile), win, ih0, iw0, cin_n, ci_lo);
  } else if (a.vec_fill) {
    constexpr int kFillBatch = 32 / V;
    const int cinv = cin_n / V;
    const int cvb = (cinv + 3) >> 2;
    const int units = ((win + 7) >> 3) * cvb;
    const int p_lo = lane & 7, c_lo = lane >> 3;
    for (int u0 = warp; u0 < units; u0 += kFillBatch * Config::kWarpsPerBlock) {
      float f[kFillBatch][V];
      int dst[kFillBatch];
#pragma unroll
      for (int k = 0; k < kFillBatch; ++k) {
        const int u = u0 + k * Config::kWarpsPerBlock;
        const int pb = u / cvb, cb = u - pb * cvb;
        const int pos = pb * 8 + p_lo, cv = cb * 4 + c_lo;
        const bool ok = u < units && pos < win && cv < cinv;
        dst[k] = ok ? cv * V * a.chan_stride + pos : -1;
        bool inb = false;
        int64_t off = 0;
        if (ok) {
          const int t = pos / a.tile_cols, c = pos - t * a.tile_cols;
          const int ih = ih0 + t, iw = iw0 + c;
          inb = ih >= 0 && ih < a.in_h && iw >= 0 && iw < a.in_w;
          off = (static_cast<int64_t>(ih) * a.in_w + iw) * a.in_c + ci_lo + cv * V;
        }
        if (inb) {
          LoadVec16<T>(xn + off, f[k]);
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) f[k][v] = 0.0f;
        }
      }
#pragma unroll
      for (int k = 0; k < kFillBatch; ++k)
        if (dst[k] >= 0) {
#pragma unroll
          for (int v = 0; v < V; ++v) tile[dst[k] + v * a.chan_stride] = f[k][v];
        }
    }
  } else {
    // Scalar path (Cin not a multiple of the vector width): 32 consecutive
    // channels of one position per warp, 8 positions in flight per thread.
    constexpr int kFillBatch = 8;
    const int cb32 = (cin_n + 31) >> 5;
    const int units = win * cb32;
    for (int u0 = warp; u0 < units; u0 += kFillBatch * Config::kWarpsPerBlock) {
      float f[kFillBatch];
      int dst[kFillBatch];
#pragma unroll
      for (int k = 0; k < kFillBatch; ++k) {
        const int u = u0 + k * Config::kWarpsPerBlock;
        const int pos = u / cb32, ci = (u - pos * cb32) * 32 + lane;
        const bool ok = u < units && ci < cin_n;
        dst[k] = ok ? ci * a.chan_stride + pos : -1;
        f[k] = 0.0f;
        if (ok) {
          const int t = pos / a.tile_cols, c = pos - t * a.tile_cols;
          const int ih = ih0 + t, iw = iw0 + c;
          if (ih >= 0 && ih < a.in_h && iw >= 0 && iw < a.in_w)
            f[k] = LoadAsFloat(xn + (static_cast<int64_t>(ih) * a.in_w + iw) * a.in_c + ci_lo + ci);
        }
      }
#pragma unroll
      for (int k = 0; k < kFillBatch; ++k)
        if (dst[k] >= 0) tile[dst[k]] = f[k];
    }
  }
  // Gaps between channels and the slack after the last one (read only by
  // lanes whose results are discarded) are zeroed so every read is defined.
  if constexpr (!Config::kHalf) {
    const int gap = a.chan_stride - win;
    for (int i = tid; i < cin_n * gap; i += Config::kThreadsPerBlock) {
      const int ci = i / gap;
      tile[ci * a.chan_stride + win + (i - ci * gap)] = 0.0f;
    }
    for (int i = cin_n * a.chan_stride + tid; i < a.tile_floats; i += Config::kThreadsPerBlock)
      tile[i] = 0.0f;
  }
  __syncthreads();

  // Malformed CSR (possible for filters rebuilt from traced arrays, which Python cannot check)
  // poisons the affected output channels with NaN instead of yielding a plausible wrong result:
  // every channel if the end pointers are wrong, else each row with disordered pointers or an
  // out-of-range column. Nothing is ever read out of bounds either way.
  const bool ends_bad = __ldg(indptr) != 0 || __ldg(indptr + a.out_c) != a.nnz;

  // ---- 1b. staged variant: decode the group's nonzeros once, for every task of the block.
  // Taken when the group's pointers are in order and its pairs fit; an out-of-range
  // column becomes a NaN weight, which poisons exactly its row. Otherwise the block
  // streams its rows as the plain kernel does.
  bool staged = false;
  int group_base = 0;
  if constexpr (Config::kStaged) {
    group_base = group_ptr[0];
    const int group_end = group_ptr[nrows];
    const bool fits = !ends_bad && group_base >= 0 && group_end <= a.nnz && group_base <= group_end &&
                      group_end - group_base <= a.meta_cap;
    bool disordered = false;
    for (int i = tid; i < nrows; i += Config::kThreadsPerBlock) disordered |= group_ptr[i] > group_ptr[i + 1];
    if (fits) {
      constexpr int kBatch = 4;  // independent loads per thread in flight
      const int count = group_end - group_base;
      for (int i0 = tid; i0 < count; i0 += kBatch * Config::kThreadsPerBlock) {
        int c[kBatch];
        float w[kBatch];
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          const int i = i0 + k * Config::kThreadsPerBlock;
          c[k] = i < count ? __ldg(indices + group_base + i) : 0;
          w[k] = i < count ? LoadAsFloat(values + group_base + i) : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          const int i = i0 + k * Config::kThreadsPerBlock;
          int offset = 0;
          const bool ok = DecodeColumn(a, c[k], &offset);
          if (i < count)
            group_meta[i] = make_int2(ok ? ByteOffset<Config>(a, offset) : 0, __float_as_int(ok ? w[k] : CUDART_NAN_F));
        }
      }
    }
    staged = __syncthreads_or(disordered) == 0 && fits;
  }

  // ---- 2. (output channel, pixel chunk) tasks from a block-local queue.
  const int ntasks = nrows * a.chunks;
  // Pixels of the tile this lane computes: virtual (affine) or real indices.
  const int npix = th_n * tw_n;  // real pixels (mode B)

  for (;;) {
    int task = 0;
    if (lane == 0) task = atomicAdd(&task_counter, 1);
    task = __shfl_sync(0xffffffffu, task, 0);
    if (task >= ntasks) break;
    const int rl = task / a.chunks;
    const int chunk = task - rl * a.chunks;
    const int row = r_lo + rl;
    const int q0 = chunk * 32 * P + lane;

    int addr[P];      // byte address in the window of each pixel (mode B)
    int slot[P];      // staging pixel index, -1 if not a real output pixel
#pragma unroll
    for (int j = 0; j < P; ++j) {
      // Half-width: pixel pairs (2 lane + 64 (j / 2), +1).
      const int q = Config::kHalf ? chunk * 32 * P + 64 * (j >> 1) + 2 * lane + (j & 1) : q0 + 32 * j;
      int th, ow;
      if constexpr (Config::kAffinePixels) {
        th = q / a.tile_cols; ow = q - th * a.tile_cols;
        const bool valid = th < th_n && ow < tw_n;
        slot[j] = valid ? th * a.tile_w + ow : -1;
        addr[j] = 0;
      } else {
        th = q / tw_n; ow = q - th * tw_n;
        const bool valid = q < npix;
        slot[j] = valid ? th * a.tile_w + ow : -1;
        addr[j] = valid ? 4 * (th * a.stride_h * a.tile_cols + ow * a.stride_w) : 0;  // bytes
      }
    }

    float acc[P];
#pragma unroll
    for (int j = 0; j < P; ++j) acc[j] = 0.0f;

    // Applies one or two decoded (byte offset, value) pairs to this lane's P pixels: the
    // address of a load is a base register plus the pair's offset plus an immediate.
    // Float32 window: pixels q0 + 32 j; half-width: the words of pixel pairs (tiled_plan.h).
    const char* window = reinterpret_cast<const char*>(tile);
    const char* base = window + 4 * (Config::kHalf ? chunk * 16 * P + lane : q0);
    auto pixel = [&](int off, int j) -> float {  // float32 window: pixel j at byte offset `off`
      return *reinterpret_cast<const float*>(Config::kAffinePixels ? base + off + 128 * j
                                                                   : window + addr[j] + off);
    };
    auto pixel_pair = [&](int off, int j) -> float2 {  // half-width: pixels 2 j, 2 j + 1
      if constexpr (Config::kHalf) {
        return UnpackPair<T>(*reinterpret_cast<const uint32_t*>(base + off + 128 * j));
      } else {
        return make_float2(0.0f, 0.0f);  // never called
      }
    };
    auto apply_pair = [&](const int4 mm) {
      const float w0 = __int_as_float(mm.y), w1 = __int_as_float(mm.w);
      if constexpr (Config::kHalf) {
        float2 a0[P / 2], a1[P / 2];
#pragma unroll
        for (int j = 0; j < P / 2; ++j) {
          a0[j] = pixel_pair(mm.x, j);
          a1[j] = pixel_pair(mm.z, j);
        }
#pragma unroll
        for (int j = 0; j < P / 2; ++j) {
          acc[2 * j] = fmaf(w1, a1[j].x, fmaf(w0, a0[j].x, acc[2 * j]));
          acc[2 * j + 1] = fmaf(w1, a1[j].y, fmaf(w0, a0[j].y, acc[2 * j + 1]));
        }
      } else {
        float v0[P], v1[P];
#pragma unroll
        for (int j = 0; j < P; ++j) {
          v0[j] = pixel(mm.x, j);
          v1[j] = pixel(mm.z, j);
        }
#pragma unroll
        for (int j = 0; j < P; ++j) acc[j] = fmaf(w1, v1[j], fmaf(w0, v0[j], acc[j]));
      }
    };
    auto apply_one = [&](const int2 mm) {
      const float w0 = __int_as_float(mm.y);
      if constexpr (Config::kHalf) {
#pragma unroll
        for (int j = 0; j < P / 2; ++j) {
          const float2 a0 = pixel_pair(mm.x, j);
          acc[2 * j] = fmaf(w0, a0.x, acc[2 * j]);
          acc[2 * j + 1] = fmaf(w0, a0.y, acc[2 * j + 1]);
        }
      } else {
#pragma unroll
        for (int j = 0; j < P; ++j) acc[j] = fmaf(w0, pixel(mm.x, j), acc[j]);
      }
    };

    bool row_bad = false;   // warp-uniform
    bool lane_bad = false;  // an out-of-range column decoded by this lane
    if (staged) {
      // Pointers are in order and inside the group (checked above); pairs sit at even
      // indices for the 16-byte broadcast loads, so an odd start takes one single first.
      int i = group_ptr[rl] - group_base;
      const int e = group_ptr[rl + 1] - group_base;
      if ((i & 1) && i < e) apply_one(group_meta[i++]);
#pragma unroll 2
      for (; i + 1 < e; i += 2) apply_pair(reinterpret_cast<const int4*>(group_meta)[i >> 1]);
      if (i < e) apply_one(group_meta[i]);
    } else {
      int begin = __ldg(indptr + row), end = __ldg(indptr + row + 1);
      row_bad = ends_bad || begin < 0 || end > a.nnz || begin > end;
      begin = max(begin, 0);
      end = min(end, a.nnz);
      for (int jb = begin; jb < end; jb += 32) {
        int cnt = min(32, end - jb);
        // Lanes decode 32 nonzeros into pre-scaled tile offsets; a bad column is applied
        // as weight 0 at offset 0 (in bounds) and poisons the row below.
        int2 m = make_int2(0, 0);
        if constexpr (Config::kCluster) {
          // Keep the nonzeros of this block's Cin chunk, packed in order (ballot + popc).
          bool keep = false;
          if (lane < cnt) {
            int offset = 0;
            if (DecodeColumnInChunk(a, __ldg(indices + jb + lane), ci_lo, cin_n, &offset, &keep)) {
              if (keep) m = make_int2(ByteOffset<Config>(a, offset), __float_as_int(LoadAsFloat(values + jb + lane)));
            } else {
              lane_bad = true;
            }
          }
          const unsigned kept = __ballot_sync(0xffffffffu, keep);
          if (keep) meta2[__popc(kept & ((1u << lane) - 1u))] = m;
          cnt = __popc(kept);
        } else {
          if (lane < cnt) {
            int offset = 0;
            if (DecodeColumn(a, __ldg(indices + jb + lane), &offset)) {
              m = make_int2(ByteOffset<Config>(a, offset), __float_as_int(LoadAsFloat(values + jb + lane)));
            } else {
              lane_bad = true;
            }
          }
          meta2[lane] = m;
        }
        __syncwarp();
        int i = 0;
#pragma unroll 4
        for (; i + 1 < cnt; i += 2) apply_pair(meta4[i >> 1]);
        if (i < cnt) apply_one(meta2[i]);
        __syncwarp();
      }
    }
    if (__any_sync(0xffffffffu, lane_bad) || row_bad) {
#pragma unroll
      for (int j = 0; j < P; ++j) acc[j] = CUDART_NAN_F;
    }
#pragma unroll
    for (int j = 0; j < P; ++j)
      if (slot[j] >= 0) stage[slot[j] * a.out_pitch + rl] = acc[j];
  }
  const T* bias_t = a.has_bias ? bias : nullptr;
  if constexpr (Config::kCluster) {
    // ---- 3'. cluster variant: every block of the cluster holds one Cin chunk's partial
    // results; block `rank` sums pixels rank, rank + chunks, ... over all chunks, in
    // chunk order (deterministic), through distributed shared memory.
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every partial is staged (and a block barrier)
    const int nc = a.cin_chunks;
    const float* parts[kMaxClusterChunks];
#pragma unroll
    for (int j = 0; j < kMaxClusterChunks; ++j) parts[j] = j < nc ? cluster.map_shared_rank(stage, j) : stage;
    for (int q = chunk_i + nc * warp; q < th_n * tw_n; q += nc * Config::kWarpsPerBlock) {
      const int th = q / tw_n, ow = q - th * tw_n;
      T* dst = out + ((static_cast<int64_t>(n) * a.out_h + oh0 + th) * a.out_w + ow0 + ow) * a.out_c + r_lo;
      const int src = (th * a.tile_w + ow) * a.out_pitch;
      for (int r = lane; r < nrows; r += 32) {
        float v = parts[0][src + r];
#pragma unroll
        for (int j = 1; j < kMaxClusterChunks; ++j)
          if (j < nc) v += parts[j][src + r];
        if (bias_t) v += LoadAsFloat(bias_t + r_lo + r);
        if (a.relu) v = ReluKeepNan(v);
        StoreFromFloat(dst + r, v);
      }
    }
    cluster.sync();  // no block leaves while the others still read its shared memory
  } else {
    __syncthreads();
    // ---- 3. staged results -> NHWC output, coalesced along channels.
    for (int q = warp; q < th_n * tw_n; q += Config::kWarpsPerBlock) {
      const int th = q / tw_n, ow = q - th * tw_n;
      T* dst = out + ((static_cast<int64_t>(n) * a.out_h + oh0 + th) * a.out_w + ow0 + ow) * a.out_c + r_lo;
      const float* src = stage + (th * a.tile_w + ow) * a.out_pitch;
      for (int r = lane; r < nrows; r += 32) {
        float v = src[r];
        if (bias_t) v += LoadAsFloat(bias_t + r_lo + r);
        if (a.relu) v = ReluKeepNan(v);
        StoreFromFloat(dst + r, v);
      }
    }
  }
}

// ---- host side --------------------------------------------------------------

struct DeviceInfo {
  bool ready = false;
  DeviceLimits limits;
};

cudaError_t GetLimits(DeviceLimits* limits) {
  static std::mutex mu;
  static DeviceInfo info[64];
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev < 0 || dev >= 64) return cudaErrorInvalidDevice;
  std::lock_guard<std::mutex> lock(mu);
  if (!info[dev].ready) {
    int sms = 0, smem_block = 0, smem_sm = 0;
    if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return e;
    if ((e = cudaDeviceGetAttribute(&smem_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess) return e;
    if ((e = cudaDeviceGetAttribute(&smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev)) != cudaSuccess) return e;
    info[dev].limits.sm_count = sms;
    // Leave room for the kernel's static shared memory and the per-block reserve.
    info[dev].limits.max_smem_block = smem_block - 256;
    info[dev].limits.max_smem_sm = smem_sm;
    int major = 0;
    if ((e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev)) != cudaSuccess) return e;
    info[dev].limits.clusters = major >= 9;
    info[dev].ready = true;
  }
  *limits = info[dev].limits;
  return cudaSuccess;
}

struct PlanKey {
  int64_t v[20];
  bool operator==(const PlanKey& o) const {
    for (int i = 0; i < 20; ++i)
      if (v[i] != o.v[i]) return false;
    return true;
  }
};
struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const {
    uint64_t h = 1469598103934665603ull;
    for (int64_t x : k.v) { h ^= static_cast<uint64_t>(x); h *= 1099511628211ull; }
    return static_cast<size_t>(h);
  }
};

// Plans are cached: the cost model runs once per (geometry, dtype, device).
cudaError_t CachedPlan(const ConvGeometry& g, int elem_bytes, Variant variant, Plan* plan) {
  DeviceLimits limits;
  if (cudaError_t e = GetLimits(&limits); e != cudaSuccess) return e;
  int dev = 0;
  cudaGetDevice(&dev);
  const PlanKey key{{g.batch, g.in_h, g.in_w, g.in_c, g.out_h, g.out_w, g.out_c, g.kernel_h,
                     g.kernel_w, g.stride_h, g.stride_w, g.pad_h_lo, g.pad_w_lo, g.dilation_h,
                     g.dilation_w, g.nnz, (g.relu ? 1 : 0) + 2 * (g.has_bias ? 1 : 0), elem_bytes,
                     dev, static_cast<int>(variant)}};
  static std::mutex mu;
  static std::unordered_map<PlanKey, Plan, PlanKeyHash> cache;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) { *plan = it->second; return cudaSuccess; }
  }
  *plan = ChooseTilePlan(g, elem_bytes, limits, variant);
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() > 4096) cache.clear();
  cache.emplace(key, *plan);
  return cudaSuccess;
}

template <class Config>
cudaError_t LaunchConfig(cudaStream_t stream, const Plan& plan, const SparseConvOperands& op) {
  using T = typename Config::Element;
  auto kernel = TiledSparseConvKernel<Config>;
  if (cudaError_t e = AllowDynamicSmem(reinterpret_cast<const void*>(kernel)); e != cudaSuccess) return e;
  TileArgs args = plan.args;
  if (reinterpret_cast<uintptr_t>(op.x) % 16 != 0) args.vec_fill = 0;
  if constexpr (Config::kCluster) {
    // The Cin chunks of one (tile, group) are consecutive blocks forming one cluster.
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>(plan.blocks));
    config.blockDim = dim3(Config::kThreadsPerBlock);
    config.dynamicSmemBytes = static_cast<size_t>(plan.smem_bytes);
    config.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(args.cin_chunks);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    config.attrs = attr;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, kernel, args, static_cast<const T*>(op.x),
                              static_cast<const T*>(op.values), op.indices, op.indptr,
                              static_cast<const T*>(op.bias), static_cast<T*>(op.out));
  } else {
    kernel<<<static_cast<unsigned>(plan.blocks), Config::kThreadsPerBlock, plan.smem_bytes, stream>>>(
        args, static_cast<const T*>(op.x), static_cast<const T*>(op.values), op.indices,
        op.indptr, static_cast<const T*>(op.bias), static_cast<T*>(op.out));
    return cudaGetLastError();
  }
}

template <typename T, Variant kVariant>
cudaError_t LaunchTyped(cudaStream_t stream, const Plan& plan, const SparseConvOperands& op) {
  if (plan.affine) {
    switch (plan.pixels_per_thread) {
      case 1: return LaunchConfig<TileConfig<T, 1, true, kVariant>>(stream, plan, op);
      case 2: return LaunchConfig<TileConfig<T, 2, true, kVariant>>(stream, plan, op);
      case 4: return LaunchConfig<TileConfig<T, 4, true, kVariant>>(stream, plan, op);
      case 8: return LaunchConfig<TileConfig<T, 8, true, kVariant>>(stream, plan, op);
    }
  } else {
    switch (plan.pixels_per_thread) {
      case 1: return LaunchConfig<TileConfig<T, 1, false, kVariant>>(stream, plan, op);
      case 2: return LaunchConfig<TileConfig<T, 2, false, kVariant>>(stream, plan, op);
      default: break;  // the planner picks P <= 2 for mode B
    }
  }
  return cudaErrorInvalidConfiguration;
}

// Half-width variant: bf16/f16, stride-1 tiles, P >= 2 only (the planner's plans).
template <typename T>
cudaError_t LaunchHalf(cudaStream_t stream, const Plan& plan, const SparseConvOperands& op) {
  if constexpr (sizeof(T) == 2) {
    if (plan.affine) {
      switch (plan.pixels_per_thread) {
        case 2: return LaunchConfig<TileConfig<T, 2, true, Variant::kHalfWindow>>(stream, plan, op);
        case 4: return LaunchConfig<TileConfig<T, 4, true, Variant::kHalfWindow>>(stream, plan, op);
        case 8: return LaunchConfig<TileConfig<T, 8, true, Variant::kHalfWindow>>(stream, plan, op);
        default: break;
      }
    }
  }
  return cudaErrorInvalidConfiguration;
}

template <typename T>
cudaError_t LaunchTyped(cudaStream_t stream, const Plan& plan, const SparseConvOperands& op) {
  switch (plan.variant) {
    case Variant::kHalfWindow: return LaunchHalf<T>(stream, plan, op);
    case Variant::kPlain: return LaunchTyped<T, Variant::kPlain>(stream, plan, op);
    case Variant::kStaged: return LaunchTyped<T, Variant::kStaged>(stream, plan, op);
    case Variant::kCluster: return LaunchTyped<T, Variant::kCluster>(stream, plan, op);
  }
  return cudaErrorInvalidConfiguration;
}

int ElemBytes(ElementType type) { return type == ElementType::kF32 ? 4 : 2; }

// 1x1, stride 1, no padding: the convolution is an SpMM over N*H*W pixels;
// run it as one image of a single row so tiles take any number of pixels.
ConvGeometry AsSpmm(const ConvGeometry& g) {
  ConvGeometry s = g;
  s.batch = 1;
  s.in_h = s.out_h = 1;
  s.in_w = s.out_w = g.batch * g.in_h * g.in_w;
  s.stride_h = s.stride_w = 1;
  s.dilation_h = s.dilation_w = 1;
  return s;
}

cudaError_t PlanFor(const ConvGeometry& g, ElementType type, Variant variant, Plan* plan) {
  return CachedPlan(g, ElemBytes(type), variant, plan);
}

cudaError_t Dispatch(cudaStream_t stream, const Plan& plan, ElementType type,
                     const SparseConvOperands& op) {
  switch (type) {
    case ElementType::kF32: return LaunchTyped<float>(stream, plan, op);
    case ElementType::kBF16: return LaunchTyped<__nv_bfloat16>(stream, plan, op);
    case ElementType::kF16: return LaunchTyped<__half>(stream, plan, op);
  }
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace tiled

bool IsSpmm1x1(const ConvGeometry& g) {
  return g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 && g.stride_w == 1 &&
         g.pad_h_lo == 0 && g.pad_h_hi == 0 && g.pad_w_lo == 0 && g.pad_w_hi == 0;
}

cudaError_t PlanSparseConvDirect(const ConvGeometry& g, ElementType type, tiled::Variant variant, bool* fits) {
  tiled::Plan plan;
  cudaError_t e = tiled::PlanFor(g, type, variant, &plan);
  *fits = e == cudaSuccess && plan.ok;
  return e;
}

cudaError_t PlanSparseConvSpmm1x1(const ConvGeometry& g, ElementType type, tiled::Variant variant, bool* fits) {
  *fits = false;
  if (!IsSpmm1x1(g)) return cudaSuccess;
  tiled::Plan plan;
  cudaError_t e = tiled::PlanFor(tiled::AsSpmm(g), type, variant, &plan);
  *fits = e == cudaSuccess && plan.ok;
  return e;
}

cudaError_t AutoVariant(const ConvGeometry& g, ElementType type, bool spmm, tiled::Variant* variant) {
  using tiled::Variant;
  *variant = Variant::kPlain;
  const ConvGeometry planned = spmm ? tiled::AsSpmm(g) : g;
  tiled::Plan plain, other;
  if (cudaError_t e = tiled::PlanFor(planned, type, Variant::kPlain, &plain); e != cudaSuccess) return e;
  if (!plain.ok) return cudaSuccess;
  // Measured (NOTES.md, design 5): Cin chunks pay only where the all-Cin window leaves a
  // block fewer than a quarter of a warp's pixel lanes (the 7x7 maps of 2048 channels).
  if (plain.args.tile_h * plain.args.tile_w < kClusterBelowPixels) {
    if (cudaError_t e = tiled::PlanFor(planned, type, Variant::kCluster, &other); e != cudaSuccess) return e;
    if (other.ok) *variant = Variant::kCluster;
    return cudaSuccess;
  }
  if (type == ElementType::kF32) return cudaSuccess;
  if (cudaError_t e = tiled::PlanFor(planned, type, Variant::kHalfWindow, &other); e != cudaSuccess) return e;
  // Measured (NOTES.md, design 6): the half-width window wins where its plan keeps the plain
  // plan's split of the work or a coarser one; where the cost model spends its cheaper inner
  // loop on more, smaller blocks (each refilling its window), it loses (VGG conv5_1).
  if (other.ok && other.cost < plain.cost && other.blocks <= plain.blocks) *variant = Variant::kHalfWindow;
  return cudaSuccess;
}

cudaError_t LaunchSparseConvDirect(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                                   tiled::Variant variant, const SparseConvOperands& op) {
  tiled::Plan plan;
  if (cudaError_t e = tiled::PlanFor(g, type, variant, &plan); e != cudaSuccess) return e;
  if (!plan.ok) return cudaErrorInvalidConfiguration;
  return tiled::Dispatch(stream, plan, type, op);
}

cudaError_t LaunchSparseConvSpmm1x1(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                                    tiled::Variant variant, const SparseConvOperands& op) {
  if (!IsSpmm1x1(g)) return cudaErrorInvalidValue;
  tiled::Plan plan;
  if (cudaError_t e = tiled::PlanFor(tiled::AsSpmm(g), type, variant, &plan); e != cudaSuccess) return e;
  if (!plan.ok) return cudaErrorInvalidConfiguration;
  return tiled::Dispatch(stream, plan, type, op);
}

}  // namespace jaxsparse
