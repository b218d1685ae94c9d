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
    assert all(d.dense_check == d.sparse_check == "ok" and not d.on_fallback for d in report)  # plain floats


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


def test_chain_timer_fallback_decides_but_is_never_cached(monkeypatch, tmp_path):
    """The real `chain_timer` on fake call times: a measurement failing its checks
    (T(k_large) < T(k_small)) still decides, flagged, but leaves the cache alone;
    one that passes on re-measurement is cached."""
    from jaxsparse import benchmark
    model = models.CNNNonStatic(30, 2, embed_dim=8, feature_maps=8, widths=(3,), rngs=nnx.Rngs(0))
    model.eval()
    x = jnp.asarray(np.random.default_rng(4).integers(0, 30, (2, 11)), jnp.int32)
    results = []

    def timer(spec, impl):
        results.append(timing.chain_timer(spec, impl, peak_check=False, k_small=1, k_large=3, repeats=3))
        return results[-1]

    negative = [[900.0] * 3, [600.0] * 3]
    monkeypatch.setattr(benchmark, "interleaved_call_us", lambda fns, *a, repeats, warmup: negative)
    cache = tmp_path / "t.json"
    _, report = sparsify(model, 0.9, policy="auto", sample_input=x, timer=timer, cache=cache)
    (d,) = report.layers
    assert [r.check for r in results] == ["fallback", "fallback"] and results[0].attempts == 3
    assert d.dense_us == d.sparse_us == pytest.approx(200.0)  # T(3)/3, the conservative estimate
    assert not cache.exists()
    # the report keeps each timing's check (through the cache) and flags the decision
    assert d.dense_check == d.sparse_check == "fallback" and d.on_fallback
    assert "decided on a fallback timing" in report.summary() and "~200.0" in report.table()
    assert report.to_json()["layers"][0]["sparse_check"] == "fallback"

    attempts = iter([negative, [[100.0] * 3, [300.0] * 3]] * 2)  # each timing: fails, then passes
    monkeypatch.setattr(benchmark, "interleaved_call_us", lambda fns, *a, repeats, warmup: next(attempts))
    results.clear()
    _, report = sparsify(model, 0.9, policy="auto", sample_input=x, timer=timer, cache=cache)
    assert [r.check for r in results] == ["remeasured", "remeasured"] and report.layers[0].dense_us == 100.0
    assert sorted(json.loads(cache.read_text()).values()) == [100.0, 100.0]
    assert report.layers[0].dense_check == "remeasured" and "fallback timing" not in report.summary()
    results.clear()
    _, report = sparsify(model, 0.9, policy="auto", sample_input=x, timer=timer, cache=cache)
    assert results == [] and report.layers[0].sparse_check == "cached"


def test_report_flags_layers_decided_on_a_fallback_timing():
    """An injected timer's `ChainTime`: a fallback on one side flags that layer only."""
    from jaxsparse.benchmark import ChainTime
    model = models.VGG16(5, width=1 / 16, resolution=32, hidden=8, rngs=nnx.Rngs(0))
    first = []

    def timer(spec, impl):
        first.append(spec.path)
        fallback = impl == "sparse" and spec.path == first[0]
        return ChainTime(50.0 if impl == "sparse" else 100.0, check="fallback" if fallback else "remeasured")

    _, report = sparsify(model, 0.9, policy="auto", sample_input=jnp.zeros((1, 32, 32, 3)), timer=timer,
                         cache=False)
    flagged = [d.path for d in report if d.on_fallback]
    assert flagged == [first[0]] and report[first[0]].dense_check == "remeasured"
    assert f"decided on a fallback timing (failed its checks; not cached) (1): {first[0]}" in report.summary()
    assert "~50.0" in report.table() and report.table().count("~") == 1


def test_cache_ignores_impossible_entries_on_disk(tmp_path):
    spec = timing.LayerSpec("a", (1, 8, 8, 3), (3, 3, 3, 4), (1, 1), "SAME", (1, 1), "float32", 0.9, True)
    path = tmp_path / "t.json"
    path.write_text(json.dumps({TimingCache.key(spec, "dense"): -274.5, TimingCache.key(spec, "sparse"): 80.0}))
    cache = TimingCache(path)
    assert cache.get(spec, "dense") is None and cache.get(spec, "sparse") == 80.0


def test_layer_flops_for_the_peak_check():
    spec = timing.LayerSpec("a", (2, 8, 8, 3), (3, 3, 3, 4), (2, 2), "SAME", (1, 1), "float32", 0.75, True)
    assert timing.layer_flops(spec, "dense") == 2 * 2 * 4 * 4 * 4 * 27
    assert timing.layer_flops(spec, "sparse") == 0.25 * timing.layer_flops(spec, "dense")


def test_auto_takes_a_measurement_object_and_compares_like_with_like_on_a_fallback():
    """A timer may return an object with ``us``/``ok`` (no float()); where one side fell back
    (T(k_large)/k_large, fixed cost included) both sides' T(k_large)/k_large are compared."""
    import types
    from flax import nnx
    from jaxsparse.nn import sparsify

    class Net(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(8, 8, (3, 3), rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.conv(x)

    def timer(spec, impl):  # dense: a checked slope of 10 µs, per-op 40 µs; sparse: fallback 30 µs
        if impl == "dense":
            return types.SimpleNamespace(us=10.0, ok=True, check="ok", per_op_us=40.0)
        return types.SimpleNamespace(us=30.0, ok=False, check="fallback", per_op_us=30.0)

    x = np.ones((1, 8, 8, 8), np.float32)
    _, report = sparsify(Net(), 0.9, policy="auto", sample_input=x, timer=timer, cache=False, progress=False)
    (d,) = report.layers
    assert (d.dense_us, d.sparse_us) == (10.0, 30.0) and d.sparse_check == "fallback"
    assert d.choice == "sparse", "like with like: 30 µs per op against 40, not 30 against a 10 µs slope"

    def plain(spec, impl):
        return types.SimpleNamespace(us=10.0 if impl == "dense" else 30.0, ok=True)

    _, report = sparsify(Net(), 0.9, policy="auto", sample_input=x, timer=plain, cache=False, progress=False)
    assert report.layers[0].choice == "dense"
