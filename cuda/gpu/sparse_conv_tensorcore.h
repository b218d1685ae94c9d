// Tensor-core sparse convolution over a per-filter union plan (issue 14).
// Host-callable launchers; no FFI or nanobind headers. Two designs, one file each:
// `sparse_conv_tensorcore.cu` (kSlab, 1x1 stride 1 only: all Cin channels of a pixel tile
// staged once, warps walk groups) and `sparse_conv_tensorcore_chunked.cu` (kChunked, any
// geometry: the (tap, Cin) columns streamed in chunks, one group per warp held in registers
// across the chunks, a 128-channel output tile). The plan is jaxsparse/tc_plan.py's
// TensorCorePlan: output channels in groups of 16 (`channels`, -1 for missing rows), each
// group's union columns padded to the mma k (`columns`, `col_offsets`), and the packed
// dense tiles (`packed`, 16 x k_padded per group at 16 * col_offsets[g], in the mma's
// A-fragment order).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "conv_geometry.h"

namespace jaxsparse {

struct TensorCoreOperands {
  const void* x = nullptr;             // NHWC input, element type
  const void* packed = nullptr;        // packed tiles, element type
  const int32_t* columns = nullptr;    // (K_total,) union columns c = (kh * KW + kw) * Cin + ci
  const int32_t* col_offsets = nullptr;  // (G + 1,)
  const int32_t* channels = nullptr;   // (G * 16,) output channel of each tile row, -1: none
  const void* bias = nullptr;          // (Cout,) or null
  void* out = nullptr;                 // NHWC output, element type
};

struct TensorCoreShape {
  // The convolution (conv_geometry.h): x (batch, in_h, in_w, in_c) into (batch, out_h, out_w,
  // out_c) = `pixels` output pixels. A 1x1 stride-1 call over P pixels: 1 x 1 x P images.
  ConvGeometry conv;
  int64_t pixels = 0, in_c = 0, out_c = 0, groups = 0, k_total = 0;
  bool relu = false;
  // kChunked only: 128 when the plan is windowed to 128 channels (groups 8b..8b+7 hold the
  // output channels [128 b, 128 b + 128)), so a block's outputs are contiguous; 0: any plan.
  int64_t window = 0;
  // kChunked only: pixels per block (16, 32 or 64); 0: the launcher's choice.
  int64_t tile_pixels = 0;
};

enum class TensorCoreDesign : int { kSlab = 1, kChunked = 2 };

// Whether a design takes this shape. kSlab: a 1x1 stride-1 unpadded convolution whose input
// slab of at least 16 pixels of all Cin channels fits in shared memory. kChunked: any
// geometry, any Cin.
bool SlabTensorCoreFits(const TensorCoreShape& s, ElementType type);
bool ChunkedTensorCoreFits(const TensorCoreShape& s, ElementType type);
inline bool TensorCoreFits(const TensorCoreShape& s, ElementType type, TensorCoreDesign design) {
  return design == TensorCoreDesign::kChunked ? ChunkedTensorCoreFits(s, type) : SlabTensorCoreFits(s, type);
}

// bf16/f16: mma.sync m16n8k16 (plan k multiple 16); f32: TF32 m16n8k8 (plan k multiple 8).
// Accumulation in float32, bias and ReLU fused. The launchers trust the plan (the Python
// side checks it against the filter's fingerprint); memory stays in bounds for any column
// values: kSlab clamps them to [0, Cin), kChunked reads a zero row for a column outside the
// current chunk. kChunked also needs each group's columns in block order (tc_plan.py's
// `column_blocks`, as plans build them and loading a plan checks), else it skips columns.
// Both read the packed tiles in the mma's fragment order (`tile_offset`), 16-byte aligned.
cudaError_t LaunchSlabTensorCore(cudaStream_t stream, const TensorCoreShape& s, ElementType type,
                                 const TensorCoreOperands& op);
cudaError_t LaunchChunkedTensorCore(cudaStream_t stream, const TensorCoreShape& s, ElementType type,
                                    const TensorCoreOperands& op);
inline cudaError_t LaunchTensorCoreSpmm(cudaStream_t stream, const TensorCoreShape& s, ElementType type,
                                        const TensorCoreOperands& op, TensorCoreDesign design) {
  return design == TensorCoreDesign::kChunked ? LaunchChunkedTensorCore(stream, s, type, op)
                                              : LaunchSlabTensorCore(stream, s, type, op);
}

}  // namespace jaxsparse
