"""Numba CUDA twins of :mod:`relprop.kernels.reference.train` (same names, signatures, math).

Weight gradients are GEMMs (cuBLAS on a GPU, NumPy under the simulator; see
:mod:`relprop.kernels.cuda._launch`).  The convolution's is one GEMM per chunk of
samples, dW (K, C·kh·kw) (+)= gᵀ (K, Nc·Ho·Wo) @ colsᵀ: the im2col kernel of
:mod:`relprop.kernels.cuda.conv2d` writes the columns as (C·kh·kw, Nc, Ho·Wo) here (its
``rows_outer`` layout), and a transpose kernel lays g out as (K, Nc, Ho·Wo), so the sum
over samples and positions is one GEMM; chunks are visited in order.  Bias gradients are
the deterministic two-pass sums of :mod:`relprop.kernels.cuda._reduce`.
No atomics: results are bitwise reproducible.
"""
from numba import cuda

from ... import _config
from ._launch import empty, launch, launch_grid, matmul
from ._reduce import sum_outer
from .conv2d import chunk_samples, im2col_kernel

__all__ = ["dense_weight_vjp", "conv2d_weight_vjp"]


@cuda.jit(cache=_config.NUMBA_CACHE)
def _nkq_to_knq_kernel(g, n0, t):
    # t[k, n, q] = g[n0 + n, k, q]; g (N, K, Q), t (K, Nc, Q); blocks over (k, n), threads over q
    n_out, n_chunk, n_pos = t.shape[0], t.shape[1], t.shape[2]
    x0, y0, z0 = cuda.grid(3)
    sx, sy, sz = cuda.gridsize(3)
    for kk in range(z0, n_out, sz):
        for n in range(y0, n_chunk, sy):
            for q in range(x0, n_pos, sx):
                t[kk, n, q] = g[n0 + n, kk, q]


@cuda.jit(cache=_config.NUMBA_CACHE)
def _add_kernel(out, a):
    for k in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[k] += a[k]


def dense_weight_vjp(x, g, out_w, out_b):
    """Same math as :func:`relprop.kernels.reference.train.dense_weight_vjp`: the GEMM gᵀ x; Σ_n g by a kernel."""
    matmul(g.T, x, out_w)
    sum_outer(g.reshape(g.shape[0], g.shape[1], 1), out_b)
    return out_w, out_b


def conv2d_weight_vjp(x, g, stride, padding, dilation, out_w, out_b):
    """Same math as :func:`relprop.kernels.reference.train.conv2d_weight_vjp`.

    Per chunk of samples: im2col (one thread per column entry) into a (C·kh·kw, Nc, Ho·Wo)
    buffer, g transposed to (K, Nc·Ho·Wo) (one thread per entry), one GEMM; later chunks add their GEMM into dW
    with an elementwise kernel.  db = Σ_{n,i,j} g by the two-pass deterministic sum.
    """
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, n_out, ho, wo = g.shape
    kh, kw = out_w.shape[2], out_w.shape[3]
    rows, n_pos = x.shape[1] * kh * kw, ho * wo
    dw_flat = out_w.reshape(n_out, rows)
    g3 = g.reshape(n, n_out, n_pos)
    if n == 0 or n_pos == 0:
        out_w[...] = 0
        out_b[...] = 0
        return out_w, out_b
    chunk = chunk_samples(n, max(rows, n_out), n_pos, x.dtype.itemsize)
    cols_buf = empty(x, rows * chunk * n_pos)
    t_buf = empty(x, n_out * chunk * n_pos)
    part = empty(x, (n_out, rows)) if chunk < n else None
    for n0 in range(0, n, chunk):
        nc = min(chunk, n - n0)
        cols = cols_buf[:rows * nc * n_pos].reshape(rows, nc, n_pos)
        t = t_buf[:n_out * nc * n_pos].reshape(n_out, nc, n_pos)
        launch_grid(im2col_kernel, (nc, rows, n_pos), x, n0, kh, kw, sh, sw, ph, pw, dh, dw, wo, True, cols)
        launch_grid(_nkq_to_knq_kernel, t.shape, g3, n0, t)
        cols_t = cols.reshape(rows, nc * n_pos).T
        if n0 == 0:
            matmul(t.reshape(n_out, nc * n_pos), cols_t, dw_flat)
        else:
            matmul(t.reshape(n_out, nc * n_pos), cols_t, part)
            launch(_add_kernel, part.size, dw_flat.reshape(-1), part.reshape(-1))
    sum_outer(g3, out_b)
    return out_w, out_b
