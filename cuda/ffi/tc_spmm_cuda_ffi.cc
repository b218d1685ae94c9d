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

// The convolution of NHWC x into NHWC out under the geometry attributes (any empty axis
// allowed: the call then has nothing to compute).
ffi::Error DecodeTcGeometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& out, ffi::Span<const int64_t> kernel_size,
                            ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                            ffi::Span<const int64_t> dilation, ConvGeometry* g) {
  const auto xd = x.dimensions(), od = out.dimensions();
  if (xd.size() != 4 || od.size() != 4) return TcError("x and out must be NHWC (rank 4)");
  if (kernel_size.size() != 2 || strides.size() != 2 || padding.size() != 4 || dilation.size() != 2)
    return TcError("attributes kernel_size/strides/dilation need 2 entries, padding 4");
  g->batch = xd[0]; g->in_h = xd[1]; g->in_w = xd[2]; g->in_c = xd[3];
  g->out_h = od[1]; g->out_w = od[2]; g->out_c = od[3];
  g->kernel_h = kernel_size[0]; g->kernel_w = kernel_size[1];
  g->stride_h = strides[0]; g->stride_w = strides[1];
  g->pad_h_lo = padding[0]; g->pad_h_hi = padding[1]; g->pad_w_lo = padding[2]; g->pad_w_hi = padding[3];
  g->dilation_h = dilation[0]; g->dilation_w = dilation[1];
  if (od[0] != xd[0]) return TcError("x and out must have the same batch");
  if (g->kernel_h < 1 || g->kernel_w < 1 || g->stride_h < 1 || g->stride_w < 1 || g->dilation_h < 1 ||
      g->dilation_w < 1)
    return TcError("kernel size, strides and dilation must be positive");
  if (g->pad_h_lo < 0 || g->pad_h_hi < 0 || g->pad_w_lo < 0 || g->pad_w_hi < 0)
    return TcError("padding must be non-negative");
  const int64_t oh = ConvGeometry::OutputSize(g->in_h, g->kernel_h, g->stride_h, g->pad_h_lo, g->pad_h_hi,
                                              g->dilation_h);
  const int64_t ow = ConvGeometry::OutputSize(g->in_w, g->kernel_w, g->stride_w, g->pad_w_lo, g->pad_w_hi,
                                              g->dilation_w);
  if (g->output_pixels() > 0 && (oh != g->out_h || ow != g->out_w))
    return TcError("output spatial shape does not match the convolution");
  return ffi::Error::Success();
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
  if (ffi::Error e = DecodeTcGeometry(x, *out, kernel_size, strides, padding, dilation, &s.conv); e.failure())
    return e;
  s.in_c = s.conv.in_c;
  s.out_c = s.conv.out_c;
  s.pixels = s.conv.output_pixels();
  s.groups = col_offsets.dimensions()[0] - 1;
  s.k_total = columns.dimensions()[0];
  s.relu = relu != 0;
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
