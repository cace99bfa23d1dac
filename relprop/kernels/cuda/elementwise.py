"""Numba CUDA twins of :mod:`relprop.kernels.reference.elementwise` (same names, signatures, math).

The caller passes C-contiguous arrays; each launcher hands the kernel flat
``reshape(-1)`` views and the kernel runs a grid-stride loop with one thread per
element.  Selections are written as branches so that NaN propagates exactly as in the
NumPy reference (``np.maximum``, ``np.where``).
"""
from numba import cuda

from ... import _config
from ._launch import launch, scalar

__all__ = [
    "relu_forward",
    "relu_backward_gradient",
    "relu_backward_deconvnet",
    "relu_backward_guided",
    "stabilized_divide",
]


@cuda.jit(cache=_config.NUMBA_CACHE)
def _relu_forward_kernel(x, out):
    for k in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        v = x[k]
        if v < 0:  # NaN is not < 0: it passes through, as np.maximum
            out[k] = 0
        else:
            out[k] = v


@cuda.jit(cache=_config.NUMBA_CACHE)
def _relu_backward_gradient_kernel(g, z, out):
    for k in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        if z[k] > 0:
            out[k] = g[k]
        else:
            out[k] = 0


@cuda.jit(cache=_config.NUMBA_CACHE)
def _relu_backward_guided_kernel(g, z, out):
    for k in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        v = g[k]
        if z[k] > 0 and not v < 0:
            out[k] = v
        else:
            out[k] = 0


@cuda.jit(cache=_config.NUMBA_CACHE)
def _stabilized_divide_kernel(r, z, epsilon, out):
    for k in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        zk = z[k]
        if zk >= 0:  # sign0(0) = +1
            den = zk + epsilon
        else:
            den = zk - epsilon
        if den == 0:  # only epsilon = 0 and z = 0 get here
            out[k] = 0
        else:
            out[k] = r[k] / den


def relu_forward(x, out):
    """Same math as :func:`relprop.kernels.reference.elementwise.relu_forward`; one thread per element."""
    launch(_relu_forward_kernel, out.size, x.reshape(-1), out.reshape(-1))
    return out


def relu_backward_gradient(g, z, out):
    """Same math as :func:`relprop.kernels.reference.elementwise.relu_backward_gradient`; one thread per element."""
    launch(_relu_backward_gradient_kernel, out.size, g.reshape(-1), z.reshape(-1), out.reshape(-1))
    return out


def relu_backward_deconvnet(g, out):
    """Same math as :func:`relprop.kernels.reference.elementwise.relu_backward_deconvnet`; one thread per element.

    max(g, 0) is the ReLU itself, so this launches the forward kernel on g.
    """
    launch(_relu_forward_kernel, out.size, g.reshape(-1), out.reshape(-1))
    return out


def relu_backward_guided(g, z, out):
    """Same math as :func:`relprop.kernels.reference.elementwise.relu_backward_guided`; one thread per element."""
    launch(_relu_backward_guided_kernel, out.size, g.reshape(-1), z.reshape(-1), out.reshape(-1))
    return out


def stabilized_divide(r, z, epsilon, out):
    """Same math as :func:`relprop.kernels.reference.elementwise.stabilized_divide`; one thread per element.

    ε is passed as a scalar of the arrays' dtype, so float32 input computes the
    denominator in float32 like the reference.
    """
    eps = scalar(z.dtype, epsilon)
    launch(_stabilized_divide_kernel, out.size, r.reshape(-1), z.reshape(-1), eps, out.reshape(-1))
    return out
