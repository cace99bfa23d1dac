"""Numba CUDA twins of :mod:`relprop.kernels.reference.pool2d` (same names, signatures, math).

Layout NCHW; the launchers view the arrays as (N·C, H, W) planes.  Every kernel is a
gather with one thread per output element, so each output has exactly one writer and a
fixed summation order.  Pool padding never exceeds half the window (checked at the
public boundary), so every window holds at least one real input; windows are clipped
to the input plane instead of padding a copy.
"""
import numpy as np
from numba import cuda

from ... import _config
from ._launch import empty, launch, scalar

__all__ = ["maxpool2d_forward", "maxpool2d_values", "maxunpool2d", "gather_at_switches", "avgpool2d_forward",
           "avgpool2d_vjp"]

_NO_WINDOW = np.iinfo(np.int32).max


@cuda.jit(cache=_config.NUMBA_CACHE)
def _maxpool2d_forward_kernel(x, kh, kw, sh, sw, ph, pw, out, switches):
    # x (P, H, W); out, switches (P, Ho, Wo); one thread per output window
    h, wd = x.shape[1], x.shape[2]
    ho, wo = out.shape[1], out.shape[2]
    for k in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        j = k % wo
        i = (k // wo) % ho
        p = k // (wo * ho)
        # the window clipped to the plane (plain branches: no min/max calls in kernels)
        r0 = i * sh - ph
        r1 = r0 + kh if r0 + kh < h else h
        r0 = r0 if r0 > 0 else 0
        c0 = j * sw - pw
        c1 = c0 + kw if c0 + kw < wd else wd
        c0 = c0 if c0 > 0 else 0
        best = x[p, r0, c0]
        best_k = r0 * wd + c0
        for a in range(r0, r1):
            for b in range(c0, c1):
                v = x[p, a, b]
                # strict > keeps the first maximum; a NaN beats any number once
                if v > best or (v != v and best == best):
                    best = v
                    best_k = a * wd + b
        out[p, i, j] = best
        switches[p, i, j] = best_k


@cuda.jit(cache=_config.NUMBA_CACHE)
def _unpool_claim_kernel(switches, first, last):
    # switches (P, Ho·Wo); first, last (P, H·W) int32: the first and last window (row-major)
    # that chose each input.  Integer min/max do not depend on the order of the atomics.
    n_windows = switches.shape[1]
    for k in range(cuda.grid(1), switches.size, cuda.gridsize(1)):
        p = k // n_windows
        t = k % n_windows
        s = switches[p, t]
        cuda.atomic.min(first, (p, s), t)
        cuda.atomic.max(last, (p, s), t)


@cuda.jit(cache=_config.NUMBA_CACHE)
def _fill_int_kernel(a, value):
    for k in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        a[k] = value


@cuda.jit(cache=_config.NUMBA_CACHE)
def _unpool_gather_kernel(g, switches, first, last, zero, out):
    # g, switches (P, Ho·Wo); first, last, out (P, H·W); one thread per input position s
    plane = out.shape[1]
    for k in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        p = k // plane
        s = k % plane
        acc = zero
        for t in range(first[p, s], last[p, s] + 1):  # empty when no window chose s
            if switches[p, t] == s:
                acc += g[p, t]
        out[p, s] = acc


@cuda.jit(cache=_config.NUMBA_CACHE)
def _gather_kernel(z, switches, out):
    # z (P, H·W); switches, out (P, Ho·Wo); one thread per output element
    plane = out.shape[1]
    for k in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        p = k // plane
        t = k % plane
        out[p, t] = z[p, switches[p, t]]


@cuda.jit(cache=_config.NUMBA_CACHE)
def _avgpool2d_forward_kernel(x, kh, kw, sh, sw, ph, pw, zero, count, out):
    h, wd = x.shape[1], x.shape[2]
    ho, wo = out.shape[1], out.shape[2]
    for k in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        j = k % wo
        i = (k // wo) % ho
        p = k // (wo * ho)
        # the window clipped to the plane (plain branches: no min/max calls in kernels)
        r0 = i * sh - ph
        r1 = r0 + kh if r0 + kh < h else h
        r0 = r0 if r0 > 0 else 0
        c0 = j * sw - pw
        c1 = c0 + kw if c0 + kw < wd else wd
        c0 = c0 if c0 > 0 else 0
        acc = zero
        for a in range(r0, r1):
            for b in range(c0, c1):
                acc += x[p, a, b]
        out[p, i, j] = acc / count


@cuda.jit(cache=_config.NUMBA_CACHE)
def _avgpool2d_vjp_kernel(g, kh, kw, sh, sw, ph, pw, zero, count, out):
    # g (P, Ho, Wo); out (P, H, W); one thread per input position, gathering its windows
    ho, wo = g.shape[1], g.shape[2]
    h, wd = out.shape[1], out.shape[2]
    for k in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        b = k % wd
        a = (k // wd) % h
        p = k // (wd * h)
        ap = a + ph
        i0 = (ap - kh + sh) // sh if ap >= kh - sh else 0  # ceil((ap - kh + 1) / sh), clipped at 0
        i1 = ap // sh + 1 if ap // sh + 1 < ho else ho
        bp = b + pw
        j0 = (bp - kw + sw) // sw if bp >= kw - sw else 0
        j1 = bp // sw + 1 if bp // sw + 1 < wo else wo
        acc = zero
        for i in range(i0, i1):
            for j in range(j0, j1):
                acc += g[p, i, j]
        out[p, a, b] = acc / count


def _planes(a):
    n, c, h, w = a.shape
    return a.reshape(n * c, h, w)


def maxpool2d_forward(x, kernel, stride, padding, out, switches):
    """Same math as :func:`relprop.kernels.reference.pool2d.maxpool2d_forward`.

    One thread per output window scans its real (unpadded) inputs in row-major order with
    a strict ``>``: ties go to the first maximum, as ``argmax``; padding (-inf) never
    wins; a NaN wins its window (the first NaN), as in NumPy.  Switches are flat indices
    ``h * W + w`` into the unpadded input plane.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    launch(_maxpool2d_forward_kernel, out.size, _planes(x), kh, kw, sh, sw, ph, pw, _planes(out), _planes(switches))
    return out, switches


def maxpool2d_values(x, kernel, stride, padding, out):
    """Same math as :func:`relprop.kernels.reference.pool2d.maxpool2d_values`: the forward kernel
    with scratch switches (one int64 write per window; the scan dominates on the GPU)."""
    return maxpool2d_forward(x, kernel, stride, padding, out, empty(out, out.shape, np.int64))[0]


def maxunpool2d(g, switches, out):
    """Same math as :func:`relprop.kernels.reference.pool2d.maxunpool2d`.

    A gather without the pool geometry (the signature has none): pass 1 records, per input
    position, the first and the last window (row-major) whose switch points at it, with
    integer ``atomic.min``/``atomic.max`` (order-independent, so reproducible); pass 2 gives
    each input position one thread that sums ``g`` over the windows in that range that chose
    it, in row-major window order -- the order of ``np.add.at`` in the reference -- and
    writes 0 where no window chose it.  No float atomics: results are bitwise reproducible.
    Scratch: two int32 arrays of the input's size.
    """
    n, c, h, wd = out.shape
    planes, plane = n * c, h * wd
    sw2 = switches.reshape(planes, -1)
    first = empty(out, (planes, plane), np.int32)
    last = empty(out, (planes, plane), np.int32)
    launch(_fill_int_kernel, first.size, first.reshape(-1), np.int32(_NO_WINDOW))
    launch(_fill_int_kernel, last.size, last.reshape(-1), np.int32(-1))
    launch(_unpool_claim_kernel, sw2.size, sw2, first, last)
    launch(_unpool_gather_kernel, out.size, g.reshape(planes, -1), sw2, first, last, scalar(out.dtype, 0),
           out.reshape(planes, plane))
    return out


def gather_at_switches(z, switches, out):
    """Same math as :func:`relprop.kernels.reference.pool2d.gather_at_switches`: one thread per output
    element."""
    n, c = out.shape[:2]
    launch(_gather_kernel, out.size, z.reshape(n * c, -1), switches.reshape(n * c, -1), out.reshape(n * c, -1))
    return out


def avgpool2d_forward(x, kernel, stride, padding, out):
    """Same math as :func:`relprop.kernels.reference.pool2d.avgpool2d_forward`.

    One thread per output sums the real inputs of its window (padding is zero) in
    row-major order and divides by kh·kw (padding counted), in the arrays' dtype.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    launch(_avgpool2d_forward_kernel, out.size, _planes(x), kh, kw, sh, sw, ph, pw,
           scalar(out.dtype, 0), scalar(out.dtype, kh * kw), _planes(out))
    return out


def avgpool2d_vjp(g, kernel, stride, padding, out):
    """Same math as :func:`relprop.kernels.reference.pool2d.avgpool2d_vjp`.

    A gather: one thread per input position (a, b), at (a + ph, b + pw) in the padded
    plane, sums the ``g`` of the windows i with i·sh <= a + ph < i·sh + kh (likewise j) in
    row-major order and divides by kh·kw once.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    launch(_avgpool2d_vjp_kernel, out.size, _planes(g), kh, kw, sh, sw, ph, pw,
           scalar(out.dtype, 0), scalar(out.dtype, kh * kw), _planes(out))
    return out
