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


def _conv(cin, cout, k, stride=1, padding=0, inputs=None):
    entry = {"type": "conv2d", "in": cin, "out": cout, "kernel": k, "stride": stride, "padding": padding}
    if inputs is not None:
        entry["inputs"] = inputs
    return entry


def residual_spec(c=3, width=4, classes=5):
    """A small ResNet: stem conv-BN-ReLU, then two basic blocks — conv-BN-ReLU-conv-BN plus a skip
    (identity in the first, a strided 1x1 conv-BN downsample in the second) -> add -> ReLU —,
    global average pooling, flatten, linear.  Indices in the comments."""
    w2 = 2 * width
    return [
        _conv(c, width, 3, padding=1),                          # 0 stem
        {"type": "batchnorm2d", "features": width},             # 1
        {"type": "relu"},                                       # 2
        _conv(width, width, 3, padding=1),                      # 3 block 1
        {"type": "batchnorm2d", "features": width},             # 4
        {"type": "relu"},                                       # 5
        _conv(width, width, 3, padding=1),                      # 6
        {"type": "batchnorm2d", "features": width},             # 7
        {"type": "add", "inputs": [7, 2]},                      # 8 identity skip
        {"type": "relu"},                                       # 9
        _conv(width, w2, 3, stride=2, padding=1),               # 10 block 2
        {"type": "batchnorm2d", "features": w2},                # 11
        {"type": "relu"},                                       # 12
        _conv(w2, w2, 3, padding=1),                            # 13
        {"type": "batchnorm2d", "features": w2},                # 14
        _conv(width, w2, 1, stride=2, inputs=[9]),              # 15 downsample skip
        {"type": "batchnorm2d", "features": w2},                # 16
        {"type": "add", "inputs": [14, 16]},                    # 17
        {"type": "relu"},                                       # 18
        {"type": "adaptive_avgpool2d", "output_size": 1},       # 19
        {"type": "flatten"},                                    # 20
        {"type": "linear", "in": w2, "out": classes},           # 21
    ]


def concat_spec(c=2, classes=3):
    """Two branches from the input (3x3 conv-ReLU and 1x1 conv-ReLU-maxpool(3, pad 1, stride 1)), concatenated,
    then conv-ReLU, adaptive average pooling to 2x2 (non-tiling on odd sizes), flatten, linear."""
    return [
        _conv(c, 3, 3, padding=1),                                          # 0 branch a
        {"type": "relu"},                                                   # 1
        _conv(c, 2, 1, inputs=["input"]),                                   # 2 branch b
        {"type": "relu"},                                                   # 3
        {"type": "maxpool2d", "kernel": 3, "stride": 1, "padding": 1},      # 4
        {"type": "concat", "axis": 1, "inputs": [1, 4]},                    # 5
        _conv(5, 4, 3, padding=1),                                          # 6
        {"type": "relu"},                                                   # 7
        {"type": "adaptive_avgpool2d", "output_size": 2},                   # 8
        {"type": "flatten"},                                                # 9
        {"type": "linear", "in": 16, "out": classes},                       # 10
    ]


def graph_weights(spec, rng, dtype=np.float64):
    """Random dense/conv weights plus BatchNorm statistics far from identity (so folding matters)."""
    weights = random_weights(spec, rng, dtype)
    for i, layer in enumerate(spec):
        if layer["type"].startswith("batchnorm"):
            c = layer["features"]
            weights[f"{i}.weight"] = rng.uniform(0.5, 1.5, c).astype(dtype)
            weights[f"{i}.bias"] = rng.normal(0, 0.2, c).astype(dtype)
            weights[f"{i}.running_mean"] = rng.normal(0, 0.3, c).astype(dtype)
            weights[f"{i}.running_var"] = rng.uniform(0.5, 2.0, c).astype(dtype)
    return weights
