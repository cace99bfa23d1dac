"""Train the zoo's ``digits_resnet`` with PyTorch: ``python -m relprop.zoo.train_resnet [--quick] [--out DIR]``.

A small residual net with BatchNorm on the scikit-learn digits upsampled to 1×28×28:

    conv 3×3 (8) → BN → ReLU → max-pool 2                      14×14
    BasicBlock(8):  conv-BN-ReLU-conv-BN + identity → ReLU        14×14
    BasicBlock(16, stride 2): same, skip = 1×1 conv (stride 2)-BN  7×7
    global average pool → linear 16 → 10

relprop's own trainer (:mod:`relprop.nets.train`) trains chains of dense/conv layers; a net
with residual adds and BatchNorm is trained with PyTorch (the ``peers`` extra) and comes in
through :func:`relprop.from_torch` -- the route the zoo shows for real models.  The run is
seeded (torch's generator, the numpy shuffling and shift augmentation, one torch thread for
the order of the float sums).  It writes ``DIR/digits_resnet.npz`` (the zoo format) and
``DIR/digits_resnet.onnx`` (the same net as an ONNX file, BatchNorm kept as nodes).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

NAME = "digits_resnet"
DESCRIPTION = ("small residual net with BatchNorm (conv-BN stem, two BasicBlocks, global average pooling) on the "
               "scikit-learn digits upsampled to 1x28x28, trained with PyTorch and imported with from_torch")
RECIPE = dict(epochs=30, batch_size=64, lr=1e-2, weight_decay=1e-4, optimizer="adamw", augment="_shift",
              schedule="cosine")
QUICK = dict(epochs=10)


def torch_model():
    """The PyTorch module (torchvision's BasicBlock structure, widths 8 and 16)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            skip = x if self.downsample is None else self.downsample(x)
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + skip)

    class DigitsResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.pool = nn.MaxPool2d(2)
            self.layer1 = Block(8, 8, 1)
            self.layer2 = Block(8, 16, 2)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = self.pool(torch.relu(self.bn1(self.conv1(x))))
            x = self.layer2(self.layer1(x))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return DigitsResNet()


def train_torch(quick=False, seed=0, progress=True):
    """Train the PyTorch module on the digits' training split; returns it in eval mode."""
    import torch

    from ..nets import data
    from .train import _shift

    options = dict(RECIPE, **(QUICK if quick else {}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fixed order of the float sums: the run reproduces
    try:
        torch.manual_seed(seed)
        model = torch_model()
        x, y = data.digits("train", 28)
        rng = np.random.default_rng(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=options["lr"], weight_decay=options["weight_decay"])
        steps = options["epochs"] * -(-len(x) // options["batch_size"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()
        for epoch in range(options["epochs"]):
            order = rng.permutation(len(x))
            xs = _shift(x[order], rng)
            total = 0.0
            for k in range(0, len(x), options["batch_size"]):
                xb = torch.from_numpy(xs[k:k + options["batch_size"]])
                yb = torch.from_numpy(y[order[k:k + options["batch_size"]]])
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(xb)
            if progress:
                print(f"  epoch {epoch + 1}/{options['epochs']}: loss {total / len(x):.4f}", file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), options, float(total / len(x))


def build(quick=False, progress=True, seed=0):
    """Train and import: ``(net, samples, meta, onnx_bytes)``."""
    from ..io.onnx import from_onnx
    from ..io.torch import to_onnx
    from ..nets import data
    from .train import _digit_samples, evaluate

    t0 = time.perf_counter()
    model, options, final_loss = train_torch(quick, seed, progress)
    seconds = time.perf_counter() - t0
    x_test, _ = data.digits("test", 28)
    onnx_bytes = to_onnx(model, x_test[:1])
    net = from_onnx(onnx_bytes)
    score = evaluate(NAME, net)
    meta = {
        "name": NAME, "description": DESCRIPTION, "metric": "accuracy", "test_score": round(score, 4),
        "image_shape": [1, 28, 28], "input_range": [0.0, 1.0], "classes": [str(c) for c in range(10)],
        "train_seconds": round(seconds, 1), "final_loss": final_loss, "recipe": dict(options, trainer="torch"),
        "train_samples": int(data.digits("train", 28)[0].shape[0]), "seed": seed, "quick": bool(quick),
    }
    return net, _digit_samples(28), meta, onnx_bytes


def main(argv=None):
    from . import WEIGHTS_DIR, write

    parser = argparse.ArgumentParser(prog="python -m relprop.zoo.train_resnet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"the reduced recipe ({QUICK['epochs']} epochs)")
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="output folder (default: the package's zoo/weights)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net, samples, meta, onnx_bytes = build(quick=args.quick, progress=not args.no_progress)
    write(out / f"{NAME}.npz", net, samples, meta)
    (out / f"{NAME}.onnx").write_bytes(onnx_bytes)
    print(f"{NAME}: accuracy {meta['test_score']:.4f} (held out), trained in {meta['train_seconds']} s -> "
          f"{out / NAME}.npz, {out / NAME}.onnx ({len(onnx_bytes) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
