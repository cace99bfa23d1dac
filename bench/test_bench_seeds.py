"""The seeds' feature-level methods: top-k activations over a data set and LIME, as ratios to a forward pass.

- ``top9-10k-digits``: top-9 activations of every channel of the digits CNN's last conv feature map
  (layer 4, 16 channels) over 10,000 digit images (the 1,797 scikit-learn digits at 28x28, tiled; random
  images without scikit-learn).  ``extra_info["x_forward"]``: its time over the time of one full forward
  pass of the same 10,000 images in the same batches, timed right after (target: <= 2).
- ``lime-cifar-vgg``: LIME with 1,000 perturbations of one 3x32x32 image on the CIFAR-VGG net (random
  weights), batches of 100 perturbations.  ``extra_info["x_batched_forward"]``: its time per image over the
  time of one forward pass of a batch of 100, timed right after (target: <= 12; 10 of them are the
  perturbations themselves).

``pytest bench --benchmark-disable`` runs each once at toy sizes (a smoke test).
"""

import numpy as np
import pytest

import relprop
from relprop import visualize

from bench.nets import best, cifar_vgg_spec, random_net


@pytest.fixture(scope="module")
def smoke(request):
    return bool(request.config.getoption("benchmark_disable", False))


def _digits(n):
    try:
        from relprop.nets import data

        x, _ = data.digits("all", 28)
    except ImportError:
        x = np.random.default_rng(0).random((1797, 1, 28, 28)).astype(np.float32)
    return np.ascontiguousarray(np.resize(x, (n,) + x.shape[1:]))


@pytest.mark.benchmark(group="seeds")
def test_top9_over_10000_digits(benchmark, smoke):
    net = relprop.zoo.load("digits_cnn").net
    x = _digits(300 if smoke else 10_000)
    layer, batch = 4, 256
    visualize.top_activations(net, x[:batch], layer, k=9, batch_size=batch)  # compile outside the timing
    top = benchmark.pedantic(visualize.top_activations, args=(net, x, layer),
                             kwargs={"k": 9, "batch_size": batch}, rounds=1 if smoke else 3, iterations=1)
    assert top.values.shape == (16, 9)
    if not smoke:
        seconds = float(benchmark.stats.stats.min)

        def forward():
            for s in range(0, len(x), batch):
                net.forward(x[s:s + batch])

        fwd = best(forward, 3)
        benchmark.extra_info.update(seconds=seconds, forward_seconds=fwd, x_forward=seconds / fwd,
                                    samples=len(x), us_per_sample=1e6 * seconds / len(x))


@pytest.mark.benchmark(group="seeds")
def test_lime_1000_samples_cifar_vgg(benchmark, smoke):
    pytest.importorskip("skimage")
    from scipy.ndimage import gaussian_filter

    net = random_net(cifar_vgg_spec())
    rng = np.random.default_rng(1)
    # smooth images, so that SLIC finds regions (white noise has none)
    x = gaussian_filter(rng.standard_normal((2, 3, 32, 32)), sigma=(0, 0, 2, 2)).astype(np.float32)
    samples, batch = (20, 10) if smoke else (1000, 100)
    explainer = relprop.Explainer(net, "lime", samples=samples, batch_size=batch, seed=0, n_segments=50)
    explainer(x[:1])  # compile outside the timing
    r = benchmark.pedantic(explainer, args=(x[1:],), rounds=1 if smoke else 3, iterations=1)
    assert np.isfinite(r).all()
    if not smoke:
        seconds = float(benchmark.stats.stats.min)
        xb = np.repeat(x[1:], batch, axis=0)
        fwd = best(lambda: net.forward(xb), 5)
        benchmark.extra_info.update(seconds=seconds, batched_forward_seconds=fwd, x_batched_forward=seconds / fwd,
                                    samples=samples, batch_size=batch)
