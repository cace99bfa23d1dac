r"""Evaluating explanations: perturbation curves, AOPC, the randomisation sanity check,
conservation and positivity (MATH.md, "Evaluating explanations" and "Consistency").

- :func:`perturbation_curve` / :func:`aopc`: region perturbation (Samek et al. 2017); all
  perturbed copies of all samples go through the net in bounded batches.
- :func:`randomization_check`: cascading randomisation of the weights (Adebayo et al. 2018).
- :func:`conservation`, :func:`positivity`: the DTD consistency properties of a heatmap.
- ``signal_quality``: the signal-estimator quality ρ(S) of PatternNet, from
  :mod:`relprop.patterns` (re-exported here).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from . import _config
from ._backend import array_namespace, resolve_backend, to_numpy
from .explain import Explainer, resolve_target

__all__ = ["perturbation_curve", "aopc", "randomization_check", "RandomizationResult", "conservation",
           "positivity", "signal_quality"]


def __getattr__(name):
    # relprop.patterns is written separately and may import this module: resolve lazily
    if name == "signal_quality":
        from .patterns import signal_quality

        return signal_quality
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_net_input(net, x, where):
    from .nets import Sequential

    if not isinstance(net, Sequential):
        raise TypeError(f"{where}: net must be a relprop.nets.Sequential, got {type(net).__name__}")
    net.check_input(x, where=where)


def _targets_and_scores(net, x, target, backend, batch_size):
    xp = array_namespace(x)
    outs = [net.trace(x[s:s + batch_size], backend, keep=False, check=False).output
            for s in range(0, x.shape[0], batch_size)]
    logits = xp.concatenate(outs)
    t = resolve_target(logits, target)
    return t, logits[xp.arange(x.shape[0]), t]


def _int(where, name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: {name}={value!r} is invalid; expected an int >= {minimum}")
    return int(value)


# -- perturbation curves ----------------------------------------------------------------------
def _relevance_map(where, R, x):
    """Relevance summed over channels: (N, H, W) for images, (N, 1, D) for (N, D) input."""
    xp = array_namespace(x)
    if not hasattr(R, "shape"):
        raise TypeError(f"{where}: R must be an array, got {type(R).__name__}")
    R = xp.asarray(R)
    if x.ndim == 2:
        if tuple(R.shape) != tuple(x.shape):
            raise ValueError(f"{where}: R has shape {tuple(R.shape)}, expected x's shape {tuple(x.shape)}")
        return R[:, None, :].astype(np.float64)
    n, _, h, w = x.shape
    if R.ndim == 4 and R.shape[0] == n and R.shape[2:] == (h, w) and R.shape[1] in (1, x.shape[1]):
        return R.astype(np.float64).sum(axis=1)
    if tuple(R.shape) == (n, h, w):
        return R.astype(np.float64)
    raise ValueError(f"{where}: R has shape {tuple(R.shape)}, expected {tuple(x.shape)}, ({n}, 1, {h}, {w}) "
                     f"or ({n}, {h}, {w})")


def perturbation_curve(net, x, R, target=None, patch=1, steps=None, fill="random", order="most_relevant",
                       seed=None, batch_size=None, backend=None):
    r"""Region perturbation (pixel flipping, Samek et al. 2017): the target score as the
    most relevant patches are replaced one per step.

    The image is split into non-overlapping patch×patch squares over all channels (the
    last row/column of squares is clipped at the border when patch does not divide the
    size; for (N, D) input the squares are runs of ``patch`` features), ranked by summed
    relevance and replaced one per step in that order.

    Parameters
    ----------
    net : Sequential
    x : array (N, C, H, W) or (N, D)
    R : array
        Relevance shaped like x, (N, 1, H, W) or (N, H, W) (summed over channels).
    target : None | int | int array (N,)
        Default: the argmax of f(x) per sample, kept for every perturbed copy.
    patch : int >= 1
    steps : int
        Patches replaced (default: all of them); the curve has ``steps + 1`` values.
    fill : "random" | "mean" | number
        "random": uniform noise in the sample's [min, max] (one noise image per sample,
        drawn once, so every order replaces a patch by the same values); "mean": the
        sample's per-channel mean; a number: that constant.
    order : "most_relevant" | "least_relevant" | "random"
        "random" draws a permutation per sample (the baseline curve).
    seed : None | int | numpy.random.Generator
    batch_size : int
        Perturbed copies per forward pass (default ``_config.DEFAULT_BATCH_SIZE``).

    Returns
    -------
    curve : array (N, steps + 1)
        f_c after 0, 1, …, steps replacements (``curve[:, 0]`` on the intact input).
    """
    where = "perturbation_curve"
    _check_net_input(net, x, where)
    xp = array_namespace(x)
    backend = resolve_backend(backend, xp)
    rel = _relevance_map(where, R, x)
    patch = _int(where, "patch", patch, 1)
    batch_size = _config.DEFAULT_BATCH_SIZE if batch_size is None else _int(where, "batch_size", batch_size, 1)
    if order not in ("most_relevant", "least_relevant", "random"):
        raise ValueError(f"{where}: order={order!r} is invalid; expected 'most_relevant', 'least_relevant' or 'random'")
    img = x if x.ndim == 4 else x.reshape(x.shape[0], 1, 1, -1)
    n, size = x.shape[0], img.shape[2:]
    ph = 1 if x.ndim == 2 else patch  # (N, D): runs of ``patch`` features
    if ph > size[0] or patch > size[1]:
        raise ValueError(f"{where}: patch={patch} is larger than the input's spatial size {tuple(size)}")
    nh, nw = -(-size[0] // ph), -(-size[1] // patch)
    n_tiles = nh * nw
    steps = n_tiles if steps is None else _int(where, "steps", steps, 1)
    if steps > n_tiles:
        raise ValueError(f"{where}: steps={steps} exceeds the {n_tiles} patches of size {patch}")
    rng = np.random.default_rng(seed)

    # summed relevance per tile (zero-pad to whole tiles, then one reshape-sum)
    padded = xp.zeros((n, nh * ph, nw * patch), dtype=np.float64)
    padded[:, :size[0], :size[1]] = rel
    score = padded.reshape(n, nh, ph, nw, patch).sum(axis=(2, 4)).reshape(n, n_tiles)
    # the fill first, so that every order with the same seed replaces a patch by the same values
    if isinstance(fill, str):
        flat = img.reshape(n, -1)
        if fill == "random":
            lo, hi = flat.min(axis=1), flat.max(axis=1)
            u = xp.asarray(rng.random(img.shape)).astype(x.dtype)
            fill_img = lo[:, None, None, None] + u * (hi - lo)[:, None, None, None]
        elif fill == "mean":
            fill_img = xp.broadcast_to(img.mean(axis=(2, 3), keepdims=True), img.shape)
        else:
            raise ValueError(f"{where}: fill={fill!r} is invalid; expected 'random', 'mean' or a number")
    elif isinstance(fill, numbers.Real) and not isinstance(fill, bool):
        fill_img = None
    else:
        raise TypeError(f"{where}: fill must be 'random', 'mean' or a number, got {type(fill).__name__}")

    if order == "most_relevant":
        ranking = xp.argsort(-score, axis=1, kind="stable")
    elif order == "least_relevant":
        ranking = xp.argsort(score, axis=1, kind="stable")
    else:
        ranking = xp.asarray(np.stack([rng.permutation(n_tiles) for _ in range(n)]))
    # step at which each pixel is replaced: 1 + the rank of its tile
    rank = xp.empty((n, n_tiles), dtype=np.int64)
    rank[xp.arange(n)[:, None], ranking] = xp.arange(1, n_tiles + 1)[None, :]
    tile_of = (xp.arange(size[0])[:, None] // ph) * nw + xp.arange(size[1])[None, :] // patch
    step_of = rank[:, tile_of]  # (N, H, W)

    targets, f_x = _targets_and_scores(net, x, target, backend, batch_size)
    curve = xp.empty((n, steps + 1), dtype=x.dtype)
    curve[:, 0] = f_x
    total = n * steps
    for p0 in range(0, total, batch_size):  # copies (sample i, after k steps), k = 1..steps
        p1 = min(p0 + batch_size, total)
        p = xp.arange(p0, p1)
        i, k = p // steps, p % steps + 1
        gone = (step_of[i] <= k[:, None, None])[:, None]  # (B, 1, H, W)
        xb = xp.where(gone, fill if fill_img is None else fill_img[i], img[i]).reshape((-1,) + x.shape[1:])
        out = net.trace(xb.astype(x.dtype, copy=False), backend, keep=False, check=False).output
        curve[i, k] = out[xp.arange(p1 - p0), targets[i]]
    return curve


def aopc(curve, per_sample=False):
    r"""Area over the perturbation curve: :math:`\frac1L \sum_{k=1}^{L} f_c(x) - f_c(x^{(k)})`.

    ``curve`` is (N, L + 1) from :func:`perturbation_curve`; returns the mean over samples
    (a float), or the (N,) values with ``per_sample=True``.  Higher means a steeper decay,
    i.e. a better explanation for most-relevant-first order.
    """
    curve = np.asarray(to_numpy(curve), dtype=np.float64)
    if curve.ndim != 2 or curve.shape[1] < 2:
        raise ValueError(f"aopc: curve must be (N, L + 1) with L >= 1, got shape {curve.shape}")
    per = (curve[:, :1] - curve[:, 1:]).mean(axis=1)
    return per if per_sample else float(per.mean())


# -- cascading randomisation ------------------------------------------------------------------
@dataclass
class RandomizationResult:
    """Per stage of :func:`randomization_check`.

    ``layers[s]``: the layer randomised at stage s (None for stage 0, the original net;
    stage s has layers[1..s] all randomised); ``spearman[s, i]`` the Spearman rank
    correlation of sample i's map R at stage s with the original map, ``spearman_abs`` the
    same of |R| (the usual choice: it ignores sign flips, which many methods make under
    random weights); NaN where a map is constant.  ``maps[s]`` with ``return_maps=True``.
    """

    layers: list
    spearman: np.ndarray
    spearman_abs: np.ndarray
    maps: list = field(default_factory=list, repr=False)

    def mean(self, absolute=True):
        """Mean correlation over samples per stage (NaN-aware), shape (stages,)."""
        with np.errstate(all="ignore"):
            return np.nanmean(self.spearman_abs if absolute else self.spearman, axis=1)

    def as_dict(self):
        return {"layers": list(self.layers), "spearman": self.spearman, "spearman_abs": self.spearman_abs}


def _spearman(a, b):
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return np.nan
    return float(spearmanr(a, b).statistic)


def randomization_check(net, x, method, target=None, seed=None, backend=None, return_maps=False, method_options=None,
                        **options):
    """Cascading randomisation (Adebayo et al. 2018): the model-parameter sanity check.

    The dense/conv layers are randomised one at a time from the top (output) layer down,
    cumulatively, in a copy of ``net`` (the user's net is never modified); after each stage
    ``method`` explains ``x`` again for the targets of the *original* net, and each map is
    compared with the original one by Spearman rank correlation (of R and of |R|, per
    sample).  A method that passes the check loses the correlation as layers are
    randomised; one that keeps it does not depend on the learned weights.

    Random weights are drawn from N(0, σ²) with σ the standard deviation of the weights
    they replace (likewise the bias), i.e. a fresh initialisation at the trained scale;
    ``seed`` seeds these draws.  ``**options`` go to the method; ``method_options={...}``
    passes options whose names clash with this function's (e.g. SmoothGrad's ``seed``).

    Returns
    -------
    RandomizationResult
        ``layers`` (None, then the randomised layer index per stage), ``spearman`` and
        ``spearman_abs`` arrays (stages, N); stage 0 is 1 by construction.
    """
    where = "randomization_check"
    _check_net_input(net, x, where)
    xp = array_namespace(x)
    backend = resolve_backend(backend, xp)
    rng = np.random.default_rng(seed)
    options = {**options, **(method_options or {})}
    targets, _ = _targets_and_scores(net, x, target, backend, _config.DEFAULT_BATCH_SIZE)
    work = net.copy()
    stages = [None] + net.linear_layers()[::-1]
    maps, rho, rho_abs = [], [], []
    for layer in stages:
        if layer is not None:
            lay = work.layers[layer]
            w = np.asarray(lay.weight)
            w_new = rng.normal(0.0, float(w.std()) or 1.0 / np.sqrt(w[0].size), w.shape).astype(w.dtype)
            b = None if lay.bias is None else np.asarray(lay.bias)
            b_new = None if b is None else rng.normal(0.0, float(b.std()), b.shape).astype(b.dtype)
            lay.set_params(w_new, b_new)
        r_map = to_numpy(Explainer(work, method, backend=backend, **options)(x, targets))
        r = r_map.reshape(r_map.shape[0], -1).astype(np.float64)
        if layer is None:
            r0 = r
        if return_maps:
            maps.append(r_map)
        rho.append([_spearman(r0[i], r[i]) for i in range(r.shape[0])])
        rho_abs.append([_spearman(np.abs(r0[i]), np.abs(r[i])) for i in range(r.shape[0])])
    return RandomizationResult(layers=stages, spearman=np.array(rho), spearman_abs=np.array(rho_abs), maps=maps)


# -- consistency ------------------------------------------------------------------------------
def conservation(net, x, R, target=None, backend=None):
    """Conservation (DTD): how far Σ_p R_p is from f_c(x), per sample.

    Returns a dict of (N,) arrays: ``"sum"`` Σ_p R_p, ``"output"`` f_c(x) (target as
    :func:`relprop.explain`), ``"absolute"`` Σ R − f_c(x) and ``"relative"`` (Σ R − f_c(x)) /
    |f_c(x)| (inf/NaN where f_c(x) = 0).
    """
    where = "conservation"
    _check_net_input(net, x, where)
    xp = array_namespace(x)
    backend = resolve_backend(backend, xp)
    if not hasattr(R, "shape") or R.shape[0] != x.shape[0]:
        raise ValueError(f"{where}: R must be an array with x's batch size {x.shape[0]}")
    _, f_c = _targets_and_scores(net, x, target, backend, _config.DEFAULT_BATCH_SIZE)
    total = to_numpy(R).reshape(R.shape[0], -1).sum(axis=1, dtype=np.float64)
    f_c = to_numpy(f_c).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = (total - f_c) / np.abs(f_c)
    return {"sum": total, "output": f_c, "absolute": total - f_c, "relative": rel}


def positivity(R):
    """Positivity (DTD): per sample, ``"fraction"`` of entries R_p >= 0, ``"negative_mass"``
    Σ|R⁻| / Σ|R| (0 for an all-zero map) and ``"positive"`` (all R_p >= 0)."""
    if not hasattr(R, "shape") or R.ndim < 2:
        raise ValueError("positivity: R must be an array (N, ...)")
    r = np.asarray(to_numpy(R), dtype=np.float64).reshape(R.shape[0], -1)
    mass = np.abs(r).sum(axis=1)
    neg = -np.minimum(r, 0).sum(axis=1)
    negative_mass = np.where(mass > 0, neg / np.where(mass > 0, mass, 1), 0.0)
    return {"fraction": (r >= 0).mean(axis=1), "negative_mass": negative_mass, "positive": (r >= 0).all(axis=1)}
