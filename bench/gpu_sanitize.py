"""A short run of every CUDA kernel family, for compute-sanitizer (and a quick check on a GPU).

Each family runs once on small odd shapes (several blocks, a ragged tail, zero padding,
stride, dilation, overlapping pools), and every result is compared with the reference
backend, so the run also checks the answers.  On a GPU it takes CuPy arrays; under
``NUMBA_ENABLE_CUDASIM=1`` NumPy arrays (the simulator: a check of this script itself)::

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/gpu_sanitize.py --no-pool
    compute-sanitizer --tool racecheck --error-exitcode 1 python bench/gpu_sanitize.py
    NUMBA_ENABLE_CUDASIM=1 python bench/gpu_sanitize.py          # no GPU: the Python side only

``--no-pool`` turns CuPy's memory pool off (``cupy.cuda.set_allocator(None)``): every array
is then its own cudaMalloc, so an access past its end lands outside any allocation and
memcheck sees it (inside a pooled block it would not).  ``--small-launches`` also reruns
everything with 8 threads per block and at most 3 blocks, so every kernel takes its
grid-stride loops.  Exit status 0 when every family agrees with the reference, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's relprop, also without an install
try:  # small test grids make Numba warn about GPU under-utilisation on every launch: noise here
    from numba.core.errors import NumbaPerformanceWarning

    warnings.filterwarnings("ignore", category=NumbaPerformanceWarning)
except ImportError:
    pass

import relprop  # noqa: E402
import relprop.kernels as K  # noqa: E402
from relprop import _backend, _config  # noqa: E402

#: float32 agreement with the reference (relative to the largest |value|); float64 agreement
TOL = {np.float32: 1e-4, np.float64: 1e-10}


def _xp():
    if _backend.simulator_enabled():
        return np
    import cupy

    return cupy


def _sync():
    if not _backend.simulator_enabled():
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def _host(a):
    return _backend.to_numpy(a)


def _rel_err(got, want):
    got, want = np.asarray(_host(got), np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return np.inf
    return float(np.abs(got - want).max(initial=0.0) / max(np.abs(want).max(initial=0.0), 1e-30))


def families(dtype, rng):
    """(name, cuda call, reference call) for every kernel family: each call returns an array or a tuple."""
    xp = _xp()
    d = lambda a: xp.asarray(a)  # noqa: E731
    f = np.dtype(dtype).type
    x = rng.standard_normal((2, 3, 9, 7)).astype(dtype)
    w = rng.standard_normal((5, 3, 3, 2)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype)
    geo = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    z = K.conv2d_forward(x, w, b, **geo, backend="reference")
    g = rng.standard_normal(z.shape).astype(dtype)
    pool = ((3, 2), (2, 1), (1, 1))
    _, switches = K.maxpool2d_forward(x, *pool, backend="reference")
    gp = rng.standard_normal(switches.shape).astype(dtype)
    avg = K.avgpool2d_forward(x, *pool, backend="reference")
    ga = rng.standard_normal(avg.shape).astype(dtype)
    x2, w2, b2 = (rng.standard_normal(s).astype(dtype) for s in ((7, 19), (6, 19), (6,)))
    z2 = K.dense_forward(x2, w2, b2, backend="reference")
    g2 = rng.standard_normal(z2.shape).astype(dtype)
    r = rng.standard_normal(x.shape).astype(dtype)
    both = lambda fn, *a, **k: (lambda: fn(*(d(v) if isinstance(v, np.ndarray) else v for v in a),  # noqa: E731
                                           backend="cuda", check_finite=False, **k),
                                lambda: fn(*a, backend="reference", check_finite=False, **k))
    return [
        ("conv2d_forward",) + both(K.conv2d_forward, x, w, b, **geo),
        ("conv2d_vjp",) + both(K.conv2d_vjp, g, w, x.shape, **geo),
        ("conv2d_weight_vjp",) + both(K.conv2d_weight_vjp, x, g, w.shape[2:], **geo),
        ("dense_forward",) + both(K.dense_forward, x2, w2, b2),
        ("dense_vjp",) + both(K.dense_vjp, g2, w2),
        ("dense_weight_vjp",) + both(K.dense_weight_vjp, x2, g2),
        ("maxpool2d_forward",) + both(K.maxpool2d_forward, x, *pool),
        ("maxunpool2d",) + both(K.maxunpool2d, gp, switches, x.shape),
        ("avgpool2d_forward",) + both(K.avgpool2d_forward, x, *pool),
        ("avgpool2d_vjp",) + both(K.avgpool2d_vjp, ga, x.shape, *pool),
        ("relu_forward",) + both(K.relu_forward, r),
        ("relu_backward_gradient",) + both(K.relu_backward_gradient, r, x),
        ("relu_backward_deconvnet",) + both(K.relu_backward_deconvnet, r),
        ("relu_backward_guided",) + both(K.relu_backward_guided, r, x),
        ("stabilized_divide",) + both(K.stabilized_divide, r, x, f(0.1)),
        ("pattern_stats_dense",) + both(K.pattern_stats_dense, x2, z2, b2),
        ("pattern_stats_conv2d",) + both(K.pattern_stats_conv2d, x, z, w.shape[2:], b, **geo),
    ]


def methods(rng):
    """(name, cuda call, reference call): explanation methods end to end on a small conv net (float64)."""
    xp = _xp()
    spec = [{"type": "conv2d", "in": 2, "out": 4, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "maxpool2d", "kernel": 2},
            {"type": "conv2d", "in": 4, "out": 6, "kernel": 3}, {"type": "relu"},
            {"type": "avgpool2d", "kernel": 2, "stride": 1},
            {"type": "flatten"}, {"type": "linear", "in": 6, "out": 3}]
    weights = {}
    for i, layer in enumerate(spec):
        if layer["type"] == "conv2d":
            weights[f"{i}.weight"] = rng.standard_normal((layer["out"], layer["in"], 3, 3)) * 0.5
            weights[f"{i}.bias"] = rng.standard_normal(layer["out"]) * 0.1
        elif layer["type"] == "linear":
            weights[f"{i}.weight"] = rng.standard_normal((layer["out"], layer["in"])) * 0.5
            weights[f"{i}.bias"] = rng.standard_normal(layer["out"]) * 0.1
    net = relprop.from_spec(spec, weights)
    x = rng.standard_normal((3, 2, 9, 9))
    out = [("forward", lambda: net.forward(xp.asarray(x), backend="cuda"), lambda: net.forward(x, backend="cpu"))]
    for method in ("gradient", "lrp.epsilon_plus_flat", "guided_backprop"):
        if method in relprop.known_methods():
            out.append((method, lambda m=method: relprop.explain(net, xp.asarray(x), m, backend="cuda"),
                        lambda m=method: relprop.explain(net, x, m, backend="cpu")))
    return out


def run_all(rng, label):
    """Run every family and method once; print one line each; return the names that disagree."""
    bad = []
    cases = [(dtype, case) for dtype in (np.float32, np.float64) for case in families(dtype, rng)]
    cases += [(np.float64, case) for case in methods(rng)]
    for dtype, (name, cuda_fn, ref_fn) in cases:
        t0 = time.perf_counter()
        got = cuda_fn()
        _sync()
        dt = time.perf_counter() - t0
        want = ref_fn()
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        err = max(_rel_err(a, e) for a, e in zip(got, want))
        ok = len(got) == len(want) and err <= TOL[dtype]
        print(f"{label:8s} {np.dtype(dtype).name:8s} {name:26s} rel.err {err:9.2e}  {dt * 1e3:8.1f} ms  "
              f"{'ok' if ok else 'MISMATCH'}", flush=True)
        if not ok:
            bad.append(f"{label}/{np.dtype(dtype).name}/{name}")
    return bad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-pool", action="store_true", help="CuPy without its memory pool (for memcheck)")
    parser.add_argument("--small-launches", action="store_true",
                        help="also run with 8 threads per block and at most 3 blocks (grid-stride loops)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if _backend.simulator_enabled():
        # the simulator runs each thread of a block as a Python thread: small blocks keep it quick
        _config.THREADS_PER_BLOCK, _config.CUDA_MAX_BLOCKS = 8, 3
        args.small_launches = False
        print("gpu_sanitize: NUMBA_ENABLE_CUDASIM=1: NumPy arrays in Numba's simulator (no GPU), "
              "8 threads per block, at most 3 blocks")
    else:
        import cupy
        from numba import cuda

        if not cuda.is_available():
            print("gpu_sanitize: no GPU visible to Numba (set NUMBA_ENABLE_CUDASIM=1 to check the script itself)")
            return 2
        if args.no_pool:
            cupy.cuda.set_allocator(None)
            cupy.cuda.set_pinned_memory_allocator(None)
        dev = cupy.cuda.Device()
        name = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"]
        print(f"gpu_sanitize: {name.decode() if isinstance(name, bytes) else name}, "
              f"cc {dev.compute_capability}, CuPy memory pool {'off' if args.no_pool else 'on'}")
    rng = np.random.default_rng(args.seed)
    bad = run_all(rng, "default")
    if args.small_launches:
        _config.THREADS_PER_BLOCK, _config.CUDA_MAX_BLOCKS = 8, 3
        bad += run_all(rng, "small")
    print(f"gpu_sanitize: {'every family agrees with the reference' if not bad else 'MISMATCH: ' + ', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
