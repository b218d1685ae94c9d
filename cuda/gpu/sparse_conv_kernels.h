// The individual kernel families, each behind its own launcher; the dispatcher
// (sparse_conv_dispatch.cu) picks one per call.
#pragma once

#include "gpu/sparse_conv_launch.h"
#include "gpu/tiled_plan.h"

namespace jaxsparse {

// One thread per (output pixel, output channel): the correctness baseline and
// the fallback for shapes whose input window does not fit in shared memory.
cudaError_t LaunchSparseConvNaive(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                                  const SparseConvOperands& operands);

// Direct sparse convolution (any KxK, strides, padding, dilation): a block
// stages an output tile's input window for all channels in shared memory and
// its warps run over the nonzeros of its output channels (sparse_conv_tiled.cu).
// `variant` (tiled_plan.h): plain; staged (the block also stages its output channels'
// decoded nonzeros in shared memory first); or cluster (Cin-chunked windows whose partial
// sums a thread-block cluster adds up).
cudaError_t LaunchSparseConvDirect(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                                   tiled::Variant variant, const SparseConvOperands& operands);

// 1x1 / stride 1 / unpadded convolutions as an SpMM over N*H*W pixels
// (pixel tiles of any length; same kernel body as the direct one).
cudaError_t LaunchSparseConvSpmm1x1(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                                    tiled::Variant variant, const SparseConvOperands& operands);

// Opt-in only (the kernel option 'rowbucket'): nonzeros of 16 output channels
// re-bucketed by (ci, kh) into the workspace by a prep kernel, then each input
// window loaded once into registers and applied to every tap of its bucket
// (sparse_conv_rowbucket.cu). Accepts stride_w == 1, dilation_w == 1, KW <= 5.
// `fits` false: not handled, use another family. `workspace_bytes` may be null.
cudaError_t PlanSparseConvRowBucket(const ConvGeometry& g, ElementType type, bool* fits,
                                    size_t* workspace_bytes);
cudaError_t LaunchSparseConvRowBucket(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                                      const SparseConvOperands& operands, void* workspace,
                                      size_t workspace_bytes);

// The tiled variant kAuto takes: cluster where the plain plan's tile has fewer than
// kClusterBelowPixels output pixels (an all-Cin window too large for more); else, for
// bf16/f16, the half-width window where the cost model rates its plan cheaper without
// splitting the work over more blocks; else plain. `spmm`: plan the 1x1 SpMM form.
constexpr int kClusterBelowPixels = 8;
cudaError_t AutoVariant(const ConvGeometry& g, ElementType type, bool spmm, tiled::Variant* variant);

// Whether the tiled kernels have a plan that fits this device's shared memory.
bool IsSpmm1x1(const ConvGeometry& g);
cudaError_t PlanSparseConvDirect(const ConvGeometry& g, ElementType type, tiled::Variant variant, bool* fits);
cudaError_t PlanSparseConvSpmm1x1(const ConvGeometry& g, ElementType type, tiled::Variant variant, bool* fits);

}  // namespace jaxsparse
