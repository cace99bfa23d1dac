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
entry has exactly one writer).  Each kernel runs on a 3-D grid, blocks over the chunks of
a group and the rows and threads over the columns (samples), so the row's unit, regime and
tap are per block.  Up to ``_MAX_GROUP`` chunks share one launch of each of these kernels
(VGG-16's first layers have hundreds of chunks per batch: launches, not arithmetic, would
bound them), with one GEMM per chunk; the flush adds the group's chunks in order, so the
sums are bitwise those of one chunk at a time.  The GEMM is
:func:`relprop.kernels.cuda._launch.matmul` (cuBLAS on a GPU, NumPy under the simulator).

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
    # z (N, J, Q): Q = Ho·Wo positions (1 for dense); sample s = n·Q + q.  u (G, 3J+1, S): chunk c of the group
    # holds samples s0 + c·S .. s0 + (c+1)·S.  Blocks over chunks (z) and rows (y), threads over samples (x).
    n_units, n_pos = z.shape[1], z.shape[2]
    n_group, n_rows, n_samples = u.shape[0], u.shape[1], u.shape[2]
    x0, y0, z0 = cuda.grid(3)
    sx, sy, sz = cuda.gridsize(3)
    for c in range(z0, n_group, sz):
        first = s0 + c * n_samples
        for row in range(y0, n_rows, sy):
            if row == 3 * n_units:
                for t in range(x0, n_samples, sx):
                    u[c, row, t] = 1
                continue
            j = row % n_units
            kind = row // n_units
            bj = b[j]
            for t in range(x0, n_samples, sx):
                s = first + t
                n = s // n_pos
                zj = z[n, j, s - n * n_pos]
                if kind == 0:
                    u[c, row, t] = zj - bj
                elif zj > 0:
                    if kind == 1:
                        u[c, row, t] = zj - bj
                    else:
                        u[c, row, t] = 1
                else:
                    u[c, row, t] = 0


@cuda.jit(cache=_config.NUMBA_CACHE)
def _dense_cols_kernel(x, s0, cols):
    # cols (G, I+1, S): cols[c, i, t] = x[s0 + c·S + t, i]; cols[c, I, t] = 1.
    # Blocks over chunks (z) and rows i (y), threads over t (x).
    n_in = x.shape[1]
    n_group, n_samples = cols.shape[0], cols.shape[2]
    x0, y0, z0 = cuda.grid(3)
    sx, sy, sz = cuda.gridsize(3)
    for c in range(z0, n_group, sz):
        first = s0 + c * n_samples
        for i in range(y0, n_in + 1, sy):
            for t in range(x0, n_samples, sx):
                if i == n_in:
                    cols[c, i, t] = 1
                else:
                    cols[c, i, t] = x[first + t, i]


@cuda.jit(cache=_config.NUMBA_CACHE)
def _conv_cols_kernel(x, s0, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, cols):
    # cols (G, C·kh·kw + 1, S): column t of chunk c is the zero-padded patch of sample s = (n, i, j) = s0 + c·S + t,
    # in the weight's (c, a, e) order; the last row is ones.  Blocks over chunks (z) and rows q (y), threads over t.
    h, wd = x.shape[2], x.shape[3]
    n_group, n_in, n_samples = cols.shape[0], cols.shape[1] - 1, cols.shape[2]
    taps = kh * kw
    x0, y0, z0 = cuda.grid(3)
    sx, sy, sz = cuda.gridsize(3)
    for g in range(z0, n_group, sz):
        first = s0 + g * n_samples
        for q in range(y0, n_in + 1, sy):
            if q == n_in:
                for t in range(x0, n_samples, sx):
                    cols[g, q, t] = 1
                continue
            c = q // taps
            r_off = ((q % taps) // kw) * dh - ph
            c_off = (q % kw) * dw - pw
            for t in range(x0, n_samples, sx):
                s = first + t
                m = s // wo  # = n·Ho + i
                j = s - m * wo
                n = m // ho
                r = (m - n * ho) * sh + r_off
                col = j * sw + c_off
                if 0 <= r < h and 0 <= col < wd:
                    cols[g, q, t] = x[n, c, r, col]
                else:
                    cols[g, q, t] = 0


@cuda.jit(cache=_config.NUMBA_CACHE)
def _flush_kernel(p, count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy):
    # p (G, 3J+1, I+1): the group's chunk sums -> the float64 accumulators.  One thread per entry of P adds the
    # G chunks in order (the accumulator sees the same additions as G flushes one after another), so every
    # accumulator entry has exactly one writer.  Blocks over rows (y), threads over columns q (x).
    n_units, n_in = sum_x_pos.shape[0], sum_x_pos.shape[1]
    n_group = p.shape[0]
    x0, y0, _ = cuda.grid(3)
    sx, sy, _ = cuda.gridsize(3)
    for row in range(y0, p.shape[1], sy):
        j = row % n_units
        kind = row // n_units
        for q in range(x0, n_in + 1, sx):
            if row == 3 * n_units:
                if q == n_in:
                    acc = count[0]
                else:
                    acc = sum_x[q]
            elif q == n_in:
                if kind == 2:
                    acc = count_pos[j]
                else:
                    acc = sum_y[kind, j]
            elif kind == 2:
                acc = sum_x_pos[j, q]
            else:
                acc = sum_xy[kind, j, q]
            for g in range(n_group):
                acc += p[g, row, q]
            if row == 3 * n_units:
                if q == n_in:
                    count[0] = acc
                else:
                    sum_x[q] = acc
            elif q == n_in:
                if kind == 2:
                    count_pos[j] = acc
                else:
                    sum_y[kind, j] = acc
            elif kind == 2:
                sum_x_pos[j, q] = acc
            else:
                sum_xy[kind, j, q] = acc


#: at most this many chunks share one launch of the U, X and flush kernels
_MAX_GROUP = 64


def _accumulate(x, z3, b, n_in, build_cols, accumulators):
    """Chunks of samples: U and X kernels, one GEMM per chunk, the flush into the float64 accumulators.

    Chunks of ``S`` samples fix what is summed in the input dtype; ``G`` of them share one
    launch of each kernel of ours (the scratch budget permitting), with one GEMM per chunk
    and one flush for the group that adds the chunks in order, so the result does not
    depend on G.  A last, shorter chunk forms a group of its own.
    """
    count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy = accumulators
    n_units = z3.shape[1]
    n_samples = z3.shape[0] * z3.shape[2]
    if n_samples == 0:
        return
    n_rows = 3 * n_units + 1
    budget = int(_config.CUDA_SCRATCH_BYTES)
    per_sample = (n_in + 1 + n_rows) * x.itemsize
    chunk = max(1, min(n_samples, _FLUSH_ROWS, budget // per_sample))
    per_chunk = per_sample * chunk + n_rows * (n_in + 1) * x.itemsize
    n_full = n_samples // chunk
    group = max(1, min(n_full, _MAX_GROUP, budget // per_chunk))
    u_buf = empty(x, group * n_rows * chunk)
    cols_buf = empty(x, group * (n_in + 1) * chunk)
    p_buf = empty(x, group * n_rows * (n_in + 1))
    flat = (count.reshape(1), sum_x.reshape(n_in), count_pos, sum_y,
            sum_x_pos.reshape(n_units, n_in), sum_xy.reshape(2, n_units, n_in))
    # (first sample, chunks, samples per chunk): the full chunks in groups, then the remainder
    runs = [(c0 * chunk, min(group, n_full - c0), chunk) for c0 in range(0, n_full, group)]
    if n_samples > n_full * chunk:
        runs.append((n_full * chunk, 1, n_samples - n_full * chunk))
    for s0, g, s in runs:
        u = u_buf[:g * n_rows * s].reshape(g, n_rows, s)
        cols = cols_buf[:g * (n_in + 1) * s].reshape(g, n_in + 1, s)
        p = p_buf[:g * n_rows * (n_in + 1)].reshape(g, n_rows, n_in + 1)
        launch_grid(_units_kernel, u.shape, z3, b, s0, u)
        build_cols(s0, cols)
        for c in range(g):
            matmul(u[c], cols[c].T, p[c])
        launch_grid(_flush_kernel, (1,) + p.shape[1:], p, *flat)


def pattern_stats_dense(x, z, b, count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy):
    """Same math as :func:`relprop.kernels.reference.patterns.pattern_stats_dense` (strategy: module doc)."""
    n, n_in = x.shape

    def build_cols(s0, cols):
        launch_grid(_dense_cols_kernel, cols.shape, x, s0, cols)

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
        launch_grid(_conv_cols_kernel, cols.shape, x, s0, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, cols)

    _accumulate(x, z.reshape(n, n_units, ho * wo), b, sum_x.size, build_cols,
                (count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy))
    return count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy
