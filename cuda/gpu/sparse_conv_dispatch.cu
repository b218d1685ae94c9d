// Kernel selection for one sparse_conv call.
//
// 1x1 stride-1 unpadded convolutions (ResNet bottleneck reduce/expand) go to
// the SpMM configuration, everything else (KxK, strided 1x1 projections) to
// the direct tiled kernel; the tile shape, pixels per thread and the split of
// output channels over blocks are chosen by a cost model from shape, nnz and
// batch (tiled_plan.cu). Shapes whose smallest input window does not fit in
// shared memory fall back to the naive kernel.
//
// Internal knob (tests only, not public API): JAXSPARSE_GPU_KERNEL =
// naive | direct | spmm forces a family where it applies.
#include <cstdlib>
#include <cstring>

#include "gpu/sparse_conv_kernels.h"
#include "gpu/sparse_conv_launch.h"

namespace jaxsparse {

size_t SparseConvWorkspaceBytes(const ConvGeometry&, ElementType) { return 0; }

cudaError_t LaunchSparseConv(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                             const SparseConvOperands& operands, void* /*workspace*/,
                             size_t /*workspace_bytes*/) {
  if (g.output_pixels() == 0 || g.out_c == 0) return cudaSuccess;
  const char* force = std::getenv("JAXSPARSE_GPU_KERNEL");
  const bool force_naive = force && std::strcmp(force, "naive") == 0;
  const bool force_direct = force && std::strcmp(force, "direct") == 0;
  if (force_naive) return LaunchSparseConvNaive(stream, g, type, operands);
  bool fits = false;
  if (!force_direct && IsSpmm1x1(g)) {
    if (cudaError_t e = PlanSparseConvSpmm1x1(g, type, &fits); e != cudaSuccess) return e;
    if (fits) return LaunchSparseConvSpmm1x1(stream, g, type, operands);
  }
  if (cudaError_t e = PlanSparseConvDirect(g, type, &fits); e != cudaSuccess) return e;
  if (fits) return LaunchSparseConvDirect(stream, g, type, operands);
  return LaunchSparseConvNaive(stream, g, type, operands);
}

}  // namespace jaxsparse
