"""Timing helpers shared by the benchmarks, the experiments and `sparsify(policy='auto')`.

Per-op time under jit uses the **chain method** (`../shared/baselines/README.md`):
one jitted function applies the op K times in a dependent chain ``x = op(x)``
with one input and one output; the per-op time is the slope
``(T(k_large) - T(k_small)) / (k_large - k_small)`` of the call time (the median
over interleaved pairs of calls), so the fixed cost of a call drops out. A layer whose output cannot feed its input
(Cin != Cout) is chained with its mirror layer and timed per pair: pass both
ops as one step, ``steps=[layer, mirror]``.

Every chain time is checked (positive, consistent with the per-call time of the
long chain, optionally not faster than a measured peak), re-measured on failure
and otherwise replaced by a flagged conservative estimate: see `chain_time_us`
and `ChainTime`.

Kernel time on a GPU comes from a `jax.profiler` trace: the sum of the device
kernels' durations per call, with a per-kernel breakdown.
"""

from __future__ import annotations

import glob
import math
import os
import statistics
import tempfile
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _block(x):
    return jax.block_until_ready(x)


def median_call_us(fn: Callable, *args, repeats: int = 15, warmup: int = 2) -> float:
    """Median wall time of ``fn(*args)`` in µs, synchronised, after warm-up calls."""
    for _ in range(warmup):
        _block(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def chain(steps: Sequence[Callable], k: int) -> Callable:
    """A jitted function applying ``steps`` in order, ``k`` times: x -> x."""
    steps = tuple(steps)

    def run(x):
        for _ in range(k):
            for step in steps:
                x = step(x)
        return x

    return jax.jit(run)


def interleaved_call_us(fns: Sequence[Callable], *args, repeats: int = 15,
                        warmup: int = 2) -> list[list[float]]:
    """Wall times (µs, synchronised) of each of ``fns`` on ``args``, called in turn.

    Each repeat calls every function once, in alternating order, so slow drift in
    the machine's load reaches all of them alike. Returns one list per function.
    """
    for _ in range(warmup):
        for fn in fns:
            _block(fn(*args))
    times = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            start = time.perf_counter()
            _block(fns[i](*args))
            times[i].append((time.perf_counter() - start) * 1e6)
    return times


class ChainTime(float):
    """A chain-method time: the float is the estimate in µs; attributes say how it was got.

    ``check``: ``'ok'`` (the first measurement passed its checks), ``'remeasured'``
    (a later attempt passed), ``'fallback'`` (none passed; the value is then
    `per_op_us`, the conservative per-op time of the long chain).
    ``ok``: ``check != 'fallback'``; only such a time may be cached or trusted blindly.
    ``reason``: why attempts failed, ``'attempt n: ...'`` joined by ``'; '`` (``''`` if none).
    ``attempts``: measurements made. ``slopes_us``: each attempt's slope (median of
    its paired slopes). ``spread_us``: (q25, q75) behind the value (the accepted
    attempt's paired slopes; for a fallback, the long-chain calls / ``k_large``).
    ``per_op_us``: median T(k_large) / k_large over all attempts, an upper bound on
    the slope. ``bounds_us``: the (low, high) window the slope had to fall in.
    ``tflops``: ``flops / value`` when ``flops`` was given, else None.
    `info` gives all of them as a dict (for a JSON row). A plain float in arithmetic.
    """

    check, reason, attempts, slopes_us, spread_us = "ok", "", 1, (), (math.nan, math.nan)
    per_op_us, bounds_us, tflops = math.nan, (0.0, math.inf), None

    def __new__(cls, us: float, **fields):
        self = super().__new__(cls, us)
        self.__dict__.update(fields)
        return self

    @property
    def us(self) -> float:
        return float(self)

    @property
    def ok(self) -> bool:
        return self.check != "fallback"

    def info(self) -> dict:
        return {"us": self.us, "check": self.check, "ok": self.ok, "reason": self.reason,
                "attempts": self.attempts, "slopes_us": list(self.slopes_us),
                "spread_us": list(self.spread_us), "per_op_us": self.per_op_us,
                "bounds_us": list(self.bounds_us), "tflops": self.tflops}


# Plausible slope s against u = T(k_large) / k_large (the long chain's per-op time):
# s <= HIGH * u (a call's fixed cost T - k * s is not negative, up to noise; the most a
# slope of two positive times can reach is u * k_large / (k_large - k_small), 1.25 u at 4/20)
# and s >= LOW * u (the fixed cost is at most 3/4 of the long chain's time).
SLOPE_LOW, SLOPE_HIGH = 0.25, 1.15


def _quartiles(values) -> tuple[float, float]:
    q1, q3 = np.percentile(np.asarray(values, dtype=float), [25, 75])
    return float(q1), float(q3)


def _slope_problem(slope, q25, per_op, floor_us, tflops, tflops_limit) -> str:
    """Why a slope is implausible ('' if it is not)."""
    if not math.isfinite(slope) or slope <= 0:
        return f"non-positive slope {slope:.4g} us"
    if q25 <= 0:
        return f"slope {slope:.4g} us within noise (a quarter of the paired slopes <= 0)"
    if slope > SLOPE_HIGH * per_op:
        return (f"slope {slope:.4g} us above {SLOPE_HIGH} x T(k_large)/k_large = {per_op:.4g} us "
                f"(negative fixed cost per call)")
    if slope < SLOPE_LOW * per_op:
        return (f"slope {slope:.4g} us below {SLOPE_LOW} x T(k_large)/k_large = {per_op:.4g} us "
                f"(fixed cost per call over 3/4 of the long chain)")
    if slope < floor_us:
        return f"slope {slope:.4g} us faster than the peak allows ({tflops:.4g} > {tflops_limit:.4g} TFLOP/s)"
    return ""


def _count(name: str, value, minimum: int) -> int:
    """An int (not a bool) >= minimum, else ``ValueError`` naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_chain_arguments(*, k_small, k_large, repeats, warmup, rounds, retries, flops, peak_tflops,
                           peak_margin) -> None:
    """``ValueError`` naming the first argument of `chain_time_us` no measurement could use."""
    _count("k_small", k_small, 0)
    _count("k_large", k_large, 1)
    if k_large <= k_small:
        raise ValueError(f"k_large must exceed k_small, got k_small={k_small!r}, k_large={k_large!r}")
    _count("repeats", repeats, 1)
    _count("rounds", rounds, 1)
    _count("warmup", warmup, 0)
    _count("retries", retries, 0)
    for name, value, what in (("flops", flops, "None or a finite number >= 0"),
                              ("peak_tflops", peak_tflops, "None or a finite number >= 0"),
                              ("peak_margin", peak_margin, "a finite number > 0")):
        if value is None and name != "peak_margin":
            continue
        number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        if not number or not math.isfinite(value) or value < 0 or (name == "peak_margin" and value == 0):
            raise ValueError(f"{name} must be {what}, got {value!r}")


def chain_time_us(steps: Callable | Sequence[Callable], x, *, k_small: int = 4, k_large: int = 20,
                  repeats: int = 15, warmup: int = 2, rounds: int = 1, flops: float | None = None,
                  peak_tflops: float | None = None, peak_margin: float = 2.0,
                  retries: int = 2) -> ChainTime:
    """Per-step time (µs) by the chain method; a step is one op or one (op, mirror) pair.

    The two chains (``k_small`` and ``k_large`` steps) are called in turn,
    ``repeats * rounds`` times (`interleaved_call_us`); the slope is the median of
    the per-pair slopes (t_large - t_small) / (k_large - k_small). It is checked:
    positive; resolved above the noise (first quartile of the paired slopes > 0);
    within [SLOPE_LOW, SLOPE_HIGH] x T(k_large)/k_large, see above; and, given
    ``flops`` (FLOP per step) and ``peak_tflops`` (e.g. `matmul_peak_tflops` of the
    same dtype and precision), not faster than ``peak_margin`` x the peak. A failed
    check re-measures, up to ``retries`` times; if every attempt fails, the result
    is T(k_large)/k_large over all attempts (an upper bound on the per-op time that
    keeps the order of two ops with the same call overhead), flagged ``'fallback'``.
    Returns a `ChainTime`: a float carrying ``check``, ``ok``, ``reason``,
    ``spread_us`` and the other fields documented there.

    Arguments are checked before anything is compiled or timed (``ValueError``):
    ``0 <= k_small < k_large``, ``repeats >= 1``, ``rounds >= 1``, ``warmup >= 0``,
    ``retries >= 0`` (all ints), ``flops`` and ``peak_tflops`` None or finite and
    ``>= 0`` (None or 0: no peak check), ``peak_margin`` finite and positive.
    """
    if callable(steps):
        steps = (steps,)
    _check_chain_arguments(k_small=k_small, k_large=k_large, repeats=repeats, warmup=warmup, rounds=rounds,
                           retries=retries, flops=flops, peak_tflops=peak_tflops, peak_margin=peak_margin)
    f_small, f_large = chain(steps, k_small), chain(steps, k_large)
    _block(f_small(x)), _block(f_large(x))  # compile
    limit = peak_margin * peak_tflops if flops and peak_tflops else None  # TFLOP/s
    floor_us = flops / (limit * 1e6) if limit else 0.0

    def rate(us):
        return flops / (us * 1e6) if flops and us > 0 else None

    def bounds(per_op):
        return max(SLOPE_LOW * per_op, floor_us), SLOPE_HIGH * per_op

    larges, slopes, reasons = [], [], []
    for attempt in range(1 + retries):
        t_small, t_large = interleaved_call_us((f_small, f_large), x, repeats=repeats * rounds,
                                               warmup=warmup)
        larges += t_large
        paired = [float(b - a) / (k_large - k_small) for a, b in zip(t_small, t_large)]
        slope, spread = statistics.median(paired), _quartiles(paired)
        per_op = float(statistics.median(t_large)) / k_large
        slopes.append(slope)
        problem = _slope_problem(slope, spread[0], per_op, floor_us, rate(slope), limit)
        if not problem:
            return ChainTime(slope, check="remeasured" if attempt else "ok", reason="; ".join(reasons),
                             attempts=attempt + 1, slopes_us=tuple(slopes), spread_us=spread,
                             per_op_us=per_op, bounds_us=bounds(per_op), tflops=rate(slope))
        reasons.append(f"attempt {attempt + 1}: {problem}")
    per_op = float(statistics.median(larges)) / k_large
    if per_op < floor_us:
        reasons.append(f"fallback {per_op:.4g} us also faster than the peak")
    q1, q3 = _quartiles(larges)
    return ChainTime(per_op, check="fallback", reason="; ".join(reasons), attempts=1 + retries,
                     slopes_us=tuple(slopes), spread_us=(q1 / k_large, q3 / k_large), per_op_us=per_op,
                     bounds_us=bounds(per_op), tflops=rate(per_op))


def chain_scale(nnz_per_output: float) -> float:
    """Weight scale keeping a chain's activations of order one (unit gain per layer)."""
    return 1.0 / math.sqrt(max(nnz_per_output, 1.0))


def gpu_present() -> bool:
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def kernel_time_us(fn: Callable, *args, calls: int = 10, warmup: int = 2,
                   trace_dir: str | None = None) -> dict | None:
    """GPU kernel time per call of ``fn(*args)`` from a profiler trace.

    Returns ``{'total_us': ..., 'kernels': {name: µs per call}, 'launches': n per call}``,
    or None without a GPU (or when the trace holds no device events).
    """
    if not gpu_present():
        return None
    for _ in range(warmup):
        _block(fn(*args))
    own_dir = trace_dir is None
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="jaxsparse_trace_")
    with jax.profiler.trace(trace_dir):
        for _ in range(calls):
            _block(fn(*args))
    files = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb")))
    if not files:
        return None
    data = jax.profiler.ProfileData.from_file(files[-1])
    per_kernel: dict[str, float] = {}
    count = 0
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU:0"):
            continue
        for line in plane.lines:
            # Skip lines that summarise streams ("XLA Ops", "XLA Modules") to avoid double counting.
            if "XLA" in line.name or "Source" in line.name or "Steps" in line.name:
                continue
            for event in line.events:
                per_kernel[event.name] = per_kernel.get(event.name, 0.0) + event.duration_ns / 1e3
                count += 1
    if own_dir:
        import shutil
        shutil.rmtree(trace_dir, ignore_errors=True)
    if not per_kernel:
        return None
    kernels = {k: v / calls for k, v in sorted(per_kernel.items(), key=lambda kv: -kv[1])}
    return {"total_us": sum(kernels.values()), "kernels": kernels, "launches": count / calls}


def environment() -> dict:
    """Device, versions and date, for every result file."""
    import datetime
    import platform
    device = jax.devices()[0]
    return {
        "device": getattr(device, "device_kind", str(device)),
        "platform": device.platform,
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def effective_tflops(nnz: int, batch: int, out_pixels: int, time_us: float) -> float:
    """2 * nnz * N * Ho * Wo / time: useful FLOP rate of a sparse convolution."""
    return 2.0 * nnz * batch * out_pixels / (time_us * 1e-6) / 1e12 if time_us > 0 else float("nan")


def random_input(shape, dtype, seed: int = 0):
    """Standard-normal input (never zeros) of the given dtype."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).astype(dtype)


def matmul_peak_tflops(dtype, *, precision=None, n: int | None = None, repeats: int = 10) -> float:
    """Measured peak: TFLOP/s of a jitted n x n x n matmul (2 n^3 FLOP) at ``dtype``/``precision``.

    ``n`` defaults to 8192 on a GPU and 1024 on a CPU. Inputs are standard normal
    scaled by 1/sqrt(n), so float16 results stay finite.
    """
    if n is None:
        n = 8192 if gpu_present() else 1024
    a = random_input((n, n), dtype, seed=1) * (1.0 / math.sqrt(n))
    b = random_input((n, n), dtype, seed=2)
    fn = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    us = median_call_us(fn, a, b, repeats=repeats)
    return 2.0 * n ** 3 / (us * 1e-6) / 1e12
