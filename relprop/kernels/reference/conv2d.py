r"""2-D convolution (cross-correlation, as every deep-learning framework): forward and input-VJP.

Layout: x (N, C, H, W), w (K, C, kh, kw), b (K,), z (N, K, Ho, Wo); stride (sh, sw),
zero padding (ph, pw), dilation (dh, dw).  With :math:`\tilde x` the zero-padded input,

.. math:: z_{nkij} = b_k + \sum_{c,a,e} w_{kcae}\,
          \tilde x_{n,c,\,i s_h + a d_h,\,j s_w + e d_w}

and :math:`H_o = \lfloor (H + 2p_h - d_h(k_h - 1) - 1)/s_h \rfloor + 1` (likewise W_o).

The input-VJP (the transposed convolution) sends every output signal back along the
same taps:

.. math:: \tilde g_{n,c,\,i s_h + a d_h,\,j s_w + e d_w} \mathrel{+}= w_{kcae}\, g_{nkij},
          \qquad g^{\mathrm{in}} = \tilde g \text{ without its padding.}

Both loop over the kh·kw kernel offsets; each offset is one small tensor contraction
over channels applied to a strided view of the padded input.
"""
import numpy as np

from .elementwise import stabilized_divide
from .pool2d import gather_at_switches, maxpool2d_forward, maxpool2d_values, maxunpool2d

__all__ = ["conv2d_forward", "conv2d_vjp", "conv2d_relu_maxpool2x2", "conv2d_relu_maxpool2x2_chain",
           "conv2d_relevance", "conv2d_unpool_vjp", "conv2d_flat_relevance"]


def _tap(offset, step, count, dil):
    """The slice of padded positions that kernel tap ``offset`` touches for ``count`` outputs."""
    start = offset * dil
    return slice(start, start + step * (count - 1) + 1, step)


def conv2d_forward(x, w, b, stride, padding, dilation, out, a_out=None, also=()):
    """Convolution forward.  Shapes: x (N,C,H,W), w (K,C,kh,kw), b (K,), out (N,K,Ho,Wo).

    ``a_out`` (N,K,Ho,Wo): the ReLU after the convolution in the same call, a_out = max(z, 0);
    when ``a_out`` *is* ``out``, out receives max(z, 0) instead of z (a conv + ReLU pair whose z
    is not needed; the CPU kernels fuse the ReLU into the pass that writes z).
    ``also``: ``(w', b', out')`` triples, out' = conv2d(x, w') + b' in the same call (an LRP rule's
    modified forward beside the traced one; the CPU Winograd path transforms x once for all)."""
    for w2, b2, out2 in also:
        conv2d_forward(x, w2, b2, stride, padding, dilation, out2)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = w.shape[2:]
    ho, wo = out.shape[2:]
    x_pad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    z = np.zeros(out.shape, dtype=x.dtype) + b[None, :, None, None]
    for a in range(kh):
        for e in range(kw):
            patch = x_pad[:, :, _tap(a, sh, ho, dh), _tap(e, sw, wo, dw)]  # (N, C, Ho, Wo)
            z += np.einsum("kc,nchw->nkhw", w[:, :, a, e], patch)
    out[...] = z
    if a_out is not None:
        np.maximum(z, 0, out=a_out)  # relu_forward: NaN passes
    return out



def conv2d_relu_maxpool2x2(x, w, b, stride, padding, dilation, out, switches=None, also=()):
    r"""A convolution, the ReLU after it and a 2x2 stride-2 unpadded max-pool after that, out (N, K,
    ⌊Ho/2⌋, ⌊Wo/2⌋) (the forward of such a triple):

    .. math:: y_{nkij} = \max_{a, e \in \{0, 1\}} \max(z_{nk,\,2i+a,\,2j+e}, 0)

    and, with ``switches`` (int64, shaped like ``out``), each window's first maximum of relu(z) in
    row-major order as a flat index into the (Ho, Wo) plane, as :func:`maxpool2d_forward` records it
    (a trace that keeps records).  ``also``: ``(w', b', out')`` triples, out' = conv2d(x, w') + b' in the
    same call, as :func:`conv2d_forward`'s (an LRP rule's modified forward); an out' shaped like ``out``
    receives z' at the switches only (:func:`~relprop.kernels.reference.pool2d.gather_at_switches`: a rule
    that divides by z' above the unpooling reads nothing else).  Returns ``out``, or ``(out, switches)``.
    The fast kernels may take the maximum before the bias and the ReLU when they need no switches
    (both are monotone, and so is rounding, so the values are the same)."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = w.shape[2:]
    ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    z = np.empty((x.shape[0], w.shape[0], ho, wo), dtype=x.dtype)
    full = [(w2, b2, np.empty_like(z) if o2.shape == out.shape else o2) for w2, b2, o2 in also]
    conv2d_forward(x, w, b, stride, padding, dilation, z, z, full)
    if switches is None:
        return maxpool2d_values(z, (2, 2), (2, 2), (0, 0), out)
    maxpool2d_forward(z, (2, 2), (2, 2), (0, 0), out, switches)
    for (_, _, f), (_, _, o2) in zip(full, also):
        if f is not o2:
            gather_at_switches(f, switches, o2)
    return out, switches



def conv2d_relu_maxpool2x2_chain(x, stages, out):
    r"""Conv + ReLU + 2x2 max-pool triples in a chain, each stage reading the one before (LeNet-5's
    feature stack), the last stage's pooled maxima in ``out``:

    .. math:: y^{(0)} = x, \qquad y^{(s+1)} = \operatorname{maxpool}_{2\times 2}\bigl(\max(z^{(s)}, 0)\bigr),
              \quad z^{(s)} = \operatorname{conv2d}(y^{(s)};\, w_s, b_s)

    ``stages``: ``(w, b, stride, padding, dilation)`` per stage, each :func:`conv2d_relu_maxpool2x2`.  A
    forward that keeps no record (the CPU kernel keeps the maps between the stages in its own layout)."""
    for s, (w, b, stride, padding, dilation) in enumerate(stages):
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        kh, kw = w.shape[2:]
        ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        y = out if s == len(stages) - 1 else np.empty((x.shape[0], w.shape[0], ho // 2, wo // 2), dtype=x.dtype)
        x = conv2d_relu_maxpool2x2(x, w, b, stride, padding, dilation, y)
    return out

def conv2d_vjp(g, w, stride, padding, dilation, out):
    """Input-VJP (transposed convolution).  g (N,K,Ho,Wo), w (K,C,kh,kw), out (N,C,H,W)."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = w.shape[2:]
    n, c, h, wd = out.shape
    ho, wo = g.shape[2:]
    g_pad = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=g.dtype)
    for a in range(kh):
        for e in range(kw):
            g_pad[:, :, _tap(a, sh, ho, dh), _tap(e, sw, wo, dw)] += np.einsum("kc,nkhw->nchw", w[:, :, a, e], g)
    out[...] = g_pad[:, :, ph:ph + h, pw:pw + wd]
    return out


def conv2d_relevance(r, z, epsilon, w, stride, padding, dilation, a, out):
    r"""An LRP rule's backward through a convolution, for one term (z⁺ on W⁺, ε on W):

    .. math:: R^{\mathrm{in}} = a \odot W^\top s, \qquad s = \frac{R}{z + \varepsilon\,\mathrm{sign}_0(z)}

    (:func:`~relprop.kernels.reference.elementwise.stabilized_divide`, then :func:`conv2d_vjp` with the
    layer's geometry, then the product with the input a).  r, z (N,K,Ho,Wo), w (K,C,kh,kw), a and out
    (N,C,H,W).  z None: s = r (r divided already: a max-pool above unpooled the quotient, see
    :class:`relprop.rules.core.DivideBeforeUnpool`).  The CPU kernel forms s as r enters the transposed
    convolution and the product as its result leaves, so neither is written whole."""
    s = r if z is None else stabilized_divide(r, z, epsilon, np.empty_like(r))
    conv2d_vjp(s, w, stride, padding, dilation, out)
    out *= a
    return out


def conv2d_unpool_vjp(g, switches, w, stride, padding, dilation, a, out):
    r"""The input-VJP of a convolution below a ReLU and a 2x2 stride-2 max-pool, from the pooled side:

    .. math:: \mathrm{out} = W^\top \mathrm{unpool}(g) \quad (\odot\, a \text{ unless a is None})

    g and switches (N,K,Ho//2,Wo//2) (:func:`~relprop.kernels.reference.pool2d.maxunpool2d` to the
    convolution's output (N,K,Ho,Wo)), w (K,C,kh,kw), a and out (N,C,H,W).  The gradient below a max-pool
    (its ReLU gated above the pool), and an LRP rule's backward with the division done above it
    (a ⊙ Wᵀs, :class:`relprop.rules.core.DivideBeforeUnpool`).  The CPU kernel unpools in the transposed
    convolution's input transform, so the unpooled map is never written whole."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = w.shape[2:]
    ho = (out.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (out.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    full = maxunpool2d(g, switches, np.empty((g.shape[0], g.shape[1], ho, wo), g.dtype))
    conv2d_vjp(full, w, stride, padding, dilation, out)
    if a is not None:
        out *= a
    return out


def conv2d_flat_relevance(r, switches, inv, kernel, stride, padding, dilation, out):
    r"""The flat rule's backward through a convolution [Lapuschkin2019]_ (every weight and input 1):

    .. math:: R^{\mathrm{in}}_{n,c,i} = \sum_{j \ni i} \frac{1}{\mathrm{stab}(n_j)} \sum_k R_{n,k,j}

    the sum over the outputs j whose window holds input position i (the same for every input channel
    c), n_j the number of real inputs of j.  r (N,K,Ho,Wo) with ``switches`` None; or, with ``switches``,
    the pooled side of a 2x2 stride-2 max-pool above the convolution and its ReLU (r and switches
    (N,K,Ho//2,Wo//2), :func:`~relprop.kernels.reference.pool2d.maxunpool2d` to (N,K,Ho,Wo) first).
    inv (Ho,Wo): 1/stab(n_j), the same for every output channel.  ``kernel`` (kh, kw) and the layer's
    stride, padding, dilation; out (N,C,H,W).  The sum over the channels k first, then the transposed
    convolution of that one channel with all-ones weights, copied to every input channel."""
    kh, kw = kernel
    n, c = out.shape[:2]
    ho, wo = inv.shape
    full = r if switches is None else maxunpool2d(r, switches, np.empty((n, r.shape[1], ho, wo), r.dtype))
    s1 = full.sum(axis=1, keepdims=True) * inv
    c1 = conv2d_vjp(s1, np.ones((1, 1, kh, kw), r.dtype), stride, padding, dilation,
                    np.empty((n, 1) + out.shape[2:], r.dtype))
    out[...] = c1
    return out
