"""Numba CPU kernels: the same names and signatures as :mod:`relprop.kernels.reference`.

``@njit(parallel=True)`` loops written as gathers (one writer per output element, so
results are bitwise reproducible) and BLAS GEMM through NumPy where a convolution or a
dense layer is a matrix product.  Numba's on-disk cache is on (``_config.NUMBA_CACHE``).
"""
