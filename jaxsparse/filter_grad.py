"""The filter-gradient primitive: d(sum(dy * sparse_conv(x, values)))/d(values).

A sampled dense-dense product over the fixed pattern, on native CPU and CUDA
kernels. Operands: ``x`` (N, H, W, Cin), ``dy`` (N, OH, OW, Cout), ``indices``,
``indptr``; result (nnz,). Parameters: the geometry of the forward call and its
``options``. Under `jax.sharding` the call is partitioned along the batch and
the per-device gradients are summed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching

from jaxsparse import _native, sharding
from jaxsparse.csr import block_diagonal, row_ids, side_by_side, stacked
from jaxsparse.lowering import conv_attributes, register_lowerings
from jaxsparse.reference import dense_conv_nhwc

sparse_conv_filter_grad_p = Primitive("jaxsparse_sparse_conv_filter_grad")

# operands: x (N,H,W,C), dy (N,OH,OW,Cout), indices (nnz,), indptr (Cout+1,); result (nnz,),
# a sum over the batch factor n.
BATCH_RULE = sharding.BatchRule("n h w c, n oh ow o, z, p -> z",
                                ("h", "w", "c", "oh", "ow", "o", "z", "p"), (0, 1), True)


def filter_grad(x, dy, indices, indptr, *, kernel_size, strides, padding, dilation, options):
    return sparse_conv_filter_grad_p.bind(x, dy, indices, indptr, kernel_size=tuple(kernel_size),
                                          strides=tuple(strides), padding=tuple(map(tuple, padding)),
                                          dilation=tuple(dilation), options=options)


def _abstract_eval(x, dy, indices, indptr, **_):
    return jax.core.ShapedArray(indices.shape, x.dtype,
                                **sharding.output_sharding_kwargs(x, batched=False, ndim=1))


sparse_conv_filter_grad_p.def_abstract_eval(_abstract_eval)
sparse_conv_filter_grad_p.def_impl(
    lambda *args, **params: jax.jit(lambda *a: sparse_conv_filter_grad_p.bind(*a, **params))(*args))


def _native_lowering(ctx, x, dy, indices, indptr, *, platform, kernel_size, strides, padding, dilation,
                     options):
    attributes = dict(**conv_attributes(kernel_size, strides, padding, dilation),
                      **options.ffi_attributes(platform))
    return sharding.lower_native_call(ctx, _native.FILTER_GRAD_TARGET, BATCH_RULE, attributes,
                                      x, dy, indices, indptr)


def _dense_fallback(x, dy, indices, indptr, *, kernel_size, strides, padding, dilation, options):
    """Platforms without the native target: dense weight gradient, gathered."""
    cin, cout = x.shape[-1], dy.shape[-1]

    def conv(w):
        return dense_conv_nhwc(x, w, None, strides=strides, padding=padding, dilation=dilation, relu=False,
                               precision=options.precision)

    _, vjp = jax.vjp(conv, jnp.zeros(tuple(kernel_size) + (cin, cout), x.dtype))
    (dw,) = vjp(dy)
    return dw.reshape(-1, cout)[indices, row_ids(indptr, indices.shape[0])]


register_lowerings(sparse_conv_filter_grad_p, _native.FILTER_GRAD_TARGET, _native_lowering, _dense_fallback)
sharding.require_devices_during_lowering(sparse_conv_filter_grad_p)


def _batch_rule(args, dims, **params):
    """Per-example filter gradients: G problems folded into one block-diagonal call."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    x, dy, indices, indptr = (stacked(a, d, size) for a, d in zip(args, dims))
    cin, nnz = x.shape[-1], indices.shape[1]
    columns, merged_indptr = block_diagonal(indices, indptr, cin, shift_channels=True)
    out = sparse_conv_filter_grad_p.bind(side_by_side(x, 0), side_by_side(dy, 0), columns, merged_indptr,
                                         **params)
    return out.reshape(size, nnz), 0


batching.primitive_batchers[sparse_conv_filter_grad_p] = _batch_rule
