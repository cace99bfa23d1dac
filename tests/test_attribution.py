"""Input-level methods (relprop.attribution): closed forms, invariants, memory bound, errors."""
import tracemalloc

import numpy as np
import pytest
from scipy import ndimage

import relprop
from relprop import _backend, _config
from relprop.attribution import placements
from relprop.methods import output_signal
from relprop.rules.signal import gradient_sweep
from relprop.nets import from_spec

from helpers import assert_close


@pytest.fixture(scope="module")
def backend():
    """The fast backend once its dense/conv kernels exist, the NumPy oracle before."""
    k = _backend.kernels("cpu")
    return "cpu" if all(hasattr(k, f) for f in ("dense_forward", "conv2d_forward", "conv2d_vjp")) else "reference"


def random_weights(spec, rng, dtype=np.float64, bias=0.1):
    """He-initialised weights for every dense/conv layer of ``spec``."""
    w = {}
    for i, e in enumerate(spec):
        if e["type"] == "conv2d":
            k = e["kernel"] if isinstance(e["kernel"], int) else e["kernel"][0]
            shape = (e["out"], e["in"], k, k)
        elif e["type"] == "linear":
            shape = (e["out"], e["in"])
        else:
            continue
        fan_in = int(np.prod(shape[1:]))
        w[f"{i}.weight"] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)
        w[f"{i}.bias"] = (bias * rng.standard_normal(shape[0])).astype(dtype)
    return w


def vgg_spec(channels, hidden, classes=10, size=32, cin=3):
    """CIFAR-VGG's structure: per block conv3x3 pad 1, relu, conv3x3, relu, maxpool 2; then fc, relu, fc."""
    spec, c = [], cin
    for k in channels:
        spec += [{"type": "conv2d", "in": c, "out": k, "kernel": 3, "padding": 1}, {"type": "relu"},
                 {"type": "conv2d", "in": k, "out": k, "kernel": 3, "padding": 1}, {"type": "relu"},
                 {"type": "maxpool2d", "kernel": 2, "stride": 2}]
        c, size = k, size // 2
    spec += [{"type": "flatten"}, {"type": "linear", "in": c * size * size, "out": hidden}, {"type": "relu"},
             {"type": "linear", "in": hidden, "out": classes}]
    return spec


SMALL_CNN = [
    {"type": "conv2d", "in": 2, "out": 4, "kernel": 3, "padding": 1}, {"type": "relu"},
    {"type": "maxpool2d", "kernel": 2, "stride": 2},
    {"type": "conv2d", "in": 4, "out": 6, "kernel": 3, "padding": 1}, {"type": "relu"},
    {"type": "flatten"}, {"type": "linear", "in": 6 * 4 * 4, "out": 8}, {"type": "relu"},
    {"type": "linear", "in": 8, "out": 3},
]


@pytest.fixture
def cnn(rng):
    return from_spec(SMALL_CNN, random_weights(SMALL_CNN, rng))


@pytest.fixture
def x_img(rng):
    return rng.standard_normal((3, 2, 8, 8))


def linear_image_net(rng, shape=(2, 7, 6), classes=3):
    """f(x) = W flatten(x) + b: every attribution has a closed form."""
    d = int(np.prod(shape))
    w, b = rng.standard_normal((classes, d)), rng.standard_normal(classes)
    net = from_spec([{"type": "flatten"}, {"type": "linear", "in": d, "out": classes}], {"1.weight": w, "1.bias": b})
    return net, w, b


# -- Integrated Gradients ----------------------------------------------------------------------
MLP = [{"type": "linear", "in": 20, "out": 32}, {"type": "relu"}, {"type": "linear", "in": 32, "out": 32},
       {"type": "relu"}, {"type": "linear", "in": 32, "out": 3}]


@pytest.mark.parametrize("spec,shape", [(SMALL_CNN, (16, 2, 8, 8)), (MLP, (16, 20))], ids=["cnn", "mlp"])
def test_ig_completeness_random_net(spec, shape, backend):
    # Σ IG = f(x) − f(x') up to the Riemann error, O(1/m) on a ReLU net (kinks along the path);
    # one sample's Δf can be tiny (cancellation), so the 1% is of the batch's total |Δf|
    rng = np.random.default_rng(0)
    net, x = from_spec(spec, random_weights(spec, rng)), rng.standard_normal(shape)
    ig, gap = relprop.explain(net, x, "integrated_gradients", steps=200, return_gap=True, backend=backend)
    f = net.forward(x, backend)
    rows, t = np.arange(len(x)), f.argmax(1)
    delta = f[rows, t] - net.forward(np.zeros_like(x), backend)[rows, t]
    assert ig.shape == x.shape
    np.testing.assert_allclose(ig.reshape(len(x), -1).sum(1) - delta, gap, atol=1e-10)
    assert np.abs(gap).sum() <= 0.01 * np.abs(delta).sum(), (gap, delta)
    _, gap_coarse = relprop.explain(net, x, "integrated_gradients", steps=50, return_gap=True, backend=backend)
    assert np.abs(gap).sum() < 0.5 * np.abs(gap_coarse).sum()  # converges like 1/m


def test_ig_exact_on_linear_model(rng, backend):
    net, w, b = linear_image_net(rng)
    x = rng.standard_normal((4, 2, 7, 6))
    base = rng.standard_normal((2, 7, 6))
    ig, gap = relprop.explain(net, x, "integrated_gradients", steps=3, baseline=base, return_gap=True,
                              backend=backend, target=1)
    assert_close(ig, (x - base) * w[1].reshape(2, 7, 6), reduction_len=8)
    assert_close(gap, np.zeros(4), reduction_len=x[0].size, magnitude=np.abs(x).sum() / 4)


def test_ig_baseline_forms(rng, backend):
    net, w, _ = linear_image_net(rng)
    x = rng.standard_normal((3, 2, 7, 6))
    wc = w[2].reshape(2, 7, 6)
    per_sample = rng.standard_normal(x.shape)
    bset = rng.standard_normal((4, 1, 2, 7, 6))
    cases = {0.5: (x - 0.5) * wc, "per": (x - per_sample) * wc, "set": (x - bset.mean(0)) * wc,
             "list": (x - (0.5 + per_sample) / 2) * wc}
    args = {0.5: 0.5, "per": per_sample, "set": bset, "list": [0.5, per_sample]}
    for key, expected in cases.items():
        ig = relprop.explain(net, x, "integrated_gradients", steps=2, baseline=args[key], target=2,
                             backend=backend, batch_size=5)
        assert_close(ig, expected, reduction_len=8)


def test_ig_one_step_is_gradient_times_input(cnn, x_img, backend):
    ig = relprop.explain(cnn, x_img, "integrated_gradients", steps=1, backend=backend)
    gxi = relprop.explain(cnn, x_img, "gradient_x_input", backend=backend)
    assert_close(ig, gxi, reduction_len=100)


def test_ig_independent_of_batch_size(cnn, x_img, backend):
    a = relprop.explain(cnn, x_img, "integrated_gradients", steps=7, batch_size=5, backend=backend)
    b = relprop.explain(cnn, x_img, "integrated_gradients", steps=7, batch_size=64, backend=backend)
    assert_close(a, b, reduction_len=100)


def test_expected_gradients_linear_closed_form(rng, backend):
    net, w, _ = linear_image_net(rng)
    x = rng.standard_normal((2, 2, 7, 6))
    data = rng.standard_normal((5, 2, 7, 6))
    eg, gap = relprop.explain(net, x, "expected_gradients", data=data, n=6, seed=3, target=0, return_gap=True,
                              backend=backend, batch_size=4)
    # E[(x − x')] ⊙ w over the drawn baselines: same draws as the method's (indices first, then α)
    pick = np.random.default_rng(3).integers(0, 5, size=12).reshape(2, 6)
    expected = (x - data[pick].mean(1)) * w[0].reshape(2, 7, 6)
    assert_close(eg, expected, reduction_len=8)
    assert_close(gap, np.zeros(2), reduction_len=x[0].size, magnitude=np.abs(x).sum())


# -- SmoothGrad --------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["gradient", "gradient_x_input"])
def test_smoothgrad_zero_noise_is_base(cnn, x_img, backend, base):
    sg = relprop.explain(cnn, x_img, "smoothgrad", n=3, noise_level=0.0, base=base, backend=backend)
    assert_close(sg, relprop.explain(cnn, x_img, base, backend=backend), reduction_len=100)
    sq = relprop.explain(cnn, x_img, "smoothgrad_squared", n=2, noise_level=0.0, base=base, backend=backend)
    assert_close(sq, relprop.explain(cnn, x_img, base, backend=backend) ** 2, reduction_len=100)


def test_smoothgrad_zero_noise_lrp_base(cnn, x_img, backend):
    base = "lrp.epsilon"
    sg = relprop.explain(cnn, x_img, "smoothgrad", n=2, noise_level=0.0, base=base, backend=backend)
    assert_close(sg, relprop.explain(cnn, x_img, base, backend=backend), reduction_len=100)


def test_smoothgrad_seeded_and_batch_independent(cnn, x_img, backend):
    kw = dict(n=5, noise_level=0.2, backend=backend)
    a = relprop.explain(cnn, x_img, "smoothgrad", seed=7, batch_size=4, **kw)
    b = relprop.explain(cnn, x_img, "smoothgrad", seed=7, batch_size=64, **kw)
    c = relprop.explain(cnn, x_img, "smoothgrad", seed=8, **kw)
    assert_close(a, b, reduction_len=100)
    assert not np.allclose(a, c)
    # the noisy copies and their mean, by hand (σ relative to each sample's range)
    g = np.random.default_rng(7)
    sigma = 0.2 * (x_img.max(axis=(1, 2, 3)) - x_img.min(axis=(1, 2, 3)))
    t = cnn.forward(x_img, backend).argmax(1)
    noise = g.standard_normal((15,) + x_img.shape[1:])
    noisy = np.repeat(x_img, 5, axis=0) + noise * np.repeat(sigma, 5)[:, None, None, None]
    grads = relprop.explain(cnn, noisy, "gradient", target=np.repeat(t, 5), backend=backend)
    assert_close(a, grads.reshape(3, 5, 2, 8, 8).mean(1), reduction_len=100)


def test_explainer_with_generator_advances(cnn, x_img, backend):
    ex = relprop.Explainer(cnn, "smoothgrad", n=2, seed=np.random.default_rng(0), backend=backend)
    assert not np.allclose(ex(x_img), ex(x_img))
    ex = relprop.Explainer(cnn, "smoothgrad", n=2, seed=0, backend=backend)
    np.testing.assert_array_equal(ex(x_img), ex(x_img))


# -- Grad-CAM ----------------------------------------------------------------------------------
def test_gradcam_hand_computation(rng, backend):
    # conv(1→2, 3x3) relu, flatten, linear: ∂y_c/∂A = W_c reshaped, so α_k = mean of W_c's k-th map
    spec = [{"type": "conv2d", "in": 1, "out": 2, "kernel": 3}, {"type": "relu"}, {"type": "flatten"},
            {"type": "linear", "in": 2 * 4 * 4, "out": 3}]
    weights = random_weights(spec, rng)
    net = from_spec(spec, weights)
    x = rng.standard_normal((2, 1, 6, 6))
    wconv, bconv = weights["0.weight"], weights["0.bias"]
    a = np.zeros((2, 2, 4, 4))
    for i in range(4):
        for j in range(4):
            a[:, :, i, j] = np.einsum("ncab,kcab->nk", x[:, :, i:i + 3, j:j + 3], wconv) + bconv
    a = np.maximum(a, 0)
    logits = a.reshape(2, -1) @ weights["3.weight"].T + weights["3.bias"]
    t = logits.argmax(1)
    alpha = weights["3.weight"][t].reshape(2, 2, 4, 4).mean(axis=(2, 3))
    cam_signed = np.einsum("nk,nkhw->nhw", alpha, a)
    cam = relprop.explain(net, x, "gradcam", upsample=None, backend=backend)
    assert cam.shape == (2, 1, 4, 4)
    assert_close(cam[:, 0], np.maximum(cam_signed, 0), reduction_len=32)
    signed = relprop.explain(net, x, "gradcam", upsample=None, relu=False, backend=backend)
    assert_close(signed[:, 0], cam_signed, reduction_len=32)
    up = relprop.explain(net, x, "gradcam", backend=backend)
    assert up.shape == (2, 1, 6, 6)
    assert_close(up[:, 0], ndimage.zoom(np.maximum(cam_signed, 0), (1, 1.5, 1.5), order=1, grid_mode=True,
                                        mode="nearest"), reduction_len=32)


def test_gradcam_upsampling_is_half_pixel():
    # PyTorch: F.interpolate(t, size=(4, 4), mode="bilinear", align_corners=False) of [[0, 1], [2, 3]]
    from relprop.attribution import _zoom

    cam = np.array([[[0.0, 1.0], [2.0, 3.0]]])
    expected = np.array([[0.0, 0.25, 0.75, 1.0], [0.5, 0.75, 1.25, 1.5],
                         [1.5, 1.75, 2.25, 2.5], [2.0, 2.25, 2.75, 3.0]])
    np.testing.assert_allclose(_zoom(cam, (4, 4), 1)[0], expected, atol=1e-12)
    np.testing.assert_array_equal(_zoom(cam, (4, 4), 0)[0], np.kron(cam[0], np.ones((2, 2))))


def test_gradcam_default_layer_and_guided(cnn, x_img, backend):
    cam = relprop.explain(cnn, x_img, "gradcam", backend=backend)
    assert cam.shape == (3, 1, 8, 8)
    assert_close(cam, relprop.explain(cnn, x_img, "gradcam", layer=4, backend=backend))  # ReLU after last conv
    trace = cnn.trace(x_img, backend)
    g = output_signal(trace.output, trace.output.argmax(1), "onehot")
    guided = gradient_sweep(cnn, "guided").backward(trace, g)
    gg = relprop.explain(cnn, x_img, "guided_gradcam", backend=backend, batch_size=2)
    assert_close(gg, guided * cam, reduction_len=100)


# -- occlusion and erasure ---------------------------------------------------------------------
def occlusion_closed_form(x, w, window, stride, base):
    """Mean over covering windows of Σ_{window} w_c (x − base), by loops."""
    n, _, h, wd = x.shape
    total, count = np.zeros((n, h, wd)), np.zeros((h, wd))
    contrib = (w * (x - base)).sum(1)  # (n, h, w): channels are occluded together
    for y0 in placements(h, window[0], stride[0]):
        for x0 in placements(wd, window[1], stride[1]):
            sl = (slice(y0, y0 + window[0]), slice(x0, x0 + window[1]))
            total[(slice(None),) + sl] += contrib[(slice(None),) + sl].sum(axis=(1, 2))[:, None, None]
            count[sl] += 1
    return np.broadcast_to((total / count)[:, None], x.shape)


def test_placements_match_captum_count():
    assert list(placements(7, 3, 2)) == [0, 2, 4]
    assert list(placements(6, 3, 2)) == [0, 2, 3]  # ⌈(6 − 3)/2⌉ + 1 = 3, the last clipped
    assert list(placements(32, 4, 4)) == list(range(0, 29, 4))


@pytest.mark.parametrize("window,stride", [(3, 2), ((2, 3), (1, 2)), (4, None)])
def test_occlusion_linear_closed_form(rng, backend, window, stride):
    net, w, _ = linear_image_net(rng)
    x = rng.standard_normal((2, 2, 7, 6))
    wc = w[1].reshape(2, 7, 6)
    win = (window, window) if isinstance(window, int) else window
    st = win if stride is None else ((stride, stride) if isinstance(stride, int) else stride)
    r = relprop.explain(net, x, "occlusion", window=window, stride=stride, target=1, backend=backend, batch_size=7)
    assert_close(r, occlusion_closed_form(x, wc, win, st, 0.0), reduction_len=100)
    base = rng.standard_normal((2, 7, 6))
    r = relprop.explain(net, x, "occlusion", window=window, stride=stride, baseline=base, target=1, backend=backend)
    assert_close(r, occlusion_closed_form(x, wc, win, st, base), reduction_len=100)


def test_occlusion_dense_input(rng, backend):
    w, b = rng.standard_normal((2, 9)), rng.standard_normal(2)
    net = from_spec([{"type": "linear", "in": 9, "out": 2}], {"0.weight": w, "0.bias": b})
    x = rng.standard_normal((3, 9))
    r = relprop.explain(net, x, "occlusion", window=3, stride=2, target=0, backend=backend)
    expected = occlusion_closed_form(x[:, None, None, :], w[0].reshape(1, 1, 9), (1, 3), (1, 2), 0.0)
    assert_close(r, expected.reshape(3, 9), reduction_len=10)


def test_occlusion_target_fixed_by_original(cnn, x_img, backend):
    t = cnn.forward(x_img, backend).argmax(1)
    a = relprop.explain(cnn, x_img, "occlusion", window=3, stride=2, backend=backend)
    b = relprop.explain(cnn, x_img, "occlusion", window=3, stride=2, target=t, backend=backend)
    np.testing.assert_array_equal(a, b)


def test_erasure_closed_form(rng, backend):
    spec = [{"type": "linear", "in": 5, "out": 7}, {"type": "relu"}, {"type": "linear", "in": 7, "out": 3}]
    weights = random_weights(spec, rng)
    net = from_spec(spec, weights)
    x = rng.standard_normal((4, 5))
    h = np.maximum(x @ weights["0.weight"].T + weights["0.bias"], 0)
    t = (h @ weights["2.weight"].T + weights["2.bias"]).argmax(1)
    e = relprop.explain(net, x, "erasure", backend=backend, batch_size=6)  # default: the hidden ReLU output
    assert e.shape == (4, 7)
    assert_close(e, weights["2.weight"][t] * h, reduction_len=7)


def test_erasure_channels(cnn, x_img, backend):
    e = relprop.explain(cnn, x_img, "erasure", layer=4, group="channel", backend=backend)
    assert e.shape == (3, 6, 4, 4)
    trace = cnn.trace(x_img, backend)
    a, t = trace.layer_output(4), trace.output.argmax(1)
    f = trace.output[np.arange(3), t]
    for k in range(6):
        ak = a.copy()
        ak[:, k] = 0
        out = ak
        for layer in cnn.layers[5:]:
            out, _ = layer.forward(out, backend)
        assert_close(e[:, k, 0, 0], f - out[np.arange(3), t], reduction_len=100)
    assert np.all(e == e[:, :, :1, :1])
    units = relprop.explain(cnn, x_img[:1], "erasure", layer=4, backend=backend)
    assert units.shape == (1, 6, 4, 4)


# -- memory ------------------------------------------------------------------------------------
def test_ig_memory_bounded_by_batch_size(rng):
    # CIFAR-VGG's structure, slimmed so the suite stays fast: the bound is what matters.  The
    # reference backend allocates every temporary through NumPy, so tracemalloc sees them all.
    backend = "reference"
    spec = vgg_spec(channels=(4, 8, 8), hidden=16, size=16)
    net = from_spec(spec, random_weights(spec, rng, dtype=np.float32))
    x = rng.standard_normal((16, 3, 16, 16)).astype(np.float32)
    steps, batch = 64, 8
    per_sample = sum(int(np.prod(s[1:])) for s in net.shapes(x.shape)) * 4 + x[0].nbytes  # one traced sample
    relprop.explain(net, x[:1], "integrated_gradients", steps=2, backend=backend)  # compile first
    tracemalloc.start()
    try:
        relprop.explain(net, x, "integrated_gradients", steps=steps, batch_size=batch, backend=backend)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a traced chunk, its gradient and the path points (measured: ~2.8 x batch x per_sample here),
    # plus a few input-sized arrays (accumulator, x − x') and interpreter noise
    bound = 4 * batch * per_sample + 4 * x.nbytes + (1 << 18)
    unbounded = steps * x.shape[0] * per_sample  # every path point traced at once
    assert unbounded > 15 * bound
    assert peak < bound, (peak, bound, unbounded)


# -- parameters --------------------------------------------------------------------------------
@pytest.mark.parametrize("method,options", [
    ("integrated_gradients", {"steps": 0}),
    ("expected_gradients", {"n": 0, "data": np.zeros((2, 2, 8, 8))}),
    ("expected_gradients", {}),
    ("smoothgrad", {"n": 0}),
    ("smoothgrad", {"noise_level": -0.1}),
    ("smoothgrad_squared", {"noise_level": float("nan")}),
    ("smoothgrad", {"batch_size": 0}),
    ("occlusion", {"window": 0}),
    ("occlusion", {"window": 9}),
    ("occlusion", {"window": 3, "stride": 0}),
    ("gradcam", {"upsample": "cubic"}),
    ("gradcam", {"layer": 8}),
    ("gradcam", {"layer": 6}),
    ("guided_gradcam", {"upsample": None}),
    ("erasure", {"group": "pixel"}),
    ("integrated_gradients", {"baseline": np.zeros((5, 8, 8))}),
])
def test_bad_parameters(cnn, x_img, backend, method, options):
    with pytest.raises(ValueError):
        relprop.explain(cnn, x_img, method, backend=backend, **options)


def test_return_layers_rejected(cnn, x_img, backend):
    with pytest.raises(ValueError, match="return_layers"):
        relprop.explain(cnn, x_img, "integrated_gradients", backend=backend, return_layers=True)


def test_default_batch_size_from_config(cnn, x_img, backend, monkeypatch):
    monkeypatch.setattr(_config, "DEFAULT_BATCH_SIZE", 3)
    a = relprop.explain(cnn, x_img, "integrated_gradients", steps=4, backend=backend)
    monkeypatch.undo()
    assert_close(a, relprop.explain(cnn, x_img, "integrated_gradients", steps=4, backend=backend), reduction_len=100)
