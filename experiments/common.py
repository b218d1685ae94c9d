"""What every experiment script shares: the flag vocabulary, output paths, the JSON result envelope.

**Flags.** A flag's name, type and help text are defined once, in `VOCABULARY`; a script picks
the flags it takes with ``define_flags('seed', 'progress', modes=['float32'], ...)`` (a keyword
sets that script's default). They become the script's own flags, so its ``--help`` lists them.
The names used before this vocabulary (``--dtype``, ``--reps``, ``--time_budget_s``,
``--models``, ``--timing_steps``) are still accepted, as aliases that only ``--helpfull`` lists.

**Results.** Every script writes one JSON object through `write_result`::

    {"kind", "environment", "flags", "elapsed_s", "skipped", "rows", ...script-specific keys}

and `read_result` reads it back, including the files written before the envelope existed
(which said ``config``, ``wall_s`` or ``env``).

**Outputs** go to ``--out``, a folder; by default ``results_tmp/<script>_<platform>`` at the
repository root, which git ignores, so a run with default flags never overwrites the committed
results under ``experiments/results``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from absl import flags

import layers as L

# define_flags calls absl's DEFINE_* on behalf of the script that calls it: disclaiming this
# module makes absl attribute those flags to that script, whose --help then lists them.
flags.disclaim_key_flags()

FLAGS = flags.FLAGS
REPO = Path(__file__).resolve().parent.parent
UNTRACKED_RESULTS = REPO / "results_tmp"  # in .gitignore


# ---- the flag vocabulary -----------------------------------------------------------


class _NumberListParser(flags.ListParser):
    """A comma-separated list of ints or floats (``--sparsity=0.8,0.9``); empty gives []."""

    def __init__(self, number: type):
        super().__init__()
        self.number = number

    def parse(self, argument):
        values = super().parse(argument)
        try:
            return [self.number(v) for v in values]
        except ValueError as err:
            raise ValueError(f"expected comma-separated {self.number.__name__} values: {err}") from None

    def flag_type(self):
        return f"comma-separated list of {self.number.__name__}"


@dataclasses.dataclass(frozen=True)
class Flag:
    kind: str                 # absl DEFINE_<kind>, or 'ints' / 'floats' (comma-separated numbers)
    help: str
    default: Any
    choices: tuple = ()       # allowed values (of an enum, or of every element of a list)
    old_names: tuple = ()     # accepted as aliases


VOCABULARY = {
    "model": Flag("list", "Models to run.", ["all"], old_names=("models",)),
    "modes": Flag("list", "Precision modes: float32_highest (dense at Precision.HIGHEST), float32 "
                  "(default precision: TF32 on recent GPUs), bfloat16, float16.", ["float32"],
                  choices=tuple(L.MODES), old_names=("dtype",)),
    "sparsity": Flag("floats", "Sparsities (fraction of zero weights).", [0.9]),
    "batch": Flag("ints", "Batch sizes.", [1]),
    "cnn_batch": Flag("ints", "Extra batch sizes for the sentence CNN (the paper's 50); empty for none.",
                      [50]),
    "pattern": Flag("enum", "Sparsity pattern: magnitude pruning of random weights, the DLMC ResNet-50 "
                    "patterns (other layers: magnitude), or uniform random rows.", "magnitude",
                    choices=L.PATTERNS),
    "repeats": Flag("integer", "Timed calls per measurement, median taken (0 = auto: 15 on a GPU, 5 on "
                    "a CPU).", 0, old_names=("reps", "timing_steps")),
    "budget_s": Flag("float", "Start no new measurement (layer, network, model) after this many seconds; "
                     "what was skipped is listed under 'skipped' in the JSON (0 = no budget).", 0.0,
                     old_names=("time_budget_s",)),
    "out": Flag("string", "Output folder (default: results_tmp/<script>_<platform>, git-ignored); a path "
                "ending in the result file's extension (.json, .md) names that file itself.", ""),
    "scale": Flag("float", "Spatial downscale factor of the layers (0 = auto: 1 on a GPU; on a CPU 4 for "
                  "the sweep, 8 for the network run).", 0.0),
    "seed": Flag("integer", "Seed of the random weights, inputs and data order.", 0),
    "progress": Flag("bool", "Show a progress bar.", True),
    "kernel_time": Flag("enum", "GPU kernel time from a profiler trace: for every layer/network, only "
                        "for the unchainable layers, or none.", "all", choices=("all", "unchainable", "none")),
    "k_small": Flag("integer", "Length of the short chain of the chain method (0 = auto: 4 on a GPU, "
                    "2 on a CPU).", 0),
    "k_large": Flag("integer", "Length of the long chain (0 = auto: 20 on a GPU, 8 on a CPU).", 0),
    "bcsr": Flag("bool", "Also time jax.experimental.sparse BCSR on the stride-1 1x1 layers (float32).",
                 True),
    "tensor_cores": Flag("bool", "Also time the tensor-core family (jaxsparse.tc_conv) on every layer, at "
                         "the modes that allow tensor cores (not float32_highest).", True),
}
ALIASES = {old: name for name, f in VOCABULARY.items() for old in f.old_names}


def define_flags(*names: str, choices: dict[str, Sequence[str]] | None = None,
                 helps: dict[str, str] | None = None, **defaults) -> None:
    """Define vocabulary flags for the calling script: ``names`` with the vocabulary's default,
    keywords with the script's own; ``choices`` restricts a flag's values for this script
    (e.g. its models), ``helps`` replaces a help text where the script's default means something
    else. A flag already defined in this process (another script imported first, as in the
    tests) is declared a key flag of the caller instead."""
    for name, default in [(n, VOCABULARY[n].default) for n in names] + list(defaults.items()):
        spec = VOCABULARY[name]
        allowed = tuple((choices or {}).get(name, spec.choices))
        if name in FLAGS:
            flags.declare_key_flag(name)
        else:
            help_ = (helps or {}).get(name, spec.help)
            help_ += f" Choices: {', '.join(allowed)}." if name in (choices or {}) else ""
            if spec.kind in ("ints", "floats"):
                flags.DEFINE(_NumberListParser(int if spec.kind == "ints" else float), name, default, help_,
                             serializer=flags.ListSerializer(","))
            elif spec.kind == "enum":
                flags.DEFINE_enum(name, default, list(allowed), help_)
            else:
                getattr(flags, f"DEFINE_{spec.kind}")(name, default, help_)
            if allowed and spec.kind == "list":
                flags.register_validator(name, lambda v, a=allowed: all(x in a for x in v),
                                         message=f"--{name} takes values from {', '.join(allowed)}")
        for old in spec.old_names:  # attributed to this module: accepted, but only --helpfull lists them
            if old not in FLAGS:
                flags.DEFINE_alias(old, name, module_name=__name__)


def flag_values(module_name: str) -> dict:
    """The values of a script's own flags (``__name__`` of the script), aliases left out."""
    names = {f.name for f in FLAGS.get_key_flags_for_module(module_name)}
    return {n: FLAGS[n].value for n in sorted(names - set(ALIASES))}


# ---- automatic values ----------------------------------------------------------------


def _gpu() -> bool:
    from jaxsparse.benchmark import gpu_present
    return gpu_present()


def auto_scale(scale: float, cpu_default: float = 4.0) -> float:
    return float(scale) if scale and scale > 0 else 1.0 if _gpu() else cpu_default


def auto_repeats(repeats: int) -> int:
    return repeats if repeats and repeats > 0 else 15 if _gpu() else 5


def auto_chain(k_small: int, k_large: int) -> tuple[int, int]:
    gpu = _gpu()
    return k_small or (4 if gpu else 2), k_large or (20 if gpu else 8)


def check_backend():
    """Under JAXSPARSE_REQUIRE_CUDA=1 the scripts must run the CUDA kernels, nothing else:
    no GPU, or a sparse_conv that does not lower to the custom call, is an error."""
    import jax
    import jax.numpy as jnp
    from jaxsparse.benchmark import random_input
    from jaxsparse.options import require_cuda

    if not require_cuda():
        return
    if not _gpu():
        raise RuntimeError("JAXSPARSE_REQUIRE_CUDA=1 but no GPU is visible to JAX")
    layer = L.VGG16[5].scaled(8)
    filt, _ = L.make_filter(layer, 0.9)
    x = random_input(layer.input_shape(1), jnp.float32)
    text = jax.jit(lambda x, f: L.sparse_conv(x, f, layer)).lower(x, filt).as_text()
    if "jaxsparse_sparse_conv" not in text:
        raise RuntimeError("JAXSPARSE_REQUIRE_CUDA=1 but sparse_conv did not lower to the CUDA custom call")


# ---- output paths ----------------------------------------------------------------------


def default_out(script: str) -> str:
    """``results_tmp/<script>_<platform>`` at the repository root (git-ignored)."""
    import jax
    return str(UNTRACKED_RESULTS / f"{script}_{jax.devices()[0].platform}")


def output_path(out: str, filename: str) -> str:
    """Where the output file ``filename`` goes for ``--out``: into the folder ``out``; or, when
    ``out`` names a file (``--out=run/bench.json``), that very file for the file of its extension
    and its folder for the others."""
    path = Path(out)
    if not path.suffix:
        return str(path / filename)
    return str(path) if path.suffix == Path(filename).suffix else str(path.parent / filename)


# ---- the result envelope -----------------------------------------------------------------


def envelope(kind: str, flag_dict: dict, rows: list, start: float, skipped: Sequence[str] = (),
             environment: dict | None = None, **extra) -> dict:
    """The result object every script writes; ``start`` is its ``time.time()`` at the start."""
    from jaxsparse.benchmark import environment as measure_environment
    return {"kind": kind, "environment": environment or measure_environment(), "flags": flag_dict,
            "elapsed_s": time.time() - start, "skipped": list(skipped), "rows": rows, **extra}


def json_safe(v):
    """JSON-safe: NaN/inf -> null, NumPy scalars -> Python numbers."""
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def write_result(result: dict, path: str) -> str:
    """Write a result (an `envelope`) as JSON; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(json_safe(result), f, indent=1)
    return path


_OLD_KEYS = {"config": "flags", "wall_s": "elapsed_s", "env": "environment"}


def read_result(path: str) -> dict:
    """A result file as an envelope; files written before the envelope get its key names."""
    with open(path) as f:
        result = json.load(f)
    for old, new in _OLD_KEYS.items():
        if old in result and new not in result:
            result[new] = result.pop(old)
    for run in result.get("runs", []):
        if "config" in run:
            run["flags"] = run.pop("config")
    result.setdefault("skipped", [])
    return result
