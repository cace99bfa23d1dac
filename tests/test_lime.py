"""LIME (explain(..., "lime")): exact recovery on linear models, segment painting, SLIC superpixels,
seeding and batching, and bad input."""
import numpy as np
import pytest
from scipy.stats import spearmanr

import relprop
from relprop import lime


def _linear(rng, d, out=2):
    w = rng.normal(size=(out, d))
    net = relprop.from_spec([{"type": "linear", "in": d, "out": out}], {"0.weight": w, "0.bias": rng.normal(size=out)})
    return net, w


def test_registered():
    assert "lime" in relprop.known_methods()


@pytest.mark.parametrize("baseline", ["zero", "array"])
def test_linear_model_one_segment_per_feature_recovers_w_times_x_minus_baseline(rng, baseline):
    d = 16
    net, w = _linear(rng, d)
    x = rng.normal(size=(4, d))
    b = 0.0 if baseline == "zero" else rng.normal(size=d)
    R = relprop.explain(net, x, "lime", target=1, samples=400, seed=0, baseline=b)
    want = w[1] * (x - b)
    for i in range(len(x)):
        assert spearmanr(R[i], want[i]).statistic >= 0.95
        np.testing.assert_array_equal(np.sign(R[i]), np.sign(want[i]))
    # without the ridge penalty the surrogate of a linear f is exact: β = w ⊙ (x − b)
    R0 = relprop.explain(net, x, "lime", target=1, samples=400, seed=0, baseline=b, alpha=0.0)
    np.testing.assert_allclose(R0, want, rtol=1e-8, atol=1e-8)
    # explicit one-segment-per-feature map: the same
    R1 = relprop.explain(net, x, "lime", target=1, samples=400, seed=0, baseline=b, segments=np.arange(d))
    np.testing.assert_allclose(R1, R)


def test_segments_on_images_are_painted_with_their_coefficient(rng):
    """A conv → linear net without ReLU is linear: each segment's exact coefficient is the sum of
    ∂f/∂x ⊙ (x − b) over its pixels and channels."""
    spec = [{"type": "conv2d", "in": 2, "out": 3, "kernel": 3, "padding": 1}, {"type": "flatten"},
            {"type": "linear", "in": 3 * 8 * 8, "out": 4}]
    net = relprop.from_spec(spec, {"0.weight": rng.normal(size=(3, 2, 3, 3)), "2.weight": rng.normal(size=(4, 192))})
    x = rng.normal(size=(2, 2, 8, 8))
    seg = np.repeat(np.repeat(np.arange(16).reshape(4, 4), 2, 0), 2, 1)  # 16 blocks of 2x2, shared by channels
    seg[0, 0] = 99  # labels need not be consecutive
    fit = lime.lime(net, x, target=3, segments=seg, samples=300, seed=1, alpha=0.0, batch_size=7)
    grad = relprop.explain(net, x, "gradient", target=3)
    contrib = grad * x
    for i in range(2):
        labels = np.unique(seg, return_inverse=True)[1].reshape(seg.shape)
        exact = np.bincount(np.broadcast_to(labels, (2, 8, 8)).ravel(), contrib[i].ravel())
        np.testing.assert_allclose(fit.coef[i], exact, rtol=1e-7, atol=1e-9)
        assert fit.score[i] > 1 - 1e-9  # a linear f is fitted perfectly
    R = relprop.explain(net, x, "lime", target=3, segments=seg, samples=300, seed=1, alpha=0.0)
    np.testing.assert_allclose(R, fit.heatmap())
    for i in range(2):
        for s in np.unique(seg):
            vals = R[i][:, seg == s]
            assert np.ptp(vals) == 0  # one value per segment, on every channel


def test_mean_baseline_is_each_segments_mean_per_channel(rng):
    x = rng.normal(size=(1, 2, 4, 4))
    seg = np.repeat(np.arange(4), 4).reshape(4, 4)  # one segment per row
    explainer = relprop.Explainer(relprop.from_spec([{"type": "flatten"}, {"type": "linear", "in": 32, "out": 1}],
                                                    {"1.weight": np.ones((1, 32))}), "lime", segments=seg,
                                  baseline="mean")
    maps = explainer._method._segment_maps(x)
    base = explainer._method._baselines(x, maps)
    np.testing.assert_allclose(base[0], np.broadcast_to(x[0].mean(axis=2, keepdims=True), (2, 4, 4)))


def test_seeded_and_independent_of_batch_size(rng):
    m = relprop.zoo.load("digits_mlp")
    x = m.x[:3]
    a = relprop.explain(m.net, x, "lime", samples=200, seed=5, batch_size=64)
    b = relprop.explain(m.net, x, "lime", samples=200, seed=5, batch_size=13)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    c = relprop.explain(m.net, x, "lime", samples=200, seed=6)
    assert not np.allclose(a, c)


def test_slic_superpixels_and_mean_baseline():
    pytest.importorskip("skimage")
    m = relprop.zoo.load("detector")
    x = m.x[:2]
    fit = lime.lime(m.net, x, samples=150, seed=0, n_segments=30, baseline="mean")
    for i in range(2):
        n_seg = len(fit.coef[i])
        assert 10 <= n_seg <= 60
        assert fit.segments[i].shape == x.shape[1:] and fit.segments[i].max() == n_seg - 1
        assert np.isfinite(fit.coef[i]).all()
    # the class evidence sits on the half with the target digit (the zoo's ground-truth mask)
    R = fit.heatmap()
    pos = np.maximum(R, 0)
    share = (pos * m.masks[:2]).reshape(2, -1).sum(1) / pos.reshape(2, -1).sum(1)
    assert (share > 0.6).all(), share
    seg = lime.slic_segments(x[0], n_segments=20)
    assert seg.shape == x.shape[2:] and seg.min() == 0


def test_bad_input(rng):
    net, _ = _linear(rng, 6)
    x = rng.normal(size=(2, 6))
    with pytest.raises(ValueError, match="segments has shape"):
        relprop.explain(net, x, "lime", segments=np.arange(5))
    with pytest.raises(TypeError, match="segments has dtype"):
        relprop.explain(net, x, "lime", segments=np.arange(6.0))
    with pytest.raises(ValueError, match="negative"):
        relprop.explain(net, x, "lime", segments=np.arange(6) - 1)
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        relprop.explain(net, bad, "lime")
    with pytest.raises(ValueError, match="NaN"):
        relprop.explain(net, x, "lime", baseline=np.full(6, np.nan))
    with pytest.raises(ValueError, match="baseline has shape"):
        relprop.explain(net, x, "lime", baseline=np.zeros(4))
    with pytest.raises(ValueError, match="baseline"):
        relprop.explain(net, x, "lime", baseline="median")
    with pytest.raises(ValueError, match="not finite"):
        relprop.explain(net, x, "lime", baseline=float("inf"))
    with pytest.raises(ValueError, match="samples=1"):
        relprop.explain(net, x, "lime", samples=1)
    with pytest.raises(ValueError, match="kernel_width"):
        relprop.explain(net, x, "lime", kernel_width=0.0)
    with pytest.raises(ValueError, match="alpha"):
        relprop.explain(net, x, "lime", alpha=-1.0)
    with pytest.raises(TypeError, match="seed"):
        relprop.explain(net, x, "lime", seed="x")
    with pytest.raises(ValueError, match="return_layers"):
        relprop.explain(net, x, "lime", return_layers=True)
    img = relprop.zoo.load("digits_cnn")
    with pytest.raises(ValueError, match=r"segments has shape \(27, 28\)"):
        relprop.explain(img.net, img.x[:1], "lime", segments=np.zeros((27, 28), dtype=int))
