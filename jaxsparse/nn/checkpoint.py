"""Save and load sparsified NNX models (safetensors).

A checkpoint holds every variable of the model except RNG state (keys cannot be
stored as tensors), named by its graph path ('features/3/data'), plus metadata
listing each `SparseConv` (its path, constructor config and nnz). Loading needs
a *template*: the model's architecture as built by its constructor (dense, as
from ``VGG16(...)``, or already sparsified); the convolutions the metadata lists
are replaced by empty `SparseConv` layers of the recorded size, then every
variable is filled from the file, with shapes and dtypes checked.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsparse.nn.layers import SparseConv
from jaxsparse.nn.graph import get_child, parse_path, path_str, set_by_path

FORMAT = "jaxsparse.nn/1"


def _variables(model) -> dict[str, nnx.Variable]:
    state = nnx.state(model, nnx.Not(nnx.RngState))
    return {path_str(p): v for p, v in nnx.to_flat_state(state)}


def save(model, path: str | os.PathLike) -> None:
    """Writes ``model``'s variables and sparse-layer structure to a safetensors file."""
    from safetensors.flax import save_file
    sparse = {path_str(p): {"config": n.config(), "nnz": n.nnz}
              for p, n in nnx.iter_graph(model) if isinstance(n, SparseConv)}
    tensors = {k: jnp.asarray(v[...]) for k, v in _variables(model).items()}
    save_file(tensors, os.fspath(path), metadata={"format": FORMAT, "sparse_convs": json.dumps(sparse)})


def load(path: str | os.PathLike, template, *, inplace: bool = False):
    """A model with ``template``'s architecture and the checkpoint's sparse layers and values."""
    from safetensors import safe_open
    from safetensors.flax import load_file
    with safe_open(os.fspath(path), framework="flax") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a jaxsparse.nn checkpoint (format {metadata.get('format')!r})")
    model = template if inplace else nnx.clone(template)
    for key, entry in json.loads(metadata["sparse_convs"]).items():
        parts = parse_path(key)
        node = model
        try:
            for p in parts:
                node = get_child(node, p)
        except (AttributeError, KeyError, IndexError, TypeError):
            raise ValueError(f"the checkpoint has a sparse layer at {key!r}, which the template lacks") from None
        if not isinstance(node, (nnx.Conv, SparseConv)):
            raise ValueError(f"the checkpoint has a sparse layer at {key!r}, where the template has a "
                             f"{type(node).__name__}")
        set_by_path(model, parts, SparseConv.from_structure(entry["config"], entry["nnz"]))
    tensors = load_file(os.fspath(path))
    variables = _variables(model)
    missing = sorted(set(variables) - set(tensors))
    unexpected = sorted(set(tensors) - set(variables))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the template: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    for key, var in variables.items():
        value = tensors[key]
        if tuple(value.shape) != tuple(var.shape) or np.dtype(value.dtype) != np.dtype(var.dtype):
            raise ValueError(f"{key}: checkpoint has {value.dtype}{list(value.shape)}, the template "
                             f"{np.dtype(var.dtype)}{list(var.shape)}")
        var[...] = value
    for _, node in nnx.iter_graph(model):
        if isinstance(node, SparseConv):
            node.sparse_filter  # validates the loaded structure
    return model
