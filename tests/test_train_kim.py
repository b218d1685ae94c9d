"""The pruning-with-retraining experiment (experiments/train_kim.py) on a tiny configuration."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import sentences  # noqa: E402


@pytest.fixture
def sentence_root():
    root = sentences.default_root()
    if not (root / "rt-polarity.all").is_file():
        pytest.skip(f"sentence data not found at {root} (../shared/data/sentences is absent)")
    return root


def test_loaders(sentence_root):
    mr = sentences.load("mr", max_len=20)
    assert mr.train.tokens.shape[1] == 20 and len(mr.test.labels) == 1066
    assert set(mr.train.labels.tolist()) == {0, 1}
    sst = sentences.load("sst2", max_len=30)
    assert len(sst.train.labels) == 6920 and len(sst.test.labels) == 1821 and len(sst.dev.labels) == 872
    assert (sst.train.tokens[:, 0] > sentences.UNK).all()  # first word of every sentence is known
    with pytest.raises(ValueError):
        sentences.load("imdb")


def test_train_kim_tiny_run(sentence_root, tmp_path):
    # A subprocess: the experiment scripts define absl flags at import, and several
    # scripts in one test process would define the same flag names.
    cmd = [sys.executable, str(EXPERIMENTS / "train_kim.py"), "--datasets=mr", "--sparsity=0.9",
           "--embed_dim=16", "--feature_maps=8", "--epochs=1", "--prune_epochs=1",
           "--finetune_epochs=1", "--train_limit=300", "--timing_steps=2", f"--out={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAXSPARSE_SENTENCES_ROOT=str(sentence_root)))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "kim_accuracy.json").read_text())
    assert (tmp_path / "kim_accuracy.png").stat().st_size > 0
    rows = record["results"][0]["rows"]
    assert [r["kind"] for r in rows] == ["dense", "sparse"]
    sparse = rows[1]
    # sparsify keeps the pruned function exactly: same predictions before fine-tuning
    assert sparse["sparse_model_accuracy_before_finetune"] == pytest.approx(sparse["pruned_accuracy"], abs=1e-9)
    assert all(abs(v - 0.9) < 0.01 for v in sparse["layer_sparsity"].values())
    choices = [d["choice"] for d in sparse["decisions"]["layers"]]
    assert choices == ["sparse"] * 3  # the three convolutions (widths 3, 4, 5) run sparse
    assert 0.0 <= sparse["accuracy"] <= 1.0 and sparse["train_step_us"] > 0
