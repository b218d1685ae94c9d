"""Pruning schedules and masked fine-tuning on NNX models."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxsparse.pruning import MagnitudePruner, polynomial_sparsity, prune_once


class TinyCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 6, (3, 3), rngs=rngs)
        self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        return self.head(x.mean(axis=(1, 2)))


def test_polynomial_schedule_endpoints_and_monotone():
    kw = dict(final=0.9, begin_step=10, end_step=110, frequency=10)
    assert polynomial_sparsity(0, **kw) == 0.0
    assert polynomial_sparsity(110, **kw) == pytest.approx(0.9)
    assert polynomial_sparsity(500, **kw) == pytest.approx(0.9)
    values = [polynomial_sparsity(t, **kw) for t in range(0, 120)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    # Zhu & Gupta: s_t = s_f (1 - (1 - p)^3) at p = 0.5 -> 0.9 * 0.875
    assert polynomial_sparsity(60, **kw) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    # changes only every `frequency` steps
    assert polynomial_sparsity(61, **kw) == polynomial_sparsity(60, **kw)
    with pytest.raises(ValueError):
        polynomial_sparsity(0, final=0.5, initial=0.7, begin_step=0, end_step=10)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_once_reaches_sparsity_and_keeps_largest(scope):
    model = TinyCNN(nnx.Rngs(0))
    before = {k: np.asarray(v) for k, v in [("c1", model.conv1.kernel[...]), ("c2", model.conv2.kernel[...])]}
    pruner = prune_once(model, 0.75, scope=scope)
    k1, k2 = np.asarray(model.conv1.kernel[...]), np.asarray(model.conv2.kernel[...])
    total = k1.size + k2.size
    zeros = (k1 == 0).sum() + (k2 == 0).sum()
    assert zeros == pytest.approx(0.75 * total, abs=2)
    if scope == "layer":
        assert (k1 == 0).mean() == pytest.approx(0.75, abs=1 / k1.size)
        assert (k2 == 0).mean() == pytest.approx(0.75, abs=1 / k2.size)
    # every kept weight is at least as large as every pruned one (per scope)
    kept = np.concatenate([np.abs(before["c1"][k1 != 0]), np.abs(before["c2"][k2 != 0])])
    pruned = np.concatenate([np.abs(before["c1"][k1 == 0]), np.abs(before["c2"][k2 == 0])])
    if scope == "global":
        assert kept.min() >= pruned.max()
    np.testing.assert_array_equal(k1[k1 != 0], before["c1"][k1 != 0])  # survivors untouched
    assert set(pruner.layer_sparsity()) == {("conv1",), ("conv2",)}
    assert np.asarray(model.head.kernel[...]).all()  # dense layer not pruned


def test_masked_finetuning_keeps_pruned_weights_zero_and_learns():
    model = TinyCNN(nnx.Rngs(1))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 8, 8, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 2, 16))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=1e-2), wrt=nnx.Param)
    pruner = MagnitudePruner(model)

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    losses = []
    steps = 40
    for step in range(steps):
        target = polynomial_sparsity(step, final=0.8, begin_step=0, end_step=20, frequency=5)
        pruner.update(model, target)
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        grads = pruner.mask_grads(grads)
        optimizer.update(model, grads)
        pruner.apply(model)
        losses.append(float(loss))
    assert pruner.sparsity == pytest.approx(0.8)
    for path, mask in pruner.masks.items():
        kernel = np.asarray(getattr(model, path[0]).kernel[...])
        assert not kernel[~mask].any()          # pruned weights exactly zero
        assert (kernel == 0).mean() == pytest.approx(0.8, abs=0.02)
    assert losses[-1] < losses[0]


def test_pruned_stay_pruned_when_sparsity_rises():
    model = TinyCNN(nnx.Rngs(2))
    pruner = prune_once(model, 0.5)
    first = {p: m.copy() for p, m in pruner.masks.items()}
    pruner.update(model, 0.8)
    for p in first:
        assert not (pruner.masks[p] & ~first[p]).any()  # no revived weight
    assert not pruner.update(model, 0.7)  # never decreases
