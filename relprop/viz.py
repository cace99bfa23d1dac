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

__all__ = ["heatmap", "grid", "save_heatmap", "to_image", "feature_grid", "maximize_figure", "tcav_figure",
           "lime_figure"]


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
    return _finish(fig, title, footnote, path, dpi, (11, 0.1), (8, 0.18))



# -- figures of the feature-level methods (relprop.visualize, relprop.concepts, LIME) -----------------------
_NAN_GREY = 0.88  # where a crop runs past the image border


def _picture(x, image_shape=None):
    """One input as something imshow can draw: (H, W) grey or (H, W, 3) RGB scaled to [0, 1]; NaN kept."""
    a = np.asarray(x, dtype=np.float64)
    if image_shape is not None:
        a = a.reshape(image_shape)
    if a.ndim == 3 and a.shape[0] == 3:
        a = np.moveaxis(a, 0, -1)
        lo, hi = np.nanmin(a), np.nanmax(a)
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return to_image(a) if a.ndim != 3 else np.nansum(a, axis=0) + np.where(np.isnan(a).all(axis=0), np.nan, 0)


def _signed_rgb(r, image_shape=None, percentile=None):
    """A signed map → bwr RGB, symmetric scale per map (NaN → light grey)."""
    a = np.asarray(r, dtype=np.float64)
    if image_shape is not None:
        a = a.reshape(image_shape)
    nan = np.isnan(a).all(axis=0) if a.ndim == 3 else np.isnan(a)
    img = np.nansum(a, axis=0) if a.ndim == 3 else a
    mag = np.abs(img[~nan]) if (~nan).any() else np.zeros(1)
    scale = np.percentile(mag, percentile) if percentile is not None else mag.max()
    scale = scale if scale > 0 else (mag.max() if mag.max() > 0 else 1.0)
    rgb = _bwr((np.clip(np.where(nan, 0, img) / scale, -1, 1) + 1) / 2)
    rgb[nan] = _NAN_GREY
    return rgb


def _grey(ax, img, ink):
    """Draw a grey picture (NaN as light grey); ``ink``: high values dark (digits on white)."""
    import matplotlib

    cmap = matplotlib.colormaps["gray_r" if ink else "gray"].with_extremes(bad=(_NAN_GREY,) * 3)
    if img.ndim == 3:
        rgb = np.where(np.isnan(img), _NAN_GREY, img)
        ax.imshow(rgb, interpolation="nearest")
    else:
        lo, hi = np.nanmin(img), np.nanmax(img)
        ax.imshow(np.ma.masked_invalid(img), cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1,
                  interpolation="nearest")


def _bare(ax, edge="0.75"):
    ax.set_xticks([])
    ax.set_yticks([])
    for sp in ax.spines.values():
        sp.set_linewidth(0.4)
        sp.set_color(edge)


def _finish(fig, title, footnote, path, dpi, title_style, footnote_style):
    """Title (fontsize, inches below the top) and footnote (fontsize, inches above the bottom) on
    ``fig``, saved to ``path`` when given; returns ``fig``."""
    height = fig.get_size_inches()[1]
    if title:
        fig.suptitle(title, fontsize=title_style[0], y=1 - title_style[1] / height)
    if footnote:
        fig.text(0.5, footnote_style[1] / height, footnote, ha="center", va="center", fontsize=footnote_style[0],
                 color="0.25")
    if path is not None:
        fig.savefig(str(path), dpi=dpi, facecolor="white")
    return fig


def _figure(width, height, dpi):
    _matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi)


def feature_grid(projections, patches, titles=None, path=None, title=None, footnote=None, cols=None, ink=True,
                 cell=0.42, dpi=200):
    """Zeiler & Fergus's figure: per channel, a square of its top activations' projections (left)
    beside the input patches that caused them (right), both cropped to the receptive field.

    Parameters
    ----------
    projections, patches : list (one per channel) of arrays (k, C, h, w) or (k, h, w)
        Crops of equal size; NaN where the receptive field runs past the image border.
    titles : list of str, optional
        One per channel.
    cols : int, optional
        Channel blocks per row (default: up to 4).
    ink : bool
        Draw high input values dark (digits, strokes); False: bright (photographs).
    """
    n = len(projections)
    k = projections[0].shape[0]
    g = int(np.ceil(np.sqrt(k)))
    cols = cols or min(4, n)
    brows = -(-n // cols)
    block_w = 2 * g + 0.5  # two squares and a gap, in cells
    gap = 1.0
    width_cells = cols * block_w + (cols - 1) * gap
    top_in = 0.55 + (0.35 if title else 0)
    bottom_in = 0.45 if footnote else 0.1
    row_h = g + 0.9  # a block row: the squares and its label
    fig = _figure(width_cells * cell + 0.3, brows * row_h * cell + top_in + bottom_in, dpi)
    W, H = fig.get_size_inches()
    for b in range(n):
        br, bc = divmod(b, cols)
        x0 = 0.15 + bc * (block_w + gap) * cell
        y_top = H - top_in - br * row_h * cell - 0.35 * cell
        for side, stack in ((0, projections[b]), (1, patches[b])):
            for t in range(k):
                i, j = divmod(t, g)
                left = x0 + (side * (g + 0.5) + j) * cell
                bottom = y_top - (i + 1) * cell
                ax = fig.add_axes([left / W, bottom / H, 0.94 * cell / W, 0.94 * cell / H])
                _bare(ax)
                if side == 0:
                    ax.imshow(_signed_rgb(stack[t]), interpolation="nearest")
                else:
                    _grey(ax, _picture(stack[t]), ink)
        label = titles[b] if titles else f"channel {b}"
        fig.text((x0 + block_w * cell / 2) / W, (y_top + 0.12 * cell) / H, label, ha="center", va="bottom",
                 fontsize=8)
        if b < cols:
            for side, name in ((0, "projection"), (1, "input patch")):
                fig.text((x0 + (side * (g + 0.5) + g / 2) * cell) / W, (y_top + 0.55 * cell) / H, name,
                         ha="center", va="bottom", fontsize=6.5, color="0.35")
    return _finish(fig, title, footnote, path, dpi, (10, 0.12), (7, 0.2))


def maximize_figure(images, activations, titles=None, path=None, title=None, footnote=None, image_shape=None,
                    ink=True, cols=8, cell=1.25, dpi=200):
    """Synthesised inputs (top) and their activation over the ascent steps (below each).

    Parameters
    ----------
    images : array (T, ...)
        From :func:`relprop.visualize.maximize` (``.image``).
    activations : array (T, steps + 1)
        Its ``.activations``.
    titles : list of str, optional
    image_shape : tuple, optional
        Reshape flat inputs to it.
    cols : int
        Images per row.
    """
    t = len(images)
    cols = min(t, cols)
    rows = -(-t // cols)
    fig = _figure(cols * cell + 0.3, rows * cell * 1.7 + (0.5 if title else 0.2) + (0.5 if footnote else 0), dpi)
    top = 1 - ((0.45 if title else 0.15) / fig.get_size_inches()[1])
    bottom = (0.55 if footnote else 0.25) / fig.get_size_inches()[1]
    gs = fig.add_gridspec(2 * rows, cols, height_ratios=[1, 0.5] * rows, top=top, bottom=bottom, left=0.04,
                          right=0.98, hspace=0.3, wspace=0.3)
    for n in range(t):
        r, c = divmod(n, cols)
        ax = fig.add_subplot(gs[2 * r, c])
        _bare(ax)
        _grey(ax, _picture(images[n], image_shape), ink)
        if titles:
            ax.set_title(titles[n], fontsize=7.5, pad=2)
        ax = fig.add_subplot(gs[2 * r + 1, c])
        curve = np.asarray(activations[n])
        ax.plot(np.arange(curve.size), curve, color="#c0392b", linewidth=1.0)
        ax.tick_params(labelsize=5, length=2, pad=1)
        ax.set_xlim(0, curve.size - 1)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        if c == 0:
            ax.set_ylabel("activation", fontsize=5.5, labelpad=1)
        if r == rows - 1:
            ax.set_xlabel("step", fontsize=5.5, labelpad=1)
    return _finish(fig, title, footnote, path, dpi, (9, 0.1), (6.5, 0.15))


def tcav_figure(results, path=None, title=None, footnote=None, alpha=0.05, examples=None, dpi=200):
    """TCAV scores as grouped bars (Kim et al. 2018, Fig. 4): per class, one bar per concept
    (mean ± std over the random counterparts) beside the random-concept bar; concepts whose
    scores do not differ from the random ones at level ``alpha`` are hatched and marked n.s.

    Parameters
    ----------
    results : dict
        ``{class label: {concept name: relprop.concepts.TCAVResult}}``.
    examples : dict, optional
        ``{concept name: array (k, ...)}``: a few example images drawn under the legend.
    """
    groups = list(results)
    concepts = list(dict.fromkeys(c for g in groups for c in results[g]))
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
    nb = len(concepts) + 1
    width = 0.8 / nb
    extra = 0.75 if examples else 0.0
    fig = _figure(max(4.5, 1.1 * len(groups) * nb * 0.45 + 1.6), 2.9 + extra, dpi)
    H = fig.get_size_inches()[1]
    ax = fig.add_axes([0.09, (0.35 + extra) / H, 0.68, 1 - (0.35 + extra) / H - (0.45 if title else 0.15) / H])
    for gi, g in enumerate(groups):
        rand_means = [r.random_mean for r in results[g].values()]
        rand_stds = [r.random_std for r in results[g].values()]
        for ci, c in enumerate(concepts):
            r = results[g].get(c)
            if r is None:
                continue
            x = gi + (ci - (nb - 1) / 2) * width
            sig = r.significant(alpha)
            ax.bar(x, r.mean, width * 0.92, yerr=r.std, color=colours[ci % len(colours)], alpha=1.0 if sig else 0.35,
                   hatch=None if sig else "///", edgecolor="white", linewidth=0.3, error_kw={"elinewidth": 0.7,
                                                                                             "capsize": 1.5})
            ax.text(x, min(r.mean + r.std, 1.0) + 0.03, "*" if sig else "n.s.", ha="center", va="bottom",
                    fontsize=7 if sig else 5.5, color="0.2")
        x = gi + (nb - 1 - (nb - 1) / 2) * width
        ax.bar(x, float(np.mean(rand_means)), width * 0.92, yerr=float(np.mean(rand_stds)), color="0.7",
               error_kw={"elinewidth": 0.7, "capsize": 1.5})
    ax.axhline(0.5, color="0.5", linewidth=0.5, linestyle=":")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([str(g) for g in groups], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("TCAV score", fontsize=8)
    ax.tick_params(labelsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    from matplotlib.patches import Patch

    handles = [Patch(color=colours[i % len(colours)], label=c) for i, c in enumerate(concepts)]
    handles.append(Patch(color="0.7", label="random concepts"))
    ax.legend(handles=handles, fontsize=6.5, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if examples:
        names = [c for c in concepts if c in examples]
        per = min(4, min(len(examples[c]) for c in names))
        cw = 0.34
        total = len(names) * (per * cw + 0.3)
        W = fig.get_size_inches()[0]
        x0 = max(0.1, (W - total) / 2)
        for ci, c in enumerate(names):
            left = x0 + ci * (per * cw + 0.3)
            fig.text((left + per * cw / 2) / W, (0.2 + cw + 0.1) / H, c, ha="center", fontsize=6,
                     color=colours[concepts.index(c) % len(colours)])
            for e in range(per):
                a = fig.add_axes([(left + e * cw) / W, 0.2 / H, 0.95 * cw / W, 0.95 * cw / H])
                _bare(a)
                _grey(a, _picture(examples[c][e]), True)
    return _finish(fig, title, footnote, path, dpi, (9, 0.1), (6, 0.07))


def _boundaries(seg):
    """True on pixels whose right or lower neighbour lies in another segment."""
    b = np.zeros(seg.shape, dtype=bool)
    b[:, :-1] |= seg[:, 1:] != seg[:, :-1]
    b[:-1, :] |= seg[1:, :] != seg[:-1, :]
    return b


def lime_figure(x, fit, path=None, row_titles=None, others=None, top=5, title=None, footnote=None, ink=True,
                cell=1.3, dpi=200):
    """LIME as in the paper: the input with its superpixels, the coefficient of every segment
    (red: for the class, blue: against), and the input showing only the ``top`` segments with
    the largest positive coefficients; ``others`` adds columns of other methods' heatmaps.

    Parameters
    ----------
    x : array (N, C, H, W)
    fit : relprop.lime.LimeFit
    others : dict name -> array (N, ...), optional
    """
    n = len(x)
    others = others or {}
    cols = 3 + len(others)
    img0 = _picture(x[0])
    aspect = img0.shape[1] / img0.shape[0]
    w_cell, h_cell = cell * aspect ** 0.5, cell / aspect ** 0.5
    top_in = 0.4 + (0.3 if title else 0)
    bottom_in = 0.4 if footnote else 0.1
    fig = _figure(cols * w_cell + 0.45, n * h_cell + top_in + bottom_in, dpi)
    H = fig.get_size_inches()[1]
    gs = fig.add_gridspec(n, cols, left=0.45 / (cols * w_cell + 0.45), right=0.995, top=1 - top_in / H,
                          bottom=bottom_in / H, wspace=0.05, hspace=0.08)
    names = ["input + superpixels", "LIME coefficients", f"top {top} segments"] + list(others)
    for i in range(n):
        seg = np.asarray(fit.segments[i])
        seg2 = seg[0] if seg.ndim == 3 else seg
        pic = _picture(x[i])
        coef = np.asarray(fit.coef[i])
        # 1: the input with the segment borders
        ax = fig.add_subplot(gs[i, 0])
        _bare(ax)
        _grey(ax, pic, ink)
        up = 6  # draw the borders at 1/6 pixel: thin lines between the pixels, not whole pixels
        fine = np.kron(seg2, np.ones((up, up), dtype=seg2.dtype))
        edge = np.zeros(fine.shape + (4,))
        edge[_boundaries(fine)] = (0.95, 0.55, 0.05, 0.95)
        h2, w2 = seg2.shape
        ax.imshow(edge, interpolation="nearest", extent=(-0.5, w2 - 0.5, h2 - 0.5, -0.5))
        if row_titles:
            ax.set_ylabel(row_titles[i], fontsize=8)
        # 2: the coefficients painted on their segments
        ax = fig.add_subplot(gs[i, 1])
        _bare(ax)
        ax.imshow(_signed_rgb(coef[seg2]), interpolation="nearest")
        # 3: only the top positive segments
        ax = fig.add_subplot(gs[i, 2])
        _bare(ax)
        order = np.argsort(-coef, kind="stable")
        keep = [s for s in order[:top] if coef[s] > 0]
        shown = np.isin(seg2, keep)
        if pic.ndim == 3:
            _grey(ax, np.where(shown[..., None], pic, _NAN_GREY), ink)
        else:
            _grey(ax, np.where(shown, pic, np.nan), ink)
        for j, name in enumerate(others):
            ax = fig.add_subplot(gs[i, 3 + j])
            _bare(ax)
            ax.imshow(_signed_rgb(np.asarray(others[name][i]), percentile=99.5), interpolation="nearest")
        if i == 0:
            for j, name in enumerate(names):
                fig.axes[-(cols - j)].set_title(name, fontsize=7.5, pad=3)
    return _finish(fig, title, footnote, path, dpi, (9.5, 0.1), (6.5, 0.18))
