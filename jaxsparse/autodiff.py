"""Differentiation of `sparse_conv`: JVP and transpose rules, all native.

`sparse_conv_p` is linear in ``x`` for fixed values and linear in the values for
fixed ``x``; the fused bias and ReLU are handled in the JVP. Transposes:

* with respect to ``x``: a convolution of the (stride-dilated, re-padded)
  cotangent with the *transposed* sparse filter (rows = input channels,
  taps flipped), i.e. `sparse_conv_p` again, on the native kernel;
* with respect to the values: `sparse_conv_filter_grad_p`, a sampled
  dense-dense product over the fixed pattern (native CPU and CUDA kernels).

`sparse_conv_filter_grad_p` is bilinear in (x, dy) and its transposes are the
two operations above, so derivatives of any order stay on native kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching

from jaxsparse import _native
from jaxsparse.primitive import bind, conv_attributes, register_lowerings, sparse_conv_p
from jaxsparse.reference import dense_conv_nhwc

sparse_conv_filter_grad_p = Primitive("jaxsparse_sparse_conv_filter_grad")


def filter_grad(x, dy, indices, indptr, *, kernel_size, strides, padding, dilation):
    """d(sum(dy * sparse_conv(x, values)))/d(values), shape (nnz,)."""
    return sparse_conv_filter_grad_p.bind(x, dy, indices, indptr, kernel_size=tuple(kernel_size),
                                          strides=tuple(strides), padding=tuple(map(tuple, padding)),
                                          dilation=tuple(dilation))


def _geometry(params):
    return {k: params[k] for k in ("kernel_size", "strides", "padding", "dilation")}


# ---- filter gradient primitive ------------------------------------------------

def _filter_grad_abstract(x, dy, indices, indptr, **_):
    return jax.core.ShapedArray(indices.shape, x.dtype)


sparse_conv_filter_grad_p.def_abstract_eval(_filter_grad_abstract)
sparse_conv_filter_grad_p.def_impl(
    lambda *args, **params: jax.jit(lambda *a: sparse_conv_filter_grad_p.bind(*a, **params))(*args))


def _filter_grad_dense(x, dy, indices, indptr, *, kernel_size, strides, padding, dilation):
    """Fallback for platforms without the native target: dense weight gradient, gathered."""
    cin, cout = x.shape[-1], dy.shape[-1]
    rhs_shape = tuple(kernel_size) + (cin, cout)

    def conv(w):
        return dense_conv_nhwc(x, w, None, strides=strides, padding=padding, dilation=dilation, relu=False)

    _, vjp = jax.vjp(conv, jnp.zeros(rhs_shape, x.dtype))
    (dw,) = vjp(dy)
    rows = jnp.repeat(jnp.arange(cout, dtype=jnp.int32), jnp.diff(indptr), total_repeat_length=indices.shape[0])
    return dw.reshape(-1, cout)[indices, rows]


def _filter_grad_native(ctx, x, dy, indices, indptr, *, kernel_size, strides, padding, dilation):
    rule = jax.ffi.ffi_lowering(_native.FILTER_GRAD_TARGET)
    return rule(ctx, x, dy, indices, indptr, **conv_attributes(kernel_size, strides, padding, dilation))


register_lowerings(sparse_conv_filter_grad_p, _native.FILTER_GRAD_TARGET, _filter_grad_native,
                   _filter_grad_dense)


# ---- transposed filter and input gradient ------------------------------------

def transpose_structure(data, indices, indptr, kernel_size, in_channels):
    """The CSR of the transposed, spatially flipped filter (traceable).

    Row ``ci`` of the result holds, for every nonzero (co, kh, kw, ci) of the
    original, the column ((KH-1-kh) * KW + (KW-1-kw)) * Cout + co.
    """
    kh_size, kw_size = kernel_size
    cout = indptr.shape[0] - 1
    nnz = indices.shape[0]
    rows = jnp.repeat(jnp.arange(cout, dtype=jnp.int32), jnp.diff(indptr), total_repeat_length=nnz)
    ci = indices % in_channels
    tap = indices // in_channels
    kh, kw = tap // kw_size, tap % kw_size
    new_cols = ((kh_size - 1 - kh) * kw_size + (kw_size - 1 - kw)) * cout + rows
    order = jnp.argsort(new_cols, stable=True)
    order = order[jnp.argsort(ci[order], stable=True)]  # rows ascending, columns ascending within
    counts = jnp.bincount(ci, length=in_channels).astype(jnp.int32)
    new_indptr = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])
    return data[order], new_cols[order].astype(jnp.int32), new_indptr


def input_grad(dy, data, indices, indptr, x_shape, *, kernel_size, strides, padding, dilation):
    """Cotangent of x for y = sparse_conv(x) (no bias, no ReLU), on the native kernel."""
    t_data, t_indices, t_indptr = transpose_structure(data, indices, indptr, kernel_size, x_shape[-1])
    pads = []
    for axis in range(2):
        span = (kernel_size[axis] - 1) * dilation[axis]
        length = (dy.shape[1 + axis] - 1) * strides[axis] + 1  # after inserting stride - 1 zeros
        lo = span - padding[axis][0]
        hi = x_shape[1 + axis] + span - length - lo
        pads.append((lo, hi, strides[axis] - 1))
    spread = lax.pad(dy, jnp.zeros((), dy.dtype), [(0, 0, 0)] + pads + [(0, 0, 0)])
    return bind(spread, t_data, t_indices, t_indptr, jnp.zeros((0,), dy.dtype),
                kernel_size=kernel_size, strides=(1, 1), padding=((0, 0), (0, 0)),
                dilation=dilation, relu=False)


def _empty_bias(dtype):
    return jnp.zeros((0,), dtype)


# ---- sparse_conv_p rules -------------------------------------------------------

def _sparse_conv_jvp(primals, tangents, **params):
    x, data, indices, indptr, bias = primals
    dx, ddata, _, _, dbias = tangents
    y = sparse_conv_p.bind(x, data, indices, indptr, bias, **params)
    linear = dict(params, relu=False)
    terms = []
    if type(dx) is not ad.Zero:
        terms.append(sparse_conv_p.bind(dx, data, indices, indptr, _empty_bias(x.dtype), **linear))
    if type(ddata) is not ad.Zero:
        terms.append(sparse_conv_p.bind(x, ddata, indices, indptr, _empty_bias(x.dtype), **linear))
    if type(dbias) is not ad.Zero and bias.shape[0] > 0:
        terms.append(jnp.broadcast_to(dbias, y.shape))
    if not terms:
        return y, ad.Zero.from_primal_value(y)
    tangent = terms[0]
    for term in terms[1:]:
        tangent = tangent + term
    if params["relu"]:
        tangent = jnp.where(y > 0, tangent, jnp.zeros((), tangent.dtype))
    return y, tangent


def _sparse_conv_transpose(ct, x, data, indices, indptr, bias, **params):
    if params["relu"] or (not ad.is_undefined_primal(bias) and bias.shape[0] > 0):
        raise NotImplementedError("sparse_conv is only linear without bias and ReLU")
    geometry = _geometry(params)
    if ad.is_undefined_primal(x) and ad.is_undefined_primal(data):
        raise NotImplementedError("sparse_conv is bilinear: transpose one operand at a time")
    if ad.is_undefined_primal(x):
        if type(ct) is ad.Zero:
            return ad.Zero(x.aval), None, None, None, None
        return input_grad(ct, data, indices, indptr, x.aval.shape, **geometry), None, None, None, None
    if type(ct) is ad.Zero:
        return None, ad.Zero(data.aval), None, None, None
    return None, filter_grad(x, ct, indices, indptr, **geometry), None, None, None


ad.primitive_jvps[sparse_conv_p] = _sparse_conv_jvp
ad.primitive_transposes[sparse_conv_p] = _sparse_conv_transpose


# ---- sparse_conv_filter_grad_p rules --------------------------------------------

def _filter_grad_jvp(primals, tangents, **params):
    x, dy, indices, indptr = primals
    dx, ddy, _, _ = tangents
    out = sparse_conv_filter_grad_p.bind(x, dy, indices, indptr, **params)
    terms = []
    if type(dx) is not ad.Zero:
        terms.append(sparse_conv_filter_grad_p.bind(dx, dy, indices, indptr, **params))
    if type(ddy) is not ad.Zero:
        terms.append(sparse_conv_filter_grad_p.bind(x, ddy, indices, indptr, **params))
    if not terms:
        return out, ad.Zero.from_primal_value(out)
    return out, terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _filter_grad_transpose(ct, x, dy, indices, indptr, **params):
    if ad.is_undefined_primal(x) and ad.is_undefined_primal(dy):
        raise NotImplementedError("filter_grad is bilinear: transpose one operand at a time")
    if ad.is_undefined_primal(dy):  # dy -> values is linear: transpose is a forward conv
        if type(ct) is ad.Zero:
            return None, ad.Zero(dy.aval), None, None
        ct_dy = bind(x, ct, indices, indptr, _empty_bias(x.dtype), relu=False, **params)
        return None, ct_dy, None, None
    if type(ct) is ad.Zero:
        return ad.Zero(x.aval), None, None, None
    return input_grad(dy, ct, indices, indptr, x.aval.shape, **params), None, None, None


ad.primitive_jvps[sparse_conv_filter_grad_p] = _filter_grad_jvp
ad.primitive_transposes[sparse_conv_filter_grad_p] = _filter_grad_transpose


def _filter_grad_batch(args, dims, **params):
    """Per-example filter gradients: G problems folded into one block-diagonal call."""
    x, dy, indices, indptr = args
    x_dim, dy_dim, indices_dim, indptr_dim = dims
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)

    def grouped(a, d):
        return jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)

    x, dy, indices, indptr = (grouped(a, d) for a, d in zip(args, dims))
    cin, cout, nnz = x.shape[-1], dy.shape[-1], indices.shape[1]
    groups = jnp.arange(size, dtype=jnp.int32)[:, None]
    columns = (indices // cin) * (size * cin) + groups * cin + indices % cin
    merged_indptr = jnp.concatenate([(indptr[:, :-1] + groups * nnz).reshape(-1),
                                     jnp.array([size * nnz], jnp.int32)])
    x = jnp.moveaxis(x, 0, -2).reshape(x.shape[1:-1] + (size * cin,))
    dy = jnp.moveaxis(dy, 0, -2).reshape(dy.shape[1:-1] + (size * cout,))
    out = sparse_conv_filter_grad_p.bind(x, dy, columns.reshape(-1).astype(jnp.int32),
                                         merged_indptr.astype(jnp.int32), **params)
    return out.reshape(size, nnz), 0


batching.primitive_batchers[sparse_conv_filter_grad_p] = _filter_grad_batch
