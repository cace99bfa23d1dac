"""Train the zoo: ``python -m relprop.zoo.train NAME [NAME ...] | all [--quick] [--out DIR]``.

Every recipe is seeded (initial weights, data, shuffling, augmentation), so a run
reproduces the shipped net up to floating-point rounding of the backend and the BLAS
thread count.  A run writes ``DIR/NAME.npz`` (the net in :func:`relprop.nets.save`'s
format plus held-out samples and a ``meta`` record) and, for the conv nets and the
PatternNet toy, ``DIR/NAME_patterns.npz`` (PatternNet patterns fitted on the training
inputs).  ``--quick`` trains a reduced recipe (the tests use it to check that the recipe
still yields a net of the shipped quality).  ``--patterns-only`` keeps the nets in ``DIR``
untouched and refits only their patterns (e.g. after a change of the estimator's defaults).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..nets import data
from ..nets.io import from_spec
from ..nets.train import accuracy, clip_bias, init_weights, predict, train
from . import NAMES, WEIGHTS_DIR, write

__all__ = ["Recipe", "RECIPES", "build", "evaluate", "main", "SPECS", "refit_patterns"]


def _conv(i, o, k, stride=1, padding=0):
    return {"type": "conv2d", "in": i, "out": o, "kernel": k, "stride": stride, "padding": padding}


def _linear(i, o):
    return {"type": "linear", "in": i, "out": o}


RELU, FLAT = {"type": "relu"}, {"type": "flatten"}


def _maxpool(k):
    return {"type": "maxpool2d", "kernel": k}


SPECS = {
    # 64 -> 64 -> 10 on the flattened 8x8 digits
    "digits_mlp": [_linear(64, 64), RELU, _linear(64, 10)],
    # LeNet-style: (conv 5x5, ReLU, max-pool 2) x 2, then two dense layers
    "digits_cnn": [_conv(1, 6, 5), RELU, _maxpool(2), _conv(6, 16, 5), RELU, _maxpool(2), FLAT,
                   _linear(256, 64), RELU, _linear(64, 10)],
    # The detection task, 1x28x56.  (conv 5x5, ReLU, max-pool 2) x 2 -> 16x7x14; a 7x7 conv with
    # stride 7 reads each 28x28 half as one window (digit features per half, shared weights),
    # a 1x1 conv scores the 4 classes per half, and a max-pool over the two halves takes, per
    # class, the best-scoring half: the detection read-out of multiple-instance learning.  The
    # distractor carries no information about the label, and the net can only use it to lose.
    "detector": [_conv(1, 8, 5, padding=2), RELU, _maxpool(2), _conv(8, 16, 5, padding=2), RELU, _maxpool(2),
                 _conv(16, 32, 7, stride=7), RELU, _conv(32, 4, 1), {"type": "maxpool2d", "kernel": [1, 2]}, FLAT],
    # The DTD seed's one-layer detection-pooling net: x_j = max(0, w_j^T x + b_j), b_j <= 0;
    # f(x) = sum_j x_j.  Trained to output 1 when a 0-3 digit is present, 0 otherwise.
    "dtd_onelayer": [_linear(28 * 56, 100), RELU, {"type": "sumpool"}],
    # The PatternNet seed's toy: one linear neuron y = w^T x (no bias), learned from x = a_s y + a_d eps.
    "pattern_toy": [_linear(2, 1)],
}


def _shift(x, rng, max_shift=2):
    """Augmentation: shift every image by up to ``max_shift`` pixels (zero fill)."""
    out = np.zeros_like(x)
    h, w = x.shape[2:]
    for k in range(x.shape[0]):
        dy, dx = rng.integers(-max_shift, max_shift + 1, 2)
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[k, :, yd, xd] = x[k, :, ys, xs]
    return out


@dataclass
class Recipe:
    """How one zoo net is trained and evaluated."""

    name: str
    description: str
    train_data: object              # callable(quick) -> (x, y)
    test_data: object               # callable() -> (x, y, mask or None)
    samples: object                 # callable() -> dict(x=, y=, mask=)
    options: dict                   # keyword arguments of relprop.nets.train.train
    quick: dict = field(default_factory=dict)   # overrides for --quick
    metric: str = "accuracy"        # "accuracy" | "presence" | "regression"
    image_shape: tuple = None
    classes: list = None
    patterns: bool = False
    bias: bool = True
    init_bias: float = 0.0


def _digit_samples(size, flat=False, per_class=2):
    x, y = data.digits("test", size, flat=flat)
    idx = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
    idx = idx.reshape(10, per_class).T.reshape(-1)  # 0..9, 0..9, ...
    return {"x": x[idx], "y": y[idx], "mask": None}


def _detection_test():
    return data.detection("test", 1000, seed=1)


def _presence_flat(split, n, seed):
    x, y, mask = data.presence(split, n, seed)
    return x.reshape(n, -1), y, mask


RECIPES = {
    "digits_mlp": Recipe(
        "digits_mlp", "64-64-10 ReLU MLP on the flattened 8x8 scikit-learn digits",
        train_data=lambda quick: data.digits("train", 8, flat=True),
        test_data=lambda: data.digits("test", 8, flat=True) + (None,),
        samples=lambda: _digit_samples(8, flat=True),
        options=dict(epochs=60, batch_size=32, lr=3e-3, weight_decay=1e-4),
        quick=dict(epochs=30),
        image_shape=(1, 8, 8), classes=[str(c) for c in range(10)],
    ),
    "digits_cnn": Recipe(
        "digits_cnn", "LeNet-style conv net on the scikit-learn digits upsampled to 1x28x28",
        train_data=lambda quick: data.digits("train", 28),
        test_data=lambda: data.digits("test", 28) + (None,),
        samples=lambda: _digit_samples(28),
        options=dict(epochs=30, batch_size=32, lr=2e-3, weight_decay=1e-4, augment=_shift),
        quick=dict(epochs=8),
        image_shape=(1, 28, 28), classes=[str(c) for c in range(10)], patterns=True,
    ),
    "detector": Recipe(
        "detector", "conv net on the DTD detection task: which digit 0-3 is in the 1x28x56 image "
                    "(the other half holds a 4-9 distractor)",
        train_data=lambda quick: data.detection("train", 2000 if quick else 6000, seed=0)[:2],
        test_data=_detection_test,
        samples=lambda: dict(zip(("x", "y", "mask"), data.detection("test", 32, seed=2))),
        options=dict(epochs=6, batch_size=64, lr=3e-3),
        quick=dict(epochs=3),
        image_shape=(1, 28, 56), classes=["0", "1", "2", "3"], patterns=True,
    ),
    "dtd_onelayer": Recipe(
        "dtd_onelayer", "the DTD seed's detection-pooling net (linear -> ReLU with b_j <= 0 -> sum) on "
                        "flattened 28x56 images: f(x) ~ 1 when a 0-3 digit is present, 0 otherwise",
        train_data=lambda quick: _presence_flat("train", 6000, 0)[:2],
        test_data=lambda: _presence_flat("test", 1000, 1),
        samples=lambda: dict(zip(("x", "y", "mask"), _presence_flat("test", 16, 2))),
        # Adam with strong decoupled weight decay: pixels a unit does not need decay to zero, so
        # the units become templates of one half (b_j <= 0 is restored after every step)
        options=dict(epochs=60, batch_size=32, lr=1e-4, weight_decay=10.0, loss="squared", constraint=clip_bias(0.0)),
        quick=dict(epochs=30),
        metric="presence", image_shape=(1, 28, 56), classes=["present"],
    ),
    "pattern_toy": Recipe(
        "pattern_toy", "the PatternNet seed's linear toy: one neuron learned from x = a_s y + a_d eps "
                       "with a_s = (1, 0), a_d = (1, 1); the filter is w = (1, -1), the signal a_s",
        train_data=lambda quick: data.pattern_toy(10000, seed=0),
        test_data=lambda: data.pattern_toy(1000, seed=1) + (None,),
        samples=lambda: dict(zip(("x", "y"), data.pattern_toy(16, seed=2)), mask=None),
        options=dict(epochs=5, batch_size=100, lr=0.05, loss="squared", optimizer="sgd", momentum=0.9),
        quick=dict(epochs=2),
        metric="regression", image_shape=None, classes=["y"], patterns=True, bias=False,
    ),
    # trained with PyTorch by relprop.zoo.train_resnet (residual adds and BatchNorm), imported with from_torch;
    # only the data and the metric are used from here
    "digits_resnet": Recipe(
        "digits_resnet", "small residual net with BatchNorm on the digits upsampled to 1x28x28 (PyTorch-trained)",
        train_data=lambda quick: data.digits("train", 28),
        test_data=lambda: data.digits("test", 28) + (None,),
        samples=lambda: _digit_samples(28),
        options={}, image_shape=(1, 28, 28), classes=[str(c) for c in range(10)],
    ),
}

#: zoo nets trained with PyTorch (the peers extra) by their own module, not by relprop.nets.train
TORCH_TRAINED = {"digits_resnet": "relprop.zoo.train_resnet"}


def evaluate(name, net, backend=None):
    """The held-out quality of a zoo net: accuracy (classifiers), presence accuracy at f > 0.5, or R²."""
    recipe = RECIPES[name]
    x, y, _ = recipe.test_data()
    if recipe.metric == "accuracy":
        return accuracy(net, x, y, backend=backend)
    f = predict(net, x, backend=backend)[:, 0]
    if recipe.metric == "presence":
        return float(np.mean((f > 0.5) == (y > 0.5)))
    return float(1 - np.mean((f - y) ** 2) / np.var(y))


def build(name, quick=False, progress=True, backend=None, seed=0):
    """Train zoo net ``name``; return ``(net, samples, meta)``."""
    if name not in RECIPES:
        raise ValueError(f"unknown zoo net {name!r}; known: {', '.join(NAMES)}")
    if name in TORCH_TRAINED:
        import importlib

        net, samples, meta, _ = importlib.import_module(TORCH_TRAINED[name]).build(quick, progress, seed)
        return net, samples, meta
    recipe = RECIPES[name]
    spec = SPECS[name]
    weights = init_weights(spec, seed=seed, bias=recipe.init_bias)
    if not recipe.bias:
        weights = {k: v for k, v in weights.items() if not k.endswith(".bias")}
    net = from_spec(spec, weights)
    x, y = recipe.train_data(quick)
    options = dict(recipe.options)
    if quick:
        options.update(recipe.quick)
    t0 = time.perf_counter()
    history = train(net, x, y, seed=seed, progress=progress, backend=backend, **options)
    seconds = time.perf_counter() - t0
    score = evaluate(name, net, backend)
    meta = {
        "name": name, "description": recipe.description, "metric": recipe.metric, "test_score": round(score, 4),
        "image_shape": None if recipe.image_shape is None else list(recipe.image_shape),
        "input_range": None if recipe.image_shape is None else [0.0, 1.0],
        "classes": recipe.classes, "train_seconds": round(seconds, 1), "final_loss": history[-1],
        "recipe": {k: (v if isinstance(v, (int, float, str)) else getattr(v, "__name__", repr(v)))
                   for k, v in options.items()},
        "train_samples": int(x.shape[0]), "seed": seed, "quick": bool(quick),
    }
    return net, recipe.samples(), meta


def _save_patterns(net, x, path, progress):
    """Fit PatternNet patterns on the training inputs and save them (without the raw sums, compressed)."""
    from .. import patterns as P

    fitted = P.fit_patterns(net, x, progress=progress)
    slim = P.Patterns({i: fitted[i] for i in fitted}, stats=None, mean_y=fitted.mean_y)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "patterns.npz"
        slim.save(raw)
        with np.load(raw, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    for k, v in arrays.items():
        if v.dtype == np.float64:
            arrays[k] = v.astype(np.float32)  # the nets are float32; halves the file
    np.savez_compressed(path, **arrays)
    return fitted


def refit_patterns(name, out=WEIGHTS_DIR, quick=False, progress=True):
    """Refit and save the patterns of the net in ``out/NAME.npz`` on its recipe's training inputs."""
    from . import load

    if not RECIPES[name].patterns:
        raise ValueError(f"zoo net {name!r} ships no patterns")
    out = Path(out)
    net = load(out / f"{name}.npz", patterns=False).net
    return _save_patterns(net, RECIPES[name].train_data(quick)[0], out / f"{name}_patterns.npz", progress)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m relprop.zoo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", help=f"zoo nets to train ({', '.join(NAMES)}) or 'all'")
    parser.add_argument("--quick", action="store_true", help="the reduced recipe (fewer epochs and samples)")
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="output folder (default: the package's zoo/weights)")
    parser.add_argument("--backend", default=None, choices=["reference", "cpu", "cuda"])
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--patterns-only", action="store_true",
                        help="keep the nets in --out and refit only their PatternNet patterns")
    args = parser.parse_args(argv)
    names = list(NAMES) if args.names == ["all"] else args.names
    for n in names:
        if n not in RECIPES:
            parser.error(f"unknown zoo net {n!r}; known: {', '.join(NAMES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.patterns_only:
        for n in [n for n in names if RECIPES[n].patterns]:
            t0 = time.perf_counter()
            refit_patterns(n, out, args.quick, not args.no_progress)
            print(f"{n}: patterns refitted in {time.perf_counter() - t0:.1f} s -> {out / f'{n}_patterns.npz'}",
                  flush=True)
        return 0
    for n in names:
        if n in TORCH_TRAINED:  # writes NAME.npz and NAME.onnx
            import importlib

            importlib.import_module(TORCH_TRAINED[n]).main(["--out", str(out)] + (["--quick"] if args.quick else [])
                                                          + (["--no-progress"] if args.no_progress else []))
            continue
        net, samples, meta = build(n, quick=args.quick, progress=not args.no_progress, backend=args.backend)
        path = out / f"{n}.npz"
        write(path, net, samples, meta)
        line = f"{n}: {meta['metric']} {meta['test_score']:.4f} (held out), trained in {meta['train_seconds']} s"
        if RECIPES[n].patterns:
            t0 = time.perf_counter()
            _save_patterns(net, RECIPES[n].train_data(args.quick)[0], out / f"{n}_patterns.npz", not args.no_progress)
            line += f", patterns fitted in {time.perf_counter() - t0:.1f} s"
        sizes = sum(os.path.getsize(p) for p in out.glob(f"{n}*.npz"))
        print(f"{line} -> {path} ({sizes / 1024:.0f} KiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
