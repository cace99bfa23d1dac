r"""What a unit responds to: top activations, projections, receptive fields, activation maximisation.

- :func:`top_activations` -- Zeiler & Fergus (2014), "Visualizing and understanding
  convolutional networks": the k largest activations of every channel of a layer over a
  data set, streamed in batches (memory bounded by ``batch_size`` and ``k``).
- :func:`project` -- one unit's activation projected down to pixel space through any
  method (the DeconvNet by default), seeded at the unit: ``explain(net, x, method,
  target=Unit(layer, channel, position))``.
- :func:`receptive_field` -- the input window a unit sees, from the layer geometry
  (kernel, stride, padding, dilation of every conv and pooling layer on the way down).
- :func:`feature_grid` -- the paper's figure: each top activation's projection beside the
  input patch that caused it, both cropped to the unit's receptive field.
- :func:`maximize` -- activation maximisation (Erhan et al. 2009; Simonyan et al. 2013):
  gradient ascent on the input for a class logit or a unit, with Simonyan's L2 decay and
  the jitter / Gaussian-blur regularisers of later work (Yosinski et al. 2015).

The functions that seed a backward sweep at a hidden unit or read a hidden layer go
through the three helpers of the section "engine bridge" below, and nowhere else.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import _config
from . import _validate as V
from ._backend import array_namespace, to_numpy

__all__ = ["top_activations", "TopActivations", "project", "receptive_field", "feature_grid", "maximize",
           "Maximized"]


# -- argument checks ------------------------------------------------------------------------------------
from ._validate import check_int as _check_int  # noqa: E402


def _check_real(where, name, value, minimum=None, strict=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{where}: {name}={value!r} is invalid; expected a finite number")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        raise ValueError(f"{where}: {name}={value!r} is invalid; expected a number {'>' if strict else '>='} {minimum}")
    return float(value)


def _resolve_layer(net, where, layer):
    n = len(net.layers)
    layer = _check_int(where, "layer", layer, -n)
    if layer >= n:
        raise ValueError(f"{where}: layer={layer} is out of range; the net has layers 0..{n - 1}")
    return layer + n if layer < 0 else layer


def _parents(net, i):
    """Parent layer indices of layer i (-1: the net input)."""
    return tuple(net.parents(i))


# -- engine bridge: the only places that read hidden layers or seed sweeps at them ------------------------
def _layer_output(net, x, layer, backend=None):
    """The output of layer ``layer`` for the (validated) input ``x``; only the layers up to it run."""
    return net.trace(x, backend, keep=False, check=False, upto=layer).output


def _unit_map(net, x, unit, method="gradient", backend=None, **options):
    """``explain(net, x, method, target=unit)``: a backward sweep seeded at one unit of a hidden layer."""
    from .methods import explain

    return explain(net, x, method, target=unit, backend=backend, **options)


def _unit_value(a, unit):
    """The unit's activation per sample from its layer's output ``a`` (``relprop.Unit.value``)."""
    return unit.value(a)


def _unit(net, where, unit, in_shape):
    """Validate a ``relprop.Unit`` against the net (layer, channel and position exist); its layer index."""
    from .engine import Unit

    if not isinstance(unit, Unit):
        raise TypeError(f"{where}: unit must be a relprop.Unit(layer=, channel=, position=), got {unit!r}")
    try:
        return unit.resolve(net, (1,) + tuple(in_shape))[0]
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


# -- top activations -------------------------------------------------------------------------------------
@dataclass
class TopActivations:
    """The k largest activations of every channel of one layer over a data set.

    Attributes
    ----------
    layer : int
    channels : ndarray (C,)
        The channels, in the order of the rows below.
    values : ndarray (C, k)
        Activations, largest first.
    index : ndarray (C, k) of int64
        The sample (its index in the data set) of every activation.
    position : ndarray (C, k, 2) of int64
        Its (row, column) in the layer's feature map.
    distinct : bool
        True: at most one activation per sample and channel (its maximum over positions).
    """

    layer: int
    channels: np.ndarray
    values: np.ndarray
    index: np.ndarray
    position: np.ndarray
    distinct: bool = True

    @property
    def k(self):
        return self.values.shape[1]

    def units(self, row):
        """The ``relprop.Unit`` of every top activation of channel row ``row`` (for :func:`project`)."""
        from .engine import Unit

        c = int(self.channels[row])
        return [Unit(layer=self.layer, channel=c, position=(int(i), int(j))) for i, j in self.position[row]]


def _batches(where, data, batch_size):
    """Yield ``(offset, batch)`` from an array-like (sliced) or an iterable of batches."""
    if hasattr(data, "shape") and hasattr(data, "__getitem__"):
        n = int(data.shape[0])
        if n == 0:
            raise ValueError(f"{where}: data is empty (shape {tuple(data.shape)})")
        for s in range(0, n, batch_size):
            yield s, data[s:s + batch_size]
        return
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(f"{where}: data must be an array (N, ...) or an iterable of batches, "
                        f"got {type(data).__name__}") from None
    offset = 0
    for batch in it:
        yield offset, batch
        offset += int(batch.shape[0])
    if offset == 0:
        raise ValueError(f"{where}: data is empty (no samples in any batch)")


def _merge_top(vals, keys, new_vals, new_keys, k):
    """Keep the k best of (running ∪ new) per row: larger value first, then the smaller key."""
    v = np.concatenate([vals, new_vals], axis=1)
    key = np.concatenate([keys, new_keys], axis=1)
    order = np.lexsort((key, -v), axis=1)[:, :k]  # the last key is primary
    return np.take_along_axis(v, order, 1), np.take_along_axis(key, order, 1)


def _best_k_rows(a, keys0, k):
    """Per row of ``a`` (C, M) the k best entries (value desc, then column asc = key asc)."""
    c, m = a.shape
    if m <= k:
        cols = np.broadcast_to(np.arange(m), (c, m))
    else:
        kth = -np.partition(-a, k - 1, axis=1)[:, k - 1]  # the k-th largest value per row
        cols = np.empty((c, k), dtype=np.int64)
        for r in range(c):
            above = np.flatnonzero(a[r] > kth[r])  # fewer than k
            ties = np.flatnonzero(a[r] == kth[r])[:k - above.size]  # the smallest columns first
            cols[r] = np.sort(np.concatenate([above, ties]))
    return np.take_along_axis(a, cols, 1), keys0 + cols


def top_activations(net, data, layer, channels=None, k=9, batch_size=None, distinct=True, backend=None,
                    progress=False):
    r"""The k largest activations of every channel of ``layer`` over ``data`` (Zeiler & Fergus 2014).

    For channel c of the layer's output :math:`A \in \mathbb R^{N \times C \times H \times W}`,
    the k largest :math:`A_{n,c,i,j}`, with their sample n and position (i, j).  Ties are
    broken by the smaller sample index, then the smaller position (row-major).  With
    ``distinct=True`` (the paper's figure: nine different images) each sample contributes
    at most its maximum over positions (its first maximum in row-major order); with
    ``distinct=False`` every (sample, position) pair competes.

    The data are streamed: only one batch of activations and C·k candidates exist at a
    time, whatever ``len(data)``.  On a chain only layers 0..layer run.

    Parameters
    ----------
    net : relprop.nets.Sequential or Graph
    data : array (N, ...) or iterable of arrays
        Inputs in the net's layout; an array (NumPy, memory-mapped, zarr: anything sliced
        with ``data[a:b]``) or an iterable of batches (sample indices count across them).
    layer : int
        A layer whose output is a feature map (N, C, H, W).
    channels : None or sequence of int
        The channels to keep (default: all).
    k : int >= 1
        How many per channel (fewer when the data set has fewer samples or positions).
    batch_size : int, optional
        Samples per forward pass (default ``relprop._config.DEFAULT_BATCH_SIZE``).
    distinct : bool
        One activation per sample and channel (default) or any number.
    progress : bool
        Show a tqdm bar over the batches.

    Returns
    -------
    TopActivations
    """
    where = "top_activations"
    layer = _resolve_layer(net, where, layer)
    k = _check_int(where, "k", k, 1)
    batch_size = _config.DEFAULT_BATCH_SIZE if batch_size is None else _check_int(where, "batch_size", batch_size, 1)
    keep = None
    vals = keys = None
    hw = None
    batches = _batches(where, data, batch_size)
    if progress:
        from tqdm.auto import tqdm

        total = math.ceil(data.shape[0] / batch_size) if hasattr(data, "shape") else None
        batches = tqdm(batches, total=total, desc=where, unit="batch")
    for offset, xb in batches:
        if not hasattr(xb, "dtype") or xb.dtype not in V.FLOAT_DTYPES:
            xb = np.asarray(xb)
        net.check_input(xb, where=f"{where}: data[{offset}:{offset + xb.shape[0]}]")
        a = _layer_output(net, xb, layer, backend)
        if a.ndim != 4:
            kind = getattr(net.layers[layer], "kind", "?")
            raise ValueError(f"{where}: layer={layer} ({kind}) outputs shape {tuple(a.shape)}, which has no "
                             "channels; pick a layer whose output is a feature map (N, C, H, W)")
        a = to_numpy(a)
        b, c_all, h, w = a.shape
        if keep is None:
            hw = h * w
            if channels is None:
                keep = np.arange(c_all)
            else:
                keep = np.asarray(channels)
                if keep.ndim != 1 or keep.size == 0 or not np.issubdtype(keep.dtype, np.integer):
                    raise ValueError(f"{where}: channels={channels!r} is invalid; expected a non-empty list of ints")
                if keep.min() < 0 or keep.max() >= c_all:
                    raise ValueError(f"{where}: channels={channels!r} is out of range; layer {layer} has "
                                     f"{c_all} channels")
            vals = np.empty((keep.size, 0), dtype=a.dtype)
            keys = np.empty((keep.size, 0), dtype=np.int64)
        a = a[:, keep].reshape(b, keep.size, hw)
        if distinct:  # per sample its first maximum over positions; key = n·HW + position
            pos = a.argmax(axis=2)  # (B, C)
            best = np.take_along_axis(a, pos[..., None], 2)[..., 0].T  # (C, B)
            bv, cols = _best_k_rows(best, 0, k)
            samples = offset + cols
            bk = samples * hw + np.take_along_axis(pos.T, cols, 1)
        else:  # every (sample, position): key = n·HW + position, columns in key order
            flat = a.transpose(1, 0, 2).reshape(keep.size, b * hw)
            bv, bk = _best_k_rows(flat, offset * hw, k)
        vals, keys = _merge_top(vals, keys, bv, np.asarray(bk, dtype=np.int64), k)
    index, pix = np.divmod(keys, hw)
    position = np.stack([pix // w, pix % w], axis=-1)
    return TopActivations(layer=layer, channels=keep, values=vals, index=index, position=position,
                          distinct=bool(distinct))


# -- receptive fields -------------------------------------------------------------------------------------
_PASS_THROUGH = ("relu", "identity", "dropout", "batchnorm2d", "add", "concat")


def _window_span(lo, hi, kernel, stride, padding, dilation, size):
    """The first and last input row (inside [0, size)) that output rows lo..hi of a window layer read.

    Output row r reads the taps r·s − p + t·d, t = 0..k−1; taps in the padding read nothing,
    so with dilation the span starts at the first tap inside the image, not at the border.
    """
    taps = np.arange(lo, hi + 1)[:, None] * stride - padding + np.arange(kernel)[None, :] * dilation
    inside = taps[(taps >= 0) & (taps < size)]
    if inside.size == 0:  # only padding: nothing of the input (cannot happen for valid geometry)
        return 0, -1
    return int(inside.min()), int(inside.max())


def receptive_field(net, layer, position, input_shape):
    r"""The input window that unit ``position`` of layer ``layer``'s output depends on.

    Walks the layer geometry down to the input: output rows :math:`[a, b]` of a window
    layer (conv, max/avg pool) with kernel k, stride s, padding p and dilation d read the
    input rows :math:`[a s - p,\; b s - p + d (k - 1)]`; elementwise layers (ReLU, batch
    norm, dropout, identity) keep the window; an adaptive average pool reads its bins; where
    a layer has several inputs (add, concat) the window is the union (bounding box) over
    the paths.  The result is clipped to the image.  The window is the same for every
    channel of the layer (behind a concat, one channel may depend on a smaller part of it).

    Parameters
    ----------
    net : relprop.nets.Sequential or Graph
    layer : int
        A layer whose output is a feature map (N, C, H, W).
    position : (int, int)
        (row, column) in that feature map.
    input_shape : tuple
        The net input's shape, (C, H, W) or (N, C, H, W).

    Returns
    -------
    (slice, slice)
        Rows and columns of the input.
    """
    where = "receptive_field"
    layer = _resolve_layer(net, where, layer)
    in_shape = tuple(int(s) for s in input_shape)
    if len(in_shape) == 3:
        in_shape = (1,) + in_shape
    if len(in_shape) != 4:
        raise ValueError(f"{where}: input_shape={input_shape!r} is invalid; expected (C, H, W) or (N, C, H, W)")
    shapes = net.shapes(in_shape)
    out = shapes[layer]
    if len(out) != 4:
        raise ValueError(f"{where}: layer {layer} outputs {tuple(out)}, which has no spatial positions")
    i, j = (int(p) for p in position)
    if not (0 <= i < out[2] and 0 <= j < out[3]):
        raise ValueError(f"{where}: position={position!r} is out of range for layer {layer}'s {out[2]}x{out[3]} map")

    def in_hw(idx):
        parents = _parents(net, idx)
        shape = in_shape if parents[0] == -1 else shapes[parents[0]]
        return shape[2:]

    boxes = {}  # layer index (-1: the input) -> (r0, r1, c0, c1) inclusive, merged over paths

    def visit(idx, box):
        if idx == -1:
            old = boxes.get(-1)
            boxes[-1] = box if old is None else (min(old[0], box[0]), max(old[1], box[1]),
                                                   min(old[2], box[2]), max(old[3], box[3]))
            return
        lyr = net.layers[idx]
        kind = lyr.kind
        h, w = in_hw(idx)
        r0, r1, c0, c1 = box
        if kind in ("conv2d", "maxpool2d", "avgpool2d"):
            dil = getattr(lyr, "dilation", (1, 1))
            r0, r1 = _window_span(r0, r1, lyr.kernel[0], lyr.stride[0], lyr.padding[0], dil[0], h)
            c0, c1 = _window_span(c0, c1, lyr.kernel[1], lyr.stride[1], lyr.padding[1], dil[1], w)
        elif kind == "adaptive_avgpool2d":  # bin i reads [floor(i H / h), ceil((i + 1) H / h))
            ho, wo = shapes[idx][2:]
            r0, r1 = (r0 * h) // ho, -(-((r1 + 1) * h) // ho) - 1
            c0, c1 = (c0 * w) // wo, -(-((c1 + 1) * w) // wo) - 1
        elif kind not in _PASS_THROUGH:
            raise ValueError(f"{where}: layer {idx} ({kind}) lies between the input and layer {layer}; "
                             "its receptive field is not defined from the layer geometry")
        for p in _parents(net, idx):
            visit(p, (r0, r1, c0, c1))

    visit(layer, (i, i, j, j))
    r0, r1, c0, c1 = boxes[-1]
    return slice(r0, r1 + 1), slice(c0, c1 + 1)


def receptive_field_size(net, layer, input_shape):
    """The unclipped (height, width) of the receptive field of one unit of ``layer`` (an interior one)."""
    in_shape = tuple(int(s) for s in input_shape)
    in_shape = (1,) + in_shape if len(in_shape) == 3 else in_shape
    out = net.shapes(in_shape)[_resolve_layer(net, "receptive_field_size", layer)]
    if len(out) != 4:
        raise ValueError(f"receptive_field_size: layer {layer} outputs {tuple(out)}, which has no spatial positions")
    best = (0, 0)
    for i in range(out[2]):
        for j in range(out[3]):
            r, c = receptive_field(net, layer, (i, j), in_shape)
            best = (max(best[0], r.stop - r.start), max(best[1], c.stop - c.start))
        if best[0] and i > out[2] // 2:
            break
    return best


# -- projection ----------------------------------------------------------------------------------------
def project(net, x, unit, method="deconvnet", backend=None, **options):
    r"""Project one unit's activation down to pixel space (Zeiler & Fergus 2014).

    ``explain(net, x[None], method, target=unit)[0]``: the backward sweep of ``method``
    seeded at the unit (1 at the unit for the DeconvNet, gradient and Guided Backprop;
    the unit's activation for relevance methods) and zero at every other unit of its
    layer, as the paper projects one activation with all others in the layer set to zero.

    Parameters
    ----------
    net : relprop.nets.Sequential or Graph
    x : array
        One input (C, H, W) / (D,), or a batch of one.
    unit : relprop.Unit
    method : str
        Any registered method (default ``"deconvnet"``); ``options`` are passed to it.

    Returns
    -------
    array of x's shape
    """
    where = "project"
    V.check_float_array("x", x, None, where)
    single = x.ndim == net.input_ndim - 1
    xb = x[None] if single else x
    if xb.ndim != net.input_ndim or xb.shape[0] != 1:
        raise ValueError(f"{where}: x has shape {tuple(x.shape)}; expected one input (a batch of one or none)")
    net.check_input(xb, where=where)
    _unit(net, where, unit, xb.shape[1:])
    r = _unit_map(net, xb, unit, method, backend, **options)
    return r[0] if single else r


# -- the paper's figure -------------------------------------------------------------------------------------
def _crop(img, rows, cols, size):
    """img[..., rows, cols] placed in a NaN canvas of ``size`` (border units have clipped fields)."""
    h, w = size
    out = np.full(img.shape[:-2] + (h, w), np.nan)
    part = img[..., rows, cols]
    # clipped at the top/left: align to the bottom/right of the canvas, else the top/left
    r0 = h - part.shape[-2] if rows.start == 0 and part.shape[-2] < h else 0
    c0 = w - part.shape[-1] if cols.start == 0 and part.shape[-1] < w else 0
    out[..., r0:r0 + part.shape[-2], c0:c0 + part.shape[-1]] = part
    return out


def feature_grid(net, data, top, rows=None, method="deconvnet", path=None, title=None, footnote=None, ink=True,
                 backend=None, **options):
    """Zeiler & Fergus's figure: per channel, its top activations projected to pixel space beside
    the input patches that caused them, both cropped to the unit's receptive field.

    Parameters
    ----------
    net : relprop.nets.Sequential or Graph
    data : array (N, ...)
        The data set ``top`` was computed on (sample indices refer to it).
    top : TopActivations
        From :func:`top_activations`.
    rows : None or sequence of int
        Which rows (channels) of ``top`` to draw (default: all).
    method : str
        The projection method (default the DeconvNet).
    path : str or Path, optional
        Save the figure there (PNG).
    title, footnote : str, optional
    ink : bool
        Draw high input values dark (digits); False for photographs.
    options
        Passed to the projection method.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from . import viz

    rows = range(len(top.channels)) if rows is None else rows
    in_shape = tuple(data.shape[1:])
    size = receptive_field_size(net, top.layer, in_shape)
    projections, patches, titles = [], [], []
    for r in rows:
        proj, patch = [], []
        for n, unit in zip(top.index[r], top.units(r)):
            x = np.asarray(data[int(n)])
            p = np.asarray(to_numpy(project(net, x, unit, method, backend, **options)))
            rr, cc = receptive_field(net, top.layer, unit.position, in_shape)
            proj.append(_crop(p, rr, cc, size))
            patch.append(_crop(x, rr, cc, size))
        projections.append(np.stack(proj))
        patches.append(np.stack(patch))
        titles.append(f"channel {int(top.channels[r])}")
    return viz.feature_grid(projections, patches, titles=titles, path=path, title=title, footnote=footnote, ink=ink)


# -- activation maximisation ---------------------------------------------------------------------------
@dataclass
class Maximized:
    """The result of :func:`maximize`.

    Attributes
    ----------
    image : ndarray (T, *shape)
        The synthesised input per target.
    activations : ndarray (T, steps + 1)
        The target's activation (class logit or unit) at the image before the first step
        (column 0) and after every step.
    targets : list
    """

    image: np.ndarray
    activations: np.ndarray
    targets: list


def _is_unit(t):
    from .engine import Unit

    return isinstance(t, Unit)


def maximize(net, target, shape, steps=200, lr=0.1, l2=1e-3, jitter=0, blur_every=0, blur_sigma=0.5, clip=None,
             init="uniform", seed=None, batch_size=None, backend=None, dtype=np.float32, progress=False):
    r"""Activation maximisation: the input that maximises a class logit or a unit.

    Gradient ascent on Simonyan et al.'s (2013) regularised objective
    :math:`x^\ast = \arg\max_x S(x) - \lambda \lVert x \rVert_2^2`:

    .. math:: x_{t+1} = \mathrm{clip}\big(x_t + \eta\,(\nabla S(\tilde x_t) - 2 \lambda x_t)\big),

    where S is the class logit f_c or the activation of a ``relprop.Unit`` (Erhan et al.
    2009), :math:`\tilde x_t` is x_t shifted by a random jitter of up to ``jitter`` pixels
    (the gradient shifted back), every ``blur_every`` steps x is smoothed by a Gaussian of
    ``blur_sigma`` pixels (``scipy.ndimage.gaussian_filter`` over the spatial axes), and
    ``clip=(low, high)`` keeps x in the input box.  For a linear unit :math:`w^\top x`
    without clipping the fixed point is :math:`x^\ast = w / (2\lambda)`.

    Parameters
    ----------
    net : relprop.nets.Sequential or Graph
    target : int, relprop.Unit, or a list of them
        Class logits are ascended together in one batch; units one at a time.
    shape : tuple
        One input's shape, (C, H, W) or (D,).
    steps : int >= 1
    lr : float > 0
        Step size η.
    l2 : float >= 0
        L2 decay λ.
    jitter : int >= 0
        Maximum random shift in pixels per step (images only).
    blur_every : int >= 0
        Blur every this many steps (0: never).
    blur_sigma : float > 0
    clip : None or (low, high)
    init : "uniform" | "zeros" | array
        Start point: U(low, high) of ``clip`` (U(0, 1) without), zeros, or a given array
        of ``shape`` (or (T, *shape)).
    seed : None | int | numpy.random.Generator
        Draws of the start point and the jitter.
    batch_size : int, optional
        Class targets ascended together (default ``relprop._config.DEFAULT_BATCH_SIZE``).
    dtype : float32 or float64
    progress : bool
        A tqdm bar over the steps.

    Returns
    -------
    Maximized
    """
    where = "maximize"
    targets = list(target) if isinstance(target, (list, tuple)) and not _is_unit(target) else [target]
    if not targets:
        raise ValueError(f"{where}: target is an empty list")
    shape = tuple(int(s) for s in shape)
    if len(shape) != net.input_ndim - 1:
        raise ValueError(f"{where}: shape={shape!r} is invalid; the net takes inputs of {net.input_ndim - 1} "
                         "dimensions per sample")
    net.shapes((1,) + shape)
    steps = _check_int(where, "steps", steps, 1)
    lr = _check_real(where, "lr", lr, 0.0, strict=True)
    l2 = _check_real(where, "l2", l2, 0.0)
    jitter = _check_int(where, "jitter", jitter, 0)
    blur_every = _check_int(where, "blur_every", blur_every, 0)
    blur_sigma = _check_real(where, "blur_sigma", blur_sigma, 0.0, strict=True)
    if (jitter or blur_every) and len(shape) != 3:
        raise ValueError(f"{where}: jitter and blur need image inputs (C, H, W), got shape {shape}")
    if clip is not None:
        low, high = (_check_real(where, "clip", c) for c in clip)
        if not low < high:
            raise ValueError(f"{where}: clip={clip!r} is invalid; expected (low, high) with low < high")
    dtype = np.dtype(dtype)
    if dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"{where}: dtype={dtype} is invalid; expected float32 or float64")
    n_out = net.shapes((1,) + shape)[-1][1]
    for t in targets:
        if _is_unit(t):
            _unit(net, where, t, shape)
        elif isinstance(t, numbers.Integral) and not isinstance(t, bool):
            if not 0 <= int(t) < n_out:
                raise ValueError(f"{where}: target {t} is out of range for {n_out} outputs")
        else:
            raise TypeError(f"{where}: target must be an int (a class), a relprop.Unit or a list of them, got {t!r}")
    rng = np.random.default_rng(seed)
    lo, hi = (0.0, 1.0) if clip is None else (low, high)
    T = len(targets)
    if isinstance(init, str):
        if init == "uniform":
            x0 = rng.uniform(lo, hi, size=(T,) + shape)
        elif init == "zeros":
            x0 = np.zeros((T,) + shape)
        else:
            raise ValueError(f"{where}: init={init!r} is invalid; expected 'uniform', 'zeros' or an array")
    else:
        x0 = np.asarray(init, dtype=np.float64)
        if x0.shape == shape:
            x0 = np.broadcast_to(x0, (T,) + shape)
        if x0.shape != (T,) + shape:
            raise ValueError(f"{where}: init has shape {x0.shape}, expected {shape} or {(T,) + shape}")
        V.check_finite("init", x0, where)
    x0 = x0.astype(dtype)

    classes = [i for i, t in enumerate(targets) if not _is_unit(t)]
    units = [i for i, t in enumerate(targets) if _is_unit(t)]
    batch_size = _config.DEFAULT_BATCH_SIZE if batch_size is None else _check_int(where, "batch_size", batch_size, 1)
    groups = [(classes[s:s + batch_size], np.asarray([targets[i] for i in classes[s:s + batch_size]], dtype=np.int64))
              for s in range(0, len(classes), batch_size)]
    groups += [([i], targets[i]) for i in units]
    images = np.empty_like(x0)
    acts = np.empty((T, steps + 1))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps * len(groups), desc=where, unit="step")
    for rows, tgt in groups:
        img, curve = _ascend(net, x0[rows], tgt, steps, lr, l2, jitter, blur_every, blur_sigma, clip, rng, backend,
                             bar)
        images[rows] = img
        acts[rows] = curve
    if bar is not None:
        bar.close()
    return Maximized(image=images, activations=acts, targets=targets)


def _device(x, backend):
    """The host image ``x`` on the device when the backend is CUDA on a real GPU (maximize keeps x on the host)."""
    from ._backend import simulator_enabled

    if backend == "cuda" and not simulator_enabled():
        import cupy

        return cupy.asarray(x)
    return x


def _objective(net, x, tgt, backend):
    """(S(x) per sample, ∇S(x)) for class targets (an int array) or one Unit."""
    from .methods import explain

    x = _device(x, backend)

    if _is_unit(tgt):
        s = _unit_value(_layer_output(net, x, tgt.layer % len(net.layers), backend), tgt)
        return s, _unit_map(net, x, tgt, "gradient", backend)
    logits = net.forward(x, backend)
    rows = array_namespace(logits).arange(x.shape[0])
    return logits[rows, array_namespace(logits).asarray(tgt)], explain(net, x, "gradient", target=tgt, backend=backend)


def _ascend(net, x, tgt, steps, lr, l2, jitter, blur_every, blur_sigma, clip, rng, backend, bar):
    from scipy.ndimage import gaussian_filter

    curve = np.empty((x.shape[0], steps + 1))
    x = np.array(x)
    for t in range(steps):
        if jitter:
            dy, dx = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
            xs = np.roll(x, (dy, dx), axis=(-2, -1))
            s, g = _objective(net, xs, tgt, backend)
            g = np.roll(to_numpy(g), (-dy, -dx), axis=(-2, -1))
            if t == 0:
                s = _objective(net, x, tgt, backend)[0]
        else:
            s, g = _objective(net, x, tgt, backend)
        if t == 0 or not jitter:
            curve[:, t] = to_numpy(s)
        if t == 0 and not to_numpy(g).reshape(g.shape[0], -1).any(axis=1).all():
            import warnings

            warnings.warn("maximize: the gradient of the target is zero at the start point (a ReLU unit that is "
                          "off stays off); maximise the pre-activation (the conv/dense layer before the ReLU) or "
                          "start elsewhere (init=)", RuntimeWarning, stacklevel=3)
        x += (lr * (to_numpy(g) - 2.0 * l2 * x)).astype(x.dtype)
        if blur_every and (t + 1) % blur_every == 0:
            x = gaussian_filter(x, sigma=(0, 0, blur_sigma, blur_sigma), mode="nearest").astype(x.dtype)
        if clip is not None:
            np.clip(x, clip[0], clip[1], out=x)
        if not np.isfinite(x).all():
            raise ValueError(f"maximize: the image diverged at step {t + 1} (lr={lr} is too large for this "
                             f"objective; lower it or raise l2)")
        if jitter:
            curve[:, t + 1] = to_numpy(_objective_value(net, x, tgt, backend))
        if bar is not None:
            bar.update(1)
    if not jitter:
        curve[:, steps] = to_numpy(_objective_value(net, x, tgt, backend))
    return x, curve


def _objective_value(net, x, tgt, backend):
    x = _device(x, backend)
    if _is_unit(tgt):
        return _unit_value(_layer_output(net, x, tgt.layer % len(net.layers), backend), tgt)
    logits = net.forward(x, backend)
    xp = array_namespace(logits)
    return logits[xp.arange(x.shape[0]), xp.asarray(tgt)]
