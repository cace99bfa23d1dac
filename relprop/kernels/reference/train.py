r"""Weight vector-Jacobian products: the gradients of a loss w.r.t. the weights and biases.

Training needs, for every linear layer, the gradient of the loss w.r.t. its parameters
given g = ∂L/∂z, the gradient at the layer's output (pre-activation z).

Dense, x (N, I), g (N, J), w (J, I):

.. math:: \frac{\partial L}{\partial w_{ji}} = \sum_n g_{nj} x_{ni} \;(= g^\top x), \qquad
          \frac{\partial L}{\partial b_j} = \sum_n g_{nj}

Convolution, x (N, C, H, W), g (N, K, Ho, Wo), w (K, C, kh, kw); with :math:`\tilde x`
the zero-padded input, every weight tap (a, e) sees the input through the same strided
window as the forward pass:

.. math:: \frac{\partial L}{\partial w_{kcae}} = \sum_{n,i,j} g_{nkij}\,
          \tilde x_{n,c,\,i s_h + a d_h,\,j s_w + e d_w}, \qquad
          \frac{\partial L}{\partial b_k} = \sum_{n,i,j} g_{nkij}
"""
import numpy as np

__all__ = ["dense_weight_vjp", "conv2d_weight_vjp"]


def _tap(offset, step, count, dil):
    """The slice of padded positions that kernel tap ``offset`` touches for ``count`` outputs."""
    start = offset * dil
    return slice(start, start + step * (count - 1) + 1, step)


def dense_weight_vjp(x, g, out_w, out_b):
    """dW = gᵀ x, db = Σ_n g.  x (N, I), g (N, J), out_w (J, I), out_b (J,) → (out_w, out_b)."""
    out_w[...] = g.T @ x
    out_b[...] = g.sum(axis=0)
    return out_w, out_b


def conv2d_weight_vjp(x, g, stride, padding, dilation, out_w, out_b):
    """Convolution weight/bias gradients.  x (N,C,H,W), g (N,K,Ho,Wo), out_w (K,C,kh,kw), out_b (K,)."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = out_w.shape[2:]
    ho, wo = g.shape[2:]
    x_pad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    for a in range(kh):
        for e in range(kw):
            patch = x_pad[:, :, _tap(a, sh, ho, dh), _tap(e, sw, wo, dw)]  # (N, C, Ho, Wo)
            out_w[:, :, a, e] = np.einsum("nkhw,nchw->kc", g, patch)
    out_b[...] = g.sum(axis=(0, 2, 3))
    return out_w, out_b
