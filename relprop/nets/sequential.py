"""Sequential: a list of layers, a forward pass, a traced forward and the gradient sweep."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import _validate as V
from .._backend import array_namespace, resolve_backend
from .layers import Layer


@dataclass
class Trace:
    """What one traced forward pass recorded: everything the backward sweeps need.

    ``inputs[i]`` is the input of layer i (so ``inputs[0]`` is the net input and, for a
    ReLU, its input is the pre-activation z), ``output`` the net output (logits),
    ``switches[i]`` the max-pool switches of layer i, ``backend`` the resolved backend.
    """

    inputs: list
    output: object
    switches: dict = field(default_factory=dict)
    backend: str = "cpu"

    def layer_output(self, i):
        """Output of layer i (= input of layer i + 1)."""
        return self.inputs[i + 1] if i + 1 < len(self.inputs) else self.output


class Sequential:
    """A feed-forward net of :mod:`relprop.nets.layers` layers.

    Parameters
    ----------
    layers : list of Layer
        In model order; ``layers[i].index == i`` after construction.
    """

    def __init__(self, layers):
        layers = list(layers)
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {i} is {type(layer).__name__}, expected a relprop.nets layer")
            layer.index = i
        self.layers = layers
        self._shapes = {}

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __repr__(self):
        body = "".join(f"\n  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({body}\n)"

    # -- shapes and validation --------------------------------------------------------
    @property
    def input_ndim(self):
        """2 for a net starting with a dense layer, 4 for one starting with a conv or pool."""
        first = self.layers[0]
        return 2 if first.kind in ("linear", "sumpool") else 4

    def shapes(self, in_shape):
        """Output shape of every layer for an input of ``in_shape`` (validates the geometry)."""
        in_shape = tuple(int(s) for s in in_shape)
        hit = self._shapes.get(in_shape[1:])
        if hit is None:
            shapes, shape = [], (1,) + in_shape[1:]
            for layer in self.layers:
                shape = layer.output_shape(shape)
                shapes.append(shape[1:])
            hit = self._shapes[in_shape[1:]] = shapes
        return [(in_shape[0],) + s for s in hit]

    def check_input(self, x, where="net"):
        """Validate a net input: float array of the right rank and geometry, finite."""
        V.check_float_array("x", x, self.input_ndim, where)
        if x.shape[0] < 1:
            raise ValueError(f"{where}: x has an empty batch, shape {tuple(x.shape)}")
        self.shapes(x.shape)
        V.check_finite("x", x, where)
        return x

    def linear_layers(self):
        """Indices of the dense/conv layers (the ones relevance rules are assigned to)."""
        return [i for i, layer in enumerate(self.layers) if layer.is_linear]

    # -- passes -----------------------------------------------------------------------
    def forward(self, x, backend=None):
        """The logits f(x).  ``backend``: None (by array type) | "reference" | "cpu" | "cuda"."""
        return self.trace(x, backend=backend, keep=False).output

    def trace(self, x, backend=None, keep=True, check=True):
        """Forward pass recording every layer input and the max-pool switches (see :class:`Trace`)."""
        xp = array_namespace(x)
        backend = resolve_backend(backend, xp)
        if check:
            self.check_input(x)
        a = xp.ascontiguousarray(x)
        inputs, switches = [], {}
        for i, layer in enumerate(self.layers):
            if keep:
                inputs.append(a)
            a, sw = layer.forward(a, backend)
            if sw is not None:
                switches[i] = sw
        return Trace(inputs=inputs, output=a, switches=switches, backend=backend)

    def backward(self, trace, g, start=None, stop=0, weights=None, relu="gradient"):
        """The backward signal sweep.

        ``g`` is the signal at the output of layer ``start`` (default: the last layer);
        returns the signal at the input of layer ``stop`` (default: the net input).

        With the defaults this is the gradient: ReLU passes g·1[z > 0], max-pool routes g
        to its switch, linear layers pass Wᵀg.  ``weights={i: W'}`` replaces the weight of
        linear layer i in its transposed pass (PatternNet: W' = A; PatternAttribution:
        W' = W ⊙ A); ``relu="deconvnet"`` passes max(g, 0) ignoring the forward mask,
        ``relu="guided"`` passes max(g, 0)·1[z > 0] (MATH.md, "Backward signals").
        """
        from ..kernels import _ops

        if relu not in ("gradient", "deconvnet", "guided"):
            raise ValueError(f"relu={relu!r} is invalid; expected 'gradient', 'deconvnet' or 'guided'")
        start = len(self.layers) - 1 if start is None else start
        backend = trace.backend
        for i in range(start, stop - 1, -1):
            layer = self.layers[i]
            x = trace.inputs[i]
            if weights is not None and i in weights:
                g = layer.vjp_with(g, weights[i], x.shape, backend)
            elif layer.kind == "relu" and relu == "deconvnet":
                g = _ops.relu_backward_deconvnet(g, backend)
            elif layer.kind == "relu" and relu == "guided":
                g = _ops.relu_backward_guided(g, x, backend)
            else:
                g = layer.vjp(g, x, trace.layer_output(i), trace.switches.get(i), backend)
        return g

    # -- parameters and I/O -------------------------------------------------------------
    def spec(self):
        """The JSON-able layer spec (see :func:`relprop.nets.from_spec`)."""
        return [layer.spec() for layer in self.layers]

    def state_dict(self):
        """Weights in PyTorch's state-dict naming: ``{"i.weight": ..., "i.bias": ...}``."""
        out = {}
        for i, layer in enumerate(self.layers):
            for k, v in layer.state().items():
                out[f"{i}.{k}"] = v
        return out

    def save(self, path):
        """Write spec and weights to one ``.npz`` file (read back with :func:`relprop.nets.load`)."""
        from .io import save

        save(self, path)

    def copy(self):
        """A deep copy with its own weight arrays."""
        from .io import from_spec

        return from_spec(self.spec(), {k: np.array(v, copy=True) for k, v in self.state_dict().items()})
