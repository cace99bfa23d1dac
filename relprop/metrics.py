r"""Evaluating explanations: perturbation curves, AOPC, the randomisation sanity check,
conservation and positivity (docs/conventions.md, "Evaluating explanations").

- :func:`perturbation_curve` / :func:`aopc`: region perturbation (Samek et al. 2017); all
  perturbed copies of all samples go through the net in bounded batches.
- :func:`randomization_check`: cascading randomisation of the weights (Adebayo et al. 2018).
- :func:`conservation`, :func:`positivity`: the DTD consistency properties of a heatmap.
- :func:`signal_quality`: the quality ρ(S) of PatternNet's signal estimators (Kindermans et
  al. 2018), beside a random-direction baseline.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from . import _config
from . import _validate as V
from ._backend import array_namespace, resolve_backend, to_numpy
from .methods import Explainer, resolve_target

__all__ = ["perturbation_curve", "aopc", "randomization_check", "RandomizationResult", "conservation",
           "positivity", "signal_quality", "SignalQuality", "SignalQualityWarning"]


def _check_net_input(net, x, where):
    from .nets import Graph

    if not isinstance(net, Graph):
        raise TypeError(f"{where}: net must be a relprop net (relprop.nets.Graph), got {type(net).__name__}")
    net.check_input(x, where=where)


def _targets_and_scores(net, x, target, backend, batch_size):
    xp = array_namespace(x)
    outs = [net.trace(x[s:s + batch_size], backend, keep=False, check=False).output
            for s in range(0, x.shape[0], batch_size)]
    logits = xp.concatenate(outs)
    t = resolve_target(logits, target)
    return t, logits[xp.arange(x.shape[0]), t]


def _seed(where, seed):
    if seed is None or isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return int(seed)
    raise TypeError(f"{where}: seed must be None, an int or a numpy.random.Generator, got {seed!r}")


def _progress(total, progress, desc):
    """A tqdm bar, shown only once a call has run for 2 s (``progress=False`` silences it)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, delay=2.0, leave=False)


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
    V.check_real_array(where, "R", R)
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
                       seed=None, batch_size=None, backend=None, progress=True):
    r"""Region perturbation (pixel flipping, Samek et al. 2017): the target score as the
    most relevant patches are replaced one per step.

    The image is split into non-overlapping patch×patch squares over all channels on a grid
    anchored at the top-left corner (the last row/column of squares is clipped at the border
    when patch does not divide the size — Quantus centres its grid instead; for (N, D) input
    the squares are runs of ``patch`` features), ranked by summed relevance and replaced one
    per step in that order.  Ties in the ranking keep the patch order (a stable sort by
    patch index, row-major), for both the most- and the least-relevant-first order.

    Parameters
    ----------
    net : relprop.nets.Graph
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
        sample's per-channel mean; a number: that constant (finite in x's dtype).
    order : "most_relevant" | "least_relevant" | "random"
        "random" draws a permutation per sample (the baseline curve).
    seed : None | int | numpy.random.Generator
    batch_size : int
        Perturbed copies per forward pass (default ``_config.DEFAULT_BATCH_SIZE``).
    progress : bool
        A tqdm bar over the perturbed copies, shown once a call has run for 2 s.

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
    progress = V.check_bool(where, "progress", progress)
    rng = np.random.default_rng(_seed(where, seed))

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
        V.check_finite_number(where, "fill", fill, x.dtype)
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
    bar = _progress(total, progress, where)
    if x.ndim == 4 and backend in ("cpu", "reference"):
        # one patch per sample per step: recompute each layer only where that patch reaches
        from .nets.incremental import PatchedForward, windows

        for s0 in range(0, n, batch_size):
            s1 = min(s0 + batch_size, n)
            i = np.arange(s0, s1)
            pf = PatchedForward(net, img[s0:s1], backend)
            fill_s = None if fill_img is None else fill_img[s0:s1]
            for k in range(1, steps + 1):
                tile = ranking[s0:s1, k - 1]
                r0, c0 = (tile // nw) * ph, (tile % nw) * patch
                if fill_s is None:
                    values = np.full((s1 - s0, img.shape[1], ph, patch), fill, dtype=x.dtype)
                else:  # the patch's part of the fill image (past the border: clipped by the update)
                    values = windows(fill_s, r0, c0, ph, patch)
                out = pf.update(r0, c0, values)
                curve[i, k] = out[np.arange(s1 - s0), targets[i]]
                bar.update(s1 - s0)
        bar.close()
        return curve
    for p0 in range(0, total, batch_size):  # copies (sample i, after k steps), k = 1..steps
        p1 = min(p0 + batch_size, total)
        bar.update(p1 - p0)
        p = xp.arange(p0, p1)
        i, k = p // steps, p % steps + 1
        gone = (step_of[i] <= k[:, None, None])[:, None]  # (B, 1, H, W)
        xb = xp.where(gone, fill if fill_img is None else fill_img[i], img[i]).reshape((-1,) + x.shape[1:])
        out = net.trace(xb.astype(x.dtype, copy=False), backend, keep=False, check=False).output
        curve[i, k] = out[xp.arange(p1 - p0), targets[i]]
    bar.close()
    return curve


def aopc(curve, per_sample=False):
    r"""Area over the perturbation curve as Samek et al. 2017 define it (their Eq. 12):

    .. math:: \mathrm{AOPC} = \frac{1}{L+1} \sum_{k=0}^{L} f_c(x^{(0)}) - f_c(x^{(k)})

    with the k = 0 term (zero) included, so a curve of L steps is divided by L + 1 (as
    Quantus).  ``curve`` is (N, L + 1) from :func:`perturbation_curve`; returns the mean over
    samples (a float), or the (N,) values with ``per_sample=True``.  Higher means a steeper
    decay, i.e. a better explanation for most-relevant-first order.
    """
    V.check_real_array("aopc", "curve", curve)
    curve = np.asarray(to_numpy(curve), dtype=np.float64)
    if curve.ndim != 2 or curve.shape[1] < 2:
        raise ValueError(f"aopc: curve must be (N, L + 1) with L >= 1, got shape {curve.shape}")
    per = (curve[:, :1] - curve).mean(axis=1)
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
                        progress=True, **options):
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
    ``progress`` shows a tqdm bar over the stages once a call has run for 2 s.

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
    rng = np.random.default_rng(_seed(where, seed))
    progress = V.check_bool(where, "progress", progress)
    if method_options is not None and not isinstance(method_options, dict):
        raise TypeError(f"{where}: method_options must be a dict, got {type(method_options).__name__}")
    options = {**options, **(method_options or {})}
    targets, _ = _targets_and_scores(net, x, target, backend, _config.DEFAULT_BATCH_SIZE)
    work = net.copy()
    stages = [None] + net.linear_layers()[::-1]
    maps, rho, rho_abs = [], [], []
    bar = _progress(len(stages), progress, where)
    for layer in stages:
        bar.update(1)
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
    bar.close()
    return RandomizationResult(layers=stages, spearman=np.array(rho), spearman_abs=np.array(rho_abs), maps=maps)


# -- consistency ------------------------------------------------------------------------------
def conservation(net, x, R, target=None, backend=None, baseline=None):
    r"""Conservation (DTD): how far Σ_p R_p is from what the method explains, per sample.

    A method that explains f_c(x) (LRP, DTD with a zero root point) should give Σ_p R_p =
    f_c(x); one that explains a difference to a baseline x′ (Integrated Gradients,
    Expected/DeepLIFT-style methods) should give Σ_p R_p = f_c(x) − f_c(x′): pass that
    ``baseline`` (a number, an array shaped like x[0] or like x) and it is judged against
    the difference, not charged an error of f_c(x′).

    Returns a dict of (N,) arrays: ``"sum"`` Σ_p R_p, ``"output"`` f_c(x) (target as
    :func:`relprop.explain`), ``"baseline_output"`` f_c(x′) (0 without a baseline),
    ``"absolute"`` Σ R − (f_c(x) − f_c(x′)) and ``"relative"`` the absolute error divided by
    |f_c(x)| (inf/NaN where f_c(x) = 0).
    """
    where = "conservation"
    _check_net_input(net, x, where)
    xp = array_namespace(x)
    backend = resolve_backend(backend, xp)
    _relevance_map(where, R, x)            # real, finite, shaped like x (or summed over channels)
    targets, f_c = _targets_and_scores(net, x, target, backend, _config.DEFAULT_BATCH_SIZE)
    f_base = np.zeros(x.shape[0])
    if baseline is not None:
        if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
            V.check_finite_number(where, "baseline", baseline, x.dtype)
            x0 = xp.full(x.shape, baseline, dtype=x.dtype)
        else:
            V.check_real_array(where, "baseline", baseline)
            with np.errstate(over="ignore"):
                x0 = xp.asarray(baseline, dtype=x.dtype)
            if tuple(x0.shape) == tuple(x.shape[1:]):
                x0 = xp.broadcast_to(x0, x.shape)
            elif tuple(x0.shape) != tuple(x.shape):
                raise ValueError(f"{where}: baseline has shape {tuple(x0.shape)}, expected a number, "
                                 f"{tuple(x.shape[1:])} or {tuple(x.shape)}")
            V.check_finite("baseline", x0, where)
        _, f0 = _targets_and_scores(net, xp.ascontiguousarray(x0), targets, backend, _config.DEFAULT_BATCH_SIZE)
        f_base = to_numpy(f0).astype(np.float64)
    total = to_numpy(R).reshape(R.shape[0], -1).sum(axis=1, dtype=np.float64)
    f_c = to_numpy(f_c).astype(np.float64)
    err = total - (f_c - f_base)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = err / np.abs(f_c)
    return {"sum": total, "output": f_c, "baseline_output": f_base, "absolute": err, "relative": rel}


def positivity(R):
    """Positivity (DTD): per sample, ``"fraction"`` of entries R_p >= 0, ``"negative_mass"``
    Σ|R⁻| / Σ|R| (0 for an all-zero map) and ``"positive"`` (all R_p >= 0)."""
    V.check_real_array("positivity", "R", R)
    if R.ndim < 2:
        raise ValueError(f"positivity: R must be an array (N, ...), got shape {tuple(R.shape)}")
    r = np.asarray(to_numpy(R), dtype=np.float64).reshape(R.shape[0], -1)
    mass = np.abs(r).sum(axis=1)
    neg = -np.minimum(r, 0).sum(axis=1)
    negative_mass = np.where(mass > 0, neg / np.where(mass > 0, mass, 1), 0.0)
    return {"fraction": (r >= 0).mean(axis=1), "negative_mass": negative_mass, "positive": (r >= 0).all(axis=1)}


# -- PatternNet: the quality ρ(S) of a signal estimator ---------------------------------------
#: the estimators :func:`signal_quality` compares, in its table's order
ESTIMATOR_NAMES = ("S_x", "S_w", "S_a", "S_a+-", "random")


class SignalQualityWarning(RuntimeWarning):
    """A correlation outside [−1, 1] in :func:`signal_quality`: a numerical failure, excluded from ρ."""


@dataclass
class SignalQuality:
    """ρ(S) per layer (:func:`signal_quality`).

    ``rho[name]`` (n_layers,) is the mean over the evaluated units of ``per_unit[name][k]``
    (the values of layer ``layers[k]`` for units ``units[k]``); NaN where undefined.
    ``rank[k]`` is the numerical rank of cov[x] of layer ``layers[k]``'s input over the
    held-out data and ``dims[k]`` the number of its features that vary (dead ReLU units do
    not): a rank far below that means the held-out inputs span much less than the layer's
    input space, e.g. too few distinct images, and ρ there says little.
    ``flagged`` lists ``(layer, unit, estimator, corr)`` for every correlation found outside
    [−1, 1] (a numerical failure; excluded from ρ).
    """

    layers: list
    kinds: list
    units: list
    rho: dict
    per_unit: dict
    rank: list = field(default_factory=list)
    dims: list = field(default_factory=list)
    flagged: list = field(default_factory=list)

    def __getitem__(self, name):
        return self.rho[name]

    def rows(self):
        """One dict per layer: {"layer": i, "kind": ..., "units": n, "S_x": ..., ..., "rank": r, "dim": d}
        (r the held-out input rank, d the number of varying input features)."""
        return [{"layer": i, "kind": k, "units": len(u), **{n: float(self.rho[n][r]) for n in self.rho},
                 "rank": self.rank[r] if self.rank else None, "dim": self.dims[r] if self.dims else None}
                for r, (i, k, u) in enumerate(zip(self.layers, self.kinds, self.units))]

    def __str__(self):
        names = list(self.rho)
        head = f"{'layer':>5}  {'kind':<7} {'units':>5}  " + "  ".join(f"{n:>7}" for n in names)
        head += f"  {'input rank/varying':>19}"
        lines = [head]
        for row in self.rows():
            rank = f"{row['rank']}/{row['dim']}" if row["rank"] is not None else "-"
            lines.append(f"{row['layer']:>5}  {row['kind']:<7} {row['units']:>5}  "
                         + "  ".join(f"{row[n]:7.3f}" for n in names) + f"  {rank:>19}")
        return "\n".join(lines)


def _layer_samples(layer, x, z, positions, rng):
    """(X (S, I), Z (S, J)) on the host in float64: dense rows, or conv patches at sampled positions."""
    x = np.asarray(to_numpy(x), dtype=np.float64)
    z = np.asarray(to_numpy(z), dtype=np.float64)
    if layer.kind == "linear":
        return x, z
    n, c, h, w = x.shape
    ho, wo = z.shape[2:]
    kh, kw = layer.kernel
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    if positions is None or positions >= ho * wo:
        pos = np.broadcast_to(np.arange(ho * wo), (n, ho * wo))
    else:
        pos = np.argsort(rng.random((n, ho * wo)), axis=1)[:, :positions]
    img = np.broadcast_to(np.arange(n)[:, None], pos.shape).reshape(-1)
    pos = pos.reshape(-1)
    i, j = pos // wo, pos % wo
    x_pad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    rows = (i * sh)[:, None, None, None] + (np.arange(kh) * dh)[None, None, :, None]
    cols = (j * sw)[:, None, None, None] + (np.arange(kw) * dw)[None, None, None, :]
    patches = x_pad[img[:, None, None, None], np.arange(c)[None, :, None, None], rows, cols]
    return patches.reshape(len(pos), -1), z[img, :, i, j]


class _HalfMoments:
    """Sums over one part of the data for the selected units of one layer (float64, host).

    x is shifted by the mean of the first batch (c) before its sums are formed, so that the
    covariances do not cancel large means; y = wᵀx is formed from the unshifted x.
    """

    def __init__(self, w_sel):
        n_in = w_sel.shape[1]
        self.w = w_sel                                   # (U, I)
        self.c = None
        self.n = 0
        self.sx = np.zeros(n_in)                         # Σ x'  (x' = x − c)
        self.gram = np.zeros((n_in, n_in))               # Σ x' x'ᵀ
        self.sy = np.zeros((2, len(w_sel)))              # Σy, Σ₊y
        self.syy = np.zeros((2, len(w_sel)))             # Σy², Σ₊y²
        self.sxy = np.zeros((2, len(w_sel), n_in))       # Σ x' y, Σ₊ x' y

    def add(self, x, z_sel):
        y = x @ self.w.T                                 # y = wᵀx exactly (no bias)
        yp = np.where(z_sel > 0, y, 0.0)                 # y in the positive regime, 0 elsewhere
        if self.c is None:
            self.c = x.mean(axis=0)
        x = x - self.c
        self.n += x.shape[0]
        self.sx += x.sum(axis=0)
        self.gram += x.T @ x
        self.sy[0] += y.sum(axis=0)
        self.sy[1] += yp.sum(axis=0)
        self.syy[0] += (y * y).sum(axis=0)
        self.syy[1] += (yp * yp).sum(axis=0)
        self.sxy[0] += y.T @ x
        self.sxy[1] += yp.T @ x

    def rank(self):
        """(numerical rank of cov[x], number of non-constant features of x).

        The rank counts eigenvalues above n_in · eps · the largest; a feature is constant when
        its variance is below the same threshold (e.g. the output of a dead ReLU unit).
        """
        if self.n < 2:
            return 0, 0
        mx = self.sx / self.n
        cov = self.gram / self.n - np.outer(mx, mx)
        ev = np.linalg.eigvalsh((cov + cov.T) / 2)
        top = max(float(ev[-1]), 0.0)
        if top <= 0:
            return 0, 0
        tol = top * len(ev) * np.finfo(np.float64).eps
        return int(np.sum(ev > tol)), int(np.sum(np.diag(cov) > tol))

    def covariances(self, u, a_plus, a_minus):
        r"""(cov[d, d] (I, I), cov[d, y] (I,), var[y]) for unit u and d = x − a₊ y₊ − a₋ y₋."""
        n = self.n
        mx, g = self.sx / n, self.gram / n
        my, myp = self.sy[0, u] / n, self.sy[1, u] / n
        eyy, eyyp = self.syy[0, u] / n, self.syy[1, u] / n
        cxy, cxyp = self.sxy[0, u] / n, self.sxy[1, u] / n
        mym, cxym, eyym = my - myp, cxy - cxyp, eyy - eyyp
        md = mx - a_plus * myp - a_minus * mym           # E[d]
        edd = (g - np.outer(cxyp, a_plus) - np.outer(a_plus, cxyp) - np.outer(cxym, a_minus)
               - np.outer(a_minus, cxym) + eyyp * np.outer(a_plus, a_plus) + eyym * np.outer(a_minus, a_minus))
        edy = cxy - a_plus * eyyp - a_minus * eyym       # E[d y]
        return edd - np.outer(md, md), edy - md * my, eyy - my * my


def _unit_pattern(w, a):
    """``a`` renormalised to wᵀa = 1 in float64 (None when wᵀa = 0: no usable pattern).

    A float32 pattern has wᵀa = 1 only to ~1e-7; the rest, (1 − wᵀa)·y, stays in d = x − S(x)
    exactly collinear with y, and the least-squares v would read y from it.
    """
    t = float(w @ a)
    if not np.isfinite(t) or abs(t) <= 1e3 * np.finfo(np.float64).eps * float(np.abs(w) @ np.abs(a)):
        return None
    return a / t


def _least_squares(c_dd, c_dy, ridge=1e-10):
    """The solution of c_dd v = c_dy that the minimum-norm least squares gives, by Cholesky.

    c_dd is a covariance (symmetric, positive semi-definite, singular: wᵀd = 0).  A ridge of
    ``ridge`` times its mean eigenvalue makes it definite; directions with variance far below
    the ridge, where c_dy holds only rounding, are damped instead of amplified, and the rest
    is solved to ~1e-10 relative — the minimum-norm solution up to that, at a tenth of the
    cost of a pivoted QR (``scipy.linalg.lstsq``), which remains the fallback.
    """
    import scipy.linalg

    c_dd = (c_dd + c_dd.T) / 2
    lam = ridge * max(float(np.trace(c_dd)) / len(c_dd), np.finfo(np.float64).tiny)
    try:
        return scipy.linalg.solve(c_dd + lam * np.eye(len(c_dd)), c_dy, assume_a="pos", check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        return scipy.linalg.lstsq(c_dd, c_dy, lapack_driver="gelsy")[0]


def _rho(fit, test, u, a_plus, a_minus):
    """(ρ, corr): 1 − corr on ``test`` of vᵀd with y, v the least-squares fit of y on d over ``fit``.

    d is projected onto the hyperplane wᵀd = 0 where it lies for an exact pattern, which removes
    any leak of y along w that rounding leaves.
    """
    w = fit.w[u]
    w_hat = w / np.linalg.norm(w)

    def project(v):                                      # (I − ŵŵᵀ) v
        return v - w_hat * (w_hat @ v)

    c_dd, c_dy, _ = fit.covariances(u, a_plus, a_minus)
    cw = c_dd @ w_hat                    # P C P = C − ŵ(Cŵ)ᵀ − (Cŵ)ŵᵀ + (ŵᵀCŵ) ŵŵᵀ, in O(I²)
    c_dd = c_dd - np.outer(w_hat, cw) - np.outer(cw, w_hat) + float(w_hat @ cw) * np.outer(w_hat, w_hat)
    c_dy = project(c_dy)
    if not np.any(np.abs(c_dd) > 0):
        return np.nan, np.nan                            # d ≡ 0: the correlation is undefined
    v = _least_squares(c_dd, c_dy)                      # the normal equations of y ~ vᵀd + c
    v = project(v)
    t_dd, t_dy, t_yy = test.covariances(u, a_plus, a_minus)
    var_fit = float(v @ t_dd @ v)
    if not (var_fit > 0 and t_yy > 0):
        return np.nan, np.nan
    corr = float(v @ t_dy) / np.sqrt(var_fit * t_yy)
    return 1.0 - corr, corr


def _check_optional_int(where, name, value, minimum=1):
    return None if value is None else _int(where, name, value, minimum)


def signal_quality(net, patterns, data, batch_size=256, backend=None, max_units=64, positions=64, seed=0,
                   progress=True):
    r"""PatternNet's quality :math:`\rho(S) = 1 - \max_v \mathrm{corr}(v^T (x - S(x)), y)` of each signal
    estimator S, per dense/conv layer (Kindermans et al. 2018, Eq. 3 and Fig. 3).

    The protocol, as the paper's: the patterns, v and ρ come from three disjoint parts of the
    data.  ``patterns`` must be fitted on other data than ``data`` (e.g. the training set);
    ``data`` is split into halves: the first ⌊N/2⌋ inputs fit v, the rest measure the correlation.
    For every dense/conv layer and every evaluated output unit j (x: the layer input, for a
    convolution the input patch of an output position; y = w_jᵀx; the regime of a sample is
    :math:`z_j = y + b_j > 0`, from the forward pass):

    1. Each pattern is renormalised to :math:`w^T a = 1` in float64 (a pattern with
       :math:`w^T a = 0` is no pattern: the unit's value is NaN for that estimator).
    2. On each half the sums n, Σx, Σxxᵀ, Σy, Σ₊y, Σy², Σ₊y², Σxy, Σ₊xy are accumulated in
       float64 (all inputs of the half; for convolutions ``positions`` random output positions
       per input, all with ``positions=None``).  From them, for
       :math:`d = x - S(x)`, :math:`S(x) = a_+ y [z>0] + a_- y [z \le 0]` (a₊ = a₋ = a for the
       one-component estimators), the covariance of d and its covariance with y follow exactly.
       d lies in the hyperplane :math:`w^T d = 0`; it is projected onto it, which removes what
       rounding leaves of y along w.
    3. v is the least-squares fit of y on d with intercept over the first half (the normal
       equations, minimum norm — cov[d] is singular — by Cholesky with a ridge of 1e-10 of
       the mean eigenvalue);
       :math:`\rho_j = 1 - \mathrm{corr}(v^T d, y)` over the second half.  ρ_j lies in [0, 2]:
       above 1 when v does not generalise (a negative held-out correlation).  A correlation
       outside [−1, 1] is a numerical failure: it is flagged (``.flagged``, a
       :class:`SignalQualityWarning`) and excluded, never reported as a quality.
    4. The layer's value is the mean of ρ_j over the evaluated units (``max_units`` of them,
       chosen at random with ``seed``; all with ``max_units=None``), ignoring NaN.

    Estimators: S_w (the filter, a = w / wᵀw), S_a (``patterns[i].a``), S_a+- (``a_plus``,
    ``a_minus``), and ``random``, a random direction a = r / wᵀr with r ~ N(0, I) per unit
    (seeded): the baseline of the paper's Fig. 3, near 0.  S_x (S(x) = x) leaves d ≡ 0, for
    which the correlation is undefined: its entries are NaN (the criterion judges only what an
    estimator calls distractor, and S_x calls nothing distractor).

    Parameters
    ----------
    net : relprop.nets.Graph
    patterns : relprop.Patterns
        Fitted on data disjoint from ``data``.
    data : array (N, ...), N >= 4
        Held-out inputs from the distribution of the pattern data.  The result reports each
        layer's held-out input rank (``.rank``): held-out data that span much less than the
        pattern data (e.g. a handful of distinct digits) make ρ meaningless there; compare
        ``.rank`` with ``.dims``, the number of input features that vary.
    batch_size : int >= 1
    backend : None | "reference" | "cpu" | "cuda"
        For the forward passes; the statistics here are computed on the host in float64.
    max_units : int >= 1 or None
        Units evaluated per layer (cost: one I×I least-squares solve per unit and estimator).
    positions : int >= 1 or None
        Output positions sampled per input for conv layers.
    seed : None | int | numpy.random.Generator
    progress : bool
        A tqdm progress bar (shown after 2 s).

    Returns
    -------
    SignalQuality
        ``.rho["S_a"]`` etc. per layer; ``str()`` prints the table.
    """
    import warnings

    from tqdm.auto import tqdm

    from .patterns import Patterns, _host64, filter_pattern

    where = "signal_quality"
    if not isinstance(patterns, Patterns):
        raise TypeError(f"{where}: patterns must be relprop.Patterns (from fit_patterns), "
                        f"got {type(patterns).__name__}")
    _check_net_input(net, data, where)
    patterns.check(net)
    from .nets import canonical

    net = canonical(net)  # batch norms folded, as fit_patterns and the pattern methods see the net
    batch_size = _int(where, "batch_size", batch_size, 1)
    max_units = _check_optional_int(where, "max_units", max_units)
    positions = _check_optional_int(where, "positions", positions)
    if not (seed is None or isinstance(seed, np.random.Generator)
            or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool))):
        raise TypeError(f"{where}: seed must be None, an int or a numpy.random.Generator, got {seed!r}")
    n_total = int(data.shape[0])
    if n_total < 4:
        raise ValueError(f"{where}: data holds {n_total} inputs; need at least 4 (two halves)")
    rng = np.random.default_rng(seed)
    layers = net.linear_layers()
    units, moments = {}, [{}, {}]
    for i in layers:
        w = _host64(net.layers[i].weight).reshape(net.layers[i].weight.shape[0], -1)
        j = w.shape[0]
        sel = np.arange(j) if max_units is None or max_units >= j else np.sort(rng.choice(j, max_units, replace=False))
        units[i] = sel
        for half in moments:
            half[i] = _HalfMoments(w[sel])
    halves = (data[: n_total // 2], data[n_total // 2:])
    n_solves = sum(len(units[i]) for i in layers) * (len(ESTIMATOR_NAMES) - 1)
    with tqdm(total=n_total + n_solves, desc=where, disable=not progress, delay=2.0, leave=False) as bar:
        for half, part in zip(moments, halves):
            for s in range(0, part.shape[0], batch_size):
                trace = net.trace(part[s:s + batch_size], backend, check=False)
                for i in layers:
                    x, z = _layer_samples(net.layers[i], trace.inputs[i], trace.layer_output(i), positions, rng)
                    half[i].add(x, z[:, units[i]])
                bar.update(min(batch_size, part.shape[0] - s))
        rho = {name: np.full(len(layers), np.nan) for name in ESTIMATOR_NAMES}
        per_unit = {name: [] for name in ESTIMATOR_NAMES}
        flagged = []
        for k, i in enumerate(layers):
            fit, test = moments[0][i], moments[1][i]
            w = fit.w
            p = patterns[i]
            a = _host64(p.a).reshape(p.weight_shape[0], -1)[units[i]]
            ap = _host64(p.a_plus).reshape(p.weight_shape[0], -1)[units[i]]
            am = _host64(p.a_minus).reshape(p.weight_shape[0], -1)[units[i]]
            ar = rng.standard_normal(w.shape)
            two = {"S_w": (filter_pattern(w),) * 2, "S_a": (a, a), "S_a+-": (ap, am), "random": (ar, ar)}
            per_unit["S_x"].append(np.full(len(units[i]), np.nan))    # d ≡ 0: undefined (see above)
            for name, (plus, minus) in two.items():
                values = np.full(len(units[i]), np.nan)
                for u in range(len(units[i])):
                    bar.update(1)
                    # a regime without samples in either half needs no pattern
                    used_plus = fit.syy[1, u] > 0 or test.syy[1, u] > 0
                    used_minus = (fit.syy[0, u] - fit.syy[1, u]) > 0 or (test.syy[0, u] - test.syy[1, u]) > 0
                    a_p = _unit_pattern(w[u], plus[u]) if used_plus else np.zeros(w.shape[1])
                    a_m = _unit_pattern(w[u], minus[u]) if used_minus else np.zeros(w.shape[1])
                    if a_p is None or a_m is None:
                        continue                                      # no usable pattern: NaN
                    r, corr = _rho(fit, test, u, a_p, a_m)
                    if np.isfinite(corr) and abs(corr) > 1 + 1e-9:
                        flagged.append((i, int(units[i][u]), name, corr))
                        continue
                    values[u] = r
                per_unit[name].append(values)
                if np.any(np.isfinite(values)):
                    rho[name][k] = float(np.nanmean(values))
    if flagged:
        shown = ", ".join(f"layer {i} unit {u} {n}: {c:.3g}" for i, u, n, c in flagged[:6])
        warnings.warn(f"{where}: {len(flagged)} correlation(s) outside [-1, 1] (a numerical failure), "
                      f"excluded from rho: {shown}", SignalQualityWarning, stacklevel=2)
    per_unit = {name: per_unit[name] for name in ESTIMATOR_NAMES}
    ranks = {i: moments[1][i].rank() for i in layers}
    return SignalQuality(layers=list(layers), kinds=[net.layers[i].kind for i in layers],
                         units=[units[i] for i in layers], rho=rho, per_unit=per_unit,
                         rank=[ranks[i][0] for i in layers], dims=[ranks[i][1] for i in layers], flagged=flagged)
