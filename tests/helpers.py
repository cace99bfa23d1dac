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


def conv_inputs(rng, x_shape, w_shape, ties, dtype):
    """(x, w, b) for a convolution test: small integers when ``ties`` (exact ties in the pooling windows,
    zeros after the ReLU), else standard normal."""
    if ties:
        return (rng.integers(-2, 3, x_shape).astype(dtype), rng.integers(-1, 2, w_shape).astype(dtype),
                rng.integers(-2, 2, w_shape[0]).astype(dtype))
    return tuple(rng.standard_normal(s).astype(dtype) for s in (x_shape, w_shape, (w_shape[0],)))
