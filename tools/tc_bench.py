"""Kernel time of the tensor-core 1x1 kernel (issue 14) against XLA dense at the same dtype.

    python3 tools/tc_bench.py --sparsity=0.9,0.95 --batches=1,32 --out=$OUT/tc.jsonl

The eight DLMC ResNet-50 1x1 layers; per layer, batch, sparsity and dtype (bfloat16, and
float32 at default precision = TF32 on both sides): summed GPU kernel time of one jitted
call (profiler trace) of `tc_conv1x1`, of XLA's dense convolution and of the FFMA
`sparse_conv` (exact), and the plan's union fraction u.
"""
import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxsparse
from jaxsparse import tc_conv1x1
from jaxsparse.benchmark import kernel_time_us
from jaxsparse.tc_conv import plan_for

from jaxsparse.dlmc import PEER_LAYERS as LAYERS, layer_hw

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--sparsity", default="0.9,0.95")
parser.add_argument("--batches", default="1,32")
parser.add_argument("--dtypes", default="bfloat16,float32")
parser.add_argument("--out", default="")
args = parser.parse_args()


def dense(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


out = None  # one JSON line per measurement, flushed, so a cut run keeps what it measured
if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    out = open(args.out, "w")
print(f"{'layer':32s} {'s':>5s} {'b':>3s} {'dtype':8s} {'u':>5s} {'tc us':>8s} {'dense us':>9s} "
      f"{'ffma us':>8s} {'dense/tc':>8s}")
for name in LAYERS:
    hw = layer_hw(name)
    for sp in map(float, args.sparsity.split(",")):
        for dt in map(jnp.dtype, args.dtypes.split(",")):
            f = jaxsparse.load_dlmc(name, sp, dtype=dt, seed=0)
            plan = plan_for(f)
            u = plan.stats()["u_padded"]
            w = jnp.asarray(f.todense())
            for batch in map(int, args.batches.split(",")):
                x = jnp.asarray(np.random.default_rng(batch).standard_normal((batch, hw, hw, f.in_channels)), dt)
                tc = kernel_time_us(jax.jit(lambda x, f: tc_conv1x1(x, f, plan)), x, f)["total_us"]
                dn = kernel_time_us(jax.jit(dense), x, w)["total_us"]
                ff = kernel_time_us(jax.jit(lambda x, f: jaxsparse.sparse_conv(x, f, padding="VALID")), x, f)["total_us"]
                row = dict(layer=name, sparsity=sp, batch=batch, dtype=dt.name, union_fraction=u, tc_us=tc,
                           dense_us=dn, ffma_us=ff, device=jax.devices()[0].device_kind, jax=jax.__version__)
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                print(f"{name:32s} {sp:5.2f} {batch:3d} {dt.name:8s} {u:5.2f} {tc:8.1f} {dn:9.1f} {ff:8.1f} "
                      f"{dn / tc:8.2f}", flush=True)
