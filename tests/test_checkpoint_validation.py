"""`jaxsparse.nn.load` checks the template against the checkpoint's layers (issue #12):
geometry, layer types, dtypes and options of every convolution, shapes of every variable."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax")
from flax import nnx  # noqa: E402

from jaxsparse.nn import SparseConv, load, save, sparsify  # noqa: E402
from jaxsparse.nn.checkpoint import CheckpointMismatch  # noqa: E402


class Net(nnx.Module):
    """Conv(3 -> width) -> ReLU -> Conv(width -> out) -> mean -> Linear(out -> classes)."""

    def __init__(self, *, width=8, kernel=3, strides=1, padding="SAME", dilation=1, use_bias=True,
                 dtype=None, param_dtype=jnp.float32, precision=None, out=4, strides2=1, classes=3,
                 seed=0):
        rngs = nnx.Rngs(seed)
        self.conv1 = nnx.Conv(3, width, (kernel, kernel), strides=strides, padding=padding,
                              kernel_dilation=dilation, use_bias=use_bias, dtype=dtype,
                              param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.conv2 = nnx.Conv(width, out, (3, 3), strides=strides2, param_dtype=param_dtype,
                              precision=precision, rngs=rngs)
        self.head = nnx.Linear(out, classes, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        y = self.conv2(jax.nn.relu(self.conv1(x)))
        return self.head(jnp.mean(y, axis=(1, 2)))


X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints of Net(): both convolutions sparse, and only conv1 sparse."""
    root = tmp_path_factory.mktemp("ckpt")
    both, _ = sparsify(Net(), 0.5)
    first, _ = sparsify(Net(), {"conv1": 0.5})
    save(both, root / "both.safetensors")
    save(first, root / "first.safetensors")
    return dict(both=(root / "both.safetensors", both), first=(root / "first.safetensors", first))


def _mismatch(path, template, *fragments):
    with pytest.raises(CheckpointMismatch) as info:
        load(path, template)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, ValueError)
    return message


@pytest.mark.parametrize("which", ["both", "first"])
def test_matching_template_loads_the_checkpoint(checkpoints, which):
    path, saved = checkpoints[which]
    loaded = load(path, Net(seed=7))
    np.testing.assert_array_equal(loaded(X), saved(X))
    assert isinstance(loaded.conv1, SparseConv)
    assert isinstance(loaded.conv2, SparseConv if which == "both" else nnx.Conv)


@pytest.mark.parametrize("template, fragments", [
    (dict(width=16), ["conv1: out_features is 8 in the checkpoint's SparseConv but 16 in the template's Conv",
                      "conv2: in_features is 8 in the checkpoint's SparseConv but 16"]),
    (dict(kernel=5), ["conv1: kernel_size is [3, 3] in the checkpoint's SparseConv but [5, 5]"]),
    (dict(kernel=1), ["conv1: kernel_size is [3, 3] in the checkpoint's SparseConv but [1, 1]"]),
    (dict(strides=2), ["conv1: strides is [1, 1] in the checkpoint's SparseConv but [2, 2]"]),
    (dict(padding="VALID"), ["conv1: padding is 'SAME' in the checkpoint's SparseConv but 'VALID'"]),
    (dict(padding=1), ["conv1: padding is 'SAME' in the checkpoint's SparseConv but [[1, 1], [1, 1]]"]),
    (dict(dilation=2), ["conv1: kernel_dilation is [1, 1] in the checkpoint's SparseConv but [2, 2]"]),
    (dict(use_bias=False), ["conv1: use_bias is True in the checkpoint's SparseConv but False"]),
    (dict(dtype=jnp.bfloat16), ["conv1: dtype is None in the checkpoint's SparseConv but 'bfloat16'"]),
    (dict(param_dtype=jnp.bfloat16), ["conv1: param_dtype is 'float32' in the checkpoint's SparseConv but "
                                      "'bfloat16'", "conv2: param_dtype"]),
    (dict(precision="highest"), ["conv1: precision is None in the checkpoint's SparseConv but 'highest'"]),
])
def test_geometry_mismatch_names_layer_and_both_values(checkpoints, template, fragments):
    _mismatch(checkpoints["both"][0], Net(**template), *fragments)


def test_layer_type_mismatch(checkpoints):
    template = Net()
    template.conv1 = nnx.Linear(3, 8, rngs=nnx.Rngs(0))
    _mismatch(checkpoints["both"][0], template, "conv1: the checkpoint has a SparseConv there, where the "
                                                "template has a Linear")
    template = Net()
    del template.conv2
    _mismatch(checkpoints["first"][0], template, "conv2: the checkpoint has a Conv there, which the template lacks")


def test_dense_conv_geometry_is_checked_too(checkpoints):
    path = checkpoints["first"][0]
    # same variable shapes, another stride: only the recorded configuration can tell
    _mismatch(path, Net(strides2=2), "conv2: strides is [1, 1] in the checkpoint's Conv but [2, 2] in the "
                                     "template's Conv")
    _mismatch(path, Net(out=6), "conv2: out_features is 4 in the checkpoint's Conv but 6")
    sparse_template, _ = sparsify(Net(), 0.5)  # a SparseConv where the checkpoint's conv2 is dense
    _mismatch(path, sparse_template, "conv2: the checkpoint has a Conv there, where the template has a SparseConv")


def test_dense_variable_shape_mismatch_names_variable_and_shapes(checkpoints):
    _mismatch(checkpoints["both"][0], Net(classes=5),
              "head/kernel: the checkpoint has shape (4, 3) float32, the template shape (4, 5) float32",
              "head/bias: the checkpoint has shape (3,) float32, the template shape (5,) float32")


def _without_dense_record(path, tmp_path):
    """The checkpoint as written before dense convolutions were recorded."""
    from safetensors import safe_open
    from safetensors.flax import load_file, save_file
    with safe_open(str(path), framework="flax") as f:
        metadata = dict(f.metadata())
    del metadata["dense_convs"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata=metadata)
    return old


def test_older_checkpoints_still_load_and_check_variable_shapes(checkpoints, tmp_path):
    path, saved = checkpoints["first"]
    old = _without_dense_record(path, tmp_path)
    np.testing.assert_array_equal(load(old, Net(seed=3))(X), saved(X))
    _mismatch(old, Net(out=6), "conv2/kernel: the checkpoint has shape (3, 3, 8, 4) float32, the template "
                               "shape (3, 3, 8, 6) float32")


def test_options_restored_where_template_leaves_them_none(tmp_path):
    model, _ = sparsify(Net(precision="highest"), {"conv1": 0.5}, kernel_family="direct")
    path = tmp_path / "m.safetensors"
    save(model, path)
    loaded = load(path, Net())
    assert loaded.conv1.precision == "highest" and loaded.conv1.kernel_family == "direct"
    assert loaded.conv2.precision == "highest"  # the dense layer's, restored too
    # an explicit template value that means the same is no mismatch, and is kept
    assert load(path, Net(precision=jax.lax.Precision.HIGHEST)).conv2.precision == jax.lax.Precision.HIGHEST
    _mismatch(path, Net(precision="default"), "conv1: precision is 'highest' in the checkpoint's SparseConv "
                                              "but 'default'", "conv2: precision")
    sparse_template, _ = sparsify(Net(), {"conv1": 0.5}, kernel_family="naive")
    _mismatch(path, sparse_template, "conv1: kernel_family is 'direct' in the checkpoint's SparseConv but "
                                     "'naive' in the template's SparseConv")


def test_sparse_template_must_match_too_and_mismatch_leaves_it_untouched(checkpoints):
    path, saved = checkpoints["both"]
    template, _ = sparsify(Net(width=16, seed=2), 0.5)
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(template, nnx.Param))}
    _mismatch(path, template, "conv1: out_features is 8 in the checkpoint's SparseConv but 16 in the "
                              "template's SparseConv")
    with pytest.raises(CheckpointMismatch):
        load(path, template, inplace=True)
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(template, nnx.Param))}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    relu_template, _ = sparsify(Net(seed=2), 0.5)
    relu_template.conv1.activation = "relu"
    _mismatch(path, relu_template, "conv1: activation is None in the checkpoint's SparseConv but 'relu'")
    matching, _ = sparsify(Net(seed=2), 0.9)  # other nnz: the checkpoint's structure wins
    np.testing.assert_array_equal(load(path, matching)(X), saved(X))


def test_metadata_records_every_convolution(checkpoints):
    from safetensors import safe_open
    with safe_open(str(checkpoints["first"][0]), framework="flax") as f:
        metadata = f.metadata()
    assert set(json.loads(metadata["sparse_convs"])) == {"conv1"}
    dense = json.loads(metadata["dense_convs"])
    assert set(dense) == {"conv2"} and dense["conv2"]["out_features"] == 4


# ---- inplace loading touches the template only once everything matched -------------------

def _values(model):
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState)))}


def test_failed_inplace_load_leaves_the_template_untouched(tmp_path):
    # a variable mismatch found only after the sparse layers were placed (review finding):
    # the template must keep its dense layers, its values and its options
    model, _ = sparsify(Net(precision="highest"), {"conv1": 0.5})
    path = tmp_path / "m.safetensors"
    save(model, path)
    template = Net(classes=5, seed=4)
    conv1, before = template.conv1, _values(template)
    with pytest.raises(CheckpointMismatch, match="head/bias"):
        load(path, template, inplace=True)
    assert template.conv1 is conv1 and type(template.conv1) is nnx.Conv
    assert template.conv2.precision is None  # the checkpoint's precision was not restored into it
    after = _values(template)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_successful_inplace_load_fills_the_template_itself(tmp_path):
    model, _ = sparsify(Net(precision="highest"), {"conv1": 0.5})
    path = tmp_path / "m.safetensors"
    save(model, path)
    template = Net(seed=4)
    loaded = load(path, template, inplace=True)
    assert loaded is template and isinstance(template.conv1, SparseConv) and type(template.conv2) is nnx.Conv
    assert template.conv2.precision == "highest" and template.conv1.precision == "highest"
    np.testing.assert_array_equal(template(X), model(X))
    after, saved = _values(template), _values(model)
    assert after.keys() == saved.keys() and all(np.array_equal(after[k], saved[k]) for k in after)


# ---- padding 'SAME_LOWER' (accepted by nnx.Conv, lax and sparse_conv) ---------------------

def test_same_lower_padding_saves_and_loads(tmp_path):
    dense = Net(padding="SAME_LOWER", strides=2)  # 8 rows, stride 2, kernel 3: the extra row goes low
    path = tmp_path / "dense.safetensors"
    save(dense, path)
    np.testing.assert_array_equal(load(path, Net(padding="SAME_LOWER", strides=2, seed=5))(X), dense(X))
    _mismatch(path, Net(padding="SAME", strides=2), "conv1: padding is 'SAME_LOWER' in the checkpoint's Conv "
                                                    "but 'SAME'")
    sparse, _ = sparsify(Net(padding="SAME_LOWER", strides=2), {"conv1": 0.5})
    assert sparse.conv1.padding == "SAME_LOWER"
    path = tmp_path / "sparse.safetensors"
    save(sparse, path)
    loaded = load(path, Net(padding="same_lower", strides=2, seed=5))  # the same padding, any case
    assert loaded.conv1.padding == "SAME_LOWER"
    np.testing.assert_array_equal(loaded(X), sparse(X))
    np.testing.assert_allclose(loaded.conv1(X), sparse.conv1.to_dense()(X), rtol=1e-5, atol=1e-5)
