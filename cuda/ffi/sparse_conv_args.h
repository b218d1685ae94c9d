// Decoding and checking of the sparse_conv custom-call operands, shared by the
// CPU and CUDA FFI adapters. Everything the Python side promises is checked
// again here, so a bad call returns an ffi::Error rather than reading out of
// bounds.
#pragma once

#include <cstdint>
#include <string>

#include "conv_geometry.h"
#include "conv_options.h"
#include "xla/ffi/api/ffi.h"

namespace jaxsparse {

namespace ffi = xla::ffi;

inline ffi::Error InvalidArgument(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jaxsparse sparse_conv: " + message);
}

inline bool ToElementType(ffi::DataType dtype, ElementType* type) {
  switch (dtype) {
    case ffi::DataType::F32: *type = ElementType::kF32; return true;
    case ffi::DataType::BF16: *type = ElementType::kBF16; return true;
    case ffi::DataType::F16: *type = ElementType::kF16; return true;
    default: return false;
  }
}

struct SparseConvAttrs {
  ffi::Span<const int64_t> kernel_size;  // (KH, KW)
  ffi::Span<const int64_t> strides;      // (SH, SW)
  ffi::Span<const int64_t> padding;      // (H lo, H hi, W lo, W hi)
  ffi::Span<const int64_t> dilation;     // (DH, DW)
  int64_t relu;
};

// The `kernel` and `precision` attributes. `kernel_families` is how many
// families (from the first) the calling platform has.
inline ffi::Error DecodeOptions(int64_t kernel, int64_t precision, int64_t kernel_families,
                                ConvOptions* options) {
  if (kernel < 0 || kernel >= kernel_families)
    return InvalidArgument("attribute kernel names no kernel family of this platform");
  if (precision < 0 || precision >= kPrecisionCount)
    return InvalidArgument("attribute precision must be 0 (DEFAULT), 1 (HIGH) or 2 (HIGHEST)");
  options->kernel = static_cast<KernelFamily>(kernel);
  options->precision = static_cast<Precision>(precision);
  return ffi::Error::Success();
}

// The convolution of NHWC x into NHWC y under the geometry attributes, into `g` (shapes,
// kernel, strides, padding, dilation): nullptr, or what is wrong with them. Shared by
// sparse_conv's adapters and the tensor-core one, each adding its own checks and prefix.
inline const char* ConvShapeProblem(const ffi::AnyBuffer& x, const ffi::AnyBuffer& y, const SparseConvAttrs& a,
                                    ConvGeometry* g) {
  if (a.kernel_size.size() != 2 || a.strides.size() != 2 || a.padding.size() != 4 ||
      a.dilation.size() != 2)
    return "attributes kernel_size/strides/dilation need 2 entries, padding 4";
  const auto xd = x.dimensions();
  const auto yd = y.dimensions();
  if (xd.size() != 4 || yd.size() != 4) return "x and output must be NHWC (rank 4)";
  g->batch = xd[0]; g->in_h = xd[1]; g->in_w = xd[2]; g->in_c = xd[3];
  g->out_h = yd[1]; g->out_w = yd[2]; g->out_c = yd[3];
  g->kernel_h = a.kernel_size[0]; g->kernel_w = a.kernel_size[1];
  g->stride_h = a.strides[0]; g->stride_w = a.strides[1];
  g->pad_h_lo = a.padding[0]; g->pad_h_hi = a.padding[1];
  g->pad_w_lo = a.padding[2]; g->pad_w_hi = a.padding[3];
  g->dilation_h = a.dilation[0]; g->dilation_w = a.dilation[1];
  g->relu = a.relu != 0;
  if (yd[0] != g->batch) return "output batch differs from input batch";
  if (g->kernel_h < 1 || g->kernel_w < 1 || g->stride_h < 1 || g->stride_w < 1 ||
      g->dilation_h < 1 || g->dilation_w < 1)
    return "kernel size, strides and dilation must be positive";
  if (g->pad_h_lo < 0 || g->pad_h_hi < 0 || g->pad_w_lo < 0 || g->pad_w_hi < 0)
    return "padding must be non-negative";
  return nullptr;
}

// Fills `g` and `type` from the operands shared by the forward op and its
// filter gradient: input x (NHWC), output-shaped y (NHWC), a values-shaped
// buffer (nnz,), and the CSR structure. Returns a non-ok error naming the
// first inconsistency found.
inline ffi::Error DecodeGeometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& y,
                                 const ffi::AnyBuffer& values, const ffi::AnyBuffer& indices,
                                 const ffi::AnyBuffer& indptr, const SparseConvAttrs& a,
                                 ConvGeometry* g, ElementType* type) {
  if (!ToElementType(x.element_type(), type))
    return InvalidArgument("x must be float32, bfloat16 or float16");
  if (values.element_type() != x.element_type() || y.element_type() != x.element_type())
    return InvalidArgument("filter values and output must have the dtype of x");
  if (indices.element_type() != ffi::DataType::S32 || indptr.element_type() != ffi::DataType::S32)
    return InvalidArgument("indices and indptr must be int32");
  if (const char* problem = ConvShapeProblem(x, y, a, g)) return InvalidArgument(problem);
  if (values.dimensions().size() != 1 || indices.dimensions().size() != 1 ||
      indptr.dimensions().size() != 1)
    return InvalidArgument("values, indices and indptr must be rank 1");
  g->nnz = values.dimensions()[0];
  if (g->in_c < 1 || g->out_c < 1) return InvalidArgument("channel counts must be positive");
  if (indices.dimensions()[0] != g->nnz) return InvalidArgument("indices and values differ in length");
  if (indptr.dimensions()[0] != g->out_c + 1)
    return InvalidArgument("indptr must have out_channels + 1 entries");
  if (!g->output_size_matches()) return InvalidArgument("output spatial shape does not match the convolution");
  if (g->taps() > INT32_MAX) return InvalidArgument("KH * KW * Cin must fit in int32");
  return ffi::Error::Success();
}

// The forward op: DecodeGeometry plus the optional bias.
inline ffi::Error DecodeSparseConv(const ffi::AnyBuffer& x, const ffi::AnyBuffer& values,
                                   const ffi::AnyBuffer& indices, const ffi::AnyBuffer& indptr,
                                   const ffi::AnyBuffer& bias, const ffi::AnyBuffer& out,
                                   const SparseConvAttrs& a, ConvGeometry* g, ElementType* type) {
  if (ffi::Error e = DecodeGeometry(x, out, values, indices, indptr, a, g, type); e.failure()) return e;
  if (bias.dimensions().size() != 1) return InvalidArgument("bias must be rank 1");
  const int64_t bias_len = bias.dimensions()[0];
  if (bias_len != 0 && bias_len != g->out_c) return InvalidArgument("bias must be empty or have out_channels entries");
  if (bias_len != 0 && bias.element_type() != x.element_type())
    return InvalidArgument("bias must have the dtype of x");
  g->has_bias = bias_len != 0;
  return ffi::Error::Success();
}

}  // namespace jaxsparse
