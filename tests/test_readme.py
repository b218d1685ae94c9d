"""The README's code runs as written, and the first use of `sparsify` says what it did.

Every ```python block of README.md runs as written, **in order, in one namespace** (as a
reader pasting them into one Python session: later blocks use `x`, `jax`, `nnx`, ... of
earlier ones), in a temporary directory (`save` writes a file) with a fresh timing cache, so
`policy="auto"` really times every layer. Each block's results are checked against a
reference, not just run. ```bash blocks are not run (CI runs the Quick start commands); the
files they name must exist.

Then issue #12 item 9, with injected timers: `sparsify(policy='auto')` shows on stderr where
it times and caches, a progress bar per layer and a summary naming the layers that stayed
dense and why.
"""

import re
import shlex
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

flax = pytest.importorskip("flax")
from flax import nnx  # noqa: E402

from jaxsparse.nn import SparseConv, sparsify  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def blocks(lang):
    return [code for tag, code in FENCE.findall(README) if tag == lang]


def test_code_fences_are_well_formed():
    """Fences open with a language tag alone and close with ``` alone on their line
    (text after a closing fence breaks the Markdown); python blocks are code, not output."""
    fences = [line for line in README.splitlines() if line.startswith("```")]
    assert len(fences) % 2 == 0, fences
    for opening, closing in zip(fences[::2], fences[1::2]):
        assert re.fullmatch(r"```(python|bash|text)", opening), opening
        assert closing == "```", closing
    assert len(FENCE.findall(README)) == len(fences) // 2
    for code in blocks("python"):
        compile(code, "README.md", "exec")


def test_bash_blocks_name_existing_files():
    commands = [line for code in blocks("bash") for line in code.splitlines() if line.strip()]
    assert commands
    for line in commands:
        for word in shlex.split(line):
            if word.endswith((".py", ".txt")) or word == "tests":
                assert (ROOT / word).exists(), f"{word} in {line!r}"


def test_python_blocks_run_in_order(tmp_path, monkeypatch, capfd):
    api, flax_, inference = blocks("python")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JAXSPARSE_CACHE_DIR", str(tmp_path / "cache"))
    ns = {}

    def run(code, name):
        exec(compile(code, f"README.md ({name})", "exec"), ns)

    run(api, "API")
    x, filt, y = ns["x"], ns["filt"], ns["y"]
    assert x.shape == (8, 56, 56, 64) and y.shape == (8, 56, 56, 128)
    assert filt.nnz == round(0.1 * 3 * 3 * 64 * 128)
    dense = lax.conv_general_dilated(x, jnp.asarray(filt.todense()), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=lax.Precision.HIGHEST)
    np.testing.assert_allclose(y, jax.nn.relu(dense), rtol=1e-5, atol=1e-4)

    run(flax_, "Flax")
    out, err = capfd.readouterr()
    assert ns["y"].shape == (8, 56, 56, 128)
    report, sparse_model, restored = ns["report"], ns["sparse_model"], ns["restored"]
    assert len(report) == 13 and {d.choice for d in report} <= {"sparse", "dense"}
    assert all(d.dense_us > 0 and d.sparse_us > 0 for d in report)  # really timed
    cache = tmp_path / "cache" / "sparsify_timings.json"
    assert cache.exists() and report.cache_path == str(cache)
    assert report.table() in out                                    # print(report)
    head = err.index("sparsify: timing 13 convolutions dense vs sparse on ")
    assert err[head:].splitlines()[0].endswith(f"timings cached in {cache}")  # said before timing
    assert head < err.index("13/13") < err.index("sparsify: " + report.summary())
    assert (tmp_path / "vgg16_sparse.safetensors").exists()
    sparse_paths = {d.path for d in report if d.choice == "sparse"}
    restored_sparse = {"/".join(map(str, p)) for p, n in nnx.iter_graph(restored) if isinstance(n, SparseConv)}
    assert restored_sparse == sparse_paths

    run(inference, "inference")
    logits = ns["logits"]
    assert logits.shape == (1, 10)
    restored.eval()                          # same weights, from the file; dropout off
    np.testing.assert_allclose(logits, restored(ns["images"]), rtol=1e-5, atol=1e-5)


# ---- first use of sparsify(policy='auto') (issue #12 item 9) ------------------------------

class Net(nnx.Module):
    """Four same-shape convolutions: cheap to build (VGG16 compiles an initializer per shape)."""

    def __init__(self):
        self.convs = nnx.List([nnx.Conv(4, 4, (3, 3), rngs=nnx.Rngs(0)) for _ in range(4)])

    def __call__(self, x):
        for conv in self.convs:
            x = conv(x)
        return x


X = jnp.zeros((1, 8, 8, 4))


def timer(sparse_slower=("convs/0", "convs/2")):
    """Dense 100 µs; sparse 200 µs on the named layers, 50 µs elsewhere."""
    return lambda spec, impl: 100.0 if impl == "dense" else (200.0 if spec.path in sparse_slower else 50.0)


def test_auto_shows_cache_progress_and_summary_on_stderr(tmp_path, capfd):
    _, report = sparsify(Net(), 0.9, policy="auto", sample_input=X, timer=timer(sparse_slower=()),
                         cache=tmp_path / "t.json", progress=True)   # one shape: timed once, then cached
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert out == ""
    assert report.device.startswith(jax.devices()[0].platform)   # 'cpu', 'gpu (NVIDIA H200)'
    assert lines[0] == (f"sparsify: timing 4 convolutions dense vs sparse on {report.device}; "
                        f"timings cached in {tmp_path / 't.json'}")
    assert "4/4" in err and "so far 4 sparse, 0 dense" in err   # the bar, per layer
    assert lines[-1] == "sparsify: " + report.summary()


def test_progress_without_tqdm_prints_a_line_per_layer(capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)   # import fails
    sparsify(Net(), 0.9, policy="auto", sample_input=X, timer=timer(), cache=False, progress=True)
    err = capfd.readouterr().err
    assert "timings not cached" in err
    assert "sparsify: convs/0: dense (dense was faster)" in err and "sparsify: convs/3: sparse" in err


def test_summary_names_the_dense_layers_and_why():
    _, report = sparsify(Net(), 0.9, policy="auto", sample_input=X, timer=timer(), cache=False)
    assert report.summary() == (f"policy=auto on {report.device}: 2 sparse, 2 dense, 0 unchanged; dense because: "
                                "dense was faster (2): convs/0, convs/2 (sparse 2.0x slower)")
    assert "dense  (dense was faster)" in report.table()


def test_summary_says_when_nothing_went_sparse():
    every = tuple(f"convs/{i}" for i in range(4))
    _, report = sparsify(Net(), 0.9, policy="auto", sample_input=X, timer=timer(every), cache=False)
    summary = report.summary()
    assert "0 sparse, 4 dense" in summary and "dense was faster (4): all 4 pruned layers" in summary
    assert "no layer went sparse" in summary and "save() stores every kernel in full" in summary
    _, forced = sparsify(Net(), {"convs/3": 0.9}, policy="dense")
    assert forced.summary() == ("policy=dense: 0 sparse, 1 dense, 3 unchanged; "
                                "dense because: policy='dense' (1): convs/3")
