"""Shared test configuration: hypothesis profiles, GPU marker, shared data."""

import os
import jax
import pytest
from hypothesis import HealthCheck, settings

import jaxsparse
from jaxsparse.primitive import require_cuda

# jit compiles inside examples, so no deadline; CI bounds the example count.
settings.register_profile("ci", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

jax.config.update("jax_enable_x64", False)


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
def dlmc_root():
    from jaxsparse.dlmc import default_root
    root = default_root()
    if not (root / "rn50").is_dir():
        pytest.skip(f"DLMC data not found at {root} (../shared/data/dlmc is absent)")
    return root
