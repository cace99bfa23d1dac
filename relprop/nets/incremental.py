"""Forward passes of a batch whose input changes in one small box per sample at a time.

Pixel flipping (``metrics.perturbation_curve``) replaces one patch per sample per step and
asks for the logits after every step: a hundred steps are a hundred forward passes of inputs
that differ from the previous step's in a few pixels.  A convolution, pooling or elementwise
layer's output changes only where its window reaches a changed input, so each layer is
recomputed only on that box of outputs, from the (current) stored activations around it;
the rest of every activation is kept from the previous step.

Per layer and sample the affected box of outputs follows from the box of changed inputs:
along one axis, inputs [i0, i1) of a window layer (kernel k, stride s, padding p, dilation d)
reach the outputs

    o0 = ceil((i0 + p - (k - 1) d) / s),    o1 = floor((i1 - 1 + p) / s) + 1,

clipped to the output.  The boxes of the samples differ in position, not (but for clipping)
in size: a batch of windows of one size, one per sample, is gathered from the layer's input
(with the layer's padding value outside the image: 0, or -inf for max-pooling), the layer runs
on it without padding, and the window's valid part is written back.  An ``add``/``concat``
reads the union of its inputs' boxes.  Layers without a spatial window (flatten, dense,
adaptive pooling) and windows covering more than ``_config.INCREMENTAL_FULL_FRACTION`` of
their output run whole; every layer after them then does too.

The results equal full forward passes up to rounding: a window may take another convolution
path than the whole layer (Winograd, row-shift GEMMs, im2col sum in different orders).
NumPy arrays only (the CPU and reference backends).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .. import _config
from ..kernels import _ops
from .graph import INPUT

__all__ = ["PatchedForward", "windows"]

_jit = njit(cache=_config.NUMBA_CACHE, nogil=True)


@_jit
def _gather(a, r0, c0, fill, out):
    """out[b, :, i, j] = a[b, :, r0[b] + i, c0[b] + j], ``fill`` where that is outside a."""
    h_, w_ = a.shape[2], a.shape[3]
    for b in range(out.shape[0]):
        for c in range(out.shape[1]):
            for i in range(out.shape[2]):
                r = r0[b] + i
                d = out[b, c, i]
                if r < 0 or r >= h_:
                    d[:] = fill
                    continue
                s = a[b, c, r]
                for j in range(out.shape[3]):
                    q = c0[b] + j
                    d[j] = s[q] if 0 <= q < w_ else fill
    return out


def windows(a, r0, c0, h, w, fill=0.0):
    """(N, C, h, w): sample b's window of ``a`` (N, C, H, W) at rows r0[b]:r0[b]+h, columns c0[b]:c0[b]+w,
    ``fill`` where the window reaches past ``a``."""
    out = np.empty((a.shape[0], a.shape[1], h, w), a.dtype)
    return _gather(a, np.asarray(r0, dtype=np.int64), np.asarray(c0, dtype=np.int64), fill, out)


class _Box:
    """Per-sample boxes [r0, r1) x [c0, c1) of changed positions of one activation (int64 arrays),
    or ``full`` (everything may have changed)."""

    def __init__(self, r0=None, r1=None, c0=None, c1=None, full=False):
        self.r0, self.r1, self.c0, self.c1, self.full = r0, r1, c0, c1, full

    @staticmethod
    def union(boxes):
        if any(b.full for b in boxes):
            return _Box(full=True)
        return _Box(np.minimum.reduce([b.r0 for b in boxes]), np.maximum.reduce([b.r1 for b in boxes]),
                    np.minimum.reduce([b.c0 for b in boxes]), np.maximum.reduce([b.c1 for b in boxes]))


def _reach(i0, i1, n_out, k, s, p, d):
    """Outputs [o0, o1) of a window layer reached by the inputs [i0, i1), clipped to [0, n_out)."""
    o0 = np.clip(-((-(i0 + p - (k - 1) * d)) // s), 0, n_out)
    o1 = np.clip((i1 - 1 + p) // s + 1, 0, n_out)
    return o0, np.maximum(o0, o1)


_ELEMENTWISE = ("relu", "identity", "dropout", "batchnorm2d")


class PatchedForward:
    """The logits of a batch ``x`` (N, C, H, W) after successive in-place changes of one box per sample.

    >>> pf = PatchedForward(net, x)                 # one full forward pass
    >>> logits = pf.update(r0, c0, values)          # x[b, :, r0[b]:r0[b]+h, c0[b]:c0[b]+w] = values[b]

    ``values`` is (N, C, h, w); boxes reaching past the image are clipped.  Each update changes the
    stored input and recomputes every layer on the outputs the change reaches (module doc).
    """

    def __init__(self, net, x, backend):
        if backend not in ("cpu", "reference"):
            raise ValueError(f"PatchedForward: backend {backend!r} is not supported; expected 'cpu' or 'reference'")
        self.net, self.backend = net, backend
        trace = net.trace(x, backend, keep=True, check=False)
        self.x = np.array(trace.x, copy=True)
        self.acts = list(trace.outputs)
        self.shapes = [a.shape for a in self.acts]

    @property
    def output(self):
        return self.acts[-1]

    def update(self, r0, c0, values):
        """Write ``values`` into the input boxes at (r0, c0) and return the new logits (N, classes)."""
        x = self.x
        n, c, h, w = x.shape
        values = np.asarray(values)
        if values.ndim != 4 or values.shape[:2] != (n, c) or min(values.shape[2:]) < 1:
            raise ValueError(f"PatchedForward.update: values must be (N, C, h, w) = ({n}, {c}, h >= 1, w >= 1), "
                             f"got shape {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError("PatchedForward.update: values must be finite (NaN or Inf found)")
        r0, c0 = np.asarray(r0), np.asarray(c0)
        if r0.shape != (n,) or c0.shape != (n,) or not (np.issubdtype(r0.dtype, np.integer)
                                                        and np.issubdtype(c0.dtype, np.integer)):
            raise ValueError(f"PatchedForward.update: r0 and c0 must be integer arrays of shape ({n},), got "
                             f"{r0.dtype}{r0.shape} and {c0.dtype}{c0.shape}")
        bh, bw = values.shape[2], values.shape[3]
        r0, c0 = r0.astype(np.int64), c0.astype(np.int64)
        box = _Box(np.clip(r0, 0, h), np.clip(r0 + bh, 0, h), np.clip(c0, 0, w), np.clip(c0 + bw, 0, w))
        _scatter_clipped(np.ascontiguousarray(values, dtype=x.dtype), r0, c0, box, x)
        boxes, self._windows = {}, {}
        net = self.net
        for i, layer in enumerate(net.layers):
            ps = net.parents(i)
            ins = [x if p == INPUT else self.acts[p] for p in ps]
            in_boxes = [box if p == INPUT else boxes[p] for p in ps]
            boxes[i] = self._layer(i, layer, ins, in_boxes)
        out = self.acts[-1]
        if not np.isfinite(out).all():
            net.trace(x, self.backend, keep=False, check=False)  # raises, naming the overflowing layer
        return out

    # -- one layer ------------------------------------------------------------------------
    def _full(self, i, layer, ins):
        y, _ = layer.forward(ins if layer.n_inputs is None else ins[0], self.backend)
        self.acts[i] = np.ascontiguousarray(y)
        return _Box(full=True)

    def _layer(self, i, layer, ins, in_boxes):
        kind = layer.kind
        shape = self.shapes[i]
        if any(b.full for b in in_boxes) or kind not in _ELEMENTWISE + ("conv2d", "maxpool2d", "avgpool2d",
                                                                           "add", "concat"):
            return self._full(i, layer, ins)
        parents = self.net.parents(i)
        if kind in _ELEMENTWISE and parents[0] in self._windows:
            # straight on the window its producer just computed (no gather): same box, same origin
            y_p, o_r0, o_c0 = self._windows[parents[0]]
            y, _ = layer.forward(y_p, self.backend)
            return self._put(i, np.ascontiguousarray(y), o_r0, o_c0, in_boxes[0])
        if kind in ("conv2d", "maxpool2d", "avgpool2d"):
            (kh, kw), (sh, sw), (ph, pw) = layer.kernel, layer.stride, layer.padding
            dh, dw = layer.dilation if kind == "conv2d" else (1, 1)
            b = in_boxes[0]
            o_r0, o_r1 = _reach(b.r0, b.r1, shape[2], kh, sh, ph, dh)
            o_c0, o_c1 = _reach(b.c0, b.c1, shape[3], kw, sw, pw, dw)
        else:  # elementwise, add, concat: the same positions
            b = _Box.union(in_boxes)
            o_r0, o_r1, o_c0, o_c1 = b.r0, b.r1, b.c0, b.c1
            kh = kw = sh = sw = dh = dw = 1
            ph = pw = 0
        oh, ow = int((o_r1 - o_r0).max()), int((o_c1 - o_c0).max())
        out_box = _Box(o_r0, o_r1, o_c0, o_c1)
        if oh == 0 or ow == 0:
            return out_box
        if oh * ow > _config.INCREMENTAL_FULL_FRACTION * shape[2] * shape[3]:
            self._full(i, layer, ins)
            return out_box
        # the input window under outputs [o0, o0 + oh): rows o0*s - p .. (o0 + oh - 1)*s - p + (k-1)*d
        wr0, wc0 = o_r0 * sh - ph, o_c0 * sw - pw
        wh, ww = (oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1
        fill = -np.inf if kind == "maxpool2d" else 0.0
        wins = [windows(a, wr0, wc0, wh, ww, fill) for a in ins]
        if kind == "conv2d":
            wgt, bias = layer.params(wins[0])
            y = _ops.conv2d_forward(wins[0], wgt, bias, layer.stride, (0, 0), layer.dilation, self.backend)
        elif kind == "maxpool2d":
            y, _ = _ops.maxpool2d_forward(wins[0], layer.kernel, layer.stride, (0, 0), self.backend)
        elif kind == "avgpool2d":
            y = _ops.avgpool2d_forward(wins[0], layer.kernel, layer.stride, (0, 0), self.backend)
        else:
            y, _ = layer.forward(wins if layer.n_inputs is None else wins[0], self.backend)
        return self._put(i, np.ascontiguousarray(y), o_r0, o_c0, out_box)

    def _put(self, i, y, o_r0, o_c0, box):
        """Write the window ``y`` (origin (o_r0, o_c0)) into layer i's activation within ``box``; keep
        it for an elementwise reader."""
        _scatter_clipped(y, o_r0, o_c0, box, self.acts[i])
        self._windows[i] = (y, o_r0, o_c0)
        return box


def _scatter_clipped(v, r0, c0, box, a):
    """a[b, :, box_b] = v[b, :, box_b - (r0[b], c0[b])] (box inside both a and the window v)."""
    r1 = np.minimum(box.r1, r0 + v.shape[2])
    c1 = np.minimum(box.c1, c0 + v.shape[3])
    lo_r, lo_c = np.maximum(box.r0, r0), np.maximum(box.c0, c0)
    _scatter_window(v, r0, c0, lo_r, np.maximum(lo_r, r1), lo_c, np.maximum(lo_c, c1), a)


@_jit
def _scatter_window(v, r0, c0, lo_r, hi_r, lo_c, hi_c, a):
    """a[b, :, r, q] = v[b, :, r - r0[b], q - c0[b]] for r in [lo_r[b], hi_r[b]), q in [lo_c[b], hi_c[b])."""
    for b in range(v.shape[0]):
        for c in range(v.shape[1]):
            for r in range(lo_r[b], hi_r[b]):
                d = a[b, c, r]
                s = v[b, c, r - r0[b]]
                for q in range(lo_c[b], hi_c[b]):
                    d[q] = s[q - c0[b]]
    return a
