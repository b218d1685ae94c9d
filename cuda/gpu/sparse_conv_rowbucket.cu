// Row-bucketed sparse convolution ("design 3" in NOTES.md; opt-in only, selected by
// JAXSPARSE_GPU_KERNEL=rowbucket): register reuse of input values across output channels.
//
// 1. Prep kernel (one block per group of R = 16 output channels, writes the XLA
//    workspace): counting-sorts the group's nonzeros by key = ci * KH + kh and
//    stores them as (code, weight) pairs, code = key << 8 | r << 3 | kw, plus
//    the per-key prefix offsets. Entries of one bucket are ordered by code
//    (deterministic sums). If the end pointers are wrong or indptr is not
//    monotone anywhere, every block flags its group; a group with an out-of-range
//    column flags itself. A flagged block writes nothing else (no races on the
//    workspace).
// 2. Main kernel: a block owns an output tile and one row group. It copies the
//    tile's input window (all Cin, float32, channel-major, row pitch a multiple
//    of 4) to shared memory. Each warp owns a chunk of 256 virtual pixels (lane:
//    two groups of 4 contiguous pixels, 128 apart) and a slice of Cin. Per
//    bucket (ci, kh) the lane loads its 2 x 8-float window (4 LDS.128,
//    conflict-free) once into registers and applies every entry of the bucket:
//    a switch over the entry's (r, kw) code selects compile-time accumulator and
//    window indices (acc[16][8] stays in registers). At 90 % sparsity, R = 16,
//    KW = 3 a bucket has ~4.8 entries: 38 FFMA per 16 shared-memory wavefronts
//    instead of one wavefront per FMA. Slices are summed in a fixed order
//    through shared memory; bias/ReLU/conversion fused into the NHWC store.
//    Flagged groups write NaN to all their output channels (malformed CSR is
//    poisoned, never a plausible wrong result; the tiled kernels poison per row).
// Accepts stride_w == 1, dilation_w == 1, KW <= 5, Cin * KH <= 8192; anything
// else falls back to the default selection (sparse_conv_dispatch.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <mutex>

#include "gpu/element_io.cuh"
#include "gpu/dynamic_smem.h"
#include "gpu/sparse_conv_kernels.h"
#include "gpu/tiled_plan.h"

namespace jaxsparse {
namespace rowbucket {
namespace {

using tiled::FastDiv;

constexpr int kRows = 16;       // output channels per group (accumulator rows)
constexpr int kWarps = 8;       // warps per block of the main kernel
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 256;     // virtual pixels per warp chunk (32 lanes x 8)
constexpr int kMaxKeys = 8192;  // Cin * KH limit (prep kernel histogram in shared memory)
constexpr int kMaxKW = 5;
constexpr int kPrepThreads = 256;
constexpr int kSortLimit = kRows * kMaxKW;  // larger buckets (duplicates) stay unsorted
constexpr int kStagePitch = kRows + 1;

// Compile-time configuration of one main-kernel instantiation.
template <typename T, int kKWMax>
struct RowBucketConfig {
  using Element = T;
  static constexpr int kKW = kKWMax;          // filter width handled (runtime KW <= kKW)
  static constexpr int kR = kRows;
  static constexpr int kP = 8;                // pixels per lane: 2 groups of 4
  static constexpr int kWinVecs = kKWMax == 1 ? 1 : 2;  // float4 loads per 4-pixel group
  static constexpr int kVecElems = 16 / sizeof(T);
  static_assert(kKWMax == 1 || kKWMax == 3 || kKWMax == 5, "KW class must be 1, 3 or 5");
  static_assert(4 * kWinVecs >= 4 + kKWMax - 1, "window registers must cover P + KW - 1");
  static_assert(kR <= 32 && kKWMax <= 8, "code packs r in 5 bits and kw in 3 bits");
  static_assert(kP == 2 * 4 && kChunk == 32 * kP, "lane owns two groups of 4 pixels");
  static_assert(kVecElems * sizeof(T) == 16, "16-byte fill vectors");
};

struct Args {
  int in_h, in_w, in_c, out_h, out_w, out_c;
  int kernel_h, kernel_w, stride_h, pad_h, pad_w, dil_h;
  int taps, nnz, keys;
  int relu, has_bias;
  int tile_h, tile_w, tile_rows, pitch, chan;
  int tiles_h, tiles_w, groups, chunks, slices;
  int tile_floats, smem_floats;
  int vec_fill;
  FastDiv div_cin, div_kw, div_kh;
};

struct Plan {
  bool ok = false;
  int kw_class = 0;
  int smem_bytes = 0;
  int64_t blocks = 0;
  double cost = 0;
  Args args{};
};

// ---- prep kernel: bucket the nonzeros of each row group by (ci, kh) ---------

// Column c = (kh * KW + kw) * Cin + ci -> bucket key ci * KH + kh and tap kw.
// False for a column outside [0, taps) (the group is then poisoned).
__device__ __forceinline__ bool DecodeColumn(const Args& a, int c, int* key, int* kw) {
  if (c < 0 || c >= a.taps) return false;
  const int k = static_cast<int>(a.div_cin.Div(static_cast<uint32_t>(c)));
  const int ci = c - k * a.in_c;
  const int kh = static_cast<int>(a.div_kw.Div(static_cast<uint32_t>(k)));
  *kw = k - kh * a.kernel_w;
  *key = ci * a.kernel_h + kh;
  return true;
}

template <typename T>
__global__ void __launch_bounds__(kPrepThreads)
RowBucketPrepKernel(Args a, const T* __restrict__ values, const int32_t* __restrict__ indices,
                    const int32_t* __restrict__ indptr, int* __restrict__ status,
                    int* __restrict__ offs, int2* __restrict__ entries) {
  extern __shared__ int hist[];  // keys + 1
  __shared__ int bad;
  __shared__ int part[kPrepThreads];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int grp = blockIdx.x;
  const int r_lo = grp * kRows, nr = min(kRows, a.out_c - r_lo);
  if (tid == 0) bad = 0;
  __syncthreads();
  // Global well-formedness (every block computes the same answer).
  for (int i = tid; i < a.out_c; i += kPrepThreads) {
    const int p0 = __ldg(indptr + i), p1 = __ldg(indptr + i + 1);
    if (p0 > p1 || (i == 0 && p0 != 0) || (i == a.out_c - 1 && p1 != a.nnz)) bad = 1;
  }
  __syncthreads();
  if (bad) {
    if (tid == 0) status[grp] = 1;
    return;
  }
  const int K = a.keys;
  for (int k = tid; k <= K; k += kPrepThreads) hist[k] = 0;
  __syncthreads();
  const int base = __ldg(indptr + r_lo);
  // Count.
  for (int r = warp; r < nr; r += kPrepThreads / 32) {
    const int b = __ldg(indptr + r_lo + r), e = __ldg(indptr + r_lo + r + 1);
    for (int j = b + lane; j < e; j += 32) {
      int key, kw;
      if (!DecodeColumn(a, __ldg(indices + j), &key, &kw)) {
        bad = 1;
        continue;
      }
      atomicAdd(&hist[key], 1);
    }
  }
  __syncthreads();
  if (bad) {  // an out-of-range column in this group
    if (tid == 0) status[grp] = 1;
    return;
  }
  // Exclusive scan over K keys: contiguous per-thread spans, then a scan of the partials.
  const int span = (K + kPrepThreads - 1) / kPrepThreads;
  const int k0 = min(K, tid * span), k1 = min(K, k0 + span);
  int s = 0;
  for (int k = k0; k < k1; ++k) s += hist[k];
  part[tid] = s;
  __syncthreads();
  if (tid == 0) {
    int run = 0;
    for (int i = 0; i < kPrepThreads; ++i) { const int v = part[i]; part[i] = run; run += v; }
  }
  __syncthreads();
  int run = base + part[tid];
  int* offs_g = offs + static_cast<int64_t>(grp) * (K + 1);
  for (int k = k0; k < k1; ++k) {
    const int v = hist[k];
    hist[k] = run;
    offs_g[k] = run;
    run += v;
  }
  if (tid == kPrepThreads - 1) offs_g[K] = run;  // the last thread's span ends at K
  __syncthreads();
  // Scatter.
  for (int r = warp; r < nr; r += kPrepThreads / 32) {
    const int b = __ldg(indptr + r_lo + r), e = __ldg(indptr + r_lo + r + 1);
    for (int j = b + lane; j < e; j += 32) {
      int key, kw;
      if (!DecodeColumn(a, __ldg(indices + j), &key, &kw)) continue;
      const int pos = atomicAdd(&hist[key], 1);
      entries[pos] = make_int2((key << 8) | (r << 3) | kw, __float_as_int(LoadAsFloat(values + j)));
    }
  }
  __syncthreads();  // block-scope visibility of the global writes above
  // Order each (small) bucket by code so the sums are deterministic.
  for (int k = tid; k < K; k += kPrepThreads) {
    const int lo = offs_g[k], hi = offs_g[k + 1];
    if (hi - lo > kSortLimit) continue;
    for (int i = lo + 1; i < hi; ++i) {
      const int2 v = entries[i];
      int j = i - 1;
      while (j >= lo && entries[j].x > v.x) { entries[j + 1] = entries[j]; --j; }
      entries[j + 1] = v;
    }
  }
  if (tid == 0) status[grp] = 0;
}

// ---- main kernel --------------------------------------------------------------


// acc[R][P] += w * window: pixels 0-3 from winA, 4-7 from winB, tap kw.
template <int kR, int kKW>
__device__ __forceinline__ void Tap(float (&acc)[kRows][8], const float (&winA)[8],
                                    const float (&winB)[8], float w) {
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    acc[kR][p] = fmaf(w, winA[p + kKW], acc[kR][p]);
    acc[kR][4 + p] = fmaf(w, winB[p + kKW], acc[kR][4 + p]);
  }
}

#define JAXSPARSE_RB_CASE(r, kw)                                   \
  case ((r) << 3) | (kw):                                          \
    if constexpr ((kw) < kKWMax) Tap<(r), (kw)>(acc, winA, winB, w); \
    break;
#define JAXSPARSE_RB_ROW(r)                                                        \
  JAXSPARSE_RB_CASE(r, 0) JAXSPARSE_RB_CASE(r, 1) JAXSPARSE_RB_CASE(r, 2)          \
  JAXSPARSE_RB_CASE(r, 3) JAXSPARSE_RB_CASE(r, 4)

template <int kKWMax>
__device__ __forceinline__ void Dispatch(int code, float w, float (&acc)[kRows][8],
                                         const float (&winA)[8], const float (&winB)[8]) {
  static_assert(kRows == 16 && kMaxKW == 5, "case table is written for 16 rows x 5 taps");
  switch (code & 127) {
    JAXSPARSE_RB_ROW(0) JAXSPARSE_RB_ROW(1) JAXSPARSE_RB_ROW(2) JAXSPARSE_RB_ROW(3)
    JAXSPARSE_RB_ROW(4) JAXSPARSE_RB_ROW(5) JAXSPARSE_RB_ROW(6) JAXSPARSE_RB_ROW(7)
    JAXSPARSE_RB_ROW(8) JAXSPARSE_RB_ROW(9) JAXSPARSE_RB_ROW(10) JAXSPARSE_RB_ROW(11)
    JAXSPARSE_RB_ROW(12) JAXSPARSE_RB_ROW(13) JAXSPARSE_RB_ROW(14) JAXSPARSE_RB_ROW(15)
    default: break;
  }
}
#undef JAXSPARSE_RB_ROW
#undef JAXSPARSE_RB_CASE

template <class Config>
__global__ void __launch_bounds__(kThreads, 1)
RowBucketConvKernel(Args a, const typename Config::Element* __restrict__ x,
                    const typename Config::Element* __restrict__ values,
                    const int32_t* __restrict__ indices, const int32_t* __restrict__ indptr,
                    const typename Config::Element* __restrict__ bias,
                    typename Config::Element* __restrict__ out, const int* __restrict__ status,
                    const int* __restrict__ offs, const int2* __restrict__ entries) {
  using T = typename Config::Element;
  constexpr int V = Config::kVecElems;
  constexpr int kKWMax = Config::kKW;
  extern __shared__ float4 smem_raw[];
  float* tile = reinterpret_cast<float*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int4* meta4 = reinterpret_cast<int4*>(tile + a.smem_floats) + warp * 16;
  int2* meta2 = reinterpret_cast<int2*>(meta4);

  int b = blockIdx.x;
  const int grp = b % a.groups; b /= a.groups;
  const int tw_i = b % a.tiles_w; b /= a.tiles_w;
  const int th_i = b % a.tiles_h;
  const int n = b / a.tiles_h;
  const int oh0 = th_i * a.tile_h, ow0 = tw_i * a.tile_w;
  const int th_n = min(a.tile_h, a.out_h - oh0), tw_n = min(a.tile_w, a.out_w - ow0);
  const int ih0 = oh0 * a.stride_h - a.pad_h, iw0 = ow0 - a.pad_w;
  const int win = a.tile_rows * a.pitch;

  // ---- 1. window fill: lane = window position (conflict-free shared stores).
  const T* xn = x + static_cast<int64_t>(n) * a.in_h * a.in_w * a.in_c;
  const int npb = (win + 31) >> 5;
  if (a.vec_fill) {
    const int cinv = a.in_c / V;
    const int units = npb * cinv;
    constexpr int kBatch = 4;
    for (int u0 = warp; u0 < units; u0 += kBatch * kWarps) {
      float f[kBatch][V];
      int dst[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int u = u0 + k * kWarps;
        const int pb = u / cinv, cv = u - pb * cinv;
        const int pos = pb * 32 + lane;
        const bool ok = u < units && pos < win;
        dst[k] = ok ? cv * V * a.chan + pos : -1;
        bool inb = false;
        int64_t off = 0;
        if (ok) {
          const int t = pos / a.pitch, c = pos - t * a.pitch;
          const int ih = ih0 + t, iw = iw0 + c;
          inb = ih >= 0 && ih < a.in_h && iw >= 0 && iw < a.in_w;
          off = (static_cast<int64_t>(ih) * a.in_w + iw) * a.in_c + cv * V;
        }
        if (inb) {
          LoadVec16<T>(xn + off, f[k]);
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) f[k][v] = 0.0f;
        }
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k)
        if (dst[k] >= 0) {
#pragma unroll
          for (int v = 0; v < V; ++v) tile[dst[k] + v * a.chan] = f[k][v];
        }
    }
  } else {
    const int units = npb * a.in_c;
    constexpr int kBatch = 8;
    for (int u0 = warp; u0 < units; u0 += kBatch * kWarps) {
      float f[kBatch];
      int dst[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int u = u0 + k * kWarps;
        const int pb = u / a.in_c, ci = u - pb * a.in_c;
        const int pos = pb * 32 + lane;
        const bool ok = u < units && pos < win;
        dst[k] = ok ? ci * a.chan + pos : -1;
        f[k] = 0.0f;
        if (ok) {
          const int t = pos / a.pitch, c = pos - t * a.pitch;
          const int ih = ih0 + t, iw = iw0 + c;
          if (ih >= 0 && ih < a.in_h && iw >= 0 && iw < a.in_w)
            f[k] = LoadAsFloat(xn + (static_cast<int64_t>(ih) * a.in_w + iw) * a.in_c + ci);
        }
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k)
        if (dst[k] >= 0) tile[dst[k]] = f[k];
    }
  }
  {
    const int gap = a.chan - win;
    for (int i = tid; i < a.in_c * gap; i += kThreads) {
      const int ci = i / gap;
      tile[ci * a.chan + win + (i - ci * gap)] = 0.0f;
    }
    for (int i = a.in_c * a.chan + tid; i < a.tile_floats; i += kThreads) tile[i] = 0.0f;
  }
  __syncthreads();

  // ---- 2. one (pixel chunk, Cin slice) unit per warp.
  const int r_lo = grp * kRows;
  const int nr = min(kRows, a.out_c - r_lo);
  const int chunk = warp % a.chunks, slice = warp / a.chunks;
  const bool active = slice < a.slices;
  const int q0a = chunk * kChunk + lane * 4, q0b = q0a + 128;
  float acc[kRows][8];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int p = 0; p < 8; ++p) acc[r][p] = 0.0f;

  if (active) {
    float winA[8], winB[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) winA[i] = winB[i] = 0.0f;
    int cur_key = -1;
    const int row_step = a.dil_h * a.pitch;
    // Applies one (code, weight) entry; reloads the window when the bucket changes.
    auto apply = [&](int code, int wbits) {
      if (code < 0) return;
      const int key = code >> 8;
      if (key != cur_key) {
        cur_key = key;
        const int ci = static_cast<int>(a.div_kh.Div(static_cast<uint32_t>(key)));
        const int kh = key - ci * a.kernel_h;
        const float* base = tile + ci * a.chan + kh * row_step;
        const float4* pa = reinterpret_cast<const float4*>(base + q0a);
        const float4* pb = reinterpret_cast<const float4*>(base + q0b);
#pragma unroll
        for (int v = 0; v < Config::kWinVecs; ++v) {
          const float4 fa = pa[v], fb = pb[v];
          winA[4 * v] = fa.x; winA[4 * v + 1] = fa.y; winA[4 * v + 2] = fa.z; winA[4 * v + 3] = fa.w;
          winB[4 * v] = fb.x; winB[4 * v + 1] = fb.y; winB[4 * v + 2] = fb.z; winB[4 * v + 3] = fb.w;
        }
      }
      Dispatch<kKWMax>(code, __int_as_float(wbits), acc, winA, winB);
    };
    auto run_batch = [&](int cnt) {
      int i = 0;
      for (; i + 1 < cnt; i += 2) {
        const int4 mm = meta4[i >> 1];
        apply(mm.x, mm.y);
        apply(mm.z, mm.w);
      }
      if (i < cnt) {
        const int2 mm = meta2[i];
        apply(mm.x, mm.y);
      }
    };

    if (status[grp] == 0) {
      // Bucketed entries of this slice's channels: keys [ci_lo * KH, ci_hi * KH).
      const int ci_lo = static_cast<int>(static_cast<int64_t>(slice) * a.in_c / a.slices);
      const int ci_hi = static_cast<int>(static_cast<int64_t>(slice + 1) * a.in_c / a.slices);
      const int* offs_g = offs + static_cast<int64_t>(grp) * (a.keys + 1);
      const int e0 = max(0, __ldg(offs_g + ci_lo * a.kernel_h));
      const int e1 = min(a.nnz, __ldg(offs_g + ci_hi * a.kernel_h));
      for (int e = e0; e < e1; e += 32) {
        const int cnt = min(32, e1 - e);
        int2 m = make_int2(-1, 0);
        if (lane < cnt) m = __ldg(entries + e + lane);
        meta2[lane] = m;
        __syncwarp();
        run_batch(cnt);
        __syncwarp();
      }
    }
  }
  __syncthreads();  // the window is dead from here on: the staging tile aliases it

  // ---- 3. slices summed in a fixed order into the staging tile [pixel][row].
  float* stage = tile;
  for (int s = 0; s < a.slices; ++s) {
    if (active && slice == s) {
#pragma unroll
      for (int p = 0; p < 8; ++p) {
        const int q = (p < 4 ? q0a + p : q0b + p - 4);
        const int th = q / a.pitch, col = q - th * a.pitch;
        if (th < th_n && col < tw_n) {
          float* dst = stage + (th * a.tile_w + col) * kStagePitch;
#pragma unroll
          for (int r = 0; r < kRows; ++r) dst[r] = s == 0 ? acc[r][p] : dst[r] + acc[r][p];
        }
      }
    }
    __syncthreads();
  }

  // ---- 4. staged results -> NHWC output with bias/ReLU/conversion.
  const T* bias_t = a.has_bias ? bias : nullptr;
  const int npix = th_n * tw_n;
  const bool poisoned = status[grp] != 0;
  for (int i = tid; i < npix * kRows; i += kThreads) {
    const int q = i / kRows, r = i - q * kRows;
    if (r >= nr) continue;
    const int th = q / tw_n, ow = q - th * tw_n;
    float v = stage[(th * a.tile_w + ow) * kStagePitch + r];
    if (bias_t) v += LoadAsFloat(bias_t + r_lo + r);
    if (poisoned) v = CUDART_NAN_F;
    if (a.relu) v = ReluKeepNan(v);
    T* dst = out + ((static_cast<int64_t>(n) * a.out_h + oh0 + th) * a.out_w + ow0 + ow) * a.out_c;
    StoreFromFloat(dst + r_lo + r, v);
  }
}

// ---- host side ------------------------------------------------------------------

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t RoundUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }
bool FitsInt32(int64_t v) { return v >= 0 && v <= INT32_MAX; }

bool Accepts(const ConvGeometry& g) {
  const int64_t vals[] = {g.batch, g.in_h, g.in_w, g.in_c, g.out_h, g.out_w, g.out_c, g.kernel_h,
                          g.kernel_w, g.stride_h, g.pad_h_lo, g.pad_w_lo, g.dilation_h, g.nnz,
                          g.taps(), g.in_h * g.in_w * g.in_c, g.out_h * g.out_w * g.out_c};
  for (int64_t v : vals)
    if (!FitsInt32(v)) return false;
  return g.output_pixels() > 0 && g.out_c > 0 && g.in_c > 0 && g.stride_w == 1 &&
         g.dilation_w == 1 && g.kernel_w >= 1 && g.kernel_w <= kMaxKW &&
         g.in_c * g.kernel_h <= kMaxKeys && g.nnz < (int64_t{1} << 30);
}

int64_t Groups(const ConvGeometry& g) { return CeilDiv(g.out_c, kRows); }

// Workspace: status[groups] | offs[groups * (keys + 1)] | entries[nnz] (int2).
struct WorkspaceLayout {
  size_t status = 0, offs = 0, entries = 0, total = 0;
};
WorkspaceLayout Layout(const ConvGeometry& g) {
  WorkspaceLayout l;
  const int64_t groups = Groups(g), keys = g.in_c * g.kernel_h;
  l.status = 0;
  l.offs = RoundUp(groups * 4, 256);
  l.entries = l.offs + RoundUp(groups * (keys + 1) * 4, 256);
  l.total = l.entries + RoundUp(std::max<int64_t>(g.nnz, 1) * 8, 256);
  return l;
}

Plan ChoosePlan(const ConvGeometry& g, int elem_bytes, const tiled::DeviceLimits& lim) {
  Plan best;
  if (!Accepts(g)) return best;
  const int64_t ho = g.out_h, wo = g.out_w, cin = g.in_c, kw = g.kernel_w;
  const int64_t keys = cin * g.kernel_h, groups = Groups(g);
  const double entries_g = static_cast<double>(g.nnz) / groups;
  for (int64_t split = 1; split <= 8; ++split) {
    const int64_t tw = CeilDiv(wo, split);
    if (split > 1 && CeilDiv(wo, tw) != split) continue;
    const int64_t pitch = RoundUp(tw + kw - 1, 4);
    for (int64_t th = 1; th <= ho; ++th) {
      if (g.stride_h > 1 && th > 1) break;  // virtual pixels need unit row stride
      const int64_t vp = th * pitch;
      const int64_t chunks = CeilDiv(vp, kChunk);
      if (chunks > kWarps) break;
      const int64_t slices = std::min<int64_t>(kWarps / chunks, cin);
      const int64_t tr = (th - 1) * g.stride_h + (g.kernel_h - 1) * g.dilation_h + 1;
      const int64_t chan = RoundUp(tr * pitch, 4);
      const int64_t max_read = (cin - 1) * chan + (g.kernel_h - 1) * g.dilation_h * pitch +
                               chunks * kChunk + 3;
      const int64_t tile_floats = RoundUp(std::max(cin * chan, max_read + 1), 4);
      const int64_t stage_floats = th * tw * kStagePitch;
      const int64_t smem_floats = RoundUp(std::max(tile_floats, stage_floats), 4);
      const int64_t smem = smem_floats * 4 + kWarps * 32 * 8;
      if (smem > lim.max_smem_block) continue;
      const int64_t tiles = g.batch * CeilDiv(ho, th) * CeilDiv(wo, tw);
      const int64_t blocks = tiles * groups;
      if (blocks > INT32_MAX) continue;
      // Cost in SM cycles: fill (global -> shared), compute (16 wavefronts per
      // bucket per chunk, ~12 issue slots per entry per chunk, spread over the
      // block's busy warps, at most 4 issuing at once), fixed per-block latency.
      const double fill = static_cast<double>(cin * tr * pitch) * (2.0 / 32.0 + elem_bytes / 64.0);
      const double work = static_cast<double>(chunks) * (keys * 16.0 + entries_g * 12.0 / 4.0);
      const double busy = static_cast<double>(chunks * slices);
      const double compute = work / std::min(busy, 4.0) * std::max(1.0, 4.0 / busy);
      const double cost = std::ceil(static_cast<double>(blocks) / lim.sm_count) *
                          (fill + compute + 2500.0);
      if (!best.ok || cost < best.cost * 0.999) {
        best.ok = true;
        best.cost = cost;
        best.kw_class = kw == 1 ? 1 : (kw <= 3 ? 3 : 5);
        best.smem_bytes = static_cast<int>(smem);
        best.blocks = blocks;
        Args& a = best.args;
        a.in_h = static_cast<int>(g.in_h); a.in_w = static_cast<int>(g.in_w);
        a.in_c = static_cast<int>(cin);
        a.out_h = static_cast<int>(ho); a.out_w = static_cast<int>(wo);
        a.out_c = static_cast<int>(g.out_c);
        a.kernel_h = static_cast<int>(g.kernel_h); a.kernel_w = static_cast<int>(kw);
        a.stride_h = static_cast<int>(g.stride_h);
        a.pad_h = static_cast<int>(g.pad_h_lo); a.pad_w = static_cast<int>(g.pad_w_lo);
        a.dil_h = static_cast<int>(g.dilation_h);
        a.taps = static_cast<int>(g.taps()); a.nnz = static_cast<int>(g.nnz);
        a.keys = static_cast<int>(keys);
        a.relu = g.relu ? 1 : 0; a.has_bias = g.has_bias ? 1 : 0;
        a.tile_h = static_cast<int>(th); a.tile_w = static_cast<int>(tw);
        a.tile_rows = static_cast<int>(tr); a.pitch = static_cast<int>(pitch);
        a.chan = static_cast<int>(chan);
        a.tiles_h = static_cast<int>(CeilDiv(ho, th)); a.tiles_w = static_cast<int>(CeilDiv(wo, tw));
        a.groups = static_cast<int>(groups);
        a.chunks = static_cast<int>(chunks); a.slices = static_cast<int>(slices);
        a.tile_floats = static_cast<int>(tile_floats);
        a.smem_floats = static_cast<int>(smem_floats);
        a.vec_fill = cin % (16 / elem_bytes) == 0 ? 1 : 0;
        a.div_cin = FastDiv::Make(static_cast<uint32_t>(cin));
        a.div_kw = FastDiv::Make(static_cast<uint32_t>(kw));
        a.div_kh = FastDiv::Make(static_cast<uint32_t>(g.kernel_h));
      }
    }
  }
  return best;
}

cudaError_t Limits(tiled::DeviceLimits* lim) {
  int dev = 0, sms = 0, smem = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return e;
  if ((e = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess) return e;
  lim->sm_count = sms;
  lim->max_smem_block = smem - 256;
  lim->max_smem_sm = smem;
  return cudaSuccess;
}

int ElemBytes(ElementType type) { return type == ElementType::kF32 ? 4 : 2; }

template <class Config>
cudaError_t LaunchMain(cudaStream_t stream, const Plan& plan, const SparseConvOperands& op,
                       const int* status, const int* offs, const int2* entries) {
  using T = typename Config::Element;
  auto kernel = RowBucketConvKernel<Config>;
  if (cudaError_t e = AllowDynamicSmem(reinterpret_cast<const void*>(kernel)); e != cudaSuccess) return e;
  Args args = plan.args;
  if (reinterpret_cast<uintptr_t>(op.x) % 16 != 0) args.vec_fill = 0;
  kernel<<<static_cast<unsigned>(plan.blocks), kThreads, plan.smem_bytes, stream>>>(
      args, static_cast<const T*>(op.x), static_cast<const T*>(op.values), op.indices, op.indptr,
      static_cast<const T*>(op.bias), static_cast<T*>(op.out), status, offs, entries);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchTyped(cudaStream_t stream, const Plan& plan, const SparseConvOperands& op,
                        const WorkspaceLayout& l, void* ws) {
  char* base = static_cast<char*>(ws);
  int* status = reinterpret_cast<int*>(base + l.status);
  int* offs = reinterpret_cast<int*>(base + l.offs);
  int2* entries = reinterpret_cast<int2*>(base + l.entries);
  const int smem_prep = (plan.args.keys + 1) * 4;
  RowBucketPrepKernel<T><<<static_cast<unsigned>(plan.args.groups), kPrepThreads, smem_prep, stream>>>(
      plan.args, static_cast<const T*>(op.values), op.indices, op.indptr, status, offs, entries);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  switch (plan.kw_class) {
    case 1: return LaunchMain<RowBucketConfig<T, 1>>(stream, plan, op, status, offs, entries);
    case 3: return LaunchMain<RowBucketConfig<T, 3>>(stream, plan, op, status, offs, entries);
    case 5: return LaunchMain<RowBucketConfig<T, 5>>(stream, plan, op, status, offs, entries);
  }
  return cudaErrorInvalidConfiguration;
}

}  // namespace
}  // namespace rowbucket

cudaError_t PlanSparseConvRowBucket(const ConvGeometry& g, ElementType type, bool* fits,
                                    size_t* workspace_bytes) {
  *fits = false;
  if (workspace_bytes) *workspace_bytes = 0;
  if (!rowbucket::Accepts(g)) return cudaSuccess;
  tiled::DeviceLimits lim;
  if (cudaError_t e = rowbucket::Limits(&lim); e != cudaSuccess) return e;
  const rowbucket::Plan plan = rowbucket::ChoosePlan(g, rowbucket::ElemBytes(type), lim);
  *fits = plan.ok;
  if (plan.ok && workspace_bytes) *workspace_bytes = rowbucket::Layout(g).total;
  return cudaSuccess;
}

cudaError_t LaunchSparseConvRowBucket(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                                      const SparseConvOperands& op, void* workspace,
                                      size_t workspace_bytes) {
  if (!rowbucket::Accepts(g)) return cudaErrorInvalidValue;
  tiled::DeviceLimits lim;
  if (cudaError_t e = rowbucket::Limits(&lim); e != cudaSuccess) return e;
  const rowbucket::Plan plan = rowbucket::ChoosePlan(g, rowbucket::ElemBytes(type), lim);
  if (!plan.ok) return cudaErrorInvalidConfiguration;
  const rowbucket::WorkspaceLayout l = rowbucket::Layout(g);
  if (workspace == nullptr || workspace_bytes < l.total ||
      reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return cudaErrorInvalidValue;
  switch (type) {
    case ElementType::kF32: return rowbucket::LaunchTyped<float>(stream, plan, op, l, workspace);
    case ElementType::kBF16: return rowbucket::LaunchTyped<__nv_bfloat16>(stream, plan, op, l, workspace);
    case ElementType::kF16: return rowbucket::LaunchTyped<__half>(stream, plan, op, l, workspace);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jaxsparse
