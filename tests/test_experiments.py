"""The experiment scripts (experiments/*.py) on tiny configurations: flags, tables, files, figures."""

import csv
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
sys.path.insert(0, EXPERIMENTS)

from absl import flags  # noqa: E402

import layers as L  # noqa: E402
import network  # noqa: E402
import plots as P  # noqa: E402
import sweep  # noqa: E402
from jaxsparse import benchmark as B  # noqa: E402

FLAGS = flags.FLAGS
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def parse_flags():
    """Parse an explicit argv into absl's global FLAGS (never pytest's own argv); reset after."""
    def parse(argv):
        FLAGS.unparse_flags()
        FLAGS(["prog"] + list(argv))
    yield parse
    FLAGS.unparse_flags()


def _read_csv(path):
    with open(path) as f:
        lines = f.read().splitlines()
    comments = [l for l in lines if l.startswith("#")]
    rows = list(csv.DictReader([l for l in lines if not l.startswith("#")]))
    return comments, rows


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 1000


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
    val, note = P.break_even(s, [0.3, 0.6, 1.5, 3.0])
    assert 0.7 < val < 0.9 and note == f"{val:.3f}"
    # log-linear interpolation: exactly halfway in log space
    assert P.break_even([0.8, 0.9], [0.5, 2.0])[0] == pytest.approx(0.85)
    assert P.break_even(s, [1.2, 2, 3, 4]) == (None, "<=0.5")
    assert P.break_even(s, [0.1, 0.2, 0.5, 0.9]) == (None, ">0.95")
    assert P.break_even(s, [None] * 4) == (None, "n/a")
    assert P.ratio(-1.0, 2.0) is None and P.ratio(1.0, 0.0) is None and P.ratio(3.0, 2.0) == 1.5


def test_require_cuda_is_respected(monkeypatch):
    if B.gpu_present():
        pytest.skip("checks the no-GPU path")
    monkeypatch.setenv("JAXSPARSE_REQUIRE_CUDA", "1")
    with pytest.raises(RuntimeError, match="JAXSPARSE_REQUIRE_CUDA"):
        L.check_backend()


# ---- the scripts ------------------------------------------------------------------


def test_sweep_tiny(tmp_path, parse_flags, capsys):
    out = tmp_path / "sweep"
    parse_flags(["--model=vgg16,resnet50_1x1,cnn_non_static",
                 "--layers=vgg.conv5_1,vgg.conv4_1,r50.g4.reduce,r50.g4.shortcut,kim.w3",
                 "--sparsity=0.8,0.95", "--dtype=float32,bfloat16", "--batch=1", "--cnn_batch=",
                 "--scale=8", "--reps=2", "--k_small=1", "--k_large=3", "--peak_n=128", "--pattern=uniform",
                 f"--out={out}", "--noprogress"])
    cfg = sweep.config_from_flags()
    assert cfg.modes == ["float32", "bfloat16"] and cfg.sparsities == [0.8, 0.95] and cfg.cnn_batches == []
    sweep.main(["sweep"])
    printed = capsys.readouterr().out
    assert "sparse µs" in printed and "vgg.conv5_1" in printed and "break-even" in printed
    assert "reduced precision" in printed

    result = json.loads((out / "sweep.json").read_text())
    assert result["environment"]["platform"] and result["environment"]["jax"] and result["environment"]["date"]
    assert result["config"]["layers"][0] == "vgg.conv5_1" and result["config"]["scale"] == 8
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
    assert all(np.isfinite(r["sparse_us"]) and np.isfinite(r["dense_us"]) for r in rows)
    assert all(r["sparse_kernel_us"] is None for r in rows) or B.gpu_present()
    # The two float32-exact sparse measurements are shared, the dense ones are not.
    assert len(result["break_even"]) == 5 * 2
    assert {r["low_mode"] for r in result["reduced_precision"]} == {"bfloat16"}

    comments, csv_rows = _read_csv(out / "sweep.csv")
    assert any(c.startswith("# environment:") for c in comments) and any("# config:" in c for c in comments)
    assert len(csv_rows) == len(rows) and float(csv_rows[0]["sparse_us"]) > 0
    assert len(_read_csv(out / "breakeven.csv")[1]) == 10
    assert len(_read_csv(out / "reduced_precision.csv")[1]) == 5 * 2
    for name in ("speedup_vs_sparsity_b1.png", "breakeven_b1.png", "reduced_precision.png"):
        assert _is_png(out / name), name
    # figures can be redrawn from the JSON alone
    for p in P.sweep_figures(result, str(tmp_path)):
        assert _is_png(p)


def test_network_tiny(tmp_path, parse_flags, capsys):
    out = tmp_path / "network"
    parse_flags(["--model=all", "--sparsity=0.9", "--dtype=float32,float16", "--batch=1",
                 "--cnn_batch=2", "--scale=16", "--reps=2", "--pattern=uniform", f"--out={out}",
                 "--noprogress"])
    network.main(["network"])
    assert "han" in capsys.readouterr().out
    result = json.loads((out / "network.json").read_text())
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
    """--budget_s skips (and lists) layers; a checkpoint is written per layer; summarize.py reads the JSON."""
    import subprocess
    cfg = sweep.SweepConfig(models=["vgg16"], layers=["vgg.conv5_1", "vgg.conv4_1"], sparsities=[0.9, 0.95],
                            modes=["float32_highest", "float32"], batches=[1], cnn_batches=[], scale=8, reps=2,
                            k_small=1, k_large=3, peak_n=128, out=str(tmp_path / "s"), progress=False,
                            budget_s=1e-9)
    skipped = sweep.run_sweep(cfg)
    assert skipped["rows"] == [] and skipped["skipped"] == ["vgg.conv5_1 b1", "vgg.conv4_1 b1"]

    cfg.budget_s = 0.0
    result = sweep.run_sweep(cfg)
    assert result["skipped"] == [] and len(result["rows"]) == 2 * 2 * 2
    partial = json.loads((tmp_path / "s" / "sweep.partial.json").read_text())
    assert len(partial["rows"]) == len(result["rows"])  # the last checkpoint holds every layer
    sweep.write_outputs(result, cfg.out)

    md = tmp_path / "SUMMARY.md"
    subprocess.run([sys.executable, os.path.join(EXPERIMENTS, "summarize.py"),
                    f"--sweep={tmp_path / 's' / 'sweep.json'}", f"--out={md}"], check=True)
    text = md.read_text()
    assert "## Targets of the CUDA-kernel issue" in text and "## Break-even sparsity, batch 1" in text
    # The geomean row comes from the JSON. On a busy CPU a tiny layer's chain slope can be lost
    # in noise (speedup None); the geomean skips it and the count still names both layers.
    speedups = [r["speedup"] for r in result["rows"]
                if r["sparsity"] == 0.9 and r["mode"] == "float32_highest" and r["speedup"]]
    assert "| 1 | 0.9 | " in text
    if speedups:
        gm = math.exp(np.mean([math.log(v) for v in speedups]))
        assert f"| 1 | 0.9 | {gm:.2f} (2) |" in text


def test_whole_model_benchmark_tiny(tmp_path):
    """Dense vs sparsified Flax VGG-16 under jit: same outputs, a row per sparsity, budget listed."""
    import subprocess
    out = tmp_path / "wm.json"
    subprocess.run([sys.executable, os.path.join(EXPERIMENTS, "whole_model_benchmark.py"), "--models=vgg16",
                    "--batch=1", "--sparsity=0.8,0.95", "--width=0.0625", "--resolution=32", "--repeats=1",
                    "--modes=float32_highest,float32", "--budget_s=1e-9", f"--out={out}"], check=True)
    result = json.loads(out.read_text())
    # the budget is checked per (model, mode, batch): the first one runs only if none has elapsed
    assert result["skipped"] and all(s.startswith("vgg16") for s in result["skipped"])
    subprocess.run([sys.executable, os.path.join(EXPERIMENTS, "whole_model_benchmark.py"), "--models=vgg16",
                    "--batch=1", "--sparsity=0.8,0.95", "--width=0.0625", "--resolution=32", "--repeats=1",
                    f"--out={out}"], check=True)
    result = json.loads(out.read_text())
    assert result["environment"]["jax"] and result["skipped"] == []
    rows = result["rows"]
    assert [r["sparsity"] for r in rows] == [0.8, 0.95]
    for r in rows:
        assert r["convs"] == 13 and r["dense_us"] > 0 and r["sparse_us"] > 0 and r["max_rel_diff"] < 1e-4
        assert (r["sparse_kernel_us"] is None) == (not B.gpu_present())
