"""Per-platform lowering shared by the primitives: the native FFI target where it
is registered, a dense XLA formulation elsewhere (never presented as sparse)."""

from __future__ import annotations

import functools
import warnings

from jax.interpreters import mlir

from jaxsparse import _native
from jaxsparse.options import REQUIRE_CUDA_ENV, require_cuda


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(platform, target, error):
    warnings.warn(f"jaxsparse: native target {target} unavailable on {platform} ({error}); "
                  "falling back to a dense XLA formulation. Set "
                  f"{REQUIRE_CUDA_ENV}=1 to make this an error on GPUs.", RuntimeWarning, stacklevel=3)


def conv_attributes(kernel_size, strides, padding, dilation) -> dict:
    """The FFI attributes describing the convolution geometry (ints and tuples of ints)."""
    return dict(kernel_size=tuple(kernel_size), strides=tuple(strides),
                padding=tuple(p for pair in padding for p in pair), dilation=tuple(dilation))


def register_lowerings(prim, target, native_lowering, fallback_fn):
    """Lowers ``prim`` to ``native_lowering(ctx, *args, platform=..., **params)`` on CPU
    and CUDA where ``target`` is registered, and to ``fallback_fn`` (dense jnp)
    elsewhere. On CUDA without the target it warns once, or raises under
    JAXSPARSE_REQUIRE_CUDA=1."""
    fallback = mlir.lower_fun(fallback_fn, multiple_results=False)

    def rule_for(platform):
        def rule(ctx, *args, **params):
            if _native.has_target(target, platform):
                return native_lowering(ctx, *args, platform=platform, **params)
            error = _native.cpu_import_error if platform == "cpu" else _native.cuda_import_error
            if platform == "cuda" and require_cuda():
                raise RuntimeError(f"{REQUIRE_CUDA_ENV}=1 but the jaxsparse CUDA target {target} is "
                                   f"unavailable: {error}")
            _warn_fallback_once(platform, target, str(error))
            return fallback(ctx, *args, **params)
        return rule

    mlir.register_lowering(prim, fallback)  # any other platform
    for platform in ("cpu", "cuda"):
        mlir.register_lowering(prim, rule_for(platform), platform=platform)
