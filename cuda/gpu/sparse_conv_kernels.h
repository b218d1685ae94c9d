// The individual kernel families, each behind its own launcher; the dispatcher
// (sparse_conv_dispatch.cu) picks one per call.
#pragma once

#include "gpu/sparse_conv_launch.h"

namespace jaxsparse {

// One thread per (output pixel, output channel): the correctness baseline.
cudaError_t LaunchSparseConvNaive(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                                  const SparseConvOperands& operands);

}  // namespace jaxsparse
