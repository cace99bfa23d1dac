"""Evaluation of explanations (relprop.metrics): perturbation curves, AOPC, sanity check, consistency."""
import numpy as np
import pytest

import relprop
from relprop import _backend, metrics
from relprop.nets import from_spec

from helpers import assert_close


@pytest.fixture(scope="module")
def backend():
    k = _backend.kernels("cpu")
    return "cpu" if all(hasattr(k, f) for f in ("dense_forward", "conv2d_forward", "conv2d_vjp")) else "reference"


def linear_image_net(rng, shape=(2, 7, 6), classes=3, bias=True):
    d = int(np.prod(shape))
    w = rng.standard_normal((classes, d))
    weights = {"1.weight": w}
    if bias:
        weights["1.bias"] = rng.standard_normal(classes)
    net = from_spec([{"type": "flatten"}, {"type": "linear", "in": d, "out": classes}], weights)
    return net, w, weights.get("1.bias", np.zeros(classes))


SMALL_CNN = [
    {"type": "conv2d", "in": 2, "out": 4, "kernel": 3, "padding": 1}, {"type": "relu"},
    {"type": "maxpool2d", "kernel": 2, "stride": 2},
    {"type": "conv2d", "in": 4, "out": 6, "kernel": 3, "padding": 1}, {"type": "relu"},
    {"type": "flatten"}, {"type": "linear", "in": 6 * 4 * 4, "out": 8}, {"type": "relu"},
    {"type": "linear", "in": 8, "out": 3},
]


def random_cnn(rng):
    w = {}
    for i, e in enumerate(SMALL_CNN):
        if e["type"] == "conv2d":
            shape = (e["out"], e["in"], 3, 3)
        elif e["type"] == "linear":
            shape = (e["out"], e["in"])
        else:
            continue
        w[f"{i}.weight"] = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        w[f"{i}.bias"] = 0.1 * rng.standard_normal(shape[0])
    return from_spec(SMALL_CNN, w)


# -- perturbation curves -----------------------------------------------------------------------
def closed_form_curve(x, w_c, b_c, patch, steps):
    """f_c(x) − Σ of the w·x of the removed patches, most relevant (by Σ w·x) first."""
    n, _, h, wd = x.shape
    r = (w_c * x).sum(1)
    curves = []
    for i in range(n):
        tiles = [r[i, a:a + patch, e:e + patch].sum() for a in range(0, h, patch) for e in range(0, wd, patch)]
        order = np.argsort(-np.array(tiles), kind="stable")
        removed = np.cumsum(np.array(tiles)[order])[:steps]
        f = r[i].sum() + b_c
        curves.append(np.concatenate([[f], f - removed]))
    return np.array(curves)


def test_curve_linear_closed_form_and_below_random(rng, backend):
    net, w, b = linear_image_net(rng)
    x = rng.standard_normal((3, 2, 7, 6))
    t = 2
    w_c = w[t].reshape(2, 7, 6)
    R = w_c * x  # the exact relevance of a linear model
    curve = metrics.perturbation_curve(net, x, R, target=t, patch=2, steps=10, fill=0.0, backend=backend, batch_size=7)
    assert curve.shape == (3, 11)
    assert_close(curve, closed_form_curve(x, w_c, b[t], 2, 10), reduction_len=84)
    rand = metrics.perturbation_curve(net, x, R, target=t, patch=2, steps=10, fill=0.0, order="random", seed=1,
                                      backend=backend)
    least = metrics.perturbation_curve(net, x, R, target=t, patch=2, steps=10, fill=0.0, order="least_relevant",
                                       backend=backend)
    tol = 1e-9
    assert np.all(curve <= rand + tol) and np.all(rand <= least + tol)  # top-k sums dominate any k patches
    assert metrics.aopc(curve) > metrics.aopc(rand) > metrics.aopc(least)
    np.testing.assert_array_equal(curve[:, 0], rand[:, 0])


def test_curve_full_removal_reaches_fill(rng, backend):
    net, w, b = linear_image_net(rng)
    x = rng.standard_normal((2, 2, 7, 6))
    R = rng.standard_normal(x.shape)
    kw = dict(target=0, patch=3, backend=backend)
    # every patch gone: the image is the fill, whatever the order (same seed -> same noise image)
    a = metrics.perturbation_curve(net, x, R, fill="random", seed=5, **kw)
    c = metrics.perturbation_curve(net, x, R, fill="random", seed=5, order="random", **kw)
    assert a.shape == (2, 3 * 2 + 1)
    assert_close(a[:, -1], c[:, -1], reduction_len=84)
    m = metrics.perturbation_curve(net, x, R, fill="mean", **kw)
    means = np.broadcast_to(x.mean(axis=(2, 3), keepdims=True), x.shape)
    assert_close(m[:, -1], means.reshape(2, -1) @ w[0] + b[0], reduction_len=84)
    # the random fill lies in each sample's [min, max]: the curve is finite and the batch size does not matter
    d = metrics.perturbation_curve(net, x, R, fill="random", seed=5, batch_size=3, **kw)
    assert_close(a, d, reduction_len=84)


def test_curve_dense_input_and_channel_summed_relevance(rng, backend):
    w, b = rng.standard_normal((2, 9)), rng.standard_normal(2)
    net = from_spec([{"type": "linear", "in": 9, "out": 2}], {"0.weight": w, "0.bias": b})
    x = rng.standard_normal((2, 9))
    curve = metrics.perturbation_curve(net, x, w[1] * x, target=1, patch=3, fill=0.0, backend=backend)
    expected = closed_form_curve(x[:, None, None, :], w[1].reshape(1, 1, 9), b[1], 3, 3)
    # a (N, 1, D) "image" has tiles of 1 x 3 features: compare against the 1-row closed form
    r = w[1] * x
    for i in range(2):
        tiles = r[i].reshape(3, 3).sum(1)
        f = r[i].sum() + b[1]
        expected[i] = np.concatenate([[f], f - np.cumsum(np.sort(tiles)[::-1])])
    assert_close(curve, expected, reduction_len=9)
    # R summed over channels: (N, H, W) and (N, 1, H, W) give the same curve as the full map
    net2, w2, _ = linear_image_net(rng)
    x2 = rng.standard_normal((2, 2, 7, 6))
    R2 = rng.standard_normal(x2.shape)
    full = metrics.perturbation_curve(net2, x2, R2, patch=2, fill=0.0, steps=4, backend=backend)
    summed = metrics.perturbation_curve(net2, x2, R2.sum(1), patch=2, fill=0.0, steps=4, backend=backend)
    np.testing.assert_array_equal(full, summed)


def test_curve_target_defaults_to_original_argmax(rng, backend):
    net = random_cnn(rng)
    x = rng.standard_normal((3, 2, 8, 8))
    R = relprop.explain(net, x, "gradient_x_input", backend=backend)
    a = metrics.perturbation_curve(net, x, R, patch=2, steps=5, seed=0, backend=backend)
    b = metrics.perturbation_curve(net, x, R, patch=2, steps=5, seed=0, target=net.forward(x, backend).argmax(1),
                                   backend=backend)
    np.testing.assert_array_equal(a, b)


def test_aopc_is_samek_2017():
    """1/(L+1) Σ_{k=0..L} (f(x⁽⁰⁾) − f(x⁽ᵏ⁾)): the k = 0 term (zero) is in the sum and the count."""
    curve = np.array([[3.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    assert metrics.aopc(curve) == pytest.approx(((0 + 1 + 3) / 3 + 0) / 2)
    np.testing.assert_allclose(metrics.aopc(curve, per_sample=True), [4 / 3, 0.0])
    with pytest.raises(ValueError):
        metrics.aopc(np.ones((2, 1)))


@pytest.mark.parametrize("kwargs", [
    {"fill": "zeros"}, {"order": "best"}, {"patch": 0}, {"patch": 9}, {"steps": 0}, {"steps": 17},
    {"batch_size": 0},
])
def test_curve_bad_parameters(rng, backend, kwargs):
    net, _, _ = linear_image_net(rng, shape=(1, 8, 8))
    x = rng.standard_normal((2, 1, 8, 8))
    options = {"patch": 2, **kwargs}
    with pytest.raises(ValueError):
        metrics.perturbation_curve(net, x, x, backend=backend, **options)


def test_curve_bad_relevance_shape(rng, backend):
    net, _, _ = linear_image_net(rng)
    x = rng.standard_normal((2, 2, 7, 6))
    with pytest.raises(ValueError, match="R has shape"):
        metrics.perturbation_curve(net, x, x[:, :, :6], backend=backend)


# -- cascading randomisation -------------------------------------------------------------------
def test_randomization_gradient_drops(rng, backend):
    net = random_cnn(rng)
    before = {k: v.copy() for k, v in net.state_dict().items()}
    x = rng.standard_normal((4, 2, 8, 8))
    res = metrics.randomization_check(net, x, "gradient", seed=0, backend=backend)
    assert res.layers == [None, 8, 6, 3, 0]
    assert res.spearman.shape == res.spearman_abs.shape == (5, 4)
    np.testing.assert_allclose(res.spearman[0], 1.0)
    np.testing.assert_allclose(res.spearman_abs[0], 1.0)
    mean = res.mean()
    assert mean[-1] < 0.5 and mean[1:].max() < 0.9, mean
    for k, v in net.state_dict().items():  # the user's net is untouched
        np.testing.assert_array_equal(v, before[k])


def test_randomization_options_pass_through(rng, backend):
    net = random_cnn(rng)
    x = rng.standard_normal((2, 2, 8, 8))
    res = metrics.randomization_check(net, x, "gradcam", seed=1, upsample=None, backend=backend, return_maps=True)
    assert res.maps[0].shape == (2, 1, 4, 4) and len(res.maps) == 5
    assert set(res.as_dict()) == {"layers", "spearman", "spearman_abs"}


# -- consistency -------------------------------------------------------------------------------
def test_conservation_linear(rng, backend):
    net, w, b = linear_image_net(rng)
    x = rng.standard_normal((3, 2, 7, 6))
    t = net.forward(x, backend).argmax(1)
    R = w[t].reshape(3, 2, 7, 6) * x  # Σ R = f_c(x) − b_c
    c = metrics.conservation(net, x, R, backend=backend)
    assert_close(c["absolute"], -b[t], reduction_len=84, magnitude=10)
    assert_close(c["output"], c["sum"] + b[t], reduction_len=84, magnitude=10)
    assert_close(c["relative"], -b[t] / np.abs(c["output"]), reduction_len=84, magnitude=10)


def test_positivity():
    R = np.array([[1.0, 2.0, 0.0, 1.0], [-1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    p = metrics.positivity(R)
    np.testing.assert_allclose(p["fraction"], [1.0, 0.75, 1.0])
    np.testing.assert_allclose(p["negative_mass"], [0.0, 0.25, 0.0])
    np.testing.assert_array_equal(p["positive"], [True, False, True])


def test_signal_quality_lives_beside_the_other_metrics():
    import relprop.patterns as patterns

    assert metrics.signal_quality is patterns.signal_quality
    assert {"signal_quality", "SignalQuality"} <= set(metrics.__all__)
