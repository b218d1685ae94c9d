// XLA FFI adapter for the CPU sparse convolution.
#include "ffi/sparse_conv_cpu_ffi.h"

#include "cpu/sparse_conv_cpu.h"
#include "ffi/sparse_conv_args.h"

namespace jaxsparse {
namespace {

ffi::Error SparseConvCpuImpl(ffi::AnyBuffer x, ffi::AnyBuffer values, ffi::AnyBuffer indices,
                             ffi::AnyBuffer indptr, ffi::AnyBuffer bias,
                             ffi::Result<ffi::AnyBuffer> out,
                             ffi::Span<const int64_t> kernel_size, ffi::Span<const int64_t> strides,
                             ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation,
                             int64_t relu) {
  ConvGeometry g;
  ElementType type;
  const SparseConvAttrs attrs{kernel_size, strides, padding, dilation, relu};
  if (ffi::Error e = DecodeSparseConv(x, values, indices, indptr, bias, *out, attrs, &g, &type);
      e.failure())
    return e;
  const auto* idx = static_cast<const int32_t*>(indices.untyped_data());
  const auto* ptr = static_cast<const int32_t*>(indptr.untyped_data());
  // The buffers are on the host: the structure is cheap to check on every call.
  if (std::string problem = CheckCsrStructure(g, idx, ptr); !problem.empty())
    return InvalidArgument(problem);
  SparseConvCpu(g, type, x.untyped_data(), values.untyped_data(), idx, ptr,
                g.has_bias ? bias.untyped_data() : nullptr, out->untyped_data(), 0);
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
                                  .Attr<int64_t>("relu"));

}  // namespace jaxsparse
