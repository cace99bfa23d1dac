"""The zoo's data: scikit-learn's handwritten digits, the DTD detection task, the PatternNet toy.

Nothing is downloaded: scikit-learn ships the 1797 8×8 digits (``sklearn.datasets.load_digits``,
an optional dependency: ``pip install relprop[data]``).  All images are float32 NCHW with
values in [0, 1].

- :func:`digits` -- the digits at 8×8, or upsampled to 28×28 (cubic ``scipy.ndimage.zoom``
  to 24×24 plus a 2-pixel empty border, MNIST's look), with a fixed stratified split.
- :func:`detection` -- the Deep Taylor Decomposition seed's task (Montavon et al. 2017):
  28×56 images holding a digit of class 0-3 on one half and a distractor digit of class
  4-9 on the other (side at random); the label is the 0-3 class, and the mask of the
  target half is kept as the ground truth of where the evidence is.
- :func:`presence` -- the same images plus negatives made of two distractors: label 1 when
  a 0-3 digit is present (the DTD seed's one-output detection-pooling net).
- :func:`pattern_toy` -- the PatternNet seed's linear toy x = a_s y + a_d ε (Kindermans et al. 2018).
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["digits", "detection", "presence", "pattern_toy", "TEST_FRACTION", "SPLIT_SEED"]

#: fraction of every class held out for testing, and the seed of the split
TEST_FRACTION = 0.2
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _raw_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the zoo's training data need scikit-learn (it ships the digits): pip install 'relprop[data]'"
        ) from exc
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@functools.lru_cache(maxsize=4)
def _split_indices():
    """Stratified split: per class, a seeded permutation; the first TEST_FRACTION go to test."""
    _, y = _raw_digits()
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(TEST_FRACTION * idx.size))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _upsample(images):
    """(N, 8, 8) → (N, 28, 28): cubic zoom ×3 to 24×24, clipped to [0, 1], 2-pixel empty border."""
    from scipy.ndimage import zoom

    big = np.clip(zoom(images, (1, 3, 3), order=3, grid_mode=True, mode="nearest"), 0.0, 1.0)
    return np.pad(big, ((0, 0), (2, 2), (2, 2))).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _digits_cached(split, size):
    images, labels = _raw_digits()
    train, test = _split_indices()
    idx = {"train": train, "test": test, "all": np.arange(labels.size)}[split]
    x = images[idx]
    if size == 28:
        x = _upsample(x)
    return x[:, None], labels[idx]


def digits(split="train", size=8, flat=False):
    """The scikit-learn digits as ``(x, y)``.

    Parameters
    ----------
    split : "train" | "test" | "all"
        A fixed stratified split (20% of every class held out, seed :data:`SPLIT_SEED`).
    size : 8 | 28
        8×8 as shipped, or 28×28 (cubic upsampling to 24×24 inside a 2-pixel border).
    flat : bool
        Return x as (N, size²) instead of NCHW (N, 1, size, size).

    Returns
    -------
    x : float32 ndarray in [0, 1]
    y : int64 ndarray (N,)
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split={split!r} is invalid; expected 'train', 'test' or 'all'")
    if size not in (8, 28):
        raise ValueError(f"size={size!r} is invalid; expected 8 or 28")
    x, y = _digits_cached(split, size)
    x, y = x.copy(), y.copy()
    return (x.reshape(x.shape[0], -1) if flat else x), y


def _pairs(split, n, seed, negatives):
    """Images (n, 1, 28, 56), labels, target-half masks; ``negatives`` of them hold two distractors."""
    x28, y = digits(split, 28)
    targets = np.flatnonzero(y <= 3)
    distractors = np.flatnonzero(y >= 4)
    rng = np.random.default_rng(seed)
    n_neg = int(round(negatives * n))
    is_neg = np.zeros(n, dtype=bool)
    is_neg[rng.permutation(n)[:n_neg]] = True
    first = np.where(is_neg, rng.choice(distractors, n), rng.choice(targets, n))
    second = rng.choice(distractors, n)
    left = rng.random(n) < 0.5  # the target (or first distractor) goes on the left
    x = np.zeros((n, 1, 28, 56), dtype=np.float32)
    mask = np.zeros((n, 1, 28, 56), dtype=bool)
    for k in range(n):
        a, b = (first[k], second[k]) if left[k] else (second[k], first[k])
        x[k, 0, :, :28] = x28[a, 0]
        x[k, 0, :, 28:] = x28[b, 0]
        if not is_neg[k]:
            mask[k, 0, :, :28] = left[k]
            mask[k, 0, :, 28:] = not left[k]
    return x, y[first], mask, is_neg


def detection(split="train", n=4000, seed=0):
    """The DTD seed's detection task: a 0-3 digit beside a 4-9 distractor.

    Digits come from ``split`` of :func:`digits` only, so train and test images never share
    a digit.

    Returns
    -------
    x : float32 (n, 1, 28, 56)
    y : int64 (n,)
        The class (0-3) of the target digit.
    mask : bool (n, 1, 28, 56)
        True on the half holding the target digit (the ground truth of the evidence).
    """
    x, labels, mask, _ = _pairs(split, n, seed, negatives=0.0)
    return x, labels, mask


def presence(split="train", n=4000, seed=0, negatives=0.5):
    """Is a digit of class 0-3 present?  Detection images plus two-distractor negatives.

    Returns x (n, 1, 28, 56), y float32 (n,) in {0, 1}, mask (all False for the negatives).
    """
    x, _, mask, is_neg = _pairs(split, n, seed, negatives)
    return x, (~is_neg).astype(np.float32), mask


def pattern_toy(n=1000, seed=0, a_s=(1.0, 0.0), a_d=(1.0, 1.0), dtype=np.float32):
    """The PatternNet seed's toy: x = a_s y + a_d ε with y, ε ~ N(0, 1) independent.

    With the defaults the optimal linear filter is w ∝ (1, −1) (it cancels the distractor
    a_d ε), while the signal direction is a_s = (1, 0): the filter is not the signal.

    Returns
    -------
    x : (n, 2) array
    y : (n,) array, the signal amplitude
    """
    rng = np.random.default_rng(seed)
    y = rng.standard_normal(n)
    eps = rng.standard_normal(n)
    x = np.outer(y, np.asarray(a_s, dtype=float)) + np.outer(eps, np.asarray(a_d, dtype=float))
    return x.astype(dtype), y.astype(dtype)
