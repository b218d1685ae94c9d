"""Argument normalisation shared by the op, the primitive and the layers."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from jax import lax


def normalize_ints(value, ndim: int, name: str) -> tuple[int, ...]:
    """An int or a sequence of `ndim` ints, each >= 1."""
    if isinstance(value, (int, np.integer)):
        values = (int(value),) * ndim
    else:
        try:
            values = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be an int or a sequence of {ndim} ints, got {value!r}") from None
        if len(values) != ndim:
            raise ValueError(f"{name} must have {ndim} entries for a {ndim}-D convolution, got {value!r}")
    if any(v < 1 for v in values):
        raise ValueError(f"{name} must be positive, got {value!r}")
    return values


def normalize_padding(padding, in_spatial: Sequence[int], kernel_size: Sequence[int],
                      strides: Sequence[int], dilation: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """'SAME', 'VALID' or explicit (low, high) pairs -> explicit non-negative pairs."""
    ndim = len(kernel_size)
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(f"padding must be 'SAME', 'VALID' or (low, high) pairs, got {padding!r}")
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
        pads = lax.padtype_to_pads(tuple(in_spatial), dilated, tuple(strides), padding.upper())
        return tuple((int(lo), int(hi)) for lo, hi in pads)
    if isinstance(padding, (int, np.integer)):
        padding = [(int(padding), int(padding))] * ndim
    try:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    except (TypeError, ValueError):
        raise TypeError(f"padding must be 'SAME', 'VALID' or {ndim} (low, high) pairs, got {padding!r}") from None
    if len(pads) != ndim:
        raise ValueError(f"padding needs {ndim} (low, high) pairs for a {ndim}-D convolution, got {padding!r}")
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return pads


def output_size(size: int, kernel: int, stride: int, pad: tuple[int, int], dilation: int) -> int:
    return (size + pad[0] + pad[1] - ((kernel - 1) * dilation + 1)) // stride + 1


def conv_output_shape(x_shape: Sequence[int], kernel_size: Sequence[int], strides: Sequence[int],
                      padding: Sequence[tuple[int, int]], dilation: Sequence[int],
                      out_channels: int) -> tuple[int, ...]:
    """Shape of the channels-last result of a convolution of an (N, *spatial, Cin) input."""
    spatial = tuple(output_size(s, k, st, p, d) for s, k, st, p, d in
                    zip(x_shape[1:-1], kernel_size, strides, padding, dilation))
    return (x_shape[0],) + spatial + (out_channels,)
