"""sparse_conv on the CPU against an independent float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

import jaxsparse
from jaxsparse import sparse_conv
from helpers import (DTYPES, check_close, check_fused_relu_keeps_nan, dense_from_filter, draw_conv_geometry,
                     filter_with_empty_rows, random_input, ref_conv, resolve_padding)


@st.composite
def conv_cases(draw, nd=None):
    nd = draw(st.sampled_from([1, 2])) if nd is None else nd
    geometry = draw_conv_geometry(draw, nd, kernel=st.integers(1, 3), dilation=st.integers(1, 3),
                                  stride=st.integers(1, 3), extra=st.integers(0, 5))
    return dict(
        nd=nd, **geometry,
        batch=draw(st.sampled_from([1, 1, 2, 3])),
        cin=draw(st.integers(1, 11)),
        cout=draw(st.integers(1, 11)),
        sparsity=draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])),
        empty_rows=draw(st.booleans()),
        bias=draw(st.booleans()),
        relu=draw(st.booleans()),
        dtype=draw(st.sampled_from(list(DTYPES))),
        scalar_args=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run_case(c):
    rng = np.random.default_rng(c["seed"])
    dtype = DTYPES[c["dtype"]]
    empty = [r for r in range(c["cout"]) if c["empty_rows"] and r % 3 == 1]
    f = filter_with_empty_rows(rng, c["kernel_size"], c["cin"], c["cout"], c["sparsity"], dtype, empty)
    for r in empty:
        assert f.indptr[r] == f.indptr[r + 1]
    x = random_input(rng, (c["batch"],) + c["spatial"] + (c["cin"],), dtype)
    bias = jnp.asarray(rng.standard_normal(c["cout"]).astype(dtype)) if c["bias"] else None
    strides, dilation = c["strides"], c["dilation"]
    if c["scalar_args"] and len(set(strides)) == 1 and len(set(dilation)) == 1:
        strides, dilation = strides[0], dilation[0]
    kw = dict(strides=strides, padding=c["padding"], rhs_dilation=dilation)
    out = sparse_conv(x, f, bias=bias, activation="relu" if c["relu"] else None, **kw)
    dense = dense_from_filter(f)
    ref = check_close(out, x, dense, bias=bias, relu=c["relu"], **kw)
    if not c["relu"] and np.any(ref_conv(np.asarray(x, np.float32), dense, absolute=True, **kw) > 0):
        assert np.any(ref != 0)  # some product landed inside the input: not a vacuous comparison
    return out, ref, f


@given(conv_cases())
def test_matches_reference_property(case):
    run_case(case)


@given(conv_cases(nd=2))
def test_matches_reference_property_2d(case):
    run_case(case)


@given(conv_cases(nd=1))
def test_matches_reference_property_1d(case):
    run_case(case)


# ---- the reference itself follows lax.conv_general_dilated -------------------

@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID", "explicit"])
def test_reference_matches_lax(nd, padding):
    rng = np.random.default_rng(11)
    spatial = (7, 8)[:nd]
    kernel = rng.standard_normal((3, 2)[:nd] + (3, 4)).astype(np.float32)
    x = rng.standard_normal((2,) + spatial + (3,)).astype(np.float32)
    strides, dil = (2, 1)[:nd], (1, 2)[:nd]
    pad = ((2, 0), (1, 3))[:nd] if padding == "explicit" else padding
    dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NWC", "WIO", "NWC")
    y = lax.conv_general_dilated(x, kernel, strides, pad, rhs_dilation=dil, dimension_numbers=dn,
                                 precision=lax.Precision.HIGHEST)
    ref = ref_conv(x, kernel, strides=strides, padding=pad, rhs_dilation=dil)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    if isinstance(pad, str):
        assert resolve_padding(pad, spatial, kernel.shape[:nd], strides, dil) == \
            tuple(lax.padtype_to_pads(spatial, [(k - 1) * d + 1 for k, d in zip(kernel.shape[:nd], dil)],
                                      strides, pad))


# ---- targeted cases -------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("pattern", ["magnitude", "uniform"])
def test_resnet_like_3x3(dtype, sparsity, pattern):
    rng = np.random.default_rng(1)
    dt = DTYPES[dtype]
    f = jaxsparse.random_filter(2, (3, 3), 19, 21, sparsity, dtype=dt, pattern=pattern)
    x = random_input(rng, (2, 9, 10, 19), dt)
    bias = jnp.asarray(rng.standard_normal(21).astype(dt))
    out = sparse_conv(x, f, strides=1, padding="SAME", bias=bias)
    check_close(out, x, f.todense(), bias=bias, strides=1, padding="SAME")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_1x1_strided_batch1_many_channels(dtype):
    rng = np.random.default_rng(3)
    dt = DTYPES[dtype]
    f = jaxsparse.random_filter(4, (1, 1), 67, 45, 0.8, dtype=dt)
    x = random_input(rng, (1, 11, 9, 67), dt)
    out = sparse_conv(x, f, strides=2, padding="VALID", activation="relu")
    ref = check_close(out, x, f.todense(), relu=True, strides=2, padding="VALID")
    assert np.any(ref > 0) and np.any(ref == 0)  # ReLU active on some outputs, not all


def test_asymmetric_padding_dilation_stride_2d():
    rng = np.random.default_rng(5)
    f = jaxsparse.random_filter(5, (3, 2), 5, 6, 0.5)
    x = random_input(rng, (2, 8, 7, 5))
    kw = dict(strides=(2, 3), padding=((3, 0), (0, 2)), rhs_dilation=(2, 1))
    out = sparse_conv(x, f, **kw)
    check_close(out, x, f.todense(), **kw)
    y = lax.conv_general_dilated(x, f.todense(), (2, 3), ((3, 0), (0, 2)), rhs_dilation=(2, 1),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(out), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_1d_conv():
    rng = np.random.default_rng(6)
    f = jaxsparse.random_filter(6, (4,), 7, 5, 0.5)
    assert f.ndim == 1
    x = random_input(rng, (3, 13, 7))
    for kw in (dict(strides=2, padding="SAME", rhs_dilation=2),
               dict(strides=(1,), padding=[(2, 1)], rhs_dilation=(3,)),
               dict(strides=3, padding="VALID")):
        out = sparse_conv(x, f, **kw)
        check_close(out, x, f.todense(), **kw)
        y = lax.conv_general_dilated(x, f.todense(), kw["strides"] if isinstance(kw["strides"], tuple)
                                     else (kw["strides"],), kw["padding"],
                                     rhs_dilation=kw.get("rhs_dilation", 1) if isinstance(
                                         kw.get("rhs_dilation", 1), tuple) else (kw.get("rhs_dilation", 1),),
                                     dimension_numbers=("NWC", "WIO", "NWC"),
                                     precision=lax.Precision.HIGHEST)
        np.testing.assert_allclose(np.asarray(out), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_bias_before_relu_and_all_zero_filter():
    rng = np.random.default_rng(7)
    f = jaxsparse.random_filter(7, (3, 3), 4, 6, 1.0)
    assert f.nnz == 0
    x = random_input(rng, (2, 5, 5, 4))
    bias = jnp.asarray([1.5, -2.0, 0.25, -0.5, 3.0, 0.0], jnp.float32)
    out = sparse_conv(x, f, bias=bias, activation=jax.nn.relu)
    np.testing.assert_array_equal(np.asarray(out), np.broadcast_to([1.5, 0, 0.25, 0, 3.0, 0], out.shape))
    out = sparse_conv(x, f, bias=bias)
    np.testing.assert_array_equal(np.asarray(out), np.broadcast_to(np.asarray(bias), out.shape))


def test_fused_relu_keeps_nan_inputs():
    check_fused_relu_keeps_nan(lambda x, f, bias: np.asarray(jax.jit(
        lambda x, f, b: sparse_conv(x, f, bias=b, activation="relu"))(x, f, bias)))


def test_activation_spellings_agree():
    rng = np.random.default_rng(8)
    f = jaxsparse.random_filter(8, (3, 3), 3, 4, 0.5)
    x = random_input(rng, (1, 6, 6, 3))
    a = sparse_conv(x, f, activation="relu")
    b = sparse_conv(x, f, activation="ReLU")
    c = sparse_conv(x, f, activation=jax.nn.relu)
    d = jnp.maximum(sparse_conv(x, f), 0)
    for o in (b, c, d):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(o))
    assert np.any(np.asarray(a) > 0) and np.any(np.asarray(sparse_conv(x, f)) < 0)


def test_single_row_empty_and_full_rows():
    # one output channel fully dense, one empty, one with a single tap at the last column
    cin, k = 3, (2, 2)
    dense = np.zeros(k + (cin, 3), np.float32)
    dense[..., 0] = np.arange(12, dtype=np.float32).reshape(2, 2, 3) - 5.5
    dense[1, 1, 2, 2] = 2.0
    f = jaxsparse.SparseFilter.from_dense(dense)
    np.testing.assert_array_equal(np.diff(np.asarray(f.indptr)), [12, 0, 1])
    x = random_input(np.random.default_rng(9), (2, 4, 5, cin))
    out = sparse_conv(x, f, padding="VALID")
    check_close(out, x, dense, padding="VALID")
    assert not np.any(np.asarray(out[..., 1]))


def test_bias_dtype_is_cast_to_x():
    rng = np.random.default_rng(10)
    f = jaxsparse.random_filter(10, (1, 1), 4, 3, 0.0, dtype=jnp.bfloat16)
    x = random_input(rng, (1, 3, 3, 4), jnp.bfloat16)
    bias = np.array([0.1, 0.2, 0.3], np.float32)  # float32 bias with bfloat16 x
    out = sparse_conv(x, f, bias=bias)
    assert out.dtype == jnp.bfloat16
    check_close(out, x, f.todense(), bias=bias.astype(jnp.bfloat16))


def test_zero_batch_returns_empty():
    f = jaxsparse.random_filter(0, (3, 3), 3, 4, 0.5)
    out = sparse_conv(jnp.zeros((0, 5, 5, 3)), f)
    assert out.shape == (0, 5, 5, 4)


def test_thread_count_does_not_change_result(monkeypatch):
    rng = np.random.default_rng(12)
    f = jaxsparse.random_filter(12, (3, 3), 13, 17, 0.7)
    x = random_input(rng, (1, 12, 11, 13))
    outs = []
    for threads in ("1", "3", "64"):
        monkeypatch.setenv("JAXSPARSE_CPU_THREADS", threads)
        outs.append(np.asarray(jax.jit(lambda x: sparse_conv(x, f, padding="SAME"))(x)))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    check_close(outs[0], x, f.todense())


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dense_fallback_lowering_matches(dtype):
    """The pure-JAX fallback (used where no native target exists) has the same semantics."""
    from jaxsparse.options import ConvOptions
    from jaxsparse.primitive import _dense_fallback
    rng = np.random.default_rng(13)
    dt = DTYPES[dtype]
    f = jaxsparse.random_filter(13, (3, 2), 5, 6, 0.6, dtype=dt)
    x = random_input(rng, (2, 7, 6, 5), dt)
    bias = jnp.asarray(rng.standard_normal(6).astype(dt))
    out = _dense_fallback(x, f.data, f.indices, f.indptr, bias, kernel_size=(3, 2), strides=(2, 1),
                          padding=((1, 0), (2, 1)), dilation=(1, 2), relu=True,
                          options=ConvOptions(precision=lax.Precision.HIGHEST))
    check_close(out, x, f.todense(), bias=bias, relu=True, strides=(2, 1),
                padding=((1, 0), (2, 1)), rhs_dilation=(1, 2))


def test_half_types_are_not_upcast_in_python():
    """bfloat16/float16 operands reach the custom call in their own dtype."""
    for dt in (jnp.bfloat16, jnp.float16):
        f = jaxsparse.random_filter(0, (3, 3), 4, 5, 0.5, dtype=dt)
        x = jnp.ones((1, 6, 6, 4), dt)
        jaxpr = jax.make_jaxpr(lambda x: sparse_conv(x, f))(x)
        eqns = [e for e in jaxpr.jaxpr.eqns if e.primitive is jaxsparse.sparse_conv_p]
        assert len(eqns) == 1
        assert eqns[0].invars[0].aval.dtype == dt and eqns[0].invars[1].aval.dtype == dt
        assert eqns[0].outvars[0].aval.dtype == dt
        assert not any(e.primitive.name == "convert_element_type" for e in jaxpr.jaxpr.eqns)

