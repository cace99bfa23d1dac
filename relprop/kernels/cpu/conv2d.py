"""Numba CPU twins of :mod:`relprop.kernels.reference.conv2d`: same math, names and signatures.

A convolution is a sum of GEMMs over the kernel offsets; its speed is decided by how the GEMM
operands are fed.  Figures below: 2-core AMD EPYC, float32, the CIFAR-VGG layers at batch 64,
as fractions of the same run's ``np.matmul`` 2048x2048 rate (~190 GFLOP/s when quiet).

**Stride 1: row shifts (chosen).**  A chunk of samples is laid out channel-major on a grid of
``hg = H + ph`` rows per sample; the zero rows below one sample are the top padding of the
next, so kernel row ``a`` is ONE constant shift of the flat index, ``(a*dh - ph)`` rows.  The
``kw`` column taps are stacked as ``kw`` shifted, zero-edged copies of the input (3x the input
for 3x3, not im2col's 9x).  The forward is then ``kh`` GEMMs, each ``W[:, :, a, :]``
(K x kw*C) times a *window* of that buffer (a pointer offset with a long row stride, no copy),
accumulated by BLAS itself (beta = 1), and one pass back to NCHW that adds the bias.  The
input-VJP is the same sum with ``W^T`` over ``g``, taps shifted the other way; with K > C the
column taps are summed on the way out instead (g copied once, kw*C rows read back).  Forward
0.70-0.77, input-VJP 0.59-0.76 of GEMM on the >= 64-channel layers (BLAS alone: 0.83-0.89).
The grid costs ph/H extra columns (12% at 8x8), far less than im2col's copies.

**Wide 3x3 stride-1 layers: Winograd.**  With at least 64 input and output channels (and enough
work), the forward and the input-VJP go to :mod:`relprop.kernels.cpu.winograd` instead: F(4x4, 3x3),
4x fewer multiplies, 1.2-3.5x faster than the row shifts on the CIFAR-VGG and VGG-16 layers, at
~1e-5 (float32) of the output's range from the direct sum.

**Narrow stride-1 layers: the batch in lanes.**  With at most ``_config.CONV_LANES_MAX_CHANNELS``
(16) input and output channels, the GEMMs above get 1-16 result rows and feed BLAS badly; such
layers (LeNet-5's, and their input-VJPs) run as a direct sum over blocks of samples laid out
(C, H, W x samples), each tap one long vector multiply-add (:func:`_forward_lanes`): LeNet-5 at
batch 256 forward 1.35x, gradient 1.40x, LRP 1.51x the GEMM paths.

**Otherwise: im2col.**  Stride > 1, and the input-VJP of layers with < 8 input channels
(its row-shift GEMM would have only C result rows: 3x slower at C = 3), use a chunked
im2col and one GEMM; the VJP is ``W^T @ g`` then col2im, summed per input plane in one
fixed order.

Rejected, measured: (a) chunked im2col + batched ``np.matmul`` with a ``prange`` copy:
0.07-0.39 -- Numba's OpenMP workers keep spinning for milliseconds after every parallel
loop and fight the BLAS threads for the two cores (0.38-0.64 with OMP_WAIT_POLICY=passive,
a setting a library cannot impose); (b) one padded-grid copy and kh*kw single-tap GEMMs
(inner dimension C): 0.62-0.73 for the GEMMs alone, before any copy.

So the copy kernels here are *serial* ``@njit(nogil=True)`` loops (no ``parallel=True``), and
the two cores are used by sharing the chunks of samples out to threads, each running its
chunk's copies and GEMMs with BLAS held to one thread (:mod:`relprop.kernels.cpu._chunks`):
no barrier of BLAS threads after every GEMM, copies in parallel, and a thread the OS
deschedules on a shared machine delays only its own chunk (measured with other jobs on the
cores: CIFAR-VGG forward at batch 64 0.88 s against 2.6 s with BLAS's own threads, in one
process, alternating).  Chunks hold ``_config.CONV_CHUNK_BYTES`` of operands (16 MiB) and
at most half a thread's share of the batch, so that the threads balance.  A single chunk (one
image) runs with BLAS held to one thread too, its GEMMs' columns shared out to the threads where
the work pays for the hand-off (:func:`relprop.kernels.cpu._chunks.share`): BLAS's own workers
would spin on for ~0.1 s after it.  A sample larger
than a chunk (VGG-16's 224x224 layers: 51 MB of operands) runs in bands of output rows
instead, each band a short "sample" of the grid with its halo of input rows (the input-VJP
as the forward of the flipped weights): 1.33x on those layers, 1.06-1.13x at 112x112.

Results are bitwise reproducible: serial copies, fixed-order sums, every chunk writes only
its own samples, and a single-threaded GEMM's blocking is fixed by its shapes.
"""
import ctypes

import llvmlite.binding
import numpy as np
from numba import njit, types

from ... import _config
from ..._validate import conv_output_size
from .. import _pool
from ._chunks import conv_threads, numpy_blas_library, run_chunks, share
from ._derived import derived
from .pool2d import first_max4, gather_at_switches, max4, maxpool2d_forward, maxpool2d_values, maxunpool2d, \
    relu_window
from .elementwise import stabilized_divide
from .winograd import _NO_SWITCHES, conv3x3_winograd, emit, stab_divide, transformed_filters, winograd_applies

__all__ = ["conv2d_forward", "conv2d_vjp", "conv2d_relu_maxpool2x2", "conv2d_relu_maxpool2x2_chain",
           "conv2d_relevance", "conv2d_unpool_vjp", "conv2d_flat_relevance"]


# ============================================================================================
# BLAS GEMM on windows of flat buffers
# ============================================================================================
# ``_gemm(m, n, k, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, beta, transb=False)`` computes the
# row-major C[m, n] = A[m, k] @ op(B) + beta * C, op(B) = B[k, n] (or B[n, k]^T with ``transb``),
# each operand starting ``*_off`` elements into its array's buffer with row stride ``ld*``.  np.matmul cannot express a shifted window with a long
# row stride, nor accumulate (beta = 1); both are what spare a copy of the input per offset.
#
# Which BLAS: the one NumPy calls, found through NumPy's extension module when it exports the
# ILP64 CBLAS names of the PyPI wheels ("scipy_cblas_sgemm64_"), else SciPy's
# scipy.linalg.cython_blas (SciPy is a dependency).  NumPy's keeps ONE BLAS thread pool in the
# process (np.matmul of the dense kernels and of user code uses it too), and on the reference
# machine its OpenBLAS 0.3.31 ran the narrow GEMMs of 64-channel layers at 0.88 of the square
# GEMM rate against 0.70 for SciPy's 0.3.30 (one thread).  A self-test decides at import.

def _numpy_cblas():
    """{dtype: gemm} over NumPy's CBLAS ILP64 sgemm/dgemm, or None."""
    lib = numpy_blas_library()
    if lib is None:  # pragma: no cover
        return None
    i64 = ctypes.c_int64
    for prefix in ("scipy_cblas_", "cblas_"):  # only "64_"-suffixed names have a known (ILP64) ABI
        try:
            fns = getattr(lib, prefix + "sgemm64_"), getattr(lib, prefix + "dgemm64_")
        except AttributeError:
            continue
        impls = {}
        for fn, real, dtype in zip(fns, (ctypes.c_float, ctypes.c_double), (np.float32, np.float64)):
            fn.restype = None
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, i64, real, ctypes.c_void_p, i64,
                           ctypes.c_void_p, i64, real, ctypes.c_void_p, i64]

            def gemm(m, n, k, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, beta, transb=False, fn=fn):
                it = c.itemsize  # 101: CblasRowMajor; 111, 112: CblasNoTrans, CblasTrans
                fn(101, 111, 112 if transb else 111, m, n, k, 1.0, a.ctypes.data + int(a_off) * it, lda,
                   b.ctypes.data + int(b_off) * it, ldb, beta, c.ctypes.data + int(c_off) * it, ldc)
            gemm.address = ctypes.cast(fn, ctypes.c_void_p).value  # for compiled callers (_external_gemm)
            impls[np.dtype(dtype)] = gemm
        return impls
    return None


def _scipy_blas():
    """{dtype: gemm} over the Fortran sgemm/dgemm of scipy.linalg.cython_blas (LP64)."""
    from numba.extending import get_cython_function_address

    ip = ctypes.POINTER(ctypes.c_int)
    sig = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ip, ip, ip, ctypes.c_void_p, ctypes.c_void_p, ip,
                           ctypes.c_void_p, ip, ctypes.c_void_p, ctypes.c_void_p, ip)
    impls = {}
    for name, real, dtype in (("sgemm", ctypes.c_float, np.float32), ("dgemm", ctypes.c_double, np.float64)):
        fn = sig(get_cython_function_address("scipy.linalg.cython_blas", name))

        def gemm(m, n, k, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, beta, transb=False, fn=fn, real=real):
            # column-major BLAS sees the transposed problem C^T = op(B)^T A^T: swap the operands
            it, ci = c.itemsize, ctypes.c_int
            alpha, beta = real(1.0), real(beta)
            fn(b"T" if transb else b"N", b"N", ci(n), ci(m), ci(k), ctypes.byref(alpha),
               b.ctypes.data + int(b_off) * it, ci(ldb), a.ctypes.data + int(a_off) * it, ci(lda),
               ctypes.byref(beta), c.ctypes.data + int(c_off) * it, ci(ldc))
        impls[np.dtype(dtype)] = gemm
    return impls


def _reproduces_matmul(impls):
    """A shifted-window product with beta = 1 in both dtypes, checked against np.matmul."""
    rng = np.random.default_rng(0)
    for dtype, gemm in impls.items():
        a = rng.standard_normal((3, 5)).astype(dtype)
        b = rng.standard_normal((5, 9)).astype(dtype)
        c = rng.standard_normal((3, 4)).astype(dtype)
        want = a[:, 1:4] @ b[1:4, 2:6] + c
        gemm(3, 4, 3, a, 1, 5, b, 9 + 2, 9, c, 0, 4, 1.0)
        if not np.allclose(c, want, rtol=1e-5, atol=1e-5):
            return False
        bt = rng.standard_normal((4, 6)).astype(dtype)  # op(B) = B^T: B is (n, k) = rows 0..3, columns 1..3
        want = a[:, 1:4] @ bt[:, 1:4].T
        gemm(3, 4, 3, a, 1, 5, bt, 1, 6, c, 0, 4, 0.0, transb=True)
        if not np.allclose(c, want, rtol=1e-5, atol=1e-5):
            return False
    return True


def _pick_blas():
    impls = _numpy_cblas()
    try:
        if impls is not None and _reproduces_matmul(impls):
            return "numpy", impls
    except Exception:  # pragma: no cover - a symbol with an unexpected ABI
        pass
    return "scipy", _scipy_blas()


#: "numpy" or "scipy": whose BLAS the convolutions call.
BLAS_SOURCE, _GEMM = _pick_blas()


def _gemm(m, n, k, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, beta, transb=False):
    _GEMM[c.dtype](m, n, k, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, beta, transb)


# A batch of GEMMs (Winograd's 36 per chunk) called from compiled code: through ctypes each call
# costs ~9 us of Python and holds the GIL meanwhile, as long as a 64-channel product of 128 tile
# rows itself; from Numba, nothing.  NumPy's CBLAS gemm is registered with LLVM under a name of
# ours and declared as an external function, so that cached compiled code links to it as well.
_I32, _I64 = types.int32, types.int64


def _external_gemm(dtype):
    """Numba's handle on NumPy's CBLAS ILP64 gemm of ``dtype`` (pointers passed as int64), or None."""
    impl = _GEMM.get(np.dtype(dtype)) if BLAS_SOURCE == "numpy" else None
    if getattr(impl, "address", None) is None:  # pragma: no cover - SciPy's BLAS: the Python loop
        return None
    name = f"relprop_cblas_{np.dtype(dtype).char}gemm64"
    llvmlite.binding.add_symbol(name, impl.address)
    real = types.float32 if np.dtype(dtype) == np.float32 else types.float64
    return types.ExternalFunction(name, types.void(_I32, _I32, _I32, _I64, _I64, _I64, real, _I64, _I64, _I64, _I64,
                                                   real, _I64, _I64))


_SGEMM, _DGEMM = _external_gemm(np.float32), _external_gemm(np.float64)


@njit(cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS, nogil=True)
def _sgemm_batch(count, m, n, k, a, a_off, a_step, lda, b, b_off, b_step, ldb, c, c_off, c_step, ldc):
    it = np.int64(c.itemsize)
    pa, pb, pc = np.int64(a.ctypes.data), np.int64(b.ctypes.data), np.int64(c.ctypes.data)
    for i in range(count):  # 101, 111: CblasRowMajor, CblasNoTrans
        _SGEMM(101, 111, 111, m, n, k, np.float32(1.0), pa + (a_off + i * a_step) * it, lda,
               pb + (b_off + i * b_step) * it, ldb, np.float32(0.0), pc + (c_off + i * c_step) * it, ldc)


@njit(cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS, nogil=True)
def _dgemm_batch(count, m, n, k, a, a_off, a_step, lda, b, b_off, b_step, ldb, c, c_off, c_step, ldc):
    it = np.int64(c.itemsize)
    pa, pb, pc = np.int64(a.ctypes.data), np.int64(b.ctypes.data), np.int64(c.ctypes.data)
    for i in range(count):
        _DGEMM(101, 111, 111, m, n, k, 1.0, pa + (a_off + i * a_step) * it, lda,
               pb + (b_off + i * b_step) * it, ldb, 0.0, pc + (c_off + i * c_step) * it, ldc)


#: {dtype: compiled batch}; empty where the BLAS is SciPy's (Fortran ABI): the Python loop then
_GEMM_BATCH = {np.dtype(d): f for d, f, ext in ((np.float32, _sgemm_batch, _SGEMM), (np.float64, _dgemm_batch, _DGEMM))
               if ext is not None}


def _gemm_batch(count, m, n, k, a, a_off, a_step, lda, b, b_off, b_step, ldb, c, c_off, c_step, ldc):
    """C_i = A_i @ B_i (row-major, beta 0) for i < ``count``, operand i starting ``*_off + i * *_step``
    elements into its array (leading dimensions ``ld*``): one compiled loop of BLAS calls that
    releases the GIL, or :func:`_gemm` per product where that cannot be had."""
    batch = _GEMM_BATCH.get(c.dtype)
    if batch is not None:
        batch(count, m, n, k, a, a_off, a_step, lda, b, b_off, b_step, ldb, c, c_off, c_step, ldc)
        return
    for i in range(count):
        _gemm(m, n, k, a, a_off + i * a_step, lda, b, b_off + i * b_step, ldb, c, c_off + i * c_step, ldc, 0.0)


# ============================================================================================
# Copy kernels (serial on purpose: see the module docstring)
# ============================================================================================
_jit = njit(cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS, nogil=True)  # nogil: chunks run on threads


@_jit
def _fill0(v):
    for q in range(v.size):
        v[q] = 0


@_jit
def _copy(dst, src):
    """dst[:] = src[:] for 1-D views of one length (0-based loop: vectorises, no wraparound checks)."""
    for q in range(dst.size):
        dst[q] = src[q]


@_jit
def _valid(count, size, step, off):
    """The range [j0, j1) of j in [0, count) with 0 <= j*step + off < size."""
    j0 = 0 if off >= 0 else min(count, (-off + step - 1) // step)
    j1 = 0 if size - 1 - off < 0 else min(count, (size - 1 - off) // step + 1)
    return j0, max(j0, j1)


@_jit
def _shifted_rows(src, n0, nb, kw, off0, doff, hg, wg, margin, dst):
    """The row-shift operand of one chunk: ``kw`` column-shifted copies of ``src[n0:n0+nb]``.

    dst[b*C + c, margin + n*hg*wg + r*wg + j] = src[n0 + n, c, r, j + off0 + b*doff],
    zero where that column is outside the source, on rows r >= H_src and in both margins.
    Each source plane is read once and written ``kw`` times (loops n, c, b).
    """
    c_, hs, ws = src.shape[1], src.shape[2], src.shape[3]
    plane, hw = hg * wg, hs * ws
    end = margin + nb * plane
    for r_ in range(kw * c_):
        _fill0(dst[r_, :margin])
        _fill0(dst[r_, end:])
    for n in range(nb):
        base = margin + n * plane
        for c in range(c_):
            sp = src[n0 + n, c]
            s = sp.ravel()
            for b in range(kw):
                off = off0 + b * doff
                j0, j1 = _valid(wg, ws, 1, off)
                d = dst[b * c_ + c, base:base + plane]
                if wg == ws:
                    # rows adjacent in source and grid: one flat shifted copy, then clear the
                    # columns whose source fell into the neighbouring row
                    lo = min(hw, max(0, -off))
                    hi = max(lo, min(hw, hw - off))
                    _fill0(d[:lo])
                    _copy(d[lo:hi], s[lo + off:hi + off])
                    _fill0(d[hi:])
                    for r in range(hs):
                        for j in range(j0):
                            d[r * ws + j] = 0
                        for j in range(j1, ws):
                            d[r * ws + j] = 0
                else:
                    for r in range(hs):
                        dr = d[r * wg:(r + 1) * wg]
                        _fill0(dr[:j0])
                        _copy(dr[j0:j1], sp[r, j0 + off:j1 + off])
                        _fill0(dr[j1:])
                    _fill0(d[hs * wg:])
    return dst


@_jit
def _crop(src, n0, nb, hg, wg, bias, out, a_out, mode):
    """out[n0 + n, k, i, j] = src[k, n*hg*wg + i*wg + j] + bias[k]: the grid back to NCHW (with the
    ReLU's output too, or instead: :func:`emit`)."""
    k_, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    plane = hg * wg
    for n in range(nb):
        for k in range(k_):
            bk = bias[k]
            s = src[k, n * plane:(n + 1) * plane]
            o, r = out[n0 + n, k], a_out[n0 + n, k]
            if wg == wo:
                emit(o.ravel(), r.ravel(), s, bk, mode)
            else:
                for i in range(ho):
                    emit(o[i], r[i], s[i * wg:i * wg + wo], bk, mode)
    return out


@_jit
def _crop_band(src, n, i0, rows, wg, bias, out, a_out, mode):
    """out[n, k, i0 + i, j] = src[k, i*wg + j] + bias[k] for i < rows, j < Wo: one band of rows back to NCHW
    (:func:`emit`)."""
    k_, wo = out.shape[1], out.shape[3]
    for k in range(k_):
        bk = bias[k]
        o, r = out[n, k], a_out[n, k]
        for i in range(rows):
            emit(o[i0 + i], r[i0 + i], src[k, i * wg:i * wg + wo], bk, mode)
    return out


@_jit
def _crop_shift_sum(src, n0, nb, kw, off0, doff, hg, wg, out):
    """out[n0 + n, c, r, s] = sum_b src[b*C + c, n*hg*wg + r*wg + s + off0 + b*doff] over the b whose
    column s + off0 + b*doff lies in [0, wg): the column shifts of the taps, summed on the way out."""
    c_, h_, w_ = out.shape[1], out.shape[2], out.shape[3]
    plane = hg * wg
    for n in range(nb):
        for c in range(c_):
            o = out[n0 + n, c]
            for r in range(h_):
                d = o[r]
                _fill0(d)
                for b in range(kw):
                    off = off0 + b * doff
                    j0, j1 = _valid(w_, wg, 1, off)
                    q = n * plane + r * wg + off
                    si = src[b * c_ + c, q + j0:q + j1]
                    dj = d[j0:j1]
                    for j in range(j1 - j0):
                        dj[j] += si[j]
    return out


@_jit
def im2col_chunk(x, n0, nb, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, cols):
    """cols[(c*kh + a)*kw + b, n*ho*wo + i*wo + j] = x_padded[n0 + n, c, i*sh + a*dh, j*sw + b*dw]."""
    c_, h_, w_ = x.shape[1], x.shape[2], x.shape[3]
    plane = ho * wo
    for c in range(c_):
        for a in range(kh):
            for b in range(kw):
                row = cols[(c * kh + a) * kw + b]
                off = b * dw - pw
                j0, j1 = _valid(wo, w_, sw, off)
                for n in range(nb):
                    for i in range(ho):
                        d = row[n * plane + i * wo:n * plane + (i + 1) * wo]
                        h = i * sh - ph + a * dh
                        if h < 0 or h >= h_:
                            _fill0(d)
                            continue
                        s = x[n0 + n, c, h]
                        _fill0(d[:j0])
                        if sw == 1:
                            _copy(d[j0:j1], s[j0 + off:j1 + off])
                        else:
                            for j in range(j0, j1):
                                d[j] = s[j * sw + off]
                        _fill0(d[j1:])
    return cols


@_jit
def _to_columns(g, n0, nb, dst):
    """dst[k, n*Ho*Wo + q] = g[n0 + n, k].ravel()[q]: a chunk of g, channel-major."""
    k_ = g.shape[1]
    plane = g.shape[2] * g.shape[3]
    for k in range(k_):
        for n in range(nb):
            _copy(dst[k, n * plane:(n + 1) * plane], g[n0 + n, k].ravel())
    return dst


@_jit
def _col2im(cols, n0, nb, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, out):
    """out[n0 + n, c] = the column rows (c, a, b) summed back onto their input positions.

    A gather per (n, c) plane: its taps are added in one fixed order (a, b, i, j), so the
    result is the same bit for bit on every run.
    """
    c_, h_, w_ = out.shape[1], out.shape[2], out.shape[3]
    plane = ho * wo
    for n in range(nb):
        for c in range(c_):
            o = out[n0 + n, c]
            _fill0(o.ravel())
            for a in range(kh):
                for b in range(kw):
                    row = cols[(c * kh + a) * kw + b]
                    off = b * dw - pw
                    j0, j1 = _valid(wo, w_, sw, off)
                    for i in range(ho):
                        h = i * sh - ph + a * dh
                        if h < 0 or h >= h_:
                            continue
                        s = row[n * plane + i * wo:n * plane + (i + 1) * wo]
                        d = o[h]
                        for j in range(j0, j1):
                            d[j * sw + off] += s[j]
    return out


@_jit
def _to_lanes(x, n0, nb, lanes, ph, pw, xb, zd, eps):
    """xb[c, r, s*L + l] = x_padded[n0 + l, c, r, s] (L = ``lanes``): a block of samples with the
    batch as the fastest index, zero in the padding and in the lanes l >= nb of a short block (never
    written out, but left unset they could hold denormals or NaNs, which slow the multiply-adds).
    ``zd`` (shaped like x; empty: none): x / stab(zd) instead (:func:`relprop.kernels.cpu.winograd.stab_divide`,
    ε = ``eps``), an LRP backward's quotient, never written whole (:func:`conv2d_relevance`)."""
    c_, h_, w_ = x.shape[1], x.shape[2], x.shape[3]
    hp, row = xb.shape[1], xb.shape[2]
    quotient = np.empty(w_ if zd.shape[0] else 0, x.dtype)
    for c in range(c_):
        for r in range(hp):
            d = xb[c, r]
            h = r - ph
            if h < 0 or h >= h_ or nb < lanes:
                _fill0(d)
            else:
                _fill0(d[:pw * lanes])
                _fill0(d[(pw + w_) * lanes:])
            if h < 0 or h >= h_:
                continue
            if zd.shape[0] == 0:
                for l in range(nb):
                    s = x[n0 + l, c, h]
                    for j in range(w_):
                        d[(pw + j) * lanes + l] = s[j]
            else:
                for l in range(nb):
                    s, zr = x[n0 + l, c, h], zd[n0 + l, c, h]
                    for j in range(w_):  # a contiguous pass first: it vectorises, the scatter would not
                        quotient[j] = stab_divide(s[j], zr[j], eps)
                    for j in range(w_):
                        d[(pw + j) * lanes + l] = quotient[j]
    return xb


@_jit
def _lanes_row5(z, xr, w, k, c, a, step, m):
    """z[q] += sum_b w[k, c, a, b] xr[q + b*step], q < m, for kw = 5: one pass over the output row."""
    w0, w1, w2, w3, w4 = w[k, c, a, 0], w[k, c, a, 1], w[k, c, a, 2], w[k, c, a, 3], w[k, c, a, 4]
    x0, x1, x2 = xr[:m], xr[step:step + m], xr[2 * step:2 * step + m]
    x3, x4 = xr[3 * step:3 * step + m], xr[4 * step:4 * step + m]
    for q in range(m):
        z[q] += w0 * x0[q] + w1 * x1[q] + w2 * x2[q] + w3 * x3[q] + w4 * x4[q]


@_jit
def _lanes_row3(z, xr, w, k, c, a, step, m):
    """:func:`_lanes_row5` for kw = 3."""
    w0, w1, w2 = w[k, c, a, 0], w[k, c, a, 1], w[k, c, a, 2]
    x0, x1, x2 = xr[:m], xr[step:step + m], xr[2 * step:2 * step + m]
    for q in range(m):
        z[q] += w0 * x0[q] + w1 * x1[q] + w2 * x2[q]


@_jit
def _lanes_row5x2(z0, z1, xr, w, k, c, a, step, m):
    """:func:`_lanes_row5` for the output channels k and k + 1 in one pass: each x value loaded once
    for both (the single-channel pass is bound by its loads: six per five multiply-adds)."""
    w00, w01, w02, w03, w04 = w[k, c, a, 0], w[k, c, a, 1], w[k, c, a, 2], w[k, c, a, 3], w[k, c, a, 4]
    w10, w11, w12, w13, w14 = w[k + 1, c, a, 0], w[k + 1, c, a, 1], w[k + 1, c, a, 2], w[k + 1, c, a, 3], w[k + 1, c, a, 4]
    x0, x1, x2 = xr[:m], xr[step:step + m], xr[2 * step:2 * step + m]
    x3, x4 = xr[3 * step:3 * step + m], xr[4 * step:4 * step + m]
    for q in range(m):
        a0, a1, a2, a3, a4 = x0[q], x1[q], x2[q], x3[q], x4[q]
        z0[q] += w00 * a0 + w01 * a1 + w02 * a2 + w03 * a3 + w04 * a4
        z1[q] += w10 * a0 + w11 * a1 + w12 * a2 + w13 * a3 + w14 * a4


@_jit
def _lanes_row3x2(z0, z1, xr, w, k, c, a, step, m):
    """:func:`_lanes_row5x2` for kw = 3."""
    w00, w01, w02 = w[k, c, a, 0], w[k, c, a, 1], w[k, c, a, 2]
    w10, w11, w12 = w[k + 1, c, a, 0], w[k + 1, c, a, 1], w[k + 1, c, a, 2]
    x0, x1, x2 = xr[:m], xr[step:step + m], xr[2 * step:2 * step + m]
    for q in range(m):
        a0, a1, a2 = x0[q], x1[q], x2[q]
        z0[q] += w00 * a0 + w01 * a1 + w02 * a2
        z1[q] += w10 * a0 + w11 * a1 + w12 * a2


@_jit
def _lanes_row5x2x2(z0, z1, y0, y1, xr, w, k, c, a, step, m):
    """:func:`_lanes_row5x2` for two output rows at once: the input row xr is kernel row ``a`` of the
    output row i (z0, z1: channels k, k + 1) and kernel row ``a - 1`` of row i + 1 (y0, y1), so each x
    value is loaded once for four rows of z (stride and dilation 1)."""
    w00, w01, w02, w03, w04 = w[k, c, a, 0], w[k, c, a, 1], w[k, c, a, 2], w[k, c, a, 3], w[k, c, a, 4]
    w10, w11, w12, w13, w14 = w[k + 1, c, a, 0], w[k + 1, c, a, 1], w[k + 1, c, a, 2], w[k + 1, c, a, 3], w[k + 1, c, a, 4]
    v00, v01, v02, v03, v04 = w[k, c, a - 1, 0], w[k, c, a - 1, 1], w[k, c, a - 1, 2], w[k, c, a - 1, 3], w[k, c, a - 1, 4]
    v10, v11, v12 = w[k + 1, c, a - 1, 0], w[k + 1, c, a - 1, 1], w[k + 1, c, a - 1, 2]
    v13, v14 = w[k + 1, c, a - 1, 3], w[k + 1, c, a - 1, 4]
    x0, x1, x2 = xr[:m], xr[step:step + m], xr[2 * step:2 * step + m]
    x3, x4 = xr[3 * step:3 * step + m], xr[4 * step:4 * step + m]
    for q in range(m):
        a0, a1, a2, a3, a4 = x0[q], x1[q], x2[q], x3[q], x4[q]
        z0[q] += w00 * a0 + w01 * a1 + w02 * a2 + w03 * a3 + w04 * a4
        z1[q] += w10 * a0 + w11 * a1 + w12 * a2 + w13 * a3 + w14 * a4
        y0[q] += v00 * a0 + v01 * a1 + v02 * a2 + v03 * a3 + v04 * a4
        y1[q] += v10 * a0 + v11 * a1 + v12 * a2 + v13 * a3 + v14 * a4


@_jit
def _lanes_row3x2x2(z0, z1, y0, y1, xr, w, k, c, a, step, m):
    """:func:`_lanes_row5x2x2` for kw = 3."""
    w00, w01, w02 = w[k, c, a, 0], w[k, c, a, 1], w[k, c, a, 2]
    w10, w11, w12 = w[k + 1, c, a, 0], w[k + 1, c, a, 1], w[k + 1, c, a, 2]
    v00, v01, v02 = w[k, c, a - 1, 0], w[k, c, a - 1, 1], w[k, c, a - 1, 2]
    v10, v11, v12 = w[k + 1, c, a - 1, 0], w[k + 1, c, a - 1, 1], w[k + 1, c, a - 1, 2]
    x0, x1, x2 = xr[:m], xr[step:step + m], xr[2 * step:2 * step + m]
    for q in range(m):
        a0, a1, a2 = x0[q], x1[q], x2[q]
        z0[q] += w00 * a0 + w01 * a1 + w02 * a2
        z1[q] += w10 * a0 + w11 * a1 + w12 * a2
        y0[q] += v00 * a0 + v01 * a1 + v02 * a2
        y1[q] += v10 * a0 + v11 * a1 + v12 * a2


@_jit
def _lanes_row5x1x2(z0, y0, xr, w, k, c, a, step, m):
    """:func:`_lanes_row5x2x2` for one output channel: input row xr is kernel row ``a`` of output row i (z0) and
    kernel row ``a - 1`` of row i + 1 (y0), each x value loaded once for both (the single-row pass is bound
    by its loads: six per five multiply-adds).  :func:`_lanes_row5x2`'s loop with other weights: one function
    for both, taking each row's channel and kernel row as arguments, ran LeNet-5's 16 -> 6 input-VJP 0.86x
    and its 6 -> 1 0.92x (alternating processes), so they stay apart."""
    w00, w01, w02, w03, w04 = w[k, c, a, 0], w[k, c, a, 1], w[k, c, a, 2], w[k, c, a, 3], w[k, c, a, 4]
    v00, v01, v02, v03, v04 = w[k, c, a - 1, 0], w[k, c, a - 1, 1], w[k, c, a - 1, 2], w[k, c, a - 1, 3], w[k, c, a - 1, 4]
    x0, x1, x2 = xr[:m], xr[step:step + m], xr[2 * step:2 * step + m]
    x3, x4 = xr[3 * step:3 * step + m], xr[4 * step:4 * step + m]
    for q in range(m):
        a0, a1, a2, a3, a4 = x0[q], x1[q], x2[q], x3[q], x4[q]
        z0[q] += w00 * a0 + w01 * a1 + w02 * a2 + w03 * a3 + w04 * a4
        y0[q] += v00 * a0 + v01 * a1 + v02 * a2 + v03 * a3 + v04 * a4


@_jit
def _lanes_row3x1x2(z0, y0, xr, w, k, c, a, step, m):
    """:func:`_lanes_row5x1x2` for kw = 3."""
    w00, w01, w02 = w[k, c, a, 0], w[k, c, a, 1], w[k, c, a, 2]
    v00, v01, v02 = w[k, c, a - 1, 0], w[k, c, a - 1, 1], w[k, c, a - 1, 2]
    x0, x1, x2 = xr[:m], xr[step:step + m], xr[2 * step:2 * step + m]
    for q in range(m):
        a0, a1, a2 = x0[q], x1[q], x2[q]
        z0[q] += w00 * a0 + w01 * a1 + w02 * a2
        y0[q] += v00 * a0 + v01 * a1 + v02 * a2


@_jit
def _lanes_row(z, xr, w, k, c, a, step, m):
    """:func:`_lanes_row5` for any kw: one pass per tap."""
    for b in range(w.shape[3]):
        wb, xs = w[k, c, a, b], xr[b * step:b * step + m]
        for q in range(m):
            z[q] += wb * xs[q]


@_jit
def _lanes_conv(xb, w, dh, dw, lanes, zb, r0, r1):
    """zb[k, i, j*L + l] = sum_{c,a,b} w[k, c, a, b] xb[c, i + a*dh, (j + b*dw)*L + l].

    With the lanes fastest, one tap of one output row is a single multiply-add over the Wo*L
    contiguous values of the row; the kw taps of a kernel row go in one pass (unrolled for kw = 3
    and 5, two output channels at a time: 1.2-1.4x one at a time on LeNet-5's layers), so the
    output row is loaded and stored once per kernel row.  With dilation 1, output rows go in pairs
    too: input row i + a is kernel row a of output row i and kernel row a - 1 of row i + 1, so each
    x value is loaded once for four rows of z (per layer 1.0-1.25x, LeNet-5 b256 forward, gradient and
    LRP 1.05-1.07x); and for the channel left over where there is an odd number (the input-VJP to LeNet-5's
    one input channel 1.19x).  The row updates are separate functions: written as branches of one loop body
    they ran 1.9-2.1x slower.  Each output sums its terms in the same order either way, so the
    pairings do not change a bit.  Input rows outside [r0, r1) are the zero padding: their taps are
    skipped (an input-VJP of a small map is mostly padding: LeNet-5's 16 -> 6 does a third less work, 1.35x;
    its 6 -> 1 1.10x; LeNet-5 b256 gradient 1.08x, ε+flat 1.07x),
    which changes no bit either (the skipped products are zeros added to sums that start at +0)."""
    k_, c_, kh, kw = w.shape
    ho, m = zb.shape[1], zb.shape[2]
    step = dw * lanes
    paired = kw == 5 or kw == 3
    rows2 = paired and dh == 1  # output rows i and i + 1 read the input rows i + 1 .. i + kh - 1 both
    for k in range(0, k_ - 1 if paired else 0, 2):
        for i in range(0, ho - 1 if rows2 else 0, 2):
            z0, z1, y0, y1 = zb[k, i], zb[k + 1, i], zb[k, i + 1], zb[k + 1, i + 1]
            _fill0(z0)
            _fill0(z1)
            _fill0(y0)
            _fill0(y1)
            for c in range(c_):
                # input row i + a: kernel row a of output row i, a - 1 of row i + 1 (each in the order a = 0, 1, ..)
                if kw == 5:
                    if r0 <= i < r1:
                        _lanes_row5x2(z0, z1, xb[c, i], w, k, c, 0, step, m)
                    for a in range(max(1, r0 - i), min(kh, r1 - i)):
                        _lanes_row5x2x2(z0, z1, y0, y1, xb[c, i + a], w, k, c, a, step, m)
                    if r0 <= i + kh < r1:
                        _lanes_row5x2(y0, y1, xb[c, i + kh], w, k, c, kh - 1, step, m)
                else:
                    if r0 <= i < r1:
                        _lanes_row3x2(z0, z1, xb[c, i], w, k, c, 0, step, m)
                    for a in range(max(1, r0 - i), min(kh, r1 - i)):
                        _lanes_row3x2x2(z0, z1, y0, y1, xb[c, i + a], w, k, c, a, step, m)
                    if r0 <= i + kh < r1:
                        _lanes_row3x2(y0, y1, xb[c, i + kh], w, k, c, kh - 1, step, m)
        for i in range(ho - ho % 2 if rows2 else 0, ho):  # the last row of an odd height (every row if not rows2)
            z0, z1 = zb[k, i], zb[k + 1, i]
            _fill0(z0)
            _fill0(z1)
            for c in range(c_):
                for a in range(kh):
                    if not r0 <= i + a * dh < r1:
                        continue
                    xr = xb[c, i + a * dh]
                    if kw == 5:
                        _lanes_row5x2(z0, z1, xr, w, k, c, a, step, m)
                    else:
                        _lanes_row3x2(z0, z1, xr, w, k, c, a, step, m)
    for k in range(k_ - k_ % 2 if paired else 0, k_):  # the odd one out, or every channel of a kernel not 3 or 5 wide
        for i in range(0, ho - 1 if rows2 else 0, 2):  # in row pairs too, as above
            z0, y0 = zb[k, i], zb[k, i + 1]
            _fill0(z0)
            _fill0(y0)
            for c in range(c_):
                if kw == 5:
                    if r0 <= i < r1:
                        _lanes_row5(z0, xb[c, i], w, k, c, 0, step, m)
                    for a in range(max(1, r0 - i), min(kh, r1 - i)):
                        _lanes_row5x1x2(z0, y0, xb[c, i + a], w, k, c, a, step, m)
                    if r0 <= i + kh < r1:
                        _lanes_row5(y0, xb[c, i + kh], w, k, c, kh - 1, step, m)
                else:
                    if r0 <= i < r1:
                        _lanes_row3(z0, xb[c, i], w, k, c, 0, step, m)
                    for a in range(max(1, r0 - i), min(kh, r1 - i)):
                        _lanes_row3x1x2(z0, y0, xb[c, i + a], w, k, c, a, step, m)
                    if r0 <= i + kh < r1:
                        _lanes_row3(y0, xb[c, i + kh], w, k, c, kh - 1, step, m)
        for i in range(ho - ho % 2 if rows2 else 0, ho):
            z = zb[k, i]
            _fill0(z)
            for c in range(c_):
                for a in range(kh):
                    if not r0 <= i + a * dh < r1:
                        continue
                    xr = xb[c, i + a * dh]
                    if kw == 5:
                        _lanes_row5(z, xr, w, k, c, a, step, m)
                    elif kw == 3:
                        _lanes_row3(z, xr, w, k, c, a, step, m)
                    else:
                        _lanes_row(z, xr, w, k, c, a, step, m)
    return zb


@_jit
def _from_lanes(zb, n0, nb, lanes, bias, out, a_out, mode):
    """out[n0 + l, k, i, j] = zb[k, i, j*L + l] + bias[k] for l < nb (with the ReLU as :func:`emit`'s
    ``mode``): the block back to NCHW, a gather from the cache-resident block into contiguous rows."""
    k_, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    for l in range(nb):
        for k in range(k_):
            bk = bias[k]
            for i in range(ho):
                o, r, zr = out[n0 + l, k, i], a_out[n0 + l, k, i], zb[k, i]
                if mode == 2:
                    for j in range(wo):
                        v = zr[j * lanes + l] + bk
                        o[j] = 0 if v < 0 else v
                else:
                    for j in range(wo):
                        o[j] = zr[j * lanes + l] + bk
                    if mode == 1:
                        for j in range(wo):
                            v = o[j]
                            r[j] = 0 if v < 0 else v
    return out



@_jit
def _from_lanes_at_switches(zb, n0, nb, lanes, bias, out, switches, wo):
    """out[n0 + l, k, i, j] = zb[k, s // wo, (s % wo)*L + l] + bias[k] for l < nb, s = switches[n0 + l, k, i, j]
    (flat indices into the (Ho, Wo) plane, ``wo`` = Wo): a forward written at a max-pool's switches only, an LRP
    rule's z⁺ where the trace records it there (the Winograd path's
    :func:`relprop.kernels.cpu.winograd._output_transform_at_switches`).  The values :func:`_from_lanes` and a
    gather at the switches give, to the bit, without the full-size write and the gather's pass."""
    k_, hp, wp = out.shape[1], out.shape[2], out.shape[3]
    for l in range(nb):
        for k in range(k_):
            bk, zk = bias[k], zb[k]
            o, sk = out[n0 + l, k], switches[n0 + l, k]
            for i in range(hp):
                oi, si = o[i], sk[i]
                for j in range(wp):
                    q = si[j]
                    oi[j] = zk[q // wo, (q % wo) * lanes + l] + bk
    return out


@_jit
def _from_lanes_times(zb, n0, nb, lanes, bias, out, a):
    """out[n0 + l, k, i, j] = (zb[k, i, j*L + l] + bias[k]) a[n0 + l, k, i, j] for l < nb: :func:`_from_lanes`
    with the product of an LRP backward (:func:`conv2d_relevance`).  Its own function: as a fourth mode of
    :func:`_from_lanes` it made the other modes' loops 1.9-5x slower."""
    k_, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    for l in range(nb):
        for k in range(k_):
            bk = bias[k]
            for i in range(ho):
                o, m, zr = out[n0 + l, k, i], a[n0 + l, k, i], zb[k, i]
                for j in range(wo):
                    o[j] = (zr[j * lanes + l] + bk) * m[j]
    return out

@_jit
def _from_lanes_pool(zb, n0, nb, lanes, bias, out, prow):
    """out[n0 + l, k, i, j] = relu(bias[k] + max_{a,e<2} zb[k, 2i + a, (2j + e)*L + l]) for l < nb: the
    write-out of a conv + ReLU + 2x2 stride-2 max-pool triple (floor mode: an odd last row or column
    is dropped).  The maximum is taken in the lanes, whole vectors, before the bias and the ReLU, which
    commute with it (rounding is monotone, so max_i fl(s_i + b) = fl(max_i s_i + b) to the bit; a
    zero's sign aside); only the pooled quarter is gathered back to NCHW.  Returns False where a
    window holds a NaN or an infinity (the selects would drop a NaN): the caller then runs the three
    layers unfused."""
    k_, hp, wp = out.shape[1], out.shape[2], out.shape[3]
    finite = zb[0, 0, 0] * 0  # stays 0 unless a pooled input is NaN or infinite
    for k in range(k_):
        bk = bias[k]
        for i in range(hp):
            r0, r1 = zb[k, 2 * i], zb[k, 2 * i + 1]
            for j in range(wp):
                q = 2 * j * lanes
                a0, a1 = r0[q:q + lanes], r0[q + lanes:q + 2 * lanes]
                b0, b1 = r1[q:q + lanes], r1[q + lanes:q + 2 * lanes]
                p = prow[j * lanes:(j + 1) * lanes]
                for l in range(lanes):
                    m0, m1, m2, m3 = a0[l], a1[l], b0[l], b1[l]
                    p[l] = max4(m0, m1, m2, m3)
                    finite += (m0 + m1 + m2 + m3) * 0
            for l in range(nb):
                o = out[n0 + l, k, i]
                for j in range(wp):
                    v = prow[j * lanes + l] + bk
                    o[j] = 0 if v < 0 else v
    return finite == finite


@_jit
def _from_lanes_pool_switches(zb, n0, nb, lanes, bias, out, switches, prow, srow, wo):
    """:func:`_from_lanes_pool` with the pool's switches, as the unfused triple records them: each
    window's four values relu(z + bias[k]) (the ReLU's own arithmetic), their first maximum in row-major
    order by the max-pool's tournament of selects (:func:`relprop.kernels.cpu.pool2d._maxpool_2x2_rows`),
    and its flat index into the (Ho, Wo) plane (``wo`` = Wo, the pool's input width).  The ReLU makes
    ties (every negative z is 0), so the maximum cannot be taken before it here.  Returns False where
    a window holds a NaN or an infinity: the caller then runs the three layers unfused."""
    k_, hp, wp = out.shape[1], out.shape[2], out.shape[3]
    finite = zb[0, 0, 0] * 0  # stays 0 unless a pooled input is NaN or infinite
    for k in range(k_):
        bk = bias[k]
        for i in range(hp):
            r0, r1 = zb[k, 2 * i], zb[k, 2 * i + 1]
            base = 2 * i * wo
            for j in range(wp):
                q = 2 * j * lanes
                a0, a1 = r0[q:q + lanes], r0[q + lanes:q + 2 * lanes]
                b0, b1 = r1[q:q + lanes], r1[q + lanes:q + 2 * lanes]
                p, sj = prow[j * lanes:(j + 1) * lanes], srow[j * lanes:(j + 1) * lanes]
                at = base + 2 * j
                for l in range(lanes):
                    z0, z1, z2, z3 = a0[l], a1[l], b0[l], b1[l]
                    finite += (z0 + z1 + z2 + z3) * 0
                    m0, m1, m2, m3 = relu_window(z0, z1, z2, z3, bk)
                    p[l], off = first_max4(m0, m1, m2, m3, wo)
                    sj[l] = at + off
            for l in range(nb):
                o, so = out[n0 + l, k, i], switches[n0 + l, k, i]
                for j in range(wp):
                    o[j] = prow[j * lanes + l]
                    so[j] = srow[j * lanes + l]
    return finite == finite


@_jit
def _lanes_pool_into(zb, lanes, bias, xb, ph, pw):
    """xb[k, ph + i, (pw + j)*L + l] = relu(bias[k] + max_{a,e<2} zb[k, 2i + a, (2j + e)*L + l]) for every
    lane l: one stage of a chain of conv + ReLU + max-pool triples (:func:`_forward_lanes_chain`) pooled
    straight into the next convolution's block of lanes (its padding, never written, stays zero), with
    :func:`_from_lanes_pool`'s arithmetic (the same bits) and no gather back to NCHW.  Returns False
    where a window holds a NaN or an infinity."""
    k_, hp, wp = zb.shape[0], zb.shape[1] // 2, zb.shape[2] // (2 * lanes)
    finite = zb[0, 0, 0] * 0  # stays 0 unless a pooled input is NaN or infinite
    for k in range(k_):
        bk = bias[k]
        for i in range(hp):
            r0, r1, d = zb[k, 2 * i], zb[k, 2 * i + 1], xb[k, ph + i]
            for j in range(wp):
                q = 2 * j * lanes
                a0, a1 = r0[q:q + lanes], r0[q + lanes:q + 2 * lanes]
                b0, b1 = r1[q:q + lanes], r1[q + lanes:q + 2 * lanes]
                p = d[(pw + j) * lanes:(pw + j + 1) * lanes]
                for l in range(lanes):
                    m0, m1, m2, m3 = a0[l], a1[l], b0[l], b1[l]
                    v = max4(m0, m1, m2, m3) + bk
                    p[l] = 0 if v < 0 else v
                    finite += (m0 + m1 + m2 + m3) * 0
    return finite == finite



# ============================================================================================
# The kernels
# ============================================================================================
def _samples_per_chunk(rows_per_sample, n, itemsize):
    """Samples per chunk so that one chunk's GEMM operand and result stay near the cache, and, when
    the chunks are shared out to threads, at least two chunks per thread (so that they balance).

    A batch below ``_config.CONV_SPLIT_MIN_SAMPLES`` is not split further to feed the threads:
    measured on an idle 2-core machine, CIFAR-VGG at batch 16 ran 1.4x slower in chunks of 4
    samples on two single-threaded-BLAS threads than as one chunk with BLAS's own threads
    (at batch 64 the threads were level on the forward and 1.3x faster on the gradient).  Such a
    chunk now shares its GEMMs' columns out instead (:func:`relprop.kernels.cpu._chunks.share`)."""
    nb = max(1, min(n, _config.CONV_CHUNK_BYTES // max(1, rows_per_sample * itemsize)))
    threads = conv_threads()
    if threads > 1 and n >= _config.CONV_SPLIT_MIN_SAMPLES:
        nb = min(nb, max(1, -(-n // (2 * threads))))
    return nb


def _row_grid(h_in, h_out, k, p, d):
    """(rows per sample, margin rows) of the row-shift grid (stride 1), for either direction.

    A sample is ``hg`` rows; the data rows sit on top and the rest are zero, so the zero rows
    below one sample are the top padding of the next and a kernel row ``a`` is a shift of the
    flat index by a whole number of rows.  ``hg >= H + p`` keeps every out-of-image row read
    on a zero row; ``margin`` zero rows before and after the chunk cover the first and last.
    """
    hg = max(h_in + p, h_out)
    return hg, max(p, (k - 1) * d - p, 0)


def _arranged_view(w, kind):
    """(view, shape): the weights w (K, C, kh, kw) as a path of this module multiplies with them, a view
    of w in that order (no copy yet), and the shape its contiguous copy takes (see :func:`_taps`)."""
    k_, c_, kh, kw = w.shape
    if kind == "forward":  # the row-shift forward's GEMM operands: [a, k, (b, c)]
        return w.transpose(2, 0, 3, 1), (kh, k_, kw * c_)
    if kind == "vjp":  # the row-shift input-VJP's: [a, c, (b, k)]
        return w.transpose(2, 1, 3, 0), (kh, c_, kw * k_)
    if kind == "vjp_shift_out":  # ... with the column taps shifted on the way out: [a, (b, c), k]
        return w.transpose(2, 3, 1, 0), (kh, kw * c_, k_)
    flipped = w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]  # the input-VJP as a forward: w[k, c, kh-1-a, kw-1-b]
    if kind == "vjp_bands":  # its row-shift forward's operands, by bands of rows
        return flipped.transpose(2, 0, 3, 1), (kh, c_, kw * k_)
    if kind == "flipped":  # its weights (C, K, kh, kw), for the lanes path
        return flipped, (c_, k_, kh, kw)
    if kind == "im2col_vjp":  # W^T (C*kh*kw, K)
        return w.reshape(k_, c_ * kh * kw).T, (c_ * kh * kw, k_)
    raise ValueError(f"unknown arrangement {kind!r}")  # pragma: no cover - callers pass the names above


def _arrange(w, kind):
    """The weights w in the order ``kind`` of :func:`_arranged_view`, contiguous."""
    view, shape = _arranged_view(w, kind)
    return np.ascontiguousarray(view).reshape(shape)


def _taps(w, kind):
    """:func:`_arrange` of ``w``, kept between calls while ``w`` is unchanged
    (:func:`relprop.kernels.cpu._derived.derived`) where it is a copy (a contiguous view, as a 1x1
    kernel's, costs nothing) of at least ``_config.CONV_TAPS_CACHE_MIN_BYTES``.

    Each arrangement was a transposing copy of the weights on every call of the path that uses it: at
    CIFAR-VGG batch 1, where every 3x3 convolution takes the row-shift path, a sixth of the forward (0.6
    of 3.6 ms); kept, forward 1.06x, gradient 1.18x, ε+flat 1.12x there (alternating processes)."""
    view, shape = _arranged_view(w, kind)
    if view.flags.c_contiguous:
        return view.reshape(shape)
    if w.nbytes < _config.CONV_TAPS_CACHE_MIN_BYTES:
        return _arrange(w, kind)
    return derived(w, ("taps", kind), lambda: _arrange(w, kind))


def _rows_path(transposed, stride, channels):
    """Row-shift GEMMs (stride 1) or explicit im2col?  ``channels``: input channels C of the layer.

    Measured (one thread, so that the GEMMs compare without the machine's noise): the row-shift
    forward ties or beats im2col for every stride-1 layer tried, down to C = 1 or K = 3; the
    input-VJP's row-shift GEMM has only C result rows, and for C < 8 im2col's (C*kh*kw rows) wins.
    """
    if stride != (1, 1):
        return False
    return not transposed or channels >= _config.CONV_VJP_ROWS_MIN_CHANNELS


def conv2d_forward(x, w, b, stride, padding, dilation, out, a_out=None, also=()):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_forward`.  Shapes: x (N,C,H,W),
    w (K,C,kh,kw), b (K,), out (N,K,Ho,Wo).

    ``a_out``: the ReLU that follows, fused into the pass that writes the output (one pass over
    z less): ``a_out`` (N,K,Ho,Wo) receives relu(z) as well, or, if it *is* ``out``, ``out``
    receives relu(z) instead of z (the forward of a conv + ReLU pair that needs no z)."""
    mode = 0 if a_out is None else (2 if a_out is out else 1)
    a_out = out if a_out is None else a_out
    if winograd_applies(x.shape, w.shape, stride, padding, dilation):
        return conv3x3_winograd(x, transformed_filters(w), b, tuple(padding), out, _gemm_batch, a_out, mode,
                                [(transformed_filters(w2), b2, out2) for w2, b2, out2 in also])
    if _lanes_path(tuple(stride), x.shape[1], w.shape[0]):
        return _forward_lanes(x, w, b, padding, dilation, out, a_out, mode, also=also)
    for w2, b2, out2 in also:
        conv2d_forward(x, w2, b2, stride, padding, dilation, out2)
    if _rows_path(False, tuple(stride), x.shape[1]):
        return _forward_rows(x, w, b, padding, dilation, out, a_out, mode)
    return _forward_im2col(x, w, b, stride, padding, dilation, out, a_out, mode)


def conv2d_relu_maxpool2x2(x, w, b, stride, padding, dilation, out, switches=None, also=()):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_relu_maxpool2x2`: out (N,K,Ho//2,Wo//2)
    = the 2x2 stride-2 max-pool of relu(conv2d(x)), with ``switches`` (int64, shaped like ``out``) the
    pool's switches, and ``also`` as :func:`conv2d_forward`'s.

    Where the lanes path (narrow stride-1 layers: LeNet-5's) or the Winograd path (3x3 stride-1 layers of
    64 channels and more: the VGG nets'; ``also`` from the same input transform) runs the convolution,
    the pool is fused into the write-out (:func:`_from_lanes_pool`, :func:`_from_lanes_pool_switches`,
    :func:`relprop.kernels.cpu.winograd._output_transform_pool` and ``_pool_switches``): z is never
    written, and the separate ReLU and pool passes are gone.  Elsewhere, or when a pooled window holds
    a NaN or an infinity, the convolution with its fused ReLU and then the pool, as unfused.  An ``also``
    output shaped like ``out`` receives z' at the switches only: written there by the Winograd
    write-out (:func:`relprop.kernels.cpu.winograd._output_transform_at_switches`) and the lanes write-out
    (:func:`_from_lanes_at_switches`), elsewhere computed whole and gathered (:func:`gather_at_switches`)."""
    k_, c_, kh, kw = w.shape
    n_, _, h_, w_ = x.shape
    z_shape = (n_, k_, conv_output_size(h_, kh, stride[0], padding[0], dilation[0]),
               conv_output_size(w_, kw, stride[1], padding[1], dilation[1]))
    at = [o2.shape == out.shape for _, _, o2 in also]  # z' wanted at the switches only
    wino = winograd_applies(x.shape, w.shape, stride, padding, dilation)
    if wino:
        extra = [(transformed_filters(w2), b2, out2) for w2, b2, out2 in also]  # one input transform for all
        if conv3x3_winograd(x, transformed_filters(w), b, tuple(padding), out, _gemm_batch,
                            switches, 3 if switches is None else 4, extra) is not None:
            return out if switches is None else (out, switches)
        # the full-size ones are computed; those at the switches again below (a window held a NaN or an
        # infinity, and the unfused pool may choose other switches)
        also, at = [e for e, a in zip(also, at) if a], [True] * sum(at)
    if not wino and _lanes_path(tuple(stride), c_, k_):
        # z' at the switches written from the lanes (:func:`_from_lanes_at_switches`)
        if _forward_lanes(x, w, b, padding, dilation, out, out, 3, switches, also):
            return out if switches is None else (out, switches)
        # a window held a NaN or an infinity: unfused below, z' at the unfused pool's switches
    # elsewhere z' at the switches is computed whole (from the recycled buffers) and gathered
    full = [(w2, b2, _pool.empty(z_shape, x.dtype) if a else o2) for (w2, b2, o2), a in zip(also, at)]
    # the full-size relu(z) from the recycled buffers (relprop.kernels._pool): a fresh one would fault in
    # its pages on every forward
    z = _pool.empty(z_shape, x.dtype)
    conv2d_forward(x, w, b, stride, padding, dilation, z, z, full)
    if switches is None:
        return maxpool2d_values(z, (2, 2), (2, 2), (0, 0), out)
    return _gathered(*maxpool2d_forward(z, (2, 2), (2, 2), (0, 0), out, switches), full, also)


def _gathered(out, switches, full, also):
    """``(out, switches)``, each ``also`` output wanted at the switches gathered there from ``full``'s."""
    for (_, _, f), (_, _, o2) in zip(full, also):
        if f is not o2:
            gather_at_switches(f, switches, o2)
    return out, switches



def conv2d_relu_maxpool2x2_chain(x, stages, out):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_relu_maxpool2x2_chain`: conv + ReLU +
    2x2 max-pool triples in a chain (LeNet-5's two), ``stages`` ``(w, b, stride, padding, dilation)``,
    ``out`` the last one's pooled maxima.

    Where every stage is a lanes layer, each block of samples goes through the whole chain in one
    pass (:func:`_forward_lanes_chain`): a stage's pooled map stays in lanes as the next stage's input
    block, so the gather back to NCHW and the next scatter into lanes are gone, and the threads share
    out one batch of blocks instead of one per stage.  The values are the stage-by-stage kernels' to
    the bit.  Elsewhere, or when a pooled window holds a NaN or an infinity, stage by stage
    (:func:`conv2d_relu_maxpool2x2`)."""
    if all(_lanes_path(tuple(stride), w.shape[1], w.shape[0]) for w, _, stride, _, _ in stages) \
            and _forward_lanes_chain(x, stages, out):
        return out
    for s, (w, b, stride, padding, dilation) in enumerate(stages):
        shape = (out.shape if s == len(stages) - 1 else
                 _pooled_shape(x.shape, w.shape, stride, padding, dilation))
        x = conv2d_relu_maxpool2x2(x, w, b, stride, padding, dilation, out if s == len(stages) - 1 else
                                   _pool.empty(shape, x.dtype))
    return out


def _pooled_shape(x_shape, w_shape, stride, padding, dilation):
    """(N, K, Ho // 2, Wo // 2): the output of a conv + ReLU + 2x2 max-pool triple."""
    return (x_shape[0], w_shape[0], conv_output_size(x_shape[2], w_shape[2], stride[0], padding[0], dilation[0]) // 2,
            conv_output_size(x_shape[3], w_shape[3], stride[1], padding[1], dilation[1]) // 2)

def conv2d_vjp(g, w, stride, padding, dilation, out):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_vjp`.  Shapes: g (N,K,Ho,Wo),
    w (K,C,kh,kw), out (N,C,H,W)."""
    if _vjp_as_forward(g, w, stride, padding, dilation, out, out, 0) is not None:
        return out
    k_, c_, kh, kw = w.shape
    if _rows_path(True, tuple(stride), out.shape[1]):
        if _vjp_as_bands(g, w, padding, dilation, out):
            # stride 1: the input-VJP is the forward convolution of g with the flipped, transposed
            # weights w[k, c, kh-1-a, kw-1-b] and padding (kh-1)*d - p
            taps = _taps(w, "vjp_bands")
            pad = ((kh - 1) * dilation[0] - padding[0], (kw - 1) * dilation[1] - padding[1])
            return _forward_rows_bands(g, taps, np.zeros(c_, g.dtype), kh, kw, pad, dilation, out, out, 0)
        if w.shape[0] > w.shape[1]:
            return _vjp_rows_shift_out(g, w, padding, dilation, out)
        return _vjp_rows(g, w, padding, dilation, out)
    return _vjp_im2col(g, w, stride, padding, dilation, out)



def conv2d_relevance(r, z, epsilon, w, stride, padding, dilation, a, out):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_relevance`: out = a ⊙ Wᵀ(r / stab(z)),
    an LRP rule's backward through a convolution (z⁺, ε), one pass: where the input-VJP runs as Winograd
    or in lanes, the quotient is formed as r enters the transform (or the lanes) and the product with a
    as the result leaves it, so neither full-size array is written (on CIFAR-VGG b64 those two passes
    took 2.5-3.3 ms each on the 64-channel layer, single-threaded and from memory).  The same bits as the
    three kernels one after the other.  Elsewhere, those three kernels."""
    if _vjp_as_forward(r, w, stride, padding, dilation, out, a, 5, None if z is None else (z, epsilon),
                       lanes=r.shape[3] >= _config.CONV_LANES_DIVIDE_MIN_WIDTH) is not None:
        return out
    s = r if z is None else stabilized_divide(r, z, epsilon, _pool.empty(r.shape, r.dtype))
    conv2d_vjp(s, w, stride, padding, dilation, out)
    return np.multiply(out, a, out=out)


def conv2d_unpool_vjp(g, switches, w, stride, padding, dilation, a, out):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_unpool_vjp`: out = Wᵀ unpool(g) (⊙ a).
    Where the input-VJP runs as Winograd, g is unpooled as it enters the input transform
    (:func:`relprop.kernels.cpu.winograd._row_nhwc`) and multiplied by a as it leaves: the unpooled map
    (three quarters zeros) is never written, and the unpooling pass is gone.  The same bits as the
    unpooling and :func:`conv2d_vjp` (:func:`conv2d_relevance` without z).  Elsewhere, those two."""
    k_, c_, kh, kw = w.shape
    full = (g.shape[0], k_, conv_output_size(out.shape[2], kh, stride[0], padding[0], dilation[0]),
            conv_output_size(out.shape[3], kw, stride[1], padding[1], dilation[1]))
    if winograd_applies(out.shape, w.shape, stride, padding, dilation):
        return conv3x3_winograd(g, transformed_filters(w, flipped=True), np.zeros(c_, g.dtype),
                                (2 - padding[0], 2 - padding[1]), out, _gemm_batch, out if a is None else a,
                                0 if a is None else 5, unpool=(switches, full[2:]))
    r = maxunpool2d(g, switches, _pool.empty(full, g.dtype))
    if a is None:
        return conv2d_vjp(r, w, stride, padding, dilation, out)
    return conv2d_relevance(r, None, 0.0, w, stride, padding, dilation, a, out)


@njit(cache=_config.NUMBA_CACHE, nogil=True, fastmath=_config.FASTMATH_FLAGS)
def _flat_samples(r, switches, inv, kh, kw, sh, sw, ph, pw, dh, dw, out, n0, n1):
    """:func:`conv2d_flat_relevance` for samples n0 .. n1 - 1, on the zero-padded input grid (Hp, Wp) flattened,
    where every tap lands in range.  Per sample: s = inv ⊙ Σ_k R_k, laid out with the grid's row length
    Wp (R unpooled into s where ``switches`` is not empty); the transposed all-ones convolution of s, which
    is separable: t = s added at each of the kw column taps, then the grid = t added at each of the kh row
    taps; at unit strides each of those is one vector add over the whole plane (the columns of s past Wo
    are zeros, so what runs over a row's end adds nothing).  Then cropped into every input channel."""
    k_, ho, wo = r.shape[1], inv.shape[0], inv.shape[1]
    c_, h, wd = out.shape[1], out.shape[2], out.shape[3]
    hp, wp = h + 2 * ph, wd + 2 * pw
    m = ho * wp
    s0 = np.empty(ho * wo, r.dtype)  # Σ_k R_k, rows of Wo
    s = np.zeros(m, r.dtype)  # inv ⊙ s0, rows of Wp (the columns past Wo stay 0)
    t = np.empty(m + (kw - 1) * dw, r.dtype)
    grid = np.empty(hp * wp + (kw - 1) * dw, r.dtype)
    for n in range(n0, n1):
        if switches.shape[0] > 0:  # pooled: R_k is g at its switches, 0 elsewhere
            s0[:] = 0
            for k in range(k_):
                g, sk = r[n, k], switches[n, k]
                for py in range(g.shape[0]):
                    gy, sy = g[py], sk[py]
                    for px in range(g.shape[1]):
                        s0[sy[px]] += gy[px]
        else:
            s0[:] = r[n, 0].reshape(-1)  # (r is C-contiguous: so is each plane)
            for k in range(1, k_):
                g = r[n, k].reshape(-1)
                for j in range(s0.size):
                    s0[j] += g[j]
        for y in range(ho):  # into the grid's row length, times 1/stab(n_j)
            sy, s0y, iy_ = s[y * wp:y * wp + wo], s0[y * wo:(y + 1) * wo], inv[y]
            for x in range(wo):
                sy[x] = s0y[x] * iy_[x]
        t[:] = 0
        if sw == 1:
            for v in range(kw):
                tv = t[v * dw:v * dw + m]
                for q in range(m):
                    tv[q] += s[q]
        else:
            for y in range(ho):
                for v in range(kw):
                    for x in range(wo):
                        t[y * wp + x * sw + v * dw] += s[y * wp + x]
        grid[:] = 0
        if sh == 1:
            for u in range(kh):
                gu = grid[u * dh * wp:u * dh * wp + m]
                for q in range(m):
                    gu[q] += t[q]
        else:
            for y in range(ho):
                for u in range(kh):
                    gu, ty = grid[(y * sh + u * dh) * wp:(y * sh + u * dh + 1) * wp], t[y * wp:(y + 1) * wp]
                    for x in range(wp):
                        gu[x] += ty[x]
        for ch in range(c_):
            o = out[n, ch]
            for iy in range(h):
                oy, gy = o[iy], grid[(iy + ph) * wp + pw:(iy + ph) * wp + pw + wd]
                for x in range(wd):
                    oy[x] = gy[x]
    return out


def conv2d_flat_relevance(r, switches, inv, kernel, stride, padding, dilation, out):
    """Same math as :func:`relprop.kernels.reference.conv2d.conv2d_flat_relevance`, one pass per sample
    (:func:`_flat_samples`): the channel sum (unpooling as it reads, with ``switches``) into one plane, the
    transposed all-ones convolution of that plane by whole-plane vector adds, the copies.  Measured at
    LeNet-5's first layer (b256): 0.37 ms from R at its output, 0.53 ms from its max-pool's pooled side,
    against 0.83 ms for the channel sum and the transposed convolution of a 1 → 1 channel layer, and 0.34
    ms more for the unpooling.  Samples are shared out to the threads from
    ``_config.FLAT_THREADS_MIN_ELEMENTS`` elements read and written."""
    sw_ = _NO_SWITCHES if switches is None else switches
    n = out.shape[0]
    args = (tuple(kernel) + tuple(stride) + tuple(padding) + tuple(dilation))

    def work(n0, count, _):
        _flat_samples(r, sw_, inv, *args, out, n0, n0 + count)

    big = r.size + out.size >= _config.FLAT_THREADS_MIN_ELEMENTS
    run_chunks(n, max(1, -(-n // conv_threads())) if big else n, lambda: None, work, threads=None if big else 1)
    return out


def _vjp_as_forward(g, w, stride, padding, dilation, out, a_out, mode, divide=None, lanes=True):
    """The input-VJP as the forward convolution of g with the flipped, transposed weights
    w[k, c, kh-1-a, kw-1-b] and padding (kh-1)*d - p (stride 1), where that runs as Winograd or (with
    ``lanes``) in lanes, with that path's write-out ``mode`` (``a_out``) and ``divide``; returns ``out``,
    or None where neither applies."""
    k_, c_, kh, kw = w.shape
    zeros = np.zeros(c_, g.dtype)
    if winograd_applies(out.shape, w.shape, stride, padding, dilation):
        return conv3x3_winograd(g, transformed_filters(w, flipped=True), zeros, (2 - padding[0], 2 - padding[1]),
                                out, _gemm_batch, a_out, mode, divide=divide)
    if lanes and _lanes_path(tuple(stride), k_, c_) and (kh - 1) * dilation[0] >= padding[0] \
            and (kw - 1) * dilation[1] >= padding[1]:
        wt = _taps(w, "flipped")
        pad = ((kh - 1) * dilation[0] - padding[0], (kw - 1) * dilation[1] - padding[1])
        return _forward_lanes(g, wt, zeros, pad, dilation, out, a_out, mode, divide=divide)
    return None


def _lanes_path(stride, in_channels, out_channels):
    """Direct convolution with the batch in lanes (:func:`_forward_lanes`)?  Stride 1 and at most
    ``_config.CONV_LANES_MAX_CHANNELS`` input and output channels (for an input-VJP, the
    convolution of g: the layer's output and input channels)."""
    return stride == (1, 1) and _config.CONV_LANES > 0 \
        and max(in_channels, out_channels) <= _config.CONV_LANES_MAX_CHANNELS


def _lanes_per_block(n, sample_bytes, budget=None):
    """Samples per block of lanes: at most ``_config.CONV_LANES``, a block's scratch within ``budget``
    bytes (default ``_config.CONV_LANES_BYTES``: it is re-read for every output channel), at least two
    blocks per thread when there are several threads, and a multiple of 8 from 8 up (whole vectors)."""
    budget = _config.CONV_LANES_BYTES if budget is None else budget
    lanes = min(int(_config.CONV_LANES), n, max(1, budget // max(1, sample_bytes)))
    threads = conv_threads()
    if threads > 1:
        lanes = min(lanes, -(-n // (2 * threads)))
    return max(1, lanes - lanes % 8 if lanes >= 8 else lanes)


def _forward_lanes(x, w, b, padding, dilation, out, a_out, mode, switches=None, also=(), divide=None):
    """z[n, k, i, j] = b[k] + sum_{c,a,b} w[k,c,a,b] x_padded[n, c, i + a*dh, j + b*dw], stride 1, direct.

    Blocks of L samples (:func:`_lanes_per_block`) are laid out with the sample fastest
    (:func:`_to_lanes`), so each tap is a multiply-add over a whole output row of L samples
    (:func:`_lanes_conv`), and scattered back with the bias and the ReLU (:func:`_from_lanes`).
    No GEMM: for a few output channels BLAS gets too few result rows to run near its rate.
    Blocks are shared out to threads like the chunks of the other paths.

    ``mode`` 3: ``out`` is (N, K, Ho//2, Wo//2) and receives the 2x2 max-pool of relu(z)
    (:func:`_from_lanes_pool`); returns whether every pooled window was finite (if not, ``out`` is
    incomplete); with ``switches`` (int64, shaped like ``out``) the pool's switches as well
    (:func:`_from_lanes_pool_switches`).

    ``also``: ``(w', b', out')`` triples, out' = conv2d(x, w') + b' from the same block of lanes (an LRP
    rule's z⁺ beside the trace's z: the input goes into lanes once, and one batch of blocks for the
    threads; LeNet-5 b256 ε+flat 1.04x, interquartile 1.02-1.07x, alternating processes); with mode 3 and
    ``switches``, an out' shaped like ``out`` receives z' at the switches only (:func:`_from_lanes_at_switches`).
    ``divide`` = (z, ε): the convolution of x / stab(z), divided on the way into lanes (with mode 5, an LRP
    backward: :func:`conv2d_relevance`)."""
    (ph, pw), (dh, dw) = padding, dilation
    n_, c_, h_, w_ = x.shape
    k_, _, kh, kw = w.shape
    ho, wo = h_ + 2 * ph - dh * (kh - 1), w_ + 2 * pw - dw * (kw - 1)
    lanes = _lanes_per_block(n_, (c_ * (h_ + 2 * ph) * (w_ + 2 * pw) + k_ * ho * wo) * x.itemsize)
    finite = []

    def scratch():
        return (np.empty((c_, h_ + 2 * ph, (w_ + 2 * pw) * lanes), x.dtype),
                np.empty((k_, ho, wo * lanes), x.dtype), np.empty(max(1, wo // 2) * lanes, x.dtype),
                np.empty(max(1, wo // 2) * lanes if switches is not None else 0, np.int64))

    if divide is None:
        zd, eps = np.empty((0, 0, 0, 0), x.dtype), x.dtype.type(0)
    else:
        zd, eps = divide[0], np.array([divide[1]]).astype(x.dtype)[0]  # ε in the data's dtype

    def work(n0, nb, buffers):
        xb, zb, prow, srow = buffers
        _to_lanes(x, n0, nb, lanes, ph, pw, xb, zd, eps)
        _lanes_conv(xb, w, dh, dw, lanes, zb, ph, ph + h_)
        if mode == 3 and switches is not None:
            finite.append(_from_lanes_pool_switches(zb, n0, nb, lanes, b, out, switches, prow, srow, wo))
        elif mode == 3:
            finite.append(_from_lanes_pool(zb, n0, nb, lanes, b, out, prow))
        elif mode == 5:
            _from_lanes_times(zb, n0, nb, lanes, b, out, a_out)
        else:
            _from_lanes(zb, n0, nb, lanes, b, out, a_out, mode)
        for w2, b2, out2 in also:  # zb is free again
            _lanes_conv(xb, w2, dh, dw, lanes, zb, ph, ph + h_)
            if mode == 3 and switches is not None and out2.shape == out.shape:  # wanted at the switches only
                _from_lanes_at_switches(zb, n0, nb, lanes, b2, out2, switches, wo)
            else:
                _from_lanes(zb, n0, nb, lanes, b2, out2, out2, 0)

    run_chunks(n_, lanes, scratch, work)
    return all(finite) if mode == 3 else out



def _forward_lanes_chain(x, stages, out):
    """:func:`_forward_lanes` (mode 3) through a chain of conv + ReLU + max-pool triples, all lanes layers
    (stride 1): per block of L samples, x into lanes once (:func:`_to_lanes`), then per stage the
    convolution (:func:`_lanes_conv`) and its pool written straight into the next stage's block of lanes
    (:func:`_lanes_pool_into`), the last stage's gathered to ``out`` (:func:`_from_lanes_pool`).  A
    block's scratch for the whole chain is held within ``_config.CONV_LANES_CHAIN_BYTES``.

    Measured on LeNet-5 b256 (its two triples; 2-core machine, alternating, medians of paired ratios):
    the two triples 1.06-1.19x the stage-by-stage kernels on one thread, 1.23x on two
    (``bench/test_bench_kernels.py::test_conv2d_relu_maxpool_chain_vs_stage_by_stage``); the forward
    1.13-1.20x alone and 1.11-1.20x right after a PyTorch forward.  Returns False where a pooled window held a NaN or an infinity
    (``out`` is then incomplete)."""
    n_ = x.shape[0]
    geometry, sample_elems = [], 0
    h_, w_ = x.shape[2], x.shape[3]
    for w, _, _, (ph, pw), (dh, dw) in stages:
        k_, c_, kh, kw = w.shape
        ho, wo = h_ + 2 * ph - dh * (kh - 1), w_ + 2 * pw - dw * (kw - 1)
        geometry.append((c_, h_, w_, ph, pw, dh, dw, k_, ho, wo))
        sample_elems += c_ * (h_ + 2 * ph) * (w_ + 2 * pw) + k_ * ho * wo
        h_, w_ = ho // 2, wo // 2
    lanes = _lanes_per_block(n_, sample_elems * x.itemsize, _config.CONV_LANES_CHAIN_BYTES)
    last = len(stages) - 1
    no_divide = np.empty((0, 0, 0, 0), x.dtype)
    finite = []

    def scratch():
        # zeros: a later stage's input padding is never written (the first stage's is, by _to_lanes)
        blocks = [(np.zeros((c_, h_ + 2 * ph, (w_ + 2 * pw) * lanes), x.dtype), np.empty((k_, ho, wo * lanes), x.dtype))
                  for c_, h_, w_, ph, pw, _, _, k_, ho, wo in geometry]
        return blocks, np.empty(max(1, geometry[-1][9] // 2) * lanes, x.dtype)

    def work(n0, nb, buffers):
        blocks, prow = buffers
        _to_lanes(x, n0, nb, lanes, geometry[0][3], geometry[0][4], blocks[0][0], no_divide, x.dtype.type(0))
        for s, (w, b, _, _, _) in enumerate(stages):
            _, h_, _, ph, pw, dh, dw, _, _, _ = geometry[s]
            xb, zb = blocks[s]
            _lanes_conv(xb, w, dh, dw, lanes, zb, ph, ph + h_)
            if s < last:
                ok = _lanes_pool_into(zb, lanes, b, blocks[s + 1][0], geometry[s + 1][3], geometry[s + 1][4])
            else:
                ok = _from_lanes_pool(zb, n0, nb, lanes, b, out, prow)
            if not ok:
                finite.append(False)
                return

    run_chunks(n_, lanes, scratch, work)
    return not finite

def _vjp_as_bands(g, w, padding, dilation, out):
    """Is one sample of this stride-1 input-VJP larger than a chunk (and its flipped padding >= 0)?"""
    k_, c_, kh, kw = w.shape
    if (kh - 1) * dilation[0] < padding[0] or (kw - 1) * dilation[1] < padding[1] or out.shape[2] <= 1:
        return False
    return (kw * k_ + c_) * out.shape[2] * out.shape[3] * g.itemsize > _config.CONV_CHUNK_BYTES


def _row_shift_gemms(taps, src, off, step, dst, cols):
    """dst[:, :cols] = sum_a taps[a] @ src[:, off + a*step : off + a*step + cols] for the kh kernel rows a of
    ``taps`` (kh, M, K): the row-shift paths' products, each kernel row a window of ``src`` shifted by
    ``step`` (whole grid rows), accumulated by BLAS (beta = 1).  A single chunk's columns are shared out
    to the threads (:func:`relprop.kernels.cpu._chunks.share`)."""
    kh, m, k = taps.shape

    def gemms(j0, j1):  # columns j0 .. j1
        for a in range(kh):
            _gemm(m, j1 - j0, k, taps, a * m * k, k, src, off + a * step + j0, src.shape[1], dst, j0, dst.shape[1],
                  0.0 if a == 0 else 1.0)

    share(cols, m * k * kh * cols, gemms)


def _forward_rows(x, w, b, padding, dilation, out, a_out, mode):
    """z[:, grid] = sum_a W[:, :, a, :] @ X3[:, grid + (a*dh - ph)*Wo], X3 = the kw column shifts of x."""
    (ph, pw), (dh, dw) = padding, dilation
    n_, c_, h_, _ = x.shape
    k_, _, kh, kw = w.shape
    hg, mr = _row_grid(h_, out.shape[2], kh, ph, dh)
    wg, inner = out.shape[3], kw * c_
    plane, margin = hg * wg, mr * wg
    nb = _samples_per_chunk((inner + k_) * plane, n_, x.itemsize)
    taps = _taps(w, "forward")  # [a, k, (b, c)]
    if (inner + k_) * plane * x.itemsize > _config.CONV_CHUNK_BYTES and out.shape[2] > 1:
        return _forward_rows_bands(x, taps, b, kh, kw, padding, dilation, out, a_out, mode)

    def scratch():
        return np.empty((inner, nb * plane + 2 * margin), x.dtype), np.empty((k_, nb * plane), x.dtype)

    def work(n0, nc, buffers):
        xs, z = buffers
        _shifted_rows(x, n0, nc, kw, -pw, dw, hg, wg, margin, xs)
        _row_shift_gemms(taps, xs, margin - ph * wg, dh * wg, z, nc * plane)
        _crop(z, n0, nc, hg, wg, b, out, a_out, mode)

    run_chunks(n_, nb, scratch, work)
    return out


def _forward_rows_bands(x, taps, b, kh, kw, padding, dilation, out, a_out, mode):
    """The row-shift forward for samples too large for one chunk: bands of output rows of one sample.

    A band of output rows [i0, i0 + rows) reads the input rows [i0 - ph, i0 - ph + rows + (kh-1)*dh):
    they are laid out as one short "sample" of the grid (rows outside the image zero), so kernel
    row ``a`` is again a shift by ``a*dh`` rows and the band is ``kh`` GEMMs.  Bands are sized to
    ``_config.CONV_CHUNK_BYTES`` and shared out to threads like chunks of samples.
    """
    (ph, pw), (dh, dw) = padding, dilation
    n_, c_, h_, _ = x.shape
    k_, ho, wg = out.shape[1], out.shape[2], out.shape[3]
    inner, halo = kw * c_, (kh - 1) * dh
    hb = max(1, min(ho, (_config.CONV_CHUNK_BYTES // (x.itemsize * wg) - inner * halo) // (inner + k_)))
    bands = [(n, i0, min(hb, ho - i0)) for n in range(n_) for i0 in range(0, ho, hb)]

    def scratch():
        return np.empty((inner, (hb + halo + ph) * wg), x.dtype), np.empty((k_, hb * wg), x.dtype)

    def work(q, count, buffers):
        xs, z = buffers
        for n, i0, rows in bands[q:q + count]:
            top_in = i0 - ph  # the input row of the band's first grid row
            r_lo, r_hi = max(0, top_in), max(0, min(h_, top_in + rows + halo))
            r_hi = max(r_lo, r_hi)
            top = r_lo - top_in  # zero rows above the image
            _shifted_rows(x[n:n + 1, :, r_lo:r_hi, :], 0, 1, kw, -pw, dw, rows + halo - top, wg, top * wg, xs)
            _row_shift_gemms(taps, xs, 0, dh * wg, z, rows * wg)
            _crop_band(z, n, i0, rows, wg, b, out, a_out, mode)

    run_chunks(len(bands), 1, scratch, work)
    return out


def _vjp_rows(g, w, padding, dilation, out):
    """g_in[:, grid] = sum_a W[:, :, a, :]^T @ G3[:, grid + (ph - a*dh)*W], G3 = the kw column shifts of g."""
    (ph, pw), (dh, dw) = padding, dilation
    n_, c_, h_, w_ = out.shape
    k_, _, kh, kw = w.shape
    hg, mr = _row_grid(h_, g.shape[2], kh, ph, dh)
    wg, inner = w_, kw * k_
    plane, margin = hg * wg, mr * wg
    nb = _samples_per_chunk((inner + c_) * plane, n_, g.itemsize)
    taps = _taps(w, "vjp")  # [a, c, (b, k)]
    zero = np.zeros(c_, g.dtype)

    def scratch():
        return np.empty((inner, nb * plane + 2 * margin), g.dtype), np.empty((c_, nb * plane), g.dtype)

    def work(n0, nc, buffers):
        gs, gin = buffers
        _shifted_rows(g, n0, nc, kw, pw, -dw, hg, wg, margin, gs)
        _row_shift_gemms(taps, gs, margin + ph * wg, -dh * wg, gin, nc * plane)
        _crop(gin, n0, nc, hg, wg, zero, out, out, 0)

    run_chunks(n_, nb, scratch, work)
    return out


def _vjp_rows_shift_out(g, w, padding, dilation, out):
    """The same sum with the column taps shifted on the way out, for K > C: copying g once and
    reading kw*C result rows beats writing kw*K shifted rows of g.

    P[(b, c), grid] = sum_a W[:, :, a, b]^T @ G[:, grid + (ph - a*dh)*Wo];  g_in = sum_b P[b, c] shifted by pw - b*dw.
    """
    (ph, pw), (dh, dw) = padding, dilation
    n_, c_, h_, _ = out.shape
    k_, _, kh, kw = w.shape
    hg, mr = _row_grid(h_, g.shape[2], kh, ph, dh)
    wg, rows = g.shape[3], kw * c_
    plane, margin = hg * wg, mr * wg
    nb = _samples_per_chunk((rows + k_) * plane, n_, g.itemsize)
    taps = _taps(w, "vjp_shift_out")  # [a, (b, c), k]

    def scratch():
        return np.empty((k_, nb * plane + 2 * margin), g.dtype), np.empty((rows, nb * plane), g.dtype)

    def work(n0, nc, buffers):
        gg, p = buffers
        _shifted_rows(g, n0, nc, 1, 0, 0, hg, wg, margin, gg)
        _row_shift_gemms(taps, gg, margin + ph * wg, -dh * wg, p, nc * plane)
        _crop_shift_sum(p, n0, nc, kw, pw, -dw, hg, wg, out)

    run_chunks(n_, nb, scratch, work)
    return out


def _forward_im2col(x, w, b, stride, padding, dilation, out, a_out, mode):
    """z = W (K, C*kh*kw) @ cols (C*kh*kw, chunk columns)."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n_, c_ = x.shape[:2]
    k_, _, kh, kw = w.shape
    ho, wo = out.shape[2], out.shape[3]
    rows, plane = c_ * kh * kw, ho * wo
    nb = _samples_per_chunk((rows + k_) * plane, n_, x.itemsize)
    w2 = np.ascontiguousarray(w).reshape(k_, rows)  # (a view of a contiguous w: nothing to keep)

    def scratch():
        return np.empty((rows, nb * plane), x.dtype), np.empty((k_, nb * plane), x.dtype)

    def work(n0, nc, buffers):
        cols, z = buffers
        im2col_chunk(x, n0, nc, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, cols)
        share(nc * plane, k_ * rows * nc * plane, lambda j0, j1: _gemm(k_, j1 - j0, rows, w2, 0, rows, cols, j0,
                                                                       cols.shape[1], z, j0, z.shape[1], 0.0))
        _crop(z, n0, nc, ho, wo, b, out, a_out, mode)

    run_chunks(n_, nb, scratch, work)
    return out


def _vjp_im2col(g, w, stride, padding, dilation, out):
    """cols = W^T (C*kh*kw, K) @ g (K, chunk columns), then col2im."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n_, c_ = out.shape[:2]
    k_, _, kh, kw = w.shape
    ho, wo = g.shape[2], g.shape[3]
    rows, plane = c_ * kh * kw, ho * wo
    nb = _samples_per_chunk((rows + k_) * plane, n_, g.itemsize)
    wt = _taps(w, "im2col_vjp")

    def scratch():
        return np.empty((k_, nb * plane), g.dtype), np.empty((rows, nb * plane), g.dtype)

    def work(n0, nc, buffers):
        gc, cols = buffers
        _to_columns(g, n0, nc, gc)
        share(nc * plane, rows * k_ * nc * plane, lambda j0, j1: _gemm(rows, j1 - j0, k_, wt, 0, k_, gc, j0,
                                                                       gc.shape[1], cols, j0, cols.shape[1], 0.0))
        _col2im(cols, n0, nc, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, out)

    run_chunks(n_, nb, scratch, work)
    return out
