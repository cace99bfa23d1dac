r"""Pattern statistics (PatternNet / PatternAttribution, Kindermans et al. 2018): the sums over a dataset.

A linear layer's output unit j sees an input sample x (a row of a dense layer's input; for a
convolution, the zero-padded input patch of one output position, flattened as the weight's
(C, kh, kw)) and computes the pre-activation :math:`z_j = w_j^T x + b_j` (the ReLU gate) and

.. math:: y_j = w_j^T x = z_j - b_j \qquad \text{(no bias: covariances do not see it).}

The estimators of :mod:`relprop.patterns` need, per unit j and per *regime*
(all samples; the positive regime :math:`z_j > 0`; the other regime :math:`z_j \le 0`),

.. math:: n, \quad \textstyle\sum x, \quad \sum y_j, \quad \sum x\, y_j .

These kernels accumulate them **in place** into float64 arrays, so a caller streams a
dataset batch by batch (and sums of disjoint chunks add up to the sums of the whole).
What is shared and what is per unit:

=================  ====================  ============================================
accumulator        shape                 meaning
=================  ====================  ============================================
``count``          ()                    n: samples seen (every unit sees every sample)
``sum_x``          (I,) / (C, kh, kw)    :math:`\sum_n x_n` (shared by all units)
``count_pos``      (J,)                  :math:`n_{+j} = \sum_n [z_{nj} > 0]`
``sum_y``          (2, J)                :math:`\sum_n y_{nj}`, :math:`\sum_n [z_{nj}>0]\, y_{nj}`
``sum_x_pos``      (J, I) / weight       :math:`\sum_n [z_{nj}>0]\, x_n`
``sum_xy``         (2, J, I) / (2,)+w    :math:`\sum_n y_{nj} x_n`, :math:`\sum_n [z_{nj}>0]\, y_{nj} x_n`
=================  ====================  ============================================

The other regime needs no sums of its own: it is *all minus positive*
(:math:`n_{-j} = n - n_{+j}`, :math:`\sum_- x = \sum x - \sum_+ x`, ...), which the caller
forms; the "all" x-sum is one vector because the regime masks are what makes x-sums
per-unit.  For a convolution the samples are all N·Ho·Wo output positions (J = K output
channels, I = C·kh·kw), so these are three GEMMs over the patch matrix X (rows = samples):

.. math:: \Sigma_{xy} \mathrel{+}= Y^T X, \quad \Sigma^+_{xy} \mathrel{+}= (M \odot Y)^T X,
          \quad \Sigma^+_{x} \mathrel{+}= M^T X, \qquad M_{nj} = [z_{nj} > 0].

The reference computes everything in float64 on the whole batch (clear, not fast).
"""
import numpy as np

__all__ = ["pattern_stats_dense", "pattern_stats_conv2d"]


def _accumulate(x, z, b, count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy):
    """The sums for a sample matrix x (S, I) and pre-activations z (S, J); float64 products."""
    y = (z - b).astype(np.float64)          # y = w^T x, recovered from the forward's z
    m = (z > 0).astype(np.float64)          # the positive regime of each (sample, unit)
    x = x.astype(np.float64)
    count[...] += x.shape[0]
    sum_x += x.sum(axis=0).reshape(sum_x.shape)
    count_pos += m.sum(axis=0)
    sum_y[0] += y.sum(axis=0)
    sum_y[1] += (m * y).sum(axis=0)
    sum_x_pos += (m.T @ x).reshape(sum_x_pos.shape)
    sum_xy[0] += (y.T @ x).reshape(sum_xy.shape[1:])
    sum_xy[1] += ((m * y).T @ x).reshape(sum_xy.shape[1:])
    return count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy


def pattern_stats_dense(x, z, b, count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy):
    """Accumulate the pattern sums of a dense layer (see the module doc).

    Shapes: x (N, I) the layer input, z (N, J) its pre-activation (W x + b), b (J,);
    accumulators (float64, updated in place): count (), sum_x (I,), count_pos (J,),
    sum_y (2, J), sum_x_pos (J, I), sum_xy (2, J, I).  Returns the accumulators.
    """
    return _accumulate(x, z, b, count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy)


def im2col(x, kernel, stride, padding, dilation):
    """The patch matrix of a convolution: (N·Ho·Wo, C·kh·kw), rows in (n, i, j) order.

    Row (n, i, j) is the zero-padded input patch that output position (i, j) of sample n
    sees, flattened in the weight's (C, kh, kw) order, so that z = X W^T + b.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    n, c, h, wd = x.shape
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    x_pad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = np.empty((n, ho, wo, c, kh, kw), dtype=x.dtype)
    for a in range(kh):
        for e in range(kw):
            rows = slice(a * dh, a * dh + sh * (ho - 1) + 1, sh)
            cols_ = slice(e * dw, e * dw + sw * (wo - 1) + 1, sw)
            cols[..., a, e] = x_pad[:, :, rows, cols_].transpose(0, 2, 3, 1)
    return cols.reshape(n * ho * wo, c * kh * kw)


def pattern_stats_conv2d(x, z, b, stride, padding, dilation, count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy):
    """Accumulate the pattern sums of a conv layer: every output position is one sample.

    Shapes: x (N, C, H, W) the layer input, z (N, K, Ho, Wo) its pre-activation, b (K,);
    accumulators (float64, in place): count (), sum_x (C, kh, kw), count_pos (K,),
    sum_y (2, K), sum_x_pos (K, C, kh, kw), sum_xy (2, K, C, kh, kw).  The kernel size
    comes from ``sum_x.shape``.  Returns the accumulators.
    """
    k = z.shape[1]
    patches = im2col(x, sum_x.shape[1:], stride, padding, dilation)   # (N·Ho·Wo, C·kh·kw)
    z_rows = z.transpose(0, 2, 3, 1).reshape(-1, k)                    # (N·Ho·Wo, K), same row order
    return _accumulate(patches, z_rows, b, count, sum_x, count_pos, sum_y, sum_x_pos, sum_xy)
