#pragma once

#include "xla/ffi/api/api.h"

namespace jaxsparse {
// Custom-call target "jaxsparse_sparse_conv" on platform "CUDA".
XLA_FFI_DECLARE_HANDLER_SYMBOL(SparseConvCudaHandler);
}  // namespace jaxsparse
