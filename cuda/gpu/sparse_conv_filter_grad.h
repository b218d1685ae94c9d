// Launcher of the CUDA kernel for the gradient of sparse_conv with respect to
// the nonzero values (sampled dense-dense product over the fixed pattern).
#pragma once

#include <cuda_runtime_api.h>

#include "conv_geometry.h"

namespace jaxsparse {

// grad[j] = sum over (n, oh, ow) of dy[n, oh, ow, r(j)] * x[n, ih(j), iw(j), ci(j)],
// accumulated in float32. The geometry's out_* describe dy. Entries with an
// out-of-range column get a NaN gradient; entries no well-formed row covers get 0.
cudaError_t LaunchSparseConvFilterGrad(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                                       const void* x, const void* dy, const int32_t* indices,
                                       const int32_t* indptr, void* grad);

}  // namespace jaxsparse
