"""The pruning-with-retraining experiment (experiments/train_kim.py) on a tiny configuration."""

import json

import pytest

from experiment_scripts import load, run

sentences = load("sentences")


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
    done = run("train_kim", "--datasets=mr", "--sparsity=0.9", "--embed_dim=16", "--feature_maps=8", "--epochs=1",
               "--prune_epochs=1", "--finetune_epochs=1", "--train_limit=300", "--repeats=2", "--noprogress",
               f"--out={tmp_path}", cwd=tmp_path, env={"JAXSPARSE_SENTENCES_ROOT": str(sentence_root)})
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "kim_accuracy.json").read_text())
    assert record["kind"] == "train_kim" and record["flags"]["repeats"] == 2 and record["flags"]["batch"] == [50]
    assert record["datasets"][0]["dataset"] == "mr" and record["environment"]["jax"]
    assert (tmp_path / "kim_accuracy.png").stat().st_size > 0
    rows = record["rows"]
    assert [(r["dataset"], r["kind"]) for r in rows] == [("mr", "dense"), ("mr", "sparse")]
    sparse = rows[1]
    # sparsify keeps the pruned function exactly: same predictions before fine-tuning
    assert sparse["sparse_model_accuracy_before_finetune"] == pytest.approx(sparse["pruned_accuracy"], abs=1e-9)
    assert all(abs(v - 0.9) < 0.01 for v in sparse["layer_sparsity"].values())
    choices = [d["choice"] for d in sparse["decisions"]["layers"]]
    assert choices == ["sparse"] * 3  # the three convolutions (widths 3, 4, 5) run sparse
    assert 0.0 <= sparse["accuracy"] <= 1.0 and sparse["train_step_us"] > 0
    # CNN-rand (the default): random embeddings; the checkpoints are chosen on MR's validation part
    assert record["flags"]["embeddings"] == "random" and rows[0]["embedding_init"] is None
    assert record["datasets"][0]["validation_size"] == 960 and "coverage" not in record["datasets"][0]
    assert rows[0]["selection"]["epochs"] == 1 and rows[0]["selection"]["val_accuracy"] is not None
    assert sparse["selection"]["epochs"] in (0, 1) and rows[0]["seed"] == sparse["seed"] == 0
    assert "validation only" in record["protocol"] and record["summary"][1]["n"] == 1


def test_train_kim_default_out_is_not_the_committed_folder():
    """Run with defaults, train_kim.py must not overwrite experiments/results/kim (the README cites it)."""
    common = load("common")
    done = run("train_kim", "--help")
    out_help = done.stdout.partition("  --out:")[2].partition("\n  --")[0]
    assert "(default: '')" in out_help  # empty: common.default_out, below
    default = common.default_out("train_kim")
    assert common.UNTRACKED_RESULTS.name == "results_tmp" and default.startswith(str(common.UNTRACKED_RESULTS))
    assert "experiments/results" not in default
    done = run("train_kim", "--batch=1,50")  # one training batch size
    assert done.returncode != 0 and "one --batch" in done.stderr
