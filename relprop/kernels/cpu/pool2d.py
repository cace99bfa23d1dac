"""Numba CPU twins of :mod:`relprop.kernels.reference.pool2d` (same names, signatures, math).

Layout NCHW; geometry arguments are pairs ``(kh, kw)``, ``(sh, sw)``, ``(ph, pw)``.
Every kernel runs ``prange`` over the N·C planes: one thread owns a whole output plane,
so each output element has exactly one writer, no atomics are needed, and the summation
order is fixed (results are bitwise identical run to run).  Max and average pooling
gather over each window; unpooling and the average-pool VJP scatter serially within the
plane a thread owns, which is just as race-free (the switches alone do not say which
windows cover an input, and for the VJP the scatter measured faster than the gather).

Pool padding never exceeds half the window (checked at the public boundary), so every
window holds at least one real input; the kernels loop over the window clipped to the
input plane instead of materialising a padded copy.

Each kernel is compiled twice, parallel and serial (:func:`relprop.kernels.cpu._threads.parallel_above`):
arrays below ``_config.PARALLEL_MIN_ELEMENTS`` elements take the serial twin (a parallel loop
waits for all its threads, which on a shared machine costs more than a small pass); both
give the same bits.
"""
import numpy as np
from numba import njit, prange

from ... import _config
from ._threads import parallel_above

__all__ = ["maxpool2d_forward", "maxpool2d_values", "maxunpool2d", "gather_at_switches", "avgpool2d_forward",
           "avgpool2d_vjp"]


@njit(inline="always", cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def max4(m0, m1, m2, m3):
    """The maximum of a 2x2 window (m0, m1 its top row, m2, m3 its bottom row) by selects, ties to the
    earlier element: each row's first maximum, then the bottom one only if strictly larger.  A NaN may
    be dropped: callers check the window's finiteness beside it."""
    ma = m1 if m1 > m0 else m0
    mb = m3 if m3 > m2 else m2
    return mb if mb > ma else ma


@njit(inline="always", cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def first_max4(m0, m1, m2, m3, wd):
    """A 2x2 window's first maximum in row-major order and its offset from the top-left element (0, 1,
    ``wd``, ``wd`` + 1 for rows ``wd`` apart), by a tournament of selects: each row's winner (the second
    element only if strictly larger), then the bottom one only if strictly larger.  The switch rule of
    every 2x2 stride-2 max-pool here (the pool rows, the fused write-outs)."""
    in_a = m1 > m0
    ma = m1 if in_a else m0
    in_b = m3 > m2
    mb = m3 if in_b else m2
    bottom = mb > ma
    return (mb if bottom else ma), ((wd + in_b) if bottom else (0 + in_a))


@njit(inline="always", cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def relu_window(z0, z1, z2, z3, bk):
    """relu(z + bk) of a window's four values, the ReLU's own arithmetic (0 if v < 0 else v: NaN passes)."""
    v0, v1, v2, v3 = z0 + bk, z1 + bk, z2 + bk, z3 + bk
    return (0 if v0 < 0 else v0), (0 if v1 < 0 else v1), (0 if v2 < 0 else v2), (0 if v3 < 0 else v3)


@njit(cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def _has_nan(xp):
    """True when the 2-D plane ``xp`` holds a NaN (an OR reduction the compiler vectorises)."""
    nan = False
    for a in range(xp.shape[0]):
        for b in range(xp.shape[1]):
            nan |= xp[a, b] != xp[a, b]
    return nan


@njit(cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def _maxpool_plane(xp, kernel, stride, padding, op, sp, nan_aware):
    """Max pooling of one (H, W) plane into op/sp (Ho, Wo): the first maximum of each window."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    h, wd = xp.shape
    ho, wo = op.shape
    for i in range(ho):
        r0 = i * sh - ph
        r1 = min(r0 + kh, h)
        r0 = max(r0, 0)
        for j in range(wo):
            c0 = j * sw - pw
            c1 = min(c0 + kw, wd)
            c0 = max(c0, 0)
            best = xp[r0, c0]
            best_k = r0 * wd + c0
            for a in range(r0, r1):
                for b in range(c0, c1):
                    v = xp[a, b]
                    # strict > keeps the first maximum; with NaN about, the first NaN wins (argmax)
                    if v > best or (nan_aware and v != v and best == best):
                        best = v
                        best_k = a * wd + b
            op[i, j] = best
            sp[i, j] = best_k


@njit(cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def _maxpool_plane_2x2(xp, op, sp):
    """The common 2×2, stride-2, unpadded window unrolled: the same row-major strict-> scan as
    :func:`_maxpool_plane` (first maximum wins), without the clipping and loop overhead."""
    wd = xp.shape[1]
    ho, wo = op.shape
    for i in range(ho):
        r = 2 * i
        for j in range(wo):
            c = 2 * j
            best = xp[r, c]
            best_k = r * wd + c
            v = xp[r, c + 1]
            if v > best:
                best, best_k = v, r * wd + c + 1
            v = xp[r + 1, c]
            if v > best:
                best, best_k = v, (r + 1) * wd + c
            v = xp[r + 1, c + 1]
            if v > best:
                best, best_k = v, (r + 1) * wd + c + 1
            op[i, j] = best
            sp[i, j] = best_k


@parallel_above("maxpool2d_forward")
def _maxpool_2x2_rows(x2, out2, sw2, ho, wd, switches=True):
    """The 2x2 stride-2 unpadded max-pool of an input with even H and W, by output rows: ``x2``
    (Q, 2W) is x (N, C, H, W) with Q = N*C*Ho rows, each its two input rows; prange over the rows.
    Branch-free, one pass: a tournament of selects, each pair's first maximum (strict ``>``, ties to
    the earlier element), then the first of the two winners, so the switch is the window's first
    maximum in row-major order (``switches=False``: the maxima only, ``sw2`` untouched).  Returns the
    number of rows whose inputs hold a NaN or an infinity (x*0 is then NaN): the caller redoes those
    pools with the NaN-aware scan.  (The switch used to be a second pass, selecting in reverse order
    the last input equal to the maximum: 2-3x slower on LeNet-5's and CIFAR-VGG's pools.)"""
    bad = 0
    wo = out2.shape[1]
    for q in prange(x2.shape[0]):
        r0, r1, o, s = x2[q, :wd], x2[q, wd:], out2[q], sw2[q]
        finite = r0[0] * 0  # stays 0 unless an input is NaN or infinite
        if switches:
            base = (q % ho) * 2 * wd
            for j in range(wo):
                m0, m1, m2, m3 = r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]
                o[j], off = first_max4(m0, m1, m2, m3, wd)
                s[j] = base + 2 * j + off
                finite += (m0 + m1 + m2 + m3) * 0
        else:
            for j in range(wo):
                m0, m1, m2, m3 = r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]
                o[j] = max4(m0, m1, m2, m3)
                finite += (m0 + m1 + m2 + m3) * 0
        bad += finite != finite
    return bad


def maxpool2d_forward(x, kernel, stride, padding, out, switches):
    """Same math as :func:`relprop.kernels.reference.pool2d.maxpool2d_forward`.

    The common 2x2 stride-2 unpadded pool of a C-contiguous input with even H and W runs as
    rows (:func:`_maxpool_2x2_rows`, branch-free, maxima and switches in one pass: 1.8-2.4x the
    plane scan's branches on LeNet's and CIFAR-VGG's pools, bench/test_bench_kernels.py); the rest, and
    any input holding a NaN or an infinity, as planes (:func:`_maxpool_planes`)."""
    n_, c_, h_, w_ = x.shape
    if tuple(kernel) == (2, 2) and tuple(stride) == (2, 2) and tuple(padding) == (0, 0) and h_ % 2 == 0 \
            and w_ % 2 == 0 and x.size and x.flags.c_contiguous and out.flags.c_contiguous \
            and switches.flags.c_contiguous:
        q_ = n_ * c_ * (h_ // 2)
        bad = _maxpool_2x2_rows(x.reshape(q_, 2 * w_), out.reshape(q_, w_ // 2), switches.reshape(q_, w_ // 2),
                                h_ // 2, w_)
        if bad == 0:
            return out, switches
    return _maxpool_planes(x, kernel, stride, padding, out, switches)


def maxpool2d_values(x, kernel, stride, padding, out):
    """The max-pool's output without its switches, for a forward pass that keeps no record
    (``Graph.trace(keep=False)``): the 2x2 stride-2 row kernel without its switch pass (3-5x
    faster on LeNet-5's and CIFAR-VGG's pools); any other geometry, or a row holding a NaN or an
    infinity, through :func:`maxpool2d_forward` (the same maxima)."""
    n_, c_, h_, w_ = x.shape
    if tuple(kernel) == (2, 2) and tuple(stride) == (2, 2) and tuple(padding) == (0, 0) and h_ % 2 == 0 \
            and w_ % 2 == 0 and x.size and x.flags.c_contiguous and out.flags.c_contiguous:
        q_ = n_ * c_ * (h_ // 2)
        no_switches = np.empty((0, w_ // 2), np.int64)  # the kernel's switch argument, never written here
        if _maxpool_2x2_rows(x.reshape(q_, 2 * w_), out.reshape(q_, w_ // 2), no_switches, h_ // 2, w_, False) == 0:
            return out
    return maxpool2d_forward(x, kernel, stride, padding, out, np.empty(out.shape, np.int64))[0]


@parallel_above("maxpool2d_forward")
def _maxpool_planes(x, kernel, stride, padding, out, switches):
    """The max-pool by planes (any geometry).

    Parallel over (n, c) planes, one thread per plane.  Each window is scanned in row-major
    order over its real (unpadded) inputs with a strict ``>``, so ties go to the first
    maximum, as ``argmax``; padding (-inf) can never win.  Switches are flat indices
    ``h * W + w`` into the unpadded input plane.  A plane holding a NaN (only possible with
    ``check_finite=False``) takes a NaN-aware scan in which the first NaN of a window wins,
    as in NumPy; the plain scan is about twice as fast, hence the split.
    """
    n_channels = x.shape[1]
    two = kernel[0] == 2 and kernel[1] == 2 and stride[0] == 2 and stride[1] == 2 and padding[0] == 0 \
        and padding[1] == 0
    for p in prange(x.shape[0] * n_channels):
        n, c = p // n_channels, p % n_channels
        xp = x[n, c]
        nan = _has_nan(xp)
        if two and not nan:
            _maxpool_plane_2x2(xp, out[n, c], switches[n, c])
        else:
            _maxpool_plane(xp, kernel, stride, padding, out[n, c], switches[n, c], nan)
    return out, switches


@parallel_above()
def maxunpool2d(g, switches, out):
    """Same math as :func:`relprop.kernels.reference.pool2d.maxunpool2d`.

    Parallel over (n, c) planes; one thread owns an output plane, zeroes it and adds ``g``
    at the switch positions serially in row-major window order (the order of ``np.add.at``
    in the reference), so collisions from overlapping windows sum deterministically without
    atomics.  The switches alone do not say which windows cover an input, hence this
    per-plane scatter rather than a gather.
    """
    n_samples, n_channels, h, wd = out.shape
    n_planes = n_samples * n_channels
    # flat planes: a switch is already the flat index into its (H*W) plane
    gf = g.reshape((n_planes, g.shape[2] * g.shape[3]))
    sf = switches.reshape(gf.shape)
    of = out.reshape((n_planes, h * wd))
    for p in prange(n_planes):
        of[p, :] = 0
        for q in range(gf.shape[1]):
            of[p, sf[p, q]] += gf[p, q]
    return out


@parallel_above()
def gather_at_switches(z, switches, out):
    """Same math as :func:`relprop.kernels.reference.pool2d.gather_at_switches`, parallel over (n, c)
    planes."""
    n_planes = out.shape[0] * out.shape[1]
    zf = z.reshape((n_planes, z.shape[2] * z.shape[3]))
    sf = switches.reshape((n_planes, out.shape[2] * out.shape[3]))
    of = out.reshape(sf.shape)
    for p in prange(n_planes):
        for q in range(sf.shape[1]):
            of[p, q] = zf[p, sf[p, q]]
    return out


@parallel_above()
def avgpool2d_forward(x, kernel, stride, padding, out):
    """Same math as :func:`relprop.kernels.reference.pool2d.avgpool2d_forward`.

    Parallel over (n, c) planes; each output sums the real inputs of its window (padding is
    zero) in row-major order and divides by kh·kw (padding counted).
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n_samples, n_channels, h, wd = x.shape
    ho, wo = out.shape[2], out.shape[3]
    # scalars typed like the arrays: accumulate and divide in float32 for float32, as the reference
    scalars = np.array([0, kh * kw]).astype(out.dtype)
    zero, count = scalars[0], scalars[1]
    for p in prange(n_samples * n_channels):
        n, c = p // n_channels, p % n_channels
        for i in range(ho):
            r0 = i * sh - ph
            r1 = min(r0 + kh, h)
            r0 = max(r0, 0)
            for j in range(wo):
                c0 = j * sw - pw
                c1 = min(c0 + kw, wd)
                c0 = max(c0, 0)
                acc = zero
                for a in range(r0, r1):
                    for b in range(c0, c1):
                        acc += x[n, c, a, b]
                out[n, c, i, j] = acc / count
    return out


@parallel_above()
def avgpool2d_vjp(g, kernel, stride, padding, out):
    """Same math as :func:`relprop.kernels.reference.pool2d.avgpool2d_vjp`.

    Parallel over (n, c) planes; one thread owns an output plane, zeroes it and lets every
    window add g/(kh·kw) to its real inputs, windows in row-major order (the reference's
    order, so overlaps sum the same way).  This per-plane scatter is race-free and
    deterministic, and measured 2-3x faster than the per-input gather for stride >= 2.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n_samples, n_channels, h, wd = out.shape
    ho, wo = g.shape[2], g.shape[3]
    count = np.array([kh * kw]).astype(out.dtype)[0]  # divide in the arrays' dtype, as the reference
    for p in prange(n_samples * n_channels):
        n, c = p // n_channels, p % n_channels
        gp, op = g[n, c], out[n, c]
        op[:] = 0
        for i in range(ho):
            r0 = i * sh - ph
            r1 = min(r0 + kh, h)
            r0 = max(r0, 0)
            for j in range(wo):
                c0 = j * sw - pw
                c1 = min(c0 + kw, wd)
                c0 = max(c0, 0)
                v = gp[i, j] / count
                for a in range(r0, r1):
                    for b in range(c0, c1):
                        op[a, b] += v
    return out
