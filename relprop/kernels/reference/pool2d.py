r"""2-D max and average pooling, their switches, unpooling and VJPs.

Layout: x (N, C, H, W), out (N, C, Ho, Wo); window (kh, kw), stride (sh, sw), padding (ph, pw);
:math:`H_o = \lfloor (H + 2p_h - k_h)/s_h \rfloor + 1` (floor mode, as PyTorch).

Max pooling pads with -inf (padding is never a maximum) and records the **switch** of
every window: the flat index ``h * W + w`` of its maximum in the unpadded input plane.
Ties go to the first maximum in row-major window order (as ``argmax`` in NumPy,
PyTorch, TensorFlow).  Unpooling routes a signal back to the switch positions and sums
where overlapping windows chose the same input.

Average pooling counts the padding: every window divides by kh·kw (PyTorch's
``count_include_pad=True``), so it is the linear map with weights 1/(kh·kw) on the
zero-padded input.
"""
import numpy as np

__all__ = ["maxpool2d_forward", "maxpool2d_values", "maxunpool2d", "gather_at_switches", "avgpool2d_forward",
           "avgpool2d_vjp"]


def maxpool2d_forward(x, kernel, stride, padding, out, switches):
    """Max pooling with switches.  out (N,C,Ho,Wo) float, switches (N,C,Ho,Wo) int64."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, wd = x.shape
    ho, wo = out.shape[2:]
    x_pad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    for i in range(ho):
        for j in range(wo):
            window = x_pad[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].reshape(n, c, kh * kw)
            k = window.argmax(axis=2)  # first maximum in row-major order
            out[:, :, i, j] = np.take_along_axis(window, k[..., None], axis=2)[..., 0]
            row = i * sh + k // kw - ph
            col = j * sw + k % kw - pw
            switches[:, :, i, j] = row * wd + col
    return out, switches


def maxpool2d_values(x, kernel, stride, padding, out):
    """The maxima of :func:`maxpool2d_forward` alone (a forward pass that records no switches)."""
    return maxpool2d_forward(x, kernel, stride, padding, out, np.empty(out.shape, np.int64))[0]


def maxunpool2d(g, switches, out):
    """Route g (N,C,Ho,Wo) to the switch positions of out (N,C,H,W), summing collisions."""
    n, c, h, wd = out.shape
    out[...] = 0
    plane = np.arange(n * c).reshape(n, c, 1, 1) * (h * wd)  # offset of each (n, c) plane
    np.add.at(out.reshape(-1), (plane + switches).reshape(-1), g.reshape(-1))
    return out


def gather_at_switches(z, switches, out):
    """A map read at a max-pool's switches: out[n, c, i, j] = z[n, c].flat[switches[n, c, i, j]], out and
    switches (N,C,Ho,Wo), z (N,C,H,W) the pooled map's shape.  The values of another map where the
    pool's windows chose (an LRP rule's modified forward z' = W'a + b' under a max-pool: the only
    places relevance reaches)."""
    n, c = z.shape[:2]
    out[...] = np.take_along_axis(z.reshape(n, c, -1), switches.reshape(n, c, -1), axis=2).reshape(out.shape)
    return out


def avgpool2d_forward(x, kernel, stride, padding, out):
    """Average pooling, padding included in the count: out = (1/(kh kw)) Σ_window x_pad."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    ho, wo = out.shape[2:]
    x_pad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    for i in range(ho):
        for j in range(wo):
            out[:, :, i, j] = x_pad[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].sum(axis=(2, 3)) / (kh * kw)
    return out


def avgpool2d_vjp(g, kernel, stride, padding, out):
    """VJP of average pooling: every window spreads g/(kh kw) over its (real) inputs."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, wd = out.shape
    ho, wo = g.shape[2:]
    g_pad = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=g.dtype)
    for i in range(ho):
        for j in range(wo):
            g_pad[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw] += g[:, :, i:i + 1, j:j + 1] / (kh * kw)
    out[...] = g_pad[:, :, ph:ph + h, pw:pw + wd]
    return out
