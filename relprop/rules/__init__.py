"""Relevance rules, composites and the signal methods (LRP, deep Taylor, DeconvNet, Guided Backprop).

Importing this package registers the methods with :func:`relprop.methods.register_method`:

- signals (start from the one-hot of the target): ``gradient``, ``gradient_x_input``, ``deconvnet``,
  ``guided_backprop``;
- one rule on every dense/conv layer: ``lrp.zero``, ``lrp.epsilon`` (``epsilon=``),
  ``lrp.gamma`` (``gamma=``), ``lrp.alpha_beta`` (``alpha=``, ``beta=``), ``lrp.zplus``
  (``ignore_bias=``), ``lrp.flat``, ``lrp.wsquare``, ``dtd.zplus`` (z⁺ without bias);
- composites: ``lrp.epsilon_plus_flat``, ``lrp.epsilon_gamma_box`` (``low=``, ``high=``,
  ``gamma=``), ``lrp.epsilon_alpha2_beta1``, ``dtd.box`` (``low=``, ``high=``), ``dtd.wsquare``;
- ``method=`` a :class:`Composite`, a ``{layer_index: rule}`` dict or a single rule.

Every relevance method takes ``output="logit"`` (start from R_c = f_c(x), the default)
or ``"onehot"``, and ``stabilizer=`` (the ε of stab() in every rule except ε, and of
the average/sum-pooling layers; default 1e-6).  ``return_layers=True`` makes a call
return ``(R, per_layer)`` with ``per_layer[i]`` the relevance at the input of layer i
and ``per_layer[-1]`` the start signal.
"""
from __future__ import annotations

from .. import _config
from ..engine import Sweep
from ..methods import METHOD_RESOLVERS, register_method
from ..nets import canonical
from .composites import (Composite, dtd_box, dtd_wsquare, epsilon_alpha2_beta1, epsilon_gamma_box, epsilon_plus_flat,
                         resolve_rules)
from .core import Group, LinearRule, Norm, Pass, Rule, Term
from .lrp import AlphaBeta, Epsilon, Flat, Gamma, WSquare, ZBox, ZPlus, Zero
from .signal import DeconvNet, Gradient, GuidedBackprop, Pattern, gradient_sweep

__all__ = ["Rule", "LinearRule", "Term", "Group", "Pass", "Norm",
           "Epsilon", "Zero", "Gamma", "AlphaBeta", "ZPlus", "ZBox", "WSquare", "Flat",
           "Gradient", "DeconvNet", "GuidedBackprop", "Pattern",
           "Composite", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1", "dtd_box", "dtd_wsquare",
           "resolve_rules"]

_STAB = _config.DEFAULT_STABILIZER
_EPS = _config.DEFAULT_EPSILON


def _sweep(net, assignment, output, stabilizer, name="relevance"):
    """A relevance sweep on the canonical net (batch norms folded into the dense/conv layer before them)."""
    folded = canonical(net)
    return Sweep(folded, resolve_rules(folded, assignment, stabilizer), start=output, name=name, source=net)


def _everywhere(net, rule):
    return {i: rule for i in net.linear_layers()}


def _box(name, low, high):
    if low is None or high is None:
        raise ValueError(f"method {name!r} needs low= and high=, the input box (scalars or per-channel arrays)")
    return low, high


# -- signals ----------------------------------------------------------------------------------------------
@register_method("gradient")
def gradient(net):
    """∂f_c/∂x (Simonyan et al. 2013): ReLU passes g·1[z > 0], max-pool routes g to the switch, Wᵀg."""
    return gradient_sweep(net)


@register_method("gradient_x_input")
def gradient_x_input(net):
    """x ⊙ ∂f_c/∂x (Shrikumar et al. 2016)."""
    return gradient_sweep(net, times_input=True, name="gradient_x_input")


@register_method("deconvnet")
def deconvnet(net):
    """DeconvNet (Zeiler & Fergus 2014): unpool through switches, ReLU passes max(g, 0), Wᵀg."""
    return gradient_sweep(net, "deconvnet", name="deconvnet")


@register_method("guided_backprop")
def guided_backprop(net):
    """Guided Backprop (Springenberg et al. 2014): ReLU passes max(g, 0)·1[z > 0]."""
    return gradient_sweep(net, "guided", name="guided_backprop")


# -- one rule everywhere ----------------------------------------------------------------------------------
@register_method("lrp.zero")
def lrp_zero(net, output="logit", stabilizer=_STAB):
    """LRP-0 on every dense/conv layer."""
    return _sweep(net, _everywhere(net, Zero()), output, stabilizer)


@register_method("lrp.epsilon")
def lrp_epsilon(net, epsilon=_EPS, output="logit", stabilizer=_STAB):
    """LRP-ε on every dense/conv layer."""
    return _sweep(net, _everywhere(net, Epsilon(epsilon)), output, stabilizer)


@register_method("lrp.gamma")
def lrp_gamma(net, gamma=0.25, output="logit", stabilizer=_STAB):
    """LRP-γ on every dense/conv layer."""
    return _sweep(net, _everywhere(net, Gamma(gamma, stabilizer)), output, stabilizer)


@register_method("lrp.alpha_beta")
def lrp_alpha_beta(net, alpha=2.0, beta=1.0, output="logit", stabilizer=_STAB):
    """LRP-αβ (α − β = 1) on every dense/conv layer."""
    return _sweep(net, _everywhere(net, AlphaBeta(alpha, beta, stabilizer)), output, stabilizer)


@register_method("lrp.zplus")
def lrp_zplus(net, ignore_bias=False, output="logit", stabilizer=_STAB):
    """z⁺ on every dense/conv layer (b⁺ kept unless ignore_bias=True)."""
    return _sweep(net, _everywhere(net, ZPlus(stabilizer, ignore_bias)), output, stabilizer)


@register_method("dtd.zplus")
def dtd_zplus(net, output="logit", stabilizer=_STAB):
    """Deep Taylor z⁺ (bias ignored) on every dense/conv layer."""
    return _sweep(net, _everywhere(net, ZPlus(stabilizer, ignore_bias=True)), output, stabilizer)


@register_method("lrp.flat")
def lrp_flat(net, output="logit", stabilizer=_STAB):
    """Flat on every dense/conv layer."""
    return _sweep(net, _everywhere(net, Flat(stabilizer)), output, stabilizer)


@register_method("lrp.wsquare")
def lrp_wsquare(net, output="logit", stabilizer=_STAB):
    """w² on every dense/conv layer."""
    return _sweep(net, _everywhere(net, WSquare(stabilizer)), output, stabilizer)


# -- composites -------------------------------------------------------------------------------------------
@register_method("lrp.epsilon_plus_flat")
def lrp_epsilon_plus_flat(net, epsilon=_EPS, output="logit", stabilizer=_STAB):
    """Flat on the first dense/conv layer, z⁺ on the other convs, ε on the dense layers."""
    return _sweep(net, epsilon_plus_flat(epsilon, stabilizer), output, stabilizer)


@register_method("lrp.epsilon_gamma_box")
def lrp_epsilon_gamma_box(net, low=None, high=None, gamma=0.25, epsilon=_EPS, output="logit", stabilizer=_STAB):
    """z^B on the first conv, γ on the other convs, ε on the dense layers."""
    low, high = _box("lrp.epsilon_gamma_box", low, high)
    return _sweep(net, epsilon_gamma_box(low, high, gamma, epsilon, stabilizer), output, stabilizer)


@register_method("lrp.epsilon_alpha2_beta1")
def lrp_epsilon_alpha2_beta1(net, epsilon=_EPS, output="logit", stabilizer=_STAB):
    """α2β1 on the convs, ε on the dense layers."""
    return _sweep(net, epsilon_alpha2_beta1(epsilon, stabilizer), output, stabilizer)


@register_method("dtd.box")
def dtd_box_method(net, low=None, high=None, output="logit", stabilizer=_STAB):
    """Deep Taylor: z^B on the first dense/conv layer, z⁺ (bias ignored) elsewhere."""
    low, high = _box("dtd.box", low, high)
    return _sweep(net, dtd_box(low, high, stabilizer), output, stabilizer)


@register_method("dtd.wsquare")
def dtd_wsquare_method(net, output="logit", stabilizer=_STAB):
    """Deep Taylor: w² on the first dense/conv layer, z⁺ (bias ignored) elsewhere."""
    return _sweep(net, dtd_wsquare(stabilizer), output, stabilizer)


# -- composites, {layer: rule} dicts and single rules as ``method=`` ---------------------------------------
def _resolve(method):
    if isinstance(method, Composite):
        assignment = method
    elif isinstance(method, Rule):
        assignment = method
    elif isinstance(method, dict):
        assignment = dict(method)  # keys and values are validated against the net by resolve_rules
    else:
        return None

    def factory(net, output="logit", stabilizer=_STAB):
        chosen = _everywhere(net, assignment) if isinstance(assignment, Rule) else assignment
        return _sweep(net, chosen, output, stabilizer)

    return factory


METHOD_RESOLVERS.append(_resolve)
