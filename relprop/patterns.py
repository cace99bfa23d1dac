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

Methods registered with :func:`relprop.explain.register_method` (all sweeps start from the
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

:func:`signal_quality` measures :math:`\rho(S) = 1 - \max_v \mathrm{corr}(v^T (x - S(x)), y)`
per layer on held-out data (also re-exported as :func:`relprop.metrics.signal_quality`).

References
----------
.. [Kindermans2018] P.-J. Kindermans, K. T. Schütt, M. Alber, K.-R. Müller, D. Erhan, B. Kim,
   S. Dähne. Learning how to explain neural networks: PatternNet and PatternAttribution. ICLR 2018.
"""
from __future__ import annotations

import json
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ._backend import array_namespace, to_numpy
from .engine import Sweep, Unit
from .explain import gradient_sweep, register_method, resolve_target
from .kernels import _ops
from .nets import canonical

__all__ = [
    "PatternStats", "LayerStats", "Patterns", "LayerPatterns", "PatternWarning",
    "fit_patterns", "load_patterns", "linear_pattern", "two_component_patterns", "filter_pattern",
    "signal_quality", "SignalQuality",
]

_STATS_KEY = "__relprop_pattern_stats__"
_PATTERNS_KEY = "__relprop_patterns__"
_FORMAT_VERSION = 1
_ACC_NAMES = ("count", "sum_x", "count_pos", "sum_y", "sum_x_pos", "sum_xy")
_MEAN_Y = ("regime", "all")
_ESTIMATORS = ("two_component", "linear")
#: a denominator |wᵀcov| at or below this many ulps (of the data's dtype) of the magnitude
#: of the terms it cancels is treated as zero (no usable pattern)
_ZERO_ULPS = 256


class PatternWarning(RuntimeWarning):
    """A unit has no usable pattern (no samples in a regime, or wᵀcov[x, y] = 0): it is set to zero."""


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------
def _layer_signature(net):
    """{layer index: (kind, weight shape)} of every dense/conv layer of ``net``."""
    return {i: (net.layers[i].kind, tuple(int(s) for s in net.layers[i].weight.shape)) for i in net.linear_layers()}


def _check_signature(have, net, what):
    want = _layer_signature(net)
    if sorted(have) != sorted(want):
        raise ValueError(
            f"{what} were made for dense/conv layers {sorted(have)}, but the net has them at {sorted(want)}"
        )
    for i in sorted(want):
        if have[i][0] != want[i][0] or tuple(have[i][1]) != want[i][1]:
            raise ValueError(
                f"{what}: layer {i} was {have[i][0]} with weight shape {tuple(have[i][1])}, "
                f"but the net's layer {i} is {want[i][0]} with weight shape {want[i][1]}"
            )


@dataclass
class LayerStats:
    r"""The pattern sums of one dense/conv layer (float64; see :mod:`relprop.kernels.reference.patterns`).

    ``count`` (): samples n; ``sum_x`` (in_shape): Σx; ``count_pos`` (J,): n₊ per unit;
    ``sum_y`` (2, J): Σy, Σ₊y; ``sum_x_pos`` (J, *in_shape): Σ₊x; ``sum_xy`` (2, J, *in_shape):
    Σxy, Σ₊xy.  The other regime is all minus positive (:meth:`regime`).  A sample is an input
    row (dense) or an output position's input patch (conv), so ``in_shape`` is (I,) or (C, kh, kw).
    """

    index: int
    kind: str
    weight_shape: tuple
    count: object
    sum_x: object
    count_pos: object
    sum_y: object
    sum_x_pos: object
    sum_xy: object
    dtype: str = "float64"

    @classmethod
    def zeros(cls, index, kind, weight_shape, xp=np):
        weight_shape = tuple(int(s) for s in weight_shape)
        acc = _ops.pattern_accumulators(xp, weight_shape[0], weight_shape[1:])
        return cls(index, kind, weight_shape, *acc)

    @property
    def accumulators(self):
        return tuple(getattr(self, k) for k in _ACC_NAMES)

    @property
    def n_units(self):
        return self.weight_shape[0]

    @property
    def where(self):
        return f"layer {self.index} ({self.kind})"

    def regime(self, name):
        """(n (J,), Σx (J or 1, I), Σy (J,), Σxy (J, I)) over the regime "all", "positive" or "negative"."""
        xp = array_namespace(self.sum_xy)
        j = self.n_units
        sx_all = self.sum_x.reshape(1, -1)
        if name == "all":
            return xp.full((j,), float(self.count)), sx_all, self.sum_y[0], self.sum_xy[0].reshape(j, -1)
        n_pos, sx_pos = self.count_pos, self.sum_x_pos.reshape(j, -1)
        sy_pos, sxy_pos = self.sum_y[1], self.sum_xy[1].reshape(j, -1)
        if name == "positive":
            return n_pos, sx_pos, sy_pos, sxy_pos
        if name == "negative":
            return (float(self.count) - n_pos, sx_all - sx_pos, self.sum_y[0] - sy_pos,
                    self.sum_xy[0].reshape(j, -1) - sxy_pos)
        raise ValueError(f"regime={name!r} is invalid; expected 'all', 'positive' or 'negative'")

    def copy(self):
        xp = array_namespace(self.sum_xy)
        arrays = (xp.array(a, copy=True) for a in self.accumulators)
        return LayerStats(self.index, self.kind, self.weight_shape, *arrays, dtype=self.dtype)


class PatternStats:
    """Pattern sums for every dense/conv layer of a net, accumulated over batches.

    Parameters
    ----------
    net : relprop.nets.Sequential
        The net whose layers the statistics describe (needed by :meth:`update` and
        :meth:`patterns`; a loaded object may have ``net=None`` until one is attached).

    Notes
    -----
    Sums, not means: stats over disjoint parts of a dataset merged with :meth:`merge` are the
    stats over the whole (a tree reduction over chunks, e.g. on Dask, is just ``merge``).
    The accumulators live in the namespace of the first batch (NumPy or CuPy).

    Examples
    --------
    >>> stats = PatternStats(net)                      # doctest: +SKIP
    >>> for batch in loader: stats.update(batch)       # doctest: +SKIP
    >>> patterns = stats.patterns()                    # doctest: +SKIP
    """

    def __init__(self, net=None, layers=None, n_inputs=0, signature=None):
        self.net = net
        if signature is None:
            if net is None:
                raise ValueError("PatternStats needs a net (or the layer signature of a loaded file)")
            signature = _layer_signature(net)
        self._signature = {int(i): (k, tuple(s)) for i, (k, s) in signature.items()}
        self.layers = dict(layers) if layers is not None else {i: None for i in self._signature}
        self.n_inputs = int(n_inputs)        # net inputs (images) seen

    def __repr__(self):
        return f"PatternStats(layers={sorted(self.layers)}, n_inputs={self.n_inputs})"

    def __getitem__(self, i):
        s = self.layers[i]
        if s is None:
            raise ValueError(f"PatternStats: layer {i} has no data yet (call update first)")
        return s

    @property
    def empty(self):
        return self.n_inputs == 0 or any(s is None for s in self.layers.values())

    def check(self, net):
        """Raise ValueError unless the statistics were made for ``net``'s dense/conv layer shapes."""
        _check_signature(self._signature, net, "pattern statistics")

    def update(self, batch, backend=None):
        """Run the traced forward on ``batch`` and add its sums (in place); returns self."""
        net = self._require_net("update")
        net.check_input(batch, where="PatternStats.update")
        trace = net.trace(batch, backend, check=False)
        xp = array_namespace(batch)
        dtype = np.dtype(batch.dtype).name
        for i in self.layers:
            layer = net.layers[i]
            st = self.layers[i]
            if st is None:
                st = self.layers[i] = LayerStats.zeros(i, layer.kind, layer.weight.shape, xp)
            if dtype == "float32":
                st.dtype = "float32"          # the least precise data seen sets the zero tolerance
            x, z = trace.layer_input(i), trace.layer_output(i)
            _, b = layer.params(x)
            if layer.kind == "linear":
                _ops.pattern_stats_dense(x, z, b, st.accumulators, trace.backend)
            else:
                _ops.pattern_stats_conv2d(x, z, b, layer.stride, layer.padding, layer.dilation, st.accumulators,
                                          trace.backend)
        self.n_inputs += int(batch.shape[0])
        return self

    def merge(self, other):
        """A new PatternStats holding the sums of ``self`` and ``other`` (same layers, same device)."""
        if not isinstance(other, PatternStats):
            raise TypeError(f"can only merge PatternStats, got {type(other).__name__}")
        if other._signature != self._signature:
            raise ValueError(f"cannot merge pattern statistics of different nets: layers {self._signature} "
                             f"vs {other._signature}")
        layers = {}
        for i in self.layers:
            a, b = self.layers[i], other.layers[i]
            if a is None or b is None:
                layers[i] = None if a is None and b is None else (a or b).copy()
                continue
            out = a.copy()
            for name in _ACC_NAMES:
                getattr(out, name)[...] += getattr(b, name)
            out.dtype = "float32" if "float32" in (a.dtype, b.dtype) else "float64"
            layers[i] = out
        return PatternStats(self.net or other.net, layers=layers, n_inputs=self.n_inputs + other.n_inputs,
                            signature=self._signature)

    def patterns(self, mean_y="all", net=None):
        """The patterns a, a₊, a₋ of every layer (:class:`Patterns`), from these sums and the net's weights."""
        net = net if net is not None else self._require_net("patterns")
        self.check(net)
        if self.empty:
            raise ValueError("PatternStats: no data yet; update with at least one batch before computing patterns")
        if mean_y not in _MEAN_Y:
            raise ValueError(f"mean_y={mean_y!r} is invalid; expected 'all' (E[y], the paper's Eq. 8) or 'regime'")
        layers = {}
        with _collect_warnings() as report:
            for i, st in self.layers.items():
                w = net.layers[i].weight
                a = linear_pattern(st, w, _report=report)
                a_plus, a_minus = two_component_patterns(st, w, mean_y=mean_y, _report=report)
                layers[i] = LayerPatterns(i, st.kind, st.weight_shape, a, a_plus, a_minus, stats=st)
        return Patterns(layers, stats=self, mean_y=mean_y)

    def save(self, path):
        """Write the sums to one ``.npz`` file (read back with :meth:`PatternStats.load`)."""
        np.savez(path, **self._arrays(), **{_STATS_KEY: np.array(json.dumps(self._meta()))})

    @classmethod
    def load(cls, path, net=None):
        """Read a file written by :meth:`save` (or :meth:`Patterns.save`); checked against ``net`` if given."""
        with np.load(path, allow_pickle=False) as data:
            key = _STATS_KEY if _STATS_KEY in data.files else _PATTERNS_KEY
            if key not in data.files:
                raise ValueError(f"{path}: not a relprop pattern file")
            meta = json.loads(str(data[key]))
            stats = cls._from_arrays(meta, data)
        if net is not None:
            stats.check(net)
            stats.net = net
        return stats

    # -- internals --------------------------------------------------------------------------
    def _require_net(self, what):
        if self.net is None:
            raise ValueError(f"PatternStats.{what} needs the net: pass net= (loaded statistics carry no net)")
        return self.net

    def _meta(self):
        return {"version": _FORMAT_VERSION, "n_inputs": self.n_inputs,
                "layers": [{"index": i, "kind": k, "weight_shape": list(s),
                            "dtype": None if self.layers[i] is None else self.layers[i].dtype}
                           for i, (k, s) in sorted(self._signature.items())]}

    def _arrays(self):
        out = {}
        for i, st in self.layers.items():
            if st is not None:
                for name in _ACC_NAMES:
                    out[f"{i}.stats.{name}"] = to_numpy(getattr(st, name))
        return out

    @classmethod
    def _from_arrays(cls, meta, data):
        if meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported pattern file version {meta.get('version')!r}")
        layers = {}
        for entry in meta["layers"]:
            i = int(entry["index"])
            shape = tuple(int(s) for s in entry["weight_shape"])
            if f"{i}.stats.count" in data.files:
                layers[i] = LayerStats(i, entry["kind"], shape, *(np.array(data[f"{i}.stats.{n}"]) for n in _ACC_NAMES),
                                       dtype=entry.get("dtype") or "float64")
            else:
                layers[i] = None
        signature = {int(e["index"]): (e["kind"], tuple(int(s) for s in e["weight_shape"])) for e in meta["layers"]}
        return cls(None, layers=layers, n_inputs=meta.get("n_inputs", 0), signature=signature)


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


# ----------------------------------------------------------------------------------------------
# patterns
# ----------------------------------------------------------------------------------------------
@dataclass
class LayerPatterns:
    """The patterns of one dense/conv layer, each shaped like its weight (float64), and their statistics."""

    index: int
    kind: str
    weight_shape: tuple
    a: object          # linear estimator S_a
    a_plus: object     # two-component estimator, regime z > 0
    a_minus: object    # two-component estimator, regime z <= 0
    stats: object = None   # the LayerStats they came from


class Patterns(Mapping):
    """Fitted patterns: ``patterns[i]`` is the :class:`LayerPatterns` of dense/conv layer i.

    Attributes
    ----------
    stats : PatternStats or None
        The sums the patterns came from.
    mean_y : str
        The mean of y in the two-component estimator: "all" (E[y], the paper's Eq. 8, the
        default) or "regime" (E±[y], an option; see :func:`two_component_patterns`).
    """

    def __init__(self, layers, stats=None, mean_y="all"):
        self._layers = dict(sorted(layers.items()))
        self.stats = stats
        self.mean_y = mean_y

    def __getitem__(self, i):
        return self._layers[i]

    def __iter__(self):
        return iter(self._layers)

    def __len__(self):
        return len(self._layers)

    def __repr__(self):
        n = self.stats.n_inputs if self.stats is not None else "?"
        return f"Patterns(layers={list(self._layers)}, mean_y={self.mean_y!r}, n_inputs={n})"

    def check(self, net):
        """Raise ValueError unless these patterns belong to ``net``'s dense/conv layer shapes."""
        _check_signature({i: (p.kind, p.weight_shape) for i, p in self._layers.items()}, net, "patterns")

    def save(self, path):
        """Write patterns and statistics to one ``.npz`` file (read back with :func:`load_patterns`)."""
        meta = {"version": _FORMAT_VERSION, "mean_y": self.mean_y,
                "layers": [{"index": i, "kind": p.kind, "weight_shape": list(p.weight_shape)}
                           for i, p in self._layers.items()]}
        arrays = {}
        for i, p in self._layers.items():
            for name in ("a", "a_plus", "a_minus"):
                arrays[f"{i}.{name}"] = to_numpy(getattr(p, name))
        if self.stats is not None:
            arrays.update(self.stats._arrays())
            meta["n_inputs"] = self.stats.n_inputs
            for entry in meta["layers"]:
                st = self.stats.layers.get(entry["index"])
                entry["dtype"] = None if st is None else st.dtype
        np.savez(path, **arrays, **{_PATTERNS_KEY: np.array(json.dumps(meta))})


def load_patterns(path, net=None):
    """Read :class:`Patterns` written by :meth:`Patterns.save`.

    With ``net`` the file must match the net's dense/conv layers (indices, kinds and weight
    shapes), else ValueError; the statistics are attached to the net.
    """
    with np.load(path, allow_pickle=False) as data:
        if _PATTERNS_KEY not in data.files:
            raise ValueError(f"{path}: not a relprop patterns file (no {_PATTERNS_KEY} entry)")
        meta = json.loads(str(data[_PATTERNS_KEY]))
        if meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported patterns file version {meta.get('version')!r}")
        layers = {}
        for entry in meta["layers"]:
            i = int(entry["index"])
            shape = tuple(int(s) for s in entry["weight_shape"])
            arrs = [np.array(data[f"{i}.{n}"]) for n in ("a", "a_plus", "a_minus")]
            for n, arr in zip(("a", "a_plus", "a_minus"), arrs):
                if arr.shape != shape:
                    raise ValueError(f"{path}: layer {i} {n} has shape {arr.shape}, expected {shape}")
            layers[i] = LayerPatterns(i, entry["kind"], shape, *arrs)
        stats = PatternStats._from_arrays(meta, data) if any(k.endswith(".stats.count") for k in data.files) else None
    if stats is not None:
        for i, p in layers.items():
            p.stats = stats.layers.get(i)
    patterns = Patterns(layers, stats=stats, mean_y=meta.get("mean_y", "regime"))
    if net is not None:
        patterns.check(net)
        if stats is not None:
            stats.net = net
    return patterns


def _batches(data, batch_size):
    """(iterator over batches, number of inputs or None) for an array or an iterable of batches."""
    if hasattr(data, "shape") and hasattr(data, "dtype"):
        n = int(data.shape[0])
        return (data[s:s + batch_size] for s in range(0, n, batch_size)), n

    def items():
        for item in data:
            yield item[0] if isinstance(item, (tuple, list)) else item   # (x, label) pairs: take x

    return items(), None


def fit_patterns(net, data, batch_size=256, progress=True, backend=None, mean_y="all"):
    """Fit the PatternNet patterns of every dense/conv layer of ``net`` in one pass over ``data``.

    Parameters
    ----------
    net : relprop.nets.Sequential
    data : array (N, ...) or iterable of batches
        Inputs of the net (an iterable may yield ``(x, label)`` pairs; the label is ignored).
    batch_size : int
        Inputs per forward pass when ``data`` is an array.
    progress : bool
        Show a tqdm progress bar (it appears after 2 s, so short fits stay quiet).
    backend : None | "reference" | "cpu" | "cuda"
    mean_y : "all" | "regime"
        The mean of y in the two-component covariances: "all" (default) is E[y] over all
        samples, the paper's Eq. 8, which makes cov[x − S_a±(x), y] = 0 over ``data``;
        "regime" is each regime's own mean (see :func:`two_component_patterns`).

    Returns
    -------
    Patterns
        ``patterns[i].a`` / ``.a_plus`` / ``.a_minus`` shaped like layer i's weight, ``.stats``.
    """
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"fit_patterns: batch_size={batch_size!r} is invalid; expected an int >= 1")
    if mean_y not in _MEAN_Y:
        raise ValueError(f"fit_patterns: mean_y={mean_y!r} is invalid; expected 'all' or 'regime'")
    from tqdm.auto import tqdm

    stats = PatternStats(canonical(net))  # batch norms folded, as the pattern methods see the net
    batches, total = _batches(data, int(batch_size))
    with tqdm(total=total, unit="input", desc="fit_patterns", disable=not progress, delay=2.0, leave=False) as bar:
        for batch in batches:
            stats.update(batch, backend)
            bar.update(int(batch.shape[0]))
    if stats.n_inputs == 0:
        raise ValueError("fit_patterns: data holds no inputs")
    return stats.patterns(mean_y=mean_y)


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
    from .rules.signal import Gradient, Pattern

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
    elsewhere (MATH.md); ``"linear"``: a everywhere.
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


# ----------------------------------------------------------------------------------------------
# quality of the signal estimators
# ----------------------------------------------------------------------------------------------
ESTIMATOR_NAMES = ("S_x", "S_w", "S_a", "S_a+-")


@dataclass
class SignalQuality:
    """ρ(S) per layer (:func:`signal_quality`).

    ``rho[name]`` (n_layers,) is the mean over the evaluated units of ``per_unit[name][k]``
    (the values of layer ``layers[k]`` for units ``units[k]``); NaN where undefined.
    """

    layers: list
    kinds: list
    units: list
    rho: dict
    per_unit: dict

    def __getitem__(self, name):
        return self.rho[name]

    def rows(self):
        """One dict per layer: {"layer": i, "kind": ..., "units": n, "S_x": ..., "S_w": ..., ...}."""
        return [{"layer": i, "kind": k, "units": len(u), **{n: float(self.rho[n][r]) for n in self.rho}}
                for r, (i, k, u) in enumerate(zip(self.layers, self.kinds, self.units))]

    def __str__(self):
        names = list(self.rho)
        head = f"{'layer':>5}  {'kind':<7} {'units':>5}  " + "  ".join(f"{n:>7}" for n in names)
        lines = [head]
        for row in self.rows():
            lines.append(f"{row['layer']:>5}  {row['kind']:<7} {row['units']:>5}  "
                         + "  ".join(f"{row[n]:7.3f}" for n in names))
        return "\n".join(lines)


def _layer_samples(layer, x, z, positions, rng):
    """(X (S, I), Z (S, J)) on the host in float64: dense rows, or conv patches at sampled positions."""
    x = np.asarray(to_numpy(x), dtype=np.float64)
    z = np.asarray(to_numpy(z), dtype=np.float64)
    if layer.kind == "linear":
        return x, z
    n, c, h, w = x.shape
    ho, wo = z.shape[2:]
    kh, kw = layer.kernel
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    if positions is None or positions >= ho * wo:
        pos = np.broadcast_to(np.arange(ho * wo), (n, ho * wo))
    else:
        pos = np.argsort(rng.random((n, ho * wo)), axis=1)[:, :positions]
    img = np.broadcast_to(np.arange(n)[:, None], pos.shape).reshape(-1)
    pos = pos.reshape(-1)
    i, j = pos // wo, pos % wo
    x_pad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    rows = (i * sh)[:, None, None, None] + (np.arange(kh) * dh)[None, None, :, None]
    cols = (j * sw)[:, None, None, None] + (np.arange(kw) * dw)[None, None, None, :]
    patches = x_pad[img[:, None, None, None], np.arange(c)[None, :, None, None], rows, cols]
    return patches.reshape(len(pos), -1), z[img, :, i, j]


class _HalfMoments:
    """Sums over one half of the data for the selected units of one layer (float64, host)."""

    def __init__(self, w_sel):
        n_in = w_sel.shape[1]
        self.w = w_sel                                   # (U, I)
        self.n = 0
        self.sx = np.zeros(n_in)
        self.gram = np.zeros((n_in, n_in))               # Σ x xᵀ
        self.sy = np.zeros((2, len(w_sel)))              # Σy, Σ₊y
        self.sxy = np.zeros((2, len(w_sel), n_in))       # Σ x y, Σ₊ x y

    def add(self, x, z_sel):
        y = x @ self.w.T                                 # y = wᵀx exactly (no bias)
        yp = np.where(z_sel > 0, y, 0.0)                 # y in the positive regime, 0 elsewhere
        self.n += x.shape[0]
        self.sx += x.sum(axis=0)
        self.gram += x.T @ x
        self.sy[0] += y.sum(axis=0)
        self.sy[1] += yp.sum(axis=0)
        self.sxy[0] += y.T @ x
        self.sxy[1] += yp.T @ x

    def covariances(self, u, a_plus, a_minus):
        r"""(cov[d, d] (I, I), cov[d, y] (I,), var[y]) for unit u and d = x − a₊ y₊ − a₋ y₋."""
        n = self.n
        w = self.w[u]
        mx, g = self.sx / n, self.gram / n
        my, myp = self.sy[0, u] / n, self.sy[1, u] / n
        cxy, cxyp = self.sxy[0, u] / n, self.sxy[1, u] / n
        mym, cxym = my - myp, cxy - cxyp
        eyy, eyyp = w @ cxy, w @ cxyp                    # E[y²] = wᵀE[xy], E[y₊²] = wᵀE[x y₊]
        eyym = eyy - eyyp
        md = mx - a_plus * myp - a_minus * mym           # E[d]
        edd = (g - np.outer(cxyp, a_plus) - np.outer(a_plus, cxyp) - np.outer(cxym, a_minus)
               - np.outer(a_minus, cxym) + eyyp * np.outer(a_plus, a_plus) + eyym * np.outer(a_minus, a_minus))
        edy = cxy - a_plus * eyyp - a_minus * eyym       # E[d y]
        return edd - np.outer(md, md), edy - md * my, eyy - my * my


def _rho(fit, test, u, a_plus, a_minus):
    """1 − corr on ``test`` of vᵀd with y, v the least-squares fit of y on d over ``fit``."""
    import scipy.linalg

    c_dd, c_dy, _ = fit.covariances(u, a_plus, a_minus)
    if not np.any(c_dd):
        return np.nan                                    # d ≡ 0 (S_x): the correlation is undefined
    v = scipy.linalg.lstsq(c_dd, c_dy, lapack_driver="gelsy")[0]     # normal equations of y ~ vᵀd + c
    t_dd, t_dy, t_yy = test.covariances(u, a_plus, a_minus)
    var_fit = float(v @ t_dd @ v)
    if not (var_fit > 0 and t_yy > 0):
        return np.nan
    return 1.0 - float(v @ t_dy) / np.sqrt(var_fit * t_yy)


def signal_quality(net, patterns, data, batch_size=256, backend=None, max_units=64, positions=64, seed=0):
    r"""The quality :math:`\rho(S) = 1 - \max_v \mathrm{corr}(v^T (x - S(x)), y)` of each estimator, per layer.

    Exactly what is computed, for every dense/conv layer and every evaluated output unit j
    (x: the layer input, for a convolution the input patch of an output position; y = w_jᵀx;
    the regime of a sample is :math:`z_j = y + b_j > 0`, from the forward pass):

    1. ``data`` is split into halves: the first ⌊N/2⌋ inputs fit v, the rest measure the
       correlation (patterns should come from other data, as in the paper).
    2. On each half the sums n, Σx, Σxxᵀ, Σy, Σ₊y, Σxy, Σ₊xy are accumulated in float64 (all
       inputs of the half; for convolutions ``positions`` random output positions per input,
       all of them with ``positions=None``).  From them, for :math:`d = x - S(x)` with
       :math:`S(x) = a_+ y [z>0] + a_- y [z \le 0]` (a₊ = a₋ = a for the linear estimators),
       the covariance of d and its covariance with y follow exactly.
    3. v is the least-squares fit of y on d with intercept on the first half (the normal
       equations solved by ``scipy.linalg.lstsq``, minimum norm: cov[d] is singular since wᵀd = 0);
       :math:`\rho_j = 1 - \mathrm{corr}_2(v^T d, y)` on the second half.  Since v maximises the
       in-sample correlation, this is the paper's criterion measured on held-out data; it can
       exceed 1 when v does not generalise (negative held-out correlation).
    4. The layer's value is the mean of ρ_j over the evaluated units (``max_units`` of them,
       chosen at random with ``seed``; all with ``max_units=None``), ignoring NaN.

    Estimators: S_w (a = w / wᵀw), S_a (``patterns[i].a``), S_a+- (``a_plus``, ``a_minus``).
    S_x (S(x) = x) leaves d ≡ 0, for which the correlation is undefined: its entries are NaN.
    The criterion cannot rank S_x (it judges only what an estimator calls distractor, and S_x
    calls nothing distractor, keeping all of it in the signal); the paper's comparison
    (Fig. 3) likewise covers S_w, S_a and S_a+- only.

    Parameters
    ----------
    net : relprop.nets.Sequential
    patterns : Patterns
    data : array (N, ...), N >= 4
    batch_size : int
    backend : None | "reference" | "cpu" | "cuda"
        For the forward passes; the statistics here are computed on the host in float64.
    max_units : int or None
        Units evaluated per layer (cost: one I×I least-squares solve per unit and estimator).
    positions : int or None
        Output positions sampled per input for conv layers.
    seed : int or numpy.random.Generator

    Returns
    -------
    SignalQuality
        ``.rho["S_a"]`` etc. per layer; ``str()`` prints the table.
    """
    if not isinstance(patterns, Patterns):
        raise TypeError(f"signal_quality: patterns must be relprop.Patterns, got {type(patterns).__name__}")
    patterns.check(net)
    net.check_input(data, where="signal_quality")
    n_total = int(data.shape[0])
    if n_total < 4:
        raise ValueError(f"signal_quality: data holds {n_total} inputs; need at least 4 (two halves)")
    rng = np.random.default_rng(seed)
    layers = net.linear_layers()
    units, moments = {}, [{}, {}]
    for i in layers:
        w = _host64(net.layers[i].weight).reshape(net.layers[i].weight.shape[0], -1)
        j = w.shape[0]
        sel = np.arange(j) if max_units is None or max_units >= j else np.sort(rng.choice(j, max_units, replace=False))
        units[i] = sel
        for half in moments:
            half[i] = _HalfMoments(w[sel])
    halves = (data[: n_total // 2], data[n_total // 2:])
    for half, part in zip(moments, halves):
        for s in range(0, part.shape[0], batch_size):
            trace = net.trace(part[s:s + batch_size], backend, check=False)
            for i in layers:
                x, z = _layer_samples(net.layers[i], trace.inputs[i], trace.layer_output(i), positions, rng)
                half[i].add(x, z[:, units[i]])
    rho = {name: np.full(len(layers), np.nan) for name in ESTIMATOR_NAMES}
    per_unit = {name: [] for name in ESTIMATOR_NAMES}
    for k, i in enumerate(layers):
        w = moments[0][i].w
        p = patterns[i]
        a = _host64(p.a).reshape(p.weight_shape[0], -1)[units[i]]
        ap = _host64(p.a_plus).reshape(p.weight_shape[0], -1)[units[i]]
        am = _host64(p.a_minus).reshape(p.weight_shape[0], -1)[units[i]]
        aw = filter_pattern(w)
        choices = {"S_x": None, "S_w": (aw, aw), "S_a": (a, a), "S_a+-": (ap, am)}
        for name, pair in choices.items():
            if pair is None:
                values = np.full(len(units[i]), np.nan)     # d ≡ 0: undefined (see above)
            else:
                values = np.array([_rho(moments[0][i], moments[1][i], u, pair[0][u], pair[1][u])
                                   for u in range(len(units[i]))])
            per_unit[name].append(values)
            if np.any(np.isfinite(values)):
                rho[name][k] = float(np.nanmean(values))
    return SignalQuality(layers=list(layers), kinds=[net.layers[i].kind for i in layers],
                         units=[units[i] for i in layers], rho=rho, per_unit=per_unit)
