"""The `sparse_conv` primitive: abstract evaluation, lowerings, batching, partitioning.

Operands: ``x`` (N, H, W, Cin), ``data`` (nnz,), ``indices`` (nnz,) int32,
``indptr`` (Cout + 1,) int32, ``bias`` (Cout,) or (0,). Parameters (static):
``kernel_size``, ``strides``, ``padding`` ((lo, hi), (lo, hi)), ``dilation``,
``relu``, ``options`` (`jaxsparse.options.ConvOptions`). Always 2-D here; 1-D
calls are reshaped by `jaxsparse.ops`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching

from jaxsparse import _native, sharding
from jaxsparse.csr import block_diagonal, side_by_side, stacked
from jaxsparse.geometry import conv_output_shape
from jaxsparse.lowering import conv_attributes, register_lowerings
from jaxsparse.options import ConvOptions
from jaxsparse.reference import densify, dense_conv_nhwc

sparse_conv_p = Primitive("jaxsparse_sparse_conv")

# operands: x (N,H,W,C), data (nnz,), indices (nnz,), indptr (Cout+1,), bias (Cout,) or (0,)
# result:   (N, OH, OW, Cout)
BATCH_RULE = sharding.BatchRule("n h w c, z, z, p, b -> n oh ow o",
                                ("h", "w", "c", "z", "p", "b", "oh", "ow", "o"), (0,), False)


def bind(x, data, indices, indptr, bias, *, kernel_size, strides, padding, dilation, relu,
         options: ConvOptions):
    return sparse_conv_p.bind(x, data, indices, indptr, bias, kernel_size=tuple(kernel_size),
                              strides=tuple(strides), padding=tuple(map(tuple, padding)),
                              dilation=tuple(dilation), relu=bool(relu), options=options)


def _abstract_eval(x, data, indices, indptr, bias, *, kernel_size, strides, padding, dilation, relu,
                   options):
    shape = conv_output_shape(x.shape, kernel_size, strides, padding, dilation, indptr.shape[0] - 1)
    return jax.core.ShapedArray(shape, x.dtype, **sharding.output_sharding_kwargs(x))


sparse_conv_p.def_abstract_eval(_abstract_eval)
# Eager calls compile a one-op jit, so they take the same lowering path.
sparse_conv_p.def_impl(lambda *args, **params: jax.jit(functools.partial(sparse_conv_p.bind, **params))(*args))


def _native_lowering(ctx, x, data, indices, indptr, bias, *, platform, kernel_size, strides, padding,
                     dilation, relu, options):
    attributes = dict(relu=int(relu), **conv_attributes(kernel_size, strides, padding, dilation),
                      **options.ffi_attributes(platform))
    return sharding.lower_native_call(ctx, _native.TARGET, BATCH_RULE, attributes,
                                      x, data, indices, indptr, bias)


def _dense_fallback(x, data, indices, indptr, bias, *, kernel_size, strides, padding, dilation, relu,
                    options):
    kernel = densify(data, indices, indptr, kernel_size, x.shape[-1])
    return dense_conv_nhwc(x, kernel, bias, strides=strides, padding=padding, dilation=dilation, relu=relu,
                           precision=options.precision)


register_lowerings(sparse_conv_p, _native.TARGET, _native_lowering, _dense_fallback)
sharding.require_devices_during_lowering(sparse_conv_p)


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
      G * Cout rows (`jaxsparse.csr.block_diagonal`): block-diagonal over
      channels when ``x`` is mapped too, otherwise every group reads the same
      channels. Filters may even differ in structure as long as they have the
      same nnz (which stacking requires).
    """
    x, data, indices, indptr, bias = args
    x_dim, data_dim, indices_dim, indptr_dim, bias_dim = dims

    if all(d is None for d in (data_dim, indices_dim, indptr_dim, bias_dim)):
        # Merge the mapped axis into the batch. The sharded one of the two goes first:
        # under an explicit-sharding mesh a reshape may merge a sharded major axis with an
        # unsharded minor one, not the other way round.
        major = 0 if _is_sharded(x, x_dim) else 1
        x = jnp.moveaxis(x, x_dim, major)
        a, b = x.shape[:2]
        out = bind(x.reshape((a * b,) + x.shape[2:]), data, indices, indptr, bias, **params)
        return out.reshape((a, b) + out.shape[1:]), major

    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    data, indices, indptr = (stacked(a, d, size) for a, d in
                             ((data, data_dim), (indices, indices_dim), (indptr, indptr_dim)))
    if x_dim is not None:
        x = jnp.moveaxis(x, x_dim, 0)  # (G, N, H, W, Cin): the mapped axis may follow the channels
    cin, cout = x.shape[-1], indptr.shape[1] - 1
    if x_dim is not None:
        x = side_by_side(x, 0)  # (N, H, W, G * Cin)
    columns, merged_indptr = block_diagonal(indices, indptr, cin, shift_channels=x_dim is not None)
    if bias_dim is None and bias.shape[0] == 0:
        merged_bias = bias
    else:
        merged_bias = stacked(bias, bias_dim, size).reshape(-1)
    out = bind(x, data.reshape(-1), columns, merged_indptr, merged_bias, **params)
    out = out.reshape(out.shape[:-1] + (size, cout))
    return jnp.moveaxis(out, -2, 0), 0


batching.primitive_batchers[sparse_conv_p] = _batch_rule
