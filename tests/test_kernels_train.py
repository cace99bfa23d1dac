"""Training kernels (weight VJPs): cpu against reference, and both against finite differences.

The oracle property: for L(w) = Σ g ⊙ layer(x; w, b), ∂L/∂w and ∂L/∂b are what the
weight-VJP returns.  Since the layer is linear in (w, b), a central difference is exact up
to rounding, so float64 checks are tight.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import relprop.kernels as K
from helpers import assert_close

DTYPES = [np.float32, np.float64]


@st.composite
def conv_problem(draw):
    """(x_shape, k, kernel, stride, padding, dilation, seed) with a valid geometry (odd sizes, batch 1...)."""
    n, c, k = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    span = [d * (kk - 1) + 1 for kk, d in zip(kernel, dilation)]
    hw = tuple(draw(st.integers(max(1, s - 2 * p), 13)) for s, p in zip(span, padding))
    return (n, c) + hw, k, kernel, stride, padding, dilation, draw(st.integers(0, 2**32 - 1))


def _conv_g_shape(x_shape, k, kernel, stride, padding, dilation):
    n, _, h, w = x_shape
    ho = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return (n, k, ho, wo)


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=conv_problem())
def test_conv2d_weight_vjp_matches_reference(dtype, problem):
    x_shape, k, kernel, stride, padding, dilation, seed = problem
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    g = rng.standard_normal(_conv_g_shape(x_shape, k, kernel, stride, padding, dilation)).astype(dtype)
    dw, db = K.conv2d_weight_vjp(x, g, kernel, stride, padding, dilation, backend="cpu")
    dw_ref, db_ref = K.conv2d_weight_vjp(x, g, kernel, stride, padding, dilation, backend="reference")
    assert dw.shape == (k, x_shape[1]) + kernel and dw.dtype == dtype and db.shape == (k,)
    red = g.shape[0] * g.shape[2] * g.shape[3]
    assert_close(dw, dw_ref, reduction_len=red)
    assert_close(db, db_ref, reduction_len=red)


@pytest.mark.parametrize("dtype", DTYPES)
@given(n=st.integers(1, 5), i=st.integers(1, 40), j=st.integers(1, 17), seed=st.integers(0, 2**32 - 1))
def test_dense_weight_vjp_matches_reference(dtype, n, i, j, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, i)).astype(dtype)
    g = rng.standard_normal((n, j)).astype(dtype)
    dw, db = K.dense_weight_vjp(x, g, backend="cpu")
    dw_ref, db_ref = K.dense_weight_vjp(x, g, backend="reference")
    assert dw.shape == (j, i) and db.shape == (j,) and dw.dtype == dtype
    assert_close(dw, dw_ref, reduction_len=n)
    assert_close(db, db_ref, reduction_len=n)


def test_conv2d_weight_vjp_chunked_equals_one_chunk(rng, monkeypatch):
    """Several im2col chunks (tiny CONV_CHUNK_BYTES) give the one-chunk result (and are deterministic)."""
    from relprop import _config

    x = rng.standard_normal((7, 3, 9, 8))
    g = rng.standard_normal((7, 4, 5, 4))
    one = K.conv2d_weight_vjp(x, g, 3, (2, 2), 1, (1, 1), backend="cpu")
    monkeypatch.setattr(_config, "CONV_CHUNK_BYTES", 1)
    many = K.conv2d_weight_vjp(x, g, 3, (2, 2), 1, (1, 1), backend="cpu")
    again = K.conv2d_weight_vjp(x, g, 3, (2, 2), 1, (1, 1), backend="cpu")
    assert_close(many[0], one[0], reduction_len=7 * 20)
    assert many[0].tobytes() == again[0].tobytes()


def _finite_difference(f, p, h=1e-6):
    grad = np.zeros_like(p)
    for idx in np.ndindex(p.shape):
        old = p[idx]
        p[idx] = old + h
        up = f()
        p[idx] = old - h
        down = f()
        p[idx] = old
        grad[idx] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("geometry", [((1, 1), (0, 0), (1, 1)), ((2, 1), (1, 2), (1, 2)), ((3, 2), (2, 0), (2, 1))])
def test_conv2d_weight_vjp_finite_differences(rng, backend, geometry):
    stride, padding, dilation = geometry
    x = rng.standard_normal((2, 3, 7, 8))
    w = rng.standard_normal((4, 3, 3, 2))
    b = rng.standard_normal(4)
    z = K.conv2d_forward(x, w, b, stride, padding, dilation, backend="reference")
    g = rng.standard_normal(z.shape)

    def loss():
        return float(np.sum(g * K.conv2d_forward(x, w, b, stride, padding, dilation, backend="reference")))

    dw, db = K.conv2d_weight_vjp(x, g, (3, 2), stride, padding, dilation, backend=backend)
    np.testing.assert_allclose(dw, _finite_difference(loss, w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, _finite_difference(loss, b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_dense_weight_vjp_finite_differences(rng, backend):
    x = rng.standard_normal((3, 6))
    w = rng.standard_normal((5, 6))
    b = rng.standard_normal(5)
    g = rng.standard_normal((3, 5))

    def loss():
        return float(np.sum(g * K.dense_forward(x, w, b, backend="reference")))

    dw, db = K.dense_weight_vjp(x, g, backend=backend)
    np.testing.assert_allclose(dw, _finite_difference(loss, w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, _finite_difference(loss, b), rtol=1e-6, atol=1e-7)


def test_weight_vjp_errors():
    x = np.zeros((2, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match="g has shape"):
        K.conv2d_weight_vjp(x, np.zeros((2, 4, 4, 4), np.float32), 3)
    with pytest.raises(TypeError, match="dtype"):
        K.conv2d_weight_vjp(x, np.zeros((2, 4, 3, 3), np.float64), 3)
    with pytest.raises(ValueError, match="kernel extent"):
        K.conv2d_weight_vjp(x, np.zeros((2, 4, 3, 3), np.float32), 7)
    with pytest.raises(ValueError, match="g has shape"):
        K.dense_weight_vjp(np.zeros((2, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        K.dense_weight_vjp(np.full((2, 3), np.nan), np.zeros((2, 4)))
