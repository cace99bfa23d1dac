"""Numba CPU pooling and elementwise kernels against their NumPy references.

Everything goes through the public entry points in :mod:`relprop.kernels` with
``backend="cpu"`` vs ``backend="reference"``.  Max-pool values and switches must agree
exactly (planted ties: the first maximum in row-major window order wins); sums agree to
dtype-derived tolerances; ``z == 0`` in the stabilised division is tested exactly.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import relprop._config as config
import relprop.kernels as K
from relprop.kernels.cpu import elementwise as cpu_elementwise, pool2d as cpu_pool
from helpers import assert_close

DTYPES = [np.float32, np.float64]


@st.composite
def pool_problem(draw):
    """(shape, kernel, stride, padding, fill, seed) with a valid, often non-tiling geometry.

    Padding is at most half the window (as PyTorch) and each padded side holds the window,
    so every geometry drawn is one the public entry point accepts.
    """
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    hw = tuple(draw(st.integers(max(1, k - 2 * p), 13)) for k, p in zip(kernel, padding))
    fill = draw(st.sampled_from(["normal", "ties", "ties", "zeros"]))
    seed = draw(st.integers(0, 2**32 - 1))
    return (n, c) + hw, kernel, stride, padding, fill, seed


def make_array(shape, fill, rng, dtype):
    if fill == "zeros":
        return np.zeros(shape, dtype)
    if fill == "ties":  # few distinct values: many windows hold several maxima
        return rng.integers(0, 3, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def windows_per_input(kernel, stride):
    """Most windows that can cover one input (the longest sum in unpool / avg-pool VJP)."""
    return -(-kernel[0] // stride[0]) * -(-kernel[1] // stride[1])


# ---------------------------------------------------------------- max pooling

@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=pool_problem())
def test_maxpool2d_forward_matches_reference(dtype, problem):
    shape, kernel, stride, padding, fill, seed = problem
    x = make_array(shape, fill, np.random.default_rng(seed), dtype)
    out, sw = K.maxpool2d_forward(x, kernel, stride, padding, backend="cpu")
    out_ref, sw_ref = K.maxpool2d_forward(x, kernel, stride, padding, backend="reference")
    assert out.dtype == dtype and sw.dtype == np.int64
    np.testing.assert_array_equal(sw, sw_ref)  # exact: one tie-break rule
    assert out.tobytes() == out_ref.tobytes()  # bitwise: a max is a copy, not a sum
    # every switch points at its window's value in the unpadded plane
    n, c, h, w = shape
    planes = x.reshape(n, c, h * w)
    np.testing.assert_array_equal(np.take_along_axis(planes, sw.reshape(n, c, -1), axis=2), out.reshape(n, c, -1))


@pytest.mark.parametrize("dtype", DTYPES)
@given(n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(2, 11), w=st.integers(2, 11),
       fill=st.sampled_from(["normal", "ties", "zeros"]), seed=st.integers(0, 2**32 - 1))
def test_maxpool2d_2x2_fast_path_matches_reference(dtype, n, c, h, w, fill, seed):
    """The unrolled 2×2 stride-2 window (odd sizes leave a row/column out, as floor mode does)."""
    x = make_array((n, c, h, w), fill, np.random.default_rng(seed), dtype)
    out, sw = K.maxpool2d_forward(x, 2, 2, 0, backend="cpu")
    out_ref, sw_ref = K.maxpool2d_forward(x, 2, 2, 0, backend="reference")
    np.testing.assert_array_equal(sw, sw_ref)
    assert out.tobytes() == out_ref.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=pool_problem(), two=st.booleans(), plant=st.sampled_from([None, np.nan, np.inf, -np.inf]))
def test_maxpool2d_values_match_reference(dtype, problem, two, plant):
    """The maxima without switches (forward passes that keep no record): any geometry, and the 2x2
    stride-2 row kernel without its switch pass (``two``), ties, zeros, and a planted NaN or
    infinity (the row falls back to the NaN-aware scan): bitwise the reference's maxima."""
    shape, kernel, stride, padding, fill, seed = problem
    if two:
        kernel, stride, padding = (2, 2), (2, 2), (0, 0)
        shape = shape[:2] + (max(2, shape[2]), max(2, shape[3]))
    rng = np.random.default_rng(seed)
    x = make_array(shape, fill, rng, dtype)
    if plant is not None:
        x.flat[rng.integers(x.size)] = plant
    out_ref, _ = K.maxpool2d_forward(x, kernel, stride, padding, backend="reference", check_finite=False)
    for twin in ("serial", "parallel"):
        with pytest.MonkeyPatch.context() as mp:
            rows = getattr(cpu_pool._maxpool_2x2_rows, twin)
            mp.setattr(cpu_pool, "_maxpool_2x2_rows", rows)
            out = cpu_pool.maxpool2d_values(x, kernel, stride, padding, np.full(out_ref.shape, 7, dtype))
        assert out.tobytes() == out_ref.tobytes()


def test_maxpool2d_2x2_nan_plane_takes_the_nan_aware_scan():
    x = np.array([[[[1.0, np.nan], [3.0, 2.0]], [[1.0, 4.0], [3.0, 2.0]]]])
    out, sw = cpu_pool.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0), np.empty((1, 2, 1, 1)),
                                         np.empty((1, 2, 1, 1), np.int64))
    assert np.isnan(out[0, 0, 0, 0]) and sw[0, 0, 0, 0] == 1  # the first NaN wins, as argmax
    assert out[0, 1, 0, 0] == 4.0 and sw[0, 1, 0, 0] == 1


@pytest.mark.parametrize("twin", ["serial", "parallel"])
def test_maxpool2d_2x2_rows_path_is_taken_and_falls_back_on_inf(twin, monkeypatch):
    """Even H and W take the branch-free row kernel (both compiled twins); an infinite input (x*0 is
    NaN) sends the call to the plane scan, which gives the reference's answer."""
    rng = np.random.default_rng(0)
    x = np.round(rng.standard_normal((2, 3, 6, 8)), 1)  # ties
    calls = []
    kernel = getattr(cpu_pool._maxpool_2x2_rows, twin)
    monkeypatch.setattr(cpu_pool, "_maxpool_2x2_rows", lambda *a: calls.append(1) or kernel(*a))
    for v in (None, np.inf, -np.inf):
        if v is not None:
            x[1, 2, 3, 5] = v
        out, sw = K.maxpool2d_forward(x, 2, 2, 0, backend="cpu", check_finite=False)
        out_ref, sw_ref = K.maxpool2d_forward(x, 2, 2, 0, backend="reference", check_finite=False)
        np.testing.assert_array_equal(sw, sw_ref)
        assert out.tobytes() == out_ref.tobytes()
    assert len(calls) == 3
    assert kernel(x.reshape(18, 16), np.empty((18, 4)), np.empty((18, 4), np.int64), 3, 8) == 1  # the row of the -inf


def test_maxpool2d_ties_pick_first_in_row_major_order():
    x = np.array([[[[1.0, 2.0, 2.0],
                    [2.0, 0.0, 1.0],
                    [0.0, 2.0, 2.0]]]])
    for backend in ("cpu", "reference"):
        out, sw = K.maxpool2d_forward(x, 2, 1, backend=backend)
        np.testing.assert_array_equal(sw[0, 0], [[1, 1], [3, 7]])
        np.testing.assert_array_equal(out[0, 0], [[2.0, 2.0], [2.0, 2.0]])


def test_maxpool2d_all_zero_input_switches_at_first_real_input():
    x = np.zeros((1, 2, 5, 4), np.float32)
    out, sw = K.maxpool2d_forward(x, 3, 2, 1, backend="cpu")
    _, sw_ref = K.maxpool2d_forward(x, 3, 2, 1, backend="reference")
    np.testing.assert_array_equal(sw, sw_ref)
    # window (i, j) starts at (2i - 1, 2j - 1); padding is -inf, so the first real input wins
    np.testing.assert_array_equal(sw[0, 0], [[0, 1], [4, 5], [12, 13]])
    assert not out.any()


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=pool_problem())
def test_maxunpool2d_matches_reference(dtype, problem):
    shape, kernel, stride, padding, fill, seed = problem
    rng = np.random.default_rng(seed)
    x = make_array(shape, fill, rng, dtype)
    _, sw = K.maxpool2d_forward(x, kernel, stride, padding, backend="reference")
    g = rng.standard_normal(sw.shape).astype(dtype)
    actual = K.maxunpool2d(g, sw, shape, backend="cpu")
    expected = K.maxunpool2d(g, sw, shape, backend="reference")
    assert_close(actual, expected, reduction_len=windows_per_input(kernel, stride))
    assert_close(actual.sum(), g.sum(), reduction_len=g.size)  # routing moves, never loses, signal
    assert K.maxunpool2d(g, sw, shape, backend="cpu").tobytes() == actual.tobytes()  # deterministic


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_maxunpool2d_overlapping_windows_sum(backend):
    # 3x3 windows, stride 1, padding 1 on a 3x3 plane: all nine windows hold the centre
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 5.0
    out, sw = K.maxpool2d_forward(x, 3, 1, 1, backend=backend)
    assert (sw == 4).all() and (out == 5.0).all()
    g = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    r = K.maxunpool2d(g, sw, x.shape, backend=backend)
    expected = np.zeros((1, 1, 3, 3))
    expected[0, 0, 1, 1] = 45.0
    np.testing.assert_array_equal(r, expected)


# ---------------------------------------------------------------- average pooling

@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=pool_problem())
def test_avgpool2d_forward_matches_reference(dtype, problem):
    shape, kernel, stride, padding, fill, seed = problem
    x = make_array(shape, fill, np.random.default_rng(seed), dtype)
    actual = K.avgpool2d_forward(x, kernel, stride, padding, backend="cpu")
    expected = K.avgpool2d_forward(x, kernel, stride, padding, backend="reference")
    assert actual.dtype == dtype
    assert_close(actual, expected, reduction_len=kernel[0] * kernel[1])


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=pool_problem())
def test_avgpool2d_vjp_matches_reference(dtype, problem):
    shape, kernel, stride, padding, _, seed = problem
    rng = np.random.default_rng(seed)
    out_shape = K.avgpool2d_forward(np.zeros(shape, dtype), kernel, stride, padding, backend="reference").shape
    g = rng.standard_normal(out_shape).astype(dtype)
    actual = K.avgpool2d_vjp(g, shape, kernel, stride, padding, backend="cpu")
    expected = K.avgpool2d_vjp(g, shape, kernel, stride, padding, backend="reference")
    assert actual.dtype == dtype and actual.shape == shape
    assert_close(actual, expected, reduction_len=windows_per_input(kernel, stride))
    assert K.avgpool2d_vjp(g, shape, kernel, stride, padding, backend="cpu").tobytes() == actual.tobytes()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@given(problem=pool_problem())
def test_avgpool2d_vjp_is_the_adjoint(backend, problem):
    """<avgpool(x), g> == <x, avgpool_vjp(g)> in float64 (padding counted, border windows included)."""
    shape, kernel, stride, padding, _, seed = problem
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    y = K.avgpool2d_forward(x, kernel, stride, padding, backend=backend)
    g = rng.standard_normal(y.shape)
    lhs = float(np.vdot(y, g))
    rhs = float(np.vdot(x, K.avgpool2d_vjp(g, shape, kernel, stride, padding, backend=backend)))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12 * (np.abs(x).sum() * np.abs(g).max() + 1))


# ---------------------------------------------------------------- elementwise

@st.composite
def elementwise_problem(draw):
    ndim = draw(st.sampled_from([1, 2, 4]))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim))
    return shape, draw(st.integers(0, 2**32 - 1))


def with_zeros(shape, rng, dtype):
    """Normal values with about a third planted exact zeros (+0.0 and -0.0)."""
    a = rng.standard_normal(shape).astype(dtype)
    a[rng.random(shape) < 0.2] = 0.0
    a[rng.random(shape) < 0.1] = -0.0
    return a


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=elementwise_problem())
def test_relu_kernels_match_reference(dtype, problem):
    shape, seed = problem
    rng = np.random.default_rng(seed)
    g, z = with_zeros(shape, rng, dtype), with_zeros(shape, rng, dtype)
    pairs = [
        ("relu_forward", (z,)),
        ("relu_backward_gradient", (g, z)),
        ("relu_backward_deconvnet", (g,)),
        ("relu_backward_guided", (g, z)),
    ]
    for name, args in pairs:
        actual = getattr(K, name)(*args, backend="cpu")
        expected = getattr(K, name)(*args, backend="reference")
        assert actual.dtype == dtype and actual.shape == shape, name
        np.testing.assert_array_equal(actual, expected, err_msg=name)  # selections: exact


def test_relu_backward_masks_are_strict():
    g = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    z = np.array([1.0, 0.0, 1.0, -0.0, 3.0])
    for backend in ("cpu", "reference"):
        np.testing.assert_array_equal(K.relu_backward_gradient(g, z, backend=backend), [-2, 0, 0, 0, 2])
        np.testing.assert_array_equal(K.relu_backward_deconvnet(g, backend=backend), [0, 0, 0, 1, 2])
        np.testing.assert_array_equal(K.relu_backward_guided(g, z, backend=backend), [0, 0, 0, 0, 2])


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=elementwise_problem(), epsilon=st.sampled_from([1e-2, 0.25, 1.0]))
def test_stabilized_divide_matches_reference(dtype, problem, epsilon):
    shape, seed = problem
    rng = np.random.default_rng(seed)
    r, z = with_zeros(shape, rng, dtype), with_zeros(shape, rng, dtype)
    actual = K.stabilized_divide(r, z, epsilon, backend="cpu")
    expected = K.stabilized_divide(r, z, epsilon, backend="reference")
    assert actual.dtype == dtype
    assert_close(actual, expected, magnitude=float(np.abs(expected).max(initial=1.0)))
    assert K.stabilized_divide(r, z, epsilon, backend="cpu").tobytes() == actual.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=elementwise_problem(), epsilon=st.sampled_from([0.0, 1e-2, 1.0]), threshold=st.sampled_from([0, 10**12]))
def test_stabilized_divide_in_place_gives_the_same_bits(dtype, problem, epsilon, threshold):
    """out = r and out = z (the sweeps divide in place) take their own kernels: the same bits as a third
    array, on both twins (``threshold``: parallel for every size, or serial)."""
    shape, seed = problem
    rng = np.random.default_rng(seed)
    r, z = with_zeros(shape, rng, dtype), with_zeros(shape, rng, dtype)
    want = K.stabilized_divide(r, z, epsilon, backend="reference")
    saved, config.PARALLEL_MIN_ELEMENTS = config.PARALLEL_MIN_ELEMENTS, threshold
    try:
        apart = cpu_elementwise.stabilized_divide(r, z, epsilon, np.empty_like(r))
        over_r, over_z = r.copy(), z.copy()
        assert cpu_elementwise.stabilized_divide(over_r, z, epsilon, over_r) is over_r
        assert cpu_elementwise.stabilized_divide(r, over_z, epsilon, over_z) is over_z
    finally:
        config.PARALLEL_MIN_ELEMENTS = saved
    assert over_r.tobytes() == apart.tobytes() and over_z.tobytes() == apart.tobytes()
    assert_close(apart, want, magnitude=float(np.abs(want).max(initial=1.0)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_stabilized_divide_zero_denominator(dtype, backend):
    r = np.array([[3.0, -2.0, 5.0, 1.0], [0.0, 4.0, -1.0, 2.0]], dtype)
    z = np.array([[0.0, -0.0, 2.0, -4.0], [0.0, 0.0, -0.5, 0.25]], dtype)
    zero_den = z == 0
    with np.errstate(all="raise"):  # the reference must not even warn
        out0 = K.stabilized_divide(r, z, 0.0, backend=backend)
    assert np.isfinite(out0).all()
    np.testing.assert_array_equal(out0[zero_den], 0)  # ε = 0 and z = 0: zero contribution
    np.testing.assert_array_equal(out0[~zero_den], (r / np.where(zero_den, 1, z))[~zero_den])
    eps = 0.5  # exact in binary: r/ε and r/(z ± ε) are correctly rounded in both backends
    out = K.stabilized_divide(r, z, eps, backend=backend)
    np.testing.assert_array_equal(out[zero_den], r[zero_den] / eps)  # sign0(±0) = +1 -> r/ε
    den = z + eps * np.where(z >= 0, 1, -1).astype(dtype)
    assert_close(out, r / den)


def test_elementwise_any_ndim_and_empty():
    for shape in [(), (0,), (7,), (2, 0, 3), (2, 1, 3, 2, 2)]:
        x = np.linspace(-1, 1, int(np.prod(shape))).reshape(shape)
        np.testing.assert_array_equal(K.relu_forward(x, backend="cpu"), np.maximum(x, 0))
        np.testing.assert_array_equal(K.stabilized_divide(x, x, 0.5, backend="cpu"),
                                      K.stabilized_divide(x, x, 0.5, backend="reference"))


def test_nan_propagates_like_reference_without_finite_check():
    x = np.array([[[[1.0, np.nan, 3.0], [np.nan, 0.0, -1.0], [2.0, 2.0, 2.0]]]])
    out, sw = K.maxpool2d_forward(x, 2, 1, check_finite=False, backend="cpu")
    out_ref, sw_ref = K.maxpool2d_forward(x, 2, 1, check_finite=False, backend="reference")
    np.testing.assert_array_equal(sw, sw_ref)  # the first NaN of a window wins, as argmax
    np.testing.assert_array_equal(out, out_ref)
    for name in ("relu_forward", "relu_backward_deconvnet"):
        np.testing.assert_array_equal(getattr(K, name)(x, backend="cpu", check_finite=False),
                                      getattr(K, name)(x, backend="reference", check_finite=False))
    np.testing.assert_array_equal(K.stabilized_divide(x, x, 0.0, backend="cpu", check_finite=False),
                                  K.stabilized_divide(x, x, 0.0, backend="reference", check_finite=False))
