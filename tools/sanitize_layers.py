"""Representative layers of every forward kernel family, small enough for compute-sanitizer.

    compute-sanitizer --tool memcheck --kernel-name kns=SparseConv \
        python3 tools/sanitize_layers.py direct3x3_f32 malformed

Arguments name the cases to run (all well-formed cases when none); ``malformed``
adds filters with broken CSR (as a traced filter can be): their rows must come out
NaN and no access may leave its buffer. The family is the static ``kernel`` option.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse
from jaxsparse import sparse_conv
from jaxsparse.tc_conv import plan_for

CASES = {  # name: family, batch, h, w, cin, cout, kernel, stride, padding, dtype
    "direct3x3_f32": ("direct", 1, 14, 14, 64, 64, (3, 3), 1, "SAME", np.float32),
    "direct3x3_bf16": ("direct", 2, 9, 11, 24, 40, (3, 3), 1, "SAME", jnp.bfloat16),
    "direct_s2_f16": ("direct", 1, 15, 15, 16, 8, (3, 3), 2, "SAME", np.float16),
    "kim_w5_f32": ("direct", 2, 1, 56, 300, 100, (1, 5), 1, "VALID", np.float32),
    "spmm1x1_f32": ("spmm", 1, 14, 14, 256, 64, (1, 1), 1, "VALID", np.float32),
    "spmm1x1_bf16": ("spmm", 2, 7, 7, 512, 128, (1, 1), 1, "VALID", jnp.bfloat16),
    "proj1x1_s2_f32": ("direct", 1, 14, 14, 128, 256, (1, 1), 2, "VALID", np.float32),
    "naive3x3_f32": ("naive", 1, 8, 8, 16, 16, (3, 3), 1, "SAME", np.float32),
    "rowbucket3x3_f32": ("rowbucket", 1, 14, 14, 64, 64, (3, 3), 1, "SAME", np.float32),
    "staged3x3_f32": ("staged", 1, 14, 14, 64, 64, (3, 3), 1, "SAME", np.float32),
    "staged_s2_bf16": ("staged", 2, 9, 11, 24, 40, (3, 3), 2, "SAME", jnp.bfloat16),
    "staged1x1_f32": ("staged", 1, 14, 14, 256, 64, (1, 1), 1, "VALID", np.float32),
    "staged1x1_f16": ("staged", 2, 7, 7, 512, 128, (1, 1), 1, "VALID", np.float16),
    "staged_kim_w3_f32": ("staged", 2, 1, 56, 300, 100, (1, 3), 1, "VALID", np.float32),
    "rowbucket3x5_bf16": ("rowbucket", 2, 9, 11, 24, 40, (3, 5), 2, "SAME", jnp.bfloat16),
    # Cluster: Cin chunks (odd Cin takes the scalar fill), strides, the sentence CNN.
    "cluster3x3_f32": ("cluster", 1, 14, 14, 64, 64, (3, 3), 1, "SAME", np.float32),
    "cluster_s2_bf16": ("cluster", 2, 9, 11, 24, 40, (3, 3), 2, "SAME", jnp.bfloat16),
    "cluster_odd_f16": ("cluster", 1, 7, 9, 37, 21, (3, 3), 1, "SAME", np.float16),
    "cluster1x1_f32": ("cluster", 1, 7, 7, 512, 128, (1, 1), 1, "VALID", np.float32),
    "cluster1x1_bf16": ("cluster", 2, 14, 14, 256, 64, (1, 1), 1, "VALID", jnp.bfloat16),
    "cluster_kim_w5_f32": ("cluster", 2, 1, 56, 300, 100, (1, 5), 1, "VALID", np.float32),
    # Half-width windows (bf16/f16): shifted copy, odd Cin (scalar fill), SpMM form, sentence CNN.
    "halfwin3x3_bf16": ("halfwin", 1, 14, 14, 64, 64, (3, 3), 1, "SAME", jnp.bfloat16),
    "halfwin_odd_f16": ("halfwin", 2, 7, 9, 37, 21, (3, 3), 1, "SAME", np.float16),
    "halfwin1x1_bf16": ("halfwin", 2, 14, 14, 256, 64, (1, 1), 1, "VALID", jnp.bfloat16),
    "halfwin_kim_w5_f16": ("halfwin", 2, 1, 56, 300, 100, (1, 5), 1, "VALID", np.float16),
}
MALFORMED_FAMILIES = ("direct", "naive", "rowbucket", "staged", "cluster", "halfwin")
TC_CASES = {  # tc_conv: batch, h, w, cin, cout, sparsity, dtype, kernel design, plan window[, kernel, stride, padding]
    "tc_bf16": (2, 7, 9, 64, 40, 0.9, jnp.bfloat16, "slab", 0),  # partial last group, pixel tail
    "tc_f16_odd": (1, 5, 5, 37, 21, 0.7, np.float16, "slab", 0),  # Cin not a vector multiple: scalar staging
    "tc_tf32": (2, 7, 7, 256, 64, 0.9, np.float32, "slab", 0),
    "tc_empty_rows": (1, 4, 4, 16, 16, 1.0, jnp.bfloat16, "slab", 0),  # every group empty: bias only
    "tc_staged_bf16": (16, 14, 14, 64, 128, 0.9, jnp.bfloat16, "slab", 0),  # outputs staged, copied coalesced
    # The chunked design: 64-pixel tiles with 16-byte stores (windowed plan), 32-pixel TF32
    # tiles, and 16-pixel tiles with the scalar fill, steps straddling chunks and scattered stores.
    "tcc_bf16_np64": (1, 33, 33, 72, 2048, 0.95, jnp.bfloat16, "chunked", 128),
    "tcc_tf32_np32": (2, 32, 32, 64, 1024, 0.9, np.float32, "chunked", 128),
    "tcc_f32_scatter_odd": (2, 12, 12, 130, 300, 0.9, np.float32, "chunked", 0),
    "tcc_f16_odd": (1, 5, 5, 37, 21, 0.7, np.float16, "chunked", 128),
    "tcc_empty_rows": (1, 4, 4, 16, 16, 1.0, jnp.bfloat16, "chunked", 128),
    # The chunked design's direct KxK path: padding with idle warps (Cout <= 64), several chunks a
    # tap with strides, the scalar fill over 1-D taps, a strided 1x1 projection.
    "tcd3x3_bf16_c64": (2, 14, 14, 64, 64, 0.9, jnp.bfloat16, "chunked", 128, (3, 3), 1, "SAME"),
    "tcd3x3_tf32_s2": (1, 15, 13, 300, 150, 0.9, np.float32, "chunked", 0, (3, 3), 2, "SAME"),  # 256 + 44 a tap
    "tcd_kim_f16_odd": (2, 1, 30, 37, 100, 0.8, np.float16, "chunked", 128, (1, 5), 1, "VALID"),
    "tcd1x1_s2_bf16": (2, 9, 9, 96, 136, 0.9, jnp.bfloat16, "chunked", 128, (1, 1), 2, "VALID"),
}


def run_case(name):
    fam, n, h, w, cin, cout, k, s, pad, dt = CASES[name]
    f = jaxsparse.random_filter(1, k, cin, cout, 0.9, dtype=dt)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, h, w, cin)), np.float32).astype(dt)
    conv = jax.jit(lambda x, f: sparse_conv(x, f, strides=s, padding=pad, bias=jnp.ones(cout, dt),
                                            activation="relu", kernel=fam))
    out = conv(x, f)
    print(name, out.shape, float(jnp.abs(out.astype(jnp.float32)).mean()), flush=True)


def run_tc_case(name):
    n, h, w, cin, cout, sp, dt, design, window, *geometry = TC_CASES[name]
    kernel, stride, padding = geometry or ((1, 1), 1, "VALID")
    f = jaxsparse.random_filter(3, kernel, cin, cout, sp, dtype=dt)
    plan = plan_for(f, window=window)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, h, w, cin)), np.float32).astype(dt)
    conv = jax.jit(lambda x, f: jaxsparse.tc_conv(x, f, plan, strides=stride, padding=padding, bias=jnp.ones(cout, dt),
                                                  activation="relu", design=design))
    out = conv(x, f)
    print(name, out.shape, float(jnp.abs(out.astype(jnp.float32)).mean()), flush=True)


def malformed(variant, dtype):
    """A 3x3 24->40 filter with out-of-range columns and swapped pointers, or a last pointer past nnz."""
    f = jaxsparse.random_filter(2, (3, 3), 24, 40, 0.5, dtype=dtype)
    ind, ptr = np.array(f.indices), np.array(f.indptr)
    if variant == "columns_and_disorder":
        ind[ptr[1]], ind[ptr[20]] = 10**6, -3
        ptr[2], ptr[3] = ptr[3], ptr[2]
    else:
        ptr[-1] += 5
    return jaxsparse.SparseFilter(f.data, jnp.asarray(ind), jnp.asarray(ptr), kernel_size=(3, 3),
                                  in_channels=24, out_channels=40, validate=False)


def run_malformed():
    for fam in MALFORMED_FAMILIES:
        dt = jnp.bfloat16 if fam == "halfwin" else np.float32  # the half-width kernel is bf16/f16 only
        x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 11, 24)), np.float32).astype(dt)
        for variant in ("columns_and_disorder", "last_pointer_past_nnz"):
            out = jax.jit(lambda x, f: sparse_conv(x, f, activation="relu", kernel=fam))(x, malformed(variant, dt))
            nan_rows = np.isnan(np.asarray(out, np.float32)).reshape(-1, 40).all(0)
            print("malformed", fam, variant, "NaN rows:", np.flatnonzero(nan_rows).tolist(), flush=True)


if __name__ == "__main__":
    names = sys.argv[1:] or list(CASES)
    unknown = set(names) - set(CASES) - set(TC_CASES) - {"malformed"}
    if unknown:
        sys.exit(f"unknown cases {sorted(unknown)}; known: {sorted(CASES)}, {sorted(TC_CASES)} and 'malformed'")
    for name in names:
        if name in TC_CASES:
            run_tc_case(name)
        elif name != "malformed":
            run_case(name)
    if "malformed" in names:
        run_malformed()
