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
entry has exactly one writer).  The GEMM is :func:`relprop.kernels.cuda._launch.matmul`
(cuBLAS on a GPU, NumPy under the simulator).

Precision (as the cpu twin).  The GEMM runs in the input dtype on chunks of at most
``_FLUSH_ROWS`` samples; every chunk is flushed into the float64 accumulators, so float32
input forms the sums of at most ``_FLUSH_ROWS`` samples in float32 (counts stay exact), and
everything across chunks and calls is float64.  Fixed chunk boundaries and one writer per
element: bitwise reproducible.
"""
from numba import cuda

from ... import _config
from ._launch import empty, launch, matmul

__all__ = ["pattern_stats_dense", "pattern_stats_conv2d"]

#: samples summed in the input dtype before P is flushed into the float64 accumulators
_FLUSH_ROWS = 8192


@cuda.jit(cache=True)
def _units_kernel(z, b, s0, u):
    # z (N, J, Q): Q = Ho·Wo positions (1 for dense); sample s = n·Q + q.  u (3J+1, S) for samples s0 .. s0+S.
    n_units, n_pos = z.shape[1], z.shape[2]
    n_samples = u.shape[1]
    for k in range(cuda.grid(1), u.size, cuda.gridsize(1)):
        t = k % n_samples
        row = k // n_samples
        if row == 3 * n_units:
            u[row, t] = 1
            continue
        j = row % n_units
        s = s0 + t
        zj = z[s // n_pos, j, s % n_pos]
        kind = row // n_units
        if kind == 0:
            u[row, t] = zj - b[j]
        elif zj > 0:
            if kind == 1:
                u[row, t] = zj - b[j]
            else:
                u[row, t] = 1
        else:
            u[row, t] = 0


@cuda.jit(cache=True)
def _dense_cols_kernel(x, s0, cols):
    # cols (I+1, S): cols[i, t] = x[s0 + t, i]; cols[I, t] = 1
    n_in, n_samples = x.shape[1], cols.shape[1]
    for k in range(cuda.grid(1), cols.size, cuda.gridsize(1)):
        t = k % n_samples
        i = k // n_samples
        if i == n_in:
            cols[i, t] = 1
        else:
            cols[i, t] = x[s0 + t, i]


@cuda.jit(cache=True)
def _conv_cols_kernel(x, s0, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, cols):
    # cols (C·kh·kw + 1, S): the zero-padded patch of sample s = (n, i, j) = s0 + t, in the weight's
    # (c, a, e) order, as column t; the last row is ones
    h, wd = x.shape[2], x.shape[3]
    n_in, n_samples = cols.shape[0] - 1, cols.shape[1]
    taps = kh * kw
    for k in range(cuda.grid(1), cols.size, cuda.gridsize(1)):
        t = k % n_samples
        q = k // n_samples
        if q == n_in:
            cols[q, t] = 1
            continue
        s = s0 + t
        j = s % wo
        i = (s // wo) % ho
        n = s // (wo * ho)
        c = q // taps
        r = i * sh - ph + ((q % taps) // kw) * dh
        col = j * sw - pw + (q % kw) * dw
        if 0 <= r < h and 0 <= col < wd:
            cols[q, t] = x[n, c, r, col]
        else:
            cols[q, t] = 0


@cuda.jit(cache=True)
def _flush_kernel(p, count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy):
    # p (3J+1, I+1) -> the float64 accumulators; one thread per entry of p, one writer per accumulator entry
    n_units, n_in = sum_x_pos.shape[0], sum_x_pos.shape[1]
    for k in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        q = k % (n_in + 1)
        row = k // (n_in + 1)
        v = p[row, q]
        if row == 3 * n_units:
            if q == n_in:
                count[0] += v
            else:
                sum_x[q] += v
            continue
        j = row % n_units
        kind = row // n_units
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
        launch(_units_kernel, u.size, z3, b, s0, u)
        build_cols(s0, cols)
        matmul(u, cols.T, p)
        launch(_flush_kernel, p.size, p, *flat)


def pattern_stats_dense(x, z, b, count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy):
    """Same math as :func:`relprop.kernels.reference.patterns.pattern_stats_dense` (strategy: module doc)."""
    n, n_in = x.shape

    def build_cols(s0, cols):
        launch(_dense_cols_kernel, cols.size, x, s0, cols)

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
        launch(_conv_cols_kernel, cols.size, x, s0, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, cols)

    _accumulate(x, z.reshape(n, n_units, ho * wo), b, sum_x.size, build_cols,
                (count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy))
    return count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy
