"""Pattern statistics: per-layer float64 sums over a dataset, mergeable across chunks (docs/conventions.md, PatternNet)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .._backend import array_namespace, to_numpy
from ..kernels import _ops

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
        from ..nets import Graph

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
        from .estimators import _collect_warnings, linear_pattern, two_component_patterns
        from .fitting import LayerPatterns, Patterns

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
