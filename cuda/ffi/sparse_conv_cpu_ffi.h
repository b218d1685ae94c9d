#pragma once

#include "xla/ffi/api/api.h"

namespace jaxsparse {
// Custom-call target "jaxsparse_sparse_conv" on platform "cpu".
XLA_FFI_DECLARE_HANDLER_SYMBOL(SparseConvCpuHandler);
// Custom-call target "jaxsparse_sparse_conv_filter_grad" on platform "cpu".
XLA_FFI_DECLARE_HANDLER_SYMBOL(SparseConvFilterGradCpuHandler);
}  // namespace jaxsparse
