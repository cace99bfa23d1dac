"""Building nets from a JSON-able spec plus a PyTorch-style state dict; .npz save/load.

Spec: a list of layer dicts, e.g.::

    [{"type": "conv2d", "in": 1, "out": 6, "kernel": 5, "stride": 1, "padding": 0},
     {"type": "relu"}, {"type": "maxpool2d", "kernel": 2, "stride": 2},
     {"type": "avgpool2d", "kernel": 2, "stride": 2}, {"type": "flatten"},
     {"type": "linear", "in": 256, "out": 120}]

Weights: ``{"0.weight": (6, 1, 5, 5), "0.bias": (6,), "5.weight": (120, 256), ...}``:
layer i reads ``"i.weight"`` / ``"i.bias"`` (a missing bias means no bias) -- exactly
the keys of a PyTorch ``nn.Sequential``'s ``state_dict()``, in its layouts, so exported
weights load without transposes.  ``kernel``/``stride``/``padding`` take an int or a pair;
conv2d also takes ``"dilation"``, pools ``"padding"`` (avg-pool counts padding, as
PyTorch's count_include_pad=True).
"""
from __future__ import annotations

import json

import numpy as np

from .layers import LAYER_TYPES, AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, SumPool
from .sequential import Sequential

_ALLOWED_KEYS = {
    "linear": {"type", "in", "out"},
    "conv2d": {"type", "in", "out", "kernel", "stride", "padding", "dilation"},
    "relu": {"type"},
    "maxpool2d": {"type", "kernel", "stride", "padding"},
    "avgpool2d": {"type", "kernel", "stride", "padding"},
    "flatten": {"type"},
    "sumpool": {"type"},
}


def _weight(weights, key, shape, where):
    if key not in weights:
        raise ValueError(f"{where}: weights has no {key!r} (expected shape {shape})")
    w = np.asarray(weights[key])
    if w.dtype not in (np.float32, np.float64):
        if not np.issubdtype(w.dtype, np.floating):
            raise TypeError(f"{where}: {key} has dtype {w.dtype}, expected a float array")
        w = w.astype(np.float32)
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{where}: {key} has shape {tuple(w.shape)}, expected {tuple(shape)}")
    if not np.isfinite(w).all():
        raise ValueError(f"{where}: {key} contains NaN or Inf")
    return np.ascontiguousarray(w)


def _pair(v):
    return (int(v), int(v)) if np.isscalar(v) else tuple(int(t) for t in v)


def from_spec(spec, weights=None):
    """Build a :class:`Sequential` from a layer spec and a state dict (see the module doc)."""
    if isinstance(spec, str):
        spec = json.loads(spec)
    weights = {} if weights is None else dict(weights)
    layers, used = [], set()
    for i, entry in enumerate(spec):
        where = f"layer {i}"
        if not isinstance(entry, dict) or "type" not in entry:
            raise ValueError(f"{where}: spec entry must be a dict with a 'type', got {entry!r}")
        kind = entry["type"]
        if kind not in LAYER_TYPES:
            raise ValueError(f"{where}: unknown layer type {kind!r}; expected one of {sorted(LAYER_TYPES)}")
        extra = set(entry) - _ALLOWED_KEYS[kind]
        if extra:
            raise ValueError(f"{where} ({kind}): unknown keys {sorted(extra)}; allowed {sorted(_ALLOWED_KEYS[kind])}")
        where = f"layer {i} ({kind})"
        bias_key = f"{i}.bias"
        if kind == "linear":
            w = _weight(weights, f"{i}.weight", (int(entry["out"]), int(entry["in"])), where)
            b = _weight(weights, bias_key, (w.shape[0],), where) if bias_key in weights else None
            layer = Linear(w, b)
        elif kind == "conv2d":
            kh, kw = _pair(entry["kernel"])
            w = _weight(weights, f"{i}.weight", (int(entry["out"]), int(entry["in"]), kh, kw), where)
            b = _weight(weights, bias_key, (w.shape[0],), where) if bias_key in weights else None
            layer = Conv2d(w, b, stride=entry.get("stride", 1), padding=entry.get("padding", 0),
                           dilation=entry.get("dilation", 1))
        elif kind in ("maxpool2d", "avgpool2d"):
            cls = MaxPool2d if kind == "maxpool2d" else AvgPool2d
            layer = cls(entry["kernel"], entry.get("stride"), entry.get("padding", 0))
        else:
            layer = {"relu": ReLU, "flatten": Flatten, "sumpool": SumPool}[kind]()
        if layer.is_linear:
            used.update({f"{i}.weight", bias_key} & set(weights))
        layers.append(layer)
    unused = sorted(set(weights) - used)
    if unused:
        raise ValueError(f"weights has keys no layer uses: {unused}")
    return Sequential(layers)


def save(net, path):
    """Save ``net`` (spec + weights) to one ``.npz`` file."""
    arrays = {k: np.asarray(v) for k, v in net.state_dict().items()}
    np.savez(path, __spec__=np.array(json.dumps(net.spec())), **arrays)


def load(path):
    """Load a net written by :meth:`Sequential.save`."""
    with np.load(path, allow_pickle=False) as data:
        if "__spec__" not in data.files:
            raise ValueError(f"{path}: not a relprop net file (no __spec__ entry)")
        spec = json.loads(str(data["__spec__"]))
        weights = {k: data[k] for k in data.files if k != "__spec__"}
    return from_spec(spec, weights)
