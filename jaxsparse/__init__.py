"""jaxsparse: unstructured-sparse convolutions for JAX as XLA FFI custom calls."""

from jaxsparse import _native, autodiff  # autodiff registers the JVP and transpose rules
from jaxsparse.dlmc import load_dlmc
from jaxsparse.format import SparseFilter, SparseFilterError, magnitude_mask, random_filter
from jaxsparse.ops import sparse_conv
from jaxsparse.primitive import sparse_conv_p
from jaxsparse.tc_conv import tc_conv, tc_conv1x1
from jaxsparse.tc_plan import TensorCorePlan, TensorCorePlanError, load_plan, save_plan, tensor_core_plan

cuda_available = _native.cuda_available
cpu_available = _native.cpu_available

__all__ = [
    "SparseFilter", "SparseFilterError", "sparse_conv", "sparse_conv_p", "load_dlmc",
    "magnitude_mask", "random_filter", "cuda_available", "cpu_available",
    "TensorCorePlan", "TensorCorePlanError", "tensor_core_plan", "tc_conv", "tc_conv1x1", "save_plan", "load_plan",
]
__version__ = "0.1.0"
