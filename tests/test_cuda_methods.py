"""End to end on the CUDA backend: explanation methods equal the cpu (and reference) backends.

The ``cuda``-marked tests run under the CUDA simulator (NumPy arrays) or on a GPU (CuPy
arrays) and are skipped otherwise (tests/conftest.py).  The unmarked tests at the end
check the backend plumbing (errors without a GPU, no NumPy/CuPy mixing) in the default run.
"""
import numpy as np
import pytest

import relprop
from helpers import assert_close
from nets_factory import make_net, small_conv_spec
from relprop import _backend, _config

cuda = pytest.mark.cuda


def dev(a):
    if _backend.simulator_enabled():
        return a
    import cupy

    return cupy.asarray(a)


@pytest.fixture
def small_launches(monkeypatch):
    monkeypatch.setattr(_config, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(_config, "CUDA_MAX_BLOCKS", 4)


@pytest.fixture(scope="module")
def problem():
    """A small conv net (padded conv, overlapping max-pool, strided conv, padded avg-pool, dense) and a batch."""
    net = make_net(small_conv_spec(), seed=3, dtype=np.float32)
    x = np.random.default_rng(7).standard_normal((3, 2, 9, 8)).astype(np.float32)
    return net, x


def _known(method):
    if method not in relprop.known_methods():
        pytest.skip(f"method {method!r} is not registered yet")


# method name -> options; the box bounds cover the inputs
METHODS = {
    "gradient": {},
    "gradient_x_input": {},
    "deconvnet": {},
    "guided_backprop": {},
    "lrp.epsilon": {"epsilon": 0.1},
    "lrp.epsilon_plus_flat": {},
    "lrp.epsilon_alpha2_beta1": {},
    "lrp.epsilon_gamma_box": {"low": -5.0, "high": 5.0},
    "integrated_gradients": {"steps": 4},
    "smoothgrad": {"n": 3, "seed": 0},
    "gradcam": {},
    "occlusion": {},
}


def _check_method(net, x, method, options, backends=("cpu", "reference")):
    got = _backend.to_numpy(relprop.explain(net, dev(x), method, backend="cuda", **options))
    assert got.shape == x.shape or method == "gradcam", got.shape
    for other in backends:
        expected = relprop.explain(net, x, method, backend=other, **options)
        assert_close(got, expected, reduction_len=200)


@cuda
@pytest.mark.parametrize("method", list(METHODS))
def test_method_cuda_equals_cpu(method, problem, small_launches):
    _known(method)
    net, x = problem
    _check_method(net, x, method, METHODS[method])


@cuda
def test_forward_and_trace_cuda_equal_cpu(problem, small_launches):
    net, x = problem
    logits = _backend.to_numpy(net.forward(dev(x), backend="cuda"))
    assert_close(logits, net.forward(x, backend="cpu"), reduction_len=200)
    trace = net.trace(dev(x), backend="cuda")
    assert trace.backend == "cuda"
    ref = net.trace(x, backend="cpu")
    for i, (a, b) in enumerate(zip(trace.inputs, ref.inputs)):
        assert_close(_backend.to_numpy(a), b, reduction_len=200)
    for i, sw in ref.switches.items():
        np.testing.assert_array_equal(_backend.to_numpy(trace.switches[i]), sw)


@cuda
@pytest.mark.parametrize("method", ["gradient", "guided_backprop", "lrp.epsilon_plus_flat", "lrp.zplus"])
def test_sweeps_below_2x2_pools_cuda_equal_cpu(method, small_launches):
    """Conv, ReLU, 2x2 max-pool triples (odd sizes): the whole sweeps hand the signal down still pooled
    (conv2d_unpool_vjp) and LRP records z⁺ at the switches (gather_at_switches) on the cuda backend too."""
    spec = [{"type": "conv2d", "in": 2, "out": 3, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "maxpool2d", "kernel": 2},
            {"type": "conv2d", "in": 3, "out": 4, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"}, {"type": "linear", "in": 4 * 2 * 2, "out": 3}]
    net = make_net(spec, seed=4, dtype=np.float32)
    x = np.random.default_rng(9).standard_normal((2, 2, 9, 11)).astype(np.float32)
    sweep = relprop.Explainer(net, method)._method
    assert any(type(r).__name__ in ("VjpOfUnpooled", "DividedAbove") for r in sweep.whole_rules)
    _check_method(net, x, method, {})


@cuda
def test_float64_gradient_and_lrp(small_launches):
    net = make_net(small_conv_spec(), seed=5, dtype=np.float64)
    x = np.random.default_rng(8).standard_normal((1, 2, 9, 8))  # batch 1
    for method in ("gradient", "lrp.epsilon_plus_flat"):
        _known(method)
        _check_method(net, x, method, {})


@cuda
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # PatternWarning: units without samples in a regime
def test_pattern_methods_cuda_equal_cpu(problem, small_launches):
    _known("pattern.attribution")
    from relprop.patterns import fit_patterns

    net, x = problem
    data = np.random.default_rng(9).standard_normal((48, 2, 9, 8)).astype(np.float32)
    fitted = {b: fit_patterns(net, dev(data) if b == "cuda" else data, batch_size=32, progress=False, backend=b)
              for b in ("cuda", "cpu")}
    for i in net.linear_layers():
        for name in ("a", "a_plus"):
            got, want = (_backend.to_numpy(getattr(fitted[b][i], name)).astype(np.float32) for b in ("cuda", "cpu"))
            assert_close(got, want, reduction_len=2000)  # float64 patterns of float32 sums: float32 tolerance
    for method in ("pattern.attribution", "pattern.net"):
        got = _backend.to_numpy(relprop.explain(net, dev(x), method, backend="cuda", patterns=fitted["cuda"]))
        expected = relprop.explain(net, x, method, backend="cpu", patterns=fitted["cpu"])
        assert_close(got, expected, reduction_len=2000)


# ---------------------------------------------------------------- plumbing (default run, no GPU needed)

def test_cuda_backend_without_gpu_or_simulator_raises(monkeypatch, problem):
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.setattr(_backend, "cuda_available", lambda: False)
    net, x = problem
    with pytest.raises(RuntimeError, match="CUDA backend requested"):
        relprop.explain(net, x, "gradient", backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA backend requested"):
        relprop.kernels.relu_forward(x, backend="cuda")


def test_cuda_backend_on_gpu_machine_wants_cupy_arrays(monkeypatch, problem):
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.setattr(_backend, "cuda_available", lambda: True)
    with pytest.raises(TypeError, match="cupy"):
        relprop.kernels.relu_forward(problem[1], backend="cuda")


class _FakeCupyArray:
    """Just enough of a cupy.ndarray for the namespace check (no CuPy needed)."""

    __module__ = "cupy._core.core"
    __cuda_array_interface__ = {}
    dtype = np.dtype(np.float32)
    shape = (2,)
    ndim = 1


def test_mixing_numpy_and_cupy_raises():
    with pytest.raises(TypeError, match="mixed"):
        _backend.array_namespace(np.zeros(2, np.float32), _FakeCupyArray())
