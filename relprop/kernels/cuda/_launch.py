"""Launch plumbing shared by the CUDA kernels: grid size, stream, GEMM, scratch, scalars.

Kernels are grid-stride loops.  1-D ones (:func:`launch`) run over a flat range of
outputs with ``_config.THREADS_PER_BLOCK`` threads per block and at most
``_config.CUDA_MAX_BLOCKS`` blocks.  Kernels over (sample, row, position) index spaces
(:func:`launch_grid`) take a 3-D grid instead: x, threads over the innermost axis; y and
z, blocks over the outer two.  Each thread then derives the outer indices from its block
(uniform across the warp, once per row) and does at most one integer division per
element, where a flat index would need several 64-bit ones.

On a GPU the arrays are CuPy arrays: they are handed to Numba as zero-copy device views
(``cuda.as_cuda_array(..., sync=False)``, so a launch does not synchronise the stream)
and the kernels run on CuPy's current stream, so Numba and CuPy work stays ordered.
Under ``NUMBA_ENABLE_CUDASIM=1`` the arrays are NumPy arrays and the simulator runs the
same kernel bodies on the host.

Kernels are compiled with ``@cuda.jit(cache=_config.NUMBA_CACHE)`` (True): numba-cuda keeps the
compiled code in ``__pycache__`` (one file per signature and compute capability), so a
second process -- the next test run, compute-sanitizer, the benchmark -- loads it instead
of compiling again.  The simulator accepts and ignores the flag.

GEMM choice: matrix products go through :func:`matmul`, i.e. ``xp.matmul`` of the
arrays' own namespace -- ``cupy.matmul`` (cuBLAS) on a GPU, ``numpy.matmul`` under the
simulator, where the arrays are NumPy arrays.  A hand-written GEMM kernel would be
slower than cuBLAS on a GPU and far too slow in the simulator; everything around the
GEMMs (im2col/col2im, bias, masks, ratios) is a kernel of ours.  float32 GEMMs are plain
FP32 by default; :func:`set_tf32` opts in to TF32 tensor cores (10-bit mantissa inputs,
FP32 accumulation: faster on Ampere and later, and what PyTorch's cuDNN convolutions use
by default), ``RELPROP_CUDA_TF32=1`` in the environment likewise.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
from numba import cuda

from ... import _config
from ..._backend import array_namespace, is_cupy_array

_STREAMS: dict = {}

#: grid.y and grid.z hold at most this many blocks (a hardware limit); x holds 2^31 - 1
_MAX_GRID_YZ = 65535

#: float32 GEMMs on TF32 tensor cores (opt-in; see :func:`set_tf32`)
_TF32 = os.environ.get("RELPROP_CUDA_TF32", "0") not in ("", "0")


def grid(n):
    """(blocks, threads per block) for a grid-stride loop over ``n`` items."""
    tpb = int(_config.THREADS_PER_BLOCK)
    return max(1, min(-(-int(n) // tpb), int(_config.CUDA_MAX_BLOCKS))), tpb


def grid3(shape):
    """((blocks x, y, z), threads per block) for a 3-D grid-stride loop over ``shape = (nz, ny, nx)``.

    x: threads over the innermost axis (at most ``CUDA_MAX_BLOCKS`` blocks); y, z: one
    block per index of the middle and outer axis, at most ``min(CUDA_MAX_BLOCKS, 65535)``
    (the kernels stride over the rest).
    """
    nz, ny, nx = (int(s) for s in shape)
    tpb = int(_config.THREADS_PER_BLOCK)
    cap = int(_config.CUDA_MAX_BLOCKS)
    cap_yz = min(cap, _MAX_GRID_YZ)
    return (max(1, min(-(-nx // tpb), cap)), max(1, min(ny, cap_yz)), max(1, min(nz, cap_yz))), tpb


def stream_for(x):
    """CuPy's current stream as a Numba stream for a CuPy array; the default stream otherwise."""
    if not is_cupy_array(x):
        return 0
    import cupy

    ptr = cupy.cuda.get_current_stream().ptr
    stream = _STREAMS.get(ptr)
    if stream is None:
        stream = _STREAMS[ptr] = cuda.external_stream(ptr)
    return stream


def _device_view(a):
    # CuPy exports its stream in __cuda_array_interface__; Numba would synchronise on it at
    # every launch.  The kernels run on that very stream, so skip the sync.
    return cuda.as_cuda_array(a, sync=False) if is_cupy_array(a) else a


def launch(kernel, n, *args):
    """Run ``kernel`` as a grid-stride loop over ``n`` items (on CuPy's current stream for CuPy arrays)."""
    if n <= 0:
        return
    like = next((a for a in args if is_cupy_array(a)), None)
    blocks, tpb = grid(n)
    kernel[blocks, tpb, stream_for(like)](*(_device_view(a) for a in args))


def launch_grid(kernel, shape, *args):
    """Run ``kernel`` as a 3-D grid-stride loop over ``shape = (nz, ny, nx)`` (see :func:`grid3`).

    The kernel loops ``for z in range(z0, nz, sz): for y in range(y0, ny, sy): for x in
    range(x0, nx, sx)`` with ``x0, y0, z0 = cuda.grid(3)`` and ``sx, sy, sz = cuda.gridsize(3)``.
    """
    if min(int(s) for s in shape) <= 0:
        return
    like = next((a for a in args if is_cupy_array(a)), None)
    blocks, tpb = grid3(shape)
    kernel[blocks, tpb, stream_for(like)](*(_device_view(a) for a in args))


def check_index_range(n, what):
    """Kernels split an index of at most ``n`` values with 32-bit unsigned division: refuse larger ones."""
    if int(n) >= 2 ** 31:
        raise ValueError(f"{what} has {int(n)} entries; the CUDA kernels index it in 32 bits (at most 2**31 - 1)")


def set_tf32(enabled):
    """Run float32 GEMMs of CuPy arrays on TF32 tensor cores (``True``) or in plain FP32 (``False``, the default).

    TF32 rounds the GEMM inputs to a 10-bit mantissa (relative error ~1e-3 per product,
    FP32 accumulation), so results no longer agree with the cpu backend to float32
    precision; use it to compare like with like against PyTorch's TF32 convolutions.
    float64 and NumPy (simulator) GEMMs are unaffected.  Returns the previous setting.
    """
    global _TF32
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"set_tf32: enabled must be a bool, got {type(enabled).__name__}")
    previous, _TF32 = _TF32, bool(enabled)
    return previous


def tf32_enabled():
    """Whether float32 GEMMs of CuPy arrays run on TF32 tensor cores (:func:`set_tf32`)."""
    return _TF32


@contextlib.contextmanager
def tf32(enabled=True):
    """Context manager form of :func:`set_tf32`: the previous setting comes back on exit."""
    previous = set_tf32(enabled)
    try:
        yield
    finally:
        set_tf32(previous)


def _per_matrix(xp, a, b, out):
    """``out[i] = a[i] @ b[i]`` as 2-D products (a 2-D operand is shared by every i)."""
    if out.ndim == 2:
        xp.matmul(a, b, out=out)
        return out
    for i in range(out.shape[0]):
        xp.matmul(a if a.ndim == 2 else a[i], b if b.ndim == 2 else b[i], out=out[i])
    return out


@contextlib.contextmanager
def _cupy_compute_type_tf32():
    from cupy._core import _routines_linalg as linalg

    previous = linalg.get_compute_type(np.float32)
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32)
    try:
        yield
    finally:
        linalg.set_compute_type(np.float32, previous)


def matmul(a, b, out):
    """``out[...] = a @ b`` with the arrays' namespace: cuBLAS on a GPU, NumPy under the simulator.

    A 2-D operand against a 3-D one is a batched product with the 2-D operand shared.  With
    TF32 on (:func:`set_tf32`) a float32 CuPy product runs as 2-D products under CuPy's
    TF32 compute type (CuPy honours a compute type in 2-D products only).
    """
    xp = array_namespace(a, b, out)
    if _TF32 and out.dtype == np.float32 and is_cupy_array(out):
        with _cupy_compute_type_tf32():
            return _per_matrix(xp, a, b, out)
    return xp.matmul(a, b, out=out)


def empty(like, shape, dtype=None):
    """Scratch in the namespace of ``like`` (CuPy on a GPU, so that cuBLAS can take it)."""
    return array_namespace(like).empty(shape, dtype=like.dtype if dtype is None else dtype)


def scalar(dtype, value):
    """``value`` as a NumPy scalar of ``dtype``: a float32 kernel then computes in float32."""
    return np.dtype(dtype).type(value)
