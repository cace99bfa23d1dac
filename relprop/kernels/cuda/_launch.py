"""Launch plumbing shared by the CUDA kernels: grid size, stream, GEMM, scratch, scalars.

Every kernel is a 1-D grid-stride loop over its outputs, launched with
``_config.THREADS_PER_BLOCK`` threads per block and at most ``_config.CUDA_MAX_BLOCKS``
blocks.  On a GPU the arrays are CuPy arrays: they are handed to Numba as zero-copy
device views (``cuda.as_cuda_array(..., sync=False)``, so a launch does not synchronise
the stream) and the kernels run on CuPy's current stream, so Numba and CuPy work stays
ordered.  Under ``NUMBA_ENABLE_CUDASIM=1`` the arrays are NumPy arrays and the simulator
runs the same kernel bodies on the host.

GEMM choice: matrix products go through :func:`matmul`, i.e. ``xp.matmul`` of the
arrays' own namespace -- ``cupy.matmul`` (cuBLAS) on a GPU, ``numpy.matmul`` under the
simulator, where the arrays are NumPy arrays.  A hand-written GEMM kernel would be
slower than cuBLAS on a GPU and far too slow in the simulator; everything around the
GEMMs (im2col/col2im, transposes, bias, masks, ratios) is a kernel of ours.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ... import _config
from ..._backend import array_namespace, is_cupy_array

_STREAMS: dict = {}


def grid(n):
    """(blocks, threads per block) for a grid-stride loop over ``n`` items."""
    tpb = int(_config.THREADS_PER_BLOCK)
    return max(1, min(-(-int(n) // tpb), int(_config.CUDA_MAX_BLOCKS))), tpb


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


def matmul(a, b, out):
    """``out[...] = a @ b`` with the arrays' namespace: cuBLAS on a GPU, NumPy under the simulator."""
    return array_namespace(a, b, out).matmul(a, b, out=out)


def empty(like, shape, dtype=None):
    """Scratch in the namespace of ``like`` (CuPy on a GPU, so that cuBLAS can take it)."""
    return array_namespace(like).empty(shape, dtype=like.dtype if dtype is None else dtype)


def scalar(dtype, value):
    """``value`` as a NumPy scalar of ``dtype``: a float32 kernel then computes in float32."""
    return np.dtype(dtype).type(value)
