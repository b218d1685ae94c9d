"""`SparseFilter`: an unstructured-sparse convolution filter in CSR form.

Layout. A dense filter in Flax/HWIO layout has shape ``kernel_size + (Cin, Cout)``.
Its sparse form is CSR over *output channels*: row ``r`` lists the nonzeros
of output channel ``r``; a column index encodes the filter tap ``(kh, kw, ci)``
as ``(kh * KW + kw) * Cin + ci`` (for 1-D filters: ``kw * Cin + ci``), i.e. the
row-major flattening of ``kernel[..., :, r]``. Within a row, column indices are
strictly increasing.

Leaves (traced under jit/vmap/grad): ``data`` (nnz,) float32/bfloat16/float16,
``indices`` (nnz,) int32, ``indptr`` (Cout + 1,) int32. Static metadata (the
pytree's aux data, kept by every pytree operation: ``jax.device_put``,
``tree_map``, jit outputs): ``kernel_size``, ``in_channels``, ``out_channels``
(either channel count may be 0, as in lax) and ``allow_nonfinite``.

Leaves given as Python lists, tuples or scalars are converted: numbers to
float32 ``data`` (as ``jnp.asarray`` would; in `with_data`, to the filter's
own dtype), integers to int32 ``indices`` / ``indptr``. Arrays (NumPy, JAX) keep their dtype: ``data`` must already be
float32, bfloat16 or float16 (float64 is refused, not rounded); integer
``indices`` / ``indptr`` of another integer dtype are converted to int32 when
every value fits. Ragged, non-numeric, boolean or floating-point indices (even
``2.0``; ``1.5`` is never truncated to 1) raise `SparseFilterError`.

Validation. Every invariant is checked with NumPy wherever the arrays are
concrete: at construction, in `from_dense`, `load_dlmc` and `astype`, and when a
concrete filter reaches `jaxsparse.sparse_conv`. Non-finite ``data`` is an error
unless the filter was built with ``allow_nonfinite=True``; the flag is static
metadata, so a filter rebuilt by a pytree operation, `astype` or `with_data`
keeps it (and eager calls agree with jit, which never looks at values). As
metadata, the flag is part of the filter's tree structure: filters differing
only in ``allow_nonfinite`` do not share a tree structure (no ``tree_map`` over
both, no ``lax.cond`` choosing between them).
Filters rebuilt from traced leaves (inside jit, vmap, grad) are assumed valid;
the native kernels still never read out of bounds (the CPU kernel checks the
structure on every call and raises; the CUDA kernels, which cannot raise
without a sync, write NaN to the output channels of malformed rows).

Non-finite inputs. A stored entry takes part in the convolution even when its
value is 0.0; a pruned position is absent (a structural zero). So a NaN input
makes an output NaN only where a stored entry meets it, and ``0 * Inf`` happens
only for an explicitly stored 0.0: see `jaxsparse.sparse_conv`.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.geometry import as_static_int, as_static_ints

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


class SparseFilterError(ValueError):
    """A sparse filter violates one of the format's invariants."""


def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


_INT32 = np.iinfo(np.int32)


def _leaf(value, name: str, dtype=np.float32):
    """``value`` as a leaf: arrays keep their dtype (integer index arrays become int32
    when every value fits); Python lists, tuples and scalars are converted (``data``
    to ``dtype``)."""
    if isinstance(value, (np.ndarray, jax.Array)):
        return value if name == "data" else _int32_indices(value, name)
    return _from_python(value, name, dtype)


def _int32_indices(array, name: str):
    dtype = np.dtype(array.dtype)
    if dtype == np.int32 or dtype.kind not in "iu" or not _is_concrete(array):
        return array  # int32 already, or refused by validate (float, bool, traced int64)
    values = np.asarray(array)
    if values.size and (values.min() < _INT32.min or values.max() > _INT32.max):
        bad = values[(values < _INT32.min) | (values > _INT32.max)][0]
        raise SparseFilterError(f"{name} value {bad} does not fit in int32")
    return array.astype(np.int32)


def _from_python(value, name: str, dtype=np.float32) -> np.ndarray:
    """A Python list/tuple/scalar as a NumPy leaf: ``dtype`` (float32) data, int32 indices."""
    kinds, what = ("iuf", "real numbers") if name == "data" else ("iu", "integers")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:  # ragged nesting
        raise SparseFilterError(f"{name} must be a 1-D array of {what}, got {_short(value)}: {error}") from None
    if array.size == 0:
        return array.astype(dtype if name == "data" else np.int32)
    if array.dtype.kind not in kinds:
        raise SparseFilterError(f"{name} must be a 1-D array of {what}, got {_short(value)} "
                                f"({array.dtype} values)")
    if name != "data":
        return _int32_indices(array, name)
    with np.errstate(over="ignore"):  # an overflow to Inf is reported by validate
        return array.astype(dtype)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@jax.tree_util.register_pytree_node_class
class SparseFilter:
    """A convolution filter with unstructured sparsity, stored as CSR over output channels.

    Args:
      data, indices, indptr: the CSR arrays (module docstring); Python lists
        and tuples are converted, impossible conversions raise.
      kernel_size, in_channels, out_channels: static ints.
      allow_nonfinite: accept NaN/Inf in ``data``; static metadata, kept by
        pytree operations, `astype` and `with_data`. Being pytree metadata (aux
        data), it is part of the tree structure: two filters that differ only in
        the flag have different tree structures, so they cannot be combined by
        ``jax.tree_util.tree_map``, returned by the two branches of
        ``lax.cond`` / ``lax.switch`` or stacked for ``vmap``; build both with
        the same flag.
      validate: check every invariant now (concrete arrays only).

    Non-finite values in `jaxsparse.sparse_conv`: only the *stored* entries
    take part. An output is NaN or +-Inf only where a stored entry meets a
    non-finite input in its window (an explicitly stored 0.0 counts: ``0 * NaN``
    and ``0 * Inf`` give NaN), or where a stored weight or the bias is
    non-finite. Pruned positions are structural zeros that multiply nothing, so
    the dense convolution with `todense` gives NaN at some outputs where the
    sparse one is finite.
    """

    def __init__(self, data, indices, indptr, *, kernel_size: Sequence[int], in_channels: int,
                 out_channels: int, allow_nonfinite: bool = False, validate: bool = True):
        self.data = _leaf(data, "data")
        self.indices = _leaf(indices, "indices")
        self.indptr = _leaf(indptr, "indptr")
        self.kernel_size = as_static_ints(kernel_size, "kernel_size")
        self.in_channels = as_static_int(in_channels, "in_channels")
        self.out_channels = as_static_int(out_channels, "out_channels")
        self.allow_nonfinite = bool(allow_nonfinite)
        self._validated = False
        if validate:
            self.validate()

    # ---- pytree -------------------------------------------------------------
    def tree_flatten(self):
        return (self.data, self.indices, self.indptr), (self.kernel_size, self.in_channels,
                                                        self.out_channels, self.allow_nonfinite)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        obj = cls.__new__(cls)
        obj.data, obj.indices, obj.indptr = leaves
        obj.kernel_size, obj.in_channels, obj.out_channels, obj.allow_nonfinite = aux
        obj._validated = False
        return obj

    def _rebuilt(self, data, indices, indptr, *, validate: bool) -> "SparseFilter":
        """A filter with this one's metadata (allow_nonfinite included) and new leaves."""
        return SparseFilter(data, indices, indptr, kernel_size=self.kernel_size,
                            in_channels=self.in_channels, out_channels=self.out_channels,
                            allow_nonfinite=self.allow_nonfinite, validate=validate)

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
        """nnz / (taps * out_channels); 0.0 for a filter with no positions (a zero channel count)."""
        positions = self.taps * self.out_channels
        return self.nnz / float(positions) if positions else 0.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def __repr__(self):
        return (f"SparseFilter(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype}, "
                f"sparsity={self.sparsity:.3f})")

    # ---- validation ---------------------------------------------------------
    def is_concrete(self) -> bool:
        return all(_is_concrete(a) for a in (self.data, self.indices, self.indptr))

    def validate(self, *, allow_nonfinite: bool | None = None) -> "SparseFilter":
        """Checks every invariant; raises `SparseFilterError` naming the first problem.

        ``allow_nonfinite``: None (default) uses the filter's own flag; a bool
        overrides it for this check only. The filter counts as validated (so
        `jaxsparse.sparse_conv` does not check it again eagerly) only after a
        check at least as strict as its own flag: ``validate(allow_nonfinite=True)``
        on a filter without the flag passes NaN here, and a later eager call still
        refuses it."""
        if allow_nonfinite is None:
            allow_nonfinite = self.allow_nonfinite
        if len(self.kernel_size) not in (1, 2) or any(k < 1 for k in self.kernel_size):
            raise SparseFilterError(f"kernel_size must be 1 or 2 positive ints, got {self.kernel_size}")
        if self.in_channels < 0 or self.out_channels < 0:
            raise SparseFilterError(
                f"in_channels and out_channels must be non-negative, got {self.in_channels}, {self.out_channels}")
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
        if self.allow_nonfinite or not allow_nonfinite:
            # a check at least as strict as the filter's own flag: later eager calls may skip it
            # (a looser override, allow_nonfinite=True on a filter without the flag, is not recorded)
            self._validated = True
        return self

    # ---- conversions --------------------------------------------------------
    @classmethod
    def from_dense(cls, kernel, sparsity: float | None = None, *, dtype=None,
                   allow_nonfinite: bool = False) -> "SparseFilter":
        """Builds a filter from a dense HWIO (or WIO) kernel.

        With ``sparsity=None`` the exact zeros of an already-pruned kernel are
        dropped (NaN is not zero: it is kept). With a float in [0, 1], the kernel
        is magnitude-pruned first (`magnitude_mask`), keeping the
        ``round((1 - sparsity) * size)`` largest |w| of this layer (ties broken
        by position); a NaN ranks below every number, so it is pruned first,
        and +-Inf ranks above every finite value.

        Non-finite values are checked *after* pruning and after the conversion
        to ``dtype`` (where a large value may overflow to Inf): a NaN or Inf that
        pruning removes is no error (it becomes a structural zero, never a kept
        finite value); one that is kept raises `SparseFilterError` naming its
        position, unless ``allow_nonfinite=True``, which keeps it as stored
        data and sets the filter's ``allow_nonfinite`` flag.
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
        kernel_size, cin, cout = kernel.shape[:-2], kernel.shape[-2], kernel.shape[-1]
        rows = kernel.reshape(math.prod(kernel.shape[:-1]), cout).T  # (Cout, taps), (kh, kw, ci) order
        mask = rows != 0 if sparsity is None else magnitude_mask(rows, sparsity)
        counts = mask.sum(axis=1)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        out_channel, cols = np.nonzero(mask)  # row-major: rows ascending, columns ascending
        with np.errstate(over="ignore"):  # an overflow to Inf is reported below
            data = rows[mask].astype(dtype)
        if not allow_nonfinite:
            _check_kept_finite(data, out_channel, cols, kernel.shape)
        return cls(jnp.asarray(data), jnp.asarray(cols.astype(np.int32)), jnp.asarray(indptr),
                   kernel_size=kernel_size, in_channels=cin, out_channels=cout,
                   allow_nonfinite=allow_nonfinite)

    def todense(self) -> jax.Array:
        """The equivalent dense kernel, shape ``kernel_size + (Cin, Cout)`` (works under jit)."""
        from jaxsparse.reference import densify
        return densify(self.data, self.indices, self.indptr, self.kernel_size, self.in_channels)

    def astype(self, dtype) -> "SparseFilter":
        """The same filter with ``data`` in ``dtype`` (``allow_nonfinite`` kept)."""
        return self.with_data(self.data.astype(dtype))

    def with_data(self, data) -> "SparseFilter":
        """The same sparsity structure (and ``allow_nonfinite`` flag) with new nonzero values.

        An array (NumPy, JAX) keeps its dtype, which must be a supported one; a Python
        list, tuple or scalar is converted to this filter's dtype (rounded once, as
        ``np.asarray(data, self.dtype)``; a value too large for a half type becomes
        Inf, refused as non-finite unless the filter allows it)."""
        data = _leaf(data, "data", dtype=self.dtype)
        if data.shape != self.data.shape:
            raise SparseFilterError(f"new data has shape {data.shape}, expected {self.data.shape}")
        concrete = self.is_concrete() and _is_concrete(data)
        return self._rebuilt(data, self.indices, self.indptr, validate=concrete)


def _check_kept_finite(data: np.ndarray, out_channel: np.ndarray, cols: np.ndarray, shape) -> None:
    """Raises naming the first kept non-finite value and its position in the dense kernel."""
    bad = ~np.isfinite(np.asarray(data, np.float32))
    if not bad.any():
        return
    flat = np.where(bad, cols.astype(np.int64) * shape[-1] + out_channel, np.iinfo(np.int64).max)
    first = int(np.argmin(flat))  # the first in the kernel's own (row-major HWIO) order
    position = np.unravel_index(int(flat[first]), shape)
    raise SparseFilterError(
        f"kernel holds {int(bad.sum())} non-finite value(s) that pruning keeps (first: "
        f"kernel{tuple(int(i) for i in position)} = {data[first]} as {data.dtype}); prune them, "
        "or pass allow_nonfinite=True to store them")


def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """Boolean mask keeping the ``round((1 - sparsity) * size)`` largest |w|.

    Ties are broken by position (the first is kept). NaN ranks below every
    number, 0 included (NaN weights are pruned first, never kept ahead of a
    number); +-Inf ranks above every finite value."""
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    magnitude = np.abs(np.asarray(weights, np.float32)).ravel()
    rank_key = np.where(np.isnan(magnitude), -1.0, magnitude)
    keep = int(round((1.0 - float(sparsity)) * magnitude.size))
    mask = np.zeros(magnitude.size, bool)
    if keep > 0:
        order = np.argsort(-rank_key, kind="stable")
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
