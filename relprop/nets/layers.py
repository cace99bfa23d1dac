"""Layers of the thin NumPy model.

Linear, Conv2d, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, SumPool, BatchNorm
(1d/2d, inference), Identity, Dropout (identity at inference), and the graph joins Add and
Concat.

A layer holds its parameters (PyTorch layouts: dense (out, in), conv (K, C, kh, kw)) and
knows three things: its output shape for an input shape (validating its geometry), its
forward pass, and its vector-Jacobian product (the gradient sweep).  Parametric layers
(dense, conv, batch norm) also expose ``forward_with`` / ``vjp_with`` taking *other*
weights, so that relevance rules can run the same layer with modified weights (W+, W²,
W⊙A, ...).  Joins (``n_inputs`` is None: any number ≥ 2) take and return lists.

Everything runs through the kernels of one backend; nothing here does arithmetic of
its own beyond reshapes.
"""
from __future__ import annotations

import numpy as np

from .. import _validate as V
from .._backend import array_namespace
from ..kernels import _ops


class Layer:
    """Base class.  ``index`` is the layer's position in its net (set by the net)."""

    kind = "layer"
    index = -1
    #: True for dense and conv layers (the ones composites assign rules to, and patterns are fitted for)
    is_linear = False
    #: True for layers with ``params`` / ``forward_with`` / ``vjp_with`` (dense, conv, batch norm)
    parametric = False
    #: inputs the layer takes: 1, or None for a join (add, concat) of two or more
    n_inputs = 1
    #: incremented whenever the parameters change (caches of modified weights key on it)
    version = 0

    @property
    def where(self):
        return f"layer {self.index} ({self.kind})"

    def output_shape(self, in_shape):
        return tuple(in_shape)

    def forward(self, x, backend):
        """Return ``(y, aux)``; ``aux`` is None except for max pooling (its switches)."""
        raise NotImplementedError

    def vjp(self, g, x, y, aux, backend):
        """Gradient of the output w.r.t. the input, times g (x, y, aux: as recorded by the forward).

        A join returns one array per input (the same object may appear several times)."""
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
    parametric = True

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
        self.version += 1

    def forward(self, x, backend):
        w, b = self.params(x)
        return self.forward_with(x, w, b, backend), None

    def vjp(self, g, x, y, aux, backend):
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

    def forward_relu(self, x, backend, keep_z=True):
        """This layer and a ReLU after it in one call: ``(z, relu(z))`` (z None without ``keep_z``);
        the graph uses it for a conv whose only reader is a ReLU (the CPU kernels fuse the two)."""
        z, a, _ = self.forward_also(x, backend, (), relu=True, keep_z=keep_z)
        return z, a

    def forward_also(self, x, backend, also, relu=False, keep_z=True):
        """The forward (with ``relu``, :meth:`forward_relu`'s pair) and, in the same kernel call, the
        layer's forward with other parameters, ``(w', b')`` per entry of ``also``: ``(z, a, [z', ...])``.
        An LRP sweep gets its rules' modified forwards (z⁺ = W⁺a + b⁺) this way while it traces."""
        w, b = self.params(x)
        return _ops.conv2d_forward_also(x, w, b, self.stride, self.padding, self.dilation, backend, also, relu=relu,
                                        keep_z=keep_z)

    def forward_relu_pool(self, x, backend, switches=False, also=(), at_switches=False):
        """This layer, a ReLU and a 2x2 stride-2 unpadded max-pool after it, the pooled maxima alone, in
        one call: the graph's forward that keeps no record runs such a triple this way (the CPU kernels
        then never write z).  ``switches=True``: ``(maxima, switches, [z', ...])``, the pool's switches
        and this layer's forward with the parameters ``also`` (:meth:`forward_also`), for a trace that
        records them without the full-size z and ReLU output; ``at_switches``: the ``also`` forwards at the
        switches only (shaped like the maxima)."""
        w, b = self.params(x)
        return _ops.conv2d_relu_maxpool2x2(x, w, b, self.stride, self.padding, self.dilation, backend,
                                           switches=switches, also=also, at_switches=at_switches)

    @staticmethod
    def forward_relu_pool_chain(convs, x, backend):
        """:meth:`forward_relu_pool` of the convolutions ``convs`` in a chain, each triple reading the pooled
        output of the one before (LeNet-5's feature stack), in one kernel call: the last pooled maxima (the
        CPU kernel runs each block of samples through every triple in one pass, see
        :func:`relprop.kernels.cpu.conv2d.conv2d_relu_maxpool2x2_chain`)."""
        stages = [conv.params(x) + (conv.stride, conv.padding, conv.dilation) for conv in convs]
        return _ops.conv2d_relu_maxpool2x2_chain(x, stages, backend)

    def vjp_with(self, g, w, input_shape, backend):
        return _ops.conv2d_vjp(g, w, tuple(input_shape), self.stride, self.padding, self.dilation, backend)

    def relevance_with(self, r, z, epsilon, w, a, backend):
        """a ⊙ Wᵀ(r / stab(z)) with weights ``w``: an LRP rule's backward for one term, in one kernel call
        (:func:`relprop.kernels.cpu.conv2d.conv2d_relevance`); z None: a ⊙ Wᵀr (r divided already)."""
        return _ops.conv2d_relevance(r, z, epsilon, w, a, self.stride, self.padding, self.dilation, backend)

    def vjp_unpooled(self, g, switches, w, a, input_shape, backend):
        """Wᵀ unpool(g) (⊙ a unless a is None) with weights ``w``, g and ``switches`` the pooled side of a 2x2
        stride-2 max-pool above this layer (and its ReLU): the backward of such a triple from above the
        pool, in one kernel call (:func:`relprop.kernels.cpu.conv2d.conv2d_unpool_vjp`)."""
        return _ops.conv2d_unpool_vjp(g, switches, w, a, tuple(input_shape), self.stride, self.padding, self.dilation,
                                      backend)

    def spec(self):
        return {"type": "conv2d", "in": self.in_channels, "out": self.out_channels, "kernel": list(self.kernel),
                "stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation)}


class ReLU(Layer):
    """max(z, 0).  The gradient sweep gates by the recorded input z."""

    kind = "relu"

    def forward(self, x, backend):
        return _ops.relu_forward(x, backend), None

    def vjp(self, g, x, y, aux, backend):
        # gate by z > 0, or by relu(z) > 0 (the same gate) where the trace did not keep z
        return _ops.relu_backward_gradient(g, y if x is None else x, backend)


class _Pool(Layer):
    def __init__(self, kernel, stride=None, padding=0, ceil_mode=False):
        self.kernel = V.pair("kernel", kernel, self.kind, minimum=1)
        self.stride = self.kernel if stride is None else V.pair("stride", stride, self.kind, minimum=1)
        self.padding = V.pair("padding", padding, self.kind, minimum=0)
        if not isinstance(ceil_mode, (bool, np.bool_)):
            raise ValueError(f"{self.kind}: ceil_mode={ceil_mode!r} is invalid; expected True or False")
        self.ceil_mode = bool(ceil_mode)

    def output_shape(self, in_shape):
        if len(in_shape) != 4:
            raise ValueError(f"{self.where}: expects input (N, C, H, W), got {tuple(in_shape)}")
        ho, wo = V.check_window_geometry(self.where, in_shape[2:], self.kernel, self.stride, self.padding, pool=True,
                                         ceil_mode=self.ceil_mode)
        return (in_shape[0], in_shape[1], ho, wo)

    def spec(self):
        out = {"type": self.kind, "kernel": list(self.kernel), "stride": list(self.stride),
               "padding": list(self.padding)}
        if self.ceil_mode:
            out["ceil_mode"] = True
        return out


class MaxPool2d(_Pool):
    """Max pooling, -inf padding, floor or ceil mode (PyTorch's MaxPool2d); records the switches
    (argmax of every window) for the backward sweeps.

    In ceil mode the last windows may run past the padded input; the input is then extended
    with -inf on the bottom/right (never a maximum) and the switches index that extended plane.
    """

    kind = "maxpool2d"

    def _extension(self, shape):
        """Rows/cols of -inf to add at the bottom/right so that every window fits (ceil mode)."""
        ho, wo = self.output_shape(shape)[2:]
        return tuple(max(0, (o - 1) * s + k - (n + 2 * p))
                     for o, s, k, n, p in zip((ho, wo), self.stride, self.kernel, shape[2:], self.padding))

    def forward(self, x, backend, switches=True):
        """``(y, switches)``; ``switches=False`` (a forward that keeps no record): ``(y, None)``."""
        eh, ew = self._extension(x.shape) if self.ceil_mode else (0, 0)
        if eh or ew:
            xp = array_namespace(x)
            x = xp.pad(x, ((0, 0), (0, 0), (0, eh), (0, ew)), constant_values=-np.inf)
        return _ops.maxpool2d_forward(x, self.kernel, self.stride, self.padding, backend, switches)

    def vjp(self, g, x, y, aux, backend):
        eh, ew = self._extension(x.shape) if self.ceil_mode else (0, 0)
        if not (eh or ew):
            return _ops.maxunpool2d(g, aux, x.shape, backend)
        n, c, h, w = x.shape
        full = _ops.maxunpool2d(g, aux, (n, c, h + eh, w + ew), backend)
        return array_namespace(g).ascontiguousarray(full[:, :, :h, :w])


class AvgPool2d(_Pool):
    """Average pooling, padding counted (PyTorch's count_include_pad=True), floor mode."""

    kind = "avgpool2d"

    def __init__(self, kernel, stride=None, padding=0, ceil_mode=False):
        super().__init__(kernel, stride, padding, ceil_mode)
        if self.ceil_mode:
            raise ValueError("avgpool2d: ceil_mode=True is not supported (PyTorch's divisor at clipped "
                             "windows differs); expected ceil_mode=False")

    def forward(self, x, backend):
        return _ops.avgpool2d_forward(x, self.kernel, self.stride, self.padding, backend), None

    def vjp(self, g, x, y, aux, backend):
        return _ops.avgpool2d_vjp(g, x.shape, self.kernel, self.stride, self.padding, backend)


def adaptive_bins(size, out):
    """PyTorch's adaptive-pooling bins along one axis: [⌊i·size/out⌋, ⌈(i+1)·size/out⌉) for i < out."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


class AdaptiveAvgPool2d(Layer):
    r"""Adaptive average pooling to ``output_size`` (PyTorch's bin edges).

    Output bin (i, j) averages rows :math:`\lfloor iH/h_o \rfloor .. \lceil (i+1)H/h_o \rceil - 1` and
    the same for columns; bins may overlap when the size does not divide.  Output size 1 is
    global average pooling.  When the bins tile the input it runs as an average pool.
    """

    kind = "adaptive_avgpool2d"

    def __init__(self, output_size):
        self.output_size = V.pair("output_size", output_size, self.kind, minimum=1)

    def output_shape(self, in_shape):
        if len(in_shape) != 4:
            raise ValueError(f"{self.where}: expects input (N, C, H, W), got {tuple(in_shape)}")
        return (in_shape[0], in_shape[1]) + self.output_size

    def _tiling(self, hw):
        """(kernel, stride) when the bins tile the input exactly (an average pool), else None."""
        if all(n % o == 0 for n, o in zip(hw, self.output_size)):
            k = tuple(n // o for n, o in zip(hw, self.output_size))
            return k, k
        return None

    def forward(self, x, backend):
        tiling = self._tiling(x.shape[2:])
        if tiling is not None:
            return _ops.avgpool2d_forward(x, tiling[0], tiling[1], (0, 0), backend), None
        xp = array_namespace(x)
        out = xp.empty(self.output_shape(x.shape), dtype=x.dtype)
        for i, (r0, r1) in enumerate(adaptive_bins(x.shape[2], self.output_size[0])):
            for j, (c0, c1) in enumerate(adaptive_bins(x.shape[3], self.output_size[1])):
                out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
        return out, None

    def vjp(self, g, x, y, aux, backend):
        tiling = self._tiling(x.shape[2:])
        if tiling is not None:
            return _ops.avgpool2d_vjp(g, x.shape, tiling[0], tiling[1], (0, 0), backend)
        xp = array_namespace(g)
        out = xp.zeros(x.shape, dtype=g.dtype)
        for i, (r0, r1) in enumerate(adaptive_bins(x.shape[2], self.output_size[0])):
            for j, (c0, c1) in enumerate(adaptive_bins(x.shape[3], self.output_size[1])):
                out[:, :, r0:r1, c0:c1] += g[:, :, i:i + 1, j:j + 1] / ((r1 - r0) * (c1 - c0))
        return out

    def spec(self):
        return {"type": self.kind, "output_size": list(self.output_size)}


class Flatten(Layer):
    """(N, C, H, W) -> (N, C·H·W), row-major as PyTorch's nn.Flatten."""

    kind = "flatten"

    def output_shape(self, in_shape):
        return (in_shape[0], int(np.prod(in_shape[1:], dtype=np.int64)))

    def forward(self, x, backend):
        return x.reshape(x.shape[0], -1), None

    def vjp(self, g, x, y, aux, backend):
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

    def vjp(self, g, x, y, aux, backend):
        xp = array_namespace(g)
        return xp.ascontiguousarray(xp.broadcast_to(g, x.shape))


class Identity(Layer):
    """y = x (also what a dropout layer is at inference, and what a folded batch norm leaves)."""

    kind = "identity"

    def forward(self, x, backend):
        return x, None

    def vjp(self, g, x, y, aux, backend):
        return g


class Dropout(Identity):
    """Dropout at inference: the identity.  ``p`` is kept for the record only."""

    kind = "dropout"

    def __init__(self, p=0.5):
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0 <= p < 1:
            raise ValueError(f"dropout: p={p!r} is invalid; expected a number in [0, 1)")
        self.p = float(p)

    def spec(self):
        return {"type": self.kind, "p": self.p}


class BatchNorm(Layer):
    r"""Batch normalisation at inference, as a per-channel affine map.

    .. math:: y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta
              = s \odot x + t, \qquad s = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \; t = \beta - \mu s

    ``params`` returns (s, t), so the relevance rules treat it as a linear layer with a
    diagonal weight (a batch norm with no conv/linear right before it); one right after a
    conv/linear is folded into it for the relevance methods (:func:`relprop.nets.canonical`).
    PyTorch's state-dict names: weight (γ), bias (β), running_mean (μ), running_var (σ²).
    """

    parametric = True

    def __init__(self, weight, bias, running_mean, running_var, eps=1e-5):
        self.features = int(running_mean.shape[0])
        self.weight, self.bias = weight, bias
        self.running_mean, self.running_var = running_mean, running_var
        if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not eps > 0 \
                or not np.isfinite(eps):
            raise ValueError(f"{self.kind}: eps={eps!r} is invalid; expected a finite number > 0")
        self.eps = float(eps)
        self._cache = {}

    def _in_shape_ok(self, in_shape):
        return len(in_shape) == self.ndim and in_shape[1] == self.features

    def output_shape(self, in_shape):
        if not self._in_shape_ok(in_shape):
            want = "(N, {0}, H, W)" if self.ndim == 4 else "(N, {0})"
            raise ValueError(f"{self.where}: expects input {want.format(self.features)}, got {tuple(in_shape)}")
        return tuple(in_shape)

    def scale_shift(self):
        """(s, t) in float64 on the host: y = s ⊙ x + t per channel."""
        var = np.asarray(self.running_var, dtype=np.float64)
        s = (1.0 if self.weight is None else np.asarray(self.weight, np.float64)) / np.sqrt(var + self.eps)
        s = np.broadcast_to(s, var.shape)
        t = (0.0 if self.bias is None else np.asarray(self.bias, np.float64)) - np.asarray(self.running_mean,
                                                                                           np.float64) * s
        return np.ascontiguousarray(s), np.ascontiguousarray(t)

    def params(self, like):
        """(s, t) in the namespace and dtype of ``like`` (cached)."""
        xp = array_namespace(like)
        key = (xp.__name__, np.dtype(like.dtype).str)
        hit = self._cache.get(key)
        if hit is None:
            s, t = self.scale_shift()
            hit = self._cache[key] = (xp.asarray(s, dtype=like.dtype), xp.asarray(t, dtype=like.dtype))
        return hit

    def _channel(self, v, x):
        return v.reshape((1, -1) + (1,) * (x.ndim - 2))

    def forward_with(self, x, w, b, backend):
        y = x * self._channel(w, x)
        if b is not None:
            y += self._channel(b, x)
        return y

    def vjp_with(self, g, w, input_shape, backend):
        return g * self._channel(w, g)

    def forward(self, x, backend):
        s, t = self.params(x)
        return self.forward_with(x, s, t, backend), None

    def vjp(self, g, x, y, aux, backend):
        return self.vjp_with(g, self.params(g)[0], x.shape, backend)

    def set_params(self, weight=None, bias=None, running_mean=None, running_var=None):
        """Replace some of γ, β, μ, σ² (shapes must not change) and drop every cached copy."""
        for name, value in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                            ("running_var", running_var)):
            if value is None:
                continue
            if tuple(np.shape(value)) != (self.features,):
                raise ValueError(f"{self.where}: {name} has shape {tuple(np.shape(value))}, "
                                 f"expected ({self.features},)")
            setattr(self, name, value)
        if (np.asarray(self.running_var) < 0).any():
            raise ValueError(f"{self.where}: running_var has negative entries; expected a variance >= 0")
        self._cache.clear()
        self.version += 1

    def state(self):
        out = {"running_mean": self.running_mean, "running_var": self.running_var}
        if self.weight is not None:
            out["weight"] = self.weight
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def spec(self):
        return {"type": self.kind, "features": self.features, "eps": self.eps}


class BatchNorm2d(BatchNorm):
    """Batch norm over the channels of (N, C, H, W)."""

    kind = "batchnorm2d"
    ndim = 4


class BatchNorm1d(BatchNorm):
    """Batch norm over the features of (N, D)."""

    kind = "batchnorm1d"
    ndim = 2


class Add(Layer):
    """y = Σ_m x_m over two or more inputs of one shape (a residual join)."""

    kind = "add"
    n_inputs = None

    def output_shape(self, in_shapes):
        first = tuple(in_shapes[0])
        for k, shape in enumerate(in_shapes[1:], 1):
            if tuple(shape) != first:
                raise ValueError(f"{self.where}: input {k} has shape {tuple(shape)}, expected {first} "
                                 "(the shape of input 0: add needs equal shapes)")
        return first

    def forward(self, xs, backend):
        y = xs[0] + xs[1]
        for x in xs[2:]:
            y += x
        return y, None

    def vjp(self, g, xs, y, aux, backend):
        return [g] * len(xs)


class Concat(Layer):
    """Concatenation of two or more inputs along the channel/feature axis 1."""

    kind = "concat"
    n_inputs = None

    def __init__(self, axis=1):
        if isinstance(axis, bool) or axis != 1:
            raise ValueError(f"concat: axis={axis!r} is invalid; relprop concatenates along axis 1 (channels or "
                             "features)")
        self.axis = 1

    def output_shape(self, in_shapes):
        first = tuple(in_shapes[0])
        for k, shape in enumerate(in_shapes[1:], 1):
            if len(shape) != len(first) or tuple(shape[:1]) + tuple(shape[2:]) != first[:1] + first[2:]:
                raise ValueError(f"{self.where}: input {k} has shape {tuple(shape)}, which does not match "
                                 f"{first} outside axis 1")
        return first[:1] + (sum(int(s[1]) for s in in_shapes),) + first[2:]

    def forward(self, xs, backend):
        return array_namespace(xs[0]).concatenate(xs, axis=1), None

    def vjp(self, g, xs, y, aux, backend):
        xp = array_namespace(g)
        out, start = [], 0
        for x in xs:
            out.append(xp.ascontiguousarray(g[:, start:start + x.shape[1]]))
            start += x.shape[1]
        return out

    def spec(self):
        return {"type": self.kind, "axis": 1}


LAYER_TYPES = {cls.kind: cls for cls in (Linear, Conv2d, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten,
                                         SumPool, Identity, Dropout, BatchNorm2d, BatchNorm1d, Add, Concat)}
