r"""Whole-model benchmark: dense vs sparsified VGG-16 and ResNet-50 forward under jax.jit.

For each model, precision mode, batch size and sparsity: the dense model (XLA
convolutions, pruned weights so both compute the same function), the model
sparsified with ``policy='sparse'`` (every conv a `SparseConv`), and optionally
``policy='auto'`` (per-layer choice by chain-method timings). The time is the
median wall time of one synchronised jitted forward call (after compile and
warm-up); speedup = dense / sparse. Writes ``whole_model.json`` (the result envelope
of ``common.py``) to ``--out``, after every row.

The defaults are a small CPU configuration that runs in well under a minute
(width 1/8, 32x32 inputs). The ImageNet configuration:

    python3 experiments/whole_model_benchmark.py --width=1 --resolution=224 \
        --modes=float32_highest,float32,bfloat16 --out=results_tmp/whole_model_gpu
"""

from __future__ import annotations

import time

from absl import app, flags

import common
import layers as L

common.define_flags("budget_s", "out", model=["vgg16", "resnet50"], batch=[1, 32], sparsity=[0.8, 0.9, 0.95],
                    modes=["float32_highest"], repeats=5, choices={"model": ("vgg16", "resnet50")})
flags.DEFINE_float("width", 0.125, "Channel width multiplier (1 = the published models).")
flags.DEFINE_integer("resolution", 32, "Input side (224 = ImageNet).")
flags.DEFINE_bool("auto", False, "Also time policy='auto' (per-layer chain timings; slow).")
FLAGS = flags.FLAGS


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


def compiled(model):
    """A jitted forward over the model's state: what jit-compiled inference runs.

    `nnx.split` once and `jax.jit` a pure function of the state, so a timed call
    pays no per-call graph traversal of the Python module tree (which `nnx.jit`
    does and which would hide the convolutions at batch 1).
    """
    import jax
    from flax import nnx
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)), state


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    from jaxsparse.benchmark import environment, kernel_time_us, median_call_us, random_input
    from jaxsparse.nn import sparsify

    rows, skipped = [], []
    start = time.time()
    env = environment()
    out = common.output_path(FLAGS.out or common.default_out("whole_model"), "whole_model.json")
    repeats = common.auto_repeats(FLAGS.repeats)

    def save():
        common.write_result(common.envelope("whole_model", common.flag_values(__name__), rows, start,
                                            skipped, env), out)

    header = (f"{'model':<9} {'mode':<16} {'batch':>5} {'sparsity':>8} {'dense ms':>9} {'sparse ms':>9} "
              f"{'speedup':>7} {'dense kern ms':>13} {'sparse kern ms':>14}")
    print(header + ("  auto ms (sparse layers)" if FLAGS.auto else ""))
    for name in FLAGS.model:
        for mode in FLAGS.modes:
            dtype_name, precision = L.MODES[mode]
            dtype = jnp.dtype(dtype_name)
            model = build(name, dtype, getattr(jax.lax.Precision, precision))
            for batch in FLAGS.batch:
                if FLAGS.budget_s and time.time() - start > FLAGS.budget_s:
                    skipped.append(f"{name} {mode} b{batch}")
                    continue
                x = random_input((batch, FLAGS.resolution, FLAGS.resolution, 3), dtype, seed=batch)
                for s in FLAGS.sparsity:
                    dense, _ = sparsify(model, s, policy="dense")
                    sparse, report = sparsify(model, s, policy="sparse")
                    fd, sd = compiled(dense)
                    fs, ss = compiled(sparse)
                    y_dense, y_sparse = fd(sd, x), fs(ss, x)
                    err = float(jnp.max(jnp.abs(y_dense.astype(jnp.float32) - y_sparse.astype(jnp.float32))))
                    scale = float(jnp.max(jnp.abs(y_dense.astype(jnp.float32)))) or 1.0
                    row = dict(model=name, mode=mode, dtype=dtype_name, precision=precision, batch=batch,
                               sparsity=s, width=FLAGS.width, resolution=FLAGS.resolution,
                               convs=len(report), max_rel_diff=err / scale,
                               dense_us=median_call_us(fd, sd, x, repeats=repeats),
                               sparse_us=median_call_us(fs, ss, x, repeats=repeats))
                    row["speedup"] = row["dense_us"] / row["sparse_us"]
                    kd, ks = kernel_time_us(fd, sd, x), kernel_time_us(fs, ss, x)  # None on a CPU
                    row["dense_kernel_us"] = kd["total_us"] if kd else None
                    row["sparse_kernel_us"] = ks["total_us"] if ks else None
                    kern = (lambda v: f"{v / 1e3:.3f}" if v else "-")
                    line = (f"{name:<9} {mode:<16} {batch:>5} {s:>8.2f} {row['dense_us'] / 1e3:>9.3f} "
                            f"{row['sparse_us'] / 1e3:>9.3f} {row['speedup']:>7.2f} "
                            f"{kern(row['dense_kernel_us']):>13} {kern(row['sparse_kernel_us']):>14}")
                    if FLAGS.auto:
                        auto, auto_report = sparsify(model, s, policy="auto", sample_input=x)
                        fa, sa = compiled(auto)
                        fa(sa, x)
                        row["auto_us"] = median_call_us(fa, sa, x, repeats=repeats)
                        row["auto_sparse_layers"] = sum(d.choice == "sparse" for d in auto_report)
                        row["auto_report"] = auto_report.to_json()["layers"]
                        line += f"  {row['auto_us'] / 1e3:.3f} ({row['auto_sparse_layers']}/{len(auto_report)})"
                    print(line, flush=True)
                    rows.append(row)
                    save()  # a checkpoint per row
    save()
    if skipped:
        print("skipped (time budget): " + ", ".join(skipped))
    print(f"wrote {out} ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    app.run(main)
