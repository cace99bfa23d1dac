"""The thin net: spec + state-dict construction, save/load, geometry errors, the gradient sweep."""
import numpy as np
import pytest

import relprop
from relprop.nets import Conv2d, Linear
from tests.nets_factory import make_net, random_weights, small_conv_spec, small_dense_spec

ISSUE_SPEC = [{"type": "conv2d", "in": 1, "out": 6, "kernel": 5, "stride": 1, "padding": 0}, {"type": "relu"},
              {"type": "maxpool2d", "kernel": 2, "stride": 2}, {"type": "avgpool2d", "kernel": 2, "stride": 2},
              {"type": "flatten"}, {"type": "linear", "in": 6 * 6 * 6, "out": 120}]


def test_issue_spec_builds_with_state_dict_keys(rng):
    weights = {"0.weight": rng.normal(size=(6, 1, 5, 5)).astype(np.float32),
               "0.bias": rng.normal(size=6).astype(np.float32),
               "5.weight": rng.normal(size=(120, 216)).astype(np.float32)}
    net = relprop.from_spec(ISSUE_SPEC, weights)
    assert isinstance(net[0], Conv2d) and isinstance(net[5], Linear)
    assert net[5].bias is None  # missing bias key = no bias
    x = rng.random((3, 1, 28, 28)).astype(np.float32)
    y = net.forward(x)
    assert y.shape == (3, 120) and y.dtype == np.float32
    # the same numbers by the reference kernels, and by hand for the final dense layer
    np.testing.assert_allclose(y, net.forward(x, backend="reference"), rtol=1e-4, atol=1e-4)


def test_pairs_and_dilation_in_spec(rng):
    spec = [{"type": "conv2d", "in": 2, "out": 3, "kernel": [3, 2], "stride": [2, 1], "padding": [1, 0],
             "dilation": [1, 2]}, {"type": "relu"}, {"type": "maxpool2d", "kernel": [2, 1], "padding": [1, 0]},
            {"type": "flatten"}]
    net = relprop.from_spec(spec, random_weights(spec, rng))
    assert net.shapes((1, 2, 7, 6)) == [(1, 3, 4, 4), (1, 3, 4, 4), (1, 3, 3, 4), (1, 36)]
    assert net[0].dilation == (1, 2) and net[2].stride == (2, 1)


def test_save_load_roundtrip(tmp_path, rng):
    net = make_net(small_conv_spec())
    path = tmp_path / "net.npz"
    net.save(path)
    back = relprop.load(path)
    assert back.spec() == net.spec()
    x = rng.random((2, 2, 9, 8))
    np.testing.assert_array_equal(back.forward(x), net.forward(x))


def test_from_spec_errors(rng):
    w = random_weights(ISSUE_SPEC, rng)
    with pytest.raises(ValueError, match="unknown layer type 'softmax'"):
        relprop.from_spec([{"type": "softmax"}], {})
    with pytest.raises(ValueError, match=r"layer 0 \(conv2d\): weights has no '0.weight'"):
        relprop.from_spec(ISSUE_SPEC, {})
    bad = dict(w)
    bad["0.weight"] = np.zeros((6, 1, 3, 3))
    with pytest.raises(ValueError, match=r"0.weight has shape \(6, 1, 3, 3\), expected \(6, 1, 5, 5\)"):
        relprop.from_spec(ISSUE_SPEC, bad)
    with pytest.raises(ValueError, match="keys no layer uses"):
        relprop.from_spec(ISSUE_SPEC, {**w, "3.weight": np.zeros(2)})
    with pytest.raises(ValueError, match="unknown keys"):
        relprop.from_spec([{"type": "relu", "inplace": True}], {})
    nan = dict(w)
    nan["0.bias"] = np.full(6, np.nan)
    with pytest.raises(ValueError, match="NaN"):
        relprop.from_spec(ISSUE_SPEC, nan)


def test_geometry_errors_name_the_layer(rng):
    spec = list(ISSUE_SPEC)
    spec[5] = {"type": "linear", "in": 100, "out": 10}
    w = random_weights(spec, rng)
    net = relprop.from_spec(spec, w)
    with pytest.raises(ValueError, match=r"layer 5 \(linear\): expects input \(N, 100\), got \(1, 216\)"):
        net.forward(rng.random((1, 1, 28, 28)))
    with pytest.raises(ValueError, match=r"layer 0 \(conv2d\): kernel extent 5 .* larger than the padded input 4"):
        net.forward(rng.random((1, 1, 4, 28)))
    with pytest.raises(ValueError, match=r"layer 0 \(conv2d\): expects input \(N, 1, H, W\)"):
        net.forward(rng.random((1, 3, 28, 28)))
    with pytest.raises(ValueError, match="must have 4 dimensions"):
        net.forward(rng.random((28, 28)))


def test_bad_net_input(rng):
    net = make_net(small_dense_spec())
    with pytest.raises(TypeError, match="dtype int64"):
        net.forward(np.ones((2, 6), dtype=np.int64))
    x = rng.random((2, 6))
    x[1, 3] = np.inf
    with pytest.raises(ValueError, match=r"NaN or Inf at index \(1, 3\)"):
        net.forward(x)
    with pytest.raises(ValueError, match="empty batch"):
        net.forward(np.ones((0, 6)))
    with pytest.raises(TypeError, match="expected a numpy or cupy array"):
        net.forward([[1.0] * 6])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("spec", [small_dense_spec(), small_conv_spec()], ids=["dense", "conv"])
def test_gradient_matches_finite_differences(spec, backend, rng):
    net = make_net(spec, seed=3)
    shape = (2, 6) if spec[0]["type"] == "linear" else (2, 2, 9, 8)
    x = rng.normal(size=shape)
    target = np.array([0, 2])
    grad = relprop.explain(net, x, "gradient", target=target, backend=backend)
    h = 1e-6
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        n = idx[0]
        fd[idx] = (net.forward(xp)[n, target[n]] - net.forward(xm)[n, target[n]]) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6)


def test_gradient_x_input_and_targets(rng):
    net = make_net(small_conv_spec())
    x = rng.random((3, 2, 9, 8))
    logits = net.forward(x)
    g_default = relprop.explain(net, x, "gradient")
    g_argmax = relprop.explain(net, x, "gradient", target=logits.argmax(1))
    np.testing.assert_array_equal(g_default, g_argmax)
    g1 = relprop.explain(net, x, "gradient", target=1)
    np.testing.assert_array_equal(g1, relprop.explain(net, x, "gradient", target=np.array([1, 1, 1])))
    np.testing.assert_allclose(relprop.explain(net, x, "gradient_x_input", target=1), x * g1)
    with pytest.raises(ValueError, match="out of range"):
        relprop.explain(net, x, "gradient", target=4)
    with pytest.raises(ValueError, match=r"target has shape \(2,\)"):
        relprop.explain(net, x, "gradient", target=np.array([0, 1]))
    with pytest.raises(TypeError, match="integers"):
        relprop.explain(net, x, "gradient", target=np.array([0.0, 1.0, 1.0]))


def test_explain_errors(rng):
    net = make_net(small_dense_spec())
    x = rng.random((2, 6))
    with pytest.raises(ValueError, match="unknown method 'lrp.nonsense'; known methods: .*gradient"):
        relprop.explain(net, x, "lrp.nonsense")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['epsilon'\]"):
        relprop.explain(net, x, "gradient", epsilon=0.1)
    with pytest.raises(ValueError, match="unknown backend"):
        relprop.explain(net, x, "gradient", backend="tpu")
    with pytest.raises(TypeError, match="Sequential"):
        relprop.explain("net", x, "gradient")


def test_float32_end_to_end_and_determinism(rng):
    net = make_net(small_conv_spec(), dtype=np.float32)
    x = rng.random((4, 2, 9, 8)).astype(np.float32)
    a = relprop.explain(net, x, "gradient")
    b = relprop.explain(net, x, "gradient")
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, relprop.explain(net, x, "gradient", backend="reference"), rtol=1e-4, atol=1e-5)
    # float64 input on float32 weights runs in float64
    assert relprop.explain(net, x.astype(np.float64), "gradient").dtype == np.float64


def test_copy_and_set_params_do_not_alias(rng):
    net = make_net(small_dense_spec())
    other = net.copy()
    other[0].set_params(np.zeros_like(other[0].weight), np.zeros_like(other[0].bias))
    assert np.abs(net[0].weight).sum() > 0
    x = rng.random((2, 6))
    assert not np.allclose(net.forward(x), other.forward(x))
    with pytest.raises(ValueError, match="weight has shape"):
        net[0].set_params(np.zeros((1, 1)), net[0].bias)
