// Kernel selection for one sparse_conv call.
//
// kAuto: 1x1 stride-1 unpadded convolutions (ResNet bottleneck reduce/expand) go
// to the SpMM configuration, everything else (KxK, strided 1x1 projections) to
// the direct tiled kernel, in its cluster variant where the plain plan's tile is
// tiny, for bf16/f16 in its half-width variant where that plans cheaper (AutoVariant); the tile shape, pixels per thread and the split of
// output channels over blocks are chosen by a cost model from shape, nnz and
// batch (tiled_plan.cu). Shapes whose smallest input window does not fit in
// shared memory fall back to the naive kernel.
//
// A forced family (the static option `kernel`, see jaxsparse/options.py) runs
// where it applies: kDirect skips the SpMM configuration, kSpmm takes it (Python
// only passes 1x1 stride-1 unpadded geometries), kNaive always applies, and
// kRowBucket (the experimental row-bucketed kernel) takes the geometries it
// accepts, kStaged runs the tiled kernel with staged filter rows (SpMM for 1x1
// stride-1 unpadded, else direct), kCluster the tiled kernel with Cin-chunked windows
// reduced across a thread-block cluster (same split), kHalfWin the tiled kernel with
// bf16/f16 windows kept at half width (stride-1 tiles only; same split). Where a forced
// family does not fit, the plain tiled kernel (or, failing that, the naive one) runs.
#include "gpu/sparse_conv_kernels.h"
#include "gpu/sparse_conv_launch.h"

namespace jaxsparse {
namespace {

// Workspace the row-bucketed kernel needs for this call, 0 when it is not
// selected or does not accept the geometry.
size_t RowBucketBytes(const ConvGeometry& g, ElementType type, const ConvOptions& options) {
  if (options.kernel != KernelFamily::kRowBucket || g.output_pixels() == 0 || g.out_c == 0) return 0;
  bool fits = false;
  size_t bytes = 0;
  if (PlanSparseConvRowBucket(g, type, &fits, &bytes) != cudaSuccess || !fits) return 0;
  return bytes;
}

}  // namespace

size_t SparseConvWorkspaceBytes(const ConvGeometry& g, ElementType type, const ConvOptions& options) {
  return RowBucketBytes(g, type, options);
}

cudaError_t LaunchSparseConv(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                             const ConvOptions& options, const SparseConvOperands& operands,
                             void* workspace, size_t workspace_bytes) {
  if (g.output_pixels() == 0 || g.out_c == 0) return cudaSuccess;
  if (options.kernel == KernelFamily::kNaive) return LaunchSparseConvNaive(stream, g, type, operands);
  if (const size_t need = RowBucketBytes(g, type, options); need > 0 && workspace_bytes >= need)
    return LaunchSparseConvRowBucket(stream, g, type, operands, workspace, workspace_bytes);
  // The staged, cluster or half-width variant where it is asked for and fits, else the plain
  // tiled kernel.
  using tiled::Variant;
  Variant asked = options.kernel == KernelFamily::kStaged        ? Variant::kStaged
                  : options.kernel == KernelFamily::kCluster     ? Variant::kCluster
                  : options.kernel == KernelFamily::kHalfWin  ? Variant::kHalfWindow
                                                                 : Variant::kPlain;
  if (options.kernel == KernelFamily::kAuto) {
    if (cudaError_t e = AutoVariant(g, type, IsSpmm1x1(g), &asked); e != cudaSuccess) return e;
  }
  for (const Variant variant : {asked, Variant::kPlain}) {
    bool fits = false;
    if (options.kernel != KernelFamily::kDirect && IsSpmm1x1(g)) {
      if (cudaError_t e = PlanSparseConvSpmm1x1(g, type, variant, &fits); e != cudaSuccess) return e;
      if (fits) return LaunchSparseConvSpmm1x1(stream, g, type, variant, operands);
    }
    if (cudaError_t e = PlanSparseConvDirect(g, type, variant, &fits); e != cudaSuccess) return e;
    if (fits) return LaunchSparseConvDirect(stream, g, type, variant, operands);
  }
  return LaunchSparseConvNaive(stream, g, type, operands);
}

}  // namespace jaxsparse
