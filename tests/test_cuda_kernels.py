"""Every CUDA kernel against its NumPy reference twin.

Runs under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1 RELPROP_HYPOTHESIS_PROFILE=cudasim
pytest -m cuda``; NumPy arrays stand in for CuPy ones) and on a GPU with CuPy arrays;
skipped otherwise (tests/conftest.py).  Launches are shrunk to 8 threads per block and
3 blocks, so every kernel runs several blocks, a ragged tail and grid-stride iterations.
Shapes stay small: the simulator interprets every thread in Python.
"""
import importlib
import inspect

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import relprop.kernels as K
from relprop.kernels import _ops
from helpers import assert_close
from relprop import _backend, _config
from relprop.kernels import _ops

pytestmark = pytest.mark.cuda

DTYPES = [np.float32, np.float64]


@pytest.fixture(autouse=True)
def small_launches(monkeypatch):
    monkeypatch.setattr(_config, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(_config, "CUDA_MAX_BLOCKS", 3)


def dev(a):
    """The array as the cuda backend takes it: CuPy on a GPU, NumPy under the simulator."""
    if _backend.simulator_enabled() or a is None:
        return a
    import cupy

    return cupy.asarray(a)


def host(a):
    return _backend.to_numpy(a)


def cuda_call(name, *args, **kw):
    out = getattr(K, name)(*(dev(a) if isinstance(a, np.ndarray) else a for a in args), backend="cuda", **kw)
    return tuple(host(o) for o in out) if isinstance(out, tuple) else host(out)


def ref_call(name, *args, **kw):
    return getattr(K, name)(*args, backend="reference", **kw)


def normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------- API mirror

def _module(backend, family):
    try:
        return importlib.import_module(f"relprop.kernels.{backend}.{family}")
    except ModuleNotFoundError as exc:
        if exc.name == f"relprop.kernels.{backend}.{family}":
            return None
        raise


def _signature(fn):
    return inspect.signature(getattr(fn, "py_func", fn))


@pytest.mark.parametrize("family", _backend.FAMILIES)
def test_cuda_mirrors_cpu_and_reference(family):
    ref, cpu, gpu = (_module(b, family) for b in ("reference", "cpu", "cuda"))
    if ref is None and cpu is None and gpu is None:
        pytest.skip(f"no {family} kernels in any backend yet")
    assert gpu is not None, f"relprop/kernels/cuda/{family}.py is missing (reference or cpu has it)"
    for twin in (ref, cpu):
        if twin is None:
            continue
        assert sorted(gpu.__all__) == sorted(twin.__all__), twin.__name__
        for name in twin.__all__:
            assert _signature(getattr(gpu, name)) == _signature(getattr(twin, name)), f"{family}.{name}"


# ---------------------------------------------------------------- elementwise

ELEMENTWISE_SHAPES = [(25,), (1, 3, 3, 3), (2, 13)]  # 25 = 3 * 8 + 1: several blocks and a ragged tail


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_kernels(shape, dtype, rng):
    x = rng.integers(-2, 3, shape).astype(dtype) * dtype(0.5)  # exact zeros included
    g = normal(rng, shape, dtype)
    for name, args in [("relu_forward", (x,)), ("relu_backward_gradient", (g, x)),
                       ("relu_backward_deconvnet", (g,)), ("relu_backward_guided", (g, x))]:
        out = cuda_call(name, *args)
        assert out.dtype == dtype
        assert out.tobytes() == ref_call(name, *args).tobytes(), name  # selections: bitwise


def test_relu_kernels_propagate_nan():
    x = np.array([np.nan, -1, 0, 2, np.nan, 3], np.float32)
    z = np.array([1, 1, 1, 1, np.nan, -1], np.float32)
    for name, args in [("relu_forward", (x,)), ("relu_backward_gradient", (x, z)),
                       ("relu_backward_deconvnet", (x,)), ("relu_backward_guided", (x, z))]:
        np.testing.assert_array_equal(cuda_call(name, *args, check_finite=False),
                                      ref_call(name, *args, check_finite=False), err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epsilon", [0.0, 1e-2, 0.25])
def test_stabilized_divide(dtype, epsilon, rng):
    shape = (3, 9)
    r = normal(rng, shape, dtype)
    z = normal(rng, shape, dtype)
    z[0, :4] = 0  # sign0(0) = +1; with epsilon = 0 a zero denominator gives 0
    out = cuda_call("stabilized_divide", r, z, epsilon)
    expected = ref_call("stabilized_divide", r, z, epsilon)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out[0, :4], expected[0, :4])
    assert_close(out, expected)


def test_stabilized_divide_epsilon_rounds_to_float32():
    r = np.ones(3, np.float32)
    z = np.array([1.0, 0.0, -1.0], np.float32)
    expected = ref_call("stabilized_divide", r, z, 1e-50)  # eps underflows to 0 in float32
    np.testing.assert_array_equal(cuda_call("stabilized_divide", r, z, 1e-50), expected)


# ---------------------------------------------------------------- dense

@pytest.mark.parametrize("n, i, j", [(1, 7, 5), (3, 25, 9)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense(n, i, j, dtype, rng):
    x, w, b = normal(rng, (n, i), dtype), normal(rng, (j, i), dtype), normal(rng, (j,), dtype)
    g = normal(rng, (n, j), dtype)
    assert_close(cuda_call("dense_forward", x, w, b), ref_call("dense_forward", x, w, b), reduction_len=i)
    assert_close(cuda_call("dense_forward", x, w), ref_call("dense_forward", x, w), reduction_len=i)
    assert_close(cuda_call("dense_vjp", g, w), ref_call("dense_vjp", g, w), reduction_len=j)


# ---------------------------------------------------------------- conv2d

# (N, C, H, W, K, (kh, kw), stride, padding, dilation): batch 1, odd sizes, stride > 1,
# padding, dilation, 1x1, and a window as large as the padded input
CONV_CASES = [
    (1, 2, 5, 6, 3, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 3, 7, 6, 4, (3, 2), (2, 1), (1, 2), (1, 2)),
    (3, 1, 6, 5, 2, (1, 1), (2, 2), (0, 0), (1, 1)),
    (2, 2, 4, 9, 3, (2, 3), (1, 3), (0, 1), (2, 1)),
    (1, 3, 3, 3, 2, (5, 5), (1, 1), (1, 1), (1, 1)),
]


def _conv_problem(case, dtype, rng):
    n, c, h, wd, k, ks, stride, padding, dilation = case
    x = normal(rng, (n, c, h, wd), dtype)
    w = normal(rng, (k, c) + ks, dtype)
    b = normal(rng, (k,), dtype)
    geo = dict(stride=stride, padding=padding, dilation=dilation)
    out_shape = _ops.conv2d_output_shape(x.shape, w.shape, stride, padding, dilation)
    return x, w, b, geo, out_shape


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d(case, dtype, rng):
    _check_conv(case, dtype, rng)


def _check_conv(case, dtype, rng):
    x, w, b, geo, out_shape = _conv_problem(case, dtype, rng)
    red = w[0].size
    out = cuda_call("conv2d_forward", x, w, b, **geo)
    assert out.dtype == dtype and out.shape == out_shape
    assert_close(out, ref_call("conv2d_forward", x, w, b, **geo), reduction_len=red)
    g = normal(rng, out_shape, dtype)
    out = cuda_call("conv2d_vjp", g, w, x.shape, **geo)
    assert out.shape == x.shape
    assert_close(out, ref_call("conv2d_vjp", g, w, x.shape, **geo), reduction_len=red * w.shape[0])


@st.composite
def conv_problem(draw):
    """A random valid convolution geometry: odd sizes, batch 1, stride, padding, dilation."""
    n, c, k = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    span = [d * (kk - 1) + 1 for kk, d in zip(kernel, dilation)]
    h, w = (draw(st.integers(max(1, s - 2 * p), 8)) for s, p in zip(span, padding))
    return (n, c, h, w, k, kernel, stride, padding, dilation), draw(st.integers(0, 2**32 - 1))


@given(problem=conv_problem())
def test_conv2d_random_geometry(problem):
    case, seed = problem
    _check_conv(case, np.float32, np.random.default_rng(seed))


def test_conv2d_chunks_over_samples(monkeypatch, rng):
    """A scratch budget below one sample's column matrix: one sample per chunk, same result."""
    monkeypatch.setattr(_config, "CUDA_SCRATCH_BYTES", 64)
    x, w, b, geo, out_shape = _conv_problem((3,) + CONV_CASES[1][1:], np.float64, rng)
    assert_close(cuda_call("conv2d_forward", x, w, b, **geo), ref_call("conv2d_forward", x, w, b, **geo),
                 reduction_len=12)
    g = normal(rng, out_shape, np.float64)
    assert_close(cuda_call("conv2d_vjp", g, w, x.shape, **geo), ref_call("conv2d_vjp", g, w, x.shape, **geo),
                 reduction_len=48)


# ---------------------------------------------------------------- pooling

@st.composite
def pool_problem(draw):
    """(shape, kernel, stride, padding, fill, seed): valid geometries, often overlapping or not tiling."""
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    hw = tuple(draw(st.integers(max(1, k - 2 * p), 9)) for k, p in zip(kernel, padding))
    fill = draw(st.sampled_from(["normal", "ties", "ties"]))
    return (n, c) + hw, kernel, stride, padding, fill, draw(st.integers(0, 2**32 - 1))


def _pool_input(shape, fill, rng, dtype):
    if fill == "ties":  # few distinct values: many windows hold several maxima
        return rng.integers(0, 3, shape).astype(dtype)
    return normal(rng, shape, dtype)


@given(problem=pool_problem())
def test_maxpool2d_and_unpool(problem):
    shape, kernel, stride, padding, fill, seed = problem
    rng = np.random.default_rng(seed)
    x = _pool_input(shape, fill, rng, np.float32)
    out, sw = cuda_call("maxpool2d_forward", x, kernel, stride, padding)
    out_ref, sw_ref = ref_call("maxpool2d_forward", x, kernel, stride, padding)
    assert sw.dtype == np.int64
    np.testing.assert_array_equal(sw, sw_ref)  # exact: one tie-break rule
    assert out.tobytes() == out_ref.tobytes()
    values, none = _ops.maxpool2d_forward(dev(x), kernel, stride, padding, "cuda", switches=False)
    assert none is None and host(values).tobytes() == out_ref.tobytes()  # the maxima alone (a plain forward)
    g = normal(rng, out.shape, np.float32)
    un = cuda_call("maxunpool2d", g, sw_ref, shape)
    expected = ref_call("maxunpool2d", g, sw_ref, shape)
    assert_close(un, expected, reduction_len=kernel[0] * kernel[1])


def test_maxpool2d_ties_and_padding():
    """Planted ties pick the first maximum in row-major order; padding never wins; batch 1."""
    x = np.zeros((1, 2, 5, 5), np.float32)
    x[0, 1] = -1.0
    x[0, 1, 2, 3] = x[0, 1, 3, 2] = 4.0
    for kernel, stride, padding in [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1)), ((3, 2), (1, 3), (1, 1))]:
        out, sw = cuda_call("maxpool2d_forward", x, kernel, stride, padding)
        out_ref, sw_ref = ref_call("maxpool2d_forward", x, kernel, stride, padding)
        np.testing.assert_array_equal(sw, sw_ref)
        np.testing.assert_array_equal(out, out_ref)


def test_maxpool2d_nan_wins_its_window():
    """With check_finite=False a NaN propagates: the first NaN of a window is its maximum, as np.argmax."""
    x = np.arange(2 * 25, dtype=np.float32).reshape(1, 2, 5, 5)
    x[0, 0, 1, 1] = x[0, 0, 1, 2] = x[0, 1, 4, 4] = np.nan
    geo = ((3, 3), (2, 2), (1, 1))
    out, sw = cuda_call("maxpool2d_forward", x, *geo, check_finite=False)
    out_ref, sw_ref = ref_call("maxpool2d_forward", x, *geo, check_finite=False)
    np.testing.assert_array_equal(sw, sw_ref)
    np.testing.assert_array_equal(out, out_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_maxunpool2d_collisions(dtype, rng):
    """Overlapping windows that pick the same input sum there, in window order."""
    x = np.zeros((2, 1, 7, 7), dtype)
    x[:, :, 3, 3] = 5  # the centre wins every window that covers it
    _, sw = ref_call("maxpool2d_forward", x, (3, 3), (1, 1), (1, 1))
    g = normal(rng, sw.shape, dtype)
    assert_close(cuda_call("maxunpool2d", g, sw, x.shape), ref_call("maxunpool2d", g, sw, x.shape), reduction_len=9)


@given(problem=pool_problem())
def test_avgpool2d(problem):
    shape, kernel, stride, padding, fill, seed = problem
    rng = np.random.default_rng(seed)
    x = _pool_input(shape, fill, rng, np.float32)
    out = cuda_call("avgpool2d_forward", x, kernel, stride, padding)
    assert_close(out, ref_call("avgpool2d_forward", x, kernel, stride, padding), reduction_len=kernel[0] * kernel[1])
    g = normal(rng, out.shape, np.float32)
    vjp = cuda_call("avgpool2d_vjp", g, shape, kernel, stride, padding)
    red = -(-kernel[0] // stride[0]) * -(-kernel[1] // stride[1])
    assert_close(vjp, ref_call("avgpool2d_vjp", g, shape, kernel, stride, padding), reduction_len=red)


@pytest.mark.parametrize("dtype", DTYPES)
def test_avgpool2d_overlapping_padded(dtype, rng):
    x = normal(rng, (1, 2, 5, 7), dtype)
    geo = ((3, 3), (2, 2), (1, 1))
    out = cuda_call("avgpool2d_forward", x, *geo)
    assert out.dtype == dtype
    assert_close(out, ref_call("avgpool2d_forward", x, *geo), reduction_len=9)
    g = normal(rng, out.shape, dtype)
    assert_close(cuda_call("avgpool2d_vjp", g, x.shape, *geo), ref_call("avgpool2d_vjp", g, x.shape, *geo), 4)


# ---------------------------------------------------------------- train (weight VJPs)

def _impl(family, name):
    mod = _module("cuda", family)
    if mod is None or _module("reference", family) is None:
        pytest.skip(f"no {family} kernels yet")
    return getattr(mod, name), getattr(_module("reference", family), name)


@pytest.mark.parametrize("n, i, j", [(1, 5, 3), (27, 4, 6)])  # 27 rows: a ragged reduction
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_weight_vjp(n, i, j, dtype, rng):
    gpu, ref = _impl("train", "dense_weight_vjp")
    x, g = normal(rng, (n, i), dtype), normal(rng, (n, j), dtype)
    want_w, want_b = ref(x, g, np.empty((j, i), dtype), np.empty(j, dtype))
    got_w, got_b = gpu(dev(x), dev(g), dev(np.empty((j, i), dtype)), dev(np.empty(j, dtype)))
    assert_close(host(got_w), want_w, reduction_len=n)
    assert_close(host(got_b), want_b, reduction_len=n)


@pytest.mark.parametrize("case", CONV_CASES[:4])
@pytest.mark.parametrize("scratch", [None, 64])  # 64 bytes: one sample per chunk
def test_conv2d_weight_vjp(case, scratch, monkeypatch, rng):
    if scratch is not None:
        monkeypatch.setattr(_config, "CUDA_SCRATCH_BYTES", scratch)
    _check_weight_vjp(case, np.float64, rng)


def _check_weight_vjp(case, dtype, rng):
    gpu, ref = _impl("train", "conv2d_weight_vjp")
    x, w, _, geo, out_shape = _conv_problem(case, dtype, rng)
    g = normal(rng, out_shape, dtype)
    geo = (geo["stride"], geo["padding"], geo["dilation"])
    want_w, want_b = ref(x, g, *geo, np.empty_like(w), np.empty(w.shape[0], dtype))
    got_w, got_b = gpu(dev(x), dev(g), *geo, dev(np.empty_like(w)), dev(np.empty(w.shape[0], dtype)))
    red = out_shape[0] * out_shape[2] * out_shape[3]
    assert_close(host(got_w), want_w, reduction_len=red)
    assert_close(host(got_b), want_b, reduction_len=red)


# ---------------------------------------------------------------- reproducibility

def test_results_are_bitwise_reproducible(rng):
    x, w, b, geo, out_shape = _conv_problem(CONV_CASES[1], np.float32, rng)
    g = normal(rng, out_shape, np.float32)
    for name, args in [("conv2d_forward", (x, w, b)), ("conv2d_vjp", (g, w, x.shape))]:
        first = cuda_call(name, *args, **geo)
        assert cuda_call(name, *args, **geo).tobytes() == first.tobytes(), name


# ---------------------------------------------------------------- patterns (covariance sums)

def _pattern_accumulators(n_units, in_shape):
    """float64 zeros: count (), sum_x, count_pos (J,), sum_y (2, J), sum_x_pos, sum_xy."""
    return [np.zeros(()), np.zeros(in_shape), np.zeros(n_units), np.zeros((2, n_units)),
            np.zeros((n_units,) + in_shape), np.zeros((2, n_units) + in_shape)]


def _check_pattern_sums(got, want, n_samples, dtype):
    names = ["count", "sum_x", "count_pos", "sum_y", "sum_x_pos", "sum_xy"]
    for name, a, e in zip(names, got, want):
        a = host(a)
        assert a.dtype == np.float64 and a.shape == e.shape, name
        if name.startswith("count"):
            np.testing.assert_array_equal(a, e, err_msg=name)
        else:  # float32 input: sums of a chunk are formed in float32
            tol = 8 * np.finfo(dtype).eps * np.sqrt(n_samples) * 16
            np.testing.assert_allclose(a, e, rtol=tol, atol=tol * max(np.abs(e).max(), 1.0), err_msg=name)


@pytest.mark.parametrize("flush_rows", [None, 7])  # 7: several chunks with a ragged last one
@pytest.mark.parametrize("dtype", DTYPES)
def test_pattern_stats_dense(flush_rows, dtype, monkeypatch, rng):
    gpu, ref = _impl("patterns", "pattern_stats_dense")
    if flush_rows is not None:
        monkeypatch.setattr(_module("cuda", "patterns"), "_FLUSH_ROWS", flush_rows)
    n, i, j = 19, 6, 4
    x, w, b = normal(rng, (n, i), dtype), normal(rng, (j, i), dtype), normal(rng, (j,), dtype)
    z = (x @ w.T + b).astype(dtype)
    z[0, 0] = 0  # the regime is z > 0: zero goes to the other regime
    want = _pattern_accumulators(j, (i,))
    got = [dev(a) for a in _pattern_accumulators(j, (i,))]
    for _ in range(2):  # accumulates in place, batch after batch
        ref(x, z, b, *want)
        gpu(dev(x), dev(z), dev(b), *got)
    _check_pattern_sums(got, want, n, dtype)


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[1], CONV_CASES[3]])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pattern_stats_conv2d(case, dtype, rng):
    _check_pattern_conv(case, dtype, rng, flush_rows=29)  # chunks cut across samples and rows


def _check_pattern_conv(case, dtype, rng, flush_rows):
    gpu, ref = _impl("patterns", "pattern_stats_conv2d")
    x, w, b, geo, out_shape = _conv_problem(case, dtype, rng)
    z = ref_call("conv2d_forward", x, w, b, **geo)
    geo = (geo["stride"], geo["padding"], geo["dilation"])
    want = _pattern_accumulators(w.shape[0], w.shape[1:])
    got = [dev(a) for a in _pattern_accumulators(w.shape[0], w.shape[1:])]
    ref(x, z, b, *geo, *want)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_module("cuda", "patterns"), "_FLUSH_ROWS", flush_rows)
        gpu(dev(x), dev(z), dev(b), *geo, *got)
    _check_pattern_sums(got, want, out_shape[0] * out_shape[2] * out_shape[3], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pattern_stats_grouping_does_not_change_the_sums(dtype, monkeypatch, rng):
    """Chunks share kernel launches in groups; the flush adds them in order: bitwise the result of one at a time."""
    patterns = _module("cuda", "patterns")
    assert patterns is not None
    x, w, b, geo, _ = _conv_problem((3,) + CONV_CASES[1][1:], dtype, rng)
    z = ref_call("conv2d_forward", x, w, b, **geo)
    geo = (geo["stride"], geo["padding"], geo["dilation"])
    monkeypatch.setattr(patterns, "_FLUSH_ROWS", 7)  # 96 samples: 13 full chunks and a remainder of 5
    results = []
    for max_group in (1, 4, 64):
        monkeypatch.setattr(patterns, "_MAX_GROUP", max_group)
        got = [dev(a) for a in _pattern_accumulators(w.shape[0], w.shape[1:])]
        patterns.pattern_stats_conv2d(dev(x), dev(z), dev(b), *geo, *got)
        results.append([host(a).tobytes() for a in got])
    assert results[0] == results[1] == results[2]


@given(problem=conv_problem(), flush_rows=st.sampled_from([5, 8192]))
def test_conv_family_random_geometry(problem, flush_rows):
    """Weight VJP and pattern sums on random geometries (forward and input-VJP: test_conv2d_random_geometry)."""
    case, seed = problem
    _check_weight_vjp(case, np.float32, np.random.default_rng(seed))
    _check_pattern_conv(case, np.float32, np.random.default_rng(seed), flush_rows)


# ---------------------------------------------------------------- launch plumbing: sums, grids, TF32

@pytest.mark.parametrize("shape", [(5, 3, 131), (300, 2, 1), (3, 2, 600), (1, 4, 256), (2, 1, 3)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_sum_outer_matches_numpy(shape, accumulate, rng):
    """The lane sums walk (i, m) by additions: M below, at and above LANES, more and fewer items than LANES."""
    from relprop.kernels.cuda import _reduce

    a = normal(rng, shape, np.float64)
    start = normal(rng, (shape[1],), np.float64)
    out = dev(start.copy())
    _reduce.sum_outer(dev(a), out, accumulate=accumulate)
    want = a.sum(axis=(0, 2)) + (start if accumulate else 0)
    assert_close(host(out), want, reduction_len=shape[0] * shape[2])


def test_grid3_caps_each_axis(monkeypatch):
    from relprop.kernels.cuda import _launch

    monkeypatch.setattr(_config, "CUDA_MAX_BLOCKS", 100000)
    (bx, by, bz), tpb = _launch.grid3((70000, 3, 1000))
    assert (by, bz) == (3, 65535) and bx == -(-1000 // tpb)  # grid.z holds at most 65535 blocks


def test_index_range_is_checked():
    from relprop.kernels.cuda import _launch

    _launch.check_index_range(2 ** 31 - 1, "x")
    with pytest.raises(ValueError, match="32 bits"):
        _launch.check_index_range(2 ** 31, "the output plane")


def test_tf32_switch_is_off_by_default_and_checked():
    from relprop.kernels.cuda import _launch

    assert _launch.tf32_enabled() is False  # agreement with the cpu backend holds by default
    with pytest.raises(TypeError, match="enabled must be a bool"):
        _launch.set_tf32(1)
    with _launch.tf32():
        assert _launch.tf32_enabled() is True
    assert _launch.tf32_enabled() is False


def test_per_matrix_products_equal_the_batched_product(rng):
    """With TF32 on, CuPy GEMMs run as 2-D products (_per_matrix): the same product as the batched matmul."""
    from relprop.kernels.cuda import _launch

    w, cols = normal(rng, (4, 6), np.float64), normal(rng, (3, 6, 5), np.float64)
    out = np.empty((3, 4, 5))
    _launch._per_matrix(np, w, cols, out)
    np.testing.assert_allclose(out, w @ cols, rtol=1e-14)
    g = normal(rng, (3, 4, 5), np.float64)
    out = np.empty((3, 6, 5))
    _launch._per_matrix(np, w.T, g, out)
    np.testing.assert_allclose(out, w.T @ g, rtol=1e-14)


def test_conv2d_with_tf32_agrees_to_tf32_precision(rng):
    """On a GPU the opt-in TF32 GEMMs agree with the reference to TF32's ~1e-3; under the simulator it is a no-op."""
    from relprop.kernels.cuda import _launch

    x, w, b, geo, out_shape = _conv_problem(CONV_CASES[0], np.float32, rng)
    g = normal(rng, out_shape, np.float32)
    with _launch.tf32():
        out = cuda_call("conv2d_forward", x, w, b, **geo)
        vjp = cuda_call("conv2d_vjp", g, w, x.shape, **geo)
    want_out, want_vjp = ref_call("conv2d_forward", x, w, b, **geo), ref_call("conv2d_vjp", g, w, x.shape, **geo)
    if _backend.simulator_enabled():  # NumPy GEMMs: plain float32
        assert_close(out, want_out, reduction_len=w[0].size)
        assert_close(vjp, want_vjp, reduction_len=w[0].size * w.shape[0])
        return
    # TF32 rounds the GEMM inputs to 10 mantissa bits (unit roundoff 2^-11 ~ 4.9e-4), accumulates in FP32
    for got, want in ((out, want_out), (vjp, want_vjp)):
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


@pytest.mark.parametrize("relu", [False, True])
def test_conv2d_forward_with_further_weights_shares_the_columns(relu, rng):
    """``also``: further weight sets multiplied with the same im2col columns, each the same as a
    convolution of its own (an LRP rule's W⁺ forward traced beside W)."""
    x, w, b, geo, out_shape = _conv_problem(CONV_CASES[1], np.float64, rng)
    w2 = np.maximum(w, 0)
    b2 = np.maximum(b, 0)
    args = (geo["stride"], geo["padding"], geo["dilation"])
    z, a, (z2,) = _ops.conv2d_forward_also(dev(x), dev(w), dev(b), *args, "cuda", [(dev(w2), dev(b2))], relu=relu)
    assert_close(host(z), ref_call("conv2d_forward", x, w, b, **geo), reduction_len=w[0].size)
    assert_close(host(z2), ref_call("conv2d_forward", x, w2, b2, **geo), reduction_len=w[0].size)
    if relu:
        np.testing.assert_array_equal(host(a), np.maximum(host(z), 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_relu_maxpool2x2_matches_reference(dtype, rng):
    """The conv + ReLU + 2x2 max-pool triple of a forward that keeps no record (odd output sizes: the
    floor-mode pool drops the last row and column)."""
    x = normal(rng, (2, 3, 9, 7), dtype)
    w = normal(rng, (4, 3, 3, 2), dtype)
    b = normal(rng, (4,), dtype)
    args = ((1, 1), (1, 0), (1, 1))
    got = host(_ops.conv2d_relu_maxpool2x2(dev(x), dev(w), dev(b), *args, "cuda"))
    want = _ops.conv2d_relu_maxpool2x2(x, w, b, *args, "reference")
    assert got.shape == want.shape == (2, 4, 4, 3)
    assert_close(got, want, reduction_len=w[0].size)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_at_switches_matches_reference(dtype, rng):
    """A map read at a max-pool's switches (odd sizes)."""
    x = normal(rng, (2, 3, 7, 5), dtype)
    _, sw = ref_call("maxpool2d_forward", x, 2, 2)
    z = normal(rng, x.shape, dtype)
    from relprop.kernels.cuda import pool2d as cuda_pool
    from relprop.kernels.reference import pool2d as ref_pool

    got = host(cuda_pool.gather_at_switches(dev(z), dev(sw), dev(np.empty(sw.shape, dtype))))
    np.testing.assert_array_equal(got, ref_pool.gather_at_switches(z, sw, np.empty(sw.shape, dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_relu_maxpool2x2_at_switches_matches_reference(dtype, rng):
    """The triple of a trace with z' recorded at the switches only (an LRP rule that divides above the pool)."""
    x = normal(rng, (2, 3, 9, 7), dtype)
    w = normal(rng, (4, 3, 3, 3), dtype)
    b = normal(rng, (4,), dtype)
    args = ((1, 1), (1, 1), (1, 1))
    also = [(np.abs(w), np.abs(b))]
    y, sw, (at,) = _ops.conv2d_relu_maxpool2x2(dev(x), dev(w), dev(b), *args, "cuda", switches=True,
                                               also=[(dev(a), dev(c)) for a, c in also], at_switches=True)
    ry, rsw, (rat,) = _ops.conv2d_relu_maxpool2x2(x, w, b, *args, "reference", switches=True, also=also,
                                                  at_switches=True)
    assert host(at).shape == ry.shape == (2, 4, 4, 3)
    assert_close(host(y), ry, reduction_len=w[0].size)
    np.testing.assert_array_equal(host(sw), rsw)
    assert_close(host(at), rat, reduction_len=w[0].size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("times", [False, True])
def test_conv2d_unpool_vjp_matches_reference(times, dtype, rng):
    """Wᵀ unpool(g) (⊙ a) from a 2x2 max-pool's pooled side (odd sizes: a row and a column no window covers)."""
    x = normal(rng, (2, 3, 9, 7), dtype)
    w = normal(rng, (4, 3, 3, 3), dtype)
    args = ((1, 1), (1, 1), (1, 1))
    _, sw, _ = _ops.conv2d_relu_maxpool2x2(x, w, None, *args, "reference", switches=True)
    g = normal(rng, sw.shape, dtype)
    a = np.abs(x) if times else None
    got = host(_ops.conv2d_unpool_vjp(dev(g), dev(sw), dev(w), dev(a), x.shape, *args, "cuda"))
    want = _ops.conv2d_unpool_vjp(g, sw, w, a, x.shape, *args, "reference")
    assert_close(got, want, reduction_len=w.shape[0] * 9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("geometry", [((3, 3), (1, 1), (1, 1), (1, 1)), ((2, 3), (2, 1), (0, 1), (1, 2))])
def test_conv2d_flat_relevance_matches_reference(geometry, pooled, dtype, rng):
    """The flat rule's backward, from the conv's output or a 2x2 max-pool's pooled side (odd sizes)."""
    kernel, stride, padding, dilation = geometry
    x_shape = (2, 3, 9, 7)
    ho, wo = _ops.conv2d_output_shape(x_shape, (4, 3) + kernel, stride, padding, dilation)[2:]
    r, switches = normal(rng, (2, 4, ho, wo), dtype), None
    if pooled:
        _, switches = _ops.maxpool2d_forward(r, (2, 2), (2, 2), (0, 0), "reference")
        r = normal(rng, switches.shape, dtype)
    inv = np.abs(normal(rng, (ho, wo), dtype))
    args = (kernel, stride, padding, dilation, x_shape)
    got = host(_ops.conv2d_flat_relevance(dev(r), None if switches is None else dev(switches), dev(inv), *args,
                                          "cuda"))
    assert_close(got, _ops.conv2d_flat_relevance(r, switches, inv, *args, "reference"), reduction_len=4 * 6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_relu_maxpool2x2_chain_matches_reference(dtype, rng):
    """Two triples in a chain (a forward that keeps no record; the second with padding and no bias)."""
    x = normal(rng, (2, 1, 13, 11), dtype)
    stages = [(normal(rng, (3, 1, 3, 2), dtype), normal(rng, (3,), dtype), (1, 1), (1, 0), (1, 1)),
              (normal(rng, (4, 3, 2, 2), dtype), None, (1, 1), (1, 1), (1, 1))]
    got = host(_ops.conv2d_relu_maxpool2x2_chain(dev(x), [(dev(w), None if b is None else dev(b), *g)
                                                           for w, b, *g in stages], "cuda"))
    want = _ops.conv2d_relu_maxpool2x2_chain(x, stages, "reference")
    assert got.shape == want.shape == (2, 4, 3, 3)
    assert_close(got, want, reduction_len=2 * 3 * 2 * 2 * 4)

@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_relevance_matches_reference(dtype, rng):
    """An LRP backward a ⊙ Wᵀ(R / stab(z)) in one call (zeros in z with ε = 0: a zero denominator gives 0)."""
    a = np.maximum(normal(rng, (2, 3, 7, 6), dtype), 0)
    w = normal(rng, (4, 3, 3, 2), dtype)
    args = ((1, 1), (1, 0), (1, 1))
    z = _ops.conv2d_forward(a, np.maximum(w, 0), None, *args, "reference")
    z[0, 0, :2] = 0
    r = normal(rng, z.shape, dtype)
    got = host(_ops.conv2d_relevance(dev(r), dev(z), 0.0, dev(w), dev(a), *args, "cuda"))
    want = _ops.conv2d_relevance(r, z, 0.0, w, a, *args, "reference")
    assert np.isfinite(want).all()
    assert_close(got, want, reduction_len=4 * 3 * 2)

@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_relu_maxpool2x2_with_switches_matches_reference(dtype, rng):
    """The triple as a sweep's trace runs it: the pool's switches (integer inputs: exact ties, zeros after
    the ReLU, so the first maximum must win) and the ``also`` forward."""
    x = rng.integers(-2, 3, (2, 3, 9, 7)).astype(dtype)
    w = rng.integers(-1, 2, (4, 3, 3, 2)).astype(dtype)
    b = rng.integers(-2, 2, 4).astype(dtype)
    also = [(np.maximum(w, 0), np.maximum(b, 0))]
    args = ((1, 1), (1, 0), (1, 1))
    y, sw, extra = _ops.conv2d_relu_maxpool2x2(dev(x), dev(w), dev(b), *args, "cuda", switches=True,
                                               also=[(dev(a), dev(c)) for a, c in also])
    want_y, want_sw, want_extra = _ops.conv2d_relu_maxpool2x2(x, w, b, *args, "reference", switches=True, also=also)
    np.testing.assert_array_equal(host(y), want_y)
    np.testing.assert_array_equal(host(sw), want_sw)
    np.testing.assert_array_equal(host(extra[0]), want_extra[0])
