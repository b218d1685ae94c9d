r"""Layer sweep: when does `jaxsparse.sparse_conv` beat XLA's convolution?

For every layer (VGG-16, ResNet-50 1x1, CNN-non-static), batch, precision mode and
sparsity, this times the sparse kernel and `lax.conv_general_dilated` at the same
dtype, in the same run, by the same method (``jaxsparse.benchmark``):

* chainable layers: µs per op (or per (layer, mirror) pair) by the chain method;
* unchainable layers (stride-2 projections, the sentence CNN's VALID convolutions):
  GPU kernel time, or on a CPU the median time of one jitted call;
* on a GPU, kernel time of one call from a profiler trace for every layer
  (``--kernel_time``), so launch and dispatch overhead show separately;
* `jax.experimental.sparse` BCSR for the 1x1 layers at float32 (a matmul on the
  channel-major (C, N*H*W) view, its best layout);
* the tensor-core family (`jaxsparse.tc_conv`, ``--tensor_cores``) on every layer at the
  modes that allow tensor cores (TF32 for float32, bf16, f16), against the
  same dense time, with its own break-even sparsity (``break_even_tc``, ``breakeven_tc.csv``);
* every chain time checked (`B.chain_time_us`, also against twice the measured matmul peak)
  and the check kept per row (``dense_check``, ``sparse_check``, ``bcsr_check``, ``tc_check``, details in
  ``*_timing``); a fallback time is marked ``~`` and left out of break-even, gains and geomeans.

Writes ``sweep.json`` (the result envelope of ``common.py``), ``sweep.csv`` (with device,
versions, date and flags), ``breakeven.csv``, ``reduced_precision.csv`` and PNG figures to
``--out``; ``sweep.partial.json``, a checkpoint per layer, is removed when the run completes.

    python3 experiments/sweep.py                      # small default: a few layers, f32, 4 sparsities
    python3 experiments/sweep.py --model=vgg16 --layers=all \
        --sparsity=0.5,0.7,0.8,0.9,0.95,0.98 --modes=float32_highest,float32,bfloat16 --batch=1
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from tqdm import tqdm

from jaxsparse import benchmark as B

import breakeven
import common
import layers as L
import plots as P
import tables as T

DEFAULT_SPARSITY = [0.8, 0.9, 0.95, 0.98]  # enough points for a speedup curve and a break-even

common.define_flags("modes", "batch", "cnn_batch", "pattern", "repeats", "out", "scale", "seed", "progress",
                    "budget_s", "kernel_time", "k_small", "k_large", "bcsr", "tensor_cores", model=["all"],
                    sparsity=DEFAULT_SPARSITY, choices={"model": L.MODELS + ("all",)})
flags.DEFINE_list("layers", ["auto"], "Layer names (e.g. vgg.conv3_2,r50.g2.reduce), 'all', 'quick', "
                  "or 'auto' = quick on CPU, all on GPU.")
flags.DEFINE_integer("peak_n", 0, "Matmul size of the peak measurement (0 = 8192 on GPU, 1024 on CPU).")

FLAGS = flags.FLAGS


@dataclasses.dataclass
class SweepConfig:
    """The sweep's flags (same names), resolved for this machine by `resolved`."""
    model: list = dataclasses.field(default_factory=lambda: ["all"])
    layers: list = dataclasses.field(default_factory=lambda: ["auto"])
    sparsity: list = dataclasses.field(default_factory=lambda: list(DEFAULT_SPARSITY))
    modes: list = dataclasses.field(default_factory=lambda: ["float32"])
    batch: list = dataclasses.field(default_factory=lambda: [1])
    cnn_batch: list = dataclasses.field(default_factory=lambda: [50])
    pattern: str = "magnitude"
    repeats: int = 0
    out: str = ""
    scale: float = 0.0
    seed: int = 0
    kernel_time: str = "all"
    bcsr: bool = True
    tensor_cores: bool = True
    peak_n: int = 0
    k_small: int = 0
    k_large: int = 0
    progress: bool = True
    budget_s: float = 0.0

    def resolved(self) -> "SweepConfig":
        """Auto values filled in for this machine."""
        c = dataclasses.replace(self)
        c.scale = common.auto_scale(c.scale)
        c.repeats = common.auto_repeats(c.repeats)
        c.k_small, c.k_large = common.auto_chain(c.k_small, c.k_large)
        if c.layers in (["auto"], "auto"):
            c.layers = ["all"] if B.gpu_present() else ["quick"]
        c.out = c.out or common.default_out("sweep")
        c.modes = L.check_modes(c.modes)
        return c


def config_from_flags() -> SweepConfig:
    return SweepConfig(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(SweepConfig)})


# ---- measurement ---------------------------------------------------------------


def measure(layer: L.Layer, op, x, w, wm, cfg: SweepConfig, kernel: bool, flops: float | None = None,
            peak: float | None = None) -> dict:
    """Time ``op(x, w)`` for ``layer``: chain (single/pair) or single call; kernel time on GPU.

    Weights travel through the chain as jit arguments (like a model's parameters), not as
    constants folded into the executable; the one input/one output rule of the chain holds.
    A chain time is a checked `B.ChainTime`; given ``flops`` (per chain step) and ``peak``
    (TFLOP/s), it may not beat twice that peak.
    """
    kind = layer.chain_kind
    res = {"unit": {"single": "op", "pair": "pair", "none": "call"}[kind]}
    chain = dict(k_small=cfg.k_small, k_large=cfg.k_large, repeats=cfg.repeats, flops=flops, peak_tflops=peak)
    if kind == "single":
        res["us"] = B.chain_time_us([lambda s: (op(s[0], s[1]), s[1])], (x, w), **chain)
    elif kind == "pair":
        res["us"] = B.chain_time_us([lambda s: (op(s[0], s[1]), s[1], s[2]),
                                     lambda s: (op(s[0], s[2]), s[1], s[2])], (x, w, wm), **chain)
    fn = jax.jit(op)
    if kind == "none":
        res["us"] = B.median_call_us(fn, x, w, repeats=cfg.repeats)
    kt = B.kernel_time_us(fn, x, w) if kernel else None
    res["kernel_us"] = kt["total_us"] if kt else None
    res["launches"] = kt["launches"] if kt else None
    return res


def _bcsr_matrix(filt):
    """The 1x1 filter as a BCSR (Cout x Cin) matrix: its CSR over output channels is exactly that."""
    from jax.experimental import sparse as jsparse
    return jsparse.BCSR((filt.data.astype(jnp.float32), filt.indices, filt.indptr),
                        shape=(filt.out_channels, filt.in_channels), indices_sorted=True)


def measure_bcsr(layer: L.Layer, x, filt, mfilt, cfg: SweepConfig, kernel: bool, peak: float | None) -> dict:
    """`jax.experimental.sparse` BCSR (Cout x Cin) @ activations (Cin x N*H*W), float32.

    Timed by `measure`, the same chain/call/kernel-time method as the convolutions,
    with the activations as the chained value and the matrices as the weights.
    """
    if layer.stride > 1:
        x = x[:, ::layer.stride, ::layer.stride, :]
    xc = x.astype(jnp.float32).reshape(-1, layer.cin).T
    am = _bcsr_matrix(mfilt) if layer.chain_kind == "pair" else None
    return measure(layer, lambda v, m: m @ v, xc, _bcsr_matrix(filt), am, cfg, kernel,
                   step_flops(layer, x.shape[0], filt, mfilt), peak)


def step_flops(layer: L.Layer, batch: int, filt=None, mfilt=None) -> float:
    """FLOP of one chain step (the layer, with its mirror for a pair): the dense convolution's,
    or with filters the useful sparse work 2 * nnz * N * Ho * Wo."""
    pair = layer.chain_kind == "pair"
    if filt is None:
        return layer.dense_flops(batch) + (layer.mirror.dense_flops(batch) if pair else 0.0)
    return 2.0 * (filt.nnz + (mfilt.nnz if pair else 0)) * batch * layer.out_pixels


def measure_peaks(modes, n: int) -> dict:
    """Measured matmul peak (TFLOP/s) per mode, plus float32_highest (the exact-f32 FMA rate)."""
    peaks = {}
    for mode in dict.fromkeys(list(modes) + ["float32_highest"]):
        peaks[mode] = B.matmul_peak_tflops(L.mode_dtype(mode), precision=L.mode_precision(mode),
                                           n=n or None)
    return peaks


def dtype_peak(peaks: dict, dtype: str) -> float:
    """The largest measured peak among the modes of ``dtype``: the bound for a sparse (or BCSR)
    time that all those modes share."""
    return max(v for m, v in peaks.items() if L.MODES[m][0] == dtype)


def batches_for(layer: L.Layer, cfg: SweepConfig) -> list[int]:
    bs = list(cfg.batch)
    if layer.model == "cnn_non_static":
        bs += [b for b in cfg.cnn_batch if b not in bs]
    return bs


def run_sweep(cfg: SweepConfig) -> dict:
    cfg = cfg.resolved()
    common.check_backend()
    if "jax_bcoo_cusparse_lowering" in jax.config.values:
        jax.config.update("jax_bcoo_cusparse_lowering", True)  # cuSPARSE for BCSR on the GPU
    start = time.time()
    env = B.environment()
    gpu = B.gpu_present()
    layers = [l.scaled(cfg.scale) for l in L.select(cfg.model, cfg.layers)]
    plan = [(l, b) for l in layers for b in batches_for(l, cfg)]
    dtypes = list(dict.fromkeys(L.MODES[m][0] for m in cfg.modes))
    use_bcsr = cfg.bcsr and "float32" in dtypes
    def tc_dtypes(layer):  # the dtypes at which some requested mode runs the tensor-core family
        if not cfg.tensor_cores:
            return []
        return list(dict.fromkeys(L.MODES[m][0] for m in cfg.modes if L.tensor_core_ready(layer, m)))

    total = sum(len(cfg.modes) + (len(dtypes) + len(tc_dtypes(l))) * len(cfg.sparsity)
                + (len(cfg.sparsity) if use_bcsr and l.is_1x1 else 0) for l, _ in plan)
    bar = tqdm(total=total + 1, disable=not cfg.progress, desc="sweep", unit="meas", dynamic_ncols=True)

    bar.set_postfix_str("peak matmul")
    peaks = measure_peaks(cfg.modes, cfg.peak_n)
    bar.update(1)

    filters = {}

    def get_filter(layer, s):
        key = (layer.name, layer.in_hw, s)
        if key not in filters:
            filt, used = L.make_filter(layer, s, cfg.pattern, cfg.seed)
            mirror = layer.mirror
            mfilt = L.make_filter(mirror, s, cfg.pattern, cfg.seed + 1)[0] if mirror else None
            filters[key] = (filt, used, mfilt)
        return filters[key]

    rows, skipped = [], []

    def result():
        measured = T.measured(rows)  # fallback times are left out of break-even and gains
        with_tc = [r for r in measured if "speedup_tc" in r]
        return common.envelope("sweep", dataclasses.asdict(cfg), rows, start, skipped, env,
                               peaks_tflops=peaks, break_even=breakeven.break_even_rows(measured),
                               break_even_tc=breakeven.break_even_rows(with_tc, speedup="speedup_tc"),
                               reduced_precision=T.reduced_precision_table(measured, *T.SWEEP_RP_KEYS))

    for layer, batch in plan:
        if cfg.budget_s and time.time() - start > cfg.budget_s:
            skipped.append(f"{layer.name} b{batch}")
            continue
        kernel = gpu and (cfg.kernel_time == "all" or
                          (cfg.kernel_time == "unchainable" and layer.chain_kind == "none"))
        x32 = B.random_input(layer.input_shape(batch), jnp.float32, cfg.seed)
        mirror = layer.mirror
        dense_w = L.dense_kernel(layer, cfg.seed)
        dense_wm = L.dense_kernel(mirror, cfg.seed + 1) if mirror else None
        dense, sparse, bcsr, tc = {}, {}, {}, {}
        for mode in cfg.modes:
            bar.set_postfix_str(f"{layer.name} b{batch} dense {mode}")
            dt, prec = L.mode_dtype(mode), L.mode_precision(mode)
            op = lambda x, w, prec=prec: L.dense_conv(x, w, layer, prec)  # noqa: E731
            dense[mode] = measure(layer, op, x32.astype(dt), dense_w.astype(dt),
                                  None if dense_wm is None else dense_wm.astype(dt), cfg, kernel,
                                  step_flops(layer, batch), peaks[mode])
            bar.update(1)
        op = lambda x, f: L.sparse_conv(x, f, layer)  # noqa: E731
        for dtn in dtypes:
            dt = jnp.dtype(dtn)
            for s in cfg.sparsity:
                bar.set_postfix_str(f"{layer.name} b{batch} sparse {dtn} {s:g}")
                filt, used, mfilt = get_filter(layer, s)
                sparse[(dtn, s)] = measure(layer, op, x32.astype(dt), filt.astype(dt),
                                           None if mfilt is None else mfilt.astype(dt), cfg, kernel,
                                           step_flops(layer, batch, filt, mfilt), dtype_peak(peaks, dtn))
                bar.update(1)
        for dtn in tc_dtypes(layer):  # the tensor-core family, same method, filters as jit arguments
            dt = jnp.dtype(dtn)
            for s in cfg.sparsity:
                bar.set_postfix_str(f"{layer.name} b{batch} tensor cores {dtn} {s:g}")
                filt, _, mfilt = get_filter(layer, s)
                f, mf = filt.astype(dt), None if mfilt is None else mfilt.astype(dt)
                tc[(dtn, s)] = measure(layer, L.tensor_core_op(layer, f, mf), x32.astype(dt), f, mf, cfg, kernel,
                                       step_flops(layer, batch, filt, mfilt), dtype_peak(peaks, dtn))
                bar.update(1)
        if use_bcsr and layer.is_1x1:
            for s in cfg.sparsity:
                bar.set_postfix_str(f"{layer.name} b{batch} bcsr {s:g}")
                filt, _, mfilt = get_filter(layer, s)
                bcsr[s] = measure_bcsr(layer, x32, filt, mfilt, cfg, kernel, dtype_peak(peaks, "float32"))
                bar.update(1)
        for mode in cfg.modes:
            dtn = L.MODES[mode][0]
            itemsize = jnp.dtype(dtn).itemsize
            d = dense[mode]
            for s in cfg.sparsity:
                filt, used, mfilt = get_filter(layer, s)
                sp = sparse[(dtn, s)]
                rows.append(make_row(layer, batch, mode, s, used, filt, mfilt, sp, d,
                                     bcsr.get(s) if dtn == "float32" else None, peaks, itemsize,
                                     tc.get((dtn, s)) if L.tensor_core_ready(layer, mode) else None))
        # A checkpoint per layer: a run killed from outside keeps what it measured.
        common.write_result(result(), partial_path(cfg.out))
    bar.close()
    if skipped:
        print(f"budget of {cfg.budget_s:g} s reached; skipped: {', '.join(skipped)}", file=sys.stderr)
    return result()


def partial_path(out: str) -> str:
    """The per-layer checkpoint beside ``sweep.json``, removed once the final files are written."""
    return common.output_path(out, "sweep.json").removesuffix(".json") + ".partial.json"


def make_row(layer, batch, mode, s, used, filt, mfilt, sp, d, bc, peaks, itemsize, tc=None) -> dict:
    pair = layer.chain_kind == "pair"
    sparse_flops, dense_flops = step_flops(layer, batch, filt, mfilt), step_flops(layer, batch)
    # The basis of the comparison: chain time where the layer chains; otherwise kernel time
    # where a GPU trace exists, else the single-call time.
    if sp["unit"] == "call" and sp.get("kernel_us") and d.get("kernel_us"):
        basis, s_t, d_t = "kernel", sp["kernel_us"], d["kernel_us"]
    else:
        basis, s_t, d_t = ("chain" if sp["unit"] != "call" else "call"), sp["us"], d["us"]
    wb_dense, wb_sparse = L.weight_bytes(layer, filt.nnz, itemsize)
    peak = peaks.get(mode)
    f32_peak = peaks.get("float32_highest")
    s_tf = sparse_flops / (s_t * 1e-6) / 1e12 if s_t and s_t > 0 else None
    d_tf = dense_flops / (d_t * 1e-6) / 1e12 if d_t and d_t > 0 else None
    row = {
        "model": layer.model, "layer": layer.name, "shape": layer.describe(),
        "mirror": layer.mirror.describe() if pair else None, "chain": layer.chain_kind,
        "cin": layer.cin, "cout": layer.cout, "kernel": "x".join(map(str, layer.kernel)),
        "stride": layer.stride, "in_hw": "x".join(map(str, layer.in_hw)),
        "out_hw": "x".join(map(str, layer.out_hw)), "batch": batch, "mode": mode,
        "dtype": L.MODES[mode][0], "dense_precision": L.MODES[mode][1], "sparsity": s,
        "pattern": used, "nnz": filt.nnz, "nnz_mirror": mfilt.nnz if pair else None,
        "actual_sparsity": filt.sparsity,
        "weight_bytes_dense": wb_dense, "weight_bytes_sparse": wb_sparse,
        "unit": sp["unit"], "sparse_us": float(sp["us"]), "dense_us": float(d["us"]),
        "sparse_kernel_us": sp.get("kernel_us"), "dense_kernel_us": d.get("kernel_us"),
        "sparse_launches": sp.get("launches"), "dense_launches": d.get("launches"),
        "basis": basis, "speedup": T.ratio(d_t, s_t),
        "kernel_speedup": T.ratio(d.get("kernel_us"), sp.get("kernel_us")),
        "sparse_tflops": s_tf, "dense_tflops": d_tf, "peak_tflops": peak,
        "sparse_frac_peak": T.ratio(s_tf, peak), "dense_frac_peak": T.ratio(d_tf, peak),
        "sparse_frac_f32_peak": T.ratio(s_tf, f32_peak),
        **T.check_fields("sparse", sp["us"]), **T.check_fields("dense", d["us"]),
    }
    if bc is not None:
        b_t = bc["kernel_us"] if basis == "kernel" and bc.get("kernel_us") else bc["us"]
        row.update({"bcsr_us": float(bc["us"]), "bcsr_kernel_us": bc.get("kernel_us"),
                    "speedup_vs_bcsr": T.ratio(b_t, s_t), **T.check_fields("bcsr", bc["us"])})
    if tc is not None:  # the tensor-core family against the same dense time, on the same basis
        t_t = tc["kernel_us"] if basis == "kernel" and tc.get("kernel_us") else tc["us"]
        row.update({"tc_us": float(tc["us"]), "tc_kernel_us": tc.get("kernel_us"),
                    "speedup_tc": T.ratio(d_t, t_t), **T.check_fields("tc", tc["us"])})
    return row


# ---- reporting -----------------------------------------------------------------

TABLE = [("layer", "layer", ""), ("shape", "shape", ""), ("batch", "N", ""), ("mode", "mode", ""),
         ("sparsity", "sparsity", "g"), ("unit", "per", ""), ("sparse_us", "sparse µs", ".1f"),
         ("dense_us", "dense µs", ".1f"), ("speedup", "speedup", ".2f"), ("basis", "basis", ""),
         ("sparse_kernel_us", "sp kern µs", ".1f"), ("dense_kernel_us", "dn kern µs", ".1f"),
         ("sparse_tflops", "sp TF/s", ".3g"), ("sparse_frac_peak", "sp %peak", ".1%"),
         ("bcsr_us", "BCSR µs", ".1f"), ("bcsr_kernel_us", "BCSR kern µs", ".1f"),
         ("speedup_vs_bcsr", "vs BCSR", ".2f"), ("tc_us", "TC µs", ".1f"), ("speedup_tc", "TC speedup", ".2f")]


COLUMNS = """\
columns: per = what one time covers: op (the layer chained on itself), pair (the layer and its
  mirror Cout->Cin, chained together), call (one jitted call: the layer cannot be chained);
  basis = the times the speedup compares: chain (chain-method slope), kernel (GPU kernel time
  from a profiler trace), call (median time of one call); sp TF/s = the sparse kernel's
  effective rate, 2 * nnz * N * Ho * Wo / time; sp %peak = sp TF/s as a fraction of the measured
  dense matmul peak at that mode; BCSR = jax.experimental.sparse (cuSPARSE SpMM on the GPU) on
  channel-major activations, float32, its chain time and its kernel time (BCSR kern µs, the
  cuSPARSE and transpose kernels of one call) from the same run; TC = the tensor-core family
  (tc_conv: TF32 for float32, bf16/f16 products), timed the same way on every layer at the
  modes allowing tensor cores, TC speedup = dense / TC; ~ = rests on a fallback time (a chain time that failed its checks
  on every attempt: T(k_large)/k_large, an upper bound), left out of break-even, gains, geomean."""


def report(result: dict) -> str:
    env, cfg = result["environment"], result["flags"]
    plat = env["platform"].upper()
    lines = [f"jaxsparse layer sweep on {env['device']} ({env['platform']}), jax {env['jax']}, "
             f"{env['date']}; spatial scale 1/{cfg['scale']:g}, pattern {cfg['pattern']}",
             f"sparse = jaxsparse {plat} kernel, dense = XLA {plat} convolution at the same dtype; "
             "µs per op (or per layer+mirror pair) by the chain method, per call where a layer "
             "cannot chain; speedup = dense / sparse.",
             "measured matmul peak (TFLOP/s): " + ", ".join(f"{m} {v:.3g}" for m, v in
                                                             result["peaks_tflops"].items()),
             COLUMNS, "", T.format_table(T.marked(result["rows"], TABLE), TABLE)]
    be = result["break_even"]
    if len({r["sparsity"] for r in result["rows"]}) > 1:
        lines += ["", "break-even sparsity (sparse faster above it):", T.format_table(be, BE_TABLE)]
    if result.get("break_even_tc") and len({r["sparsity"] for r in result["rows"]}) > 1:
        lines += ["", "break-even sparsity of the tensor-core family (TC faster than dense above it):",
                  T.format_table(result["break_even_tc"], BE_TABLE)]
    if result["reduced_precision"]:
        lines += ["", "reduced precision: gain = time at float32 / time at bf16/f16 (>1 = faster)",
                  T.format_table(result["reduced_precision"], RP_TABLE)]
    gm = T.geomean(r["speedup"] for r in T.measured(result["rows"]))
    fallbacks = sum(bool(T.fallback_fields(r)) for r in result["rows"])
    if result.get("skipped"):
        lines += ["", "skipped (time budget): " + ", ".join(result["skipped"])]
    if fallbacks:
        lines += ["", f"{fallbacks} rows rest on a fallback time (~): see dense_check, sparse_check, "
                  "bcsr_check, tc_check and *_timing (reason, spread) in sweep.json"]
    lines += ["", f"geometric-mean speedup over all measured rows: {gm:.2f}x" if gm else "",
              f"wall time {result['elapsed_s']:.0f} s"]
    return "\n".join(lines)


BE_TABLE = [("layer", "layer", ""), ("batch", "N", ""), ("mode", "mode", ""), ("note", "break-even", ""),
            ("basis", "basis", "")]
RP_TABLE = [("layer", "layer", ""), ("batch", "N", ""), ("sparsity", "sparsity", "g"),
            ("low_mode", "low", ""), ("ref_mode", "ref", ""), ("dense_gain", "dense gain", ".2f"),
            ("sparse_gain", "sparse gain", ".2f"), ("speedup_ref", "speedup ref", ".2f"),
            ("speedup_low", "speedup low", ".2f")]


def write_outputs(result: dict, out: str) -> list[str]:
    """The result files and figures; the checkpoint goes once sweep.json holds everything."""
    meta = {"environment": result["environment"], "flags": result["flags"],
            "peaks_tflops": result["peaks_tflops"]}
    def path(name):
        return common.output_path(out, name)

    paths = [common.write_result(result, path("sweep.json")),
             T.write_csv(result["rows"], path("sweep.csv"), meta),
             T.write_csv(result["break_even"], path("breakeven.csv"), meta)]
    if result.get("break_even_tc"):
        paths.append(T.write_csv(result["break_even_tc"], path("breakeven_tc.csv"), meta))
    if result["reduced_precision"]:
        paths.append(T.write_csv(result["reduced_precision"], path("reduced_precision.csv"), meta))
    if os.path.exists(partial_path(out)):
        os.remove(partial_path(out))
    return paths + P.sweep_figures(result, os.path.dirname(path("sweep.csv")))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = run_sweep(config_from_flags())
    print(report(result))
    paths = write_outputs(result, result["flags"]["out"])
    print("\nwrote " + ", ".join(os.path.relpath(p) if not os.path.isabs(p) else p for p in paths))


if __name__ == "__main__":
    app.run(main)
