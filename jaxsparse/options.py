"""Options of a sparse convolution: which kernel family and which arithmetic.

`ConvOptions` is a small frozen value. It travels as one static parameter of
the primitives (so it is part of every jaxpr and of the jit cache key) and is
turned into FFI attributes in the lowering; no handler reads the environment.

Precision follows `lax.conv_general_dilated`:

* ``HIGHEST``: exact float32 products for float32 inputs (TF32 forbidden);
* ``DEFAULT`` and ``HIGH``: a kernel may use TF32 tensor cores for float32
  inputs (as XLA's GPU convolutions do for both);
* bfloat16/float16 inputs may use tensor cores at any precision (their products
  are exact in float32); accumulation is always float32.

``None`` means ``jax.default_matmul_precision`` (read at trace time), else
``DEFAULT``. A ``(lhs, rhs)`` pair is accepted; the stricter of the two governs.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax import lax

# Kernel families per platform. "auto" lets the native planner choose; the
# others force a family. Codes are the FFI attribute values (cuda/ffi/sparse_conv_args.h).
KERNEL_CODES = {"auto": 0, "direct": 1, "spmm": 2, "naive": 3, "rowbucket": 4, "staged": 5, "cluster": 6,
                "halfwin": 7}
PLATFORM_KERNELS = {
    "cpu": ("auto",),
    "cuda": ("auto", "direct", "spmm", "naive", "rowbucket", "staged", "cluster", "halfwin"),
}
KERNEL_ENV = "JAXSPARSE_KERNEL"            # Python-side default kernel, read at trace time
CPU_THREADS_ENV = "JAXSPARSE_CPU_THREADS"  # CPU kernel threads, read at lowering time
REQUIRE_CUDA_ENV = "JAXSPARSE_REQUIRE_CUDA"


def canonical_precision(precision) -> lax.Precision:
    """The `lax.Precision` that governs a call (see the module docstring)."""
    if precision is None:
        precision = jax.config.jax_default_matmul_precision
        if precision is None:
            return lax.Precision.DEFAULT
    if isinstance(precision, (tuple, list)):
        if len(precision) != 2:
            raise ValueError(f"precision must be None, a lax.Precision, a name or a (lhs, rhs) pair, "
                             f"got {precision!r}")
        pair = [lax.Precision.DEFAULT if p is None else _one_precision(p) for p in precision]
        return max(pair, key=lambda p: p.value)
    return _one_precision(precision)


def _one_precision(precision) -> lax.Precision:
    if isinstance(precision, lax.Precision):
        return precision
    if isinstance(precision, str):
        try:
            return lax.Precision(precision.lower())
        except ValueError:
            pass
    names = "'default', 'high', 'highest' (or 'fastest', 'bfloat16', 'tensorfloat32', 'float32')"
    raise ValueError(f"precision must be None, a lax.Precision, one of {names}, or a (lhs, rhs) pair "
                     f"of those, got {precision!r}")


def allows_tf32(precision: lax.Precision) -> bool:
    return precision != lax.Precision.HIGHEST


def default_kernel() -> str:
    return os.environ.get(KERNEL_ENV) or "auto"


def check_kernel(kernel: str) -> str:
    if not isinstance(kernel, str) or kernel not in KERNEL_CODES:
        raise ValueError(f"kernel must be one of {tuple(KERNEL_CODES)}, got {kernel!r}")
    return kernel


def require_cuda() -> bool:
    return os.environ.get(REQUIRE_CUDA_ENV, "0") not in ("", "0", "false", "False")


def cpu_threads() -> int:
    """Threads of the CPU kernel: $JAXSPARSE_CPU_THREADS, else 0 (all hardware threads)."""
    value = os.environ.get(CPU_THREADS_ENV, "")
    if not value:
        return 0
    try:
        threads = int(value)
    except ValueError:
        raise ValueError(f"{CPU_THREADS_ENV} must be a positive integer, got {value!r}") from None
    if threads < 1:
        raise ValueError(f"{CPU_THREADS_ENV} must be a positive integer, got {value!r}")
    return threads


@dataclasses.dataclass(frozen=True)
class ConvOptions:
    """Static options of one call: the kernel family and the governing precision."""
    kernel: str = "auto"
    precision: lax.Precision = lax.Precision.DEFAULT

    @classmethod
    def make(cls, kernel=None, precision=None) -> "ConvOptions":
        """Validated options; ``None`` takes the trace-time defaults."""
        return cls(check_kernel(default_kernel() if kernel is None else kernel),
                   canonical_precision(precision))

    def check_platform(self, platform: str) -> None:
        available = PLATFORM_KERNELS.get(platform, ())
        if self.kernel not in available:
            raise ValueError(f"jaxsparse: kernel {self.kernel!r} does not exist on {platform}; "
                             f"kernels available there: {available}")

    def ffi_attributes(self, platform: str) -> dict:
        """The attributes the native handlers take (exact int64 types)."""
        self.check_platform(platform)
        attrs = dict(kernel=np.int64(KERNEL_CODES[self.kernel]),
                     precision=np.int64(self.precision.value))
        if platform == "cpu":
            attrs["threads"] = np.int64(cpu_threads())
        return attrs


def precision_to_json(precision):
    """A layer's ``precision`` argument as JSON (None, a name, or a pair of those)."""
    if precision is None or isinstance(precision, str):
        return precision
    if isinstance(precision, lax.Precision):
        return precision.name
    if isinstance(precision, (tuple, list)):
        return [precision_to_json(p) for p in precision]
    raise ValueError(f"precision {precision!r} cannot be stored (use None, a lax.Precision or a name)")


def precision_from_json(value):
    """The inverse of `precision_to_json` (names of `lax.Precision` members become members)."""
    if isinstance(value, list):
        return tuple(precision_from_json(v) for v in value)
    if isinstance(value, str) and value in lax.Precision.__members__:
        return lax.Precision[value]
    return value
