"""relprop.nets.incremental: forward passes recomputed only where a changed box reaches, and the
pixel-flipping curve built on them, against plain full forward passes."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relprop
import relprop._config as config
from nets_factory import concat_spec, graph_weights, make_net, residual_spec, small_conv_spec
from relprop import metrics
from relprop.nets import incremental as inc


def _odd_spec():
    """Strided, dilated and 1x1 convolutions, max-pooling with padding in ceil mode, overlapping
    average pooling with padding: every window geometry the box arithmetic has to get right."""
    spec = [
        {"type": "conv2d", "in": 2, "out": 3, "kernel": 3, "stride": 2, "padding": 2, "dilation": 2},
        {"type": "maxpool2d", "kernel": 3, "stride": 2, "padding": 1, "ceil_mode": True},  # signed input: -inf pads
        {"type": "conv2d", "in": 3, "out": 4, "kernel": 1},
        {"type": "relu"},
        {"type": "avgpool2d", "kernel": 3, "stride": 1, "padding": 1},
        {"type": "conv2d", "in": 4, "out": 3, "kernel": [3, 2], "padding": [1, 0]},
        {"type": "flatten"},
    ]
    flat = make_net(spec).shapes((1, 2, 21, 19))[-1][1]
    return spec + [{"type": "linear", "in": flat, "out": 4}]


def _nets():
    rng = np.random.default_rng(0)
    return {
        "small_conv": (make_net(small_conv_spec(h=19, w=17)), (2, 19, 17)),
        "odd": (make_net(_odd_spec()), (2, 21, 19)),
        "residual": (relprop.from_spec(residual_spec(), graph_weights(residual_spec(), rng)), (3, 17, 15)),
        "concat": (relprop.from_spec(concat_spec(), graph_weights(concat_spec(), rng)), (2, 16, 18)),
    }


NETS = _nets()


def count_windows(mp):
    """Count the layers computed on windows (not whole) during the test."""
    calls = {"window": 0, "full": 0}
    real_full, real_put = inc.PatchedForward._full, inc.PatchedForward._put

    def full(self, *args):
        calls["full"] += 1
        return real_full(self, *args)

    def put(self, *args):
        calls["window"] += 1
        return real_put(self, *args)

    mp.setattr(inc.PatchedForward, "_full", full)
    mp.setattr(inc.PatchedForward, "_put", put)
    return calls


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("fraction", [1.01, 0.6])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_updates_equal_full_forward_passes(name, fraction, data):
    """Successive box updates (inside, at and past the border) give the logits of the changed input."""
    net, shape = NETS[name]
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3,) + shape)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "INCREMENTAL_FULL_FRACTION", fraction)
        calls = count_windows(mp)
        pf = inc.PatchedForward(net, x, "cpu")
        want = x.copy()
        for _ in range(3):
            bh, bw = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
            r0 = np.array([data.draw(st.integers(-bh + 1, shape[1] - 1)) for _ in range(3)])
            c0 = np.array([data.draw(st.integers(-bw + 1, shape[2] - 1)) for _ in range(3)])
            values = rng.standard_normal((3, shape[0], bh, bw))
            for b in range(3):
                rs, cs = max(0, r0[b]), max(0, c0[b])
                re, ce = min(shape[1], r0[b] + bh), min(shape[2], c0[b] + bw)
                want[b, :, rs:re, cs:ce] = values[b, :, rs - r0[b]:re - r0[b], cs - c0[b]:ce - c0[b]]
            got = pf.update(r0, c0, values)
            np.testing.assert_allclose(got, net.forward(want, "cpu"), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(pf.x, want)
        if fraction > 1:
            assert calls["window"] > 0  # the windows were exercised, not only whole layers


def _brute_force_curve(net, x, R, patch, steps, fill_img):
    """Pixel flipping the plain way: the perturbed copy for every (sample, step), one forward each."""
    n, _, h, w = x.shape
    nh, nw = -(-h // patch), -(-w // patch)
    score = np.zeros((n, nh * patch, nw * patch))
    score[:, :h, :w] = R.sum(axis=1)
    score = score.reshape(n, nh, patch, nw, patch).sum(axis=(2, 4)).reshape(n, -1)
    order = np.argsort(-score, axis=1, kind="stable")
    logits = net.forward(x)
    target = logits.argmax(1)
    curve = np.empty((n, steps + 1))
    curve[:, 0] = logits[np.arange(n), target]
    for i in range(n):
        xi = x[i:i + 1].copy()
        for k in range(1, steps + 1):
            t = order[i, k - 1]
            r, c = (t // nw) * patch, (t % nw) * patch
            xi[0, :, r:r + patch, c:c + patch] = fill_img[i, :, r:r + patch, c:c + patch]
            curve[i, k] = net.forward(xi)[0, target[i]]
    return curve


@pytest.mark.parametrize("name", ["small_conv", "residual"])
@pytest.mark.parametrize("patch", [1, 3])
def test_perturbation_curve_equals_brute_force(name, patch, rng):
    net, shape = NETS[name]
    x = rng.standard_normal((4,) + shape)
    R = rng.standard_normal(x.shape)
    steps = 12
    with pytest.MonkeyPatch.context() as mp:
        calls = count_windows(mp)
        curve = metrics.perturbation_curve(net, x, R, patch=patch, steps=steps, fill=0.5, batch_size=3,
                                           progress=False)
        assert calls["window"] > 0
    want = _brute_force_curve(net, x, R, patch, steps, np.full_like(x, 0.5))
    np.testing.assert_allclose(curve, want, rtol=1e-12, atol=1e-12)


def test_perturbation_curve_float32_and_random_fill(rng):
    """float32 and the random fill: the incremental curve against full forward passes (the same
    function with every layer run whole), within float32 rounding."""
    net, shape = NETS["concat"]
    net32 = relprop.from_spec(net.spec(), {k: v.astype(np.float32) for k, v in net.state_dict().items()})
    x = rng.standard_normal((5,) + shape).astype(np.float32)
    R = rng.standard_normal(x.shape).astype(np.float32)
    fast = metrics.perturbation_curve(net32, x, R, patch=2, steps=20, seed=3, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "INCREMENTAL_FULL_FRACTION", -1.0)  # every layer whole, every step
        slow = metrics.perturbation_curve(net32, x, R, patch=2, steps=20, seed=3, progress=False)
    assert fast.dtype == np.float32
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-4 * np.abs(slow).max())


def test_patched_forward_rejects_the_cuda_backend():
    net, shape = NETS["small_conv"]
    with pytest.raises(ValueError, match="backend"):
        inc.PatchedForward(net, np.zeros((1,) + shape), "cuda")


@pytest.mark.parametrize("r0, c0, values, match", [
    ([0, 0], [0, 0], np.zeros((2, 2, 2, 2)), "values must be"),          # batch of 3 expected
    ([0, 0, 0], [0, 0, 0], np.zeros((3, 1, 2, 2)), "values must be"),    # channels
    ([0, 0, 0], [0, 0, 0], np.zeros((3, 2, 2)), "values must be"),       # rank
    ([0, 0, 0], [0, 0, 0], np.full((3, 2, 1, 1), np.nan), "finite"),
    ([0, 0], [0, 0, 0], np.zeros((3, 2, 1, 1)), "r0 and c0"),
    ([0.5, 0, 0], [0, 0, 0], np.zeros((3, 2, 1, 1)), "r0 and c0"),
])
def test_update_rejects_bad_input(r0, c0, values, match):
    net, shape = NETS["small_conv"]
    pf = inc.PatchedForward(net, np.zeros((3,) + shape), "cpu")
    with pytest.raises(ValueError, match=match):
        pf.update(np.array(r0), np.array(c0), values)
