"""Shared test configuration: hypothesis profiles, GPU marker, shared data."""

import importlib.machinery
import os
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def _prefer_installed_jaxsparse():
    """Tests run against the *installed* jaxsparse (reinstall after editing it).

    `python -m pytest` from the repo root puts the root on sys.path, so `import
    jaxsparse` would pick up the source folder, which lacks the compiled
    extension (or holds a stale in-place copy). When jaxsparse is installed
    elsewhere, drop the root from sys.path; otherwise (an in-place build, or
    JAXSPARSE_TEST_SOURCE_TREE=1) the source folder is tested.
    """
    if os.environ.get("JAXSPARSE_TEST_SOURCE_TREE", "0") not in ("", "0"):
        return
    rest = [p for p in sys.path if Path(p or os.curdir).resolve() != _REPO]
    if len(rest) != len(sys.path) and importlib.machinery.PathFinder.find_spec("jaxsparse", rest):
        sys.path[:] = rest


_prefer_installed_jaxsparse()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import jaxsparse  # noqa: E402
from jaxsparse.options import require_cuda

# jit compiles inside examples, so no deadline; CI bounds the example count.
settings.register_profile("ci", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

jax.config.update("jax_enable_x64", False)


def pytest_report_header(config):
    return f"jaxsparse under test: {Path(jaxsparse.__file__).parent}"


def gpu_present() -> bool:
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def pytest_runtest_setup(item):
    """GPU tests skip without a GPU, and fail instead under JAXSPARSE_REQUIRE_CUDA=1."""
    if "gpu" not in item.keywords or (gpu_present() and jaxsparse.cuda_available()):
        return
    reason = ("no CUDA GPU" if not gpu_present() else
              f"jaxsparse CUDA extension unavailable: {jaxsparse._native.cuda_import_error}")
    if require_cuda():
        pytest.fail(f"JAXSPARSE_REQUIRE_CUDA=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def gpu_device():
    return jax.devices("gpu")[0]


@pytest.fixture
def dlmc_root(monkeypatch):
    from jaxsparse.dlmc import DEFAULT_ROOT_ENV, default_root
    root = default_root()
    if not (root / "rn50").is_dir() and (_REPO.parent / "shared" / "data" / "dlmc" / "rn50").is_dir():
        root = _REPO.parent / "shared" / "data" / "dlmc"  # tests run from another directory
    if not (root / "rn50").is_dir():
        pytest.skip(f"DLMC data not found at {root} (../shared/data/dlmc is absent)")
    # code under test that looks the data up itself (experiments' make_filter) finds it too
    monkeypatch.setenv(DEFAULT_ROOT_ENV, str(root))
    return root


@pytest.fixture
def sentence_root():
    """The sentence data (../shared/data/sentences or $JAXSPARSE_SENTENCES_ROOT); skips when absent."""
    from experiment_scripts import load
    root = load("sentences").default_root()
    if not (root / "rt-polarity.all").is_file():
        pytest.skip(f"sentence data not found at {root} (../shared/data/sentences is absent)")
    return root


@pytest.fixture
def parse_flags():
    """Parse an explicit argv into absl's global FLAGS (never pytest's own argv); reset after."""
    from absl import flags

    def parse(argv):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["prog"] + list(argv))
    yield parse
    flags.FLAGS.unparse_flags()


@pytest.fixture(scope="module")
def f2():
    """A small 3x3 4->5 filter at 50 % for the argument-error tests."""
    return jaxsparse.random_filter(0, (3, 3), 4, 5, 0.5)


@pytest.fixture(scope="module")
def x2():
    return jax.numpy.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 4)).astype(np.float32))
