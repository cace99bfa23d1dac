"""Which OpenMP runtime Numba's parallel kernels run on, and how its idle threads wait.

The problem (measured, see README "Threads"): when PyTorch is imported before relprop, the
parallel Numba kernels ran 10-20x slower.  ``import torch`` loads PyTorch's own copy of
GNU OpenMP (``torch/lib/libgomp.so.1``) with ``RTLD_GLOBAL``, so its symbols come first in the
process's global lookup scope.  Numba's OpenMP threading layer (``numba/np/ufunc/omppool``,
loaded lazily at the first parallel kernel) then binds ``GOMP_parallel`` to *PyTorch's*
runtime (``LD_DEBUG=bindings`` shows it), which read its environment when torch was imported,
before relprop could set ``OMP_WAIT_POLICY=PASSIVE``.  Its idle workers spin for milliseconds
after every parallel loop and take the two cores from the BLAS threads of the next
convolution.  libgomp has no API to change the wait policy after start-up (it is read once,
in the library's constructor), so setting the variable later has no effect.

The fix: load Numba's OpenMP layer ourselves, at ``import relprop``, with ``RTLD_DEEPBIND``:
the module then resolves its OpenMP symbols in its *own* dependency first, the system
``libgomp.so.1.0.0`` (a separate copy from PyTorch's: the names differ), which is loaded at
that moment and so reads ``OMP_WAIT_POLICY=PASSIVE``.  Numba finds the module already
imported and uses it.  PyTorch keeps its own runtime.  The OpenMP layer is thread-safe
(two Python threads may run parallel kernels at once; Numba's ``workqueue`` layer, the other
one that does not depend on the wait policy, aborts the process then).

Not done (kept as they are) when: the platform has no ``RTLD_DEEPBIND`` (not glibc);
Numba's threads are already running or its OpenMP module already loaded (someone ran a
parallel Numba function before importing relprop: too late); the user chose another
threading layer (``NUMBA_THREADING_LAYER``); ``LD_PRELOAD`` is set (a preloaded allocator
would be bypassed by a deep-bound library); or ``RELPROP_OPENMP_DEEPBIND=0``.
:func:`openmp_binding` reports what happened.
"""
from __future__ import annotations

import os
import sys
import types

__all__ = ["bind_numba_openmp", "openmp_binding"]

_STATE = {"binding": "not attempted"}


def _skip_reason():
    if os.environ.get("RELPROP_OPENMP_DEEPBIND", "1").strip() in ("0", "false", "no", "off"):
        return "disabled by RELPROP_OPENMP_DEEPBIND=0"
    if not sys.platform.startswith("linux") or not hasattr(os, "RTLD_DEEPBIND"):
        return "no RTLD_DEEPBIND on this platform"
    if os.environ.get("LD_PRELOAD"):
        return "LD_PRELOAD is set"
    if "numba.np.ufunc.omppool" in sys.modules:
        return "Numba's OpenMP layer was already loaded"
    from numba.core import config
    from numba.np.ufunc import parallel

    if getattr(parallel, "_is_initialized", False):
        return "Numba's threads were already running"
    layer = str(config.THREADING_LAYER).lower()
    if layer not in ("default", "omp", "threadsafe"):
        return f"threading layer {layer!r} chosen (NUMBA_THREADING_LAYER)"
    return None


def bind_numba_openmp():
    """Load Numba's OpenMP threading layer deep-bound to its own libgomp (see the module doc).

    Call after ``OMP_WAIT_POLICY`` is set and before the first parallel kernel; a second call
    does nothing.  Never raises: on any failure Numba loads its layer as usual.
    Returns :func:`openmp_binding`.
    """
    if _STATE["binding"] != "not attempted":
        return _STATE["binding"]
    reason = _skip_reason()
    if reason is not None:
        _STATE["binding"] = f"skipped: {reason}"
        return _STATE["binding"]
    flags = sys.getdlopenflags()
    try:
        sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
        import numba.np.ufunc.omppool  # noqa: F401
        _STATE["binding"] = "deepbind"
    except Exception as exc:  # pragma: no cover - no OpenMP runtime installed: Numba picks another layer
        sys.modules.pop("numba.np.ufunc.omppool", None)
        _STATE["binding"] = f"failed: {exc}"
    finally:
        sys.setdlopenflags(flags)
    return _STATE["binding"]


def openmp_binding():
    """How Numba's OpenMP layer was loaded: "deepbind", "skipped: <why>", "failed: <why>" or "not attempted"."""
    return _STATE["binding"]


def parallel_above(kernel_name=None):
    """Compile a ``prange`` kernel twice, parallel and serial, and pick by the size of its first argument.

    A parallel loop has to wait until every one of its threads has been scheduled; on a
    machine whose cores are shared with other processes that wait is a scheduler time slice
    (milliseconds), far longer than a pass over a small array.  Measured with other jobs
    running (load ~10 on 2 cores): a 64-digit forward of the digits_cnn zoo net took 34 ms
    with one Numba thread and 127 ms with two.  So arrays below
    ``_config.PARALLEL_MIN_ELEMENTS`` elements run the serial twin (same code, ``prange`` as
    ``range``: same results bit for bit, one writer per element either way).

    ``kernel_name``: the name the wrapper reports (defaults to the function's).  The wrapper
    keeps both compiled kernels as ``.parallel`` and ``.serial`` (tests pin one).
    """
    from numba import njit

    from ... import _config

    def wrap(fn):
        opts = dict(cache=_config.NUMBA_CACHE, fastmath=_config.FASTMATH_FLAGS)
        par = njit(parallel=True, **opts)(fn)
        # a copy under its own name: Numba's on-disk cache keys a function by qualified name and
        # signature, not by the parallel flag, so the twins must not share a name
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__,
                                  fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        ser = njit(**opts)(twin)

        def call(*args):
            return (call.parallel if args[0].size >= _config.PARALLEL_MIN_ELEMENTS else call.serial)(*args)

        call.__name__ = call.__qualname__ = kernel_name or fn.__name__
        call.__doc__ = fn.__doc__
        call.__module__ = fn.__module__
        call.__wrapped__ = fn
        call.parallel, call.serial, call.py_func = par, ser, fn
        return call

    return wrap
