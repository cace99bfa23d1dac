r"""LIME: a local linear surrogate on superpixels (Ribeiro, Singh & Guestrin 2016, "Why should I trust you?").

An input x is cut into S segments (superpixels: scikit-image's SLIC by default, or the
user's segment map; for flat inputs every feature is a segment).  A perturbation
:math:`z \in \{0, 1\}^S` keeps the segments with :math:`z_s = 1` and switches the others
off to the baseline,

.. math:: x_z = x \odot M(z) + b \odot (1 - M(z)),

the net is evaluated on n perturbations (the first one is x itself, z = 1; the others draw
every :math:`z_s` from Bernoulli(1/2), as the ``lime`` package does for images), and a
weighted ridge regression fits the target logit :math:`f_c(x_z)` on z,

.. math:: \beta = \arg\min_{\beta_0, \beta} \sum_i \pi(z_i) \big(f_c(x_{z_i}) - \beta_0 - \beta^\top z_i\big)^2
          + \alpha \lVert \beta \rVert^2 ,

with the exponential kernel on the cosine distance to the unperturbed z = 1,
:math:`d(z) = 1 - \frac{z \cdot 1}{\lVert z \rVert \sqrt S} = 1 - \sqrt{|z| / S}` (d = 1 for
z = 0), :math:`\pi(z) = \exp(-d(z)^2 / (2 \sigma^2))` (the ``lime`` package's
:math:`\sqrt{\exp(-d^2/\sigma^2)}`, σ = ``kernel_width``, 0.25 by default).  The heatmap
paints every entry of segment s (all channels) with :math:`\beta_s`.

The perturbed inputs go through the net in batches of ``batch_size``; the fit is the
closed form of the weighted ridge (intercept not penalised), one small S×S solve per
sample.  Registered as ``explain(net, x, "lime", ...)``; :func:`lime` returns the
coefficients, segments and fit quality as well.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import _config
from . import _validate as V
from ._backend import array_namespace, to_numpy
from .methods import Explainer, register_method, resolve_target

__all__ = ["lime", "LimeFit", "slic_segments"]


from ._validate import check_int as _check_int  # noqa: E402


def _check_positive(where, name, value, allow_zero=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">=" if allow_zero else ">"
        raise ValueError(f"{where}: {name}={value!r} is invalid; expected a finite number {bound} 0")
    return float(value)


def slic_segments(x, n_segments=50, compactness=None, sigma=0.0):
    """SLIC superpixels of one image (C, H, W) → int (H, W) labels 0..S-1 (scikit-image).

    ``compactness`` defaults to 10 for RGB (SLIC works in Lab) and to 0.1 × the image's
    value range for other channel counts (SLIC works on the raw values).
    """
    try:
        from skimage.segmentation import slic
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("LIME's default superpixels need scikit-image: pip install 'relprop[lime]' "
                          "(or pass segments=)") from exc
    img = np.moveaxis(np.asarray(to_numpy(x), dtype=np.float64), 0, -1)
    rgb = img.shape[-1] == 3
    if compactness is None:
        span = float(img.max() - img.min())
        compactness = 10.0 if rgb else 0.1 * (span if span > 0 else 1.0)
    labels = slic(img, n_segments=n_segments, compactness=compactness, sigma=sigma, start_label=0,
                  channel_axis=-1, convert2lab=rgb, enforce_connectivity=True)
    return np.unique(labels, return_inverse=True)[1].reshape(labels.shape)  # consecutive 0..S-1


@dataclass
class LimeFit:
    """LIME's surrogate for every sample.

    Attributes
    ----------
    coef : list of ndarray (S_n,)
        β per segment of sample n.
    intercept : ndarray (N,)
        β_0.
    segments : ndarray (N, *item) of int
        The segment of every input entry (segment maps broadcast over channels).
    score : ndarray (N,)
        Weighted R² of the surrogate on its perturbations (how local-linear f is).
    target : ndarray (N,)
    """

    coef: list
    intercept: np.ndarray
    segments: np.ndarray
    score: np.ndarray
    target: np.ndarray

    def heatmap(self):
        """Every input entry painted with its segment's coefficient: (N, *item)."""
        return np.stack([c[s] for c, s in zip(self.coef, self.segments)])


class _Lime:
    where = "lime"

    def __init__(self, net, segments, n_segments, compactness, samples, kernel_width, baseline, alpha, seed,
                 batch_size, progress=False):
        where = self.where
        self.net = net
        self.segments = segments
        self.n_segments = _check_int(where, "n_segments", n_segments, 1)
        self.compactness = None if compactness is None else _check_positive(where, "compactness", compactness)
        self.samples = _check_int(where, "samples", samples, 2)
        self.kernel_width = _check_positive(where, "kernel_width", kernel_width)
        self.alpha = _check_positive(where, "alpha", alpha, allow_zero=True)
        if seed is not None and not isinstance(seed, np.random.Generator) and (
                isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"{where}: seed must be None, an int or a numpy.random.Generator, "
                            f"got {type(seed).__name__}")
        self.seed = seed
        self.batch_size = _config.DEFAULT_BATCH_SIZE if batch_size is None else _check_int(where, "batch_size",
                                                                                         batch_size, 1)
        if isinstance(baseline, str):
            if baseline != "mean":
                raise ValueError(f"{where}: baseline={baseline!r} is invalid; expected a number, an array or 'mean'")
        elif isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
            if not math.isfinite(baseline):
                raise ValueError(f"{where}: baseline={baseline!r} is not finite")
        elif not hasattr(baseline, "shape"):
            raise TypeError(f"{where}: baseline must be a number, an array or 'mean', got {type(baseline).__name__}")
        self.baseline = baseline
        self.progress = bool(progress)

    # -- inputs ---------------------------------------------------------------------------------------
    def _segment_maps(self, x):
        """(N, *item) int segment labels 0..S_n-1 (consecutive) for every input entry."""
        where, n, item = self.where, x.shape[0], tuple(x.shape[1:])
        spatial = item[1:] if len(item) == 3 else item
        if self.segments is None:
            if len(item) != 3:  # flat inputs: every feature is its own segment
                seg = np.broadcast_to(np.arange(item[0]), (n,) + item)
            else:
                seg = np.stack([slic_segments(x[i], self.n_segments, self.compactness) for i in range(n)])
        else:
            seg = np.asarray(to_numpy(self.segments))
            if not np.issubdtype(seg.dtype, np.integer):
                raise TypeError(f"{where}: segments has dtype {seg.dtype}; expected integer segment labels")
            if seg.shape not in (spatial, (n,) + spatial, item, (n,) + item):
                shapes = " or ".join(str(s) for s in dict.fromkeys([spatial, (n,) + spatial, item, (n,) + item]))
                raise ValueError(f"{where}: segments has shape {seg.shape}; expected {shapes} for x of shape "
                                 f"{tuple(x.shape)}")
            if seg.min() < 0:
                raise ValueError(f"{where}: segments has negative labels (min {seg.min()}); expected labels >= 0")
            if seg.shape in (spatial, item):
                seg = np.broadcast_to(seg, (n,) + seg.shape)
        if seg.ndim - 1 < len(item):  # a spatial map (H, W): the same segment for every channel
            seg = np.broadcast_to(seg[:, None], (n,) + item)
        out = np.empty((n,) + item, dtype=np.int64)
        for i in range(n):  # consecutive labels per sample
            out[i] = np.unique(seg[i], return_inverse=True)[1].reshape(item)
        return out

    def _baselines(self, x, seg):
        """(N, *item) baseline values: a number, an array of one item or (N, *item), or each segment's mean."""
        where = self.where
        if isinstance(self.baseline, str):  # "mean": each segment's mean value, channel by channel
            xs = np.asarray(to_numpy(x), dtype=np.float64)
            base = np.empty(x.shape, dtype=np.float64)
            for i in range(x.shape[0]):
                for c in (range(x.shape[1]) if x.ndim == 4 else [None]):
                    s, v = (seg[i], xs[i]) if c is None else (seg[i, c], xs[i, c])
                    k = int(seg[i].max()) + 1
                    means = np.bincount(s.ravel(), v.ravel(), k) / np.maximum(np.bincount(s.ravel(), None, k), 1)
                    if c is None:
                        base[i] = means[s]
                    else:
                        base[i, c] = means[s]
            return base.astype(x.dtype)
        if isinstance(self.baseline, numbers.Real):
            return np.full(x.shape, self.baseline, dtype=x.dtype)
        b = np.asarray(to_numpy(self.baseline))
        if b.shape not in (tuple(x.shape[1:]), tuple(x.shape)):
            raise ValueError(f"{where}: baseline has shape {b.shape}; expected {tuple(x.shape[1:])} or "
                             f"{tuple(x.shape)}")
        V.check_finite("baseline", b, where)
        return np.broadcast_to(b, x.shape).astype(x.dtype)

    # -- the fit --------------------------------------------------------------------------------------
    def fit(self, x, target, backend):
        xp = array_namespace(x)
        n = x.shape[0]
        seg = self._segment_maps(x)
        base = self._baselines(x, seg)
        logits = self.net.forward(x, backend)
        targets = to_numpy(resolve_target(logits, target))
        rng = np.random.default_rng(self.seed)
        m = self.samples
        coefs, intercepts, scores = [], np.empty(n), np.empty(n)
        rows = range(n)
        if self.progress:
            from tqdm.auto import tqdm

            rows = tqdm(rows, desc="lime", unit="input")
        for i in rows:
            s_count = int(seg[i].max()) + 1
            z = rng.integers(0, 2, size=(m, s_count), dtype=np.int8)
            z[0] = 1  # the first perturbation is x itself
            f = np.empty(m)
            xi = xp.asarray(x[i])
            delta = xi - xp.asarray(base[i])  # x_z = b + M(z) ⊙ (x − b)
            bi = xp.asarray(base[i])
            seg_i = xp.asarray(seg[i])
            for p0 in range(0, m, self.batch_size):
                zb = xp.asarray(z[p0:p0 + self.batch_size])
                mask = zb[:, seg_i]  # (B, *item) in {0, 1}
                xb = bi + mask.astype(x.dtype) * delta
                out = self.net.forward(xb, backend)
                f[p0:p0 + zb.shape[0]] = to_numpy(out[:, int(targets[i])])
            coef, b0, r2 = _weighted_ridge(z.astype(np.float64), f, _kernel(z, self.kernel_width), self.alpha)
            coefs.append(coef)
            intercepts[i] = b0
            scores[i] = r2
        return LimeFit(coef=coefs, intercept=intercepts, segments=seg, score=scores, target=np.asarray(targets))

    def __call__(self, x, target, backend, return_layers=False):
        if return_layers:
            raise ValueError("lime: return_layers=True is supported by the relevance methods only")
        fit = self.fit(x, target, backend)
        xp = array_namespace(x)
        return xp.asarray(fit.heatmap().astype(x.dtype))


def _kernel(z, kernel_width):
    """π(z) = exp(−d²/(2σ²)), d = cosine distance of z to the all-ones vector (1 for z = 0)."""
    s = z.shape[1]
    on = z.sum(axis=1, dtype=np.float64)
    d = 1.0 - np.sqrt(on / s)
    return np.exp(-d * d / (2.0 * kernel_width ** 2))


def _weighted_ridge(Z, f, w, alpha):
    """argmin Σ w_i (f_i − β0 − βᵀz_i)² + α‖β‖²: (β, β0, weighted R²), intercept unpenalised."""
    sw = w.sum()
    zm = (w @ Z) / sw
    fm = (w @ f) / sw
    Zc, fc = Z - zm, f - fm
    A = (Zc * w[:, None]).T @ Zc + alpha * np.eye(Z.shape[1])
    beta = np.linalg.lstsq(A, (Zc * w[:, None]).T @ fc, rcond=None)[0]
    b0 = fm - zm @ beta
    resid = fc - Zc @ beta
    tot = w @ (fc * fc)
    r2 = 1.0 - (w @ (resid * resid)) / tot if tot > 0 else 1.0
    return beta, float(b0), float(r2)


@register_method("lime")
def lime_method(net, segments=None, n_segments=50, compactness=None, samples=1000, kernel_width=0.25,
                baseline=0.0, alpha=1.0, seed=None, batch_size=None, progress=False):
    r"""LIME (Ribeiro et al. 2016): a weighted ridge surrogate of f_c on superpixels; each segment painted with β_s.

    Parameters
    ----------
    segments : None or int array
        A segment map: (H, W) or (N, H, W) for images (shared by the channels), x's item
        shape or (N, *item) for any input.  None: SLIC superpixels for images
        (scikit-image), one segment per feature for flat inputs.
    n_segments : int
        SLIC's target number of superpixels.
    compactness : float, optional
        SLIC's compactness (see :func:`slic_segments`).
    samples : int >= 2
        Perturbations per sample (the first is the input itself).
    kernel_width : float > 0
        σ of the kernel on the cosine distance.
    baseline : float, array or "mean"
        What switched-off segments become: a value, an array of x's item shape (or x's
        shape), or each segment's mean (the ``lime`` package's default).
    alpha : float >= 0
        Ridge penalty (the ``lime`` package: 1).
    seed : None | int | numpy.random.Generator
    batch_size : int
        Perturbed inputs per forward pass.
    progress : bool
        A tqdm bar over the inputs.
    """
    return _Lime(net, segments, n_segments, compactness, samples, kernel_width, baseline, alpha, seed, batch_size,
                 progress)


def lime(net, x, target=None, backend=None, **options):
    """Run LIME and return the surrogate itself (:class:`LimeFit`): coefficients, segments, R².

    ``explain(net, x, "lime", ...)`` returns ``lime(...).heatmap()``; options as in
    :func:`lime_method`.
    """
    from ._backend import resolve_backend

    explainer = Explainer(net, "lime", backend=backend, **options)
    net.check_input(x, where="lime")
    return explainer._method.fit(x, target, resolve_backend(backend, array_namespace(x)))
