"""Timing helpers shared by the benchmarks, the experiments and `sparsify(policy='auto')`.

Per-op time under jit uses the **chain method** (`../shared/baselines/README.md`):
one jitted function applies the op K times in a dependent chain ``x = op(x)``
with one input and one output; the per-op time is the slope
``(T(k_large) - T(k_small)) / (k_large - k_small)`` of the median call time, so
the fixed cost of a call drops out. A layer whose output cannot feed its input
(Cin != Cout) is chained with its mirror layer and timed per pair: pass both
ops as one step, ``steps=[layer, mirror]``.

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


def chain_time_us(steps: Callable | Sequence[Callable], x, *, k_small: int = 4, k_large: int = 20,
                  repeats: int = 15, warmup: int = 2, rounds: int = 1) -> float:
    """Per-step time (µs) by the chain method; a step is one op or one (op, mirror) pair.

    ``rounds`` > 1 repeats the two measurements and returns the median slope.
    """
    if callable(steps):
        steps = (steps,)
    if k_large <= k_small:
        raise ValueError("k_large must exceed k_small")
    f_small, f_large = chain(steps, k_small), chain(steps, k_large)
    _block(f_small(x)), _block(f_large(x))  # compile
    slopes = []
    for _ in range(rounds):
        t_small = median_call_us(f_small, x, repeats=repeats, warmup=warmup)
        t_large = median_call_us(f_large, x, repeats=repeats, warmup=warmup)
        slopes.append((t_large - t_small) / (k_large - k_small))
    return statistics.median(slopes)


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
