"""`sparsify`: magnitude-prune the convolutions of an NNX model and make them sparse.

Every `nnx.Conv` the sparsity argument selects is pruned by magnitude (per
layer). The pruned layer is then computed either by a `SparseConv` or, kept as
an `nnx.Conv` holding the pruned kernel, by XLA's dense convolution. The two
compute the same function, so the model's outputs do not depend on the choice:

* ``policy='sparse'`` / ``'dense'`` force the choice for every layer;
* ``policy='auto'`` times both on the current device and keeps the faster, so a
  sparsified model is never slower than the dense one layer for layer.

Timing goes through ``timer(spec: LayerSpec, impl: 'dense' | 'sparse') -> µs``.
The default, `chain_timer`, uses `jaxsparse.benchmark.chain_time_us` (chain
method, synchronised, median of repeats). Results are cached on disk (JSON)
keyed by device kind, platform, JAX and jaxsparse versions, shapes, dtype,
sparsity and batch (`TimingCache`). Tests inject deterministic timers.

The per-layer input shapes ``policy='auto'`` needs are taken from
``sample_input`` (the model is traced once with `nnx.eval_shape`; nothing runs)
or given as ``input_shapes={path: shape}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsparse.format import SUPPORTED_DTYPES, magnitude_mask
from jaxsparse.nn.layers import SparseConv, canonicalize_padding

POLICIES = ("sparse", "dense", "auto")
CACHE_ENV = "JAXSPARSE_CACHE_DIR"


# ---- specs, decisions, report ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What the timer needs to know about one layer (hashable, JSON-serialisable)."""
    path: str
    input_shape: tuple[int, ...]        # (N, *spatial, Cin); N is the batch
    kernel_shape: tuple[int, ...]       # HWIO / WIO
    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    kernel_dilation: tuple[int, ...]
    dtype: str                          # compute dtype
    sparsity: float
    use_bias: bool

    @property
    def batch(self) -> int:
        return int(self.input_shape[0])

    def cache_key(self) -> dict:
        """Everything the time depends on (not the layer's name)."""
        d = dataclasses.asdict(self)
        d.pop("path")
        d["sparsity"] = round(float(self.sparsity), 6)
        d["batch"] = self.batch
        return d


@dataclasses.dataclass
class LayerDecision:
    path: str
    sparsity: float | None
    nnz: int | None
    dense_us: float | None
    sparse_us: float | None
    choice: str                         # 'sparse', 'dense', or 'unchanged'
    reason: str = ""

    @property
    def speedup(self) -> float | None:
        if self.dense_us is None or self.sparse_us is None or self.sparse_us <= 0:
            return None
        return self.dense_us / self.sparse_us


@dataclasses.dataclass
class SparsifyReport:
    policy: str
    layers: list[LayerDecision]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, path: str) -> LayerDecision:
        for d in self.layers:
            if d.path == path:
                return d
        raise KeyError(path)

    def choices(self) -> dict[str, str]:
        return {d.path: d.choice for d in self.layers}

    def to_json(self) -> dict:
        return {"policy": self.policy, "layers": [dataclasses.asdict(d) for d in self.layers]}

    def table(self) -> str:
        def fmt(v):
            return "-" if v is None else f"{v:.1f}"
        rows = [f"{'layer':<40} {'sparsity':>8} {'dense µs':>10} {'sparse µs':>10} {'choice':>8}"]
        for d in self.layers:
            s = "-" if d.sparsity is None else f"{d.sparsity:.3f}"
            rows.append(f"{d.path:<40} {s:>8} {fmt(d.dense_us):>10} {fmt(d.sparse_us):>10} "
                        f"{d.choice:>8}" + (f"  ({d.reason})" if d.reason else ""))
        return "\n".join(rows)

    __str__ = table


# ---- timing -----------------------------------------------------------------

def _device_info() -> dict:
    d = jax.devices()[0]
    import jaxsparse
    return {"device_kind": getattr(d, "device_kind", str(d)), "platform": d.platform,
            "jax": jax.__version__, "jaxsparse": jaxsparse.__version__}


class TimingCache:
    """Timings on disk, one JSON object ``{key: µs}``; keys include the device and versions."""

    def __init__(self, path: str | os.PathLike | None = None):
        if path is None:
            root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "jaxsparse")
            path = os.path.join(root, "sparsify_timings.json")
        self.path = pathlib.Path(path)
        try:
            self._entries = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self._entries = {}

    @staticmethod
    def key(spec: LayerSpec, impl: str) -> str:
        return json.dumps({**_device_info(), **spec.cache_key(), "impl": impl}, sort_keys=True)

    def get(self, spec: LayerSpec, impl: str) -> float | None:
        return self._entries.get(self.key(spec, impl))

    def put(self, spec: LayerSpec, impl: str, us: float) -> None:
        self._entries[self.key(spec, impl)] = float(us)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._entries, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def __len__(self):
        return len(self._entries)

    def cached(self, timer: tp.Callable[[LayerSpec, str], float]) -> tp.Callable[[LayerSpec, str], float]:
        def timed(spec, impl):
            us = self.get(spec, impl)
            if us is None:
                us = float(timer(spec, impl))
                self.put(spec, impl, us)
            return us
        return timed


def layer_functions(spec: LayerSpec, seed: int = 0):
    """(dense_fn, sparse_fn, x): both compute the pruned layer ``x -> y`` on random weights."""
    from jaxsparse.format import SparseFilter
    from jaxsparse.ops import sparse_conv
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(spec.dtype)
    kernel = rng.standard_normal(spec.kernel_shape).astype(np.float32)
    kernel = kernel * magnitude_mask(kernel, spec.sparsity)
    cout = spec.kernel_shape[-1]
    bias = jnp.asarray(rng.standard_normal(cout).astype(np.float32), dtype) if spec.use_bias else None
    filt = SparseFilter.from_dense(kernel, sparsity=None, dtype=dtype)
    nd = len(spec.kernel_shape) - 2
    padding = spec.padding if isinstance(spec.padding, str) else tuple(map(tuple, spec.padding))
    dense_kernel = jnp.asarray(kernel, dtype)
    dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NWC", "WIO", "NWC")

    def dense(x):
        y = jax.lax.conv_general_dilated(x, dense_kernel, spec.strides, padding,
                                         rhs_dilation=spec.kernel_dilation, dimension_numbers=dn)
        return y if bias is None else y + bias

    def sparse(x):
        return sparse_conv(x, filt, strides=spec.strides, padding=padding,
                           rhs_dilation=spec.kernel_dilation, bias=bias)

    x = jnp.asarray(rng.standard_normal(spec.input_shape).astype(np.float32), dtype)
    return dense, sparse, x


def chain_timer(spec: LayerSpec, impl: str, **chain_kwargs) -> float:
    """Per-call µs of the layer by the chain method (`jaxsparse.benchmark.chain_time_us`).

    A convolution's output generally cannot feed its input (channels, stride),
    so each chain step is ``x -> x + 1e-6 * mean(layer(x))``: a dependent chain
    whose extra cost (one reduction of the output) is the same for both
    implementations."""
    from jaxsparse.benchmark import chain_time_us
    dense, sparse, x = layer_functions(spec)
    fn = {"dense": dense, "sparse": sparse}[impl]

    def step(x):
        return x + (1e-6 * jnp.mean(fn(x).astype(jnp.float32))).astype(x.dtype)

    return float(chain_time_us(step, x, **chain_kwargs))


# ---- graph helpers ----------------------------------------------------------

def path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def find_convs(model) -> list[tuple[tuple, nnx.Conv]]:
    return [(tuple(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Conv)]


def _get_child(node, key):
    if isinstance(key, str) and not isinstance(node, (dict, tp.Mapping)) and hasattr(node, key):
        return getattr(node, key)
    return node[key]


def set_by_path(model, path: tuple, value) -> None:
    node = model
    for key in path[:-1]:
        node = _get_child(node, key)
    key = path[-1]
    if isinstance(key, str) and isinstance(node, nnx.Module):
        setattr(node, key, value)
    else:
        node[key] = value


class _ShapeRecorder(nnx.Module):
    """Stands in for a conv while tracing the model, recording its input shape."""
    sink: tp.ClassVar[dict] = {}

    def __init__(self, conv, key: str):
        self.conv = conv
        self.key = key

    def __call__(self, x, *args, **kwargs):
        _ShapeRecorder.sink[self.key] = (tuple(x.shape), jnp.dtype(x.dtype).name)
        return self.conv(x, *args, **kwargs)


def capture_input_shapes(model, sample_input, call: tp.Callable | None = None) -> dict[str, tuple]:
    """``{conv path: (input shape, input dtype)}`` from one abstract trace of the model."""
    convs = find_convs(model)
    call = call or (lambda m, x: m(x))
    work = nnx.clone(model)
    for path, conv in find_convs(work):
        set_by_path(work, path, _ShapeRecorder(conv, path_str(path)))
    _ShapeRecorder.sink = {}
    try:
        nnx.eval_shape(call, work, sample_input)
        shapes = dict(_ShapeRecorder.sink)
    finally:
        _ShapeRecorder.sink = {}
    missing = [path_str(p) for p, _ in convs if path_str(p) not in shapes]
    if missing:
        raise ValueError(f"these convolutions were not called on sample_input: {missing}")
    return shapes


# ---- sparsify ---------------------------------------------------------------

def _unsupported(conv: nnx.Conv) -> str | None:
    nd = len(conv.kernel_size)
    if nd not in (1, 2):
        return f"{nd}-D kernel"
    if conv.feature_group_count != 1:
        return "grouped convolution"
    dil = conv.input_dilation
    if dil not in (None, 1) and tuple(np.broadcast_to(dil, (nd,))) != (1,) * nd:
        return "input dilation"
    if np.dtype(conv.kernel.dtype) not in SUPPORTED_DTYPES:
        return f"kernel dtype {conv.kernel.dtype}"
    if conv.mask is not None:
        return None
    return None


def _resolve_sparsity(sparsity, convs) -> dict[str, float | None]:
    paths = [path_str(p) for p, _ in convs]
    if callable(sparsity):
        return {path_str(p): sparsity(path_str(p), c) for p, c in convs}
    if isinstance(sparsity, tp.Mapping):
        chosen = {}
        for key, value in sparsity.items():
            k = path_str(key) if isinstance(key, tuple) else str(key)
            if k not in paths:
                raise ValueError(f"sparsity names {k!r}, which is not an nnx.Conv of the model; "
                                 f"convolutions: {paths}")
            chosen[k] = value
        return {p: chosen.get(p) for p in paths}
    return {p: float(sparsity) for p in paths}


def sparsify(model, sparsity, *, policy: str = "sparse", sample_input=None,
             input_shapes: tp.Mapping[str, tp.Sequence[int]] | None = None, call=None,
             batch_size: int | None = None, timer=None, cache: TimingCache | str | os.PathLike | bool = True,
             inplace: bool = False):
    """Prunes and replaces the `nnx.Conv` layers of ``model``; returns ``(new_model, report)``.

    Args:
      model: an NNX module (any graph of modules, lists and dicts).
      sparsity: a float in [0, 1] for every convolution; a dict ``{path: float}``
        (path as 'a/b/0' or a tuple; convolutions not named are left unchanged);
        or a callable ``(path, conv) -> float | None``.
      policy: 'sparse' (every pruned layer a `SparseConv`), 'dense' (pruned
        `nnx.Conv`), or 'auto' (time both per layer, keep the faster).
      sample_input, call: for 'auto': a model input; layer input shapes come from
        ``nnx.eval_shape(call, model, sample_input)`` (``call`` defaults to
        ``lambda m, x: m(x)``). Or give ``input_shapes={path: shape}``.
      batch_size: for 'auto': time at this batch instead of the input's.
      timer: ``(LayerSpec, 'dense' | 'sparse') -> µs``; default `chain_timer`.
      cache: a `TimingCache`, a JSON path, True (the default location, see
        ``JAXSPARSE_CACHE_DIR``) or False (no cache).
      inplace: modify ``model`` instead of a clone.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    new = model if inplace else nnx.clone(model)
    convs = find_convs(new)
    per_layer = _resolve_sparsity(sparsity, convs)
    for p, s in per_layer.items():
        if s is not None and not 0.0 <= float(s) <= 1.0:
            raise ValueError(f"sparsity of {p} must be in [0, 1], got {s}")

    shapes = {}
    if policy == "auto":
        if input_shapes is not None:
            shapes = {str(k): (tuple(v), None) for k, v in input_shapes.items()}
        elif sample_input is not None:
            shapes = capture_input_shapes(new, sample_input, call)
        else:
            raise ValueError("policy='auto' needs sample_input (or input_shapes) to know each "
                             "layer's input shape")
        timer = timer or chain_timer
        if cache is True:
            cache = TimingCache()
        elif isinstance(cache, (str, os.PathLike)):
            cache = TimingCache(cache)
        if isinstance(cache, TimingCache):
            timer = cache.cached(timer)

    decisions = []
    for path, conv in convs:
        key = path_str(path)
        s = per_layer[key]
        if s is None:
            decisions.append(LayerDecision(key, None, None, None, None, "unchanged"))
            continue
        s = float(s)
        kernel = np.asarray(conv.kernel[...])
        if conv.mask is not None:
            kernel = kernel * np.asarray(conv.mask)
        mask = magnitude_mask(kernel, s)
        nnz = int(mask.sum())
        why_not = _unsupported(conv)
        dense_us = sparse_us = None
        if why_not is not None:
            choice, reason = "dense", f"unsupported by SparseConv: {why_not}"
        elif policy == "auto":
            spec = _spec(key, conv, shapes, s, batch_size)
            dense_us, sparse_us = float(timer(spec, "dense")), float(timer(spec, "sparse"))
            choice, reason = ("sparse" if sparse_us < dense_us else "dense"), ""
        else:
            choice, reason = policy, ""
        if choice == "sparse":
            set_by_path(new, path, SparseConv.from_dense(conv, mask=mask))
        else:
            conv.kernel[...] = jnp.asarray(kernel * mask, conv.kernel.dtype)
        decisions.append(LayerDecision(key, s, nnz, dense_us, sparse_us, choice, reason))
    return new, SparsifyReport(policy, decisions)


def _spec(key, conv: nnx.Conv, shapes, sparsity, batch_size) -> LayerSpec:
    if key not in shapes:
        raise ValueError(f"no input shape for {key}; known: {sorted(shapes)}")
    shape, in_dtype = shapes[key]
    nd = len(conv.kernel_size)
    shape = tuple(int(v) for v in shape)
    shape = (math.prod(shape[:len(shape) - nd - 1]) if len(shape) != nd + 2 else shape[0],) + shape[-nd - 1:]
    if batch_size is not None:
        shape = (int(batch_size),) + shape[1:]
    if conv.dtype is not None:
        dtype = jnp.dtype(conv.dtype)
    else:
        dtype = jnp.promote_types(in_dtype or conv.kernel.dtype, conv.kernel.dtype)
    def tup(v):
        return tuple(int(a) for a in np.broadcast_to(1 if v is None else v, (nd,)))

    padding = canonicalize_padding(conv.padding, nd)
    if padding in ("CIRCULAR", "REFLECT"):
        padding = "SAME"  # both implementations pad the input the same way first: same cost
    elif padding == "CAUSAL":
        padding = ((tup(conv.kernel_dilation)[0] * (conv.kernel_size[0] - 1), 0),)
    return LayerSpec(key, shape, tuple(conv.kernel.shape), tup(conv.strides), padding,
                     tup(conv.kernel_dilation), jnp.dtype(dtype).name, float(sparsity), conv.bias is not None)
