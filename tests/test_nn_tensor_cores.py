"""The tensor-core plan in the Flax layer (issue 14, items 1 and 3): attached to a `SparseConv`,
used by the calls it fits, differentiable, saved and loaded with the model, and chosen by
sparsify(policy='auto') where it times fastest. On the CPU the plan's calls run the XLA path
of `tc_conv`; `test_tc_conv.py` checks the CUDA kernel itself on the GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

flax = pytest.importorskip("flax")
from flax import nnx  # noqa: E402

import jaxsparse  # noqa: E402
import jaxsparse.nn.layers as nn_layers  # noqa: E402
from jaxsparse import TensorCorePlanError, sparse_conv, tc_conv, tc_conv1x1  # noqa: E402
from jaxsparse.nn import SparseConv, load, save, sparsify  # noqa: E402
from jaxsparse.nn.checkpoint import PLAN_DIR  # noqa: E402
from jaxsparse.tc_conv import plan_for, tensor_core_ineligible  # noqa: E402
from helpers import random_input  # noqa: E402


@pytest.fixture
def tc_calls(monkeypatch):
    """Counts the layer's calls of tc_conv (traced calls included)."""
    calls = []

    def spy(*args, **kw):
        calls.append(args[0].dtype)
        return tc_conv(*args, **kw)
    monkeypatch.setattr(nn_layers, "tc_conv", spy)
    return calls


def layer_1x1(dtype=jnp.bfloat16, precision=None, cin=48, cout=40, seed=0):
    return SparseConv(cin, cout, (1, 1), padding="SAME", param_dtype=dtype, precision=precision, sparsity=0.8,
                      activation="relu", rngs=nnx.Rngs(seed))


def as_f64(y):
    return np.asarray(jnp.asarray(y, jnp.float32), np.float64)


def tolerance(dtype):
    """Relative to the largest output: bf16/f16 products are exact but the outputs are rounded;
    float32 on the GPU's tensor cores is TF32 (the CPU path computes it exactly)."""
    if jnp.dtype(dtype) != jnp.float32:
        return 1e-2
    return 5e-3 if jax.default_backend() == "gpu" else 1e-5


@pytest.mark.parametrize("dtype,precision", [(jnp.bfloat16, None), (jnp.float16, "highest"),
                                             (jnp.float32, "default")])
def test_layer_with_a_plan_computes_the_same_on_tensor_cores(tc_calls, dtype, precision):
    layer = layer_1x1(dtype, precision)
    x = jnp.asarray(random_input(np.random.default_rng(1), (2, 6, 6, 48)), dtype)
    before = layer(x)
    assert not tc_calls
    plan = layer.plan_tensor_cores()
    assert plan.k_multiple == (8 if dtype == jnp.float32 else 16)
    graph, state = nnx.split(layer)  # the plan is static: in the graph, not in the state
    assert all(not isinstance(v, np.ndarray) for v in jax.tree.leaves(state)) and len(jax.tree.leaves(state)) == 4
    after = jax.jit(lambda s, x: nnx.merge(graph, s)(x))(state, x)
    assert tc_calls, "the layer with a plan must call tc_conv"
    tol = tolerance(dtype)
    np.testing.assert_allclose(as_f64(after), as_f64(before), rtol=tol, atol=tol * float(jnp.abs(before).max()))


def test_calls_the_plan_does_not_fit_run_sparse_conv(tc_calls):
    layer = layer_1x1(jnp.bfloat16)
    layer.plan_tensor_cores()
    x32 = jnp.asarray(random_input(np.random.default_rng(2), (1, 4, 4, 48)))
    layer(x32)  # computed in float32 (promotion): the bf16 plan (mma k 16) does not fit
    assert not tc_calls
    layer(x32.astype(jnp.bfloat16))
    assert tc_calls


def test_plan_tensor_cores_refuses_layers_it_can_never_serve():
    with pytest.raises(ValueError, match="HIGHEST"):
        layer_1x1(jnp.float32, "highest").plan_tensor_cores()
    layer, other = layer_1x1(seed=0), layer_1x1(seed=1)
    with pytest.raises(TensorCorePlanError, match="pattern"):
        layer.plan_tensor_cores(plan_for(other.sparse_filter))
    with pytest.raises(TensorCorePlanError, match="k_multiple"):
        layer.plan_tensor_cores(jaxsparse.tensor_core_plan(layer.sparse_filter, rows=16, k_multiple=8))
    assert layer.tensor_core_plan is None


def test_a_traced_pattern_other_than_the_plans_is_poisoned():
    layer = layer_1x1()
    layer.plan_tensor_cores()
    graph, state = nnx.split(layer)
    other = layer_1x1(seed=1)
    state["indices"][...], state["indptr"][...] = other.indices[...], other.indptr[...]
    x = jnp.ones((1, 3, 3, 48), jnp.bfloat16)
    y = jax.jit(lambda s, x: nnx.merge(graph, s)(x))(state, x)
    assert np.isnan(as_f64(y)).all()


@pytest.mark.parametrize("kernel_size,strides,padding,dilation", [
    ((1, 1), 1, "VALID", 1), ((3, 3), 2, "SAME", 1), ((3, 3), 1, ((2, 0), (1, 3)), 2), ((5,), 1, "VALID", 1)])
def test_gradients_through_the_plan_match_sparse_conv(kernel_size, strides, padding, dilation):
    # Quarters for inputs and weights and sixteenths + 1/32 for the bias: the TF32 primal on
    # the GPU is then exact, so no pre-activation sits within rounding of the ReLU's kink
    # (a rounded primal flipped the ReLU mask of a few outputs: the H200 run of 2026-12-03).
    rng = np.random.default_rng(3)
    f = jaxsparse.random_filter(3, kernel_size, 24, 20, 0.7)
    f = f.with_data(jnp.asarray((rng.integers(1, 5, f.nnz) * rng.choice([-1, 1], f.nnz) / 4).astype(np.float32)))
    x = jnp.asarray(rng.integers(-4, 5, (2,) + (7,) * len(kernel_size) + (24,)).astype(np.float32) / 4)
    x = x.at[(0,) * x.ndim].set(1.0)
    b = jnp.asarray(((rng.integers(-16, 16, 20) + 0.5) / 16).astype(np.float32))
    plan = plan_for(f)
    geo = dict(strides=strides, padding=padding, rhs_dilation=dilation)

    def loss(conv):
        return lambda x, d, b: jnp.sum(jnp.sin(conv(x, f.with_data(d), b)))
    tc = loss(lambda x, f, b: tc_conv(x, f, plan, bias=b, activation="relu", precision="default", **geo))
    ref = loss(lambda x, f, b: sparse_conv(x, f, bias=b, activation="relu", **geo))
    for got, want in zip(jax.jit(jax.grad(tc, argnums=(0, 1, 2)))(x, f.data, b),
                         jax.grad(ref, argnums=(0, 1, 2))(x, f.data, b)):
        tol = tolerance(jnp.float32)  # TF32 primal on the GPU (the tangents are computed exactly)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol * float(jnp.abs(want).max()))


def test_ineligible_names_the_reason():
    assert tensor_core_ineligible(jnp.bfloat16, "highest") is None
    assert tensor_core_ineligible(jnp.float32, None) is None
    assert "HIGHEST" in tensor_core_ineligible(jnp.float32, lax.Precision.HIGHEST)
    assert "dtype" in tensor_core_ineligible(jnp.float64, None)


@pytest.mark.parametrize("kernel_size,strides,padding,dilation", [
    ((3, 3), 1, "SAME", 1), ((3, 3), 2, "VALID", 1), ((1, 1), 2, "SAME", 1), ((5,), 1, "CAUSAL", 2),
    ((3, 3), 1, "CIRCULAR", 1)])
def test_any_geometry_runs_on_the_plan(tc_calls, kernel_size, strides, padding, dilation):
    """Strided, padded, dilated, 1-D and circular layers run tc_conv with their plan and
    compute what they computed without it."""
    cin = 12
    layer = SparseConv(cin, 20, kernel_size, strides=strides, padding=padding, kernel_dilation=dilation,
                       param_dtype=jnp.bfloat16, sparsity=0.7, activation="relu", rngs=nnx.Rngs(3))
    x = jnp.asarray(random_input(np.random.default_rng(5), (2,) + (9,) * len(kernel_size) + (cin,)), jnp.bfloat16)
    before = layer(x)
    layer.plan_tensor_cores()
    after = layer(x)
    assert tc_calls
    np.testing.assert_allclose(as_f64(after), as_f64(before), rtol=1e-2, atol=1e-2 * float(jnp.abs(before).max()))


class Net(nnx.Module):
    def __init__(self, seed=0):
        self.a = SparseConv(16, 48, (3, 3), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(seed))
        self.b = layer_1x1(seed=seed + 1)

    def __call__(self, x):
        return self.b(self.a(x))


def test_checkpoint_keeps_the_plan(tmp_path, tc_calls):
    net = Net()
    plan = net.b.plan_tensor_cores()
    path = tmp_path / "net.safetensors"
    save(net, path)
    loaded = load(path, Net(seed=5))
    assert net.a.tensor_core_plan is None and loaded.a.tensor_core_plan is None
    got = loaded.b.tensor_core_plan
    assert got.fingerprint == plan.fingerprint and got.k_multiple == plan.k_multiple
    for name in ("channels", "columns", "col_offsets", "union_sizes", "positions"):
        np.testing.assert_array_equal(getattr(got, name), getattr(plan, name))
    x = jnp.asarray(random_input(np.random.default_rng(4), (1, 6, 6, 16)), jnp.bfloat16)
    np.testing.assert_array_equal(as_f64(loaded(x)), as_f64(net(x)))
    assert tc_calls
    template = Net(seed=6)
    load(path, template, inplace=True)
    assert template.b.tensor_core_plan.fingerprint == plan.fingerprint


def test_a_damaged_plan_in_a_checkpoint_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file
    net = Net()
    net.b.plan_tensor_cores()
    path, bad = tmp_path / "net.safetensors", tmp_path / "bad.safetensors"
    save(net, path)
    with safe_open(str(path), framework="numpy") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata()
    key = f"b/{PLAN_DIR}/positions"
    tensors[key] = tensors[key].copy()
    tensors[key][0] = tensors[key][1]  # two nonzeros in one slot
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(TensorCorePlanError, match="b: the checkpoint's tensor-core plan"):
        load(bad, Net())


class ThreeWayTimer:
    """Deterministic timings: the tensor-core kernel at ``tensor_core_us`` on layer b, slower
    than the FFMA kernel on layer a."""

    def __init__(self, tensor_core_us=10.0):
        self.calls, self.tensor_core_us = [], tensor_core_us

    def __call__(self, spec, impl):
        self.calls.append((spec.path, impl))
        tc_us = self.tensor_core_us if spec.path == "b" else 70.0
        return {"dense": 100.0, "sparse": 50.0, "tensorcore": tc_us}[impl]


def test_sparsify_auto_takes_the_tensor_core_kernel_where_it_is_fastest():
    class Dense(nnx.Module):
        def __init__(self):
            self.a = nnx.Conv(16, 32, (3, 3), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
            self.b = nnx.Conv(32, 24, (1, 1), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.b(self.a(x))

    x = jnp.ones((1, 8, 8, 16), jnp.bfloat16)
    timer = ThreeWayTimer()
    new, report = sparsify(Dense(), 0.9, policy="auto", sample_input=x, timer=timer, cache=False,
                           tensor_cores=True, progress=False)
    assert ("a", "tensorcore") in timer.calls and ("b", "tensorcore") in timer.calls  # any geometry
    assert report["b"].tensor_cores and report["b"].tensor_core_us == 10.0 and report["b"].speedup == 10.0
    assert new.b.tensor_core_plan is not None and new.a.tensor_core_plan is None
    assert not report["a"].tensor_cores and "on tensor cores (1): b" in report.summary()
    table = report.table()
    assert "tc µs" in table and "sparse/tc" in table.splitlines()[2]

    timer = ThreeWayTimer(tensor_core_us=70.0)  # slower than the FFMA kernel: no plan
    new, report = sparsify(Dense(), 0.9, policy="auto", sample_input=x, timer=timer, cache=False,
                           tensor_cores=True, progress=False)
    assert new.b.tensor_core_plan is None and report["b"].tensor_core_us == 70.0 and not report["b"].tensor_cores

    timer = ThreeWayTimer()  # an injected timer is asked for 'tensorcore' only with tensor_cores=True
    sparsify(Dense(), 0.9, policy="auto", sample_input=x, timer=timer, cache=False, progress=False)
    assert all(impl != "tensorcore" for _, impl in timer.calls)
