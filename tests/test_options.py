"""Static options of a call: precision and kernel family, from the API to the FFI attributes."""

import ast
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxsparse
from jaxsparse import sparse_conv
from jaxsparse.options import (KERNEL_CODES, KERNEL_ENV, PLATFORM_KERNELS, ConvOptions, canonical_precision,
                               precision_from_json, precision_to_json)
from helpers import check_close, random_input

REPO = pathlib.Path(__file__).resolve().parent.parent
F = jaxsparse.random_filter(3, (3, 3), 4, 5, 0.5)
X = random_input(np.random.default_rng(3), (1, 6, 6, 4))


def eqn_params(fn, *args, primitive=jaxsparse.sparse_conv_p):
    jaxpr = jax.make_jaxpr(fn)(*args)
    eqns = [e for e in jaxpr.jaxpr.eqns if e.primitive is primitive]
    assert eqns, jaxpr
    return eqns[0].params


def ffi_attributes(fn, *args, target="jaxsparse_sparse_conv"):
    """The attribute dictionary of the first custom call to ``target`` in the lowered module."""
    text = jax.jit(fn).lower(*args).as_text()
    line = next(l for l in text.splitlines() if f"custom_call @{target}(" in l)
    config = re.search(r"mhlo.backend_config = \{(.*?)\}", line).group(1)
    return dict(re.findall(r"(\w+) = ([^,]+?)(?: : [^,]*)?(?:,|$)", config))


# ---- precision ------------------------------------------------------------------

@pytest.mark.parametrize("given, expected", [
    (None, lax.Precision.DEFAULT), ("default", lax.Precision.DEFAULT), ("high", lax.Precision.HIGH),
    ("highest", lax.Precision.HIGHEST), ("HIGHEST", lax.Precision.HIGHEST),
    ("tensorfloat32", lax.Precision.HIGH), ("float32", lax.Precision.HIGHEST), ("bfloat16", lax.Precision.DEFAULT),
    (lax.Precision.HIGH, lax.Precision.HIGH),
    ((lax.Precision.DEFAULT, lax.Precision.HIGHEST), lax.Precision.HIGHEST),  # the stricter governs
    (("high", None), lax.Precision.HIGH),
])
def test_precision_names_follow_lax(given, expected):
    assert canonical_precision(given) is expected


def test_precision_none_respects_default_matmul_precision():
    with jax.default_matmul_precision("highest"):
        assert canonical_precision(None) is lax.Precision.HIGHEST
        assert eqn_params(lambda x: sparse_conv(x, F), X)["options"].precision is lax.Precision.HIGHEST
    with jax.default_matmul_precision("tensorfloat32"):
        assert canonical_precision(None) is lax.Precision.HIGH
    assert eqn_params(lambda x: sparse_conv(x, F), X)["options"].precision is lax.Precision.DEFAULT


@pytest.mark.parametrize("bad", ["exact", 3, 1.5, ("high",), ("high", "low"), object()])
def test_bad_precision_names_the_allowed_values(bad):
    with pytest.raises(ValueError, match="precision must be None, a lax.Precision"):
        sparse_conv(X, F, precision=bad)


@pytest.mark.parametrize("precision", [None, "default", "high", lax.Precision.HIGHEST])
def test_float32_is_exact_at_every_precision_until_a_tf32_kernel_exists(precision):
    check_close(sparse_conv(X, F, precision=precision), X, F.todense())


def test_precision_and_kernel_reach_the_ffi_as_attributes():
    attrs = ffi_attributes(lambda x: sparse_conv(x, F, precision="highest"), X)
    assert attrs["precision"] == str(lax.Precision.HIGHEST.value) and attrs["kernel"] == "0"
    attrs = ffi_attributes(lambda x: sparse_conv(x, F, precision=lax.Precision.HIGH), X)
    assert attrs["precision"] == str(lax.Precision.HIGH.value)


def test_filter_gradient_keeps_the_forward_precision():
    fn = jax.grad(lambda d: jnp.sum(sparse_conv(X, F.with_data(d), precision="highest") ** 2))
    params = eqn_params(fn, F.data, primitive=jaxsparse.autodiff.sparse_conv_filter_grad_p)
    assert params["options"].precision is lax.Precision.HIGHEST


@pytest.mark.parametrize("value", [None, "highest", lax.Precision.HIGH, ("default", lax.Precision.HIGHEST)])
def test_precision_json_round_trip(value):
    assert canonical_precision(precision_from_json(precision_to_json(value))) is canonical_precision(value)


# ---- kernel family ----------------------------------------------------------------

@pytest.mark.parametrize("bad", ["tiled", "", 1, None.__class__])
def test_bad_kernel_names_the_allowed_ones(bad):
    with pytest.raises(ValueError, match="kernel must be one of"):
        sparse_conv(X, F, kernel=bad)


def test_gpu_only_kernel_on_the_cpu_names_the_cpu_kernels():
    with jax.default_device(jax.devices("cpu")[0]):
        with pytest.raises(ValueError, match=r"kernel 'naive' does not exist on cpu.*\('auto',\)"):
            jax.jit(lambda x: sparse_conv(x, F, kernel="naive")).lower(X)


def test_spmm_needs_an_unpadded_stride_one_1x1_convolution():
    with pytest.raises(ValueError, match="kernel='spmm' computes 1x1"):
        sparse_conv(X, F, kernel="spmm")
    f1 = jaxsparse.random_filter(4, (1, 1), 4, 5, 0.5)
    with pytest.raises(ValueError, match="kernel='spmm' computes 1x1"):
        sparse_conv(X, f1, kernel="spmm", strides=2)
    params = eqn_params(lambda x: sparse_conv(x, f1, kernel="spmm", padding="VALID"), X)
    assert params["options"] == ConvOptions("spmm", lax.Precision.DEFAULT)


def test_kernel_is_part_of_the_jaxpr_and_env_default_is_read_at_trace_time(monkeypatch):
    assert eqn_params(lambda x: sparse_conv(x, F, kernel="direct"), X)["options"].kernel == "direct"
    monkeypatch.setenv(KERNEL_ENV, "rowbucket")
    assert eqn_params(lambda x: sparse_conv(x, F), X)["options"].kernel == "rowbucket"
    assert eqn_params(lambda x: sparse_conv(x, F, kernel="auto"), X)["options"].kernel == "auto"
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="kernel must be one of"):
        sparse_conv(X, F)


def test_kernel_codes_match_the_native_enum():
    header = (REPO / "cuda" / "conv_options.h").read_text()
    enum = re.search(r"enum class KernelFamily : int \{(.*?)\}", header, re.S).group(1)
    native = {name.strip(): int(code) for name, code in re.findall(r"k(\w+) = (\d+)", enum)}
    assert {k.lower(): v for k, v in native.items()} == KERNEL_CODES
    assert set(PLATFORM_KERNELS["cuda"]) == set(KERNEL_CODES) and PLATFORM_KERNELS["cpu"] == ("auto",)


def test_cpu_threads_reach_the_ffi_and_are_checked(monkeypatch):
    monkeypatch.setenv("JAXSPARSE_CPU_THREADS", "3")
    with jax.default_device(jax.devices("cpu")[0]):
        assert ffi_attributes(lambda x: sparse_conv(x, F), X)["threads"] == "3"
        monkeypatch.setenv("JAXSPARSE_CPU_THREADS", "many")
        with pytest.raises(ValueError, match="JAXSPARSE_CPU_THREADS must be a positive integer"):
            jax.jit(lambda x: sparse_conv(x, F)).lower(X)


def test_no_environment_reads_in_native_code():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "cuda").rglob("*")
                 if p.is_file() and "getenv" in p.read_text(errors="ignore")]
    assert not offenders, offenders


# ---- one home per primitive, no import circle ----------------------------------------

def _imports_of(path: pathlib.Path, package: str = "jaxsparse") -> set[str]:
    """Every jaxsparse module ``path`` imports, at any depth (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == package)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def package_import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    # `from jaxsparse import x` names the submodule x: no edge to the parent package itself
    return {name: {m for m in _imports_of(path, root.name) if m in modules and m != name
                   and not name.startswith(m + ".")}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [nxt])):
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name, [name])):
            return cycle
    return None


def test_no_import_cycle_in_the_package():
    graph = package_import_graph(REPO / "jaxsparse")
    assert "jaxsparse.primitive" in graph and "jaxsparse.sharding" in graph["jaxsparse.primitive"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_import_cycle_detector_can_fail(tmp_path):
    pkg = tmp_path / "jaxsparse"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from jaxsparse import a\n")
    (pkg / "a.py").write_text("def f():\n    from jaxsparse.b import g\n")  # inside a function
    (pkg / "b.py").write_text("import jaxsparse.a\n")
    assert find_cycle(package_import_graph(pkg)) == ["jaxsparse.a", "jaxsparse.b", "jaxsparse.a"]
