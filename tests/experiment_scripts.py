"""The experiment scripts (experiments/*.py) for the tests: imported from their files, or run.

The scripts import their shared modules by plain name (``import layers``), which works when
Python runs a script as a file (its folder is then ``sys.path[0]``). The tests load them the
same way without touching ``sys.path``: each module is executed from its file and registered
under its plain name, after the sibling modules it imports.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
SCRIPTS = ("sweep", "network", "layer_benchmark", "whole_model_benchmark", "train_kim", "plots", "summarize")


def _sibling_imports(path: Path) -> list[str]:
    """Names of the experiments/ modules that the file imports (anywhere in it)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return [n for n in dict.fromkeys(names) if (EXPERIMENTS / f"{n}.py").is_file()]


def load(name: str, _loading: tuple = ()):
    """The module experiments/<name>.py, imported once per test process."""
    module = sys.modules.get(name)
    if module is not None:
        assert Path(module.__file__).parent == EXPERIMENTS, f"{name!r} is already {module.__file__}"
        return module
    if name in _loading:
        raise ImportError(f"import cycle among experiments/: {' -> '.join(_loading + (name,))}")
    path = EXPERIMENTS / f"{name}.py"
    for dep in _sibling_imports(path):
        if dep != name:
            load(dep, _loading + (name,))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def run(script: str, *args: str, cwd=None, timeout: float = 600, env: dict | None = None):
    """``python3 experiments/<script>.py args...`` as a user runs it (from ``cwd``)."""
    return subprocess.run([sys.executable, str(EXPERIMENTS / f"{script}.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})
