// Launchers for the CUDA sparse-convolution kernels. Host-callable, take the
// caller's stream, return the launch status; no FFI or nanobind headers.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "conv_geometry.h"
#include "conv_options.h"

namespace jaxsparse {

// Device pointers of one sparse_conv call. `bias` may be null.
struct SparseConvOperands {
  const void* x = nullptr;        // NHWC, element type
  const void* values = nullptr;   // (nnz,), element type
  const int32_t* indices = nullptr;  // (nnz,)
  const int32_t* indptr = nullptr;   // (out_c + 1,)
  const void* bias = nullptr;     // (out_c,), element type, or null
  void* out = nullptr;            // NHWC, element type
};

// Bytes of device scratch the chosen kernel needs for this geometry.
size_t SparseConvWorkspaceBytes(const ConvGeometry& g, ElementType type, const ConvOptions& options);

// Enqueues the sparse convolution on `stream`, picking the kernel from the
// geometry and `options.kernel` (a forced family where it applies). `workspace`
// must hold SparseConvWorkspaceBytes(g, type, options) bytes.
// Malformed CSR is never dereferenced out of bounds; it is poisoned: the output
// channels of rows with an out-of-range column or disordered pointers are NaN
// (all channels if indptr[0] != 0 or indptr[out_c] != nnz; the row-bucketed
// kernel poisons whole 16-channel groups, and everything for disordered pointers).
cudaError_t LaunchSparseConv(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                             const ConvOptions& options, const SparseConvOperands& operands, void* workspace,
                             size_t workspace_bytes);

}  // namespace jaxsparse
