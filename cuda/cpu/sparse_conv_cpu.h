// Direct sparse convolution on the CPU: the reference engine for machines
// without a GPU. No FFI or nanobind headers.
#pragma once

#include <cstdint>
#include <string>

#include "conv_geometry.h"

namespace jaxsparse {

// Checks the CSR structure (monotone row pointers starting at 0 and ending at
// nnz, column indices in [0, taps)). Returns an empty string when valid,
// otherwise a message naming the problem.
std::string CheckCsrStructure(const ConvGeometry& g, const int32_t* indices,
                              const int32_t* indptr);

// out[n, oh, ow, r] = act(bias[r] + sum_j values[j] * x[n, ih(j), iw(j), ci(j)])
// over the nonzeros j of row r, taps falling in the padding contributing zero.
// Accumulates in float32 whatever the element type. `bias` may be null.
// Uses up to `num_threads` threads (0: all hardware threads).
void SparseConvCpu(const ConvGeometry& g, ElementType type, const void* x,
                   const void* values, const int32_t* indices,
                   const int32_t* indptr, const void* bias, void* out,
                   int num_threads);

// Gradient with respect to the nonzero values (a sampled dense-dense product
// over the fixed sparsity pattern): grad_values[j] = sum over (n, oh, ow) of
// dy[n, oh, ow, r(j)] * x[n, ih(j), iw(j), ci(j)]. Accumulates in float32;
// the geometry's out_* describe dy.
void SparseConvFilterGradCpu(const ConvGeometry& g, ElementType type, const void* x,
                             const void* dy, const int32_t* indices, const int32_t* indptr,
                             void* grad_values, int num_threads);

}  // namespace jaxsparse
