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
// naive | direct | spmm forces a family where it applies; rowbucket opts in to
// the experimental row-bucketed kernel (never chosen by default; geometries it
// does not accept take the default selection).
#include <cstdlib>
#include <cstring>

#include "gpu/sparse_conv_kernels.h"
#include "gpu/sparse_conv_launch.h"

namespace jaxsparse {
namespace {

bool ForceIs(const char* name) {
  const char* force = std::getenv("JAXSPARSE_GPU_KERNEL");
  return force && std::strcmp(force, name) == 0;
}

// Workspace the row-bucketed kernel needs for this call, 0 when it is not
// selected (knob unset) or does not accept the geometry.
size_t RowBucketBytes(const ConvGeometry& g, ElementType type) {
  if (!ForceIs("rowbucket") || g.output_pixels() == 0 || g.out_c == 0) return 0;
  bool fits = false;
  size_t bytes = 0;
  if (PlanSparseConvRowBucket(g, type, &fits, &bytes) != cudaSuccess || !fits) return 0;
  return bytes;
}

}  // namespace

size_t SparseConvWorkspaceBytes(const ConvGeometry& g, ElementType type) {
  return RowBucketBytes(g, type);
}

cudaError_t LaunchSparseConv(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                             const SparseConvOperands& operands, void* workspace,
                             size_t workspace_bytes) {
  if (g.output_pixels() == 0 || g.out_c == 0) return cudaSuccess;
  const bool force_naive = ForceIs("naive");
  const bool force_direct = ForceIs("direct");
  if (force_naive) return LaunchSparseConvNaive(stream, g, type, operands);
  if (const size_t need = RowBucketBytes(g, type); need > 0 && workspace_bytes >= need)
    return LaunchSparseConvRowBucket(stream, g, type, operands, workspace, workspace_bytes);
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
