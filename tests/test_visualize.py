"""relprop.visualize: top activations (against a brute-force search, ties included), receptive fields
(against the dependency set found by perturbation), projections (against explain with a Unit target),
activation maximisation (known maximisers) and bad input."""
import numpy as np
import pytest

import relprop
from relprop import visualize as vz

Unit = relprop.Unit


# -- a small conv net with exact (integer) arithmetic in float64: ties are real ties ---------------------
def _int_net(rng):
    spec = [{"type": "conv2d", "in": 1, "out": 3, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "maxpool2d", "kernel": 2}, {"type": "conv2d", "in": 3, "out": 2, "kernel": 2},
            {"type": "relu"}, {"type": "flatten"}, {"type": "linear", "in": 2 * 2 * 2, "out": 2}]
    weights = {"0.weight": rng.integers(-1, 2, size=(3, 1, 3, 3)).astype(np.float64),
               "0.bias": np.array([0.0, 1.0, -1.0]),
               "3.weight": rng.integers(-1, 2, size=(2, 3, 2, 2)).astype(np.float64),
               "3.bias": np.zeros(2),
               "6.weight": rng.integers(-1, 2, size=(2, 8)).astype(np.float64), "6.bias": np.zeros(2)}
    return relprop.from_spec(spec, weights)


def _brute_top(a, k, distinct):
    """The k best (value desc, sample asc, position asc) per channel by sorting Python tuples."""
    n, c, h, w = a.shape
    out = []
    for ch in range(c):
        cands = []
        for i in range(n):
            if distinct:
                flat = a[i, ch].ravel()
                p = int(np.flatnonzero(flat == flat.max())[0])
                cands.append((-flat[p], i, p))
            else:
                cands += [(-v, i, p) for p, v in enumerate(a[i, ch].ravel())]
        out.append(sorted(cands)[:k])
    return out


@pytest.mark.parametrize("layer", [1, 2, 4])
@pytest.mark.parametrize("distinct", [True, False])
@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_top_activations_equal_brute_force_with_ties(rng, layer, distinct, batch_size):
    net = _int_net(np.random.default_rng(3))
    data = rng.integers(0, 2, size=(23, 1, 6, 6)).astype(np.float64)  # binary images: many equal activations
    data[5] = data[17]  # two identical samples: a tie across samples for sure
    k = 5
    top = vz.top_activations(net, data, layer, k=k, batch_size=batch_size, distinct=distinct)
    a = net.trace(data).layer_output(layer)
    want = _brute_top(a, k, distinct)
    w = a.shape[3]
    ties = 0
    for ch in range(a.shape[1]):
        exp_v = [-t[0] for t in want[ch]]
        np.testing.assert_array_equal(top.values[ch], exp_v)
        np.testing.assert_array_equal(top.index[ch], [t[1] for t in want[ch]])
        np.testing.assert_array_equal(top.position[ch], [(t[2] // w, t[2] % w) for t in want[ch]])
        ties += len(exp_v) - len(set(exp_v))
    assert ties > 0  # the ordering of equal values was exercised


def test_top_activations_streams_batches_and_channel_subset(rng):
    net = _int_net(np.random.default_rng(3))
    data = rng.integers(0, 3, size=(30, 1, 6, 6)).astype(np.float64)
    whole = vz.top_activations(net, data, 1, k=4)
    gen = (data[s:s + 7] for s in range(0, 30, 7))  # an iterable of batches: indices count across them
    streamed = vz.top_activations(net, gen, 1, channels=[2, 0], k=4)
    np.testing.assert_array_equal(streamed.channels, [2, 0])
    for row, ch in enumerate([2, 0]):
        np.testing.assert_array_equal(streamed.values[row], whole.values[ch])
        np.testing.assert_array_equal(streamed.index[row], whole.index[ch])
        np.testing.assert_array_equal(streamed.position[row], whole.position[ch])
    units = streamed.units(0)
    assert units[0].layer == 1 and units[0].channel == 2 and units[0].position == tuple(streamed.position[0, 0])


def test_top_activations_k_larger_than_data(rng):
    net = _int_net(np.random.default_rng(3))
    data = rng.integers(0, 3, size=(3, 1, 6, 6)).astype(np.float64)
    top = vz.top_activations(net, data, 4, k=9)
    assert top.k == 3 and sorted(top.index[0]) == [0, 1, 2]


def test_top_activations_bad_input(rng):
    net = _int_net(np.random.default_rng(3))
    data = rng.random((4, 1, 6, 6))
    with pytest.raises(ValueError, match="no channels"):
        vz.top_activations(net, data, 5)  # flatten: (N, 8)
    with pytest.raises(ValueError, match="k=0"):
        vz.top_activations(net, data, 1, k=0)
    with pytest.raises(ValueError, match="data is empty"):
        vz.top_activations(net, data[:0], 1)
    with pytest.raises(ValueError, match="data is empty"):
        vz.top_activations(net, iter([]), 1)
    bad = data.copy()
    bad[2, 0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        vz.top_activations(net, bad, 1, batch_size=2)
    with pytest.raises(ValueError, match="channels"):
        vz.top_activations(net, data, 1, channels=[7])
    with pytest.raises(ValueError, match="layer=9"):
        vz.top_activations(net, data, 9)
    with pytest.raises(TypeError, match="data must be"):
        vz.top_activations(net, 3.0, 1)


# -- receptive fields -------------------------------------------------------------------------------------
def _positive_net():
    """Positive weights and biases: every ReLU is on and nothing cancels, so a unit depends on every pixel
    of its receptive field (dilation, stride, padding and both pools on the way)."""
    spec = [{"type": "conv2d", "in": 1, "out": 2, "kernel": 3, "padding": 1, "dilation": 2}, {"type": "relu"},
            {"type": "avgpool2d", "kernel": 2}, {"type": "conv2d", "in": 2, "out": 2, "kernel": 3, "stride": 2},
            {"type": "relu"}, {"type": "maxpool2d", "kernel": 2, "stride": 1, "padding": 1}]
    rng = np.random.default_rng(0)
    return relprop.from_spec(spec, {"0.weight": rng.uniform(0.5, 1, (2, 1, 3, 3)), "0.bias": np.ones(2),
                                    "3.weight": rng.uniform(0.5, 1, (2, 2, 3, 3)), "3.bias": np.ones(2)})


@pytest.mark.parametrize("layer", [0, 2, 3, 5])
def test_receptive_field_equals_dependency_set(layer):
    net = _positive_net()
    x = np.full((1, 1, 18, 18), 0.5)
    base = net.trace(x).layer_output(layer)
    bumped = np.repeat(x, 18 * 18, axis=0)
    bumped.reshape(-1, 18 * 18)[np.arange(18 * 18), np.arange(18 * 18)] += 100.0
    out = net.trace(bumped).layer_output(layer)  # (324, C, h, w): pixel p bumped in row p
    h, w = base.shape[2:]
    for i, j in {(0, 0), (h - 1, w - 1), (h // 2, w // 2), (0, w - 1)}:
        dep = np.flatnonzero(np.abs(out[:, 0, i, j] - base[0, 0, i, j]) > 1e-6)  # a bump changes it by >= 1
        rows, cols = np.divmod(dep, 18)
        rr, cc = vz.receptive_field(net, layer, (i, j), x.shape)
        assert (rr.start, rr.stop, cc.start, cc.stop) == (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)


def test_receptive_field_on_a_graph_is_the_union_over_paths():
    """Two branches (3x3 and 5x5 dilated by 2) joined by concat, then a residual add: the field of a unit is
    the bounding box of everything it depends on."""
    spec = [{"type": "conv2d", "in": 1, "out": 2, "kernel": 3, "padding": 1},                      # 0
            {"type": "conv2d", "in": 1, "out": 2, "kernel": 5, "padding": 4, "dilation": 2,
             "inputs": ["input"]},                                                                    # 1
            {"type": "concat", "axis": 1, "inputs": [0, 1]},                                          # 2
            {"type": "relu"},                                                                         # 3
            {"type": "maxpool2d", "kernel": 2},                                                       # 4
            {"type": "conv2d", "in": 4, "out": 4, "kernel": 3, "padding": 1},                         # 5
            {"type": "add", "inputs": [4, 5]}]                                                        # 6
    rng = np.random.default_rng(0)
    weights = {"0.weight": rng.uniform(0.5, 1, (2, 1, 3, 3)), "0.bias": np.ones(2),
               "1.weight": rng.uniform(0.5, 1, (2, 1, 5, 5)), "1.bias": np.ones(2),
               "5.weight": rng.uniform(0.5, 1, (4, 4, 3, 3)), "5.bias": np.ones(4)}
    net = relprop.from_spec(spec, weights)
    x = np.full((1, 1, 20, 20), 0.5)
    bumped = np.repeat(x, 400, axis=0)
    bumped.reshape(-1, 400)[np.arange(400), np.arange(400)] += 100.0
    for layer in (2, 6):
        base = net.trace(x).layer_output(layer)
        out = net.trace(bumped).layer_output(layer)
        h, w = base.shape[2:]
        for i, j in {(0, 0), (h // 2, w // 2 + 1), (h - 1, 1)}:
            dep = np.flatnonzero(np.abs(out[:, :, i, j] - base[0, :, i, j]).max(axis=1) > 1e-6)
            rows, cols = np.divmod(dep, 20)
            rr, cc = vz.receptive_field(net, layer, (i, j), x.shape)
            assert (rr.start, rr.stop, cc.start, cc.stop) == (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)


def test_receptive_field_bad_input():
    net = _positive_net()
    with pytest.raises(ValueError, match="out of range"):
        vz.receptive_field(net, 3, (9, 0), (1, 18, 18))
    mlp = relprop.from_spec([{"type": "linear", "in": 4, "out": 2}], {"0.weight": np.ones((2, 4))})
    with pytest.raises(ValueError):
        vz.receptive_field(mlp, 0, (0, 0), (1, 2, 2))


# -- projection -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["deconvnet", "gradient", "guided_backprop", "lrp.epsilon_plus_flat"])
def test_project_equals_explain_with_unit_target(rng, method):
    m = relprop.zoo.load("digits_cnn")
    x = m.x[:6].astype(np.float64)
    top = vz.top_activations(m.net, x, 4, k=3)
    for row in (0, 5):
        for n, unit in zip(top.index[row], top.units(row)):
            p = vz.project(m.net, x[n], unit, method)
            want = relprop.explain(m.net, x, method, target=unit)[n]
            np.testing.assert_allclose(p, want, rtol=1e-10, atol=1e-12)
            assert np.abs(p).max() > 0
            rr, cc = vz.receptive_field(m.net, 4, unit.position, x.shape)
            outside = np.ones(p.shape, dtype=bool)
            outside[:, rr, cc] = False
            assert not p[outside].any()  # the projection lives in the unit's receptive field


def test_project_bad_input():
    m = relprop.zoo.load("digits_cnn")
    with pytest.raises(ValueError, match="channel"):
        vz.project(m.net, m.x[0], Unit(layer=4, channel=99, position=(0, 0)))
    with pytest.raises(ValueError, match="position"):
        vz.project(m.net, m.x[0], Unit(layer=4, channel=0, position=(8, 0)))
    with pytest.raises(ValueError, match="one input"):
        vz.project(m.net, m.x[:2], Unit(layer=4, channel=0, position=(0, 0)))
    bad = m.x[0].copy()
    bad[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        vz.project(m.net, bad, Unit(layer=4, channel=0, position=(0, 0)))


def test_feature_grid_draws(tmp_path):
    pytest.importorskip("matplotlib")
    m = relprop.zoo.load("digits_cnn")
    top = vz.top_activations(m.net, m.x, 4, channels=[0, 1], k=4)
    path = tmp_path / "features.png"
    fig = vz.feature_grid(m.net, m.x, top, path=path, title="t")
    assert path.stat().st_size > 1000 and fig is not None
    size = vz.receptive_field_size(m.net, 4, m.x.shape[1:])
    assert size == (14, 14)  # conv5 → pool2 → conv5: 5 + 1 + 2·4 = 14


# -- activation maximisation ----------------------------------------------------------------------------
def test_maximize_linear_unit_converges_to_w(rng):
    d = 12
    w = rng.normal(size=(3, d))
    net = relprop.from_spec([{"type": "linear", "in": d, "out": 3}, {"type": "relu"},
                             {"type": "linear", "in": 3, "out": 2}],
                            {"0.weight": w, "0.bias": np.zeros(3), "2.weight": np.ones((2, 3))})
    lam = 0.05
    r = vz.maximize(net, Unit(layer=0, channel=1, position=None), (d,), steps=300, lr=1.0, l2=lam,
                    init="uniform", seed=0, dtype=np.float64)
    x = r.image[0]
    cos = x @ w[1] / np.linalg.norm(x) / np.linalg.norm(w[1])
    assert cos >= 0.999
    np.testing.assert_allclose(x, w[1] / (2 * lam), rtol=1e-6)  # the fixed point w / (2 λ)
    assert r.activations.shape == (1, 301) and r.activations[0, -1] > r.activations[0, 0]
    # a class logit of a linear net: the same fixed point
    lin = relprop.from_spec([{"type": "linear", "in": d, "out": 3}], {"0.weight": w})
    r = vz.maximize(lin, [2, 0, 1], (d,), steps=300, lr=1.0, l2=lam, seed=1, dtype=np.float64, batch_size=2)
    np.testing.assert_allclose(r.image, w[[2, 0, 1]] / (2 * lam), rtol=1e-6)


def test_maximize_conv_unit_beats_every_zoo_sample():
    pytest.importorskip("sklearn")
    from relprop.nets import data

    m = relprop.zoo.load("digits_cnn")
    x, _ = data.digits("all", 28)
    pre = m.net.trace(x).layer_output(3)  # conv2 pre-activations (the ReLU after it can be off)
    for c in (0, 7):
        unit = Unit(layer=3, channel=c, position=(4, 4))
        r = vz.maximize(m.net, unit, (1, 28, 28), steps=60, lr=0.05, l2=1e-3, jitter=1, blur_every=10,
                        blur_sigma=0.5, clip=(0.0, 1.0), seed=0)
        best = pre[:, c, 4, 4].max()
        got = m.net.trace(r.image).layer_output(3)[0, c, 4, 4]
        assert got > best, (c, got, best)
        assert r.image.min() >= 0 and r.image.max() <= 1
        np.testing.assert_allclose(r.activations[0, -1], got, rtol=1e-5)


def test_maximize_bad_input():
    m = relprop.zoo.load("digits_cnn")
    for kw, match in [({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"), ({"clip": (1, 0)}, "clip"),
                      ({"l2": -1.0}, "l2"), ({"init": "nope"}, "init"), ({"jitter": -1}, "jitter")]:
        with pytest.raises((ValueError, TypeError), match=match):
            vz.maximize(m.net, 3, (1, 28, 28), **kw)
    with pytest.raises(ValueError, match="out of range"):
        vz.maximize(m.net, 10, (1, 28, 28))
    with pytest.raises(ValueError, match="shape"):
        vz.maximize(m.net, 3, (28, 28))
    with pytest.raises(TypeError, match="target"):
        vz.maximize(m.net, "cat", (1, 28, 28))
    with pytest.raises(ValueError, match="NaN"):
        vz.maximize(m.net, 3, (1, 28, 28), init=np.full((1, 28, 28), np.nan))
    with pytest.warns(RuntimeWarning, match="gradient of the target is zero"):
        vz.maximize(m.net, Unit(layer=4, channel=1, position=(0, 0)), (1, 28, 28), steps=1, init="zeros")  # off at 0
