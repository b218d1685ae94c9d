// Geometry of one sparse convolution, shared by the CPU kernel, the CUDA
// launchers and the FFI adapters. Plain C++ (usable from nvcc and the host
// compiler); no FFI or nanobind headers.
//
// Layouts: input x is NHWC, output is NHWC. The sparse filter is CSR over
// output channels: row r holds the nonzeros of output channel r, and a column
// index c encodes the filter tap (kh, kw, ci) as c = (kh * KW + kw) * Cin + ci,
// i.e. the row-major flattening of one output channel of an HWIO kernel.
// 1-D convolutions are run as 2-D ones with H = KH = 1.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define JAXSPARSE_HOST_DEVICE __host__ __device__
#else
#define JAXSPARSE_HOST_DEVICE
#endif

namespace jaxsparse {

enum class ElementType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct ConvGeometry {
  int64_t batch = 0, in_h = 0, in_w = 0, in_c = 0;
  int64_t out_h = 0, out_w = 0, out_c = 0;
  int64_t kernel_h = 1, kernel_w = 1;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h_lo = 0, pad_h_hi = 0, pad_w_lo = 0, pad_w_hi = 0;
  int64_t dilation_h = 1, dilation_w = 1;
  int64_t nnz = 0;
  bool has_bias = false;
  bool relu = false;

  // Number of valid output positions along one axis for the given input size
  // (same formula as lax.conv_general_dilated); may be <= 0 for bad inputs.
  JAXSPARSE_HOST_DEVICE static constexpr int64_t OutputSize(int64_t in, int64_t k, int64_t stride,
                                      int64_t lo, int64_t hi, int64_t dil) {
    return (in + lo + hi - (dil * (k - 1) + 1)) / stride + 1;
  }

  // Whether out_h and out_w are the convolution's output size for in_h and in_w.
  JAXSPARSE_HOST_DEVICE bool output_size_matches() const {
    return out_h == OutputSize(in_h, kernel_h, stride_h, pad_h_lo, pad_h_hi, dilation_h) &&
           out_w == OutputSize(in_w, kernel_w, stride_w, pad_w_lo, pad_w_hi, dilation_w);
  }

  JAXSPARSE_HOST_DEVICE int64_t taps() const { return kernel_h * kernel_w * in_c; }
  JAXSPARSE_HOST_DEVICE int64_t output_pixels() const { return batch * out_h * out_w; }
  // A 1x1, stride-1, unpadded convolution: output pixel p reads input pixel p.
  JAXSPARSE_HOST_DEVICE bool pointwise() const {
    return kernel_h == 1 && kernel_w == 1 && stride_h == 1 && stride_w == 1 && pad_h_lo == 0 && pad_h_hi == 0 &&
           pad_w_lo == 0 && pad_w_hi == 0 && in_h == out_h && in_w == out_w;
  }
};

}  // namespace jaxsparse
