"""Numba CUDA twins of :mod:`relprop.kernels.reference.conv2d` (same names, signatures, math).

im2col + one batched GEMM per chunk of samples, with the column matrix laid out
``cols[n, (c, a, e), (i, j)]`` (Nc, C·kh·kw, Ho·Wo): sample n's columns are one
(C·kh·kw, Ho·Wo) matrix, so the GEMM writes NCHW directly and no transpose is needed:

- forward: ``out[n] = [W | b] (K, C·kh·kw + 1) @ [cols[n]; 1] (C·kh·kw + 1, Ho·Wo)``:
  im2col writes a last row of ones, so the bias rides in the GEMM (one GEMM, nothing after);
- input-VJP: ``cols[n] = Wᵀ (C·kh·kw, K) @ g[n] (K, Ho·Wo)`` straight from g, then col2im
  as a gather: one thread per input element sums the taps that read it, in (a, e) order,
  so there are no atomics and the result is bitwise reproducible.

Both kernels run on a 3-D grid (:func:`relprop.kernels.cuda._launch.launch_grid`): blocks
over samples (z) and rows or channels (y), threads over the positions of a plane (x), so
a thread splits its position into (row, column) with one 32-bit division and everything
else is per block.  Chunks of samples keep the column matrix under
``_config.CUDA_SCRATCH_BYTES``.  Scratch lives in the arrays' namespace (CuPy on a GPU),
so cuBLAS can take it.
"""
from numba import cuda, int32, uint32

from ... import _config
from ._launch import check_index_range, empty, launch_grid, matmul, scalar
from .elementwise import relu_forward, stabilized_divide
from .pool2d import gather_at_switches, maxpool2d_forward, maxpool2d_values, maxunpool2d

__all__ = ["conv2d_forward", "conv2d_vjp", "conv2d_relu_maxpool2x2", "conv2d_relu_maxpool2x2_chain",
           "conv2d_relevance", "conv2d_unpool_vjp", "conv2d_flat_relevance"]


@cuda.jit(cache=_config.NUMBA_CACHE)
def im2col_kernel(x, n0, kh, kw, sh, sw, ph, pw, dh, dw, wo, rows_outer, cols):
    # x (N, C, H, W); cols (Nc, rows, Ho·Wo) for samples n0 .. n0+Nc, rows >= C·kh·kw, or
    # (rows, Nc, Ho·Wo) when rows_outer (the weight gradient's layout):
    # cols[n, (c·kh + a)·kw + e, i·Wo + j] = x̃[n0 + n, c, i·sh + a·dh, j·sw + e·dw] (x̃ zero-padded);
    # rows past C·kh·kw are ones (the bias row of the forward GEMM)
    h, wd = x.shape[2], x.shape[3]
    if rows_outer:
        n_rows, n_chunk = cols.shape[0], cols.shape[1]
    else:
        n_chunk, n_rows = cols.shape[0], cols.shape[1]
    n_pos = cols.shape[2]
    taps = kh * kw
    n_taps = x.shape[1] * taps
    wo_u = uint32(wo)
    x0, y0, z0 = cuda.grid(3)
    sx, sy, sz = cuda.gridsize(3)
    for n in range(z0, n_chunk, sz):
        for row in range(y0, n_rows, sy):
            line = cols[row, n] if rows_outer else cols[n, row]  # the row's Ho·Wo entries
            if row >= n_taps:
                for q in range(x0, n_pos, sx):
                    line[q] = 1
                continue
            c = row // taps
            r_off = ((row % taps) // kw) * dh - ph
            s_off = (row % kw) * dw - pw
            for q in range(x0, n_pos, sx):
                i = int32(uint32(q) // wo_u)
                r = i * sh + r_off
                s = (q - i * wo) * sw + s_off
                if 0 <= r < h and 0 <= s < wd:
                    line[q] = x[n0 + n, c, r, s]
                else:
                    line[q] = 0


@cuda.jit(cache=_config.NUMBA_CACHE)
def _col2im_kernel(cols, n0, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, zero, out):
    # cols (Nc, C·kh·kw, Ho·Wo); out (N, C, H, W): one thread per input element (n0 + n, c, r, s),
    # gathering every tap (a, e) whose window position lands on it
    n_chunk = cols.shape[0]
    n_channels, h, wd = out.shape[1], out.shape[2], out.shape[3]
    wd_u = uint32(wd)
    x0, y0, z0 = cuda.grid(3)
    sx, sy, sz = cuda.gridsize(3)
    for n in range(z0, n_chunk, sz):
        for c in range(y0, n_channels, sy):
            for p in range(x0, h * wd, sx):
                r = int32(uint32(p) // wd_u)
                s = p - r * wd
                acc = zero
                for a in range(kh):
                    rp = r + ph - a * dh  # = i·sh for the output row i that tap a maps here
                    if rp < 0:
                        break  # rp only shrinks with a
                    i = rp if sh == 1 else rp // sh
                    if i * sh != rp or i >= ho:
                        continue
                    for e in range(kw):
                        sp = s + pw - e * dw
                        if sp < 0:
                            break
                        j = sp if sw == 1 else sp // sw
                        if j * sw != sp or j >= wo:
                            continue
                        acc += cols[n, (c * kh + a) * kw + e, i * wo + j]
                out[n0 + n, c, r, s] = acc


def chunk_samples(n, rows, n_pos, itemsize):
    """Samples per chunk so that a (chunk, rows, n_pos) scratch stays under the byte budget."""
    per_sample = max(rows * n_pos * itemsize, 1)
    return max(1, min(n, int(_config.CUDA_SCRATCH_BYTES) // per_sample))


def conv2d_forward(x, w, b, stride, padding, dilation, out, a_out=None, also=()):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_forward`.

    Per chunk of samples: im2col (one thread per column entry, zero padding written
    explicitly, a last row of ones) and one batched GEMM ``[W | b] @ cols[n]`` that writes
    ``out[n]`` (K, Ho·Wo) for every sample n of the chunk.  ``a_out``: the ReLU kernel after
    it (in place when ``a_out is out``).  ``also``: ``(w', b', out')`` triples, further weights
    multiplied with the same columns (im2col once for all).
    """
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n = x.shape[0]
    n_out, n_channels, kh, kw = w.shape
    ho, wo = out.shape[2], out.shape[3]
    rows, n_pos = n_channels * kh * kw, ho * wo
    if n == 0 or n_pos == 0:
        return out
    check_index_range(n_pos, "the output plane Ho·Wo")
    sets = []
    for w_, b_, out_ in [(w, b, out)] + list(also):
        wb = empty(w_, (n_out, rows + 1))  # [W | b]: the bias is the weight of the row of ones
        wb[:, :rows] = w_.reshape(n_out, rows)
        wb[:, rows] = b_
        sets.append((wb, out_.reshape(n, n_out, n_pos)))
    chunk = chunk_samples(n, rows + 1, n_pos, x.dtype.itemsize)
    cols_buf = empty(x, chunk * (rows + 1) * n_pos)
    for n0 in range(0, n, chunk):
        nc = min(chunk, n - n0)
        cols = cols_buf[:nc * (rows + 1) * n_pos].reshape(nc, rows + 1, n_pos)
        launch_grid(im2col_kernel, cols.shape, x, n0, kh, kw, sh, sw, ph, pw, dh, dw, wo, False, cols)
        for wb, out3 in sets:
            matmul(wb, cols, out3[n0:n0 + nc])
    if a_out is not None:
        relu_forward(out, a_out)  # one thread per element: in place is safe
    return out


def conv2d_relu_maxpool2x2(x, w, b, stride, padding, dilation, out, switches=None, also=()):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_relu_maxpool2x2`: the convolution
    with its ReLU (one call; ``also`` as :func:`conv2d_forward`'s), then the pool's maxima (with ``switches``:
    and its switches), then the ``also`` outputs wanted at the switches gathered there."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = w.shape[2:]
    ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    z = empty(x, (x.shape[0], w.shape[0], ho, wo))
    full = [(w2, b2, empty(x, z.shape) if o2.shape == out.shape else o2) for w2, b2, o2 in also]
    conv2d_forward(x, w, b, stride, padding, dilation, z, z, full)
    if switches is None:
        return maxpool2d_values(z, (2, 2), (2, 2), (0, 0), out)
    maxpool2d_forward(z, (2, 2), (2, 2), (0, 0), out, switches)
    for (_, _, f), (_, _, o2) in zip(full, also):
        if f is not o2:  # z' wanted at the switches only
            gather_at_switches(f, switches, o2)
    return out, switches



def conv2d_relu_maxpool2x2_chain(x, stages, out):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_relu_maxpool2x2_chain`: the stages one
    after the other, each :func:`conv2d_relu_maxpool2x2`."""
    for s, (w, b, stride, padding, dilation) in enumerate(stages):
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        kh, kw = w.shape[2:]
        ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        y = out if s == len(stages) - 1 else empty(x, (x.shape[0], w.shape[0], ho // 2, wo // 2))
        x = conv2d_relu_maxpool2x2(x, w, b, stride, padding, dilation, y)
    return out

def conv2d_vjp(g, w, stride, padding, dilation, out):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_vjp`.

    Per chunk of samples: one batched GEMM ``cols[n] = Wᵀ @ g[n]`` straight from g, and
    col2im as a gather (one thread per input element, taps summed in (a, e) order; no
    atomics).
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
    check_index_range(out.shape[2] * out.shape[3], "the input plane H·W")
    wt = empty(w, (rows, n_out))  # Wᵀ, contiguous once rather than per chunk
    wt[...] = w.reshape(n_out, rows).T
    g3 = g.reshape(n, n_out, n_pos)
    chunk = chunk_samples(n, rows, n_pos, g.dtype.itemsize)
    cols_buf = empty(g, chunk * rows * n_pos)
    zero = scalar(out.dtype, 0)
    for n0 in range(0, n, chunk):
        nc = min(chunk, n - n0)
        cols = cols_buf[:nc * rows * n_pos].reshape(nc, rows, n_pos)
        matmul(wt, g3[n0:n0 + nc], cols)
        launch_grid(_col2im_kernel, (nc, n_channels, out.shape[2] * out.shape[3]),
                    cols, n0, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, zero, out)
    return out


def conv2d_relevance(r, z, epsilon, w, stride, padding, dilation, a, out):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_relevance`: the stabilised divide, the
    input-VJP and the product, one kernel each."""
    s = r if z is None else stabilized_divide(r, z, epsilon, empty(r, r.shape))
    conv2d_vjp(s, w, stride, padding, dilation, out)
    out *= a
    return out


def conv2d_unpool_vjp(g, switches, w, stride, padding, dilation, a, out):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_unpool_vjp`: the unpooling, the
    input-VJP and (a not None) the product, one kernel each."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = w.shape[2:]
    ho = (out.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (out.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    full = maxunpool2d(g, switches, empty(g, (g.shape[0], g.shape[1], ho, wo)))
    conv2d_vjp(full, w, stride, padding, dilation, out)
    if a is not None:
        out *= a
    return out


def conv2d_flat_relevance(r, switches, inv, kernel, stride, padding, dilation, out):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_flat_relevance`: the unpooling (with
    ``switches``), the sum over the channels, and the transposed convolution of that one channel with
    all-ones weights (:func:`conv2d_vjp`), copied to every input channel."""
    n, (ho, wo) = out.shape[0], inv.shape
    full = r if switches is None else maxunpool2d(r, switches, empty(r, (n, r.shape[1], ho, wo)))
    s1 = full.sum(axis=1, keepdims=True)
    s1 *= inv
    ones = empty(r, (1, 1) + tuple(kernel))
    ones.fill(1)
    out[...] = conv2d_vjp(s1, ones, stride, padding, dilation, empty(r, (n, 1) + tuple(out.shape[2:])))
    return out
