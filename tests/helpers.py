"""Test helpers: an independent float64 NumPy reference convolution and error bounds.

The reference never goes through jaxsparse or XLA: it pads the input with
NumPy, walks the dense HWIO kernel tap by tap and accumulates in float64. Its
'SAME' padding rule is written out here (TF/XLA convention: output size
ceil(in / stride), the extra padding at the high end), so a wrong rule in the
library cannot hide in the reference.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import jaxsparse

DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(jnp.bfloat16),
    "float16": np.dtype(np.float16),
}

# Per-element error bound, relative to sum_j |w_j| |x_j| + |bias| (the magnitude
# of the terms summed, which bounds |y| too). float32 accumulation error of a
# few hundred terms is ~1e-5 of that; the half types add one output rounding.
RTOL = {
    np.dtype(np.float32): 1e-5,
    np.dtype(jnp.bfloat16): 1e-2,
    np.dtype(np.float16): 2e-3,
}


def resolve_padding(padding, in_spatial, kernel_size, strides, dilation):
    """Explicit (lo, hi) pairs for 'SAME' / 'VALID' / explicit padding (independent of jax)."""
    if isinstance(padding, str):
        pads = []
        for n, k, s, d in zip(in_spatial, kernel_size, strides, dilation):
            dk = (k - 1) * d + 1
            if padding == "VALID":
                pads.append((0, 0))
            else:
                out = -(-n // s)
                total = max((out - 1) * s + dk - n, 0)
                pads.append((total // 2, total - total // 2))
        return tuple(pads)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def as_tuple(v, nd):
    return (int(v),) * nd if np.isscalar(v) else tuple(int(a) for a in v)


def ref_conv(x, kernel, *, strides=1, padding="SAME", rhs_dilation=1, bias=None, relu=False,
             absolute=False):
    """float64 NHWC/HWIO (or NWC/WIO) convolution + bias + ReLU, in NumPy.

    With ``absolute=True`` returns sum |w| |x| + |bias| instead (the scale of the
    rounding error), without ReLU.
    """
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    nd = kernel.ndim - 2
    if nd == 1:
        out = ref_conv(x[:, None], kernel[None], strides=(1,) + as_tuple(strides, 1),
                       padding=((0, 0),) + resolve_padding(padding, x.shape[1:2], kernel.shape[:1],
                                                           as_tuple(strides, 1),
                                                           as_tuple(rhs_dilation, 1)),
                       rhs_dilation=(1,) + as_tuple(rhs_dilation, 1), bias=bias, relu=relu,
                       absolute=absolute)
        return out[:, 0]
    if absolute:
        x, kernel = np.abs(x), np.abs(kernel)
        bias = None if bias is None else np.abs(np.asarray(bias, np.float64))
        relu = False
    strides = as_tuple(strides, 2)
    dil = as_tuple(rhs_dilation, 2)
    kh, kw, cin, cout = kernel.shape
    pads = resolve_padding(padding, x.shape[1:3], (kh, kw), strides, dil)
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    n, hp, wp, _ = xp.shape
    oh = (hp - ((kh - 1) * dil[0] + 1)) // strides[0] + 1
    ow = (wp - ((kw - 1) * dil[1] + 1)) // strides[1] + 1
    y = np.zeros((n, max(oh, 0), max(ow, 0), cout))
    if oh > 0 and ow > 0:
        for i in range(kh):
            for j in range(kw):
                h0, w0 = i * dil[0], j * dil[1]
                patch = xp[:, h0:h0 + (oh - 1) * strides[0] + 1:strides[0],
                           w0:w0 + (ow - 1) * strides[1] + 1:strides[1], :]
                y += patch @ kernel[i, j]
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    if relu:
        y = np.maximum(y, 0)
    return y


def check_close(out, x, kernel, *, dtype=None, bias=None, relu=False, **conv):
    """Asserts ``out`` matches the float64 reference within the per-dtype bound.

    The reference is computed from the values as stored (x, kernel and bias
    rounded to the op's dtype, then upcast). Returns the reference.
    """
    out = np.asarray(out)
    dtype = np.dtype(out.dtype if dtype is None else dtype)
    assert out.dtype == dtype, (out.dtype, dtype)
    xf = np.asarray(np.asarray(x).astype(dtype), np.float64)
    kf = np.asarray(np.asarray(kernel).astype(dtype), np.float64)
    bf = None if bias is None else np.asarray(np.asarray(bias).astype(dtype), np.float64)
    ref = ref_conv(xf, kf, bias=bf, relu=relu, **conv)
    scale = ref_conv(xf, kf, bias=bf, absolute=True, **conv)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    outf = np.asarray(out, np.float64)
    assert np.all(np.isfinite(outf)), "non-finite output"
    # A floor for outputs whose terms all vanish: the smallest normal of the dtype.
    floor = float(jnp.finfo(dtype).tiny)
    bound = RTOL[dtype] * scale + floor
    err = np.abs(outf - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else None
    assert np.all(err <= bound), (
        f"max excess error at {worst}: |{outf[worst]} - {ref[worst]}| = {err[worst]:.3g} > "
        f"bound {bound[worst]:.3g} ({dtype}); max |err| / max scale = "
        f"{err.max() / max(scale.max(), 1e-300):.3g}")
    return ref


def random_input(rng, shape, dtype=np.float32):
    """Standard-normal input (never all zero), stored in ``dtype``."""
    x = rng.standard_normal(shape).astype(np.float32)
    if x.size:
        x.flat[0] = 1.0  # guarantee at least one clearly nonzero entry
    return jnp.asarray(x.astype(dtype))


def check_fused_relu_keeps_nan(conv):
    """A NaN input stays NaN through the fused bias + ReLU, as with XLA's max(x, 0).

    ``conv(x, f, bias)`` runs ``sparse_conv(x, f, bias=bias, activation="relu")`` (on the
    device, with the kernel family of the caller's choice) and returns a NumPy array."""
    rng = np.random.default_rng(5)
    f = jaxsparse.random_filter(4, (1, 1), 16, 24, 0.5)
    assert np.all(np.diff(np.asarray(f.indptr)) > 0)
    x = np.asarray(random_input(rng, (1, 4, 4, 16))).copy()
    x[0, 1, 2, :] = np.nan
    bias = np.full(24, -1e3, np.float32)  # ReLU clamps every finite output to 0
    out = conv(x, f, bias)
    assert np.isnan(out[0, 1, 2]).all()
    mask = np.ones((4, 4), bool)
    mask[1, 2] = False
    assert np.all(out[0][mask] == 0.0)


def dense_from_filter(f: jaxsparse.SparseFilter) -> np.ndarray:
    """Dense HWIO kernel of a filter, built in NumPy straight from the CSR arrays."""
    data = np.asarray(f.data, np.float64)
    indices = np.asarray(f.indices)
    indptr = np.asarray(f.indptr)
    rows = np.zeros((f.out_channels, f.taps))
    for r in range(f.out_channels):
        for j in range(indptr[r], indptr[r + 1]):
            rows[r, indices[j]] += data[j]
    return rows.T.reshape(f.kernel_size + (f.in_channels, f.out_channels))


def filter_with_empty_rows(rng, kernel_size, cin, cout, sparsity, dtype, empty_rows):
    """A random magnitude-pruned filter with the given output channels forced empty."""
    shape = tuple(kernel_size) + (cin, cout)
    dense = rng.standard_normal(shape).astype(np.float32) / math.sqrt(max(1, math.prod(shape[:-1])))
    mask = jaxsparse.magnitude_mask(dense, sparsity)
    dense = np.where(mask, dense, 0.0).astype(np.float32)
    dense[..., list(empty_rows)] = 0.0
    return jaxsparse.SparseFilter.from_dense(dense, None, dtype=dtype)


def draw_conv_geometry(draw, nd, *, kernel, dilation, stride, extra):
    """A convolution geometry for hypothesis cases: per-axis kernel size, dilation and stride
    drawn from the given strategies, padding SAME, VALID or explicit (0-3 per side), and
    an input size the padding admits plus ``extra`` (a strategy) more pixels.
    """
    kernel_size = tuple(draw(kernel) for _ in range(nd))
    dilations = tuple(draw(dilation) for _ in range(nd))
    strides = tuple(draw(stride) for _ in range(nd))
    kind = draw(st.sampled_from(["SAME", "VALID", "explicit"]))
    padding = (tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(nd))
               if kind == "explicit" else kind)
    spatial = []
    for i in range(nd):
        dk = (kernel_size[i] - 1) * dilations[i] + 1
        lowest = dk if kind == "VALID" else max(1, dk - sum(padding[i])) if kind == "explicit" else 1
        spatial.append(lowest + draw(extra))
    return dict(kernel_size=kernel_size, dilation=dilations, strides=strides, padding=padding,
                spatial=tuple(spatial))
