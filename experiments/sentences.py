"""Sentence-classification data for the CNN-non-static experiment (Kim, 2014).

Files in ``../shared/data/sentences`` (one ``<label> <tokenised sentence>`` per
line): MR (``rt-polarity.all``, no fixed split) and SST-2
(``stsa.binary.{train,dev,test}``). The text is already tokenised, so tokens are
whitespace-separated words. Vocabulary: every word of the training split
(index 0 pads, 1 is unknown); with ``extra_words`` (pretrained embeddings), also the words of the
other splits that have a pretrained vector. That is the same model as one whose vocabulary holds
every pretrained word: a word that never occurs in training gets no gradient, so it keeps its
pretrained vector either way (no label of a held-out split is read).

Validation: SST-2 has its dev file; MR has no split at all, so ``load('mr', val_fraction=0.1)``
holds out a fixed, seeded part of the training sentences (the test part is unchanged by it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAD, UNK = 0, 1


def default_root() -> Path:
    if env := os.environ.get("JAXSPARSE_SENTENCES_ROOT"):
        return Path(env)
    project = Path(__file__).resolve().parent.parent
    for candidate in (project / ".device_data" / "sentences", project.parent / "shared" / "data" / "sentences"):
        if candidate.is_dir():
            return candidate
    return project.parent / "shared" / "data" / "sentences"


def read_file(path: Path) -> tuple[list[list[str]], np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"sentence data not found: {path} (is ../shared/data/sentences present?)")
    sentences, labels = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.strip().split()
            if len(parts) < 2:
                continue
            labels.append(int(parts[0]))
            sentences.append(parts[1:])
    return sentences, np.asarray(labels, np.int32)


@dataclass
class Split:
    tokens: np.ndarray  # (n, max_len) int32
    labels: np.ndarray  # (n,) int32


@dataclass
class Dataset:
    name: str
    vocab: dict
    train: Split
    test: Split
    dev: Split | None
    num_classes: int
    split_note: str
    texts: dict | None = None  # split name -> list of token lists (before encoding)


def _encode(sentences, vocab, max_len) -> np.ndarray:
    out = np.full((len(sentences), max_len), PAD, np.int32)
    for i, words in enumerate(sentences):
        ids = [vocab.get(w, UNK) for w in words[:max_len]]
        out[i, : len(ids)] = ids
    return out


def _build_vocab(sentences) -> dict:
    vocab = {"<pad>": PAD, "<unk>": UNK}
    for words in sentences:
        for w in words:
            if w not in vocab:
                vocab[w] = len(vocab)
    return vocab


FILES = {"mr": ("rt-polarity.all",), "sst2": ("stsa.binary.train", "stsa.binary.dev", "stsa.binary.test")}


def all_words(names=("mr", "sst2"), root: Path | None = None) -> list:
    """Every distinct word of the data sets ``names`` (all splits), in order of appearance."""
    root = Path(root) if root is not None else default_root()
    words = {}
    for name in names:
        for file in FILES[name]:
            for sentence in read_file(root / file)[0]:
                words.update(dict.fromkeys(sentence))
    return list(words)


def load(name: str, *, max_len: int = 56, root: Path | None = None, seed: int = 0,
         test_fraction: float = 0.1, val_fraction: float = 0.0, train_limit: int | None = None,
         extra_words=None) -> Dataset:
    """'mr' (a fixed held-out split of ``test_fraction``, and of ``val_fraction`` for validation
    when > 0, from one permutation seeded by ``seed``) or 'sst2' (its own train/dev/test files).
    ``extra_words(word) -> bool``: words of the dev/test splits to add to the vocabulary."""
    root = Path(root) if root is not None else default_root()
    if name == "mr":
        sentences, labels = read_file(root / "rt-polarity.all")
        order = np.random.default_rng(seed).permutation(len(sentences))
        n_test = int(round(test_fraction * len(sentences)))
        n_val = int(round(val_fraction * (len(sentences) - n_test)))
        test_idx, val_idx, train_idx = order[:n_test], order[n_test: n_test + n_val], order[n_test + n_val:]
        train_s = [sentences[i] for i in train_idx]
        train_y, test_s, test_y = labels[train_idx], [sentences[i] for i in test_idx], labels[test_idx]
        dev = ([sentences[i] for i in val_idx], labels[val_idx]) if n_val else None
        note = (f"MR: fixed held-out split, {n_test} of {len(sentences)} sentences for test "
                f"(seeded permutation, seed {seed}); not 10-fold cross-validation")
        if n_val:
            note += (f"; validation: the next {n_val} sentences of the same permutation "
                     f"({val_fraction:g} of the training part)")
    elif name == "sst2":
        train_s, train_y = read_file(root / "stsa.binary.train")
        test_s, test_y = read_file(root / "stsa.binary.test")
        dev_s, dev_y = read_file(root / "stsa.binary.dev")
        dev = (dev_s, dev_y)
        note = "SST-2: the standard train/dev/test split (sentence level); validation: the dev file"
    else:
        raise ValueError(f"unknown dataset {name!r}: use 'mr' or 'sst2'")
    if train_limit is not None:
        train_s, train_y = train_s[:train_limit], train_y[:train_limit]
    vocab = _build_vocab(train_s)
    if extra_words is not None:
        for words in (dev[0] if dev is not None else []) + test_s:
            for w in words:
                if w not in vocab and extra_words(w):
                    vocab[w] = len(vocab)
    enc = lambda s, y: Split(_encode(s, vocab, max_len), np.asarray(y, np.int32))
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    texts = {"train": train_s, "test": test_s, **({"dev": dev[0]} if dev is not None else {})}
    return Dataset(name, vocab, enc(train_s, train_y), enc(test_s, test_y),
                   enc(*dev) if dev is not None else None, num_classes, note, texts)
