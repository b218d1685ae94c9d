"""`SparseFilter`: an unstructured-sparse convolution filter in CSR form.

Layout. A dense filter in Flax/HWIO layout has shape ``kernel_size + (Cin, Cout)``.
Its sparse form is CSR over *output channels*: row ``r`` lists the nonzeros
of output channel ``r``; a column index encodes the filter tap ``(kh, kw, ci)``
as ``(kh * KW + kw) * Cin + ci`` (for 1-D filters: ``kw * Cin + ci``), i.e. the
row-major flattening of ``kernel[..., :, r]``. Within a row, column indices are
strictly increasing.

Leaves (traced under jit/vmap/grad): ``data`` (nnz,) float32/bfloat16/float16,
``indices`` (nnz,) int32, ``indptr`` (Cout + 1,) int32. Static metadata:
``kernel_size``, ``in_channels``, ``out_channels``.

Validation. Every invariant is checked with NumPy wherever the arrays are
concrete: at construction, in `from_dense`, `load_dlmc` and `astype`, and when a
concrete filter reaches `jaxsparse.sparse_conv`. Filters rebuilt from traced
leaves (inside jit, vmap, grad) are assumed valid; the native kernels still
never read out of bounds (the CPU kernel checks the structure on every call and
raises; the CUDA kernels, which cannot raise without a sync, write NaN to the
output channels of malformed rows).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


class SparseFilterError(ValueError):
    """A sparse filter violates one of the format's invariants."""


def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


@jax.tree_util.register_pytree_node_class
class SparseFilter:
    """A convolution filter with unstructured sparsity, stored as CSR over output channels."""

    def __init__(self, data, indices, indptr, *, kernel_size: Sequence[int], in_channels: int,
                 out_channels: int, allow_nonfinite: bool = False, validate: bool = True):
        self.data = data
        self.indices = indices
        self.indptr = indptr
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self._validated = False
        if validate:
            self.validate(allow_nonfinite=allow_nonfinite)

    # ---- pytree -------------------------------------------------------------
    def tree_flatten(self):
        return (self.data, self.indices, self.indptr), (self.kernel_size, self.in_channels,
                                                        self.out_channels)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        kernel_size, in_channels, out_channels = aux
        obj = cls.__new__(cls)
        obj.data, obj.indices, obj.indptr = leaves
        obj.kernel_size, obj.in_channels, obj.out_channels = kernel_size, in_channels, out_channels
        obj._validated = False
        return obj

    # ---- properties ---------------------------------------------------------
    @property
    def nnz(self) -> int:
        return int(self.data.shape[-1])

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (1 or 2)."""
        return len(self.kernel_size)

    @property
    def taps(self) -> int:
        """Number of columns: prod(kernel_size) * in_channels."""
        return math.prod(self.kernel_size) * self.in_channels

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the equivalent dense HWIO kernel."""
        return self.kernel_size + (self.in_channels, self.out_channels)

    @property
    def density(self) -> float:
        return self.nnz / float(self.taps * self.out_channels)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def __repr__(self):
        return (f"SparseFilter(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype}, "
                f"sparsity={self.sparsity:.3f})")

    # ---- validation ---------------------------------------------------------
    def is_concrete(self) -> bool:
        return all(_is_concrete(a) for a in (self.data, self.indices, self.indptr))

    def validate(self, *, allow_nonfinite: bool = False) -> "SparseFilter":
        """Checks every invariant; raises `SparseFilterError` naming the first problem."""
        if len(self.kernel_size) not in (1, 2) or any(k < 1 for k in self.kernel_size):
            raise SparseFilterError(f"kernel_size must be 1 or 2 positive ints, got {self.kernel_size}")
        if self.in_channels < 1 or self.out_channels < 1:
            raise SparseFilterError(
                f"in_channels and out_channels must be positive, got {self.in_channels}, {self.out_channels}")
        if self.taps > np.iinfo(np.int32).max:
            raise SparseFilterError("prod(kernel_size) * in_channels does not fit in int32")
        for name in ("data", "indices", "indptr"):
            if np.ndim(getattr(self, name)) != 1:
                raise SparseFilterError(f"{name} must be 1-D, got shape {np.shape(getattr(self, name))}")
        if np.dtype(self.data.dtype) not in SUPPORTED_DTYPES:
            raise SparseFilterError(
                f"data must be float32, bfloat16 or float16, got {np.dtype(self.data.dtype)}")
        for name in ("indices", "indptr"):
            if np.dtype(getattr(self, name).dtype) != np.int32:
                raise SparseFilterError(f"{name} must be int32, got {np.dtype(getattr(self, name).dtype)}")
        if self.indices.shape[0] != self.data.shape[0]:
            raise SparseFilterError(
                f"indices ({self.indices.shape[0]}) and data ({self.data.shape[0]}) differ in length")
        if self.indptr.shape[0] != self.out_channels + 1:
            raise SparseFilterError(
                f"indptr must have out_channels + 1 = {self.out_channels + 1} entries, got {self.indptr.shape[0]}")
        if not self.is_concrete():
            return self  # traced: assumed valid (see module docstring)
        indptr = np.asarray(self.indptr)
        indices = np.asarray(self.indices)
        if indptr[0] != 0:
            raise SparseFilterError(f"indptr must start at 0, got {indptr[0]}")
        if np.any(np.diff(indptr) < 0):
            row = int(np.argmax(np.diff(indptr) < 0))
            raise SparseFilterError(f"indptr must be non-decreasing (decreases after row {row})")
        if indptr[-1] != indices.shape[0]:
            raise SparseFilterError(
                f"indptr[-1] = {indptr[-1]} must equal the number of nonzeros {indices.shape[0]}")
        if indices.size:
            bad = (indices < 0) | (indices >= self.taps)
            if bad.any():
                raise SparseFilterError(
                    f"column index {int(indices[np.argmax(bad)])} out of range [0, {self.taps})")
            rows = np.repeat(np.arange(self.out_channels), np.diff(indptr))
            same_row = rows[1:] == rows[:-1]
            if np.any(same_row & (indices[1:] <= indices[:-1])):
                raise SparseFilterError("column indices must be strictly increasing within each row")
        if not allow_nonfinite and not np.all(np.isfinite(np.asarray(self.data, np.float32))):
            raise SparseFilterError("data holds non-finite values (pass allow_nonfinite=True to accept)")
        self._validated = True
        return self

    # ---- conversions --------------------------------------------------------
    @classmethod
    def from_dense(cls, kernel, sparsity: float | None = None, *, dtype=None) -> "SparseFilter":
        """Builds a filter from a dense HWIO (or WIO) kernel.

        With ``sparsity=None`` the exact zeros of an already-pruned kernel are
        dropped. With a float in [0, 1], the kernel is magnitude-pruned first,
        keeping the ``round((1 - sparsity) * size)`` largest |w| of this layer
        (ties broken by position).
        """
        if not _is_concrete(kernel):
            raise TypeError("from_dense needs a concrete kernel (the number of nonzeros must be static); "
                            "build the filter outside jit")
        kernel = np.asarray(kernel)
        if kernel.ndim not in (3, 4):
            raise ValueError(f"kernel must be HWIO (rank 4) or WIO (rank 3), got shape {kernel.shape}")
        dtype = np.dtype(kernel.dtype if dtype is None else dtype)
        if dtype not in SUPPORTED_DTYPES:
            raise SparseFilterError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        if not np.all(np.isfinite(kernel.astype(np.float32))):
            raise SparseFilterError("kernel holds non-finite values")
        kernel_size, cin, cout = kernel.shape[:-2], kernel.shape[-2], kernel.shape[-1]
        rows = kernel.reshape(-1, cout).T  # (Cout, taps), columns in (kh, kw, ci) order
        if sparsity is None:
            mask = rows != 0
        else:
            mask = magnitude_mask(rows, sparsity)
        counts = mask.sum(axis=1)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        _, cols = np.nonzero(mask)  # row-major: rows ascending, columns ascending
        data = rows[mask].astype(dtype)
        return cls(jnp.asarray(data), jnp.asarray(cols.astype(np.int32)), jnp.asarray(indptr),
                   kernel_size=kernel_size, in_channels=cin, out_channels=cout)

    def todense(self) -> jax.Array:
        """The equivalent dense kernel, shape ``kernel_size + (Cin, Cout)`` (works under jit)."""
        from jaxsparse.reference import densify
        return densify(self.data, self.indices, self.indptr, self.kernel_size, self.in_channels)

    def astype(self, dtype) -> "SparseFilter":
        return self.with_data(self.data.astype(dtype))

    def with_data(self, data) -> "SparseFilter":
        """The same sparsity structure with new nonzero values."""
        if data.shape != self.data.shape:
            raise SparseFilterError(f"new data has shape {data.shape}, expected {self.data.shape}")
        if self.is_concrete() and _is_concrete(data):
            return SparseFilter(data, self.indices, self.indptr, kernel_size=self.kernel_size,
                                in_channels=self.in_channels, out_channels=self.out_channels)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(self),
                                            (data, self.indices, self.indptr))


def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """Boolean mask keeping the ``round((1 - sparsity) * size)`` largest |w|."""
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    flat = np.abs(np.asarray(weights, np.float32)).ravel()
    keep = int(round((1.0 - float(sparsity)) * flat.size))
    mask = np.zeros(flat.size, bool)
    if keep > 0:
        order = np.argsort(-flat, kind="stable")
        mask[order[:keep]] = True
    return mask.reshape(np.shape(weights))


def random_filter(key_or_seed, kernel_size: Sequence[int], in_channels: int, out_channels: int,
                  sparsity: float, *, dtype=np.float32, pattern: str = "magnitude") -> SparseFilter:
    """A random filter for tests and benchmarks (He-scaled normal weights).

    ``pattern='magnitude'`` prunes random dense weights by magnitude (per layer);
    ``'uniform'`` keeps the same number of nonzeros in every row (even rows).
    """
    rng = np.random.default_rng(key_or_seed)
    shape = tuple(kernel_size) + (in_channels, out_channels)
    fan_in = math.prod(kernel_size) * in_channels
    dense = rng.standard_normal(shape).astype(np.float32) * np.sqrt(2.0 / max(1.0, fan_in * (1 - sparsity)))
    if pattern == "magnitude":
        return SparseFilter.from_dense(dense, sparsity, dtype=dtype)
    if pattern == "uniform":
        per_row = int(round((1 - sparsity) * fan_in))
        cols = np.sort(np.stack([rng.choice(fan_in, size=per_row, replace=False)
                                 for _ in range(out_channels)]), axis=1) if per_row else \
            np.zeros((out_channels, 0), np.int64)
        data = rng.standard_normal(cols.shape) * np.sqrt(2.0 / max(1, per_row))
        indptr = np.arange(out_channels + 1, dtype=np.int32) * per_row
        return SparseFilter(jnp.asarray(data.ravel().astype(dtype)),
                            jnp.asarray(cols.ravel().astype(np.int32)), jnp.asarray(indptr),
                            kernel_size=kernel_size, in_channels=in_channels, out_channels=out_channels)
    raise ValueError(f"unknown pattern {pattern!r}: use 'magnitude' or 'uniform'")
