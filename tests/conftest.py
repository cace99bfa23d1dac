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
