"""Kernel time of the tensor-core kernels (issue 14) against XLA dense at the same dtype.

    python3 tools/tc_bench.py --sparsity=0.9,0.95 --batches=1,32 --out=$OUT/tc.jsonl

The eight DLMC ResNet-50 1x1 layers (and with --vgg VGG-16 3x3 layers, on the chunked
design's direct KxK kernel); per layer, batch, sparsity, dtype (bfloat16, and float32 at
default precision = TF32 on both sides) and kernel variant (design, plan window, tile):
GPU kernel time of one jitted call (profiler trace) of `tc_conv` (in all, with
the packing of the weights, and of the tensor-core kernel alone), of XLA's dense
convolution, optionally of the FFMA `sparse_conv` (exact), and the plan's union fraction u.
"""
import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxsparse
from jaxsparse import tc_conv
from jaxsparse.benchmark import kernel_time_us
from jaxsparse.tc_conv import plan_for

from jaxsparse.dlmc import PEER_LAYERS as LAYERS, layer_hw

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--sparsity", default="0.9,0.95")
parser.add_argument("--batches", default="1,32")
parser.add_argument("--dtypes", default="bfloat16,float32")
parser.add_argument("--variants", default="slab:0,chunked:0,chunked:128",
                    help="kernel design:plan window[:tile pixels] (tc_conv.DESIGNS; window 0 clusters all "
                         "channels; tile pixels 16/32/64 for the chunked design, else its own choice)")
parser.add_argument("--ffma", action="store_true", help="also time the exact FFMA sparse_conv")
parser.add_argument("--layers", default=",".join(LAYERS), help="DLMC layers; empty for none")
parser.add_argument("--vgg", default="", help="VGG-16 3x3 layers (conv1_2,conv2_2,conv3_2,conv4_2,conv5_1), "
                    "magnitude-pruned random weights (the chunked design only: slab variants are skipped)")
parser.add_argument("--out", default="")
args = parser.parse_args()
variants = [(v.split(":") + ["0", "0"])[:3] for v in args.variants.split(",")]
variants = [(d, int(w), int(t) or None) for d, w, t in variants]


def dense(x, w):  # SAME: VALID for the 1x1 layers
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def tc_time(fn, x, f):
    """(total µs of the jitted call, incl. packing the weights; µs of the tensor-core kernel)."""
    t = kernel_time_us(jax.jit(fn), x, f)
    return t["total_us"], sum(us for name, us in t["kernels"].items() if "TensorCore" in name)


out = None  # one JSON line per measurement, flushed, so a cut run keeps what it measured
if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    out = open(args.out, "w")
print(f"{'layer':30s} {'s':>5s} {'b':>3s} {'dtype':8s} {'variant':15s} {'u':>5s} {'tc us':>7s} {'kern us':>7s} "
      f"{'dense us':>8s} {'dense/kern':>10s}")
VGG = {"conv1_2": (224, 64, 64), "conv2_2": (112, 128, 128), "conv3_2": (56, 256, 256),
       "conv4_2": (28, 512, 512), "conv5_1": (14, 512, 512)}  # H = W, Cin, Cout of the 3x3 layers


def cases():
    """(name, H = W, filter maker) of every requested layer."""
    for name in filter(None, args.layers.split(",")):
        yield name, layer_hw(name), lambda sp, dt, name=name: jaxsparse.load_dlmc(name, sp, dtype=dt, seed=0)
    for name in filter(None, args.vgg.split(",")):
        hw, cin, cout = VGG[name]
        yield "vgg." + name, hw, lambda sp, dt, cin=cin, cout=cout: jaxsparse.random_filter(
            0, (3, 3), cin, cout, sp, dtype=dt)


for name, hw, make in cases():
    for sp in map(float, args.sparsity.split(",")):
        for dt in map(jnp.dtype, args.dtypes.split(",")):
            f = make(sp, dt)
            w = jnp.asarray(f.todense())
            for batch in map(int, args.batches.split(",")):
                x = jnp.asarray(np.random.default_rng(batch).standard_normal((batch, hw, hw, f.in_channels)), dt)
                dn = kernel_time_us(jax.jit(dense), x, w)["total_us"]
                ff = (kernel_time_us(jax.jit(lambda x, f: jaxsparse.sparse_conv(x, f, padding="SAME")), x, f)
                      ["total_us"] if args.ffma else None)
                for design, window, tile in variants:
                    if design != "chunked" and f.kernel_size != (1, 1):
                        continue  # the slab design is 1x1 only
                    plan = plan_for(f, window=window)
                    u = plan.stats()["u_padded"]
                    tc, kern = tc_time(lambda x, f: tc_conv(x, f, plan, padding="SAME", design=design,
                                                            tile_pixels=tile), x, f)
                    row = dict(layer=name, sparsity=sp, batch=batch, dtype=dt.name, design=design, window=window,
                               tile_pixels=tile,
                               union_fraction=u, tc_us=tc, tc_kernel_us=kern, dense_us=dn, ffma_us=ff,
                               device=jax.devices()[0].device_kind, jax=jax.__version__)
                    if out:
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                    print(f"{name.removeprefix('bottleneck_'):30s} {sp:5.2f} {batch:3d} {dt.name:8s} {design + ':' + str(window) + ':' + str(tile or 'auto'):15s} "
                          f"{u:5.2f} {tc:7.1f} {kern:7.1f} {dn:8.1f} {dn / kern:10.2f}", flush=True)
