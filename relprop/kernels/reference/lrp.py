r"""The relevance equations of every LRP / Deep Taylor rule, literally (docs/conventions.md; the teaching text).

One dense or convolutional layer: inputs :math:`a_i`, weights :math:`w_{ij}`, bias
:math:`b_j`, contributions :math:`z_{ij} = a_i w_{ij}`, pre-activation
:math:`z_j = \sum_i z_{ij} + b_j`, upper relevance :math:`R_j`, lower relevance :math:`R_i`.
Every rule here is the same redistribution

.. math:: R_i = \sum_j \frac{q_{ij}}{\mathrm{stab}(q_j)} R_j, \qquad
          \mathrm{stab}(q) = q + \epsilon\,\mathrm{sign}_0(q),\ \mathrm{sign}_0(0) = +1,

of the upper relevance in proportion to rule-specific *shares* :math:`q_{ij}` with the
denominator :math:`q_j` (a zero denominator sends nothing down, never NaN); the rules differ
only in the shares, which are written out in full below.

A convolution is the same with i running over the receptive field of output position j
(:func:`receptive_fields` lays every field out as a column, zero padding included, and
:func:`scatter_fields` adds the columns' relevance back onto the input grid).  So each
``*_dense`` function has a ``*_conv2d`` twin that is three lines.

Shapes: dense a (N, I), w (J, I), b (J,), R (N, J) → (N, I); conv a (N, C, H, W),
w (K, C, kh, kw), b (K,), R (N, K, Ho, Wo) → (N, C, H, W).  Written for clarity, not
speed: the contribution tensors are (N, I, J); the fast path (:mod:`relprop.rules.core`)
computes the same numbers without forming them and is tested against these functions.
"""
import numpy as np

from .patterns import im2col

__all__ = ["stab", "redistribute", "epsilon_dense", "gamma_dense", "alpha_beta_dense", "zplus_dense",
           "zbox_dense", "wsquare_dense", "flat_dense", "receptive_fields", "scatter_fields", "epsilon_conv2d",
           "gamma_conv2d", "alpha_beta_conv2d", "zplus_conv2d", "zbox_conv2d", "wsquare_conv2d", "flat_conv2d",
           "proportional"]


def stab(q, eps):
    """q + ε·sign₀(q), sign₀(0) = +1."""
    return q + eps * np.where(q >= 0, 1.0, -1.0)


def redistribute(q_ij, q_j, R, eps):
    r"""R_i = Σ_j q_ij / stab(q_j) · R_j;  q_ij (N, I, J), q_j (N, J), R (N, J) → (N, I).

    A zero stabilised denominator (ε = 0 and q_j = 0) contributes zero."""
    den = stab(q_j, eps)
    s = np.where(den == 0, 0.0, R / np.where(den == 0, 1.0, den))
    return (q_ij * s[:, None, :]).sum(axis=2)


def _pos(v):
    return np.maximum(v, 0)


def _neg(v):
    return np.minimum(v, 0)


# -- dense layers ---------------------------------------------------------------------------------
def epsilon_dense(a, w, b, R, eps):
    """LRP-ε (LRP-0 for ε = 0): q_ij = a_i w_ij, q_j = z_j (the bias included)."""
    z_ij = a[:, :, None] * w.T[None]
    return redistribute(z_ij, z_ij.sum(axis=1) + b, R, eps)


def gamma_dense(a, w, b, R, gamma, eps):
    """LRP-γ, sign-aware: where z_j > 0 the shares are z_ij + γ z_ij⁺ (bias b + γ b⁺); where z_j < 0,
    z_ij + γ z_ij⁻ (bias b + γ b⁻); where z_j = 0 nothing goes down."""
    z_ij = a[:, :, None] * w.T[None]
    z_j = z_ij.sum(axis=1) + b
    up, b_up = z_ij + gamma * _pos(z_ij), b + gamma * _pos(b)
    down, b_down = z_ij + gamma * _neg(z_ij), b + gamma * _neg(b)
    return (redistribute(up, up.sum(axis=1) + b_up, R * (z_j > 0), eps)
            + redistribute(down, down.sum(axis=1) + b_down, R * (z_j < 0), eps))


def alpha_beta_dense(a, w, b, R, alpha, beta, eps, ignore_bias=False):
    """LRP-αβ (α − β = 1): α z_ij⁺ / stab(z_j⁺) − β z_ij⁻ / stab(z_j⁻), z_j^± = Σ_i z_ij^± + b_j^±.

    z_ij⁺ = a_i⁺ w_ij⁺ + a_i⁻ w_ij⁻ is the positive part of z_ij (likewise z_ij⁻); each half
    takes only its own part of the bias (or none with ``ignore_bias``)."""
    z_ij = a[:, :, None] * w.T[None]
    bp, bn = (0.0, 0.0) if ignore_bias else (_pos(b), _neg(b))
    zp, zn = _pos(z_ij), _neg(z_ij)
    return (alpha * redistribute(zp, zp.sum(axis=1) + bp, R, eps)
            - beta * redistribute(zn, zn.sum(axis=1) + bn, R, eps))


def zplus_dense(a, w, b, R, eps, ignore_bias=False):
    """z⁺ (Deep Taylor) = α1β0: z_ij⁺ / stab(Σ_i z_ij⁺ + b_j⁺) (b⁺ dropped with ``ignore_bias``)."""
    return alpha_beta_dense(a, w, b, R, 1.0, 0.0, eps, ignore_bias)


def zbox_dense(a, w, R, low, high, eps):
    """z^B (Deep Taylor, l ≤ a ≤ h): q_ij = a_i w_ij − l_i w_ij⁺ − h_i w_ij⁻, no bias.

    ``low`` / ``high``: scalars or arrays broadcasting to one sample (I,)."""
    low = np.broadcast_to(low, a.shape[1:])[None, :, None]
    high = np.broadcast_to(high, a.shape[1:])[None, :, None]
    wt = w.T[None]
    q_ij = a[:, :, None] * wt - low * _pos(wt) - high * _neg(wt)
    return redistribute(q_ij, q_ij.sum(axis=1), R, eps)


def wsquare_dense(w, R, eps, connected=None):
    """w² (Deep Taylor, unbounded input): q_ij = w_ij², no bias, not multiplied by a.

    ``connected`` (N or 1, I, J): 1 where input i really reaches output j (conv padding: 0)."""
    q_ij = np.broadcast_to((w.T ** 2)[None], (R.shape[0],) + w.T.shape)
    if connected is not None:
        q_ij = q_ij * connected
    return redistribute(q_ij, q_ij.sum(axis=1), R, eps)


def flat_dense(w, R, eps, connected=None):
    """flat: every share 1 — R_j spread evenly over the (real) inputs of j."""
    q_ij = np.ones((R.shape[0],) + w.T.shape)
    if connected is not None:
        q_ij = q_ij * connected
    return redistribute(q_ij, q_ij.sum(axis=1), R, eps)


def proportional(xs, R, eps):
    """The residual add (and average pooling): R_k = x_k / stab(Σ_m x_m) · R for each input x_k."""
    den = stab(sum(xs), eps)
    s = np.where(den == 0, 0.0, R / np.where(den == 0, 1.0, den))
    return [x * s for x in xs]


# -- convolutions: the dense rules over receptive fields ------------------------------------------
def receptive_fields(a, kernel, stride, padding, dilation):
    """Columns (N, C·kh·kw, Ho·Wo): column q holds the receptive field of output position q,
    zero padding included, in the order of w.reshape(K, C·kh·kw) (the reference im2col)."""
    rows = im2col(a, kernel, stride, padding, dilation)          # (N·Ho·Wo, C·kh·kw)
    n = a.shape[0]
    return rows.reshape(n, rows.shape[0] // n, rows.shape[1]).transpose(0, 2, 1)


def scatter_fields(cols, shape, kernel, stride, padding, dilation):
    """The adjoint of :func:`receptive_fields`: add every column back onto the input grid (N, C, H, W)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    n, c, h, wd = shape
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = cols.reshape(n, c, kh, kw, ho, wo)
    out = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=cols.dtype)
    for p in range(kh):
        for q in range(kw):
            out[:, :, p * dh:p * dh + sh * (ho - 1) + 1:sh, q * dw:q * dw + sw * (wo - 1) + 1:sw] += cols[:, :, p, q]
    return out[:, :, ph:ph + h, pw:pw + wd]


def _per_position(rule_dense, a, w, R, geometry, *args, **kwargs):
    """Run a dense rule at every output position: the layer input there is its receptive field."""
    n, k = R.shape[:2]
    cols = receptive_fields(a, w.shape[2:], *geometry)           # (N, D, Q)
    q = cols.shape[2]
    fields = cols.transpose(0, 2, 1).reshape(n * q, -1)          # one "sample" per (n, position)
    r_pos = R.reshape(n, k, q).transpose(0, 2, 1).reshape(n * q, k)
    r_fields = rule_dense(fields, w.reshape(k, -1), r_pos, *args, **kwargs)
    return scatter_fields(r_fields.reshape(n, q, -1).transpose(0, 2, 1), a.shape, w.shape[2:], *geometry)


def _connected(a, w, geometry):
    """1 where a tap of the receptive field hits a real input (not padding), per field: (N·Q, D, K)."""
    ones = receptive_fields(np.ones((1,) + a.shape[1:]), w.shape[2:], *geometry)   # (1, D, Q)
    conn = np.broadcast_to(ones, (a.shape[0],) + ones.shape[1:]).transpose(0, 2, 1).reshape(-1, ones.shape[1])
    return np.broadcast_to(conn[:, :, None], conn.shape + (w.shape[0],))


def epsilon_conv2d(a, w, b, R, eps, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """LRP-ε on a convolution: :func:`epsilon_dense` over every receptive field."""
    return _per_position(lambda f, wm, r: epsilon_dense(f, wm, b, r, eps), a, w, R, (stride, padding, dilation))


def gamma_conv2d(a, w, b, R, gamma, eps, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """LRP-γ on a convolution (see :func:`gamma_dense`)."""
    return _per_position(lambda f, wm, r: gamma_dense(f, wm, b, r, gamma, eps), a, w, R, (stride, padding, dilation))


def alpha_beta_conv2d(a, w, b, R, alpha, beta, eps, ignore_bias=False, stride=(1, 1), padding=(0, 0),
                      dilation=(1, 1)):
    """LRP-αβ on a convolution (see :func:`alpha_beta_dense`)."""
    return _per_position(lambda f, wm, r: alpha_beta_dense(f, wm, b, r, alpha, beta, eps, ignore_bias), a, w, R,
                         (stride, padding, dilation))


def zplus_conv2d(a, w, b, R, eps, ignore_bias=False, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """z⁺ on a convolution (see :func:`zplus_dense`)."""
    return alpha_beta_conv2d(a, w, b, R, 1.0, 0.0, eps, ignore_bias, stride, padding, dilation)


def zbox_conv2d(a, w, R, low, high, eps, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """z^B on a convolution: the bounds are padded with 0 like the input (see :func:`zbox_dense`)."""
    geometry = (stride, padding, dilation)
    n, q = R.shape[0], R.shape[2] * R.shape[3]

    def fields_of(v):
        full = np.ascontiguousarray(np.broadcast_to(np.asarray(v, dtype=a.dtype), a.shape))
        return receptive_fields(full, w.shape[2:], *geometry).transpose(0, 2, 1).reshape(n * q, -1)

    lo, hi = fields_of(low), fields_of(high)

    def rule(f, wm, r):
        wt = wm.T[None]
        q_ij = f[:, :, None] * wt - lo[:, :, None] * _pos(wt) - hi[:, :, None] * _neg(wt)
        return redistribute(q_ij, q_ij.sum(axis=1), r, eps)

    return _per_position(rule, a, w, R, geometry)


def wsquare_conv2d(a, w, R, eps, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """w² on a convolution: only real inputs count in the denominator (see :func:`wsquare_dense`)."""
    conn = _connected(a, w, (stride, padding, dilation))
    return _per_position(lambda f, wm, r: wsquare_dense(wm, r, eps, conn), a, w, R, (stride, padding, dilation))


def flat_conv2d(a, w, R, eps, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """flat on a convolution: R_j spread evenly over the real inputs of j (see :func:`flat_dense`)."""
    conn = _connected(a, w, (stride, padding, dilation))
    return _per_position(lambda f, wm, r: flat_dense(wm, r, eps, conn), a, w, R, (stride, padding, dilation))
