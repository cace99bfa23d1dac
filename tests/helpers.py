"""Test helpers: dtype-aware tolerances."""
import numpy as np


def tolerance(dtype, reduction_len=1, scale=8.0):
    """rtol/atol from the dtype's machine epsilon and the summed length."""
    eps = np.finfo(dtype).eps
    tol = scale * eps * np.sqrt(max(int(reduction_len), 1)) * (16 if np.dtype(dtype) == np.float32 else 64)
    return tol


def assert_close(actual, expected, reduction_len=1, scale=8.0, magnitude=None):
    """Compare with rtol = atol-relative tolerance derived from dtype and reduction length."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tol = tolerance(expected.dtype, reduction_len, scale)
    if magnitude is None:
        magnitude = max(float(np.abs(expected).max(initial=0.0)), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * magnitude)
