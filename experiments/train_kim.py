"""CNN-non-static (Kim, 2014) trained dense, pruned with retraining, fine-tuned sparse.

For each dataset (MR with a fixed held-out split, SST-2 with its own splits):

1. train the dense model;
2. for each target sparsity: from the dense weights, gradual magnitude pruning
   (Zhu and Gupta's cubic schedule, per layer, on the three convolutions) with
   masked training, then `sparsify` turns the pruned convolutions into
   `SparseConv` layers and the sparse model is fine-tuned on the native sparse
   kernels (values trainable, pattern fixed: pruned weights stay zero);
3. report test accuracy per sparsity, training time per step (dense model vs
   sparse model) and inference time per batch, all measured in this run.

Small default (CPU, a few minutes):  python3 experiments/train_kim.py
Closer to the paper (300-d embeddings, 100 maps, more epochs):
    python3 experiments/train_kim.py --embed_dim=300 --feature_maps=100 --epochs=10 \
        --prune_epochs=4 --finetune_epochs=3
Embeddings are randomly initialised (no word2vec vectors ship with the data),
so the dense baseline is CNN-rand-like; the paper's non-static model used
pretrained word2vec.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import sentences
from jaxsparse import benchmark
from jaxsparse.nn import sparsify
from jaxsparse.nn.models import CNNNonStatic
from jaxsparse.pruning import MagnitudePruner, polynomial_sparsity

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["mr", "sst2"], "mr and/or sst2")
flags.DEFINE_list("sparsity", ["0.5", "0.7", "0.9", "0.95"], "target sparsities of the convolutions")
flags.DEFINE_integer("embed_dim", 64, "word-embedding size (the paper: 300)")
flags.DEFINE_integer("feature_maps", 50, "feature maps per filter width (the paper: 100)")
flags.DEFINE_integer("max_len", 56, "sentence length (tokens; longer sentences are cut)")
flags.DEFINE_integer("batch", 50, "batch size (the paper: 50)")
flags.DEFINE_integer("epochs", 3, "dense training epochs")
flags.DEFINE_integer("prune_epochs", 1, "epochs of gradual pruning with masked training")
flags.DEFINE_integer("finetune_epochs", 1, "epochs of sparse fine-tuning after sparsify")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate")
flags.DEFINE_integer("train_limit", None, "use only this many training sentences (quick runs)")
flags.DEFINE_integer("timing_steps", 10, "repeats for the step and inference timings")
flags.DEFINE_integer("seed", 0, "seed for the split, initialisation and batches")
flags.DEFINE_string("out", "experiments/results/kim", "output folder (JSON + PNG)")


def batches(split, batch, rng):
    order = rng.permutation(len(split.labels))
    for start in range(0, len(order) - batch + 1, batch):  # full batches: one jit shape
        idx = order[start: start + batch]
        yield jnp.asarray(split.tokens[idx]), jnp.asarray(split.labels[idx])


def loss_fn(model, tokens, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model(tokens), labels).mean()


@nnx.jit
def train_step(model, optimizer, tokens, labels):
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, labels)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model, tokens):
    return jnp.argmax(model(tokens), axis=-1)


def accuracy(model, split, batch=500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(split.labels), batch):
        tokens = jnp.asarray(split.tokens[start: start + batch])
        correct += int(jnp.sum(predict(model, tokens) == jnp.asarray(split.labels[start: start + batch])))
    model.train()
    return correct / len(split.labels)


def train(model, data, epochs, *, lr, batch, seed, desc, pruner=None, schedule=None):
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(data.train.labels) // batch
    step = 0
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        for tokens, labels in batches(data.train, batch, rng):
            if pruner is not None:
                pruner.update(model, schedule(step))
            train_step(model, optimizer, tokens, labels)
            if pruner is not None:
                pruner.apply(model)  # pruned weights stay exactly zero
            step += 1
    return optimizer, steps_per_epoch


def median_us(fn, repeats):
    return benchmark.median_call_us(fn, repeats=repeats, warmup=2)


def step_time_us(model, data, batch, repeats, lr) -> float:
    """Median time of one jitted training step (forward, backward, Adam update)."""
    model = nnx.clone(model)
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
    tokens = jnp.asarray(data.train.tokens[:batch])
    labels = jnp.asarray(data.train.labels[:batch])
    return median_us(lambda: train_step(model, optimizer, tokens, labels), repeats)


def inference_time_us(model, data, batch, repeats) -> float:
    model.eval()
    tokens = jnp.asarray(data.test.tokens[:batch])
    return median_us(lambda: predict(model, tokens), repeats)


def run_dataset(name) -> dict:
    data = sentences.load(name, max_len=FLAGS.max_len, seed=FLAGS.seed, train_limit=FLAGS.train_limit)
    print(f"[{name}] {data.split_note}; vocab {len(data.vocab)}, train {len(data.train.labels)}, "
          f"test {len(data.test.labels)}")

    def new_model():
        return CNNNonStatic(len(data.vocab), data.num_classes, embed_dim=FLAGS.embed_dim,
                            feature_maps=FLAGS.feature_maps, rngs=nnx.Rngs(FLAGS.seed))

    dense = new_model()
    t0 = time.perf_counter()
    _, steps_per_epoch = train(dense, data, FLAGS.epochs, lr=FLAGS.lr, batch=FLAGS.batch, seed=FLAGS.seed,
                               desc=f"{name} dense")
    dense_train_s = time.perf_counter() - t0
    dense_acc = accuracy(dense, data.test)
    dense_step = step_time_us(dense, data, FLAGS.batch, FLAGS.timing_steps, FLAGS.lr)
    dense_infer = inference_time_us(nnx.clone(dense), data, FLAGS.batch, FLAGS.timing_steps)
    print(f"[{name}] dense: test accuracy {dense_acc:.4f}, train step {dense_step:.0f} µs, "
          f"inference {dense_infer:.0f} µs / batch of {FLAGS.batch}")
    rows = [dict(sparsity=0.0, accuracy=dense_acc, pruned_accuracy=dense_acc, train_step_us=dense_step,
                 inference_us=dense_infer, kind="dense")]

    for s in [float(v) for v in FLAGS.sparsity]:
        model = nnx.clone(dense)
        pruner = MagnitudePruner(model, scope="layer")
        prune_steps = max(1, FLAGS.prune_epochs * steps_per_epoch)
        schedule = lambda step, s=s: polynomial_sparsity(step, final=s, begin_step=0,
                                                         end_step=max(prune_steps * 3 // 4, 1),
                                                         frequency=max(prune_steps // 20, 1))
        train(model, data, FLAGS.prune_epochs, lr=FLAGS.lr, batch=FLAGS.batch, seed=FLAGS.seed + 1,
              desc=f"{name} prune {s}", pruner=pruner, schedule=schedule)
        pruner.update(model, s)
        pruned_acc = accuracy(model, data.test)
        sparse_model, report = sparsify(model, s, policy="sparse")
        # The sparse model computes the same function as the masked dense one.
        sparse_before_ft = accuracy(sparse_model, data.test)
        train(sparse_model, data, FLAGS.finetune_epochs, lr=FLAGS.lr / 2, batch=FLAGS.batch,
              seed=FLAGS.seed + 2, desc=f"{name} sparse fine-tune {s}")
        acc = accuracy(sparse_model, data.test)
        step_us = step_time_us(sparse_model, data, FLAGS.batch, FLAGS.timing_steps, FLAGS.lr)
        infer_us = inference_time_us(nnx.clone(sparse_model), data, FLAGS.batch, FLAGS.timing_steps)
        layer_sparsity = {"/".join(map(str, p)): round(v, 4) for p, v in pruner.layer_sparsity().items()}
        print(f"[{name}] sparsity {s:.2f}: after pruning {pruned_acc:.4f} (sparse model {sparse_before_ft:.4f}), "
              f"after sparse fine-tuning {acc:.4f}; train step {step_us:.0f} µs, inference {infer_us:.0f} µs")
        rows.append(dict(sparsity=s, accuracy=acc, pruned_accuracy=pruned_acc,
                         sparse_model_accuracy_before_finetune=sparse_before_ft, train_step_us=step_us,
                         inference_us=infer_us, kind="sparse", layer_sparsity=layer_sparsity,
                         decisions=report.to_json()))
    return dict(dataset=name, split=data.split_note, vocab=len(data.vocab), train_size=len(data.train.labels),
                test_size=len(data.test.labels), dense_train_seconds=dense_train_s, rows=rows)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for res in results:
        rows = res["rows"]
        xs = [100 * r["sparsity"] for r in rows]
        ax.plot(xs, [100 * r["accuracy"] for r in rows], "o-", label=f"{res['dataset']} (sparse, fine-tuned)")
        ax.plot(xs, [100 * r["pruned_accuracy"] for r in rows], "x--", alpha=0.6,
                label=f"{res['dataset']} (after pruning)")
        ax.axhline(100 * rows[0]["accuracy"], color="gray", lw=0.6)
    ax.set_xlabel("convolution sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("CNN-non-static: accuracy vs sparsity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_dataset(name) for name in FLAGS.datasets]
    record = dict(environment=benchmark.environment(), flags={k: FLAGS[k].value for k in (
        "datasets", "sparsity", "embed_dim", "feature_maps", "max_len", "batch", "epochs", "prune_epochs",
        "finetune_epochs", "lr", "train_limit", "seed")}, results=results)
    (out / "kim_accuracy.json").write_text(json.dumps(record, indent=1))
    plot(results, out / "kim_accuracy.png")
    print(f"\n{'dataset':8} {'sparsity':>8} {'accuracy':>9} {'pruned':>8} {'step µs':>9} {'infer µs':>9}")
    for res in results:
        for r in res["rows"]:
            print(f"{res['dataset']:8} {r['sparsity']:8.2f} {r['accuracy']:9.4f} {r['pruned_accuracy']:8.4f} "
                  f"{r['train_step_us']:9.0f} {r['inference_us']:9.0f}")
    print(f"wrote {out / 'kim_accuracy.json'} and {out / 'kim_accuracy.png'}")


if __name__ == "__main__":
    app.run(main)
