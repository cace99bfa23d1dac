"""relprop against PyTorch/Zennit on CIFAR-VGG, batch 64, float32: speed and agreement (optional).

Skipped unless torch and zennit are installed (the ``peers`` extra; a CPU torch is enough)::

    pip install torch==2.13.0 && pip install --no-deps zennit && pip install click Pillow

(a plain ``pip install zennit`` pulls torchvision, and torchvision a CUDA torch: GBs; without
torchvision, ``zennit.torchvision`` is stood in for by an empty module, see
tests/test_peers.py).  Run ``pytest bench/test_bench_peers.py --benchmark-only``.

Pairs, same random weights, same batch, same targets (the argmax), both prepared outside
the timing (a relprop :class:`~relprop.Explainer`; Zennit's composite registered once):

==========================  =============================================================
``forward``                 ``net.forward(x)`` vs ``model(x)`` under ``torch.no_grad()``
``gradient``                Explainer "gradient" vs ``torch.autograd.grad`` (forward included)
``lrp.epsilon``             Explainer vs Zennit ``Epsilon`` on every dense/conv layer
``lrp.epsilon_plus_flat``   Explainer vs Zennit ``EpsilonPlusFlat``
==========================  =============================================================

Relevance starts from R_c = f_c(x) on both sides.  ``torch.set_num_threads(2)`` (the
machines have 2 cores; relprop's Numba uses them all).  Each test times its own side with
pytest-benchmark and then the two sides alternately (A B A B ...), recording in
``extra_info`` the best time of each and ``peer_over_relprop`` = Zennit/torch time over
relprop time: the machine is shared and noisy, so only this same-moment ratio means
anything.  Before timing, the two outputs are compared: ``max_rel_err`` = max |ours − theirs| /
max |theirs| over the batch, ``samples_agreeing`` the fraction of samples within the task's
tolerance (float32 rounding flips a rare ReLU gate or max-pool switch: see ``TOLERANCE``).
With ``--benchmark-disable`` every pair runs once on a batch of 2.  A registered Zennit composite
hooks the shared model, so each test registers its own and removes it when done.
"""
import sys
import time
import types

import numpy as np
import pytest

import relprop

from bench.nets import cifar_vgg_spec

torch = pytest.importorskip("torch")


def _import_zennit():
    try:
        import zennit
    except ImportError as exc:
        if exc.name != "torchvision":  # zennit/__init__ imports zennit.torchvision, which needs torchvision
            pytest.skip(f"zennit is not installed (pip install --no-deps zennit): {exc}", allow_module_level=True)
        for name in [n for n in sys.modules if n == "zennit" or n.startswith("zennit.")]:
            del sys.modules[name]
        sys.modules["zennit.torchvision"] = types.ModuleType("zennit.torchvision")
        import zennit
    return zennit


_import_zennit()
from zennit import composites as zc  # noqa: E402
from zennit import rules as zr  # noqa: E402
from zennit import types as zt  # noqa: E402
from zennit.attribution import Gradient as ZennitGradient  # noqa: E402

BATCH = 64
ROUNDS = 5  # alternating rounds for the ratio


def torch_vgg(spec):
    nn, mods = torch.nn, []
    for e in spec:
        if e["type"] == "conv2d":
            mods.append(nn.Conv2d(e["in"], e["out"], e["kernel"], padding=e["padding"]))
        elif e["type"] == "linear":
            mods.append(nn.Linear(e["in"], e["out"]))
        elif e["type"] == "maxpool2d":
            mods.append(nn.MaxPool2d(e["kernel"]))
        else:
            mods.append({"relu": nn.ReLU, "flatten": nn.Flatten}[e["type"]]())
    return nn.Sequential(*mods).float().eval()


@pytest.fixture(scope="module")
def vgg(request):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    spec = cifar_vgg_spec()
    model = torch_vgg(spec)
    with torch.no_grad():
        for mod in model:
            if getattr(mod, "bias", None) is not None:
                mod.bias.normal_(0, 0.01)
    net = relprop.from_spec(spec, {k: v.detach().numpy() for k, v in model.state_dict().items()})
    batch = 2 if request.config.getoption("benchmark_disable", False) else BATCH
    x = np.random.default_rng(1).normal(size=(batch, 3, 32, 32)).astype(np.float32)
    target = net.forward(x).argmax(axis=1)
    return model, net, x, target


def _zennit_attributor(model, composite, target, n_classes=10):
    """A prepared Zennit attribution: composite registered once, R_c = f_c(x) as the start signal."""
    onehot = torch.nn.functional.one_hot(torch.as_tensor(target), n_classes).float()
    attributor = ZennitGradient(model, composite)
    attributor.__enter__()

    def run(xt):
        return attributor(xt, lambda out: onehot * out.detach())[1]

    return run, attributor


def _pair(task, model, net, x, target):
    """(relprop callable, peer callable, teardown or None) for one task; both return an array of the same shape."""
    xt = torch.from_numpy(x)
    teardown = None
    if task == "forward":
        ours = lambda: net.forward(x)  # noqa: E731

        def theirs():
            with torch.no_grad():
                return model(xt)
    elif task == "gradient":
        explainer = relprop.Explainer(net, "gradient")
        ours = lambda: explainer(x, target)  # noqa: E731
        onehot = torch.nn.functional.one_hot(torch.as_tensor(target), 10).float()
        xg = xt.clone().requires_grad_(True)

        def theirs():
            out = model(xg)
            return torch.autograd.grad(out, xg, onehot)[0]
    else:
        composite = {"lrp.epsilon": lambda: zc.LayerMapComposite(zc.layer_map_base() + [(zt.Linear, zr.Epsilon())]),
                     "lrp.epsilon_plus_flat": zc.EpsilonPlusFlat}[task]()
        explainer = relprop.Explainer(net, task)
        ours = lambda: explainer(x, target)  # noqa: E731
        run, attributor = _zennit_attributor(model, composite, target)
        xg = xt.clone().requires_grad_(True)
        theirs = lambda: run(xg)  # noqa: E731
        teardown = lambda: attributor.__exit__(None, None, None)  # noqa: E731
    return ours, theirs, teardown


def _agreement(ours, theirs):
    """(max relative error over the batch, per sample: max |ours − theirs| / max |theirs| of that sample)."""
    ours, theirs = np.asarray(ours), theirs.detach().numpy()
    diff = np.abs(ours - theirs).reshape(len(ours), -1).max(axis=1)
    return float(diff.max() / np.abs(theirs).max()), diff / np.abs(theirs).reshape(len(ours), -1).max(axis=1)


def _alternate(a, b, rounds):
    """Best time of a and of b, timed alternately (a b a b ...) so both see the same machine load."""
    best = [np.inf, np.inf]
    for _ in range(rounds):
        for k, fn in enumerate((a, b)):
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


TASKS = ["forward", "gradient", "lrp.epsilon", "lrp.epsilon_plus_flat"]
#: float32 agreement per sample (relative to its largest |value|).  Rounding differs between the two (GEMM
#: order), which now and then flips a ReLU gate or a max-pool switch on a near-tie and changes that sample's map
#: locally (in float64 every pair agrees to ~1e-15, tests/test_peers.py), so most samples, not all, must agree;
#: the ε rule with ε = 1e-6 also amplifies rounding where a pre-activation is near 0, hence its looser bound.
TOLERANCE = {"forward": 1e-5, "gradient": 1e-4, "lrp.epsilon": 1e-2, "lrp.epsilon_plus_flat": 1e-4}
MIN_AGREEING = 0.9


@pytest.mark.parametrize("side", ["relprop", "peer"])
@pytest.mark.parametrize("task", TASKS)
def test_peer(benchmark, vgg, task, side):
    model, net, x, target = vgg
    ours, theirs, teardown = _pair(task, model, net, x, target)
    try:
        benchmark.group = f"peers-{task}"
        err, per_sample = _agreement(ours(), theirs())  # also the warm-up: compiles, fills the caches
        agreeing = float(np.mean(per_sample < TOLERANCE[task]))
        benchmark.extra_info.update(max_rel_err=err, median_sample_rel_err=float(np.median(per_sample)),
                                    samples_agreeing=agreeing)
        assert agreeing >= MIN_AGREEING, (f"{task}: relprop and the peer disagree on {1 - agreeing:.0%} of the "
                                          f"samples (per-sample relative errors {np.sort(per_sample)[::-1][:5]})")
        if benchmark.disabled:
            benchmark(ours if side == "relprop" else theirs)
            return
        benchmark.pedantic(ours if side == "relprop" else theirs, rounds=5, iterations=1, warmup_rounds=1)
        t_ours, t_theirs = _alternate(ours, theirs, ROUNDS)
        benchmark.extra_info.update(relprop_s=t_ours, peer_s=t_theirs, peer_over_relprop=t_theirs / t_ours)
    finally:
        if teardown is not None:
            teardown()
