r"""Testing with Concept Activation Vectors (TCAV; Kim et al. 2018).

A *concept* is given by examples (images showing stripes, say).  Its concept activation
vector (CAV) :math:`v_C^l` is the unit normal of a linear classifier that separates the
layer-l activations :math:`f_l(x)` of the concept's examples from those of random
examples, oriented towards the concept (:func:`cav`).  The *conceptual sensitivity* of
class k's logit :math:`h_{l,k}` at an input x is the directional derivative

.. math:: S_{C,k,l}(x) = \nabla h_{l,k}(f_l(x)) \cdot v_C^l ,

and the TCAV score is the share of class-k inputs whose sensitivity is positive,
:math:`\mathrm{TCAV}_{Q,C,k,l} = |\{x \in X_k : S_{C,k,l}(x) > 0\}| / |X_k|`
(:func:`tcav`).  A score means something only when it differs from chance: the concept is
trained against ≥ 10 random counterpart sets, every random set is also pitted against
another random set, and a two-sided t-test compares the two score distributions.

scikit-learn fits the linear classifiers (``pip install 'relprop[data]'``); SciPy runs the
t-test.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import _config
from ._backend import to_numpy
from .visualize import _check_int, _layer_output, _resolve_layer

__all__ = ["cav", "tcav", "CAV", "TCAVResult", "layer_activations", "layer_gradients"]

CLASSIFIERS = ("logistic", "linear_svm", "sgd")


def _check_set(where, name, net, x, minimum=2):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{where}: {name} must be an array of inputs, got {type(x).__name__}")
    if x.ndim != net.input_ndim:
        raise ValueError(f"{where}: {name} must be a batch of inputs of {net.input_ndim} dimensions, "
                         f"got shape {tuple(x.shape)}")
    if x.shape[0] < minimum:
        raise ValueError(f"{where}: {name} has {x.shape[0]} example(s); at least {minimum} are needed")
    net.check_input(x, where=f"{where}: {name}")
    return x


# -- engine bridge: activations and ∂f_c/∂(layer output) ----------------------------------------------------
def layer_activations(net, x, layer, batch_size=None, backend=None):
    """:math:`f_l(x)` flattened per sample: (N, D) float64, computed in batches."""
    batch_size = batch_size or _config.DEFAULT_BATCH_SIZE
    out = []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s:s + batch_size]
        out.append(to_numpy(_layer_output(net, xb, layer, backend)).reshape(xb.shape[0], -1))
    return np.concatenate(out).astype(np.float64)


def _layer_gradient(net, x, layer, target, backend=None):
    """∂f_c/∂(output of layer ``layer``) for one batch: the engine's gradient sweep stopped at that layer
    (where the layer's output feeds several layers, the signals from all of them are summed)."""
    from ._backend import array_namespace, resolve_backend
    from .methods import output_signal, resolve_target
    from .rules.signal import gradient_sweep

    backend = resolve_backend(backend, array_namespace(x))
    trace = net.trace(x, backend, check=False)
    g = output_signal(trace.output, resolve_target(trace.output, target), "onehot")
    return gradient_sweep(net).backward(trace, g, stop=layer)


def layer_gradients(net, x, layer, target, batch_size=None, backend=None):
    r""":math:`\nabla h_{l,k}(f_l(x))`, the gradient of logit ``target`` w.r.t. layer l's output, flattened: (N, D)."""
    batch_size = batch_size or _config.DEFAULT_BATCH_SIZE
    out = []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s:s + batch_size]
        out.append(to_numpy(_layer_gradient(net, xb, layer, target, backend)).reshape(xb.shape[0], -1))
    return np.concatenate(out).astype(np.float64)


# -- concept activation vectors ---------------------------------------------------------------------------
@dataclass
class CAV:
    """A concept activation vector.

    Attributes
    ----------
    vector : ndarray (D,)
        Unit normal of the separating hyperplane in layer ``layer``'s flattened output,
        pointing towards the concept.
    layer : int
    accuracy : float or None
        Accuracy of the classifier on a held-out third of both sets (None when either set
        has fewer than 6 examples: then all are used for fitting).
    """

    vector: np.ndarray
    layer: int
    accuracy: float | None = None


def _classifier(where, classifier, C, seed):
    try:
        from sklearn.linear_model import LogisticRegression, SGDClassifier
        from sklearn.svm import LinearSVC
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("relprop.concepts needs scikit-learn for the linear classifiers: "
                          "pip install 'relprop[data]'") from exc
    if classifier == "logistic":
        return LogisticRegression(C=C, solver="liblinear", max_iter=2000)  # lbfgs: 10x slower here
    if classifier == "linear_svm":
        return LinearSVC(C=C, max_iter=20000, random_state=seed)
    if classifier == "sgd":  # TCAV's reference implementation: a linear model by SGD, alpha = 0.01
        return SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3, random_state=seed)
    raise ValueError(f"{where}: classifier={classifier!r} is invalid; expected one of {', '.join(CLASSIFIERS)}")


def _fit_cav(where, a_concept, a_random, layer, classifier, C, seed):
    """Fit the classifier (concept = 1, random = 0) on activations; the unit normal towards the concept."""
    X = np.concatenate([a_concept, a_random])
    y = np.r_[np.ones(len(a_concept)), np.zeros(len(a_random))]
    # centre and scale with one number (per-feature scales would tilt the normal): a translation leaves the
    # normal alone, and liblinear penalises the intercept, which would tilt it for data far from the origin
    X = X - X.mean(axis=0)
    scale = float(np.abs(X).max()) or 1.0
    X = X / scale
    accuracy = None
    rng = np.random.default_rng(seed)
    if min(len(a_concept), len(a_random)) >= 6:  # a stratified held-out third
        test = np.zeros(len(y), dtype=bool)
        for label in (0, 1):
            idx = rng.permutation(np.flatnonzero(y == label))
            test[idx[:len(idx) // 3]] = True
        held = _classifier(where, classifier, C, seed).fit(X[~test], y[~test])
        accuracy = float(held.score(X[test], y[test]))
    model = _classifier(where, classifier, C, seed).fit(X, y)
    w = np.asarray(model.coef_, dtype=np.float64).ravel()
    norm = np.linalg.norm(w)
    if not norm > 0:
        raise ValueError(f"{where}: the classifier found no direction separating the concept from the random "
                         f"examples at layer {layer} (all-zero normal); the two sets have identical activations?")
    return CAV(vector=w / norm, layer=layer, accuracy=accuracy)


def cav(net, layer, concept_x, random_x, classifier="logistic", C=1.0, seed=0, batch_size=None, backend=None):
    r"""The concept activation vector of a concept at layer ``layer`` (Kim et al. 2018).

    A linear classifier (scikit-learn) separates :math:`\{f_l(x) : x \in P_C\}` (label 1)
    from :math:`\{f_l(x) : x \in N\}` (label 0); the CAV is its normal
    :math:`v_C^l = w / \lVert w \rVert`, which points towards the concept.

    Parameters
    ----------
    net : relprop.nets.Sequential or Graph
    layer : int
        The layer whose output is the activation space f_l.
    concept_x, random_x : arrays (N, ...)
        Examples of the concept and random counter-examples (at least 2 each).
    classifier : "logistic" | "linear_svm" | "sgd"
    C : float > 0
        Inverse regularisation strength (logistic, linear_svm).
    seed : int
        The held-out split and the solvers that draw.

    Returns
    -------
    CAV
    """
    where = "cav"
    layer = _resolve_layer(net, where, layer)
    _check_set(where, "concept_x", net, concept_x)
    _check_set(where, "random_x", net, random_x)
    if isinstance(C, bool) or not isinstance(C, numbers.Real) or not C > 0 or not math.isfinite(C):
        raise ValueError(f"{where}: C={C!r} is invalid; expected a finite number > 0")
    _classifier(where, classifier, C, seed)
    a_c = layer_activations(net, concept_x, layer, batch_size, backend)
    a_r = layer_activations(net, random_x, layer, batch_size, backend)
    return _fit_cav(where, a_c, a_r, layer, classifier, C, seed)


# -- TCAV --------------------------------------------------------------------------------------------------
@dataclass
class TCAVResult:
    """The TCAV scores of one concept for one class at one layer, and their significance.

    Attributes
    ----------
    scores : ndarray (R,)
        TCAV score of the concept against each of the R random sets.
    random_scores : ndarray (R,)
        TCAV scores of random concepts: random set i against set i + 1 mod R (``test="welch"``),
        or random set i's mean score against all the others (``test="sets"``).
    mean, std : float
        Of ``scores`` (std with ddof=1, as the paper's error bars).
    random_mean, random_std : float
    p_value : float
        Two-sided: Welch's t-test (``scipy.stats.ttest_ind``) of ``scores`` against
        ``random_scores``, or the set-level prediction t-test (``test="sets"``).
    accuracies : ndarray (R,)
        Held-out accuracy of each concept CAV (NaN where the sets were too small to hold out).
    sensitivities : ndarray (R, N)
        The directional derivatives S_{C,k,l}(x) of every class example for every concept CAV.
    """

    scores: np.ndarray
    random_scores: np.ndarray
    mean: float
    std: float
    random_mean: float
    random_std: float
    p_value: float
    layer: int
    target: int
    accuracies: np.ndarray = field(default_factory=lambda: np.empty(0))
    sensitivities: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))

    def significant(self, alpha=0.05):
        """True when the concept's scores differ from chance at level ``alpha``."""
        return bool(self.p_value < alpha)

    def __repr__(self):
        return (f"TCAVResult(layer={self.layer}, target={self.target}, score={self.mean:.3f} ± {self.std:.3f}, "
                f"random={self.random_mean:.3f} ± {self.random_std:.3f}, p={self.p_value:.3g})")


def tcav(net, layer, class_x, target, concept_x, random_sets, classifier="logistic", C=1.0, seed=0,
         batch_size=None, backend=None, min_random=10, test="welch", progress=False):
    r"""TCAV score of a concept for a class, with its two-sided t-test against random concepts.

    For each random set :math:`N_i` (i = 1..R, R ≥ ``min_random``): the CAV
    :math:`v_i` of the concept against :math:`N_i` and its score
    :math:`\frac{1}{|X_k|} |\{x \in X_k : \nabla h_{l,k}(f_l(x)) \cdot v_i > 0\}|`; and the
    score of a *random concept*: the CAV of :math:`N_i` against :math:`N_{i+1 \bmod R}`.  The
    concept is significant when a two-sided t-test (Welch's) rejects equal mean scores
    (Kim et al. 2018, §3.2).

    ``test="welch"`` is that test.  Its R concept scores share one example set, so they are
    not independent draws, and it rejects a *random* concept set far more often than its
    level (measured on the planted-bar task of tests/test_concepts.py: 23% and 35% of 30 and
    40 random concept sets significant at 0.05; the set-level test: 3% of 30).
    ``test="sets"`` is calibrated instead: every random set in turn plays the concept
    against the other R − 1 (R(R − 1) CAVs), giving R *set-level* mean
    scores :math:`m_1..m_R` of random concepts, and the concept's mean score is tested as
    one more draw from them (a prediction t-test,
    :math:`t = (\bar s_C - \bar m) / (s_m \sqrt{1 + 1/R})`, R − 1 degrees of freedom).

    Parameters
    ----------
    net : relprop.nets.Sequential or Graph
    layer : int
    class_x : array (N, ...)
        Inputs of the class (X_k).
    target : int
        The class k whose logit h_{l,k} is differentiated.
    concept_x : array (M, ...)
        Examples of the concept (at least 2).
    random_sets : sequence of arrays
        At least ``min_random`` sets of random examples (each at least 2).
    classifier, C, seed
        As in :func:`cav`.
    test : "welch" | "sets"
        Kim et al.'s t-test of the concept's scores against random-vs-random scores, or the
        calibrated set-level test (see above).
    progress : bool
        A tqdm bar over the random sets.

    Returns
    -------
    TCAVResult
    """
    from scipy import stats

    where = "tcav"
    layer = _resolve_layer(net, where, layer)
    min_random = _check_int(where, "min_random", min_random, 2)
    _check_set(where, "class_x", net, class_x, minimum=1)
    _check_set(where, "concept_x", net, concept_x)
    if isinstance(random_sets, np.ndarray) and random_sets.ndim == net.input_ndim:
        raise TypeError(f"{where}: random_sets must be a list of example sets (arrays), got one array of shape "
                        f"{random_sets.shape}; split it, e.g. np.split(pool, {min_random})")
    random_sets = list(random_sets)
    if len(random_sets) < min_random:
        raise ValueError(f"{where}: random_sets has {len(random_sets)} set(s); at least {min_random} are needed "
                         "for the t-test (Kim et al. use >= 10)")
    for i, r in enumerate(random_sets):
        _check_set(where, f"random_sets[{i}]", net, r)
    n_out = net.shapes(class_x.shape)[-1][1]
    if isinstance(target, bool) or not isinstance(target, numbers.Integral) or not 0 <= target < n_out:
        raise ValueError(f"{where}: target={target!r} is invalid; expected a class index in [0, {n_out})")
    _classifier(where, classifier, C, seed)

    grads = layer_gradients(net, class_x, layer, int(target), batch_size, backend)  # (N, D)
    a_concept = layer_activations(net, concept_x, layer, batch_size, backend)
    a_random = [layer_activations(net, r, layer, batch_size, backend) for r in random_sets]
    if test not in ("welch", "sets"):
        raise ValueError(f"{where}: test={test!r} is invalid; expected 'welch' or 'sets'")
    R = len(random_sets)
    it = range(R)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=where, unit="random set")
    scores, acc, sens = np.empty(R), np.empty(R), np.empty((R, grads.shape[0]))
    rand = np.empty(R)
    for i in it:
        v = _fit_cav(where, a_concept, a_random[i], layer, classifier, C, seed + i)
        sens[i] = grads @ v.vector
        scores[i] = np.mean(sens[i] > 0)
        acc[i] = np.nan if v.accuracy is None else v.accuracy
        if test == "welch":  # random set i as a concept against random set i + 1
            u = _fit_cav(where, a_random[i], a_random[(i + 1) % R], layer, classifier, C, seed + R + i)
            rand[i] = np.mean(grads @ u.vector > 0)
        else:  # random set i as a concept against every other random set: its mean score
            rand[i] = np.mean([np.mean(grads @ _fit_cav(where, a_random[i], a_random[j], layer, classifier, C,
                                                        seed + R + i * R + j).vector > 0)
                               for j in range(R) if j != i])
    if test == "welch":
        if np.ptp(scores) == 0 and np.ptp(rand) == 0:  # no spread: the t statistic is undefined
            p = 1.0 if scores[0] == rand[0] else 0.0
        else:
            with warnings.catch_warnings():  # scores all equal (e.g. 1.0): scipy warns of precision loss
                warnings.simplefilter("ignore", RuntimeWarning)
                p = float(stats.ttest_ind(scores, rand, equal_var=False).pvalue)
    else:
        sd = rand.std(ddof=1)
        gap = scores.mean() - rand.mean()
        if sd == 0:
            p = 1.0 if gap == 0 else 0.0
        else:
            p = float(2 * stats.t.sf(abs(gap) / (sd * np.sqrt(1 + 1 / R)), df=R - 1))
    return TCAVResult(scores=scores, random_scores=rand, mean=float(scores.mean()), std=float(scores.std(ddof=1)),
                      random_mean=float(rand.mean()), random_std=float(rand.std(ddof=1)), p_value=p, layer=layer,
                      target=int(target), accuracies=acc, sensitivities=sens)
