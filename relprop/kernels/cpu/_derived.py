"""Arrays derived from a layer's weights, kept between calls while the weights are unchanged.

A convolution's weights are the same on every call of a net, and so is every arrangement of them a
CPU path multiplies with: Winograd's filter transform U (:func:`relprop.kernels.cpu.winograd.transformed_filters`,
36 values per 9 weights, both orientations) and the row-shift GEMMs' tap order
(:func:`relprop.kernels.cpu.conv2d._taps`, a transposing copy).  Forming them on every call cost, at
CIFAR-VGG batch 1 where no convolution is large, a fifth of the forward (the transposing copies: 0.6 ms of
3.6 ms).  Each is cached by the identity of the weight array and its ``kind``; a hit is used only if the
array still holds the bits of the copy kept when the entry was made, so weights changed in place are
derived afresh.  The check reads two arrays the size of the weights, front to back (:func:`_same_bits`:
half the time of the transposing copy it replaces, a sixth of forming U).

Bounded by ``_config.WINOGRAD_CACHE_BYTES`` (the derived arrays and the copies, each copy counted once),
least recently used first out; an entry goes when its weight array is collected (its id may be reused).

Within :func:`one_call` (an explanation: :class:`relprop.Explainer` opens it) weights found unchanged
are not checked again: a gradient looks each convolution's weights up twice (the forward's arrangement
and the input-VJP's), an LRP rule its modified weights twice too, and SmoothGrad or Integrated Gradients
once per step.  Nothing changes a net's weights while relprop explains with it.
"""
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
from numba import njit

from ... import _config

_CACHE = OrderedDict()  # (id(w), kind) -> (weakref to w, copy of w, derived array)
_LOCK = threading.Lock()
_CALL = threading.local()  # depth: of nested one_call blocks; seen: id(w) -> the copy w was found equal to


@contextmanager
def one_call():
    """A block (on this thread) in which weights are checked against their copies at most once each."""
    depth = getattr(_CALL, "depth", 0)
    if depth == 0:
        _CALL.seen = {}
    _CALL.depth = depth + 1
    try:
        yield
    finally:
        _CALL.depth = depth
        if depth == 0:
            _CALL.seen = None


@njit(cache=_config.NUMBA_CACHE, nogil=True)
def _same_words(a, b):
    """Are the unsigned words a and b (1-D, one length) equal, word by word?  By blocks, OR-reducing the XORs
    (a loop the compiler vectorises), leaving at the first block that differs."""
    n = a.size
    for i in range(0, n, 4096):
        acc = a[i] ^ a[i]
        for j in range(i, min(n, i + 4096)):
            acc |= a[j] ^ b[j]
        if acc != 0:
            return False
    return True


def _same_bits(a, b):
    """Do ``a`` and ``b`` (one dtype and shape; ``b`` C-contiguous) hold the same bits?  NaN payloads and the
    sign of a zero count: this asks whether the array changed, not whether its values compare equal.  (A
    strided ``a`` is compared through a contiguous copy.)"""
    a = np.ascontiguousarray(a)
    word = np.uint64 if a.nbytes % 8 == 0 else np.uint8
    return bool(_same_words(a.reshape(-1).view(word), b.reshape(-1).view(word)))


def _forget(key):
    def drop(_ref):  # w was collected: its id may be reused
        cache = _CACHE
        if cache is not None:  # (None once the interpreter is tearing the module down)
            cache.pop(key, None)
    return drop


def _current(entry, w):
    """Is the cache entry ``entry`` (or None) one for ``w`` as it is now?  Inside :func:`one_call`, a copy
    that ``w`` was found equal to there already is taken without a second look."""
    if entry is None or entry[0]() is not w or entry[1].dtype != w.dtype or entry[1].shape != w.shape:
        return False
    seen = getattr(_CALL, "seen", None)
    if seen is not None and seen.get(id(w)) is entry[1]:
        return True
    if not _same_bits(w, entry[1]):
        return False
    if seen is not None:
        seen[id(w)] = entry[1]
    return True


def derived(w, kind, make):
    """``make()``, the array of ``kind`` derived from the weights ``w``, from the cache where ``w`` is unchanged
    since it was made (see the module doc); ``kind`` names the derivation (hashable), ``make`` forms it."""
    limit = _config.WINOGRAD_CACHE_BYTES
    if not limit:
        return make()
    key = (id(w), kind)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
    if _current(hit, w):
        return hit[2]
    value = make()
    try:
        ref = weakref.ref(w, _forget(key))
    except TypeError:  # pragma: no cover - an array type without weak references
        return value
    with _LOCK:
        # another kind's copy of the same weights, if current, is shared
        other = next((e for k, e in _CACHE.items() if k[0] == id(w) and k != key and e[0]() is w), None)
        copy = other[1] if other is not None and _current(other, w) else np.array(w, order="C", copy=True)
        _CACHE[key] = (ref, copy, value)
        seen = getattr(_CALL, "seen", None)
        if seen is not None:
            seen[id(w)] = copy
        while _cache_bytes() > limit and _CACHE:
            _CACHE.popitem(last=False)
    return value


def _cache_bytes():
    """Bytes held by the cache: every derived array, and every weight copy once."""
    copies = {id(e[1]): e[1].nbytes for e in _CACHE.values()}
    return sum(e[2].nbytes for e in _CACHE.values()) + sum(copies.values())
