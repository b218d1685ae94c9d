"""Flax NNX / Linen layers, sparsify, models and checkpoints (jaxsparse.nn, jaxsparse.linen)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax")
from flax import linen, nnx  # noqa: E402

import jaxsparse  # noqa: E402
import jaxsparse.linen  # noqa: E402
from jaxsparse.nn import SparseConv, SparseStructure, TimingCache, load, models, save, sparsify  # noqa: E402


@pytest.fixture(autouse=True)
def exact_float32_references():
    """Dense references in exact float32: the sparse kernels never use TF32, while XLA's
    default convolution precision on recent GPUs does (seen failing on the H200)."""
    with jax.default_matmul_precision("highest"):
        yield


def rand(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)


def nonzero_bias(conv, seed=1):
    if conv.bias is not None:
        conv.bias[...] = rand(conv.bias.shape, seed)
    return conv


# ---- SparseConv ----------------------------------------------------------------

CONV_CASES = [
    dict(kernel_size=(3, 3)),
    dict(kernel_size=(3, 3), strides=2, padding="VALID"),
    dict(kernel_size=(3, 2), strides=(1, 2), padding=((2, 0), (1, 1)), kernel_dilation=(2, 1)),
    dict(kernel_size=(3, 3), padding=1, use_bias=False),
    dict(kernel_size=(3, 3), padding="REFLECT", strides=2),
    dict(kernel_size=3),
    dict(kernel_size=(5,), padding="CAUSAL", kernel_dilation=2),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_from_dense_matches_nnx_conv(case):
    nd = 1 if isinstance(case["kernel_size"], int) else len(case["kernel_size"])
    conv = nonzero_bias(nnx.Conv(5, 6, rngs=nnx.Rngs(0), **case))
    x = rand((2,) + (9,) * nd + (5,), seed=3)
    sp = SparseConv.from_dense(conv)  # keeps every nonzero: exact same function
    assert sp.nnz == conv.kernel.size
    np.testing.assert_allclose(sp(x), conv(x), rtol=1e-5, atol=1e-5)
    # pruned: equals nnx.Conv carrying the same pruned kernel
    sp = SparseConv.from_dense(conv, sparsity=0.7)
    pruned = np.asarray(sp.kernel)
    assert (pruned != 0).sum() == round(0.3 * conv.kernel.size)
    conv.kernel[...] = pruned
    np.testing.assert_allclose(sp(x), conv(x), rtol=1e-5, atol=1e-5)


def test_constructor_and_state():
    layer = SparseConv(8, 16, (3, 3), strides=2, sparsity=0.75, rngs=nnx.Rngs(0))
    assert layer.nnz == round(0.25 * 3 * 3 * 8 * 16)
    assert layer.kernel.shape == (3, 3, 8, 16)
    params = nnx.state(layer, nnx.Param)
    assert set(k for k, _ in nnx.to_flat_state(params)) == {("data",), ("bias",)}
    structure = nnx.state(layer, SparseStructure)
    assert set(k for k, _ in nnx.to_flat_state(structure)) == {("indices",), ("indptr",)}
    x = rand((2, 8, 8, 8))
    y = layer(x)
    assert y.shape == (2, 4, 4, 16)
    # magnitude pruning of the initial kernel: the kept weights are the largest ones
    k = np.abs(np.asarray(layer.kernel))
    assert k[k > 0].min() > 0
    ref = jax.lax.conv_general_dilated(x, layer.kernel, (2, 2), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(y, ref + layer.bias[...], rtol=1e-5, atol=1e-5)


def test_batch_dims_like_nnx_conv():
    conv = nonzero_bias(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)))
    sp = SparseConv.from_dense(conv, sparsity=0.5)
    conv.kernel[...] = sp.kernel
    for shape in [(7, 7, 3), (2, 3, 7, 7, 3)]:
        x = rand(shape, seed=5)
        assert sp(x).shape == conv(x).shape
        np.testing.assert_allclose(sp(x), conv(x), rtol=1e-5, atol=1e-5)


def test_mask_keeps_zero_weights_and_fused_relu():
    conv = nonzero_bias(nnx.Conv(4, 5, (3, 3), rngs=nnx.Rngs(1)))
    mask = np.random.default_rng(0).random(conv.kernel.shape) < 0.3
    kernel = np.asarray(conv.kernel[...]).copy()
    kernel[mask & (np.arange(kernel.size).reshape(kernel.shape) % 7 == 0)] = 0.0  # kept zeros
    conv.kernel[...] = kernel
    sp = SparseConv.from_dense(conv, mask=mask)
    assert sp.nnz == mask.sum()
    conv.kernel[...] = kernel * mask
    x = rand((2, 6, 6, 4))
    np.testing.assert_allclose(sp(x), conv(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sp(x, activation="relu"), jax.nn.relu(conv(x)), rtol=1e-5, atol=1e-5)
    assert (np.asarray(conv(x)) < 0).any()
    relu_layer = SparseConv.from_dense(conv, activation="relu")
    np.testing.assert_allclose(relu_layer(x), jax.nn.relu(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_compute_dtype(dtype):
    conv = nonzero_bias(nnx.Conv(8, 8, (3, 3), dtype=dtype, rngs=nnx.Rngs(0)))
    sp = SparseConv.from_dense(conv)
    x = rand((2, 6, 6, 8))
    y = sp(x)
    assert y.dtype == dtype and conv(x).dtype == dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(conv(x), np.float32),
                               rtol=3e-2, atol=3e-2)


def test_unsupported_configurations_raise():
    with pytest.raises(NotImplementedError, match="feature_group_count"):
        SparseConv.from_dense(nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0)))
    with pytest.raises(NotImplementedError, match="input_dilation"):
        SparseConv(4, 4, (3, 3), input_dilation=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unsupported padding"):
        SparseConv(4, 4, (3, 3), padding="WRAP", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Causal"):
        SparseConv(4, 4, (3, 3), padding="CAUSAL", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="1-D and 2-D"):
        SparseConv(4, 4, (3, 3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="either sparsity or mask"):
        SparseConv.from_dense(nnx.Conv(4, 4, (3, 3), rngs=nnx.Rngs(0)), 0.5, mask=np.ones((3, 3, 4, 4), bool))


def test_jit_and_to_dense():
    layer = SparseConv(4, 6, (3, 3), sparsity=0.8, rngs=nnx.Rngs(0))
    layer.bias[...] = rand((6,), 2)
    x = rand((2, 5, 5, 4))
    y_jit = nnx.jit(lambda m, x: m(x))(layer, x)
    np.testing.assert_allclose(y_jit, layer(x), rtol=1e-6)
    np.testing.assert_allclose(layer.to_dense()(x), layer(x), rtol=1e-5, atol=1e-5)


# ---- models and sparsify -----------------------------------------------------

def tiny_vgg(seed=0):
    m = models.VGG16(7, width=1 / 16, resolution=32, hidden=16, rngs=nnx.Rngs(seed))
    m.eval()
    return m


def tiny_resnet(seed=0):
    m = models.ResNet50(7, width=1 / 16, stage_sizes=(1, 1, 1, 1), rngs=nnx.Rngs(seed))
    # non-trivial BatchNorm statistics so that inference-mode BN is exercised
    for _, node in nnx.iter_graph(m):
        if isinstance(node, nnx.BatchNorm):
            n = node.mean.shape[0]
            node.mean[...] = rand((n,), seed + 11) * 0.1
            node.var[...] = 1.0 + 0.5 * jnp.abs(rand((n,), seed + 12))
            node.scale[...] = 1.0 + 0.1 * rand((n,), seed + 13)
            node.bias[...] = 0.1 * rand((n,), seed + 14)
    m.eval()
    return m


def tiny_cnn(seed=0):
    m = models.CNNNonStatic(40, 3, embed_dim=12, feature_maps=10, rngs=nnx.Rngs(seed))
    m.eval()
    return m


def model_input(name, batch=2):
    if name == "cnn":
        return jnp.asarray(np.random.default_rng(4).integers(0, 40, (batch, 11)), jnp.int32)
    return rand((batch, 32, 32, 3), seed=4)


MODELS = {"vgg": tiny_vgg, "resnet": tiny_resnet, "cnn": tiny_cnn}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sparsify_models(name):
    model, x = MODELS[name](), model_input(name)
    logits = nnx.jit(lambda m, x: m(x))(model, x)
    assert np.std(np.asarray(logits)) > 0
    n_convs = len([1 for _, n in nnx.iter_graph(model) if isinstance(n, nnx.Conv)])
    assert n_convs == {"vgg": 13, "resnet": 1 + 3 * 4 + 4, "cnn": 3}[name]

    fwd = nnx.jit(lambda m, x: m(x))
    sparse0, report = sparsify(model, 0.0)
    assert [d.choice for d in report] == ["sparse"] * n_convs
    assert not any(isinstance(n, nnx.Conv) for _, n in nnx.iter_graph(sparse0))
    np.testing.assert_allclose(fwd(sparse0, x), logits, rtol=2e-4, atol=2e-5)

    sparse, report = sparsify(model, 0.9)
    pruned_dense, dense_report = sparsify(model, 0.9, policy="dense")
    assert all(d.choice == "dense" for d in dense_report)
    for (_, conv), d in zip([(p, n) for p, n in nnx.iter_graph(pruned_dense) if isinstance(n, nnx.Conv)],
                            dense_report):
        assert int((np.asarray(conv.kernel[...]) != 0).sum()) == d.nnz == round(0.1 * conv.kernel.size)
    y = fwd(sparse, x)
    np.testing.assert_allclose(y, fwd(pruned_dense, x), rtol=2e-4, atol=2e-5)
    assert not np.allclose(y, logits, atol=1e-3)  # pruning changed the model
    np.testing.assert_allclose(fwd(model, x), logits)  # the original is untouched
    if name == "cnn":  # eager inference too
        np.testing.assert_allclose(sparse(x), y, rtol=1e-5, atol=1e-6)


def test_sparsify_per_layer_dict_and_errors():
    model = tiny_vgg()
    new, report = sparsify(model, {"features/0": 0.5, ("features", 3): 0.9})
    choices = report.choices()
    assert choices["features/0"] == choices["features/3"] == "sparse"
    assert sum(c == "unchanged" for c in choices.values()) == 11
    assert isinstance(new.features[0], SparseConv) and isinstance(new.features[1], nnx.Conv)
    assert new.features[3].nnz == round(0.1 * new.features[3].kernel_shape[0] * 3 * 8 * 8)
    with pytest.raises(ValueError, match="not an nnx.Conv"):
        sparsify(model, {"features/99": 0.5})
    with pytest.raises(ValueError, match="policy"):
        sparsify(model, 0.5, policy="fastest")
    with pytest.raises(ValueError, match="sample_input"):
        sparsify(model, 0.5, policy="auto", timer=lambda s, i: 1.0, cache=False)


class FakeTimer:
    """Deterministic timings: sparse wins on layers whose output has >= 16 channels."""

    def __init__(self):
        self.calls = []

    def __call__(self, spec, impl):
        self.calls.append((spec.path, impl))
        wins = spec.kernel_shape[-1] >= 16
        return {"dense": 100.0, "sparse": 50.0 if wins else 150.0}[impl] + spec.batch


def test_sparsify_auto_with_injected_timer(tmp_path):
    model, x = tiny_vgg(), model_input("vgg")
    timer, cache_file = FakeTimer(), tmp_path / "timings.json"
    new, report = sparsify(model, 0.8, policy="auto", sample_input=x, batch_size=32, timer=timer,
                           cache=cache_file)
    # both implementations timed for every distinct layer shape (identical layers share timings)
    assert 2 * 6 <= len(timer.calls) < 2 * 13 and len(set(timer.calls)) == len(timer.calls)
    convs = [c for c in models.VGG16_CONFIG if c != "M"]
    expected = ["sparse" if c / 16 >= 16 else "dense" for c in convs]
    assert [d.choice for d in report] == expected
    assert "dense" in expected and "sparse" in expected
    d0 = report["features/0"]
    assert (d0.dense_us, d0.sparse_us) == (132.0, 182.0)  # batch_size=32 reached the timer
    for layer, choice in zip(new.features, expected):
        assert isinstance(layer, SparseConv if choice == "sparse" else nnx.Conv)
    all_sparse, _ = sparsify(model, 0.8)
    np.testing.assert_allclose(new(x), all_sparse(x), rtol=2e-4, atol=2e-5)
    assert "features/12" in report.table()

    # cached on disk, keyed by device, versions, shapes, dtype, sparsity and batch
    entries = json.loads(cache_file.read_text())
    key = json.loads(next(iter(entries)))
    assert key["device_kind"] == jax.devices()[0].device_kind and key["jax"] == jax.__version__
    assert {"input_shape", "kernel_shape", "dtype", "sparsity", "batch", "impl"} <= set(key)
    timer2 = FakeTimer()
    _, report2 = sparsify(model, 0.8, policy="auto", sample_input=x, batch_size=32, timer=timer2,
                          cache=cache_file)
    assert timer2.calls == [] and report2.choices() == report.choices()
    sparsify(model, 0.8, policy="auto", sample_input=x, batch_size=1, timer=timer2, cache=cache_file)
    assert len(timer2.calls) > 0  # another batch is another key
    assert len(TimingCache(cache_file)) > len(entries)


def test_sparsify_auto_real_timer_one_layer(tmp_path):
    model = models.CNNNonStatic(30, 2, embed_dim=8, feature_maps=8, widths=(3,), rngs=nnx.Rngs(0))
    model.eval()
    from jaxsparse.nn.timing import chain_timer
    x = model_input("cnn")
    new, report = sparsify(model, 0.9, policy="auto", sample_input=x % 30,
                           timer=lambda s, i: chain_timer(s, i, k_small=1, k_large=3, repeats=3),
                           cache=tmp_path / "t.json")
    (d,) = report.layers
    assert d.dense_us is not None and d.sparse_us is not None and d.choice in ("dense", "sparse")
    assert d.choice == ("sparse" if d.sparse_us < d.dense_us else "dense")


# ---- checkpoints --------------------------------------------------------------

@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_save_load_round_trip(tmp_path, name):
    model, x = MODELS[name](), model_input(name)
    sparse, _ = sparsify(model, {p: 0.9 for p in ["stem", "features/0", "features/5"]
                                 if p.split("/")[0] in ("stem" if name == "resnet" else "features")}
                         if False else 0.9)
    # one layer left dense so the checkpoint mixes both kinds
    convs = [p for p, n in nnx.iter_graph(sparse) if isinstance(n, SparseConv)]
    from jaxsparse.nn.graph import set_by_path
    set_by_path(sparse, convs[1], sparse.features[1].to_dense() if name == "vgg" else
                _get(sparse, convs[1]).to_dense())
    y = sparse(x)
    path = tmp_path / "model.safetensors"
    save(sparse, path)
    template = MODELS[name](seed=123)  # same architecture, other weights
    assert not np.allclose(template(x), y, atol=1e-3)
    loaded = load(path, template)
    np.testing.assert_array_equal(loaded(x), y)
    np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(loaded, x), nnx.jit(lambda m, x: m(x))(sparse, x))
    assert isinstance(_get(loaded, convs[0]), SparseConv) and isinstance(_get(loaded, convs[1]), nnx.Conv)
    # a template of another architecture is refused
    with pytest.raises(ValueError):
        load(path, models.VGG16(7, width=1 / 8, resolution=32, hidden=16, rngs=nnx.Rngs(0))
             if name == "vgg" else tiny_vgg())


def _get(model, path):
    from jaxsparse.nn.graph import get_child
    for p in path:
        model = get_child(model, p)
    return model


# ---- Linen -----------------------------------------------------------------------

def test_linen_sparse_conv():
    x = rand((2, 7, 7, 4))
    layer = jaxsparse.linen.SparseConv(6, (3, 3), strides=2, sparsity=0.75, use_bias=True)
    variables = jax.jit(layer.init)(jax.random.key(0), x)
    assert set(variables) == {"params", "sparse_structure"}
    assert variables["params"]["data"].shape == (round(0.25 * 3 * 3 * 4 * 6),)
    variables["params"]["bias"] = rand((6,), 3)
    filt = jaxsparse.SparseFilter(variables["params"]["data"], *variables["sparse_structure"].values(),
                                  kernel_size=(3, 3), in_channels=4, out_channels=6)
    ref = jax.lax.conv_general_dilated(x, filt.todense(), (2, 2), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC")) + variables["params"]["bias"]
    np.testing.assert_allclose(layer.apply(variables, x), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.apply(variables, x, activation="relu"), jax.nn.relu(ref), rtol=1e-5, atol=1e-5)
    # kept weights are the largest of the initial kernel
    dense = np.abs(np.asarray(filt.todense()))
    assert (dense != 0).sum() == filt.nnz


def test_linen_from_dense_matches_linen_conv():
    x = rand((2, 9, 4))
    conv = linen.Conv(5, (3,), padding="CAUSAL")
    v = conv.init(jax.random.key(1), x)
    v["params"]["bias"] = rand((5,), 2)
    sp = jaxsparse.linen.SparseConv(5, (3,), padding="CAUSAL")
    sv = jaxsparse.linen.variables_from_dense(v["params"]["kernel"], v["params"]["bias"], sparsity=0.0)
    np.testing.assert_allclose(sp.apply(sv, x), conv.apply(v, x), rtol=1e-5, atol=1e-5)
    sv = jaxsparse.linen.variables_from_dense(v["params"]["kernel"], v["params"]["bias"], sparsity=0.6)
    pruned = np.asarray(v["params"]["kernel"]) * jaxsparse.magnitude_mask(v["params"]["kernel"], 0.6)
    v["params"]["kernel"] = pruned
    np.testing.assert_allclose(sp.apply(sv, x), conv.apply(v, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(strides=(2.9, 1.0)), "2.9"), (dict(strides=2.0), "2.0"), (dict(kernel_dilation=(True, 1)), "True"),
    (dict(strides="12"), "'12'"), (dict(kernel_size=(3.0, 3)), "3.0"), (dict(padding=((1.5, 1), (1, 1))), "1.5"),
])
def test_linen_refuses_non_integer_geometry_like_the_nnx_layer(kwargs, fragment):
    # never rounded: strides=(2.9, 1.0) used to run with strides (2, 1)
    kw = dict(features=4, kernel_size=(3, 3), sparsity=0.5)
    layer = jaxsparse.linen.SparseConv(**{**kw, **kwargs})
    with pytest.raises(TypeError, match="SparseConv") as info:
        layer.init(jax.random.key(0), rand((1, 8, 8, 3)))
    assert fragment in str(info.value)
    nnx_kwargs = {{"kernel_dilation": "kernel_dilation"}.get(k, k): v for k, v in kwargs.items()}
    with pytest.raises(TypeError, match="SparseConv") as info:
        SparseConv(3, 4, **{"kernel_size": (3, 3), "sparsity": 0.5, "rngs": nnx.Rngs(0), **nnx_kwargs})
    assert fragment in str(info.value)


def test_linen_takes_integer_geometry_of_any_integer_type():
    x = rand((1, 9, 9, 3))
    layer = jaxsparse.linen.SparseConv(4, (np.int64(3), 3), strides=(np.int32(2), 1),
                                       kernel_dilation=np.array(2), padding=[(1, 0), 2], sparsity=0.5)
    v = layer.init(jax.random.key(0), x)
    filt = jaxsparse.SparseFilter(v["params"]["data"], *v["sparse_structure"].values(), kernel_size=(3, 3),
                                  in_channels=3, out_channels=4)
    ref = jax.lax.conv_general_dilated(x, filt.todense(), (2, 1), ((1, 0), (2, 2)), rhs_dilation=(2, 2),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC")) + v["params"]["bias"]
    np.testing.assert_allclose(layer.apply(v, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", ["SAME", "VALID", "SAME_LOWER", "same_lower", "CIRCULAR", "REFLECT",
                                     "CAUSAL", 1, [(2, 0)], ((0, 1), 2)])
@pytest.mark.parametrize("nd", [1, 2])
def test_every_padding_string_matches_nnx_conv(padding, nd):
    from jaxsparse.nn.layers import PADDING_STRINGS
    from jaxsparse.geometry import PADDING_STRINGS as OP_PADDING_STRINGS
    assert PADDING_STRINGS[:len(OP_PADDING_STRINGS)] == OP_PADDING_STRINGS  # one list, extended
    if (padding == "CAUSAL" and nd == 2) or (not isinstance(padding, (str, int)) and len(padding) != nd):
        with pytest.raises(ValueError):
            SparseConv(3, 4, (3,) * nd, padding=padding, rngs=nnx.Rngs(0))
        return
    nnx_padding = padding.upper() if isinstance(padding, str) else padding  # nnx: CIRCULAR etc. in upper case
    conv = nonzero_bias(nnx.Conv(3, 4, (3,) * nd, strides=2, padding=nnx_padding, rngs=nnx.Rngs(0)))
    sparse = SparseConv.from_dense(conv, 0.5)
    assert sparse.padding == (padding.upper() if isinstance(padding, str) else sparse.padding)
    x = rand((2,) + (7,) * nd + (3,))
    conv.kernel[...] = sparse.kernel  # the pruned kernel, in the dense layer nnx itself pads for
    np.testing.assert_allclose(sparse(x), conv(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sparse.to_dense()(x), conv(x), rtol=1e-5, atol=1e-5)
