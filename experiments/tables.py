"""Numbers and tables of the experiment results: ratios, console tables, CSV files, merged runs."""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

import breakeven
from common import json_safe

LOW_MODES = ("bfloat16", "float16")


def ratio(a, b):
    """a / b, or None when either is missing or not positive (a chain slope lost in noise)."""
    if a is None or b is None or not np.isfinite(a) or not np.isfinite(b) or a <= 0 or b <= 0:
        return None
    return a / b


def geomean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None and v > 0 and np.isfinite(v)]
    return float(np.exp(np.mean(np.log(vals)))) if vals else None


# ---- checked chain times ---------------------------------------------------------

SIDES = ("dense", "sparse", "bcsr", "tc")
# Fields of a sweep row and the timed sides ('dense', 'sparse', 'bcsr', 'tc' = the tensor-core
# family) each rests on.
RESTS_ON = {"sparse_us": ("sparse",), "dense_us": ("dense",), "speedup": ("dense", "sparse"),
            "sparse_tflops": ("sparse",), "dense_tflops": ("dense",), "sparse_frac_peak": ("sparse",),
            "dense_frac_peak": ("dense",), "sparse_frac_f32_peak": ("sparse",), "bcsr_us": ("bcsr",),
            "speedup_vs_bcsr": ("bcsr", "sparse"), "tc_us": ("tc",), "speedup_tc": ("dense", "tc")}


def check_fields(side: str, t) -> dict:
    """A row's ``<side>_check`` ('ok', 'remeasured', 'fallback') and ``<side>_timing`` (the
    `jaxsparse.benchmark.ChainTime`'s `info`) for a chain time ``t``; {} for any other time."""
    return {f"{side}_check": t.check, f"{side}_timing": t.info()} if hasattr(t, "info") else {}


def fallback_fields(row: dict, rests_on: dict = RESTS_ON) -> set[str]:
    """The fields of ``row`` resting on a fallback time: a chain time that failed its checks
    (``<side>_check == 'fallback'``, an upper bound). A row without ``<side>_check`` (results from
    before the checks, or a time not taken by the chain method) counts as measured."""
    bad = {side for side in SIDES if row.get(f"{side}_check") == "fallback"}
    return {k for k, sides in rests_on.items() if k in row and bad.intersection(sides)}


def measured(rows: Sequence[dict], rests_on: dict = RESTS_ON) -> list[dict]:
    """``rows`` with every field resting on a fallback time set to None: what break-even,
    geomeans, reduced-precision gains and figures are computed from."""
    return [{**r, **dict.fromkeys(fallback_fields(r, rests_on))} for r in rows]


def marked(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]], rests_on: dict = RESTS_ON) -> list[dict]:
    """``rows`` for `format_table`: a value resting on a fallback time printed as ``~value``."""
    specs = {k: s for k, _, s in columns}
    return [{**r, **{k: "~" + _fmt(r[k], specs[k]) for k in fallback_fields(r, rests_on) if k in specs}}
            for r in rows]


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


# ---- CSV ----------------------------------------------------------------------------


def write_csv(rows: Sequence[dict], path: str, comment: dict | None = None) -> str:
    """Rows as CSV; ``comment`` (environment, flags) goes in leading '# key: value' lines."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields and not isinstance(r[k], (dict, list))]
    with open(path, "w", newline="") as f:
        for k, v in (comment or {}).items():
            f.write(f"# {k}: {json.dumps(json_safe(v))}\n")
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return path


def read_csv(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


# ---- reduced precision -------------------------------------------------------------


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


SWEEP_RP_KEYS = (["model", "layer", "batch", "sparsity"], "sparse_us", "dense_us")
NETWORK_RP_KEYS = (["model", "batch", "sparsity"], "sparse_ms", "dense_ms")


# ---- merging device calls ----------------------------------------------------------------


def merge_sweeps(results: Sequence[dict]) -> dict:
    """One sweep result from several runs (e.g. one device call per precision or batch):
    rows concatenated (a later run replaces an identical configuration), break-even and
    reduced-precision tables recomputed (from the `measured` rows), every run's environment
    and flags kept."""
    rows: dict = {}
    for res in results:
        for r in res["rows"]:
            rows[(r["layer"], r["batch"], r["mode"], r["sparsity"], r["pattern"])] = r
    rows_l = list(rows.values())
    peaks: dict = {}
    for res in results:
        peaks.update(res.get("peaks_tflops", {}))
    return {"kind": "sweep", "environment": results[-1]["environment"],
            "runs": [{"environment": r["environment"], "flags": r["flags"]} for r in results],
            "flags": results[-1]["flags"], "peaks_tflops": peaks, "rows": rows_l,
            "break_even": breakeven.break_even_rows(measured(rows_l)),
            "reduced_precision": reduced_precision_table(measured(rows_l), *SWEEP_RP_KEYS),
            "skipped": [s for r in results for s in r.get("skipped", [])],
            "elapsed_s": sum(r.get("elapsed_s", 0) for r in results)}


def merge_networks(results: Sequence[dict]) -> dict:
    """One network result from several runs: rows joined, reduced-precision table recomputed."""
    rows = [r for res in results for r in res["rows"]]
    return {**results[-1], "rows": rows, "reduced_precision": reduced_precision_table(rows, *NETWORK_RP_KEYS),
            "skipped": [s for r in results for s in r.get("skipped", [])]}
