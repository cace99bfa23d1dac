"""Array namespaces and backend resolution.

relprop code above the kernels is written against an array namespace ``xp`` (NumPy or
CuPy), so the same code runs on host and device arrays.  The kernels themselves live in
one subpackage per backend (``reference``, ``cpu``, ``cuda``) with identical names.

Rules:
- NumPy input runs the ``"cpu"`` backend by default, CuPy input ``"cuda"``.
- Mixing NumPy and CuPy arrays raises :class:`TypeError`; nothing is copied silently.
- ``backend="cuda"`` accepts NumPy arrays only under ``NUMBA_ENABLE_CUDASIM=1``.
"""
from __future__ import annotations

import importlib
import os
import types

import numpy as np

BACKENDS = ("reference", "cpu", "cuda")

#: kernel families: one module of that name in every backend subpackage
FAMILIES = ("dense", "conv2d", "pool2d", "elementwise", "patterns", "train")


def _cupy():
    try:
        import cupy  # noqa: F401
    except Exception:  # pragma: no cover - cupy absent or broken
        return None
    return cupy


def is_cupy_array(x) -> bool:
    """True for a ``cupy.ndarray`` (without importing CuPy when it is not loaded)."""
    mod = type(x).__module__
    return mod.startswith("cupy") and hasattr(x, "__cuda_array_interface__")


def simulator_enabled() -> bool:
    """True when Numba's CUDA simulator is on (it must be set before Numba is imported)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def array_namespace(*arrays):
    """Return ``numpy`` or ``cupy``, the one namespace all non-None ``arrays`` share.

    Raises
    ------
    TypeError
        If NumPy and CuPy arrays are mixed, or an argument is not an array.
    """
    kinds = set()
    for a in arrays:
        if a is None:
            continue
        if is_cupy_array(a):
            kinds.add("cupy")
        elif isinstance(a, np.ndarray):
            if isinstance(a, (np.matrix, np.ma.MaskedArray)):
                raise TypeError(f"{type(a).__name__} is not supported; pass a plain numpy.ndarray")
            kinds.add("numpy")
        else:
            raise TypeError(f"expected a numpy or cupy array, got {type(a).__name__}")
    if len(kinds) > 1:
        raise TypeError(
            "numpy.ndarray and cupy.ndarray arguments are mixed; put all arrays on one device "
            "(cupy.asarray(...) or .get()) — relprop never copies between host and device silently"
        )
    if kinds == {"cupy"}:
        return _cupy()
    return np


def resolve_backend(backend, xp) -> str:
    """Pick the backend for arrays of namespace ``xp``; validate an explicit choice."""
    on_gpu = xp is not np
    if backend is None:
        return "cuda" if on_gpu else "cpu"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None")
    if on_gpu and backend != "cuda":
        raise TypeError(
            f"backend={backend!r} needs numpy arrays but got cupy arrays; use backend='cuda' "
            "or move the data to the host with .get()"
        )
    if backend == "cuda" and not on_gpu:
        if not simulator_enabled():
            if cuda_available():
                raise TypeError(
                    "backend='cuda' needs cupy arrays (or the CUDA simulator, NUMBA_ENABLE_CUDASIM=1); "
                    "got numpy arrays — move them with cupy.asarray(...)"
                )
            raise RuntimeError(
                "CUDA backend requested but no GPU is available (and NUMBA_ENABLE_CUDASIM is not set)"
            )
    if backend == "cuda" and not simulator_enabled() and not cuda_available():
        raise RuntimeError("CUDA backend requested but no GPU is available")
    return backend


def cuda_available() -> bool:
    """True when Numba can reach a GPU or runs the CUDA simulator."""
    try:
        from numba import cuda
    except Exception:  # pragma: no cover - numba without cuda support
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # pragma: no cover
        return False


_IMPLS: dict[str, types.SimpleNamespace] = {}


def kernels(backend: str) -> types.SimpleNamespace:
    """The kernel implementations of ``backend`` as one namespace (``K.conv2d_forward`` ...).

    The backend subpackage is imported on first use, so ``cuda`` never loads (or touches
    a GPU) until somebody asks for it.
    """
    ns = _IMPLS.get(backend)
    if ns is None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        ns = types.SimpleNamespace()
        for family in FAMILIES:
            try:
                mod = importlib.import_module(f"relprop.kernels.{backend}.{family}")
            except ModuleNotFoundError as exc:
                if exc.name == f"relprop.kernels.{backend}.{family}":
                    continue
                raise
            for name in getattr(mod, "__all__", ()):
                setattr(ns, name, getattr(mod, name))
        _IMPLS[backend] = ns
    return ns


def to_numpy(x):
    """Host copy of ``x`` (a no-op for NumPy arrays)."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)
