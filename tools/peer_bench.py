"""Kernel time on the ResNet-50 1x1 layers of the peer comparison (issue 13), one H200 run.

    python3 tools/peer_bench.py --families=auto,cluster --out=$OUT/peers.jsonl

For the eight DLMC magnitude-pruned 0.9 matrices (reduce and expand of groups 1-4) at
batch 1 and 32: the summed GPU kernel time of one jitted call (profiler trace) of
jaxsparse per kernel family and dtype, of XLA's float32 HIGHEST dense convolution, and of
`jax.experimental.sparse` BCSR (cuSPARSE) on the same matrix with the NHWC layout changes
it needs, all NHWC in and out. Compare with the external peers through ratios to the
dense time of the same run (the machine drifts between runs).
"""
import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import sparse as jsparse

import jaxsparse
from jaxsparse.benchmark import kernel_time_us

from jaxsparse.dlmc import PEER_LAYERS as LAYERS, layer_hw

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--families", default="auto,cluster")
parser.add_argument("--dtypes", default="float32,bfloat16")
parser.add_argument("--batches", default="1,32")
parser.add_argument("--sparsity", type=float, default=0.9)
parser.add_argument("--out", default="")
args = parser.parse_args()
if "jax_bcoo_cusparse_lowering" in jax.config.values:
    jax.config.update("jax_bcoo_cusparse_lowering", True)


def dense_highest(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def bcsr_nhwc(m, x):
    """BCSR (Cout x Cin) times the NHWC activations, NHWC out (the transposes are timed too)."""
    n, h, w, c = x.shape
    return (m @ x.reshape(-1, c).T).T.reshape(n, h, w, -1)


rows = []
print(f"{'layer':34s} {'b':>3s} {'dtype':8s} {'family':7s} {'sparse us':>9s} {'dense f32 HIGHEST us':>20s} "
      f"{'sparse/dense':>12s} {'bcsr us':>8s}")
for name in LAYERS:
    hw = layer_hw(name)
    for batch in map(int, args.batches.split(",")):
        f32 = jaxsparse.load_dlmc(name, args.sparsity, dtype=np.float32, seed=0)
        x32 = jnp.asarray(np.random.default_rng(batch).standard_normal((batch, hw, hw, f32.in_channels)), jnp.float32)
        dense_us = kernel_time_us(jax.jit(dense_highest), x32, jnp.asarray(f32.todense()))["total_us"]
        m = jsparse.BCSR((f32.data, f32.indices, f32.indptr), shape=(f32.out_channels, f32.in_channels))
        bcsr = kernel_time_us(jax.jit(bcsr_nhwc), m, x32)
        bcsr_us = bcsr["total_us"] if bcsr else float("nan")
        for dt in map(jnp.dtype, args.dtypes.split(",")):
            f = f32.astype(dt)
            x = x32.astype(dt)
            for fam in args.families.split(","):
                conv = jax.jit(lambda x, f, fam=fam: jaxsparse.sparse_conv(x, f, padding="VALID", precision="highest",
                                                                          kernel=fam))
                t = kernel_time_us(conv, x, f)["total_us"]
                row = dict(layer=name, batch=batch, hw=hw, dtype=dt.name, family=fam, sparse_us=t,
                           dense_f32_highest_us=dense_us, bcsr_f32_us=bcsr_us, m=f.out_channels, k=f.in_channels,
                           nnz=f.nnz, device=jax.devices()[0].device_kind, jax=jax.__version__)
                rows.append(row)
                print(f"{name:34s} {batch:3d} {dt.name:8s} {fam:7s} {t:9.1f} {dense_us:20.1f} {t / dense_us:12.3f} "
                      f"{bcsr_us:8.1f}", flush=True)
if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
