"""Numba + BLAS twins of :mod:`relprop.kernels.reference.patterns` (same names, signatures, math).

Strategy.  The three per-unit sums are one fused GEMM over a block of samples::

    P (3J, I) += U (3J, S) @ X (S, I),   U = [Y; M ⊙ Y; M]^T,   M = [z > 0],  Y = z - b

where X holds the block's samples as rows (a dense layer's input rows; for a convolution
the im2col patch matrix, built here column-major as (I, S) so that every copy is a
contiguous run of an input row).  The blocks are bounded (``_config.CONV_CHUNK_BYTES`` of
patches, whole rows of the output grid), so the im2col of a large batch never exists at
once.  One Numba pass per block builds the patch block and U (prange over the I patch
rows and the J units together, one writer per row; it also sums Σx per patch row and Σy,
Σ₊y, n₊ per unit in float64), then one BLAS call adds the block's product into P.

Precision.  The GEMM runs in the input dtype through BLAS (``scipy.linalg.blas``) with
beta = 1 into one P buffer; P is added into the float64 accumulators ("flushed") after at
most ``_FLUSH_ROWS`` samples and at the end of the call.  So for float32 input the sums of
at most ``_FLUSH_ROWS`` samples are formed in float32 (relative error ~ eps·sqrt(S)), and
everything across blocks and calls is float64; float64 input is float64 throughout.
(A dense layer at a small batch is bound by the flush, one pass over its J·I accumulators;
measured, that still beats a float64 GEMM straight into them, which runs at half the rate.)
Deterministic: fixed block boundaries, one writer per output element.
"""
import numpy as np
from numba import njit, prange
from scipy.linalg import blas as _blas

from ... import _config

__all__ = ["pattern_stats_dense", "pattern_stats_conv2d"]

#: samples summed in the input dtype before P is flushed into the float64 accumulators
_FLUSH_ROWS = 8192

_GEMM = {np.dtype(np.float32): _blas.sgemm, np.dtype(np.float64): _blas.dgemm}


@njit(parallel=True, cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def _units_dense(z, b, r0, u, count_pos, sum_y):
    """u (3J, S) = [y; m*y; m] for samples r0 .. r0+S of z (N, J); sums n+, Σy, Σ+y in float64."""
    n_units = z.shape[1]
    s = u.shape[1]
    for j in prange(n_units):
        bj = b[j]
        sy = 0.0
        sy_pos = 0.0
        n_pos = 0.0
        for t in range(s):
            zj = z[r0 + t, j]
            y = zj - bj
            u[j, t] = y
            if zj > 0:
                u[n_units + j, t] = y
                u[2 * n_units + j, t] = 1
                sy_pos += y
                n_pos += 1.0
            else:
                u[n_units + j, t] = 0
                u[2 * n_units + j, t] = 0
            sy += y
        sum_y[0, j] += sy
        sum_y[1, j] += sy_pos
        count_pos[j] += n_pos


@njit(cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def _unit_row_conv(z, b, k, g0, u, count_pos, sum_y):
    """Rows k, K+k, 2K+k of u (3K, S) = y, m*y, m of unit k for output rows g0, g0+1, ... (g = n*Ho + i)."""
    n_units, ho, wo = z.shape[1], z.shape[2], z.shape[3]
    n_rows = u.shape[1] // wo
    bk = b[k]
    sy = 0.0
    sy_pos = 0.0
    n_pos = 0.0
    for r in range(n_rows):
        g = g0 + r
        n = g // ho
        i = g - n * ho
        base = r * wo
        for j in range(wo):
            zk = z[n, k, i, j]
            y = zk - bk
            u[k, base + j] = y
            if zk > 0:
                u[n_units + k, base + j] = y
                u[2 * n_units + k, base + j] = 1
                sy_pos += y
                n_pos += 1.0
            else:
                u[n_units + k, base + j] = 0
                u[2 * n_units + k, base + j] = 0
            sy += y
    sum_y[0, k] += sy
    sum_y[1, k] += sy_pos
    count_pos[k] += n_pos


@njit(cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def _patch_row(x, q, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, g0, cols, sum_x):
    """Row q = (c, a, e) of cols (C*kh*kw, S): what tap (a, e) of channel c sees, for output rows g0, ...

    cols[q, (r, j)] = x_pad[n, c, i*sh + a*dh, j*sw + e*dw] with g0 + r = n*Ho + i; sum_x[q] += the
    row's sum (float64).  The valid column range of the tap is computed once, so the inner loop
    is a plain strided copy and the padding is written as zeros outside it.
    """
    h, w = x.shape[2], x.shape[3]
    n_rows = cols.shape[1] // wo
    c = q // (kh * kw)
    a = (q // kw) % kh
    e = q % kw
    off = e * dw - pw
    # output columns j with 0 <= j*sw + off < w
    j0 = 0 if off >= 0 else (-off + sw - 1) // sw
    j1 = 0 if w - off <= 0 else min(wo, (w - off - 1) // sw + 1)
    if j1 < j0:
        j1 = j0
    acc = 0.0
    for r in range(n_rows):
        g = g0 + r
        n = g // ho
        i = g - n * ho
        row = i * sh + a * dh - ph
        base = r * wo
        if row < 0 or row >= h:
            for j in range(wo):
                cols[q, base + j] = 0
            continue
        for j in range(j0):
            cols[q, base + j] = 0
        for j in range(j0, j1):
            v = x[n, c, row, j * sw + off]
            cols[q, base + j] = v
            acc += v
        for j in range(j1, wo):
            cols[q, base + j] = 0
    sum_x[q] += acc


@njit(parallel=True, cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def _chunk_conv(x, z, b, kh, kw, sh, sw, ph, pw, dh, dw, g0, cols, u, sum_x, count_pos, sum_y):
    """One parallel pass per chunk of output rows: the patch rows of cols and the unit rows of u.

    prange over the C*kh*kw patch rows and the K units together, one writer per row; a single
    parallel region per chunk, so the threads wake once between two GEMMs.
    """
    n_in = cols.shape[0]
    ho, wo = z.shape[2], z.shape[3]
    for t in prange(n_in + z.shape[1]):
        if t < n_in:
            _patch_row(x, t, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, g0, cols, sum_x)
        else:
            _unit_row_conv(z, b, t - n_in, g0, u, count_pos, sum_y)


@njit(parallel=True, cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def _flush(p, sum_xy, sum_x_pos):
    """Add P (3J, I) into the float64 accumulators sum_xy (2, J, I), sum_x_pos (J, I)."""
    n_units = sum_x_pos.shape[0]
    for j in prange(n_units):
        for i in range(p.shape[1]):
            sum_xy[0, j, i] += p[j, i]
            sum_xy[1, j, i] += p[n_units + j, i]
            sum_x_pos[j, i] += p[2 * n_units + j, i]


@njit(parallel=True, cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def _column_sums(x, out):
    """out (I,) += Σ_rows x (S, I), float64; prange over blocks of columns."""
    n_cols = x.shape[1]
    width = 64
    for blk in prange((n_cols + width - 1) // width):
        i0 = blk * width
        i1 = min(n_cols, i0 + width)
        acc = np.zeros(i1 - i0)
        for s in range(x.shape[0]):
            for i in range(i0, i1):
                acc[i - i0] += x[s, i]
        for i in range(i0, i1):
            out[i] += acc[i - i0]


class _Accumulator:
    """P (3J, I) in the input dtype: GEMMs add into it (beta = 1); flushes go to float64."""

    def __init__(self, n_units, n_in, dtype, sum_xy, sum_x_pos):
        self.p = np.empty((3 * n_units, n_in), dtype=dtype)
        self.gemm = _GEMM[np.dtype(dtype)]
        self.sum_xy, self.sum_x_pos = sum_xy, sum_x_pos
        self.rows = 0          # samples in P since the last flush (0: P holds garbage)

    def add(self, u, x, x_transposed):
        """P += u (3J, S) @ X, X given as x (S, I) or, with x_transposed, as x (I, S)."""
        beta = 1.0 if self.rows else 0.0
        # Row-major P (3J, I) is column-major P^T (I, 3J) = X^T u^T: pass the transposed views.
        out = self.gemm(1.0, x.T, u.T, beta=beta, c=self.p.T, trans_a=int(x_transposed), overwrite_c=1)
        if out.ctypes.data != self.p.ctypes.data:   # f2py had to copy c (never for our aligned buffers)
            self.p[...] = out.T
        self.rows += u.shape[1]
        if self.rows >= _FLUSH_ROWS:
            self.flush()

    def flush(self):
        if self.rows:
            _flush(self.p, self.sum_xy, self.sum_x_pos)
            self.rows = 0


def pattern_stats_dense(x, z, b, count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy):
    """Same math as :func:`relprop.kernels.reference.patterns.pattern_stats_dense`.

    Blocks of rows of x go straight to the GEMM (no copy); U is built per block.
    """
    n, n_in = x.shape
    n_units = z.shape[1]
    rows = int(max(256, min(_FLUSH_ROWS, _config.CONV_CHUNK_BYTES // (x.itemsize * max(n_in, 3 * n_units)))))
    buf = np.empty(3 * n_units * min(rows, n), dtype=x.dtype)
    acc = _Accumulator(n_units, n_in, x.dtype, sum_xy, sum_x_pos)
    for r0 in range(0, n, rows):
        s = min(rows, n - r0)
        u = buf[:3 * n_units * s].reshape(3 * n_units, s)
        _units_dense(z, b, r0, u, count_pos, sum_y)
        acc.add(u, x[r0:r0 + s], x_transposed=False)
    acc.flush()
    _column_sums(x, sum_x)
    count[...] += n
    return count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy


def pattern_stats_conv2d(x, z, b, stride, padding, dilation, count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy):
    """Same math as :func:`relprop.kernels.reference.patterns.pattern_stats_conv2d`.

    Chunks of whole output rows (g = n*Ho + i): im2col of the chunk into an (I, S) buffer
    of at most ``_config.CONV_CHUNK_BYTES`` (at least one output row), U (3K, S), one GEMM.
    """
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n_units, ho, wo = z.shape[1], z.shape[2], z.shape[3]
    kh, kw = sum_x.shape[1], sum_x.shape[2]
    n_in = sum_x.size
    n_grid_rows = z.shape[0] * ho
    per_row = wo * x.itemsize * max(n_in, 3 * n_units)
    rows = int(max(1, min(n_grid_rows, _config.CONV_CHUNK_BYTES // per_row, max(1, _FLUSH_ROWS // wo))))
    cols_buf = np.empty(n_in * rows * wo, dtype=x.dtype)
    u_buf = np.empty(3 * n_units * rows * wo, dtype=x.dtype)
    acc = _Accumulator(n_units, n_in, x.dtype, sum_xy.reshape(2, n_units, n_in), sum_x_pos.reshape(n_units, n_in))
    sx = sum_x.reshape(-1)
    for g0 in range(0, n_grid_rows, rows):
        s = min(rows, n_grid_rows - g0) * wo
        cols = cols_buf[:n_in * s].reshape(n_in, s)
        u = u_buf[:3 * n_units * s].reshape(3 * n_units, s)
        _chunk_conv(x, z, b, kh, kw, sh, sw, ph, pw, dh, dw, g0, cols, u, sx, count_pos, sum_y)
        acc.add(u, cols, x_transposed=True)
    acc.flush()
    count[...] += n_grid_rows * wo
    return count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy
