"""Public kernel entry points: validate, pick the backend, allocate, call.

Each function here checks its arguments at the boundary (shapes, one float dtype,
finiteness, window geometry), resolves ``backend`` (``None`` → ``"cpu"`` for NumPy
input, ``"cuda"`` for CuPy input; ``"reference"`` for the NumPy oracle) and calls the
implementation of that backend, which has the same name in
``relprop.kernels.{reference,cpu,cuda}``.

Geometry arguments (``stride``, ``padding``, ``dilation``, ``kernel``) take an int or
a pair of ints, as PyTorch.
"""
from __future__ import annotations

import numbers

import numpy as np

from .. import _validate as V
from .._backend import array_namespace, resolve_backend
from . import _ops

__all__ = [
    "dense_forward", "dense_vjp", "conv2d_forward", "conv2d_vjp",
    "maxpool2d_forward", "maxunpool2d", "avgpool2d_forward", "avgpool2d_vjp",
    "relu_forward", "relu_backward_gradient", "relu_backward_deconvnet", "relu_backward_guided",
    "stabilized_divide",
]
__all__ += ["dense_weight_vjp", "conv2d_weight_vjp"]  # training (family "train")
__all__ += ["pattern_stats_dense", "pattern_stats_conv2d"]  # PatternNet statistics (family "patterns")


def _prepare(where, backend, check_finite, **arrays):
    """Common checks; returns (xp, backend, contiguous arrays dict)."""
    for name, a in arrays.items():  # first, so that a non-array is named in the message
        if a is not None:
            V.check_float_array(name, a, where=where)
    xp = array_namespace(*arrays.values())
    V.check_same_dtype(where, **arrays)
    if check_finite:
        for name, a in arrays.items():
            if a is not None:
                V.check_finite(name, a, where=where)
    backend = resolve_backend(backend, xp)
    arrays = {k: (None if v is None else xp.ascontiguousarray(v)) for k, v in arrays.items()}
    return xp, backend, arrays


def _check_bias(where, b, n_out):
    if b is not None:
        V.check_float_array("b", b, 1, where)
        V.check_shape("b", b, (n_out,), where)


def _input_shape(where, input_shape):
    """A shape of 4 non-negative ints (not floats that would be truncated)."""
    try:
        items = tuple(input_shape)
    except TypeError:
        raise TypeError(f"{where}: input_shape must be a tuple of 4 ints, got {input_shape!r}") from None
    if len(items) != 4 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in items):
        raise ValueError(f"{where}: input_shape must be (N, C, H, W), got {input_shape!r} "
                         "(expected 4 non-negative ints)")
    return tuple(int(s) for s in items)


def dense_forward(x, w, b=None, *, backend=None, check_finite=True):
    """z = x W^T + b.  x (N, I), w (J, I) (PyTorch's layout), b (J,) or None → z (N, J)."""
    where = "dense_forward"
    V.check_float_array("x", x, 2, where)
    V.check_float_array("w", w, 2, where)
    V.check_shape("w", w, (None, x.shape[1]), where)
    _check_bias(where, b, w.shape[0])
    _, backend, a = _prepare(where, backend, check_finite, x=x, w=w, b=b)
    return _ops.dense_forward(a["x"], a["w"], a["b"], backend)


def dense_vjp(g, w, *, backend=None, check_finite=True):
    """Input-VJP of a dense layer: g W.  g (N, J), w (J, I) → (N, I)."""
    where = "dense_vjp"
    V.check_float_array("g", g, 2, where)
    V.check_float_array("w", w, 2, where)
    V.check_shape("g", g, (None, w.shape[0]), where)
    _, backend, a = _prepare(where, backend, check_finite, g=g, w=w)
    return _ops.dense_vjp(a["g"], a["w"], backend)


def _conv_geometry(where, x_shape, w, stride, padding, dilation):
    stride = V.pair("stride", stride, where, minimum=1)
    padding = V.pair("padding", padding, where, minimum=0)
    dilation = V.pair("dilation", dilation, where, minimum=1)
    if w.shape[1] != x_shape[1]:
        raise ValueError(f"{where}: w has shape {tuple(w.shape)}, expected (K, C={x_shape[1]}, kh, kw)")
    V.check_window_geometry(where, x_shape[2:], w.shape[2:], stride, padding, dilation)
    return stride, padding, dilation


def conv2d_forward(x, w, b=None, stride=1, padding=0, dilation=1, *, backend=None, check_finite=True):
    """2-D convolution.  x (N,C,H,W), w (K,C,kh,kw), b (K,) or None → (N,K,Ho,Wo)."""
    where = "conv2d_forward"
    V.check_float_array("x", x, 4, where)
    V.check_float_array("w", w, 4, where)
    stride, padding, dilation = _conv_geometry(where, x.shape, w, stride, padding, dilation)
    _check_bias(where, b, w.shape[0])
    _, backend, a = _prepare(where, backend, check_finite, x=x, w=w, b=b)
    return _ops.conv2d_forward(a["x"], a["w"], a["b"], stride, padding, dilation, backend)


def conv2d_vjp(g, w, input_shape, stride=1, padding=0, dilation=1, *, backend=None, check_finite=True):
    """Input-VJP (transposed convolution) of conv2d.  g (N,K,Ho,Wo) → (N,C,H,W) = ``input_shape``."""
    where = "conv2d_vjp"
    V.check_float_array("g", g, 4, where)
    V.check_float_array("w", w, 4, where)
    input_shape = _input_shape(where, input_shape)
    stride, padding, dilation = _conv_geometry(where, input_shape, w, stride, padding, dilation)
    expected = _ops.conv2d_output_shape(input_shape, w.shape, stride, padding, dilation)
    V.check_shape("g", g, expected, where)
    _, backend, a = _prepare(where, backend, check_finite, g=g, w=w)
    return _ops.conv2d_vjp(a["g"], a["w"], input_shape, stride, padding, dilation, backend)


def _pool_geometry(where, x_shape, kernel, stride, padding):
    kernel = V.pair("kernel", kernel, where, minimum=1)
    stride = kernel if stride is None else V.pair("stride", stride, where, minimum=1)
    padding = V.pair("padding", padding, where, minimum=0)
    V.check_window_geometry(where, x_shape[2:], kernel, stride, padding, pool=True)
    return kernel, stride, padding


def maxpool2d_forward(x, kernel, stride=None, padding=0, *, backend=None, check_finite=True):
    """Max pooling with switches → (out (N,C,Ho,Wo), switches int64 (N,C,Ho,Wo)).

    A switch is the flat index ``h * W + w`` of the window's maximum in its input plane;
    ties go to the first maximum in row-major window order.  ``stride`` defaults to ``kernel``.
    """
    where = "maxpool2d_forward"
    V.check_float_array("x", x, 4, where)
    kernel, stride, padding = _pool_geometry(where, x.shape, kernel, stride, padding)
    _, backend, a = _prepare(where, backend, check_finite, x=x)
    return _ops.maxpool2d_forward(a["x"], kernel, stride, padding, backend)


def maxunpool2d(g, switches, input_shape, *, backend=None, check_finite=True):
    """Route g (N,C,Ho,Wo) back to the switch positions of an (N,C,H,W) array, summing overlaps."""
    where = "maxunpool2d"
    V.check_float_array("g", g, 4, where)
    input_shape = _input_shape(where, input_shape)
    if input_shape[:2] != tuple(g.shape[:2]):
        raise ValueError(f"{where}: input_shape {input_shape} must be (N={g.shape[0]}, C={g.shape[1]}, H, W)")
    if not hasattr(switches, "dtype") or not hasattr(switches, "shape"):
        raise TypeError(f"{where}: switches must be an int64 array, got {type(switches).__name__}")
    xp = array_namespace(g, switches)
    if tuple(switches.shape) != tuple(g.shape):
        raise ValueError(f"{where}: switches has shape {tuple(switches.shape)}, expected {tuple(g.shape)}")
    if switches.dtype != np.int64:
        raise TypeError(f"{where}: switches has dtype {switches.dtype}, expected int64")
    plane = input_shape[2] * input_shape[3]
    if switches.size and (int(switches.min()) < 0 or int(switches.max()) >= plane):
        raise ValueError(
            f"{where}: switches must lie in [0, H*W={plane}) for input_shape {input_shape}, "
            f"got values in [{int(switches.min())}, {int(switches.max())}]"
        )
    _, backend, a = _prepare(where, backend, check_finite, g=g)
    return _ops.maxunpool2d(a["g"], xp.ascontiguousarray(switches), input_shape, backend)


def avgpool2d_forward(x, kernel, stride=None, padding=0, *, backend=None, check_finite=True):
    """Average pooling (padding counted: divide by kh·kw, PyTorch's count_include_pad=True)."""
    where = "avgpool2d_forward"
    V.check_float_array("x", x, 4, where)
    kernel, stride, padding = _pool_geometry(where, x.shape, kernel, stride, padding)
    _, backend, a = _prepare(where, backend, check_finite, x=x)
    return _ops.avgpool2d_forward(a["x"], kernel, stride, padding, backend)


def avgpool2d_vjp(g, input_shape, kernel, stride=None, padding=0, *, backend=None, check_finite=True):
    """VJP of average pooling: g (N,C,Ho,Wo) → (N,C,H,W) = ``input_shape``."""
    where = "avgpool2d_vjp"
    V.check_float_array("g", g, 4, where)
    input_shape = _input_shape(where, input_shape)
    kernel, stride, padding = _pool_geometry(where, input_shape, kernel, stride, padding)
    V.check_shape("g", g, _ops.pool_output_shape(input_shape, kernel, stride, padding), where)
    _, backend, a = _prepare(where, backend, check_finite, g=g)
    return _ops.avgpool2d_vjp(a["g"], input_shape, kernel, stride, padding, backend)


def _same_shape(where, **arrays):
    for k, v in arrays.items():
        V.check_float_array(k, v, where=where)
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    first = next(iter(shapes))
    for k, s in shapes.items():
        if s != shapes[first]:
            raise ValueError(f"{where}: {k} has shape {s}, expected {shapes[first]} (the shape of {first})")


def relu_forward(x, *, backend=None, check_finite=True):
    """max(x, 0)."""
    _, backend, a = _prepare("relu_forward", backend, check_finite, x=x)
    return _ops.relu_forward(a["x"], backend)


def relu_backward_gradient(g, z, *, backend=None, check_finite=True):
    """Gradient through ReLU: g · 1[z > 0]."""
    _same_shape("relu_backward_gradient", g=g, z=z)
    _, backend, a = _prepare("relu_backward_gradient", backend, check_finite, g=g, z=z)
    return _ops.relu_backward_gradient(a["g"], a["z"], backend)


def relu_backward_deconvnet(g, *, backend=None, check_finite=True):
    """DeconvNet through ReLU: max(g, 0)."""
    _, backend, a = _prepare("relu_backward_deconvnet", backend, check_finite, g=g)
    return _ops.relu_backward_deconvnet(a["g"], backend)


def relu_backward_guided(g, z, *, backend=None, check_finite=True):
    """Guided Backprop through ReLU: max(g, 0) · 1[z > 0]."""
    _same_shape("relu_backward_guided", g=g, z=z)
    _, backend, a = _prepare("relu_backward_guided", backend, check_finite, g=g, z=z)
    return _ops.relu_backward_guided(a["g"], a["z"], backend)


def stabilized_divide(r, z, epsilon=1e-6, *, backend=None, check_finite=True):
    """r / (z + ε·sign₀(z)), sign₀(0) = +1; a zero denominator gives 0 (never NaN)."""
    where = "stabilized_divide"
    _same_shape(where, r=r, z=z)
    ok = isinstance(epsilon, numbers.Real) and np.isfinite(epsilon) and epsilon >= 0
    V.check_param(where, "epsilon", epsilon, ok, "a finite number >= 0")
    _, backend, a = _prepare(where, backend, check_finite, r=r, z=z)
    return _ops.stabilized_divide(a["r"], a["z"], epsilon, backend)


# -- training: weight vector-Jacobian products (family "train") ---------------------------------
def dense_weight_vjp(x, g, *, backend=None, check_finite=True):
    """Weight/bias gradients of a dense layer: (gᵀ x, Σ_n g).  x (N, I), g (N, J) → ((J, I), (J,))."""
    where = "dense_weight_vjp"
    V.check_float_array("x", x, 2, where)
    V.check_float_array("g", g, 2, where)
    V.check_shape("g", g, (x.shape[0], None), where)
    _, backend, a = _prepare(where, backend, check_finite, x=x, g=g)
    return _ops.dense_weight_vjp(a["x"], a["g"], backend)


def conv2d_weight_vjp(x, g, kernel, stride=1, padding=0, dilation=1, *, backend=None, check_finite=True):
    """Weight/bias gradients of conv2d.  x (N,C,H,W), g (N,K,Ho,Wo) → (dW (K,C,kh,kw), db (K,)).

    ``kernel`` is the weight's spatial size (kh, kw) (an int or a pair); g must have the
    forward's output shape for that geometry.
    """
    where = "conv2d_weight_vjp"
    V.check_float_array("x", x, 4, where)
    V.check_float_array("g", g, 4, where)
    kernel = V.pair("kernel", kernel, where, minimum=1)
    stride = V.pair("stride", stride, where, minimum=1)
    padding = V.pair("padding", padding, where, minimum=0)
    dilation = V.pair("dilation", dilation, where, minimum=1)
    V.check_window_geometry(where, x.shape[2:], kernel, stride, padding, dilation)
    w_shape = (g.shape[1], x.shape[1]) + kernel
    V.check_shape("g", g, _ops.conv2d_output_shape(x.shape, w_shape, stride, padding, dilation), where)
    _, backend, a = _prepare(where, backend, check_finite, x=x, g=g)
    return _ops.conv2d_weight_vjp(a["x"], a["g"], w_shape, stride, padding, dilation, backend)


# -- PatternNet statistics (family "patterns") ---------------------------------------------------
_PATTERN_ACC = ("count", "sum_x", "count_pos", "sum_y", "sum_x_pos", "sum_xy")


def _pattern_accumulators(where, xp, out, n_units, in_shape):
    """Validate ``out`` (6 float64 accumulators to update in place) or allocate zeroed ones."""
    if out is None:
        return _ops.pattern_accumulators(xp, n_units, in_shape)
    if not isinstance(out, (tuple, list)) or len(out) != len(_PATTERN_ACC):
        raise TypeError(f"{where}: out must be a tuple of 6 float64 arrays {_PATTERN_ACC}, got {type(out).__name__}")
    shapes = ((), in_shape, (n_units,), (2, n_units), (n_units,) + in_shape, (2, n_units) + in_shape)
    for name, a, shape in zip(_PATTERN_ACC, out, shapes):
        if not hasattr(a, "dtype") or np.dtype(a.dtype) != np.float64:
            raise TypeError(f"{where}: accumulator {name} must be a float64 array, got {getattr(a, 'dtype', type(a).__name__)}")
        V.check_shape(name, a, shape, where)
        if not a.flags.c_contiguous:
            raise ValueError(f"{where}: accumulator {name} must be C-contiguous (it is updated in place)")
        if not a.flags.writeable:
            raise ValueError(f"{where}: accumulator {name} is read-only; out must hold writable arrays "
                             "(they are updated in place)")
    if array_namespace(*out) is not xp:
        raise TypeError(f"{where}: the accumulators and the inputs must live on one device (numpy or cupy)")
    return tuple(out)


def pattern_stats_dense(x, z, b=None, out=None, *, backend=None, check_finite=True):
    """Accumulate PatternNet statistics of a dense layer (see :mod:`relprop.kernels.reference.patterns`).

    x (N, I) the layer input, z (N, J) its pre-activation x Wᵀ + b, b (J,) or None.
    ``out``: the float64 accumulators (count (), sum_x (I,), count_pos (J,), sum_y (2, J),
    sum_x_pos (J, I), sum_xy (2, J, I)) to add this batch into, in place; None starts from
    zeros.  Returns the accumulators.
    """
    where = "pattern_stats_dense"
    V.check_float_array("x", x, 2, where)
    V.check_float_array("z", z, 2, where)
    V.check_shape("z", z, (x.shape[0], None), where)
    _check_bias(where, b, z.shape[1])
    xp, backend, a = _prepare(where, backend, check_finite, x=x, z=z, b=b)
    acc = _pattern_accumulators(where, xp, out, z.shape[1], (x.shape[1],))
    return _ops.pattern_stats_dense(a["x"], a["z"], a["b"], acc, backend)


def pattern_stats_conv2d(x, z, kernel, b=None, stride=1, padding=0, dilation=1, out=None, *, backend=None,
                         check_finite=True):
    """Accumulate PatternNet statistics of a conv layer: every output position is one sample.

    x (N, C, H, W) the layer input, z (N, K, Ho, Wo) its pre-activation, ``kernel`` the
    weight's spatial size (kh, kw), b (K,) or None.  ``out``: float64 accumulators (count (),
    sum_x (C, kh, kw), count_pos (K,), sum_y (2, K), sum_x_pos (K, C, kh, kw),
    sum_xy (2, K, C, kh, kw)) updated in place, or None.  Returns the accumulators.
    """
    where = "pattern_stats_conv2d"
    V.check_float_array("x", x, 4, where)
    V.check_float_array("z", z, 4, where)
    kernel = V.pair("kernel", kernel, where, minimum=1)
    stride = V.pair("stride", stride, where, minimum=1)
    padding = V.pair("padding", padding, where, minimum=0)
    dilation = V.pair("dilation", dilation, where, minimum=1)
    V.check_window_geometry(where, x.shape[2:], kernel, stride, padding, dilation)
    w_shape = (z.shape[1], x.shape[1]) + kernel
    V.check_shape("z", z, _ops.conv2d_output_shape(x.shape, w_shape, stride, padding, dilation), where)
    _check_bias(where, b, z.shape[1])
    xp, backend, a = _prepare(where, backend, check_finite, x=x, z=z, b=b)
    acc = _pattern_accumulators(where, xp, out, z.shape[1], (x.shape[1],) + kernel)
    return _ops.pattern_stats_conv2d(a["x"], a["z"], a["b"], stride, padding, dilation, acc, backend)
