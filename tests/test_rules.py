"""Relevance rules, composites and signal methods against literal dense-matrix oracles.

Every layer of a small net is rewritten here as a dense matrix acting on one flattened
sample (a conv by explicit loops over its taps, max-pool as a per-sample 0/1 selection of
the first maximum of each window, average pooling as weights 1/(kh·kw) on the real
inputs); each rule is then the literal equation of relprop/kernels/reference/lrp.py in the
contribution form z_ij = a_i w_ij (Zennit's test oracles) on that dense form.  Nothing of
relprop's sweep is reused: only the nets' weights.
"""
import numpy as np
import pytest

import relprop
from relprop import rules
from relprop.kernels.reference import lrp as ref_lrp
from helpers import assert_close
from nets_factory import make_net, small_conv_spec, small_dense_spec

F64 = np.float64


# ============================================================================================
# The oracle: dense form of a net, per sample
# ============================================================================================
def _conv_matrix(layer, in_shape):
    """(M, C) for one sample: z = M a + b; C = 1 where a tap hits a real (non-padding) input."""
    w = np.asarray(layer.weight, F64)
    k, c, kh, kw = w.shape
    _, h, wd = in_shape
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    m = np.zeros((k, ho, wo, c, h, wd))
    conn = np.zeros_like(m)
    for i in range(ho):
        for j in range(wo):
            for p in range(kh):
                for q in range(kw):
                    r, s = i * sh + p * dh - ph, j * sw + q * dw - pw
                    if 0 <= r < h and 0 <= s < wd:
                        m[:, i, j, :, r, s] = w[:, :, p, q]
                        conn[:, i, j, :, r, s] = 1
    bias = np.zeros(k) if layer.bias is None else np.asarray(layer.bias, F64)
    return m.reshape(k * ho * wo, -1), conn.reshape(k * ho * wo, -1), np.repeat(bias, ho * wo), (k, ho, wo)


def _pool_windows(layer, in_shape):
    """For every output (c, i, j): the flat indices of its real inputs and its window size kh·kw."""
    c, h, wd = in_shape
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel, layer.stride, layer.padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    windows = []
    for ch in range(c):
        for i in range(ho):
            for j in range(wo):
                idx = [ch * h * wd + r * wd + s
                       for r in range(i * sh - ph, i * sh - ph + kh) for s in range(j * sw - pw, j * sw - pw + kw)
                       if 0 <= r < h and 0 <= s < wd]  # row-major window order
                windows.append(idx)
    return windows, (c, ho, wo)


def dense_form(net, x_shape):
    """The net as a list of dense steps for one flattened sample of shape ``x_shape[1:]``."""
    steps, shape = [], tuple(x_shape[1:])
    for layer in net.layers:
        if layer.kind == "linear":
            w = np.asarray(layer.weight, F64)
            b = np.zeros(w.shape[0]) if layer.bias is None else np.asarray(layer.bias, F64)
            steps.append(("affine", w, np.ones_like(w), b))
            shape = (w.shape[0],)
        elif layer.kind == "conv2d":
            m, conn, b, shape = _conv_matrix(layer, shape)
            steps.append(("affine", m, conn, b))
        elif layer.kind == "avgpool2d":
            windows, out = _pool_windows(layer, shape)
            m = np.zeros((len(windows), int(np.prod(shape))))
            for o, idx in enumerate(windows):
                m[o, idx] = 1.0 / (layer.kernel[0] * layer.kernel[1])  # count_include_pad
            steps.append(("avg", m))
            shape = out
        elif layer.kind == "maxpool2d":
            windows, shape = _pool_windows(layer, shape)
            steps.append(("max", windows))
        elif layer.kind == "sumpool":
            steps.append(("avg", np.ones((1, int(np.prod(shape))))))
            shape = (1,)
        elif layer.kind == "flatten":
            shape = (int(np.prod(shape)),)
            steps.append(("flatten",))
        else:
            steps.append((layer.kind,))
    return steps


def dense_forward(steps, x):
    """Per step: (input a, output z, extra); extra = the 0/1 selection matrix of a max-pool."""
    recs, a = [], x
    for st in steps:
        if st[0] == "affine":
            z, extra = st[1] @ a + st[3], None
        elif st[0] == "avg":
            z, extra = st[1] @ a, None
        elif st[0] == "max":
            sel = np.zeros((len(st[1]), a.size))
            for o, idx in enumerate(st[1]):
                sel[o, idx[int(np.argmax(a[idx]))]] = 1  # first maximum in row-major window order
            z, extra = sel @ a, sel
        elif st[0] == "relu":
            z, extra = np.maximum(a, 0), None
        else:
            z, extra = a, None
        recs.append((a, z, extra))
        a = z
    return recs


# -- each rule literally: the reference equations of relprop/kernels/reference/lrp.py, one sample at a time --------
def o_epsilon(w, b, a, r, eps):
    return ref_lrp.epsilon_dense(a[None], w, b, r[None], eps)[0]


def o_gamma(w, b, a, r, gamma, eps):
    return ref_lrp.gamma_dense(a[None], w, b, r[None], gamma, eps)[0]


def o_alpha_beta(w, b, a, r, alpha, beta, eps, ignore_bias=False):
    return ref_lrp.alpha_beta_dense(a[None], w, b, r[None], alpha, beta, eps, ignore_bias)[0]


def o_zbox(w, a, r, low, high, eps):
    return ref_lrp.zbox_dense(a[None], w, r[None], low, high, eps)[0]


def o_wsquare(w, conn, r, eps):
    return ref_lrp.wsquare_dense(w, r[None], eps, connected=conn.T[None])[0]


def o_flat(conn, r, eps):
    return ref_lrp.flat_dense(conn, r[None], eps, connected=conn.T[None])[0]


def o_rule(rule, w, conn, b, a, r, shape):
    """Dispatch a relprop rule object to its oracle (``shape``: the layer input per sample, for z^B bounds)."""
    if isinstance(rule, rules.Epsilon):
        return o_epsilon(w, b, a, r, rule.epsilon)
    if isinstance(rule, rules.Gamma):
        return o_gamma(w, b, a, r, rule.gamma, rule.stabilizer)
    if isinstance(rule, rules.AlphaBeta):
        return o_alpha_beta(w, b, a, r, rule.alpha, rule.beta, rule.stabilizer)
    if isinstance(rule, rules.ZPlus):
        return o_alpha_beta(w, b, a, r, 1.0, 0.0, rule.stabilizer, ignore_bias=rule.ignore_bias)
    if isinstance(rule, rules.ZBox):
        low = np.broadcast_to(rule.low, (1,) + tuple(shape)).reshape(-1)
        high = np.broadcast_to(rule.high, (1,) + tuple(shape)).reshape(-1)
        return o_zbox(w, a, r, low, high, rule.stabilizer)
    if isinstance(rule, rules.WSquare):
        return o_wsquare(w, conn, r, rule.stabilizer)
    if isinstance(rule, rules.Flat):
        return o_flat(conn, r, rule.stabilizer)
    if isinstance(rule, rules.Gradient):  # dense/conv layer in a signal sweep: Wᵀ g
        return w.T @ r
    raise AssertionError(rule)


def oracle(net, x, assignment, start="logit", stabilizer=1e-6, relu="pass", target=None):
    """Relevance (or signal) at the input of ``net`` for every sample, from the dense form.

    ``assignment``: {layer index: rule} for the dense/conv layers; ``relu``: "pass" (LRP),
    "gradient", "deconvnet" or "guided"; pools follow LRP (``relu == "pass"``) or the gradient.
    """
    x = np.asarray(x, F64)
    steps = dense_form(net, x.shape)
    shapes = [x.shape[1:]] + [s[1:] for s in net.shapes(x.shape)]
    out = np.zeros(x.shape)
    for n in range(x.shape[0]):
        recs = dense_forward(steps, x[n].reshape(-1))
        logits = recs[-1][1]
        c = int(np.argmax(logits)) if target is None else target
        r = np.zeros_like(logits)
        r[c] = logits[c] if start == "logit" else 1.0
        for i in range(len(steps) - 1, -1, -1):
            st, (a, _, extra) = steps[i], recs[i]
            if st[0] == "affine":
                r = o_rule(assignment[i], st[1], st[2], st[3], a, r, shapes[i])
            elif st[0] == "avg":
                r = o_epsilon(st[1], 0.0, a, r, stabilizer) if relu == "pass" else st[1].T @ r
            elif st[0] == "max":
                r = extra.T @ r
            elif st[0] == "relu":
                r = {"pass": r, "gradient": r * (a > 0), "deconvnet": np.maximum(r, 0),
                     "guided": np.maximum(r, 0) * (a > 0)}[relu]
        out[n] = r.reshape(x.shape[1:])
    return out


# ============================================================================================
# Nets and inputs
# ============================================================================================
NETS = {
    "dense": (small_dense_spec(), (3, 6)),
    "conv": (small_conv_spec(), (2, 2, 9, 8)),  # both pool kinds, padding, strides, overlap
}


def get_net(kind, bias=True, dtype=F64, seed=0):
    spec, shape = NETS[kind]
    net = make_net(spec, seed=seed, dtype=dtype, bias=bias)
    x = np.random.default_rng(seed + 1).normal(size=shape).astype(dtype)
    return net, x


RULES = [
    rules.Epsilon(0.1), rules.Zero(), rules.Gamma(0.25), rules.Gamma(0.0, stabilizer=1e-3), rules.AlphaBeta(2, 1),
    rules.AlphaBeta(3, 2), rules.ZPlus(), rules.ZPlus(ignore_bias=True), rules.ZBox(-2.0, 3.0),
    rules.WSquare(), rules.Flat(), rules.Flat(stabilizer=0.5),
]


def everywhere(net, rule):
    return {i: rule for i in net.linear_layers()}


# ============================================================================================
# Closed forms against the oracle
# ============================================================================================
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_rule_matches_dense_oracle(rule, kind, bias):
    net, x = get_net(kind, bias)
    assignment = everywhere(net, rule)
    got = relprop.explain(net, x, assignment, backend="reference")
    expected = oracle(net, x, assignment)
    assert_close(got, expected, reduction_len=64, scale=1e3)


COMPOSITES = {
    "lrp.epsilon_plus_flat": ({}, lambda net: rules.epsilon_plus_flat()),
    "lrp.epsilon_gamma_box": ({"low": -2.0, "high": 3.0}, lambda net: rules.epsilon_gamma_box(-2.0, 3.0)),
    "lrp.epsilon_alpha2_beta1": ({}, lambda net: rules.epsilon_alpha2_beta1()),
    "dtd.box": ({"low": -2.0, "high": 3.0}, lambda net: rules.dtd_box(-2.0, 3.0)),
    "dtd.wsquare": ({}, lambda net: rules.dtd_wsquare()),
}


@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("name", list(COMPOSITES))
def test_composite_methods_match_oracle(name, kind):
    net, x = get_net(kind)
    options, make = COMPOSITES[name]
    got = relprop.explain(net, x, name, backend="reference", **options)
    expected = oracle(net, x, make(net).assign(net))
    assert_close(got, expected, reduction_len=64, scale=1e3)


def test_composite_assignment_follows_math():
    net, _ = get_net("conv")  # layers: 0 conv, 3 conv, 7 linear, 9 linear
    kinds = {i: type(r).__name__ for i, r in rules.epsilon_plus_flat().assign(net).items()}
    assert kinds == {0: "Flat", 3: "ZPlus", 7: "Epsilon", 9: "Epsilon"}
    kinds = {i: type(r).__name__ for i, r in rules.epsilon_gamma_box(0, 1).assign(net).items()}
    assert kinds == {0: "ZBox", 3: "Gamma", 7: "Epsilon", 9: "Epsilon"}
    kinds = {i: type(r).__name__ for i, r in rules.epsilon_alpha2_beta1().assign(net).items()}
    assert kinds == {0: "AlphaBeta", 3: "AlphaBeta", 7: "Epsilon", 9: "Epsilon"}
    dtd = rules.dtd_box(0, 1).assign(net)
    assert type(dtd[0]).__name__ == "ZBox" and all(dtd[i] == rules.ZPlus(ignore_bias=True) for i in (3, 7, 9))
    assert type(rules.dtd_wsquare().assign(net)[0]).__name__ == "WSquare"
    dense, _ = get_net("dense")  # no conv: epsilon_gamma_box puts no z^B anywhere, flat goes on the first dense
    assert {type(r).__name__ for r in rules.epsilon_gamma_box(0, 1).assign(dense).values()} == {"Epsilon"}
    assert type(rules.epsilon_plus_flat().assign(dense)[0]).__name__ == "Flat"


@pytest.mark.parametrize("kind", list(NETS))
def test_mixed_dict_and_per_channel_box(kind):
    net, x = get_net(kind)
    first = net.linear_layers()[0]
    c = x.shape[1]
    shape = (1, c, 1, 1) if x.ndim == 4 else (c,)
    low = -1.0 - np.arange(c, dtype=F64).reshape(shape)
    high = 2.0 + np.arange(c, dtype=F64).reshape(shape)
    assignment = {i: r for i, r in zip(net.linear_layers(), [rules.ZBox(low, high), rules.Gamma(0.5),
                                                             rules.AlphaBeta(2, 1), rules.Epsilon(0.01)])}
    assert first in assignment
    got = relprop.explain(net, x, assignment, backend="reference")
    assert_close(got, oracle(net, x, assignment), reduction_len=64, scale=1e3)


@pytest.mark.parametrize("output", ["logit", "onehot"])
def test_output_option_and_target(output):
    net, x = get_net("conv")
    target = np.array([1, 3])
    got = relprop.explain(net, x, "lrp.epsilon", target=target, backend="reference", output=output, epsilon=0.05)
    expected = np.stack([oracle(net, x[n:n + 1], everywhere(net, rules.Epsilon(0.05)), start=output,
                                target=int(target[n]))[0] for n in range(2)])
    assert_close(got, expected, reduction_len=64, scale=1e3)


def test_stabilizer_option_reaches_pools():
    net, x = get_net("conv")
    got = relprop.explain(net, x, "lrp.flat", backend="reference", stabilizer=0.3)
    assert_close(got, oracle(net, x, everywhere(net, rules.Flat(0.3)), stabilizer=0.3), reduction_len=64, scale=1e3)


# -- hand-worked cases ---------------------------------------------------------------------------------------
def one_layer(w, b=None):
    weights = {"0.weight": np.asarray(w, F64)}
    if b is not None:
        weights["0.bias"] = np.asarray(b, F64)
    return relprop.from_spec([{"type": "linear", "in": len(w[0]), "out": len(w)}], weights)


def test_toolbox_bias_bug_case():
    """w = [1, -1], b = -1, x = [1, 1]: z = -1 = R.  z⁺ = 1 (b⁺ = 0), z⁻ = -1 + b⁻ = -2.

    α1β0: R = [1, 0]/1 · (-1) = [-1, 0].  α2β1: (2·[1, 0]/1 − [0, -1]/(-2)) · (-1) = [-2, 0.5].
    (The bug puts the full b in both halves: z⁺ = 0 and R ~ 1e7.)"""
    net, x = one_layer([[1.0, -1.0]], [-1.0]), np.array([[1.0, 1.0]])
    r10 = relprop.explain(net, x, "lrp.alpha_beta", alpha=1, beta=0, backend="reference")
    r21 = relprop.explain(net, x, "lrp.alpha_beta", alpha=2, beta=1, backend="reference")
    np.testing.assert_allclose(r10, [[-1.0, 0.0]], rtol=1e-5)
    np.testing.assert_allclose(r21, [[-2.0, 0.5]], rtol=1e-5)
    np.testing.assert_allclose(relprop.explain(net, x, "lrp.zplus", backend="reference"), r10, rtol=0, atol=0)


def test_hand_worked_epsilon_and_flat():
    # z = 2·1 + 1·3 + 0.5 = 5.5; R = z; ε rule: R_i = z_i/z·R = [2, 3]; flat: [2.75, 2.75]; w²: R·[4, 1]/5
    net, x = one_layer([[2.0, 1.0]], [0.5]), np.array([[1.0, 3.0]])
    np.testing.assert_allclose(relprop.explain(net, x, "lrp.zero", backend="reference"), [[2.0, 3.0]], rtol=1e-12)
    np.testing.assert_allclose(relprop.explain(net, x, "lrp.flat", backend="reference"), [[2.75, 2.75]], rtol=1e-6)
    np.testing.assert_allclose(relprop.explain(net, x, "lrp.wsquare", backend="reference"), [[4.4, 1.1]], rtol=1e-6)


def test_gamma_is_sign_aware():
    # z = 1·1 + (-2)·1 + (-1)·(-1) = 0... use a = [1, 1, -1], w = [1, -2, 3]: z = 1 - 2 - 3 = -4 < 0.
    # z_j < 0: z_ij + γ z_ij^- = [1, -2 - 2γ, -3 - 3γ] with γ = 1: [1, -4, -6], sum -9; R = -4
    net, x = one_layer([[1.0, -2.0, 3.0]]), np.array([[1.0, 1.0, -1.0]])
    got = relprop.explain(net, x, "lrp.gamma", gamma=1.0, backend="reference", stabilizer=1e-12)
    np.testing.assert_allclose(got, [[1.0 / -9 * -4, -4.0 / -9 * -4, -6.0 / -9 * -4]], rtol=1e-9)


def test_alpha1beta0_equals_zplus():
    net, x = get_net("conv")
    a = relprop.explain(net, x, "lrp.alpha_beta", alpha=1, beta=0, backend="reference")
    b = relprop.explain(net, x, "lrp.zplus", backend="reference")
    np.testing.assert_array_equal(a, b)


# -- signal methods ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("method,relu", [("deconvnet", "deconvnet"), ("guided_backprop", "guided")])
def test_signal_methods_match_oracle(method, relu, kind):
    net, x = get_net(kind)
    got = relprop.explain(net, x, method, backend="reference")
    expected = oracle(net, x, everywhere(net, rules.Gradient()), start="onehot", relu=relu)
    assert_close(got, expected, reduction_len=64, scale=1e3)


def _pooled_net(overlap, dtype):
    """conv -> relu -> maxpool -> conv -> relu -> maxpool (ceil mode, padded) -> flatten -> linear, every
    ReLU read only by its pool; ``overlap``: the first pool's windows overlap (3x3, stride 2)."""
    spec = [{"type": "conv2d", "in": 2, "out": 4, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "maxpool2d", "kernel": 3 if overlap else 2, "stride": 2},
            {"type": "conv2d", "in": 4, "out": 5, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "maxpool2d", "kernel": 2, "stride": 2, "padding": 1, "ceil_mode": True}, {"type": "flatten"}]
    net = make_net(spec, dtype=dtype)
    flat = net.shapes((1, 2, 11, 10))[-1][1]
    return make_net(spec + [{"type": "linear", "in": flat, "out": 3}], dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("relu", ["gradient", "deconvnet", "guided"])
def test_gate_before_unpool_gives_the_same_bits(relu, overlap, dtype):
    """The ReLU backward moved below its max-pool (GateBeforeUnpool) changes nothing at the input, ties
    among zeros and overlapping windows included; with overlapping windows only the gradient's linear
    gate moves (max(g, 0) of a sum is not the sum of the max(g, 0))."""
    from relprop.rules.signal import GateBeforeUnpool, gradient_sweep

    net = _pooled_net(overlap, dtype)
    rng = np.random.default_rng(3)
    x = rng.integers(-1, 2, size=(3, 2, 11, 10)).astype(dtype)  # many exact zeros: ties in the pools
    sweep = gradient_sweep(net, relu)
    moved = [i for i, r in enumerate(sweep.whole_rules or []) if isinstance(r, GateBeforeUnpool)]
    assert moved == ([2, 5] if relu == "gradient" or not overlap else [5])
    plain = gradient_sweep(net, relu)
    plain.whole_rules = None
    for backend in ("reference", "cpu"):
        for target in ([0, 1, 2], relprop.Unit(layer=4, channel=1, position=(2, 3))):
            got, want = sweep(x, target, backend), plain(x, target, backend)
            assert got.tobytes() == want.tobytes()
            assert np.abs(want).max() > 0
    if relu == "deconvnet":
        return  # its ReLU backward reads no gate
    # from the ReLU of a pair (a unit there: its own gate must still apply) the plain rules run
    trace = net.trace(x)
    off = np.argwhere(trace.layer_output(3)[0] < 0)[0]  # a unit whose ReLU is off for sample 0
    unit = relprop.Unit(layer=4, channel=int(off[0]), position=(int(off[1]), int(off[2])))
    assert not sweep(x, unit, "cpu")[0].any()


@pytest.mark.parametrize("method", ["lrp.epsilon_plus_flat", "lrp.alpha_beta", "gamma"])
def test_traced_modified_forwards_give_the_same_bits(method, monkeypatch):
    """z⁺ = W⁺a + b⁺ (αβ's two, γ's (W + γW⁺)a) computed by the trace beside Wa, in the same kernel
    call, instead of by the rule: the same relevance bit for bit, and no forward of its own left in
    the rules at those convolutions."""
    import relprop._config as config
    from relprop.nets.layers import Conv2d

    spec = [{"type": "conv2d", "in": 3, "out": 8, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "maxpool2d", "kernel": 2}, {"type": "conv2d", "in": 8, "out": 8, "kernel": 3, "padding": 1},
            {"type": "relu"}, {"type": "conv2d", "in": 8, "out": 8, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "flatten"}, {"type": "linear", "in": 8 * 4 * 4, "out": 3}]
    net = make_net(spec, dtype=np.float32)
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    method_ = everywhere(net, rules.Gamma(0.25)) if method == "gamma" else method
    calls = []
    real = Conv2d.forward_with
    monkeypatch.setattr(Conv2d, "forward_with", lambda self, *a: calls.append(self) or real(self, *a))
    monkeypatch.setattr(config, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(config, "WINOGRAD_MIN_WORK", 1)  # the shared input transform itself
    traced = relprop.Explainer(net, method_)
    got = [traced(x, t) for t in (0, 2)]
    traced_layers = traced._method._traced_terms
    assert set(traced_layers) >= {3, 5}  # behind a ReLU: every conv but the first (a ≥ 0 known)
    assert not [c for c in calls if net.layers.index(c) in traced_layers]
    monkeypatch.setattr(config, "TRACE_MODIFIED_FORWARDS", False)
    own = relprop.Explainer(net, method_)
    assert not own._method._traced_terms
    for t, a in zip((0, 2), got):
        assert a.tobytes() == own(x, t).tobytes()


def _relu_probe():
    """x -> linear(I) -> relu -> linear(w2): the ReLU sees z = x, the signal above it is w2."""
    net = relprop.from_spec([{"type": "linear", "in": 3, "out": 3}, {"type": "relu"},
                             {"type": "linear", "in": 3, "out": 1}],
                            {"0.weight": np.eye(3), "2.weight": np.array([[2.0, -3.0, 5.0]])})
    return net, np.array([[-1.0, 1.0, 1.0]])  # unit 0 is dead, unit 1 has a negative signal


def test_deconvnet_ignores_mask_and_rectifies():
    net, x = _relu_probe()
    np.testing.assert_array_equal(relprop.explain(net, x, "deconvnet", backend="reference"), [[2.0, 0.0, 5.0]])
    np.testing.assert_array_equal(relprop.explain(net, x, "gradient", backend="reference"), [[0.0, -3.0, 5.0]])


def test_guided_backprop_masks_and_rectifies():
    net, x = _relu_probe()
    np.testing.assert_array_equal(relprop.explain(net, x, "guided_backprop", backend="reference"), [[0.0, 0.0, 5.0]])


@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop", "lrp.epsilon"])
def test_maxpool_routes_through_switches(method):
    # one channel 2x2 -> maxpool 2 -> linear(1): everything goes to the first maximum (tie at 3.0)
    net = relprop.from_spec([{"type": "maxpool2d", "kernel": 2}, {"type": "flatten"},
                             {"type": "linear", "in": 1, "out": 1}], {"2.weight": np.array([[2.0]])})
    x = np.array([[[[1.0, 3.0], [3.0, -2.0]]]])
    got = relprop.explain(net, x, method, backend="reference")
    expected = np.zeros_like(x)
    expected[0, 0, 0, 1] = 2.0 if method != "lrp.epsilon" else 6.0  # signal w = 2; relevance f = 6
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# -- backends ------------------------------------------------------------------------------------------------
CPU_METHODS = [
    ("lrp.epsilon", {"epsilon": 0.05}), ("lrp.zero", {}), ("lrp.gamma", {}), ("lrp.alpha_beta", {}),
    ("lrp.zplus", {}), ("lrp.flat", {}), ("lrp.wsquare", {}), ("lrp.epsilon_plus_flat", {}),
    ("lrp.epsilon_gamma_box", {"low": -3.0, "high": 3.0}), ("lrp.epsilon_alpha2_beta1", {}),
    ("dtd.box", {"low": -3.0, "high": 3.0}), ("dtd.wsquare", {}), ("deconvnet", {}), ("guided_backprop", {}),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", list(NETS))
def test_cpu_matches_reference(kind, bias, dtype):
    net, x = get_net(kind, bias, dtype)
    for method, options in CPU_METHODS:
        ref = relprop.Explainer(net, method, backend="reference", **options)(x)
        cpu = relprop.Explainer(net, method, backend="cpu", **options)(x)
        assert cpu.dtype == x.dtype, method
        assert_close(cpu, ref, reduction_len=64, scale=8.0 if dtype == np.float64 else 64.0)


# -- API, caching, errors --------------------------------------------------------------------------------------
def test_return_layers_and_repeated_calls_reuse_cache():
    net, x = get_net("conv")
    explainer = relprop.Explainer(net, "lrp.epsilon_plus_flat", backend="reference")
    r, per_layer = explainer(x, return_layers=True)
    assert len(per_layer) == len(net.layers) + 1 and per_layer[0] is r
    shapes = [x.shape] + [tuple(s) for s in net.shapes(x.shape)]
    assert [rel.shape for rel in per_layer] == shapes
    state = explainer._method._state

    def lasting(s):  # what a call leaves for the next (not the modified weights of one call, not its token)
        return {k: v for k, v in s.items() if k != "_call" and not (k[0] == "params" and v[2] is None and v[0] is not None)}

    cached = {i: lasting(s) for i, s in enumerate(state)}
    r2 = explainer(x)
    np.testing.assert_array_equal(r, r2)
    for i, s in enumerate(state):  # the second call made nothing new that lasts
        assert all(lasting(s)[k] is cached[i][k] for k in cached[i]) and set(lasting(s)) == set(cached[i])
    # z⁺ weights of conv 3 are kept beside its weights (and checked against them), not in the explainer
    from relprop.rules.core import _params

    rule = explainer._method.rules[3]
    kept = [v for k, v in lasting(state[3]).items() if k[0] == "params"]
    assert type(rule).__name__ == "ZPlus" and kept and all(v[2] is not None for v in kept)  # (small: with a copy
    # of the weights they came from, compared on every call)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(relprop._config, "RULE_WEIGHTS_KEPT_MIN_BYTES", 0)  # (these weights are small: formed afresh)
        assert _params(rule, net.layers[3], x, {})[0][0][0] is _params(rule, net.layers[3], x, {})[0][0][0]


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "formed-per-call"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_kept_explainer_follows_weights_changed_in_place(backend, dtype, kept, monkeypatch):
    """Weights changed in place (the same arrays, no set_params: the layers' versions stay) between two calls of
    one Explainer: the second call explains the changed net, as a new net with those weights does, for every
    method whose rules form something from the weights (W⁺, W⁻, W², a bound's forward, a pattern's W ⊙ A),
    whether those are kept beside the weights (``kept``; checked against them) or formed on every call (small
    weights).  Before, the explainer kept what its first call formed and silently explained the old net (γ off
    by 4x)."""
    monkeypatch.setattr(relprop._config, "RULE_WEIGHTS_KEPT_MIN_BYTES", 0 if kept else 1 << 30)
    methods = CPU_METHODS + [("signal.filter", {}), ("attribution.filter", {}), ("gradient", {})]
    for method, options in methods:
        net, x = get_net("conv", dtype=dtype)
        explainer = relprop.Explainer(net, method, backend=backend, **options)
        before = explainer(x)
        for layer in net.layers:
            if getattr(layer, "weight", None) is not None:
                layer.weight[...] = -0.5 * layer.weight + 0.01  # in place
        rebuilt = relprop.from_spec(net.spec(), {k: np.array(v) for k, v in net.state_dict().items()})
        want = relprop.Explainer(rebuilt, method, backend=backend, **options)(x)
        got = explainer(x)
        assert not np.allclose(want, before), method  # the change matters
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()), err_msg=method)


def test_dtype_and_shape_preserved():
    for dtype in (np.float32, np.float64):
        net, x = get_net("conv", dtype=dtype)
        for method, options in CPU_METHODS:
            r = relprop.explain(net, x, method, backend="reference", **options)
            assert r.shape == x.shape and r.dtype == x.dtype, method


def test_unknown_method_lists_known():
    net, x = get_net("dense")
    with pytest.raises(ValueError, match="known methods:.*lrp.epsilon"):
        relprop.explain(net, x, "lrp.nonsense")


def test_uncovered_layers_listed():
    net, x = get_net("conv")
    with pytest.raises(ValueError, match=r"3 \(conv2d\), 9 \(linear\)"):
        relprop.explain(net, x, {0: rules.Epsilon(), 7: rules.Epsilon()}, backend="reference")
    with pytest.raises(ValueError, match="not a layer index"):
        relprop.explain(net, x, {**everywhere(net, rules.Epsilon()), 42: rules.Epsilon()}, backend="reference")
    with pytest.raises(ValueError, match="applies to"):
        relprop.explain(net, x, {**everywhere(net, rules.Epsilon()), 1: rules.ZPlus()}, backend="reference")


def test_composite_and_rule_objects_as_methods():
    net, x = get_net("conv")
    a = relprop.explain(net, x, rules.epsilon_plus_flat(), backend="reference")
    b = relprop.explain(net, x, "lrp.epsilon_plus_flat", backend="reference")
    np.testing.assert_array_equal(a, b)
    c = relprop.explain(net, x, rules.ZPlus(), backend="reference")
    np.testing.assert_array_equal(c, relprop.explain(net, x, "lrp.zplus", backend="reference"))


@pytest.mark.parametrize("make,param", [
    (lambda: rules.Epsilon(-1e-3), "epsilon"),
    (lambda: rules.Epsilon(float("nan")), "epsilon"),
    (lambda: rules.Gamma(-0.1), "gamma"),
    (lambda: rules.Gamma(stabilizer=0), "stabilizer"),
    (lambda: rules.AlphaBeta(2, 2), "alpha"),
    (lambda: rules.AlphaBeta(0.5, -0.5), "beta"),
    (lambda: rules.ZPlus(stabilizer=-1), "stabilizer"),
    (lambda: rules.ZPlus(ignore_bias="yes"), "ignore_bias"),
    (lambda: rules.ZBox(1.0, 0.0), "low > high"),
    (lambda: rules.ZBox(np.zeros(3), np.ones(2)), "broadcast"),
    (lambda: rules.ZBox(float("inf"), 1.0), "low"),
    (lambda: rules.WSquare(stabilizer=0.0), "stabilizer"),
    (lambda: rules.Flat(stabilizer=True), "stabilizer"),
])
def test_bad_rule_parameters(make, param):
    with pytest.raises(ValueError, match=param):
        make()


def test_bad_method_options():
    net, x = get_net("conv")
    with pytest.raises(ValueError, match="epsilon"):
        relprop.Explainer(net, "lrp.epsilon", epsilon=-1)
    with pytest.raises(ValueError, match="stabilizer"):
        relprop.Explainer(net, "lrp.zplus", stabilizer=0)
    with pytest.raises(ValueError, match="output"):
        relprop.Explainer(net, "lrp.flat", output="softmax")
    with pytest.raises(ValueError, match="low= and high="):
        relprop.Explainer(net, "dtd.box")
    with pytest.raises(TypeError, match="unknown option"):
        relprop.Explainer(net, "lrp.flat", gamma=1.0)
    with pytest.raises(ValueError, match="broadcast"):  # bounds that do not fit the first layer's input
        relprop.explain(net, x, "dtd.box", low=np.zeros((1, 5, 1, 1)), high=1.0, backend="reference")


def test_rules_are_frozen_values():
    assert rules.Epsilon(0.1) == rules.Epsilon(0.1) and rules.Zero() == rules.Zero()
    assert rules.Zero().epsilon == 0.0
    with pytest.raises(Exception):
        rules.Epsilon(0.1).epsilon = 0.2
    assert "ZBox(low=0.0" in repr(rules.ZBox(0, 1))


WIDE_ROWS_SPEC = [{"type": "conv2d", "in": 2, "out": 4, "kernel": 3, "padding": 1}, {"type": "relu"},
                  {"type": "conv2d", "in": 4, "out": 5, "kernel": 5, "padding": 1}, {"type": "relu"},
                  {"type": "conv2d", "in": 5, "out": 20, "kernel": 3, "stride": 2}, {"type": "relu"},
                  {"type": "flatten"}, {"type": "linear", "in": 20 * 4 * 18, "out": 3}]


@pytest.mark.parametrize("backend", ["reference", "cpu", "cpu-winograd"])
@pytest.mark.parametrize("method", ["lrp.zplus", "lrp.epsilon", "lrp.zero", "lrp.epsilon_plus_flat", "lrp.alpha_beta",
                                    "lrp.gamma"])
def test_conv_relevance_in_one_call_changes_no_bit(method, backend, monkeypatch):
    """A rule that reaches a convolution's input through one term (z⁺ behind a ReLU, ε, LRP-0) runs its
    backward there as one kernel call (the CPU lanes and Winograd paths divide and multiply inside the
    transposed convolution): the explanation is the three-kernel one bit for bit; αβ (weight α ≠ 1) and γ
    (a sign mask) keep the three kernels."""
    from relprop.nets import layers
    from relprop.rules import core

    rng = np.random.default_rng(21)
    net = make_net(WIDE_ROWS_SPEC, 21, np.float32)
    x = rng.normal(size=(3, 2, 12, 40)).astype(np.float32)
    calls = []
    real = layers.Conv2d.relevance_with
    monkeypatch.setattr(layers.Conv2d, "relevance_with", lambda self, *a: calls.append(1) or real(self, *a))
    monkeypatch.setattr(relprop._config, "CONV_LANES_DIVIDE_MIN_WIDTH", 1)
    if backend == "cpu-winograd":  # the 3x3 stride-1 layers through Winograd, however narrow
        backend = "cpu"
        monkeypatch.setattr(relprop._config, "WINOGRAD_MIN_CHANNELS", 1)
        monkeypatch.setattr(relprop._config, "WINOGRAD_MIN_WORK", 1)
    explainer = relprop.Explainer(net, method, backend=backend)
    got = explainer(x, return_layers=True)
    fused = len(calls)
    monkeypatch.setattr(core, "_fused_term", lambda *a: False)
    want = explainer(x, return_layers=True)
    # z⁺ at the first layer has two terms (the input has both signs): not fused there
    assert fused == {"lrp.alpha_beta": 0, "lrp.gamma": 0, "lrp.epsilon_plus_flat": 2, "lrp.zplus": 2}.get(method, 3)
    assert got[0].tobytes() == want[0].tobytes()
    assert [None if v is None else v.tobytes() for v in got[1]] == [None if v is None else v.tobytes() for v in want[1]]
