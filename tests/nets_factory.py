"""Small random nets shared by the tests."""
import numpy as np

import relprop


def random_weights(spec, rng, dtype=np.float64, bias=True, scale=None):
    weights = {}
    for i, layer in enumerate(spec):
        if layer["type"] == "linear":
            shape = (layer["out"], layer["in"])
        elif layer["type"] == "conv2d":
            k = layer["kernel"]
            kh, kw = (k, k) if np.isscalar(k) else k
            shape = (layer["out"], layer["in"], kh, kw)
        else:
            continue
        fan_in = int(np.prod(shape[1:]))
        s = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        weights[f"{i}.weight"] = (rng.normal(size=shape) * s * 1.5).astype(dtype)
        if bias:
            weights[f"{i}.bias"] = (rng.normal(size=shape[0]) * 0.1).astype(dtype)
    return weights


def small_conv_spec(c=2, h=9, w=8, classes=4):
    """conv(pad, stride 1) -> relu -> maxpool(3, stride 2: windows overlap) -> conv(stride 2) -> relu
    -> avgpool(2, stride 1, pad 1) -> flatten -> linear -> relu -> linear."""
    spec = [
        {"type": "conv2d", "in": c, "out": 3, "kernel": 3, "stride": 1, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel": 3, "stride": 2},
        {"type": "conv2d", "in": 3, "out": 4, "kernel": [2, 1], "stride": [1, 2], "padding": [0, 1]},
        {"type": "relu"},
        {"type": "avgpool2d", "kernel": 2, "stride": 1, "padding": 1},
        {"type": "flatten"},
    ]
    net = relprop.from_spec(spec, random_weights(spec, np.random.default_rng(0)))
    flat = net.shapes((1, c, h, w))[-1][1]
    spec += [{"type": "linear", "in": flat, "out": 7}, {"type": "relu"}, {"type": "linear", "in": 7, "out": classes}]
    return spec


def small_dense_spec(d=6, classes=3):
    return [{"type": "linear", "in": d, "out": 5}, {"type": "relu"}, {"type": "linear", "in": 5, "out": 4},
            {"type": "relu"}, {"type": "linear", "in": 4, "out": classes}]


def make_net(spec, seed=0, dtype=np.float64, bias=True):
    return relprop.from_spec(spec, random_weights(spec, np.random.default_rng(seed), dtype, bias))
