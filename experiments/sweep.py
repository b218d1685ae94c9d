"""Layer sweep: when does `jaxsparse.sparse_conv` beat XLA's convolution?

For every layer (VGG-16, ResNet-50 1x1, CNN-non-static), batch, precision mode and
sparsity, this times the sparse kernel and `lax.conv_general_dilated` at the same
dtype, in the same run, by the same method (``jaxsparse.benchmark``):

* chainable layers: µs per op (or per (layer, mirror) pair) by the chain method;
* unchainable layers (stride-2 projections, the sentence CNN's VALID convolutions):
  GPU kernel time, or on a CPU the median time of one jitted call;
* on a GPU, kernel time of one call from a profiler trace for every layer
  (``--kernel_time``), so launch and dispatch overhead show separately;
* `jax.experimental.sparse` BCSR for the 1x1 layers at float32 (a matmul on the
  channel-major (C, N*H*W) view, its best layout).

Writes ``sweep.json`` / ``sweep.csv`` (with device, versions, date and flags),
``breakeven.csv``, ``reduced_precision.csv`` and PNG figures to ``--out``.

    python3 experiments/sweep.py                      # small default: a few layers, f32, 0.9
    python3 experiments/sweep.py --model=vgg16 --layers=all \
        --sparsity=0.5,0.7,0.8,0.9,0.95,0.98 --dtype=float32_highest,float32,bfloat16 --batch=1
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

from jaxsparse import benchmark as B  # noqa: E402

import layers as L  # noqa: E402
import plots as P  # noqa: E402

L.define_common_flags()
flags.DEFINE_list("layers", ["auto"], "Layer names (e.g. vgg.conv3_2,r50.g2.reduce), 'all', 'quick', "
                  "or 'auto' = quick on CPU, all on GPU.")
flags.DEFINE_bool("bcsr", True, "Time jax.experimental.sparse BCSR on the 1x1 layers (float32).")
flags.DEFINE_integer("peak_n", 0, "Matmul size of the peak measurement (0 = 8192 on GPU, 1024 on CPU).")
flags.DEFINE_integer("k_small", 0, "Chain length of the short chain (0 = auto: 4 on GPU, 2 on CPU).")
flags.DEFINE_integer("k_large", 0, "Chain length of the long chain (0 = auto: 20 on GPU, 8 on CPU).")

FLAGS = flags.FLAGS


@dataclasses.dataclass
class SweepConfig:
    models: list = dataclasses.field(default_factory=lambda: ["all"])
    layers: list = dataclasses.field(default_factory=lambda: ["auto"])
    sparsities: list = dataclasses.field(default_factory=lambda: [0.9])
    modes: list = dataclasses.field(default_factory=lambda: ["float32"])
    batches: list = dataclasses.field(default_factory=lambda: [1])
    cnn_batches: list = dataclasses.field(default_factory=lambda: [50])
    pattern: str = "magnitude"
    reps: int = 0
    out: str = ""
    scale: float = 0.0
    seed: int = 0
    kernel_time: str = "all"
    bcsr: bool = True
    peak_n: int = 0
    k_small: int = 0
    k_large: int = 0
    progress: bool = True
    budget_s: float = 0.0

    def resolved(self) -> "SweepConfig":
        """Auto values filled in for this machine."""
        c = dataclasses.replace(self)
        c.scale = L.auto_scale(c.scale)
        c.reps = L.auto_reps(c.reps)
        gpu = B.gpu_present()
        c.k_small = c.k_small or (4 if gpu else 2)
        c.k_large = c.k_large or (20 if gpu else 8)
        if c.layers in (["auto"], "auto"):
            c.layers = ["all"] if B.gpu_present() else ["quick"]
        c.out = c.out or L.default_out("sweep")
        c.modes = L.check_modes(c.modes)
        return c


def config_from_flags() -> SweepConfig:
    return SweepConfig(
        models=list(FLAGS.model), layers=list(FLAGS.layers),
        sparsities=[float(s) for s in FLAGS.sparsity], modes=list(FLAGS.dtype),
        batches=[int(b) for b in FLAGS.batch], cnn_batches=[int(b) for b in FLAGS.cnn_batch if b],
        pattern=FLAGS.pattern, reps=FLAGS.reps, out=FLAGS.out, scale=FLAGS.scale, seed=FLAGS.seed,
        kernel_time=FLAGS.kernel_time, bcsr=FLAGS.bcsr, peak_n=FLAGS.peak_n, k_small=FLAGS.k_small,
        k_large=FLAGS.k_large, progress=FLAGS.progress, budget_s=FLAGS.budget_s)


# ---- measurement ---------------------------------------------------------------


def measure(layer: L.Layer, op, x, w, wm, cfg: SweepConfig, kernel: bool) -> dict:
    """Time ``op(x, w)`` for ``layer``: chain (single/pair) or single call; kernel time on GPU.

    Weights travel through the chain as jit arguments (like a model's parameters), not as
    constants folded into the executable; the one input/one output rule of the chain holds.
    """
    kind = layer.chain_kind
    res = {"unit": {"single": "op", "pair": "pair", "none": "call"}[kind]}
    if kind == "single":
        res["us"] = B.chain_time_us([lambda s: (op(s[0], s[1]), s[1])], (x, w), k_small=cfg.k_small,
                                    k_large=cfg.k_large, repeats=cfg.reps)
    elif kind == "pair":
        res["us"] = B.chain_time_us([lambda s: (op(s[0], s[1]), s[1], s[2]),
                                     lambda s: (op(s[0], s[2]), s[1], s[2])], (x, w, wm),
                                    k_small=cfg.k_small, k_large=cfg.k_large, repeats=cfg.reps)
    fn = jax.jit(op)
    if kind == "none":
        res["us"] = B.median_call_us(fn, x, w, repeats=cfg.reps)
    kt = B.kernel_time_us(fn, x, w) if kernel else None
    res["kernel_us"] = kt["total_us"] if kt else None
    res["launches"] = kt["launches"] if kt else None
    return res


def _bcsr_matrix(filt):
    """The 1x1 filter as a BCSR (Cout x Cin) matrix: its CSR over output channels is exactly that."""
    from jax.experimental import sparse as jsparse
    return jsparse.BCSR((filt.data.astype(jnp.float32), filt.indices, filt.indptr),
                        shape=(filt.out_channels, filt.in_channels), indices_sorted=True)


def measure_bcsr(layer: L.Layer, x, filt, mfilt, cfg: SweepConfig, kernel: bool) -> dict:
    """`jax.experimental.sparse` BCSR (Cout x Cin) @ activations (Cin x N*H*W), float32.

    Timed by `measure`, the same chain/call/kernel-time method as the convolutions,
    with the activations as the chained value and the matrices as the weights.
    """
    if layer.stride > 1:
        x = x[:, ::layer.stride, ::layer.stride, :]
    xc = x.astype(jnp.float32).reshape(-1, layer.cin).T
    am = _bcsr_matrix(mfilt) if layer.chain_kind == "pair" else None
    return measure(layer, lambda v, m: m @ v, xc, _bcsr_matrix(filt), am, cfg, kernel)


def measure_peaks(modes, n: int) -> dict:
    """Measured matmul peak (TFLOP/s) per mode, plus float32_highest (the exact-f32 FMA rate)."""
    peaks = {}
    for mode in dict.fromkeys(list(modes) + ["float32_highest"]):
        peaks[mode] = B.matmul_peak_tflops(L.mode_dtype(mode), precision=L.mode_precision(mode),
                                           n=n or None)
    return peaks


def batches_for(layer: L.Layer, cfg: SweepConfig) -> list[int]:
    bs = list(cfg.batches)
    if layer.model == "cnn_non_static":
        bs += [b for b in cfg.cnn_batches if b not in bs]
    return bs


def run_sweep(cfg: SweepConfig) -> dict:
    cfg = cfg.resolved()
    L.check_backend()
    if "jax_bcoo_cusparse_lowering" in jax.config.values:
        jax.config.update("jax_bcoo_cusparse_lowering", True)  # cuSPARSE for BCSR on the GPU
    start = time.time()
    env = B.environment()
    gpu = B.gpu_present()
    layers = [l.scaled(cfg.scale) for l in L.select(cfg.models, cfg.layers)]
    plan = [(l, b) for l in layers for b in batches_for(l, cfg)]
    dtypes = list(dict.fromkeys(L.MODES[m][0] for m in cfg.modes))
    use_bcsr = cfg.bcsr and "float32" in dtypes
    total = sum(len(cfg.modes) + len(dtypes) * len(cfg.sparsities)
                + (len(cfg.sparsities) if use_bcsr and l.is_1x1 else 0) for l, _ in plan)
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

    def result(wall_s):
        return {"kind": "sweep", "environment": env, "config": dataclasses.asdict(cfg),
                "peaks_tflops": peaks, "rows": rows, "break_even": P.break_even_rows(rows),
                "reduced_precision": P.reduced_precision_table(
                    rows, ["model", "layer", "batch", "sparsity"], "sparse_us", "dense_us"),
                "skipped": skipped, "wall_s": wall_s}

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
        dense, sparse, bcsr = {}, {}, {}
        for mode in cfg.modes:
            bar.set_postfix_str(f"{layer.name} b{batch} dense {mode}")
            dt, prec = L.mode_dtype(mode), L.mode_precision(mode)
            op = lambda x, w, prec=prec: L.dense_conv(x, w, layer, prec)  # noqa: E731
            dense[mode] = measure(layer, op, x32.astype(dt), dense_w.astype(dt),
                                  None if dense_wm is None else dense_wm.astype(dt), cfg, kernel)
            bar.update(1)
        op = lambda x, f: L.sparse_conv(x, f, layer)  # noqa: E731
        for dtn in dtypes:
            dt = jnp.dtype(dtn)
            for s in cfg.sparsities:
                bar.set_postfix_str(f"{layer.name} b{batch} sparse {dtn} {s:g}")
                filt, used, mfilt = get_filter(layer, s)
                sparse[(dtn, s)] = measure(layer, op, x32.astype(dt), filt.astype(dt),
                                           None if mfilt is None else mfilt.astype(dt), cfg, kernel)
                bar.update(1)
        if use_bcsr and layer.is_1x1:
            for s in cfg.sparsities:
                bar.set_postfix_str(f"{layer.name} b{batch} bcsr {s:g}")
                filt, _, mfilt = get_filter(layer, s)
                bcsr[s] = measure_bcsr(layer, x32, filt, mfilt, cfg, kernel)
                bar.update(1)
        for mode in cfg.modes:
            dtn = L.MODES[mode][0]
            itemsize = jnp.dtype(dtn).itemsize
            d = dense[mode]
            for s in cfg.sparsities:
                filt, used, mfilt = get_filter(layer, s)
                sp = sparse[(dtn, s)]
                rows.append(make_row(layer, batch, mode, s, used, filt, mfilt, sp, d,
                                     bcsr.get(s) if dtn == "float32" else None, peaks, itemsize))
        # A checkpoint per layer: a run killed from outside keeps what it measured.
        os.makedirs(cfg.out, exist_ok=True)
        P.write_json(result(time.time() - start), os.path.join(cfg.out, "sweep.partial.json"))
    bar.close()
    if skipped:
        print(f"budget of {cfg.budget_s:g} s reached; skipped: {', '.join(skipped)}", file=sys.stderr)
    return result(time.time() - start)


def make_row(layer, batch, mode, s, used, filt, mfilt, sp, d, bc, peaks, itemsize) -> dict:
    pair = layer.chain_kind == "pair"
    nnz = filt.nnz + (mfilt.nnz if pair else 0)
    sparse_flops = 2.0 * nnz * batch * layer.out_pixels
    dense_flops = layer.dense_flops(batch) + (layer.mirror.dense_flops(batch) if pair else 0.0)
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
        "unit": sp["unit"], "sparse_us": sp["us"], "dense_us": d["us"],
        "sparse_kernel_us": sp.get("kernel_us"), "dense_kernel_us": d.get("kernel_us"),
        "sparse_launches": sp.get("launches"), "dense_launches": d.get("launches"),
        "basis": basis, "speedup": P.ratio(d_t, s_t),
        "kernel_speedup": P.ratio(d.get("kernel_us"), sp.get("kernel_us")),
        "sparse_tflops": s_tf, "dense_tflops": d_tf, "peak_tflops": peak,
        "sparse_frac_peak": P.ratio(s_tf, peak), "dense_frac_peak": P.ratio(d_tf, peak),
        "sparse_frac_f32_peak": P.ratio(s_tf, f32_peak),
    }
    if bc is not None:
        b_t = bc["kernel_us"] if basis == "kernel" and bc.get("kernel_us") else bc["us"]
        row.update({"bcsr_us": bc["us"], "bcsr_kernel_us": bc.get("kernel_us"),
                    "speedup_vs_bcsr": P.ratio(b_t, s_t)})
    return row


# ---- reporting -----------------------------------------------------------------

TABLE = [("layer", "layer", ""), ("shape", "shape", ""), ("batch", "N", ""), ("mode", "mode", ""),
         ("sparsity", "sparsity", "g"), ("unit", "per", ""), ("sparse_us", "sparse µs", ".1f"),
         ("dense_us", "dense µs", ".1f"), ("speedup", "speedup", ".2f"), ("basis", "basis", ""),
         ("sparse_kernel_us", "sp kern µs", ".1f"), ("dense_kernel_us", "dn kern µs", ".1f"),
         ("sparse_tflops", "sp TF/s", ".3g"), ("sparse_frac_peak", "sp %peak", ".1%"),
         ("bcsr_us", "BCSR µs", ".1f"), ("speedup_vs_bcsr", "vs BCSR", ".2f")]


def report(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    plat = env["platform"].upper()
    lines = [f"jaxsparse layer sweep on {env['device']} ({env['platform']}), jax {env['jax']}, "
             f"{env['date']}; spatial scale 1/{cfg['scale']:g}, pattern {cfg['pattern']}",
             f"sparse = jaxsparse {plat} kernel, dense = XLA {plat} convolution at the same dtype; "
             "µs per op (or per layer+mirror pair) by the chain method, per call where a layer "
             "cannot chain; speedup = dense / sparse.",
             "measured matmul peak (TFLOP/s): " + ", ".join(f"{m} {v:.3g}" for m, v in
                                                             result["peaks_tflops"].items()),
             "", P.format_table(result["rows"], TABLE)]
    be = result["break_even"]
    if len({r["sparsity"] for r in result["rows"]}) > 1:
        lines += ["", "break-even sparsity (sparse faster above it):",
                  P.format_table(be, [("layer", "layer", ""), ("batch", "N", ""), ("mode", "mode", ""),
                                      ("note", "break-even", ""), ("basis", "basis", "")])]
    if result["reduced_precision"]:
        lines += ["", "reduced precision: gain = time at float32 / time at bf16/f16 (>1 = faster)",
                  P.format_table(result["reduced_precision"], RP_TABLE)]
    gm = P.geomean(r["speedup"] for r in result["rows"])
    if result.get("skipped"):
        lines += ["", "skipped (time budget): " + ", ".join(result["skipped"])]
    lines += ["", f"geometric-mean speedup over all rows: {gm:.2f}x" if gm else "",
              f"wall time {result['wall_s']:.0f} s"]
    return "\n".join(lines)


RP_TABLE = [("layer", "layer", ""), ("batch", "N", ""), ("sparsity", "sparsity", "g"),
            ("low_mode", "low", ""), ("ref_mode", "ref", ""), ("dense_gain", "dense gain", ".2f"),
            ("sparse_gain", "sparse gain", ".2f"), ("speedup_ref", "speedup ref", ".2f"),
            ("speedup_low", "speedup low", ".2f")]


def write_outputs(result: dict, out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    meta = {"environment": result["environment"], "config": result["config"],
            "peaks_tflops": result["peaks_tflops"]}
    paths = [P.write_json(result, os.path.join(out, "sweep.json")),
             P.write_csv(result["rows"], os.path.join(out, "sweep.csv"), meta),
             P.write_csv(result["break_even"], os.path.join(out, "breakeven.csv"), meta)]
    if result["reduced_precision"]:
        paths.append(P.write_csv(result["reduced_precision"], os.path.join(out, "reduced_precision.csv"), meta))
    paths += P.sweep_figures(result, out)
    return paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = run_sweep(config_from_flags())
    print(report(result))
    paths = write_outputs(result, result["config"]["out"])
    print("\nwrote " + ", ".join(os.path.relpath(p) if not os.path.isabs(p) else p for p in paths))


if __name__ == "__main__":
    app.run(main)
