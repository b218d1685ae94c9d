"""Loads the native extensions and registers their FFI targets with XLA.

The CPU extension is always built; the CUDA one only where nvcc was found at
build time, and it is imported in a try/except so that jaxsparse imports on
any machine.
"""

from __future__ import annotations

import jax

TARGET = "jaxsparse_sparse_conv"
FILTER_GRAD_TARGET = "jaxsparse_sparse_conv_filter_grad"

try:
    from jaxsparse import _jaxsparse_cpu
    cpu_import_error = None
except ImportError as e:  # pragma: no cover - a broken install
    _jaxsparse_cpu = None
    cpu_import_error = e

try:
    from jaxsparse import _jaxsparse_cuda
    cuda_import_error = None
except ImportError as e:
    _jaxsparse_cuda = None
    cuda_import_error = e

_targets = {"cpu": set(), "cuda": set()}

if _jaxsparse_cpu is not None:
    for _name, _capsule in _jaxsparse_cpu.registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
        _targets["cpu"].add(_name)

cuda_registered = False
if _jaxsparse_cuda is not None:
    try:
        for _name, _capsule in _jaxsparse_cuda.registrations().items():
            jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")
            _targets["cuda"].add(_name)
        cuda_registered = True
    except Exception as e:  # pragma: no cover - jaxlib without CUDA support
        cuda_import_error = e


def cpu_available() -> bool:
    return _jaxsparse_cpu is not None


def cuda_available() -> bool:
    """True when the CUDA extension imported and its targets are registered."""
    return cuda_registered


def has_target(name: str, platform: str) -> bool:
    """Whether the native FFI target `name` is registered for `platform` ('cpu' or 'cuda')."""
    return name in _targets[platform]
