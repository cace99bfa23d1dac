"""The benchmark nets, shared by every bench file: LeNet-5 (1x28x28), the CIFAR-VGG net (3x32x32)
and VGG-16's shape (3x224x224).

CIFAR-VGG: conv3x3 pad 1 3->64, 64->64, maxpool 2, 64->128, 128->128, maxpool 2, 128->256,
256->256, maxpool 2, flatten, fc 4096->512, fc 512->10; ReLU after every conv and the first fc.
Random He-scaled weights (seeded), float32.
"""
import time

import numpy as np

import relprop

LENET5_SPEC = [
    {"type": "conv2d", "in": 1, "out": 6, "kernel": 5}, {"type": "relu"}, {"type": "maxpool2d", "kernel": 2},
    {"type": "conv2d", "in": 6, "out": 16, "kernel": 5}, {"type": "relu"}, {"type": "maxpool2d", "kernel": 2},
    {"type": "flatten"}, {"type": "linear", "in": 256, "out": 120}, {"type": "relu"},
    {"type": "linear", "in": 120, "out": 84}, {"type": "relu"}, {"type": "linear", "in": 84, "out": 10},
]


def cifar_vgg_spec():
    """The CIFAR-VGG layer spec (see the module doc)."""
    spec, c = [], 3
    for block in ((64, 64), (128, 128), (256, 256)):
        for k in block:
            spec += [{"type": "conv2d", "in": c, "out": k, "kernel": 3, "padding": 1}, {"type": "relu"}]
            c = k
        spec.append({"type": "maxpool2d", "kernel": 2})
    return spec + [{"type": "flatten"}, {"type": "linear", "in": 4096, "out": 512}, {"type": "relu"},
                   {"type": "linear", "in": 512, "out": 10}]


def vgg16_spec(n_classes=1000):
    """VGG-16's layers (Simonyan & Zisserman 2015, configuration D): 13 conv3x3/pad1 + ReLU in five
    blocks, each closed by a 2x2 max-pool, then fc 25088-4096-4096-``n_classes`` (no dropout)."""
    spec, c = [], 3
    for block in ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)):
        for k in block:
            spec += [{"type": "conv2d", "in": c, "out": k, "kernel": 3, "padding": 1}, {"type": "relu"}]
            c = k
        spec.append({"type": "maxpool2d", "kernel": 2})
    return spec + [{"type": "flatten"}, {"type": "linear", "in": 512 * 7 * 7, "out": 4096}, {"type": "relu"},
                   {"type": "linear", "in": 4096, "out": 4096}, {"type": "relu"},
                   {"type": "linear", "in": 4096, "out": n_classes}]


#: name: (spec, per-sample input shape, the issue's benchmark batch)
PEER_NETS = {
    "lenet5": (LENET5_SPEC, (1, 28, 28), 256),
    "cifar_vgg": (cifar_vgg_spec(), (3, 32, 32), 64),
    "vgg16": (vgg16_spec(), (3, 224, 224), 4),
}


def forward_flops(spec, shape, batch):
    """Multiply-add FLOPs (2 per multiply-add) of one forward of ``spec`` on ``batch`` inputs of ``shape``
    (its dense and conv layers; stride 1 convs, pools with stride = kernel, as every net here)."""
    flops, shape = 0, tuple(shape)
    for e in spec:
        if e["type"] == "conv2d":
            k, p = e["kernel"], e.get("padding", 0)
            shape = (e["out"], shape[1] + 2 * p - k + 1, shape[2] + 2 * p - k + 1)
            flops += 2 * e["in"] * k * k * int(np.prod(shape))
        elif e["type"] == "maxpool2d":
            shape = (shape[0], shape[1] // e["kernel"], shape[2] // e["kernel"])
        elif e["type"] == "flatten":
            shape = (int(np.prod(shape)),)
        elif e["type"] == "linear":
            flops += 2 * e["in"] * e["out"]
            shape = (e["out"],)
    return flops * batch


def random_weights(spec, seed=0):
    """He-scaled float32 weights and small biases for every dense/conv layer of ``spec``."""
    rng = np.random.default_rng(seed)
    weights = {}
    for i, layer in enumerate(spec):
        if layer["type"] == "conv2d":
            shape = (layer["out"], layer["in"], layer["kernel"], layer["kernel"])
        elif layer["type"] == "linear":
            shape = (layer["out"], layer["in"])
        else:
            continue
        fan_in = int(np.prod(shape[1:]))
        weights[f"{i}.weight"] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        weights[f"{i}.bias"] = (rng.normal(size=shape[0]) * 0.01).astype(np.float32)
    return weights


def random_net(spec, seed=0):
    """A relprop net of ``spec`` with :func:`random_weights`."""
    return relprop.from_spec(spec, random_weights(spec, seed))


def best(fn, repeat):
    """The fastest of ``repeat`` timed calls of ``fn`` (seconds)."""
    fastest = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        fastest = min(fastest, time.perf_counter() - t0)
    return fastest


def torch_model(spec, weights=None, device="cpu"):
    """``spec`` (conv2d / linear / maxpool2d / relu / flatten) as a torch ``nn.Sequential`` in float32, eval
    mode, on ``device``, with ``weights`` (state-dict names, as :func:`random_weights`) copied exactly."""
    import torch

    nn, mods = torch.nn, []
    for e in spec:
        if e["type"] == "conv2d":
            mods.append(nn.Conv2d(e["in"], e["out"], e["kernel"], padding=e.get("padding", 0)))
        elif e["type"] == "linear":
            mods.append(nn.Linear(e["in"], e["out"]))
        elif e["type"] == "maxpool2d":
            mods.append(nn.MaxPool2d(e["kernel"], e.get("stride")))
        else:
            mods.append({"relu": nn.ReLU, "flatten": nn.Flatten}[e["type"]]())
    model = nn.Sequential(*mods).float().eval()
    if weights is not None:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return model.to(device)
