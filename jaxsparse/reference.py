"""Dense formulation of `sparse_conv`: densify the filter and call XLA's convolution.

Used for the fallback lowering on platforms without a native target and as a
reference in tests and benchmarks. It is never presented as a sparse kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def dense_conv_nhwc(x, kernel_hwio, bias, *, strides, padding, dilation, relu,
                    precision=lax.Precision.HIGHEST, accumulate_dtype=jnp.float32):
    """2-D NHWC convolution with optional bias and ReLU, accumulating in float32."""
    y = lax.conv_general_dilated(
        x, kernel_hwio, window_strides=tuple(strides), padding=tuple(padding),
        rhs_dilation=tuple(dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision, preferred_element_type=accumulate_dtype)
    if bias is not None and bias.shape[0] > 0:
        y = y + bias.astype(accumulate_dtype)
    if relu:
        y = jnp.maximum(y, 0)
    return y.astype(x.dtype)


@functools.partial(jax.jit, static_argnums=(3, 4))
def densify(data, indices, indptr, kernel_size, in_channels):
    """Dense HWIO kernel from CSR leaves (traceable)."""
    out_channels = indptr.shape[0] - 1
    taps = in_channels
    for k in kernel_size:
        taps *= k
    rows = jnp.repeat(jnp.arange(out_channels, dtype=jnp.int32), jnp.diff(indptr),
                      total_repeat_length=data.shape[0])
    dense = jnp.zeros((out_channels, taps), data.dtype).at[rows, indices].add(data)
    return dense.T.reshape(tuple(kernel_size) + (in_channels, out_channels))
