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
