"""Input-level methods and pixel flipping on the CIFAR-VGG net (random weights).

Each method explains a batch of 16; ``extra_info["x_sweep"]`` is its time as a multiple of
one forward + gradient sweep of the same batch, timed right after it (the machine is shared:
only ratios measured together mean anything).  Pixel flipping
runs 64 images x 100 steps (``extra_info["seconds"]``).

``pytest bench --benchmark-disable`` runs every case once at toy sizes (a smoke test).
"""
import time

import numpy as np
import pytest

import relprop
from relprop import _backend, metrics
from relprop.nets import from_spec


def _backend_name():
    k = _backend.kernels("cpu")
    return "cpu" if all(hasattr(k, f) for f in ("dense_forward", "conv2d_forward", "conv2d_vjp")) else "reference"


def cifar_vgg_spec():
    """3x32x32 input; conv3x3 pad 1: 3→64, 64→64, maxpool 2, 64→128, 128→128, maxpool 2,
    128→256, 256→256, maxpool 2; flatten; fc 4096→512, relu, fc 512→10."""
    spec, c = [], 3
    for k in (64, 128, 256):
        spec += [{"type": "conv2d", "in": c, "out": k, "kernel": 3, "padding": 1}, {"type": "relu"},
                 {"type": "conv2d", "in": k, "out": k, "kernel": 3, "padding": 1}, {"type": "relu"},
                 {"type": "maxpool2d", "kernel": 2, "stride": 2}]
        c = k
    return spec + [{"type": "flatten"}, {"type": "linear", "in": 4096, "out": 512}, {"type": "relu"},
                   {"type": "linear", "in": 512, "out": 10}]


@pytest.fixture(scope="module")
def smoke(request):
    return bool(request.config.getoption("benchmark_disable", False))


@pytest.fixture(scope="module")
def vgg():
    rng = np.random.default_rng(0)
    spec, weights = cifar_vgg_spec(), {}
    for i, e in enumerate(spec):
        if e["type"] in ("conv2d", "linear"):
            shape = (e["out"], e["in"], 3, 3) if e["type"] == "conv2d" else (e["out"], e["in"])
            fan_in = int(np.prod(shape[1:]))
            weights[f"{i}.weight"] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
            weights[f"{i}.bias"] = (0.01 * rng.standard_normal(shape[0])).astype(np.float32)
    return from_spec(spec, weights)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).standard_normal((64, 3, 32, 32)).astype(np.float32)


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _sweep_seconds(vgg, x, backend):
    """One forward + gradient sweep of the same batch (the unit of the method timings), best of 3."""
    relprop.explain(vgg, x, "gradient", backend=backend)
    return min(_median_time(lambda: relprop.explain(vgg, x, "gradient", backend=backend), 1) for _ in range(3))


def _methods():
    cases = [
        ("gradient", {}, {}),
        ("gradient_x_input", {}, {}),
        ("smoothgrad", {"n": 20, "seed": 0}, {"n": 2, "seed": 0}),
        ("smoothgrad_squared", {"n": 20, "seed": 0}, {"n": 2, "seed": 0}),
        ("integrated_gradients", {"steps": 50}, {"steps": 2}),
        ("expected_gradients", {"n": 50, "seed": 0}, {"n": 2, "seed": 0}),
        ("gradcam", {}, {}),
        ("guided_gradcam", {}, {}),
        ("occlusion", {"window": 4, "stride": 4}, {"window": 16, "stride": 16}),
        ("erasure", {}, {}),
    ]
    return [pytest.param(name, full, toy, id=name) for name, full, toy in cases]


@pytest.mark.benchmark(group="attribution-vgg-batch16")
@pytest.mark.parametrize("method,full,toy", _methods())
def test_method_vs_sweep(benchmark, vgg, images, smoke, method, full, toy):
    backend = _backend_name()
    x = images[:2 if smoke else 16]
    options = dict(toy if smoke else full)
    if method == "expected_gradients":
        options["data"] = images[16:48]
    explainer = relprop.Explainer(vgg, method, backend=backend, **options)
    if not smoke:
        explainer(x[:2])  # compile (numba) outside the timing
    r = benchmark.pedantic(explainer, args=(x,), rounds=1 if smoke else 2, iterations=1, warmup_rounds=0)
    assert np.isfinite(r).all()
    if not smoke:  # the sweep timed right after the method, so both see the same machine load
        seconds, sweep = float(benchmark.stats.stats.median), _sweep_seconds(vgg, x, backend)
        benchmark.extra_info.update(backend=backend, sweep_seconds=sweep, x_sweep=seconds / sweep)


@pytest.mark.benchmark(group="pixel-flipping")
def test_pixel_flipping_64x100(benchmark, vgg, images, smoke):
    """Region perturbation of 64 CIFAR images, 100 steps of 2x2 patches, random fill."""
    backend = _backend_name()
    n, steps = (4, 3) if smoke else (64, 100)
    x = images[:n]
    R = relprop.explain(vgg, x, "gradient_x_input", backend=backend)

    def run():
        return metrics.perturbation_curve(vgg, x, R, patch=2, steps=steps, seed=0, backend=backend)

    curve = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert curve.shape == (n, steps + 1)
    if not smoke:
        seconds = float(benchmark.stats.stats.median)
        forward = min(_median_time(lambda: vgg.forward(x, backend), 1) for _ in range(3))
        benchmark.extra_info.update(backend=backend, seconds=seconds, images=n, steps=steps,
                                    x_forward=seconds / forward, aopc=metrics.aopc(curve))
