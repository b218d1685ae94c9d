r"""Markdown summary of a GPU results folder: the numbers the README quotes, from the JSON.

    python3 experiments/summarize.py --sweep=experiments/results/h200/sweep.json \
        --network=experiments/results/h200/network.json \
        --whole_model='experiments/results/h200/whole_model/*.json' \
        --raw=experiments/results/h200/raw --out=experiments/results/h200 \
        --tc=experiments/results/h200/tc_v4_direct_r50_vgg_2026-12-03.jsonl \
        --tc_sweep='experiments/results/h200/raw/tc_sweep_*.json'

Every number is read from the result files (measured on the device by `sweep.py`,
`network.py`, `whole_model_benchmark.py` and `tools/tc_bench.py`); nothing is typed in by hand. Speedup =
dense / sparse at the same dtype (chain µs per op or pair; GPU kernel time where a
layer cannot chain). Writes ``SUMMARY.md`` to ``--out`` (stdout without it).
"""

from __future__ import annotations

import glob
import json
import os

from absl import app, flags

import breakeven
import common
import layers as L
import tables as T

flags.DEFINE_string("sweep", None, "Merged sweep.json (plots.py --results=...).")
flags.DEFINE_string("network", None, "Merged network.json.")
flags.DEFINE_list("whole_model", [], "whole_model_benchmark.py JSON files (globs allowed).")
flags.DEFINE_string("raw", "", "Folder of the per-call JSON files (for the 'skipped' lists).")
flags.DEFINE_list("tc", [], "tools/tc_bench.py JSON-lines files of the tensor-core family (globs allowed).")
flags.DEFINE_list("tc_sweep", [], "sweep.py JSON files with the tensor-core family's rows (globs allowed): "
                  "its chain-method speedups and break-even sparsities.")
common.define_flags("out", helps={"out": "Folder of SUMMARY.md, or the Markdown file's path (default: stdout)."})
FLAGS = flags.FLAGS

MODES = tuple(L.MODES)


def fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def vgg_geomeans(rows):
    out = []
    for batch in sorted({r["batch"] for r in rows if r["model"] == "vgg16"}):
        sparsities = sorted({r["sparsity"] for r in rows if r["model"] == "vgg16" and r["batch"] == batch})
        for s in sparsities:
            cells = []
            for m in MODES:
                sel = [r for r in rows if r["model"] == "vgg16" and r["batch"] == batch
                       and r["sparsity"] == s and r["mode"] == m]
                cells.append(f"{fmt(T.geomean(r['speedup'] for r in sel))} ({len(sel)})" if sel else "-")
            out.append([batch, s] + cells)
    return table(["batch", "sparsity"] + [f"x vs {L.MODE_LABELS[m]} (layers)" for m in MODES], out)


def break_even_table(be, batch):
    layers = list(dict.fromkeys(r["layer"] for r in be if r["batch"] == batch))
    out = []
    for layer in layers:
        cells = {r["mode"]: r["note"] for r in be if r["layer"] == layer and r["batch"] == batch}
        out.append([layer] + [cells.get(m, "-") for m in MODES])
    return table(["layer"] + [L.MODE_LABELS[m] for m in MODES], out)


def find(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def targets(rows, be, peaks):
    """The CUDA-kernel issue's targets against what this run measured."""
    def gm(batch, s, mode):
        return T.geomean(r["speedup"] for r in find(rows, model="vgg16", batch=batch, sparsity=s, mode=mode))

    def be_max(batch, mode):
        vals = [r for r in be if r["model"] == "vgg16" and r["batch"] == batch and r["mode"] == mode]
        notes = sorted((r["note"] for r in vals), key=breakeven.note_order)
        return f"{notes[0]} .. {notes[-1]}" if notes else "-"

    r50 = {m: [r for r in find(rows, model="resnet50_1x1", batch=1, sparsity=0.9, mode=m) if r["chain"] == "pair"]
           for m in ("float32", "float32_highest")}
    tf32 = [r["speedup"] for r in r50["float32"] if r["speedup"]]
    bcsr = [r.get("speedup_vs_bcsr") for r in r50["float32"] if r.get("speedup_vs_bcsr")]
    kim = {(b, m): [r["speedup"] for r in find(rows, model="cnn_non_static", batch=b, sparsity=0.9, mode=m)]
           for b in (1, 50) for m in MODES}
    big = find(rows, model="vgg16", batch=32, sparsity=0.9, mode="float32_highest")
    eff = max((r["sparse_tflops"] or 0 for r in big), default=0)
    f32_peak = peaks.get("float32_highest")

    def rng(v):
        return f"{min(v):.2f} .. {max(v):.2f}" if v else "-"

    items = [
        ("b1 90 %, VGG geomean vs f32 HIGHEST", ">= 6x", fmt(gm(1, 0.9, "float32_highest"))),
        ("b1 90 %, VGG geomean vs TF32", ">= 1x", fmt(gm(1, 0.9, "float32"))),
        ("b1 95 %, VGG geomean vs f32 HIGHEST", ">= 12x", fmt(gm(1, 0.95, "float32_highest"))),
        ("b1 95 %, VGG geomean vs TF32", ">= 2x", fmt(gm(1, 0.95, "float32"))),
        ("b1 95 %, VGG geomean vs bf16", ">= 1.5x", fmt(gm(1, 0.95, "bfloat16"))),
        ("b32 break-even vs f32 HIGHEST (VGG layers)", "<= 0.5", be_max(32, "float32_highest")),
        ("b32 break-even vs TF32", "<= 0.93", be_max(32, "float32")),
        ("b32 break-even vs bf16", "<= 0.97", be_max(32, "bfloat16")),
        ("R50 1x1 DLMC 0.9 b1 per pair vs TF32", ">= 2x", rng(tf32)),
        ("R50 1x1 DLMC 0.9 b1 per pair vs BCSR", ">= 3x", rng(bcsr)),
        ("sentence CNN 90 % kernel time b1 vs f32 HIGHEST / TF32 / bf16", ">= 3x",
         " / ".join(rng(kim[(1, m)]) for m in ("float32_highest", "float32", "bfloat16"))),
        ("sentence CNN 90 % kernel time b50 vs f32 HIGHEST / TF32 / bf16", ">= 3x",
         " / ".join(rng(kim[(50, m)]) for m in ("float32_highest", "float32", "bfloat16"))),
        ("VGG b32 90 % best effective TFLOP/s, fraction of measured f32 peak", ">= 40 %",
         f"{eff:.1f} TFLOP/s = {eff / f32_peak:.0%} of {f32_peak:.1f}" if f32_peak else "-"),
    ]
    return table(["target", "required", "measured"], items)


def r50_table(rows):
    out = []
    for r in rows:
        if r["model"] == "resnet50_1x1" and r["sparsity"] == 0.9 and r["mode"] in ("float32_highest", "float32", "bfloat16"):
            def cell(key, spec=".2f"):  # '~': rests on a fallback time
                return ("~" if key in T.fallback_fields(r) else "") + fmt(r.get(key), spec)
            out.append([r["layer"], r["batch"], L.MODE_LABELS[r["mode"]], r["unit"], cell("sparse_us", ".1f"),
                        cell("dense_us", ".1f"), cell("speedup"), cell("bcsr_us", ".1f"),
                        cell("speedup_vs_bcsr"), fmt(r["sparse_kernel_us"], ".1f"),
                        fmt(r["dense_kernel_us"], ".1f"), fmt(r.get("bcsr_kernel_us"), ".1f")])
    return table(["layer", "N", "mode", "per", "sparse µs", "dense µs", "x", "BCSR µs", "x vs BCSR",
                  "sparse kernel µs", "dense kernel µs", "BCSR (cuSPARSE) kernel µs"], out)


def kim_table(rows):
    out = []
    for r in rows:
        if r["model"] == "cnn_non_static" and r["sparsity"] == 0.9:
            out.append([r["layer"], r["batch"], L.MODE_LABELS[r["mode"]], fmt(r["sparse_kernel_us"], ".1f"),
                        fmt(r["dense_kernel_us"], ".1f"), fmt(r["kernel_speedup"]),
                        fmt(r["sparse_us"], ".1f"), fmt(r["dense_us"], ".1f")])
    return table(["layer", "N", "mode", "sparse kernel µs", "dense kernel µs", "x (kernel)",
                  "sparse call µs", "dense call µs"], out)


def reduced_precision(rp):
    out = []
    for low in ("bfloat16", "float16"):
        for ref in ("float32_highest", "float32"):
            sel = [r for r in rp if r["low_mode"] == low and r["ref_mode"] == ref]
            if not sel:
                continue
            out.append([L.MODE_LABELS[low], L.MODE_LABELS[ref], len(sel), fmt(T.geomean(r["dense_gain"] for r in sel)),
                        fmt(T.geomean(r["sparse_gain"] for r in sel))])
    return table(["low precision", "vs", "rows", "dense gain (geomean)", "sparse gain (geomean)"], out)


def network_table(net):
    out = []
    for r in net["rows"]:
        out.append([r["model"], r["batch"], L.MODE_LABELS[r["mode"]], r["sparsity"], fmt(r["dense_ms"], ".3f"),
                    fmt(r["sparse_ms"], ".3f"), fmt(r["speedup"]),
                    fmt(r["dense_kernel_us"] and r["dense_kernel_us"] / 1e3, ".3f"),
                    fmt(r["sparse_kernel_us"] and r["sparse_kernel_us"] / 1e3, ".3f"), fmt(r["kernel_speedup"])])
    return table(["network", "N", "mode", "sparsity", "dense ms/call", "sparse ms/call", "x",
                  "dense kernel ms", "sparse kernel ms", "x (kernel)"], out)


def whole_model_table(paths):
    out, skipped, rows = [], [], []
    for path in paths:
        d = common.read_result(path)
        skipped += d.get("skipped", [])
        rows += d["rows"]
    # One table ordered by model, batch, mode, sparsity, whichever device call measured the row; a
    # configuration measured in two calls keeps both rows (the spread between calls is information).
    modes = list(L.MODE_LABELS)
    rows.sort(key=lambda r: (r["model"], r["batch"], modes.index(r["mode"]), r["sparsity"]))
    for r in rows:
        out.append([r["model"], r["batch"], L.MODE_LABELS[r["mode"]], r["sparsity"], fmt(r["dense_us"] / 1e3, ".3f"),
                    fmt(r["sparse_us"] / 1e3, ".3f"), fmt(r["speedup"]),
                    fmt(r.get("dense_kernel_us") and r["dense_kernel_us"] / 1e3, ".3f"),
                    fmt(r.get("sparse_kernel_us") and r["sparse_kernel_us"] / 1e3, ".3f"),
                    fmt(r["max_rel_diff"], ".1e"), auto_cell(r)])
    measured = {(row[0], row[2], row[1]) for row in out}
    missing = [s for s in dict.fromkeys(skipped)
               if not any(s.startswith(m) and f"b{b}" in s and L.MODE_LABELS.get(s.split()[1]) == lab
                          for m, lab, b in measured)]
    text = table(["model", "N", "mode", "sparsity", "dense ms/call", "sparse ms/call", "x", "dense kernel ms",
                  "sparse kernel ms", "max rel diff", "auto ms/call (sparse layers, on tensor cores)"], out)
    return text, missing


# The layers of issue 14's VGG-16 targets: batch 1 all five, batch 32 all but conv1_2.
TC_VGG_TARGETS = {1: ("conv1_2", "conv2_2", "conv3_2", "conv4_2", "conv5_1"),
                  32: ("conv2_2", "conv3_2", "conv4_2", "conv5_1")}


def tc_table(paths):
    """The tensor-core family against XLA dense at the same dtype (float32 = TF32 on both sides),
    per result file, kernel variant (design:plan window:tile pixels), layer set (the DLMC
    ResNet-50 1x1 layers; VGG-16 3x3 over the issue's target layers), dtype, batch and
    sparsity: geometric mean, min and max over the layers of dense kernel µs / tensor-core
    kernel µs, and the geomean with the weight packing counted."""
    out = []
    for path in paths:
        groups = {}
        with open(path) as f:
            for r in map(json.loads, filter(str.strip, f)):
                vgg = r["layer"].startswith("vgg.")
                if vgg and r["layer"][4:] not in TC_VGG_TARGETS.get(r["batch"], ()):
                    continue
                variant = f"{r.get('design', 'slab')}:{r.get('window', 0)}:{r.get('tile_pixels') or 'auto'}"
                key = (variant, "VGG-16 3x3" if vgg else "R50 1x1 (DLMC)", r["dtype"], r["batch"], r["sparsity"])
                groups.setdefault(key, []).append(r)
        for (variant, family, dtype, batch, sparsity), rs in sorted(groups.items()):
            kern = [r["dense_us"] / r["tc_kernel_us"] for r in rs]
            call = [r["dense_us"] / r["tc_us"] for r in rs]
            out.append([os.path.basename(path), variant, family, "TF32" if dtype == "float32" else dtype, batch, sparsity,
                        len(rs), fmt(T.geomean(kern)), f"{min(kern):.2f}-{max(kern):.2f}", fmt(T.geomean(call))])
    return table(["file", "variant", "layers", "dtype", "N", "sparsity", "n", "dense / TC kernel (geomean)", "min-max",
                  "dense / TC call (geomean, with packing)"], out)


def tc_sweep_table(paths):
    """The tensor-core family in `sweep.py` results: per layer, batch and mode (float32 = TF32
    on both sides), dense / tensor-core at each sparsity on the sweep's basis (chain µs per op,
    kernel time where a layer cannot chain), and its break-even sparsity (`break_even_tc`)."""
    out = []
    for path in paths:
        result = common.read_result(path)
        be = {(b["layer"], b["batch"], b["mode"]): b for b in result.get("break_even_tc", [])}
        cells = {}
        for r in result["rows"]:
            if r.get("speedup_tc") is not None:
                cells.setdefault((r["layer"], r["batch"], r["mode"]), {})[r["sparsity"]] = r["speedup_tc"]
        for key, by_s in sorted(cells.items()):
            b = be.get(key, {})
            even = fmt(b.get("break_even")) if b.get("break_even") is not None else b.get("note", "-")
            out.append([os.path.basename(path), key[0], key[1], "TF32" if key[2] == "float32" else key[2],
                        ", ".join(f"{s:g}: {v:.2f}" for s, v in sorted(by_s.items())), even])
    return table(["file", "layer", "N", "mode", "dense / TC by sparsity", "break-even"], out)


def auto_cell(row) -> str:
    """``policy='auto'``'s model (``--auto``): ms per call, and how many of its convolutions went
    sparse and how many of those run the tensor-core kernel; '-' where it was not timed."""
    if row.get("auto_us") is None:
        return "-"
    layers = row.get("auto_report", [])
    on_tc = sum(bool(d.get("tensor_cores")) for d in layers)
    return f"{row['auto_us'] / 1e3:.3f} ({row['auto_sparse_layers']}/{len(layers)}, {on_tc})"


def main(argv):
    del argv
    sweep = common.read_result(FLAGS.sweep)
    rows, be, env = sweep["rows"], sweep["break_even"], sweep["environment"]
    measured = T.measured(rows)  # geomeans and targets leave fallback times out
    fallbacks = sum(bool(T.fallback_fields(r)) for r in rows)
    runs = sweep.get("runs", [{"environment": env}])
    dates = sorted(r["environment"]["date"] for r in runs)
    parts = [f"# Results on {env['device']} (jax {env['jax']}, jaxlib {env['jaxlib']}, Python {env['python']})",
             "",
             f"Generated by `experiments/summarize.py` from the result files in this folder (measured "
             f"{dates[0]} .. {dates[-1]}). Sparse = jaxsparse CUDA kernels (exact float32 FMA "
             "accumulation at every dtype); dense = the convolution XLA emits (cuDNN) at the same dtype, "
             "timed in the same run by the same method. x = dense / sparse; > 1 means sparse is faster.",
             "", "measured matmul peak (TFLOP/s): " +
             ", ".join(f"{L.MODE_LABELS.get(m, m)} {v:.1f}" for m, v in sweep["peaks_tflops"].items())]
    skipped = []
    tc_sweeps = sorted(p for pat in FLAGS.tc_sweep for p in glob.glob(pat))
    if FLAGS.raw:  # the tensor-core sweeps list their own skips below
        tc_real = {os.path.realpath(p) for p in tc_sweeps}
        for path in sorted(p for p in glob.glob(os.path.join(FLAGS.raw, "*.json")) if os.path.realpath(p) not in tc_real):
            skipped += [f"{s} ({os.path.basename(path)})" for s in common.read_result(path)["skipped"]]
    if skipped:
        parts += ["", "Not measured (time budget of the device call): " + ", ".join(skipped) + "."]
    if fallbacks:
        parts += ["", f"{fallbacks} rows rest on a fallback time (a chain time that failed its checks on "
                  "every attempt, `dense_check`/`sparse_check`/`bcsr_check` in the JSON): marked `~`, left "
                  "out of the geomeans, targets and break-even sparsities."]
    parts += ["", "## Targets of the CUDA-kernel issue", "", targets(measured, be, sweep["peaks_tflops"]),
              "", "## VGG-16: geometric-mean speedup over the distinct layer shapes", "",
              "Chain method, µs per op (per layer + mirror pair where Cin != Cout); conv3_3, conv4_3, "
              "conv5_2 and conv5_3 have the shapes of conv3_2, conv4_2 and conv5_1.", "", vgg_geomeans(measured)]
    for batch in sorted({r["batch"] for r in be}):
        parts += ["", f"## Break-even sparsity, batch {batch}", "",
                  "Sparse is faster above it; `<=x`: already at the lowest tested, `>0.98`: never in range.",
                  "", break_even_table(be, batch)]
    parts += ["", "## ResNet-50 1x1 (DLMC patterns), 90 %", "", r50_table(rows),
              "", "## Sentence CNN (CNN-non-static), 90 %", "",
              "Unchainable (VALID, Cin != Cout, no mirror): compared on GPU kernel time.", "", kim_table(rows),
              "", "## Reduced precision", "",
              "Gain = time at the float32 mode / time at the 16-bit mode, per layer, batch and sparsity "
              "(> 1: the 16-bit run is faster).", "", reduced_precision(sweep["reduced_precision"])]
    if FLAGS.network:
        parts += ["", "## Whole networks under one `jax.jit` (bias + ReLU, same pruned weights)", "",
                  "Median ms per jitted forward call; kernel ms = summed GPU kernel time per call.",
                  "", network_table(common.read_result(FLAGS.network))]
    paths = sorted(p for pat in FLAGS.whole_model for p in glob.glob(pat))
    if paths:
        text, missing = whole_model_table(paths)
        parts += ["", "## Whole Flax models (`sparsify(policy='sparse')` vs dense), ImageNet sizes", "",
                  "Median ms per jitted forward call of the `nnx.split` state; kernel ms from a profiler trace.",
                  "", text]
        if missing:
            parts += ["", "Not measured (time budget): " + ", ".join(missing) + "."]
    tc_paths = sorted(p for pat in FLAGS.tc for p in glob.glob(pat))
    if tc_paths:
        parts += ["", "## Tensor-core family (issue 14) against dense at the same dtype", "",
                  "GPU kernel time of one jitted call from a profiler trace, `tools/tc_bench.py`; "
                  "> 1 means the tensor-core kernel is faster. VGG-16 rows: the issue's target layers "
                  "(batch 32 without conv1_2), magnitude-pruned random weights.", "", tc_table(tc_paths)]
    if tc_sweeps:
        tc_skipped = [f"{s} ({os.path.basename(p)})" for p in tc_sweeps for s in common.read_result(p)["skipped"]]
        parts += ["", "### The tensor-core family in the sweep: speedup and break-even", "",
                  "`sweep.py`'s chain method, dense and tensor-core in the same run at the same dtype; "
                  "break-even `>0.98`: slower at every tested sparsity.", "", tc_sweep_table(tc_sweeps)]
        if tc_skipped:
            parts += ["", "Not measured with the family (time budget): " + ", ".join(tc_skipped) + "."]
    text = "\n".join(parts) + "\n"
    if FLAGS.out:
        path = common.output_path(FLAGS.out, "SUMMARY.md")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")
    else:
        print(text)


if __name__ == "__main__":
    flags.mark_flag_as_required("sweep")
    app.run(main)
