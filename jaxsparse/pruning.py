"""Magnitude pruning of Flax NNX models: one-shot and gradual (Zhu and Gupta, 2017).

Pruning acts on the kernels of `nnx.Conv` layers (and optionally `nnx.Linear`)
while the model is still dense: a `MagnitudePruner` holds one boolean mask per
kernel, zeroes pruned weights, and zeroes their gradients so that pruned
weights stay zero through fine-tuning. Once the final sparsity is reached,
`jaxsparse.nn.sparsify(model, ...)` (or `SparseFilter.from_dense(kernel)`,
which keeps exact zeros) turns the pruned kernels into sparse filters.

``scope='layer'`` prunes every kernel to the target sparsity; ``'global'``
ranks all prunable weights together, so layers end at different sparsities.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsparse.format import magnitude_mask

Path = tuple


def polynomial_sparsity(step: int, *, final: float, begin_step: int, end_step: int,
                        initial: float = 0.0, frequency: int = 1, power: float = 3.0) -> float:
    """Zhu and Gupta's gradual schedule: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3.

    Before ``begin_step`` the sparsity is ``initial``; after ``end_step`` it is
    ``final``; in between it changes only every ``frequency`` steps.
    """
    if not 0.0 <= initial <= final <= 1.0:
        raise ValueError(f"need 0 <= initial <= final <= 1, got {initial}, {final}")
    if end_step <= begin_step:
        return final if step >= begin_step else initial
    if step < begin_step:
        return initial
    step = min(step, end_step)
    step = begin_step + ((step - begin_step) // frequency) * frequency
    progress = (step - begin_step) / (end_step - begin_step)
    return float(final + (initial - final) * (1.0 - progress) ** power)


def default_prunable(path: Path, module) -> bool:
    """Convolution kernels are pruned; dense layers, embeddings and norms are not."""
    return isinstance(module, nnx.Conv)


def prunable_kernels(model, predicate: Callable = default_prunable) -> dict[Path, nnx.Param]:
    """The ``kernel`` params of the modules selected by ``predicate``, keyed by module path."""
    kernels = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and predicate(path, node) and hasattr(node, "kernel"):
            kernels[tuple(path)] = node.kernel
    return kernels


def _global_masks(values: dict[Path, np.ndarray], sparsity: float) -> dict[Path, np.ndarray]:
    flat = np.concatenate([np.abs(v).ravel() for v in values.values()]) if values else np.zeros(0)
    keep = int(round((1.0 - sparsity) * flat.size))
    if keep <= 0:
        return {p: np.zeros(v.shape, bool) for p, v in values.items()}
    # The keep-th largest magnitude; ties at the threshold are broken by position.
    order = np.argsort(-flat, kind="stable")
    mask_flat = np.zeros(flat.size, bool)
    mask_flat[order[:keep]] = True
    masks, offset = {}, 0
    for p, v in values.items():
        masks[p] = mask_flat[offset: offset + v.size].reshape(v.shape)
        offset += v.size
    return masks


@dataclasses.dataclass
class MagnitudePruner:
    """Masks for the prunable kernels of an NNX model.

    Typical fine-tuning loop::

        pruner = MagnitudePruner(model, scope="layer")
        for step in range(steps):
            pruner.update(model, polynomial_sparsity(step, final=0.9, begin_step=0, end_step=steps // 2,
                                                     frequency=50))
            grads = ...                          # nnx.grad of the loss
            grads = pruner.mask_grads(grads)      # pruned weights get no update
            optimizer.update(model, grads)
            pruner.apply(model)                   # and stay exactly zero (e.g. with weight decay)
    """

    model: object
    scope: str = "layer"
    predicate: Callable = default_prunable
    masks: dict = dataclasses.field(default_factory=dict)
    sparsity: float = 0.0

    def __post_init__(self):
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        self.paths = list(prunable_kernels(self.model, self.predicate))
        if not self.paths:
            raise ValueError("the model has no prunable kernels (no nnx.Conv layers?)")

    def compute_masks(self, model, sparsity: float) -> dict[Path, np.ndarray]:
        kernels = prunable_kernels(model, self.predicate)
        values = {p: np.asarray(kernels[p][...], np.float32) for p in self.paths}
        # Weights already pruned stay pruned: rank them below every live weight.
        for p, m in self.masks.items():
            values[p] = np.where(m, values[p], 0.0)
        if self.scope == "global":
            return _global_masks(values, sparsity)
        return {p: magnitude_mask(v, sparsity) for p, v in values.items()}

    def update(self, model, sparsity: float) -> bool:
        """Recomputes the masks when ``sparsity`` rose, and applies them. Returns True if changed."""
        if sparsity <= self.sparsity and self.masks:
            return False
        self.masks = self.compute_masks(model, sparsity)
        self.sparsity = float(sparsity)
        self.apply(model)
        return True

    def apply(self, model) -> None:
        """Zeroes the pruned weights in place."""
        kernels = prunable_kernels(model, self.predicate)
        for p, mask in self.masks.items():
            param = kernels[p]
            param[...] = jnp.where(jnp.asarray(mask), param[...], jnp.zeros((), param[...].dtype))

    def mask_grads(self, grads: nnx.State) -> nnx.State:
        """The gradient state with the pruned weights' entries zeroed."""
        for p, mask in self.masks.items():
            node = grads
            for key in p + ("kernel",):
                node = node[key]
            node[...] = jnp.where(jnp.asarray(mask), node[...], jnp.zeros((), node[...].dtype))
        return grads

    def layer_sparsity(self) -> dict[Path, float]:
        return {p: 1.0 - float(m.mean()) for p, m in self.masks.items()}


def prune_once(model, sparsity: float, *, scope: str = "layer",
               predicate: Callable = default_prunable) -> MagnitudePruner:
    """One-shot magnitude pruning in place; returns the pruner holding the masks."""
    pruner = MagnitudePruner(model, scope=scope, predicate=predicate)
    pruner.update(model, sparsity)
    return pruner
