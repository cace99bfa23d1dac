"""Numba CPU twins of :mod:`relprop.kernels.reference.pool2d` (same names, signatures, math).

Layout NCHW; geometry arguments are pairs ``(kh, kw)``, ``(sh, sw)``, ``(ph, pw)``.
Every kernel runs ``prange`` over the N·C planes: one thread owns a whole output plane,
so each output element has exactly one writer, no atomics are needed, and the summation
order is fixed (results are bitwise identical run to run).

Pool padding never exceeds half the window (checked at the public boundary), so every
window holds at least one real input; the kernels loop over the window clipped to the
input plane instead of materialising a padded copy.
"""
import numpy as np
from numba import njit, prange

from ... import _config

__all__ = ["maxpool2d_forward", "maxunpool2d", "avgpool2d_forward", "avgpool2d_vjp"]


@njit(parallel=True, cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def maxpool2d_forward(x, kernel, stride, padding, out, switches):
    """Same math as :func:`relprop.kernels.reference.pool2d.maxpool2d_forward`.

    Parallel over (n, c) planes.  Each window is scanned in row-major order over its real
    (unpadded) inputs with a strict ``>``, so ties go to the first maximum, as ``argmax``;
    padding (-inf) can never win.  A NaN wins its window (the first NaN), as in NumPy.
    Switches are flat indices ``h * W + w`` into the unpadded input plane.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n_samples, n_channels, h, wd = x.shape
    ho, wo = out.shape[2], out.shape[3]
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
                best = x[n, c, r0, c0]
                best_k = r0 * wd + c0
                for a in range(r0, r1):
                    for b in range(c0, c1):
                        v = x[n, c, a, b]
                        # strict > keeps the first maximum; a NaN beats any number once
                        if v > best or (v != v and best == best):
                            best = v
                            best_k = a * wd + b
                out[n, c, i, j] = best
                switches[n, c, i, j] = best_k
    return out, switches


@njit(parallel=True, cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def maxunpool2d(g, switches, out):
    """Same math as :func:`relprop.kernels.reference.pool2d.maxunpool2d`.

    Parallel over (n, c) planes; within a plane one thread zeroes its output plane and adds
    ``g`` at the switch positions serially in row-major window order (the order of
    ``np.add.at`` in the reference), so collisions from overlapping windows sum
    deterministically without atomics.  The switches alone do not tell which windows cover
    an input, hence a per-plane scatter rather than a gather: still one writer per plane.
    """
    n_samples, n_channels, h, wd = out.shape
    ho, wo = g.shape[2], g.shape[3]
    for p in prange(n_samples * n_channels):
        n, c = p // n_channels, p % n_channels
        for a in range(h):
            for b in range(wd):
                out[n, c, a, b] = 0
        for i in range(ho):
            for j in range(wo):
                k = switches[n, c, i, j]
                out[n, c, k // wd, k % wd] += g[n, c, i, j]
    return out


@njit(parallel=True, cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
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


@njit(parallel=True, cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
def avgpool2d_vjp(g, kernel, stride, padding, out):
    """Same math as :func:`relprop.kernels.reference.pool2d.avgpool2d_vjp`.

    A gather, parallel over (n, c) planes: input position (a, b) sits at (a + ph, b + pw) in
    the padded plane and is covered by the windows i with i·sh <= a + ph < i·sh + kh (likewise
    j); it sums their ``g`` in row-major window order and divides by kh·kw once.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n_samples, n_channels, h, wd = out.shape
    ho, wo = g.shape[2], g.shape[3]
    scalars = np.array([0, kh * kw]).astype(out.dtype)
    zero, count = scalars[0], scalars[1]
    for p in prange(n_samples * n_channels):
        n, c = p // n_channels, p % n_channels
        for a in range(h):
            ap = a + ph
            i0 = max(ap - kh + sh, 0) // sh  # ceil((ap - kh + 1) / sh), clipped at 0
            i1 = min(ap // sh + 1, ho)
            for b in range(wd):
                bp = b + pw
                j0 = max(bp - kw + sw, 0) // sw
                j1 = min(bp // sw + 1, wo)
                acc = zero
                for i in range(i0, i1):
                    for j in range(j0, j1):
                        acc += g[n, c, i, j]
                out[n, c, a, b] = acc / count
    return out
