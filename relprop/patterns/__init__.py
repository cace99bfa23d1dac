r"""PatternNet and PatternAttribution [Kindermans2018]_: statistics, estimators, methods, quality.

A linear neuron :math:`y = w^T x` sees :math:`x = s + d`: the signal :math:`s = a_s y` and a
distractor d with :math:`w^T d = 0`.  The weight w has to cancel d, so w shows where the
distractor is, not where the signal is; the *pattern* :math:`a_s` is the signal direction, and
it is learned from data (docs/conventions.md, "PatternNet and PatternAttribution").

Estimators of the signal, per dense/conv layer and output unit j (x is the layer's input,
for a convolution the input patch of one output position):

- S_x (identity): :math:`S(x) = x`; S_w (filter): :math:`S(x) = w\,w^T x / (w^T w)`, i.e. the
  pattern :func:`filter_pattern` :math:`a = w / (w^T w)`;
- S_a (linear), :func:`linear_pattern`: :math:`a = \mathrm{cov}[x, y] / (w^T \mathrm{cov}[x, y])`;
- S_a+- (two-component), :func:`two_component_patterns`: :math:`a_+` and :math:`a_-` as S_a over
  the samples of each regime of the unit, :math:`z_j = w^T x + b > 0` (the ReLU gate) and
  :math:`z_j \le 0`, with the mean of y over *all* samples, E[y], in the covariance (the
  paper's Eq. 8, its reference code and iNNvestigate: the default, ``mean_y="all"``) or, with
  ``mean_y="regime"``, each regime's own mean E_±[y] (an option; it breaks Eq. 2).

Everything comes from sums over a dataset (:class:`PatternStats`, accumulated in float64 by
the ``patterns`` kernels, mergeable across chunks); :func:`fit_patterns` streams a dataset
once and returns :class:`Patterns`.

Methods registered with :func:`relprop.methods.register_method` (all sweeps start from the
target logit, R_c = f_c(x); ReLUs gate by the forward mask; max-pool routes through the
switches; each dense/conv layer's transposed pass uses the matrix below instead of W):

=======================  ==================================  ===================================
method                   layer matrix                        linear model y = wᵀx gives
=======================  ==================================  ===================================
``pattern.net``          A (a₊ behind a ReLU, a elsewhere)   S_a(x) = a y          (the signal)
``pattern.attribution``  W ⊙ A                               w ⊙ a y
``signal.filter``        W / ‖w_j‖²  (S_w)                   S_w(x) = w y / wᵀw
``attribution.filter``   W ⊙ W / ‖w_j‖²                      w ⊙ w y / wᵀw  (DTD's w² rule)
``signal.identity``      (none: returns x)                   S_x(x) = x
``attribution.identity`` x ⊙ ∇f_c (one-hot start)            w ⊙ x   (= gradient × input)
=======================  ==================================  ===================================

so for every estimator S the signal method estimates S(x) and the attribution method
w ⊙ S(x) on a linear model, and the estimators can be compared side by side.  With
``estimator="linear"`` the pattern methods use the linear pattern a in every layer.

:func:`relprop.metrics.signal_quality` measures :math:`\rho(S) = 1 - \max_v \mathrm{corr}(v^T (x - S(x)), y)`
per layer on held-out data (also importable from here).

References
----------
.. [Kindermans2018] P.-J. Kindermans, K. T. Schütt, M. Alber, K.-R. Müller, D. Erhan, B. Kim,
   S. Dähne. Learning how to explain neural networks: PatternNet and PatternAttribution. ICLR 2018.
"""
from __future__ import annotations

from .estimators import filter_pattern, linear_pattern, two_component_patterns
from .fitting import LayerPatterns, Patterns, fit_patterns, load_patterns
from .methods import _host64, _relu_follows  # noqa: F401  (used by relprop.metrics and the tests)
from .methods import (attribution_filter, attribution_identity, pattern_attribution, pattern_net, signal_filter,
                      signal_identity)
from .stats import LayerStats, PatternStats, PatternWarning

__all__ = [
    "PatternStats", "LayerStats", "Patterns", "LayerPatterns", "PatternWarning",
    "fit_patterns", "load_patterns", "linear_pattern", "two_component_patterns", "filter_pattern",
    "pattern_net", "pattern_attribution", "signal_filter", "attribution_filter", "signal_identity",
    "attribution_identity",
]


# ----------------------------------------------------------------------------------------------
# quality of the signal estimators: hosted by relprop.metrics, beside the other metrics
# ----------------------------------------------------------------------------------------------
def __getattr__(name):
    if name in ("signal_quality", "SignalQuality", "ESTIMATOR_NAMES"):
        from .. import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
