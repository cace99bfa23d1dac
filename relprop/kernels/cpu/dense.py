"""Numba CPU twins of :mod:`relprop.kernels.reference.dense`: same math, names and signatures.

A dense layer is one GEMM, so both kernels are a single BLAS call through
``np.matmul(..., out=out)`` (no temporary), and the forward adds the bias in place.
``w.T`` is a transposed view: BLAS reads it as is, no copy.  BLAS splits a GEMM into
fixed blocks for a fixed thread count, so results are bitwise reproducible run to run.

The bias add is plain NumPy on purpose: a Numba ``prange`` loop here would wake Numba's
OpenMP workers, which keep spinning for milliseconds after the loop and then compete
for the cores with the BLAS threads of the next GEMM (see :mod:`relprop.kernels.cpu.conv2d`).

Batches of at least ``2 * _config.DENSE_MIN_ROWS`` rows are cut into one block of rows per
thread, each block one single-threaded GEMM (:mod:`relprop.kernels.cpu._chunks`: no barrier
per GEMM, robust on a shared machine, and no BLAS workers left spinning after the GEMM to take
the cores from the convolutions that follow); every block writes its own rows of ``out``.
"""
import numpy as np

from ... import _config
from ._chunks import conv_threads, run_chunks

__all__ = ["dense_forward", "dense_vjp"]


def _rows_per_block(n):
    """One block per thread (each reads the whole weight matrix once), of at least DENSE_MIN_ROWS rows."""
    threads = conv_threads()
    if threads <= 1 or n < 2 * _config.DENSE_MIN_ROWS:
        return n
    return max(_config.DENSE_MIN_ROWS, -(-n // threads))


def dense_forward(x, w, b, out):
    """Same math as :func:`relprop.kernels.reference.dense.dense_forward`: out = x W^T + b."""
    def work(n0, nc, _):
        o = out[n0:n0 + nc]
        np.matmul(x[n0:n0 + nc], w.T, out=o)
        o += b

    run_chunks(x.shape[0], _rows_per_block(x.shape[0]), lambda: None, work)
    return out


def dense_vjp(g, w, out):
    """Same math as :func:`relprop.kernels.reference.dense.dense_vjp`: out = g W."""
    def work(n0, nc, _):
        np.matmul(g[n0:n0 + nc], w, out=out[n0:n0 + nc])

    run_chunks(g.shape[0], _rows_per_block(g.shape[0]), lambda: None, work)
    return out
