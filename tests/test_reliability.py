"""Bad and edge-case inputs (issue #12): geometry arguments, allow_nonfinite through pytree
operations and from_dense, checkpoint templates, non-finite inputs, array-like leaves,
zero-size inputs. Every case here once misbehaved on the CPU backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import jaxsparse
from jaxsparse import SparseFilter, SparseFilterError, sparse_conv
from jaxsparse.geometry import normalize_ints, normalize_padding
from helpers import dense_from_filter, resolve_padding

DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def exact_float32_references():
    with jax.default_matmul_precision("highest"):
        yield


# ---- 1. geometry arguments are integers, never rounded or parsed ---------------------

BAD_GEOMETRY = [
    (dict(strides=(1.7, 1)), "strides", "1.7"),
    (dict(strides=(2.0, 1)), "strides", "2.0"),
    (dict(strides=1.5), "strides", "1.5"),
    (dict(strides=np.float32(2)), "strides", "2.0"),
    (dict(strides=np.array([2.0, 1.0])), "strides", "2."),
    (dict(strides="12"), "strides", "'12'"),
    (dict(strides=("1", "2")), "strides", "'1'"),
    (dict(strides=(True, 1)), "strides", "True"),
    (dict(strides=np.bool_(True)), "strides", "True"),
    (dict(rhs_dilation=(2.9, 1)), "rhs_dilation", "2.9"),
    (dict(rhs_dilation=(1, np.float64(2))), "rhs_dilation", "2.0"),
    (dict(rhs_dilation=(True, True)), "rhs_dilation", "True"),
    (dict(padding=((1.5, 1), (1, 1))), "padding", "1.5"),
    (dict(padding=((1.0, 1), (1, 1))), "padding", "1.0"),
    (dict(padding=["11", "00"]), "padding", "'11'"),
    (dict(padding=(("1", "1"), (0, 0))), "padding", "'1'"),
    (dict(padding=((True, 1), (1, 1))), "padding", "True"),
    (dict(padding=1.0), "padding", "1.0"),
    (dict(padding=False), "padding", "False"),
    (dict(padding=((1, 1), 1)), "padding", "1"),
]


@pytest.mark.parametrize("kw, name, value", BAD_GEOMETRY, ids=lambda v: repr(v) if isinstance(v, dict) else "")
def test_non_integer_geometry_raises_naming_argument_and_value(f2, x2, kw, name, value):
    with pytest.raises(TypeError) as info:
        sparse_conv(x2, f2, **kw)
    message = str(info.value)
    assert message.startswith(f"{name} must be"), message
    assert value in message, message


@pytest.mark.parametrize("kw, name, value", [c for c in BAD_GEOMETRY if "True" not in c[2] and
                                             "False" not in c[2] and c[0] != dict(padding=1.0) and
                                             c[0] != dict(padding=((1, 1), 1)) and
                                             not np.isscalar(next(iter(c[0].values())))],
                         ids=lambda v: repr(v) if isinstance(v, dict) else "")
def test_lax_rejects_the_same_values(kw, name, value):
    # parity: lax refuses these too (booleans it takes as 0/1, a scalar stride it refuses
    # as not a sequence; see jaxsparse.geometry for why jaxsparse refuses bools)
    lax_kw = dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(1, 1))
    lax_kw[{"strides": "window_strides"}.get(name, name)] = next(iter(kw.values()))
    with pytest.raises((TypeError, ValueError)):
        lax.conv_general_dilated(jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 4, 5)), dimension_numbers=DN, **lax_kw)


def test_integer_forms_are_accepted_and_equal(f2, x2):
    expected = sparse_conv(x2, f2, strides=(2, 1), rhs_dilation=(1, 2), padding=((1, 0), (2, 1)))
    for kw in [dict(strides=(np.int64(2), np.uint8(1)), rhs_dilation=(np.int32(1), np.array(2)),
                    padding=((np.int16(1), 0), (2, np.array(1)))),
               dict(strides=np.array([2, 1]), rhs_dilation=[jnp.array(1), 2],
                    padding=np.array([[1, 0], [2, 1]]))]:
        np.testing.assert_array_equal(sparse_conv(x2, f2, **kw), expected)


@pytest.mark.parametrize("padding", ["same", "Valid", "SAME_LOWER", "same_lower"])
def test_padding_strings_like_lax(f2, x2, padding):
    out = sparse_conv(x2, f2, padding=padding, strides=(2, 1))
    ref = lax.conv_general_dilated(x2, f2.todense(), (2, 1), padding, dimension_numbers=DN)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_same_lower_puts_the_extra_padding_low(f2, x2):
    # 6 rows, stride 2, kernel 3: total padding 1; SAME puts it high, SAME_LOWER low
    lower = normalize_padding("SAME_LOWER", (6, 6), (3, 3), (2, 2), (1, 1))
    assert lower == ((1, 0), (1, 0)) and normalize_padding("SAME", (6, 6), (3, 3), (2, 2), (1, 1)) == ((0, 1), (0, 1))
    np.testing.assert_array_equal(sparse_conv(x2, f2, padding="same_lower", strides=2),
                                  sparse_conv(x2, f2, padding=lower, strides=2))


def test_traced_geometry_is_refused(f2, x2):
    with pytest.raises(TypeError, match="strides must be .* traced"):
        jax.jit(lambda s: sparse_conv(x2, f2, strides=(s, 1)))(2)


INTEGER_TYPES = [int, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                 lambda v: np.array(v, np.int64)]


@given(values=st.lists(st.integers(1, 7), min_size=2, max_size=2),
       types=st.lists(st.sampled_from(INTEGER_TYPES), min_size=2, max_size=2),
       container=st.sampled_from([tuple, list]),
       array_dtype=st.sampled_from([np.int8, np.int32, np.int64, np.uint8, np.uint64]))
@settings(deadline=None)
def test_normalize_ints_accepts_every_integer_type(values, types, container, array_dtype):
    typed = [t(v) for t, v in zip(types, values)]
    assert normalize_ints(container(typed), 2, "strides") == tuple(values)
    assert normalize_ints(np.array(values, array_dtype), 2, "strides") == tuple(values)
    assert normalize_ints(types[0](values[0]), 2, "strides") == (values[0],) * 2


@given(bad=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=3),
                     st.none(), st.complex_numbers(), st.floats(-1e6, 1e6).map(np.float32)),
       position=st.integers(0, 1), good=st.integers(1, 5))
@settings(deadline=None)
def test_normalize_ints_refuses_every_non_integer(bad, position, good):
    entries = [good, good]
    entries[position] = bad
    with pytest.raises(TypeError, match="rhs_dilation must be an int or a sequence of 2 ints"):
        normalize_ints(tuple(entries), 2, "rhs_dilation")
    if not isinstance(bad, str):  # a string is a sequence: refused too, by its entries
        with pytest.raises(TypeError, match="rhs_dilation must be an int"):
            normalize_ints(bad, 2, "rhs_dilation")


@given(bad=st.one_of(st.floats(allow_nan=True), st.booleans(), st.text(min_size=1, max_size=2), st.none()),
       where=st.tuples(st.integers(0, 1), st.integers(0, 1)), good=st.integers(0, 3))
@settings(deadline=None)
def test_normalize_padding_refuses_every_non_integer(bad, where, good):
    pads = [[good, good], [good, good]]
    pads[where[0]][where[1]] = bad
    with pytest.raises(TypeError, match="padding must be 'SAME', 'VALID' or 2 \\(low, high\\) pairs"):
        normalize_padding(pads, (6, 6), (3, 3), (1, 1), (1, 1))


# ---- 2. allow_nonfinite survives pytree operations; from_dense takes it ------------------

def _nan_filter(dtype=np.float32):
    data = np.array([1.0, np.nan, 3.0, -np.inf], dtype)
    return SparseFilter(data, np.array([0, 3, 2, 7], np.int32), np.array([0, 2, 4], np.int32),
                        kernel_size=(2, 2), in_channels=2, out_channels=2, allow_nonfinite=True)


REBUILDS = {
    "device_put": jax.device_put,
    "tree_map": lambda f: jax.tree_util.tree_map(lambda a: a, f),
    "flatten/unflatten": lambda f: jax.tree_util.tree_unflatten(*reversed(jax.tree_util.tree_flatten(f))),
    "jit identity": jax.jit(lambda f: f),
    "astype float32": lambda f: f.astype(np.float32),
    "astype bfloat16": lambda f: f.astype(jnp.bfloat16).astype(np.float32),
    "with_data": lambda f: f.with_data(jnp.asarray(f.data) * 2),
    "vmap stack": lambda f: jax.tree_util.tree_map(lambda a: a[0], jax.vmap(lambda g: g, axis_size=1)(
        jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], f))),
}


@pytest.mark.parametrize("rebuild", list(REBUILDS), ids=str)
def test_allow_nonfinite_survives_rebuilds_and_eager_matches_jit(rebuild):
    f = _nan_filter()
    g = REBUILDS[rebuild](f)
    assert g.allow_nonfinite
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 4, 2)).astype(np.float32))
    eager = np.asarray(sparse_conv(x, g))
    jitted = np.asarray(jax.jit(sparse_conv)(x, g))
    np.testing.assert_array_equal(eager, jitted)  # equal_nan by default
    # channel 0 stores a NaN weight: NaN everywhere; channel 1 a -Inf weight: +-Inf, and NaN
    # where it meets the zero padding (-Inf * 0)
    assert np.isnan(eager[..., 0]).all() and np.isinf(eager[..., 1]).any()


def test_flag_is_static_metadata():
    f = _nan_filter()
    plain = SparseFilter(np.ones(4, np.float32), f.indices, f.indptr, kernel_size=(2, 2), in_channels=2,
                         out_channels=2)
    assert not plain.allow_nonfinite
    assert jax.tree_util.tree_structure(f) != jax.tree_util.tree_structure(plain)
    # a filter without the flag that acquires NaN in a pytree operation is still refused eagerly
    poisoned = jax.tree_util.tree_map(lambda a: a * np.nan if a.dtype == np.float32 else a, plain)
    with pytest.raises(SparseFilterError, match="non-finite"):
        sparse_conv(jnp.ones((1, 4, 4, 2)), poisoned)
    # validate() follows the flag unless told otherwise
    assert f.validate() is f
    with pytest.raises(SparseFilterError, match="non-finite"):
        f.validate(allow_nonfinite=False)


def test_from_dense_allow_nonfinite_keeps_nan_where_it_is():
    k = np.arange(1, 17, dtype=np.float32).reshape(2, 2, 2, 2)
    k[1, 0, 1, 0] = np.nan
    k[0, 1, 0, 1] = -np.inf
    with pytest.raises(SparseFilterError, match=r"2 non-finite value\(s\) .*kernel\(0, 1, 0, 1\) = -inf"):
        SparseFilter.from_dense(k)
    f = SparseFilter.from_dense(k, allow_nonfinite=True)
    assert f.allow_nonfinite and f.nnz == 16
    dense = dense_from_filter(f)
    np.testing.assert_array_equal(dense, k.astype(np.float64))  # NaN at the same place only


def test_from_dense_nan_ranks_below_every_number():
    rng = np.random.default_rng(2)
    k = (rng.standard_normal((3, 3, 4, 2)) + 5.0).astype(np.float32)  # |w| > 2: no zeros
    k[0, 0, 0, 0] = np.nan
    k[2, 1, 3, 1] = np.nan
    f = SparseFilter.from_dense(k, 0.5)  # the NaNs are pruned first: no error
    assert not f.allow_nonfinite and f.nnz == k.size // 2
    dense = dense_from_filter(f)
    assert np.all(np.isfinite(dense)) and dense[0, 0, 0, 0] == 0 and dense[2, 1, 3, 1] == 0
    kept = dense != 0
    np.testing.assert_array_equal(dense[kept], k[kept])
    # keeping all but one weight keeps one NaN: an error naming it, or stored with the flag
    keep_all_but_one = 1 / k.size
    with pytest.raises(SparseFilterError, match=r"1 non-finite value\(s\) that pruning keeps .*nan"):
        SparseFilter.from_dense(k, keep_all_but_one)
    g = SparseFilter.from_dense(k, keep_all_but_one, allow_nonfinite=True)
    assert np.isnan(dense_from_filter(g)).sum() == 1
    assert dense_from_filter(g)[2, 1, 3, 1] == 0  # the later NaN is pruned (ties by position)


def test_from_dense_inf_ranks_above_every_finite_value():
    k = np.ones((1, 1, 4, 2), np.float32)
    k[0, 0, 3, 1] = np.inf
    with pytest.raises(SparseFilterError, match="kernel\\(0, 0, 3, 1\\) = inf"):
        SparseFilter.from_dense(k, 1 - 1 / k.size)  # keeps one weight: the Inf
    f = SparseFilter.from_dense(k, 1 - 1 / k.size, allow_nonfinite=True)
    assert f.nnz == 1 and np.isposinf(np.asarray(f.data)[0])


def test_from_dense_checks_after_the_dtype_conversion():
    k = np.full((1, 1, 2, 2), 1e5, np.float32)  # overflows float16
    with pytest.raises(SparseFilterError, match="inf as float16"):
        SparseFilter.from_dense(k, dtype=np.float16)
    assert SparseFilter.from_dense(k, dtype=jnp.bfloat16).nnz == 4


@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
       sparsity=st.floats(0, 1), seed=st.integers(0, 2 ** 16), nan_fraction=st.floats(0, 0.5))
@settings(deadline=None)
def test_magnitude_mask_never_keeps_nan_before_a_number(shape, sparsity, seed, nan_fraction):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < 0.2] = 0.0
    w[rng.random(shape) < nan_fraction] = np.nan
    rows = w.reshape(-1, shape[-1]).T  # from_dense ranks in CSR order (ties: channel, then column)
    mask = jaxsparse.magnitude_mask(rows, sparsity).T.reshape(shape)
    assert mask.sum() == int(round((1 - sparsity) * w.size))
    nan = np.isnan(w)
    if (mask & nan).any():
        assert mask[~nan].all()  # a NaN is kept only once every number is
    if (mask & ~nan).any() and (~mask & ~nan).any():
        assert np.abs(w[mask & ~nan]).min() >= np.abs(w[~mask & ~nan]).max()
    f = SparseFilter.from_dense(w, sparsity, allow_nonfinite=True)
    np.testing.assert_array_equal(dense_from_filter(f), np.where(mask, w, 0.0))
    if (mask & nan).any():
        with pytest.raises(SparseFilterError, match="non-finite"):
            SparseFilter.from_dense(w, sparsity)
    else:
        assert not np.isnan(dense_from_filter(SparseFilter.from_dense(w, sparsity))).any()


# ---- 4. non-finite inputs: sparse semantics ----------------------------------------------

def stored_entry_reference(x, f, *, strides, padding, dilation, bias=None, relu=False):
    """float64 NumPy: bias + sum over the *stored* entries of w * x[window] (IEEE rules:
    0 * NaN, 0 * Inf and Inf - Inf are NaN), zero padding; pruned positions contribute nothing."""
    x = np.asarray(x, np.float64)
    kh, kw = f.kernel_size
    pads = resolve_padding(padding, x.shape[1:3], (kh, kw), strides, dilation)
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    oh = (xp.shape[1] - ((kh - 1) * dilation[0] + 1)) // strides[0] + 1
    ow = (xp.shape[2] - ((kw - 1) * dilation[1] + 1)) // strides[1] + 1
    y = np.zeros((x.shape[0], oh, ow, f.out_channels))
    data, indices, indptr = (np.asarray(f.data, np.float64), np.asarray(f.indices), np.asarray(f.indptr))
    with np.errstate(invalid="ignore", over="ignore"):
        for co in range(f.out_channels):
            for j in range(indptr[co], indptr[co + 1]):
                i, jw, ci = np.unravel_index(indices[j], (kh, kw, f.in_channels))
                h0, w0 = i * dilation[0], jw * dilation[1]
                window = xp[:, h0:h0 + (oh - 1) * strides[0] + 1:strides[0],
                            w0:w0 + (ow - 1) * strides[1] + 1:strides[1], ci]
                y[..., co] += data[j] * window
        if bias is not None:
            y = y + np.asarray(bias, np.float64)
        if relu:
            y = np.where(np.isnan(y), y, np.maximum(y, 0))
    return y


def assert_same_nonfinite_and_close(out, ref, rtol=1e-5):
    out = np.asarray(out, np.float64)
    assert out.shape == ref.shape
    for kind in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(kind(out), kind(ref), err_msg=kind.__name__)
    finite = np.isfinite(ref)
    np.testing.assert_allclose(out[finite], ref[finite], rtol=rtol, atol=rtol * 10)


def _filter_with_stored_zeros(seed, kernel_size, cin, cout, sparsity):
    f = jaxsparse.random_filter(seed, kernel_size, cin, cout, sparsity)
    data = np.asarray(f.data).copy()
    data[::4] = 0.0  # explicitly stored zeros: still part of the structure
    return f.with_data(jnp.asarray(data))


def _poisoned_input(seed, shape):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    spots = rng.choice(flat.size, size=6, replace=False)
    flat[spots[:2]] = np.nan
    flat[spots[2:4]] = np.inf
    flat[spots[4:]] = -np.inf
    return jnp.asarray(x)


NONFINITE_CASES = [
    dict(strides=(1, 1), padding="SAME", dilation=(1, 1)),
    dict(strides=(2, 1), padding="VALID", dilation=(1, 1)),
    dict(strides=(1, 2), padding=((2, 0), (1, 1)), dilation=(2, 1)),
]


@pytest.mark.parametrize("case", NONFINITE_CASES, ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_nonfinite_inputs_follow_stored_entries(case, relu):
    f = _filter_with_stored_zeros(3, (3, 3), 3, 6, 0.6)
    x = _poisoned_input(4, (2, 7, 8, 3))
    bias = np.linspace(-0.5, 0.5, 6).astype(np.float32)
    out = sparse_conv(x, f, strides=case["strides"], padding=case["padding"], rhs_dilation=case["dilation"],
                      bias=bias, activation="relu" if relu else None)
    ref = stored_entry_reference(x, f, **case, bias=bias, relu=relu)
    assert np.isnan(ref).any() and np.isfinite(ref).any()  # the case exercises both
    assert_same_nonfinite_and_close(out, ref)
    # under jit too
    jitted = jax.jit(lambda x, f: sparse_conv(x, f, strides=case["strides"], padding=case["padding"],
                                              rhs_dilation=case["dilation"], bias=bias,
                                              activation="relu" if relu else None))(x, f)
    assert_same_nonfinite_and_close(jitted, ref)


def test_stored_zero_times_inf_or_nan_is_nan_pruned_zero_is_not():
    # one output channel, 1x1 kernel over 3 input channels: a stored 0.0 at channel 0,
    # a stored 2.0 at channel 1, channel 2 pruned
    f = SparseFilter(np.array([0.0, 2.0], np.float32), np.array([0, 1], np.int32), np.array([0, 2], np.int32),
                     kernel_size=(1, 1), in_channels=3, out_channels=1)
    x = np.ones((1, 1, 6, 3), np.float32)
    x[0, 0, 0, 0] = np.inf     # meets the stored 0.0: NaN
    x[0, 0, 1, 0] = np.nan     # meets the stored 0.0: NaN
    x[0, 0, 2, 1] = -np.inf    # meets the stored 2.0: -Inf
    x[0, 0, 3, 2] = np.nan     # meets only the pruned weight: finite
    x[0, 0, 4, 2] = np.inf     # likewise
    out = np.asarray(sparse_conv(jnp.asarray(x), f, padding="VALID"))[0, 0, :, 0]
    assert np.isnan(out[0]) and np.isnan(out[1]) and np.isneginf(out[2])
    np.testing.assert_array_equal(out[3:], [2.0, 2.0, 2.0])
    # the dense convolution of the same filter differs exactly at the pruned taps
    dense = np.asarray(lax.conv_general_dilated(jnp.asarray(x), f.todense(), (1, 1), "VALID",
                                                dimension_numbers=DN))[0, 0, :, 0]
    assert np.isnan(dense[3]) and np.isnan(dense[4]) and dense[5] == 2.0


def test_issue_example_nan_pixel_at_half_sparsity():
    f = jaxsparse.random_filter(0, (3, 3), 8, 8, 0.5)
    x = np.random.default_rng(0).standard_normal((1, 6, 6, 8)).astype(np.float32)
    x[0, 2, 3, 5] = np.nan
    out = np.asarray(sparse_conv(jnp.asarray(x), f))
    dense = np.asarray(lax.conv_general_dilated(jnp.asarray(x), f.todense(), (1, 1), "SAME", dimension_numbers=DN))
    ref = stored_entry_reference(x, f, strides=(1, 1), padding="SAME", dilation=(1, 1))
    assert_same_nonfinite_and_close(out, ref)
    assert 0 < np.isnan(out).sum() < np.isnan(dense).sum() == 72  # 9 pixels x 8 channels


def test_nonfinite_rule_under_vmap_over_filters_and_in_bfloat16():
    fs = [_filter_with_stored_zeros(s, (3, 3), 3, 4, 0.5) for s in (5, 6)]
    nnz = min(f.nnz for f in fs)
    fs = [SparseFilter.from_dense(np.asarray(f.todense()), 1 - nnz / (9 * 3 * 4)) if f.nnz != nnz else f
          for f in fs]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *fs)
    x = _poisoned_input(7, (1, 6, 6, 3))
    out = jax.vmap(lambda f: sparse_conv(x, f))(stacked)
    for i, f in enumerate(fs):
        assert_same_nonfinite_and_close(out[i], stored_entry_reference(x, f, strides=(1, 1), padding="SAME",
                                                                       dilation=(1, 1)))
    fb = fs[0].astype(jnp.bfloat16)
    xb = x.astype(jnp.bfloat16)
    ref = stored_entry_reference(np.asarray(xb, np.float32), fb, strides=(1, 1), padding="SAME", dilation=(1, 1))
    assert_same_nonfinite_and_close(sparse_conv(xb, fb), ref, rtol=2e-2)


# ---- 5. array-like leaves ------------------------------------------------------------------

def _build(data, indices, indptr, **kw):
    return SparseFilter(data, indices, indptr, kernel_size=(1, 2), in_channels=2, out_channels=2, **kw)


def test_python_lists_and_tuples_are_converted():
    reference = _build(np.array([1.0, -2.0, 3.0], np.float32), np.array([0, 3, 2], np.int32),
                       np.array([0, 2, 3], np.int32))
    for data, indices, indptr in [([1.0, -2.0, 3.0], [0, 3, 2], [0, 2, 3]),
                                  ((1, -2, 3), (0, 3, 2), (0, 2, 3)),
                                  (np.array([1.0, -2.0, 3.0], np.float32), np.array([0, 3, 2], np.int64),
                                   np.array([0, 2, 3], np.uint16))]:
        f = _build(data, indices, indptr)
        assert f.data.dtype == np.float32 and f.indices.dtype == np.int32 and f.indptr.dtype == np.int32
        np.testing.assert_array_equal(dense_from_filter(f), dense_from_filter(reference))
    empty = SparseFilter([], [], [0, 0, 0], kernel_size=(1, 2), in_channels=2, out_channels=2)
    assert empty.nnz == 0 and empty.data.dtype == np.float32 and empty.indices.dtype == np.int32


@pytest.mark.parametrize("data, indices, indptr, match", [
    ([1.0, 2.0, 3.0], [0, 1.5, 2], [0, 2, 3], r"indices must be a 1-D array of integers, got \[0, 1.5, 2\]"),
    ([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], [0, 2, 3], "indices must be a 1-D array of integers.*float64"),
    ([1.0, 2.0, 3.0], [0, 1, 2], [0, 2.0, 3], "indptr must be a 1-D array of integers"),
    ([1.0, 2.0, 3.0], [0, 1, 2 ** 40], [0, 2, 3], "indices value 1099511627776 does not fit in int32"),
    ([1.0, 2.0, 3.0], [0, 1, 2 ** 70], [0, 2, 3], "indices must be a 1-D array of integers"),
    ([[1.0], [2.0, 3.0]], [0, 1, 2], [0, 2, 3], "data must be a 1-D array of real numbers.*inhomogeneous"),
    (["a", "b", "c"], [0, 1, 2], [0, 2, 3], "data must be a 1-D array of real numbers"),
    ([True, False, True], [0, 1, 2], [0, 2, 3], "data must be a 1-D array of real numbers.*bool"),
    ([1j, 2.0, 3.0], [0, 1, 2], [0, 2, 3], "data must be a 1-D array of real numbers.*complex"),
    (None, [0, 1, 2], [0, 2, 3], "data must be a 1-D array of real numbers"),
    ([1.0, 2.0, 3.0], [True, False, True], [0, 2, 3], "indices must be a 1-D array of integers"),
    ([1.0, 2.0, 3.0], np.array([0.0, 1.0, 2.0]), [0, 2, 3], "indices must be int32, got float64"),
    (np.array([1.0, 2.0, 3.0]), [0, 1, 2], [0, 2, 3], "data must be float32, bfloat16 or float16, got float64"),
    ([[1.0, 2.0, 3.0]], [0, 1, 2], [0, 2, 3], "data must be 1-D"),
])
def test_impossible_conversions_raise(data, indices, indptr, match):
    with pytest.raises(SparseFilterError, match=match):
        _build(data, indices, indptr)


@given(rows=st.lists(st.sets(st.integers(0, 3), max_size=4), min_size=2, max_size=2),
       fractional=st.booleans(), seed=st.integers(0, 1000))
@settings(deadline=None)
def test_list_leaves_equal_array_leaves_and_never_truncate(rows, fractional, seed):
    indices = [c for row in rows for c in sorted(row)]
    indptr = [0, len(rows[0]), len(indices)]
    data = np.random.default_rng(seed).standard_normal(len(indices)).round(3).tolist()
    f = _build(data, indices, indptr)
    g = _build(np.asarray(data, np.float32), np.asarray(indices, np.int32), np.asarray(indptr, np.int32))
    np.testing.assert_array_equal(dense_from_filter(f), dense_from_filter(g))
    if fractional and indices:
        bad = list(indices)
        bad[seed % len(bad)] += 0.5
        with pytest.raises(SparseFilterError, match="indices must be a 1-D array of integers"):
            _build(data, bad, indptr)


@pytest.mark.parametrize("kw, match", [
    (dict(kernel_size=(1.5, 2)), "kernel_size must be a sequence of ints"),
    (dict(kernel_size=2), "kernel_size must be a sequence of ints"),
    (dict(in_channels=2.0), "in_channels must be an int"),
    (dict(out_channels="2"), "out_channels must be an int"),
])
def test_metadata_must_be_integers(kw, match):
    meta = dict(kernel_size=(1, 2), in_channels=2, out_channels=2) | kw
    with pytest.raises(TypeError, match=match):
        SparseFilter([1.0], [0], [0, 1, 1], **meta)


# ---- 6. zero-size inputs give lax's result without the native kernel ------------------------

def lax_conv(x, kernel, bias, *, strides, padding, dilation, relu):
    y = lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation, dimension_numbers=DN)
    y = y + bias if bias is not None else y
    return jnp.maximum(y, 0) if relu else y


EMPTY_CASES = [
    ((1, 0, 8, 2), "SAME", (1, 1), (1, 1)),
    ((1, 0, 8, 2), "VALID", (1, 1), (1, 1)),
    ((1, 0, 8, 2), ((1, 1), (1, 1)), (1, 1), (1, 1)),
    ((1, 0, 8, 2), ((2, 2), (0, 1)), (1, 2), (1, 1)),   # H = 0 but padded: output rows of bias only
    ((2, 5, 0, 2), "SAME", (2, 2), (1, 1)),
    ((2, 5, 0, 2), ((0, 0), (3, 0)), (1, 1), (1, 2)),
    ((0, 6, 6, 2), "SAME", (1, 1), (1, 1)),
    ((0, 6, 6, 2), "VALID", (2, 1), (1, 1)),
    ((0, 2, 2, 2), "VALID", (1, 1), (1, 1)),            # kernel larger than input: lax gives empty axes
    ((3, 0, 0, 2), "SAME_LOWER", (1, 1), (2, 2)),
]


@pytest.mark.parametrize("shape, padding, strides, dilation", EMPTY_CASES, ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_zero_size_inputs_match_lax(shape, padding, strides, dilation, relu):
    f = jaxsparse.random_filter(1, (3, 3), 2, 4, 0.5)
    bias = jnp.asarray([-1.0, 0.5, np.nan, 2.0], jnp.float32)
    x = jnp.zeros(shape, jnp.float32)
    kw = dict(strides=strides, padding=padding, dilation=dilation, relu=relu)
    expected = lax_conv(x, f.todense(), bias, **kw)
    call = lambda x, f, b: sparse_conv(x, f, strides=strides, padding=padding, rhs_dilation=dilation,  # noqa: E731
                                       bias=b, activation="relu" if relu else None)
    for out in (call(x, f, bias), jax.jit(call)(x, f, bias)):
        assert out.shape == expected.shape and out.dtype == expected.dtype
        np.testing.assert_array_equal(out, expected)
    no_bias = call(x, f, None)
    np.testing.assert_array_equal(no_bias, lax_conv(x, f.todense(), None, **kw))


def test_zero_size_inputs_under_vmap_and_grad_and_in_1d():
    f = jaxsparse.random_filter(2, (3, 3), 2, 4, 0.5)
    bias = jnp.asarray([1.0, -2.0, 3.0, 0.5])
    xs = jnp.zeros((3, 1, 0, 8, 2))
    out = jax.vmap(lambda x: sparse_conv(x, f, padding=((1, 1), (1, 1)), bias=bias))(xs)
    assert out.shape == (3, 1, 0, 8, 4)

    def loss(x, data, b):
        return jnp.sum(sparse_conv(x, f.with_data(data), padding=((2, 1), (1, 1)), bias=b) ** 2)

    def dense_loss(x, data, b):
        y = lax_conv(x, f.with_data(data).todense(), b, strides=(1, 1), padding=((2, 1), (1, 1)),
                     dilation=(1, 1), relu=False)
        return jnp.sum(y ** 2)

    x = jnp.zeros((1, 0, 5, 2))
    got = jax.grad(loss, argnums=(0, 1, 2))(x, f.data, bias)
    want = jax.grad(dense_loss, argnums=(0, 1, 2))(x, f.data, bias)
    assert loss(x, f.data, bias) > 0  # the padded rows make bias-only outputs
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w)
    f1 = jaxsparse.random_filter(3, (3,), 2, 4, 0.5)
    out = sparse_conv(jnp.zeros((2, 0, 2), jnp.bfloat16), f1.astype(jnp.bfloat16), padding="VALID")
    assert out.shape == (2, 0, 4) and out.dtype == jnp.bfloat16


def test_empty_input_does_not_call_the_native_kernel(f2):
    jaxpr = jax.make_jaxpr(lambda x: sparse_conv(x, f2, padding=((2, 2), (1, 1))))(jnp.zeros((1, 0, 6, 4)))
    assert "jaxsparse_sparse_conv" not in str(jaxpr)


@pytest.mark.parametrize("cin, cout", [(0, 4), (2, 0), (0, 0)])
def test_zero_channel_filters_match_lax(cin, cout):
    kernel = np.zeros((3, 3, cin, cout), np.float32)
    f = SparseFilter.from_dense(kernel)
    assert f.shape == (3, 3, cin, cout) and f.nnz == 0 and f.density == 0.0
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, cin)).astype(np.float32))
    bias = jnp.arange(cout, dtype=jnp.float32) - 1.5
    out = sparse_conv(x, f, bias=bias, activation="relu")
    expected = lax_conv(x, jnp.asarray(kernel), bias, strides=(1, 1), padding="SAME", dilation=(1, 1), relu=True)
    assert out.shape == expected.shape == (2, 5, 5, cout)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(f.todense(), kernel)


def test_nonempty_input_smaller_than_kernel_still_raises():
    # the deliberate departure from lax is kept for non-empty inputs
    f = jaxsparse.random_filter(0, (5, 5), 2, 3, 0.5)
    with pytest.raises(ValueError, match="larger than the padded input"):
        sparse_conv(jnp.ones((1, 4, 4, 2)), f, padding="VALID")
    assert sparse_conv(jnp.ones((0, 4, 4, 2)), f, padding="VALID").shape == (0, 0, 0, 3)



# ---- SparseConv takes the same geometry rules as sparse_conv ---------------------------

@pytest.mark.parametrize("kwargs", [dict(strides=1.7), dict(strides=(2, 1.0)), dict(kernel_dilation="2"),
                                    dict(padding=((1.5, 1), (1, 1))), dict(padding=["11", "00"]),
                                    dict(strides=True), dict(padding=1.0)])
def test_sparse_conv_layer_refuses_non_integer_geometry(kwargs):
    from flax import nnx
    from jaxsparse.nn import SparseConv
    with pytest.raises((TypeError, ValueError), match="SparseConv"):
        SparseConv(3, 4, (3, 3), sparsity=0.5, rngs=nnx.Rngs(0), **kwargs)


def test_sparse_conv_layer_keeps_integer_geometry():
    from flax import nnx
    from jaxsparse.nn import SparseConv
    layer = SparseConv(3, 4, (3, 3), strides=np.int64(2), padding=[(1, 0), 2], kernel_dilation=(1, 2),
                       sparsity=0.5, rngs=nnx.Rngs(0))
    assert layer.strides == (2, 2) and layer.padding == ((1, 0), (2, 2)) and layer.kernel_dilation == (1, 2)


# ---- any ordered iterable of ints is geometry; strings and sets are not --------------------

def test_generators_and_maps_are_materialised_once():
    from jaxsparse.geometry import as_static_ints
    assert normalize_ints((s for s in (2, 1)), 2, "strides") == (2, 1)
    assert normalize_ints(map(int, ["2", "1"]), 2, "strides") == (2, 1)
    assert normalize_ints(iter(np.array([1, 3])), 2, "strides") == (1, 3)
    assert normalize_ints(range(1, 3), 2, "strides") == (1, 2)
    assert as_static_ints((k for k in (3, 3)), "kernel_size") == (3, 3)
    assert normalize_padding(((lo, hi) for lo, hi in [(1, 0), (2, 1)]), (6, 6), (3, 3), (1, 1), (1, 1)) == \
        ((1, 0), (2, 1))
    assert normalize_padding([iter((1, 0)), map(int, (2, 1))], (6, 6), (3, 3), (1, 1), (1, 1)) == \
        ((1, 0), (2, 1))
    f = SparseFilter(np.ones(1, np.float32), [0], [0, 1], kernel_size=(k for k in (1, 2)), in_channels=2,
                     out_channels=1)
    assert f.kernel_size == (1, 2)
    with pytest.raises(TypeError, match=r"strides must be an int or a sequence of 2 ints, got \[2, 1.5\]"):
        normalize_ints((s for s in (2, 1.5)), 2, "strides")  # the materialised entries are shown
    with pytest.raises(ValueError, match="strides must have 2 entries"):
        normalize_ints((s for s in (2, 1, 1)), 2, "strides")


@pytest.mark.parametrize("value", [{1, 2}, frozenset({2, 3}), {1: 1, 2: 2}, {2: 1, 1: 2}.keys(), "12", b"12"])
def test_unordered_and_string_geometry_is_refused(value):
    from jaxsparse.geometry import as_static_ints
    with pytest.raises(TypeError, match="strides must be"):
        normalize_ints(value, 2, "strides")
    with pytest.raises(TypeError, match="kernel_size must be"):
        as_static_ints(value, "kernel_size")
    with pytest.raises(TypeError, match="padding must be"):
        normalize_padding([value, (0, 0)], (6, 6), (3, 3), (1, 1), (1, 1))


def test_sparse_conv_takes_generator_geometry(f2, x2):
    expected = sparse_conv(x2, f2, strides=(2, 1), rhs_dilation=(1, 2), padding=((1, 0), (2, 1)))
    got = sparse_conv(x2, f2, strides=(s for s in (2, 1)), rhs_dilation=map(int, (1, 2)),
                      padding=(p for p in ((1, 0), (2, 1))))
    np.testing.assert_array_equal(got, expected)


# ---- one definition of the dilated kernel size and of the fit check ------------------------

@given(size=st.integers(0, 12), kernel=st.integers(1, 5), stride=st.integers(1, 3), dilation=st.integers(1, 3),
       lo=st.integers(0, 3), hi=st.integers(0, 3))
@settings(deadline=None, max_examples=60)
def test_dilated_size_and_kernel_fits_agree_with_output_size(size, kernel, stride, dilation, lo, hi):
    from jaxsparse.geometry import dilated_size, kernel_fits, output_size
    assert dilated_size(kernel, dilation) == (kernel - 1) * dilation + 1
    assert kernel_fits(size, kernel, (lo, hi), dilation) == (output_size(size, kernel, stride, (lo, hi), dilation) >= 1)


def test_layer_padding_uses_the_op_padding_rules():
    # one walk of the (low, high) pairs: the layer also takes one int per dimension (as nnx does),
    # the op only pairs (as lax does); both refuse the same non-integers with their own names
    from jaxsparse.geometry import padding_pairs
    from jaxsparse.nn.layers import canonicalize_padding
    assert canonicalize_padding([(1, 0), 2], 2) == ((1, 0), (2, 2)) == \
        padding_pairs([(1, 0), 2], 2, int_per_dimension=True)
    assert canonicalize_padding(3, 1) == ((3, 3),) and canonicalize_padding("same_lower", 2) == "SAME_LOWER"
    with pytest.raises(TypeError, match="padding must be 'SAME', 'VALID' or 2"):
        padding_pairs([(1, 0), 2], 2)
    for bad in [((1.5, 1), (1, 1)), ((True, 1), (1, 1)), [(1, 0), "2"], [(1, 0, 1), (0, 0)]]:
        with pytest.raises(TypeError, match="SparseConv: padding"):
            canonicalize_padding(bad, 2)
        with pytest.raises(TypeError, match="^padding must be"):
            padding_pairs(bad, 2)
    with pytest.raises(ValueError, match="SparseConv: padding needs 2"):
        canonicalize_padding([(1, 0)], 2)
