"""User-facing op: `sparse_conv`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.format import SUPPORTED_DTYPES, SparseFilter, SparseFilterError
from jaxsparse.geometry import (as_2d, conv_output_shape, is_pointwise, kernel_fits, normalize_ints,
                                normalize_padding)
from jaxsparse.options import ConvOptions
from jaxsparse.primitive import bind

_ACTIVATIONS = {None: False, "relu": True}


def _relu_flag(activation) -> bool:
    if activation is jax.nn.relu:
        return True
    if activation is None or isinstance(activation, str):
        key = activation.lower() if isinstance(activation, str) else None
        if key in _ACTIVATIONS:
            return _ACTIVATIONS[key]
    raise ValueError(f"activation must be None, 'relu' or jax.nn.relu, got {activation!r}")


def _check_kernel_fits(spatial, kernel_size, pads, dilation) -> None:
    """A non-empty input must be at least as large as the dilated kernel once padded
    (where lax would silently return an empty axis; `geometry.kernel_fits`)."""
    if not all(kernel_fits(s, k, p, d) for s, k, p, d in zip(spatial, kernel_size, pads, dilation)):
        raise ValueError(f"the filter (kernel {kernel_size}, dilation {dilation}) is larger than "
                         f"the padded input {spatial} with padding {pads}")


def _without_products(out_shape, bias, relu: bool, dtype) -> jax.Array:
    """The result when no weight meets an input element: an empty input (zero batch,
    spatial size or channels; every window then holds padding only) or an empty output.
    Each output is the bias (or 0) after the activation, as `lax.conv_general_dilated`
    would give; the native kernel is not called."""
    value = bias if bias.shape[0] else jnp.zeros((out_shape[-1],), dtype)
    if relu:
        value = jnp.maximum(value, 0)  # keeps a NaN bias NaN, like the kernel's fused ReLU
    return jnp.broadcast_to(value.astype(dtype), out_shape)


def sparse_conv(x, filter: SparseFilter, *, strides=1, padding="SAME", rhs_dilation=1, bias=None,
                activation=None, precision=None, kernel: str | None = None) -> jax.Array:
    """Convolution of ``x`` with an unstructured-sparse filter.

    Semantics are those of ``lax.conv_general_dilated(x, filter.todense(),
    strides, padding, rhs_dilation=rhs_dilation, precision=precision,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`` (``NWC``/``WIO`` for 1-D
    filters), followed by ``+ bias`` and the optional ReLU, fused in the kernel.
    Accumulation is float32 for every dtype.

    Non-finite values (NaN, +-Inf) follow *sparse* semantics, as cuSPARSE and
    scipy.sparse do, not those of the dense convolution. Output ``(n, p, co)``
    is ``bias[co] + sum_j w_j * x[n, window(p, j)]`` over the entries ``j``
    *stored* in row ``co`` of the filter, in IEEE float32 arithmetic, with zero
    padding; a pruned weight is absent, not a zero that is multiplied. Hence:

    * a stored entry (even an explicitly stored ``0.0``) that meets a NaN input
      gives NaN, and so does a stored ``0.0`` meeting +-Inf;
    * a stored nonzero weight meeting +-Inf gives +-Inf (NaN where both signs
      meet in one sum);
    * a non-finite input that meets only pruned taps never reaches the output:
      with ``filter.todense()``, lax gives NaN there (``0 * NaN``, ``0 * Inf``);
    * a non-finite stored weight (``allow_nonfinite=True``) or bias, or a sum
      overflowing float32 or the output dtype, is non-finite as usual; the
      fused ReLU keeps NaN, like ``jnp.maximum(y, 0)``.

    This is the rule of the native kernels, which apply stored entries only
    (tested on the CPU against a float64 reference); the dense fallback
    lowering (platforms without a native kernel) computes with
    ``filter.todense()`` and so follows the dense semantics.

    Empty inputs follow `lax.conv_general_dilated`: an input with a zero-size
    batch, spatial or channel axis gives the result of the shape lax gives
    (an axis the kernel does not fit is empty), every element the bias (or 0)
    after the activation, since no weight meets an input element; the native
    kernel is not called. A *non-empty* input smaller than the dilated kernel
    even after padding raises ``ValueError`` (lax would return an empty axis).

    Args:
      x: (N, H, W, Cin) for a 2-D filter, (N, W, Cin) for a 1-D one; float32,
        bfloat16 or float16, the dtype of the filter.
      filter: a `SparseFilter`.
      strides, rhs_dilation: an int or one int per spatial dimension, >= 1.
        Integers only (Python ints, integer NumPy scalars, 0-d integer
        arrays): floats, strings and bools raise ``TypeError``, never rounded.
      padding: 'SAME', 'VALID', 'SAME_LOWER' (any case), an int (every side),
        or one (low, high) pair of non-negative ints per spatial dimension.
      bias: None or an array of shape (Cout,), cast to the dtype of ``x``.
      activation: None or 'relu' (or ``jax.nn.relu``).
      precision: as for `lax.conv_general_dilated` (`jaxsparse.options`):
        ``HIGHEST`` forbids TF32 for float32 inputs; ``None`` (then
        ``jax.default_matmul_precision``), ``DEFAULT`` and ``HIGH`` allow it.
        No kernel uses TF32 yet, so float32 is computed exactly at every precision.
      kernel: the kernel family, a static option: 'auto' (the planner
        chooses; default, or ``$JAXSPARSE_KERNEL`` read at trace time), or on
        CUDA 'direct', 'spmm' (1x1, stride 1, unpadded only), 'naive',
        'rowbucket', 'staged', 'cluster', 'halfwin' (bf16/f16 windows at
        half width; stride-1 layers); where a family does not take the
        geometry or dtype, the plain tiled kernel runs (README, NOTES.md).
        A family the platform lacks raises when the call is lowered.
    """
    if not isinstance(filter, SparseFilter):
        raise TypeError(f"filter must be a jaxsparse.SparseFilter, got {type(filter).__name__}")
    if hasattr(x, "dtype") and np.dtype(x.dtype) not in SUPPORTED_DTYPES:
        # before jnp.asarray, which would silently turn a float64 array into float32
        raise TypeError(f"x must be float32, bfloat16 or float16, got {np.dtype(x.dtype)}")
    x = jnp.asarray(x)
    nd = filter.ndim
    if x.ndim != nd + 2:
        layout = "(N, H, W, C)" if nd == 2 else "(N, W, C)"
        raise ValueError(f"x must have rank {nd + 2} {layout} for a {nd}-D filter, got shape {x.shape}")
    if np.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if np.dtype(x.dtype) != np.dtype(filter.dtype):
        raise TypeError(f"dtype mismatch: x is {x.dtype} but the filter is {filter.dtype} "
                        "(convert one with .astype)")
    if x.shape[-1] != filter.in_channels:
        raise ValueError(f"channel mismatch: x has {x.shape[-1]} channels, the filter expects "
                         f"{filter.in_channels}")
    if filter.is_concrete() and not filter._validated:
        filter.validate()
    elif filter.indices.ndim != 1 or filter.indptr.shape != (filter.out_channels + 1,):
        raise SparseFilterError("filter leaves have inconsistent shapes")
    strides = normalize_ints(strides, nd, "strides")
    dilation = normalize_ints(rhs_dilation, nd, "rhs_dilation")
    spatial = x.shape[1:-1]
    pads = normalize_padding(padding, spatial, filter.kernel_size, strides, dilation)
    relu = _relu_flag(activation)
    options = ConvOptions.make(kernel, precision)
    if options.kernel == "spmm" and not is_pointwise(filter.kernel_size, strides, pads):
        raise ValueError("kernel='spmm' computes 1x1 convolutions with stride 1 and no padding only; "
                         f"got kernel {filter.kernel_size}, strides {strides}, padding {pads}")
    if bias is None:
        bias_arr = jnp.zeros((0,), x.dtype)
    else:
        bias_arr = jnp.asarray(bias)
        if bias_arr.shape != (filter.out_channels,):
            raise ValueError(f"bias must have shape ({filter.out_channels},), got {bias_arr.shape}")
        bias_arr = bias_arr.astype(x.dtype)

    if x.size:
        _check_kernel_fits(spatial, filter.kernel_size, pads, dilation)
    out_shape = conv_output_shape(x.shape, filter.kernel_size, strides, pads, dilation, filter.out_channels)
    if x.size == 0 or 0 in out_shape:
        return _without_products(out_shape, bias_arr, relu, x.dtype)

    if nd == 1:
        x = x[:, None]  # images one pixel high
    kernel_size, strides, pads, dilation = as_2d(filter.kernel_size, strides, pads, dilation)
    out = bind(x, filter.data, filter.indices, filter.indptr, bias_arr, kernel_size=kernel_size,
               strides=strides, padding=pads, dilation=dilation, relu=relu, options=options)
    return out[:, 0] if nd == 1 else out
