"""Fitted patterns (:class:`Patterns`), their files, and :func:`fit_patterns`: one streaming pass over a dataset."""
from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .._backend import array_namespace, to_numpy
from ..nets import canonical
from .stats import (_FORMAT_VERSION, _MEAN_Y, _PATTERNS_KEY, PatternStats, _check_finite_host, _check_signature,
                    _meta, _open_npz, _read)

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
    from ..nets import Graph

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
