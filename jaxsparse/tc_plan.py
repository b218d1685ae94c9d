"""The per-filter plan of a tensor-core sparse convolution (host side, NumPy).

A tensor-core kernel multiplies dense tiles. For an unstructured-sparse filter
it takes the output channels ``R`` at a time (a *group*: R = 16 rows of the
mma ``A`` operand for bf16/f16 ``m16n8k16`` and TF32 ``m16n8k8``; R = 8 is
allowed for a kernel that puts the weights in the ``n = 8`` operand), gathers
only the *union* of the group's nonzero columns from the implicit-GEMM input,
and multiplies it with the group's dense ``R x |union|`` weight tile, zero where
a row lacks a union column. The work is proportional to the union fraction
``u = sum_g |union_g| / (groups * taps)``, so the rows are first permuted to
put output channels with overlapping supports in the same group
(`greedy_row_groups`). A `TensorCorePlan` is computed once per sparsity
pattern with `tensor_core_plan` and holds:

``channels`` (G, R) int32
    Tile row ``i`` of group ``g`` computes output channel ``channels[g, i]``.
    Only the last group may be partial; its missing rows hold ``-1``: their
    tile rows are zero and the kernel must not store them. ``plan.perm``
    (``channels.ravel()[:Cout]``) is the output-channel permutation.
``columns`` (K_total,) int32, ``col_offsets`` (G + 1,) int64
    Group ``g``'s columns are ``columns[col_offsets[g]:col_offsets[g + 1]]``:
    its union columns (filter column indices ``c = (kh * KW + kw) * Cin + ci``),
    ``union_sizes[g]`` of them, then padding up to ``k_padded[g]``, the next
    multiple of ``k_multiple`` (the mma k: 16 for bf16/f16, 8 for TF32).
    **Padding repeats the group's last union column** with zero weights, so the
    kernel reads only valid input columns and needs no branch or sentinel. A
    group whose rows are all empty has ``k_padded = 0`` (no columns, an empty
    tile: its outputs are the bias alone). The union columns are in *block
    order*: blocks ``(tap, ci // BANK_BLOCK)`` ascending, so that a kernel
    streaming the columns in chunks of whole blocks meets each chunk's columns
    together; within a block they are ordered so that each run of ``k_multiple
    / 2`` positions (one shared-memory phase of the mma's B operand) holds
    distinct ``ci`` residues modulo ``k_multiple / 2`` where the block allows it
    (`_spread_banks`): the chunked kernel keeps channel ``ci`` of a chunk in a
    row whose bank quad follows ``ci`` modulo 8 (modulo 4 for TF32 words), so
    gathered rows of distinct residues do not conflict.
``packed`` weights (``packed_size``,), built by `TensorCorePlan.pack`
    Group ``g``'s tile of ``R x k_padded[g]`` weights starts at
    ``tile_offsets[g] = R * col_offsets[g]``; the weight of tile row ``i`` for
    column ``columns[col_offsets[g] + t]`` is at ``tile_offsets[g] +
    tile_offset(R, k_multiple, i, t, k_padded[g])``. With ``R = 16`` and
    ``k_multiple`` 16 or 8 that is the mma's A-fragment order (`tile_offset`):
    a k-step's 16 x k weights are 32 lanes x 4 registers, lane-major, so a
    lane's A fragment is one 16-byte load and a warp's one 512-byte run;
    other shapes are row-major.
``positions`` (nnz,) int32
    Where CSR nonzero ``j`` (``filter.data[j]``) lands in ``packed``; every
    other slot is a zero fill. Packing is the scatter
    ``jnp.zeros(packed_size).at[positions].set(filter.data)``, computed as the
    gather of `TensorCorePlan.gather_index` (its inverse): traceable, and its
    gradient is the gather ``cotangent[positions]``.

Non-finite inputs. The union multiplies zero-filled weights with every union
column, so a NaN/Inf input in a union column makes the outputs of the whole
group NaN (``0 * NaN``), including channels that never store that column;
this differs from `jaxsparse.sparse_conv`, where only stored entries meet the
input (the union behaves like a dense convolution within the group). The padding column
adds no exposure beyond the union (it repeats a union column).

A plan is tied to its pattern: it keeps the filter's ``indices`` / ``indptr``
and their `pattern_fingerprint`. `TensorCorePlan.check` raises
`TensorCorePlanError` for a concrete filter of another pattern;
`TensorCorePlan.pack` of a traced filter compares the arrays in JAX and
returns NaN-poisoned tiles on mismatch, never silently wrong weights.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.csr import row_ids
from jaxsparse.format import SparseFilter

_INT32_MAX = np.iinfo(np.int32).max
_INT64_MAX = np.iinfo(np.int64).max

# The chunked kernel streams each tap's channels in chunks of 4096 / NP channels (NP = 64, 32
# or 16 pixels: 64, 128 or 256 channels), all whole blocks of this size: a plan in block order
# meets every chunk's columns together whatever NP the launcher picks.
BANK_BLOCK = 64
# Stored with saved plans; files without it hold row-major tiles (converted on load).
TILE_LAYOUT = "mma-fragment"


def tile_offset(rows: int, k_multiple: int, row, t, k_pad):
    """Offset of tile row ``row``'s weight at column position ``t`` within a group's tile of
    ``k_pad`` columns (ints or NumPy arrays). ``rows`` 16 with ``k_multiple`` 16 (bf16/f16
    m16n8k16): k-step ``t // 16`` holds 256 weights as 32 lanes x 4 registers x 2 weights,
    lane-major, with lane ``(row % 8) * 4 + (t % 8) // 2``, register ``row // 8 + 2 * (t % 16
    // 8)`` and the lower k in the low half (the PTX A-fragment layout); ``k_multiple`` 8
    (TF32 m16n8k8): 128 weights, lane ``(row % 8) * 4 + t % 4``, register ``row // 8 + 2 *
    (t % 8 // 4)``. Any other shape: row-major ``row * k_pad + t``."""
    row, t = np.asarray(row, np.int64), np.asarray(t, np.int64)
    if rows == 16 and k_multiple in (8, 16):
        kk = t % k_multiple
        pair = 2 if k_multiple == 16 else 1  # weights per 32-bit register
        lane = (row % 8) * 4 + (kk % (4 * pair)) // pair
        reg = row // 8 + 2 * (kk // (4 * pair))
        return (t // k_multiple) * (16 * k_multiple) + (lane * 4 + reg) * pair + kk % pair
    return row * np.asarray(k_pad, np.int64) + t


def column_blocks(columns, in_channels: int) -> np.ndarray:
    """The block ``(tap, ci // BANK_BLOCK)`` of each column, as one ascending int."""
    columns = np.asarray(columns, np.int64)
    per_tap = -(-in_channels // BANK_BLOCK)
    return columns // in_channels * per_tap + columns % in_channels // BANK_BLOCK


def _spread_banks(columns: np.ndarray, starts: np.ndarray, in_channels: int, k_multiple: int) -> np.ndarray:
    """The order of the union columns the plan stores: ``order`` such that
    ``columns[order]`` keeps each group in block order (`column_blocks`) and, within a block,
    greedily gives each run of ``m = k_multiple / 2`` positions (a shared-memory phase of
    the kernel's B loads, aligned to the group's start) distinct residues ``ci % m``,
    taking the residue with the most columns left (so that the last runs of the block keep
    a choice). ``columns`` is sorted within each group ``[starts[g], starts[g + 1])``."""
    n = columns.shape[0]
    order = np.arange(n)
    m = k_multiple // 2
    if m not in (4, 8) or n == 0:
        return order
    group = np.repeat(np.arange(starts.shape[0] - 1), np.diff(starts))
    blocks = column_blocks(columns, in_channels)
    cuts = np.flatnonzero((np.diff(group) != 0) | (np.diff(blocks) != 0)) + 1
    residue = (columns % in_channels % m).tolist()
    for a, b in zip(np.r_[0, cuts].tolist(), np.r_[cuts, n].tolist()):
        if b - a == 1:
            continue
        left = [[] for _ in range(m)]
        for i in range(b - 1, a - 1, -1):
            left[residue[i]].append(i)        # popped from the end: ascending within a residue
        base = int(starts[group[a]])
        used = 0
        for p in range(base + (a - base) // m * m, a):  # residues already in this run
            used |= 1 << residue[order[p]]
        for p in range(a, b):
            if (p - base) % m == 0:
                used = 0
            free = [r for r in range(m) if left[r] and not used >> r & 1]
            r = max(free or [r for r in range(m) if left[r]], key=lambda r: len(left[r]))
            order[p] = left[r].pop()
            used |= 1 << r
    return order


class TensorCorePlanError(ValueError):
    """A filter does not match a tensor-core plan, or a plan cannot be built."""


def pattern_fingerprint(indices, indptr, kernel_size, in_channels: int, out_channels: int) -> str:
    """SHA-256 (hex) of a sparsity pattern: shape metadata and the int32 bytes of
    ``indices`` and ``indptr`` (values are not part of it)."""
    digest = hashlib.sha256(repr((tuple(int(k) for k in kernel_size), int(in_channels),
                                  int(out_channels))).encode())
    for array in (indices, indptr):
        array = np.ascontiguousarray(np.asarray(array), dtype="<i4")
        digest.update(str(array.shape[0]).encode() + b":")
        digest.update(array.tobytes())
    return digest.hexdigest()


def _filter_fingerprint(f: SparseFilter) -> str:
    return pattern_fingerprint(f.indices, f.indptr, f.kernel_size, f.in_channels, f.out_channels)


def greedy_row_groups(indptr: np.ndarray, indices: np.ndarray, taps: int, rows: int) -> np.ndarray:
    """Greedy clustering of CSR rows into groups of ``rows`` with small column unions.

    Each group starts with the longest unassigned row, then repeatedly adds the
    unassigned row that adds the fewest new columns to the group's union (ties:
    the larger overlap, then the lowest index). Returns ``(groups, rows)`` int32
    row ids in pick order, ``-1`` filling the last group.

    Cost: the rows are bitsets (``taps / 64`` words each); adding a row ANDs its
    new columns with the unassigned rows' bitsets, only over the words those
    columns touch, to update every candidate's overlap. That is at most
    ``Cout^2 / 2 * taps / 64`` word operations in all, independent of the
    density (a 2048 x 4608 pattern plans in about a second).
    """
    indptr = np.asarray(indptr, np.int64)
    indices = np.asarray(indices, np.int64)
    cout = indptr.shape[0] - 1
    groups = -(-cout // rows)
    out = np.full((groups, rows), -1, np.int32)
    if cout == 0:
        return out
    lengths = np.diff(indptr)
    words = max(1, -(-taps // 64))
    dense = np.zeros((cout, words * 64), bool)
    dense[row_ids(indptr), indices] = True
    bits = np.packbits(dense, axis=1, bitorder="little").view(np.uint64)  # (Cout, words)
    unassigned = np.arange(cout)
    for g in range(groups):
        cand = unassigned                     # this group's candidates (compacted once per group)
        cand_bits, cand_len = bits[cand], lengths[cand]
        cand_words = np.ascontiguousarray(cand_bits.T)  # (words, candidates)
        taken = np.zeros(cand.shape[0], bool)
        overlap = np.zeros(cand.shape[0], np.int64)
        union = np.zeros(words, np.uint64)
        for i in range(min(rows, cand.shape[0])):
            if i == 0:
                pick = int(np.argmax(cand_len))
            else:                             # fewest new columns, then largest overlap
                key = (cand_len - overlap) * (taps + 1) - overlap
                key[taken] = _INT64_MAX
                pick = int(np.argmin(key))
            taken[pick] = True
            out[g, i] = cand[pick]
            new = cand_bits[pick] & ~union
            union |= new
            touched = np.flatnonzero(new)
            if touched.size:                  # gather the touched words only when few
                sel = touched if 2 * touched.size < words else slice(None)
                overlap += np.bitwise_count(cand_words[sel] & new[sel, None]).sum(0, dtype=np.int32)
        unassigned = cand[~taken]
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class TensorCorePlan:
    """Grouping, union columns and packed-tile layout of one sparsity pattern.

    Build with `tensor_core_plan`; the module docstring describes every array.
    """

    rows: int
    k_multiple: int
    kernel_size: tuple[int, ...]
    in_channels: int
    out_channels: int
    channels: np.ndarray     # (G, R) int32, -1 = padding row
    columns: np.ndarray      # (K_total,) int32, padded union columns of every group
    col_offsets: np.ndarray  # (G + 1,) int64
    union_sizes: np.ndarray  # (G,) int64, before padding
    positions: np.ndarray    # (nnz,) int32: CSR nonzero -> flat index in packed
    indices: np.ndarray      # the pattern the plan was built for
    indptr: np.ndarray
    fingerprint: str
    window: int = 0          # rows clustered together; 0 = all rows (see tensor_core_plan)

    # ---- layout ---------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return self.channels.shape[0]

    @property
    def taps(self) -> int:
        return math.prod(self.kernel_size) * self.in_channels

    @property
    def nnz(self) -> int:
        return self.indices.shape[0]

    @property
    def k_padded(self) -> np.ndarray:
        """(G,) columns of each group's tile, a multiple of ``k_multiple``."""
        return np.diff(self.col_offsets)

    @property
    def tile_offsets(self) -> np.ndarray:
        """(G + 1,) start of each group's ``(R, k_padded[g])`` tile in ``packed``."""
        return self.rows * self.col_offsets

    @property
    def packed_size(self) -> int:
        return int(self.tile_offsets[-1])

    @functools.cached_property
    def gather_index(self) -> np.ndarray:
        """(packed_size,) int32: the CSR nonzero each packed slot holds, ``nnz`` for a zero
        fill (the inverse of ``positions``; `pack` gathers with it)."""
        index = np.full(self.packed_size, self.nnz, np.int32)
        index[self.positions] = np.arange(self.nnz, dtype=np.int32)
        return index

    @property
    def perm(self) -> np.ndarray:
        """(Cout,) output channels in tile-row order: ``perm[g * R + i] = channels[g, i]``."""
        return self.channels.ravel()[: self.out_channels]

    def stats(self) -> dict:
        """Union fraction ``u`` (before padding) and ``u_padded``, both over
        ``groups * taps``; ``u_random = 1 - (1 - density)^R``, the expected ``u``
        of a uniformly random pattern without clustering; ``fill`` = nnz / packed size."""
        positions = self.num_groups * self.taps
        density = self.nnz / (self.out_channels * self.taps) if self.out_channels * self.taps else 0.0
        return dict(rows=self.rows, k_multiple=self.k_multiple, groups=self.num_groups,
                    taps=self.taps, nnz=self.nnz, union_columns=int(self.union_sizes.sum()),
                    padded_columns=int(self.col_offsets[-1]), packed_size=self.packed_size,
                    u=float(self.union_sizes.sum() / positions) if positions else 0.0,
                    u_padded=float(self.col_offsets[-1] / positions) if positions else 0.0,
                    u_random=1.0 - (1.0 - density) ** self.rows,
                    fill=self.nnz / self.packed_size if self.packed_size else 0.0)

    # ---- tying a filter to the plan ------------------------------------------------
    def _check_static(self, f: SparseFilter) -> None:
        mine = (self.kernel_size, self.in_channels, self.out_channels, self.nnz)
        theirs = (f.kernel_size, f.in_channels, f.out_channels, f.nnz)
        if mine != theirs:
            raise TensorCorePlanError(
                f"filter (kernel_size, in_channels, out_channels, nnz) = {theirs} does not match the "
                f"plan's {mine}: build a plan for this filter with tensor_core_plan")

    def check(self, f: SparseFilter) -> "TensorCorePlan":
        """Raises `TensorCorePlanError` unless ``f`` has the plan's pattern.

        Shape metadata is always checked; the pattern (``indices``, ``indptr``)
        only when both are concrete (see `pack` for traced filters)."""
        self._check_static(f)
        if isinstance(f.indices, jax.core.Tracer) or isinstance(f.indptr, jax.core.Tracer):
            return self
        if _filter_fingerprint(f) != self.fingerprint:
            raise TensorCorePlanError(
                "filter sparsity pattern (indices/indptr) differs from the one the plan was built for "
                f"(fingerprint {_filter_fingerprint(f)[:12]} vs {self.fingerprint[:12]}): rebuild the plan")
        return self

    def pack(self, f: SparseFilter):
        """``(packed, valid)``: the filter's weights in the packed tiles, and a JAX bool.

        A concrete pattern is checked with `check` (raises on mismatch, ``valid``
        is True). A traced ``indices`` / ``indptr`` is compared with the plan's
        arrays elementwise in JAX; on mismatch ``valid`` is False and ``packed``
        is all NaN. Works under jit, vmap and ``grad`` (w.r.t.
        ``f.data``, the gradient is ``cotangent[positions]``)."""
        self.check(f)
        packed = self._pack_values(f.data)
        if not (isinstance(f.indices, jax.core.Tracer) or isinstance(f.indptr, jax.core.Tracer)):
            return packed, jnp.asarray(True)
        valid = (jnp.all(f.indices == jnp.asarray(self.indices)) &
                 jnp.all(f.indptr == jnp.asarray(self.indptr)))
        return jnp.where(valid, packed, jnp.asarray(jnp.nan, packed.dtype)), valid

    def _pack_values(self, data):
        """The packed tiles of CSR values ``data``. Forward: a gather from the values with a
        zero appended (one fused XLA kernel; a zero fill and a scatter took two, about 5 µs a
        call on the H200 at batch 1). Derivative: the unique-index scatter of the tangent
        (a custom JVP), so that reverse mode transposes it to the gather
        ``cotangent[positions]`` instead of a scatter-add of every zero slot into one.
        Costs an int32 constant of ``packed_size`` in the graph."""
        gather, positions, size = jnp.asarray(self.gather_index), jnp.asarray(self.positions), self.packed_size

        @jax.custom_jvp
        def pack(d):
            return jnp.concatenate([d, jnp.zeros((1,), d.dtype)]).at[gather].get(mode="promise_in_bounds")

        @pack.defjvp
        def pack_jvp(primals, tangents):
            (d,), (t,) = primals, tangents
            return pack(d), jnp.zeros(size, t.dtype).at[positions].set(t, unique_indices=True,
                                                                      mode="promise_in_bounds")

        return pack(data)

    def unpack(self, packed) -> jax.Array:
        """The dense ``kernel_size + (Cin, Cout)`` kernel of packed tiles (traceable):
        the inverse of `pack`, undoing the permutation and the tile layout; padding rows and columns
        are dropped. ``unpack(pack(f)[0])`` equals ``f.todense()`` exactly."""
        if tuple(packed.shape) != (self.packed_size,):
            raise TensorCorePlanError(f"packed has shape {packed.shape}, expected ({self.packed_size},)")
        k_pad = self.k_padded
        group = np.repeat(np.arange(self.num_groups), self.rows * k_pad)
        local = np.arange(self.packed_size) - self.tile_offsets[:-1][group]
        row, t = local // np.maximum(k_pad[group], 1), local % np.maximum(k_pad[group], 1)
        channel = self.channels[group, row].astype(np.int64)
        column = self.columns[self.col_offsets[:-1][group] + t].astype(np.int64)
        dump = self.taps * self.out_channels
        target = np.where((channel >= 0) & (t < self.union_sizes[group]),
                          column * self.out_channels + channel, dump)
        source = self.tile_offsets[:-1][group] + tile_offset(self.rows, self.k_multiple, row, t, k_pad[group])
        dense = jnp.zeros(dump + 1, packed.dtype).at[target].add(packed[source])
        return dense[:dump].reshape(self.kernel_size + (self.in_channels, self.out_channels))


def tensor_core_plan(f: SparseFilter, rows: int = 16, k_multiple: int = 16, window: int = 0) -> TensorCorePlan:
    """The `TensorCorePlan` of a concrete filter's pattern (host NumPy; values unused).

    ``rows``: output channels per group (16 for the mma A operand, or 8);
    ``k_multiple``: the mma k each group's columns are padded to (16 for
    bf16/f16 ``m16n8k16``, 8 for TF32 ``m16n8k8``); ``window``: 0 clusters all
    output channels together; a multiple of ``rows`` clusters each run of
    ``window`` consecutive channels on its own, so that groups
    ``[b * window / rows, (b + 1) * window / rows)`` hold exactly the channels
    ``[b * window, (b + 1) * window)``: a kernel block of those groups then writes
    one contiguous run of each pixel's channels (the chunked kernel, window 128),
    at the price of a larger union where the best partners lie in other windows."""
    rows, k_multiple, window = int(rows), int(k_multiple), int(window)
    if rows < 1 or k_multiple < 1:
        raise TensorCorePlanError(f"rows and k_multiple must be positive, got {rows}, {k_multiple}")
    if window < 0 or window % rows:
        raise TensorCorePlanError(f"window must be 0 or a positive multiple of rows = {rows}, got {window}")
    if isinstance(f.indices, jax.core.Tracer) or isinstance(f.indptr, jax.core.Tracer):
        raise TensorCorePlanError("tensor_core_plan needs a concrete sparsity pattern; build it outside jit")
    indices = np.asarray(f.indices, np.int32).copy()
    indptr = np.asarray(f.indptr, np.int32).copy()
    SparseFilter(np.zeros(indices.shape[0], np.float32), indices, indptr, kernel_size=f.kernel_size,
                 in_channels=f.in_channels, out_channels=f.out_channels)  # validates the structure
    cout, taps = f.out_channels, f.taps
    channels = _windowed_row_groups(indptr, indices, taps, rows, window)
    groups = channels.shape[0]

    # group and tile row of every output channel, then of every nonzero
    flat = channels.ravel()
    group_of, slot_of = np.empty(cout, np.int64), np.empty(cout, np.int64)
    real = flat >= 0
    group_of[flat[real]] = np.flatnonzero(real) // rows
    slot_of[flat[real]] = np.flatnonzero(real) % rows
    nz_row = row_ids(indptr)
    key = group_of[nz_row] * taps + indices          # (group, column) as one int
    in_union = np.zeros(groups * taps, bool)
    in_union[key] = True
    union_keys = np.flatnonzero(in_union)            # sorted by group, then column
    union_sizes = np.bincount(union_keys // taps, minlength=groups).astype(np.int64) if taps else \
        np.zeros(groups, np.int64)
    union_start = np.concatenate([[0], np.cumsum(union_sizes)])
    order = _spread_banks(union_keys % taps if taps else union_keys, union_start, f.in_channels, k_multiple)
    union_keys, new_index = union_keys[order], np.empty_like(order)
    new_index[order] = np.arange(order.shape[0])
    k_pad = -(-union_sizes // k_multiple) * k_multiple
    col_offsets = np.concatenate([[0], np.cumsum(k_pad)]).astype(np.int64)
    if rows * col_offsets[-1] > _INT32_MAX:
        raise TensorCorePlanError(f"packed tiles ({rows * col_offsets[-1]} values) exceed int32 positions")

    # padded column lists: position t of group g reads union column min(t, |union_g| - 1)
    col_group = np.repeat(np.arange(groups), k_pad)
    t = np.arange(col_offsets[-1]) - col_offsets[:-1][col_group]
    source = union_start[col_group] + np.minimum(t, union_sizes[col_group] - 1)
    columns = (union_keys[source] % taps).astype(np.int32) if taps else np.zeros(0, np.int32)

    # flat position of every nonzero: tile start + tile row * k_padded + rank in the union
    g = group_of[nz_row]
    rank = new_index[(np.cumsum(in_union) - 1)[key]] - union_start[g]
    positions = (rows * col_offsets[g] + tile_offset(rows, k_multiple, slot_of[nz_row], rank, k_pad[g])
                 ).astype(np.int32)
    return TensorCorePlan(rows=rows, k_multiple=k_multiple, kernel_size=f.kernel_size,
                          in_channels=f.in_channels, out_channels=cout, channels=channels,
                          columns=columns, col_offsets=col_offsets, union_sizes=union_sizes,
                          positions=positions, indices=indices, indptr=indptr,
                          fingerprint=_filter_fingerprint(f), window=window)


def _windowed_row_groups(indptr, indices, taps: int, rows: int, window: int) -> np.ndarray:
    """`greedy_row_groups` over all rows (``window`` 0), or over each run of ``window`` rows."""
    cout = indptr.shape[0] - 1
    if not window or window >= cout:
        return greedy_row_groups(indptr, indices, taps, rows)
    parts = []
    for lo in range(0, cout, window):
        hi = min(cout, lo + window)
        sub = greedy_row_groups(indptr[lo:hi + 1] - indptr[lo], indices[indptr[lo]:indptr[hi]], taps, rows)
        parts.append(np.where(sub >= 0, sub + lo, -1).astype(np.int32))
    return np.concatenate(parts)


# ---- saving a plan next to its filter ----------------------------------------------
_LAYOUT_ARRAYS = ("channels", "columns", "col_offsets", "union_sizes", "positions")
_PATTERN_ARRAYS = ("indices", "indptr")
_PLAN_ARRAYS = _LAYOUT_ARRAYS + _PATTERN_ARRAYS


def plan_arrays(plan: TensorCorePlan, *, pattern: bool = True) -> tuple[dict, dict]:
    """``(arrays, meta)`` that store a plan: its layout arrays (and, with ``pattern``, the
    pattern's ``indices``/``indptr``) and its sizes and fingerprint as JSON-able metadata.
    `plan_from_arrays` is the inverse (`save_plan`, `jaxsparse.nn.save`)."""
    names = _PLAN_ARRAYS if pattern else _LAYOUT_ARRAYS
    arrays = {name: np.ascontiguousarray(getattr(plan, name)) for name in names}
    meta = dict(rows=plan.rows, k_multiple=plan.k_multiple, kernel_size=list(plan.kernel_size),
                in_channels=plan.in_channels, out_channels=plan.out_channels, fingerprint=plan.fingerprint,
                window=plan.window, tile_layout=TILE_LAYOUT)
    return arrays, meta


def plan_from_arrays(arrays: dict, meta: dict, where) -> TensorCorePlan:
    """The plan stored by `plan_arrays`, checked: all arrays present, the pattern matching the
    stored fingerprint, and the layout's bounds (`TensorCorePlanError` naming ``where``)."""
    missing = set(_PLAN_ARRAYS) - set(arrays)
    if missing:
        raise TensorCorePlanError(f"{where} lacks the plan arrays {sorted(missing)}")
    arrays = {name: np.asarray(arrays[name]) for name in _PLAN_ARRAYS}
    kernel_size = tuple(int(k) for k in meta["kernel_size"])
    found = pattern_fingerprint(arrays["indices"], arrays["indptr"], kernel_size, int(meta["in_channels"]),
                                int(meta["out_channels"]))
    if found != meta["fingerprint"]:
        raise TensorCorePlanError(f"{where}: the stored pattern does not match the plan's fingerprint "
                                  "(a damaged or edited file)")
    layout = meta.get("tile_layout")
    if layout not in (None, TILE_LAYOUT):
        raise TensorCorePlanError(f"{where}: unknown tile layout {layout!r} (a damaged or edited file)")
    plan = TensorCorePlan(rows=int(meta["rows"]), k_multiple=int(meta["k_multiple"]), kernel_size=kernel_size,
                          in_channels=int(meta["in_channels"]), out_channels=int(meta["out_channels"]),
                          fingerprint=meta["fingerprint"], window=_meta_window(meta, where), **arrays)
    _check_layout(plan, where)
    if layout is None:  # saved before fragment-ordered tiles: the same (row, column) slots, row-major
        plan = dataclasses.replace(plan, positions=_row_major_to_tiles(plan))
    return plan


def _row_major_to_tiles(plan: TensorCorePlan) -> np.ndarray:
    """``positions`` of a plan whose tiles were stored row-major, in today's `tile_offset`."""
    pos = plan.positions.astype(np.int64)
    group = np.searchsorted(plan.tile_offsets, pos, side="right") - 1
    k_pad = np.maximum(plan.k_padded[group], 1)
    local = pos - plan.tile_offsets[group]
    return (plan.tile_offsets[group] + tile_offset(plan.rows, plan.k_multiple, local // k_pad, local % k_pad,
                                                   k_pad)).astype(np.int32)


def _meta_window(meta: dict, where) -> int:
    """The stored window (0 for plans saved before windows existed)."""
    try:
        return int(meta.get("window") or 0)
    except (TypeError, ValueError):
        raise TensorCorePlanError(f"{where}: window {meta.get('window')!r} is not an integer "
                                  "(a damaged or edited file)") from None


def save_plan(plan: TensorCorePlan, path) -> None:
    """Writes ``plan`` to a safetensors file: its arrays, and its sizes and pattern
    fingerprint as metadata. `load_plan` reads it back and checks it."""
    from safetensors.numpy import save_file
    tensors, meta = plan_arrays(plan)
    save_file(tensors, str(path), metadata={"jaxsparse_tensor_core_plan": json.dumps(meta)})


def load_plan(path, filt: SparseFilter | None = None) -> TensorCorePlan:
    """Reads a plan written by `save_plan`. Raises `TensorCorePlanError` if the file is not
    one, if its pattern does not match its own fingerprint (a damaged file), or, given
    ``filt``, if the plan is not for that filter's pattern."""
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as fh:
        raw = (fh.metadata() or {}).get("jaxsparse_tensor_core_plan")
        if raw is None:
            raise TensorCorePlanError(f"{path} holds no jaxsparse tensor-core plan")
        arrays = {name: fh.get_tensor(name) for name in fh.keys()}
    plan = plan_from_arrays(arrays, json.loads(raw), path)
    if filt is not None:
        plan.check(filt)
    return plan


def _check_layout(plan: TensorCorePlan, path) -> None:
    """The invariants the kernel and `pack` rely on (bounds, no duplicate positions)."""
    def bad(what):
        raise TensorCorePlanError(f"{path}: {what} (a damaged or edited file)")
    offsets, k_pad = plan.col_offsets, np.diff(plan.col_offsets)
    if plan.rows < 1 or plan.k_multiple < 1 or offsets.ndim != 1 or offsets[0] != 0 or np.any(k_pad < 0):
        bad("column offsets out of order")
    if np.any(k_pad % plan.k_multiple) or offsets[-1] != plan.columns.shape[0]:
        bad("groups not padded to k_multiple, or columns of the wrong length")
    if plan.channels.shape != (offsets.shape[0] - 1, plan.rows):
        bad("channels of the wrong shape")
    real = plan.channels[plan.channels >= 0]
    if not np.array_equal(np.sort(real), np.arange(plan.out_channels)) or np.any(plan.channels < -1):
        bad("channels are not a permutation of the output channels")
    if plan.window < 0 or plan.window % plan.rows:
        bad(f"window {plan.window} is not a multiple of rows")
    if plan.window and plan.window < plan.out_channels:
        per = plan.window // plan.rows  # groups per window
        first = (np.arange(plan.num_groups) // per * plan.window)[:, None]
        if np.any((plan.channels >= 0) & ((plan.channels < first) | (plan.channels >= first + plan.window))):
            bad(f"a group holds a channel outside its window of {plan.window}")
    if plan.columns.size and (plan.columns.min() < 0 or plan.columns.max() >= plan.taps):
        bad("a column outside the filter's taps")
    starts = np.zeros(plan.columns.size, bool)
    starts[offsets[:-1][k_pad > 0]] = True
    if np.any((np.diff(column_blocks(plan.columns, plan.in_channels), prepend=0) < 0) & ~starts):
        bad("a group's columns are not in block order")  # the chunked kernel walks the blocks in order
    pos = plan.positions
    if pos.shape != plan.indices.shape or (pos.size and (pos.min() < 0 or pos.max() >= plan.packed_size)) \
            or np.unique(pos).size != pos.size:
        bad("packed positions out of range or repeated")
