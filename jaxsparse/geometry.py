"""Argument normalisation shared by the op, the primitive and the layers.

Strides, dilations, explicit paddings and filter metadata must be static
integers: Python ``int``, integer NumPy scalars, or concrete 0-d integer arrays
(what ``operator.index`` accepts). Floats are refused even when integral
(``2.0``), as `lax.conv_general_dilated` refuses them, and so are strings
(``strides="12"`` is not ``(1, 2)``) and traced values. Booleans are refused
too, where lax accepts them (``bool`` subclasses ``int``, so ``True`` is a
stride of 1 there): a bool is never a meaningful stride or padding, and is far
more likely a misplaced flag. Nothing is rounded, truncated or parsed; errors
are ``TypeError`` naming the argument, its value and the offending entry.

A collection of such integers may be any *ordered* iterable: a list, tuple,
1-D integer array, ``range``, generator or ``map`` object (an iterator is read
once; errors then show the list of its entries). Strings are refused, and so
are sets and mappings, whose order is not the caller's.

Kernel extent: `dilated_size` is the one definition of a dilated kernel's
size and `kernel_fits` of whether it fits in a padded input; `output_size`
and `conv_output_shape` build on them.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet

import jax
import numpy as np
from jax import lax

PADDING_STRINGS = ("SAME", "VALID", "SAME_LOWER")


def _why_not_int(v) -> str | None:
    """None if ``v`` is an integer (as `operator.index` sees it, bools excluded), else why not."""
    if isinstance(v, jax.core.Tracer):
        return f"{v!r} is traced; geometry must be static Python or NumPy integers"
    if isinstance(v, (bool, np.bool_)) or np.dtype(getattr(v, "dtype", np.int64)) == np.bool_:
        return f"{v!r} is a bool, not an integer"
    try:
        operator.index(v)
    except TypeError:
        return f"{v!r} is not an integer ({type(v).__name__})"
    return None


def _as_int(v, message: str) -> int:
    why = _why_not_int(v)
    if why is not None:
        raise TypeError(f"{message}: {why}")
    return operator.index(v)


def _is_array(value) -> bool:
    return isinstance(value, (np.ndarray, np.generic, jax.Array))


def is_scalar(value) -> bool:
    """Not a collection of entries: ints, floats, None, 0-d arrays (strings are not scalars)."""
    if _is_array(value):
        return np.ndim(value) == 0
    return not isinstance(value, Iterable)


def _entries(value, message: str) -> tuple[list, object]:
    """(entries, what to show in an error) of an ordered collection: a list, tuple, 1-D array,
    range, generator or other iterator (materialised once, then shown as the list of its
    entries). Strings, scalars and unordered collections (sets, mappings) are refused."""
    if isinstance(value, (str, bytes)) or is_scalar(value):
        raise TypeError(f"{message}, got {value!r}")
    if isinstance(value, (AbstractSet, Mapping)):
        raise TypeError(f"{message}, got {value!r} (unordered: pass a list or tuple)")
    entries = list(value)
    return entries, (value if isinstance(value, Sequence) or _is_array(value) else entries)


def as_static_int(value, name: str) -> int:
    """A static integer argument (see the module docstring); ``TypeError`` naming it otherwise."""
    return _as_int(value, f"{name} must be an int, got {value!r}")


def as_static_ints(value, name: str) -> tuple[int, ...]:
    """An ordered collection of static integers (`_entries`), of any length."""
    expected = f"{name} must be a sequence of ints"
    entries, shown = _entries(value, expected)
    return tuple(_as_int(v, f"{expected}, got {shown!r}") for v in entries)


def normalize_ints(value, ndim: int, name: str) -> tuple[int, ...]:
    """An int or an ordered collection of `ndim` ints (`_entries`), each >= 1 (see the module
    docstring for 'int')."""
    expected = f"{name} must be an int or a sequence of {ndim} ints"
    if is_scalar(value):
        shown = value
        values = (_as_int(value, f"{expected}, got {value!r}"),) * ndim
    else:
        entries, shown = _entries(value, expected)
        values = tuple(_as_int(v, f"{expected}, got {shown!r}") for v in entries)
        if len(values) != ndim:
            raise ValueError(f"{name} must have {ndim} entries for a {ndim}-D convolution, got {shown!r}")
    if any(v < 1 for v in values):
        raise ValueError(f"{name} must be positive, got {shown!r}")
    return values


def padding_pairs(padding, ndim: int, *, name: str = "padding",
                  int_per_dimension: bool = False) -> tuple[tuple[int, int], ...]:
    """Explicit padding: one int for every side, or `ndim` (low, high) pairs of ints.

    The single walk of explicit paddings, for `sparse_conv` (as lax: pairs only) and for
    the layers (``int_per_dimension=True``, as `flax.nnx.Conv`: an entry may also be one
    int, for both sides of its dimension). Signs are not checked here. ``TypeError`` for
    a non-integer or a malformed entry, ``ValueError`` for the wrong number of entries;
    both start with ``name``."""
    if int_per_dimension:
        expected = f"{name} must be a string, an int, or {ndim} ints or (low, high) pairs of ints"
    else:
        expected = f"{name} must be 'SAME', 'VALID' or {ndim} (low, high) pairs"
    if is_scalar(padding):
        pad = _as_int(padding, f"{expected}, got {padding!r}")
        return ((pad, pad),) * ndim
    entries, shown = _entries(padding, expected)
    pairs = []
    for entry in entries:
        if int_per_dimension and is_scalar(entry):
            pad = _as_int(entry, f"{expected}, got {shown!r}")
            pairs.append((pad, pad))
            continue
        pair, pair_shown = _entries(entry, f"{expected}, got {shown!r}; a pair must be a sequence of 2 ints")
        if len(pair) != 2:
            raise TypeError(f"{expected}, got {shown!r}: {pair_shown!r} is not a (low, high) pair")
        pairs.append(tuple(_as_int(v, f"{expected}, got {shown!r}") for v in pair))
    if len(pairs) != ndim:
        raise ValueError(f"{name} needs {ndim} (low, high) pairs for a {ndim}-D convolution, got {shown!r}")
    return tuple(pairs)


def normalize_padding(padding, in_spatial: Sequence[int], kernel_size: Sequence[int],
                      strides: Sequence[int], dilation: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """'SAME', 'VALID', 'SAME_LOWER' (any case), an int, or explicit (low, high) pairs
    -> explicit non-negative pairs."""
    ndim = len(kernel_size)
    if isinstance(padding, str):
        if padding.upper() not in PADDING_STRINGS:
            raise ValueError(f"padding must be 'SAME', 'VALID', 'SAME_LOWER' or (low, high) pairs, "
                             f"got {padding!r}")
        dilated = [dilated_size(k, d) for k, d in zip(kernel_size, dilation)]
        pads = lax.padtype_to_pads(tuple(in_spatial), dilated, tuple(strides), padding.upper())
        return tuple((int(lo), int(hi)) for lo, hi in pads)
    pads = padding_pairs(padding, ndim)
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        shown = padding if is_scalar(padding) or isinstance(padding, Sequence) or _is_array(padding) else pads
        raise ValueError(f"padding must be non-negative, got {shown!r}")
    return pads


def is_pointwise(kernel_size: Sequence[int], strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> bool:
    """Whether a convolution is a plain per-pixel matrix product: a 1x1 kernel, stride 1 and no
    padding (explicit pairs; dilation does not matter for a 1x1 kernel)."""
    return (all(k == 1 for k in kernel_size) and all(s == 1 for s in strides) and
            all(tuple(p) == (0, 0) for p in padding))


def as_2d(kernel_size: Sequence[int], strides: Sequence[int], padding: Sequence[tuple[int, int]],
          dilation: Sequence[int]) -> tuple[tuple, tuple, tuple, tuple]:
    """(kernel_size, strides, padding, dilation) of the 2-D convolution that computes a 1-D one
    on images one pixel high (a first axis of kernel 1, stride 1, no padding, dilation 1; the
    input then takes a unit axis after the batch); a 2-D geometry unchanged. Padding: pairs."""
    lift = 2 - len(kernel_size)
    return ((1,) * lift + tuple(kernel_size), (1,) * lift + tuple(strides),
            ((0, 0),) * lift + tuple(tuple(p) for p in padding), (1,) * lift + tuple(dilation))


def dilated_size(kernel: int, dilation: int) -> int:
    """Extent of a kernel of ``kernel`` taps spaced ``dilation`` apart: (kernel - 1) * dilation + 1."""
    return (kernel - 1) * dilation + 1


def kernel_fits(size: int, kernel: int, pad: tuple[int, int], dilation: int) -> bool:
    """Whether the dilated kernel fits in the padded input along one axis (the output is non-empty)."""
    return size + pad[0] + pad[1] >= dilated_size(kernel, dilation)


def output_size(size: int, kernel: int, stride: int, pad: tuple[int, int], dilation: int) -> int:
    """Output length along one axis; negative when the dilated kernel exceeds the padded input."""
    return (size + pad[0] + pad[1] - dilated_size(kernel, dilation)) // stride + 1


def conv_output_shape(x_shape: Sequence[int], kernel_size: Sequence[int], strides: Sequence[int],
                      padding: Sequence[tuple[int, int]], dilation: Sequence[int],
                      out_channels: int) -> tuple[int, ...]:
    """Shape of the channels-last result of a convolution of an (N, *spatial, Cin) input
    (an axis the kernel does not fit is empty, as in `lax.conv_general_dilated`)."""
    spatial = tuple(max(0, output_size(s, k, st, p, d)) for s, k, st, p, d in
                    zip(x_shape[1:-1], kernel_size, strides, padding, dilation))
    return (x_shape[0],) + spatial + (out_channels,)
