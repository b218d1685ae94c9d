"""Loader for the Deep Learning Matrix Collection (DLMC) ResNet-50 sparsity patterns.

Files are ``<root>/rn50/magnitude_pruning/<sparsity>/<layer>.smtx.gz``: three
text lines, ``M, K, nnz``, the M + 1 row offsets and the nnz column indices.
Rows are output channels. For 1x1 layers K is Cin; for KxK layers K = KH*KW*Cin
in (kh, kw, ci) order, the same column order as `SparseFilter`. The files hold
patterns only, so values are drawn at random.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxsparse.format import SparseFilter, SparseFilterError

DEFAULT_ROOT_ENV = "JAXSPARSE_DLMC_ROOT"

# The ResNet-50 stage of each bottleneck group and its feature-map size at 224x224 input,
# and the eight 1x1 reduce (bottleneck_1) / expand (bottleneck_3) layers the peer
# comparisons of issues 13 and 14 use.
GROUP_HW = {1: 56, 2: 28, 3: 14, 4: 7}
PEER_LAYERS = tuple(f"bottleneck_{i}_block_group{g}_1_1" for g in GROUP_HW for i in (1, 3))


def layer_hw(layer: str) -> int:
    """Input height = width of a `PEER_LAYERS` layer at 224x224."""
    return GROUP_HW[int(layer.split("group")[1][0])]


def default_root() -> Path:
    """``$JAXSPARSE_DLMC_ROOT`` if set, else ``../shared/data/dlmc`` beside the project (or
    beside the working directory), else the git-ignored copy ``.device_data/dlmc`` that
    device runs carry."""
    if env := os.environ.get(DEFAULT_ROOT_ENV):
        return Path(env)
    project = Path(__file__).resolve().parent.parent
    candidates = (project.parent / "shared" / "data" / "dlmc",
                  Path.cwd().parent / "shared" / "data" / "dlmc",  # an installed package
                  project / ".device_data" / "dlmc", Path.cwd() / ".device_data" / "dlmc")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return candidates[0]


def dlmc_path(layer: str, sparsity: float, root: str | Path | None = None) -> Path:
    root = Path(root) if root is not None else default_root()
    return root / "rn50" / "magnitude_pruning" / f"{sparsity:g}" / f"{layer}.smtx.gz"


def read_smtx(path: str | Path) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(M, K, indptr, indices) of one ``.smtx`` / ``.smtx.gz`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DLMC file not found: {path} (is ../shared/data/dlmc present?)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        lines = f.read().strip().split("\n")
    if len(lines) < 2:
        raise SparseFilterError(f"{path}: expected 3 lines (header, row offsets, columns)")
    try:
        m, k, nnz = (int(v) for v in lines[0].replace(",", " ").split())
        indptr = np.array(lines[1].split(), dtype=np.int64)
        indices = np.array(lines[2].split(), dtype=np.int64) if len(lines) > 2 else np.zeros(0, np.int64)
    except ValueError as e:
        raise SparseFilterError(f"{path}: malformed .smtx file (header 'M, K, nnz', then row offsets "
                                f"and column indices as integers): {e}") from None
    if indptr.shape[0] != m + 1 or indices.shape[0] != nnz:
        raise SparseFilterError(f"{path}: header says {m} rows and {nnz} nonzeros, file has "
                                f"{indptr.shape[0] - 1} rows and {indices.shape[0]} columns")
    return m, k, indptr, indices


def load_dlmc(path_or_layer, sparsity: float | None = None, *, kernel_size=None, seed: int = 0,
              dtype=np.float32, root=None) -> SparseFilter:
    """A `SparseFilter` with a DLMC pattern and random (He-scaled normal) values.

    ``load_dlmc('bottleneck_1_block_group1_1_1', 0.9)`` or ``load_dlmc(path)``.
    ``kernel_size`` defaults to (1, 1), or (3, 3) for ``bottleneck_2_*`` layers
    and (7, 7) for ``initial_conv``.
    """
    path = Path(path_or_layer)
    if sparsity is not None:
        path = dlmc_path(str(path_or_layer), sparsity, root)
    m, k, indptr, indices = read_smtx(path)
    name = path.name
    if kernel_size is None:
        kernel_size = (3, 3) if name.startswith("bottleneck_2") else (7, 7) if name.startswith("initial_conv") else (1, 1)
    kernel_size = tuple(kernel_size)
    spatial = math.prod(kernel_size)
    if k % spatial:
        raise SparseFilterError(f"{path}: K = {k} is not a multiple of the kernel taps {spatial}")
    # Canonical order within rows (the files are expected sorted; make sure). A broken indptr
    # is left as is for SparseFilter's validation to name.
    if indptr[0] == 0 and indptr[-1] == indices.shape[0] and np.all(np.diff(indptr) >= 0):
        rows = np.repeat(np.arange(m), np.diff(indptr))
        order = np.lexsort((indices, rows))
        indices = indices[order]
    rng = np.random.default_rng(seed)
    fan_in = max(1.0, indices.shape[0] / max(m, 1))
    data = (rng.standard_normal(indices.shape[0]) * np.sqrt(2.0 / fan_in)).astype(dtype)
    return SparseFilter(jnp.asarray(data), jnp.asarray(indices.astype(np.int32)),
                        jnp.asarray(indptr.astype(np.int32)), kernel_size=kernel_size,
                        in_channels=k // spatial, out_channels=m)


def list_layers(sparsity: float = 0.9, root=None) -> list[str]:
    """Layer names available at a sparsity level (empty when the data is absent)."""
    folder = dlmc_path("x", sparsity, root).parent
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".smtx.gz")] for p in folder.glob("*.smtx.gz"))
