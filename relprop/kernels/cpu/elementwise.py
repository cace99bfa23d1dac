"""Numba CPU twins of :mod:`relprop.kernels.reference.elementwise` (same names, signatures, math).

Arrays may have any number of dimensions; the caller passes C-contiguous arrays, so each
kernel works on flat ``reshape(-1)`` views and runs ``prange`` over elements: one writer
per element, bitwise reproducible.  Selections are written so that NaN propagates exactly
as in the NumPy reference (``np.maximum`` and ``np.where``).

Each kernel is compiled twice, parallel and serial (:func:`relprop.kernels.cpu._threads.parallel_above`):
arrays below ``_config.PARALLEL_MIN_ELEMENTS`` elements take the serial twin (a parallel loop
waits for all its threads, which on a shared machine costs more than a small pass); both
give the same bits.
"""
import numpy as np
from numba import prange

from ._threads import parallel_above

__all__ = [
    "relu_forward",
    "relu_backward_gradient",
    "relu_backward_deconvnet",
    "relu_backward_guided",
    "stabilized_divide",
]


@parallel_above()
def relu_forward(x, out):
    """Same math as :func:`relprop.kernels.reference.elementwise.relu_forward`; prange over elements."""
    xf, of = x.reshape(-1), out.reshape(-1)
    for k in prange(xf.size):
        v = xf[k]
        of[k] = 0 if v < 0 else v  # NaN passes through, as np.maximum
    return out


@parallel_above()
def relu_backward_gradient(g, z, out):
    """Same math as :func:`relprop.kernels.reference.elementwise.relu_backward_gradient`; prange over elements."""
    gf, zf, of = g.reshape(-1), z.reshape(-1), out.reshape(-1)
    for k in prange(gf.size):
        of[k] = gf[k] if zf[k] > 0 else 0
    return out


@parallel_above()
def relu_backward_deconvnet(g, out):
    """Same math as :func:`relprop.kernels.reference.elementwise.relu_backward_deconvnet`; prange over elements."""
    gf, of = g.reshape(-1), out.reshape(-1)
    for k in prange(gf.size):
        v = gf[k]
        of[k] = 0 if v < 0 else v
    return out


@parallel_above()
def relu_backward_guided(g, z, out):
    """Same math as :func:`relprop.kernels.reference.elementwise.relu_backward_guided`; prange over elements."""
    gf, zf, of = g.reshape(-1), z.reshape(-1), out.reshape(-1)
    for k in prange(gf.size):
        v = gf[k]
        of[k] = (0 if v < 0 else v) if zf[k] > 0 else 0
    return out


@parallel_above()
def stabilized_divide(r, z, epsilon, out):
    """Same math as :func:`relprop.kernels.reference.elementwise.stabilized_divide`; prange over elements.

    ε is cast to the arrays' dtype first, so float32 input computes the denominator in
    float32 like the reference (an ε that underflows to 0 gives 0, not r/ε).
    """
    rf, zf, of = r.reshape(-1), z.reshape(-1), out.reshape(-1)
    eps = np.array([epsilon]).astype(z.dtype)[0]
    for k in prange(rf.size):
        zk = zf[k]
        den = zk + eps if zk >= 0 else zk - eps  # sign0(0) = +1
        of[k] = 0 if den == 0 else rf[k] / den  # only ε = 0 and z = 0 reach den == 0
    return out
