"""Unchecked kernel calls: allocate ``out`` with the input's namespace, run ``backend``.

Large NumPy outputs come from :mod:`relprop.kernels._pool` (recycled buffers, no fresh pages).

Used inside sweeps (nets, rules, patterns), where the input was validated once at the
public boundary.  ``backend`` is a resolved name ("reference", "cpu" or "cuda").
Geometry arguments are already normalised pairs.
"""
from __future__ import annotations

import numpy as np

from .._backend import array_namespace, kernels
from .._validate import conv_output_size
from . import _pool


def _xp(x):
    return array_namespace(x)


def dense_forward(x, w, b, backend):
    out = _pool.empty((x.shape[0], w.shape[0]), x.dtype, _xp(x))
    if b is None:
        b = _xp(x).zeros(w.shape[0], dtype=x.dtype)
    return kernels(backend).dense_forward(x, w, b, out)


def dense_vjp(g, w, backend):
    out = _pool.empty((g.shape[0], w.shape[1]), g.dtype, _xp(g))
    return kernels(backend).dense_vjp(g, w, out)


def conv2d_output_shape(x_shape, w_shape, stride, padding, dilation):
    n, _, h, wd = x_shape
    k, _, kh, kw = w_shape
    return (n, k, conv_output_size(h, kh, stride[0], padding[0], dilation[0]),
            conv_output_size(wd, kw, stride[1], padding[1], dilation[1]))


def conv2d_forward(x, w, b, stride, padding, dilation, backend, relu=False, keep_z=True):
    """z = conv2d(x), or with ``relu`` the pair ``(z, relu(z))`` in one kernel call (``(None, relu(z))``
    without ``keep_z``: z is then never written, the CPU kernels apply the ReLU in the pass that
    would write it; with ``keep_z`` they write both in that pass)."""
    z, a, _ = conv2d_forward_also(x, w, b, stride, padding, dilation, backend, (), relu=relu, keep_z=keep_z)
    return (z, a) if relu else z


def conv2d_forward_also(x, w, b, stride, padding, dilation, backend, also, relu=False, keep_z=True):
    """:func:`conv2d_forward` and, in the same kernel call, z' = conv2d(x, w') + b' for every
    ``(w', b')`` of ``also`` (weights of w's shape; b' None: no bias).  Returns ``(z, a, [z', ...])``,
    ``a`` = relu(z) with ``relu`` (else None), z None with ``relu`` and not ``keep_z``."""
    xp = _xp(x)
    shape = conv2d_output_shape(x.shape, w.shape, stride, padding, dilation)
    zeros = xp.zeros(w.shape[0], dtype=x.dtype) if b is None or any(b2 is None for _, b2 in also) else None
    extra = [(w2, zeros if b2 is None else b2, _pool.empty(shape, x.dtype, xp)) for w2, b2 in also]
    z = _pool.empty(shape, x.dtype, xp)
    a = (_pool.empty(shape, x.dtype, xp) if keep_z else z) if relu else None
    kernels(backend).conv2d_forward(x, w, zeros if b is None else b, stride, padding, dilation, z, a, extra)
    return (None if relu and not keep_z else z), a, [e[2] for e in extra]


def conv2d_relu_maxpool2x2(x, w, b, stride, padding, dilation, backend, switches=False, also=(), at_switches=False):
    """The 2x2 stride-2 max-pool of relu(conv2d(x)) in one kernel call: its maxima (the forward of a conv,
    ReLU, max-pool triple that keeps no record), or with ``switches=True`` ``(maxima, switches, [z', ...])``:
    the pool's switches as well (a trace that records them but not the full-size ReLU output) and
    z' = conv2d(x, w') + b' for every ``(w', b')`` of ``also`` (as :func:`conv2d_forward_also`'s), with
    ``at_switches`` only at the switches (shaped like the maxima).  The CPU kernels fuse the pool into the
    write-out."""
    xp = _xp(x)
    n, k, ho, wo = conv2d_output_shape(x.shape, w.shape, stride, padding, dilation)
    shape = (n, k, ho // 2, wo // 2)
    out = _pool.empty(shape, x.dtype, xp)
    zeros = xp.zeros(k, dtype=x.dtype) if b is None or any(b2 is None for _, b2 in also) else None
    b = zeros if b is None else b
    if not switches:
        if also:
            raise ValueError("conv2d_relu_maxpool2x2: also= needs switches=True")
        return kernels(backend).conv2d_relu_maxpool2x2(x, w, b, stride, padding, dilation, out)
    extra = [(w2, zeros if b2 is None else b2, _pool.empty(shape if at_switches else (n, k, ho, wo), x.dtype, xp))
             for w2, b2 in also]
    y, sw = kernels(backend).conv2d_relu_maxpool2x2(x, w, b, stride, padding, dilation, out,
                                                    _pool.empty(shape, np.int64, xp), extra)
    return y, sw, [e[2] for e in extra]



def conv2d_relu_maxpool2x2_chain(x, stages, backend):
    """Conv + ReLU + 2x2 max-pool triples in a chain, each reading the one before, in one kernel call
    (``stages``: ``(w, b, stride, padding, dilation)`` per triple, b None: no bias): the last one's pooled
    maxima (a forward that keeps no record: the CPU kernel keeps the maps between the stages in its own
    layout)."""
    xp = _xp(x)
    full, shape = [], tuple(x.shape)
    for w, b, stride, padding, dilation in stages:
        n, k, ho, wo = conv2d_output_shape(shape, w.shape, stride, padding, dilation)
        shape = (n, k, ho // 2, wo // 2)
        full.append((w, xp.zeros(k, dtype=x.dtype) if b is None else b, stride, padding, dilation))
    return kernels(backend).conv2d_relu_maxpool2x2_chain(x, full, _pool.empty(shape, x.dtype, xp))

def conv2d_vjp(g, w, input_shape, stride, padding, dilation, backend):
    out = _pool.empty(tuple(input_shape), g.dtype, _xp(g))
    return kernels(backend).conv2d_vjp(g, w, stride, padding, dilation, out)



def conv2d_relevance(r, z, epsilon, w, a, stride, padding, dilation, backend):
    """a ⊙ Wᵀ(r / stab(z)) in one kernel call (an LRP rule's backward through a convolution, one term);
    z None: a ⊙ Wᵀr (r already divided, above a max-pool's unpooling)."""
    out = _pool.empty(tuple(a.shape), r.dtype, _xp(r))
    return kernels(backend).conv2d_relevance(r, z, float(epsilon), w, stride, padding, dilation, a, out)

def conv2d_unpool_vjp(g, switches, w, a, input_shape, stride, padding, dilation, backend):
    """Wᵀ unpool(g) (⊙ a unless a is None) in one kernel call, g and switches those of a 2x2 stride-2
    max-pool above the convolution (its pooled side): the backward of a conv, ReLU, max-pool triple
    whose ReLU acted above the pool."""
    out = _pool.empty(tuple(input_shape), g.dtype, _xp(g))
    return kernels(backend).conv2d_unpool_vjp(g, switches, w, stride, padding, dilation, a, out)


def conv2d_flat_relevance(r, switches, inv, kernel, stride, padding, dilation, input_shape, backend):
    """The flat rule's R_in at a convolution, from r at its output or (with ``switches``) from the pooled
    side of a 2x2 stride-2 max-pool above it and its ReLU; inv (Ho, Wo) = 1/stab(n_j)."""
    out = _pool.empty(tuple(input_shape), r.dtype, _xp(r))
    return kernels(backend).conv2d_flat_relevance(r, switches, inv, tuple(kernel), tuple(stride), tuple(padding),
                                                  tuple(dilation), out)


def pool_output_shape(x_shape, kernel, stride, padding):
    n, c, h, wd = x_shape
    return (n, c, conv_output_size(h, kernel[0], stride[0], padding[0]),
            conv_output_size(wd, kernel[1], stride[1], padding[1]))


def maxpool2d_forward(x, kernel, stride, padding, backend, switches=True):
    """``(y, switches)``; with ``switches=False``, ``(y, None)`` by the backend's kernel for the maxima
    alone (on the CPU it never computes the switches)."""
    xp = _xp(x)
    shape = pool_output_shape(x.shape, kernel, stride, padding)
    out = _pool.empty(shape, x.dtype, xp)
    if not switches:
        return kernels(backend).maxpool2d_values(x, kernel, stride, padding, out), None
    return kernels(backend).maxpool2d_forward(x, kernel, stride, padding, out, _pool.empty(shape, np.int64, xp))


def maxunpool2d(g, switches, input_shape, backend):
    out = _pool.empty(tuple(input_shape), g.dtype, _xp(g))
    return kernels(backend).maxunpool2d(g, switches, out)


def avgpool2d_forward(x, kernel, stride, padding, backend):
    out = _pool.empty(pool_output_shape(x.shape, kernel, stride, padding), x.dtype, _xp(x))
    return kernels(backend).avgpool2d_forward(x, kernel, stride, padding, out)


def avgpool2d_vjp(g, input_shape, kernel, stride, padding, backend):
    out = _pool.empty(tuple(input_shape), g.dtype, _xp(g))
    return kernels(backend).avgpool2d_vjp(g, kernel, stride, padding, out)


def relu_forward(x, backend):
    return kernels(backend).relu_forward(x, _pool.empty_like(x))


def relu_backward_gradient(g, z, backend):
    return kernels(backend).relu_backward_gradient(g, z, _pool.empty_like(g))


def relu_backward_deconvnet(g, backend):
    return kernels(backend).relu_backward_deconvnet(g, _pool.empty_like(g))


def relu_backward_guided(g, z, backend):
    return kernels(backend).relu_backward_guided(g, z, _pool.empty_like(g))


def stabilized_divide(r, z, epsilon, backend):
    return kernels(backend).stabilized_divide(r, z, float(epsilon), _pool.empty_like(r))


def dense_weight_vjp(x, g, backend):
    xp = _xp(x)
    out_w = _pool.empty((g.shape[1], x.shape[1]), x.dtype, xp)
    out_b = _pool.empty((g.shape[1],), x.dtype, xp)
    return kernels(backend).dense_weight_vjp(x, g, out_w, out_b)


def conv2d_weight_vjp(x, g, w_shape, stride, padding, dilation, backend):
    xp = _xp(x)
    out_w = _pool.empty(tuple(w_shape), x.dtype, xp)
    out_b = _pool.empty((w_shape[0],), x.dtype, xp)
    return kernels(backend).conv2d_weight_vjp(x, g, stride, padding, dilation, out_w, out_b)


# -- pattern statistics (family "patterns"): float64 accumulators updated in place -------------
def pattern_accumulators(xp, n_units, in_shape):
    """Zeroed float64 accumulators (count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy) for a layer
    with ``n_units`` outputs and per-unit input shape ``in_shape`` ((I,) dense, (C, kh, kw) conv)."""
    in_shape = tuple(int(s) for s in in_shape)
    f8 = np.float64
    return (xp.zeros((), dtype=f8), xp.zeros(in_shape, dtype=f8), xp.zeros((n_units,), dtype=f8),
            xp.zeros((2, n_units), dtype=f8), xp.zeros((n_units,) + in_shape, dtype=f8),
            xp.zeros((2, n_units) + in_shape, dtype=f8))


def pattern_stats_dense(x, z, b, acc, backend):
    if b is None:
        b = _xp(x).zeros(z.shape[1], dtype=x.dtype)
    return kernels(backend).pattern_stats_dense(x, z, b, *acc)


def pattern_stats_conv2d(x, z, b, stride, padding, dilation, acc, backend):
    if b is None:
        b = _xp(x).zeros(z.shape[1], dtype=x.dtype)
    return kernels(backend).pattern_stats_conv2d(x, z, b, stride, padding, dilation, *acc)
