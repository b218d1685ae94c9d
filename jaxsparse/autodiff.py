"""Differentiation of `sparse_conv`: the rules that tie the two primitives together.

`sparse_conv_p` is linear in ``x`` for fixed values and linear in the values for
fixed ``x``; the fused bias and ReLU are handled in the JVP. Transposes:

* with respect to ``x``: a convolution of the (stride-dilated, re-padded)
  cotangent with the *transposed* sparse filter (rows = input channels,
  taps flipped), i.e. `sparse_conv_p` again, on the native kernel;
* with respect to the values: `sparse_conv_filter_grad_p`
  (`jaxsparse.filter_grad`), a sampled dense-dense product over the fixed pattern.

`sparse_conv_filter_grad_p` is bilinear in (x, dy) and its transposes are the
two operations above, so derivatives of any order stay on native kernels. The
derived calls keep the forward call's precision; the transposed convolution has
another geometry, so its kernel family is chosen by the planner ("auto").
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.interpreters import ad

from jaxsparse.csr import transpose_structure
from jaxsparse.filter_grad import filter_grad, sparse_conv_filter_grad_p
from jaxsparse.primitive import bind, sparse_conv_p


def _geometry(params):
    return {k: params[k] for k in ("kernel_size", "strides", "padding", "dilation", "options")}


def _empty_bias(dtype):
    return jnp.zeros((0,), dtype)


def input_grad(dy, data, indices, indptr, x_shape, *, kernel_size, strides, padding, dilation, options):
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
    return bind(spread, t_data, t_indices, t_indptr, _empty_bias(dy.dtype),
                kernel_size=kernel_size, strides=(1, 1), padding=((0, 0), (0, 0)),
                dilation=dilation, relu=False, options=dataclasses.replace(options, kernel="auto"))


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
