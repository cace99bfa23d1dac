"""Threads of the CPU kernels: serial and parallel twins, concurrent callers, the OpenMP runtime.

* Every ``prange`` kernel of :mod:`relprop.kernels.cpu` is compiled twice
  (:func:`relprop.kernels.cpu._threads.parallel_above`); the two must agree bit for bit, and
  the size threshold must pick between them.
* Two Python threads running parallel kernels and BLAS convolutions at once must both get
  the right answers (Numba's OpenMP layer is thread-safe; its workqueue layer would abort).
* ``import torch`` before ``import relprop`` must not leave Numba's parallel loops on
  PyTorch's OpenMP runtime (started before relprop could ask for passive waiting: 10-20x
  slower); checked in a fresh interpreter through the dynamic linker's own report.
"""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import relprop._config as config
import relprop.kernels as K
from relprop.kernels.cpu import _threads
from relprop.kernels.cpu import elementwise as cpu_elementwise
from relprop.kernels.cpu import pool2d as cpu_pool

DTYPES = [np.float32, np.float64]


def _calls(x, g, z, kernel, stride, padding):
    """(dual kernel, argument tuple builder) for every dual kernel, on one input plane geometry."""
    pooled, switches = K.maxpool2d_forward(x, kernel, stride, padding, backend="reference")
    n, c, ho, wo = pooled.shape
    gp = np.ascontiguousarray(g[:, :, :ho, :wo]) if g.shape[2] >= ho and g.shape[3] >= wo else \
        np.ones(pooled.shape, x.dtype)
    e = cpu_elementwise
    return [
        (e.relu_forward, lambda: (x, np.empty_like(x))),
        (e.relu_backward_gradient, lambda: (g, z, np.empty_like(g))),
        (e.relu_backward_deconvnet, lambda: (g, np.empty_like(g))),
        (e.relu_backward_guided, lambda: (g, z, np.empty_like(g))),
        (e.stabilized_divide, lambda: (g, z, 1e-3, np.empty_like(g))),
        (cpu_pool._maxpool_planes, lambda: (x, kernel, stride, padding, np.empty(pooled.shape, x.dtype),
                                            np.empty(pooled.shape, np.int64))),
        (cpu_pool.maxunpool2d, lambda: (gp, switches, np.empty_like(x))),
        (cpu_pool.avgpool2d_forward, lambda: (x, kernel, stride, padding, np.empty(pooled.shape, x.dtype))),
        (cpu_pool.avgpool2d_vjp, lambda: (gp, kernel, stride, padding, np.empty_like(x))),
    ]


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


@st.composite
def plane_problem(draw):
    """NCHW shape (batch 1 and odd sizes included), pool geometry, and integer-valued data with ties and zeros."""
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    kh, kw = draw(st.integers(1, min(h, 3))), draw(st.integers(1, min(w, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    return (n, c, h, w), (kh, kw), stride, padding, draw(st.integers(0, 2**32 - 1))


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=plane_problem())
def test_parallel_and_serial_twins_agree_bitwise(dtype, problem):
    shape, kernel, stride, padding, seed = problem
    rng = np.random.default_rng(seed)
    x, g, z = (rng.integers(-2, 3, size=shape).astype(dtype) for _ in range(3))  # ties and exact zeros
    for fn, args in _calls(x, g, z, kernel, stride, padding):
        got_serial = _outputs(fn.serial(*args()))
        got_parallel = _outputs(fn.parallel(*args()))
        for a, b in zip(got_serial, got_parallel):
            np.testing.assert_array_equal(a, b, err_msg=fn.__name__)


@pytest.mark.parametrize("threshold, expected", [(0, "parallel"), (10**12, "serial")])
def test_size_threshold_picks_the_twin(monkeypatch, threshold, expected):
    monkeypatch.setattr(config, "PARALLEL_MIN_ELEMENTS", threshold)
    fn = cpu_elementwise.relu_forward
    used = []
    for name in ("parallel", "serial"):
        real = getattr(fn, name)
        monkeypatch.setattr(fn, name, lambda *a, real=real, name=name: used.append(name) or real(*a))
    x = np.array([-1.0, 2.0], np.float32)
    np.testing.assert_array_equal(K.relu_forward(x, backend="cpu"), [0.0, 2.0])
    assert used == [expected]


def test_concurrent_calls_from_two_threads(monkeypatch):
    """Parallel kernels and BLAS convolutions from two Python threads at once: no crash, right results."""
    monkeypatch.setattr(config, "PARALLEL_MIN_ELEMENTS", 0)  # every prange kernel takes the parallel twin
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 8, 12, 12)).astype(np.float32)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    want = {
        "conv": K.conv2d_forward(x, w, padding=1, backend="reference"),
        "relu": K.relu_forward(x, backend="reference"),
        "pool": K.maxpool2d_forward(x, 2, backend="reference")[0],
    }
    errors = []
    barrier = threading.Barrier(2)

    def work():
        try:
            barrier.wait()
            for _ in range(30):
                got = {"conv": K.conv2d_forward(x, w, padding=1, backend="cpu"),
                       "relu": K.relu_forward(x, backend="cpu"),
                       "pool": K.maxpool2d_forward(x, 2, backend="cpu")[0]}
                for key, value in got.items():
                    if not np.allclose(value, want[key], rtol=1e-5, atol=1e-4):
                        errors.append(key)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


_PROBE = """
import {first}, {second}
import numpy as np
from relprop.kernels.cpu import _threads, elementwise
x = np.ones(8, np.float32)
elementwise.relu_forward.parallel(x, np.empty_like(x))   # loads and starts Numba's OpenMP layer
print("BINDING", _threads.openmp_binding())
"""


def _probe(first, second, **env):
    """Run the probe in a fresh interpreter with the dynamic linker reporting its symbol bindings."""
    env = dict(os.environ, LD_DEBUG="bindings", **env)
    env.pop("LD_PRELOAD", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(first=first, second=second)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    binding = [line.split("BINDING ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("BINDING ")]
    gomp = [line for line in proc.stderr.splitlines() if "omppool" in line and "`GOMP_parallel'" in line]
    if not gomp:
        pytest.skip("the dynamic linker reported no bindings (LD_DEBUG unsupported here)")
    return binding[0], gomp[0]


needs_linux_torch = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc dynamic linker only")


@needs_linux_torch
@pytest.mark.parametrize("first, second", [("torch", "relprop"), ("relprop", "torch")])
def test_numba_openmp_never_binds_to_torchs_runtime(first, second):
    pytest.importorskip("torch")
    binding, gomp = _probe(first, second)
    assert binding == "deepbind"
    assert "torch" not in gomp.split(" to ", 1)[1], gomp


@needs_linux_torch
def test_without_the_deep_bind_torch_first_captures_numba():
    """The failure the deep bind prevents (so the test above can fail): opting out, torch's runtime wins."""
    pytest.importorskip("torch")
    binding, gomp = _probe("torch", "relprop", RELPROP_OPENMP_DEEPBIND="0")
    assert binding.startswith("skipped")
    assert "torch" in gomp.split(" to ", 1)[1], gomp


def test_binding_is_reported():
    assert _threads.openmp_binding().split(":")[0] in ("deepbind", "skipped", "failed")


# -- chunks of a convolution shared out to threads (relprop.kernels.cpu._chunks) -----------------------------
from relprop.kernels.cpu import _chunks  # noqa: E402


@st.composite
def conv_problem(draw):
    n, c, k = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 6))
    h, w = draw(st.integers(3, 9)), draw(st.integers(3, 9))
    kh = draw(st.integers(1, 3))
    stride = draw(st.sampled_from([1, 2]))
    return (n, c, h, w), (k, c, kh, kh), stride, draw(st.integers(0, kh // 2 + 1)), draw(st.integers(0, 2**32 - 1))


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=conv_problem(), threads=st.sampled_from([2, 3]))
def test_threaded_chunks_match_one_thread(dtype, problem, threads):
    """Forward, input-VJP and dense on 2-3 threads with tiny chunks (many of them, batch 1 included):
    the same as in the calling thread alone, and the same bits on a second run."""
    x_shape, w_shape, stride, padding, seed = problem
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    wd = rng.standard_normal((5, x[0].size)).astype(dtype)
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_CHUNK_BYTES", 1)  # one sample per chunk
        mp.setattr(config, "DENSE_MIN_ROWS", 1)
        mp.setattr(config, "DENSE_MIN_THREADED_MACS", 0)  # tiny, yet shared out
        for t in (1, threads, threads):
            mp.setattr(config, "CONV_THREADS", t)
            z = K.conv2d_forward(x, w, None, stride, padding, backend="cpu")
            g = np.ascontiguousarray(z[::-1])  # any cotangent of z's shape
            gx = K.conv2d_vjp(g, w, x_shape, stride, padding, backend="cpu")
            d = K.dense_forward(x.reshape(len(x), -1), wd, backend="cpu")
            results.setdefault(t, []).append((z, gx, d))
    (one,), (first, second) = results[1], results[threads]
    for a, b, c in zip(one, first, second):
        np.testing.assert_allclose(b, a, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
        np.testing.assert_array_equal(b, c)


@pytest.mark.skipif(_chunks._BLAS_THREADS is None, reason="NumPy's BLAS thread count cannot be set")
def test_small_dense_gemms_run_here_on_one_blas_thread(monkeypatch, rng):
    """Below DENSE_MIN_THREADED_MACS a dense GEMM is not shared out (no chunk threads), and BLAS is held to
    one thread while it runs (its own threads would spin afterwards); above, it is shared out."""
    from relprop.kernels.cpu import dense as cpu_dense

    get = _chunks._BLAS_THREADS[1]
    before = get()
    monkeypatch.setattr(config, "CONV_THREADS", 2)
    seen, shared = [], []
    real_matmul, real_run = np.matmul, cpu_dense.run_chunks
    monkeypatch.setattr(cpu_dense.np, "matmul", lambda *a, **k: seen.append(get()) or real_matmul(*a, **k))
    monkeypatch.setattr(cpu_dense, "run_chunks", lambda *a: shared.append(1) or real_run(*a))
    x, w, g = rng.standard_normal((64, 30)), rng.standard_normal((20, 30)), rng.standard_normal((64, 20))
    want = (x @ w.T, g @ w)
    for macs, expect_shared in ((64 * 30 * 20 + 1, False), (0, True)):
        monkeypatch.setattr(config, "DENSE_MIN_THREADED_MACS", macs)
        seen.clear(), shared.clear()
        got = (K.dense_forward(x, w, backend="cpu"), K.dense_vjp(g, w, backend="cpu"))
        assert bool(shared) == expect_shared and set(seen) == {1} and get() == before
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-12)


@st.composite
def single_image_problem(draw):
    """One image through a stride-1 (row shifts) or stride-2 (im2col) layer, with >= 8 channels so that
    the input-VJP takes the row shifts too (K > C: the shift-out form), or a few (im2col's VJP)."""
    c, k = draw(st.sampled_from([2, 8, 11])), draw(st.integers(1, 19))
    h, w = draw(st.integers(16, 23)), draw(st.integers(16, 23))  # >= 2 blocks of 16 columns at stride 2
    kh = draw(st.sampled_from([1, 3]))
    return (1, c, h, w), (k, c, kh, kh), draw(st.sampled_from([1, 2])), draw(st.integers(0, kh // 2 + 1)), \
        draw(st.integers(0, 2**32 - 1))


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=single_image_problem(), threads=st.sampled_from([2, 3]))
def test_single_chunk_shares_its_gemm_columns(dtype, problem, threads):
    """A convolution of one image is a single chunk; its GEMMs' columns are shared out (CONV_SHARE_MIN_MACS
    0): forward and input-VJP against the reference and the calling thread alone, odd widths (blocks that
    end mid-row, a last block shorter than 16), and the same bits on a second run."""
    x_shape, w_shape, stride, padding, seed = problem
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    results = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_LANES", 0)  # narrow layers would take the lanes instead
        mp.setattr(config, "CONV_SHARE_MIN_MACS", 0)
        calls = []
        real = _chunks.run_chunks
        mp.setattr(_chunks, "run_chunks", lambda n, nb, *a: calls.append((n, nb)) or real(n, nb, *a))
        for t in (1, threads, threads):
            mp.setattr(config, "CONV_THREADS", t)
            z = K.conv2d_forward(x, w, b, stride, padding, backend="cpu")
            g = np.ascontiguousarray(z[:, ::-1])  # any cotangent of z's shape
            results.append((z, K.conv2d_vjp(g, w, x_shape, stride, padding, backend="cpu")))
        shared = [(n, nb) for n, nb in calls if nb < n]
        assert shared and all(nb % 16 == 0 for _, nb in shared)  # columns shared, in whole cache lines
    (z1, v1), (z2, v2), (z3, v3) = results
    geometry = (stride, padding, 1)
    assert_close = np.testing.assert_allclose
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    assert_close(z2, K.conv2d_forward(x, w, b, *geometry, backend="reference"), **tol)
    assert_close(v2, K.conv2d_vjp(np.ascontiguousarray(z1[:, ::-1]), w, x_shape, *geometry, backend="reference"), **tol)
    assert_close(z2, z1, **tol)
    np.testing.assert_array_equal(z2, z3)
    np.testing.assert_array_equal(v2, v3)


def test_share_runs_here_unless_alone_and_large(monkeypatch):
    """share(): blocks only inside the only chunk of a run_chunks call, from CONV_SHARE_MIN_MACS, aligned to
    16 and covering the range once; a nested call leaves the flag as it found it."""
    monkeypatch.setattr(config, "CONV_THREADS", 2)
    monkeypatch.setattr(config, "CONV_SHARE_MIN_MACS", 100)
    got = []
    _chunks.share(100, 10**6, lambda a, b: got.append((a, b)))  # not inside a chunk
    assert got == [(0, 100)]

    def one_chunk(macs, m=100):
        got.clear()
        _chunks.run_chunks(1, 1, lambda: None, lambda *_: _chunks.share(m, macs, lambda a, b: got.append((a, b))))
        return sorted(got)

    assert one_chunk(99) == [(0, 100)]  # too little work
    assert one_chunk(100) == [(0, 64), (64, 100)]  # ceil(100 / 2) = 50, up to a cache line of float32
    assert one_chunk(100, m=31) == [(0, 31)]  # fewer than two blocks' worth
    got.clear()
    _chunks.run_chunks(4, 1, lambda: None, lambda *_: _chunks.share(100, 10**6, lambda a, b: got.append((a, b))))
    assert got == [(0, 100)] * 4  # several chunks: each runs its GEMMs whole
    assert not getattr(_chunks._LOCAL, "alone", False)
    monkeypatch.setattr(config, "CONV_THREADS", 1)
    assert one_chunk(10**6) == [(0, 100)]  # one thread: nothing to share out


@pytest.mark.skipif(_chunks._BLAS_THREADS is None, reason="NumPy's BLAS thread count cannot be set")
def test_run_chunks_threads_caps_the_threads(monkeypatch):
    """run_chunks(..., threads=1): every chunk here, in order, with BLAS held to one thread and no single-chunk
    sharing (the work is too small to hand off); threads=None or 2: the pool takes chunks too."""
    monkeypatch.setattr(config, "CONV_THREADS", 2)
    get = _chunks._BLAS_THREADS[1]
    me = threading.get_ident()
    for cap, alone in ((1, True), (2, False), (None, False)):
        seen, other = [], threading.Event()

        def work(n0, nc, buffers):
            seen.append((n0, nc, threading.get_ident(), get(), getattr(_chunks._LOCAL, "alone", False)))
            if threading.get_ident() != me:
                other.set()
            elif not alone:
                other.wait(5.0)  # until the pool's thread has taken a chunk (however loaded the machine)

        _chunks.run_chunks(7, 2, lambda: None, work, cap)
        assert sorted(s[:2] for s in seen) == [(0, 2), (2, 2), (4, 2), (6, 1)]
        assert ({s[2] for s in seen} == {me}) is alone
        assert all(s[3] == 1 and not s[4] for s in seen)
        if alone:
            assert [s[0] for s in seen] == [0, 2, 4, 6]


@pytest.mark.skipif(_chunks._BLAS_THREADS is None, reason="NumPy's BLAS thread count cannot be set")
@pytest.mark.parametrize("stride, channels", [(1, 16), (1, 3), (2, 16)])
def test_one_image_never_wakes_blas_threads(monkeypatch, rng, stride, channels):
    """Every GEMM of a one-image convolution (a single chunk: forward, input-VJP, the row shifts and
    im2col, shared out or not) runs with BLAS held to one thread, and the user's setting is back after:
    OpenBLAS's own workers spin for ~0.1 s after a threaded GEMM, a core taken from whatever runs next."""
    from relprop.kernels.cpu import conv2d as cpu_conv

    set_, get = _chunks._BLAS_THREADS
    before = get()
    set_(2)
    try:
        seen = []
        real = cpu_conv._gemm
        monkeypatch.setattr(cpu_conv, "_gemm", lambda *a, **k: seen.append(get()) or real(*a, **k))
        monkeypatch.setattr(config, "CONV_THREADS", 2)
        monkeypatch.setattr(config, "CONV_LANES", 0)
        x = rng.standard_normal((1, channels, 20, 20)).astype(np.float32)
        w = rng.standard_normal((24, channels, 3, 3)).astype(np.float32)
        for share in (0, 1 << 40):
            monkeypatch.setattr(config, "CONV_SHARE_MIN_MACS", share)
            z = K.conv2d_forward(x, w, None, stride, 1, backend="cpu")
            K.conv2d_vjp(z, w, x.shape, stride, 1, backend="cpu")
        assert seen and set(seen) == {1}
        assert get() == 2
        monkeypatch.setattr(config, "CONV_THREADS", 1)  # the documented way back to BLAS's own threads
        seen.clear()
        K.conv2d_forward(x, w, None, stride, 1, backend="cpu")
        assert set(seen) == {2}
    finally:
        set_(before)


@pytest.mark.skipif(_chunks._BLAS_THREADS is None, reason="NumPy's BLAS thread count cannot be set")
def test_blas_threads_restored_after_errors_and_concurrent_callers(monkeypatch):
    set_, get = _chunks._BLAS_THREADS
    before = get()
    monkeypatch.setattr(config, "CONV_THREADS", 2)
    seen = []

    def work(n0, nc, buffers):
        seen.append(get())
        if n0 == 3:
            raise RuntimeError("chunk 3 failed")

    with pytest.raises(RuntimeError, match="chunk 3 failed"):
        _chunks.run_chunks(6, 1, lambda: None, work)
    assert set(seen) == {1} and get() == before

    barrier = threading.Barrier(2)

    def caller():
        barrier.wait()
        for _ in range(20):
            _chunks.run_chunks(4, 1, lambda: None, lambda n0, nc, b: seen.append(get()))

    threads = [threading.Thread(target=caller) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert get() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_threaded_conv_in_a_forked_child():
    """After a fork (multiprocessing, Dask's fork start method) the child has no pool threads: convolutions
    still run and are right."""
    import multiprocessing

    x = np.random.default_rng(3).standard_normal((6, 3, 9, 9))
    w = np.random.default_rng(4).standard_normal((4, 3, 3, 3))
    K.conv2d_forward(x, w, padding=1, backend="cpu")  # start the parent's pool first
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply(K.conv2d_forward, (x, w), {"padding": 1, "backend": "cpu"})
    np.testing.assert_allclose(got, K.conv2d_forward(x, w, padding=1, backend="reference"), rtol=1e-12, atol=1e-12)
