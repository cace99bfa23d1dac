"""PatternNet, PatternAttribution and the baseline estimators as methods of the one backward engine."""
from __future__ import annotations

import numpy as np

from .._backend import array_namespace, to_numpy
from ..engine import Sweep, Unit
from ..methods import register_method, resolve_target
from ..nets import canonical
from ..rules.signal import gradient_sweep
from .fitting import Patterns
from .stats import _ESTIMATORS, PatternStats

# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
def _relu_follows(net, i):
    """True when layer i's output goes through a ReLU (max-pool, flatten and identities commute with it)."""
    while len(net.readers(i)) == 1:
        i = net.readers(i)[0]
        kind = net.layers[i].kind
        if kind == "relu":
            return True
        if kind not in ("maxpool2d", "flatten", "identity", "dropout"):
            return False
    return False


def _host64(a):
    return np.asarray(to_numpy(a), dtype=np.float64)


def _pattern_sweep(net, mats, name, times_weight=False, source=None):
    """The signal sweep from the target logit with each dense/conv layer's Wᵀ replaced by ``mats[i]``ᵀ
    (or (W ⊙ mats[i])ᵀ): ReLUs gate by the forward mask, max-pool routes through the switches."""
    from ..rules.signal import Gradient, Pattern

    def matrix(m):
        return m if isinstance(m, str) else _host64(m)

    rules = [Pattern(matrix(mats[i]), times_weight) if i in mats else Gradient() for i in range(len(net.layers))]
    return Sweep(net, rules, start="logit", name=name, source=source)


def _pattern_mats(net, patterns, estimator, name):
    if patterns is None:
        raise ValueError(f"{name} needs patterns=...: fit them with relprop.fit_patterns(net, data)")
    if isinstance(patterns, PatternStats):
        patterns = patterns.patterns(net=net)
    if not isinstance(patterns, Patterns):
        raise TypeError(f"{name}: patterns must be relprop.Patterns (from fit_patterns), got {type(patterns).__name__}")
    if estimator not in _ESTIMATORS:
        raise ValueError(f"{name}: estimator={estimator!r} is invalid; expected 'two_component' or 'linear'")
    patterns.check(net)
    return {i: (p.a_plus if estimator == "two_component" and _relu_follows(net, i) else p.a)
            for i, p in patterns.items()}


@register_method("pattern.net")
def pattern_net(net, patterns=None, estimator="two_component"):
    """PatternNet: the signal sweep with each layer's W replaced by its pattern A, from the target logit.

    ``estimator="two_component"``: a₊ for layers whose output goes through a ReLU, the linear a
    elsewhere (docs/conventions.md); ``"linear"``: a everywhere.
    """
    folded = canonical(net)
    return _pattern_sweep(folded, _pattern_mats(folded, patterns, estimator, "pattern.net"), "pattern.net",
                          source=net)


@register_method("pattern.attribution")
def pattern_attribution(net, patterns=None, estimator="two_component"):
    """PatternAttribution: the sweep with W ⊙ A in place of W (DTD with root point x − a₊wᵀx), from the target logit."""
    folded = canonical(net)
    return _pattern_sweep(folded, _pattern_mats(folded, patterns, estimator, "pattern.attribution"),
                          "pattern.attribution", times_weight=True, source=net)


@register_method("signal.filter")
def signal_filter(net):
    """The filter-based estimator S_w as a signal method: the pattern sweep with A = W / ‖w_j‖² per unit."""
    folded = canonical(net)
    return _pattern_sweep(folded, {i: "filter" for i in folded.linear_layers()}, "signal.filter", source=net)


@register_method("attribution.filter")
def attribution_filter(net):
    """w ⊙ S_w(x): the sweep with W ⊙ W / ‖w_j‖² (DTD's w² rule through the forward ReLU masks)."""
    folded = canonical(net)
    return _pattern_sweep(folded, {i: "filter" for i in folded.linear_layers()}, "attribution.filter",
                          times_weight=True, source=net)


class _SignalIdentity:
    """S_x(x) = x: the input itself, whatever the target (which is still validated)."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x, target, backend, return_layers=False):
        if return_layers:
            raise ValueError("signal.identity: return_layers=True is supported by the relevance methods only")
        if isinstance(target, Unit):
            target.resolve(self.net, x.shape)
        elif target is not None:
            resolve_target(array_namespace(x).zeros(self.net.shapes(x.shape)[-1], dtype=x.dtype), target)
        return array_namespace(x).array(x, copy=True)


@register_method("signal.identity")
def signal_identity(net):
    """The identity estimator S_x(x) = x as a signal method: the input itself (a baseline for comparisons)."""
    return _SignalIdentity(net)


@register_method("attribution.identity")
def attribution_identity(net):
    """w ⊙ S_x(x) generalised: x ⊙ ∇f_c(x) (gradient × input; LRP-0 on bias-free ReLU nets)."""
    return gradient_sweep(net, times_input=True, name="attribution.identity")
