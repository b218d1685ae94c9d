"""Break-even sparsity: the one definition every table, CSV and figure uses.

The break-even sparsity of a layer (at one batch size and precision) is the sparsity
above which the sparse kernel beats the dense convolution: where its speedup curve
(dense time / sparse time against sparsity) crosses 1, interpolated linearly in
log(speedup) between the two tested sparsities around the last crossing from below.
Outside the tested range it is a bound, written as a note: ``'<=0.5'`` (sparse already
pays at the lowest tested sparsity), ``'>0.98'`` (it never pays in range), ``'n/a'``
(no data).
"""

from __future__ import annotations

import math
from typing import Sequence

GROUP = ("model", "layer", "batch", "mode")


def break_even(sparsities: Sequence[float], speedups: Sequence[float | None]) -> tuple[float | None, str]:
    """``(sparsity, note)`` where the speedup crosses 1; sparsity is None outside the tested range."""
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


def break_even_rows(rows: Sequence[dict], group: Sequence[str] = GROUP, speedup: str = "speedup",
                    carry: Sequence[str] = ("basis",)) -> list[dict]:
    """Break-even sparsity per ``group`` of result rows (a sweep's: model, layer, batch, mode).

    Each output row holds the group's keys, the ``carry`` keys of its first row, ``break_even``,
    ``note`` and the tested ``sparsities``; ``speedup`` names the rows' speedup field.
    """
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in group), []).append(r)
    out = []
    for key, rs in groups.items():
        val, note = break_even([r["sparsity"] for r in rs], [r.get(speedup) for r in rs])
        out.append({**dict(zip(group, key)), **{k: rs[0].get(k) for k in carry},
                    "break_even": val, "note": note,
                    "sparsities": ",".join(f"{r['sparsity']:g}" for r in rs)})
    return out


def note_order(note: str) -> float:
    """Sort key of break-even notes: '<=0.7' just below 0.7, '>0.98' above every value, 'n/a' last."""
    if note.startswith("<="):
        return float(note[2:]) - 1e-3
    if note.startswith(">"):
        return 2.0
    return 3.0 if note == "n/a" else float(note)
