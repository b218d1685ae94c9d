"""Timing of one layer, dense against sparse, for `sparsify(policy='auto')`.

Timing goes through ``timer(spec: LayerSpec, impl: 'dense' | 'sparse' | 'tensorcore')``,
which returns µs or a measurement with ``us`` and ``ok`` ('tensorcore': `jaxsparse.tc_conv`
on the layer's tensor-core plan, for the layers `tensor_core_candidate` admits). The default, `chain_timer`,
uses the chain method and returns a checked `jaxsparse.benchmark.ChainTime`
(``ok`` False for a ``'fallback'`` estimate). Results are cached on disk
(JSON) keyed by device kind, platform, JAX and jaxsparse versions and every
field of the `LayerSpec` but its path (shapes, dtype, precision, kernel family,
sparsity, batch); a measurement that failed its checks is never cached, and a
non-positive entry on disk is ignored (`TimingCache`). Tests inject
deterministic timers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsparse import _native
from jaxsparse.format import magnitude_mask
from jaxsparse.geometry import conv_output_shape, normalize_padding

CACHE_ENV = "JAXSPARSE_CACHE_DIR"


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
    precision: str = "DEFAULT"          # the lax.Precision name that governs the layer
    kernel_family: str = "auto"         # the sparse kernel option that would run

    @property
    def batch(self) -> int:
        return int(self.input_shape[0])

    @property
    def padding_arg(self) -> str | tuple[tuple[int, int], ...]:
        """``padding`` as the convolutions take it (pairs as tuples; JSON gives lists)."""
        return self.padding if isinstance(self.padding, str) else tuple(map(tuple, self.padding))

    def cache_key(self) -> dict:
        """Everything the time depends on (not the layer's name)."""
        d = dataclasses.asdict(self)
        d.pop("path")
        d["sparsity"] = round(float(self.sparsity), 6)
        d["batch"] = self.batch
        return d


def measured_us(result) -> tuple[float, bool]:
    """(µs, passed its checks) of a timer's result: a number, or a measurement
    with ``us`` and ``ok``. A non-finite or non-positive time never passes."""
    us = float(getattr(result, "us", result))
    ok = bool(getattr(result, "ok", True)) and np.isfinite(us) and us > 0
    return us, ok


def _device_info() -> dict:
    d = jax.devices()[0]
    import jaxsparse
    return {"device_kind": getattr(d, "device_kind", str(d)), "platform": d.platform,
            "jax": jax.__version__, "jaxsparse": jaxsparse.__version__}


def native_sparse_unavailable(target: str = _native.TARGET, what: str = "native sparse kernel") -> str | None:
    """Why no native ``target`` (default: the sparse convolution) would run on the default
    device (None: one would)."""
    platform = jax.devices()[0].platform
    target_platform = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}.get(platform)
    if target_platform and _native.has_target(target, target_platform):
        return None
    error = _native.cpu_import_error if target_platform == "cpu" else _native.cuda_import_error
    return f"no {what} on {platform}" + (f" ({error})" if error else "")


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
        """The cached µs, or None (also for an entry that is not a positive number: a JSON
        ``true`` is no time, although a Python bool is an int)."""
        us = self._entries.get(self.key(spec, impl))
        ok = isinstance(us, (int, float)) and not isinstance(us, bool) and math.isfinite(us) and us > 0
        return us if ok else None

    def put(self, spec: LayerSpec, impl: str, us: float) -> None:
        self._entries[self.key(spec, impl)] = float(us)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._entries, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def __len__(self):
        return len(self._entries)

    def cached(self, timer: tp.Callable[[LayerSpec, str], tp.Any]) -> tp.Callable[[LayerSpec, str], float]:
        """``timer`` through the cache: a hit is reused; a new measurement is stored
        only when it passed its checks (`measured_us`)."""
        def timed(spec, impl):
            us = self.get(spec, impl)
            if us is None:
                us, ok = measured_us(timer(spec, impl))
                if ok:
                    self.put(spec, impl, us)
            return us
        return timed


def tensor_cores_unavailable() -> str | None:
    """Why the tensor-core kernel would not run on the default device (None: it would)."""
    from jaxsparse.tc_conv import TARGET
    return native_sparse_unavailable(TARGET, "tensor-core kernel")


def tensor_core_candidate(spec: LayerSpec) -> bool:
    """Whether the layer could run on `jaxsparse.tc_conv` (`tensor_core_ineligible`)."""
    from jaxsparse.tc_conv import tensor_core_ineligible
    return tensor_core_ineligible(spec.dtype, lax.Precision[spec.precision]) is None


def layer_functions(spec: LayerSpec, seed: int = 0):
    """(dense_fn, sparse_fn, x) and, for a `tensor_core_candidate`, ``impls['tensorcore']``:
    all compute the pruned layer ``x -> y`` on random weights, each at the layer's precision;
    the sparse side with its kernel family. Returns ``(impls, x)``, ``impls`` by name."""
    from jaxsparse.format import SparseFilter
    from jaxsparse.ops import sparse_conv
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(spec.dtype)
    precision = lax.Precision[spec.precision]
    kernel = rng.standard_normal(spec.kernel_shape).astype(np.float32)
    kernel = kernel * magnitude_mask(kernel, spec.sparsity)
    cout = spec.kernel_shape[-1]
    bias = jnp.asarray(rng.standard_normal(cout).astype(np.float32), dtype) if spec.use_bias else None
    filt = SparseFilter.from_dense(kernel, sparsity=None, dtype=dtype)
    nd = len(spec.kernel_shape) - 2
    padding = spec.padding_arg
    dense_kernel = jnp.asarray(kernel, dtype)
    dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NWC", "WIO", "NWC")

    def dense(x):
        y = lax.conv_general_dilated(x, dense_kernel, spec.strides, padding, rhs_dilation=spec.kernel_dilation,
                                     dimension_numbers=dn, precision=precision)
        return y if bias is None else y + bias

    def sparse(x):
        return sparse_conv(x, filt, strides=spec.strides, padding=padding, rhs_dilation=spec.kernel_dilation,
                           bias=bias, precision=precision, kernel=spec.kernel_family)

    impls = {"dense": dense, "sparse": sparse}
    if tensor_core_candidate(spec):
        from jaxsparse.tc_conv import plan_for, tc_conv
        plan = plan_for(filt)
        impls["tensorcore"] = lambda x: tc_conv(x, filt, plan, strides=spec.strides, padding=padding,
                                                rhs_dilation=spec.kernel_dilation, bias=bias, precision=precision)
    x = jnp.asarray(rng.standard_normal(spec.input_shape).astype(np.float32), dtype)
    return impls, x


def layer_flops(spec: LayerSpec, impl: str) -> float:
    """FLOP of one call of the layer: 2 x multiply-adds of the dense convolution,
    times the density (1 - sparsity) for the sparse and tensor-core ones (their useful work)."""
    kernel_size, cout = spec.kernel_shape[:-2], spec.kernel_shape[-1]
    pads = normalize_padding(spec.padding, spec.input_shape[1:-1], kernel_size, spec.strides,
                             spec.kernel_dilation)
    out_shape = conv_output_shape(spec.input_shape, kernel_size, spec.strides, pads, spec.kernel_dilation, cout)
    flops = 2.0 * math.prod(out_shape) * math.prod(spec.kernel_shape[:-1])
    return flops if impl == "dense" else flops * (1.0 - spec.sparsity)


@functools.lru_cache(maxsize=None)
def measured_peak_tflops(dtype: str, precision: str) -> float:
    """`jaxsparse.benchmark.matmul_peak_tflops` at ``dtype``/``precision``, measured once per process."""
    from jaxsparse.benchmark import matmul_peak_tflops
    return matmul_peak_tflops(jnp.dtype(dtype), precision=lax.Precision[precision])


def chain_timer(spec: LayerSpec, impl: str, *, peak_check: bool = True, **chain_kwargs):
    """Per-call µs of the layer by the chain method (`jaxsparse.benchmark.chain_time_us`),
    as a checked `jaxsparse.benchmark.ChainTime` (``ok`` False: a fallback, not cached).

    A convolution's output generally cannot feed its input (channels, stride),
    so each chain step is ``x -> x + 1e-6 * mean(layer(x))``: a dependent chain
    whose extra cost (one reduction of the output) is the same for both
    implementations. ``peak_check`` also rejects a time whose rate for the
    layer's FLOP (`layer_flops`) beats ``peak_margin`` (default 2) x the matmul
    peak of its dtype and precision (`measured_peak_tflops`, once per process)."""
    from jaxsparse.benchmark import chain_time_us
    impls, x = layer_functions(spec)
    if impl not in impls:
        raise ValueError(f"{spec.path}: no {impl!r} implementation (have {sorted(impls)})")
    fn = impls[impl]

    def step(x):
        return x + (1e-6 * jnp.mean(fn(x).astype(jnp.float32))).astype(x.dtype)

    if peak_check:
        chain_kwargs.setdefault("flops", layer_flops(spec, impl))
        chain_kwargs.setdefault("peak_tflops", measured_peak_tflops(spec.dtype, spec.precision))
    return chain_time_us(step, x, **chain_kwargs)
