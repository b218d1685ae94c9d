// XLA FFI adapter for the tensor-core sparse convolution (issue 14): checks the operands
// against each other and the geometry attributes (as sparse_conv's), and enqueues the kernel
// on XLA's stream.
#include <string>

#include "ffi/sparse_conv_args.h"
#include "ffi/sparse_conv_cuda_ffi.h"
#include "gpu/sparse_conv_tensorcore.h"

namespace jaxsparse {
namespace {

ffi::Error TcError(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jaxsparse tensor-core spmm: " + message);
}

bool IsInt32Vector(const ffi::AnyBuffer& b) {
  return b.element_type() == ffi::DataType::S32 && b.dimensions().size() == 1;
}

ffi::Error TcSpmmCudaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer packed,
                          ffi::AnyBuffer columns, ffi::AnyBuffer col_offsets, ffi::AnyBuffer channels,
                          ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> out,
                          ffi::Span<const int64_t> kernel_size, ffi::Span<const int64_t> strides,
                          ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation, int64_t relu,
                          int64_t design, int64_t window, int64_t tile_pixels) {
  ElementType type;
  if (!ToElementType(x.element_type(), &type)) return TcError("x must be float32, bfloat16 or float16");
  if (packed.element_type() != x.element_type() || out->element_type() != x.element_type())
    return TcError("packed tiles and output must have x's dtype");
  if (!IsInt32Vector(columns) || !IsInt32Vector(col_offsets) || !IsInt32Vector(channels))
    return TcError("columns, col_offsets and channels must be int32 vectors");
  TensorCoreShape s;
  if (const char* problem = ConvShapeProblem(x, *out, SparseConvAttrs{kernel_size, strides, padding, dilation, relu},
                                             &s.conv))
    return TcError(problem);
  // Any empty axis is allowed (nothing to compute), so the output size is checked only past that.
  if (s.conv.output_pixels() > 0 && !s.conv.output_size_matches())
    return TcError("output spatial shape does not match the convolution");
  s.in_c = s.conv.in_c;
  s.out_c = s.conv.out_c;
  s.pixels = s.conv.output_pixels();
  s.groups = col_offsets.dimensions()[0] - 1;
  s.k_total = columns.dimensions()[0];
  s.relu = s.conv.relu;
  if (design != static_cast<int64_t>(TensorCoreDesign::kSlab) && design != static_cast<int64_t>(TensorCoreDesign::kChunked))
    return TcError("design must be 1 (slab) or 2 (chunked)");
  const auto kind = static_cast<TensorCoreDesign>(design);
  if (window != 0 && window != 128) return TcError("window must be 0 or 128");
  s.window = window;
  if (tile_pixels != 0 && tile_pixels != 16 && tile_pixels != 32 && tile_pixels != 64)
    return TcError("tile_pixels must be 0 (automatic), 16, 32 or 64");
  s.tile_pixels = tile_pixels;
  if (s.groups < 1 || channels.dimensions()[0] != 16 * s.groups)
    return TcError("channels must hold 16 entries per group (col_offsets has groups + 1)");
  if (static_cast<int64_t>(packed.element_count()) != 16 * s.k_total)
    return TcError("packed must hold 16 x len(columns) weights");
  const bool has_bias = bias.element_count() > 0;
  if (has_bias && (bias.element_type() != x.element_type() || bias.dimensions().size() != 1 ||
                   bias.dimensions()[0] != s.out_c))
    return TcError("bias must be (Cout,) of x's dtype, or empty");
  if (s.pixels == 0 || s.out_c == 0) return ffi::Error::Success();
  if (s.in_c == 0) return TcError("x must have at least one channel");  // the output would be the bias alone
  if (kind == TensorCoreDesign::kSlab && !s.conv.pointwise())
    return TcError("the slab design takes 1x1, stride-1, unpadded convolutions only");
  if (!TensorCoreFits(s, type, kind))
    return TcError("shape not supported by this design (slab: Cin too large for the input slab; chunked: "
                   "sizes past its 32-bit pixel, row and column arithmetic)");
  TensorCoreOperands op;
  op.x = x.untyped_data();
  op.packed = packed.untyped_data();
  op.columns = static_cast<const int32_t*>(columns.untyped_data());
  op.col_offsets = static_cast<const int32_t*>(col_offsets.untyped_data());
  op.channels = static_cast<const int32_t*>(channels.untyped_data());
  op.bias = has_bias ? bias.untyped_data() : nullptr;
  op.out = out->untyped_data();
  const cudaError_t status = LaunchTensorCoreSpmm(stream, s, type, op, kind);
  if (status != cudaSuccess)
    return ffi::Error::Internal(std::string("jaxsparse tensor-core spmm: CUDA launch failed: ") +
                                cudaGetErrorString(status));
  return ffi::Error::Success();
}

}  // namespace

// Command-buffer compatible: one kernel on XLA's stream, no host synchronisation.
XLA_FFI_DEFINE_HANDLER_SYMBOL(TcSpmmCudaHandler, TcSpmmCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x, (N, H, W, Cin)
                                  .Arg<ffi::AnyBuffer>()  // packed tiles
                                  .Arg<ffi::AnyBuffer>()  // columns (int32)
                                  .Arg<ffi::AnyBuffer>()  // col_offsets (int32)
                                  .Arg<ffi::AnyBuffer>()  // channels (int32)
                                  .Arg<ffi::AnyBuffer>()  // bias, (Cout,) or (0,)
                                  .Ret<ffi::AnyBuffer>()  // out, (N, OH, OW, Cout)
                                  .Attr<ffi::Span<const int64_t>>("kernel_size")
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding")
                                  .Attr<ffi::Span<const int64_t>>("dilation")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("design")   // TensorCoreDesign
                                  .Attr<int64_t>("window")   // 128: a plan windowed to 128 channels
                                  .Attr<int64_t>("tile_pixels"),  // chunked: 16, 32, 64; 0 automatic
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jaxsparse
