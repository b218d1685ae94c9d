"""sparse_conv on the GPU (CUDA custom call) against an independent float64 reference.

Every test is marked ``gpu``: conftest skips them without a GPU and fails them
under ``JAXSPARSE_REQUIRE_CUDA=1``. Each kernel family the dispatcher can pick
is exercised through the static option ``kernel`` (auto | direct | spmm |
naive | rowbucket | staged | cluster | halfwin), here set through its Python-side default
``JAXSPARSE_KERNEL`` (read at trace time; every helper traces anew), so that
one context manager covers every call of a test (rowbucket falls back to the
default choice for geometries it does not accept; halfwin, for bf16/f16 stride-1
layers only, to the plain tiled kernel elsewhere).
"""

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxsparse
from jaxsparse import sparse_conv
from jaxsparse.benchmark import kernel_time_us
from jaxsparse.options import KERNEL_ENV
from helpers import (DTYPES, RTOL, check_close, check_fused_relu_keeps_nan, draw_conv_geometry, filter_with_empty_rows,
                     random_input, ref_conv)

pytestmark = pytest.mark.gpu

FAMILIES = ("auto", "direct", "naive", "rowbucket", "staged", "cluster", "halfwin")


@contextlib.contextmanager
def kernel_family(family):
    old = os.environ.get(KERNEL_ENV)
    os.environ[KERNEL_ENV] = family
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(KERNEL_ENV, None)
        else:
            os.environ[KERNEL_ENV] = old


def poison_allocator(shape, dtype, copies=3):
    """Leaves freed NaN-filled buffers of the output's size for XLA's allocator to reuse,
    so output elements a kernel fails to write show up as non-finite."""
    bufs = [jnp.full(shape, jnp.nan, dtype) for _ in range(copies)]
    jax.block_until_ready(bufs)
    del bufs


def gpu_conv(x, f, **kw):
    """sparse_conv under jit on the GPU, with the filter as a traced argument."""
    bias = kw.pop("bias", None)
    fn = jax.jit(lambda x, f, b: sparse_conv(x, f, bias=b, **kw))
    return fn(x, f, bias)


def out_shape(x_shape, f, strides, padding, dilation):
    nd = f.ndim
    spatial = x_shape[1:-1]
    from jaxsparse.geometry import normalize_ints, normalize_padding, output_size
    st_ = normalize_ints(strides, nd, "strides")
    dl = normalize_ints(dilation, nd, "dilation")
    pads = normalize_padding(padding, spatial, f.kernel_size, st_, dl)
    return (x_shape[0],) + tuple(output_size(s, k, a, p, d) for s, k, a, p, d in
                                 zip(spatial, f.kernel_size, st_, pads, dl)) + (f.out_channels,)


def run_and_check(x, f, dtype, *, bias=None, relu=False, strides=1, padding="SAME", rhs_dilation=1):
    shape = out_shape(x.shape, f, strides, padding, rhs_dilation)
    poison_allocator(shape, dtype)
    out = gpu_conv(x, f, bias=bias, activation="relu" if relu else None, strides=strides,
                   padding=padding, rhs_dilation=rhs_dilation)
    out = jax.block_until_ready(out)
    assert list(out.devices())[0].platform == "gpu"
    kernel = np.asarray(f.todense(), np.float32).astype(dtype)
    return check_close(out, x, kernel, bias=bias, relu=relu, strides=strides, padding=padding,
                       rhs_dilation=rhs_dilation)


def gpu_put(a):
    return jax.device_put(a, jax.devices("gpu")[0])


# ---- lowering ---------------------------------------------------------------

def test_lowers_to_cuda_custom_call():
    rng = np.random.default_rng(0)
    f = jaxsparse.random_filter(0, (3, 3), 8, 8, 0.9)
    x = gpu_put(random_input(rng, (1, 10, 10, 8)))
    fn = jax.jit(lambda x, f: sparse_conv(x, f))
    lowered = fn.lower(x, f)
    text = lowered.as_text()
    assert "jaxsparse_sparse_conv" in text and "custom_call" in text
    hlo = lowered.compile().as_text()
    assert 'custom_call_target="jaxsparse_sparse_conv"' in hlo
    # No dense convolution anywhere: the densify fallback is not what runs.
    assert "convolution(" not in hlo and "cudnn" not in hlo.lower()


def test_lowers_to_custom_call_for_every_dtype_and_1d():
    rng = np.random.default_rng(1)
    for dtype in DTYPES.values():
        f = jaxsparse.random_filter(1, (3,), 6, 5, 0.5, dtype=dtype)
        x = gpu_put(random_input(rng, (2, 12, 6), dtype))
        hlo = jax.jit(lambda x, f: sparse_conv(x, f, padding="VALID")).lower(x, f).compile().as_text()
        assert 'custom_call_target="jaxsparse_sparse_conv"' in hlo, dtype


# ---- hypothesis cases, every family ------------------------------------------

@st.composite
def gpu_cases(draw):
    nd = draw(st.sampled_from([1, 2]))
    geometry = draw_conv_geometry(draw, nd, kernel=st.integers(1, 4), dilation=st.sampled_from([1, 1, 2, 3]),
                                  stride=st.sampled_from([1, 1, 2, 3]), extra=st.integers(0, 20))
    return dict(
        **geometry,
        batch=draw(st.sampled_from([1, 1, 2, 3])),
        cin=draw(st.sampled_from([1, 3, 4, 7, 8, 16, 24, 33])),
        cout=draw(st.sampled_from([1, 2, 5, 17, 32, 40])),
        sparsity=draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])),
        empty_rows=draw(st.booleans()), bias=draw(st.booleans()), relu=draw(st.booleans()),
        dtype=draw(st.sampled_from(list(DTYPES))), seed=draw(st.integers(0, 2**31 - 1)))


def run_case(c):
    rng = np.random.default_rng(c["seed"])
    dtype = DTYPES[c["dtype"]]
    empty = [r for r in range(c["cout"]) if c["empty_rows"] and r % 3 == 1]
    f = filter_with_empty_rows(rng, c["kernel_size"], c["cin"], c["cout"], c["sparsity"], dtype, empty)
    x = gpu_put(random_input(rng, (c["batch"],) + c["spatial"] + (c["cin"],), dtype))
    bias = jnp.asarray(rng.standard_normal(c["cout"]).astype(dtype)) if c["bias"] else None
    run_and_check(x, f, dtype, bias=bias, relu=c["relu"], strides=c["strides"],
                  padding=c["padding"], rhs_dilation=c["dilation"])


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=int(os.environ.get("JAXSPARSE_GPU_EXAMPLES", "40")))
@given(case=gpu_cases())
def test_matches_reference_property(family, case):
    with kernel_family(family):
        run_case(case)


# ---- 1x1 SpMM family -----------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batch,hw,cin,cout,stride", [
    (1, 14, 64, 256, 1), (2, 7, 512, 128, 1), (1, 13, 33, 17, 1), (1, 14, 256, 512, 2),
    (3, 9, 40, 24, 2)])
def test_1x1(family, dtype, batch, hw, cin, cout, stride):
    rng = np.random.default_rng(batch * 1000 + hw)
    dt = DTYPES[dtype]
    f = jaxsparse.random_filter(hw, (1, 1), cin, cout, 0.9, dtype=dt)
    x = gpu_put(random_input(rng, (batch, hw, hw, cin), dt))
    bias = jnp.asarray(rng.standard_normal(cout).astype(dt))
    with kernel_family(family):
        run_and_check(x, f, dt, bias=bias, relu=True, strides=stride, padding="VALID")


# ---- layer shapes of the benchmark ---------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name,batch,hw,cin,cout,sparsity", [
    ("conv1_2/2", 1, 112, 64, 64, 0.9),
    ("conv3_2", 1, 56, 256, 256, 0.9),
    ("conv4_1", 1, 28, 256, 512, 0.95),
    ("conv5_1", 2, 14, 512, 512, 0.9),
    ("conv5_1-98", 1, 14, 512, 512, 0.98),
])
@pytest.mark.parametrize("family", ("auto", "staged", "cluster", "halfwin"))
def test_vgg_layers(family, dtype, name, batch, hw, cin, cout, sparsity):
    rng = np.random.default_rng(hash(name) % 2**31)
    dt = DTYPES[dtype]
    f = jaxsparse.random_filter(7, (3, 3), cin, cout, sparsity, dtype=dt)
    x = gpu_put(random_input(rng, (batch, hw, hw, cin), dt))
    with kernel_family(family):
        run_and_check(x, f, dt, padding="SAME")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batch", [1, 50])
@pytest.mark.parametrize("width", [3, 4, 5])
@pytest.mark.parametrize("family", ("auto", "staged", "cluster", "halfwin"))
def test_sentence_cnn(family, dtype, batch, width):
    rng = np.random.default_rng(width + batch)
    dt = DTYPES[dtype]
    f = jaxsparse.random_filter(width, (width,), 300, 100, 0.9, dtype=dt)
    x = gpu_put(random_input(rng, (batch, 56, 300), dt))
    bias = jnp.asarray(rng.standard_normal(100).astype(dt))
    with kernel_family(family):
        run_and_check(x, f, dt, bias=bias, relu=True, padding="VALID")


# ---- DLMC patterns ----------------------------------------------------------------

DLMC_CASES = [  # layer, input hw, stride
    ("bottleneck_1_block_group1_1_1", 56, 1),
    ("bottleneck_3_block_group2_1_1", 28, 1),
    ("bottleneck_1_block_group3_1_1", 14, 1),
    ("bottleneck_3_block_group4_1_1", 7, 1),
    ("bottleneck_projection_block_group_projection_block_group3", 28, 2),
    ("bottleneck_2_block_group2_1_1", 28, 1),
]


@pytest.mark.parametrize("sparsity", [0.8, 0.9, 0.95, 0.98])
@pytest.mark.parametrize("layer,hw,stride", DLMC_CASES)
@pytest.mark.parametrize("family", ("auto", "staged", "cluster", "halfwin"))
def test_dlmc_patterns(dlmc_root, family, layer, hw, stride, sparsity):
    path = jaxsparse.dlmc.dlmc_path(layer, sparsity, dlmc_root)
    if not path.is_file():
        pytest.skip(f"{path} missing")
    for dtype in (np.float32, jnp.bfloat16):
        f = jaxsparse.load_dlmc(path, dtype=dtype, seed=3)
        rng = np.random.default_rng(5)
        x = gpu_put(random_input(rng, (1, hw, hw, f.in_channels), np.dtype(dtype)))
        with kernel_family(family):  # DLMC's uneven rows overflow some staged groups (streamed then)
            run_and_check(x, f, np.dtype(dtype), strides=stride,
                          padding="SAME" if f.kernel_size != (1, 1) else "VALID")


# ---- malformed structure: poisoned with NaN, never read out of bounds -------------
# Filters rebuilt from traced arrays cannot be checked in Python, and the CUDA kernels cannot
# raise without a device-to-host sync, so they poison: output channels whose CSR row is
# malformed are NaN (every channel if the end pointers are wrong). The row-bucketed kernel
# poisons per group of 16 channels, and everything if any pointer is disordered.

def semantic_reference(x, data, indices, indptr, kernel_size, cin, cout):
    """Dense kernel of the rows' entries as stored (the result of the rows not poisoned)."""
    taps = int(np.prod(kernel_size)) * cin
    rows = np.zeros((cout, taps))
    nnz = len(indices)
    for r in range(cout):
        b, e = max(int(indptr[r]), 0), min(int(indptr[r + 1]), nnz)
        for j in range(b, e):
            if 0 <= indices[j] < taps:
                rows[r, indices[j]] += data[j]
    return rows.T.reshape(tuple(kernel_size) + (cin, cout))


def poisoned_channels(indices, indptr, taps, cout, group=None):
    """(must, may): channels the kernels must set to NaN, and may (per-group poisoning)."""
    nnz = len(indices)
    ends_bad = indptr[0] != 0 or indptr[-1] != nnz

    def row_bad(r):
        b, e = int(indptr[r]), int(indptr[r + 1])
        return (ends_bad or b < 0 or e > nnz or b > e
                or any(not 0 <= c < taps for c in indices[max(b, 0):min(e, nnz)]))

    must = np.array([row_bad(r) for r in range(cout)])
    if group is None:
        return must, must
    if np.any(np.diff(indptr) < 0):
        return must, np.ones(cout, bool)
    may = must.copy()
    for g0 in range(0, cout, group):
        may[g0:g0 + group] = must[g0:g0 + group].any()
    return must, may


def _bad_column(r, column):
    def apply(indices, indptr, taps):
        indices[indptr[r]] = column(taps)  # the row's first entry
    return apply


def _swap_pointers(r):
    def apply(indices, indptr, taps):
        indptr[r], indptr[r + 1] = indptr[r + 1], indptr[r]  # row r: begin > end
    return apply


def _shift_pointer(at, delta):
    def apply(indices, indptr, taps):
        indptr[at] += delta
    return apply


MALFORMED = {
    "column_too_large": _bad_column(1, lambda taps: 10**6),
    "column_negative": _bad_column(4, lambda taps: -3),
    "column_equal_taps": _bad_column(17, lambda taps: taps),
    "disordered_pointers": _swap_pointers(2),
    "last_pointer_short": _shift_pointer(-1, -1),
    "first_pointer_not_zero": _shift_pointer(0, 1),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ksize", [(1, 1), (3, 3)])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_filter_is_poisoned(family, ksize, case):
    rng = np.random.default_rng(11)
    cin, cout = 8, 40  # three row-bucket groups of 16 (the last one partial)
    taps = int(np.prod(ksize)) * cin
    dt = np.dtype(jnp.bfloat16) if family == "halfwin" else np.dtype(np.float32)  # halfwin: 2-byte types only
    f = jaxsparse.random_filter(3, ksize, cin, cout, 0.5, dtype=dt)
    indices, indptr = np.array(f.indices), np.array(f.indptr)
    assert np.all(np.diff(indptr) > 0), "every row needs an entry to break"
    MALFORMED[case](indices, indptr, taps)
    bad = jaxsparse.SparseFilter(f.data, jnp.asarray(indices), jnp.asarray(indptr),
                                 kernel_size=ksize, in_channels=cin, out_channels=cout,
                                 validate=False)
    x = gpu_put(random_input(rng, (2, 9, 9, cin), dt))
    bias = gpu_put(random_input(rng, (cout,), dt))
    with kernel_family(family):
        out = jax.jit(lambda x, f, b: sparse_conv(x, f, bias=b, activation="relu"))(x, bad, bias)
        out = np.asarray(out, np.float64)
    must, may = poisoned_channels(indices, indptr, taps, cout, group=16 if family == "rowbucket" else None)
    assert must.any()
    nan = np.isnan(out).reshape(-1, cout)
    assert nan[:, must].all(), "malformed rows must be NaN at every pixel (through ReLU too)"
    kernel = semantic_reference(np.asarray(x), np.asarray(f.data, np.float64), indices, indptr,
                                ksize, cin, cout)
    xf, bf = np.asarray(x, np.float64), np.asarray(bias, np.float64)
    ref = ref_conv(xf, kernel, padding="SAME", bias=bf, relu=True)
    scale = ref_conv(xf, kernel, padding="SAME", bias=bf, absolute=True)
    rtol = 1e-5 if dt == np.float32 else RTOL[dt]
    for r in np.flatnonzero(~must):
        if may[r] and nan[:, r].all():
            continue  # poisoned with its row-bucket group
        assert not nan[:, r].any(), f"row {r} is well formed"
        assert np.all(np.abs(out[..., r] - ref[..., r]) <= rtol * scale[..., r] + 1e-30), r


def test_filter_grad_poisons_out_of_range_columns():
    """The filter-gradient kernel gives an out-of-range column a NaN gradient, the rest exact."""
    rng = np.random.default_rng(9)
    cin, cout = 8, 12
    f = jaxsparse.random_filter(3, (3, 3), cin, cout, 0.5)
    x = gpu_put(random_input(rng, (2, 7, 7, cin)))
    ind = np.array(f.indices)
    j_bad = int(np.asarray(f.indptr)[1])
    ind[j_bad] = 10**6

    def loss(data, indices):
        g = jaxsparse.SparseFilter(data, indices, f.indptr, kernel_size=(3, 3), in_channels=cin,
                                   out_channels=cout, validate=False)
        return jnp.sum(sparse_conv(x, g))  # d loss / d out = 1 everywhere, NaN rows or not

    grad = jax.jit(jax.grad(loss))
    bad = np.asarray(grad(f.data, jnp.asarray(ind)))
    good = np.asarray(grad(f.data, f.indices))
    assert np.isnan(bad[j_bad]) and np.isfinite(good).all()
    keep = np.arange(f.nnz) != j_bad
    np.testing.assert_allclose(bad[keep], good[keep], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_relu_keeps_nan_inputs(family):
    def conv(x, f, bias):
        with kernel_family(family):
            return np.asarray(jax.jit(lambda x, f, b: sparse_conv(x, f, bias=b, activation="relu"))(
                gpu_put(x), f, gpu_put(bias)))
    check_fused_relu_keeps_nan(conv)


# ---- repeated calls agree (no races) ----------------------------------------------

def test_repeatable():
    rng = np.random.default_rng(2)
    f = jaxsparse.random_filter(2, (3, 3), 256, 256, 0.9)
    x = gpu_put(random_input(rng, (1, 28, 28, 256)))
    fn = jax.jit(lambda x, f: sparse_conv(x, f))
    first = np.asarray(fn(x, f))
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(fn(x, f)), first)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name,batch,hw,cin,cout,sparsity,ksize", [
    ("conv3_2", 1, 56, 256, 256, 0.9, (3, 3)),
    ("conv5_1", 2, 14, 512, 512, 0.9, (3, 3)),
    ("conv1_2-cin64", 1, 28, 64, 40, 0.5, (3, 3)),
    ("3x5", 2, 20, 48, 33, 0.9, (3, 5)),
])
def test_rowbucket_layers(dtype, name, batch, hw, cin, cout, sparsity, ksize):
    """Opt-in row-bucketed family on benchmark-like shapes (many buckets, slices, groups)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    dt = DTYPES[dtype]
    f = jaxsparse.random_filter(9, ksize, cin, cout, sparsity, dtype=dt)
    x = gpu_put(random_input(rng, (batch, hw, hw, cin), dt))
    bias = jnp.asarray(rng.standard_normal(cout).astype(dt))
    with kernel_family("rowbucket"):
        run_and_check(x, f, dt, bias=bias, relu=True, padding="SAME")
        fn = jax.jit(lambda x, f: sparse_conv(x, f))
        first = np.asarray(fn(x, f))
        np.testing.assert_array_equal(np.asarray(fn(x, f)), first)  # deterministic sums


# ---- cluster family: it really runs, and its cross-block sums are deterministic ----

@pytest.mark.parametrize("name,batch,hw,cin,cout,ksize", [
    ("conv5_1", 1, 14, 512, 512, (3, 3)),
    ("r50g4red", 1, 7, 2048, 512, (1, 1)),
    ("odd", 2, 9, 37, 21, (3, 3)),
])
def test_cluster_family_runs_and_is_deterministic(name, batch, hw, cin, cout, ksize):
    rng = np.random.default_rng(sum(map(ord, name)))
    f = jaxsparse.random_filter(4, ksize, cin, cout, 0.9)
    x = gpu_put(random_input(rng, (batch, hw, hw, cin)))
    fn = jax.jit(lambda x, f: sparse_conv(x, f, padding="SAME", kernel="cluster"))
    names = list(kernel_time_us(fn, x, f, calls=2)["kernels"])
    # The variant is a template argument of the tiled kernel: (jaxsparse::tiled::Variant)2.
    assert any("Variant)2" in k for k in names), names
    first = np.asarray(fn(x, f))
    check_close(first, x, np.asarray(f.todense()), padding="SAME")
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(fn(x, f)), first)


# ---- half-width family: it really runs (bf16/f16), with and without the shifted copy ----

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name,batch,hw,cin,cout,ksize,dilation", [
    ("conv3_2", 1, 28, 256, 256, (3, 3), 1),   # odd tap offsets: the shifted copy
    ("dilated2", 2, 13, 24, 40, (3, 3), 2),    # even tap offsets only: no copy
    ("dilated3-odd", 1, 11, 37, 21, (3, 3), 3),  # Cin not a multiple of 8: scalar fill
    ("r50g1red", 2, 14, 256, 64, (1, 1), 1),   # SpMM form
    ("kim-w5", 3, 1, 300, 100, (1, 5), 1),     # sentence CNN, VALID
])
def test_halfwin_family_runs(dtype, name, batch, hw, cin, cout, ksize, dilation):
    rng = np.random.default_rng(sum(map(ord, name)))
    dt = DTYPES[dtype]
    f = jaxsparse.random_filter(6, ksize, cin, cout, 0.9, dtype=dt)
    width = 56 if name == "kim-w5" else hw
    x = gpu_put(random_input(rng, (batch, hw, width, cin), dt))
    padding = "VALID" if name == "kim-w5" else "SAME"
    bias = jnp.asarray(rng.standard_normal(cout).astype(dt))
    fn = jax.jit(lambda x, f, b: sparse_conv(x, f, bias=b, activation="relu", padding=padding,
                                             rhs_dilation=dilation, kernel="halfwin"))
    names = list(kernel_time_us(fn, x, f, bias, calls=2)["kernels"])
    # The variant is a template argument of the tiled kernel: (jaxsparse::tiled::Variant)3.
    assert any("Variant)3" in k for k in names), names
    shape = out_shape(x.shape, f, 1, padding, dilation)
    poison_allocator(shape, dt)
    check_close(fn(x, f, bias), x, np.asarray(f.todense(), np.float32).astype(dt), bias=bias, relu=True,
                padding=padding, rhs_dilation=dilation)
