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

An LRP rule's modified weights (z⁺'s W⁺) are kept here too, derived from the layer's weights like the
rest (:func:`relprop.rules.core._term_weight`): a new explainer gets the same W⁺, and with it its transforms.
An array this cache made (W⁺) is not checked when its own arrangements (W⁺'s Winograd transform) are
looked up, and no copy of it is kept: it is current whenever the weights it came from are (they are
checked), and nothing writes it (were something to, the entry it came from would hand the changed array
out all the same, so a check of it could not mend that).  On VGG-16 b4 those checks were 14 ms of
ε+flat's CPU time (a second read of W⁺ and its copy, 59 MB each) and their copies 59 MB.

Bounded by ``_config.WINOGRAD_CACHE_BYTES`` (the derived arrays and the copies, each copy counted once),
least recently used first out; an entry goes when its weight array is collected (its id may be reused;
at once, or at the next lookup where the collection came inside one: :func:`_forget`).

Within :func:`one_call` (an explanation: :class:`relprop.Explainer` opens it, and so does a net's
forward) weights found unchanged are not checked again: a gradient looks each convolution's weights up
twice (the forward's arrangement and the input-VJP's), an LRP rule its modified weights twice too, and
SmoothGrad or Integrated Gradients once per step.  Nothing changes a net's weights while relprop
explains with it.

Checked ahead, on another thread: a block opened for an ``owner`` (the net, the explainer) starts, on a
thread of its own, the checks of the weights that the owner's previous block looked up, in the order it
looked them up, while the calling thread computes; a lookup then takes the verdict (waiting for it only
if the checker is behind).  The checks are the same, the calling thread no longer makes them: at
CIFAR-VGG batch 1 they were a fifth of a forward (0.4 ms of reading 4.6 MB twice, and the caches they
cleared).  Only with more than one thread (:func:`relprop.kernels.cpu._chunks.conv_threads`),
``_config.WEIGHT_CHECKS_AHEAD``, and for small batches (``_config.WEIGHT_CHECKS_AHEAD_MAX_SAMPLES``:
larger ones keep every thread busy, and the checker only takes a core from them).
"""
import os
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from ... import _config
from ._chunks import conv_threads

_CACHE = OrderedDict()  # (id(w), kind) -> (weakref to w, copy of w (None if made here), derived array)
_LOCK = threading.Lock()
_DEAD = []  # keys of entries whose weights were collected, dropped by _purge (under the lock)
_MADE = {}  # id(a) -> weakref to a, for the arrays this cache made (see the module doc)
#: per thread: depth (of nested one_call blocks); seen: id(w) -> the copy w was found equal to; ahead: the
#: block's background checks (or None); order: weak references to the weights looked up and their copies, in order
_CALL = threading.local()
_LAST = weakref.WeakKeyDictionary()  # owner -> its last block's order (see _CALL)
_CHECKER = {"pool": None}


def _after_fork_in_child():
    _CHECKER["pool"] = None  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Ahead:
    """The checks of ``pairs`` [(w, copy)], in order, on the checker thread; ``verdict(w, copy)`` waits for
    one: True (same bits), False (changed), None (not among them, or the checker failed)."""

    #: seconds the calling thread polls for a verdict (giving up the GIL) before it blocks on the checker
    POLL = 0.002

    def __init__(self, pairs):
        self.pairs = pairs
        self.index = {id(w): i for i, (w, _) in enumerate(pairs)}
        self.done = bytearray(len(pairs))  # 0: pending, 1: same, 2: changed
        with _LOCK:
            if _CHECKER["pool"] is None:
                _CHECKER["pool"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relprop-weights")
            self.future = _CHECKER["pool"].submit(self._run)

    def _run(self):
        for i, (w, copy) in enumerate(self.pairs):
            self.done[i] = 1 if _same_bits(w, copy) else 2

    def verdict(self, w, copy):
        i = self.index.get(id(w))
        if i is None or self.pairs[i][0] is not w or self.pairs[i][1] is not copy:
            return None
        if self.done[i] == 0:
            end = time.perf_counter() + self.POLL
            while self.done[i] == 0 and not self.future.done() and time.perf_counter() < end:
                time.sleep(0)  # gives the GIL to the checker without leaving the core
            if self.done[i] == 0:
                try:
                    self.future.result()
                except Exception:  # noqa: BLE001 - the caller checks here instead
                    return None
        return self.done[i] == 1


def _pairs(refs):
    """[(w, copy)] for the (weak references to) weights and their copies ``refs`` whose both are still alive."""
    pairs = [(w(), c()) for w, c in refs]
    return [(w, c) for w, c in pairs if w is not None and c is not None]


class one_call:
    """A block (``with one_call(...):``, on this thread) in which weights are checked against their copies at
    most once each; with an ``owner`` (weak-referenceable: a net, an explainer) and a batch of at most
    ``_config.WEIGHT_CHECKS_AHEAD_MAX_SAMPLES`` ``samples``, the weights the owner's previous block looked
    up are checked ahead on another thread (see the module doc).  (A class, not a generator: a net's
    forward opens one, and at LeNet-5 batch 1 a forward is 0.14 ms.)"""

    __slots__ = ("owner", "samples", "outer", "refs")

    def __init__(self, owner=None, samples=1):
        self.owner, self.samples, self.refs = owner, samples, None

    def __enter__(self):
        depth = getattr(_CALL, "depth", 0)
        self.outer = depth > 0
        _CALL.depth = depth + 1
        if self.outer:
            return self
        _CALL.seen, _CALL.ahead, _CALL.order = {}, None, None
        owner = self.owner
        if owner is not None and _config.WEIGHT_CHECKS_AHEAD and _config.WINOGRAD_CACHE_BYTES:
            try:
                self.refs = refs = _LAST.get(owner)
            except TypeError:  # not weak-referenceable: no checks ahead
                self.owner = None
                return self
            _CALL.order = []
            if refs and self.samples <= _config.WEIGHT_CHECKS_AHEAD_MAX_SAMPLES and conv_threads() > 1:
                pairs = _pairs(refs)
                try:
                    _CALL.ahead = _Ahead(pairs) if pairs else None
                except RuntimeError:  # no new threads (the interpreter is shutting down): checks here
                    _CALL.ahead = None
        return self

    def __exit__(self, *exc):
        _CALL.depth -= 1
        if self.outer:
            return False
        order, ahead = _CALL.order, _CALL.ahead
        _CALL.seen = _CALL.ahead = _CALL.order = None
        if order is not None and (order or self.refs):
            _LAST[self.owner] = order
        if ahead is not None and not ahead.future.done():
            try:
                ahead.future.result()  # nothing reads the weights after the block
            except Exception:  # noqa: BLE001 - a failed checker: the lookups compared on this thread instead
                pass
        return False


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
    """The callback of w's weak reference: w was collected, its entry goes, by :func:`_purge` under the lock.
    The callback runs wherever the collection happens, the garbage collector's included, which may be inside
    a loop over the cache (seen: "OrderedDict mutated during iteration"); every such loop holds the lock, so
    the entry is dropped here only if the lock is free, else by the next lookup."""
    def drop(_ref):
        dead, lock = _DEAD, _LOCK
        if dead is None or lock is None:  # (None once the interpreter is tearing the module down)
            return
        dead.append(key)
        if lock.acquire(blocking=False):
            try:
                _purge()
            finally:
                lock.release()
    return drop


def _purge():
    """Drop the entries of collected weights (call with the lock held).  A key may name a new entry by now (the
    id reused by a new array): only an entry whose weights are gone is dropped."""
    while _DEAD:
        key = _DEAD.pop()
        entry = _CACHE.get(key)
        if entry is not None and entry[0]() is None:
            del _CACHE[key]


def _made_here(w):
    """Did this cache make the array ``w`` (a derived array, such as a rule's W⁺)?"""
    ref = _MADE.get(id(w))
    return ref is not None and ref() is w


def _remember_made(value, w):
    """Record ``value``, made from ``w``, as made here: where it is an array of its own (not w, no view)."""
    if not isinstance(value, np.ndarray) or value is w or value.base is not None or not value.flags.owndata:
        return
    key = id(value)

    def drop(ref):
        if _MADE.get(key) is ref:
            del _MADE[key]

    _MADE[key] = weakref.ref(value, drop)


def _current(entry, w):
    """Is the cache entry ``entry`` (or None) one for ``w`` as it is now?  Inside :func:`one_call`, a copy
    that ``w`` was found equal to there already is taken without a second look; an array made here needs none
    (see the module doc)."""
    if entry is None or entry[0]() is not w:
        return False
    if entry[1] is None:  # made here (see the module doc)
        return _made_here(w)
    if entry[1].dtype != w.dtype or entry[1].shape != w.shape:
        return False
    seen = getattr(_CALL, "seen", None)
    if seen is not None and seen.get(id(w)) is entry[1]:
        return True
    ahead = getattr(_CALL, "ahead", None)
    same = None if ahead is None else ahead.verdict(w, entry[1])
    if same is None:
        same = _same_bits(w, entry[1])
    if not same:
        return False
    if seen is not None:
        seen[id(w)] = entry[1]
        if _CALL.order is not None:
            _CALL.order.append((weakref.ref(w), weakref.ref(entry[1])))
    return True


def derived(w, kind, make):
    """``make()``, the array of ``kind`` derived from the weights ``w``, from the cache where ``w`` is unchanged
    since it was made (see the module doc); ``kind`` names the derivation (hashable), ``make`` forms it."""
    limit = _config.WINOGRAD_CACHE_BYTES
    if not limit:
        return make()
    key = (id(w), kind)
    with _LOCK:
        _purge()
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
        _purge()
        _remember_made(value, w)
        # another kind's copy of the same weights, if current, is shared; an array made here needs none (and a
        # strong reference to it here would keep it, and its entries, alive for good)
        other = next((e for k, e in _CACHE.items() if k[0] == id(w) and k != key and e[0]() is w), None)
        if _made_here(w):
            copy = None
        elif other is not None and _current(other, w):
            copy = other[1]
        else:
            copy = np.array(w, order="C", copy=True)
        _CACHE[key] = (ref, copy, value)
        seen = getattr(_CALL, "seen", None)
        if seen is not None and copy is not None and seen.get(id(w)) is not copy:
            seen[id(w)] = copy
            if _CALL.order is not None:
                _CALL.order.append((ref, weakref.ref(copy)))
        while _cache_bytes() > limit and _CACHE:
            _CACHE.popitem(last=False)
    return value


def _cache_bytes():
    """Bytes held by the cache: every derived array, and every weight copy once."""
    copies = {id(e[1]): e[1].nbytes for e in _CACHE.values() if e[1] is not None}
    return sum(e[2].nbytes for e in _CACHE.values()) + sum(copies.values())
