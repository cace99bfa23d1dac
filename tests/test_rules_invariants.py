"""What the rules promise (MATH.md): conservation, positivity, consistency on the DTD
detection-pooling net, LRP-0 = gradient × input, ε absorbing, finiteness on degenerate
nets, and the average-pooling case where flat/w² relevance is absorbed."""
import numpy as np
import pytest

import relprop
from relprop import rules
from nets_factory import make_net, random_weights, small_conv_spec, small_dense_spec
from test_rules import dense_form, dense_forward, everywhere

TINY = 1e-12
NETS = {"dense": (small_dense_spec(d=10), (3, 10)), "conv": (small_conv_spec(), (2, 2, 9, 8))}

RULES = [rules.Epsilon(TINY), rules.Zero(), rules.Gamma(0.25, TINY), rules.AlphaBeta(2, 1, TINY),
         rules.ZPlus(TINY), rules.ZPlus(TINY, ignore_bias=True), rules.ZBox(-3.0, 3.0, TINY), rules.WSquare(TINY),
         rules.Flat(TINY)]
COMPOSITES = [rules.epsilon_plus_flat(TINY, TINY), rules.epsilon_gamma_box(-4.0, 4.0, 0.25, TINY, TINY),
              rules.epsilon_alpha2_beta1(TINY, TINY), rules.dtd_box(-4.0, 4.0, TINY), rules.dtd_wsquare(TINY)]


def net_and_input(kind, bias=False, seed=0):
    spec, shape = NETS[kind]
    net = make_net(spec, seed=seed, bias=bias)
    return net, np.random.default_rng(seed + 7).normal(size=shape)


def conservation_factors(net, x, sweep, n):
    """Per layer i: the factor each output's relevance R_j keeps on its way down (sample n).

    1 everywhere, except (MATH.md) LRP-αβ: α·[z_j⁺ ≠ 0] − β·[z_j⁻ ≠ 0] (a zero half contributes
    zero), z⁺: [z_j⁺ ≠ 0], and average pooling: [z_j ≠ 0] (a zero output absorbs its relevance).
    """
    steps = dense_form(net, x.shape)
    recs = dense_forward(steps, x[n].reshape(-1))
    factors = []
    for st, (a, z, _), rule in zip(steps, recs, sweep.rules):
        f = np.ones_like(z)
        if st[0] == "affine" and isinstance(rule, (rules.AlphaBeta, rules.ZPlus)):
            alpha, beta = (rule.alpha, rule.beta) if isinstance(rule, rules.AlphaBeta) else (1.0, 0.0)
            zij = st[1] * a
            f = alpha * (np.maximum(zij, 0).sum(1) != 0) - beta * (np.minimum(zij, 0).sum(1) != 0)
        elif st[0] == "avg":
            f = (z != 0).astype(float)
        factors.append(f)
    return factors


def check_conservation(net, x, method, **options):
    explainer = relprop.Explainer(net, method, backend="reference", **options)
    r, per_layer = explainer(x, return_layers=True)
    logits = net.forward(x, backend="reference")
    for n in range(x.shape[0]):
        f_c = logits[n].max()
        for i, fac in enumerate(conservation_factors(net, x, explainer._method, n)):
            kept = (per_layer[i + 1][n].reshape(-1) * fac).sum()
            np.testing.assert_allclose(per_layer[i][n].sum(), kept, rtol=1e-5, atol=1e-5 * abs(f_c),
                                       err_msg=f"layer {i} ({net.layers[i].kind}), sample {n}")
        if all((fac == 1).all() for fac in conservation_factors(net, x, explainer._method, n)):
            np.testing.assert_allclose(r[n].sum(), f_c, rtol=1e-5)  # Σ R_input = f_c(x) outright
    return r, per_layer


@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_conservation_every_rule(rule, kind):
    net, x = net_and_input(kind)
    check_conservation(net, x, everywhere(net, rule), stabilizer=TINY)


@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("composite", COMPOSITES, ids=lambda c: c.name)
def test_conservation_every_composite(composite, kind):
    net, x = net_and_input(kind)
    check_conservation(net, x, composite, stabilizer=TINY)


def test_conservation_outright_on_a_maxpool_net():
    """No average pooling and z⁺-type rules only where z⁺ > 0: Σ R = f_c(x) exactly for every preset."""
    spec = [{"type": "conv2d", "in": 2, "out": 4, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"}, {"type": "linear", "in": 36, "out": 6},
            {"type": "relu"}, {"type": "linear", "in": 6, "out": 3}]
    net = make_net(spec, seed=3, bias=False)
    x = np.random.default_rng(4).normal(size=(2, 2, 6, 6))
    f_c = net.forward(x, backend="reference").max(1)
    for method, opts in [("lrp.epsilon_plus_flat", {"epsilon": TINY}), ("lrp.zero", {}), ("lrp.flat", {}),
                         ("lrp.wsquare", {}), ("dtd.wsquare", {}), ("lrp.gamma", {}),
                         ("lrp.epsilon_gamma_box", {"low": -4.0, "high": 4.0, "epsilon": TINY})]:
        r = relprop.explain(net, x, method, backend="reference", stabilizer=TINY, **opts)
        np.testing.assert_allclose(r.reshape(2, -1).sum(1), f_c, rtol=1e-5, err_msg=method)


def test_avgpool_absorbs_flat_and_wsquare_relevance():
    """An average-pool output that is exactly 0 absorbs what flat/w² send to it (MATH.md);
    ε, which sends relevance in proportion to the activation, sends it nothing."""
    spec = [{"type": "conv2d", "in": 1, "out": 1, "kernel": 1}, {"type": "relu"}, {"type": "avgpool2d", "kernel": 2},
            {"type": "flatten"}, {"type": "linear", "in": 4, "out": 1}]
    w_top = np.array([[1.0, 2.0, 3.0, 4.0]])
    net = relprop.from_spec(spec, {"0.weight": np.ones((1, 1, 1, 1)), "4.weight": w_top})
    x = np.random.default_rng(0).uniform(0.5, 1.0, size=(1, 1, 4, 4))
    x[:, :, :2, :2] = 0.0  # the first pooling window sees only zeros
    f = net.forward(x, backend="reference")[0, 0]
    flat = relprop.explain(net, x, "lrp.flat", backend="reference", stabilizer=TINY)
    wsq = relprop.explain(net, x, "lrp.wsquare", backend="reference", stabilizer=TINY)
    eps = relprop.explain(net, x, "lrp.epsilon", backend="reference", stabilizer=TINY, epsilon=TINY)
    np.testing.assert_allclose(flat.sum(), f * 3 / 4, rtol=1e-9)  # flat gave f/4 to the zero output
    np.testing.assert_allclose(wsq.sum(), f * (1 - 1 / 30), rtol=1e-9)  # w² gave f·1²/Σw² to it
    np.testing.assert_allclose(eps.sum(), f, rtol=1e-9)
    assert np.isfinite(flat).all() and (flat[:, :, :2, :2] == 0).all()


# -- positivity and consistency ---------------------------------------------------------------------------------
def positive_output_net(kind, bias=True, seed=0):
    """A random net whose last layer has non-negative weights (so f_c(x) ≥ 0 behind the last ReLU)."""
    spec, shape = NETS[kind]
    weights = random_weights(spec, np.random.default_rng(seed), bias=bias)
    last = max(i for i, layer in enumerate(spec) if layer["type"] == "linear")
    weights[f"{last}.weight"] = np.abs(weights[f"{last}.weight"])
    if bias:
        weights[f"{last}.bias"] = np.abs(weights[f"{last}.bias"])
    return relprop.from_spec(spec, weights), shape


@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("method,opts", [("lrp.zplus", {}), ("dtd.zplus", {}), ("dtd.wsquare", {}),
                                         ("dtd.box", {"low": 0.0, "high": 1.0}), ("lrp.alpha_beta",
                                                                                  {"alpha": 1, "beta": 0})])
def test_positive_on_nonnegative_inputs(method, opts, kind):
    net, shape = positive_output_net(kind)
    x = np.random.default_rng(1).uniform(0, 1, size=shape)
    for output in ("logit", "onehot"):
        r = relprop.explain(net, x, method, backend="reference", output=output, **opts)
        assert (r >= 0).all(), (method, output, r.min())


@pytest.mark.parametrize("kind", list(NETS))
def test_zbox_consistent_inside_its_box(kind):
    """dtd.box with zero biases, x inside [l, h] (l ≤ 0 ≤ h per channel): conservative and positive."""
    net, shape = positive_output_net(kind, bias=False)
    c = shape[1]
    bshape = (1, c, 1, 1) if len(shape) == 4 else (c,)
    low = -np.linspace(0.0, 0.5, c).reshape(bshape)
    high = np.linspace(1.0, 2.0, c).reshape(bshape)
    x = np.random.default_rng(2).uniform(0, 1, size=shape) * (high - low) + low
    r = relprop.explain(net, x, "dtd.box", low=low, high=high, backend="reference", stabilizer=TINY)
    f_c = net.forward(x, backend="reference").max(1)
    assert (f_c > 0).all() and (r >= 0).all()
    np.testing.assert_allclose(r.reshape(len(x), -1).sum(1), f_c, rtol=1e-5)


def dtd_net(d=8, h=12, seed=0):
    """The DTD seed's detection-pooling net: x_j = max(0, Σ_i x_i w_ij + b_j), b_j ≤ 0, x_k = Σ_j x_j."""
    rng = np.random.default_rng(seed)
    spec = [{"type": "linear", "in": d, "out": h}, {"type": "relu"}, {"type": "sumpool"}]
    return relprop.from_spec(spec, {"0.weight": rng.normal(size=(h, d)), "0.bias": -rng.uniform(0, 0.5, size=h)})


@pytest.mark.parametrize("method,opts", [("dtd.wsquare", {}), ("dtd.zplus", {}), ("lrp.zplus", {}),
                                         ("dtd.box", {"low": 0.0, "high": 1.0})])
def test_dtd_detection_pooling_net_is_consistent(method, opts):
    """w², z⁺ and z^B give conservative (Σ R = x_k) and positive heatmaps on it, as the seed proves."""
    net = dtd_net()
    x = np.random.default_rng(1).uniform(0, 1, size=(5, 8))
    x_k = net.forward(x, backend="reference")[:, 0]
    assert (x_k > 0).all()
    r, per_layer = relprop.explain(net, x, method, backend="reference", return_layers=True, **opts)
    assert (r >= 0).all()
    np.testing.assert_allclose(r.sum(1), x_k, rtol=1e-5)
    x_j = np.maximum(x @ net.layers[0].weight.T + net.layers[0].bias, 0)
    np.testing.assert_allclose(per_layer[2], x_j, rtol=1e-5, atol=1e-9)  # R_j = x_j at the pooling layer


# -- LRP-0 and the gradient; ε absorbing ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(NETS))
def test_lrp0_equals_gradient_times_input(kind):
    """On a ReLU net with biases and the logit start, LRP-0 is x ⊙ ∇f_c exactly (R = a ⊙ ∂f_c/∂a by induction)."""
    net, x = net_and_input(kind, bias=True)
    lrp0 = relprop.explain(net, x, "lrp.zero", backend="reference", stabilizer=1e-300)
    gxi = relprop.explain(net, x, "gradient_x_input", backend="reference")
    np.testing.assert_allclose(lrp0, gxi, rtol=1e-9, atol=1e-12 * np.abs(gxi).max())


def test_huge_epsilon_sends_almost_nothing_down():
    net, x = net_and_input("conv", bias=True)
    f_c = net.forward(x, backend="reference").max(1)
    r = relprop.explain(net, x, "lrp.epsilon", epsilon=1e8, backend="reference")
    assert (np.abs(r.reshape(len(x), -1).sum(1)) < 1e-6 * np.abs(f_c)).all()


# -- degenerate nets: never NaN or Inf ------------------------------------------------------------------------
ALL_METHODS = [("lrp.zero", {}), ("lrp.epsilon", {"epsilon": 0.0}), ("lrp.epsilon", {}), ("lrp.gamma", {}),
               ("lrp.alpha_beta", {}), ("lrp.zplus", {}), ("lrp.flat", {}), ("lrp.wsquare", {}),
               ("lrp.epsilon_plus_flat", {}), ("lrp.epsilon_gamma_box", {"low": -1.0, "high": 1.0}),
               ("lrp.epsilon_alpha2_beta1", {}), ("dtd.box", {"low": -1.0, "high": 1.0}), ("dtd.wsquare", {}),
               ("dtd.zplus", {}), ("deconvnet", {}), ("guided_backprop", {})]


def degenerate_cases(kind):
    spec, shape = NETS[kind]
    rng = np.random.default_rng(0)
    base = random_weights(spec, rng)
    linear = [i for i, layer in enumerate(spec) if layer["type"] in ("linear", "conv2d")]
    x = rng.normal(size=shape)
    yield "zero input", relprop.from_spec(spec, base), np.zeros(shape)
    dead = dict(base, **{f"{linear[0]}.bias": np.full_like(base[f"{linear[0]}.bias"], -1e3)})
    yield "dead relus", relprop.from_spec(spec, dead), x
    zero = dict(base, **{f"{linear[1]}.weight": np.zeros_like(base[f"{linear[1]}.weight"]),
                         f"{linear[1]}.bias": np.zeros_like(base[f"{linear[1]}.bias"])})
    yield "all-zero layer", relprop.from_spec(spec, zero), x
    nobias = {k: v for k, v in base.items() if k.endswith("weight")}
    yield "zero input, no bias", relprop.from_spec(spec, nobias), np.zeros(shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", list(NETS))
def test_no_nan_or_inf_on_degenerate_nets(kind, dtype):
    for case, net, x in degenerate_cases(kind):
        if dtype == np.float32:
            net = relprop.from_spec(net.spec(), {k: v.astype(np.float32) for k, v in net.state_dict().items()})
        x = x.astype(dtype)
        for method, opts in ALL_METHODS:
            r, per_layer = relprop.explain(net, x, method, backend="reference", return_layers=True, **opts)
            for i, rel in enumerate(per_layer):
                assert np.isfinite(rel).all(), (case, method, i)
