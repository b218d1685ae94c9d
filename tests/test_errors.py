"""Bad call arguments raise clear Python errors; bad traced filters are caught by the CPU kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse
from jaxsparse import SparseFilter, SparseFilterError, sparse_conv


@pytest.mark.parametrize("shape", [(6, 6, 4), (2, 1, 6, 6, 4), (4,)])
def test_rank_2d(f2, shape):
    with pytest.raises(ValueError, match=r"x must have rank 4 \(N, H, W, C\) for a 2-D filter"):
        sparse_conv(jnp.ones(shape), f2)


def test_rank_1d():
    f = jaxsparse.random_filter(0, (3,), 4, 5, 0.5)
    with pytest.raises(ValueError, match=r"x must have rank 3 \(N, W, C\) for a 1-D filter"):
        sparse_conv(jnp.ones((1, 6, 6, 4)), f)


@pytest.mark.parametrize("xdt, fdt", [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.float16),
                                      (jnp.float16, jnp.bfloat16)])
def test_dtype_mismatch(xdt, fdt):
    f = jaxsparse.random_filter(0, (3, 3), 4, 5, 0.5, dtype=fdt)
    with pytest.raises(TypeError, match="dtype mismatch"):
        sparse_conv(jnp.ones((1, 6, 6, 4), xdt), f)


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.int8, np.complex64, np.bool_])
def test_unsupported_x_dtype(f2, dtype):
    # checked on the array as passed, before jnp.asarray would silently turn float64 into float32
    with pytest.raises(TypeError, match="float32, bfloat16 or float16|dtype mismatch"):
        sparse_conv(np.ones((1, 6, 6, 4), dtype), f2)


def test_float64_under_x64(f2):
    with jax.enable_x64(True):
        with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16, got float64"):
            sparse_conv(jnp.ones((1, 6, 6, 4), jnp.float64), f2)


def test_channel_mismatch(f2):
    with pytest.raises(ValueError, match="channel mismatch: x has 3 channels, the filter expects 4"):
        sparse_conv(jnp.ones((1, 6, 6, 3)), f2)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(strides=0), ValueError, "strides must be positive"),
    (dict(strides=(1, -1)), ValueError, "strides must be positive"),
    (dict(strides=(1, 1, 1)), ValueError, "strides must have 2 entries"),
    (dict(strides="ab"), TypeError, "strides must be an int or a sequence"),
    (dict(strides=None), TypeError, "strides must be an int or a sequence"),
    (dict(rhs_dilation=0), ValueError, "rhs_dilation must be positive"),
    (dict(rhs_dilation=(2, 0)), ValueError, "rhs_dilation must be positive"),
    (dict(rhs_dilation=(2,)), ValueError, "rhs_dilation must have 2 entries"),
    (dict(padding="same-ish"), ValueError, "padding must be 'SAME', 'VALID'"),
    (dict(padding="FULL"), ValueError, "padding must be 'SAME', 'VALID'"),
    (dict(padding=((1, 1),)), ValueError, "padding needs 2 \\(low, high\\) pairs"),
    (dict(padding=((1, 1), (1, 1), (0, 0))), ValueError, "padding needs 2 \\(low, high\\) pairs"),
    (dict(padding=((1, 1), (1,))), TypeError, "padding must be 'SAME', 'VALID' or 2 \\(low, high\\) pairs"),
    (dict(padding=((1, 2, 3), (1, 1))), TypeError, "padding must be 'SAME', 'VALID' or 2"),
    (dict(padding=((-1, 1), (1, 1))), ValueError, "padding must be non-negative"),
    (dict(padding=((0, 0), (0, -2))), ValueError, "padding must be non-negative"),
    (dict(padding=None), TypeError, "padding must be"),
    (dict(bias=jnp.ones(4)), ValueError, r"bias must have shape \(5,\), got \(4,\)"),
    (dict(bias=jnp.ones((1, 5))), ValueError, r"bias must have shape \(5,\)"),
    (dict(bias=jnp.ones(())), ValueError, r"bias must have shape \(5,\)"),
    (dict(activation="gelu"), ValueError, "activation must be None, 'relu'"),
    (dict(activation=jax.nn.gelu), ValueError, "activation must be None, 'relu'"),
    (dict(activation=1), ValueError, "activation must be None, 'relu'"),
])
def test_bad_arguments(f2, x2, kw, exc, match):
    with pytest.raises(exc, match=match):
        sparse_conv(x2, f2, **kw)


@pytest.mark.parametrize("bad", [np.ones((3, 3, 4, 5), np.float32), "filter", None,
                                 (np.ones(3), np.zeros(3, np.int32), np.zeros(6, np.int32))])
def test_not_a_sparse_filter(x2, bad):
    with pytest.raises(TypeError, match="filter must be a jaxsparse.SparseFilter"):
        sparse_conv(x2, bad)


@pytest.mark.parametrize("kw", [
    dict(padding="VALID"),                                  # 5x5 kernel, 4x4 input
    dict(padding="VALID", strides=3),                       # the same with a stride (was silently empty)
    dict(padding=((0, 0), (1, 0))),
    dict(padding=((1, 0), (0, 0)), strides=2),
])
def test_kernel_larger_than_padded_input(kw):
    f = jaxsparse.random_filter(0, (5, 5), 2, 3, 0.5)
    with pytest.raises(ValueError, match="larger than the padded input"):
        sparse_conv(jnp.ones((1, 4, 4, 2)), f, **kw)


def test_dilated_kernel_larger_than_input():
    f = jaxsparse.random_filter(0, (3,), 2, 3, 0.5)
    with pytest.raises(ValueError, match="larger than the padded input"):
        sparse_conv(jnp.ones((1, 4, 2)), f, padding="VALID", rhs_dilation=2)  # spans 5 > 4
    assert sparse_conv(jnp.ones((1, 5, 2)), f, padding="VALID", rhs_dilation=2).shape == (1, 1, 3)


def test_errors_also_raised_under_jit(f2, x2):
    with pytest.raises(ValueError, match="channel mismatch"):
        jax.jit(lambda x, f: sparse_conv(x, f))(x2[..., :3], f2)
    with pytest.raises(TypeError, match="dtype mismatch"):
        jax.jit(lambda x, f: sparse_conv(x, f))(x2.astype(jnp.bfloat16), f2)


def test_concrete_invalid_filter_rejected_by_op(x2):
    f = SparseFilter(jnp.ones(2, jnp.float32), jnp.array([0, 999], jnp.int32), jnp.array([0, 1, 2, 2, 2, 2], jnp.int32),
                     kernel_size=(3, 3), in_channels=4, out_channels=5, validate=False)
    with pytest.raises(SparseFilterError, match="column index 999 out of range"):
        sparse_conv(x2, f)


# ---- the CPU kernel re-checks traced structure ---------------------------------
# Only the CPU kernel does: the CUDA kernels cannot raise without a device-to-host sync per
# call, so they skip out-of-range columns instead (never reading out of bounds; test_gpu.py).
# These tests pin the CPU device so that they test the CPU kernel on a GPU machine too.

def _traced_call(x, data, indices, indptr):
    def run(data, indices, indptr):
        f = SparseFilter(data, indices, indptr, kernel_size=(3, 3), in_channels=4, out_channels=5)
        return sparse_conv(x, f)
    with jax.default_device(jax.devices("cpu")[0]):
        return jax.jit(run)(data, indices, indptr).block_until_ready()


@pytest.mark.parametrize("indices, indptr, match", [
    ([0, 36], [0, 1, 2, 2, 2, 2], "column index out of range"),
    ([0, -1], [0, 1, 2, 2, 2, 2], "column index out of range"),
    ([0, 2 ** 30], [0, 1, 2, 2, 2, 2], "column index out of range"),
    ([0, 1], [0, 2, 1, 2, 2, 2], "row pointers must be non-decreasing"),
    ([0, 1], [1, 1, 2, 2, 2, 2], "row pointers must start at 0"),
    ([0, 1], [0, 1, 1, 1, 1, 1], "last row pointer must equal the number of nonzeros"),
    ([0, 1], [0, 1, 2, 2, 2, 9], "last row pointer must equal the number of nonzeros"),
])
def test_native_kernel_rejects_bad_traced_filter(x2, indices, indptr, match):
    data = jnp.ones(2, jnp.float32)
    with pytest.raises(Exception, match=match) as info:
        _traced_call(x2, data, jnp.asarray(indices, jnp.int32), jnp.asarray(indptr, jnp.int32))
    assert "jaxsparse sparse_conv" in str(info.value)
    assert isinstance(info.value, (jax.errors.JaxRuntimeError, RuntimeError))


def test_native_kernel_still_works_after_error(x2, f2):
    # an error from the custom call leaves the runtime usable
    with pytest.raises(Exception, match="column index out of range"):
        _traced_call(x2, f2.data, f2.indices.at[0].set(10_000), f2.indptr)
    out = _traced_call(x2, f2.data, f2.indices, f2.indptr)
    with jax.default_device(jax.devices("cpu")[0]):
        expected = sparse_conv(x2, f2)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=0, atol=0)
