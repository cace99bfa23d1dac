"""The fast relevance path (rules/core.py over the cpu kernels) against the literal equations of
relprop/kernels/reference/lrp.py, on hypothesis-randomised dense and conv layers: batch 1, odd
sizes, stride > 1, padding, dilation, zero inputs, signed inputs."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relprop import rules
from relprop.engine import Record
from relprop.kernels.reference import lrp as ref
from relprop.nets.layers import Add, AvgPool2d, Conv2d, Linear

from helpers import assert_close


def _data(draw, shape, signed):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.normal(size=shape)
    if not signed:
        a = np.maximum(a, 0)
    zeros = draw(st.sampled_from([0.0, 0.3]))
    a[rng.random(shape) < zeros] = 0  # planted zeros (dead units, zero padding-like inputs)
    return a, rng


@st.composite
def dense_case(draw):
    n, i, j = draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 5))
    a, rng = _data(draw, (n, i), draw(st.booleans()))
    w, b = rng.normal(size=(j, i)), rng.normal(size=j) * 0.3
    return Linear(w, b), a, rng.normal(size=(n, j))


@st.composite
def conv_case(draw):
    n, c, k = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1)))
    dilation = (draw(st.integers(1, 2)), 1)
    h = draw(st.integers(dilation[0] * (kh - 1) + 1, 8))
    wd = draw(st.integers(kw, 8))
    a, rng = _data(draw, (n, c, h, wd), draw(st.booleans()))
    layer = Conv2d(rng.normal(size=(k, c, kh, kw)), rng.normal(size=k) * 0.3, stride, padding, dilation)
    out = layer.output_shape(a.shape)
    return layer, a, rng.normal(size=out)


def _fast(rule, layer, a, R):
    z, _ = layer.forward(a, "cpu")
    return rule.backward(layer, Record(a, z, None, "cpu"), R.copy(), {})


def _ref(rule, layer, a, R):
    w, b = layer.weight, layer.bias
    conv = layer.kind == "conv2d"
    geo = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation) if conv else {}
    f = {name: getattr(ref, f"{name}_{'conv2d' if conv else 'dense'}") for name in
         ("epsilon", "gamma", "alpha_beta", "zplus", "zbox", "wsquare", "flat")}
    if isinstance(rule, rules.Epsilon):
        return f["epsilon"](a, w, b, R, rule.epsilon, **geo)
    if isinstance(rule, rules.Gamma):
        return f["gamma"](a, w, b, R, rule.gamma, rule.stabilizer, **geo)
    if isinstance(rule, rules.AlphaBeta):
        return f["alpha_beta"](a, w, b, R, rule.alpha, rule.beta, rule.stabilizer, **geo)
    if isinstance(rule, rules.ZPlus):
        return f["zplus"](a, w, b, R, rule.stabilizer, rule.ignore_bias, **geo)
    if isinstance(rule, rules.ZBox):
        return f["zbox"](a, w, R, rule.low, rule.high, rule.stabilizer, **geo)
    if isinstance(rule, rules.WSquare):
        return f["wsquare"](a, w, R, rule.stabilizer, **geo) if conv else f["wsquare"](w, R, rule.stabilizer)
    if isinstance(rule, rules.Flat):
        return f["flat"](a, w, R, rule.stabilizer, **geo) if conv else f["flat"](w, R, rule.stabilizer)
    raise AssertionError(rule)


RULES = [rules.Epsilon(0.1), rules.Zero(), rules.Gamma(0.25), rules.AlphaBeta(2, 1), rules.AlphaBeta(3, 2),
         rules.ZPlus(), rules.ZPlus(ignore_bias=True), rules.ZBox(-1.5, 2.0), rules.WSquare(), rules.Flat()]


@pytest.mark.parametrize("rule", RULES, ids=repr)
@given(case=dense_case())
def test_dense_rules_match_reference(rule, case):
    layer, a, R = case
    assert_close(_fast(rule, layer, a, R), _ref(rule, layer, a, R), reduction_len=8, scale=1e3)


@pytest.mark.parametrize("rule", RULES, ids=repr)
@given(case=conv_case())
def test_conv_rules_match_reference(rule, case):
    layer, a, R = case
    assert_close(_fast(rule, layer, a, R), _ref(rule, layer, a, R), reduction_len=32, scale=1e3)


def test_reference_rules_conserve_without_bias():
    """The promise: with no bias and no stabiliser share, Σ_i R_i = Σ_j R_j (ε, z⁺ on a > 0, w², flat).

    Every unit gets a positive contribution (w[:, 0] > 0): a unit with z_j⁺ = 0 absorbs its share."""
    rng = np.random.default_rng(0)
    a, w, R = np.abs(rng.normal(size=(2, 6))) + 0.1, rng.normal(size=(4, 6)), rng.normal(size=(2, 4))
    w[:, 0] = np.abs(w[:, 0]) + 0.1
    b = np.zeros(4)
    for got in (ref.epsilon_dense(a, w, b, R, 0.0), ref.zplus_dense(a, w, b, R, 0.0),
                ref.wsquare_dense(w, R, 0.0), ref.flat_dense(w, R, 0.0)):
        np.testing.assert_allclose(got.sum(axis=1), R.sum(axis=1), rtol=1e-12)


def test_proportional_split_at_add_and_avgpool():
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
    R = rng.normal(size=(2, 3, 4, 4))
    add = Add()
    y, _ = add.forward([x1, x2], "cpu")
    fast = rules.Norm(1e-6).backward(add, Record([x1, x2], y, None, "cpu"), R.copy(), {})
    for got, want in zip(fast, ref.proportional([x1, x2], R, 1e-6)):
        assert_close(got, want)
    # conservation at the add: Σ R_1 + Σ R_2 = Σ R up to the stabiliser's share
    np.testing.assert_allclose(fast[0].sum() + fast[1].sum(), R.sum(), rtol=1e-4)
    pool = AvgPool2d(2)
    z, _ = pool.forward(x1, "cpu")
    Rz = rng.normal(size=z.shape)
    got = rules.Norm(1e-6).backward(pool, Record(x1, z, None, "cpu"), Rz.copy(), {})
    w = np.full((3, 1, 2, 2), 0.25)  # average pooling = a depthwise conv with weights 1/4
    want = np.concatenate([ref.epsilon_conv2d(x1[:, c:c + 1], w[c:c + 1], np.zeros(1), Rz[:, c:c + 1], 1e-6,
                                              stride=(2, 2)) for c in range(3)], axis=1)
    assert_close(got, want)
