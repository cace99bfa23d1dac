"""Shared pieces of the benchmark suites (pytest-benchmark).

``pytest bench --benchmark-only`` runs them; ``pytest bench --benchmark-disable`` runs every
benchmarked function once (a smoke test: it keeps the suite from rotting).

The machine is shared and its speed drifts, so absolute times say little: a kernel's
GFLOP/s is reported next to the float32 GEMM rate of the same session (``gemm_gflops``:
``np.matmul`` of two 2048x2048 float32 matrices, best of several runs).  Benchmarks that
call ``record_rate`` (a fixture: :func:`record` bound to the session's GEMM rate) get
``extra_info["gflops"]`` and ``extra_info["frac_of_gemm"]``, and a table of them is printed
at the end of the run.

PyTorch, when installed, is imported here, before anything imports relprop: users come
from PyTorch, and that import order is the one that once made relprop 10-20x slower
(relprop.kernels.cpu._threads), so every benchmark measures it.
"""
try:  # first, on purpose (see above)
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - the peers extra is optional
    torch = None

import sys
import time

import numpy as np
import pytest

GEMM_N = 2048
_ROWS = []  # (group, name, backend, ms, value, unit, fraction of the GEMM rate or None)
_GEMM = []  # the session's GEMM rate, once measured


@pytest.fixture(scope="session")
def gemm_gflops(request):
    """The session's float32 GEMM rate in GFLOP/s (best of several 2048x2048 np.matmul)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((GEMM_N, GEMM_N)).astype(np.float32) for _ in range(2))
    out = np.empty_like(a)
    np.matmul(a, b, out=out)  # wake the BLAS threads
    repeats = 2 if request.config.getoption("benchmark_disable", False) else 10
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    rate = 2.0 * GEMM_N**3 / best / 1e9
    _GEMM.append(rate)
    return rate


def record(benchmark, gemm_gflops, *, flops=None, nbytes=None, backend="", label=""):
    """Put the achieved rate of the benchmark just run into ``extra_info`` and the summary table.

    ``flops``: GFLOP/s and the fraction of the session's GEMM rate; ``nbytes`` (memory-bound
    kernels such as pooling): GB/s moved.  Uses the best round (the least disturbed one).
    Does nothing under ``--benchmark-disable`` (no timings are taken then).
    """
    if not benchmark.enabled or benchmark.stats is None:
        return
    best = benchmark.stats.stats.min
    benchmark.extra_info["backend"] = backend
    benchmark.extra_info["gemm_gflops"] = round(gemm_gflops, 2)
    if flops is not None:
        rate = flops / best / 1e9
        frac = rate / gemm_gflops
        benchmark.extra_info["gflops"] = round(rate, 2)
        benchmark.extra_info["frac_of_gemm"] = round(frac, 4)
        _ROWS.append((benchmark.group or "", label, backend, best * 1e3, rate, "GFLOP/s", frac))
    if nbytes is not None:
        rate = nbytes / best / 1e9
        benchmark.extra_info["gbytes_per_s"] = round(rate, 2)
        if flops is None:
            _ROWS.append((benchmark.group or "", label, backend, best * 1e3, rate, "GB/s", None))


@pytest.fixture
def record_rate(gemm_gflops):
    """``record_rate(benchmark, flops=..., nbytes=..., backend=..., label=...)``: see :func:`record`."""
    return lambda benchmark, **kw: record(benchmark, gemm_gflops, **kw)


def _peer_summary(tr):
    peers = sys.modules.get("bench.test_bench_peers") or sys.modules.get("test_bench_peers")
    rows = peers.peer_rows() if peers is not None else []
    if not rows:
        return
    tr.section("relprop vs peers (interleaved rounds: median times, median and quartiles of the per-round ratios; "
               "torch imported before relprop)")
    if _GEMM:
        tr.write_line(f"session GEMM rate (np.matmul 2048x2048 float32): {_GEMM[0]:.1f} GFLOP/s")
    tr.write_line(f"{'net':<13} {'task':<22} {'relprop ms':>11} {'peer ms':>10} {'peer/relprop':>12} {'quartiles':>11} "
                  f"{'target':>10} {'x own fwd':>9} {'of GEMM':>7} {'rounds':>6}")
    for net, task, ours, theirs, ratio, own, target, frac, iqr, rounds in rows:
        t = "" if target is None else f">={target:g}" + (" ok" if ratio >= target else " NO")
        o = "" if own is None else f"{own:9.2f}"
        f = "" if frac is None else f"{frac:7.2f}"
        q = f"{iqr[0]:.2f}-{iqr[1]:.2f}"
        tr.write_line(f"{net:<13} {task:<22} {ours:11.2f} {theirs:10.2f} {ratio:12.2f} {q:>11} {t:>10} {o:>9} {f:>7} "
                      f"{rounds:6d}")


def pytest_terminal_summary(terminalreporter):
    _peer_summary(terminalreporter)
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("relprop kernel rates (best round; fraction of this session's float32 GEMM rate)")
    if _GEMM:
        tr.write_line(f"session GEMM rate (np.matmul 2048x2048 float32, best of runs): {_GEMM[0]:.1f} GFLOP/s")
    tr.write_line(f"{'op':<16} {'shape':<34} {'backend':<10} {'ms':>9} {'rate':>9} {'unit':<8} {'of GEMM':>7}")
    for group, label, backend, ms, rate, unit, frac in _ROWS:
        f = "" if frac is None else f"{frac:7.2f}"
        tr.write_line(f"{group:<16} {label:<34} {backend:<10} {ms:9.2f} {rate:9.1f} {unit:<8} {f:>7}")
