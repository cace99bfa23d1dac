"""PatternNet statistics throughput and the pattern methods on CIFAR-VGG (random weights and data).

``test_pattern_stats_update`` times one :meth:`relprop.PatternStats.update` on a batch of 64
3x32x32 images: the traced forward plus the covariance sums of all 8 dense/conv layers.
``extra_info`` records, measured in the same run (the machine is shared and noisy, so only
ratios within one run mean anything):

- ``x_forward``: that time over relprop's own forward on the same batch (target, issue 4: <= 5);
- ``images_per_s``: the statistics throughput;
- ``forward_s`` and ``matmul_gflops`` (np.matmul, float32, 1024³): the yardsticks.

The pattern methods (one explanation of the batch, traced forward included) are timed too.
``pytest bench --benchmark-disable`` runs everything once on a batch of 2 (a smoke test).
"""
import time
import warnings

import numpy as np
import pytest

import relprop
from relprop._backend import kernels
from relprop.patterns import PatternWarning


def _vgg_spec():
    """conv3x3 pad1 3->64, 64->64, maxpool2, 64->128, 128->128, maxpool2, 128->256, 256->256, maxpool2,
    flatten, fc 4096->512, fc 512->10; ReLU after every conv and the first fc."""
    spec, c = [], 3
    for block in ((64, 64), (128, 128), (256, 256)):
        for k in block:
            spec += [{"type": "conv2d", "in": c, "out": k, "kernel": 3, "padding": 1}, {"type": "relu"}]
            c = k
        spec.append({"type": "maxpool2d", "kernel": 2})
    return spec + [{"type": "flatten"}, {"type": "linear", "in": 4096, "out": 512}, {"type": "relu"},
                   {"type": "linear", "in": 512, "out": 10}]


def _random_vgg(seed=0):
    rng = np.random.default_rng(seed)
    spec, weights = _vgg_spec(), {}
    for i, layer in enumerate(spec):
        if layer["type"] == "conv2d":
            shape = (layer["out"], layer["in"], 3, 3)
        elif layer["type"] == "linear":
            shape = (layer["out"], layer["in"])
        else:
            continue
        weights[f"{i}.weight"] = (rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
        weights[f"{i}.bias"] = (rng.normal(size=shape[0]) * 0.01).astype(np.float32)
    return relprop.from_spec(spec, weights)


def _best(fn, repeat):
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _matmul_gflops(n=1024):
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    out = np.empty_like(a)
    np.matmul(a, a, out=out)
    return 2 * n**3 / _best(lambda: np.matmul(a, a, out=out), 3) / 1e9


@pytest.fixture(scope="module")
def vgg(request):
    k = kernels("cpu")
    missing = [n for n in ("dense_forward", "dense_vjp", "conv2d_forward", "conv2d_vjp") if not hasattr(k, n)]
    if missing:
        pytest.skip(f"cpu kernels missing: {missing}")
    disabled = request.config.getoption("benchmark_disable", False)
    x = np.random.default_rng(1).normal(size=(2 if disabled else 64, 3, 32, 32)).astype(np.float32)
    net = _random_vgg()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)   # random nets have dead units
        patterns = relprop.fit_patterns(net, x, progress=False)
    return net, x, patterns


def test_pattern_stats_update(benchmark, vgg):
    net, x, _ = vgg
    benchmark.group = "patterns-cifar_vgg"
    stats = relprop.PatternStats(net)
    if benchmark.disabled:
        benchmark(stats.update, x)
        assert stats.n_inputs == x.shape[0]
        return
    stats.update(x)                                       # compile outside the timing
    forward = _best(lambda: net.forward(x), 3)
    benchmark.pedantic(stats.update, args=(x,), rounds=5, iterations=1, warmup_rounds=1)
    forward = min(forward, _best(lambda: net.forward(x), 3))   # before and after: the quieter one counts
    t = benchmark.stats.stats.min
    benchmark.extra_info.update(forward_s=forward, x_forward=t / forward, images_per_s=x.shape[0] / t,
                                matmul_gflops=_matmul_gflops())


@pytest.mark.parametrize("method", ["pattern.net", "pattern.attribution"])
def test_pattern_method(benchmark, vgg, method):
    net, x, patterns = vgg
    benchmark.group = "patterns-cifar_vgg"
    explainer = relprop.Explainer(net, method, patterns=patterns)
    if benchmark.disabled:
        r = benchmark(explainer, x)
        assert r.shape == x.shape and np.isfinite(r).all()
        return
    explainer(x)
    forward = _best(lambda: net.forward(x), 3)
    benchmark.pedantic(explainer, args=(x,), rounds=5, iterations=1, warmup_rounds=1)
    forward = min(forward, _best(lambda: net.forward(x), 3))
    benchmark.extra_info.update(forward_s=forward, x_forward=benchmark.stats.stats.min / forward)
