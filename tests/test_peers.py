"""Agreement with Zennit (PyTorch), the peer toolbox: an optional check, skipped without torch/zennit.

Install the peers (the ``peers`` extra; a CPU build of torch is enough)::

    pip install torch==2.13.0 && pip install --no-deps zennit && pip install click Pillow

(a plain ``pip install zennit`` pulls torchvision, and torchvision a CUDA torch: GBs).
zennit's ``__init__`` imports ``zennit.torchvision`` (canonizers for torchvision's
ResNet/VGG), which needs torchvision; none of it is used here, so without torchvision
:func:`import_zennit` stands an empty module in for ``zennit.torchvision``.

The same small nets are built as a PyTorch ``nn.Sequential`` and as a relprop net from
its ``state_dict()`` (layer indices match), in float64, and every method is compared
with Zennit's rule or composite, started from the same output signal: the one-hot of the
target for the signals, R_c = f_c(x) for the relevance methods (relprop's
``output="logit"``; Zennit takes the ``grad_output`` it is given).  Zennit maps ReLU to
Pass, average pooling to Norm (the ε rule with ε = the stabiliser) and leaves max-pool and
flatten to the gradient (switches, first maximum on ties) -- MATH.md's layer rules.

Deliberate differences (MATH.md conventions), compared through Zennit's ``zero_params``:

- w²: relprop has no bias term; Zennit's WSquare adds b² -> ``WSquare(zero_params="bias")``.
- ``dtd.*`` use z⁺ without the bias (``ignore_bias``) -> ``ZPlus(zero_params="bias")``.
- LRP-ε with ε = 0 and a zero pre-activation: relprop gives 0, Zennit divides by 0 (not tested).
"""

import numpy as np
import pytest

import relprop

torch = pytest.importorskip("torch")


from tests.torch_models import import_zennit  # noqa: E402

zennit = import_zennit()
from zennit import composites as zc  # noqa: E402
from zennit import rules as zr  # noqa: E402
from zennit import types as zt  # noqa: E402
from zennit.attribution import Gradient as ZennitGradient  # noqa: E402


# -- the same net in both ---------------------------------------------------------------------------------
def torch_net(spec):
    """An ``nn.Sequential`` of a relprop layer spec (index i of the spec is module i)."""
    nn, mods = torch.nn, []
    for e in spec:
        t = e["type"]
        if t == "conv2d":
            mods.append(nn.Conv2d(e["in"], e["out"], e["kernel"], stride=e.get("stride", 1),
                                  padding=e.get("padding", 0), dilation=e.get("dilation", 1)))
        elif t == "linear":
            mods.append(nn.Linear(e["in"], e["out"]))
        elif t == "maxpool2d":
            mods.append(nn.MaxPool2d(e["kernel"], e.get("stride"), e.get("padding", 0)))
        elif t == "avgpool2d":
            mods.append(nn.AvgPool2d(e["kernel"], e.get("stride"), e.get("padding", 0)))
        else:
            mods.append({"relu": nn.ReLU, "flatten": nn.Flatten}[t]())
    return nn.Sequential(*mods).eval()


def net_pair(spec, seed=0, bias=True):
    """(torch model, relprop net) with the same random float64 weights; biases N(0, 0.3²) or zero."""
    torch.manual_seed(seed)
    model = torch_net(spec).double()
    with torch.no_grad():
        for mod in model:
            if getattr(mod, "bias", None) is not None:
                mod.bias.normal_(0, 0.3) if bias else mod.bias.zero_()
    net = relprop.from_spec(spec, {k: v.detach().numpy() for k, v in model.state_dict().items()})
    return model, net


def zennit_map(model, x, composite, target, start="logit"):
    """Zennit's attribution, the backward sweep started from R_c = f_c(x) ("logit") or the one-hot of c."""
    xt = torch.from_numpy(np.array(x)).requires_grad_(True)

    def output_signal(out):
        onehot = torch.nn.functional.one_hot(torch.as_tensor(target), out.shape[1]).to(out)
        return onehot * out.detach() if start == "logit" else onehot

    with ZennitGradient(model, composite) as attributor:
        _, r = attributor(xt, output_signal)
    return r.detach().numpy()


def everywhere(rule):
    """Zennit composite: ``rule`` on every dense/conv layer, the base layer map (Pass, Norm) elsewhere."""
    return zc.LayerMapComposite(layer_map=zc.layer_map_base() + [(zt.Linear, rule)])


def first_then(first, rule):
    """Zennit composite: ``first`` on the first dense/conv layer, ``rule`` on the others."""
    return zc.SpecialFirstLayerMapComposite(layer_map=zc.layer_map_base() + [(zt.Linear, rule)],
                                            first_map=[(zt.Linear, first)])


def assert_agree(actual, expected, rtol=1e-10):
    """Elementwise agreement, absolute slack relative to the largest |expected| (sums cancel)."""
    scale = max(float(np.abs(expected).max()), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# -- nets -------------------------------------------------------------------------------------------------
CONV = [  # padding, overlapping max-pool windows, strided conv, padded average pool
    {"type": "conv2d", "in": 2, "out": 3, "kernel": 3, "stride": 1, "padding": 1}, {"type": "relu"},
    {"type": "maxpool2d", "kernel": 3, "stride": 2},
    {"type": "conv2d", "in": 3, "out": 4, "kernel": [2, 1], "stride": [1, 2], "padding": [0, 1]}, {"type": "relu"},
    {"type": "avgpool2d", "kernel": 2, "stride": 1, "padding": 1}, {"type": "flatten"},
    {"type": "linear", "in": 4 * 4 * 4, "out": 7}, {"type": "relu"}, {"type": "linear", "in": 7, "out": 4},
]
DENSE = [{"type": "linear", "in": 6, "out": 5}, {"type": "relu"}, {"type": "linear", "in": 5, "out": 4},
         {"type": "relu"}, {"type": "linear", "in": 4, "out": 3}]
# max-pool on integer inputs: many ties, so the switches' tie rule (first maximum) is exercised
TIES = [{"type": "maxpool2d", "kernel": 2}, {"type": "conv2d", "in": 2, "out": 3, "kernel": 2}, {"type": "relu"},
        {"type": "flatten"}, {"type": "linear", "in": 3 * 3 * 3, "out": 5}]
NETS = {"conv": (CONV, (5, 2, 9, 8)), "dense": (DENSE, (5, 6)), "ties": (TIES, (5, 2, 8, 8))}

BOX = (-3.0, 3.0)
CHANNEL_BOX = (np.array([-3.0, -2.5]).reshape(1, 2, 1, 1), np.array([3.0, 3.5]).reshape(1, 2, 1, 1))


def _input(name, shape):
    rng = np.random.default_rng(1)
    if name == "ties":
        return rng.integers(0, 3, size=shape).astype(np.float64)
    return np.clip(rng.normal(size=shape), *BOX)  # signed, inside the box of z^B


#: relprop method, its options, the Zennit composite (factory), the start signal, and the nets it applies to
CASES = [
    ("gradient", {}, lambda: None, "onehot", ("conv", "dense", "ties")),
    ("guided_backprop", {}, zc.GuidedBackprop, "onehot", ("conv", "dense", "ties")),
    ("deconvnet", {}, zc.DeconvNet, "onehot", ("conv", "dense", "ties")),
    ("lrp.zero", {}, lambda: everywhere(zr.Epsilon(0.0)), "logit", ("conv", "dense")),
    ("lrp.epsilon", {}, lambda: everywhere(zr.Epsilon()), "logit", ("conv", "dense", "ties")),
    ("lrp.epsilon", {"epsilon": 0.5}, lambda: everywhere(zr.Epsilon(0.5)), "logit", ("conv", "dense")),
    ("lrp.epsilon", {"output": "onehot"}, lambda: everywhere(zr.Epsilon()), "onehot", ("conv",)),
    ("lrp.zplus", {}, lambda: everywhere(zr.ZPlus()), "logit", ("conv", "dense", "ties")),
    ("dtd.zplus", {}, lambda: everywhere(zr.ZPlus(zero_params="bias")), "logit", ("conv", "dense")),
    ("lrp.gamma", {}, lambda: everywhere(zr.Gamma()), "logit", ("conv", "dense")),
    ("lrp.gamma", {"gamma": 1.0}, lambda: everywhere(zr.Gamma(1.0)), "logit", ("conv", "dense")),
    ("lrp.alpha_beta", {}, lambda: everywhere(zr.AlphaBeta()), "logit", ("conv", "dense")),
    ("lrp.alpha_beta", {"alpha": 3, "beta": 2}, lambda: everywhere(zr.AlphaBeta(3, 2)), "logit", ("conv",)),
    ("lrp.flat", {}, lambda: everywhere(zr.Flat()), "logit", ("conv", "dense")),
    # MATH.md: w² without bias (Zennit adds b²): Zennit's WSquare with the bias zeroed
    ("lrp.wsquare", {}, lambda: everywhere(zr.WSquare(zero_params="bias")), "logit", ("conv", "dense")),
    ("lrp.epsilon_plus_flat", {}, zc.EpsilonPlusFlat, "logit", ("conv", "dense", "ties")),
    ("lrp.epsilon_alpha2_beta1", {}, zc.EpsilonAlpha2Beta1, "logit", ("conv", "dense")),
    ("lrp.epsilon_gamma_box", {"low": BOX[0], "high": BOX[1]}, lambda: zc.EpsilonGammaBox(*BOX), "logit",
     ("conv", "dense")),
    ("lrp.epsilon_gamma_box", {"low": CHANNEL_BOX[0], "high": CHANNEL_BOX[1]},
     lambda: zc.EpsilonGammaBox(*(torch.from_numpy(b) for b in CHANNEL_BOX)), "logit", ("conv",)),
    ("dtd.box", {"low": BOX[0], "high": BOX[1]},
     lambda: first_then(zr.ZBox(*BOX), zr.ZPlus(zero_params="bias")), "logit", ("conv", "dense")),
    ("dtd.wsquare", {}, lambda: first_then(zr.WSquare(zero_params="bias"), zr.ZPlus(zero_params="bias")), "logit",
     ("conv", "dense")),
]


def _case_id(case):
    method, options = case[0], case[1]
    opts = ",".join(f"{k}={'array' if isinstance(v, np.ndarray) else v}" for k, v in options.items())
    return f"{method}[{opts}]" if opts else method


PARAMS = [pytest.param(case, name, id=f"{_case_id(case)}-{name}") for case in CASES for name in case[4]]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", list(NETS))
def test_logits(name, bias):
    spec, shape = NETS[name]
    model, net = net_pair(spec, bias=bias)
    x = _input(name, shape)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    for backend in ("reference", "cpu"):
        assert_agree(net.forward(x, backend=backend), expected)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case,name", PARAMS)
def test_agrees_with_zennit(case, name, backend):
    method, options, composite, start, _ = case
    spec, shape = NETS[name]
    model, net = net_pair(spec)
    x = _input(name, shape)
    target = net.forward(x).argmax(axis=1)
    expected = zennit_map(model, x, composite(), target, start)
    actual = relprop.explain(net, x, method, target=target, backend=backend, **options)
    assert np.abs(expected).max() > 0  # a vacuous comparison would prove nothing
    assert_agree(actual, expected)


def test_wsquare_bias_is_a_deliberate_difference():
    """MATH.md: relprop's w² has no bias term, Zennit's WSquare adds b² -- they differ exactly by that."""
    model, net = net_pair(DENSE)
    x = _input("dense", NETS["dense"][1])
    target = net.forward(x).argmax(axis=1)
    ours = relprop.explain(net, x, "lrp.wsquare", target=target)
    with_b2 = zennit_map(model, x, everywhere(zr.WSquare()), target)
    without_b2 = zennit_map(model, x, everywhere(zr.WSquare(zero_params="bias")), target)
    assert_agree(ours, without_b2)
    assert np.abs(ours - with_b2).max() > 1e-3 * np.abs(with_b2).max()


# -- a residual net (layer graph) against Zennit -----------------------------------------------------------
def _residual_torch(folded):
    """The folded relprop residual net (tests/nets_factory.residual_spec, BN merged) as a torch module whose
    adds are ``zennit.layer.Sum`` over ``torch.stack`` (Zennit's Norm rule at every add)."""
    from zennit.layer import Sum

    nn = torch.nn

    def conv(i):
        layer = folded.layers[i]
        m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel, stride=layer.stride,
                      padding=layer.padding).double()
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(np.asarray(layer.weight, np.float64)))
            m.bias.copy_(torch.from_numpy(np.asarray(layer.bias, np.float64)))
        return m

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0, self.c3, self.c6, self.c10, self.c13, self.c15 = (conv(i) for i in (0, 3, 6, 10, 13, 15))
            self.r2, self.r5, self.r9, self.r12, self.r18 = (nn.ReLU() for _ in range(5))
            self.sum1, self.sum2 = Sum(dim=0), Sum(dim=0)
            self.pool = nn.AdaptiveAvgPool2d(1)
            lin = folded.layers[21]
            self.fc = nn.Linear(lin.in_features, lin.out_features).double()
            with torch.no_grad():
                self.fc.weight.copy_(torch.from_numpy(np.asarray(lin.weight, np.float64)))
                self.fc.bias.copy_(torch.from_numpy(np.asarray(lin.bias, np.float64)))

        def forward(self, x):
            a = self.r2(self.c0(x))
            b = self.c6(self.r5(self.c3(a)))
            a = self.r9(self.sum1(torch.stack([b, a])))
            c = self.c13(self.r12(self.c10(a)))
            a = self.r18(self.sum2(torch.stack([c, self.c15(a)])))
            return self.fc(torch.flatten(self.pool(a), 1))

    return Residual().eval()


RESIDUAL_CASES = [
    ("gradient", {}, None, "onehot"),
    ("lrp.epsilon", {}, lambda: everywhere(zr.Epsilon()), "logit"),
    ("lrp.epsilon_plus_flat", {}, zc.EpsilonPlusFlat, "logit"),
    ("lrp.alpha_beta", {}, lambda: everywhere(zr.AlphaBeta()), "logit"),
    ("lrp.zplus", {}, lambda: everywhere(zr.ZPlus()), "logit"),
]


@pytest.mark.parametrize("method, options, composite, start", RESIDUAL_CASES, ids=[c[0] for c in RESIDUAL_CASES])
def test_residual_net_agrees_with_zennit(method, options, composite, start):
    """BN folded (by hand in the torch model: Zennit's MergeBatchNorm is not exact, FINDINGS.md), each add
    through Zennit's Sum + Norm: gradient, ε, ε+flat, αβ and z⁺ agree to 1e-9 in float64."""
    from nets_factory import graph_weights, residual_spec

    spec = residual_spec()
    net = relprop.from_spec(spec, graph_weights(spec, np.random.default_rng(7)))
    model = _residual_torch(relprop.nets.canonical(net))
    x = np.random.default_rng(8).normal(size=(3, 3, 9, 8))
    target = net.forward(x).argmax(1)
    np.testing.assert_allclose(model(torch.from_numpy(x)).detach().numpy(), net.forward(x), rtol=1e-12)
    got = relprop.explain(net, x, method, target=target, **options)
    if composite is None:
        xt = torch.from_numpy(x).requires_grad_(True)
        out = model(xt)
        out.backward(torch.nn.functional.one_hot(torch.as_tensor(target), out.shape[1]).double())
        want = xt.grad.numpy()
    else:
        want = zennit_map(model, x, composite(), target, start)
    assert_agree(got, want, rtol=1e-9)
