// Filter gradient: one block per output channel (row), one warp per nonzero,
// lanes striding over output pixels, warp-shuffle reduction. Simple and
// correct; the pixel loop reads NHWC with a channel stride, so it leans on L2.
#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gpu/element_io.cuh"
#include "gpu/sparse_conv_filter_grad.h"

namespace jaxsparse {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    FilterGradKernel(ConvGeometry g, const T* x, const T* dy, const int32_t* indices,
                     const int32_t* indptr, T* grad) {
  const int64_t r = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t begin = max(indptr[r], 0);
  const int64_t end = min(static_cast<int64_t>(indptr[r + 1]), g.nnz);
  const int64_t taps = g.taps();
  const int64_t pixels = g.output_pixels();
  for (int64_t j = begin + warp; j < end; j += kWarpsPerBlock) {
    const int32_t c = indices[j];
    // An out-of-range column gets a NaN gradient (poison, as in the forward kernels).
    float sum = (c >= 0 && c < taps) ? 0.0f : CUDART_NAN_F;
    if (c >= 0 && c < taps) {
      const int64_t ci = c % g.in_c, k = c / g.in_c;
      const int64_t dh = (k / g.kernel_w) * g.dilation_h - g.pad_h_lo;
      const int64_t dw = (k % g.kernel_w) * g.dilation_w - g.pad_w_lo;
      for (int64_t p = lane; p < pixels; p += 32) {
        const int64_t ow = p % g.out_w, oh = (p / g.out_w) % g.out_h, n = p / (g.out_w * g.out_h);
        const int64_t ih = oh * g.stride_h + dh, iw = ow * g.stride_w + dw;
        if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) continue;
        sum += LoadAsFloat(dy + p * g.out_c + r) *
               LoadAsFloat(x + ((n * g.in_h + ih) * g.in_w + iw) * g.in_c + ci);
      }
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) StoreFromFloat(grad + j, sum);
  }
}

// Nonzeros that no well-formed row covers still get a defined (zero) gradient.
template <typename T>
__global__ void ZeroKernel(T* grad, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x)
    StoreFromFloat(grad + i, 0.0f);
}

template <typename T>
cudaError_t Launch(cudaStream_t stream, const ConvGeometry& g, const void* x, const void* dy,
                   const int32_t* indices, const int32_t* indptr, void* grad) {
  if (g.nnz == 0) return cudaSuccess;
  T* out = static_cast<T*>(grad);
  const int zero_blocks = static_cast<int>(std::min<int64_t>((g.nnz + 255) / 256, 4096));
  ZeroKernel<T><<<zero_blocks, 256, 0, stream>>>(out, g.nnz);
  if (g.output_pixels() == 0) return cudaGetLastError();
  FilterGradKernel<T><<<static_cast<unsigned>(g.out_c), kWarpsPerBlock * 32, 0, stream>>>(
      g, static_cast<const T*>(x), static_cast<const T*>(dy), indices, indptr, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchSparseConvFilterGrad(cudaStream_t stream, const ConvGeometry& g, ElementType type,
                                       const void* x, const void* dy, const int32_t* indices,
                                       const int32_t* indptr, void* grad) {
  switch (type) {
    case ElementType::kF32: return Launch<float>(stream, g, x, dy, indices, indptr, grad);
    case ElementType::kBF16: return Launch<__nv_bfloat16>(stream, g, x, dy, indices, indptr, grad);
    case ElementType::kF16: return Launch<__half>(stream, g, x, dy, indices, indptr, grad);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jaxsparse
