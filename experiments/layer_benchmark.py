"""Layer benchmark of issue 3: jaxsparse.sparse_conv vs XLA's dense convolution on the GPU.

Sparse and dense at the same dtype, in the same run, by the same method:

* per-op time under jit by the chain method (`jaxsparse.benchmark.chain_time_us`,
  K = 4 and 20; Cin != Cout layers chained with their mirror layer, per pair);
* GPU kernel time per call from a profiler trace (`kernel_time_us`), for every
  layer, including those that cannot be chained (stride-2 projections, the
  sentence CNN);
* for the stride-1 ResNet-50 1x1 layers also `jax.experimental.sparse` BCSR
  (cuSPARSE) in channel-major form, float32.

Reports µs, speedup, effective TFLOP/s (2 nnz N Ho Wo / t) and break-even
sparsity (sparse time fitted linearly in density over the measured sparsities).

  python experiments/layer_benchmark.py --suite=targets --out=/tmp/bench.json
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "", "JSON output path (default experiments/results/layer_benchmark_<platform>.json).")
flags.DEFINE_list("parts", ["vgg1", "r50", "kim", "vgg32"],
                  "Parts to run: vgg1 (VGG-16 batch 1), vgg32 (batch 32 sweep), r50 (ResNet-50 1x1, "
                  "DLMC), kim (sentence CNN).")
flags.DEFINE_list("modes", ["float32_highest", "float32", "bfloat16"], "Precision modes (see layers.MODES).")
flags.DEFINE_list("vgg1_layers", ["conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv4_1",
                                  "conv4_2", "conv5_1"], "VGG-16 layers at batch 1 (distinct shapes).")
flags.DEFINE_list("vgg1_sparsity", ["0.9", "0.95"], "Sparsities at batch 1.")
flags.DEFINE_list("vgg32_layers", ["conv2_2", "conv3_2", "conv4_2", "conv5_1"], "VGG-16 layers at batch 32.")
flags.DEFINE_list("vgg32_sparsity", ["0.5", "0.8", "0.9", "0.95", "0.98"], "Sparsities at batch 32.")
flags.DEFINE_list("r50_sparsity", ["0.8", "0.9", "0.95", "0.98"], "DLMC sparsities.")
flags.DEFINE_list("r50_batch", ["1", "32"], "ResNet-50 batch sizes.")
flags.DEFINE_list("r50_layers", ["r50.g1.reduce", "r50.g2.reduce", "r50.g3.reduce", "r50.g4.reduce",
                                 "r50.g2.shortcut", "r50.g3.shortcut", "r50.g4.shortcut"],
                  "ResNet-50 1x1 layer names (see experiments/layers.py) or all.")
flags.DEFINE_list("r50_sweep_sparsity_kinds", ["pair"], "Chain kinds swept over all r50 sparsities "
                  "(others at 0.9 only).")
flags.DEFINE_list("kim_batch", ["1", "50"], "Sentence CNN batch sizes.")
flags.DEFINE_integer("k_small", 4, "Chain length K small.")
flags.DEFINE_integer("k_large", 20, "Chain length K large.")
flags.DEFINE_integer("repeats", 10, "Timed calls per chain measurement (median).")
flags.DEFINE_bool("chain", True, "Measure chain times (else kernel time only).")
flags.DEFINE_bool("bcsr", True, "Measure jax.experimental.sparse BCSR for stride-1 1x1 layers.")
flags.DEFINE_float("time_budget_s", 0.0, "Stop starting new measurements after this many seconds (0: none).")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsparse import benchmark as bm
    import layers as L

    L.check_backend()
    t_start = time.time()
    out_path = FLAGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                         f"layer_benchmark_{jax.devices()[0].platform}.json")
    rows = []
    env = bm.environment()
    print("env", env, flush=True)

    def over_budget():
        return FLAGS.time_budget_s and time.time() - t_start > FLAGS.time_budget_s

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
        with open(out_path, "w") as fh:
            json.dump({"env": env, "flags": {k: getattr(FLAGS, k) for k in (
                "parts", "modes", "k_small", "k_large", "repeats")}, "rows": rows}, fh, indent=1)

    def chain_us(steps, x):
        if not FLAGS.chain:
            return None
        return bm.chain_time_us(steps, x, k_small=FLAGS.k_small, k_large=FLAGS.k_large,
                                repeats=FLAGS.repeats, warmup=2)

    def kern_us(fn, *args):
        r = bm.kernel_time_us(fn, *args, calls=5, warmup=2)
        return None if r is None else r["total_us"]

    sparse_cache = {}
    dense_cache = {}

    def measure(layer, batch, sparsity, pattern, modes, chainable=True):
        """Dense and sparse at each mode for one layer (or layer+mirror pair)."""
        kind = layer.chain_kind if chainable else "none"
        mirror = layer.mirror if kind == "pair" else None
        filt, used = L.make_filter(layer, sparsity, pattern)
        mfilt = L.make_filter(mirror, sparsity, pattern)[0] if mirror else None
        wd = L.dense_kernel(layer)
        wm = L.dense_kernel(mirror) if mirror else None
        nnz = filt.nnz + (mfilt.nnz if mfilt else 0)
        ho, wo = layer.out_hw
        for mode in modes:
            if over_budget():
                return
            dt = L.mode_dtype(mode)
            prec = L.mode_precision(mode)
            x = bm.random_input(layer.input_shape(batch), dt, seed=1)
            f = filt.astype(dt)
            fm = mfilt.astype(dt) if mfilt else None
            steps_s = [lambda x, f=f: L.sparse_conv(x, f, layer)]
            steps_d = [lambda x, w=wd.astype(dt): L.dense_conv(x, w, layer, prec)]
            if mirror:
                steps_s.append(lambda x, f=fm: L.sparse_conv(x, f, mirror))
                steps_d.append(lambda x, w=wm.astype(dt): L.dense_conv(x, w, mirror, prec))

            def one(steps):
                def run(x):
                    for s in steps:
                        x = s(x)
                    return x
                return jax.jit(run)

            # The sparse kernels compute in exact float32 at every float32 mode: measure once.
            skey = (layer.name, batch, sparsity, pattern, str(dt), kind)
            if skey not in sparse_cache:
                sc = chain_us(steps_s, x) if kind != "none" else None
                sk = kern_us(one(steps_s), x)
                sparse_cache[skey] = (sc, sk)
            sc, sk = sparse_cache[skey]
            dkey = (layer.name, batch, mode, kind)
            if dkey not in dense_cache:
                dense_cache[dkey] = (chain_us(steps_d, x) if kind != "none" else None,
                                     kern_us(one(steps_d), x))
            dc, dk = dense_cache[dkey]
            flops = 2.0 * nnz * batch * ho * wo
            row = dict(layer=layer.name, model=layer.model, shape=layer.describe(), batch=batch,
                       sparsity=sparsity, pattern=used, mode=mode, chain_kind=kind, nnz=nnz,
                       sparse_chain_us=sc, dense_chain_us=dc, sparse_kernel_us=sk, dense_kernel_us=dk,
                       speedup_chain=(dc / sc) if sc and dc and sc > 0 else None,
                       speedup_kernel=(dk / sk) if sk and dk and sk > 0 else None,
                       sparse_tflops_kernel=flops / (sk * 1e-6) / 1e12 if sk else None,
                       sparse_tflops_chain=flops / (sc * 1e-6) / 1e12 if sc and sc > 0 else None)
            rows.append(row)
            print(f"{layer.name:22s} {'+mirror' if mirror else '':7s} b{batch:<3d} s={sparsity:<5} {mode:16s} "
                  f"chain sparse {fmt(sc)} dense {fmt(dc)} x{fmt(row['speedup_chain'], 5, 2)} | "
                  f"kernel sparse {fmt(sk)} dense {fmt(dk)} x{fmt(row['speedup_kernel'], 5, 2)} | "
                  f"{fmt(row['sparse_tflops_kernel'], 5, 2)} TFLOP/s", flush=True)
            save()

    def measure_bcsr(layer, batch, sparsity):
        """jax.experimental.sparse BCSR (cuSPARSE) in channel-major form: X (Cin, P) -> W X."""
        from jax.experimental import sparse as jsp
        try:
            jax.config.update("jax_bcoo_cusparse_lowering", True)
        except Exception:
            pass
        mirror = layer.mirror
        if mirror is None or over_budget():
            return
        filt = L.make_filter(layer, sparsity, "dlmc")[0]
        mfilt = L.make_filter(mirror, sparsity, "dlmc")[0]

        def bcsr(f):
            dense = np.asarray(f.todense(), np.float32).reshape(f.in_channels, f.out_channels).T
            return jsp.BCSR.fromdense(jnp.asarray(dense))

        a, b = bcsr(filt), bcsr(mfilt)
        p = batch * layer.out_pixels
        x = bm.random_input((layer.cin, p), jnp.float32, seed=1)
        steps = [lambda x, a=a: a @ x, lambda x, b=b: b @ x]
        sc = chain_us(steps, x)
        sk = kern_us(jax.jit(lambda x: b @ (a @ x)), x)
        rows.append(dict(layer=layer.name, model=layer.model, shape=layer.describe(), batch=batch,
                         sparsity=sparsity, pattern="dlmc", mode="float32", chain_kind="pair",
                         nnz=filt.nnz + mfilt.nnz, impl="jax.experimental.sparse.BCSR",
                         bcsr_chain_us=sc, bcsr_kernel_us=sk))
        print(f"{layer.name:22s} +mirror b{batch:<3d} s={sparsity:<5} BCSR float32     chain {fmt(sc)} kernel {fmt(sk)}",
              flush=True)
        save()

    by_name = {l.name.split(".")[-1]: l for l in L.VGG16}

    def part_vgg1():
        for name in FLAGS.vgg1_layers:
            for s in FLAGS.vgg1_sparsity:
                measure(by_name[name], 1, float(s), "magnitude", FLAGS.modes)

    def part_kim():
        for layer in L.CNN_NON_STATIC:
            for b in FLAGS.kim_batch:
                measure(layer, int(b), 0.9, "magnitude", FLAGS.modes, chainable=False)

    def part_vgg32():
        for name in FLAGS.vgg32_layers:
            for s in FLAGS.vgg32_sparsity:
                measure(by_name[name], 32, float(s), "magnitude", FLAGS.modes)

    def part_r50():
        for b in FLAGS.r50_batch:
            for layer in L.RESNET50_1X1:
                if FLAGS.r50_layers != ["all"] and layer.name not in FLAGS.r50_layers:
                    continue
                sps = (FLAGS.r50_sparsity if int(b) == 1 and layer.chain_kind in
                       FLAGS.r50_sweep_sparsity_kinds else ["0.9"])
                for s in sps:
                    measure(layer, int(b), float(s), "dlmc", FLAGS.modes)
                    if FLAGS.bcsr and int(b) == 1 and layer.chain_kind == "pair":
                        measure_bcsr(layer, int(b), float(s))

    parts = {"vgg1": part_vgg1, "kim": part_kim, "vgg32": part_vgg32, "r50": part_r50}
    for p in FLAGS.parts:  # in the order given
        parts[p]()

    summary = break_even(rows)
    with open(out_path, "w") as fh:
        json.dump({"env": env, "flags": {k: getattr(FLAGS, k) for k in (
            "parts", "modes", "k_small", "k_large", "repeats")}, "rows": rows,
            "break_even": summary}, fh, indent=1)
    for s in summary:
        print("break-even", s, flush=True)
    print(f"done in {time.time() - t_start:.0f} s, {len(rows)} rows -> {out_path}", flush=True)


def fmt(v, w=8, d=1):
    return f"{v:{w}.{d}f}" if isinstance(v, (int, float)) and v is not None and math.isfinite(v) else " " * (w - 1) + "-"


def break_even(rows):
    """Sparsity at which the sparse time equals the dense one, per (layer, batch, mode, measure):
    sparse time fitted as a + b * density over the measured sparsities (least squares)."""
    import numpy as np
    groups = {}
    for r in rows:
        if "mode" not in r or r.get("impl"):
            continue
        for measure in ("chain", "kernel"):
            s, d = r.get(f"sparse_{measure}_us"), r.get(f"dense_{measure}_us")
            if s is None or d is None:
                continue
            groups.setdefault((r["layer"], r["batch"], r["mode"], measure), []).append(
                (1.0 - r["sparsity"], s, d))
    out = []
    for (layer, batch, mode, measure), pts in sorted(groups.items()):
        if len(pts) < 2:
            continue
        dens = np.array([p[0] for p in pts])
        ts = np.array([p[1] for p in pts])
        dense = float(np.median([p[2] for p in pts]))
        b, a = np.polyfit(dens, ts, 1)
        d_star = (dense - a) / b if b > 0 else float("nan")
        out.append(dict(layer=layer, batch=batch, mode=mode, measure=measure, dense_us=dense,
                        fit_a_us=float(a), fit_b_us=float(b),
                        break_even_sparsity=float(1.0 - d_star) if math.isfinite(d_star) else None,
                        measured_sparsities=sorted(round(1 - p[0], 4) for p in pts)))
    return out


if __name__ == "__main__":
    app.run(main)
