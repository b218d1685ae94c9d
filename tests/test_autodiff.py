"""Gradients through sparse_conv: JVP, VJP, grad, vmap of grad, check_grads (orders 1, 2).

Compared against a float64 reference: the same function written with the dense
kernel and `lax.conv_general_dilated` under x64, differentiated by JAX.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax import lax
from jax.test_util import check_grads

import jaxsparse
from jaxsparse.csr import transpose_structure
from jaxsparse.filter_grad import filter_grad, sparse_conv_filter_grad_p
from jaxsparse.options import ConvOptions

CONFIGS = [
    # kernel_size, strides, padding, dilation
    ((3, 3), 1, "SAME", 1),
    ((3, 3), 2, "SAME", 1),
    ((3, 2), 2, ((2, 0), (1, 3)), 2),
    ((2, 3), 3, "VALID", (1, 2)),
    ((1, 1), 1, "VALID", 1),
    ((1, 1), 2, "VALID", 1),
    ((3,), 1, "VALID", 1),       # 1-D
    ((5,), 2, ((3, 1),), 2),      # 1-D, strided, dilated, asymmetric
]


def _inputs(kernel_size, sparsity=0.5, cin=5, cout=6, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    f = jaxsparse.random_filter(seed + 1, kernel_size, cin, cout, sparsity)
    spatial = (9, 8)[: len(kernel_size)]
    x = rng.standard_normal((batch,) + spatial + (cin,)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    return f, x, b


def _dense64(f, x, data, b, *, strides, padding, dilation, relu):
    """float64 reference of the same function, differentiable in x, data, b."""
    nd = f.ndim
    w = jaxsparse.SparseFilter(data, f.indices, f.indptr, kernel_size=f.kernel_size,
                               in_channels=f.in_channels, out_channels=f.out_channels,
                               validate=False).todense()
    dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NWC", "WIO", "NWC")
    s = (strides,) * nd if isinstance(strides, int) else strides
    d = (dilation,) * nd if isinstance(dilation, int) else dilation
    y = lax.conv_general_dilated(x, w, s, padding, rhs_dilation=d, dimension_numbers=dn,
                                 precision=lax.Precision.HIGHEST) + b
    return jnp.maximum(y, 0) if relu else y


@pytest.mark.parametrize("kernel_size,strides,padding,dilation", CONFIGS)
@pytest.mark.parametrize("relu", [False, True])
def test_grad_matches_float64_reference(kernel_size, strides, padding, dilation, relu):
    f, x, b = _inputs(kernel_size)
    kw = dict(strides=strides, padding=padding, dilation=dilation, relu=relu)

    def sparse(x, data, b):
        return jaxsparse.sparse_conv(x, f.with_data(data), strides=strides, padding=padding,
                                     rhs_dilation=dilation, bias=b, activation="relu" if relu else None)

    y = sparse(jnp.asarray(x), f.data, jnp.asarray(b))
    ct = np.random.default_rng(7).standard_normal(y.shape)
    grads = jax.grad(lambda *a: jnp.sum(sparse(*a) * ct), argnums=(0, 1, 2))(jnp.asarray(x), f.data, jnp.asarray(b))
    with jax.enable_x64(True):
        ref = jax.grad(lambda *a: jnp.sum(_dense64(f, *a, **kw) * ct), argnums=(0, 1, 2))(
            jnp.asarray(x, jnp.float64), jnp.asarray(f.data, jnp.float64), jnp.asarray(b, jnp.float64))
    for got, want in zip(grads, ref):
        want = np.asarray(want)
        assert np.abs(want).max() > 0  # never compare on all-zero data
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("kernel_size,strides,padding,dilation", CONFIGS)
def test_check_grads_orders_1_and_2(kernel_size, strides, padding, dilation):
    f, x, b = _inputs(kernel_size)

    def conv(x, data, b):
        return jaxsparse.sparse_conv(x, f.with_data(data), strides=strides, padding=padding,
                                     rhs_dilation=dilation, bias=b)

    check_grads(conv, (jnp.asarray(x), f.data, jnp.asarray(b)), order=2, modes=("fwd", "rev"),
                atol=2e-2, rtol=2e-2)


def test_jvp_and_vjp_agree():
    f, x, b = _inputs((3, 3))
    x = jnp.asarray(x)

    def conv(x, data):
        return jaxsparse.sparse_conv(x, f.with_data(data), strides=2, padding="SAME")

    tx = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape).astype(np.float32))
    td = jnp.asarray(np.random.default_rng(4).standard_normal(f.data.shape).astype(np.float32))
    y, ty = jax.jvp(conv, (x, f.data), (tx, td))
    ct = jnp.asarray(np.random.default_rng(5).standard_normal(y.shape).astype(np.float32))
    _, vjp = jax.vjp(conv, x, f.data)
    cx, cd = vjp(ct)
    # <ct, J t> == <J^T ct, t>
    lhs = float(jnp.vdot(ct, ty))
    rhs = float(jnp.vdot(cx, tx) + jnp.vdot(cd, td))
    assert abs(lhs - rhs) <= 1e-4 * max(1.0, abs(lhs))


def test_vmap_of_grad_gives_per_example_gradients():
    f, x, _ = _inputs((3, 3), batch=3)

    def loss(data, xi):
        return jnp.sum(jaxsparse.sparse_conv(xi[None], f.with_data(data), padding="SAME") ** 2)

    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0))(f.data, jnp.asarray(x))
    loop = jnp.stack([jax.grad(loss)(f.data, jnp.asarray(x[i])) for i in range(3)])
    np.testing.assert_allclose(per_example, loop, rtol=1e-5, atol=1e-5)


def test_gradients_run_on_native_kernels():
    f, x, _ = _inputs((3, 3))

    def loss(x, data):
        return jnp.sum(jaxsparse.sparse_conv(x, f.with_data(data), strides=2) ** 2)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(jnp.asarray(x), f.data).as_text()
    assert "jaxsparse_sparse_conv_filter_grad" in hlo      # values: native SDDMM
    assert hlo.count("custom_call @jaxsparse_sparse_conv(") >= 2  # forward + input gradient
    assert "convolution" not in hlo                          # nothing densified


@given(sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]), cin=st.integers(1, 7), cout=st.integers(1, 7),
       stride=st.integers(1, 3), dilation=st.integers(1, 2), k=st.integers(1, 3),
       padding=st.sampled_from(["SAME", "VALID", ((1, 0), (0, 2))]))
def test_transposed_filter_is_the_flipped_transpose(sparsity, cin, cout, stride, dilation, k, padding):
    f = jaxsparse.random_filter(0, (k, k), cin, cout, sparsity)
    data, indices, indptr = transpose_structure(f.data, f.indices, f.indptr, (k, k), cin)
    t = jaxsparse.SparseFilter(data, indices, indptr, kernel_size=(k, k), in_channels=cout,
                               out_channels=cin)  # validates the structure (sorted, in range)
    want = np.transpose(np.asarray(f.todense())[::-1, ::-1], (0, 1, 3, 2))
    np.testing.assert_array_equal(np.asarray(t.todense()), want)


@given(sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       k=st.integers(1, 3), size=st.integers(3, 8), padding=st.sampled_from(["SAME", "VALID", ((2, 0), (0, 1))]))
def test_filter_grad_matches_dense_weight_gradient(sparsity, stride, dilation, k, size, padding):
    cin, cout = 3, 5
    f = jaxsparse.random_filter(1, (k, k), cin, cout, sparsity)
    rng = np.random.default_rng(size)
    x = jnp.asarray(rng.standard_normal((2, size, size + 1, cin)).astype(np.float32))
    if (size + (0 if padding != ((2, 0), (0, 1)) else 2)) < (k - 1) * dilation + 1 and padding != "SAME":
        return
    try:
        y = jaxsparse.sparse_conv(x, f, strides=stride, padding=padding, rhs_dilation=dilation)
    except ValueError:
        return  # kernel larger than padded input: covered by the error tests
    dy = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
    got = jax.grad(lambda d: jnp.sum(jaxsparse.sparse_conv(x, f.with_data(d), strides=stride, padding=padding,
                                                           rhs_dilation=dilation) * dy))(f.data)
    with jax.enable_x64(True):
        w = jnp.asarray(f.todense(), jnp.float64)
        _, vjp = jax.vjp(lambda w: lax.conv_general_dilated(
            jnp.asarray(x, jnp.float64), w, (stride, stride), padding, rhs_dilation=(dilation, dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC")), w)
        dense = np.asarray(vjp(jnp.asarray(dy, jnp.float64))[0]).reshape(-1, cout)
    rows = np.repeat(np.arange(cout), np.diff(np.asarray(f.indptr)))
    want = dense[np.asarray(f.indices), rows]
    scale = max(1.0, float(np.abs(dense).max()))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_gradients(dtype):
    f, x, _ = _inputs((3, 3))
    fh = f.astype(dtype)
    xh = jnp.asarray(x).astype(dtype)

    def loss(x, data):
        return jnp.sum(jaxsparse.sparse_conv(x, fh.with_data(data)).astype(jnp.float32) ** 2)

    gx, gd = jax.grad(loss, argnums=(0, 1))(xh, fh.data)
    assert gx.dtype == dtype and gd.dtype == dtype
    rx, rd = jax.grad(lambda x, d: jnp.sum(jaxsparse.sparse_conv(x, f.with_data(d)) ** 2), argnums=(0, 1))(
        xh.astype(jnp.float32), fh.data.astype(jnp.float32))
    tol = 3e-2
    assert float(jnp.linalg.norm(gx.astype(jnp.float32) - rx)) <= tol * float(jnp.linalg.norm(rx))
    assert float(jnp.linalg.norm(gd.astype(jnp.float32) - rd)) <= tol * float(jnp.linalg.norm(rd))


def test_filter_grad_primitive_is_registered():
    assert sparse_conv_filter_grad_p.name == "jaxsparse_sparse_conv_filter_grad"
    f, x, _ = _inputs((1, 1))
    dy = jnp.ones((2, 9, 8, 6), jnp.float32)
    out = filter_grad(jnp.asarray(x), dy, f.indices, f.indptr, kernel_size=(1, 1), strides=(1, 1),
                      padding=((0, 0), (0, 0)), dilation=(1, 1), options=ConvOptions())
    assert out.shape == f.data.shape
