"""sparse_conv under jit and vmap, and the native custom call on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxsparse
from jaxsparse import sparse_conv
from helpers import DTYPES, check_close, dense_from_filter, random_input

KW = dict(strides=(2, 1), padding=((1, 0), (2, 1)), rhs_dilation=(1, 2))


@pytest.fixture(scope="module")
def f():
    return jaxsparse.random_filter(1, (3, 2), 5, 7, 0.6)


@pytest.fixture(scope="module")
def x():
    return random_input(np.random.default_rng(1), (2, 7, 6, 5))


def stack_filters(filters):
    """One SparseFilter whose leaves carry a leading batch axis (same structure metadata)."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *filters)


def same_structure_filters(base, count, seed=0):
    """`count` filters with base's sparsity structure and different values."""
    rng = np.random.default_rng(seed)
    return [base.with_data(jnp.asarray(rng.standard_normal(base.nnz).astype(base.dtype)))
            for _ in range(count)]


def assert_same(a, b, dtype=np.float32):
    """Batched and per-example results agree to float32 rounding (the same sums, maybe reordered)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    assert np.any(b != 0)
    tol = 2e-6 if dtype == np.float32 else 1e-2
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


# ---- jit ----------------------------------------------------------------------

def test_eager_jit_closed_over_and_argument_agree(f, x):
    eager = sparse_conv(x, f, **KW)
    check_close(eager, x, f.todense(), **KW)
    closed = jax.jit(lambda x: sparse_conv(x, f, **KW))(x)
    as_arg = jax.jit(lambda x, f: sparse_conv(x, f, **KW))(x, f)
    static_kw = jax.jit(sparse_conv, static_argnames=("strides", "padding", "rhs_dilation"))(
        x, f, strides=(2, 1), padding=((1, 0), (2, 1)), rhs_dilation=(1, 2))
    for o in (closed, as_arg, static_kw):
        np.testing.assert_array_equal(np.asarray(o), np.asarray(eager))


def test_jit_argument_filter_does_not_retrace_for_new_values(f, x):
    traces = []

    @jax.jit
    def run(x, f):
        traces.append(1)
        return sparse_conv(x, f, **KW)

    g = same_structure_filters(f, 1)[0]
    a, b = run(x, f), run(x, g)
    assert len(traces) == 1
    check_close(b, x, g.todense(), **KW)
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_jit_bias_and_relu_traced(f, x):
    bias = jnp.linspace(-1, 1, 7)
    out = jax.jit(lambda x, b: sparse_conv(x, f, bias=b, activation="relu", **KW))(x, bias)
    check_close(out, x, f.todense(), bias=bias, relu=True, **KW)


def test_lowered_hlo_uses_native_custom_call(f, x):
    text = jax.jit(lambda x, f: sparse_conv(x, f, **KW)).lower(x, f).as_text()
    assert "jaxsparse_sparse_conv" in text
    assert "custom_call" in text
    assert "convolution" not in text  # not the dense fallback
    compiled = jax.jit(lambda x: sparse_conv(x, f, **KW)).lower(x).compile().as_text()
    assert "jaxsparse_sparse_conv" in compiled
    assert jaxsparse.cpu_available()


def test_vmapped_hlo_has_one_custom_call_no_loop(f, x):
    fs = stack_filters(same_structure_filters(f, 3))
    xs = jnp.stack([x, -x, 2 * x])
    text = jax.jit(jax.vmap(lambda x, f: sparse_conv(x, f, **KW))).lower(xs, fs).as_text()
    assert text.count("jaxsparse_sparse_conv") == 1
    assert "while" not in text  # folded into one call, no sequential loop


# ---- vmap ---------------------------------------------------------------------

@pytest.mark.parametrize("in_axis", [0, 1, 2, 3, 4, -1])
def test_vmap_over_x_any_axis(f, x, in_axis):
    xs = jnp.stack([x, -0.5 * x, x[::-1]], axis=in_axis)
    out = jax.vmap(lambda xx: sparse_conv(xx, f, **KW), in_axes=in_axis)(xs)
    loop = jnp.stack([sparse_conv(jnp.take(xs, i, axis=in_axis), f, **KW) for i in range(3)])
    assert_same(out, loop)
    check_close(out[1], -0.5 * x, f.todense(), **KW)


def test_vmap_over_x_out_axes_and_nested(f, x):
    xs = jnp.stack([jnp.stack([x, 2 * x]), jnp.stack([-x, x[:, ::-1]])])  # (2, 2, N, H, W, C)
    out = jax.vmap(jax.vmap(lambda xx: sparse_conv(xx, f, **KW)), out_axes=1)(xs)
    for i in range(2):
        for j in range(2):
            assert_same(out[j, i], sparse_conv(xs[i, j], f, **KW))


def test_vmap_over_filters_same_structure(f, x):
    filters = same_structure_filters(f, 4, seed=3)
    fs = stack_filters(filters)
    # map the values only: indices and indptr are shared (unbatched) leaves
    axes = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(f), [0, None, None])
    shared = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(f),
                                          [fs.data, f.indices, f.indptr])
    out = jax.vmap(lambda f: sparse_conv(x, f, **KW), in_axes=(axes,))(shared)
    for i, g in enumerate(filters):
        assert_same(out[i], sparse_conv(x, g, **KW))
        check_close(out[i], x, g.todense(), **KW)


def test_vmap_over_filters_all_leaves(f, x):
    filters = same_structure_filters(f, 3, seed=4)
    out = jax.vmap(lambda f: sparse_conv(x, f, **KW))(stack_filters(filters))
    for i, g in enumerate(filters):
        assert_same(out[i], sparse_conv(x, g, **KW))


def test_vmap_over_filters_different_structure_same_nnz(x):
    # documented: filters may differ in structure when nnz is equal
    filters = [jaxsparse.random_filter(s, (3, 2), 5, 7, 0.6) for s in range(3)]
    assert len({g.nnz for g in filters}) == 1
    assert not np.array_equal(np.asarray(filters[0].indices), np.asarray(filters[1].indices))
    out = jax.vmap(lambda f: sparse_conv(x, f, **KW))(stack_filters(filters))
    for i, g in enumerate(filters):
        assert_same(out[i], sparse_conv(x, g, **KW))


@pytest.mark.parametrize("x_axis", [0, 2, 4])
def test_vmap_over_filters_and_x(f, x, x_axis):
    filters = same_structure_filters(f, 3, seed=5)
    xs_list = [x, -x, random_input(np.random.default_rng(9), x.shape)]
    xs = jnp.stack(xs_list, axis=x_axis)
    out = jax.vmap(lambda x, f: sparse_conv(x, f, **KW), in_axes=(x_axis, 0))(xs, stack_filters(filters))
    for i, g in enumerate(filters):
        assert_same(out[i], sparse_conv(xs_list[i], g, **KW))
        check_close(out[i], xs_list[i], g.todense(), **KW)


def test_vmap_over_bias(f, x):
    biases = jnp.asarray(np.random.default_rng(6).standard_normal((3, 7)).astype(np.float32))
    out = jax.vmap(lambda b: sparse_conv(x, f, bias=b, activation="relu", **KW))(biases)
    for i in range(3):
        assert_same(out[i], sparse_conv(x, f, bias=biases[i], activation="relu", **KW))
    # bias and x together
    xs = jnp.stack([x, -x, 0.5 * x])
    out = jax.vmap(lambda x, b: sparse_conv(x, f, bias=b, **KW))(xs, biases)
    for i in range(3):
        assert_same(out[i], sparse_conv(xs[i], f, bias=biases[i], **KW))


def test_vmap_over_filters_x_and_bias_1d():
    base = jaxsparse.random_filter(2, (3,), 5, 6, 0.5)
    filters = same_structure_filters(base, 2, seed=7)
    rng = np.random.default_rng(7)
    xs = random_input(rng, (2, 3, 11, 5))
    biases = jnp.asarray(rng.standard_normal((2, 6)).astype(np.float32))
    kw = dict(strides=2, padding="SAME", rhs_dilation=2)
    out = jax.jit(jax.vmap(lambda x, f, b: sparse_conv(x, f, bias=b, **kw)))(xs, stack_filters(filters), biases)
    for i, g in enumerate(filters):
        assert_same(out[i], sparse_conv(xs[i], g, bias=biases[i], **kw))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_vmap_half_types(f, x, dtype):
    dt = DTYPES[dtype]
    filters = [g.astype(dt) for g in same_structure_filters(f, 2, seed=8)]
    xs = jnp.stack([x, -x]).astype(dt)
    out = jax.vmap(lambda x, f: sparse_conv(x, f, **KW))(xs, stack_filters(filters))
    assert out.dtype == dt
    for i, g in enumerate(filters):
        check_close(out[i], xs[i], g.todense(), **KW)


def test_vmap_inside_jit_and_jit_inside_vmap(f, x):
    fs = stack_filters(same_structure_filters(f, 2, seed=10))
    xs = jnp.stack([x, -x])
    a = jax.jit(jax.vmap(lambda x, f: sparse_conv(x, f, **KW)))(xs, fs)
    b = jax.vmap(jax.jit(lambda x, f: sparse_conv(x, f, **KW)))(xs, fs)
    c = jax.vmap(lambda x, f: sparse_conv(x, f, **KW))(xs, fs)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@given(batch=st.integers(1, 4), n=st.integers(1, 2), cin=st.integers(1, 6), cout=st.integers(1, 6),
       x_mapped=st.booleans(), f_mapped=st.booleans(), b_mapped=st.booleans(),
       sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]), seed=st.integers(0, 2**20))
def test_vmap_property(batch, n, cin, cout, x_mapped, f_mapped, b_mapped, sparsity, seed):
    rng = np.random.default_rng(seed)
    base = jaxsparse.random_filter(seed, (2, 3), cin, cout, sparsity)
    filters = same_structure_filters(base, batch, seed=seed) if f_mapped else [base] * batch
    xs = [random_input(rng, (n, 5, 6, cin)) for _ in range(batch if x_mapped else 1)] * (1 if x_mapped else batch)
    biases = [jnp.asarray(rng.standard_normal(cout).astype(np.float32))
              for _ in range(batch if b_mapped else 1)] * (1 if b_mapped else batch)
    kw = dict(strides=(1, 2), padding="SAME", rhs_dilation=(2, 1))

    def fn(x, f, b):
        return sparse_conv(x, f, bias=b, **kw)

    args = (jnp.stack(xs) if x_mapped else xs[0],
            stack_filters(filters) if f_mapped else base,
            jnp.stack(biases) if b_mapped else biases[0])
    in_axes = (0 if x_mapped else None, 0 if f_mapped else None, 0 if b_mapped else None)
    if all(a is None for a in in_axes):
        in_axes, args = (0, None, None), (jnp.stack(xs),) + args[1:]
    out = jax.jit(jax.vmap(fn, in_axes=in_axes))(*args)  # one compile per example
    assert out.shape[0] == batch
    for i in range(batch):
        check_close(out[i], xs[i], dense_from_filter(filters[i]), bias=biases[i], **kw)
