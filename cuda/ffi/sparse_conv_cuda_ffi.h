#pragma once

#include "xla/ffi/api/api.h"

namespace jaxsparse {
// Custom-call target "jaxsparse_sparse_conv" on platform "CUDA".
XLA_FFI_DECLARE_HANDLER_SYMBOL(SparseConvCudaHandler);
// Custom-call target "jaxsparse_sparse_conv_filter_grad" on platform "CUDA".
XLA_FFI_DECLARE_HANDLER_SYMBOL(SparseConvFilterGradCudaHandler);
// Custom-call target "jaxsparse_tc_spmm" on platform "CUDA" (tensor-core convolution, issue 14).
XLA_FFI_DECLARE_HANDLER_SYMBOL(TcSpmmCudaHandler);
}  // namespace jaxsparse
