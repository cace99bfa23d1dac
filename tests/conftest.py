"""Shared fixtures and the hypothesis profiles.

Profiles (select with RELPROP_HYPOTHESIS_PROFILE): ``dev`` (default, 30 examples),
``ci`` (derandomised), ``cudasim`` (few examples: the simulator is slow).  ``deadline``
is off: the first example of a test pays Numba's compile.
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "cudasim", max_examples=8, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("RELPROP_HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def rng(request):
    """A per-test seeded generator (seed from the test's name: reproducible, independent)."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _cuda_skip_reason():
    """None when ``cuda``-marked tests can run: under the simulator, or on a GPU with CuPy."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return None
    try:
        from numba import cuda

        if cuda.is_available():
            import cupy  # noqa: F401

            return None
    except Exception:  # no driver, no GPU, or no CuPy
        pass
    return "needs NUMBA_ENABLE_CUDASIM=1 or a GPU with CuPy (run: NUMBA_ENABLE_CUDASIM=1 pytest -m cuda)"


def pytest_collection_modifyitems(config, items):
    """Skip the ``cuda``-marked tests (quickly, at collection) where they cannot run."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    reason = _cuda_skip_reason() if marked else None
    if reason is not None:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))
