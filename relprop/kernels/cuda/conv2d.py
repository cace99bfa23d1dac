"""Numba CUDA twins of :mod:`relprop.kernels.reference.conv2d` (same names, signatures, math).

im2col + one GEMM per chunk of samples, with the column matrix laid out
``cols[(c, a, e), n, (i, j)]`` (C·kh·kw rows, Nc·Ho·Wo columns) so that each chunk is a
single large GEMM (cuBLAS on a GPU) rather than Nc small ones:

- forward: ``t = W (K, C·kh·kw) @ cols`` is (K, Nc, Ho·Wo); one kernel writes
  ``out[n, k] = t[k, n] + b[k]`` (transpose to NCHW fused with the bias);
- input-VJP: one kernel transposes g to (K, Nc, Ho·Wo), ``cols = Wᵀ @ gᵀ``, and col2im
  is a gather: one thread per input element sums the taps that read it, in (a, e)
  order, so there are no atomics and the result is bitwise reproducible.

Chunks of samples keep the column matrix under ``_config.CUDA_SCRATCH_BYTES``.
Scratch lives in the arrays' namespace (CuPy on a GPU), so cuBLAS can take it.
"""
from numba import cuda

from ... import _config
from ._launch import empty, launch, matmul, scalar

__all__ = ["conv2d_forward", "conv2d_vjp"]


@cuda.jit
def _im2col_kernel(x, n0, kh, kw, sh, sw, ph, pw, dh, dw, wo, cols):
    # x (N, C, H, W); cols (C·kh·kw, Nc, Ho·Wo) for samples n0 .. n0+Nc; one thread per entry
    h, wd = x.shape[2], x.shape[3]
    n_chunk, n_pos = cols.shape[1], cols.shape[2]
    taps = kh * kw
    for k in range(cuda.grid(1), cols.size, cuda.gridsize(1)):
        q = k % n_pos
        n = (k // n_pos) % n_chunk
        row = k // (n_pos * n_chunk)
        c = row // taps
        a = (row % taps) // kw
        e = row % kw
        r = (q // wo) * sh - ph + a * dh
        s = (q % wo) * sw - pw + e * dw
        if 0 <= r < h and 0 <= s < wd:
            cols[row, n, q] = x[n0 + n, c, r, s]
        else:
            cols[row, n, q] = 0


@cuda.jit
def _knq_to_nkq_bias_kernel(t, b, n0, out):
    # t (K, Nc, Q) -> out[n0 + n, k, q] = t[k, n, q] + b[k]; out (N, K, Q); one thread per output
    n_out, n_pos = t.shape[0], t.shape[2]
    for k in range(cuda.grid(1), t.size, cuda.gridsize(1)):
        q = k % n_pos
        kk = (k // n_pos) % n_out
        n = k // (n_pos * n_out)
        out[n0 + n, kk, q] = t[kk, n, q] + b[kk]


@cuda.jit
def _nkq_to_knq_kernel(g, n0, t):
    # t[k, n, q] = g[n0 + n, k, q]; g (N, K, Q), t (K, Nc, Q); one thread per output
    n_chunk, n_pos = t.shape[1], t.shape[2]
    for k in range(cuda.grid(1), t.size, cuda.gridsize(1)):
        q = k % n_pos
        n = (k // n_pos) % n_chunk
        kk = k // (n_pos * n_chunk)
        t[kk, n, q] = g[n0 + n, kk, q]


@cuda.jit
def _col2im_kernel(cols, n0, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, zero, out):
    # cols (C·kh·kw, Nc, Ho·Wo); out (N, C, H, W): one thread per input element of the chunk,
    # gathering every tap (a, e) whose window position lands on it
    n_chunk = cols.shape[1]
    n_channels, h, wd = out.shape[1], out.shape[2], out.shape[3]
    for k in range(cuda.grid(1), n_chunk * n_channels * h * wd, cuda.gridsize(1)):
        s = k % wd
        r = (k // wd) % h
        c = (k // (wd * h)) % n_channels
        n = k // (wd * h * n_channels)
        acc = zero
        for a in range(kh):
            rp = r + ph - a * dh  # = i·sh for the output row i that tap a maps here
            if rp < 0:
                break  # rp only shrinks with a
            if rp % sh != 0 or rp // sh >= ho:
                continue
            i = rp // sh
            for e in range(kw):
                sp = s + pw - e * dw
                if sp < 0:
                    break
                if sp % sw != 0 or sp // sw >= wo:
                    continue
                acc += cols[(c * kh + a) * kw + e, n, i * wo + sp // sw]
        out[n0 + n, c, r, s] = acc


def _chunk(n, rows, n_pos, itemsize):
    """Samples per chunk so that a (rows, chunk, n_pos) scratch stays under the byte budget."""
    per_sample = max(rows * n_pos * itemsize, 1)
    return max(1, min(n, int(_config.CUDA_SCRATCH_BYTES) // per_sample))


def conv2d_forward(x, w, b, stride, padding, dilation, out):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_forward`.

    Per chunk of samples: im2col kernel (one thread per column entry, zero padding written
    explicitly), one GEMM ``W @ cols``, and one kernel that transposes to NCHW and adds the
    bias (one thread per output element).
    """
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n = x.shape[0]
    n_out, n_channels, kh, kw = w.shape
    ho, wo = out.shape[2], out.shape[3]
    rows, n_pos = n_channels * kh * kw, ho * wo
    if n == 0 or n_pos == 0:
        return out
    wm = w.reshape(n_out, rows)
    out3 = out.reshape(n, n_out, n_pos)
    chunk = _chunk(n, max(rows, n_out), n_pos, x.dtype.itemsize)
    cols_buf = empty(x, rows * chunk * n_pos)
    t_buf = empty(x, n_out * chunk * n_pos)
    for n0 in range(0, n, chunk):
        nc = min(chunk, n - n0)
        cols = cols_buf[:rows * nc * n_pos].reshape(rows, nc, n_pos)
        t = t_buf[:n_out * nc * n_pos].reshape(n_out, nc, n_pos)
        launch(_im2col_kernel, cols.size, x, n0, kh, kw, sh, sw, ph, pw, dh, dw, wo, cols)
        matmul(wm, cols.reshape(rows, nc * n_pos), t.reshape(n_out, nc * n_pos))
        launch(_knq_to_nkq_bias_kernel, t.size, t, b, n0, out3)
    return out


def conv2d_vjp(g, w, stride, padding, dilation, out):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_vjp`.

    Per chunk of samples: a transpose kernel (g to (K, Nc, Ho·Wo)), one GEMM ``Wᵀ @ gᵀ``
    into the column matrix, and col2im as a gather (one thread per input element, taps
    summed in (a, e) order; no atomics).
    """
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n = out.shape[0]
    n_out, n_channels, kh, kw = w.shape
    ho, wo = g.shape[2], g.shape[3]
    rows, n_pos = n_channels * kh * kw, ho * wo
    if n == 0:
        return out
    if n_pos == 0:
        out[...] = 0
        return out
    wm = w.reshape(n_out, rows)
    g3 = g.reshape(n, n_out, n_pos)
    chunk = _chunk(n, max(rows, n_out), n_pos, g.dtype.itemsize)
    cols_buf = empty(g, rows * chunk * n_pos)
    t_buf = empty(g, n_out * chunk * n_pos)
    zero = scalar(out.dtype, 0)
    for n0 in range(0, n, chunk):
        nc = min(chunk, n - n0)
        cols = cols_buf[:rows * nc * n_pos].reshape(rows, nc, n_pos)
        t = t_buf[:n_out * nc * n_pos].reshape(n_out, nc, n_pos)
        launch(_nkq_to_knq_kernel, t.size, g3, n0, t)
        matmul(wm.T, t.reshape(n_out, nc * n_pos), cols.reshape(rows, nc * n_pos))
        launch(_col2im_kernel, nc * out[0].size, cols, n0, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, zero, out)
    return out
