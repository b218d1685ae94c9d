r"""Figures of the experiment results, and the command that redraws them from result files.

Redraws the figures of a run, or merges the runs of several device calls into one result
(rows joined, break-even and reduced-precision tables recomputed) and draws that:

    python3 experiments/plots.py --results=results_tmp/sweep_gpu/sweep.json
    python3 experiments/plots.py --results=a/sweep.json,b/sweep.json --out=results_tmp/merged

Every figure is laid out for a page about 1000 px wide: a grid of panels, lines told apart
by colour and marker, the legend outside the data.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

import common
import layers as L
import tables as T

DPI = 100
PAGE_IN = 10.0  # figure width in inches: 1000 px at DPI
FAMILY_MARKERS = {"vgg16": "o", "resnet50_1x1": "s", "cnn_non_static": "^"}
SPARSE_FASTER = "sparse faster above the dotted line"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _ordered(values):
    return list(dict.fromkeys(values))


def _modes(rows, key: str = "mode") -> list[str]:
    """The rows' precision modes (field ``key``) in the catalogue's order."""
    known = list(L.MODES)
    return sorted(_ordered(r[key] for r in rows), key=lambda m: known.index(m) if m in known else len(known))


_CATALOGUE = [l.name for family in L.ALL_LAYERS.values() for l in family]


def _catalogue_order(name: str) -> int:
    """Position of a layer in the catalogue (VGG-16 conv1_1 first), unknown names last."""
    return _CATALOGUE.index(name) if name in _CATALOGUE else len(_CATALOGUE)


def _title(mode: str) -> str:
    """A panel title: the mode and the precision of XLA's dense side (DEFAULT is TF32 on a GPU)."""
    return f"{mode}: dense at Precision.{L.MODES[mode][1]}" if mode in L.MODES else mode


def _log_axis(ax, axis: str = "y"):
    """Log scale with plain-number ticks at 1, 2, 5 x 10^k (0.1, 0.2, 0.5, 1, 2, 5, ...)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    getattr(ax, f"set_{axis}scale")("log")
    a = ax.yaxis if axis == "y" else ax.xaxis
    a.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(NullFormatter())


def _grid(plt, n: int, ncols: int, panel_h: float, extra_h: float, **kw):
    """A figure of ``n`` panels in rows of ``ncols`` (unused cells hidden), page wide."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PAGE_IN if ncols > 1 else 6.5, panel_h * nrows + extra_h),
                             squeeze=False, layout="constrained", **kw)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, plt, path: str) -> str:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _handles(axes) -> tuple[list, list]:
    """Legend handles and labels of all ``axes``, each label once."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    return handles, labels


def _legend_below(fig, axes, ncol: int):
    handles, labels = _handles(axes)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(ncol, max(1, len(labels))), fontsize=8,
               frameon=False)


# ---- sweep figures -------------------------------------------------------------------


def _layer_styles(rows) -> dict:
    """Per layer: a colour (distinct within its model), its model's marker, a dashed line where the
    layer is compared on kernel or call time instead of the chain method."""
    import matplotlib
    colours = matplotlib.colormaps["tab10"].colors
    styles, seen = {}, {}
    for r in sorted(rows, key=lambda r: _catalogue_order(r["layer"])):
        if r["layer"] in styles:
            continue
        i = seen[r["model"]] = seen.get(r["model"], -1) + 1
        basis = r.get("basis", "chain")
        styles[r["layer"]] = dict(
            color=colours[i % 10], marker=FAMILY_MARKERS.get(r["model"], "D"),
            fillstyle="full" if i < 10 else "none", ls="-" if basis == "chain" else "--",
            label=r["layer"] + ("" if basis == "chain" else f" ({basis} time)"))
    return styles


def plot_speedup_vs_sparsity(rows: Sequence[dict], path: str, title: str = "") -> str:
    """Speedup (dense / sparse) against sparsity: a panel per precision, a line per layer."""
    plt = _plt()
    modes = _modes(rows)
    styles = _layer_styles(rows)
    legend_rows = math.ceil(len(styles) / 4)
    fig, axes = _grid(plt, len(modes), 2, 3.2, 0.6 + 0.2 * legend_rows, sharex=True, sharey=True)
    for ax, mode in zip(axes, modes):
        for layer, st in styles.items():
            pts = sorted((r["sparsity"], r["speedup"]) for r in rows
                         if r["mode"] == mode and r["layer"] == layer and r.get("speedup"))
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, lw=1.3, ms=5, **st)
        ax.axhline(1.0, color="k", lw=1.0, ls=":")
        _log_axis(ax)
        ax.set_title(_title(mode), fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("sparsity (fraction of zero weights)")
        ax.set_ylabel("speedup over XLA dense (x)")
        ax.label_outer()
    axes[0].text(0.02, 0.97, SPARSE_FASTER, transform=axes[0].transAxes, va="top", fontsize=8, color="0.3")
    _legend_below(fig, axes, 4)
    fig.suptitle(title or "sparse speedup vs sparsity")
    return _save(fig, plt, path)


def plot_breakeven_heatmap(be_rows: Sequence[dict], path: str, title: str = "") -> str:
    """Break-even sparsity, layer x precision. A bound '<=x' is coloured as x; '>x' is grey."""
    plt = _plt()
    layers = sorted(_ordered(r["layer"] for r in be_rows), key=_catalogue_order)
    modes = _modes(be_rows)
    grid = np.full((len(layers), len(modes)), np.nan)
    notes = [["" for _ in modes] for _ in layers]
    for r in be_rows:
        i, j = layers.index(r["layer"]), modes.index(r["mode"])
        note = r.get("note", "")
        value = r.get("break_even")
        grid[i, j] = value if value is not None else float(note[2:]) if note.startswith("<=") else np.nan
        notes[i][j] = note.replace("<=", "≤")
    fig, ax = plt.subplots(figsize=(min(PAGE_IN, 1.6 * len(modes) + 3.6), 0.34 * len(layers) + 1.9),
                           layout="constrained")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis_r", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_facecolor("#dddddd")
    ax.set_xticks(range(len(modes)), modes)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    for i in range(len(layers)):
        for j in range(len(modes)):
            dark = np.isfinite(grid[i, j]) and grid[i, j] > 0.5
            ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=8, color="w" if dark else "k")
    fig.colorbar(im, ax=ax, label="break-even sparsity")
    ax.set_xlabel("sparse is faster above the break-even sparsity; ≤x: already at the lowest tested\n"
                  "sparsity x; >x (grey): never faster up to x", fontsize=8)
    ax.set_title(title or "break-even sparsity", fontsize=10)
    return _save(fig, plt, path)


def plot_reduced_precision(rp_rows: Sequence[dict], path: str, name_key: str = "layer", title: str = "") -> str:
    """Gain of bfloat16/float16 over float32, dense vs sparse, a bar pair per (layer or network, batch).

    Dense is measured once per configuration; the sparse bar is the geometric mean over the
    tested sparsities, its whisker their range."""
    plt = _plt()
    lows = _modes(rp_rows, "low_mode")
    groups = sorted(_ordered((r[name_key], r["batch"]) for r in rp_rows),
                    key=lambda g: (_catalogue_order(g[0]), g))
    fig, axes = _grid(plt, len(lows), 2, 0.24 * len(groups) + 0.9, 0.5, sharey=True)
    y = np.arange(len(groups))
    for ax, low in zip(axes, lows):
        dense, sparse, lo, hi = [], [], [], []
        for g in groups:
            rs = [r for r in rp_rows if r["low_mode"] == low and (r[name_key], r["batch"]) == g]
            sg = [r["sparse_gain"] for r in rs if r.get("sparse_gain")]
            dense.append(T.geomean(r["dense_gain"] for r in rs) or np.nan)
            sparse.append(T.geomean(sg) or np.nan)
            # the whisker spans the sparsities' range (max(0, ...): the geomean of one value may
            # differ from it in the last bit)
            lo.append(max(0.0, sparse[-1] - min(sg)) if sg else 0.0)
            hi.append(max(0.0, max(sg) - sparse[-1]) if sg else 0.0)
        ax.barh(y - 0.2, dense, 0.4, color="#888888", label="dense (XLA)")
        ax.barh(y + 0.2, sparse, 0.4, xerr=[lo, hi], color="#1f77b4", error_kw=dict(lw=0.8, capsize=2),
                label="sparse (jaxsparse): geometric mean over sparsities, whisker = their range")
        ax.axvline(1.0, color="k", lw=1.0, ls=":")
        ax.set_yticks(y, [f"{name}, batch {b}" for name, b in groups], fontsize=8)
        ax.set_ylim(len(groups) - 0.5, -0.5)  # the first group on top
        refs = _ordered(r["ref_mode"] for r in rp_rows if r["low_mode"] == low)
        ax.set_title(f"{low} vs {' / '.join(refs)}", fontsize=10)
        ax.set_xlabel(f"time at float32 / time at {low}  (> 1: {low} faster)")
        ax.grid(True, axis="x", alpha=0.3)
    _legend_below(fig, axes, 2)
    fig.suptitle(title or "reduced precision: gain over float32")
    return _save(fig, plt, path)


# ---- network figure ----------------------------------------------------------------------


def _sparsity_labels(rows) -> list[str]:
    labels = _ordered(str(r["sparsity"]) for r in rows)
    return sorted(labels, key=lambda s: (not s.replace(".", "").isdigit(), s))


def _sparsity_legend(label: str) -> str:
    if label == "han":
        return "Han et al. 2015 per-layer sparsity (VGG-16)"
    return f"{float(label):.0%} sparse"


def plot_network_bars(net_rows: Sequence[dict], path: str, title: str = "") -> str:
    """Whole-network speedup (dense / sparse forward time) per precision and sparsity; a panel per
    network (rows) and batch size (columns)."""
    plt = _plt()
    models = _ordered(r["model"] for r in net_rows)
    batches = sorted({r["batch"] for r in net_rows})
    labels = _sparsity_labels(net_rows)
    blues = plt.get_cmap("Blues")
    numeric = [s for s in labels if s != "han"]
    colours = {s: blues(0.35 + 0.6 * k / max(1, len(numeric) - 1)) for k, s in enumerate(numeric)}
    colours["han"] = "#ff7f0e"
    hatches = dict(zip(labels, ["", "//", "..", "xx", "\\\\", "++"]))
    fig, axes = plt.subplots(len(models), len(batches), figsize=(PAGE_IN, 2.6 * len(models) + 1.0),
                             squeeze=False, layout="constrained", sharey=True)
    for i, model in enumerate(models):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            rs = [r for r in net_rows if r["model"] == model and r["batch"] == batch]
            if not rs:
                ax.set_visible(False)
                continue
            modes = _modes(rs)
            width = 0.8 / len(labels)
            for k, lab in enumerate(labels):
                vals = [next((r.get("speedup") or np.nan for r in rs
                              if r["mode"] == m and str(r["sparsity"]) == lab), np.nan) for m in modes]
                if not np.all(np.isnan(vals)):
                    ax.bar(np.arange(len(modes)) - 0.4 + width * (k + 0.5), vals, width, color=colours[lab],
                           hatch=hatches[lab], edgecolor="white", lw=0.5, label=_sparsity_legend(lab))
            ax.axhline(1.0, color="k", lw=1.0, ls=":")
            _log_axis(ax)
            ax.set_xticks(range(len(modes)), modes, fontsize=8)
            ax.set_title(f"{model}, batch {batch}", fontsize=10)
            ax.set_ylabel("speedup over XLA dense (x)" if j == 0 else "")
            ax.grid(True, axis="y", alpha=0.3)
    visible = [ax for ax in axes.flat if ax.get_visible()]
    visible[0].text(0.02, 0.97, SPARSE_FASTER, transform=visible[0].transAxes, va="top", fontsize=8, color="0.3")
    free = [ax for ax in axes.flat if not ax.get_visible()]
    if free:  # the legend goes into the first empty cell of the grid
        free[0].set_visible(True)
        free[0].axis("off")
        free[0].legend(*_handles(visible), loc="center", fontsize=9, frameon=False,
                       title="dense (XLA) = 1 (dotted line);\nfloat32: XLA's default precision\n(TF32 on a GPU)",
                       title_fontsize=9)
    else:
        _legend_below(fig, visible, 4)
    fig.suptitle(title or "whole network under one jit: speedup over dense")
    return _save(fig, plt, path)


# ---- figure sets --------------------------------------------------------------------


def sweep_figures(result: dict, out: str) -> list[str]:
    """All figures of a sweep result (as written to sweep.json); speedups resting on a fallback
    time (`tables.measured`) are left out, their number given in the title."""
    rows, be, rp = T.measured(result["rows"]), result["break_even"], result.get("reduced_precision", [])
    tag = result.get("environment", {}).get("device", "?")
    paths = []
    for batch in _ordered(r["batch"] for r in rows):
        rs = [r for r in rows if r["batch"] == batch]
        left_out = sum(bool(T.fallback_fields(r)) for r in result["rows"] if r["batch"] == batch)
        paths.append(plot_speedup_vs_sparsity(
            rs, os.path.join(out, f"speedup_vs_sparsity_b{batch}.png"),
            f"sparse speedup over XLA dense vs sparsity, batch {batch} ({tag})"
            + (f"\n{left_out} points on a fallback time left out" if left_out else "")))
        bs = [r for r in be if r["batch"] == batch]
        if bs:
            paths.append(plot_breakeven_heatmap(
                bs, os.path.join(out, f"breakeven_b{batch}.png"), f"break-even sparsity, batch {batch} ({tag})"))
    if rp:
        paths.append(plot_reduced_precision(rp, os.path.join(out, "reduced_precision.png"),
                                            title=f"layers: reduced precision gain over float32 ({tag})"))
    return paths


def network_figures(result: dict, out: str) -> list[str]:
    tag = result.get("environment", {}).get("device", "?")
    paths = [plot_network_bars(result["rows"], os.path.join(out, "network_bars.png"),
                               f"whole network under one jit: speedup over XLA dense ({tag})")]
    rp = result.get("reduced_precision", [])
    if rp:
        paths.append(plot_reduced_precision(rp, os.path.join(out, "network_reduced_precision.png"),
                                            name_key="model",
                                            title=f"whole network: reduced precision gain over float32 ({tag})"))
    return paths


def redraw(paths_in: Sequence[str], out: str) -> list[str]:
    """Figures (and, for several inputs, the merged result files) of saved results into ``out``."""
    results = [common.read_result(p) for p in paths_in]
    os.makedirs(out, exist_ok=True)
    written = []
    if results[0].get("kind") == "network":
        result = T.merge_networks(results) if len(results) > 1 else results[0]
        if len(results) > 1:
            meta = {"environment": result["environment"], "flags": result["flags"]}
            written += [common.write_result(result, os.path.join(out, "network.json")),
                        T.write_csv(result["rows"], os.path.join(out, "network.csv"), meta)]
        return written + network_figures(result, out)
    result = T.merge_sweeps(results) if len(results) > 1 else results[0]
    if len(results) > 1:
        meta = {"environment": result["environment"], "runs": result["runs"], "peaks_tflops": result["peaks_tflops"]}
        written += [common.write_result(result, os.path.join(out, "sweep.json")),
                    T.write_csv(result["rows"], os.path.join(out, "sweep.csv"), meta),
                    T.write_csv(result["break_even"], os.path.join(out, "breakeven.csv"), meta)]
        if result["reduced_precision"]:
            written.append(T.write_csv(result["reduced_precision"], os.path.join(out, "reduced_precision.csv"), meta))
    return written + sweep_figures(result, out)


def main(argv):
    from absl import app, flags
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    paths_in = flags.FLAGS.results
    print("\n".join(redraw(paths_in, flags.FLAGS.out or os.path.dirname(os.path.abspath(paths_in[0])))))


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_list("results", None, "sweep.json or network.json file(s) (several are merged).")
    common.define_flags("out", helps={"out": "Output folder (default: the folder of the first --results file)."})
    flags.mark_flag_as_required("results")
    app.run(main)
