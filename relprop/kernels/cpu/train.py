"""CPU twins of :mod:`relprop.kernels.reference.train` (same names, signatures, math).

Both weight gradients are GEMMs through NumPy's BLAS.  The convolution's is one GEMM per
chunk of samples, dW (K, C·kh·kw) += gᵀ (K, n·Ho·Wo) @ colsᵀ (n·Ho·Wo, C·kh·kw), where
``cols`` is the im2col matrix of the chunk built by the convolution's own gather (row copies,
one writer per element, padding handled by bounds tests).  Chunks are sized by
``_config.CONV_CHUNK_BYTES`` and visited in order, so the result is deterministic.
"""
import numpy as np

from ... import _config
from .conv2d import im2col_chunk

__all__ = ["dense_weight_vjp", "conv2d_weight_vjp"]


def dense_weight_vjp(x, g, out_w, out_b):
    """Same math as :func:`relprop.kernels.reference.train.dense_weight_vjp`: one BLAS GEMM gᵀ x."""
    np.dot(g.T, x, out=out_w)  # np.dot: BLAS for transposed operands (matmul may not be)
    np.sum(g, axis=0, out=out_b)
    return out_w, out_b


def conv2d_weight_vjp(x, g, stride, padding, dilation, out_w, out_b):
    """Same math as :func:`relprop.kernels.reference.train.conv2d_weight_vjp`.

    Chunked im2col (the convolution's own, :func:`relprop.kernels.cpu.conv2d.im2col_chunk`) + one
    BLAS GEMM per chunk, accumulated in chunk order.
    """
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, k = g.shape[0], g.shape[1]
    kh, kw = out_w.shape[2], out_w.shape[3]
    ho, wo = g.shape[2], g.shape[3]
    rows, m = x.shape[1] * kh * kw, ho * wo
    nb = int(max(1, min(n, _config.CONV_CHUNK_BYTES // max(1, rows * m * x.itemsize))))
    buf = np.empty(rows * nb * m, dtype=x.dtype)
    dw_flat = out_w.reshape(k, rows)
    part = np.empty((k, rows), dtype=x.dtype)
    g3 = g.reshape(n, k, m)
    for n0 in range(0, n, nb):
        n1 = min(n, n0 + nb)
        cols = buf[: rows * (n1 - n0) * m].reshape(rows, (n1 - n0) * m)
        im2col_chunk(x, n0, n1 - n0, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, cols)
        gt = np.ascontiguousarray(g3[n0:n1].transpose(1, 0, 2)).reshape(k, (n1 - n0) * m)
        if n0 == 0:
            np.dot(gt, cols.T, out=dw_flat)
        else:
            np.dot(gt, cols.T, out=part)
            dw_flat += part
    np.sum(g, axis=(0, 2, 3), out=out_b)
    return out_w, out_b
