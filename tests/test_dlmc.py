"""The DLMC loader on the real ResNet-50 patterns in ../shared/data/dlmc."""

import gzip

import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse
from jaxsparse import SparseFilterError, load_dlmc, sparse_conv
from jaxsparse.dlmc import dlmc_path, list_layers, read_smtx
from helpers import check_close, dense_from_filter, random_input


def header(path):
    with gzip.open(path, "rt") as f:
        return tuple(int(v) for v in f.readline().replace(",", " ").split())


def test_every_layer_loads_and_matches_header(dlmc_root):
    layers = list_layers(0.9, root=dlmc_root)
    assert len(layers) >= 50, layers
    for layer in layers:
        path = dlmc_path(layer, 0.9, dlmc_root)
        m, k, nnz = header(path)
        f = load_dlmc(layer, 0.9, root=dlmc_root)
        f.validate()
        assert f.out_channels == m and f.taps == k and f.nnz == nnz, layer
        expected_ks = (3, 3) if layer.startswith("bottleneck_2") else (7, 7) if layer == "initial_conv" else (1, 1)
        assert f.kernel_size == expected_ks, layer
        assert f.density == pytest.approx(nnz / (m * k))
        assert 0.85 < f.sparsity < 0.95, (layer, f.sparsity)


@pytest.mark.parametrize("sparsity", [0.7, 0.8, 0.95, 0.98])
def test_other_sparsities(dlmc_root, sparsity):
    f = load_dlmc("bottleneck_2_block_group2_1_1", sparsity, root=dlmc_root)
    m, k, nnz = header(dlmc_path("bottleneck_2_block_group2_1_1", sparsity, dlmc_root))
    assert f.shape == (3, 3, k // 9, m) and f.nnz == nnz
    assert abs(f.sparsity - sparsity) < 0.05


def test_known_shapes(dlmc_root):
    f = load_dlmc("bottleneck_1_block_group1_1_1", 0.9, root=dlmc_root)
    assert f.shape == (1, 1, 256, 64)
    assert f.nnz == 1638
    g = load_dlmc("initial_conv", 0.9, root=dlmc_root)
    assert g.shape == (7, 7, 3, 64) and g.nnz == 940
    h = load_dlmc("bottleneck_2_block_group1_1_1", 0.9, root=dlmc_root)
    assert h.shape == (3, 3, 64, 64) and h.nnz == 3686


def test_pattern_matches_file(dlmc_root):
    path = dlmc_path("bottleneck_1_block_group1_1_1", 0.9, dlmc_root)
    m, k, indptr, indices = read_smtx(path)
    f = load_dlmc(path)  # by path
    np.testing.assert_array_equal(np.asarray(f.indptr), indptr)
    rows = np.repeat(np.arange(m), np.diff(indptr))
    dense = dense_from_filter(f)[0, 0]  # (Cin, Cout)
    assert np.all(dense[indices, rows] != 0)
    assert np.count_nonzero(dense) == len(indices)


def test_seed_and_dtype(dlmc_root):
    a = load_dlmc("bottleneck_1_block_group1_1_1", 0.9, seed=1, root=dlmc_root)
    b = load_dlmc("bottleneck_1_block_group1_1_1", 0.9, seed=1, root=dlmc_root)
    c = load_dlmc("bottleneck_1_block_group1_1_1", 0.9, seed=2, root=dlmc_root)
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    assert not np.array_equal(np.asarray(a.data), np.asarray(c.data))
    np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(c.indices))
    assert np.all(np.asarray(a.data) != 0) and np.all(np.isfinite(np.asarray(a.data)))
    d = load_dlmc("bottleneck_1_block_group1_1_1", 0.9, seed=1, dtype=jnp.bfloat16, root=dlmc_root)
    assert d.dtype == jnp.bfloat16


def test_conv_1x1_matches_reference(dlmc_root):
    f = load_dlmc("bottleneck_1_block_group1_1_1", 0.9, root=dlmc_root)  # 256 -> 64
    x = random_input(np.random.default_rng(0), (2, 7, 6, 256))
    bias = jnp.linspace(-0.5, 0.5, 64)
    out = sparse_conv(x, f, padding="SAME", bias=bias, activation="relu")
    ref = check_close(out, x, dense_from_filter(f), bias=bias, relu=True, padding="SAME")
    assert np.any(ref > 0)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16])
def test_conv_3x3_matches_reference(dlmc_root, dtype):
    f = load_dlmc("bottleneck_2_block_group1_1_1", 0.9, root=dlmc_root, dtype=dtype)  # 3x3, 64 -> 64
    x = random_input(np.random.default_rng(1), (1, 6, 7, 64), dtype)
    out = sparse_conv(x, f, strides=1, padding="SAME")
    check_close(out, x, dense_from_filter(f), padding="SAME")


def test_conv_initial_7x7_stride2(dlmc_root):
    f = load_dlmc("initial_conv", 0.9, root=dlmc_root)
    x = random_input(np.random.default_rng(2), (1, 17, 16, 3))
    out = sparse_conv(x, f, strides=2, padding=((3, 3), (3, 3)))
    assert out.shape == (1, 9, 8, 64)
    check_close(out, x, dense_from_filter(f), strides=2, padding=((3, 3), (3, 3)))


def test_missing_file_raises_file_not_found(tmp_path, dlmc_root):
    with pytest.raises(FileNotFoundError, match="DLMC file not found"):
        load_dlmc("no_such_layer", 0.9, root=dlmc_root)
    with pytest.raises(FileNotFoundError):
        load_dlmc("bottleneck_1_block_group1_1_1", 0.33, root=dlmc_root)
    with pytest.raises(FileNotFoundError):
        load_dlmc(tmp_path / "missing.smtx.gz")


def test_missing_file_without_data(tmp_path):
    # works (and fails clearly) even where ../shared is absent
    with pytest.raises(FileNotFoundError, match="DLMC file not found"):
        load_dlmc("bottleneck_1_block_group1_1_1", 0.9, root=tmp_path)
    assert list_layers(0.9, root=tmp_path) == []


def _write(tmp_path, text, name="bad.smtx.gz"):
    path = tmp_path / name
    with gzip.open(path, "wt") as f:
        f.write(text)
    return path


@pytest.mark.parametrize("text, match", [
    ("4, 3, 3\n0 1 2\n0 1 2\n", "header says 4 rows and 3 nonzeros"),
    ("2, 3, 4\n0 1 2\n0 1 2\n", "header says 2 rows and 4 nonzeros"),
    ("2, 3\n0 1 2\n0 1\n", "malformed"),
    ("two, 3, 2\n0 1 2\n0 1\n", "malformed"),
    ("2, 3, 2\n0 1 x\n0 1\n", "malformed"),
    ("2, 3, 2\n", "expected 3 lines"),
    ("2, 3, 2\n0 1 2\n0 3\n", "column index 3 out of range"),
    ("2, 3, 2\n0 2 1\n0 1\n", "non-decreasing"),
    ("2, 3, 2\n1 1 2\n0 1\n", "start at 0"),
    ("2, 3, 2\n0 2 2\n1 1\n", "strictly increasing"),  # duplicate column in a row
])
def test_malformed_file_raises_clear_error(tmp_path, text, match):
    with pytest.raises(SparseFilterError, match=match):
        load_dlmc(_write(tmp_path, text))


def test_unsorted_rows_in_file_are_sorted(tmp_path):
    f = load_dlmc(_write(tmp_path, "2, 4, 3\n0 2 3\n3 0 2\n"), seed=0)
    np.testing.assert_array_equal(np.asarray(f.indices), [0, 3, 2])


def test_plain_smtx_and_kernel_size(tmp_path):
    path = tmp_path / "bottleneck_2_x.smtx"  # uncompressed; name implies 3x3
    path.write_text("2, 18, 3\n0 2 3\n0 17 9\n")
    f = load_dlmc(path)
    assert f.shape == (3, 3, 2, 2) and f.nnz == 3
    g = load_dlmc(path, kernel_size=(1, 1))
    assert g.shape == (1, 1, 18, 2)
    with pytest.raises(SparseFilterError, match="not a multiple of the kernel taps"):
        load_dlmc(path, kernel_size=(2, 2))


def test_default_root_finds_shared_data(dlmc_root, monkeypatch):
    monkeypatch.setenv("JAXSPARSE_DLMC_ROOT", str(dlmc_root))
    f = jaxsparse.load_dlmc("bottleneck_1_block_group1_1_1", 0.9)
    assert f.shape == (1, 1, 256, 64)
