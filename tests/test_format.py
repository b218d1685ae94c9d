"""SparseFilter: construction, pruning, conversions, pytree behaviour, validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxsparse
from jaxsparse import SparseFilter, SparseFilterError
from helpers import DTYPES, dense_from_filter


def _filter(data, indices, indptr, kernel_size=(1, 2), cin=2, cout=2, **kw):
    # NumPy leaves: jnp.asarray would silently turn float64/int64 into 32-bit types
    return SparseFilter(np.asarray(data), np.asarray(indices), np.asarray(indptr),
                        kernel_size=kernel_size, in_channels=cin, out_channels=cout, **kw)


def _valid_arrays():
    # kernel (1, 2), Cin 2, Cout 2 -> taps 4. Row 0: cols 0, 3; row 1: col 2.
    return (np.array([1.0, -2.0, 3.0], np.float32), np.array([0, 3, 2], np.int32),
            np.array([0, 2, 3], np.int32))


# ---- from_dense / todense ---------------------------------------------------

def test_column_order_is_documented_hwio_flattening():
    kernel = np.zeros((2, 3, 4, 5), np.float32)
    kernel[1, 2, 3, 4] = 7.0   # tap (kh=1, kw=2, ci=3) of output channel 4
    kernel[0, 1, 2, 0] = -1.5  # tap (0, 1, 2) of output channel 0
    f = SparseFilter.from_dense(kernel)
    assert f.nnz == 2
    np.testing.assert_array_equal(np.asarray(f.indptr), [0, 1, 1, 1, 1, 2])
    np.testing.assert_array_equal(np.asarray(f.indices), [(0 * 3 + 1) * 4 + 2, (1 * 3 + 2) * 4 + 3])
    np.testing.assert_array_equal(np.asarray(f.data), [-1.5, 7.0])


@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (1, 1, 4, 3), (5, 3, 6), (2, 1, 3, 2)])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_from_dense_exact_zeros_round_trip(shape, dtype):
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal(shape).astype(np.float32)
    kernel[rng.random(shape) < 0.6] = 0.0
    kernel = kernel.astype(DTYPES[dtype])
    f = SparseFilter.from_dense(kernel)
    assert f.dtype == DTYPES[dtype]
    assert f.nnz == int(np.count_nonzero(kernel))
    assert f.shape == shape
    assert f.kernel_size == shape[:-2] and f.in_channels == shape[-2] and f.out_channels == shape[-1]
    assert f.ndim == len(shape) - 2
    assert f.taps == math.prod(shape[:-1])
    dense = f.todense()
    assert dense.shape == shape and dense.dtype == DTYPES[dtype]
    np.testing.assert_array_equal(np.asarray(dense, np.float32), kernel.astype(np.float32))
    # independent densification straight from the CSR arrays
    np.testing.assert_array_equal(dense_from_filter(f), kernel.astype(np.float64))
    assert f.sparsity == pytest.approx(1 - f.nnz / kernel.size)


def test_from_dense_dtype_argument_converts():
    kernel = np.random.default_rng(1).standard_normal((3, 3, 2, 4)).astype(np.float32)
    f = SparseFilter.from_dense(kernel, 0.5, dtype=jnp.bfloat16)
    assert f.dtype == jnp.bfloat16
    assert f.nnz == 36


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9, 0.97, 1.0])
def test_magnitude_pruning_keeps_largest(sparsity):
    rng = np.random.default_rng(2)
    kernel = rng.standard_normal((3, 3, 5, 6)).astype(np.float32)
    f = SparseFilter.from_dense(kernel, sparsity)
    keep = int(round((1 - sparsity) * kernel.size))
    assert f.nnz == keep
    dense = np.asarray(f.todense())
    kept = dense != 0
    assert kept.sum() == keep
    np.testing.assert_array_equal(dense[kept], kernel[kept])  # values unchanged
    if 0 < keep < kernel.size:
        assert np.abs(kernel[kept]).min() >= np.abs(kernel[~kept]).max()
    assert f.sparsity == pytest.approx(1 - keep / kernel.size)


def test_magnitude_pruning_is_per_layer_not_per_row():
    kernel = np.ones((1, 1, 4, 2), np.float32)
    kernel[..., 0] *= 10.0  # channel 0 dominates: 50 % keeps all of it and none of channel 1
    f = SparseFilter.from_dense(kernel, 0.5)
    np.testing.assert_array_equal(np.asarray(f.indptr), [0, 4, 4])


def test_magnitude_pruning_ties_broken_by_position():
    kernel = np.full((1, 1, 3, 2), 2.0, np.float32)
    kernel[0, 0, 1, 1] = -2.0  # |w| ties everywhere
    f = SparseFilter.from_dense(kernel, 0.5)
    assert f.nnz == 3
    # ties go to the first positions in CSR order (output channel, then column):
    # all three taps of output channel 0 win
    dense = np.asarray(f.todense())[0, 0]
    np.testing.assert_array_equal(dense != 0, [[True, False], [True, False], [True, False]])
    # deterministic
    g = SparseFilter.from_dense(kernel, 0.5)
    np.testing.assert_array_equal(np.asarray(g.indices), np.asarray(f.indices))


@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)),
       sparsity=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_magnitude_pruning_property(shape, sparsity, seed):
    kernel = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    f = SparseFilter.from_dense(kernel, sparsity)
    keep = int(round((1 - sparsity) * kernel.size))
    assert f.nnz == keep
    dense = dense_from_filter(f)  # NumPy: no compile per shape
    kept = dense != 0
    np.testing.assert_array_equal(dense[kept], kernel[kept])
    if 0 < keep < kernel.size:
        assert np.abs(kernel[kept]).min() >= np.abs(kernel[~kept]).max()
    f.validate()


def test_from_dense_rejects_bad_inputs():
    with pytest.raises(ValueError, match="sparsity must be in"):
        SparseFilter.from_dense(np.ones((1, 1, 2, 2), np.float32), 1.5)
    with pytest.raises(ValueError, match="sparsity must be in"):
        SparseFilter.from_dense(np.ones((1, 1, 2, 2), np.float32), -0.1)
    with pytest.raises(ValueError, match="rank 4"):
        SparseFilter.from_dense(np.ones((2, 2), np.float32))
    with pytest.raises(SparseFilterError, match="float32, bfloat16 or float16"):
        SparseFilter.from_dense(np.ones((1, 1, 2, 2), np.float64))
    with pytest.raises(SparseFilterError, match="float32, bfloat16 or float16"):
        SparseFilter.from_dense(np.ones((1, 1, 2, 2), np.int32))
    k = np.ones((1, 1, 2, 2), np.float32)
    k[0, 0, 1, 1] = np.nan
    with pytest.raises(SparseFilterError, match="non-finite"):
        SparseFilter.from_dense(k)
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda k: SparseFilter.from_dense(k).data)(jnp.ones((1, 1, 2, 2)))


def test_todense_under_jit():
    f = jaxsparse.random_filter(3, (3, 3), 4, 5, 0.7)
    dense = jax.jit(lambda f: f.todense())(f)
    np.testing.assert_array_equal(np.asarray(dense), dense_from_filter(f))


# ---- astype / with_data / pytree --------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
def test_astype_keeps_structure(dtype):
    f = jaxsparse.random_filter(4, (3, 3), 3, 4, 0.5)
    g = f.astype(DTYPES[dtype])
    assert g.dtype == DTYPES[dtype]
    assert g.shape == f.shape and g.nnz == f.nnz
    np.testing.assert_array_equal(np.asarray(g.indices), np.asarray(f.indices))
    np.testing.assert_array_equal(np.asarray(g.indptr), np.asarray(f.indptr))
    np.testing.assert_allclose(np.asarray(g.data, np.float32), np.asarray(f.data),
                               rtol=1e-2 if dtype == "bfloat16" else 1e-3)
    with pytest.raises(SparseFilterError, match="float32, bfloat16 or float16"):
        f.astype(np.int32)


def test_with_data():
    f = jaxsparse.random_filter(5, (2, 2), 3, 4, 0.5)
    new = jnp.arange(f.nnz, dtype=jnp.float32) + 1
    g = f.with_data(new)
    np.testing.assert_array_equal(np.asarray(g.data), np.asarray(new))
    np.testing.assert_array_equal(np.asarray(g.indices), np.asarray(f.indices))
    assert g.shape == f.shape
    with pytest.raises(SparseFilterError, match="shape"):
        f.with_data(jnp.ones(f.nnz + 1, jnp.float32))
    with pytest.raises(SparseFilterError, match="non-finite"):
        f.with_data(jnp.full(f.nnz, jnp.inf, jnp.float32))
    # traced data under jit
    out = jax.jit(lambda d: f.with_data(d).todense())(new)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(g.todense()))


def test_pytree_flatten_unflatten():
    f = jaxsparse.random_filter(6, (3, 1), 5, 3, 0.6, dtype=jnp.float16)
    leaves, treedef = jax.tree_util.tree_flatten(f)
    assert len(leaves) == 3
    assert leaves[0].dtype == np.float16
    assert leaves[1].dtype == np.int32 and leaves[2].dtype == np.int32
    g = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(g, SparseFilter)
    assert (g.kernel_size, g.in_channels, g.out_channels) == (f.kernel_size, f.in_channels, f.out_channels)
    np.testing.assert_array_equal(np.asarray(g.todense()), np.asarray(f.todense()))
    # metadata is static: filters of different shape have different treedefs
    h = jaxsparse.random_filter(6, (1, 3), 5, 3, 0.6, dtype=jnp.float16)
    assert jax.tree_util.tree_structure(h) != treedef
    # tree_map transforms data only when asked
    doubled = jax.tree_util.tree_map(lambda a: a * 2 if a.dtype == np.float16 else a, f)
    np.testing.assert_array_equal(np.asarray(doubled.data, np.float32), 2 * np.asarray(f.data, np.float32))
    assert "SparseFilter(shape=(3, 1, 5, 3)" in repr(f)


# ---- random_filter ------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["magnitude", "uniform"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_random_filter(pattern, sparsity):
    f = jaxsparse.random_filter(7, (3, 3), 6, 5, sparsity, pattern=pattern, dtype=jnp.bfloat16)
    f.validate()
    assert f.dtype == jnp.bfloat16 and f.shape == (3, 3, 6, 5)
    total = 3 * 3 * 6
    if pattern == "uniform":
        per_row = int(round((1 - sparsity) * total))
        np.testing.assert_array_equal(np.diff(np.asarray(f.indptr)), per_row)
    else:
        assert f.nnz == int(round((1 - sparsity) * total * 5))
    if f.nnz:
        assert np.any(np.asarray(f.data, np.float32) != 0)
    g = jaxsparse.random_filter(7, (3, 3), 6, 5, sparsity, pattern=pattern, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(g.todense(), np.float32), np.asarray(f.todense(), np.float32))


def test_random_filter_1d_and_bad_pattern():
    f = jaxsparse.random_filter(0, (5,), 3, 4, 0.5, pattern="uniform")
    assert f.shape == (5, 3, 4) and f.ndim == 1
    with pytest.raises(ValueError, match="unknown pattern"):
        jaxsparse.random_filter(0, (3, 3), 3, 4, 0.5, pattern="blocky")


# ---- validation ---------------------------------------------------------------

def test_valid_filter_constructs():
    f = _filter(*_valid_arrays())
    np.testing.assert_array_equal(np.asarray(f.todense()).reshape(4, 2).T,
                                  [[1, 0, 0, -2], [0, 0, 3, 0]])


@pytest.mark.parametrize("mutate, match", [
    (lambda d, i, p: (d.astype(np.float64), i, p), "data must be float32, bfloat16 or float16"),
    (lambda d, i, p: (d.astype(np.int32), i, p), "data must be float32, bfloat16 or float16"),
    (lambda d, i, p: (d, i.astype(np.int64) + 2 ** 31, p), "indices value 2147483648 does not fit in int32"),
    (lambda d, i, p: (d, i.astype(np.uint32) + np.uint32(2 ** 31), p), "indices value .* does not fit in int32"),
    (lambda d, i, p: (d, i, p.astype(np.int64) - 2 ** 40), "indptr value .* does not fit in int32"),
    (lambda d, i, p: (d, i.astype(np.float32), p), "indices must be int32"),
    (lambda d, i, p: (d, i.astype(bool), p), "indices must be int32"),
    (lambda d, i, p: (d[:2], i, p), "differ in length"),
    (lambda d, i, p: (d, i[:2], p), "differ in length"),
    (lambda d, i, p: (d, i, p[:2]), "out_channels \\+ 1"),
    (lambda d, i, p: (d, i, np.array([0, 2, 3, 3], np.int32)), "out_channels \\+ 1"),
    (lambda d, i, p: (d, i, np.array([1, 2, 3], np.int32)), "start at 0"),
    (lambda d, i, p: (d, i, np.array([0, 3, 2], np.int32)), "non-decreasing"),
    (lambda d, i, p: (d, i, np.array([0, 2, 2], np.int32)), "must equal the number of nonzeros"),
    (lambda d, i, p: (d, i, np.array([0, 1, 4], np.int32)), "must equal the number of nonzeros"),
    (lambda d, i, p: (d, np.array([0, 4, 2], np.int32), p), "column index 4 out of range"),
    (lambda d, i, p: (d, np.array([0, 3, -1], np.int32), p), "column index -1 out of range"),
    (lambda d, i, p: (d, np.array([3, 0, 2], np.int32), p), "strictly increasing"),
    (lambda d, i, p: (d, np.array([3, 3, 2], np.int32), p), "strictly increasing"),
    (lambda d, i, p: (np.array([1.0, np.nan, 3.0], np.float32), i, p), "non-finite"),
    (lambda d, i, p: (np.array([1.0, np.inf, 3.0], np.float32), i, p), "non-finite"),
    (lambda d, i, p: (np.array([1.0, -np.inf, 3.0], np.float16), i, p), "non-finite"),
    (lambda d, i, p: (d.reshape(1, 3), i, p), "data must be 1-D"),
    (lambda d, i, p: (d, i.reshape(3, 1), p), "indices must be 1-D"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_validation_errors(mutate, match):
    d, i, p = mutate(*_valid_arrays())
    with pytest.raises(SparseFilterError, match=match):
        _filter(d, i, p)


def test_sparse_filter_error_is_value_error():
    assert issubclass(SparseFilterError, ValueError)


def test_unsorted_columns_in_one_row_ok_across_rows():
    # decreasing index across a row boundary is fine; within a row it is not
    f = _filter(np.ones(3, np.float32), np.array([2, 3, 0], np.int32), np.array([0, 2, 3], np.int32))
    assert f.nnz == 3


def test_allow_nonfinite():
    d, i, p = _valid_arrays()
    d = np.array([1.0, np.nan, np.inf], np.float32)
    f = _filter(d, i, p, allow_nonfinite=True)
    assert np.isnan(np.asarray(f.data)[1])


def test_validate_false_defers_and_validate_raises():
    d, i, p = _valid_arrays()
    f = _filter(d, np.array([0, 9, 2], np.int32), p, validate=False)
    with pytest.raises(SparseFilterError, match="out of range"):
        f.validate()


@pytest.mark.parametrize("kernel_size, cin, cout, match", [
    ((), 2, 2, "kernel_size"),
    ((1, 1, 1), 2, 2, "kernel_size"),
    ((0, 2), 2, 2, "kernel_size"),
    ((1, -1), 2, 2, "kernel_size"),
    ((1, 2), -1, 2, "in_channels and out_channels must be non-negative"),
    ((1, 2), 2, -1, "in_channels and out_channels must be non-negative"),
    ((1, 2), -3, 2, "in_channels and out_channels must be non-negative"),
    ((1, 2), 0, 2, "column index 0 out of range \\[0, 0\\)"),  # zero channels are valid, but hold no taps
    ((65536, 65536), 1, 2, "int32"),
])
def test_bad_metadata(kernel_size, cin, cout, match):
    d, i, p = _valid_arrays()
    with pytest.raises(SparseFilterError, match=match):
        _filter(d, i, p, kernel_size=kernel_size, cin=cin, cout=cout)


def test_empty_filter_is_valid():
    f = _filter(np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(3, np.int32))
    assert f.nnz == 0 and f.sparsity == 1.0
    assert not np.any(np.asarray(f.todense()))


def test_traced_leaves_skip_value_checks():
    d, i, p = _valid_arrays()

    def build(d, i, p):
        return SparseFilter(d, i, p, kernel_size=(1, 2), in_channels=2, out_channels=2).todense()

    # structure checks that need values are skipped under jit (documented), shape checks are not
    jax.jit(build)(d, np.array([0, 9, 2], np.int32), p)
    with pytest.raises(SparseFilterError, match="differ in length"):
        jax.jit(build)(d[:2], i, p)
    with pytest.raises(SparseFilterError, match="indices must be int32"):
        jax.jit(build)(d, i.astype(np.float32), p)


def test_validate_override_does_not_mark_the_filter_validated():
    # validate(allow_nonfinite=True) on a filter whose own flag is False passes NaN for that
    # check only: a later eager sparse_conv must still refuse the filter
    d, i, p = _valid_arrays()
    f = _filter(np.array([1.0, np.nan, 3.0], np.float32), i, p, validate=False)
    assert f.validate(allow_nonfinite=True) is f
    with pytest.raises(SparseFilterError, match="non-finite"):
        jaxsparse.sparse_conv(jnp.ones((1, 3, 3, 2)), f)
    with pytest.raises(SparseFilterError, match="non-finite"):
        f.validate()
    # a check at least as strict as the filter's own flag does count
    g = _filter(d, i, p, validate=False, allow_nonfinite=True)
    g.validate(allow_nonfinite=False)
    assert g._validated
    h = _filter(d, i, p, validate=False)
    h.validate(allow_nonfinite=True)
    assert not h._validated  # finite, but not checked under the filter's own rule


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_with_data_python_list_keeps_the_filter_dtype(dtype):
    f = jaxsparse.random_filter(5, (2, 2), 3, 4, 0.5).astype(DTYPES[dtype])
    values = [0.1 * (k + 1) for k in range(f.nnz)]
    g = f.with_data(values)
    assert g.dtype == f.dtype == DTYPES[dtype]
    np.testing.assert_array_equal(np.asarray(g.data), np.asarray(values, DTYPES[dtype]))  # one rounding
    assert f.with_data(tuple(range(f.nnz))).dtype == f.dtype  # integers too
    g = f.with_data(np.asarray(values, np.float32))  # an array keeps its own dtype (documented)
    assert g.dtype == np.float32
    with pytest.raises(SparseFilterError, match="real numbers"):
        f.with_data(["a"] * f.nnz)
    with pytest.raises(SparseFilterError, match="shape"):
        f.with_data(values[:-1])
    if dtype == "float16":  # a value the dtype cannot hold becomes Inf: refused as non-finite
        with pytest.raises(SparseFilterError, match="non-finite"):
            f.with_data([1e6] * f.nnz)


def test_allow_nonfinite_is_part_of_the_tree_structure():
    # documented: two filters differing only in the flag have different tree structures
    d, i, p = _valid_arrays()
    a, b = _filter(d, i, p), _filter(d, i, p, allow_nonfinite=True)
    assert jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b)
    with pytest.raises(ValueError):
        jax.tree_util.tree_map(lambda u, v: u + v, a, b)
    assert "tree structure" in SparseFilter.__doc__ and "tree structure" in jaxsparse.format.__doc__
