r"""Elementwise kernels: ReLU, its three backward signals, and the stabilised LRP ratio.

Backward signals through a ReLU with forward pre-activation z (docs/conventions.md):

- gradient:        g_in = g · 1[z > 0]
- DeconvNet:       g_in = max(g, 0)          (the forward mask is ignored)
- Guided Backprop: g_in = max(g, 0) · 1[z > 0]

The LRP ratio: s = R / stab(z) with stab(z) = z + ε·sign₀(z), sign₀(0) := +1.  A zero
denominator (only possible with ε = 0) gives s = 0, never NaN or Inf.
"""
import numpy as np

__all__ = [
    "relu_forward",
    "relu_backward_gradient",
    "relu_backward_deconvnet",
    "relu_backward_guided",
    "stabilized_divide",
]


def relu_forward(x, out):
    """out = max(x, 0)."""
    out[...] = np.maximum(x, 0)
    return out


def relu_backward_gradient(g, z, out):
    """out = g · 1[z > 0]."""
    out[...] = np.where(z > 0, g, 0)
    return out


def relu_backward_deconvnet(g, out):
    """out = max(g, 0): DeconvNet rectifies the backward signal and ignores the forward mask."""
    out[...] = np.maximum(g, 0)
    return out


def relu_backward_guided(g, z, out):
    """out = max(g, 0) · 1[z > 0]: Guided Backprop gates and rectifies."""
    out[...] = np.where(z > 0, np.maximum(g, 0), 0)
    return out


def stabilized_divide(r, z, epsilon, out):
    """out = r / (z + ε·sign₀(z)), sign₀(0) = +1; a zero denominator gives 0."""
    den = z + epsilon * np.where(z >= 0, 1, -1).astype(z.dtype)
    safe = np.where(den == 0, 1, den)
    out[...] = np.where(den == 0, 0, r / safe)
    return out
