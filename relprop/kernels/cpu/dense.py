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

For a few samples and a large W (``_config.DENSE_STREAM_*``) the layer is a read of W, and BLAS's
GEMM of 2-16 rows reads it at a third of the memory's rate (11 of 31 GB/s on two threads).  There
relprop's own kernels take it, W split between the threads as above but read once with each
element loaded into registers once for every sample: the forward as dot products, four rows of W
against four samples in one loop (:func:`_stream_forward`); the VJP as four rows of W added into one
row of the result per loop, a piece of the four rows in L1 serving every sample (:func:`_stream_vjp`).
The sums run in another order than BLAS's, so results differ from it by rounding, not run to run.
"""
import numpy as np
from numba import njit

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


# ============================================================================================
# Small batches: the layer is a read of W, in one pass, each element loaded once for every sample
# ============================================================================================
_jit = njit(cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS, nogil=True)
_inline = njit(inline="always", cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)


@_inline
def _dots_4x4(w0, w1, w2, w3, x0, x1, x2, x3):
    """The 16 dot products of four rows of W with four samples, in one pass: each loaded element
    serves four products (one per sample, one per row), so the loop runs at twice the rate of four
    rows' worth of dots by sample (measured in L1: 29 against 16 GFMA/s a thread)."""
    z = w0.dtype.type(0)
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = z
    for i in range(w0.shape[0]):
        u0, u1, u2, u3 = w0[i], w1[i], w2[i], w3[i]
        v0, v1, v2, v3 = x0[i], x1[i], x2[i], x3[i]
        a00 += u0 * v0
        a01 += u0 * v1
        a02 += u0 * v2
        a03 += u0 * v3
        a10 += u1 * v0
        a11 += u1 * v1
        a12 += u1 * v2
        a13 += u1 * v3
        a20 += u2 * v0
        a21 += u2 * v1
        a22 += u2 * v2
        a23 += u2 * v3
        a30 += u3 * v0
        a31 += u3 * v1
        a32 += u3 * v2
        a33 += u3 * v3
    return (a00, a01, a02, a03), (a10, a11, a12, a13), (a20, a21, a22, a23), (a30, a31, a32, a33)


@_inline
def _dots_4x1(w0, w1, w2, w3, x0):
    """Four dot products with one vector (four rows of W with one sample, or, the roles swapped, one
    row of W with four samples: the products commute, so the bits are the same)."""
    z = w0.dtype.type(0)
    a0 = a1 = a2 = a3 = z
    for i in range(w0.shape[0]):
        v = x0[i]
        a0 += w0[i] * v
        a1 += w1[i] * v
        a2 += w2[i] * v
        a3 += w3[i] * v
    return a0, a1, a2, a3


@_inline
def _dot(w0, x0):
    a = w0.dtype.type(0)
    for i in range(w0.shape[0]):
        a += w0[i] * x0[i]
    return a


@_jit
def _stream_forward(x, w, b, out, j0, j1):
    """out[:, j] = x w_j + b_j for j0 <= j < j1 (x (N, I), w (J, I), both C-contiguous): W read once,
    four rows at a time, each against the samples four at a time (:func:`_dots_4x4`); the four rows
    stay in cache for the later samples."""
    n = x.shape[0]
    n4 = n - n % 4
    j = j0
    while j + 4 <= j1:
        w0, w1, w2, w3 = w[j], w[j + 1], w[j + 2], w[j + 3]
        for r in range(0, n4, 4):
            dots = _dots_4x4(w0, w1, w2, w3, x[r], x[r + 1], x[r + 2], x[r + 3])
            for q in range(4):
                for p in range(4):
                    out[r + p, j + q] = dots[q][p] + b[j + q]
        for r in range(n4, n):
            d0, d1, d2, d3 = _dots_4x1(w0, w1, w2, w3, x[r])
            out[r, j], out[r, j + 1], out[r, j + 2], out[r, j + 3] = d0 + b[j], d1 + b[j + 1], d2 + b[j + 2], \
                d3 + b[j + 3]
        j += 4
    for j in range(j, j1):
        wj = w[j]
        for r in range(0, n4, 4):
            d0, d1, d2, d3 = _dots_4x1(x[r], x[r + 1], x[r + 2], x[r + 3], wj)
            out[r, j], out[r + 1, j], out[r + 2, j], out[r + 3, j] = d0 + b[j], d1 + b[j], d2 + b[j], d3 + b[j]
        for r in range(n4, n):
            out[r, j] = _dot(wj, x[r]) + b[j]
    return out


@_inline
def _axpy4(o, c0, c1, c2, c3, w0, w1, w2, w3):
    """o += c0 w0 + c1 w1 + c2 w2 + c3 w3 (four rows of W into one row of out: one output stream, so
    that the loop vectorises; the coefficients are scalars, not loads that a store to o might alias)."""
    for i in range(o.shape[0]):
        o[i] += c0 * w0[i] + c1 * w1[i] + c2 * w2[i] + c3 * w3[i]


#: columns of one piece of :func:`_stream_vjp` (four rows of float32: 32 KB, in L1 beside a piece of out)
_VJP_PIECE = 2048


@_jit
def _stream_vjp(g, w, out, i0, i1):
    """out[:, i0:i1] = g W[:, i0:i1] (g (N, J), w (J, I), both C-contiguous): W's columns i0..i1 read
    once, four rows at a time in pieces of ``_VJP_PIECE`` columns, each piece in L1 serving every
    sample (:func:`_axpy4`) while each row is still read in order (a prefetched stream; pieces taken
    for all rows of W at once, the reads jump a row's length every 8 KB and ran at a third of the
    rate).  Each output element sums over j in order, whatever the split into column blocks."""
    n, jn = g.shape
    j4 = jn - jn % 4
    o = out[:, i0:i1]
    o[:] = 0
    for j in range(0, j4, 4):
        for c0 in range(i0, i1, _VJP_PIECE):
            c1 = min(i1, c0 + _VJP_PIECE)
            w0, w1, w2, w3 = w[j, c0:c1], w[j + 1, c0:c1], w[j + 2, c0:c1], w[j + 3, c0:c1]
            for r in range(n):
                _axpy4(out[r, c0:c1], g[r, j], g[r, j + 1], g[r, j + 2], g[r, j + 3], w0, w1, w2, w3)
    for j in range(j4, jn):
        wj = w[j, i0:i1]
        for r in range(n):
            orow, c = o[r], g[r, j]
            for i in range(wj.shape[0]):
                orow[i] += c * wj[i]
    return out


def _streams(x, w, rows):
    """Does a dense layer of input (or signal) ``x`` and weights ``w`` take the streaming kernels, for
    a batch in ``rows`` = (fewest, most)?"""
    return rows[0] <= x.shape[0] <= rows[1] and w.nbytes >= _config.DENSE_STREAM_MIN_WEIGHT_BYTES \
        and w.flags.c_contiguous and x.dtype == w.dtype


def _column_blocks(cols, align):
    """Blocks of ``cols`` columns, one per thread, at multiples of ``align``."""
    per = -(-cols // conv_threads())
    return max(align, -(-per // align) * align)


def dense_forward(x, w, b, out):
    """Same math as :func:`relprop.kernels.reference.dense.dense_forward`: out = x W^T + b."""
    if _streams(x, w, (1, _config.DENSE_STREAM_MAX_ROWS)) and b.dtype == w.dtype:
        x = np.ascontiguousarray(x)
        run_chunks(w.shape[0], _column_blocks(w.shape[0], 4), lambda: None,
                   lambda j0, count, _: _stream_forward(x, w, b, out, j0, j0 + count))
        return out

    def gemm(r, c):
        o = out[r, c]
        np.matmul(x[r], w[c].T, out=o)
        o += b[c]

    _run(x.shape[0], w.shape[0], w.shape[1], gemm, w.itemsize)
    return out


def dense_vjp(g, w, out):
    """Same math as :func:`relprop.kernels.reference.dense.dense_vjp`: out = g W."""
    if _streams(g, w, (2, _config.DENSE_STREAM_VJP_MAX_ROWS)):
        g = np.ascontiguousarray(g)
        run_chunks(w.shape[1], _column_blocks(w.shape[1], _COL_ALIGN), lambda: None,
                   lambda i0, count, _: _stream_vjp(g, w, out, i0, i0 + count))
        return out

    def gemm(r, c):
        np.matmul(g[r], w[:, c], out=out[r, c])

    _run(g.shape[0], w.shape[1], w.shape[0], gemm, w.itemsize)
    return out
