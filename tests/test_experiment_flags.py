"""The experiment scripts' shared vocabulary: --help, flag names and values, output paths, result files."""

import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from absl import flags

from experiment_scripts import EXPERIMENTS, SCRIPTS, load, run

C = load("common")
sweep = load("sweep")
FLAGS = flags.FLAGS
REPO = EXPERIMENTS.parent

# Each script's own flags: what its --help must list (the shared ones come from common.py).
OWN_FLAGS = {
    "sweep": "model layers sparsity modes batch cnn_batch pattern repeats budget_s out scale seed progress "
             "kernel_time k_small k_large bcsr tensor_cores peak_n",
    "network": "model sparsity modes batch cnn_batch pattern repeats budget_s out scale seed progress "
               "kernel_time han",
    "layer_benchmark": "parts modes repeats budget_s out k_small k_large bcsr tensor_cores chain vgg1_layers "
                       "kim_batch",
    "whole_model_benchmark": "model batch sparsity modes repeats budget_s out width resolution auto",
    "train_kim": "datasets sparsity batch repeats seed out progress embed_dim feature_maps epochs "
                 "prune_epochs finetune_epochs",
    "plots": "results out",
    "summarize": "sweep network whole_model raw tc tc_sweep out",
}


@pytest.fixture(scope="module")
def helps():
    """--help of every script, run as a user runs it (from another folder), in parallel."""
    def help_of(script):
        done = run(script, "--help", cwd=REPO.parent, timeout=300)
        return script, done.stdout + done.stderr
    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(help_of, SCRIPTS))


def _listed(help_text):
    """Usage text (the docstring) and the flag names listed under the script's own module."""
    usage, _, listing = help_text.partition("\nflags:\n")
    return usage, set(re.findall(r"^  --(?:\[no\])?(\w+):", listing, re.M))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_the_scripts_own_flags(helps, script):
    usage, listed = _listed(helps[script])
    assert set(OWN_FLAGS[script].split()) <= listed, helps[script][-2000:]
    assert not listed & set(C.ALIASES), "old names are accepted, but only --helpfull lists them"
    # Every flag the docstring mentions exists; its usage examples keep their line continuations.
    mentioned = set(re.findall(r"--(?:no)?(\w+)", usage))
    assert mentioned <= listed | {"helpfull"}, mentioned - listed
    source = (EXPERIMENTS / f"{script}.py").read_text()
    docstring = source[:source.index('"""', source.index('"""') + 3)]
    continued = [line for line in docstring.splitlines() if line.endswith("\\")]
    assert [line for line in usage.splitlines() if line.endswith("\\")] == continued
    for line in continued:
        following = usage.splitlines()[usage.splitlines().index(line) + 1]
        assert following.lstrip().startswith("--"), following


def test_defaults_never_write_committed_results(helps):
    """No default --out points into experiments/results (committed); the default folder is git-ignored."""
    for script in SCRIPTS:
        entry = helps[script].partition("  --out:")[2].partition("\n  --")[0]
        assert entry and "experiments/results" not in entry, (script, entry)
    default = C.default_out("train_kim")
    assert C.UNTRACKED_RESULTS in Path(default).parents
    if shutil.which("git") and (REPO / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", default], cwd=REPO)
        assert ignored.returncode == 0, f"{default} is not git-ignored"
    # The first command's sweep draws curves: several sparsities by default.
    assert "(default: '0.8,0.9,0.95,0.98')" in helps["sweep"].partition("  --sparsity:")[2][:200]


def test_old_flag_names_still_work(parse_flags):
    parse_flags(["--dtype=bfloat16,float16", "--reps=3", "--models=vgg16", "--time_budget_s=5"])
    cfg = sweep.config_from_flags()
    assert (cfg.modes, cfg.repeats, cfg.model, cfg.budget_s) == (["bfloat16", "float16"], 3, ["vgg16"], 5.0)
    parse_flags(["--timing_steps=4"])
    assert sweep.config_from_flags().repeats == 4


@pytest.mark.parametrize("bad", ["--modes=float64", "--sparsity=0.9,high", "--model=resnet", "--batch=1.5",
                                 "--pattern=random"])
def test_flag_values_are_checked(parse_flags, bad):
    with pytest.raises(flags.IllegalFlagValueError):
        parse_flags([bad])


def test_numbers_are_parsed(parse_flags):
    parse_flags(["--sparsity=0.5,0.95", "--batch=1,32", "--cnn_batch="])
    cfg = sweep.config_from_flags()
    assert (cfg.sparsity, cfg.batch, cfg.cnn_batch) == ([0.5, 0.95], [1, 32], [])


def test_output_path():
    assert C.output_path("run", "sweep.json") == "run/sweep.json"
    assert C.output_path("run/bench.json", "layer_benchmark.json") == "run/bench.json"
    assert C.output_path("run/bench.json", "sweep.csv") == "run/sweep.csv"
    assert C.output_path("h200/SUMMARY.md", "SUMMARY.md") == "h200/SUMMARY.md"


def test_result_envelope_round_trip(tmp_path):
    result = C.envelope("test", {"seed": 1}, [{"x": float("nan")}], start=0.0, skipped=["a"],
                        environment={"device": "cpu"}, extra=2)
    path = C.write_result(result, str(tmp_path / "r.json"))
    back = C.read_result(path)
    assert back["rows"] == [{"x": None}] and back["skipped"] == ["a"] and back["extra"] == 2
    assert {"kind", "environment", "flags", "elapsed_s"} <= set(back)


def test_results_of_earlier_versions_read_as_envelopes():
    old = EXPERIMENTS / "results" / "h200" / "raw" / "network_b1.json"
    assert "config" in json.loads(old.read_text())  # written before the envelope
    result = C.read_result(str(old))
    assert "config" not in result and result["flags"]["scale"] == 1 and result["elapsed_s"] > 0


def test_no_sys_path_edits():
    """Scripts find their siblings because Python puts a script's folder first on sys.path; tests
    load them from their files (experiment_scripts.py). Neither edits sys.path."""
    edit = re.compile(r"sys\.path\.(insert|append|extend)\(|sys\.path\s*(\[[^\]]*\]\s*)?\+?=")
    files = sorted(EXPERIMENTS.glob("*.py")) + [REPO / "tests" / f for f in (
        "experiment_scripts.py", "test_experiments.py", "test_train_kim.py")]
    offenders = [str(f) for f in files if edit.search(f.read_text())]
    assert not offenders


def test_sweep_runs_from_another_folder_with_old_flag_names(tmp_path):
    """As tools/device_run.sh calls it; the checkpoint is gone once the run completes."""
    out = tmp_path / "out"
    done = run("sweep", "--model=cnn_non_static", "--layers=kim.w3", "--batch=1", "--cnn_batch=",
               "--sparsity=0.8,0.95", "--dtype=float32", "--reps=1", "--k_small=1", "--k_large=2",
               "--peak_n=64", "--nobcsr", "--budget_s=600", "--noprogress", f"--out={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "sweep.json").read_text())
    assert len(result["rows"]) == 2 and result["flags"]["repeats"] == 1
    assert not (out / "sweep.partial.json").exists() and (out / "speedup_vs_sparsity_b1.png").is_file()
