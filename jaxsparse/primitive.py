"""The `sparse_conv` primitive: abstract evaluation, lowerings, batching.

Operands: ``x`` (N, H, W, Cin), ``data`` (nnz,), ``indices`` (nnz,) int32,
``indptr`` (Cout + 1,) int32, ``bias`` (Cout,) or (0,). Parameters (static):
``kernel_size``, ``strides``, ``padding`` ((lo, hi), (lo, hi)), ``dilation``,
``relu``. Always 2-D here; 1-D calls are reshaped by `jaxsparse.ops`.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jaxsparse import _native
from jaxsparse.geometry import output_size
from jaxsparse.reference import densify, dense_conv_nhwc
from jaxsparse.sharding import (batch_partitioned_lowering, output_sharding_kwargs,
                                require_devices_during_lowering)

sparse_conv_p = Primitive("jaxsparse_sparse_conv")

REQUIRE_CUDA_ENV = "JAXSPARSE_REQUIRE_CUDA"


def require_cuda() -> bool:
    return os.environ.get(REQUIRE_CUDA_ENV, "0") not in ("", "0", "false", "False")


def bind(x, data, indices, indptr, bias, *, kernel_size, strides, padding, dilation, relu):
    return sparse_conv_p.bind(x, data, indices, indptr, bias, kernel_size=tuple(kernel_size),
                              strides=tuple(strides), padding=tuple(map(tuple, padding)),
                              dilation=tuple(dilation), relu=bool(relu))


# ---- abstract evaluation ----------------------------------------------------

def _abstract_eval(x, data, indices, indptr, bias, *, kernel_size, strides, padding, dilation, relu):
    n, h, w, _ = x.shape
    out_h = output_size(h, kernel_size[0], strides[0], padding[0], dilation[0])
    out_w = output_size(w, kernel_size[1], strides[1], padding[1], dilation[1])
    return jax.core.ShapedArray((n, out_h, out_w, indptr.shape[0] - 1), x.dtype,
                                **output_sharding_kwargs(x))


sparse_conv_p.def_abstract_eval(_abstract_eval)


def _impl(*args, **params):
    # Eager calls compile a one-op jit, so they take the same lowering path.
    return jax.jit(functools.partial(sparse_conv_p.bind, **params))(*args)


sparse_conv_p.def_impl(_impl)


# ---- lowerings --------------------------------------------------------------

def conv_attributes(kernel_size, strides, padding, dilation):
    """The FFI attributes describing the convolution geometry (exact int64 types)."""
    return dict(kernel_size=np.asarray(kernel_size, np.int64),
                strides=np.asarray(strides, np.int64),
                padding=np.asarray([p for pair in padding for p in pair], np.int64),
                dilation=np.asarray(dilation, np.int64))


def _sparse_conv_native(target):
    # The FFI call, partitioned along the batch under jax.sharding (see jaxsparse.sharding).
    return batch_partitioned_lowering(target)


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(platform, target, error):
    warnings.warn(f"jaxsparse: native target {target} unavailable on {platform} ({error}); "
                  "falling back to a dense XLA formulation. Set "
                  f"{REQUIRE_CUDA_ENV}=1 to make this an error on GPUs.", RuntimeWarning, stacklevel=3)


def register_lowerings(prim, target, native_lowering, fallback_fn):
    """Lowers `prim` to the native FFI `target` on CPU and CUDA where it is
    registered, and to `fallback_fn` (dense jnp) elsewhere. On CUDA without the
    target it warns once, or raises under JAXSPARSE_REQUIRE_CUDA=1."""
    fallback = mlir.lower_fun(fallback_fn, multiple_results=False)

    def cpu_rule(ctx, *args, **params):
        if _native.has_target(target, "cpu"):
            return native_lowering(ctx, *args, **params)
        _warn_fallback_once("cpu", target, str(_native.cpu_import_error))
        return fallback(ctx, *args, **params)

    def cuda_rule(ctx, *args, **params):
        if _native.has_target(target, "cuda"):
            return native_lowering(ctx, *args, **params)
        if require_cuda():
            raise RuntimeError(f"{REQUIRE_CUDA_ENV}=1 but the jaxsparse CUDA target {target} is "
                               f"unavailable: {_native.cuda_import_error}")
        _warn_fallback_once("cuda", target, str(_native.cuda_import_error))
        return fallback(ctx, *args, **params)

    mlir.register_lowering(prim, fallback)  # any other platform
    mlir.register_lowering(prim, cpu_rule, platform="cpu")
    mlir.register_lowering(prim, cuda_rule, platform="cuda")


def _dense_fallback(x, data, indices, indptr, bias, *, kernel_size, strides, padding, dilation, relu):
    kernel = densify(data, indices, indptr, kernel_size, x.shape[-1])
    return dense_conv_nhwc(x, kernel, bias, strides=strides, padding=padding, dilation=dilation, relu=relu)


register_lowerings(sparse_conv_p, _native.TARGET, _sparse_conv_native(_native.TARGET), _dense_fallback)
require_devices_during_lowering(sparse_conv_p)


# ---- batching ---------------------------------------------------------------

def _is_sharded(x, axis: int) -> bool:
    """Whether ``axis`` of ``x`` is sharded in its type (explicit-sharding meshes only)."""
    try:
        spec = jax.typeof(x).sharding.spec
    except Exception:  # no explicit sharding in the type (or an older jax): nothing to respect
        return False
    return axis < len(spec) and spec[axis] is not None


def _batch_rule(args, dims, **params):
    """Folds vmapped axes into the native call; never loops.

    * Only ``x`` mapped: the mapped axis is merged into the batch dimension.
    * Filter (or bias) mapped, G filters: the G filters become one filter with
      G * Cout rows. If ``x`` is mapped too, its G slices are laid side by side
      along channels and group g's columns are shifted to channels
      [g * Cin, (g + 1) * Cin) (a block-diagonal filter); otherwise every group
      reads the same channels. Filters may even differ in structure as long as
      they have the same nnz (which stacking requires).
    """
    x, data, indices, indptr, bias = args
    x_dim, data_dim, indices_dim, indptr_dim, bias_dim = dims
    not_mapped = None  # batching.not_mapped; no longer exported by jax >= 0.10

    if all(d is not_mapped for d in (data_dim, indices_dim, indptr_dim, bias_dim)):
        # Merge the mapped axis into the batch. The sharded one of the two goes first:
        # under an explicit-sharding mesh a reshape may merge a sharded major axis with an
        # unsharded minor one, not the other way round.
        major = 0 if _is_sharded(x, x_dim) else 1
        x = jnp.moveaxis(x, x_dim, major)
        a, b = x.shape[:2]
        out = bind(x.reshape((a * b,) + x.shape[2:]), data, indices, indptr, bias, **params)
        return out.reshape((a, b) + out.shape[1:]), major

    size = next(a.shape[d] for a, d in zip(args, dims) if d is not not_mapped)

    def grouped(a, d):
        return jnp.broadcast_to(a, (size,) + a.shape) if d is not_mapped else jnp.moveaxis(a, d, 0)

    data, indices, indptr = grouped(data, data_dim), grouped(indices, indices_dim), grouped(indptr, indptr_dim)
    nnz, cout = data.shape[1], indptr.shape[1] - 1
    if x_dim is not not_mapped:
        x = jnp.moveaxis(x, x_dim, 0)  # (G, N, H, W, Cin)
    cin = x.shape[-1]
    groups = jnp.arange(size, dtype=jnp.int32)[:, None]

    if x_dim is not_mapped:
        columns = indices
    else:
        x = jnp.moveaxis(x, 0, -2)  # (N, H, W, G, Cin)
        x = x.reshape(x.shape[:-2] + (size * cin,))
        tap, channel = indices // cin, indices % cin
        columns = tap * (size * cin) + groups * cin + channel
    merged_indptr = jnp.concatenate([(indptr[:, :-1] + groups * nnz).reshape(-1),
                                     jnp.array([size * nnz], jnp.int32)])
    if bias_dim is not_mapped and bias.shape[0] == 0:
        merged_bias = bias
    else:
        merged_bias = grouped(bias, bias_dim).reshape(-1)
    out = bind(x, data.reshape(-1), columns.reshape(-1).astype(jnp.int32), merged_indptr.astype(jnp.int32),
               merged_bias, **params)
    out = out.reshape(out.shape[:-1] + (size, cout))
    return jnp.moveaxis(out, -2, 0), 0


batching.primitive_batchers[sparse_conv_p] = _batch_rule
