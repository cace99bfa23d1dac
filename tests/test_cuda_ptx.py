"""Every CUDA kernel compiles to PTX for the argument types its launcher passes (no GPU needed).

The simulator runs kernel bodies as Python and so never type-checks them; this test does.
It calls every launcher of :mod:`relprop.kernels.cuda` on small NumPy arrays with
``launch`` replaced by a recorder, then compiles each recorded (kernel, argument types)
with ``numba.cuda.compile_ptx`` (NVVM only, no driver).  float32 kernels must not compute
in float64 (a silent 32x slowdown on most GPUs), except where they write float64
accumulators.  Skipped under the simulator and where NVVM is missing.
"""
import importlib

import numba
import numpy as np
import pytest

from relprop import _backend

#: kernels that legitimately do float64 work on float32 input (they add into float64 accumulators)
F64_ACCUMULATORS = {"_flush_kernel"}


def _nvvm_or_skip():
    if _backend.simulator_enabled():
        pytest.skip("compile_ptx is not available under NUMBA_ENABLE_CUDASIM")
    from numba import cuda

    def probe(a):
        a[0] = 1

    try:
        cuda.compile_ptx(probe, (numba.float32[:],), cc=(8, 0))
    except Exception as exc:  # no NVVM / CUDA toolkit on this machine
        pytest.skip(f"numba.cuda.compile_ptx unavailable: {type(exc).__name__}: {str(exc)[:80]}")
    return cuda


def _record_launches(monkeypatch):
    calls = []

    def recorder(kernel, n, *args):
        calls.append((kernel, tuple(numba.typeof(a) for a in args)))

    for family in _backend.FAMILIES + ("_reduce",):
        try:
            mod = importlib.import_module(f"relprop.kernels.cuda.{family}")
        except ModuleNotFoundError:
            continue
        if hasattr(mod, "launch"):
            monkeypatch.setattr(mod, "launch", recorder)
    return calls


def _drive_every_launcher(dtype):
    """Call each cuda launcher once on small arrays of ``dtype`` (results are garbage: launches are recorded)."""
    from relprop._backend import kernels

    K = kernels("cuda")
    f = np.dtype(dtype).type
    x, w, b = np.ones((2, 3, 7, 6), dtype), np.ones((4, 3, 3, 2), dtype), np.ones(4, dtype)
    geo = ((2, 1), (1, 2), (1, 2))
    z = np.ones((2, 4, 4, 4), dtype)
    K.conv2d_forward(x, w, b, *geo, np.empty_like(z))
    K.conv2d_vjp(z, w, *geo, np.empty_like(x))
    pooled = np.empty((2, 3, 4, 6), dtype)
    K.maxpool2d_forward(x, (3, 2), (2, 1), (1, 1), pooled, np.zeros(pooled.shape, np.int64))
    K.maxunpool2d(pooled, np.zeros(pooled.shape, np.int64), np.empty_like(x))
    K.avgpool2d_forward(x, (3, 2), (2, 1), (1, 1), pooled)
    K.avgpool2d_vjp(pooled, (3, 2), (2, 1), (1, 1), np.empty_like(x))
    for name in ("relu_forward", "relu_backward_deconvnet"):
        getattr(K, name)(x, np.empty_like(x))
    for name in ("relu_backward_gradient", "relu_backward_guided"):
        getattr(K, name)(x, x, np.empty_like(x))
    K.stabilized_divide(x, x, f(0.1), np.empty_like(x))
    x2, w2 = np.ones((2, 5), dtype), np.ones((3, 5), dtype)
    K.dense_forward(x2, w2, np.ones(3, dtype), np.empty((2, 3), dtype))
    K.dense_vjp(np.ones((2, 3), dtype), w2, np.empty((2, 5), dtype))
    if hasattr(K, "dense_weight_vjp"):
        K.dense_weight_vjp(x2, np.ones((2, 3), dtype), np.empty_like(w2), np.empty(3, dtype))
        K.conv2d_weight_vjp(x, z, *geo, np.empty_like(w), np.empty(4, dtype))
    if hasattr(K, "pattern_stats_dense"):
        acc = lambda *s: [np.zeros(()), np.zeros(s[1]), np.zeros(s[0]), np.zeros((2, s[0])),  # noqa: E731
                          np.zeros((s[0],) + s[1]), np.zeros((2, s[0]) + s[1])]
        K.pattern_stats_dense(x2, np.ones((2, 3), dtype), np.ones(3, dtype), *acc(3, (5,)))
        K.pattern_stats_conv2d(x, z, b, *geo, *acc(4, (3, 3, 2)))
    for name in sorted(vars(K)):
        if name.startswith("lrp_"):
            pytest.fail(f"add {name} to _drive_every_launcher")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_cuda_kernel_compiles_to_ptx(dtype, monkeypatch):
    cuda = _nvvm_or_skip()
    calls = _record_launches(monkeypatch)
    with np.errstate(all="ignore"):  # the GEMMs multiply uninitialised scratch: no kernel ran
        _drive_every_launcher(dtype)
    seen = set()
    for kernel, types in calls:
        key = (kernel.py_func.__name__, types)
        if key in seen:
            continue
        seen.add(key)
        ptx, _ = cuda.compile_ptx(kernel.py_func, types, cc=(8, 0))
        if dtype == np.float32 and key[0] not in F64_ACCUMULATORS:
            f64 = [line for line in ptx.splitlines() if ".f64" in line]
            assert not f64, f"{key[0]} computes in float64 on float32 input: {f64[:3]}"
    assert len({name for name, _ in seen}) >= 15
