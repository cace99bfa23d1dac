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

from bench.nets import cifar_vgg_spec, random_net


def _backend_name():
    k = _backend.kernels("cpu")
    return "cpu" if all(hasattr(k, f) for f in ("dense_forward", "conv2d_forward", "conv2d_vjp")) else "reference"


@pytest.fixture(scope="module")
def smoke(request):
    return bool(request.config.getoption("benchmark_disable", False))


@pytest.fixture(scope="module")
def vgg():
    return random_net(cifar_vgg_spec())


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
