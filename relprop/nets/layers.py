"""Layers of the thin NumPy model: Linear, Conv2d, ReLU, MaxPool2d, AvgPool2d, Flatten, SumPool.

A layer holds its parameters (PyTorch layouts: dense (out, in), conv (K, C, kh, kw)) and
knows three things: its output shape for an input shape (validating its geometry), its
forward pass, and its vector-Jacobian product (the gradient sweep).  Linear layers
(dense and conv) also expose ``forward_with`` / ``vjp_with`` taking *other* weights, so
that relevance rules can run the same layer with modified weights (W+, W², W⊙A, ...).

Everything runs through the kernels of one backend; nothing here does arithmetic of
its own beyond reshapes.
"""
from __future__ import annotations

import numpy as np

from .. import _validate as V
from .._backend import array_namespace
from ..kernels import _ops


class Layer:
    """Base class.  ``index`` is the layer's position in its net (set by Sequential)."""

    kind = "layer"
    index = -1
    #: True for layers with weights that the relevance rules act on (dense, conv)
    is_linear = False

    @property
    def where(self):
        return f"layer {self.index} ({self.kind})"

    def output_shape(self, in_shape):
        return tuple(in_shape)

    def forward(self, x, backend):
        """Return ``(y, switches)``; ``switches`` is None except for max pooling."""
        raise NotImplementedError

    def vjp(self, g, x, y, switches, backend):
        """Gradient of the output w.r.t. the input, times g (x, y: the recorded input/output)."""
        raise NotImplementedError

    def spec(self):
        return {"type": self.kind}

    def state(self):
        """Parameter dict in PyTorch's state-dict naming (without the ``i.`` prefix)."""
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.spec().items() if k != "type")
        return f"{type(self).__name__}({args})"


class _Parametric(Layer):
    """Shared parameter handling for Linear and Conv2d: per-(namespace, dtype) cached copies."""

    is_linear = True

    def __init__(self, weight, bias):
        self.weight = weight
        self.bias = bias
        self._cache = {}

    def params(self, like):
        """(w, b) in the namespace and dtype of the array ``like`` (cached; b may be None)."""
        xp = array_namespace(like)
        key = (xp.__name__, np.dtype(like.dtype).str)
        hit = self._cache.get(key)
        if hit is None:
            w = xp.ascontiguousarray(xp.asarray(self.weight, dtype=like.dtype))
            b = None if self.bias is None else xp.ascontiguousarray(xp.asarray(self.bias, dtype=like.dtype))
            hit = self._cache[key] = (w, b)
        return hit

    def set_params(self, weight, bias):
        """Replace the parameters (shapes must not change) and drop every cached copy."""
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(f"{self.where}: weight has shape {tuple(weight.shape)}, expected {tuple(self.weight.shape)}")
        if (bias is None) != (self.bias is None) or (bias is not None and tuple(bias.shape) != tuple(self.bias.shape)):
            raise ValueError(f"{self.where}: bias shape does not match")
        self.weight, self.bias = weight, bias
        self._cache.clear()

    def forward(self, x, backend):
        w, b = self.params(x)
        return self.forward_with(x, w, b, backend), None

    def vjp(self, g, x, y, switches, backend):
        w, _ = self.params(g)
        return self.vjp_with(g, w, x.shape, backend)

    def state(self):
        out = {"weight": self.weight}
        if self.bias is not None:
            out["bias"] = self.bias
        return out


class Linear(_Parametric):
    """Dense layer z = W a + b; weight (out, in), input (N, in)."""

    kind = "linear"

    def __init__(self, weight, bias=None):
        super().__init__(weight, bias)
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])

    def output_shape(self, in_shape):
        if len(in_shape) != 2 or in_shape[1] != self.in_features:
            raise ValueError(
                f"{self.where}: expects input (N, {self.in_features}), got {tuple(in_shape)}"
                + (" (add a flatten layer before it?)" if len(in_shape) != 2 else "")
            )
        return (in_shape[0], self.out_features)

    def forward_with(self, a, w, b, backend):
        return _ops.dense_forward(a, w, b, backend)

    def vjp_with(self, g, w, input_shape, backend):
        return _ops.dense_vjp(g, w, backend)

    def spec(self):
        return {"type": "linear", "in": self.in_features, "out": self.out_features}


class Conv2d(_Parametric):
    """2-D convolution; weight (K, C, kh, kw), input (N, C, H, W)."""

    kind = "conv2d"

    def __init__(self, weight, bias=None, stride=1, padding=0, dilation=1):
        super().__init__(weight, bias)
        self.in_channels = int(weight.shape[1])
        self.out_channels = int(weight.shape[0])
        self.kernel = (int(weight.shape[2]), int(weight.shape[3]))
        self.stride = V.pair("stride", stride, "conv2d", minimum=1)
        self.padding = V.pair("padding", padding, "conv2d", minimum=0)
        self.dilation = V.pair("dilation", dilation, "conv2d", minimum=1)

    def output_shape(self, in_shape):
        if len(in_shape) != 4 or in_shape[1] != self.in_channels:
            raise ValueError(f"{self.where}: expects input (N, {self.in_channels}, H, W), got {tuple(in_shape)}")
        ho, wo = V.check_window_geometry(self.where, in_shape[2:], self.kernel, self.stride, self.padding, self.dilation)
        return (in_shape[0], self.out_channels, ho, wo)

    def forward_with(self, a, w, b, backend):
        return _ops.conv2d_forward(a, w, b, self.stride, self.padding, self.dilation, backend)

    def vjp_with(self, g, w, input_shape, backend):
        return _ops.conv2d_vjp(g, w, tuple(input_shape), self.stride, self.padding, self.dilation, backend)

    def spec(self):
        return {"type": "conv2d", "in": self.in_channels, "out": self.out_channels, "kernel": list(self.kernel),
                "stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation)}


class ReLU(Layer):
    """max(z, 0).  The gradient sweep gates by the recorded input z."""

    kind = "relu"

    def forward(self, x, backend):
        return _ops.relu_forward(x, backend), None

    def vjp(self, g, x, y, switches, backend):
        return _ops.relu_backward_gradient(g, x, backend)


class _Pool(Layer):
    def __init__(self, kernel, stride=None, padding=0):
        self.kernel = V.pair("kernel", kernel, self.kind, minimum=1)
        self.stride = self.kernel if stride is None else V.pair("stride", stride, self.kind, minimum=1)
        self.padding = V.pair("padding", padding, self.kind, minimum=0)

    def output_shape(self, in_shape):
        if len(in_shape) != 4:
            raise ValueError(f"{self.where}: expects input (N, C, H, W), got {tuple(in_shape)}")
        ho, wo = V.check_window_geometry(self.where, in_shape[2:], self.kernel, self.stride, self.padding, pool=True)
        return (in_shape[0], in_shape[1], ho, wo)

    def spec(self):
        return {"type": self.kind, "kernel": list(self.kernel), "stride": list(self.stride),
                "padding": list(self.padding)}


class MaxPool2d(_Pool):
    """Max pooling; records the switches (argmax of every window) for the backward sweeps."""

    kind = "maxpool2d"

    def forward(self, x, backend):
        return _ops.maxpool2d_forward(x, self.kernel, self.stride, self.padding, backend)

    def vjp(self, g, x, y, switches, backend):
        return _ops.maxunpool2d(g, switches, x.shape, backend)


class AvgPool2d(_Pool):
    """Average pooling, padding counted (PyTorch's count_include_pad=True)."""

    kind = "avgpool2d"

    def forward(self, x, backend):
        return _ops.avgpool2d_forward(x, self.kernel, self.stride, self.padding, backend), None

    def vjp(self, g, x, y, switches, backend):
        return _ops.avgpool2d_vjp(g, x.shape, self.kernel, self.stride, self.padding, backend)


class Flatten(Layer):
    """(N, C, H, W) -> (N, C·H·W), row-major as PyTorch's nn.Flatten."""

    kind = "flatten"

    def output_shape(self, in_shape):
        return (in_shape[0], int(np.prod(in_shape[1:], dtype=np.int64)))

    def forward(self, x, backend):
        return x.reshape(x.shape[0], -1), None

    def vjp(self, g, x, y, switches, backend):
        return g.reshape(x.shape)


class SumPool(Layer):
    """Sum pooling over all features: x_k = Σ_j x_j, output (N, 1).

    The output layer of the DTD seed's detection-pooling network.  Its relevance is the
    proportional (ε) rule, R_j = x_j R_k / x_k, i.e. R_j = x_j when R_k = x_k.
    """

    kind = "sumpool"

    def output_shape(self, in_shape):
        if len(in_shape) != 2:
            raise ValueError(f"{self.where}: expects input (N, D), got {tuple(in_shape)}")
        return (in_shape[0], 1)

    def forward(self, x, backend):
        return x.sum(axis=1, keepdims=True), None

    def vjp(self, g, x, y, switches, backend):
        xp = array_namespace(g)
        return xp.ascontiguousarray(xp.broadcast_to(g, x.shape))


LAYER_TYPES = {cls.kind: cls for cls in (Linear, Conv2d, ReLU, MaxPool2d, AvgPool2d, Flatten, SumPool)}
