// Kernel selection for one sparse_conv call.
#include "gpu/sparse_conv_kernels.h"
#include "gpu/sparse_conv_launch.h"

namespace jaxsparse {

size_t SparseConvWorkspaceBytes(const ConvGeometry&, ElementType) { return 0; }

cudaError_t LaunchSparseConv(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                             const SparseConvOperands& operands, void* /*workspace*/,
                             size_t /*workspace_bytes*/) {
  return LaunchSparseConvNaive(stream, g, type, operands);
}

}  // namespace jaxsparse
