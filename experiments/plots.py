"""Tables, result files and matplotlib figures for the experiment scripts.

Also runnable on saved result files, to redraw figures or merge the runs of several
device calls into one result (rows joined, break-even and reduced-precision tables
recomputed):

    python3 experiments/plots.py --results experiments/results/sweep_gpu/sweep.json
    python3 experiments/plots.py --results a/sweep.json,b/sweep.json --out experiments/results/h200
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

# ---- numbers ------------------------------------------------------------------


def ratio(a, b):
    """a / b, or None when either is missing or not positive (a chain slope lost in noise)."""
    if a is None or b is None or not np.isfinite(a) or not np.isfinite(b) or a <= 0 or b <= 0:
        return None
    return a / b


def geomean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None and v > 0 and np.isfinite(v)]
    return float(np.exp(np.mean(np.log(vals)))) if vals else None


def break_even(sparsities: Sequence[float], speedups: Sequence[float | None]) -> tuple[float | None, str]:
    """Sparsity above which sparse beats dense, interpolated where the speedup crosses 1.

    Uses the last crossing from below (speedup < 1 at s_i, >= 1 at s_{i+1}), linear in
    log(speedup). Returns ``(value, note)``; value is None when the curve does not cross
    inside the tested range: note ``'<=s_min'`` (sparse already pays at the lowest sparsity)
    or ``'>s_max'`` (it never pays), or ``'n/a'`` without data.
    """
    pts = sorted((s, v) for s, v in zip(sparsities, speedups) if v is not None and v > 0)
    if not pts:
        return None, "n/a"
    below = [i for i, (_, v) in enumerate(pts) if v < 1.0]
    if not below:
        return None, f"<={pts[0][0]:g}"
    i = below[-1]
    if i == len(pts) - 1:
        return None, f">{pts[-1][0]:g}"
    (s0, v0), (s1, v1) = pts[i], pts[i + 1]
    l0, l1 = math.log(v0), math.log(v1)
    s = s0 + (s1 - s0) * (0.0 - l0) / (l1 - l0) if l1 != l0 else s1
    return float(s), f"{s:.3f}"


def break_even_rows(rows: Sequence[dict]) -> list[dict]:
    """Break-even sparsity per (model, layer, batch, mode) of a sweep's rows."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["layer"], r["batch"], r["mode"]), []).append(r)
    out = []
    for (model, layer, batch, mode), rs in groups.items():
        val, note = break_even([r["sparsity"] for r in rs], [r["speedup"] for r in rs])
        out.append({"model": model, "layer": layer, "batch": batch, "mode": mode,
                    "basis": rs[0]["basis"], "break_even": val, "note": note,
                    "sparsities": ",".join(f"{r['sparsity']:g}" for r in rs)})
    return out


def merge_sweeps(results: Sequence[dict]) -> dict:
    """One sweep result from several runs (e.g. one device call per precision or batch):
    rows concatenated (a later run replaces an identical configuration), break-even and
    reduced-precision tables recomputed, every run's environment and config kept."""
    rows: dict = {}
    for res in results:
        for r in res["rows"]:
            rows[(r["layer"], r["batch"], r["mode"], r["sparsity"], r["pattern"])] = r
    rows_l = list(rows.values())
    peaks: dict = {}
    for res in results:
        peaks.update(res.get("peaks_tflops", {}))
    return {"kind": "sweep", "environment": results[-1]["environment"],
            "runs": [{"environment": r["environment"], "config": r["config"]} for r in results],
            "config": results[-1]["config"], "peaks_tflops": peaks, "rows": rows_l,
            "break_even": break_even_rows(rows_l),
            "reduced_precision": reduced_precision_table(rows_l, ["model", "layer", "batch", "sparsity"],
                                                         "sparse_us", "dense_us"),
            "wall_s": sum(r.get("wall_s", 0) for r in results)}


# ---- files ----------------------------------------------------------------------


def _clean(v):
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, (np.floating,)):
        return _clean(float(v))
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_json(obj, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(obj), f, indent=1)
    return path


def write_csv(rows: Sequence[dict], path: str, comment: dict | None = None) -> str:
    """Rows as CSV; ``comment`` (environment, flags) goes in leading '# key: value' lines."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields and not isinstance(r[k], (dict, list))]
    with open(path, "w", newline="") as f:
        for k, v in (comment or {}).items():
            f.write(f"# {k}: {json.dumps(_clean(v))}\n")
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return path


def read_csv(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


# ---- console tables ---------------------------------------------------------------


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if spec and isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec). Right-aligned text table."""
    cells = [[h for _, h, _ in columns]] + [[_fmt(r.get(k), s) for k, _, s in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- reduced precision -------------------------------------------------------------

LOW_MODES = ("bfloat16", "float16")


def reduced_precision_table(rows: Sequence[dict], keys: Sequence[str], sparse_key: str,
                            dense_key: str) -> list[dict]:
    """Gain of bfloat16/float16 over float32 (default precision, else HIGHEST), sparse and dense.

    ``rows`` carry ``mode`` plus ``keys`` (what identifies a configuration) and the two time
    fields. Gain = time at float32 / time at the low precision (> 1: the low precision is faster).
    """
    by = defaultdict(dict)
    for r in rows:
        by[tuple(r.get(k) for k in keys)][r["mode"]] = r
    out = []
    for key, modes in by.items():
        ref_mode = "float32" if "float32" in modes else "float32_highest" if "float32_highest" in modes else None
        if ref_mode is None:
            continue
        ref = modes[ref_mode]
        for low in LOW_MODES:
            if low not in modes:
                continue
            r = modes[low]
            out.append({**dict(zip(keys, key)), "low_mode": low, "ref_mode": ref_mode,
                        "dense_ref": ref.get(dense_key), "dense_low": r.get(dense_key),
                        "dense_gain": ratio(ref.get(dense_key), r.get(dense_key)),
                        "sparse_ref": ref.get(sparse_key), "sparse_low": r.get(sparse_key),
                        "sparse_gain": ratio(ref.get(sparse_key), r.get(sparse_key)),
                        "speedup_ref": ratio(ref.get(dense_key), ref.get(sparse_key)),
                        "speedup_low": ratio(r.get(dense_key), r.get(sparse_key))})
    return out


# ---- figures ------------------------------------------------------------------------


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _ordered(values):
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def plot_speedup_vs_sparsity(rows: Sequence[dict], path: str, title: str = "") -> str:
    """Speedup (dense / sparse) against sparsity, a line per layer, one panel per precision."""
    plt = _plt()
    modes = _ordered(r["mode"] for r in rows)
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.4), squeeze=False,
                             sharey=True)
    layers = _ordered(r["layer"] for r in rows)
    cmap = plt.get_cmap("tab20")
    for ax, mode in zip(axes[0], modes):
        for i, layer in enumerate(layers):
            pts = sorted((r["sparsity"], r["speedup"]) for r in rows
                         if r["mode"] == mode and r["layer"] == layer and r.get("speedup"))
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=cmap(i % 20), label=layer)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("speedup over XLA dense (x)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        h, l = ax.get_legend_handles_labels()
        for hh, ll in zip(h, l):
            if ll not in labels:
                handles.append(hh), labels.append(ll)
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title or "sparse speedup vs sparsity")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_breakeven_heatmap(be_rows: Sequence[dict], path: str, title: str = "") -> str:
    """Break-even sparsity, layer x precision; cells outside the tested range show their note."""
    plt = _plt()
    layers = _ordered(r["layer"] for r in be_rows)
    modes = _ordered(r["mode"] for r in be_rows)
    grid = np.full((len(layers), len(modes)), np.nan)
    notes = [["" for _ in modes] for _ in layers]
    for r in be_rows:
        i, j = layers.index(r["layer"]), modes.index(r["mode"])
        if r.get("break_even") is not None:
            grid[i, j] = r["break_even"]
        notes[i][j] = r.get("note", "")
    fig, ax = plt.subplots(figsize=(1.6 * len(modes) + 3, 0.32 * len(layers) + 1.6))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis_r", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_facecolor("#dddddd")
    ax.set_xticks(range(len(modes)), modes)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    for i in range(len(layers)):
        for j in range(len(modes)):
            ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=7,
                    color="w" if np.isfinite(grid[i, j]) and grid[i, j] > 0.5 else "k")
    fig.colorbar(im, ax=ax, label="break-even sparsity")
    ax.set_title(title or "break-even sparsity (lower is better for sparse)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reduced_precision(rp_rows: Sequence[dict], path: str, label_key: str = "layer",
                           title: str = "") -> str:
    """Gain of bfloat16/float16 over float32, dense vs sparse bars per configuration."""
    plt = _plt()
    lows = _ordered(r["low_mode"] for r in rp_rows)
    fig, axes = plt.subplots(len(lows), 1, figsize=(max(6, 0.55 * len(rp_rows) / max(1, len(lows)) + 3),
                                                     3.4 * len(lows)), squeeze=False)
    for ax, low in zip(axes[:, 0], lows):
        rs = [r for r in rp_rows if r["low_mode"] == low]
        labels = [f"{r[label_key]}\n{r.get('sparsity', '')}" for r in rs]
        x = np.arange(len(rs))
        dense = [r["dense_gain"] or np.nan for r in rs]
        sparse = [r["sparse_gain"] or np.nan for r in rs]
        ax.bar(x - 0.2, dense, 0.4, label="dense (XLA)", color="#888888")
        ax.bar(x + 0.2, sparse, 0.4, label="sparse (jaxsparse)", color="#1f77b4")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(x, labels, fontsize=7, rotation=45, ha="right")
        ref = rs[0]["ref_mode"] if rs else "float32"
        ax.set_ylabel(f"time {ref} / time {low}")
        ax.set_title(f"{low} vs {ref}")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title or "reduced precision: gain over float32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_network_bars(net_rows: Sequence[dict], path: str, title: str = "") -> str:
    """Median forward time, dense vs sparse (per sparsity) for each precision; a panel per model/batch."""
    plt = _plt()
    panels = _ordered((r["model"], r["batch"]) for r in net_rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (model, batch) in zip(axes[0], panels):
        rs = [r for r in net_rows if r["model"] == model and r["batch"] == batch]
        modes = _ordered(r["mode"] for r in rs)
        labels = _ordered(str(r["sparsity"]) for r in rs)
        width = 0.8 / (len(labels) + 1)
        x = np.arange(len(modes))
        dense = [next((r["dense_ms"] for r in rs if r["mode"] == m), np.nan) for m in modes]
        ax.bar(x - 0.4 + width / 2, dense, width, color="#888888", label="dense (XLA)")
        cmap = plt.get_cmap("Blues")
        for k, lab in enumerate(labels):
            vals, sps = [], []
            for m in modes:
                r = next((r for r in rs if r["mode"] == m and str(r["sparsity"]) == lab), None)
                vals.append(r["sparse_ms"] if r else np.nan)
                sps.append(r.get("speedup") if r else None)
            xs = x - 0.4 + width * (k + 1.5)
            ax.bar(xs, vals, width, color=cmap(0.4 + 0.5 * k / max(1, len(labels))),
                   label=f"sparse {lab}")
            for xi, v, s in zip(xs, vals, sps):
                if s and np.isfinite(v):
                    ax.text(xi, v, f"{s:.2g}x", ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(x, modes, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("median ms per jitted forward")
        ax.set_title(f"{model}, batch {batch}")
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(title or "whole network: dense vs sparse")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- figure sets --------------------------------------------------------------------


def sweep_figures(result: dict, out: str) -> list[str]:
    """All figures of a sweep result (as written to sweep.json)."""
    rows, be, rp = result["rows"], result["break_even"], result.get("reduced_precision", [])
    env = result.get("environment", {})
    tag = f"{env.get('device', '?')}"
    paths = []
    for batch in _ordered(r["batch"] for r in rows):
        rs = [r for r in rows if r["batch"] == batch]
        paths.append(plot_speedup_vs_sparsity(
            rs, os.path.join(out, f"speedup_vs_sparsity_b{batch}.png"),
            f"speedup over XLA dense, batch {batch} ({tag})"))
        bs = [r for r in be if r["batch"] == batch]
        if bs:
            paths.append(plot_breakeven_heatmap(
                bs, os.path.join(out, f"breakeven_b{batch}.png"),
                f"break-even sparsity, batch {batch} ({tag})"))
    if rp:
        paths.append(plot_reduced_precision(rp, os.path.join(out, "reduced_precision.png"),
                                            title=f"reduced precision: gain over float32 ({tag})"))
    return paths


def network_figures(result: dict, out: str) -> list[str]:
    env = result.get("environment", {})
    tag = f"{env.get('device', '?')}"
    paths = [plot_network_bars(result["rows"], os.path.join(out, "network_bars.png"),
                               f"whole network: median forward time ({tag})")]
    rp = result.get("reduced_precision", [])
    if rp:
        for r in rp:
            r.setdefault("label", f"{r['model']} b{r['batch']}")
        paths.append(plot_reduced_precision(rp, os.path.join(out, "network_reduced_precision.png"),
                                            label_key="label",
                                            title=f"whole network: reduced precision gain ({tag})"))
    return paths


def main(argv):
    from absl import flags
    paths_in = flags.FLAGS.results
    results = []
    for path in paths_in:
        with open(path) as f:
            results.append(json.load(f))
    out = flags.FLAGS.out or os.path.dirname(os.path.abspath(paths_in[0]))
    os.makedirs(out, exist_ok=True)
    written = []
    if results[0].get("kind") == "network":
        result = results[0]
        if len(results) > 1:
            result = {**results[-1], "rows": [r for res in results for r in res["rows"]]}
            result["reduced_precision"] = reduced_precision_table(
                result["rows"], ["model", "batch", "sparsity"], "sparse_ms", "dense_ms")
            meta = {"environment": result["environment"], "config": result["config"]}
            written += [write_json(result, os.path.join(out, "network.json")),
                        write_csv(result["rows"], os.path.join(out, "network.csv"), meta)]
        written += network_figures(result, out)
    else:
        result = merge_sweeps(results) if len(results) > 1 else results[0]
        if len(results) > 1:
            meta = {"environment": result["environment"], "runs": result["runs"],
                    "peaks_tflops": result["peaks_tflops"]}
            written += [write_json(result, os.path.join(out, "sweep.json")),
                        write_csv(result["rows"], os.path.join(out, "sweep.csv"), meta),
                        write_csv(result["break_even"], os.path.join(out, "breakeven.csv"), meta)]
            if result["reduced_precision"]:
                written.append(write_csv(result["reduced_precision"],
                                         os.path.join(out, "reduced_precision.csv"), meta))
        written += sweep_figures(result, out)
    print("\n".join(written))


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_list("results", None, "sweep.json or network.json file(s); several are merged.")
    flags.DEFINE_string("out", "", "Output folder (default: the first file's folder).")
    flags.mark_flag_as_required("results")
    app.run(main)
