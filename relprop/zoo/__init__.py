"""The model zoo: small trained networks, shipped with the package, with held-out samples.

>>> import relprop
>>> m = relprop.zoo.load("detector")                  # doctest: +SKIP
>>> R = relprop.explain(m.net, m.x, "lrp.epsilon_plus_flat")   # doctest: +SKIP

========================  ===============================================================
name                      net
========================  ===============================================================
``digits_mlp``            64 → 64 → 10 ReLU MLP on the 8×8 scikit-learn digits (flattened)
``digits_cnn``            LeNet-style conv net on the digits upsampled to 1×28×28
``detector``              conv net on the DTD detection task (1×28×56: a 0-3 digit beside
                          a 4-9 distractor; the output says which of 0-3)
``dtd_onelayer``          the DTD seed's detection-pooling net: linear → ReLU (b_j ≤ 0) →
                          sum, on flattened 28×56 images; f(x) > 0 when a 0-3 digit is present
``pattern_toy``           the PatternNet seed's linear toy: one linear neuron w = (1, −1)
========================  ===============================================================

Every net was trained by ``python -m relprop.zoo.train NAME`` (seeded, reproducible; ``digits_resnet``
with PyTorch, by :mod:`relprop.zoo.train_resnet`) and
lives in ``relprop/zoo/weights/NAME.npz``: the :func:`relprop.nets.save` format (spec and
state dict) plus a few held-out samples (``samples.x``, ``samples.y``, ``samples.mask``)
and a JSON ``meta`` record; PatternNet patterns fitted on the training data are in
``NAME_patterns.npz`` for the conv nets.  Nothing is downloaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["load", "names", "ZooModel", "WEIGHTS_DIR", "NAMES"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

#: every zoo net, in the order of the table above
NAMES = ("digits_mlp", "digits_cnn", "detector", "dtd_onelayer", "pattern_toy", "digits_resnet")

_SAMPLE_KEYS = ("samples.x", "samples.y", "samples.mask")


@dataclass
class ZooModel:
    """A zoo net with its held-out samples.

    Attributes
    ----------
    name : str
    net : relprop.nets.Sequential
    x : ndarray
        Held-out sample inputs in the net's layout.
    y : ndarray
        Their labels (class indices; real targets for ``pattern_toy``).
    masks : ndarray of bool or None
        Ground truth of where the evidence is (the target half, ``detector`` and ``dtd_onelayer``).
    patterns : object or None
        Fitted PatternNet patterns (``relprop.patterns``) for the conv nets, else None.
    meta : dict
        Description, image shape, class names, held-out accuracy, training recipe.
    """

    name: str
    net: object
    x: np.ndarray
    y: np.ndarray
    masks: np.ndarray | None = None
    patterns: object = None
    meta: dict = field(default_factory=dict)

    @property
    def image_shape(self):
        """(C, H, W) of one sample as a picture (flat inputs are reshaped to it), or None."""
        shape = self.meta.get("image_shape")
        return None if shape is None else tuple(shape)

    def __iter__(self):  # net, x = relprop.zoo.load(name)
        return iter((self.net, self.x))

    def __repr__(self):
        return (f"ZooModel({self.name!r}, samples={tuple(self.x.shape)}, "
                f"patterns={'yes' if self.patterns is not None else 'no'})")


def names():
    """Names of the zoo nets whose weights are shipped."""
    return [n for n in NAMES if (WEIGHTS_DIR / f"{n}.npz").exists()]


def weights_path(name):
    return WEIGHTS_DIR / f"{name}.npz"


def onnx_path(name):
    """The ONNX file of zoo net ``name`` (shipped for ``digits_resnet``)."""
    return WEIGHTS_DIR / f"{name}.onnx"


def read(path):
    """(net, samples dict, meta dict) from a zoo ``.npz`` file (or a plain :func:`relprop.nets.save` file)."""
    from ..nets.io import from_spec

    with np.load(path, allow_pickle=False) as data:
        if "__spec__" not in data.files:
            raise ValueError(f"{path}: not a relprop net file (no __spec__ entry)")
        spec = json.loads(str(data["__spec__"]))
        meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        samples = {k.split(".", 1)[1]: data[k] for k in data.files if k in _SAMPLE_KEYS}
        weights = {k: data[k] for k in data.files if k not in _SAMPLE_KEYS and k not in ("__spec__", "meta")}
    return from_spec(spec, weights), samples, meta


def write(path, net, samples, meta):
    """Write a zoo file: the :func:`relprop.nets.save` entries plus samples and meta (compressed)."""
    arrays = {k: np.asarray(v) for k, v in net.state_dict().items()}
    arrays["__spec__"] = np.array(json.dumps(net.spec()))
    arrays["meta"] = np.array(json.dumps(meta))
    for k, v in samples.items():
        if v is not None:
            arrays[f"samples.{k}"] = np.asarray(v)
    np.savez_compressed(path, **arrays)


def _load_patterns(path, net):
    if not Path(path).exists():
        return None
    try:
        from .. import patterns as _patterns
    except ImportError:
        return None
    loader = getattr(_patterns, "load_patterns", None)
    return None if loader is None else loader(str(path), net)


def load(name, patterns=True):
    """Load a zoo net by name (see :data:`NAMES`) or from a zoo ``.npz`` path.

    Parameters
    ----------
    name : str or path
    patterns : bool
        Also load the fitted PatternNet patterns when they are shipped (``.patterns``).

    Returns
    -------
    ZooModel
    """
    path = Path(name)
    if str(name) in NAMES:
        path = weights_path(str(name))
        if not path.exists():
            raise FileNotFoundError(
                f"zoo weights {path} are missing; train them with: python -m relprop.zoo.train {name}"
            )
    elif not path.exists():
        raise ValueError(f"unknown zoo net {name!r}; known: {', '.join(NAMES)} (or a path to a .npz file)")
    net, samples, meta = read(path)
    pats = None
    if patterns:
        pats = _load_patterns(path.with_name(path.stem + "_patterns.npz"), net)
    return ZooModel(name=meta.get("name", path.stem), net=net, x=samples.get("x"), y=samples.get("y"),
                    masks=samples.get("mask"), patterns=pats, meta=meta)
