"""CSR helpers shared by the format, the primitives and their rules (each fact once)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def row_ids(indptr, nnz: int | None = None):
    """The output channel of every nonzero: ``repeat(arange(Cout), diff(indptr))``.

    NumPy in, NumPy out; otherwise (jax arrays, tracers) a traceable jnp
    result with the static length ``nnz``."""
    if isinstance(indptr, np.ndarray):
        return np.repeat(np.arange(indptr.shape[0] - 1, dtype=np.int32), np.diff(indptr))
    if nnz is None:
        raise ValueError("row_ids of a jax array needs the static nnz")
    return jnp.repeat(jnp.arange(indptr.shape[0] - 1, dtype=jnp.int32), jnp.diff(indptr),
                      total_repeat_length=nnz)


def block_diagonal(indices, indptr, in_channels: int, *, shift_channels: bool):
    """Merges G stacked CSR structures (leading axis G) into one of G * Cout rows.

    With ``shift_channels``, group g's columns move to input channels
    [g * Cin, (g + 1) * Cin) of an input whose G slices lie side by side along
    channels (a block-diagonal filter); otherwise every group reads the same
    channels. Returns ``(columns (G * nnz,), indptr (G * Cout + 1,))``, int32.
    """
    size, nnz = indices.shape
    groups = jnp.arange(size, dtype=jnp.int32)[:, None]
    if shift_channels:
        tap, channel = indices // in_channels, indices % in_channels
        indices = tap * (size * in_channels) + groups * in_channels + channel
    merged_indptr = jnp.concatenate([(indptr[:, :-1] + groups * nnz).reshape(-1),
                                     jnp.array([size * nnz], jnp.int32)])
    return indices.reshape(-1).astype(jnp.int32), merged_indptr.astype(jnp.int32)


def side_by_side(a, axis: int):
    """Moves the mapped ``axis`` of ``a`` next to the channels and merges them:
    (..., C) with G along ``axis`` -> (..., G * C), the layout `block_diagonal` reads."""
    a = jnp.moveaxis(a, axis, -2)
    return a.reshape(a.shape[:-2] + (a.shape[-2] * a.shape[-1],))


def stacked(a, axis, size: int):
    """``a`` with its mapped axis first, broadcast to ``size`` when it is not mapped."""
    return jnp.broadcast_to(a, (size,) + a.shape) if axis is None else jnp.moveaxis(a, axis, 0)


def transpose_structure(data, indices, indptr, kernel_size, in_channels):
    """The CSR of the transposed, spatially flipped filter (traceable).

    Row ``ci`` of the result holds, for every nonzero (co, kh, kw, ci) of the
    original, the column ((KH-1-kh) * KW + (KW-1-kw)) * Cout + co.
    """
    kh_size, kw_size = kernel_size
    cout = indptr.shape[0] - 1
    rows = row_ids(indptr, indices.shape[0])
    ci = indices % in_channels
    tap = indices // in_channels
    kh, kw = tap // kw_size, tap % kw_size
    new_cols = ((kh_size - 1 - kh) * kw_size + (kw_size - 1 - kw)) * cout + rows
    order = jnp.argsort(new_cols, stable=True)
    order = order[jnp.argsort(ci[order], stable=True)]  # rows ascending, columns ascending within
    counts = jnp.bincount(ci, length=in_channels).astype(jnp.int32)
    new_indptr = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])
    return data[order], new_cols[order].astype(jnp.int32), new_indptr
