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
import warnings

import numpy as np
import pytest

import relprop
from relprop._backend import kernels
from relprop.patterns import PatternWarning

from bench.nets import best, cifar_vgg_spec, random_net


def _matmul_gflops(n=1024):
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    out = np.empty_like(a)
    np.matmul(a, a, out=out)
    return 2 * n**3 / best(lambda: np.matmul(a, a, out=out), 3) / 1e9


@pytest.fixture(scope="module")
def vgg(request):
    k = kernels("cpu")
    missing = [n for n in ("dense_forward", "dense_vjp", "conv2d_forward", "conv2d_vjp") if not hasattr(k, n)]
    if missing:
        pytest.skip(f"cpu kernels missing: {missing}")
    disabled = request.config.getoption("benchmark_disable", False)
    x = np.random.default_rng(1).normal(size=(2 if disabled else 64, 3, 32, 32)).astype(np.float32)
    net = random_net(cifar_vgg_spec())
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
    forward = best(lambda: net.forward(x), 3)
    benchmark.pedantic(stats.update, args=(x,), rounds=5, iterations=1, warmup_rounds=1)
    forward = min(forward, best(lambda: net.forward(x), 3))   # before and after: the quieter one counts
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
    forward = best(lambda: net.forward(x), 3)
    benchmark.pedantic(explainer, args=(x,), rounds=5, iterations=1, warmup_rounds=1)
    forward = min(forward, best(lambda: net.forward(x), 3))
    benchmark.extra_info.update(forward_s=forward, x_forward=benchmark.stats.stats.min / forward)
