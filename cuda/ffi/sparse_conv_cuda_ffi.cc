// XLA FFI adapter for the CUDA sparse convolution: checks shapes and dtypes,
// takes scratch from XLA, enqueues on XLA's stream. Compiled by the host
// compiler; the kernels live in cuda/gpu/.
#include "ffi/sparse_conv_cuda_ffi.h"

#include <string>

#include "ffi/sparse_conv_args.h"
#include "gpu/sparse_conv_filter_grad.h"
#include "gpu/sparse_conv_launch.h"

namespace jaxsparse {
namespace {

ffi::Error SparseConvCudaImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                              ffi::AnyBuffer x, ffi::AnyBuffer values, ffi::AnyBuffer indices,
                              ffi::AnyBuffer indptr, ffi::AnyBuffer bias,
                              ffi::Result<ffi::AnyBuffer> out,
                              ffi::Span<const int64_t> kernel_size,
                              ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                              ffi::Span<const int64_t> dilation, int64_t relu,
                              int64_t kernel, int64_t precision) {
  ConvGeometry g;
  ElementType type;
  ConvOptions options;
  const SparseConvAttrs attrs{kernel_size, strides, padding, dilation, relu};
  if (ffi::Error e = DecodeSparseConv(x, values, indices, indptr, bias, *out, attrs, &g, &type);
      e.failure())
    return e;
  if (ffi::Error e = DecodeOptions(kernel, precision, kKernelFamilyCount, &options); e.failure())
    return e;
  SparseConvOperands op;
  op.x = x.untyped_data();
  op.values = values.untyped_data();
  op.indices = static_cast<const int32_t*>(indices.untyped_data());
  op.indptr = static_cast<const int32_t*>(indptr.untyped_data());
  op.bias = g.has_bias ? bias.untyped_data() : nullptr;
  op.out = out->untyped_data();

  const size_t workspace_bytes = SparseConvWorkspaceBytes(g, type, options);
  void* workspace = nullptr;
  if (workspace_bytes > 0) {
    std::optional<void*> allocated = scratch.Allocate(workspace_bytes);
    if (!allocated.has_value())
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        "jaxsparse sparse_conv: could not allocate the kernel workspace");
    workspace = *allocated;
  }
  const cudaError_t status = LaunchSparseConv(stream, g, type, options, op, workspace, workspace_bytes);
  if (status != cudaSuccess)
    return ffi::Error::Internal(std::string("jaxsparse sparse_conv: CUDA launch failed: ") +
                                cudaGetErrorString(status));
  return ffi::Error::Success();
}

ffi::Error SparseConvFilterGradCudaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                                        ffi::AnyBuffer indices, ffi::AnyBuffer indptr,
                                        ffi::Result<ffi::AnyBuffer> grad,
                                        ffi::Span<const int64_t> kernel_size,
                                        ffi::Span<const int64_t> strides,
                                        ffi::Span<const int64_t> padding,
                                        ffi::Span<const int64_t> dilation, int64_t kernel,
                                        int64_t precision) {
  ConvGeometry g;
  ElementType type;
  ConvOptions options;  // one filter-gradient kernel, exact at every precision for now
  const SparseConvAttrs attrs{kernel_size, strides, padding, dilation, 0};
  if (ffi::Error e = DecodeGeometry(x, dy, *grad, indices, indptr, attrs, &g, &type); e.failure())
    return e;
  if (ffi::Error e = DecodeOptions(kernel, precision, kKernelFamilyCount, &options); e.failure())
    return e;
  const cudaError_t status = LaunchSparseConvFilterGrad(
      stream, g, type, x.untyped_data(), dy.untyped_data(),
      static_cast<const int32_t*>(indices.untyped_data()),
      static_cast<const int32_t*>(indptr.untyped_data()), grad->untyped_data());
  if (status != cudaSuccess)
    return ffi::Error::Internal(std::string("jaxsparse sparse_conv filter gradient: CUDA launch failed: ") +
                                cudaGetErrorString(status));
  return ffi::Error::Success();
}

}  // namespace

// Command-buffer compatible: the handler only enqueues kernels on XLA's
// stream, with no host synchronisation and scratch taken from XLA.
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseConvCudaHandler, SparseConvCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
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
                                  .Attr<int64_t>("kernel")      // KernelFamily
                                  .Attr<int64_t>("precision"),  // Precision
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jaxsparse

namespace jaxsparse {

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseConvFilterGradCudaHandler, SparseConvFilterGradCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
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
                                  .Attr<int64_t>("precision"),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jaxsparse
