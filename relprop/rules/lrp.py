r"""LRP and Deep Taylor rules for dense and conv layers, each a few lines of data over
:func:`relprop.rules.core.relevance`.

Notation (docs/conventions.md): inputs :math:`a_i`, weights :math:`w_{ij}`, bias :math:`b_j`,
contributions :math:`z_{ij} = a_i w_{ij}`, pre-activation :math:`z_j = \sum_i z_{ij} + b_j`,
upper relevance :math:`R_j`, lower relevance :math:`R_i`, :math:`x^+ = \max(x, 0)`,
:math:`x^- = \min(x, 0)`, :math:`\mathrm{stab}(z) = z + \epsilon\,\mathrm{sign}_0(z)` with
:math:`\mathrm{sign}_0(0) = +1`.  For a convolution, i runs over the receptive field of
output position j and the weights are shared.

Every rule is a frozen dataclass validated at construction: a bad parameter raises
:class:`ValueError` naming it.  ``stabilizer`` is the ε of stab() for every rule except
:class:`Epsilon`, whose ε is its ``epsilon``; it must be > 0 (default 1e-6).

References
----------
.. [Bach2015] S. Bach, A. Binder, G. Montavon, F. Klauschen, K.-R. Müller, W. Samek. On pixel-wise explanations
   for non-linear classifier decisions by layer-wise relevance propagation. PLoS ONE 10(7), 2015.
.. [Montavon2017] G. Montavon, S. Lapuschkin, A. Binder, W. Samek, K.-R. Müller. Explaining nonlinear
   classification decisions with deep Taylor decomposition. Pattern Recognition 65, 2017.
.. [Montavon2019] G. Montavon, A. Binder, S. Lapuschkin, W. Samek, K.-R. Müller. Layer-wise relevance
   propagation: an overview. In Explainable AI, LNCS 11700, 2019.
.. [Lapuschkin2019] S. Lapuschkin, S. Wäldchen, A. Binder, G. Montavon, W. Samek, K.-R. Müller. Unmasking
   Clever Hans predictors and assessing what machines really learn. Nature Communications 10, 2019.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import _config
from .core import (PARAMETRIC_KINDS, PROPORTIONAL_KINDS, GammaMod, Group, LinearRule, Term, check_real, keep, negative,
                   ones, positive, square)

__all__ = ["Epsilon", "Zero", "Gamma", "AlphaBeta", "ZPlus", "ZBox", "WSquare", "Flat"]


def _stabilizer(rule, value):
    return check_real(type(rule).__name__, "stabilizer", value, minimum=0, strict=True)


@dataclass(frozen=True)
class Epsilon(LinearRule):
    r"""LRP-ε (LRP-0 for ε = 0) [Bach2015]_.

    .. math:: R_i = \sum_j \frac{z_{ij}}{\mathrm{stab}(z_j)} R_j
              = a_i \sum_j w_{ij} \frac{R_j}{z_j + \epsilon\,\mathrm{sign}_0(z_j)}

    The bias is part of :math:`z_j`, which is the pre-activation recorded by the forward
    pass (never recomputed).  With ε = 0 a zero :math:`z_j` contributes 0, never NaN/Inf.
    On average and sum pooling (weights 1/n and 1) this is the proportional rule.

    Parameters
    ----------
    epsilon : float, default 1e-6
        ε ≥ 0.  Large values absorb relevance and keep only the strongest paths.

    Raises
    ------
    ValueError
        If epsilon is negative or not finite.
    """

    epsilon: float = _config.DEFAULT_EPSILON
    kinds = PARAMETRIC_KINDS + PROPORTIONAL_KINDS

    def __post_init__(self):
        object.__setattr__(self, "epsilon", check_real(type(self).__name__, "epsilon", self.epsilon, minimum=0))

    @property
    def eps(self):
        return self.epsilon

    @property
    def groups(self):
        return (Group((Term(),)),)


@dataclass(frozen=True)
class Zero(Epsilon):
    r"""LRP-0 [Bach2015]_: :class:`Epsilon` with ε = 0,
    :math:`R_i = \sum_j \frac{z_{ij}}{z_j} R_j` (a zero :math:`z_j` contributes 0)."""

    epsilon: float = field(default=0.0, init=False)


@dataclass(frozen=True)
class Gamma(LinearRule):
    r"""LRP-γ, sign-aware as Zennit [Montavon2019]_.

    Where the original :math:`z_j > 0`, positive contributions are boosted:

    .. math:: R_i = \sum_j \frac{z_{ij} + \gamma z_{ij}^+}
              {\mathrm{stab}\left(\sum_{i'} (z_{i'j} + \gamma z_{i'j}^+) + b_j + \gamma b_j^+\right)} R_j

    i.e. :math:`w + \gamma w^+` for positive inputs, :math:`w + \gamma w^-` for negative
    ones; where :math:`z_j < 0` the roles of :math:`w^+` and :math:`w^-` swap
    (:math:`z_{ij} + \gamma z_{ij}^-`, :math:`b_j + \gamma b_j^-`); :math:`z_j = 0` sends
    nothing down.  For :math:`a \ge 0` and :math:`z_j > 0` this is :math:`w \to w + \gamma w^+`.

    Parameters
    ----------
    gamma : float, default 0.25
        γ ≥ 0 (γ = 0 is LRP-0 with the stabiliser).
    stabilizer : float, default 1e-6

    Raises
    ------
    ValueError
        If gamma < 0 or stabilizer <= 0.
    """

    gamma: float = 0.25
    stabilizer: float = _config.DEFAULT_STABILIZER

    def __post_init__(self):
        object.__setattr__(self, "gamma", check_real("Gamma", "gamma", self.gamma, minimum=0))
        object.__setattr__(self, "stabilizer", _stabilizer(self, self.stabilizer))

    @property
    def groups(self):
        up, down = GammaMod(self.gamma, positive), GammaMod(self.gamma, negative)
        return (
            Group((Term("pos", up, up), Term("neg", down, None)), where="positive"),
            Group((Term("pos", down, down), Term("neg", up, None)), where="negative"),
        )


@dataclass(frozen=True)
class AlphaBeta(LinearRule):
    r"""LRP-αβ with α − β = 1 [Bach2015]_.

    .. math:: R_i = \sum_j \left(\alpha \frac{z_{ij}^+}{\mathrm{stab}(z_j^+)}
              - \beta \frac{z_{ij}^-}{\mathrm{stab}(z_j^-)}\right) R_j,
              \qquad z_j^\pm = \sum_i z_{ij}^\pm + b_j^\pm

    with :math:`z_{ij}^+ = a_i^+ w_{ij}^+ + a_i^- w_{ij}^-` for signed inputs (likewise
    :math:`z_{ij}^-`).  Each half takes only its own part of the bias (Bach 2015, Zennit,
    the LRP Toolbox), never the full b in both.  A zero :math:`z_j^\pm` contributes zero.
    Convention: α − β = 1 (Zennit); the LRP Toolbox writes ``beta = 1 - alpha``, which
    flips the sign of β.

    Parameters
    ----------
    alpha : float, default 2
    beta : float, default 1
        β ≥ 0 and α − β = 1 (so α ≥ 1).  ``AlphaBeta(1, 0)`` is :class:`ZPlus`.
    stabilizer : float, default 1e-6

    Raises
    ------
    ValueError
        If alpha - beta != 1, beta < 0 or stabilizer <= 0.
    """

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = _config.DEFAULT_STABILIZER

    def __post_init__(self):
        alpha = check_real("AlphaBeta", "alpha", self.alpha)
        beta = check_real("AlphaBeta", "beta", self.beta, minimum=0)
        if abs(alpha - beta - 1) > 1e-12:
            raise ValueError(f"AlphaBeta: alpha={self.alpha!r}, beta={self.beta!r} is invalid; expected alpha - beta "
                             "== 1 (relprop's convention; the LRP Toolbox's beta = 1 - alpha is -beta here)")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "stabilizer", _stabilizer(self, self.stabilizer))

    @property
    def groups(self):
        return (
            Group((Term("pos", positive, positive), Term("neg", negative, None)), weight=self.alpha),
            Group((Term("pos", negative, negative), Term("neg", positive, None)), weight=-self.beta),
        )


@dataclass(frozen=True)
class ZPlus(LinearRule):
    r"""z⁺ rule of deep Taylor decomposition, = ``AlphaBeta(1, 0)`` [Montavon2017]_ [Bach2015]_.

    .. math:: R_i = \sum_j \frac{z_{ij}^+}{\mathrm{stab}\left(\sum_{i'} z_{i'j}^+ + b_j^+\right)} R_j,
              \qquad z_{ij}^+ = a_i^+ w_{ij}^+ + a_i^- w_{ij}^-

    Convention: :math:`b^+` is kept (Bach 2015, Zennit, the LRP Toolbox);
    ``ignore_bias=True`` drops it (the DTD seed, iNNvestigate), which is the same
    whenever b ≤ 0 as the DTD derivation assumes.  Behind a ReLU (a ≥ 0) it costs one
    forward with :math:`W^+` and one transposed pass.

    Parameters
    ----------
    stabilizer : float, default 1e-6
    ignore_bias : bool, default False

    Raises
    ------
    ValueError
        If stabilizer <= 0 or ignore_bias is not a bool.
    """

    stabilizer: float = _config.DEFAULT_STABILIZER
    ignore_bias: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stabilizer", _stabilizer(self, self.stabilizer))
        if not isinstance(self.ignore_bias, (bool, np.bool_)):
            raise ValueError(f"ZPlus: ignore_bias={self.ignore_bias!r} is invalid; expected True or False")

    @property
    def groups(self):
        return (Group((Term("pos", positive, None if self.ignore_bias else positive), Term("neg", negative, None))),)


def _bound(name, value):
    from .._backend import is_cupy_array, to_numpy

    if is_cupy_array(value):  # bounds are rule constants: held on the host, moved per namespace when used
        value = to_numpy(value)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"ZBox: {name}={value!r} is invalid; expected a real scalar or array") from None
    if not np.isfinite(arr).all():
        raise ValueError(f"ZBox: {name} contains NaN or Inf")
    return arr


@dataclass(frozen=True, eq=False)
class ZBox(LinearRule):
    r"""z^B rule of deep Taylor decomposition for inputs in a box :math:`l \le a \le h` [Montavon2017]_.

    .. math:: R_i = \sum_j \frac{a_i w_{ij} - l_i w_{ij}^+ - h_i w_{ij}^-}
              {\mathrm{stab}\left(\sum_{i'} a_{i'} w_{i'j} - l_{i'} w_{i'j}^+ - h_{i'} w_{i'j}^-\right)} R_j

    No bias term (Zennit's z^B keeps b in the first term and b⁺, b⁻ in the bound terms,
    which cancel).  Meant for the first layer; inside the box every numerator is ≥ 0, so
    the heatmap is positive where R ≥ 0.  Zero padding of a convolution pads a, l and h
    alike with 0.

    Parameters
    ----------
    low, high : float or array
        l and h: scalars or per-feature arrays broadcastable to one sample of the layer
        input, e.g. ``(1, C, 1, 1)`` or ``(C, 1, 1)`` per channel (the normalised pixel
        range); l ≤ h elementwise.
    stabilizer : float, default 1e-6

    Raises
    ------
    ValueError
        If a bound is not finite, low > high anywhere, the bounds do not broadcast
        together, or stabilizer <= 0.  A bound that does not broadcast to the layer
        input raises when the rule runs.
    """

    low: object
    high: object
    stabilizer: float = _config.DEFAULT_STABILIZER

    def __post_init__(self):
        low, high = _bound("low", self.low), _bound("high", self.high)
        try:
            np.broadcast_shapes(low.shape, high.shape)
        except ValueError:
            raise ValueError(f"ZBox: low {low.shape} and high {high.shape} do not broadcast together") from None
        if (low > high).any():
            raise ValueError("ZBox: low > high somewhere; expected low <= high elementwise")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "stabilizer", _stabilizer(self, self.stabilizer))

    @property
    def groups(self):
        return (Group((Term("a", keep, None), Term("low", positive, None, -1), Term("high", negative, None, -1))),)

    def __repr__(self):
        def show(v):
            return repr(float(v)) if v.ndim == 0 else f"array{v.shape}"

        return f"ZBox(low={show(self.low)}, high={show(self.high)}, stabilizer={self.stabilizer!r})"


@dataclass(frozen=True)
class WSquare(LinearRule):
    r"""w² rule of deep Taylor decomposition for unbounded inputs [Montavon2017]_.

    .. math:: R_i = \sum_j \frac{w_{ij}^2}{\mathrm{stab}\left(\sum_{i'} w_{i'j}^2\right)} R_j

    No bias term (the seed, iNNvestigate, the LRP Toolbox; Zennit adds b²), not
    multiplied by a.  The denominator counts only real inputs: it is the layer applied
    to an all-ones input with :math:`W^2`, so zero padding counts 0; it depends on no
    sample and is computed once per input shape.

    Parameters
    ----------
    stabilizer : float, default 1e-6

    Raises
    ------
    ValueError
        If stabilizer <= 0.
    """

    stabilizer: float = _config.DEFAULT_STABILIZER

    def __post_init__(self):
        object.__setattr__(self, "stabilizer", _stabilizer(self, self.stabilizer))

    @property
    def groups(self):
        return (Group((Term("ones", square, None),)),)


@dataclass(frozen=True)
class Flat(LinearRule):
    r"""Flat rule [Lapuschkin2019]_: w² with every weight set to 1.

    .. math:: R_i = \sum_j \frac{1}{\mathrm{stab}(n_j)} R_j, \qquad n_j = \text{number of real inputs of } j

    Bias dropped, not multiplied by a; zero padding does not count, so border outputs of
    a convolution have smaller denominators.

    Parameters
    ----------
    stabilizer : float, default 1e-6

    Raises
    ------
    ValueError
        If stabilizer <= 0.
    """

    stabilizer: float = _config.DEFAULT_STABILIZER

    def __post_init__(self):
        object.__setattr__(self, "stabilizer", _stabilizer(self, self.stabilizer))

    @property
    def groups(self):
        return (Group((Term("ones", ones, None),)),)
