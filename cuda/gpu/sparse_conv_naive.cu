// First working CUDA kernel: one thread per (output pixel, output channel).
#include <algorithm>
// Simple and obviously correct; the tuned kernels are checked against it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gpu/element_io.cuh"
#include "gpu/sparse_conv_launch.h"

namespace jaxsparse {
namespace {

template <typename T>
__global__ void SparseConvNaiveKernel(ConvGeometry g, SparseConvOperands op) {
  const int64_t total = g.output_pixels() * g.out_c;
  const int64_t taps = g.taps();
  const T* x = static_cast<const T*>(op.x);
  const T* values = static_cast<const T*>(op.values);
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i % g.out_c;
    const int64_t p = i / g.out_c;
    const int64_t ow = p % g.out_w, oh = (p / g.out_w) % g.out_h, n = p / (g.out_w * g.out_h);
    float acc = op.bias ? LoadAsFloat(static_cast<const T*>(op.bias) + r) : 0.0f;
    const int32_t begin = op.indptr[r], end = op.indptr[r + 1];
    // Malformed CSR poisons the row with NaN (the rule of the tiled kernels).
    bool bad = op.indptr[0] != 0 || op.indptr[g.out_c] != g.nnz || begin < 0 || end > g.nnz || begin > end;
    for (int32_t j = max(begin, 0); j < end && j < g.nnz; ++j) {
      const int32_t c = op.indices[j];
      if (c < 0 || c >= taps) {
        bad = true;
        continue;
      }
      const int64_t ci = c % g.in_c, k = c / g.in_c;
      const int64_t ih = oh * g.stride_h - g.pad_h_lo + (k / g.kernel_w) * g.dilation_h;
      const int64_t iw = ow * g.stride_w - g.pad_w_lo + (k % g.kernel_w) * g.dilation_w;
      if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) continue;
      acc += LoadAsFloat(values + j) * LoadAsFloat(x + ((n * g.in_h + ih) * g.in_w + iw) * g.in_c + ci);
    }
    if (bad) acc = CUDART_NAN_F;
    if (g.relu) acc = ReluKeepNan(acc);
    StoreFromFloat(static_cast<T*>(op.out) + i, acc);
  }
}

template <typename T>
cudaError_t LaunchNaive(cudaStream_t stream, const ConvGeometry& g, const SparseConvOperands& op) {
  const int64_t total = g.output_pixels() * g.out_c;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 16);
  SparseConvNaiveKernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(g, op);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchSparseConvNaive(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                                  const SparseConvOperands& op) {
  switch (type) {
    case ElementType::kF32: return LaunchNaive<float>(stream, g, op);
    case ElementType::kBF16: return LaunchNaive<__nv_bfloat16>(stream, g, op);
    case ElementType::kF16: return LaunchNaive<__half>(stream, g, op);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jaxsparse
