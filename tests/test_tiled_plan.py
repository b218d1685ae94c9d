"""The CUDA tiled planner's invariants, checked on the host (no GPU needed).

`tests/native/tiled_plan_check.cc` runs `ChooseTilePlan` (cuda/gpu/tiled_plan.cu, plain C++) on
thousands of random geometries for every variant (plain, staged, cluster, half-width) and
element size, and checks what the kernels rely on to stay in bounds: the shared memory they carve
up, tiles/groups/chunks covering the output once, every tap + pixel read inside the window, and
the half-width window's even strides and shifted copy.
"""
import os
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def test_tiled_planner_invariants(tmp_path):
    cxx = compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (g++, c++, clang++ or $CXX) to build the planner check")
    exe = tmp_path / "tiled_plan_check"
    build = subprocess.run([cxx, "-O1", "-std=c++17", "-I", str(REPO / "cuda"), "-x", "c++",
                            str(REPO / "cuda" / "gpu" / "tiled_plan.cu"),
                            str(REPO / "tests" / "native" / "tiled_plan_check.cc"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "checked" in run.stdout
    found = run.stdout.split("(f32, 16-bit):")[1].split("(")[0].split()
    plain, staged, cluster, half = ([int(n) for n in pair.split("/")] for pair in found)
    assert min(plain + staged + cluster) > 1000 and half[0] == 0 and half[1] > 1000, run.stdout
