"""Numba CUDA twins of :mod:`relprop.kernels.reference.patterns` (same names, signatures, math).

Strategy.  Every sum the estimators need is one entry of a single GEMM per chunk of samples::

    P (3J+1, I+1) = U (3J+1, S) @ Xᵀ (S, I+1),   U = [Y; M ⊙ Y; M; 1],   X = [patches; 1]

with M = [z > 0] the positive regime and Y = z - b.  The appended row of ones in X and U
makes the last column of P hold Σy, Σ₊y, n₊ and the last row Σx and the sample count, so
the per-unit and shared sums need no reductions of their own.  Kernels of ours build U
(one thread per entry; the regime masks), X (one thread per entry: the transposed rows of
a dense input, or the im2col patches of a convolution with the padding written as zeros,
laid out (I+1, S) so that reads and writes are coalesced along the samples), and the flush
(one thread per entry of P, adding it into its float64 accumulator: every accumulator
entry has exactly one writer).  Each kernel runs on a 2-D grid, blocks over the rows and
threads over the columns (samples), so the row's unit, regime and tap are per block.  The
GEMM is :func:`relprop.kernels.cuda._launch.matmul` (cuBLAS on a GPU, NumPy under the
simulator).

Precision (as the cpu twin).  The GEMM runs in the input dtype on chunks of at most
``_FLUSH_ROWS`` samples; every chunk is flushed into the float64 accumulators, so float32
input forms the sums of at most ``_FLUSH_ROWS`` samples in float32 (counts stay exact), and
everything across chunks and calls is float64.  Fixed chunk boundaries and one writer per
element: bitwise reproducible.
"""
from numba import cuda

from ... import _config
from ._launch import empty, launch_grid, matmul

__all__ = ["pattern_stats_dense", "pattern_stats_conv2d"]

#: samples summed in the input dtype before P is flushed into the float64 accumulators
_FLUSH_ROWS = 8192


@cuda.jit(cache=_config.NUMBA_CACHE)
def _units_kernel(z, b, s0, u):
    # z (N, J, Q): Q = Ho·Wo positions (1 for dense); sample s = n·Q + q.  u (3J+1, S) for samples s0 .. s0+S.
    # blocks over rows (y), threads over samples (x)
    n_units, n_pos = z.shape[1], z.shape[2]
    n_rows, n_samples = u.shape[0], u.shape[1]
    x0, y0, _ = cuda.grid(3)
    sx, sy, _ = cuda.gridsize(3)
    for row in range(y0, n_rows, sy):
        if row == 3 * n_units:
            for t in range(x0, n_samples, sx):
                u[row, t] = 1
            continue
        j = row % n_units
        kind = row // n_units
        bj = b[j]
        for t in range(x0, n_samples, sx):
            s = s0 + t
            n = s // n_pos
            zj = z[n, j, s - n * n_pos]
            if kind == 0:
                u[row, t] = zj - bj
            elif zj > 0:
                if kind == 1:
                    u[row, t] = zj - bj
                else:
                    u[row, t] = 1
            else:
                u[row, t] = 0


@cuda.jit(cache=_config.NUMBA_CACHE)
def _dense_cols_kernel(x, s0, cols):
    # cols (I+1, S): cols[i, t] = x[s0 + t, i]; cols[I, t] = 1; blocks over rows i (y), threads over t (x)
    n_in, n_samples = x.shape[1], cols.shape[1]
    x0, y0, _ = cuda.grid(3)
    sx, sy, _ = cuda.gridsize(3)
    for i in range(y0, n_in + 1, sy):
        for t in range(x0, n_samples, sx):
            if i == n_in:
                cols[i, t] = 1
            else:
                cols[i, t] = x[s0 + t, i]


@cuda.jit(cache=_config.NUMBA_CACHE)
def _conv_cols_kernel(x, s0, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, cols):
    # cols (C·kh·kw + 1, S): the zero-padded patch of sample s = (n, i, j) = s0 + t, in the weight's
    # (c, a, e) order, as column t; the last row is ones.  Blocks over rows q (y), threads over t (x).
    h, wd = x.shape[2], x.shape[3]
    n_in, n_samples = cols.shape[0] - 1, cols.shape[1]
    taps = kh * kw
    x0, y0, _ = cuda.grid(3)
    sx, sy, _ = cuda.gridsize(3)
    for q in range(y0, n_in + 1, sy):
        if q == n_in:
            for t in range(x0, n_samples, sx):
                cols[q, t] = 1
            continue
        c = q // taps
        r_off = ((q % taps) // kw) * dh - ph
        c_off = (q % kw) * dw - pw
        for t in range(x0, n_samples, sx):
            s = s0 + t
            m = s // wo  # = n·Ho + i
            j = s - m * wo
            n = m // ho
            r = (m - n * ho) * sh + r_off
            col = j * sw + c_off
            if 0 <= r < h and 0 <= col < wd:
                cols[q, t] = x[n, c, r, col]
            else:
                cols[q, t] = 0


@cuda.jit(cache=_config.NUMBA_CACHE)
def _flush_kernel(p, count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy):
    # p (3J+1, I+1) -> the float64 accumulators; one thread per entry of p, one writer per accumulator entry.
    # Blocks over rows (y), threads over columns q (x).
    n_units, n_in = sum_x_pos.shape[0], sum_x_pos.shape[1]
    x0, y0, _ = cuda.grid(3)
    sx, sy, _ = cuda.gridsize(3)
    for row in range(y0, p.shape[0], sy):
        if row == 3 * n_units:
            for q in range(x0, n_in + 1, sx):
                if q == n_in:
                    count[0] += p[row, q]
                else:
                    sum_x[q] += p[row, q]
            continue
        j = row % n_units
        kind = row // n_units
        for q in range(x0, n_in + 1, sx):
            v = p[row, q]
            if q == n_in:
                if kind == 2:
                    count_pos[j] += v
                else:
                    sum_y[kind, j] += v
            elif kind == 2:
                sum_x_pos[j, q] += v
            else:
                sum_xy[kind, j, q] += v


def _accumulate(x, z3, b, n_in, build_cols, accumulators):
    """Chunks of samples: U and X kernels, one GEMM, one flush into the float64 accumulators."""
    count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy = accumulators
    n_units = z3.shape[1]
    n_samples = z3.shape[0] * z3.shape[2]
    if n_samples == 0:
        return
    per_sample = (n_in + 1 + 3 * n_units + 1) * x.itemsize
    chunk = max(1, min(n_samples, _FLUSH_ROWS, int(_config.CUDA_SCRATCH_BYTES) // per_sample))
    u_buf = empty(x, (3 * n_units + 1) * chunk)
    cols_buf = empty(x, (n_in + 1) * chunk)
    p = empty(x, (3 * n_units + 1, n_in + 1))
    flat = (count.reshape(1), sum_x.reshape(n_in), count_pos, sum_y,
            sum_x_pos.reshape(n_units, n_in), sum_xy.reshape(2, n_units, n_in))
    for s0 in range(0, n_samples, chunk):
        s = min(chunk, n_samples - s0)
        u = u_buf[:(3 * n_units + 1) * s].reshape(3 * n_units + 1, s)
        cols = cols_buf[:(n_in + 1) * s].reshape(n_in + 1, s)
        launch_grid(_units_kernel, (1,) + u.shape, z3, b, s0, u)
        build_cols(s0, cols)
        matmul(u, cols.T, p)
        launch_grid(_flush_kernel, (1,) + p.shape, p, *flat)


def pattern_stats_dense(x, z, b, count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy):
    """Same math as :func:`relprop.kernels.reference.patterns.pattern_stats_dense` (strategy: module doc)."""
    n, n_in = x.shape

    def build_cols(s0, cols):
        launch_grid(_dense_cols_kernel, (1,) + cols.shape, x, s0, cols)

    _accumulate(x, z.reshape(n, z.shape[1], 1), b, n_in, build_cols,
                (count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy))
    return count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy


def pattern_stats_conv2d(x, z, b, stride, padding, dilation, count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy):
    """Same math as :func:`relprop.kernels.reference.patterns.pattern_stats_conv2d` (strategy: module doc).

    Every output position (n, i, j) is one sample; chunks are flat ranges of them.
    """
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, n_units, ho, wo = z.shape
    kh, kw = sum_x.shape[1], sum_x.shape[2]

    def build_cols(s0, cols):
        launch_grid(_conv_cols_kernel, (1,) + cols.shape, x, s0, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, cols)

    _accumulate(x, z.reshape(n, n_units, ho * wo), b, sum_x.size, build_cols,
                (count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy))
    return count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy
