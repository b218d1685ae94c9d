"""The tensor-core plan: clustering, union columns, packed-tile layout, pattern checks."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxsparse
from jaxsparse import SparseFilter, load_dlmc
from jaxsparse.tc_plan import (TensorCorePlanError, greedy_row_groups, pattern_fingerprint,
                               tensor_core_plan)


def filter_from_mask(mask, kernel_size, cin, seed=0, dtype=np.float32):
    """A filter whose (Cout, taps) pattern is ``mask``, with random nonzero values."""
    rows, cols = np.nonzero(mask)
    data = np.random.default_rng(seed).uniform(0.5, 2.0, rows.size) * np.where(rows % 2, -1, 1)
    indptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)
    return SparseFilter(data.astype(dtype), cols.astype(np.int32), indptr, kernel_size=kernel_size,
                        in_channels=cin, out_channels=mask.shape[0])


@st.composite
def patterns(draw):
    kernel_size = draw(st.sampled_from([(1, 1), (3, 3), (1, 3), (2,)]))
    cin = draw(st.integers(0, 9))
    cout = draw(st.integers(0, 41))
    sparsity = draw(st.sampled_from([0.0, 0.5, 0.9, 0.97, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    taps = int(np.prod(kernel_size)) * cin
    mask = rng.random((cout, taps)) >= sparsity
    mask[rng.random(cout) < draw(st.sampled_from([0.0, 0.3]))] = False  # empty rows
    return filter_from_mask(mask, kernel_size, cin, seed), draw(st.sampled_from([8, 16])), \
        draw(st.sampled_from([8, 16]))


def tile_slots(rows, k_multiple, k_pad):
    """(row, t) of each offset of a group's tile, written from the PTX fragment tables
    (m16n8k16 A: registers {a0,a1} row g, k 2q + {0,1}; {a2,a3} row g + 8; {a4,a5} and
    {a6,a7} the same at k + 8; m16n8k8 TF32 A: a0 row g, k q; a1 row g + 8; a2, a3 at k + 4;
    g = lane / 4, q = lane % 4), lane-major; row-major for other shapes."""
    if rows != 16 or k_multiple not in (8, 16):
        return np.divmod(np.arange(rows * k_pad), max(k_pad, 1))
    out = []
    for step in range(k_pad // k_multiple):
        for lane in range(32):
            g, q = divmod(lane, 4)
            for reg in range(4):
                row, kq = g + 8 * (reg % 2), reg // 2
                if k_multiple == 16:
                    out += [(row, step * 16 + 2 * q + h + 8 * kq) for h in (0, 1)]
                else:
                    out.append((row, step * 8 + q + 4 * kq))
    return tuple(np.array(v, np.int64).reshape(-1) for v in zip(*out)) if out else (np.zeros(0, int),) * 2


def blocks_of(columns, cin):
    """(tap, ci // 64) of each column, as one ascending key."""
    per_tap = -(-cin // 64)
    return columns // cin * per_tap + columns % cin // 64


def check_layout(f, plan):
    """Every documented invariant of the plan, recomputed independently."""
    indices, indptr = np.asarray(f.indices), np.asarray(f.indptr)
    groups, rows = -(-f.out_channels // plan.rows), plan.rows
    assert plan.channels.shape == (groups, rows)
    flat = plan.channels.ravel()
    assert np.array_equal(np.sort(flat[: f.out_channels]), np.arange(f.out_channels))
    assert np.all(flat[f.out_channels:] == -1) and np.array_equal(plan.perm, flat[: f.out_channels])
    k_pad = plan.k_padded
    assert np.all(k_pad % plan.k_multiple == 0)
    assert np.array_equal(k_pad, -(-plan.union_sizes // plan.k_multiple) * plan.k_multiple)
    for g in range(groups):
        members = plan.channels[g][plan.channels[g] >= 0]
        union = np.unique(np.concatenate([indices[indptr[r]:indptr[r + 1]] for r in members]))
        cols = plan.columns[plan.col_offsets[g]:plan.col_offsets[g + 1]]
        assert np.array_equal(np.sort(cols[: union.size]), union)
        assert np.all(np.diff(blocks_of(cols.astype(np.int64), f.in_channels)) >= 0)  # block order
        assert np.all(cols[union.size:] == (cols[union.size - 1] if union.size else -1))  # padding repeats the last
    # positions: nonzero j of row r lands in r's tile row, at its column
    assert plan.positions.dtype == np.int32 and np.unique(plan.positions).size == f.nnz
    rows_of = np.repeat(np.arange(f.out_channels), np.diff(indptr))
    group = np.searchsorted(plan.tile_offsets, plan.positions, side="right") - 1
    local = plan.positions - plan.tile_offsets[group]
    slot, t = np.zeros_like(local), np.zeros_like(local)
    for g in np.unique(group):
        rows_t, cols_t = tile_slots(rows, plan.k_multiple, int(k_pad[g]))
        mine = group == g
        slot[mine], t[mine] = rows_t[local[mine]], cols_t[local[mine]]
    assert np.array_equal(plan.channels[group, slot], rows_of)
    assert np.array_equal(plan.columns[plan.col_offsets[group] + t], indices)
    assert np.all(t < plan.union_sizes[group])
    stats = plan.stats()
    assert stats["union_columns"] == plan.union_sizes.sum() and stats["packed_size"] == rows * k_pad.sum()
    if groups and f.taps:
        assert stats["u"] == pytest.approx(plan.union_sizes.sum() / (groups * f.taps))
        assert stats["u_padded"] == pytest.approx(k_pad.sum() / (groups * f.taps))


@given(patterns())
def test_plan_layout_and_exact_reconstruction(case):
    f, rows, k_multiple = case
    plan = tensor_core_plan(f, rows, k_multiple)
    check_layout(f, plan)
    packed, valid = plan.pack(f)
    assert bool(valid) and packed.shape == (plan.packed_size,) and packed.dtype == f.dtype
    filled = np.zeros(plan.packed_size, bool)
    filled[plan.positions] = True
    assert np.all(np.asarray(packed)[~filled] == 0)  # zero fill and padding
    assert np.array_equal(np.asarray(plan.unpack(packed)), np.asarray(f.todense()))


def phase_conflicts(plan, cin):
    """Mean over the ldmatrix / 32-bit-load phases (k_multiple / 2 positions) of the largest
    number of distinct columns sharing a residue ci % (k_multiple / 2): 1 = no bank conflict."""
    m, worst = plan.k_multiple // 2, []
    for g in range(plan.num_groups):
        cols = plan.columns[plan.col_offsets[g]:plan.col_offsets[g] + plan.union_sizes[g]]
        for k0 in range(0, cols.size, m):
            worst.append(np.bincount(np.unique(cols[k0:k0 + m]) % cin % m, minlength=m).max())
    return float(np.mean(worst))


@pytest.mark.parametrize("k_multiple", [16, 8])
def test_columns_are_spread_over_banks(k_multiple):
    """Within a block the columns of a phase take distinct residues where the block allows:
    random 95 % patterns went from about 2 (sorted) to 1.5 colliding rows a phase (bf16),
    and a block with every residue equally often has no collision at all."""
    f = jaxsparse.random_filter(0, (3, 3), 256, 128, 0.95)
    plan = tensor_core_plan(f, 16, k_multiple)
    check_layout(f, plan)
    sorted_plan = dict(columns=np.concatenate([np.sort(plan.columns[a:a + n]) for a, n in
                                               zip(plan.col_offsets[:-1], plan.union_sizes)]),
                       col_offsets=plan.union_sizes.cumsum() - plan.union_sizes, union_sizes=plan.union_sizes,
                       k_multiple=k_multiple, num_groups=plan.num_groups)
    spread, before = phase_conflicts(plan, 256), phase_conflicts(type("P", (), sorted_plan), 256)
    assert spread < 0.85 * before and spread < (1.6 if k_multiple == 16 else 1.35), (spread, before)
    mask = np.zeros((16, 64), bool)
    mask[:, :16] = True  # one block, every residue equally often
    even = tensor_core_plan(filter_from_mask(mask, (1, 1), 64), 16, k_multiple)
    assert phase_conflicts(even, 64) == 1.0


def test_old_row_major_plan_files_load_into_fragment_order(tmp_path):
    """Plans saved before fragment-ordered tiles (no tile_layout) hold row-major positions of
    sorted columns: loading converts them, so packing still reconstructs the filter."""
    import json
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open
    f = jaxsparse.random_filter(2, (3, 3), 20, 24, 0.8)
    plan = tensor_core_plan(f, 16, 16)
    order = [np.argsort(plan.columns[a:a + n], kind="stable") for a, n in zip(plan.col_offsets[:-1], plan.union_sizes)]
    columns, positions = plan.columns.copy(), plan.positions.astype(np.int64).copy()
    group = np.searchsorted(plan.tile_offsets, positions, side="right") - 1
    local = positions - plan.tile_offsets[group]
    for g, (a, n) in enumerate(zip(plan.col_offsets[:-1], plan.union_sizes)):
        columns[a:a + n] = plan.columns[a:a + n][order[g]]
        columns[a + n:plan.col_offsets[g + 1]] = columns[a + n - 1] if n else columns[a + n:plan.col_offsets[g + 1]]
        rows_t, cols_t = tile_slots(16, 16, int(plan.k_padded[g]))
        mine = group == g
        rank = np.argsort(order[g])[cols_t[local[mine]]]  # the sorted position of each column
        positions[mine] = plan.tile_offsets[g] + rows_t[local[mine]] * plan.k_padded[g] + rank
    path = tmp_path / "plan.safetensors"
    jaxsparse.save_plan(plan, path)
    with safe_open(str(path), framework="numpy") as fh:
        inner = json.loads(fh.metadata()["jaxsparse_tensor_core_plan"])
    assert inner.pop("tile_layout") == "mma-fragment"
    old = dict(load_file(str(path)), columns=columns, positions=positions.astype(np.int32))
    save_file(old, str(tmp_path / "old.safetensors"), metadata={"jaxsparse_tensor_core_plan": json.dumps(inner)})
    back = jaxsparse.load_plan(tmp_path / "old.safetensors", f)
    assert np.array_equal(np.asarray(back.unpack(back.pack(f)[0])), np.asarray(f.todense()))
    check_layout(f, back)
    with pytest.raises(TensorCorePlanError, match="tile layout"):
        save_file(old, str(tmp_path / "odd.safetensors"),
                  metadata={"jaxsparse_tensor_core_plan": json.dumps(dict(inner, tile_layout="columns"))})
        jaxsparse.load_plan(tmp_path / "odd.safetensors")


def test_low_precision_reconstruction():
    mask = np.random.default_rng(3).random((20, 27)) > 0.8
    for dtype in (jnp.bfloat16, np.float16):
        f = filter_from_mask(mask, (3, 3), 3, dtype=dtype)
        plan = tensor_core_plan(f, 16, 16)
        packed, _ = plan.pack(f)
        assert packed.dtype == dtype
        assert np.array_equal(np.asarray(plan.unpack(packed)), np.asarray(f.todense()))


def test_planted_clusters_are_recovered():
    """Rows drawn from 4 disjoint column blocks, shuffled: each group is one block."""
    rng = np.random.default_rng(0)
    taps, cout, rows = 64, 32, 8
    block = np.repeat(np.arange(4), cout // 4)
    rng.shuffle(block)
    mask = np.zeros((cout, taps), bool)
    for r in range(cout):
        mask[r, block[r] * 16 + rng.choice(16, 6, replace=False)] = True
        mask[r, block[r] * 16] = True  # each block's union is reached
    f = filter_from_mask(mask, (1, 1), taps)
    plan = tensor_core_plan(f, rows, 8)
    for g in range(4):
        assert len(set(block[plan.channels[g]])) == 1
    identity = sum(np.unique(np.nonzero(mask[g * rows:(g + 1) * rows])[1]).size for g in range(4))
    assert plan.union_sizes.sum() <= 4 * 16 < identity


def test_greedy_order():
    # row 2 is longest (seed); row 0 adds 0 new columns, row 1 adds 2: group 0 = (2, 0)
    indptr = np.array([0, 1, 3, 6, 7])
    indices = np.array([1, 4, 5, 0, 1, 2, 7])
    assert greedy_row_groups(indptr, indices, 8, 2).tolist() == [[2, 0], [1, 3]]
    assert greedy_row_groups(indptr, indices, 8, 3).tolist() == [[2, 0, 3], [1, -1, -1]]


def test_gradient_is_gather_of_cotangent():
    f = filter_from_mask(np.random.default_rng(1).random((19, 18)) > 0.7, (3, 3), 2)
    plan = tensor_core_plan(f, 8, 8)
    weights = jnp.asarray(np.random.default_rng(2).standard_normal(plan.packed_size), jnp.float32)

    def loss(data):
        packed, _ = plan.pack(f.with_data(data))
        return jnp.sum(jnp.sin(packed) * weights)

    packed, _ = plan.pack(f)
    expected = (jnp.cos(packed) * weights)[plan.positions]
    np.testing.assert_allclose(jax.grad(loss)(f.data), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(f.data), expected, rtol=1e-6)
    # Regression: packing by a gather must not differentiate into a scatter-add of every
    # zero slot onto one index (it is a custom JVP whose transpose is a gather).
    assert "scatter-add" not in str(jax.make_jaxpr(jax.grad(loss))(f.data))
    tangent = jax.jvp(lambda d: plan.pack(f.with_data(d))[0], (f.data,), (jnp.ones_like(f.data),))[1]
    filled = np.zeros(plan.packed_size, bool)
    filled[plan.positions] = True
    np.testing.assert_array_equal(np.asarray(tangent), filled.astype(np.float32))


def test_traced_pack_matches_eager_and_poisons_a_mismatch():
    rng = np.random.default_rng(4)
    mask = rng.random((24, 40)) > 0.75
    f = filter_from_mask(mask, (1, 1), 40)
    plan = tensor_core_plan(f, 16, 16)
    other_mask = mask.copy()
    r = int(np.argmax(mask.sum(1) > 0))
    c_on, c_off = np.flatnonzero(mask[r])[0], np.flatnonzero(~mask[r])[0]
    other_mask[r, c_on], other_mask[r, c_off] = False, True  # same nnz, other pattern
    other = filter_from_mask(other_mask, (1, 1), 40)

    @jax.jit
    def pack(g):
        return plan.pack(g)

    packed, valid = pack(f)
    assert bool(valid) and np.array_equal(np.asarray(packed), np.asarray(plan.pack(f)[0]))
    packed, valid = pack(other)
    assert not bool(valid) and np.all(np.isnan(np.asarray(packed)))
    packed, valid = jax.vmap(lambda data, idx, ptr: plan.pack(SparseFilter(
        data, idx, ptr, kernel_size=(1, 1), in_channels=40, out_channels=24)))(
        jnp.stack([f.data, other.data]), jnp.stack([f.indices, other.indices]),
        jnp.stack([f.indptr, other.indptr]))
    assert np.asarray(valid).tolist() == [True, False]
    assert not np.isnan(np.asarray(packed[0])).any() and np.isnan(np.asarray(packed[1])).all()


def test_check_rejects_other_patterns():
    rng = np.random.default_rng(5)
    mask = rng.random((12, 18)) > 0.6
    f = filter_from_mask(mask, (3, 3), 2)
    plan = tensor_core_plan(f)
    assert plan.check(f) is plan and plan.check(f.with_data(f.data * 2)) is plan
    assert plan.fingerprint == pattern_fingerprint(f.indices, f.indptr, (3, 3), 2, 12)
    shuffled = filter_from_mask(mask[rng.permutation(12)], (3, 3), 2)
    with pytest.raises(TensorCorePlanError, match="pattern"):
        plan.check(shuffled)
    with pytest.raises(TensorCorePlanError, match="pattern"):
        plan.pack(shuffled)
    with pytest.raises(TensorCorePlanError, match="does not match"):
        plan.check(filter_from_mask(mask, (1, 1), 18))  # same CSR, other shape
    with pytest.raises(TensorCorePlanError, match="does not match"):
        jax.jit(lambda g: plan.pack(g))(filter_from_mask(mask | (rng.random(mask.shape) > 0.5), (3, 3), 2))
    with pytest.raises(TensorCorePlanError, match="positive"):
        tensor_core_plan(f, 0)


def test_large_pattern_plans_in_seconds():
    rng = np.random.default_rng(6)
    mask = rng.random((2048, 4608)) >= 0.9
    f = filter_from_mask(mask, (3, 3), 512)
    start = time.perf_counter()
    plan = tensor_core_plan(f, 16, 16)
    elapsed = time.perf_counter() - start
    print(f"\n2048 x 4608 at 0.9, R = 16: planned in {elapsed:.2f} s, {plan.stats()}")
    assert elapsed < 10  # ~1 s alone on one core; generous for shared CI machines
    assert plan.stats()["u"] < 1 - 0.9 ** 16  # greedy beats no clustering even on random rows


# The issue's measurements after greedy clustering (u range over the eight layers).
ISSUE_U = {(8, 0.9): (0.42, 0.53), (8, 0.95): (0.24, 0.31), (16, 0.9): (0.58, 0.76), (16, 0.95): (0.37, 0.50)}
BOTTLENECK_1 = [f"bottleneck_1_block_group{i}_1_1" for i in range(1, 5)] + \
    [f"bottleneck_1_block_group_projection_block_group{i}" for i in range(1, 5)]


def test_dlmc_union_fraction_matches_the_issue(dlmc_root):
    """At most the issue's u (+0.03) on every layer, and below the random-pattern 1 - s^R.
    Run with -s for the table."""
    lines = [f"{'layer':50s} {'shape':>10s}  " + "  ".join(f"R={r} s={s}" for r, s in ISSUE_U)]
    for layer in BOTTLENECK_1:
        cells = []
        for rows, sparsity in ISSUE_U:
            f = load_dlmc(layer, sparsity, root=dlmc_root)
            stats = tensor_core_plan(f, rows, 16).stats()
            cells.append(f"{stats['u']:.3f}/{stats['u_padded']:.3f}")
            assert stats["u"] <= ISSUE_U[rows, sparsity][1] + 0.03, (layer, rows, sparsity, stats)
            assert stats["u"] < 1 - sparsity ** rows, (layer, rows, sparsity, stats)
        shape = f"{f.out_channels}x{f.taps}"
        lines.append(f"{layer:50s} {shape:>10s}  " + "  ".join(f"{c:>11s}" for c in cells))
    print("\nu / u_padded (k_multiple = 16) after greedy clustering:\n" + "\n".join(lines))


def test_plan_saved_and_loaded(tmp_path):
    f = jaxsparse.random_filter(3, (3, 3), 12, 20, 0.8)
    plan = jaxsparse.tensor_core_plan(f, rows=16, k_multiple=8)
    path = tmp_path / "plan.safetensors"
    jaxsparse.save_plan(plan, path)
    back = jaxsparse.load_plan(path, f)
    for name in ("channels", "columns", "col_offsets", "union_sizes", "positions", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(back, name), getattr(plan, name))
    assert (back.rows, back.k_multiple, back.kernel_size, back.fingerprint) == \
        (plan.rows, plan.k_multiple, plan.kernel_size, plan.fingerprint)
    np.testing.assert_array_equal(np.asarray(back.pack(f)[0]), np.asarray(plan.pack(f)[0]))
    with pytest.raises(jaxsparse.TensorCorePlanError):  # another pattern
        jaxsparse.load_plan(path, jaxsparse.random_filter(4, (3, 3), 12, 20, 0.8))


def test_damaged_plan_files_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open
    f = jaxsparse.random_filter(5, (1, 1), 32, 24, 0.7)
    plan = jaxsparse.tensor_core_plan(f)
    path = tmp_path / "plan.safetensors"
    jaxsparse.save_plan(plan, path)
    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    for name, edit in [("indices", lambda a: a[::-1].copy()), ("positions", lambda a: a * 0),
                       ("columns", lambda a: a + 10**6)]:
        broken = dict(tensors, **{name: edit(tensors[name])})
        save_file(broken, str(tmp_path / "bad.safetensors"), metadata=meta)
        with pytest.raises(jaxsparse.TensorCorePlanError, match="damaged"):
            jaxsparse.load_plan(tmp_path / "bad.safetensors")
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    with pytest.raises(jaxsparse.TensorCorePlanError, match="no jaxsparse"):
        jaxsparse.load_plan(tmp_path / "plain.safetensors")


@given(patterns(), st.sampled_from([16, 32, 48]))
def test_windowed_plan_keeps_each_group_in_its_window(case, window):
    f, rows, k_multiple = case
    window = window // rows * rows or rows
    plan = tensor_core_plan(f, rows, k_multiple, window=window)
    check_layout(f, plan)
    assert plan.window == window
    per = window // rows
    for g in range(plan.num_groups):
        members = plan.channels[g][plan.channels[g] >= 0]
        assert np.all(members // window == g // per), (g, members)
    assert np.array_equal(np.asarray(plan.unpack(plan.pack(f)[0])), np.asarray(f.todense()))


def test_window_must_be_a_multiple_of_rows():
    f = jaxsparse.random_filter(0, (1, 1), 8, 40, 0.5)
    for bad in (-16, 24, 7):
        with pytest.raises(TensorCorePlanError, match="window"):
            tensor_core_plan(f, 16, 16, window=bad)


def test_windowed_plan_saved_and_checked(tmp_path):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open
    f = jaxsparse.random_filter(7, (1, 1), 24, 70, 0.8)
    plan = tensor_core_plan(f, 16, 16, window=32)
    path = tmp_path / "plan.safetensors"
    jaxsparse.save_plan(plan, path)
    assert jaxsparse.load_plan(path, f).window == 32
    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    swapped = tensors["channels"].copy()  # swap a channel of window 0 with one of window 1
    a, b = np.argwhere(swapped == 0)[0], np.argwhere(swapped == 40)[0]
    swapped[tuple(a)], swapped[tuple(b)] = 40, 0
    save_file(dict(tensors, channels=swapped), str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(TensorCorePlanError, match="outside its window"):
        jaxsparse.load_plan(tmp_path / "bad.safetensors")


def test_loaded_plan_with_unsorted_columns_or_a_bad_window_is_refused(tmp_path):
    """The chunked kernel walks each group's column blocks in order: a file whose columns are
    not in block order within a group is refused, as is a window that is not an integer."""
    import json
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open
    f = jaxsparse.random_filter(9, (1, 1), 200, 20, 0.8)
    plan = tensor_core_plan(f, 16, 16)
    path = tmp_path / "plan.safetensors"
    jaxsparse.save_plan(plan, path)
    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    columns = tensors["columns"].copy()
    lo, hi = int(plan.col_offsets[0]), int(plan.col_offsets[0] + plan.union_sizes[0] - 1)
    assert columns[lo] // 64 < columns[hi] // 64
    columns[lo], columns[hi] = columns[hi], columns[lo]  # union columns of the first and last block
    save_file(dict(tensors, columns=columns), str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(TensorCorePlanError, match="block order"):
        jaxsparse.load_plan(tmp_path / "bad.safetensors")
    inner = json.loads(meta["jaxsparse_tensor_core_plan"])
    for window in (None, "wide"):
        bad_meta = dict(meta, jaxsparse_tensor_core_plan=json.dumps(dict(inner, window=window)))
        save_file(tensors, str(tmp_path / "bad_window.safetensors"), metadata=bad_meta)
        if window is None:  # an absent or null window is an unwindowed plan (older files)
            assert jaxsparse.load_plan(tmp_path / "bad_window.safetensors").window == 0
        else:
            with pytest.raises(TensorCorePlanError, match="window"):
                jaxsparse.load_plan(tmp_path / "bad_window.safetensors")
