r"""Dense (fully connected) layer: forward and vector-Jacobian product.

Layout (PyTorch's): x (N, I), w (J, I), b (J,), z (N, J).

.. math:: z_{nj} = \sum_i w_{ji} x_{ni} + b_j, \qquad
          (\text{VJP})\; g^{\mathrm{in}}_{ni} = \sum_j w_{ji} g_{nj}
"""

__all__ = ["dense_forward", "dense_vjp"]


def dense_forward(x, w, b, out):
    """z = x W^T + b.  Shapes: x (N, I), w (J, I), b (J,), out (N, J)."""
    out[...] = x @ w.T + b
    return out


def dense_vjp(g, w, out):
    """Input vector-Jacobian product W^T g, per sample: out = g W.  g (N, J), w (J, I), out (N, I)."""
    out[...] = g @ w
    return out
