"""Winograd F(4x4, 3x3): the 3x3 stride-1 convolutions of the CPU backend with 4x fewer multiplies.

Lavin & Gray (2016), "Fast Algorithms for Convolutional Neural Networks": a 4x4 block of
outputs of a 3x3 correlation is

    Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A

for the 6x6 input patch d under it and the 3x3 filter g, with

    B^T = [[4,  0, -5,  0, 1, 0],     G = [[ 1/4,     0,    0],     A^T = [[1, 1,  1, 1,  1, 0],
           [0, -4, -4,  1, 1, 0],          [-1/6,  -1/6, -1/6],            [0, 1, -1, 2, -2, 0],
           [0,  4, -4, -1, 1, 0],          [-1/6,   1/6, -1/6],            [0, 1,  1, 4,  4, 0],
           [0, -2, -1,  2, 1, 0],          [1/24,  1/12,  1/6],            [0, 1, -1, 8, -8, 1]]
           [0,  2, -1, -2, 1, 0],          [1/24, -1/12,  1/6],
           [0,  4,  0, -5, 0, 1]]          [   0,     0,    1]]

Summed over the input channels, the 36 elementwise products become 36 GEMMs, one per
position xi = (x, y) of the 6x6 transform domain:

    M[xi] (T x K) = V[xi] (T x C) @ U[xi] (C x K),   V[xi][t, c] = (B^T d_{t,c} B)[xi],
                                                      U[xi][c, k] = (G g_{k,c} G^T)[xi]

over the T tiles of a chunk: 36 * C * K multiply-adds per 16 outputs against the direct
convolution's 144 * C * K.  The transforms are O(C + K) per tile, so the 4x is nearly all
kept when C and K are large; with few channels (the first layer) the direct path stays.

Layout (why NHWC inside): every transform is a short fixed linear combination, and Numba
vectorises a loop over contiguous lanes only while LLVM's run-time alias checks stay few (one
output stream per loop for the input transform's six outputs; the output transform's four in one
loop, see :func:`_at_lanes`).  With the channels innermost, a tile's 36 patch values
for all channels are 36 contiguous vectors, so each combination is one long loop over the
channels (and, once the columns are separated, over (tile column, channel)).  A chunk is
transposed to NHWC on the way in (zero-padded) and back to NCHW on the way out (adding the
bias), each one pass over the data.

What a sweep fuses into those two passes: on the way in, an LRP backward's division by stab(z)
(``divide``) and the unpooling of a signal that comes down from a 2x2 max-pool still pooled
(``unpool``: each image row is built from its pooled row and switches, :func:`_row_nhwc`); on the
way out, the ReLU, the 2x2 max-pool (with its switches), the product with the layer input of an
LRP backward, and a modified forward wanted at the pool's switches only
(:func:`_output_transform_at_switches`).  Each gives the unfused passes' bits.

Accuracy: the transforms scale values by up to 5 (B) and 8 (A); in float32 the result
differs from the direct sum by ~1e-5 of the output's range (measured on the CIFAR-VGG and
VGG-16 layers: 7e-6 to 1.5e-5), in float64 by ~1e-15.  ``_config.WINOGRAD`` switches it off.
"""
import threading

import numpy as np
from numba import njit

from ... import _config
from ._chunks import conv_threads, run_chunks
from ._derived import derived
from .pool2d import first_max4, max4, relu_window

__all__ = ["winograd_applies", "conv3x3_winograd", "transformed_filters", "filter_transform"]

_jit = njit(cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS, nogil=True)
#: "no divisor" for the input transform (:func:`_row_nhwc`'s ``zd``)
_NO_DIVIDE = {np.dtype(d): np.empty((0, 0, 0, 0), d) for d in (np.float32, np.float64)}
#: "no unpooling" for the input transform (:func:`_row_nhwc`'s ``sw``)
_NO_SWITCHES = np.empty((0, 0, 0, 0), np.int64)


# ============================================================================================
# The 1-D transforms over lanes: one output stream per loop, so that each loop vectorises
# ============================================================================================
_inline = njit(inline="always", fastmath=_config.FASTMATH_FLAGS)
#: inlined at the call into the transforms' loops: a call of a kernel that takes a dozen array views pays
#: a reference count on each, in and out (Numba's runtime), ~400 ns a call; inlined, the counts of the
#: caller's views are pruned (the input transform 1.12-1.18x, same bits)
_jit_inline = njit(inline="always", cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS, nogil=True)


# the six rows of B^T applied to one patch column (d0..d5); c2, c4, c5 are 2, 4, 5 in the data's dtype
@_inline
def _bt0(d0, d1, d2, d3, d4, d5, c2, c4, c5):
    return c4 * d0 - c5 * d2 + d4


@_inline
def _bt1(d0, d1, d2, d3, d4, d5, c2, c4, c5):
    return d3 + d4 - c4 * (d1 + d2)


@_inline
def _bt2(d0, d1, d2, d3, d4, d5, c2, c4, c5):
    return c4 * (d1 - d2) - d3 + d4


@_inline
def _bt3(d0, d1, d2, d3, d4, d5, c2, c4, c5):
    return c2 * (d3 - d1) - d2 + d4


@_inline
def _bt4(d0, d1, d2, d3, d4, d5, c2, c4, c5):
    return c2 * (d1 - d3) - d2 + d4


@_inline
def _bt5(d0, d1, d2, d3, d4, d5, c2, c4, c5):
    return c4 * d1 - c5 * d3 + d5


@_jit_inline
def _bt_lanes(d0, d1, d2, d3, d4, d5, o0, o1, o2, o3, o4, o5, c2, c4, c5):
    """(o0..o5) = B^T (d0..d5), lane by lane (one loop per output: each vectorises)."""
    for q in range(o0.size):
        o0[q] = _bt0(d0[q], d1[q], d2[q], d3[q], d4[q], d5[q], c2, c4, c5)
    for q in range(o0.size):
        o1[q] = _bt1(d0[q], d1[q], d2[q], d3[q], d4[q], d5[q], c2, c4, c5)
    for q in range(o0.size):
        o2[q] = _bt2(d0[q], d1[q], d2[q], d3[q], d4[q], d5[q], c2, c4, c5)
    for q in range(o0.size):
        o3[q] = _bt3(d0[q], d1[q], d2[q], d3[q], d4[q], d5[q], c2, c4, c5)
    for q in range(o0.size):
        o4[q] = _bt4(d0[q], d1[q], d2[q], d3[q], d4[q], d5[q], c2, c4, c5)
    for q in range(o0.size):
        o5[q] = _bt5(d0[q], d1[q], d2[q], d3[q], d4[q], d5[q], c2, c4, c5)


@_jit_inline
def _bt_row(s, o, c2, c4, c5):
    """o[y, j, :] = (B^T d_j)[y] for d_j[col] = s[4j + col, :]: one image row's 1-D transforms.  Output
    row y outermost, then the tile columns j, then the channels (vectorised): as fast as one call of
    :func:`_bt_lanes` per j is slow (its loop setup per short run of channels costs 1.3-2x)."""
    for j in range(o.shape[1]):
        d0, d1, d2, d3, d4, d5, oj = s[4 * j], s[4 * j + 1], s[4 * j + 2], s[4 * j + 3], s[4 * j + 4], s[4 * j + 5], o[0, j]
        for q in range(oj.size):
            oj[q] = _bt0(d0[q], d1[q], d2[q], d3[q], d4[q], d5[q], c2, c4, c5)
    for j in range(o.shape[1]):
        d0, d1, d2, d3, d4, d5, oj = s[4 * j], s[4 * j + 1], s[4 * j + 2], s[4 * j + 3], s[4 * j + 4], s[4 * j + 5], o[1, j]
        for q in range(oj.size):
            oj[q] = _bt1(d0[q], d1[q], d2[q], d3[q], d4[q], d5[q], c2, c4, c5)
    for j in range(o.shape[1]):
        d0, d1, d2, d3, d4, d5, oj = s[4 * j], s[4 * j + 1], s[4 * j + 2], s[4 * j + 3], s[4 * j + 4], s[4 * j + 5], o[2, j]
        for q in range(oj.size):
            oj[q] = _bt2(d0[q], d1[q], d2[q], d3[q], d4[q], d5[q], c2, c4, c5)
    for j in range(o.shape[1]):
        d0, d1, d2, d3, d4, d5, oj = s[4 * j], s[4 * j + 1], s[4 * j + 2], s[4 * j + 3], s[4 * j + 4], s[4 * j + 5], o[3, j]
        for q in range(oj.size):
            oj[q] = _bt3(d0[q], d1[q], d2[q], d3[q], d4[q], d5[q], c2, c4, c5)
    for j in range(o.shape[1]):
        d0, d1, d2, d3, d4, d5, oj = s[4 * j], s[4 * j + 1], s[4 * j + 2], s[4 * j + 3], s[4 * j + 4], s[4 * j + 5], o[4, j]
        for q in range(oj.size):
            oj[q] = _bt4(d0[q], d1[q], d2[q], d3[q], d4[q], d5[q], c2, c4, c5)
    for j in range(o.shape[1]):
        d0, d1, d2, d3, d4, d5, oj = s[4 * j], s[4 * j + 1], s[4 * j + 2], s[4 * j + 3], s[4 * j + 4], s[4 * j + 5], o[5, j]
        for q in range(oj.size):
            oj[q] = _bt5(d0[q], d1[q], d2[q], d3[q], d4[q], d5[q], c2, c4, c5)


#: the output transform's arithmetic in IEEE order (no reassociation, no contraction into FMAs): it is
#: inlined into every write-out (plain, pooled, pooled with switches), and with those freedoms the compiler
#: could round one copy differently from another (seen: 1-ulp differences between the pooled and the plain
#: write-out in ~1 of 10 test runs); this way every copy gives the same bits.  Measured: no slower.
_STRICT = {"nsz", "arcp", "afn"}


@njit(cache=_config.NUMBA_CACHE, fastmath=_STRICT, nogil=True)
def _at_lanes(m0, m1, m2, m3, m4, m5, o0, o1, o2, o3, c2, c4, c8):
    """(o0..o3) = A^T (m0..m5), lane by lane, evaluated left to right (``_STRICT``).  One loop writes all
    four: as four loops, one output each, LLVM left them scalar (80 scalar against 12 vector
    operations in the compiled code) and a call over 64 lanes took 310 ns against 18 ns; the output
    transform of a chunk of 128 tiles then ran 2.7x faster at 64 channels, 1.3-1.7x at 128-256 (CIFAR-VGG
    b64 forward, gradient and ε+flat 1.09-1.11x; VGG-16 b4 1.04-1.08x).  (The input transform's six
    outputs in one loop stayed scalar and ran 2x slower: it keeps one loop per output.)"""
    for q in range(o0.size):
        a1, a2, a3, a4 = m1[q], m2[q], m3[q], m4[q]
        o0[q] = m0[q] + a1 + a2 + a3 + a4
        o1[q] = a1 - a2 + c2 * (a3 - a4)
        o2[q] = a1 + a2 + c4 * (a3 + a4)
        o3[q] = a1 - a2 + c8 * (a3 - a4) + m5[q]


@njit(inline="always", cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def emit(d, a, s, bk, mode):
    """The epilogue of the CPU forward convolution paths of :mod:`relprop.kernels.cpu.conv2d` (and its
    arithmetic in :func:`_output_transform`), one output row: d = s + bk (``mode`` 0); and a = relu(d)
    as well (1); or d = relu(s + bk) (2: the ReLU fused in place).  One store stream per loop (each
    vectorises); mode 1 reads d back while it is in L1.  relu(v) = 0 if v < 0 else v: NaN passes,
    as :func:`relprop.kernels.cpu.elementwise.relu_forward`."""
    if mode == 2:
        for q in range(d.size):
            v = s[q] + bk
            d[q] = 0 if v < 0 else v
    else:
        for q in range(d.size):
            d[q] = s[q] + bk
        if mode == 1:
            for q in range(d.size):
                v = d[q]
                a[q] = 0 if v < 0 else v


# ============================================================================================
# Into and out of the transform domain, one chunk of tile rows at a time
# ============================================================================================
@_jit_inline
def stab_divide(r, z, eps):
    """r / (z + ε·sign₀(z)), sign₀(0) = +1, and 0 where that is 0: one element of
    :func:`relprop.kernels.cpu.elementwise.stabilized_divide` (the same expression, the same bits)."""
    den = z + eps if z >= 0 else z - eps
    return 0 if den == 0 else r / den


@_jit
def _row_nhwc(x, n, h, pw, d, slab, zd, eps, sw, h_, w_):
    """d[pw + w, c] = x[n, c, h, w]: one zero-padded image row, channels last (zero when h is
    outside the image).  Two steps: the row of every channel into ``slab`` (C, W), each a
    contiguous run of whole cache lines, then the transposition within that small buffer.  Read
    straight from x, the channel rows lie H*W apart, a whole page at 32x32: the gather ran
    1.1-5x slower on the CIFAR-VGG and VGG-16 layers (2.2x at 64 channels of 32x32, 5x at
    224x224), as the 64 lines of one column compete for the same cache sets.

    ``zd`` (shaped like x; empty: none): the row of x / stab(zd) instead (:func:`stab_divide`, ε = ``eps``),
    the relevance over the stabilised pre-activation of an LRP backward, never written whole.
    ``sw`` (shaped like x; empty: none): x is the pooled side of a 2x2 stride-2 max-pool with these
    switches, and the row is its unpooling's (x at the switches in row h, 0 elsewhere), never written
    whole either.  (h_, w_): the map's height and width (x's own, or the unpooled map's)."""
    c_ = x.shape[1]
    wp = d.shape[0]
    if h < 0 or h >= h_:
        d[:] = 0
        return
    w0, w1 = max(0, -pw), min(w_, wp - pw)
    d[:pw + w0] = 0
    d[pw + w1:] = 0
    if sw.shape[0] != 0:
        hp, base = h // 2, h * w_  # the pooled row whose windows cover row h; a switch in row h is base + column
        wq = x.shape[3]
        zero = eps - eps  # 0 in the data's dtype (ε is finite)
        for c in range(c_):
            t = slab[c]
            if hp < x.shape[2]:  # (an odd last row lies outside every window)
                s, sr = x[n, c, hp], sw[n, c, hp]
                for w in range(w_):
                    t[w] = 0
                for j in range(wq):  # window j covers columns 2j, 2j + 1: its switch is one of them, or off row h
                    off = sr[j] - base - 2 * j
                    at = 2 * j + (off & 1)
                    t[at] = s[j] if (off >> 1) == 0 else t[at]
            else:
                for w in range(w_):
                    t[w] = 0
    elif zd.shape[0] == 0:
        for c in range(c_):
            s, t = x[n, c, h], slab[c]
            for w in range(w_):
                t[w] = s[w]
    else:
        for c in range(c_):
            s, t, zr = x[n, c, h], slab[c], zd[n, c, h]
            for w in range(w_):
                t[w] = stab_divide(s[w], zr[w], eps)
    for w in range(w0, w1):  # gather the channels from the slab, write them contiguously
        dw = d[pw + w]
        for c in range(c_):
            dw[c] = slab[c, w]


@_jit
def _input_transform(x, segs, ph, pw, tw, cst, v, zd, eps, sw, h_, w_):
    """v[x*6 + y, t*C : (t+1)*C] = (B^T d B)[x, y] for the t-th tile of the chunk, whose 6x6 patch is
    d[r, col] = xpad[n, :, 4i + r, 4j + col]; tiles in order of the segments (n, i0, rows), their
    tile rows i = i0 .. i0 + rows - 1 and columns j < tw.  ``zd``, ``eps``: x / stab(zd) in place of x;
    ``sw``: the unpooling of x by these switches, (h_, w_) its size, in place of x (:func:`_row_nhwc`)."""
    c_ = x.shape[1]
    c2, c4, c5 = cst[0], cst[1], cst[2]
    row = np.empty((4 * tw + 2, c_), x.dtype)
    slab = np.empty((c_, w_), x.dtype)
    # h[(4i + r) % 6, y, j] = (d B)[r, y] of tile j of tile row i: a ring of image rows, so that the two rows
    # that consecutive tile rows share (4i + 4, 4i + 5 are the next one's 0, 1) are transformed once
    h = np.empty((6, 6, tw, c_), x.dtype)
    q = -1
    for sg in range(segs.shape[0]):
        n, i0 = segs[sg, 0], segs[sg, 1]
        for i in range(i0, i0 + segs[sg, 2]):
            q += 1
            for r in range(0 if i == i0 else 2, 6):
                _row_nhwc(x, n, 4 * i + r - ph, pw, row, slab, zd, eps, sw, h_, w_)
                _bt_row(row, h[(4 * i + r) % 6], c2, c4, c5)
            s0, s1, s2, s3, s4, s5 = (4 * i) % 6, (4 * i + 1) % 6, (4 * i + 2) % 6, (4 * i + 3) % 6, \
                (4 * i + 4) % 6, (4 * i + 5) % 6
            lo, hi = q * tw * c_, (q + 1) * tw * c_
            for y in range(6):
                _bt_lanes(h[s0, y].ravel(), h[s1, y].ravel(), h[s2, y].ravel(), h[s3, y].ravel(), h[s4, y].ravel(),
                          h[s5, y].ravel(), v[y, lo:hi], v[6 + y, lo:hi], v[12 + y, lo:hi], v[18 + y, lo:hi],
                          v[24 + y, lo:hi], v[30 + y, lo:hi], c2, c4, c5)
    return v


@_inline
def _tile_row_out(m, lo, tw, k_, c2, c4, c8, s, o):
    """o[a, 4j + b, :] = (A^T M A)[a, b] of the tile row's tiles j (their M in m[:, lo : lo + tw*K]), channels
    last: the 1-D transform of the columns into s (lanes (j, k)), then of the rows.  One body for every
    output transform, so the pooled write-out sees the same bits as the plain one."""
    hi = lo + tw * k_
    for x in range(6):
        z = 6 * x
        _at_lanes(m[z, lo:hi], m[z + 1, lo:hi], m[z + 2, lo:hi], m[z + 3, lo:hi], m[z + 4, lo:hi],
                  m[z + 5, lo:hi], s[x, 0], s[x, 1], s[x, 2], s[x, 3], c2, c4, c8)
    for j in range(tw):
        J, kl, kh = 4 * j, j * k_, (j + 1) * k_
        for b in range(4):
            _at_lanes(s[0, b, kl:kh], s[1, b, kl:kh], s[2, b, kl:kh], s[3, b, kl:kh], s[4, b, kl:kh],
                      s[5, b, kl:kh], o[0, J + b], o[1, J + b], o[2, J + b], o[3, J + b], c2, c4, c8)


@_jit
def _output_transform(m, segs, tw, cst, bias, out, a_out, mode):
    """out[n, :, 4i + a, 4j + b] = (A^T M A)[a, b] + bias for M[x, y] = m[x*6 + y, t*K : (t+1)*K], the
    t-th tile (n, i, j) of the chunk (order as in :func:`_input_transform`); rows and columns past
    the output's edge (the last tiles' overhang) are dropped.  ``a_out``, ``mode``: the ReLU that
    follows, fused into the write-out (:func:`emit`'s arithmetic).

    Written back channel by channel: a tile row's four rows of one channel are one contiguous run of its
    plane, where row by row they were four runs 4 KB apart among 2K others (K channels, two arrays).
    Measured at 64-256 channels: 1.1-1.2x the row-by-row write-out (mode 1: 1.2x), the same at 224x224;
    written through :func:`emit` in that order it ran 1.3x slower, hence a loop per mode (the LRP
    backward's :func:`_output_transform_times` the same way: 1.16x at 32x32; CIFAR-VGG b64 forward 1.02x,
    gradient 1.05x, ε+flat 1.05x; VGG-16 b4 1.04x, 1.01x, 1.02x)."""
    k_, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    c2, c4, c8 = cst[0], cst[1], cst[3]
    s = np.empty((6, 4, tw * k_), m.dtype)  # s[x, b] = (M A)[x, b], lanes (j, k)
    o = np.empty((4, 4 * tw, k_), m.dtype)  # one tile row of outputs, channels last
    q = -1
    for sg in range(segs.shape[0]):
        n, i0 = segs[sg, 0], segs[sg, 1]
        for i in range(i0, i0 + segs[sg, 2]):
            q += 1
            _tile_row_out(m, q * tw * k_, tw, k_, c2, c4, c8, s, o)
            rows = min(4, ho - 4 * i)
            if mode == 0:
                for k in range(k_):
                    d, bk = out[n, k], bias[k]
                    for a in range(rows):
                        dk, ok = d[4 * i + a], o[a, :wo, k]
                        for j in range(wo):
                            dk[j] = ok[j] + bk
            elif mode == 2:
                for k in range(k_):
                    d, bk = out[n, k], bias[k]
                    for a in range(rows):
                        dk, ok = d[4 * i + a], o[a, :wo, k]
                        for j in range(wo):
                            v = ok[j] + bk
                            dk[j] = 0 if v < 0 else v
            else:
                for k in range(k_):
                    d, r, bk = out[n, k], a_out[n, k], bias[k]
                    for a in range(rows):
                        dk, rk, ok = d[4 * i + a], r[4 * i + a], o[a, :wo, k]
                        for j in range(wo):
                            dk[j] = ok[j] + bk
                        for j in range(wo):
                            v = dk[j]
                            rk[j] = 0 if v < 0 else v
    return out


@_jit
def _output_transform_times(m, segs, tw, cst, bias, out, a):
    """:func:`_output_transform` times ``a`` (shaped like ``out``): out = (A^T M A + bias) ⊙ a, an LRP
    backward's product with its input (:func:`relprop.kernels.cpu.conv2d.conv2d_relevance`).  Its own
    function, the skeleton of :func:`_output_transform` repeated: as a branch of that function's channel
    loop it made the plain write-out (mode 0) 1.9-5x slower (measured; the lanes write-out did the same)."""
    k_, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    c2, c4, c8 = cst[0], cst[1], cst[3]
    s = np.empty((6, 4, tw * k_), m.dtype)
    o = np.empty((4, 4 * tw, k_), m.dtype)
    q = -1
    for sg in range(segs.shape[0]):
        n, i0 = segs[sg, 0], segs[sg, 1]
        for i in range(i0, i0 + segs[sg, 2]):
            q += 1
            _tile_row_out(m, q * tw * k_, tw, k_, c2, c4, c8, s, o)
            rows = min(4, ho - 4 * i)
            for k in range(k_):  # channel by channel: its rows 4i .. 4i + 3 are one contiguous run of each plane
                d, f, bk = out[n, k], a[n, k], bias[k]
                for a_ in range(rows):
                    dk, fk, ok = d[4 * i + a_], f[4 * i + a_], o[a_, :wo, k]
                    for j in range(wo):
                        dk[j] = (ok[j] + bk) * fk[j]
    return out


@_jit
def _output_transform_pool(m, segs, tw, cst, bias, out):
    """:func:`_output_transform` for a conv + ReLU + 2x2 stride-2 max-pool triple: out (N, K, Ho//2, Wo//2)
    receives relu(bias + the maximum of each 2x2 window of the tile outputs A^T M A).  A 4x4 tile holds
    whole windows, so each tile row gives two pooled rows, the maxima taken over the channels (whole
    vectors) before the bias and the ReLU, which commute with them (rounding is monotone, so the values
    are the unfused ones; a zero's sign aside); only the pooled quarter goes back to NCHW.  Rows and
    columns past Ho//2, Wo//2 (the tiles' overhang, an odd last row or column) are dropped.  Returns
    False where a window holds a NaN or an infinity (the selects would drop a NaN): the caller then
    runs the three layers unfused."""
    k_, hp, wp = out.shape[1], out.shape[2], out.shape[3]
    c2, c4, c8 = cst[0], cst[1], cst[3]
    s = np.empty((6, 4, tw * k_), m.dtype)  # s[x, b] = (M A)[x, b], lanes (j, k)
    o = np.empty((4, 4 * tw, k_), m.dtype)  # one tile row of outputs, channels last
    pm = np.empty((2 * tw, k_), m.dtype)  # one pooled row, channels last
    finite = m[0, 0] * 0  # stays 0 unless a pooled value is NaN or infinite
    q = -1
    for sg in range(segs.shape[0]):
        n, i0 = segs[sg, 0], segs[sg, 1]
        for i in range(i0, i0 + segs[sg, 2]):
            q += 1
            _tile_row_out(m, q * tw * k_, tw, k_, c2, c4, c8, s, o)
            for a in range(min(2, hp - 2 * i)):
                r0, r1 = o[2 * a], o[2 * a + 1]
                for j in range(wp):
                    x0, x1, y0, y1, p = r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1], pm[j]
                    for k in range(k_):
                        m0, m1, m2, m3 = x0[k], x1[k], y0[k], y1[k]
                        p[k] = max4(m0, m1, m2, m3)
                        finite += (m0 + m1 + m2 + m3) * 0
                d = out[n, :, 2 * i + a]
                for k in range(k_):  # back to NCHW, adding the bias, with the ReLU
                    dk, bk = d[k], bias[k]
                    for j in range(wp):
                        v = pm[j, k] + bk
                        dk[j] = 0 if v < 0 else v
    return finite == finite


@_jit
def _output_transform_pool_switches(m, segs, tw, cst, bias, out, switches, wo, codes):
    """:func:`_output_transform_pool` with the pool's switches, as the unfused triple records them: each
    window's four values relu(bias + A^T M A) (the unfused epilogue's arithmetic, :func:`emit`), their
    first maximum in row-major order by the max-pool's tournament of selects, and its flat index into
    the (Ho, Wo) plane (``wo`` = Wo).  The ReLU makes ties (every negative z is 0), so the maximum is
    taken after it here.  Returns False where a window holds a NaN or an infinity.  Written back channel by
    channel, both pooled rows of a tile row at once (:func:`_output_transform`'s order): 1.1-1.15x at
    VGG-16's 224x224, the same at 8x8 to 32x32 (where the plain pool's write-out, a quarter of the
    bytes, gained nothing and keeps its order); the maxima and the switches each in a loop of their
    own (one store stream each, as :func:`emit`): 1.36x at 64 channels of 32x32, 1.08x at 128 of 16x16,
    1.12x at VGG-16's 64 of 224x224 (single thread, whole layers).

    ``codes`` (tile rows of the chunk, 2, Wo//2 rounded up to even, K; int8): each window's switch as well, as
    0..3 (right + 2 x below), channels last, for :func:`_output_transform_at_switches` on the same tiles."""
    k_, hp, wp = out.shape[1], out.shape[2], out.shape[3]
    c2, c4, c8 = cst[0], cst[1], cst[3]
    s = np.empty((6, 4, tw * k_), m.dtype)  # s[x, b] = (M A)[x, b], lanes (j, k)
    o = np.empty((4, 4 * tw, k_), m.dtype)  # one tile row of outputs, channels last
    pm = np.empty((2, 2 * tw, k_), m.dtype)  # the tile row's two pooled rows, channels last
    ps = np.empty((2, 2 * tw, k_), np.int64)  # their switches
    finite = m[0, 0] * 0  # stays 0 unless a pooled value is NaN or infinite
    q = -1
    for sg in range(segs.shape[0]):
        n, i0 = segs[sg, 0], segs[sg, 1]
        for i in range(i0, i0 + segs[sg, 2]):
            q += 1
            _tile_row_out(m, q * tw * k_, tw, k_, c2, c4, c8, s, o)
            rows = min(2, hp - 2 * i)
            for a in range(rows):
                r0, r1 = o[2 * a], o[2 * a + 1]
                base = (4 * i + 2 * a) * wo  # pooled row 2i + a: output rows 4i + 2a and 4i + 2a + 1
                for j in range(wp):
                    x0, x1, y0, y1, p, sj = r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1], pm[a, j], ps[a, j]
                    cj = codes[q, a, j]
                    at = base + 2 * j
                    for k in range(k_):
                        z0, z1, z2, z3 = x0[k], x1[k], y0[k], y1[k]
                        finite += (z0 + z1 + z2 + z3) * 0
                        bk = bias[k]
                        m0, m1, m2, m3 = relu_window(z0, z1, z2, z3, bk)
                        p[k], c = first_max4(m0, m1, m2, m3, 2)  # c = right + 2 * below
                        cj[k] = c
                        sj[k] = at + (c & 1) + (c >> 1) * wo
            for k in range(k_):  # back to NCHW channel by channel (see _output_transform)
                d = out[n, k]
                for a in range(rows):
                    dk, pa = d[2 * i + a], pm[a]
                    for j in range(wp):
                        dk[j] = pa[j, k]
            for k in range(k_):  # the switches in a loop of their own: 1.1-1.35x (see the doc)
                sd = switches[n, k]
                for a in range(rows):
                    sk, sa = sd[2 * i + a], ps[a]
                    for j in range(wp):
                        sk[j] = sa[j, k]
    return finite == finite


@_jit
def _output_transform_at_switches(m, segs, tw, cst, bias, out, codes):
    """:func:`_output_transform` (mode 0) at the 2x2 max-pool's switches only: out (N, K, Ho//2, Wo//2)
    receives A^T M A + bias at each window's switch, given as ``codes`` (0..3: right + 2 x below, channels
    last) by :func:`_output_transform_pool_switches` for the same tiles.  An LRP rule's modified forward
    z' = W'a + b' where only the switches carry relevance (a max-pool above it): the same bits as the
    full-size write-out there, a quarter of its writes.  The window's four values are selected by the code
    over whole vectors of channels, then go back to NCHW as the pooled write-out's maxima do: read from the
    NCHW switches instead (int64, a gather per value), the write-out cost 0.90 ns per transformed value
    against the pooled forward's 0.48 on VGG-16 b4; this way 0.50 (CIFAR-VGG b64: 0.65 -> 0.42; ε+flat
    1.01x on both, back to back).
    Its own function, the skeleton of :func:`_output_transform` repeated, for the reason
    :func:`_output_transform_times` gives."""
    k_, hp, wp = out.shape[1], out.shape[2], out.shape[3]
    c2, c4, c8 = cst[0], cst[1], cst[3]
    s = np.empty((6, 4, tw * k_), m.dtype)  # s[x, b] = (M A)[x, b], lanes (j, k)
    o = np.empty((4, 4 * tw, k_), m.dtype)  # one tile row of outputs, channels last
    pm = np.empty((2, 2 * tw, k_), m.dtype)  # the tile row's two pooled rows, channels last
    q = -1
    for sg in range(segs.shape[0]):
        n, i0 = segs[sg, 0], segs[sg, 1]
        for i in range(i0, i0 + segs[sg, 2]):
            q += 1
            _tile_row_out(m, q * tw * k_, tw, k_, c2, c4, c8, s, o)
            rows = min(2, hp - 2 * i)
            for a in range(rows):
                r0, r1 = o[2 * a], o[2 * a + 1]
                for j in range(wp):
                    x0, x1, y0, y1, p, cj = r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1], pm[a, j], codes[q, a, j]
                    for k in range(k_):
                        c = cj[k]
                        top = x1[k] if c == 1 else x0[k]
                        bottom = y1[k] if c == 3 else y0[k]
                        p[k] = (bottom if c >= 2 else top) + bias[k]
            for k in range(k_):  # back to NCHW channel by channel (see _output_transform)
                d = out[n, k]
                for a in range(rows):
                    dk, pa = d[2 * i + a], pm[a]
                    for j in range(wp):
                        dk[j] = pa[j, k]
    return out


# ============================================================================================
# The convolution
# ============================================================================================
def winograd_applies(x_shape, w_shape, stride, padding, dilation):
    """Does :func:`conv3x3_winograd` compute this convolution, and is it worth it here?

    3x3, stride 1, dilation 1, padding 0..2 (so that the input-VJP, padding 2 - p, is one too),
    ``_config.WINOGRAD`` on, at least ``_config.WINOGRAD_MIN_CHANNELS`` input and output channels,
    and tiles x C x K at least ``_config.WINOGRAD_MIN_WORK`` (tiles: 4x4 blocks of outputs)."""
    if not _config.WINOGRAD:
        return False
    k_, c_, kh, kw = w_shape
    if (kh, kw) != (3, 3) or tuple(stride) != (1, 1) or tuple(dilation) != (1, 1):
        return False
    if not all(0 <= p <= 2 for p in padding) or min(k_, c_) < _config.WINOGRAD_MIN_CHANNELS:
        return False
    n_, _, h_, w_ = x_shape
    ho, wo = h_ + 2 * padding[0] - 2, w_ + 2 * padding[1] - 2
    tiles = n_ * -(-ho // 4) * -(-wo // 4)
    return ho >= 1 and wo >= 1 and tiles * c_ * k_ >= _config.WINOGRAD_MIN_WORK


#: T[x*6 + y, a*3 + b] = G[x, a] G[y, b]: the filter transform as one matrix on the 9 taps
_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
_T = np.einsum("xa,yb->xyab", _G, _G).reshape(36, 9)


def filter_transform(w):
    """U (36, C, K), U[x*6 + y, c, k] = (G w[k, c] G^T)[x, y]: one GEMM, T (36 x 9) @ w (9 x C*K)."""
    k_, c_ = w.shape[:2]
    wck = np.ascontiguousarray(w.transpose(1, 0, 2, 3)).reshape(c_ * k_, 9)
    return (_T.astype(w.dtype) @ wck.T).reshape(36, c_, k_)


def transformed_filters(w, flipped=False):
    """U of the convolution with weights ``w`` (K, C, 3, 3) or, with ``flipped``, of its input-VJP
    (the weights w[k, c, 2-a, 2-b] transposed to (C, K, 3, 3)).

    Kept between calls while ``w`` is unchanged (:func:`relprop.kernels.cpu._derived.derived`, up to
    ``_config.WINOGRAD_CACHE_BYTES``): the check reads the weights and their copy, far less than forming
    U (36 values per 9 weights)."""
    oriented = w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1] if flipped else w
    return derived(w, ("winograd", bool(flipped)), lambda: filter_transform(oriented))


_LOCAL = threading.local()


def _scratch(slot, size, dtype):
    """A per-thread scratch buffer of at least ``size`` elements, kept between calls: a fresh
    allocation of this size is a fresh mapping whose pages fault in on first touch (measured in
    an LRP sweep, where the live activations keep the allocator from reusing freed memory:
    the 64-channel CIFAR-VGG VJP took 28 ms with fresh buffers, 22 ms with kept ones)."""
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None:
        bufs = _LOCAL.bufs = {}
    key = (slot, np.dtype(dtype).str)
    buf = bufs.get(key)
    if buf is None or buf.size < size:
        buf = bufs[key] = np.empty(size, dtype)
    return buf[:size]


def _segments(n_, th, max_rows):
    """Chunks of tile rows: (segments (S, 3) of (sample, first tile row, rows), per chunk).

    Whole samples when one fits in ``max_rows`` tile rows (several per chunk), else bands of
    ``max_rows`` tile rows of one sample."""
    if th <= max_rows:
        return np.array([(n, 0, th) for n in range(n_)], dtype=np.int64).reshape(-1, 3), max(1, max_rows // th)
    return np.array([(n, i0, min(max_rows, th - i0)) for n in range(n_) for i0 in range(0, th, max_rows)],
                    dtype=np.int64), 1


def conv3x3_winograd(x, u, b, padding, out, gemm_batch, a_out=None, mode=0, also=(), divide=None, unpool=None):
    """out = conv2d(x, w, stride 1, padding) + b by Winograd F(4x4, 3x3) (see the module doc), for
    the filters' transform ``u`` = :func:`transformed_filters` of w.

    ``gemm_batch`` is the batched BLAS call of :mod:`relprop.kernels.cpu.conv2d` (``_gemm_batch``: the
    36 products of a chunk in one compiled loop, row-major, on windows of flat buffers).  Shapes: x (N, C, H, W), u (36, C, K), b (K,), out (N, K, Ho, Wo).  ``a_out``, ``mode``:
    the fused ReLU of :func:`relprop.kernels.cpu.conv2d.conv2d_forward` (:func:`emit`; mode 0: none).
    Mode 3: ``out`` is (N, K, Ho//2, Wo//2) and receives the 2x2 max-pool of relu(z)
    (:func:`_output_transform_pool`); returns None instead if a pooled window held a NaN or an infinity.
    Mode 4: mode 3 with the pool's switches into ``a_out`` (int64, shaped like ``out``;
    :func:`_output_transform_pool_switches`).  Mode 5: out = (conv + b) ⊙ ``a_out`` (read).
    ``also``: ``(u', b', out')`` other filter sets on the same transformed input; with mode 4, an out' shaped
    like ``out`` receives its convolution at the pool's switches only (:func:`_output_transform_at_switches`).
    ``divide`` = (z, ε): the convolution of x / stab(z) (z shaped like x), divided in the input transform.
    The two together are an LRP backward, a ⊙ Wᵀ(R / stab(z)), without the full-size quotient or product
    (:func:`relprop.kernels.cpu.conv2d.conv2d_relevance`).  ``unpool`` = (switches, (H, W)): the
    convolution of the 2x2 stride-2 max-pool's unpooling of x (x and switches pooled-side, (H, W) the
    unpooled size), unpooled in the input transform (a backward below a max-pool, never written whole).

    Two schedules, both with every thread's BLAS held to one thread:

    * by chunks of tiles (enough tiles for two chunks per thread, or one thread): each thread
      transforms, multiplies and transforms back whole chunks in its own scratch;
    * few tiles (VGG-16 at batch 4 past its third block: 64-196 tiles): the whole problem is one
      chunk, in three phases over shared buffers: input transform by tile rows, the 36 GEMMs by
      blocks of output channels (each thread reads its columns of U once: U is 38 MB at 512
      channels, so splitting the tiles instead would read it once per thread), output transform
      by tile rows.  Before, a single chunk ran with BLAS's own threads, whose workers then kept
      spinning and took a core from the next convolution (33 ms instead of 18 ms).  Below
      ``_config.WINOGRAD_FEW_TILES_MIN_MACS`` the phases' hand-offs to the threads cost more than
      they save: one chunk on the calling thread instead.

    Below ``_config.WINOGRAD_THREADS_MIN_MACS`` (CIFAR-VGG's layers at batch 1) every chunk runs on
    the calling thread.
    """
    ph, pw = padding
    n_, c_ = x.shape[:2]
    sw, (h_, w_) = (_NO_SWITCHES, x.shape[2:]) if unpool is None else unpool
    k_, ho, wo = out.shape[1], h_ + 2 * ph - 2, w_ + 2 * pw - 2
    zd, eps = (_NO_DIVIDE[x.dtype], x.dtype.type(0)) if divide is None else \
        (divide[0], np.array([divide[1]]).astype(x.dtype)[0])  # ε in the data's dtype, as stabilized_divide's
    source = (zd, eps, sw, int(h_), int(w_))  # what the input transform reads besides x
    th, tw = -(-ho // 4), -(-wo // 4)
    cst = np.array([2, 4, 5, 8], x.dtype)
    # chunks of about WINOGRAD_CHUNK_TILES tiles: the 36 GEMMs have that many rows, and a chunk's
    # transformed tiles V and products M stay in cache between the transforms and the GEMMs; where
    # U itself outgrows the cache it is re-read for every chunk, so fewer, larger chunks
    # (WINOGRAD_CHUNK_TILES_WIDE); with several threads, at least two chunks each where that keeps
    # a quarter of that size
    tiles = _config.WINOGRAD_CHUNK_TILES if u.nbytes <= _config.WINOGRAD_WIDE_FILTER_BYTES \
        else _config.WINOGRAD_CHUNK_TILES_WIDE
    rows_total = n_ * th
    max_rows = max(1, tiles // tw)
    # the calling thread alone below WINOGRAD_THREADS_MIN_MACS (a hand-off costs more than it saves)
    macs = 36 * rows_total * tw * c_ * k_ * (1 + len(also))
    threads = conv_threads() if macs >= _config.WINOGRAD_THREADS_MIN_MACS else 1
    if threads > 1:
        max_rows = min(max_rows, max(-(-rows_total // (2 * threads)), -(-tiles // (4 * tw))))
    segs, per_chunk = _segments(n_, th, max_rows)
    a_out = out if a_out is None else (a_out, wo) if mode == 4 else a_out
    # an ``also`` output shaped like the pooled ``out`` (mode 4) is written at the switches only (mode 6)
    parts = [(u, b, out, a_out, mode)] + [(u2, b2, out2, a_out, 6) if mode == 4 and out2.shape == out.shape
                                          else (u2, b2, out2, out2, 0) for u2, b2, out2 in also]
    finite = []  # mode 3: per chunk, were its pooled windows finite?
    # mode 4: each window's switch as a code 0..3 per (tile row, pooled row, pooled column, channel), read back
    # by the mode-6 write-outs of the same tiles (2 * tw pooled columns per tile row)
    code_row = 2 * 2 * tw * k_ if mode == 4 else 0
    if threads > 1 and -(-len(segs) // per_chunk) < threads and macs >= _config.WINOGRAD_FEW_TILES_MIN_MACS:
        _few_tiles(x, (ph, pw, th, tw), cst, gemm_batch, threads, parts, finite, source, code_row)
        return out if all(finite) else None
    rows_max = int(max(segs[s:s + per_chunk, 2].sum() for s in range(0, len(segs), per_chunk)))

    def scratch():
        return (_scratch(0, 36 * rows_max * tw * c_, x.dtype), _scratch(1, 36 * rows_max * tw * k_, x.dtype),
                _scratch(4, rows_max * code_row, np.int8))

    def work(s0, count, buffers):
        vf, mf, cf = buffers
        chunk = segs[s0:s0 + count]
        rows = int(chunk[:, 2].sum())
        t = rows * tw
        v = _input_transform(x, chunk, ph, pw, tw, cst, vf[:36 * t * c_].reshape(36, t * c_), *source)
        codes = cf[:rows * code_row].reshape(rows, 2, 2 * tw, -1) if code_row else None
        # M[xi] (t x K) = V[xi] (t x C) @ U[xi] (C x K), xi < 36
        for u_, b_, out_, a_, mode_ in parts:  # V, while in cache, against every filter set
            gemm_batch(36, t, k_, c_, v, 0, t * c_, c_, u_, 0, c_ * k_, k_, mf, 0, t * k_, k_)
            _transform_out(mf[:36 * t * k_].reshape(36, t * k_), chunk, tw, cst, b_, out_, a_, mode_, finite, codes)

    run_chunks(len(segs), per_chunk, scratch, work, threads)
    return out if all(finite) else None


def _transform_out(m, segs, tw, cst, bias, out, a_out, mode, finite, codes=None):
    """The output transform of ``mode`` (3: with the max-pool, its finiteness appended to ``finite``; 4: and
    the switches, ``a_out`` = (switches, Wo), with their ``codes`` for the tiles' mode 6; 5: times ``a_out``;
    6: at the switches of the mode-4 write-out of the same tiles, its ``codes``)."""
    if mode == 5:
        _output_transform_times(m, segs, tw, cst, bias, out, a_out)
    elif mode == 3:
        finite.append(_output_transform_pool(m, segs, tw, cst, bias, out))
    elif mode == 4:
        finite.append(_output_transform_pool_switches(m, segs, tw, cst, bias, out, a_out[0], a_out[1], codes))
    elif mode == 6:
        _output_transform_at_switches(m, segs, tw, cst, bias, out, codes)
    else:
        _output_transform(m, segs, tw, cst, bias, out, a_out, mode)


def _few_tiles(x, tiling, cst, gemm_batch, threads, parts, finite, source, code_row):
    """:func:`conv3x3_winograd` as one chunk in three phases shared out to ``threads`` threads;
    ``tiling`` = (ph, pw, tile rows, tile columns), ``source`` what the input transform reads besides x,
    ``code_row`` the switch codes' size per tile row (0: none)."""
    ph, pw, th, tw = tiling
    n_, c_, k_ = x.shape[0], x.shape[1], parts[0][2].shape[1]
    rows = np.array([(n, i, 1) for n in range(n_) for i in range(th)], dtype=np.int64)  # one tile row each
    t = len(rows) * tw
    # shared between the threads, so not the per-thread scratch (slots 2, 3 of the calling thread)
    v = _scratch(2, 36 * t * c_, x.dtype).reshape(36, t * c_)
    m = _scratch(3, 36 * t * k_, x.dtype).reshape(36, t * k_)
    codes = _scratch(5, len(rows) * code_row, np.int8).reshape(len(rows), 2, 2 * tw, -1) if code_row else None
    per_rows = -(-len(rows) // threads)

    def transform_in(r0, count, _):
        _input_transform(x, rows[r0:r0 + count], ph, pw, tw, cst, v[:, r0 * tw * c_:(r0 + count) * tw * c_], *source)

    run_chunks(len(rows), per_rows, lambda: None, transform_in)
    per_k = -(-k_ // threads)
    for u, b, out, a_out, mode in parts:
        def multiply(k0, count, _, u=u):  # M[xi][:, k0:k0+count] = V[xi] @ U[xi][:, k0:k0+count]
            gemm_batch(36, t, count, c_, v, 0, t * c_, c_, u, k0, c_ * k_, k_, m, k0, t * k_, k_)

        def transform_out(r0, count, _, b=b, out=out, a_out=a_out, mode=mode):
            _transform_out(m[:, r0 * tw * k_:(r0 + count) * tw * k_], rows[r0:r0 + count], tw, cst, b, out,
                           a_out, mode, finite, None if codes is None else codes[r0:r0 + count])

        run_chunks(k_, -(-per_k // 16) * 16, lambda: None, multiply)  # blocks of whole cache lines of U
        run_chunks(len(rows), per_rows, lambda: None, transform_out)
    return parts[0][2]
