"""Numba CPU twins of :mod:`relprop.kernels.reference.dense`: same math, names and signatures.

A dense layer is one GEMM, so both kernels are BLAS calls through ``np.matmul(..., out=...)``
(no temporary), and the forward adds the bias in place.  ``w.T`` is a transposed view: BLAS
reads it as is, no copy.  BLAS splits a GEMM into fixed blocks for a fixed thread count, so
results are bitwise reproducible run to run.

The bias add is plain NumPy on purpose: a Numba ``prange`` loop here would wake Numba's
OpenMP workers, which keep spinning for milliseconds after the loop and then compete
for the cores with the BLAS threads of the next GEMM (see :mod:`relprop.kernels.cpu.conv2d`).

BLAS's own threads are never used: OpenBLAS's workers keep spinning after a threaded GEMM
(up to ~0.1 s) and take the cores from the convolutions that follow.  Instead the GEMM is cut
into one block per thread, each block one single-threaded GEMM run by
:mod:`relprop.kernels.cpu._chunks` (no barrier per GEMM, robust on a shared machine):

* batches of at least ``2 * _config.DENSE_MIN_ROWS`` rows with a weight matrix of at most
  ``_config.DENSE_ROW_BLOCKS_MAX_WEIGHT_BYTES``: one block of rows per thread (each block reads
  the whole weight matrix once);
* smaller batches (VGG-16 at batch 4) and larger weight matrices (CIFAR-VGG's 4096 -> 512): one
  block of output columns per thread, so that each thread reads its share of the weight matrix
  once — for a small batch the layer is a read of W (VGG-16's first dense layer: 411 MB), and
  two threads read it at twice one thread's rate; for a larger batch each block still multiplies
  every row (CIFAR-VGG b64's 4096 -> 512: forward 1.33x, VJP 1.32x the row blocks).

Measured on an idle 2-core machine: CIFAR-VGG b64 gradient 182 ms with row blocks, 277 ms with
one threaded GEMM; VGG-16 b4: the 512-channel convolution VJPs after the dense layers took
33 ms with one threaded GEMM before them, 18 ms after column blocks.
"""
import numpy as np

from ... import _config
from ._chunks import conv_threads, run_chunks, run_here

__all__ = ["dense_forward", "dense_vjp"]

#: column blocks are cut at multiples of this (a cache line of float32; keeps GEMM blocks aligned)
_COL_ALIGN = 16


def _blocks(n, cols, weight_bytes):
    """(rows per block, columns per block): one block per thread, by rows for large batches and
    small weight matrices, else by output columns (and the whole GEMM in one block on one thread)."""
    threads = conv_threads()
    if threads <= 1:
        return n, cols
    if n >= 2 * _config.DENSE_MIN_ROWS and weight_bytes <= _config.DENSE_ROW_BLOCKS_MAX_WEIGHT_BYTES:
        return max(_config.DENSE_MIN_ROWS, -(-n // threads)), cols
    per = -(-cols // threads)
    return n, min(cols, -(-per // _COL_ALIGN) * _COL_ALIGN)


def _run(n, cols, inner, gemm, itemsize):
    """gemm(rows slice, columns slice) over the blocks of :func:`_blocks`, one per thread; a GEMM of
    fewer than ``_config.DENSE_MIN_THREADED_MACS`` multiply-adds (``inner``: the summed dimension) in
    one block on the calling thread, BLAS held to one thread all the same."""
    if n * cols * inner < _config.DENSE_MIN_THREADED_MACS:
        run_here(lambda: gemm(slice(None), slice(None)))
        return
    rows, width = _blocks(n, cols, cols * inner * itemsize)
    if rows < n:
        run_chunks(n, rows, lambda: None, lambda n0, nc, _: gemm(slice(n0, n0 + nc), slice(None)))
    else:
        run_chunks(cols, width, lambda: None, lambda c0, cc, _: gemm(slice(None), slice(c0, c0 + cc)))


def dense_forward(x, w, b, out):
    """Same math as :func:`relprop.kernels.reference.dense.dense_forward`: out = x W^T + b."""
    def gemm(r, c):
        o = out[r, c]
        np.matmul(x[r], w[c].T, out=o)
        o += b[c]

    _run(x.shape[0], w.shape[0], w.shape[1], gemm, w.itemsize)
    return out


def dense_vjp(g, w, out):
    """Same math as :func:`relprop.kernels.reference.dense.dense_vjp`: out = g W."""
    def gemm(r, c):
        np.matmul(g[r], w[:, c], out=out[r, c])

    _run(g.shape[0], w.shape[1], w.shape[0], gemm, w.itemsize)
    return out
