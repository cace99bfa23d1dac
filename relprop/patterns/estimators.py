"""Signal estimators from pattern statistics: the linear S_a, the two-component S_a+-, the filter S_w."""
from __future__ import annotations

import warnings

import numpy as np

from .._backend import array_namespace, to_numpy
from .stats import _MEAN_Y, _ZERO_ULPS, PatternWarning

# ----------------------------------------------------------------------------------------------
# estimators
# ----------------------------------------------------------------------------------------------
class _collect_warnings:
    """Gather zero-denominator reports and emit one PatternWarning per (layer, regime)."""

    def __enter__(self):
        self.items = []
        return self.items

    def __exit__(self, *exc):
        for where, regime, units in self.items:
            shown = ", ".join(str(int(u)) for u in units[:12]) + (", ..." if len(units) > 12 else "")
            warnings.warn(
                f"{where}: {regime} pattern of {len(units)} unit(s) [{shown}] has a zero denominator "
                f"(no samples in the regime, or wᵀcov[x, y] = 0); set to zero", PatternWarning, stacklevel=3,
            )
        return False


def _emit(report, items):
    if report is None:
        with _collect_warnings() as r:
            r.extend(items)
    else:
        report.extend(items)


def _regime_pattern(stats, w, regime, mean_y):
    r"""a = cov_r[x, y] / (wᵀ cov_r[x, y]) per unit over regime r; returns (a (J, I), bad units mask)."""
    xp = array_namespace(stats.sum_xy)
    j = stats.n_units
    w = xp.asarray(to_numpy(w) if xp is np else w, dtype=np.float64).reshape(j, -1)
    n, sx, sy, sxy = stats.regime(regime)
    has = n > 0
    n_safe = xp.where(has, n, 1.0)[:, None]
    ex, exy = sx / n_safe, sxy / n_safe                      # E_r[x], E_r[x y]
    if mean_y == "all" and float(stats.count) > 0:
        ey = xp.broadcast_to(stats.sum_y[0] / float(stats.count), (j,))   # E[y] over all samples
    else:
        ey = sy / n_safe[:, 0]                                # E_r[y]
    cov = exy - ex * ey[:, None]                             # cov_r[x, y]
    den = (w * cov).sum(axis=1)                              # wᵀ cov_r[x, y]
    # the magnitude of what cancels in den: |den| below a few ulps of it is rounding, not signal.
    # The negative regime's sums are differences (all − positive): their rounding is relative
    # to the sums they came from, so those set the magnitude (else a regime whose sums are
    # exactly zero in one backend and rounding noise in another gets a pattern of noise / noise)
    mag_x, mag_xy, mag_y = xp.abs(ex), xp.abs(exy), xp.abs(ey)
    if regime == "negative":
        _, sx_all, sy_all, sxy_all = stats.regime("all")
        _, sx_pos, sy_pos, sxy_pos = stats.regime("positive")
        mag_x = (xp.abs(sx_all) + xp.abs(sx_pos)) / n_safe
        mag_xy = (xp.abs(sxy_all) + xp.abs(sxy_pos)) / n_safe
        if mean_y != "all":
            mag_y = (xp.abs(sy_all) + xp.abs(sy_pos)) / n_safe[:, 0]
    scale = (xp.abs(w) * (mag_xy + mag_x * mag_y[:, None])).sum(axis=1)
    tol = _ZERO_ULPS * np.finfo(np.dtype(stats.dtype)).eps
    ok = has & (xp.abs(den) > tol * scale)
    a = xp.where(ok[:, None], cov / xp.where(ok, den, 1.0)[:, None], 0.0)
    return a, ~ok


def _bad_units(bad):
    return [int(u) for u in np.flatnonzero(to_numpy(bad))]


def linear_pattern(stats, w, _report=None):
    r"""S_a: :math:`a = \mathrm{cov}[x, y] / (w^T \mathrm{cov}[x, y])` per unit, shaped like ``w``.

    ``stats`` is a :class:`LayerStats`, ``w`` the layer's weight (J, ...).  Since y = wᵀx the
    denominator is var[y]; a unit with var[y] = 0 gets a zero pattern and a :class:`PatternWarning`.
    """
    a, bad = _regime_pattern(stats, w, "all", "regime")
    units = _bad_units(bad)
    if units:
        _emit(_report, [(stats.where, "linear", units)])
    return a.reshape(stats.weight_shape)


def two_component_patterns(stats, w, mean_y="all", _report=None):
    r"""S_a+-: :math:`(a_+, a_-)`, each shaped like ``w``.

    .. math:: a_\pm = \frac{E_\pm[x y] - E_\pm[x]\,\bar y}{w^T E_\pm[x y] - w^T E_\pm[x]\,\bar y},
              \qquad \bar y = E_\pm[y] \;(\texttt{mean\_y="regime"}) \text{ or } E[y] \;(\texttt{"all"})

    over the samples with :math:`z_j = w^T x + b > 0` (+) and :math:`z_j \le 0` (−).  Units
    without samples in a regime, or with a zero denominator, get zeros and a :class:`PatternWarning`.
    """
    if mean_y not in _MEAN_Y:
        raise ValueError(f"mean_y={mean_y!r} is invalid; expected 'all' (E[y], the paper's Eq. 8) or 'regime'")
    a_plus, bad_plus = _regime_pattern(stats, w, "positive", mean_y)
    a_minus, bad_minus = _regime_pattern(stats, w, "negative", mean_y)
    items = [(stats.where, name, _bad_units(bad)) for name, bad in (("positive", bad_plus), ("negative", bad_minus))]
    items = [it for it in items if it[2]]
    if items:
        _emit(_report, items)
    return a_plus.reshape(stats.weight_shape), a_minus.reshape(stats.weight_shape)


def filter_pattern(w):
    r"""S_w: :math:`a = w / (w^T w)` per unit (so :math:`S_w(x) = a\,w^T x`), shaped like ``w``; zero rows stay zero."""
    xp = array_namespace(w)
    w = xp.asarray(w, dtype=np.float64)
    flat = w.reshape(w.shape[0], -1)
    norm2 = (flat * flat).sum(axis=1)
    return (flat / xp.where(norm2 > 0, norm2, 1.0)[:, None]).reshape(w.shape)
