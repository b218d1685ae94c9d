r"""Layer benchmark of issue 3: jaxsparse.sparse_conv vs XLA's dense convolution on the GPU.

Sparse and dense at the same dtype, in the same run, by the same method:

* per-op time under jit by the chain method (`jaxsparse.benchmark.chain_time_us`,
  K = 4 and 20 on a GPU; Cin != Cout layers chained with their mirror layer, per pair);
* GPU kernel time per call from a profiler trace (`kernel_time_us`), for every
  layer, including those that cannot be chained (stride-2 projections, the
  sentence CNN);
* for the stride-1 ResNet-50 1x1 layers also `jax.experimental.sparse` BCSR
  (cuSPARSE) in channel-major form, float32;
* (``--tensor_cores``) for every chainable layer the tensor-core family `jaxsparse.tc_conv`
  at the modes that allow tensor cores (TF32, bf16, f16), in the same row as the dense time it
  is compared with (``tc_*``, ``speedup_tc_*``).

Every chain time is checked, also against twice the measured matmul peak of its mode (the
largest of the modes sharing a sparse or BCSR time); rows keep the check (``dense_check``,
``sparse_check``, ``bcsr_check``; details in ``*_timing``). A fallback time is printed
``[fallback: ...]`` and left out of the chain break-even.

Reports µs, speedup, effective TFLOP/s (2 nnz N Ho Wo / t) and the break-even sparsity
(`breakeven.py`, on chain and on kernel time). Writes ``layer_benchmark.json`` (the result
envelope of ``common.py``) to ``--out``, after every measurement.

    python3 experiments/layer_benchmark.py --parts=vgg1,kim --out=/tmp/bench
"""

from __future__ import annotations

import math
import time

from absl import app, flags

import breakeven
import common
import layers as L
import tables as T

FLAGS = flags.FLAGS
common.define_flags("k_small", "k_large", "bcsr", "tensor_cores", "budget_s", "out",
                    modes=["float32_highest", "float32", "bfloat16"], repeats=10)
flags.DEFINE_list("parts", ["vgg1", "r50", "kim", "vgg32"],
                  "Parts to run: vgg1 (VGG-16 batch 1), vgg32 (batch 32 sweep), r50 (ResNet-50 1x1, "
                  "DLMC), kim (sentence CNN).")
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
flags.DEFINE_bool("chain", True, "Measure chain times (else kernel time only).")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsparse import benchmark as bm

    common.check_backend()
    t_start = time.time()
    out_path = common.output_path(FLAGS.out or common.default_out("layer_benchmark"), "layer_benchmark.json")
    k_small, k_large = common.auto_chain(FLAGS.k_small, FLAGS.k_large)
    repeats = common.auto_repeats(FLAGS.repeats)
    rows, skipped = [], []
    env = bm.environment()
    print("env", env, flush=True)

    def over_budget(what: str) -> bool:
        if FLAGS.budget_s and time.time() - t_start > FLAGS.budget_s:
            skipped.append(what)
            return True
        return False

    def save():
        common.write_result(common.envelope("layer_benchmark", common.flag_values(__name__), rows, t_start,
                                            skipped, env, peaks_tflops=peaks, break_even=break_even(rows)),
                            out_path)

    peaks = {}  # measured matmul peak (TFLOP/s) per mode, once per mode

    def chain_us(steps, x, flops, modes):
        """Checked chain time; not faster than twice the largest peak of ``modes`` (which share it)."""
        if not FLAGS.chain:
            return None
        for m in modes:
            if m not in peaks:
                peaks[m] = bm.matmul_peak_tflops(L.mode_dtype(m), precision=L.mode_precision(m))
        return bm.chain_time_us(steps, x, k_small=k_small, k_large=k_large, repeats=repeats, warmup=2,
                                flops=flops, peak_tflops=max((peaks[m] for m in modes), default=None))

    def same_dtype(dtype):
        return [m for m in FLAGS.modes if L.MODES[m][0] == dtype]

    def kern_us(fn, *args):
        r = bm.kernel_time_us(fn, *args, calls=5, warmup=2)
        return None if r is None else r["total_us"]

    sparse_cache = {}
    dense_cache = {}
    tc_cache = {}

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
            if over_budget(f"{layer.name} b{batch} s{sparsity:g} {mode}"):
                continue
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
            flops = 2.0 * nnz * batch * ho * wo
            skey = (layer.name, batch, sparsity, pattern, str(dt), kind)
            if skey not in sparse_cache:
                sc = chain_us(steps_s, x, flops, same_dtype(L.MODES[mode][0])) if kind != "none" else None
                sk = kern_us(one(steps_s), x)
                sparse_cache[skey] = (sc, sk)
            sc, sk = sparse_cache[skey]
            dkey = (layer.name, batch, mode, kind)
            if dkey not in dense_cache:
                dense_flops = layer.dense_flops(batch) + (mirror.dense_flops(batch) if mirror else 0.0)
                dense_cache[dkey] = (chain_us(steps_d, x, dense_flops, [mode]) if kind != "none" else None,
                                     kern_us(one(steps_d), x))
            dc, dk = dense_cache[dkey]
            tc = {}
            if FLAGS.tensor_cores and kind != "none" and L.tensor_core_ready(layer, mode):
                tkey = (layer.name, batch, sparsity, pattern, str(dt), kind)
                if tkey not in tc_cache:
                    op = L.tensor_core_op(layer, f, fm)  # plans from the concrete filters
                    steps_t = [lambda x, f=f: op(x, f)] + ([lambda x, f=fm: op(x, f)] if mirror else [])
                    tc_cache[tkey] = (chain_us(steps_t, x, flops, same_dtype(L.MODES[mode][0])),
                                      kern_us(one(steps_t), x))
                tcc, tck = tc_cache[tkey]
                tc = dict(tc_chain_us=tcc, tc_kernel_us=tck,
                          speedup_tc_chain=T.ratio(dc, tcc), speedup_tc_kernel=T.ratio(dk, tck),
                          **T.check_fields("tc", tcc))
            row = dict(layer=layer.name, model=layer.model, shape=layer.describe(), batch=batch,
                       sparsity=sparsity, pattern=used, mode=mode, chain_kind=kind, nnz=nnz,
                       sparse_chain_us=sc, dense_chain_us=dc, sparse_kernel_us=sk, dense_kernel_us=dk,
                       speedup_chain=(dc / sc) if sc and dc and sc > 0 else None,
                       speedup_kernel=(dk / sk) if sk and dk and sk > 0 else None,
                       sparse_tflops_kernel=flops / (sk * 1e-6) / 1e12 if sk else None,
                       sparse_tflops_chain=flops / (sc * 1e-6) / 1e12 if sc and sc > 0 else None,
                       **T.check_fields("sparse", sc), **T.check_fields("dense", dc), **tc)
            rows.append(row)
            print(f"{layer.name:22s} {'+mirror' if mirror else '':7s} b{batch:<3d} s={sparsity:<5} {mode:16s} "
                  f"chain sparse {fmt(sc)} dense {fmt(dc)} x{fmt(row['speedup_chain'], 5, 2)} | "
                  f"kernel sparse {fmt(sk)} dense {fmt(dk)} x{fmt(row['speedup_kernel'], 5, 2)} | "
                  f"{fmt(row['sparse_tflops_kernel'], 5, 2)} TFLOP/s"
                  + (f" | tensor cores chain {fmt(tc['tc_chain_us'])} x{fmt(tc['speedup_tc_chain'], 5, 2)} kernel "
                     f"{fmt(tc['tc_kernel_us'])} x{fmt(tc['speedup_tc_kernel'], 5, 2)}" if tc else "")
                  + fallback_note(row), flush=True)
            save()

    def measure_bcsr(layer, batch, sparsity):
        """jax.experimental.sparse BCSR (cuSPARSE) in channel-major form: X (Cin, P) -> W X."""
        from jax.experimental import sparse as jsp
        try:
            jax.config.update("jax_bcoo_cusparse_lowering", True)
        except Exception:
            pass
        mirror = layer.mirror
        if mirror is None or over_budget(f"{layer.name} b{batch} s{sparsity:g} BCSR"):
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
        sc = chain_us(steps, x, 2.0 * (filt.nnz + mfilt.nnz) * p, same_dtype("float32"))
        sk = kern_us(jax.jit(lambda x: b @ (a @ x)), x)
        rows.append(dict(layer=layer.name, model=layer.model, shape=layer.describe(), batch=batch,
                         sparsity=sparsity, pattern="dlmc", mode="float32", chain_kind="pair",
                         nnz=filt.nnz + mfilt.nnz, impl="jax.experimental.sparse.BCSR",
                         bcsr_chain_us=sc, bcsr_kernel_us=sk,
                         **T.check_fields("bcsr", sc)))
        print(f"{layer.name:22s} +mirror b{batch:<3d} s={sparsity:<5} BCSR float32     chain {fmt(sc)} kernel {fmt(sk)}"
              f"{fallback_note(rows[-1])}", flush=True)
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

    save()
    for s in break_even(rows):
        print("break-even", s, flush=True)
    if skipped:
        print("skipped (time budget): " + ", ".join(skipped), flush=True)
    print(f"done in {time.time() - t_start:.0f} s, {len(rows)} rows -> {out_path}", flush=True)


def fmt(v, w=8, d=1):
    return f"{v:{w}.{d}f}" if isinstance(v, (int, float)) and v is not None and math.isfinite(v) else " " * (w - 1) + "-"


# Fields of a row and the chain-timed sides they rest on (`tables.fallback_fields`).
RESTS_ON = {"sparse_chain_us": ("sparse",), "dense_chain_us": ("dense",), "speedup_chain": ("dense", "sparse"),
            "sparse_tflops_chain": ("sparse",), "bcsr_chain_us": ("bcsr",), "tc_chain_us": ("tc",),
            "speedup_tc_chain": ("dense", "tc")}


def fallback_note(row) -> str:
    sides = [side for side in T.SIDES if row.get(f"{side}_check") == "fallback"]
    return f" [fallback: {', '.join(sides)}]" if sides else ""


def break_even(rows):
    """Break-even sparsity (`breakeven.py`) per (layer, batch, mode), on chain and on kernel time,
    of the sparse kernels and (``tc_chain``, ``tc_kernel``) of the tensor-core family; chain
    speedups resting on a fallback time are left out."""
    convs = T.measured([r for r in rows if not r.get("impl")], RESTS_ON)  # not the BCSR rows
    out = []
    for measure in ("chain", "kernel", "tc_chain", "tc_kernel"):
        out += [{**be, "measure": measure} for be in breakeven.break_even_rows(
                convs, group=("layer", "batch", "mode"), speedup=f"speedup_{measure}", carry=())
                if be["note"] != "n/a"]
    return out


if __name__ == "__main__":
    app.run(main)
