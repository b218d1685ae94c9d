// Host-side planning for the shared-memory tiled sparse convolution kernels
// (direct KxK and 1x1 SpMM). Plain C++: no CUDA, FFI or nanobind headers, so
// the planner can be unit-tested on the host.
//
// One thread block owns one output tile (image n, TH output rows x TW output
// columns) and one group of output channels. It copies the input window of the
// tile (all Cin channels) from NHWC global memory into shared memory as
// float32, channel-major with zero padding, then its warps take (output
// channel, pixel chunk) tasks from a block-local queue. Per nonzero a warp
// reads one pre-scaled offset + value pair (decoded once per 32 nonzeros by
// the lanes, broadcast from shared memory) and each lane does P FMAs over P
// pixels. Results go through a shared-memory staging tile so the NHWC output
// is written coalesced, with bias/ReLU/conversion fused.
#pragma once

#include <cstdint>

#include "conv_geometry.h"

namespace jaxsparse {
namespace tiled {

// Fixed launch shape of the tiled kernels.
constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
constexpr int kMetaBytes = kWarps * 32 * 8;  // per-warp staging of 32 (offset, value) pairs

// Unsigned division by a run-time constant d >= 1 for numerators < 2^31
// (round-up multiply method: q = (umulhi(m, n) + n) >> s).
struct FastDiv {
  uint32_t mul = 0, shift = 0, div = 1;
  static FastDiv Make(uint32_t d) {
    FastDiv f;
    f.div = d;
    uint32_t s = 0;
    while ((uint64_t{1} << s) < d) ++s;
    f.shift = s;
    f.mul = d == 1 ? 0u
                   : static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - d)) / d + 1);
    return f;
  }
  JAXSPARSE_HOST_DEVICE uint32_t Div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t t = __umulhi(mul, n);
#else
    const uint32_t t = static_cast<uint32_t>((uint64_t{mul} * n) >> 32);
#endif
    return (t + n) >> shift;
  }
};

// Everything a tiled kernel needs, as 32-bit integers (checked to fit).
struct TileArgs {
  int n_images, in_h, in_w, in_c, out_h, out_w, out_c;
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int taps, nnz;
  int relu, has_bias;
  // Plan.
  int tile_h, tile_w;        // output tile
  int tile_rows, tile_cols;  // input window (rows, row pitch in shared memory)
  int chan_stride;           // shared-memory floats between channels
  int tiles_h, tiles_w;      // tiles per image
  int groups, rows_per_group;
  int chunks;                // pixel chunks per (row) task, 32 * P pixels each
  int tile_floats;           // shared floats of the input window incl. slack
  int out_pitch;             // staging floats per pixel (>= rows_per_group)
  int out_floats;            // staging floats
  int vec_fill;              // 1: Cin is a multiple of the 16-byte vector width
  // Staged variant only: capacity of the block's decoded (offset, value) pairs and the
  // ints reserved for its row pointers (a multiple of 4, so the pairs stay 16-byte aligned).
  int meta_cap, ptr_ints;
  // Cluster variant only: the window holds `cin_chunk` input channels (a multiple of the
  // vector width when vec_fill), the `cin_chunks` blocks of one tile and group form a
  // thread-block cluster and sum their partial results through distributed shared memory.
  int cin_chunk, cin_chunks;
  // Half-width variant only: half-element offset of the window's copy shifted by one element
  // (0: no copy, every tap offset is even). See kHalfWindow below.
  int half_copy;
  FastDiv div_cin, div_kw;
};

// Which tiled kernel a plan is for.
enum class Variant : int {
  kPlain = 0,    // the window holds all Cin; tasks stream their rows' nonzeros
  kStaged = 1,   // + the block's decoded filter rows staged in shared memory (below)
  kCluster = 2,  // Cin-chunked windows, partial sums reduced across a cluster (below)
  kHalfWindow = 3,  // bf16/f16 windows kept at half width, two pixels per shared load (below)
};

struct Plan {
  bool ok = false;
  Variant variant = Variant::kPlain;
  bool affine = false;   // stride-1 pixel addressing (virtual pixels incl. junk columns)
  int pixels_per_thread = 1;  // P
  int smem_bytes = 0;
  int64_t blocks = 0;
  double cost = 0;
  TileArgs args{};
};

struct DeviceLimits {
  int sm_count = 132;
  bool clusters = true;  // thread-block clusters (compute capability >= 9.0)
  int max_smem_block = 227 * 1024;  // opt-in limit per block
  int max_smem_sm = 228 * 1024;
};

// Staged variant: before computing, a block decodes the nonzeros of its whole group of
// output channels (row pointers, then (offset, value) pairs) into shared memory, next to
// the input window, so its tasks run without a dependent global load each. Groups whose
// nonzeros exceed the planned capacity (uneven rows) or whose pointers are disordered
// take the streaming path of the plain kernel. The capacity is planned from the mean row
// length with this much slack:
constexpr double kStagedSlack = 1.5;

// Cluster variant: the window of a block holds one chunk of the input channels, so tiles
// can be larger and more (and smaller) blocks exist when a map is small: the batch-1
// limit of the plain kernel, whose all-Cin window leaves a few pixels per block and one
// partial wave of blocks (NOTES.md). A task decodes its whole row and keeps the nonzeros
// of its chunk (warp ballot); after the tasks, the chunks' blocks of one (tile, group)
// sum their staged partial results through distributed shared memory in a fixed order
// (deterministic) and write the NHWC output with bias and ReLU fused. No workspace.
constexpr int kMaxClusterChunks = 8;  // the portable cluster size

// Half-width variant (bf16/f16 only, stride-1 "affine" tiles): the window keeps the input's
// own 2-byte elements, so one 32-bit shared load gives a lane two neighbouring pixels and a
// warp's load serves 64 pixels: half the shared-memory wavefronts per FMA of the float32
// window (the plain kernel's bound at batch 32), at the price of one conversion per value
// (float32 accumulation is kept). A lane owns pixel pairs (2 lane + 64 j, +1). A tap offset
// must be even for the 32-bit load to be aligned: channel stride and row pitch are even,
// and when a horizontal tap offset can be odd (KW > 1, odd dilation) the window is stored a
// second time shifted by one element, and odd offsets read that copy.

// Best plan for geometry `g` (already reshaped by the caller for 1x1 SpMM);
// `elem_bytes` is the element size of x. Returns ok = false when even the
// smallest tile does not fit in shared memory (or, for kCluster, when no split
// over at least two Cin chunks exists or clusters are unavailable).
Plan ChooseTilePlan(const ConvGeometry& g, int elem_bytes, const DeviceLimits& limits,
                    Variant variant = Variant::kPlain);

}  // namespace tiled
}  // namespace jaxsparse
