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

import json
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ._backend import array_namespace, to_numpy
from .engine import Sweep, Unit
from .methods import register_method, resolve_target
from .rules.signal import gradient_sweep
from .kernels import _ops
from .nets import canonical

__all__ = [
    "PatternStats", "LayerStats", "Patterns", "LayerPatterns", "PatternWarning",
    "fit_patterns", "load_patterns", "linear_pattern", "two_component_patterns", "filter_pattern",
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


def _open_npz(path, what):
    """``np.load`` of a relprop ``.npz`` file; anything that is not a readable .npz archive is a ValueError."""
    import zipfile

    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a relprop {what} file (not a readable .npz archive: {exc})") from None
    if not hasattr(data, "files"):          # a plain .npy array
        raise ValueError(f"{path}: not a relprop {what} file (a single array, not an .npz archive)")
    return data


def _read(data, key, path, what):
    """``data[key]`` of an open archive; a truncated or corrupt member is a ValueError naming the file."""
    import zipfile

    try:
        return np.array(data[key])
    except KeyError:
        raise ValueError(f"{path}: not a complete relprop {what} file (no entry {key!r})") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: corrupt relprop {what} file (entry {key!r}: {exc})") from None


def _meta(data, key, path, what):
    try:
        meta = json.loads(str(_read(data, key, path, what)))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt relprop {what} file (its {key} record: {exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("layers"), list):
        raise ValueError(f"{path}: corrupt relprop {what} file (its {key} record has no layer list)")
    return meta


def _check_finite_host(path, what, name, arr):
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: {what} {name} holds NaN or Inf (the file is corrupt or was written from "
                         "non-finite data)")
    return arr


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
    net : relprop.nets.Graph
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
        from .nets import Graph

        if net is not None and not isinstance(net, Graph):
            raise TypeError(f"PatternStats: net must be a relprop net (relprop.nets.Graph), got {type(net).__name__}")
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
        for i, st in self.layers.items():
            for name in _ACC_NAMES:
                if not bool(array_namespace(st.sum_xy).isfinite(getattr(st, name)).all()):
                    raise ValueError(f"PatternStats: layer {i} statistics {name} hold NaN or Inf; "
                                     "no patterns can be computed from them")
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
        with _open_npz(path, "pattern statistics") as data:
            key = _STATS_KEY if _STATS_KEY in data.files else _PATTERNS_KEY
            if key not in data.files:
                raise ValueError(f"{path}: not a relprop pattern statistics file (no {_STATS_KEY} entry)")
            meta = _meta(data, key, path, "pattern statistics")
            stats = cls._from_arrays(meta, data, path)
            if all(s is None for s in stats.layers.values()):
                raise ValueError(f"{path}: holds no pattern statistics (patterns saved without their sums)")
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
    def _from_arrays(cls, meta, data, path="pattern file"):
        if meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported pattern file version {meta.get('version')!r}")
        layers = {}
        for entry in meta["layers"]:
            i = int(entry["index"])
            shape = tuple(int(s) for s in entry["weight_shape"])
            if f"{i}.stats.count" in data.files:
                arrays = []
                want = ((), shape[1:], shape[:1], (2,) + shape[:1], shape, (2,) + shape)
                for n, sh in zip(_ACC_NAMES, want):
                    arr = _read(data, f"{i}.stats.{n}", path, "pattern statistics").astype(np.float64)
                    if arr.shape != sh:
                        raise ValueError(f"{path}: layer {i} statistics {n} has shape {arr.shape}, expected {sh}")
                    arrays.append(_check_finite_host(path, f"layer {i} statistics", n, arr))
                layers[i] = LayerStats(i, entry["kind"], shape, *arrays, dtype=entry.get("dtype") or "float64")
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
        """Raise ValueError unless these patterns belong to ``net``'s dense/conv layer shapes and are finite."""
        _check_signature({i: (p.kind, p.weight_shape) for i, p in self._layers.items()}, net, "patterns")
        for i, p in self._layers.items():
            for name in ("a", "a_plus", "a_minus"):
                arr = getattr(p, name)
                if not bool(array_namespace(arr).isfinite(arr).all()):
                    raise ValueError(f"patterns: layer {i} {name} holds NaN or Inf")

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
    with _open_npz(path, "patterns") as data:
        if _PATTERNS_KEY not in data.files:
            raise ValueError(f"{path}: not a relprop patterns file (no {_PATTERNS_KEY} entry)")
        meta = _meta(data, _PATTERNS_KEY, path, "patterns")
        if meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported patterns file version {meta.get('version')!r}")
        layers = {}
        for entry in meta["layers"]:
            i = int(entry["index"])
            shape = tuple(int(s) for s in entry["weight_shape"])
            arrs = [_read(data, f"{i}.{n}", path, "patterns") for n in ("a", "a_plus", "a_minus")]
            for n, arr in zip(("a", "a_plus", "a_minus"), arrs):
                if arr.shape != shape:
                    raise ValueError(f"{path}: layer {i} {n} has shape {arr.shape}, expected {shape}")
                _check_finite_host(path, f"layer {i} pattern", n, arr)
            layers[i] = LayerPatterns(i, entry["kind"], shape, *arrs)
        has_stats = any(k.endswith(".stats.count") for k in data.files)
        stats = PatternStats._from_arrays(meta, data, path) if has_stats else None
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
    net : relprop.nets.Graph
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
    from .nets import Graph

    if not isinstance(net, Graph):
        raise TypeError(f"fit_patterns: net must be a relprop net (relprop.nets.Graph), got {type(net).__name__}")
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


# ----------------------------------------------------------------------------------------------
# quality of the signal estimators: hosted by relprop.metrics, beside the other metrics
# ----------------------------------------------------------------------------------------------
def __getattr__(name):
    if name in ("signal_quality", "SignalQuality", "ESTIMATOR_NAMES"):
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
