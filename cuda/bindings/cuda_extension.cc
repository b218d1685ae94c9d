// nanobind module exposing the CUDA FFI handlers as capsules; nothing else.
#include <nanobind/nanobind.h>

#include "ffi/sparse_conv_cuda_ffi.h"

namespace nb = nanobind;

NB_MODULE(_jaxsparse_cuda, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["jaxsparse_sparse_conv"] =
        nb::capsule(reinterpret_cast<void*>(&jaxsparse::SparseConvCudaHandler));
    targets["jaxsparse_sparse_conv_filter_grad"] =
        nb::capsule(reinterpret_cast<void*>(&jaxsparse::SparseConvFilterGradCudaHandler));
    targets["jaxsparse_tc_spmm"] = nb::capsule(reinterpret_cast<void*>(&jaxsparse::TcSpmmCudaHandler));
    return targets;
  });
}
