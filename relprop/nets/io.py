"""Building nets from a JSON-able spec plus a PyTorch-style state dict; .npz save/load.

Spec: a list of layer dicts, e.g.::

    [{"type": "conv2d", "in": 1, "out": 6, "kernel": 5, "stride": 1, "padding": 0},
     {"type": "relu"}, {"type": "maxpool2d", "kernel": 2, "stride": 2},
     {"type": "avgpool2d", "kernel": 2, "stride": 2}, {"type": "flatten"},
     {"type": "linear", "in": 256, "out": 120}]

Every entry may name its inputs, ``"inputs": [k, ...]`` — earlier layer indices or
``"input"`` (the net input); by default the previous layer — so residual and branching
nets are specs too::

    [{"type": "conv2d", "in": 8, "out": 8, "kernel": 3, "padding": 1},     # 0
     {"type": "batchnorm2d", "features": 8, "eps": 1e-5},                    # 1
     {"type": "relu"},                                                       # 2
     {"type": "add", "inputs": [2, "input"]}]                                # 3: skip connection

Layer types and their keys:

=====================  ==========================================================  =======================
type                   keys (besides ``type`` and ``inputs``)                      weights
=====================  ==========================================================  =======================
``linear``             ``in``, ``out``                                             weight (out, in), bias
``conv2d``             ``in``, ``out``, ``kernel``, ``stride``, ``padding``,        weight (K, C, kh, kw),
                       ``dilation``                                                bias
``relu``               —
``maxpool2d``          ``kernel``, ``stride``, ``padding`` (-inf), ``ceil_mode``
``avgpool2d``          ``kernel``, ``stride``, ``padding`` (counted, as PyTorch's
                       count_include_pad=True)
``adaptive_avgpool2d``  ``output_size`` (PyTorch's bin edges; 1: global average)
``flatten``            —
``sumpool``            —  (Σ over features, output (N, 1))
``batchnorm2d/1d``     ``features``, ``eps`` (inference)                            weight, bias,
                                                                                   running_mean, running_var
``identity``           —
``dropout``            ``p`` (identity at inference)
``add``                —  (two or more inputs of one shape)
``concat``             ``axis`` (1)
=====================  ==========================================================  =======================

Weights: ``{"0.weight": (6, 1, 5, 5), "0.bias": (6,), "5.weight": (120, 256), ...}``:
layer i reads ``"i.weight"`` / ``"i.bias"`` (a missing bias means no bias) -- exactly
the keys of a PyTorch ``nn.Sequential``'s ``state_dict()``, in its layouts, so exported
weights load without transposes.  ``kernel``/``stride``/``padding`` take an int or a pair.
A spec that fails validation raises ValueError naming the layer and the key; nothing is
half-built.
"""
from __future__ import annotations

import json
import numbers
import zipfile
from pathlib import Path

import numpy as np

from .graph import Graph, Sequential
from .layers import (LAYER_TYPES, AdaptiveAvgPool2d, Add, AvgPool2d, BatchNorm1d, BatchNorm2d, Concat, Conv2d,
                     Dropout, Flatten, Identity, Linear, MaxPool2d, ReLU, SumPool)

_POOL = {"kernel", "stride", "padding"}
_ALLOWED_KEYS = {
    "linear": {"in", "out"},
    "conv2d": {"in", "out", "kernel", "stride", "padding", "dilation"},
    "relu": set(),
    "maxpool2d": _POOL | {"ceil_mode"},
    "avgpool2d": _POOL | {"ceil_mode"},
    "adaptive_avgpool2d": {"output_size"},
    "flatten": set(),
    "sumpool": set(),
    "batchnorm2d": {"features", "eps", "momentum", "affine"},
    "batchnorm1d": {"features", "eps", "momentum", "affine"},
    "identity": set(),
    "dropout": {"p"},
    "add": set(),
    "concat": {"axis"},
}
_REQUIRED = {"linear": ("in", "out"), "conv2d": ("in", "out", "kernel"), "maxpool2d": ("kernel",),
             "avgpool2d": ("kernel",), "adaptive_avgpool2d": ("output_size",), "batchnorm2d": ("features",),
             "batchnorm1d": ("features",)}


def _weight(weights, key, shape, where):
    if key not in weights:
        raise ValueError(f"{where}: weights has no {key!r} (expected shape {shape})")
    w = weights[key]
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
        raise TypeError(f"{where}: {key} is a {type(w).__name__}, expected an array of shape {shape}")
    w = np.asarray(w)
    if w.dtype not in (np.float32, np.float64):
        if not np.issubdtype(w.dtype, np.floating):
            raise TypeError(f"{where}: {key} has dtype {w.dtype}, expected a float array")
        w = w.astype(np.float32)
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{where}: {key} has shape {tuple(w.shape)}, expected {tuple(shape)}")
    if not np.isfinite(w).all():
        raise ValueError(f"{where}: {key} contains NaN or Inf")
    return np.ascontiguousarray(w)


def _int(where, key, value, minimum=1):
    """A strictly integral value >= minimum (6.7, "6", True are rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{where}: {key}={value!r} is invalid; expected an integer >= {minimum}")
    if value < minimum:
        raise ValueError(f"{where}: {key}={value!r} is invalid; expected an integer >= {minimum}")
    return int(value)


def _pair(where, key, value, minimum):
    """An int or a pair of ints, each >= minimum."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{where}: {key}={list(value)!r} is invalid; expected an int or a pair [h, w]")
        return tuple(_int(where, key, v, minimum) for v in value)
    v = _int(where, key, value, minimum)
    return (v, v)


def _bool(where, key, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where}: {key}={value!r} is invalid; expected true or false")
    return bool(value)


def _parse_spec(spec):
    if isinstance(spec, (str, bytes)):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ValueError(f"spec is not valid JSON: {exc}") from None
    if isinstance(spec, dict) or not isinstance(spec, (list, tuple)):
        raise TypeError(f"spec must be a list of layer dicts (or its JSON text), got {type(spec).__name__}")
    if not spec:
        raise ValueError("spec is empty; expected at least one layer")
    return list(spec)


def _layer(i, entry, weights, used):
    """Build layer i of the spec, reading (and marking as used) its weights."""
    if not isinstance(entry, dict) or "type" not in entry:
        raise ValueError(f"layer {i}: spec entry must be a dict with a 'type', got {entry!r}")
    kind = entry["type"]
    if kind not in LAYER_TYPES:
        raise ValueError(f"layer {i}: unknown layer type {kind!r}; expected one of {sorted(LAYER_TYPES)}")
    where = f"layer {i} ({kind})"
    extra = set(entry) - _ALLOWED_KEYS[kind] - {"type", "inputs"}
    if extra:
        raise ValueError(f"{where}: unknown keys {sorted(extra)}; allowed {sorted(_ALLOWED_KEYS[kind] | {'inputs'})}")
    missing = [k for k in _REQUIRED.get(kind, ()) if k not in entry]
    if missing:
        raise ValueError(f"{where}: spec has no {missing[0]!r}; {kind} needs {list(_REQUIRED[kind])}")

    def take(name, shape):
        key = f"{i}.{name}"
        used.add(key)
        return _weight(weights, key, shape, where)

    def optional(name, shape):
        return take(name, shape) if f"{i}.{name}" in weights else None

    if kind == "linear":
        w = take("weight", (_int(where, "out", entry["out"]), _int(where, "in", entry["in"])))
        return Linear(w, optional("bias", (w.shape[0],)))
    if kind == "conv2d":
        kh, kw = _pair(where, "kernel", entry["kernel"], 1)
        w = take("weight", (_int(where, "out", entry["out"]), _int(where, "in", entry["in"]), kh, kw))
        return Conv2d(w, optional("bias", (w.shape[0],)), stride=_pair(where, "stride", entry.get("stride", 1), 1),
                      padding=_pair(where, "padding", entry.get("padding", 0), 0),
                      dilation=_pair(where, "dilation", entry.get("dilation", 1), 1))
    if kind in ("maxpool2d", "avgpool2d"):
        cls = MaxPool2d if kind == "maxpool2d" else AvgPool2d
        stride = entry.get("stride")
        return cls(_pair(where, "kernel", entry["kernel"], 1), None if stride is None else
                   _pair(where, "stride", stride, 1), _pair(where, "padding", entry.get("padding", 0), 0),
                   _bool(where, "ceil_mode", entry.get("ceil_mode", False)))
    if kind == "adaptive_avgpool2d":
        return AdaptiveAvgPool2d(_pair(where, "output_size", entry["output_size"], 1))
    if kind in ("batchnorm2d", "batchnorm1d"):
        c = _int(where, "features", entry["features"])
        eps = entry.get("eps", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (np.isfinite(eps) and eps > 0):
            raise ValueError(f"{where}: eps={eps!r} is invalid; expected a finite number > 0")
        var = take("running_var", (c,))
        if (var < 0).any():
            raise ValueError(f"{where}: running_var has {int((var < 0).sum())} negative entries; expected a "
                             "variance >= 0")
        cls = BatchNorm2d if kind == "batchnorm2d" else BatchNorm1d
        return cls(optional("weight", (c,)), optional("bias", (c,)), take("running_mean", (c,)), var, eps)
    if kind == "dropout":
        return Dropout(entry.get("p", 0.5))
    if kind == "concat":
        return Concat(entry.get("axis", 1))
    return {"relu": ReLU, "flatten": Flatten, "sumpool": SumPool, "identity": Identity, "add": Add}[kind]()


def from_spec(spec, weights=None):
    """Build a net from a layer spec and a state dict (see the module doc).

    Returns a :class:`~relprop.nets.Sequential` for a chain, else a
    :class:`~relprop.nets.Graph`.  Shapes that do not fit together (an add of unequal
    shapes, a concat that differs outside axis 1, a linear layer after a conv without a
    flatten) raise when the net first sees an input (``net.shapes``), naming the layer.
    """
    spec = _parse_spec(spec)
    if weights is None:
        weights = {}
    elif not hasattr(weights, "keys"):
        raise TypeError(f"weights must be a dict (a state dict: {{'0.weight': array, ...}}), "
                        f"got {type(weights).__name__}")
    weights = dict(weights)
    used = set()
    layers = [_layer(i, entry, weights, used) for i, entry in enumerate(spec)]
    unused = sorted(set(weights) - used)
    if unused:
        raise ValueError(f"weights has keys no layer uses: {unused}")
    inputs = [entry.get("inputs") for entry in spec]
    if all(v is None for v in inputs):
        net = Sequential(layers)
    else:
        net = Graph(layers, inputs)
        if net.is_chain:
            net = Sequential(layers)
    return net


def save(net, path):
    """Save ``net`` (spec + weights) to one ``.npz`` file."""
    arrays = {k: np.asarray(v) for k, v in net.state_dict().items()}
    np.savez(path, __spec__=np.array(json.dumps(net.spec())), **arrays)


def _resolve(path):
    """``path``, or ``path.npz`` when only that exists (as np.savez names its file)."""
    p = Path(path)
    if not p.exists() and p.suffix != ".npz" and p.with_name(p.name + ".npz").exists():
        return p.with_name(p.name + ".npz")
    return p


def load(path):
    """Load a net written by :meth:`Graph.save` (``"model"`` finds ``model.npz`` too)."""
    p = _resolve(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such relprop net file")
    try:
        with np.load(p, allow_pickle=False) as data:
            if "__spec__" not in data.files:
                raise ValueError(f"{p}: not a relprop net file (no __spec__ entry)")
            spec = json.loads(str(data["__spec__"]))
            weights = {k: data[k] for k in data.files if k != "__spec__"}
    except (zipfile.BadZipFile, EOFError, OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{p}: not a relprop net file (unreadable or truncated .npz: {exc})") from None
    except ValueError as exc:
        if "relprop net file" in str(exc):
            raise
        raise ValueError(f"{p}: not a relprop net file ({exc})") from None
    return from_spec(spec, weights)
