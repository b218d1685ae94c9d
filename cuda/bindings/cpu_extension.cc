// nanobind module exposing the CPU FFI handlers as capsules; nothing else.
#include <nanobind/nanobind.h>

#include "ffi/sparse_conv_cpu_ffi.h"

namespace nb = nanobind;

NB_MODULE(_jaxsparse_cpu, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["jaxsparse_sparse_conv"] =
        nb::capsule(reinterpret_cast<void*>(&jaxsparse::SparseConvCpuHandler));
    targets["jaxsparse_sparse_conv_filter_grad"] =
        nb::capsule(reinterpret_cast<void*>(&jaxsparse::SparseConvFilterGradCpuHandler));
    return targets;
  });
}
