"""A pool of large host buffers for the kernels' outputs: freed arrays come back as new ones.

Why: every pass of a sweep allocates its outputs afresh (conv outputs, VJPs, unpoolings,
elementwise results: 4-51 MB each on CIFAR-VGG and VGG-16), and glibc serves an allocation of
that size with a fresh ``mmap`` whose pages the kernel faults in and zeroes on first touch
(its dynamic threshold sends every array at least as large as the last one freed to mmap, so
a sweep's equal-sized temporaries always are).  Measured on CIFAR-VGG b64 on a 2-core machine:
~7,000 page faults and 60-65 ms of system time per forward + gradient + LRP round, and the
round 1.2-1.4x faster with malloc told to keep its memory.  A library must not retune the
process's malloc, so relprop keeps its own: an array taken from here is a view of a pooled
buffer, owned by a small lease object; when the last array or view of it is gone, the buffer
goes back to the pool (at most ``_config.BUFFER_POOL_BYTES`` held; beyond that it is freed).

Contents are undefined, as ``np.empty``'s.  Only NumPy arrays of at least
``_config.BUFFER_POOL_MIN_BYTES`` come from here; smaller ones, and CuPy arrays, are plain.
"""
from __future__ import annotations

import math
import os
import threading

import numpy as np

from .. import _config

__all__ = ["empty", "empty_like", "held_bytes", "clear"]

_ALIGN = 64  # bytes: a cache line (and any SIMD width) for the first element
_GRAIN = 1 << 16  # buffer sizes are rounded up to this, so near sizes share buffers

# reentrant: a lease may die (and come back here) inside the locked region, when an allocation
# there sets off the cyclic garbage collector
_LOCK = threading.RLock()
_FREE: dict = {}  # rounded size -> [buffers]
_HELD = [0]  # bytes in _FREE


def _after_fork_in_child():
    global _LOCK
    _LOCK = threading.RLock()  # the parent's may have been held by another thread


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Lease:
    """Owner of one array's pooled memory (the ``base`` of the array and all its views)."""

    __slots__ = ("buffer", "__array_interface__", "__weakref__")

    def __init__(self, buffer, shape, dtype):
        self.buffer = buffer
        address = buffer.ctypes.data
        address += (-address) % _ALIGN
        self.__array_interface__ = {"shape": tuple(shape), "typestr": dtype.str, "data": (address, False),
                                    "version": 3}

    def __del__(self):
        try:
            _release(self.buffer)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _release(buffer):
    size = buffer.nbytes
    with _LOCK:
        if _HELD[0] + size <= _config.BUFFER_POOL_BYTES:
            _FREE.setdefault(size, []).append(buffer)
            _HELD[0] += size


def empty(shape, dtype, xp=np):
    """``xp.empty(shape, dtype)``, from the pool where ``xp`` is NumPy and the array is large."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    nbytes = math.prod(shape) * dtype.itemsize  # math.prod: np.prod costs ~3 us on a small tuple, 7 calls a forward
    if xp is not np or nbytes < _config.BUFFER_POOL_MIN_BYTES or not _config.BUFFER_POOL_BYTES:
        return xp.empty(shape, dtype=dtype)
    size = -(-(nbytes + _ALIGN) // _GRAIN) * _GRAIN
    with _LOCK:
        free = _FREE.get(size)
        buffer = free.pop() if free else None
        if buffer is not None:
            _HELD[0] -= size
    if buffer is None:
        buffer = np.empty(size, np.uint8)
    return np.asarray(_Lease(buffer, shape, dtype))


def empty_like(a):
    """:func:`empty` of ``a``'s shape and dtype, in ``a``'s namespace (C order)."""
    return empty(a.shape, a.dtype, np if isinstance(a, np.ndarray) else _namespace(a))


def _namespace(a):
    from .._backend import array_namespace

    return array_namespace(a)


def held_bytes():
    """Bytes of free buffers the pool holds now."""
    with _LOCK:
        return _HELD[0]


def clear():
    """Free every buffer the pool holds (``relprop.release_buffers()``); arrays in use are not
    affected, and their buffers come back to the pool when they are gone."""
    with _LOCK:
        _FREE.clear()
        _HELD[0] = 0
