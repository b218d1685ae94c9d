"""`sparsify`: magnitude-prune the convolutions of an NNX model and make them sparse (the policy).

Every `nnx.Conv` the sparsity argument selects is pruned by magnitude (per
layer). The pruned layer is then computed either by a `SparseConv` or, kept as
an `nnx.Conv` holding the pruned kernel, by XLA's dense convolution. The two
compute the same function, so the model's outputs do not depend on the choice:

* ``policy='sparse'`` / ``'dense'`` force the choice for every layer;
* ``policy='auto'`` times both on the current device, each at the layer's own
  dtype and precision and the sparse side with the kernel family that would
  run, and keeps the faster, so a sparsified model is never slower than the
  dense one layer for layer. Where no native sparse kernel exists on the device,
  sparse counts as unavailable (the densify fallback is never timed). Where the
  tensor-core kernel can run (a GPU with it, any layer at a dtype and precision
  that allow it; `jaxsparse.nn.timing.tensor_core_candidate`) it is
  timed as a third candidate, and a layer it wins becomes a `SparseConv` holding
  its tensor-core plan (`SparseConv.plan_tensor_cores`). The report
  keeps how each timing was got (`LayerDecision.dense_check`, ``sparse_check``)
  and flags the layers decided on a fallback timing (one that failed its checks).

Timing and its on-disk cache: `jaxsparse.nn.timing`; graph surgery:
`jaxsparse.nn.graph`.

The per-layer input shapes ``policy='auto'`` needs are taken from
``sample_input`` (the model is traced once with `nnx.eval_shape`; nothing runs)
or given as ``input_shapes={path: shape}``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsparse.format import SUPPORTED_DTYPES, magnitude_mask
from jaxsparse.nn.graph import capture_input_shapes, find_convs, path_str, set_by_path
from jaxsparse.geometry import dilated_size
from jaxsparse.nn.layers import SparseConv, layer_geometry
from jaxsparse.nn.timing import (LayerSpec, TimingCache, chain_timer, measured_us, native_sparse_unavailable,
                                 tensor_core_candidate, tensor_cores_unavailable)
from jaxsparse.options import canonical_precision, check_kernel

POLICIES = ("sparse", "dense", "auto")


# ---- decisions, report ---------------------------------------------------------


@dataclasses.dataclass
class LayerDecision:
    """One layer's outcome. ``dense_check``/``sparse_check`` say how each timing of
    ``policy='auto'`` was got: 'ok' or 'remeasured' (passed the chain method's checks),
    'fallback' (failed them: a conservative estimate, never cached), 'cached' (from the
    timing cache, where only checked timings go); a timer returning a plain number counts as
    'ok'. None where nothing was timed."""
    path: str
    sparsity: float | None
    nnz: int | None
    dense_us: float | None
    sparse_us: float | None
    choice: str                         # 'sparse', 'dense', or 'unchanged'
    reason: str = ""
    dense_check: str | None = None
    sparse_check: str | None = None
    tensor_core_us: float | None = None  # the tensor-core candidate, where it was timed
    tensor_core_check: str | None = None
    tensor_cores: bool = False          # the SparseConv runs the tensor-core kernel

    @property
    def on_fallback(self) -> bool:
        """Whether the choice rests on a timing that failed its checks."""
        return "fallback" in (self.dense_check, self.sparse_check, self.tensor_core_check)

    @property
    def speedup(self) -> float | None:
        """Dense time over the chosen sparse implementation's."""
        sparse_us = self.tensor_core_us if self.tensor_cores else self.sparse_us
        if self.dense_us is None or sparse_us is None or sparse_us <= 0:
            return None
        return self.dense_us / sparse_us


@dataclasses.dataclass
class SparsifyReport:
    policy: str
    layers: list[LayerDecision]
    cache_path: str | None = None       # where policy='auto' cached its timings
    device: str | None = None           # where policy='auto' timed

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
        return {"policy": self.policy, "cache_path": self.cache_path, "device": self.device,
                "layers": [dataclasses.asdict(d) for d in self.layers]}

    def summary(self) -> str:
        """One line: how many layers went which way, which stayed dense and why, where
        the timings are cached."""
        counts = {c: sum(d.choice == c for d in self.layers) for c in ("sparse", "dense", "unchanged")}
        pruned = counts["sparse"] + counts["dense"]
        groups: dict[str, list[LayerDecision]] = {}
        for d in self.layers:
            if d.choice == "dense":
                groups.setdefault(d.reason or "policy='dense'", []).append(d)
        where = f" on {self.device}" if self.device else ""
        line = (f"policy={self.policy}{where}: {counts['sparse']} sparse, {counts['dense']} dense, "
                f"{counts['unchanged']} unchanged")
        tensor_cores = [d for d in self.layers if d.tensor_cores]
        if tensor_cores:
            line += f"; on tensor cores ({len(tensor_cores)}): {_names(tensor_cores, pruned)}"
        if groups:
            line += "; dense because: " + "; ".join(
                f"{why} ({len(ds)}): {_names(ds, pruned)}{_slowdown(ds)}" for why, ds in groups.items())
        fallback = [d for d in self.layers if d.on_fallback]
        if fallback:
            line += (f"; decided on a fallback timing (failed its checks; not cached) ({len(fallback)}): "
                     f"{_names(fallback, pruned)}")
        if self.policy == "auto" and counts["dense"] and not counts["sparse"]:
            line += ("; no layer went sparse: the model computes as the dense one (pruned kernels), "
                     "and save() stores every kernel in full")
        if self.cache_path:
            line += f"; timings cached in {self.cache_path}"
        return line

    def table(self) -> str:
        def fmt(v, check):  # '~': a fallback timing
            return "-" if v is None else ("~" if check == "fallback" else "") + f"{v:.1f}"
        tc = any(d.tensor_core_us is not None for d in self.layers)  # a column where it was timed
        rows = [f"{'layer':<40} {'sparsity':>8} {'dense µs':>10} {'sparse µs':>10} "
                + (f"{'tc µs':>10} " if tc else "") + f"{'choice':>9}"]
        for d in self.layers:
            s = "-" if d.sparsity is None else f"{d.sparsity:.3f}"
            choice = "sparse/tc" if d.tensor_cores else d.choice
            rows.append(f"{d.path:<40} {s:>8} {fmt(d.dense_us, d.dense_check):>10} "
                        f"{fmt(d.sparse_us, d.sparse_check):>10} "
                        + (f"{fmt(d.tensor_core_us, d.tensor_core_check):>10} " if tc else "")
                        + f"{choice:>9}" + (f"  ({d.reason})" if d.reason else ""))
        rows.append(self.summary())
        return "\n".join(rows)

    __str__ = table


def _names(decisions: list[LayerDecision], pruned: int, most: int = 8) -> str:
    if len(decisions) == pruned and pruned > 2:
        return f"all {pruned} pruned layers"
    names = [d.path for d in decisions]
    return ", ".join(names) if len(names) <= most else ", ".join(names[:most]) + f", +{len(names) - most} more"


def _slowdown(decisions: list[LayerDecision]) -> str:
    """How much slower sparse measured, where both sides were timed."""
    slower = sorted(1 / d.speedup for d in decisions if d.speedup)
    if not slower:
        return ""
    span = f"{slower[0]:.1f}x" if f"{slower[0]:.1f}" == f"{slower[-1]:.1f}" else f"{slower[0]:.1f}-{slower[-1]:.1f}x"
    return f" (sparse {span} slower)"


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
             kernel_family: str | None = None, tensor_cores: bool | None = None, progress: bool | None = None,
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
      timer: ``(LayerSpec, 'dense' | 'sparse') -> µs`` (or a measurement with
        ``us`` and ``ok``, and the ``check`` of a `jaxsparse.benchmark.ChainTime`,
        kept in the report); default `jaxsparse.nn.timing.chain_timer`.
      cache: a `TimingCache`, a JSON path, True (the default location, see
        ``JAXSPARSE_CACHE_DIR``) or False (no cache).
      kernel_family: the ``kernel`` option of the new `SparseConv` layers (None:
        `sparse_conv`'s default); 'auto' times the sparse side with it.
      tensor_cores: for 'auto': also time the tensor-core kernel on the layers it can
        run (`jaxsparse.nn.timing.tensor_core_candidate`). None: where the device has
        it and the default timer runs (an injected timer is asked for 'tensorcore'
        only with True).
      progress: for 'auto': on stderr, where it times and caches, a progress bar
        per layer, then the report's summary (default: on when timing runs, i.e.
        no injected timer).
      inplace: modify ``model`` instead of a clone.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if kernel_family is not None:
        check_kernel(kernel_family)
    new = model if inplace else nnx.clone(model)
    convs = find_convs(new)
    per_layer = _resolve_sparsity(sparsity, convs)
    for p, s in per_layer.items():
        if s is not None and not 0.0 <= float(s) <= 1.0:
            raise ValueError(f"sparsity of {p} must be in [0, 1], got {s}")

    shapes, cache_path, no_native, device, recorded = {}, None, None, None, None
    if policy == "auto":
        if input_shapes is not None:
            shapes = {str(k): (tuple(v), None) for k, v in input_shapes.items()}
        elif sample_input is not None:
            shapes = capture_input_shapes(new, sample_input, call)
        else:
            raise ValueError("policy='auto' needs sample_input (or input_shapes) to know each "
                             "layer's input shape")
        if progress is None:
            progress = timer is None
        if tensor_cores is None:
            tensor_cores = timer is None and tensor_cores_unavailable() is None
        timer = recorded = _Recorded(timer or chain_timer)
        if cache is True:
            cache = TimingCache()
        elif isinstance(cache, (str, os.PathLike)):
            cache = TimingCache(cache)
        if isinstance(cache, TimingCache):
            timer = cache.cached(timer)
            cache_path = str(cache.path)
        no_native = native_sparse_unavailable()
        device = _device_name()

    show = _Progress(convs, device, cache_path, no_native) if policy == "auto" and progress else None
    decisions = []
    for path, conv in convs:
        key = path_str(path)
        if show:
            show.start(key)
        s = per_layer[key]
        if s is None:
            decisions.append(LayerDecision(key, None, None, None, None, "unchanged"))
            if show:
                show.done(decisions[-1])
            continue
        s = float(s)
        kernel = np.asarray(conv.kernel[...])
        if conv.mask is not None:
            kernel = kernel * np.asarray(conv.mask)
        mask = magnitude_mask(kernel, s)
        nnz = int(mask.sum())
        why_not = _unsupported(conv)
        dense_us = sparse_us = tc_us = None
        on_tensor_cores = False
        if policy == "auto":
            recorded.clear()
        if why_not is not None:
            choice, reason = "dense", f"unsupported by SparseConv: {why_not}"
        elif policy == "auto" and no_native:
            choice, reason = "dense", f"sparse unavailable: {no_native}"
        elif policy == "auto":
            spec = _spec(key, conv, shapes, s, batch_size, kernel_family or "auto")
            dense_us, sparse_us = (measured_us(timer(spec, impl))[0] for impl in ("dense", "sparse"))
            best, best_us = "sparse", sparse_us
            if tensor_cores and tensor_core_candidate(spec):
                tc_us = measured_us(timer(spec, "tensorcore"))[0]
                if recorded.faster("tensorcore", tc_us, "sparse", sparse_us):
                    best, best_us = "tensorcore", tc_us
            if recorded.faster(best, best_us, "dense", dense_us):
                choice, reason, on_tensor_cores = "sparse", "", best == "tensorcore"
            else:
                choice, reason = "dense", "dense was faster"
        else:
            choice, reason = policy, ""
        if choice == "sparse":
            layer = SparseConv.from_dense(conv, mask=mask, kernel_family=kernel_family)
            if on_tensor_cores:
                layer.plan_tensor_cores()
            set_by_path(new, path, layer)
        else:
            conv.kernel[...] = jnp.asarray(kernel * mask, conv.kernel.dtype)
        timed = dense_us is not None
        decisions.append(LayerDecision(key, s, nnz, dense_us, sparse_us, choice, reason,
                                       recorded.checks.get("dense", "cached") if timed else None,
                                       recorded.checks.get("sparse", "cached") if timed else None,
                                       tc_us, recorded.checks.get("tensorcore", "cached") if tc_us is not None
                                       else None, on_tensor_cores))
        if show:
            show.done(decisions[-1])
    report = SparsifyReport(policy, decisions, cache_path, device)
    if show:
        show.close(report)
    return new, report


class _Recorded:
    """The timer, noting the check of each result it returns (``checks[impl]``: a `ChainTime`'s
    ``check``; 'ok' for a plain number, 'fallback' for a measurement with ``ok`` False) and its
    per-op time ``T(k_large)/k_large`` before the cache turns it into µs; an impl missing from
    ``checks`` came from the cache."""

    def __init__(self, timer):
        self.timer, self.checks, self.per_op = timer, {}, {}

    def __call__(self, spec, impl):
        result = self.timer(spec, impl)
        self.checks[impl] = getattr(result, "check", None) or ("ok" if getattr(result, "ok", True) else "fallback")
        self.per_op[impl] = getattr(result, "per_op_us", None)
        return result

    def clear(self):
        self.checks.clear()
        self.per_op.clear()

    def faster(self, impl: str, us: float, other: str, other_us: float) -> bool:
        """Whether ``impl`` beat ``other``. A fallback time is ``T(k_large)/k_large`` (the call's
        fixed cost included), a checked one a slope (without it): where either side fell back,
        both sides' ``T(k_large)/k_large`` are compared, so that neither carries the fixed cost alone."""
        pair = (impl, other)
        if any(self.checks.get(i) == "fallback" for i in pair) and all(self.per_op.get(i) for i in pair):
            us, other_us = self.per_op[impl], self.per_op[other]
        return us < other_us


def _device_name() -> str:
    d = jax.devices()[0]
    kind = str(getattr(d, "device_kind", d.platform))
    return d.platform if kind.lower() == d.platform else f"{d.platform} ({kind})"


class _Progress:
    """What ``policy='auto'`` shows on stderr: where it times and caches, a tqdm bar
    per layer (a line per layer without tqdm), then the report's summary."""

    def __init__(self, convs, device, cache_path, no_native):
        where = f"timings cached in {cache_path}" if cache_path else "timings not cached"
        head = f"sparsify: timing {len(convs)} convolutions dense vs sparse on {device}; {where}"
        if no_native:
            head += f"\nsparsify: sparse unavailable ({no_native}): every pruned layer stays dense"
        print(head, file=sys.stderr, flush=True)
        self.counts = {"sparse": 0, "dense": 0}
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=len(convs), desc="sparsify", unit="layer", file=sys.stderr)

    def start(self, key):
        if self.bar is not None:
            self.bar.set_postfix_str(self._status(key))

    def done(self, d: LayerDecision):
        if d.choice in self.counts:
            self.counts[d.choice] += 1
        if self.bar is not None:
            self.bar.set_postfix_str(self._status(d.path), refresh=False)
            self.bar.update()
        else:
            print(f"sparsify: {d.path}: {d.choice}" + (f" ({d.reason})" if d.reason else "")
                  + (" [on a fallback timing]" if d.on_fallback else ""), file=sys.stderr, flush=True)

    def _status(self, key):
        return f"{key}; so far {self.counts['sparse']} sparse, {self.counts['dense']} dense"

    def close(self, report):
        if self.bar is not None:
            self.bar.close()
        print(f"sparsify: {report.summary()}", file=sys.stderr, flush=True)


def _spec(key, conv: nnx.Conv, shapes, sparsity, batch_size, kernel_family) -> LayerSpec:
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

    _, strides, padding, dilation = layer_geometry(conv.kernel_size, conv.strides, conv.padding,
                                                   conv.kernel_dilation)
    if padding in ("CIRCULAR", "REFLECT"):
        padding = "SAME"  # both implementations pad the input the same way first: same cost
    elif padding == "CAUSAL":
        padding = ((dilated_size(conv.kernel_size[0], dilation[0]) - 1, 0),)
    return LayerSpec(key, shape, tuple(conv.kernel.shape), strides, padding,
                     dilation, jnp.dtype(dtype).name, float(sparsity), conv.bias is not None,
                     precision=canonical_precision(conv.precision).name, kernel_family=kernel_family)
