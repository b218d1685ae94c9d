"""One sparse convolution per kernel family, for Nsight Compute (`ncu`) on the GPU machine.

    ncu --clock-control none -k regex:jaxsparse --section SpeedOfLight ... \
        python3 tools/ncu_layer.py --families=auto,rowbucket --layer=conv3_2 --batch=1

Each family runs the layer once after a warm-up call (ncu profiles every launch whose
name matches; skip the warm-up with --launch-skip or read the last ones). A family
``tc-<design>`` runs the tensor-core 1x1 kernel (`tc_conv1x1`) of that design instead;
``--dlmc=<layer>`` takes a DLMC ResNet-50 pattern and its input size instead of --layer.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse

LAYERS = {  # name: (H=W, Cin, Cout, kernel)
    "conv1_2": (224, 64, 64, (3, 3)), "conv3_2": (56, 256, 256, (3, 3)),
    "conv4_2": (28, 512, 512, (3, 3)), "conv5_1": (14, 512, 512, (3, 3)),
    "r50g3red": (14, 1024, 256, (1, 1)), "r50g1red": (56, 256, 64, (1, 1)),
    "r50g4red": (7, 2048, 512, (1, 1)),
}

parser = argparse.ArgumentParser()
parser.add_argument("--families", default="auto,rowbucket")
parser.add_argument("--layer", default="conv3_2", choices=sorted(LAYERS))
parser.add_argument("--batch", type=int, default=1)
parser.add_argument("--sparsity", type=float, default=0.9)
parser.add_argument("--dtype", default="float32")
parser.add_argument("--dlmc", default="", help="a DLMC ResNet-50 1x1 layer (jaxsparse.dlmc.PEER_LAYERS)")
args = parser.parse_args()

dt = jnp.dtype(args.dtype)
if args.dlmc:
    f = jaxsparse.load_dlmc(args.dlmc, args.sparsity, dtype=dt, seed=0)
    hw, cin = jaxsparse.dlmc.layer_hw(args.dlmc), f.in_channels
else:
    hw, cin, cout, k = LAYERS[args.layer]
    f = jaxsparse.random_filter(0, k, cin, cout, args.sparsity, dtype=dt)
x = jnp.asarray(np.random.default_rng(0).standard_normal((args.batch, hw, hw, cin)), dt)
for fam in args.families.split(","):
    if fam.startswith("tc-"):
        plan = jaxsparse.tc_conv.plan_for(f)
        fn = jax.jit(lambda x, f, design=fam[3:]: jaxsparse.tc_conv1x1(x, f, plan, design=design))
    else:
        fn = jax.jit(lambda x, f, fam=fam: jaxsparse.sparse_conv(x, f, kernel=fam))
    jax.block_until_ready(fn(x, f))  # warm-up (compile)
    y = jax.block_until_ready(fn(x, f))
    print(fam, args.layer, args.batch, args.sparsity, dt.name, float(jnp.abs(y.astype(jnp.float32)).mean()), flush=True)
