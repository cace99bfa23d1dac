"""Heatmaps as pictures: relevance → RGB, and grids of inputs × methods saved as PNG.

The customary picture of an explanation: a diverging map centred at zero, red for
positive relevance (evidence for the class), blue for negative, white for none, scaled
symmetrically per heatmap by max |R| or a high percentile of |R| (so one hot pixel does
not wash out the rest), optionally blended over the grey input.

:func:`heatmap` needs only NumPy (the default "bwr" map is built in); :func:`grid` and
other colour maps need matplotlib (``pip install relprop[viz]``).
"""
from __future__ import annotations

import numpy as np

__all__ = ["heatmap", "grid", "save_heatmap", "to_image"]


def _matplotlib():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "relprop.viz needs matplotlib for figures and colour maps other than 'bwr': "
            "pip install 'relprop[viz]'  (or: pip install matplotlib)"
        ) from exc
    return matplotlib


def to_image(a, image_shape=None):
    """One sample as a 2-D (H, W) array: channels summed, a flat vector reshaped to ``image_shape``."""
    a = np.asarray(a, dtype=np.float64)
    if image_shape is not None:
        a = a.reshape(image_shape)
    if a.ndim == 3:  # (C, H, W): relevance of a pixel is the sum over its channels
        a = a.sum(axis=0)
    if a.ndim == 1:
        side = int(round(np.sqrt(a.size)))
        if side * side != a.size:
            raise ValueError(f"cannot show a vector of {a.size} values as an image; pass image_shape=(H, W)")
        a = a.reshape(side, side)
    if a.ndim != 2:
        raise ValueError(f"expected one sample of shape (H, W), (C, H, W) or a flat vector, got {a.shape}")
    return a


def _bwr(v):
    """matplotlib's 'bwr' (blue → white → red, linear) for v in [0, 1], without matplotlib."""
    v = v[..., None]
    blue, white, red = np.array([0.0, 0.0, 1.0]), np.ones(3), np.array([1.0, 0.0, 0.0])
    return np.where(v < 0.5, blue + (white - blue) * (2 * v), white + (red - white) * (2 * v - 1))


def heatmap(r, percentile=None, cmap="bwr", x=None, blend=0.0, image_shape=None):
    """Relevance of one sample → RGB float image (H, W, 3) in [0, 1].

    Parameters
    ----------
    r : array (H, W), (C, H, W) or flat
        Relevance (channels are summed).
    percentile : float or None
        Scale by this percentile of |R| instead of max |R| (values beyond saturate).
    cmap : str
        A diverging colour map; "bwr" is built in, any other name goes through matplotlib.
    x : array, optional
        The input, shown in grey under the heatmap when ``blend > 0``.
    blend : float in [0, 1]
        How much of the grey input shows where the relevance is ~0 (fades with |R|).
    image_shape : tuple, optional
        Shape to reshape a flat ``r`` (and ``x``) to.
    """
    r = to_image(r, image_shape)
    mag = np.abs(r)
    scale = np.percentile(mag, percentile) if percentile is not None else mag.max()
    if not scale > 0:
        scale = mag.max() if mag.max() > 0 else 1.0
    v = np.clip(r / scale, -1.0, 1.0)
    if cmap == "bwr":
        rgb = _bwr((v + 1) / 2)
    else:
        rgb = np.asarray(_matplotlib().colormaps[cmap]((v + 1) / 2))[..., :3]
    if x is not None and blend > 0:
        g = to_image(x, image_shape)
        lo, hi = g.min(), g.max()
        g = (g - lo) / (hi - lo) if hi > lo else np.zeros_like(g)
        grey = (1 - 0.6 * g)[..., None] * np.ones(3)  # strokes dark on white, like ink
        w = (blend * (1 - np.abs(v)))[..., None]
        rgb = (1 - w) * rgb + w * grey
    return np.clip(rgb, 0.0, 1.0)


def save_heatmap(path, r, **options):
    """Write :func:`heatmap` of one sample to a PNG (via matplotlib)."""
    _matplotlib()
    from matplotlib.image import imsave

    imsave(str(path), heatmap(r, **options))
    return path


def grid(x, heatmaps, path=None, row_titles=None, percentile=99.5, cmap="bwr", blend=0.0, image_shape=None,
         input_title="input", cell_size=1.2, dpi=200, title=None, footnote=None, outline=None):
    """A figure: rows = inputs, columns = the input then one heatmap per method.

    Parameters
    ----------
    x : array (N, ...)
        The inputs (shown in grey).
    heatmaps : dict name -> array (N, ...)
        Relevance per method (column titles are the names), in column order.
    path : str or Path, optional
        Save the figure there as PNG.
    row_titles : list of str, optional
        A label per row (e.g. "class 2").
    percentile, cmap, blend, image_shape
        As in :func:`heatmap`; every heatmap is scaled on its own.
    outline : array (N, H, W) of bool, optional
        A region to outline on the input column (e.g. the ground-truth half).
    title, footnote : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    _matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    n = len(x)
    names = list(heatmaps)
    cols = 1 + len(names)
    first = to_image(x[0], image_shape)
    aspect = first.shape[1] / first.shape[0]
    w_cell, h_cell = cell_size * aspect ** 0.5, cell_size / aspect ** 0.5
    top = 0.45 + (0.35 if title else 0.0)
    bottom = 0.55 if footnote else 0.15
    fig = Figure(figsize=(cols * w_cell + (0.5 if row_titles else 0.1), n * h_cell + top + bottom), dpi=dpi)
    height = n * h_cell + top + bottom
    gs = fig.add_gridspec(n, cols, left=(0.5 / (cols * w_cell + 0.5)) if row_titles else 0.01, right=0.995,
                          top=1 - top / height, bottom=bottom / height, wspace=0.06, hspace=0.08)
    for i in range(n):
        img = to_image(x[i], image_shape)
        for j in range(cols):
            ax = fig.add_subplot(gs[i, j])
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_linewidth(0.4)
                s.set_color("0.6")
            if j == 0:
                ax.imshow(img, cmap="gray_r" if blend else "gray", interpolation="nearest")
                if outline is not None and np.asarray(outline[i]).any():
                    from matplotlib.patches import Rectangle

                    rr, cc = np.nonzero(np.asarray(outline[i]).reshape(img.shape))
                    ax.add_patch(Rectangle((cc.min() - 0.5 + 0.6, rr.min() - 0.5 + 0.6), cc.max() - cc.min() - 0.2,
                                           rr.max() - rr.min() - 0.2, fill=False, edgecolor="#2ca02c", linewidth=1.4))
                if row_titles is not None:
                    ax.set_ylabel(row_titles[i], fontsize=9)
            else:
                rgb = heatmap(heatmaps[names[j - 1]][i], percentile=percentile, cmap=cmap, x=x[i], blend=blend,
                              image_shape=image_shape)
                ax.imshow(rgb, interpolation="nearest")
            if i == 0:
                ax.set_title(input_title if j == 0 else names[j - 1], fontsize=9, pad=3)
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.1 / height)
    if footnote:
        fig.text(0.5, 0.18 / height, footnote, ha="center", va="center", fontsize=8, color="0.25")
    if path is not None:
        fig.savefig(str(path), dpi=dpi, facecolor="white")
    return fig
