"""The experiment scripts (experiments/*.py) on tiny configurations: tables, files, figures."""

import csv
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from experiment_scripts import load, run
from jaxsparse import benchmark as B

BE = load("breakeven")
C = load("common")
L = load("layers")
P = load("plots")
T = load("tables")
network = load("network")
sweep = load("sweep")

FLAGS = flags.FLAGS
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read_csv(path):
    with open(path) as f:
        lines = f.read().splitlines()
    comments = [l for l in lines if l.startswith("#")]
    rows = list(csv.DictReader([l for l in lines if not l.startswith("#")]))
    return comments, rows


def _is_png(path, max_width=1000):
    """A PNG of some content that fits a page about 1000 px wide."""
    with open(path, "rb") as f:
        head = f.read(24)
    width = int.from_bytes(head[16:20], "big")  # IHDR: width, then height
    return head[:8] == PNG_MAGIC and os.path.getsize(path) > 1000 and width <= max_width


# ---- definitions ---------------------------------------------------------------


def test_layer_definitions():
    assert len(L.VGG16) == 13 and len(L.CNN_NON_STATIC) == 3
    conv3_2 = next(l for l in L.VGG16 if l.name == "vgg.conv3_2")
    assert (conv3_2.cin, conv3_2.cout, conv3_2.in_hw, conv3_2.chain_kind) == (256, 256, (56, 56), "single")
    conv4_1 = next(l for l in L.VGG16 if l.name == "vgg.conv4_1")
    assert conv4_1.chain_kind == "pair" and conv4_1.mirror.cin == 512 and conv4_1.mirror.cout == 256
    assert conv4_1.dense_flops(1) == 2 * 9 * 256 * 512 * 28 * 28
    kim = L.CNN_NON_STATIC[2]
    assert kim.kernel == (1, 5) and kim.out_hw == (1, 52) and kim.chain_kind == "none"
    assert kim.scaled(4) is kim  # sentence length is not downscaled
    proj = next(l for l in L.RESNET50_1X1 if l.name == "r50.g3.shortcut")
    assert (proj.cin, proj.cout, proj.stride, proj.out_hw, proj.chain_kind) == (512, 1024, 2, (14, 14), "none")
    assert proj.dlmc == "bottleneck_projection_block_group_projection_block_group3"
    assert all(l.dlmc for l in L.RESNET50_1X1)
    assert L.han_sparsity("vgg.conv3_2") == pytest.approx(0.76)
    assert set(L.HAN2015_VGG16_DENSITY) == {l.name.split(".")[1] for l in L.VGG16}
    assert [l.name for l in L.select(["cnn_non_static"], "quick")] == ["kim.w3"]
    assert len(L.select("all")) == 13 + 12 + 3
    with pytest.raises(ValueError):
        L.select(["vgg16"], ["vgg.conv9_9"])
    with pytest.raises(ValueError):
        L.check_modes(["float64"])


def test_dlmc_shapes_match_layers(dlmc_root):
    for layer in L.RESNET50_1X1:
        for lay in (layer, layer.mirror) if layer.mirror else (layer,):
            if lay.dlmc:
                filt, used = L.make_filter(lay, 0.9, "dlmc")
                assert used == "dlmc" and (filt.in_channels, filt.out_channels) == (lay.cin, lay.cout)
    for layer, _ in network.resnet50_1x1_net(1.0).convs:  # every conv of the network has its own pattern
        filt, used = L.make_filter(layer, 0.8, "dlmc")
        assert used == "dlmc", layer


def test_make_filter_unit_gain_and_fallback():
    layer = L.VGG16[10].scaled(4)
    filt, used = L.make_filter(layer, 0.9, "dlmc")  # VGG has no DLMC pattern: magnitude
    assert used == "magnitude (no dlmc)" and abs(filt.sparsity - 0.9) < 1e-3
    dense = np.asarray(L.to_dense(filt)).reshape(-1, layer.cout)
    small = L.make_filter(L.VGG16[0].scaled(8), 0.5)[0]
    np.testing.assert_array_equal(np.asarray(L.to_dense(small)), np.asarray(small.todense()))
    np.testing.assert_allclose((dense ** 2).sum(0), L.border_gain(layer) ** 2, rtol=1e-4)
    filt_u, used = L.make_filter(layer, 0.9, "uniform")
    assert used == "uniform" and len(set(np.diff(np.asarray(filt_u.indptr)))) == 1
    wd, ws = L.weight_bytes(layer, filt.nnz, 2)
    assert wd == 9 * 512 * 512 * 2 and ws == filt.nnz * 6 + (512 + 1) * 4


def test_chain_stays_finite_in_float16():
    """A 40-op chain (20 pairs) of unit-gain float16 sparse convolutions neither overflows nor dies."""
    layer = L.VGG16[7].scaled(8)  # conv4_1, paired with its mirror
    f, _ = L.make_filter(layer, 0.95)
    fm, _ = L.make_filter(layer.mirror, 0.95, seed=1)
    f, fm = f.astype(jnp.float16), fm.astype(jnp.float16)
    x = B.random_input(layer.input_shape(1), jnp.float16)
    run = B.chain([lambda s: (L.sparse_conv(s[0], s[1], layer), s[1], s[2]),
                   lambda s: (L.sparse_conv(s[0], s[2], layer), s[1], s[2])], 20)
    y = np.asarray(run((x, f, fm))[0], np.float32)
    rms = float(np.sqrt(np.mean(y ** 2)))
    assert np.all(np.isfinite(y)) and 1e-2 < rms < 1e2, rms


def test_break_even():
    s = [0.5, 0.7, 0.9, 0.95]
    val, note = BE.break_even(s, [0.3, 0.6, 1.5, 3.0])
    assert 0.7 < val < 0.9 and note == f"{val:.3f}"
    # log-linear interpolation: exactly halfway in log space
    assert BE.break_even([0.8, 0.9], [0.5, 2.0])[0] == pytest.approx(0.85)
    assert BE.break_even(s, [1.2, 2, 3, 4]) == (None, "<=0.5")
    assert BE.break_even(s, [0.1, 0.2, 0.5, 0.9]) == (None, ">0.95")
    assert BE.break_even(s, [None] * 4) == (None, "n/a")
    notes = ["0.812", ">0.98", "<=0.8", "0.8", "n/a"]
    assert sorted(notes, key=BE.note_order) == ["<=0.8", "0.8", "0.812", ">0.98", "n/a"]
    assert T.ratio(-1.0, 2.0) is None and T.ratio(1.0, 0.0) is None and T.ratio(3.0, 2.0) == 1.5


def test_break_even_rows_group_and_carry():
    rows = [{"model": "m", "layer": "a", "batch": 1, "mode": "float32", "sparsity": s, "speedup": v,
             "basis": "chain", "speedup_kernel": k}
            for s, v, k in ((0.8, 0.5, 2.0), (0.9, 2.0, 3.0))]
    (row,) = BE.break_even_rows(rows)
    assert row["break_even"] == pytest.approx(0.85) and row["basis"] == "chain" and row["sparsities"] == "0.8,0.9"
    (row,) = BE.break_even_rows(rows, group=("layer",), speedup="speedup_kernel", carry=())
    assert row["note"] == "<=0.8" and "basis" not in row


def test_reduced_precision_figure_with_one_sparsity(tmp_path):
    """One sparsity per bar: its geometric mean may exceed the value in the last bit (no negative whisker)."""
    gain = next(v for v in np.random.default_rng(0).uniform(0.1, 3.0, 10000) if T.geomean([v]) > v)
    rows = [{"layer": "vgg.conv3_2", "batch": 1, "sparsity": 0.9, "low_mode": low, "ref_mode": "float32",
             "dense_gain": 1.5, "sparse_gain": gain} for low in ("bfloat16", "float16")]
    assert _is_png(P.plot_reduced_precision(rows, str(tmp_path / "rp.png")))


def test_require_cuda_is_respected(monkeypatch):
    if B.gpu_present():
        pytest.skip("checks the no-GPU path")
    monkeypatch.setenv("JAXSPARSE_REQUIRE_CUDA", "1")
    with pytest.raises(RuntimeError, match="JAXSPARSE_REQUIRE_CUDA"):
        C.check_backend()


# ---- the scripts ------------------------------------------------------------------


ENVELOPE = {"kind", "environment", "flags", "elapsed_s", "skipped", "rows"}
CHECKS = ("ok", "remeasured", "fallback")


def test_sweep_tiny(tmp_path, parse_flags, capsys):
    out = tmp_path / "sweep"
    parse_flags(["--model=vgg16,resnet50_1x1,cnn_non_static",
                 "--layers=vgg.conv5_1,vgg.conv4_1,r50.g4.reduce,r50.g4.shortcut,kim.w3",
                 "--sparsity=0.8,0.95", "--modes=float32,bfloat16", "--batch=1", "--cnn_batch=",
                 "--scale=8", "--repeats=2", "--k_small=1", "--k_large=3", "--peak_n=128", "--pattern=uniform",
                 f"--out={out}", "--noprogress"])
    cfg = sweep.config_from_flags()
    assert cfg.modes == ["float32", "bfloat16"] and cfg.sparsity == [0.8, 0.95] and cfg.cnn_batch == []
    sweep.main(["sweep"])
    printed = capsys.readouterr().out
    assert "sparse µs" in printed and "vgg.conv5_1" in printed and "break-even" in printed
    assert "reduced precision" in printed
    assert all(f"{column} =" in printed for column in ("per", "basis", "sp %peak"))  # the columns explained

    result = json.loads((out / "sweep.json").read_text())
    assert ENVELOPE <= set(result) and result["kind"] == "sweep"
    assert result["environment"]["platform"] and result["environment"]["jax"] and result["environment"]["date"]
    assert result["flags"]["layers"][0] == "vgg.conv5_1" and result["flags"]["scale"] == 8
    assert set(result["peaks_tflops"]) == {"float32", "bfloat16", "float32_highest"}
    rows = result["rows"]
    assert len(rows) == 5 * 2 * 2
    by = {(r["layer"], r["mode"], r["sparsity"]): r for r in rows}
    r = by[("vgg.conv4_1", "float32", 0.95)]
    assert r["unit"] == "pair" and r["basis"] == "chain" and r["nnz_mirror"] > 0
    assert r["weight_bytes_sparse"] < r["weight_bytes_dense"]
    assert by[("r50.g4.shortcut", "float32", 0.8)]["unit"] == "call"
    assert by[("kim.w3", "bfloat16", 0.8)]["basis"] in ("call", "kernel")
    assert by[("r50.g4.reduce", "float32", 0.8)]["bcsr_us"] is not None
    assert "bcsr_us" not in by[("r50.g4.reduce", "bfloat16", 0.8)]
    # The tensor-core family on every layer (any geometry) at both modes that allow it (TF32,
    # bf16), with its own break-even per (layer, mode).
    pairs = {(r["layer"], r["mode"]) for r in rows}
    for layer, mode in pairs:
        tc_row = by[(layer, mode, 0.95)]
        assert tc_row["tc_us"] > 0 and tc_row["speedup_tc"] is not None
        if tc_row["unit"] != "call":  # chain times carry their check; a call time is compared as is
            assert tc_row["speedup_tc"] == pytest.approx(T.ratio(tc_row["dense_us"], tc_row["tc_us"]))
            assert tc_row["tc_check"] in CHECKS
    tc_break_even = {(r["layer"], r["mode"]) for r in result["break_even_tc"]}
    assert tc_break_even and tc_break_even <= pairs  # fallback times are left out of break-even
    assert "tensor-core family" in printed
    assert len(_read_csv(out / "breakeven_tc.csv")[1]) == len(result["break_even_tc"])
    assert all(np.isfinite(r["sparse_us"]) and np.isfinite(r["dense_us"]) for r in rows)
    assert all(r["sparse_kernel_us"] is None for r in rows) or B.gpu_present()
    # The two float32-exact sparse measurements are shared, the dense ones are not.
    assert result["break_even"] == BE.break_even_rows(T.measured(rows)) and len(result["break_even"]) == 5 * 2
    # Every chain time is checked (against the measured peak too) and the row says how it went.
    chained = [r for r in rows if r["unit"] != "call"]
    assert all(r["dense_check"] in CHECKS and r["sparse_check"] in CHECKS for r in chained)
    assert all(r["dense_timing"]["bounds_us"][0] > 0 for r in chained)  # the peak check was on
    assert all("dense_check" not in r for r in rows if r["unit"] == "call")
    assert {r["low_mode"] for r in result["reduced_precision"]} == {"bfloat16"}

    comments, csv_rows = _read_csv(out / "sweep.csv")
    assert any(c.startswith("# environment:") for c in comments) and any("# flags:" in c for c in comments)
    assert len(csv_rows) == len(rows) and float(csv_rows[0]["sparse_us"]) > 0
    assert len(_read_csv(out / "breakeven.csv")[1]) == 10
    assert len(_read_csv(out / "reduced_precision.csv")[1]) == 5 * 2
    for name in ("speedup_vs_sparsity_b1.png", "breakeven_b1.png", "reduced_precision.png"):
        assert _is_png(out / name), name
    assert not (out / "sweep.partial.json").exists()  # the checkpoint goes when the run completes
    # figures can be redrawn from the JSON alone
    for p in P.sweep_figures(result, str(tmp_path)):
        assert _is_png(p)


def test_network_tiny(tmp_path, parse_flags, capsys):
    out = tmp_path / "network"
    parse_flags(["--model=all", "--sparsity=0.9", "--modes=float32,float16", "--batch=1",
                 "--cnn_batch=2", "--scale=16", "--repeats=2", "--pattern=uniform", f"--out={out}",
                 "--noprogress"])
    network.main(["network"])
    assert "han" in capsys.readouterr().out
    result = json.loads((out / "network.json").read_text())
    assert ENVELOPE <= set(result) and result["kind"] == "network" and result["flags"]["han"]
    rows = result["rows"]
    # vgg16: 0.9 + han; cnn: batches 1 and 2; resnet: one; each at two precisions
    assert len(rows) == (2 + 2 + 1) * 2
    for r in rows:
        assert r["finite"] and r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["out_rms"] > 0
        # float32 against a dense side that may use TF32 (the default precision on a GPU): 1e-2
        exact_dense = r["dense_precision"] == "HIGHEST" or jax.default_backend() == "cpu"
        tol = 3e-2 if r["dtype"] != "float32" else 1e-4 if exact_dense else 1e-2
        assert r["max_rel_err"] < tol, r
        assert r["weight_bytes_sparse"] < r["weight_bytes_dense"]
    han = next(r for r in rows if r["sparsity"] == "han")
    profile = result["sparsity_profiles"]["vgg16"]["han"]
    assert math.isclose(profile[0]["sparsity"], 0.42, abs_tol=0.02) and len(profile) == 13
    assert 0.6 < han["overall_sparsity"] < 0.75
    r50 = next(r for r in rows if r["model"] == "resnet50_1x1")
    assert r50["convs"] == 16 * 2 + 4
    assert len(result["reduced_precision"]) == 5
    assert len(_read_csv(out / "network.csv")[1]) == len(rows)
    for name in ("network_bars.png", "network_reduced_precision.png"):
        assert _is_png(out / name), name


def test_budget_checkpoint_and_summary(tmp_path):
    """--budget_s skips (and lists) layers; a checkpoint is written per layer and removed with the
    final files; summarize.py reads the JSON."""
    cfg = sweep.SweepConfig(model=["vgg16"], layers=["vgg.conv5_1", "vgg.conv4_1"], sparsity=[0.9, 0.95],
                            modes=["float32_highest", "float32"], batch=[1], cnn_batch=[], scale=8, repeats=2,
                            k_small=1, k_large=3, peak_n=128, out=str(tmp_path / "s"), progress=False,
                            budget_s=1e-9)
    skipped = sweep.run_sweep(cfg)
    assert skipped["rows"] == [] and skipped["skipped"] == ["vgg.conv5_1 b1", "vgg.conv4_1 b1"]

    cfg.budget_s = 0.0
    result = sweep.run_sweep(cfg)
    assert result["skipped"] == [] and len(result["rows"]) == 2 * 2 * 2
    partial = tmp_path / "s" / "sweep.partial.json"
    assert len(json.loads(partial.read_text())["rows"]) == len(result["rows"])  # the last checkpoint holds all
    sweep.write_outputs(result, cfg.out)
    assert not partial.exists() and (tmp_path / "s" / "sweep.json").is_file()

    # tc_bench.py rows: the tensor-core table's geomean over layers, VGG-16 conv1_2 left out at batch
    # 32 (not among issue 14's target layers there).
    tc_rows = [dict(layer=name, sparsity=0.95, batch=32, dtype="bfloat16", design="chunked", window=128,
                    tile_pixels=None, tc_us=2 * kern, tc_kernel_us=kern, dense_us=10.0)
               for name, kern in [("vgg.conv2_2", 20.0), ("vgg.conv3_2", 5.0), ("vgg.conv1_2", 1.0)]]
    (tmp_path / "tc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tc_rows))
    done = run("summarize", f"--sweep={tmp_path / 's' / 'sweep.json'}", f"--tc={tmp_path / 'tc.jsonl'}",
               f"--tc_sweep={tmp_path / 's' / 'sweep.json'}", f"--out={tmp_path}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "## Targets of the CUDA-kernel issue" in text and "## Break-even sparsity, batch 1" in text
    assert "| tc.jsonl | chunked:128:auto | VGG-16 3x3 | bfloat16 | 32 | 0.95 | 2 | 1.00 | 0.50-2.00 | 0.50 |" in text
    # The sweep's tensor-core rows (TF32 at the float32 mode): one line per layer with each sparsity.
    tc = [r for r in result["rows"] if r.get("speedup_tc") is not None and r["layer"] == "vgg.conv5_1"]
    assert tc, "the sweep times the tensor-core family at float32 (TF32)"
    cells = ", ".join(f"{r['sparsity']:g}: {r['speedup_tc']:.2f}" for r in sorted(tc, key=lambda r: r["sparsity"]))
    assert f"| sweep.json | vgg.conv5_1 | 1 | TF32 | {cells} |" in text
    # The geomean row comes from the JSON. On a busy CPU a tiny layer's chain slope can be lost
    # in noise (speedup None); the geomean skips it and the count still names both layers.
    speedups = [r["speedup"] for r in T.measured(result["rows"])
                if r["sparsity"] == 0.9 and r["mode"] == "float32_highest" and r["speedup"]]
    assert "| 1 | 0.9 | " in text
    if speedups:
        gm = math.exp(np.mean([math.log(v) for v in speedups]))
        assert f"| 1 | 0.9 | {gm:.2f} (2) |" in text


def test_fallback_times_are_recorded_marked_and_left_out(tmp_path, monkeypatch, capsys):
    """A chain time that failed its checks: the row records it, the table marks it '~', break-even,
    gains, geomean and figures leave it out; rows from before the checks count as measured."""
    # r50.g4.reduce (a pair, 1x1): dense, sparse at 0.5, 0.8, 0.95, then BCSR at the same three
    times = iter([(100.0, "ok"), (200.0, "remeasured"), (100 / 0.9, "fallback"), (50.0, "ok"),
                  (300.0, "fallback"), (300.0, "ok"), (300.0, "ok")])
    calls = []

    def fake_chain_time_us(steps, x, *, flops, peak_tflops, **kwargs):
        us, check = next(times)
        calls.append((flops, peak_tflops))
        return B.ChainTime(us, check=check, reason="" if check == "ok" else "attempt 1: test")

    monkeypatch.setattr(B, "chain_time_us", fake_chain_time_us)
    monkeypatch.setattr(sweep, "measure_peaks", lambda modes, n: {"float32": 3.0, "float32_highest": 1.0})
    cfg = sweep.SweepConfig(model=["resnet50_1x1"], layers=["r50.g4.reduce"], sparsity=[0.5, 0.8, 0.95],
                            modes=["float32"], batch=[1], cnn_batch=[], scale=8, repeats=1, k_small=1, k_large=3,
                            pattern="uniform", out=str(tmp_path), progress=False, tensor_cores=False)
    result = sweep.run_sweep(cfg)
    by = {r["sparsity"]: r for r in result["rows"]}
    layer = L.select(["resnet50_1x1"], ["r50.g4.reduce"])[0].scaled(8)
    # the peak check: dense FLOP of the pair at its mode's peak; sparse and BCSR useful FLOP at the
    # largest peak of the float32 modes
    useful = 2.0 * (by[0.5]["nnz"] + by[0.5]["nnz_mirror"]) * layer.out_pixels
    assert calls[0] == (pytest.approx(sweep.step_flops(layer, 1)), 3.0) and calls[1] == (useful, 3.0)
    assert calls[4] == (useful, 3.0)
    assert by[0.8]["sparse_check"] == "fallback" and by[0.8]["sparse_timing"]["reason"] == "attempt 1: test"
    assert by[0.5]["sparse_check"] == "remeasured" and by[0.5]["dense_check"] == "ok"
    assert by[0.5]["bcsr_check"] == "fallback" and by[0.8]["bcsr_check"] == "ok"
    assert by[0.8]["speedup"] == pytest.approx(0.9)  # the row keeps the estimate, flagged
    assert T.fallback_fields(by[0.8]) == {"sparse_us", "speedup", "sparse_tflops", "sparse_frac_peak",
                                          "sparse_frac_f32_peak", "speedup_vs_bcsr"}
    assert T.fallback_fields(by[0.5]) == {"bcsr_us", "speedup_vs_bcsr"}
    # break-even from 0.5 (x0.5) and 0.95 (x2) only: 0.5 + 0.45 * log 2 / log 4
    (be,) = result["break_even"]
    assert be["break_even"] == pytest.approx(0.725)

    text = sweep.report(result)
    assert "~0.90" in text and "~111.1" in text and " 0.50 " in text and "~1.50" in text  # 0.5: BCSR marked
    assert "geometric-mean speedup over all measured rows: 1.00x" in text and "2 rows rest on a fallback" in text
    paths = sweep.write_outputs(result, str(tmp_path))
    _, csv_rows = _read_csv(tmp_path / "sweep.csv")
    assert [r["sparse_check"] for r in csv_rows] == ["remeasured", "fallback", "ok"]
    assert all(_is_png(p) for p in paths if p.endswith(".png"))

    # A result from before the checks (no *_check keys): every time counts as measured.
    old = {**result, "rows": [{k: v for k, v in r.items() if not k.endswith(("_check", "_timing"))}
                              for r in result["rows"]]}
    merged = T.merge_sweeps([old])
    assert T.measured(old["rows"]) == old["rows"]
    assert "~0" not in sweep.report(merged) and "rest on a fallback" not in sweep.report(merged)
    assert merged["break_even"][0]["break_even"] > 0.8  # the 0.8 point (x0.9) now counts
    for path in sorted((C.REPO / "experiments" / "results" / "h200" / "raw").glob("sweep_*.json")):
        rows = C.read_result(str(path))["rows"]
        assert rows and T.measured(rows) == rows


def test_whole_model_benchmark_tiny(tmp_path):
    """Dense vs sparsified Flax VGG-16 under jit: same outputs, a row per sparsity, budget listed."""
    out = tmp_path / "wm.json"
    tiny = ["--model=vgg16", "--batch=1", "--sparsity=0.8,0.95", "--width=0.0625", "--resolution=32",
            "--repeats=1", f"--out={out}"]
    done = run("whole_model_benchmark", *tiny, "--modes=float32_highest,float32", "--budget_s=1e-9")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    # the budget is checked per (model, mode, batch): the first one runs only if none has elapsed
    assert result["skipped"] and all(s.startswith("vgg16") for s in result["skipped"])
    done = run("whole_model_benchmark", *tiny)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert ENVELOPE <= set(result) and result["kind"] == "whole_model"
    assert result["environment"]["jax"] and result["skipped"] == [] and result["flags"]["width"] == 0.0625
    rows = result["rows"]
    assert [r["sparsity"] for r in rows] == [0.8, 0.95]
    for r in rows:
        assert r["convs"] == 13 and r["dense_us"] > 0 and r["sparse_us"] > 0 and r["max_rel_diff"] < 1e-4
        assert (r["sparse_kernel_us"] is None) == (not B.gpu_present())


def test_layer_benchmark_tiny(tmp_path):
    """The layer benchmark, run from another folder: the envelope, rows, the shared break-even."""
    done = run("layer_benchmark", "--parts=r50", "--r50_layers=r50.g4.reduce", "--r50_batch=1",
               "--r50_sparsity=0.8,0.95", "--modes=float32", "--repeats=1", "--nobcsr", f"--out={tmp_path}",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "layer_benchmark.json").read_text())
    assert ENVELOPE <= set(result) and result["kind"] == "layer_benchmark"
    assert result["flags"]["parts"] == ["r50"] and result["flags"]["repeats"] == 1
    assert [r["sparsity"] for r in result["rows"]] == [0.8, 0.95]
    assert set(result["peaks_tflops"]) == {"float32"}
    assert all(r["dense_check"] in CHECKS and r["sparse_check"] in CHECKS for r in result["rows"])
    chain = [b for b in result["break_even"] if b["measure"] == "chain"]
    # a speedup resting on a fallback time (possible on a busy CPU) is left out
    speedups = [None if "fallback" in (r["dense_check"], r["sparse_check"]) else r["speedup_chain"]
                for r in result["rows"]]
    note = BE.break_even([0.8, 0.95], speedups)[1]
    assert [b["note"] for b in chain] == ([note] if note != "n/a" else [])
    # The tensor-core family (TF32 at the float32 mode) beside the dense time of each row.
    assert all(r["tc_chain_us"] > 0 and r["tc_check"] in CHECKS for r in result["rows"])
    assert all(r["speedup_tc_chain"] == pytest.approx(r["dense_chain_us"] / r["tc_chain_us"])
               for r in result["rows"])
    assert {b["measure"] for b in result["break_even"]} >= {"chain"}
