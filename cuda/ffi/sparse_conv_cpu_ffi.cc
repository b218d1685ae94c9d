// XLA FFI adapters for the CPU sparse convolution and its filter gradient.
#include "ffi/sparse_conv_cpu_ffi.h"

#include "cpu/sparse_conv_cpu.h"
#include "ffi/sparse_conv_args.h"

namespace jaxsparse {
namespace {

// The CPU has one kernel family ("auto"). `threads`: 0 = all hardware threads.
ffi::Error DecodeCpuOptions(int64_t kernel, int64_t precision, int64_t threads) {
  ConvOptions options;
  if (ffi::Error e = DecodeOptions(kernel, precision, 1, &options); e.failure()) return e;
  if (threads < 0 || threads > 4096) return InvalidArgument("attribute threads must be in [0, 4096]");
  return ffi::Error::Success();
}

// The buffers are on the host: the CSR structure is cheap to check on every call.
ffi::Error CheckStructure(const ConvGeometry& g, const ffi::AnyBuffer& indices,
                          const ffi::AnyBuffer& indptr) {
  const std::string problem = CheckCsrStructure(g, static_cast<const int32_t*>(indices.untyped_data()),
                                                static_cast<const int32_t*>(indptr.untyped_data()));
  return problem.empty() ? ffi::Error::Success() : InvalidArgument(problem);
}

ffi::Error SparseConvCpuImpl(ffi::AnyBuffer x, ffi::AnyBuffer values, ffi::AnyBuffer indices,
                             ffi::AnyBuffer indptr, ffi::AnyBuffer bias,
                             ffi::Result<ffi::AnyBuffer> out,
                             ffi::Span<const int64_t> kernel_size, ffi::Span<const int64_t> strides,
                             ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation,
                             int64_t relu, int64_t kernel, int64_t precision, int64_t threads) {
  ConvGeometry g;
  ElementType type;
  const SparseConvAttrs attrs{kernel_size, strides, padding, dilation, relu};
  if (ffi::Error e = DecodeSparseConv(x, values, indices, indptr, bias, *out, attrs, &g, &type);
      e.failure())
    return e;
  if (ffi::Error e = DecodeCpuOptions(kernel, precision, threads); e.failure()) return e;
  if (ffi::Error e = CheckStructure(g, indices, indptr); e.failure()) return e;
  SparseConvCpu(g, type, x.untyped_data(), values.untyped_data(),
                static_cast<const int32_t*>(indices.untyped_data()),
                static_cast<const int32_t*>(indptr.untyped_data()),
                g.has_bias ? bias.untyped_data() : nullptr, out->untyped_data(), static_cast<int>(threads));
  return ffi::Error::Success();
}

ffi::Error SparseConvFilterGradCpuImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer indices,
                                       ffi::AnyBuffer indptr, ffi::Result<ffi::AnyBuffer> grad,
                                       ffi::Span<const int64_t> kernel_size,
                                       ffi::Span<const int64_t> strides,
                                       ffi::Span<const int64_t> padding,
                                       ffi::Span<const int64_t> dilation, int64_t kernel,
                                       int64_t precision, int64_t threads) {
  ConvGeometry g;
  ElementType type;
  const SparseConvAttrs attrs{kernel_size, strides, padding, dilation, 0};
  if (ffi::Error e = DecodeGeometry(x, dy, *grad, indices, indptr, attrs, &g, &type); e.failure())
    return e;
  if (ffi::Error e = DecodeCpuOptions(kernel, precision, threads); e.failure()) return e;
  if (ffi::Error e = CheckStructure(g, indices, indptr); e.failure()) return e;
  SparseConvFilterGradCpu(g, type, x.untyped_data(), dy.untyped_data(),
                          static_cast<const int32_t*>(indices.untyped_data()),
                          static_cast<const int32_t*>(indptr.untyped_data()), grad->untyped_data(), static_cast<int>(threads));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseConvCpuHandler, SparseConvCpuImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x, NHWC
                                  .Arg<ffi::AnyBuffer>()  // values
                                  .Arg<ffi::AnyBuffer>()  // indices (int32)
                                  .Arg<ffi::AnyBuffer>()  // indptr (int32)
                                  .Arg<ffi::AnyBuffer>()  // bias, (Cout,) or (0,)
                                  .Ret<ffi::AnyBuffer>()  // out, NHWC
                                  .Attr<ffi::Span<const int64_t>>("kernel_size")
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding")
                                  .Attr<ffi::Span<const int64_t>>("dilation")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("kernel")
                                  .Attr<int64_t>("precision")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseConvFilterGradCpuHandler, SparseConvFilterGradCpuImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x, NHWC
                                  .Arg<ffi::AnyBuffer>()  // dy, NHWC (output-shaped)
                                  .Arg<ffi::AnyBuffer>()  // indices (int32)
                                  .Arg<ffi::AnyBuffer>()  // indptr (int32)
                                  .Ret<ffi::AnyBuffer>()  // gradient of the values, (nnz,)
                                  .Attr<ffi::Span<const int64_t>>("kernel_size")
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding")
                                  .Attr<ffi::Span<const int64_t>>("dilation")
                                  .Attr<int64_t>("kernel")
                                  .Attr<int64_t>("precision")
                                  .Attr<int64_t>("threads"));

}  // namespace jaxsparse
