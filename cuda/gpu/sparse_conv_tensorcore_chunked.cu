// Tensor-core sparse convolution, design kChunked (issue 14, second design; see the header).
//
// Why a second design: kSlab staged all Cin channels of a pixel tile, so Cin = 1024/2048 left
// 16 pixels per block and every A fragment (4 global loads a lane) fed 2 mma; its warps
// walked the groups one after another behind dependent loads. Here:
//  - a block is NP pixels x 8 groups (128 output channels), one group per warp, whose
//    accumulators stay in registers while the columns stream through shared memory in chunks of up to 4096 / NP
//    channels of one filter tap (every chunk 4096 elements);
//  - direct KxK: a chunk of tap (kh, kw) holds, for each of the block's output pixels, the
//    input pixel that tap reads (a per-pixel source address from a small table, zeros in the
//    padding), so columns c = (kh * KW + kw) * Cin + ci are chunked like the channels of a
//    1x1 layer and no im2col is written; a pixel's tap rows are re-read from L2, not HBM;
//  - the chunks arrive through a ring of cp.async stages (4 for 16-bit types, 3 for float32),
//    pixel-major as NHWC has them, so several chunks are in flight while the warps compute:
//    the first version of this design loaded one chunk ahead through registers, and its
//    blocks waited on memory latency (g1 reduce b32 at 0.95: 58 µs for 64 MB of traffic);
//  - each landed chunk is transposed once in shared memory to channel-major (row pitch
//    NP + 8), by ldmatrix.trans for 16-bit types and 16-byte loads for float32 (rounded to
//    TF32 there, not per mma), so that a union channel's pixels form one ldmatrix row;
//  - so NP is up to 64 whatever Cin: each A fragment feeds NP / 8 mma, and the next k-step's
//    columns and A fragment (one 16-byte load a lane: the plan stores tiles in fragment
//    order; four row-major loads a lane, each 8 rows apart, kept L1 busy) are prefetched
//    into registers;
//  - the plan knows blocks, not chunks: a group's union columns come in blocks (tap,
//    ci / 64) ascending and are walked once across the chunks (whole blocks); a k-step whose
//    columns straddle a chunk boundary is issued in each chunk it touches, its lanes whose
//    column lies in another chunk reading a zero row (each column still meets its weights
//    exactly once). Within a block the plan spreads the columns of each ldmatrix phase over
//    distinct ci residues modulo 8 (modulo 4 for TF32), the bank quads of their chunk rows:
//    sorted, the gathered rows met 2-way bank conflicts on average at 95 %, spread 1.5;
//  - outputs go through a shared [pixel][128] stage; with a plan windowed to 128 channels
//    (`TensorCoreShape::window`) the block's channels are one contiguous run of each pixel's
//    NHWC row and the copy out is coalesced 16-byte stores; otherwise a per-element scatter.
// Tried and reverted: persistent blocks looping over pixel tiles with the ring running across
// tiles (more registers, half the occupancy, idle blocks in the last round: slower; NOTES.md).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "gpu/dynamic_smem.h"
#include "gpu/element_io.cuh"
#include "gpu/sparse_conv_tensorcore.h"
#include "gpu/tensorcore_mma.cuh"

namespace jaxsparse {
namespace tensorcore {
namespace {

constexpr int kGroupRows = 16;  // output channels per group (the mma m)

struct ChunkedArgs {
  int pixels, in_c, out_c, groups;
  int relu, has_bias;
  int vec_in;   // Cin % (16 / sizeof T) == 0 and x 16-byte aligned: 16-byte input loads
  int window;   // 1: block b's channels are [128 b, 128 b + 128) (a windowed plan)
  int vec_out;  // window and Cout % (16 / sizeof T) == 0 and out aligned: 16-byte stores
  // The convolution: output pixel (n, oh, ow) reads input pixel (n, oh * stride_h - pad_h +
  // kh * dil_h, ow * stride_w - pad_w + kw * dil_w) at tap (kh, kw).
  int in_h, in_w, out_hw, out_w, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int chunks;  // taps x ceil(Cin / kChunk)
};

// Compile-time configuration (Sputnik style).
template <typename T, int kPixels>
struct ChunkedConfig {
  using Element = T;
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;  // raw element bits
  static constexpr bool kTf32 = sizeof(T) == 4;
  static constexpr int kK = kTf32 ? 8 : 16;          // mma k, the plan's k multiple
  static constexpr int kWarps = 8;                   // one group each
  static constexpr int kThreads = kWarps * 32;
  // Blocks per SM the register budget must allow: 16-bit types at most 80 registers a thread
  // (3 blocks; left free, the direct kernel took 91 and 2 blocks, 10-50 % slower), float32 128.
  static constexpr int kMinBlocks = kTf32 ? 2 : 3;
  static constexpr int kChannels = kWarps * kGroupRows;  // output channels of a block: 128
  static constexpr int kNP = kPixels;                // pixels of a block
  static constexpr int kNT = kNP / 8;                // n-tiles of 8 pixels per warp
  static constexpr int kChunk = 4096 / kNP;         // input channels per chunk
  static constexpr int kStages = kTf32 ? 3 : 4;      // cp.async ring depth
  static constexpr int kVec = 16 / sizeof(T);        // elements per 16-byte copy
  static constexpr int kRawPitch = kChunk + kVec;    // pixel-major landing row pitch (+16 B: no bank conflicts)
  static constexpr int kRawElems = kNP * kRawPitch;
  static constexpr int kPitch = kNP + 8;             // channel-major chunk row pitch, elements
  static constexpr int kCopies = kNP * kChunk / kVec / kThreads;  // 16-byte copies per thread and chunk
  static constexpr int kStagePitch = kChannels + 8;  // output stage row pitch, elements
  static constexpr int kSlabElems = kStages * kRawElems + (kChunk + 1) * kPitch;  // ring, chunk, zero row
  static constexpr int kTableBytes = 3 * kNP * sizeof(int);  // per pixel: image base, top row, left column
  static constexpr int kStageElems = kNP * kStagePitch;      // aliases the ring, chunk and table
  static constexpr int kLoadBytes = kSlabElems * sizeof(T) + kTableBytes;
  static constexpr int kSmemBytes = kLoadBytes > kStageElems * int{sizeof(T)} ? kLoadBytes : kStageElems * sizeof(T);
  static constexpr int kTransposeTiles = kNP * kChunk / 256 / kWarps;  // 8x32 tiles per warp (16-bit types)
  static_assert(kNP == 16 || kNP == 32 || kNP == 64, "pixels per block: 16, 32 or 64");
  static_assert(kTf32 || kNT % 2 == 0, "ldmatrix.x4 covers two n-tiles");
  static_assert((kPitch * sizeof(T)) % 16 == 0, "ldmatrix rows and 16-byte fills need aligned rows");
  static_assert((kStagePitch * sizeof(T)) % 16 == 0, "16-byte copies out of the stage");
  static_assert(kChunk % 32 == 0 && kCopies >= 1 && kNP * kChunk % (kVec * kThreads) == 0,
                "chunks of whole 8x32 transposition tiles and whole copies per thread");
  static_assert(kTransposeTiles * 256 * kWarps == kNP * kChunk, "whole 8x32 transposition tiles per warp (16-bit types)");
  static_assert((kSlabElems * sizeof(T)) % 16 == 0, "the pixel table starts aligned");
  static_assert((kRawPitch * sizeof(T)) % 16 == 0 && ((kRawPitch * sizeof(T) / 4) % 32) == 4,
                "landing rows 16-byte aligned, consecutive rows 4 banks apart");
  static_assert(kSmemBytes <= 100 * 1024, "at least two blocks per SM");
};

// A position in the column stream: channels [ch0, ch0 + width) of tap (kh, kw), i.e. the
// columns [cs, cs + width), read at the input offset (dy, dx) from each pixel's top-left.
// Stepped chunk by chunk (no divisions in the loop: they cost as much as a chunk's mma).
struct ChunkPos {
  int dy = 0, dx = 0, ch0 = 0, cs = 0, width = 0;
  int kw = 0;  // the tap's column, for the step to the next tap

  template <class C>
  __device__ __forceinline__ void Start(const ChunkedArgs& a) { width = min(C::kChunk, a.in_c); }

  template <class C>
  __device__ __forceinline__ void Next(const ChunkedArgs& a) {
    cs += width;
    ch0 += C::kChunk;
    if (ch0 >= a.in_c) {  // the next tap: its column stream starts right after this one's
      ch0 = 0;
      dx += a.dil_w;
      if (++kw == a.kernel_w) {
        kw = 0;
        dx = 0;
        dy += a.dil_h;
      }
    }
    width = min(C::kChunk, a.in_c - ch0);
  }
};

// The block's pixel table: per output pixel its image's first input pixel and the input row
// and column of its top-left tap (a far negative row past the last pixel: never in bounds).
template <class C>
__device__ __forceinline__ void FillPixelTable(const ChunkedArgs& a, int p0, int* table) {
  const int p = threadIdx.x;
  if (p >= C::kNP) return;
  const int gp = p0 + p;
  int base = 0, top = -(1 << 30), left = 0;
  if (gp < a.pixels) {
    const int n = gp / a.out_hw, r = gp - n * a.out_hw, oh = r / a.out_w;
    base = n * a.in_h * a.in_w;
    top = oh * a.stride_h - a.pad_h;
    left = (r - oh * a.out_w) * a.stride_w - a.pad_w;
  }
  table[p] = base;
  table[C::kNP + p] = top;
  table[2 * C::kNP + p] = left;
}

// Starts the copy of a chunk (NP pixels x kChunk channels, pixel-major) into a landing
// stage: 16-byte cp.async where x allows (zeros for padding, past the last pixel or channel),
// else plain element copies (Cin not a multiple of the vector, or x misaligned). Threads run
// over a pixel's channels fastest: coalesced global reads.
template <class C>
__device__ __forceinline__ void IssueChunk(const ChunkedArgs& a, const typename C::Element* __restrict__ x,
                                           const int* table, const ChunkPos& c, typename C::Bits* raw) {
  using Bits = typename C::Bits;
  constexpr int kPerRow = C::kChunk / C::kVec;
#pragma unroll
  for (int j = 0; j < C::kCopies; ++j) {
    const int i = threadIdx.x + j * C::kThreads;
    const int p = i / kPerRow, v = i - p * kPerRow;
    const int y = table[C::kNP + p] + c.dy, xw = table[2 * C::kNP + p] + c.dx, ch = c.ch0 + v * C::kVec;
    const bool pixel = static_cast<unsigned>(y) < static_cast<unsigned>(a.in_h) &&
                       static_cast<unsigned>(xw) < static_cast<unsigned>(a.in_w);
    Bits* dst = raw + p * C::kRawPitch + v * C::kVec;
    const typename C::Element* src =
        x + (pixel ? (static_cast<int64_t>(table[p]) + static_cast<int64_t>(y) * a.in_w + xw) * a.in_c + ch : 0);
    if (a.vec_in) {
      const bool ok = pixel && ch < a.in_c;
      CpAsync16(dst, ok ? static_cast<const void*>(src) : static_cast<const void*>(x), ok ? 16 : 0);
    } else {
#pragma unroll
      for (int k = 0; k < C::kVec; ++k)
        dst[k] = pixel && ch + k < a.in_c ? __ldg(reinterpret_cast<const Bits*>(src) + k) : Bits(0);
    }
  }
}

// Transposes a landed stage into the channel-major chunk: 16-bit types by ldmatrix.trans (a
// warp takes 8 pixels x 32 channels: lane i gives the row of pixel i & 7 at channel block
// i >> 3, and receives two neighbouring pixels of one channel as a 32-bit word; kTransposeTiles
// such blocks a warp); float32 by
// 16-byte loads of 4 channels, rounded to TF32.
template <class C>
__device__ __forceinline__ void TransposeChunk(const typename C::Bits* raw, typename C::Bits* chunk) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if constexpr (C::kTf32) {
#pragma unroll
    for (int j = 0; j < C::kNP * C::kChunk / 4 / C::kThreads; ++j) {
      const int i = threadIdx.x + j * C::kThreads;
      const int p = i % C::kNP, v = i / C::kNP;  // pixels fastest: conflict-free stores
      const uint4 w = *reinterpret_cast<const uint4*>(raw + p * C::kRawPitch + 4 * v);
      chunk[(4 * v + 0) * C::kPitch + p] = ToTf32(__uint_as_float(w.x));
      chunk[(4 * v + 1) * C::kPitch + p] = ToTf32(__uint_as_float(w.y));
      chunk[(4 * v + 2) * C::kPitch + p] = ToTf32(__uint_as_float(w.z));
      chunk[(4 * v + 3) * C::kPitch + p] = ToTf32(__uint_as_float(w.w));
    }
  } else {
#pragma unroll
    for (int o = 0; o < C::kTransposeTiles; ++o) {
      const int tile = warp * C::kTransposeTiles + o;
      const int pg = tile % (C::kNP / 8), cg = tile / (C::kNP / 8);  // 8-pixel, 32-channel block
      uint32_t d[4];
      LdMatrixX4Trans(SmemAddr(raw + (pg * 8 + (lane & 7)) * C::kRawPitch + cg * 32 + (lane >> 3) * 8),
                      d[0], d[1], d[2], d[3]);
#pragma unroll
      for (int m = 0; m < 4; ++m)
        *reinterpret_cast<uint32_t*>(chunk + (cg * 32 + m * 8 + (lane >> 2)) * C::kPitch + pg * 8 + 2 * (lane & 3)) =
            d[m];
    }
  }
}

// One k-step's operands of the calling lane: its union column(s) and its A fragment.
struct Step {
  int col0, col1;  // bf16/f16: col0 = column (lane & 15); TF32: columns q and q + 4
  uint32_t a[4];
};

template <class C>
__device__ __forceinline__ void LoadStep(const int32_t* __restrict__ cols, const typename C::Element* __restrict__ tile,
                                         int step, int lane, Step& st) {
  const int k0 = step * C::kK;
  if constexpr (C::kTf32) {
    st.col0 = __ldg(cols + k0 + (lane & 3));
    st.col1 = __ldg(cols + k0 + (lane & 3) + 4);
  } else {
    st.col0 = __ldg(cols + k0 + (lane & 15));
    st.col1 = st.col0;
  }
  LoadAFragment(tile, step, lane, st.a);
}

// The mma of one k-step over the warp's NP pixels, lanes whose column is outside the chunk's
// [cs, cs + width) reading the zero row.
template <class C>
__device__ __forceinline__ void MmaStep(const typename C::Bits* chunk, const typename C::Bits* zero_row, int cs,
                                        int width, int lane, const Step& st, float (&acc)[C::kNT][4]) {
  const auto row = [&](int col) {
    return static_cast<unsigned>(col - cs) < static_cast<unsigned>(width) ? chunk + (col - cs) * C::kPitch
                                                                          : zero_row;
  };
  if constexpr (C::kTf32) {
    const int r0 = lane >> 2;
    const uint32_t* s0 = row(st.col0) + r0;
    const uint32_t* s1 = row(st.col1) + r0;
#pragma unroll
    for (int t = 0; t < C::kNT; ++t) Mma1688Tf32(acc[t], st.a, s0[8 * t], s1[8 * t]);
  } else {
    // ldmatrix.x4.trans: lanes 0-15 give union rows k0..k0+15 at pixels 0-7 of an n-pair,
    // lanes 16-31 the same rows at pixels 8-15.
    const uint32_t addr = SmemAddr(row(st.col0) + (lane >> 4) * 8);
#pragma unroll
    for (int j = 0; j < C::kNT / 2; ++j) {
      uint32_t b0, b1, b2, b3;
      LdMatrixX4Trans(addr + j * 16 * static_cast<uint32_t>(sizeof(typename C::Element)), b0, b1, b2, b3);
      Mma16816<typename C::Element>(acc[2 * j], st.a, b0, b1);
      Mma16816<typename C::Element>(acc[2 * j + 1], st.a, b2, b3);
    }
  }
}

// The block's outputs: fragments (rows r0 / r0 + 8, pixels 2q, 2q + 1 of each n-tile) with
// bias and ReLU into the stage [pixel][slot], then out of it: the block's contiguous channel
// run of each pixel (windowed), else each slot to its channel.
template <class C>
__device__ __forceinline__ void StoreTile(const ChunkedArgs& a, const float (&acc)[C::kNT][4],
                                          typename C::Element* stage, const int32_t* __restrict__ channels,
                                          const typename C::Element* __restrict__ bias,
                                          typename C::Element* __restrict__ out, int p0, int g, bool active) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int base = blockIdx.y * C::kChannels;  // the block's first slot (and channel, windowed)
  if (active) {
    const int r0 = lane >> 2, q = lane & 3;
    const int ch0 = __ldg(channels + g * kGroupRows + r0), ch1 = __ldg(channels + g * kGroupRows + r0 + 8);
    // Windowed: the stage column is the channel's place in the block's run; else the slot.
    const int col0 = a.window ? ch0 - base : warp * kGroupRows + r0;
    const int col1 = a.window ? ch1 - base : warp * kGroupRows + r0 + 8;
    const bool ok0 = ch0 >= 0 && ch0 < a.out_c && static_cast<unsigned>(col0) < C::kChannels;
    const bool ok1 = ch1 >= 0 && ch1 < a.out_c && static_cast<unsigned>(col1) < C::kChannels;
    const float bias0 = a.has_bias && ok0 ? LoadAsFloat(bias + ch0) : 0.0f;
    const float bias1 = a.has_bias && ok1 ? LoadAsFloat(bias + ch1) : 0.0f;
#pragma unroll
    for (int t = 0; t < C::kNT; ++t) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int p = 8 * t + 2 * q + e;
        float v0 = acc[t][e] + bias0, v1 = acc[t][2 + e] + bias1;
        if (a.relu) { v0 = ReluKeepNan(v0); v1 = ReluKeepNan(v1); }
        if (ok0) StoreFromFloat(stage + p * C::kStagePitch + col0, v0);
        if (ok1) StoreFromFloat(stage + p * C::kStagePitch + col1, v1);
      }
    }
  }
  __syncthreads();
  const int np = min(C::kNP, a.pixels - p0);
  if (a.window) {
    const int n = min(C::kChannels, a.out_c - base);
    if (a.vec_out) {
      const int nv = n / C::kVec;
      for (int i = tid; i < np * nv; i += C::kThreads) {
        const int p = i / nv, v = i - p * nv;
        *reinterpret_cast<uint4*>(out + static_cast<int64_t>(p0 + p) * a.out_c + base + v * C::kVec) =
            *reinterpret_cast<const uint4*>(stage + p * C::kStagePitch + v * C::kVec);
      }
    } else {
      for (int i = tid; i < np * n; i += C::kThreads) {
        const int p = i / n, j = i - p * n;
        out[static_cast<int64_t>(p0 + p) * a.out_c + base + j] = stage[p * C::kStagePitch + j];
      }
    }
  } else {
    const int slots = min(C::kChannels, (a.groups - static_cast<int>(blockIdx.y) * C::kWarps) * kGroupRows);
    for (int i = tid; i < np * slots; i += C::kThreads) {
      const int p = i / slots, j = i - p * slots;
      const int ch = __ldg(channels + base + j);
      if (ch >= 0 && ch < a.out_c) out[static_cast<int64_t>(p0 + p) * a.out_c + ch] = stage[p * C::kStagePitch + j];
    }
  }
}

template <class C>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks)
ChunkedTensorCoreKernel(ChunkedArgs a, const typename C::Element* __restrict__ x,
                        const typename C::Element* __restrict__ packed, const int32_t* __restrict__ columns,
                        const int32_t* __restrict__ col_offsets, const int32_t* __restrict__ channels,
                        const typename C::Element* __restrict__ bias, typename C::Element* __restrict__ out) {
  using T = typename C::Element;
  using Bits = typename C::Bits;
  constexpr int NP = C::kNP, NT = C::kNT, K = C::kK;
  extern __shared__ float4 smem_raw[];
  Bits* ring = reinterpret_cast<Bits*>(smem_raw);           // kStages landing stages
  Bits* chunk_buf = ring + C::kStages * C::kRawElems;       // the channel-major chunk
  Bits* zero_row = chunk_buf + C::kChunk * C::kPitch;
  int* table = reinterpret_cast<int*>(zero_row + C::kPitch);  // the block's pixel table

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int p0 = blockIdx.x * NP;
  const int g = blockIdx.y * C::kWarps + warp;  // this warp's group
  const bool active = g < a.groups;             // warp-uniform
  int kb = 0, steps = 0;
  if (active) {
    kb = __ldg(col_offsets + g);
    steps = (__ldg(col_offsets + g + 1) - kb) / K;
  }
  const int32_t* cols = columns + kb;
  const T* tile = packed + static_cast<int64_t>(kGroupRows) * kb;
  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;

  for (int i = tid; i < C::kPitch; i += C::kThreads) zero_row[i] = Bits(0);
  FillPixelTable<C>(a, p0, table);
  __syncthreads();
  const int chunks = a.chunks;
  ChunkPos ahead, pos;  // the next chunk to issue, the chunk to compute
  ahead.Start<C>(a);
  pos.Start<C>(a);
#pragma unroll
  for (int c = 0; c < C::kStages - 1; ++c) {  // one commit group per chunk, empty ones too
    if (c < chunks) {
      IssueChunk<C>(a, x, table, ahead, ring + c * C::kRawElems);
      ahead.Next<C>(a);
    }
    CpAsyncCommit();
  }
  int s = 0;  // the warp's next k-step
  for (int c = 0; c < chunks; ++c) {
    CpAsyncWait<C::kStages - 2>();  // chunk c has landed (this thread's copies)
    // Everyone's copies of chunk c are visible; every warp is done with chunk c - 1, so the
    // channel-major buffer and chunk c - 1's stage are free.
    __syncthreads();
    TransposeChunk<C>(ring + (c % C::kStages) * C::kRawElems, chunk_buf);
    if (c + C::kStages - 1 < chunks) {
      IssueChunk<C>(a, x, table, ahead, ring + ((c + C::kStages - 1) % C::kStages) * C::kRawElems);
      ahead.Next<C>(a);
    }
    CpAsyncCommit();
    __syncthreads();
    const int cs = pos.cs, ce = cs + pos.width;
    if (active && s < steps) {
      Step st, next;
      LoadStep<C>(cols, tile, s, lane, st);
      while (true) {
        // The plan orders a group's columns by block (tap, ci / 64), chunks are whole blocks,
        // and within a block the columns are spread over shared-memory banks, not sorted:
        // the step's chunk range comes from its smallest and largest column.
        const int first = __reduce_min_sync(0xffffffffu, min(st.col0, st.col1));
        const int last = __reduce_max_sync(0xffffffffu, max(st.col0, st.col1));
        if (first >= ce) break;  // the step starts in a later chunk
        if (s + 1 < steps) LoadStep<C>(cols, tile, s + 1, lane, next);
        MmaStep<C>(chunk_buf, zero_row, cs, pos.width, lane, st, acc);
        if (last >= ce) break;  // the step goes on in the next chunk: issue it again there
        if (++s == steps) break;
        st = next;
      }
    }
    pos.Next<C>(a);
  }
  CpAsyncWait<0>();
  __syncthreads();  // the output stage aliases the ring, the chunk and the table
  StoreTile<C>(a, acc, reinterpret_cast<T*>(smem_raw), channels, bias, out, p0, g, active);
}

// Pixels per block: the largest tile that still gives two blocks per SM of the H200 (132
// SMs), else 16.
int ChunkedPixels(const TensorCoreShape& s) {
  const int64_t blocks_y = (s.groups + 7) / 8;
  for (int np : {64, 32}) {
    if ((s.pixels + np - 1) / np * blocks_y >= 264) return np;
  }
  return 16;
}

template <class C>
cudaError_t LaunchChunkedConfig(cudaStream_t stream, const TensorCoreShape& s, const TensorCoreOperands& op) {
  using T = typename C::Element;
  ChunkedArgs a{};
  a.pixels = static_cast<int>(s.pixels);
  a.in_c = static_cast<int>(s.in_c);
  a.out_c = static_cast<int>(s.out_c);
  a.groups = static_cast<int>(s.groups);
  a.relu = s.relu ? 1 : 0;
  a.has_bias = op.bias != nullptr ? 1 : 0;
  a.vec_in = (s.in_c % C::kVec == 0 && reinterpret_cast<uintptr_t>(op.x) % 16 == 0) ? 1 : 0;
  a.window = s.window == C::kChannels ? 1 : 0;
  a.vec_out = (a.window && s.out_c % C::kVec == 0 && reinterpret_cast<uintptr_t>(op.out) % 16 == 0) ? 1 : 0;
  const ConvGeometry& g = s.conv;
  a.in_h = static_cast<int>(g.in_h);
  a.in_w = static_cast<int>(g.in_w);
  a.out_hw = static_cast<int>(g.out_h * g.out_w);
  a.out_w = static_cast<int>(g.out_w);
  a.kernel_w = static_cast<int>(g.kernel_w);
  a.stride_h = static_cast<int>(g.stride_h);
  a.stride_w = static_cast<int>(g.stride_w);
  a.pad_h = static_cast<int>(g.pad_h_lo);
  a.pad_w = static_cast<int>(g.pad_w_lo);
  a.dil_h = static_cast<int>(g.dilation_h);
  a.dil_w = static_cast<int>(g.dilation_w);
  a.chunks = static_cast<int>(g.kernel_h * g.kernel_w * ((s.in_c + C::kChunk - 1) / C::kChunk));
  if (cudaError_t e = AllowDynamicSmem(reinterpret_cast<const void*>(ChunkedTensorCoreKernel<C>), C::kSmemBytes);
      e != cudaSuccess)
    return e;
  const dim3 grid(static_cast<unsigned>((s.pixels + C::kNP - 1) / C::kNP),
                  static_cast<unsigned>((s.groups + C::kWarps - 1) / C::kWarps));
  ChunkedTensorCoreKernel<C><<<grid, C::kThreads, C::kSmemBytes, stream>>>(
      a, static_cast<const T*>(op.x), static_cast<const T*>(op.packed), op.columns, op.col_offsets, op.channels,
      static_cast<const T*>(op.bias), static_cast<T*>(op.out));
  return cudaGetLastError();
}

// Blocks of 8 warps whatever Cout: blocks of 4 for Cout <= 64 (no idle warps) measured
// slower (NOTES.md).
template <typename T>
cudaError_t LaunchChunkedTyped(cudaStream_t stream, const TensorCoreShape& s, const TensorCoreOperands& op) {
  switch (s.tile_pixels ? s.tile_pixels : ChunkedPixels(s)) {
    case 64: return LaunchChunkedConfig<ChunkedConfig<T, 64>>(stream, s, op);
    case 32: return LaunchChunkedConfig<ChunkedConfig<T, 32>>(stream, s, op);
    case 16: return LaunchChunkedConfig<ChunkedConfig<T, 16>>(stream, s, op);
  }
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace tensorcore

bool ChunkedTensorCoreFits(const TensorCoreShape& s, ElementType) {
  // 32-bit pixel, row and column arithmetic inside the kernel (a tile's pixel index may pass
  // the last pixel by up to 63; rows and columns of a tap stay within +-2^30, the far row of
  // a pixel past the end below -2^29); grid.y = groups / 8.
  const ConvGeometry& g = s.conv;
  constexpr int64_t kSpan = int64_t{1} << 29;
  return s.pixels > 0 && s.in_c > 0 && s.out_c > 0 && s.groups > 0 && s.pixels <= INT32_MAX - 64 &&
         s.pixels == g.output_pixels() && s.in_c == g.in_c && s.out_c == g.out_c &&
         g.batch * g.in_h * g.in_w <= INT32_MAX && g.in_h + g.pad_h_lo + g.pad_h_hi < kSpan &&
         g.in_w + g.pad_w_lo + g.pad_w_hi < kSpan && (g.kernel_h - 1) * g.dilation_h < kSpan &&
         (g.kernel_w - 1) * g.dilation_w < kSpan && g.stride_h < kSpan && g.stride_w < kSpan &&
         g.dilation_h < kSpan && g.dilation_w < kSpan &&
         (s.tile_pixels == 0 || s.tile_pixels == 16 || s.tile_pixels == 32 || s.tile_pixels == 64) &&
         g.taps() <= INT32_MAX / 2 && s.pixels * s.out_c <= (int64_t{1} << 40) &&
         (s.groups + 1) * 16 <= INT32_MAX && (s.groups + 7) / 8 <= 65535;
}

cudaError_t LaunchChunkedTensorCore(cudaStream_t stream, const TensorCoreShape& s, ElementType type,
                                    const TensorCoreOperands& op) {
  if (!ChunkedTensorCoreFits(s, type)) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(op.packed) % 16 != 0) return cudaErrorMisalignedAddress;  // LoadAFragment
  switch (type) {
    case ElementType::kF32: return tensorcore::LaunchChunkedTyped<float>(stream, s, op);
    case ElementType::kBF16: return tensorcore::LaunchChunkedTyped<__nv_bfloat16>(stream, s, op);
    case ElementType::kF16: return tensorcore::LaunchChunkedTyped<__half>(stream, s, op);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jaxsparse
