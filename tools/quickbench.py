"""Kernel time (profiler trace) of the sparse kernels on a few layers against XLA dense.

    python3 tools/quickbench.py --families=auto,rowbucket --sparsity=0.9,0.95 --dtypes=float32,bfloat16

Per kernel family, sparsity and dtype: the summed GPU kernel time of one jitted call,
useful TFLOP/s (2 x nnz x output pixels), dense time (HIGHEST for float32) and the
largest difference to the first family's output. A quick look, not the benchmark:
experiments/ holds the measured comparisons.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxsparse
from jaxsparse import sparse_conv
from jaxsparse.benchmark import kernel_time_us

LAYERS = [  # name, batch, H=W, Cin, Cout, kernel
    ("conv1_2", 1, 224, 64, 64, (3, 3)), ("conv3_2", 1, 56, 256, 256, (3, 3)),
    ("conv4_2", 1, 28, 512, 512, (3, 3)), ("conv5_1", 1, 14, 512, 512, (3, 3)),
    ("conv3_2", 32, 56, 256, 256, (3, 3)), ("conv4_2", 32, 28, 512, 512, (3, 3)),
    ("conv5_1", 32, 14, 512, 512, (3, 3)), ("conv2_2", 1, 112, 128, 128, (3, 3)),
    ("conv2_2", 32, 112, 128, 128, (3, 3)), ("conv1_2", 32, 224, 64, 64, (3, 3)),
    ("r50g1red", 1, 56, 256, 64, (1, 1)),
    ("r50g3red", 1, 14, 1024, 256, (1, 1)), ("r50g3red", 32, 14, 1024, 256, (1, 1)),
    ("r50g4exp", 1, 7, 512, 2048, (1, 1)),
]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--families", default="auto", help="comma-separated kernel families (the `kernel` option)")
parser.add_argument("--sparsity", default="0.9,0.95")
parser.add_argument("--dtypes", default="float32,bfloat16")
parser.add_argument("--layers", default="", help="comma-separated layer names (default: all)")
args = parser.parse_args()
families = args.families.split(",")
only = set(filter(None, args.layers.split(",")))


def dense_conv(x, w):
    highest = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=highest)


for name, n, hw, cin, cout, k in LAYERS:
    if only and name not in only:
        continue
    for sp in map(float, args.sparsity.split(",")):
        for dt in map(jnp.dtype, args.dtypes.split(",")):
            f = jaxsparse.random_filter(0, k, cin, cout, sp, dtype=dt)
            x = jnp.asarray(np.random.default_rng(0).standard_normal((n, hw, hw, cin)), dt)
            dense_us = kernel_time_us(jax.jit(dense_conv), x, jnp.asarray(f.todense()))["total_us"]
            ref = None
            for fam in families:
                fs = jax.jit(lambda x, f, fam=fam: sparse_conv(x, f, precision="highest", kernel=fam))
                out = np.asarray(fs(x, f).astype(jnp.float32))
                ref = out if ref is None else ref
                diff = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) + 1e-30))
                ks = kernel_time_us(fs, x, f)
                t = ks["total_us"]
                tflops = 2 * f.nnz * n * hw * hw / t / 1e6
                print(f"{name:9s} b{n:<3d} s{sp:.2f} {dt.name:8s} {fam:9s} sparse {t:8.1f} us {tflops:6.2f} TFLOP/s  "
                      f"dense {dense_us:8.1f} us  x{dense_us / t:5.2f}  diff-vs-{families[0]} {diff:.1e}  "
                      f"kernels {[kname[:40] for kname in ks['kernels']][:2]}", flush=True)
