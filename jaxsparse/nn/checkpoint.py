"""Save and load sparsified NNX models (safetensors).

A checkpoint holds every variable of the model except RNG state (keys cannot be
stored as tensors), named by its graph path ('features/3/data'), plus metadata:
every `SparseConv` (its path, constructor config and nnz) and every dense
`nnx.Conv` (its path and the same configuration keys). Loading needs a
*template*: the model's architecture as built by its constructor (dense, as
from ``VGG16(...)``, or already sparsified).

Loading validates the template against the checkpoint before anything is filled:

* at every convolution the checkpoint lists, the template must hold a
  convolution (`nnx.Conv` or `SparseConv`; a dense one where the checkpoint's
  is dense) whose geometry equals the checkpoint's: kernel size, input and
  output channels, strides, padding, kernel dilation, bias or not, ``dtype``
  and parameter dtype, no input dilation or feature groups; for a `SparseConv`
  template also its activation. ``precision`` and ``kernel_family`` are
  options: where the template leaves them None, the checkpoint's stored values
  are restored; where it sets them, they must agree. Every mismatch is reported
  with the layer path and both values (`CheckpointMismatch`, a ``ValueError``);
* the checkpoint's sparse convolutions then replace the template's layers
  (empty `SparseConv` layers of the recorded configuration and nnz), and every
  variable is filled from the file: the names must match exactly, and a shape
  or dtype difference of any variable (dense layers, norms, heads) raises,
  naming the variable and both shapes;
* finally every sparse layer's CSR structure is validated, and a layer saved with
  a tensor-core plan gets it back: its layout arrays are stored under
  ``<layer>/tensor_core_plan/<array>`` (the pattern is the layer's own) and are
  checked against the layer's pattern and the layout's bounds on load
  (`jaxsparse.TensorCorePlanError` naming the layer).

All of this happens on a clone of the template: with ``inplace=True`` the
template itself is changed only once every check has passed (a mismatch
leaves it exactly as it was).

Checkpoints written before dense convolutions were recorded still load (their
dense layers are checked by variable shapes only).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsparse.nn.graph import get_child, parse_path, path_str, set_by_path
from jaxsparse.nn.layers import SparseConv, _as_tuple, canonicalize_padding
from jaxsparse.options import canonical_precision, precision_from_json, precision_to_json
from jaxsparse.tc_plan import TensorCorePlanError, plan_arrays, plan_from_arrays

FORMAT = "jaxsparse.nn/1"

# Configuration keys that fix what a layer computes: they must match exactly.
GEOMETRY_KEYS = ("kernel_size", "in_features", "out_features", "strides", "padding", "kernel_dilation",
                 "use_bias", "dtype", "param_dtype")
# Options restored from the checkpoint where the template leaves them None.
OPTION_KEYS = ("precision", "kernel_family")
# A sparse layer's tensor-core plan: tensors "<layer>/tensor_core_plan/<array>".
PLAN_DIR = "tensor_core_plan"


class CheckpointMismatch(ValueError):
    """The template does not have the architecture the checkpoint was saved from."""


def _variables(model) -> dict[str, nnx.Variable]:
    state = nnx.state(model, nnx.Not(nnx.RngState))
    return {path_str(p): v for p, v in nnx.to_flat_state(state)}


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else np.dtype(dtype).name


def _precision_json(precision):
    """``precision`` as JSON, or None where it cannot be stored (then it is not restored)."""
    try:
        return precision_to_json(precision)
    except ValueError:
        return None


def dense_conv_config(conv: nnx.Conv) -> dict:
    """An `nnx.Conv`'s configuration under the keys of `SparseConv.config` (JSON)."""
    nd = len(conv.kernel_size)
    padding = canonicalize_padding(conv.padding, nd)
    return dict(kernel_size=[int(k) for k in conv.kernel_size], in_features=int(conv.in_features),
                out_features=int(conv.out_features), strides=list(_as_tuple(conv.strides, nd, "strides")),
                padding=padding if isinstance(padding, str) else [list(p) for p in padding],
                kernel_dilation=list(_as_tuple(conv.kernel_dilation, nd, "kernel_dilation")),
                use_bias=conv.bias is not None, dtype=_dtype_name(conv.dtype),
                param_dtype=_dtype_name(conv.kernel.dtype), precision=_precision_json(conv.precision),
                input_dilation=list(_as_tuple(conv.input_dilation, nd, "input_dilation")),
                feature_group_count=int(conv.feature_group_count))


def save(model, path: str | os.PathLike) -> None:
    """Writes ``model``'s variables and convolution configurations to a safetensors file."""
    from safetensors.flax import save_file
    sparse, dense, plans = {}, {}, {}
    for p, node in nnx.iter_graph(model):
        if isinstance(node, SparseConv):
            sparse[path_str(p)] = {"config": node.config(), "nnz": node.nnz}
            if node.tensor_core_plan is not None:
                arrays, meta = plan_arrays(node.tensor_core_plan, pattern=False)
                sparse[path_str(p)]["tensor_core_plan"] = meta
                plans.update({f"{path_str(p)}/{PLAN_DIR}/{k}": jnp.asarray(v) for k, v in arrays.items()})
        elif isinstance(node, nnx.Conv):
            dense[path_str(p)] = dense_conv_config(node)
    tensors = {k: jnp.asarray(v[...]) for k, v in _variables(model).items()}
    tensors.update(plans)
    save_file(tensors, os.fspath(path), metadata={"format": FORMAT, "sparse_convs": json.dumps(sparse),
                                                  "dense_convs": json.dumps(dense)})


# ---- template validation ----------------------------------------------------------

def _template_config(node) -> dict:
    """The template layer's configuration, with the values a SparseConv would need."""
    if isinstance(node, SparseConv):
        return dict(node.config(), input_dilation=[1] * len(node.kernel_size), feature_group_count=1)
    return dict(dense_conv_config(node), kernel_family=None)


def _same_precision(a, b) -> bool:
    def canonical(p):
        try:
            return None if p is None else canonical_precision(precision_from_json(p))
        except ValueError:
            return p
    return canonical(a) == canonical(b)


def _config_mismatches(key: str, saved: dict, template: dict, saved_kind: str, template_kind: str) -> list[str]:
    """One line per configuration value that differs (naming the layer and both values)."""
    nd = len(saved["kernel_size"])
    expected = dict(saved, input_dilation=[1] * nd, feature_group_count=1) if saved_kind == "SparseConv" else saved
    keys = GEOMETRY_KEYS + ("input_dilation", "feature_group_count")
    if template_kind == "SparseConv" and saved_kind == "SparseConv":
        keys += ("activation",)
    lines = [f"{key}: {k} is {expected.get(k)!r} in the checkpoint's {saved_kind} but "
             f"{template.get(k)!r} in the template's {template_kind}"
             for k in keys if k in expected and expected.get(k) != template.get(k)]
    for k in OPTION_KEYS:
        if k in expected and template.get(k) is not None:
            same = (_same_precision(expected.get(k), template[k]) if k == "precision"
                    else expected.get(k) == template[k])
            if not same:
                lines.append(f"{key}: {k} is {expected.get(k)!r} in the checkpoint's {saved_kind} but "
                             f"{template[k]!r} in the template's {template_kind} (leave it None to "
                             "take the checkpoint's)")
    return lines


def _template_node(model, key: str):
    node = model
    try:
        for p in parse_path(key):
            node = get_child(node, p)
    except (AttributeError, KeyError, IndexError, TypeError):
        return None
    return node


def _check_layer(model, key: str, saved: dict, saved_kind: str) -> list[str]:
    node = _template_node(model, key)
    if node is None:
        return [f"{key}: the checkpoint has a {saved_kind} there, which the template lacks"]
    allowed = (nnx.Conv, SparseConv) if saved_kind == "SparseConv" else (nnx.Conv,)
    if not isinstance(node, allowed):
        return [f"{key}: the checkpoint has a {saved_kind} there, where the template has a "
                f"{type(node).__name__}"]
    return _config_mismatches(key, saved, _template_config(node), saved_kind, type(node).__name__)


def _check_template(model, sparse: dict, dense: dict) -> None:
    problems = [line for key, entry in sparse.items()
                for line in _check_layer(model, key, entry["config"], "SparseConv")]
    problems += [line for key, config in dense.items() for line in _check_layer(model, key, config, "Conv")]
    if problems:
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise CheckpointMismatch(f"the template does not match the checkpoint's layers:\n  {shown}")


def _restore_dense_precision(model, dense: dict) -> None:
    """A dense template conv that leaves precision None takes the checkpoint's."""
    for key, config in dense.items():
        node = _template_node(model, key)
        if node.precision is None and config.get("precision") is not None:
            node.precision = precision_from_json(config["precision"])


# ---- variables ----------------------------------------------------------------------

def _describe(value) -> str:
    return f"shape {tuple(int(d) for d in value.shape)} {np.dtype(value.dtype).name}"


def _fill_variables(model, tensors: dict) -> None:
    variables = _variables(model)
    missing = sorted(set(variables) - set(tensors))
    unexpected = sorted(set(tensors) - set(variables))
    if missing or unexpected:
        raise CheckpointMismatch(f"checkpoint does not match the template: variables missing from the "
                                 f"checkpoint {missing[:8]}, in the checkpoint but not the template "
                                 f"{unexpected[:8]}")
    wrong = [f"{key}: the checkpoint has {_describe(tensors[key])}, the template {_describe(var)}"
             for key, var in variables.items()
             if tuple(tensors[key].shape) != tuple(var.shape)
             or np.dtype(tensors[key].dtype) != np.dtype(var.dtype)]
    if wrong:
        raise CheckpointMismatch("variables differ between the checkpoint and the template:\n  " +
                                 "\n  ".join(wrong[:20]))
    for key, var in variables.items():
        var[...] = tensors[key]


def _restore_plan(layer: SparseConv, key: str, meta: dict, plan_tensors: dict) -> None:
    """Attaches the stored tensor-core plan to the loaded ``layer``, checked against its pattern."""
    prefix = f"{key}/{PLAN_DIR}/"
    arrays = {k[len(prefix):]: np.asarray(v) for k, v in plan_tensors.items() if k.startswith(prefix)}
    arrays.update(indices=np.asarray(layer.indices[...]), indptr=np.asarray(layer.indptr[...]))
    try:
        plan = plan_from_arrays(arrays, meta, f"the tensor-core plan of {key}")
        layer.plan_tensor_cores(plan)
    except (TensorCorePlanError, KeyError, TypeError) as e:
        raise TensorCorePlanError(f"{key}: the checkpoint's tensor-core plan does not fit the layer: {e}") from e


def load(path: str | os.PathLike, template, *, inplace: bool = False):
    """A model with ``template``'s architecture and the checkpoint's sparse layers and values.

    Raises `CheckpointMismatch` (a ``ValueError``) naming the layer or variable
    and both values wherever the template differs from the checkpoint (see the
    module docstring)."""
    from safetensors import safe_open
    from safetensors.flax import load_file
    with safe_open(os.fspath(path), framework="flax") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a jaxsparse.nn checkpoint (format {metadata.get('format')!r})")
    sparse = json.loads(metadata["sparse_convs"])
    dense = json.loads(metadata.get("dense_convs", "{}"))  # absent from older checkpoints
    # Everything happens on a clone (it shares the template's arrays, which are immutable):
    # a mismatch found at any step leaves the template as it was, even with inplace=True.
    model = nnx.clone(template)
    _check_template(model, sparse, dense)
    for key, entry in sparse.items():
        set_by_path(model, parse_path(key), SparseConv.from_structure(entry["config"], entry["nnz"]))
    _restore_dense_precision(model, dense)
    tensors = load_file(os.fspath(path))
    plan_tensors = {k: tensors.pop(k) for k in list(tensors)
                    if any(k.startswith(f"{key}/{PLAN_DIR}/") for key in sparse)}
    _fill_variables(model, tensors)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, SparseConv):
            node.sparse_filter  # validates the loaded structure
    for key, entry in sparse.items():
        if "tensor_core_plan" in entry:
            _restore_plan(_template_node(model, key), key, entry["tensor_core_plan"], plan_tensors)
    if not inplace:
        return model
    # Success: move the result into the template (the loaded sparse layers themselves,
    # the restored options, then every other variable's value).
    for key in sparse:
        set_by_path(template, parse_path(key), _template_node(model, key))
    _restore_dense_precision(template, dense)
    nnx.update(template, nnx.state(model, nnx.Not(nnx.RngState)))
    return template
