"""Explanation methods (rules, composites, signals) on LeNet-5 and CIFAR-VGG, random weights.

Each benchmark times one call of a prepared :class:`relprop.Explainer` (its traced forward
included) and records ``extra_info["x_forward"]``: that time over relprop's own forward
on the same batch, measured in the same run (the machine is shared and noisy, so only
ratios within one run mean anything).  Targets (issue 3): ``lrp.epsilon`` <= 2.2x and
``lrp.epsilon_plus_flat`` <= 3x on CIFAR-VGG at batch 64.

``pytest bench --benchmark-only`` times them; ``pytest bench --benchmark-disable`` runs
every method once on a batch of 2 (a smoke test).
"""

import numpy as np
import pytest

import relprop
from relprop._backend import kernels

from bench.nets import LENET5_SPEC, best, cifar_vgg_spec, random_net

NETS = {"lenet5": (LENET5_SPEC, (1, 28, 28), 256), "cifar_vgg": (cifar_vgg_spec(), (3, 32, 32), 64)}

METHODS = [
    ("gradient", {}), ("deconvnet", {}), ("guided_backprop", {}),
    ("lrp.zero", {}), ("lrp.epsilon", {}), ("lrp.gamma", {}), ("lrp.alpha_beta", {}), ("lrp.zplus", {}),
    ("lrp.flat", {}), ("lrp.wsquare", {}), ("lrp.epsilon_plus_flat", {}),
    ("lrp.epsilon_gamma_box", {"low": -2.5, "high": 2.5}), ("lrp.epsilon_alpha2_beta1", {}),
    ("dtd.box", {"low": -2.5, "high": 2.5}), ("dtd.wsquare", {}),
]


#: the methods a --benchmark-disable smoke run still runs on CIFAR-VGG (the issue's two speed targets)
SMOKE_VGG = ("lrp.epsilon", "lrp.epsilon_plus_flat")


@pytest.fixture(scope="module")
def method_nets(request):
    k = kernels("cpu")
    missing = [n for n in ("dense_forward", "dense_vjp", "conv2d_forward", "conv2d_vjp") if not hasattr(k, n)]
    if missing:
        pytest.skip(f"cpu kernels missing: {missing}")
    disabled = request.config.getoption("benchmark_disable", False)
    out = {}
    for name, (spec, shape, batch) in NETS.items():
        x = np.random.default_rng(1).normal(size=(2 if disabled else batch,) + shape).astype(np.float32)
        out[name] = (random_net(spec), x)
    return out


@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
def test_method(benchmark, method_nets, net_name, method, options):
    net, x = method_nets[net_name]
    benchmark.group = f"methods-{net_name}"
    explainer = relprop.Explainer(net, method, **options)
    if benchmark.disabled:
        if net_name == "cifar_vgg" and method not in SMOKE_VGG:
            pytest.skip("smoke run: LeNet-5 covers this method's code path")
        r = benchmark(explainer, x)
        assert r.shape == x.shape and np.isfinite(r).all()
        return
    explainer(x)  # compile and fill the caches (modified weights) outside the timing
    forward = best(lambda: net.forward(x), 3)
    benchmark.pedantic(explainer, args=(x,), rounds=5, iterations=1, warmup_rounds=1)
    forward = min(forward, best(lambda: net.forward(x), 3))  # before and after: the quieter one counts
    benchmark.extra_info["forward_s"] = forward
    benchmark.extra_info["x_forward"] = benchmark.stats.stats.min / forward


def test_where_the_time_goes(benchmark, method_nets):
    """``lrp.epsilon_plus_flat`` on CIFAR-VGG beside the forward, per kernel family (bench/breakdown.py):
    ``extra_info`` holds each family's thread time per call and the method's over the forward's.  Its
    Winograd GEMMs run three times per convolution (W a and W⁺a in the trace, W⁺ᵀs in the backward) to
    the forward's once, so their ratio stays near 3 whatever the kernels' speed: this says how far below
    that the whole can go; ``floor_x_forward`` is :func:`bench.breakdown.floor`, the whole with every family at
    the forward's speed per unit of work.  The smoke run (a batch of 2, direct convolutions) checks that the
    clock restores the kernels it wrapped and that the families add up."""
    from bench.breakdown import FAMILIES, breakdown, floor
    net, x = method_nets["cifar_vgg"]
    benchmark.group = "methods-cifar_vgg"
    explainer = relprop.Explainer(net, "lrp.epsilon_plus_flat")
    wrapped = [getattr(mod, name) for names in FAMILIES.values() for mod, name in names]
    rounds = 1 if benchmark.disabled else 7
    work = {}
    result = benchmark.pedantic(breakdown, args=({"forward": lambda: net.forward(x), "lrp": lambda: explainer(x)},
                                                 rounds, work), rounds=1, iterations=1)
    assert [getattr(mod, name) for names in FAMILIES.values() for mod, name in names] == wrapped
    for times in result.values():
        assert set(times) == set(FAMILIES) | {"other", "wall"} and all(times[f] >= 0 for f in FAMILIES)
        assert times["wall"] > 0 and np.isfinite(list(times.values())).all()
    if benchmark.disabled:
        return
    fwd, lrp = result["forward"], result["lrp"]
    assert fwd["Winograd GEMMs"] > 0 and lrp["Winograd GEMMs"] > 0, "CIFAR-VGG's 3x3 convolutions ran direct"
    # z⁺ multiplies three times per convolution (W a, W⁺a, W⁺ᵀs) to the forward's once: exactly, in multiply-adds
    assert work["lrp"]["Winograd GEMMs"] == 3 * work["forward"]["Winograd GEMMs"], work
    for key in fwd:
        benchmark.extra_info[f"{key} forward_ms"] = 1e3 * fwd[key]
        benchmark.extra_info[f"{key} lrp_ms"] = 1e3 * lrp[key]
        benchmark.extra_info[f"{key} x_forward"] = lrp[key] / fwd[key] if fwd[key] > 0 else float("nan")
        if key in FAMILIES:
            benchmark.extra_info[f"{key} work_x_forward"] = work["lrp"][key] / work["forward"][key]
    benchmark.extra_info["floor_x_forward"] = floor(result, work)["lrp"]
