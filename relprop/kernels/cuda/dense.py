"""Numba CUDA twins of :mod:`relprop.kernels.reference.dense` (same names, signatures, math).

Layout (PyTorch's): x (N, I), w (J, I), b (J,).  The products are GEMMs through
:func:`relprop.kernels.cuda._launch.matmul` (cuBLAS on a GPU, NumPy under the
simulator); the bias is added by a kernel of ours, one thread per output element.
"""
from numba import cuda

from ... import _config
from ._launch import launch, matmul

__all__ = ["dense_forward", "dense_vjp"]


@cuda.jit(cache=_config.NUMBA_CACHE)
def _add_bias_kernel(out, b):
    # out (R, J) += b (J,) broadcast over rows; one thread per element
    n_out = b.shape[0]
    for k in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[k // n_out, k % n_out] += b[k % n_out]


def dense_forward(x, w, b, out):
    """Same math as :func:`relprop.kernels.reference.dense.dense_forward`: GEMM x Wᵀ, then a bias kernel."""
    matmul(x, w.T, out)
    launch(_add_bias_kernel, out.size, out, b)
    return out


def dense_vjp(g, w, out):
    """Same math as :func:`relprop.kernels.reference.dense.dense_vjp`: the GEMM g W."""
    matmul(g, w, out)
    return out
