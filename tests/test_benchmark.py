"""The chain timer's checks: impossible slopes are detected, re-measured, or replaced by a flagged fallback."""

import json
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxsparse import benchmark as B

X = jnp.ones((4,), jnp.float32)
K_SMALL, K_LARGE = 2, 8


def calls(fixed_us, per_op_us, jitter=(0.0,), n=15):
    """Scripted (small, large) call times of one attempt: fixed + k * per_op (+ jitter, cycled)."""
    j = [jitter[i % len(jitter)] for i in range(n)]
    return ([fixed_us + K_SMALL * per_op_us + e for e in j],
            [fixed_us + K_LARGE * per_op_us + e for e in reversed(j)])


@pytest.fixture
def scripted(monkeypatch):
    """Replace the timed calls by the given attempts, in order; count the attempts used."""
    def install(*attempts):
        it, used = iter(attempts), []

        def fake(fns, *args, repeats, warmup):
            assert len(fns) == 2
            used.append(1)
            small, large = next(it)
            return [list(small), list(large)]
        monkeypatch.setattr(B, "interleaved_call_us", fake)
        return used
    return install


def time_it(**kwargs):
    return B.chain_time_us(lambda x: x + 1.0, X, k_small=K_SMALL, k_large=K_LARGE, **kwargs)


def test_consistent_measurement_is_ok_with_spread(scripted):
    scripted(calls(20.0, 100.0, jitter=(-12.0, 0.0, 12.0)))
    r = time_it()
    assert r.check == "ok" and r.ok and r.reason == "" and r.attempts == 1
    assert r == pytest.approx(100.0) and isinstance(r, float)
    assert r.spread_us == pytest.approx((96.0, 104.0))  # quartiles of the paired slopes 96, 100, 104
    assert r.per_op_us == pytest.approx(102.5) and r.bounds_us[0] < r < r.bounds_us[1]


def test_negative_slope_is_remeasured(scripted):
    used = scripted((np.full(15, 900.0), np.full(15, 500.0)),  # T(8) < T(2): slope -66.7
                    calls(20.0, 100.0, jitter=(-6.0, 0.0, 6.0)))
    r = time_it()
    assert r.check == "remeasured" and r.ok and r.attempts == 2 and len(used) == 2
    assert "attempt 1: non-positive slope" in r.reason
    assert r.slopes_us[0] < 0 and r == pytest.approx(100.0) and r.spread_us[0] < r.spread_us[1]


def test_slope_far_below_the_per_call_time_is_detected(scripted):
    # The case: a slope of 67 us where the long chain takes 700 us per op
    # (the short chain's calls hit by load): the implied fixed cost is most of the call.
    scripted(calls(5200.0, 67.0), calls(30.0, 700.0, jitter=(-20.0, 20.0)))
    r = time_it()
    assert r.check == "remeasured" and "below 0.25 x T(k_large)/k_large" in r.reason
    assert r == pytest.approx(700.0)


def test_noisy_outlier_calls_do_not_move_the_median(scripted):
    small, large = calls(20.0, 100.0, jitter=(-3.0, 0.0, 3.0))
    large[4] = small[9] = 50_000.0  # two bursts of load, one on each chain
    scripted((small, large))
    r = time_it()
    assert r.check == "ok" and r == pytest.approx(100.0, abs=1.0)
    assert r.spread_us[1] - r.spread_us[0] < 5.0


def test_slope_within_noise_is_rejected(scripted):
    small = [100.0, 300.0] * 8
    large = [300.0, 100.0] * 8  # paired slopes +33 and -33: the median says nothing
    scripted((small[:15], large[:15]), (small[:15], large[:15]), (small[:15], large[:15]))
    r = time_it()
    assert r.check == "fallback" and "within noise" in r.reason


def test_faster_than_peak_falls_back_and_records_spread(scripted):
    # 1 GFLOP per op in 100 us is 10 TFLOP/s, against a measured peak of 1 TFLOP/s.
    attempts = [calls(20.0, 100.0, jitter=(-8.0, 0.0, 8.0)) for _ in range(3)]
    used = scripted(*attempts)
    r = time_it(flops=1e9, peak_tflops=1.0)
    assert r.check == "fallback" and not r.ok and r.attempts == 3 and len(used) == 3
    assert r.reason.count("faster than the peak allows") == 3 and "also faster than the peak" in r.reason
    large = np.concatenate([a[1] for a in attempts])
    assert r == pytest.approx(np.median(large) / K_LARGE)  # the conservative estimate
    assert r.spread_us == pytest.approx(tuple(np.percentile(large, [25, 75]) / K_LARGE))
    assert r.tflops == pytest.approx(1e9 / (r * 1e6))
    # The peak check is opt-in: the same times pass without flops/peak.
    scripted(calls(20.0, 100.0))
    assert time_it().check == "ok"
    # Within the margin (2 x the peak) passes too.
    scripted(calls(20.0, 100.0))
    assert time_it(flops=1e8, peak_tflops=0.6).check == "ok"


def test_slope_above_the_per_call_time_and_no_retries(scripted):
    used = scripted(([10.0] * 15, [1000.0] * 15))  # slope 165 > 1.15 x T(8)/8 = 125 x 1.15
    r = time_it(retries=0)
    assert r.check == "fallback" and len(used) == 1 and "negative fixed cost" in r.reason
    assert r == pytest.approx(125.0)


def test_chain_time_is_a_float_for_json_csv_and_pickle(scripted):
    scripted(calls(20.0, 100.0))
    r = time_it()
    assert json.loads(json.dumps({"us": r})) == {"us": pytest.approx(100.0)} and repr(r) == repr(float(r))
    assert r * 2 == pytest.approx(200.0) and type(r + 1) is float
    back = pickle.loads(pickle.dumps(r))
    assert back.info() == r.info() and json.loads(json.dumps(r.info()))["check"] == "ok"


def test_real_cpu_measurement_is_positive_and_plausible():
    # Only load-independent facts: on a shared CI machine any comparison of two timings taken at
    # different moments (say, against a direct call) can flake, so none is made.
    x = B.random_input((1, 16, 16, 64), jnp.float32)
    w = B.random_input((3, 3, 64, 64), jnp.float32) * B.chain_scale(9 * 64)

    def conv(x):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    flops = 2.0 * 16 * 16 * 64 * 9 * 64
    peak = B.matmul_peak_tflops(jnp.float32, n=512)
    r = B.chain_time_us(conv, x, k_small=2, k_large=8, repeats=7, flops=flops, peak_tflops=peak)
    assert isinstance(r, B.ChainTime) and math.isfinite(r) and r > 0
    assert r.check in ("ok", "remeasured", "fallback") and r.ok == (r.check != "fallback")
    assert 1 <= r.attempts <= 3 and len(r.slopes_us) == r.attempts
    assert math.isfinite(r.per_op_us) and r.per_op_us > 0
    assert r.spread_us[0] <= r.spread_us[1]
    if r.ok:  # an accepted slope passed every check it records
        assert r.bounds_us[0] <= r <= r.bounds_us[1] and r.tflops <= 2.0 * peak
        assert r <= B.SLOPE_HIGH * r.per_op_us and r.spread_us[0] > 0
    else:  # the fallback is the long chain's per-op time itself
        assert float(r) == r.per_op_us


@pytest.mark.parametrize("kwargs, match", [
    (dict(retries=-1), "retries"), (dict(retries=1.5), "retries"), (dict(retries=True), "retries"),
    (dict(k_small=8, k_large=8), "k_large must exceed k_small"), (dict(k_small=9, k_large=8), "k_large"),
    (dict(k_small=-1), "k_small"), (dict(repeats=0), "repeats"), (dict(rounds=0), "rounds"),
    (dict(warmup=-1), "warmup"), (dict(peak_margin=0.0), "peak_margin"),
    (dict(flops=-1.0, peak_tflops=1.0), "flops"), (dict(flops=1.0, peak_tflops=float("nan")), "peak_tflops"),
])
def test_chain_time_arguments_are_checked_before_timing(scripted, kwargs, match):
    used = scripted()  # no attempt may run
    kw = dict(k_small=K_SMALL, k_large=K_LARGE, **kwargs) if "k_small" not in kwargs else kwargs
    with pytest.raises(ValueError, match=match):
        B.chain_time_us(lambda x: x + 1.0, X, **kw)
    assert not used


def test_zero_retries_is_one_attempt_and_zero_flops_no_peak_check(scripted):
    used = scripted(calls(20.0, 100.0))
    r = time_it(retries=0)
    assert r.check == "ok" and len(used) == 1
    scripted(calls(20.0, 100.0))
    assert time_it(flops=0, peak_tflops=1.0).check == "ok"  # 0 FLOP: no peak check, as before


def test_timing_cache_ignores_booleans_and_non_numbers(tmp_path):
    from jaxsparse.nn import timing
    from jaxsparse.nn.timing import TimingCache
    spec = timing.LayerSpec("a", (1, 8, 8, 3), (3, 3, 3, 4), (1, 1), "SAME", (1, 1), "float32", 0.9, True)
    path = tmp_path / "t.json"
    for bad in (True, False, "80", None, [80.0], float("inf")):
        path.write_text(json.dumps({TimingCache.key(spec, "dense"): bad}))
        assert TimingCache(path).get(spec, "dense") is None, bad
    path.write_text(json.dumps({TimingCache.key(spec, "dense"): 80}))
    assert TimingCache(path).get(spec, "dense") == 80


@pytest.mark.parametrize("spec_kwargs", [
    dict(input_shape=(2, 8, 8, 3), kernel_shape=(3, 3, 3, 4), strides=(2, 2), padding="SAME_LOWER"),
    dict(input_shape=(2, 9, 7, 3), kernel_shape=(3, 2, 3, 4), strides=(2, 1), padding=((2, 0), (1, 1)),
         kernel_dilation=(2, 3)),
    dict(input_shape=(3, 11, 2), kernel_shape=(4, 2, 5), strides=(3,), padding=((3, 0),), kernel_dilation=(2,)),
    dict(input_shape=(1, 5, 5, 3), kernel_shape=(3, 3, 3, 4), strides=(1, 1), padding="valid"),
])
def test_layer_flops_uses_the_output_shape_lax_gives(spec_kwargs):
    from jaxsparse.nn import timing
    spec = timing.LayerSpec(**dict(dict(path="a", kernel_dilation=(1,) * (len(spec_kwargs["input_shape"]) - 2),
                                        dtype="float32", sparsity=0.75, use_bias=True), **spec_kwargs))
    nd = len(spec.kernel_shape) - 2
    dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NWC", "WIO", "NWC")
    out = jax.eval_shape(lambda x, k: lax.conv_general_dilated(
        x, k, spec.strides, spec.padding, rhs_dilation=spec.kernel_dilation, dimension_numbers=dn),
        jax.ShapeDtypeStruct(spec.input_shape, jnp.float32), jax.ShapeDtypeStruct(spec.kernel_shape, jnp.float32))
    dense = 2.0 * math.prod(out.shape) * math.prod(spec.kernel_shape[:-1])
    assert timing.layer_flops(spec, "dense") == dense and timing.layer_flops(spec, "sparse") == 0.25 * dense
