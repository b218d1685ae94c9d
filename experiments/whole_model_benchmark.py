"""Whole-model benchmark: dense vs sparsified VGG-16 and ResNet-50 forward under jax.jit.

For each model, precision mode, batch size and sparsity: the dense model (XLA
convolutions, pruned weights so both compute the same function), the model
sparsified with ``policy='sparse'`` (every conv a `SparseConv`), and optionally
``policy='auto'`` (per-layer choice by chain-method timings). The time is the
median wall time of one synchronised jitted forward call (after compile and
warm-up); speedup = dense / sparse.

The defaults are a small CPU configuration that runs in well under a minute
(width 1/8, 32x32 inputs). The ImageNet configuration:

  python experiments/whole_model_benchmark.py --width=1 --resolution=224 \
      --modes=float32_highest,float32,bfloat16 --out=experiments/results/whole_model_h200.json
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

flags.DEFINE_list("models", ["vgg16", "resnet50"], "Models: vgg16, resnet50.")
flags.DEFINE_list("batch", ["1", "32"], "Batch sizes.")
flags.DEFINE_list("sparsity", ["0.8", "0.9", "0.95"], "Sparsities (every convolution, magnitude pruning).")
flags.DEFINE_list("modes", ["float32_highest"], "Precision modes: float32_highest, float32, bfloat16, float16.")
flags.DEFINE_float("width", 0.125, "Channel width multiplier (1 = the published models).")
flags.DEFINE_integer("resolution", 32, "Input side (224 = ImageNet).")
flags.DEFINE_integer("repeats", 5, "Timed calls (median).")
flags.DEFINE_bool("auto", False, "Also time policy='auto' (per-layer chain timings; slow).")
flags.DEFINE_string("out", "", "JSON output path (default experiments/results/whole_model_<platform>.json).")
FLAGS = flags.FLAGS

MODES = {
    "float32_highest": ("float32", "HIGHEST"),
    "float32": ("float32", "DEFAULT"),      # TF32 tensor cores on recent NVIDIA GPUs
    "bfloat16": ("bfloat16", "DEFAULT"),
    "float16": ("float16", "DEFAULT"),
}


def build(name, dtype, precision, seed=0):
    from flax import nnx
    from jaxsparse.nn import models
    if name == "vgg16":
        model = models.VGG16(1000, width=FLAGS.width, resolution=FLAGS.resolution,
                             hidden=max(16, int(4096 * FLAGS.width)), dtype=dtype, rngs=nnx.Rngs(seed))
    elif name == "resnet50":
        model = models.ResNet50(1000, width=FLAGS.width, dtype=dtype, rngs=nnx.Rngs(seed))
    else:
        raise ValueError(f"unknown model {name!r}")
    model.eval()
    for _, node in nnx.iter_graph(model):
        if isinstance(node, (nnx.Conv, nnx.Linear)):
            node.precision = precision
    return model


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jaxsparse.benchmark import environment, median_call_us, random_input
    from jaxsparse.nn import sparsify

    rows = []
    fwd = nnx.jit(lambda m, x: m(x))
    start = time.perf_counter()
    header = f"{'model':<9} {'mode':<16} {'batch':>5} {'sparsity':>8} {'dense ms':>9} {'sparse ms':>9} {'speedup':>7}"
    print(header + ("  auto ms (sparse layers)" if FLAGS.auto else ""))
    for name in FLAGS.models:
        for mode in FLAGS.modes:
            dtype_name, precision = MODES[mode]
            dtype = jnp.dtype(dtype_name)
            model = build(name, dtype, getattr(jax.lax.Precision, precision))
            for batch in map(int, FLAGS.batch):
                x = random_input((batch, FLAGS.resolution, FLAGS.resolution, 3), dtype, seed=batch)
                for s in map(float, FLAGS.sparsity):
                    dense, _ = sparsify(model, s, policy="dense")
                    sparse, report = sparsify(model, s, policy="sparse")
                    y_dense, y_sparse = fwd(dense, x), fwd(sparse, x)
                    err = float(jnp.max(jnp.abs(y_dense.astype(jnp.float32) - y_sparse.astype(jnp.float32))))
                    scale = float(jnp.max(jnp.abs(y_dense.astype(jnp.float32)))) or 1.0
                    row = dict(model=name, mode=mode, dtype=dtype_name, precision=precision, batch=batch,
                               sparsity=s, width=FLAGS.width, resolution=FLAGS.resolution,
                               convs=len(report), max_rel_diff=err / scale,
                               dense_us=median_call_us(fwd, dense, x, repeats=FLAGS.repeats),
                               sparse_us=median_call_us(fwd, sparse, x, repeats=FLAGS.repeats))
                    row["speedup"] = row["dense_us"] / row["sparse_us"]
                    line = (f"{name:<9} {mode:<16} {batch:>5} {s:>8.2f} {row['dense_us'] / 1e3:>9.3f} "
                            f"{row['sparse_us'] / 1e3:>9.3f} {row['speedup']:>7.2f}")
                    if FLAGS.auto:
                        auto, auto_report = sparsify(model, s, policy="auto", sample_input=x)
                        fwd(auto, x)
                        row["auto_us"] = median_call_us(fwd, auto, x, repeats=FLAGS.repeats)
                        row["auto_sparse_layers"] = sum(d.choice == "sparse" for d in auto_report)
                        row["auto_report"] = auto_report.to_json()["layers"]
                        line += f"  {row['auto_us'] / 1e3:.3f} ({row['auto_sparse_layers']}/{len(auto_report)})"
                    print(line, flush=True)
                    rows.append(row)
    env = environment()
    out = FLAGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"whole_model_{env['platform']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"environment": env, "flags": {k: FLAGS[k].value for k in
                   ("models", "batch", "sparsity", "modes", "width", "resolution", "repeats", "auto")},
                   "elapsed_s": time.perf_counter() - start, "rows": rows}, f, indent=1)
    print(f"wrote {out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    app.run(main)
