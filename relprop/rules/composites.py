r"""Composites: which rule each layer of a net gets (docs/conventions.md, "Composites").

A :class:`Composite` is an ordered list of ``(layer kinds, rule)`` pairs, the first
match winning (Zennit), plus an optional rule for the *first* layer of some kinds
("first" = first in model order).  Dense layers have kind ``"linear"``, convolutions
``"conv2d"``.  Only dense/conv layers are assigned by a composite; the other layers follow
the layer rules of docs/conventions.md in every composite: a ReLU passes relevance, max-pool sends
it to the switch, flatten reshapes, average and sum pooling use the ε rule with
ε = the stabiliser (proportional).

A batch norm right after a dense/conv layer is folded into it before the rules are
assigned (:func:`relprop.nets.canonical`); a batch norm with no dense/conv layer right
before it is a per-channel linear layer and gets the composite's rule for dense
(``"linear"``) layers.  A residual add and the average poolings split relevance in
proportion to their inputs (:class:`~relprop.rules.core.Norm`), a concat slices it back.

A plain ``{layer_index: rule}`` dict (the index being the position in ``net.layers``)
assigns rules by hand; it must cover every dense/conv layer (a standalone batch norm it
does not name gets :class:`~relprop.rules.core.Norm`'s proportional ε rule).  It may also
put a signal rule (:class:`~relprop.rules.signal.Gradient`, ...) on any layer, or an ε rule
on a pooling layer or an add.

Presets (functions returning a :class:`Composite`):

==========================  ======================================================================
``epsilon_plus_flat``        flat on the first dense/conv layer, z⁺ on the other convs, ε on dense
``epsilon_gamma_box(l, h)``  z^B on the first conv (none without convs), γ on other convs, ε on dense
``epsilon_alpha2_beta1``     α2β1 on convs, ε on dense
``dtd_box(l, h)``            z^B on the first dense/conv layer, z⁺ (ignore_bias) elsewhere
``dtd_wsquare``              w² on the first dense/conv layer, z⁺ (ignore_bias) elsewhere
==========================  ======================================================================
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import _config
from .core import LINEAR_KINDS, Norm, Pass, Rule, check_real
from .lrp import AlphaBeta, Epsilon, Flat, Gamma, WSquare, ZBox, ZPlus
from .signal import Gradient

__all__ = ["Composite", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1", "dtd_box",
           "dtd_wsquare", "resolve_rules"]


def _kinds(kinds):
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in LINEAR_KINDS]
    if bad:
        raise ValueError(f"Composite: layer kinds {bad} are invalid; composites assign rules to {LINEAR_KINDS}")
    return kinds


def _rule(rule):
    if not isinstance(rule, Rule):
        raise TypeError(f"expected a relprop.rules rule, got {type(rule).__name__}")
    return rule


@dataclass(frozen=True, eq=False)
class Composite:
    """Rules by layer kind (first match wins) and a rule for the first layer of some kinds.

    Parameters
    ----------
    layer_map : sequence of (kinds, Rule)
        ``kinds`` is ``"linear"`` (dense), ``"conv2d"`` or a tuple of them.
    first : (kinds, Rule) or None
        The rule of the first layer (in model order) whose kind is in ``kinds``; none if
        the net has no such layer.
    name : str

    Examples
    --------
    >>> Composite([(("conv2d",), ZPlus()), (("linear",), Epsilon(0.1))], first=(("conv2d", "linear"), Flat()))
    ... # doctest: +SKIP
    """

    layer_map: tuple
    first: tuple | None = None
    name: str = "composite"

    def __post_init__(self):
        object.__setattr__(self, "layer_map", tuple((_kinds(k), _rule(r)) for k, r in self.layer_map))
        if self.first is not None:
            kinds, rule = self.first
            object.__setattr__(self, "first", (_kinds(kinds), _rule(rule)))

    def assign(self, net):
        """``{layer_index: rule}`` for the dense/conv layers this composite covers."""
        out = {}
        if self.first is not None:
            kinds, rule = self.first
            hit = next((i for i, layer in enumerate(net.layers) if layer.kind in kinds), None)
            if hit is not None:
                out[hit] = rule
        for i, layer in enumerate(net.layers):
            if i in out or not layer.parametric:
                continue
            kind = layer.kind if layer.is_linear else "linear"  # a standalone batch norm: a dense layer's rule
            for kinds, rule in self.layer_map:
                if kind in kinds:
                    out[i] = rule
                    break
        return out

    def __repr__(self):
        return f"Composite({self.name!r})"


def resolve_rules(net, assignment, stabilizer=_config.DEFAULT_STABILIZER):
    """One rule per layer of ``net``: ``assignment`` (a Composite or ``{index: rule}``) for the
    dense/conv layers, docs/conventions.md's layer rules elsewhere.

    Raises
    ------
    ValueError
        If a dense/conv layer is not covered (listing them all), an index is out of range,
        or a rule does not apply to its layer's kind.
    """
    stabilizer = check_real("relevance method", "stabilizer", stabilizer, minimum=0, strict=True)
    if isinstance(assignment, Composite):
        assignment = assignment.assign(net)
    n = len(net.layers)
    for key, rule in assignment.items():
        if isinstance(key, bool) or not isinstance(key, int) or not -n <= key < n:
            raise ValueError(f"rule assignment: key {key!r} is not a layer index of this net (0..{n - 1})")
        _rule(rule)
    assignment = {k % n: r for k, r in assignment.items()}
    missing = [f"{i} ({layer.kind})" for i, layer in enumerate(net.layers) if layer.is_linear and i not in assignment]
    if missing:
        raise ValueError(f"no rule for the dense/conv layer(s) {', '.join(missing)}; every dense/conv layer needs one")
    norm = Norm(stabilizer)
    defaults = {"relu": Pass(), "identity": Pass(), "dropout": Pass(), "maxpool2d": Gradient(),
                "flatten": Gradient(), "concat": Gradient(), "avgpool2d": norm, "adaptive_avgpool2d": norm,
                "sumpool": norm, "add": norm, "batchnorm2d": Epsilon(stabilizer), "batchnorm1d": Epsilon(stabilizer)}
    rules = [assignment[i] if i in assignment else defaults[layer.kind] for i, layer in enumerate(net.layers)]
    for layer, rule in zip(net.layers, rules):
        rule.check_layer(layer)
    return rules


def epsilon_plus_flat(epsilon=_config.DEFAULT_EPSILON, stabilizer=_config.DEFAULT_STABILIZER):
    """Flat on the first dense/conv layer, z⁺ on the other convs, ε on the other dense layers."""
    return Composite([("conv2d", ZPlus(stabilizer)), ("linear", Epsilon(epsilon))],
                     first=(LINEAR_KINDS, Flat(stabilizer)), name="epsilon_plus_flat")


def epsilon_gamma_box(low, high, gamma=0.25, epsilon=_config.DEFAULT_EPSILON, stabilizer=_config.DEFAULT_STABILIZER):
    """z^B(low, high) on the first conv (none for a net without convs), γ on the other convs, ε on dense."""
    return Composite([("conv2d", Gamma(gamma, stabilizer)), ("linear", Epsilon(epsilon))],
                     first=(("conv2d",), ZBox(low, high, stabilizer)), name="epsilon_gamma_box")


def epsilon_alpha2_beta1(epsilon=_config.DEFAULT_EPSILON, stabilizer=_config.DEFAULT_STABILIZER):
    """α2β1 on convs, ε on dense layers."""
    return Composite([("conv2d", AlphaBeta(2, 1, stabilizer)), ("linear", Epsilon(epsilon))],
                     name="epsilon_alpha2_beta1")


def dtd_box(low, high, stabilizer=_config.DEFAULT_STABILIZER):
    """Deep Taylor: z^B(low, high) on the first dense/conv layer, z⁺ without bias elsewhere."""
    return Composite([(LINEAR_KINDS, ZPlus(stabilizer, ignore_bias=True))],
                     first=(LINEAR_KINDS, ZBox(low, high, stabilizer)), name="dtd_box")


def dtd_wsquare(stabilizer=_config.DEFAULT_STABILIZER):
    """Deep Taylor: w² on the first dense/conv layer, z⁺ without bias elsewhere."""
    return Composite([(LINEAR_KINDS, ZPlus(stabilizer, ignore_bias=True))],
                     first=(LINEAR_KINDS, WSquare(stabilizer)), name="dtd_wsquare")

