"""Every CUDA kernel compiles to PTX for the argument types its launcher passes (no GPU needed).

The simulator runs kernel bodies as Python and so never type-checks them; this test does.
It calls every launcher of :mod:`relprop.kernels.cuda` on small NumPy arrays with
``launch`` replaced by a recorder, then compiles each recorded (kernel, argument types)
with ``numba.cuda.compile_ptx`` (NVVM only, no driver) for compute capability 8.0
(A100) and 9.0 (H100/H200), and for the GPU's own where one is present.  float32 kernels
must not compute in float64 (a silent 32x slowdown on most GPUs), except where they write
float64 accumulators.  Skipped under the simulator and where NVVM is missing.

Selected both by the default run (``pytest``, no GPU needed) and by ``pytest -m cuda`` on a
GPU machine: the test is parametrized over a plain and a ``cuda``-marked variant (the
conftest skips the marked one where no GPU or simulator is present, and both skip
themselves under the simulator).
"""
import importlib

import numba
import numpy as np
import pytest

from relprop import _backend

#: kernels that legitimately do float64 work on float32 input (they add into float64 accumulators)
F64_ACCUMULATORS = {"_flush_kernel"}

#: compute capabilities every kernel must compile for: Ampere (A100) and Hopper (H100/H200)
COMPUTE_CAPABILITIES = [(8, 0), (9, 0)]


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

    def recorder(kernel, n, *args):  # launch(kernel, n, *args) and launch_grid(kernel, shape, *args)
        calls.append((kernel, tuple(numba.typeof(a) for a in args)))

    for family in _backend.FAMILIES + ("_reduce",):
        try:
            mod = importlib.import_module(f"relprop.kernels.cuda.{family}")
        except ModuleNotFoundError:
            continue
        for name in ("launch", "launch_grid"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, recorder)
    return calls


def _target_ccs(cuda):
    """COMPUTE_CAPABILITIES plus the present GPU's own (where Numba sees one)."""
    ccs = list(COMPUTE_CAPABILITIES)
    try:
        if cuda.is_available():
            ccs.append(tuple(cuda.get_current_device().compute_capability))
    except Exception:  # no driver: NVVM alone is enough for this test
        pass
    return sorted(set(ccs))


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


@pytest.mark.parametrize("variant", ["default", pytest.param("gpu", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_cuda_kernel_compiles_to_ptx(dtype, variant, monkeypatch):
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
        for cc in _target_ccs(cuda):
            ptx, _ = cuda.compile_ptx(kernel.py_func, types, cc=cc)
            assert f".target sm_{cc[0]}{cc[1]}" in ptx, f"{key[0]}: no sm_{cc[0]}{cc[1]} target in the PTX"
            if dtype == np.float32 and key[0] not in F64_ACCUMULATORS:
                f64 = [line for line in ptx.splitlines() if ".f64" in line]
                assert not f64, f"{key[0]} computes in float64 on float32 input (sm_{cc[0]}{cc[1]}): {f64[:3]}"
    assert len({name for name, _ in seen}) >= 15
