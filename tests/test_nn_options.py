"""Precision and kernel options through the Flax layers, sparsify(policy='auto') and checkpoints."""

import json
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

flax = pytest.importorskip("flax")
from flax import nnx  # noqa: E402

import jaxsparse  # noqa: E402
import jaxsparse.linen  # noqa: E402
from jaxsparse.nn import SparseConv, TimingCache, load, models, save, sparsify  # noqa: E402
from jaxsparse.nn import timing  # noqa: E402


def call_options(fn, *args):
    """The ConvOptions of every sparse_conv in the jaxpr of ``fn(*args)``."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    found = []

    def walk(jx):
        for e in jx.eqns:
            if e.primitive is jaxsparse.sparse_conv_p:
                found.append(e.params["options"])
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                walk(sub)
    walk(jaxpr.jaxpr)
    assert found
    return found


X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32))


def test_sparse_conv_layer_honours_precision_and_kernel_family():
    layer = SparseConv(3, 4, (3, 3), precision=lax.Precision.HIGHEST, kernel_family="direct",
                       rngs=nnx.Rngs(0))
    (opts,) = call_options(lambda x: layer(x), X)
    assert opts.precision is lax.Precision.HIGHEST and opts.kernel == "direct"
    layer = SparseConv(3, 4, (3, 3), rngs=nnx.Rngs(0))  # None: the context's default, at trace time
    with jax.default_matmul_precision("highest"):
        (opts,) = call_options(lambda x: layer(x), X)
    assert opts.precision is lax.Precision.HIGHEST and opts.kernel == "auto"
    with pytest.raises(ValueError, match="precision must be"):
        SparseConv(3, 4, (3, 3), precision="exact", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel must be one of"):
        SparseConv(3, 4, (3, 3), kernel_family="fast", rngs=nnx.Rngs(0))


def test_from_dense_keeps_the_conv_precision():
    conv = nnx.Conv(3, 4, (3, 3), precision="highest", rngs=nnx.Rngs(0))
    sp = SparseConv.from_dense(conv, 0.5)
    (opts,) = call_options(lambda x: sp(x), X)
    assert opts.precision is lax.Precision.HIGHEST
    assert sp.to_dense().precision == "highest"


def test_linen_layer_honours_precision_and_kernel_family():
    layer = jaxsparse.linen.SparseConv(4, (3, 3), precision="highest", sparsity=0.5)
    variables = layer.init(jax.random.key(0), X)
    layer = layer.clone(kernel_family="naive")  # a CUDA kernel: traced here, not run
    (opts,) = call_options(lambda x: layer.apply(variables, x), X)
    assert opts.precision is lax.Precision.HIGHEST and opts.kernel == "naive"


@pytest.mark.parametrize("precision", [None, "highest", lax.Precision.HIGH, (lax.Precision.DEFAULT, "highest")])
def test_save_load_round_trips_precision_and_kernel_family(tmp_path, precision):
    model = models.VGG16(5, width=1 / 16, resolution=32, hidden=8, precision=precision, rngs=nnx.Rngs(0))
    sparse, _ = sparsify(model, 0.8, kernel_family="direct")
    path = tmp_path / "m.safetensors"
    save(sparse, path)
    restored = load(path, models.VGG16(5, width=1 / 16, resolution=32, hidden=8, rngs=nnx.Rngs(1)))
    layer = restored.features[0]
    assert isinstance(layer, SparseConv) and layer.kernel_family == "direct"
    assert layer.config() == sparse.features[0].config()
    expected = jaxsparse.options.canonical_precision(precision)
    assert {o.precision for o in call_options(lambda x: layer(x), X)} == {expected}


class RecordingTimer:
    """Deterministic timer recording the specs it was asked for."""

    def __init__(self, sparse_us=50.0, dense_us=100.0):
        self.specs, self.sparse_us, self.dense_us = [], sparse_us, dense_us

    def __call__(self, spec, impl):
        self.specs.append((spec, impl))
        return self.sparse_us if impl == "sparse" else self.dense_us


@pytest.mark.parametrize("precision, expected", [("highest", "HIGHEST"), (None, "DEFAULT"),
                                                 (lax.Precision.HIGH, "HIGH")])
def test_auto_times_each_layer_at_its_own_precision(tmp_path, precision, expected):
    model = models.VGG16(5, width=1 / 16, resolution=32, hidden=8, precision=precision, rngs=nnx.Rngs(0))
    timer = RecordingTimer()
    _, report = sparsify(model, 0.9, policy="auto", sample_input=X[:, :, :, :3].repeat(4, 1).repeat(4, 2),
                         timer=timer, cache=False, kernel_family="direct")
    assert {spec.precision for spec, _ in timer.specs} == {expected}
    assert {spec.kernel_family for spec, _ in timer.specs} == {"direct"}
    assert all(d.choice == "sparse" for d in report)


def test_cache_key_includes_precision_and_kernel_family():
    spec = timing.LayerSpec("a", (1, 8, 8, 3), (3, 3, 3, 4), (1, 1), "SAME", (1, 1), "float32", 0.9, True)
    keys = {TimingCache.key(spec, "sparse"),
            TimingCache.key(timing.LayerSpec(**{**spec.__dict__, "precision": "HIGHEST"}), "sparse"),
            TimingCache.key(timing.LayerSpec(**{**spec.__dict__, "kernel_family": "naive"}), "sparse")}
    assert len(keys) == 3


class FailedMeasurement:
    us, ok = 12.0, False


def test_failed_measurements_are_used_but_never_cached(tmp_path):
    cache = TimingCache(tmp_path / "t.json")
    spec = timing.LayerSpec("a", (1, 8, 8, 3), (3, 3, 3, 4), (1, 1), "SAME", (1, 1), "float32", 0.9, True)
    timed = cache.cached(lambda s, impl: FailedMeasurement() if impl == "sparse" else -3.0)
    assert timed(spec, "sparse") == 12.0 and timed(spec, "dense") == -3.0
    assert len(cache) == 0 and not (tmp_path / "t.json").exists()
    ok = cache.cached(lambda s, impl: 7.5)
    assert ok(spec, "dense") == 7.5 and len(TimingCache(tmp_path / "t.json")) == 1


def test_auto_never_times_the_densify_fallback(monkeypatch, tmp_path):
    policy_module = sys.modules["jaxsparse.nn.sparsify"]  # the package exports the function by that name
    monkeypatch.setattr(policy_module, "native_sparse_unavailable",
                        lambda: "no native sparse kernel on gpu (extension missing)")
    model = models.VGG16(5, width=1 / 16, resolution=32, hidden=8, rngs=nnx.Rngs(0))
    timer = RecordingTimer()
    _, report = sparsify(model, 0.9, policy="auto", input_shapes={}, timer=timer, cache=False)
    assert timer.specs == []
    assert all(d.choice == "dense" and "sparse unavailable" in d.reason for d in report)
    assert "dense because: sparse unavailable: no native sparse kernel on gpu" in report.summary()


def test_report_summary_says_what_stayed_dense_and_where_timings_went(tmp_path):
    model = models.VGG16(5, width=1 / 16, resolution=32, hidden=8, rngs=nnx.Rngs(0))
    _, report = sparsify(model, 0.9, policy="auto", sample_input=jnp.zeros((1, 32, 32, 3)),
                         timer=RecordingTimer(sparse_us=200.0), cache=tmp_path / "c.json")
    summary = report.summary()
    assert "0 sparse, 13 dense" in summary and "dense was faster (13)" in summary
    assert str(tmp_path / "c.json") in summary and summary in report.table()
    assert json.loads(json.dumps(report.to_json()))["cache_path"] == str(tmp_path / "c.json")
