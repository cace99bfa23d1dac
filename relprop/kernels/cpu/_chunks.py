"""Run the chunks of a convolution on several threads, each with single-threaded BLAS.

A convolution here is a loop over chunks of samples: a copy into a scratch operand (Numba,
``nogil``), a few GEMMs (BLAS through ctypes, which releases the GIL) and a copy out.  There
are two ways to use two cores for it:

* BLAS's own threads split every GEMM (the default of NumPy's OpenBLAS): every GEMM call
  ends in a barrier of its threads, and the copies run on one core.
* (chosen, when there are at least two chunks) the chunks are shared out to threads that
  each run the whole chunk (copies and GEMMs) with BLAS held to one thread: no barrier per
  GEMM, the copies run in parallel, and a thread that the OS deschedules only delays the
  chunk it holds: the others keep taking chunks (a shared counter, first come first served).

Measured with other jobs on the two cores (load ~10), in one process, alternating: a 64-digit
forward of the digits_cnn zoo net 25 ms with single-threaded BLAS, 280 ms with two BLAS
threads; LeNet-5 at batch 256: 111 vs 302 ms (the barrier waits for a descheduled thread).

Results do not depend on the threads: every chunk writes its own samples of ``out``, and
a single-threaded GEMM's rounding is fixed by its shapes.

BLAS is held to one thread (``scipy_openblas_set_num_threads64_`` of NumPy's OpenBLAS) only
while at least one chunked kernel is running, counted under a lock so that concurrent
callers restore the user's setting exactly once.  Without that symbol (another BLAS), or
with ``_config.CONV_THREADS`` = 1, or a single chunk, the chunks run in the calling thread.
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from ... import _config

__all__ = ["run_chunks", "run_here", "share", "conv_threads", "numpy_blas_library"]


def numpy_blas_library():
    """NumPy's extension module as a ctypes library: the PyPI wheels link their OpenBLAS into it, so
    its BLAS symbols (``scipy_cblas_sgemm64_``, ``scipy_openblas_set_num_threads64_``) are NumPy's own
    BLAS, thread pool included.  None where it cannot be loaded."""
    try:
        try:
            from numpy._core import _multiarray_umath as umath
        except ImportError:  # pragma: no cover - NumPy 1.x
            from numpy.core import _multiarray_umath as umath
        return ctypes.CDLL(umath.__file__)
    except OSError:  # pragma: no cover
        return None


def _openblas_threads_api():
    lib = numpy_blas_library()
    try:
        set_, get = lib.scipy_openblas_set_num_threads64_, lib.scipy_openblas_get_num_threads64_
    except AttributeError:  # pragma: no cover - NumPy without scipy-openblas (or no library)
        return None
    set_.argtypes, set_.restype = [ctypes.c_int], None
    get.argtypes, get.restype = [], ctypes.c_int
    return set_, get


_BLAS_THREADS = _openblas_threads_api()
_LOCK = threading.Lock()
_STATE = {"active": 0, "saved": None, "pool": None, "pool_size": 0}
#: ``alone``: this thread is running the only chunk of a :func:`run_chunks` call (so :func:`share` may use
#: the other threads)
_LOCAL = threading.local()


def _after_fork_in_child():
    """A forked child has none of the parent's pool threads, and the lock may have been held: start afresh."""
    global _LOCK
    _LOCK = threading.Lock()
    _STATE.update(active=0, saved=None, pool=None, pool_size=0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def conv_threads():
    """Threads the chunks of one convolution are shared out to (``_config.CONV_THREADS``, or the
    CPUs this process may run on); 1 when NumPy's BLAS thread count cannot be set."""
    if _BLAS_THREADS is None:
        return 1
    n = _config.CONV_THREADS
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(n))


def _enter():
    with _LOCK:
        if _STATE["active"] == 0:
            set_, get = _BLAS_THREADS
            _STATE["saved"] = get()
            set_(1)
        _STATE["active"] += 1


def _exit():
    with _LOCK:
        _STATE["active"] -= 1
        if _STATE["active"] == 0:
            _BLAS_THREADS[0](_STATE["saved"])


def _pool(size):
    with _LOCK:
        if _STATE["pool_size"] < size:
            old = _STATE["pool"]
            _STATE["pool"] = ThreadPoolExecutor(max_workers=size, thread_name_prefix="relprop-conv")
            _STATE["pool_size"] = size
            if old is not None:
                old.shutdown(wait=False)
        return _STATE["pool"]


def run_here(fn):
    """``fn()`` on the calling thread with NumPy's BLAS held to one thread: for work too small to
    share out, without waking BLAS's own threads (they keep spinning after a threaded GEMM and take
    the cores from what follows)."""
    if _BLAS_THREADS is None:  # pragma: no cover - BLAS thread count not settable
        return fn()
    _enter()
    try:
        return fn()
    finally:
        _exit()


def run_chunks(n, nb, scratch, work, threads=None):
    """Call ``work(n0, count, buffers)`` for the chunks ``[n0, n0 + count)`` of ``range(0, n, nb)``.

    ``scratch()`` makes one set of scratch buffers; each thread makes its own.  With one
    chunk (or ``threads`` = 1: work too small to pay for a hand-off) everything runs here with BLAS
    held to one thread, and a single chunk may share its GEMMs' columns out to the threads
    (:func:`share`); with ``_config.CONV_THREADS`` = 1, here with BLAS as the user set it.
    Otherwise the calling thread and pool threads, ``conv_threads()`` (at most ``threads``) in all,
    take chunks in turn; the first exception is raised here once every started chunk has finished.

    Not BLAS's own threads for a single chunk: OpenBLAS's workers keep spinning for ~0.1 s after
    a threaded GEMM (measured: 105 ms of a core after a 64x27x50000 GEMM), so a single image's
    call left a core busy behind it, and took one from the chunks of the layers that followed
    (VGG-16 b1 forward 128-151 ms, 105 ms with BLAS held to one thread).
    """
    starts = list(range(0, n, nb))
    threads = min(conv_threads(), len(starts), threads or len(starts))
    if threads <= 1:
        def here():
            buffers = scratch()
            for n0 in starts:
                work(n0, min(nb, n - n0), buffers)

        if conv_threads() <= 1:  # CONV_THREADS = 1 (or BLAS's thread count not settable): BLAS as the user set it
            here()
            return
        alone, _LOCAL.alone = getattr(_LOCAL, "alone", False), len(starts) == 1
        try:
            run_here(here)  # BLAS held to one thread: its workers would spin on after the chunk
        finally:
            _LOCAL.alone = alone
        return
    state = {"next": 0, "done": 0, "error": None}
    lock, finished = threading.Lock(), threading.Event()

    def worker():
        buffers = None
        while True:
            with lock:
                i = state["next"]
                if i >= len(starts) or state["error"] is not None:
                    return
                state["next"] = i + 1
            try:
                if buffers is None:
                    buffers = scratch()
                n0 = starts[i]
                work(n0, min(nb, n - n0), buffers)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                with lock:
                    if state["error"] is None:
                        state["error"] = exc
            with lock:
                state["done"] += 1
                if state["done"] == state["next"] and (state["next"] >= len(starts) or state["error"] is not None):
                    finished.set()

    _enter()
    alone, _LOCAL.alone = getattr(_LOCAL, "alone", False), False
    try:
        pool = _pool(threads - 1)
        for _ in range(threads - 1):
            pool.submit(worker)
        worker()
        finished.wait()
    finally:
        _LOCAL.alone = alone
        _exit()
    if state["error"] is not None:
        raise state["error"]


def share(m, macs, fn, align=16):
    """``fn(m0, m1)`` over blocks of ``range(m)`` that together make ``fn(0, m)``: shared out to the
    threads, one block each, when the calling thread runs the only chunk of a :func:`run_chunks` call
    (a batch too small to cut into chunks: one image) and the work, ``macs`` multiply-adds, is at least
    ``_config.CONV_SHARE_MIN_MACS``; else ``fn(0, m)`` here.  Blocks start at multiples of ``align``.

    The blocks are the columns of a chunk's GEMMs (the pixels of its grid), 16 to a cache line of
    float32: every thread reads the small weight operand whole and its own columns of the large one,
    and writes its own columns.  (Blocks of rows, the output channels, ran slower: each thread
    then streamed the whole large operand.)  This is how a single image uses the cores without
    BLAS's own threads, whose workers keep spinning for ~0.1 s after a threaded GEMM (measured: a
    full core; see :func:`run_chunks`)."""
    threads = conv_threads()
    if not getattr(_LOCAL, "alone", False) or threads <= 1 or macs < _config.CONV_SHARE_MIN_MACS \
            or m < 2 * align:
        fn(0, m)
        return
    per = -(-m // threads)
    per = -(-per // align) * align
    run_chunks(m, per, lambda: None, lambda m0, count, _: fn(m0, m0 + count))
