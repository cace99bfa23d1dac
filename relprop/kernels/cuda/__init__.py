"""Numba CUDA kernels: the same names and signatures as :mod:`relprop.kernels.reference`.

Hand-written ``@cuda.jit(cache=True)`` kernels (compiled lazily on first launch and cached on
disk, see :mod:`relprop.kernels.cuda._launch`: importing this
package never touches a GPU), each a grid-stride loop with one thread per output
element (a gather: one writer per element, no float atomics, bitwise reproducible).
On a GPU they take CuPy arrays; under ``NUMBA_ENABLE_CUDASIM=1`` NumPy arrays.  Matrix
products go through the arrays' own ``matmul`` (cuBLAS for CuPy): see
:mod:`relprop.kernels.cuda._launch`.  Loaded by :func:`relprop._backend.kernels` on the
first ``backend="cuda"`` request.
"""
from ._launch import set_tf32, tf32, tf32_enabled  # noqa: E402  (opt-in TF32 GEMMs; plain FP32 by default)

__all__ = ["set_tf32", "tf32", "tf32_enabled"]
