"""Numba CPU twins of :mod:`relprop.kernels.reference.dense`: same math, names and signatures.

A dense layer is one GEMM, so both kernels are a single BLAS call through
``np.matmul(..., out=out)`` (no temporary), and the forward adds the bias in place.
``w.T`` is a transposed view: BLAS reads it as is, no copy.  BLAS splits a GEMM into
fixed blocks for a fixed thread count, so results are bitwise reproducible run to run.

The bias add is plain NumPy on purpose: a Numba ``prange`` loop here would wake Numba's
OpenMP workers, which keep spinning for milliseconds after the loop and then compete
for the cores with the BLAS threads of the next GEMM (see :mod:`relprop.kernels.cpu.conv2d`).
"""
import numpy as np

__all__ = ["dense_forward", "dense_vjp"]


def dense_forward(x, w, b, out):
    """Same math as :func:`relprop.kernels.reference.dense.dense_forward`: out = x W^T + b."""
    np.matmul(x, w.T, out=out)
    out += b
    return out


def dense_vjp(g, w, out):
    """Same math as :func:`relprop.kernels.reference.dense.dense_vjp`: out = g W."""
    return np.matmul(g, w, out=out)
