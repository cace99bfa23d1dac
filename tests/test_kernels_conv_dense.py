"""Numba CPU dense and conv2d kernels against their NumPy references.

Everything goes through the public entry points in :mod:`relprop.kernels` with
``backend="cpu"`` vs ``backend="reference"``.  The cpu convolution has three paths (direct
"lanes" for narrow stride-1 layers, row-shift GEMMs for other stride-1 layers with enough channels,
explicit im2col otherwise) and works in chunks of samples; the tests pin each path and force
several chunks (and short blocks of lanes) by patching ``relprop._config``.
"""
import contextlib

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import relprop._config as config
import relprop.kernels as K
from relprop.kernels import _ops
from helpers import assert_close, conv_inputs
from relprop._validate import conv_output_size
from relprop.kernels.cpu import conv2d as cpu_conv
from test_kernels_winograd import always_winograd

DTYPES = [np.float32, np.float64]
PATHS = ["rows", "im2col", "lanes"]


def pin(mp, path, chunk_bytes):
    """Route every cpu convolution through ``path`` (where its stride allows; "auto": the
    module's own choice) with chunks of ``chunk_bytes``, a single chunk's GEMMs shared out to the threads.  For "lanes" the chunk size picks the
    samples per block instead: 1 (1 byte), 2 (a batch of 3 ends in a short block) or 16 (one short
    block for every batch drawn here)."""
    if path != "auto":
        rows, lanes = path == "rows", path == "lanes"
        mp.setattr(cpu_conv, "_rows_path", lambda transposed, stride, channels: rows and stride == (1, 1))
        mp.setattr(cpu_conv, "_lanes_path", lambda stride, c, k: lanes and stride == (1, 1))
        if lanes:
            mp.setattr(config, "CONV_LANES", {1: 1, 2000: 2}.get(chunk_bytes, 16))
    mp.setattr(config, "CONV_CHUNK_BYTES", chunk_bytes)
    mp.setattr(config, "CONV_SHARE_MIN_MACS", 0)  # a single chunk shares its GEMMs' columns out


@st.composite
def conv_problem(draw):
    """(x shape, w shape, stride, padding, dilation, chunk bytes, seed) of a valid convolution."""
    n, c, k = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))  # the lanes unroll kw = 3 and 5
    # stride (1, 1) half the time: it is the only stride the row-shift path takes
    stride = draw(st.just((1, 1)) | st.tuples(st.integers(1, 3), st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    assume(dilation[0] * (kh - 1) + 1 <= h + 2 * padding[0])
    assume(dilation[1] * (kw - 1) + 1 <= w + 2 * padding[1])
    chunk = draw(st.sampled_from([1, 2000, 1 << 22]))  # one sample per chunk, a few, all
    return (n, c, h, w), (k, c, kh, kw), stride, padding, dilation, chunk, draw(st.integers(0, 2**32 - 1))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=conv_problem())
def test_conv2d_matches_reference(dtype, path, problem):
    x_shape, w_shape, stride, padding, dilation, chunk, seed = problem
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    geometry = (stride, padding, dilation)
    with pytest.MonkeyPatch.context() as mp:
        pin(mp, path, chunk)
        z = K.conv2d_forward(x, w, b, *geometry, backend="cpu")
        z_ref = K.conv2d_forward(x, w, b, *geometry, backend="reference")
        assert z.dtype == dtype
        assert_close(z, z_ref, reduction_len=w_shape[1] * w_shape[2] * w_shape[3])

        g = rng.standard_normal(z.shape).astype(dtype)
        gx = K.conv2d_vjp(g, w, x_shape, *geometry, backend="cpu")
        gx_ref = K.conv2d_vjp(g, w, x_shape, *geometry, backend="reference")
        assert gx.dtype == dtype
        # each input sums at most K * kh * kw terms (C*kh*kw bounds the forward's sum)
        assert_close(gx, gx_ref, reduction_len=w_shape[0] * w_shape[2] * w_shape[3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_without_bias_and_edge_geometry(dtype, rng):
    """bias=None, a 1x1 kernel, an output of width/height 1, over-padding (pad > kernel reach)."""
    cases = [
        ((2, 3, 5, 7), (4, 3, 1, 1), 1, 0, 1),
        ((1, 2, 4, 4), (3, 2, 4, 4), 1, 0, 1),        # Ho = Wo = 1
        ((1, 2, 1, 6), (2, 2, 1, 3), (1, 2), 0, 1),   # H = 1
        ((2, 2, 3, 3), (2, 2, 1, 1), 1, 2, 1),        # padding beyond a 1x1 kernel: zero border
        ((1, 3, 9, 8), (2, 3, 3, 2), (3, 1), (2, 1), (2, 3)),
        ((2, 8, 5, 6), (12, 8, 3, 3), 1, 1, 1),          # C >= 8, K > C: the VJP shifts on the way out
        ((2, 9, 4, 5), (5, 9, 2, 3), 1, (1, 2), (2, 1)),  # C >= 8, K < C
    ]
    for path in PATHS + ["auto"]:
        with pytest.MonkeyPatch.context() as mp:
            pin(mp, path, 1)
            for x_shape, w_shape, s, p, d in cases:
                x = rng.standard_normal(x_shape).astype(dtype)
                w = rng.standard_normal(w_shape).astype(dtype)
                z = K.conv2d_forward(x, w, None, s, p, d, backend="cpu")
                assert_close(z, K.conv2d_forward(x, w, None, s, p, d, backend="reference"),
                             reduction_len=np.prod(w_shape[1:]))
                g = rng.standard_normal(z.shape).astype(dtype)
                assert_close(K.conv2d_vjp(g, w, x_shape, s, p, d, backend="cpu"),
                             K.conv2d_vjp(g, w, x_shape, s, p, d, backend="reference"),
                             reduction_len=w_shape[0] * w_shape[2] * w_shape[3])


@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_is_bitwise_deterministic(stride, rng):
    """Two calls on a layer large enough for several chunks and multi-threaded BLAS."""
    x = rng.standard_normal((6, 32, 17, 15)).astype(np.float32)
    w = rng.standard_normal((48, 32, 3, 3)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_CHUNK_BYTES", 1 << 18)
        z1 = K.conv2d_forward(x, w, b, stride, 1, backend="cpu")
        z2 = K.conv2d_forward(x, w, b, stride, 1, backend="cpu")
        assert z1.tobytes() == z2.tobytes()
        g = rng.standard_normal(z1.shape).astype(np.float32)
        v1 = K.conv2d_vjp(g, w, x.shape, stride, 1, backend="cpu")
        v2 = K.conv2d_vjp(g, w, x.shape, stride, 1, backend="cpu")
        assert v1.tobytes() == v2.tobytes()


@pytest.mark.parametrize("path", PATHS)
@given(problem=conv_problem())
def test_conv2d_vjp_is_the_adjoint(path, problem):
    """<conv(x), g> == <x, conv_vjp(g)> in float64 (no bias: the map is linear)."""
    x_shape, w_shape, stride, padding, dilation, chunk, seed = problem
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    with pytest.MonkeyPatch.context() as mp:
        pin(mp, path, chunk)
        z = K.conv2d_forward(x, w, None, stride, padding, dilation, backend="cpu")
        g = rng.standard_normal(z.shape)
        gx = K.conv2d_vjp(g, w, x_shape, stride, padding, dilation, backend="cpu")
    lhs, rhs = np.vdot(z, g), np.vdot(x, gx)
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, np.abs(z * g).sum())


def conv_as_matrix(x_shape, w, stride, padding, dilation):
    """The convolution unrolled into a dense (K*Ho*Wo, C*H*W) matrix, entry by entry."""
    _, c_, h_, w_ = x_shape
    k_, _, kh, kw = w.shape
    ho = conv_output_size(h_, kh, stride[0], padding[0], dilation[0])
    wo = conv_output_size(w_, kw, stride[1], padding[1], dilation[1])
    m = np.zeros((k_, ho, wo, c_, h_, w_))
    for k in range(k_):
        for i in range(ho):
            for j in range(wo):
                for c in range(c_):
                    for a in range(kh):
                        for e in range(kw):
                            r = i * stride[0] - padding[0] + a * dilation[0]
                            s = j * stride[1] - padding[1] + e * dilation[1]
                            if 0 <= r < h_ and 0 <= s < w_:
                                m[k, i, j, c, r, s] += w[k, c, a, e]
    return m.reshape(k_ * ho * wo, c_ * h_ * w_), (k_, ho, wo)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("geometry", [((1, 1), (1, 1), (1, 1)), ((2, 1), (1, 2), (1, 2))])
def test_conv2d_equals_the_unrolled_matrix(path, geometry, rng):
    x = rng.standard_normal((2, 3, 5, 6))
    w = rng.standard_normal((4, 3, 3, 2))
    b = rng.standard_normal(4)
    m, out_shape = conv_as_matrix(x.shape, w, *geometry)
    with pytest.MonkeyPatch.context() as mp:
        pin(mp, path, 1)
        z = K.conv2d_forward(x, w, b, *geometry, backend="cpu")
        g = rng.standard_normal(z.shape)
        gx = K.conv2d_vjp(g, w, x.shape, *geometry, backend="cpu")
    want = (x.reshape(2, -1) @ m.T).reshape((2,) + out_shape) + b[None, :, None, None]
    np.testing.assert_allclose(z, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx, (g.reshape(2, -1) @ m).reshape(x.shape), rtol=1e-12, atol=1e-12)


def test_conv2d_blas_is_found():
    """The GEMMs go to NumPy's BLAS (one thread pool) or, failing that, SciPy's."""
    assert cpu_conv.BLAS_SOURCE in ("numpy", "scipy")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_batch_is_compiled_and_matches_one_call_per_product(dtype, rng):
    """The Winograd GEMMs go through one compiled loop of BLAS calls where NumPy's CBLAS is the BLAS;
    it gives the same bits as one ctypes call per product, operands at offsets and steps (a column
    block of B, as the few-tiles schedule multiplies), and touches nothing outside the products."""
    if cpu_conv.BLAS_SOURCE == "numpy":
        assert np.dtype(dtype) in cpu_conv._GEMM_BATCH
    count, m, n, k, ldb = 5, 7, 6, 9, 11  # C_i (7 x 6) = A_i (7 x 9) @ B_i[:, 3:9] of a 9 x 11 block
    a = rng.standard_normal(3 + count * m * k + 4).astype(dtype)
    b = rng.standard_normal(count * k * ldb).astype(dtype)
    outs = []
    for batch in (cpu_conv._GEMM_BATCH, {}):
        c = np.full(2 + count * m * n + 3, 7.0, dtype)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_conv, "_GEMM_BATCH", batch)
            cpu_conv._gemm_batch(count, m, n, k, a, 3, m * k, k, b, 3, k * ldb, ldb, c, 2, m * n, n)
        outs.append(c)
    assert outs[0].tobytes() == outs[1].tobytes()
    c = outs[0]
    assert (c[:2] == 7).all() and (c[-3:] == 7).all()
    for i in range(count):
        want = a[3 + i * m * k:3 + (i + 1) * m * k].reshape(m, k) @ b[i * k * ldb:(i + 1) * k * ldb].reshape(k, ldb)[:, 3:9]
        assert_close(c[2 + i * m * n:2 + (i + 1) * m * n].reshape(m, n), want, reduction_len=k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_on_the_scipy_blas_fallback(dtype, rng):
    x = rng.standard_normal((3, 9, 7, 6)).astype(dtype)
    w = rng.standard_normal((10, 9, 3, 2)).astype(dtype)
    b = rng.standard_normal(10).astype(dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_conv, "_GEMM", cpu_conv._scipy_blas())
        mp.setattr(cpu_conv, "_GEMM_BATCH", {})  # the Winograd GEMMs then go one by one through SciPy's
        always_winograd(mp, 4)
        w3 = rng.standard_normal((10, 9, 3, 3)).astype(dtype)  # stride 1: Winograd
        for s, wt in ((1, w), (2, w), (1, w3)):
            z = K.conv2d_forward(x, wt, b, s, 1, backend="cpu")
            assert_close(z, K.conv2d_forward(x, wt, b, s, 1, backend="reference"), reduction_len=9 * 9)
            g = rng.standard_normal(z.shape).astype(dtype)
            assert_close(K.conv2d_vjp(g, wt, x.shape, s, 1, backend="cpu"),
                         K.conv2d_vjp(g, wt, x.shape, s, 1, backend="reference"), reduction_len=10 * 9)


def test_conv2d_kernels_accept_strided_views(rng):
    """Called directly (below the public entry points), non-contiguous arrays still give the right answer."""
    x = rng.standard_normal((2, 9, 8, 14))[:, :, :, ::2]
    w = rng.standard_normal((4, 9, 3, 3, 2))[..., 0]
    b = rng.standard_normal(8)[::2]
    geometry = ((1, 1), (1, 1), (1, 1))
    z = cpu_conv.conv2d_forward(x, w, b, *geometry, np.empty((2, 4, 8, 7)))
    np.testing.assert_allclose(z, K.conv2d_forward(x, w, b, *geometry, backend="reference"), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal((2, 4, 8, 14))[..., ::2]
    gx = cpu_conv.conv2d_vjp(g, w, *geometry, np.empty((2, 9, 8, 7)))
    np.testing.assert_allclose(gx, K.conv2d_vjp(g, w, x.shape, *geometry, backend="reference"), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- dense

@pytest.mark.parametrize("dtype", DTYPES)
@given(n=st.integers(1, 9), i=st.integers(1, 40), j=st.integers(1, 40), bias=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_dense_matches_reference(dtype, n, i, j, bias, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, i)).astype(dtype)
    w = rng.standard_normal((j, i)).astype(dtype)
    b = rng.standard_normal(j).astype(dtype) if bias else None
    z = K.dense_forward(x, w, b, backend="cpu")
    assert z.dtype == dtype
    assert_close(z, K.dense_forward(x, w, b, backend="reference"), reduction_len=i)
    g = rng.standard_normal((n, j)).astype(dtype)
    gx = K.dense_vjp(g, w, backend="cpu")
    assert gx.dtype == dtype
    assert_close(gx, K.dense_vjp(g, w, backend="reference"), reduction_len=j)


def test_dense_is_bitwise_deterministic(rng):
    x = rng.standard_normal((64, 700)).astype(np.float32)
    w = rng.standard_normal((300, 700)).astype(np.float32)
    b = rng.standard_normal(300).astype(np.float32)
    assert K.dense_forward(x, w, b, backend="cpu").tobytes() == K.dense_forward(x, w, b, backend="cpu").tobytes()
    g = rng.standard_normal((64, 300)).astype(np.float32)
    assert K.dense_vjp(g, w, backend="cpu").tobytes() == K.dense_vjp(g, w, backend="cpu").tobytes()


@st.composite
def band_problem(draw):
    """Stride-1 convolutions with >= 8 channels (so that the input-VJP takes the row-shift path too),
    awkward sizes, padding up to and beyond the kernel's reach, dilation."""
    n, c, k = draw(st.integers(1, 2)), draw(st.integers(8, 11)), draw(st.integers(1, 10))
    h, w = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    assume(dilation[0] * (kh - 1) + 1 <= h + 2 * padding[0])
    assume(dilation[1] * (kw - 1) + 1 <= w + 2 * padding[1])
    chunk = draw(st.sampled_from([1, 64, 700]))  # one row per band, a few rows, whole small samples
    return (n, c, h, w), (k, c, kh, kw), padding, dilation, chunk, draw(st.integers(0, 2**32 - 1))


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=band_problem())
def test_conv2d_bands_of_rows_match_reference(dtype, problem):
    """Samples larger than a chunk run in bands of output rows (forward, and the input-VJP as the
    forward of the flipped weights): against the reference, bias included."""
    x_shape, w_shape, padding, dilation, chunk, seed = problem
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_CHUNK_BYTES", chunk)
        mp.setattr(config, "CONV_LANES", 0)  # narrow layers would take the lanes instead
        z = K.conv2d_forward(x, w, b, 1, padding, dilation, backend="cpu")
        assert_close(z, K.conv2d_forward(x, w, b, 1, padding, dilation, backend="reference"),
                     reduction_len=w_shape[1] * w_shape[2] * w_shape[3])
        g = rng.standard_normal(z.shape).astype(dtype)
        gx = K.conv2d_vjp(g, w, x_shape, 1, padding, dilation, backend="cpu")
        assert_close(gx, K.conv2d_vjp(g, w, x_shape, 1, padding, dilation, backend="reference"),
                     reduction_len=w_shape[0] * w_shape[2] * w_shape[3])


# ---------------------------------------------------------------- conv + ReLU in one call

@pytest.mark.parametrize("path", PATHS + ["winograd", "bands"])
@given(problem=conv_problem())
def test_conv2d_with_fused_relu_matches_reference(path, problem):
    """``a_out``: relu(z) written by the pass that writes z (mode 1), or instead of z when ``a_out``
    is ``out`` (mode 2), on every forward path (rows, im2col, Winograd, bands of rows), against the
    reference; z itself unchanged bit for bit, and NaN passing the ReLU as np.maximum does (not on
    the Winograd path, whose transforms spread a NaN over its 4x4 tile)."""
    x_shape, w_shape, stride, padding, dilation, chunk, seed = problem
    if path == "winograd":  # the Winograd geometry: 3x3, stride and dilation 1, padding <= 2
        w_shape, stride, dilation = w_shape[:2] + (3, 3), (1, 1), (1, 1)
        assume(x_shape[2] + 2 * padding[0] >= 3 and x_shape[3] + 2 * padding[1] >= 3)
    if path == "bands":
        stride, chunk = (1, 1), 1
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape)
    if path != "winograd":
        x.flat[rng.integers(x.size)] = np.nan  # one NaN input: NaN outputs where its windows reach
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    geometry = (stride, padding, dilation)
    ref = K.conv2d_forward(x, w, b, *geometry, backend="reference", check_finite=False)
    with pytest.MonkeyPatch.context() as mp:
        if path == "winograd":
            always_winograd(mp, 3)
        else:
            pin(mp, "rows" if path == "bands" else path, chunk)
        z_plain = cpu_conv.conv2d_forward(x, w, b, *geometry, np.empty(ref.shape))
        z, a = np.empty(ref.shape), np.empty(ref.shape)
        cpu_conv.conv2d_forward(x, w, b, *geometry, z, a)
        only = np.empty(ref.shape)
        cpu_conv.conv2d_forward(x, w, b, *geometry, only, only)
    assert z.tobytes() == z_plain.tobytes()
    assert a.tobytes() == np.maximum(z_plain, 0).tobytes() and only.tobytes() == a.tobytes()
    np.testing.assert_array_equal(np.isnan(a), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(a[ok], np.maximum(ref, 0)[ok], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@given(n=st.integers(1, 5), i=st.integers(1, 40), j=st.integers(1, 70), threads=st.sampled_from([2, 3]),
       seed=st.integers(0, 2**32 - 1))
def test_dense_column_blocks_match_reference(dtype, n, i, j, threads, seed):
    """Small batches are cut into blocks of output columns (the forward) and input columns (the VJP),
    one per thread, at multiples of 16 columns: widths that do not tile, one block, batch 1."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, i)).astype(dtype)
    w = rng.standard_normal((j, i)).astype(dtype)
    b = rng.standard_normal(j).astype(dtype)
    g = rng.standard_normal((n, j)).astype(dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_THREADS", threads)
        mp.setattr(config, "DENSE_MIN_ROWS", 16)  # n <= 5 < 32: column blocks
        z = K.dense_forward(x, w, b, backend="cpu")
        gx = K.dense_vjp(g, w, backend="cpu")
    assert_close(z, K.dense_forward(x, w, b, backend="reference"), reduction_len=i)
    assert_close(gx, K.dense_vjp(g, w, backend="reference"), reduction_len=j)


@pytest.mark.parametrize("limit, by", [(1 << 30, "rows"), (0, "columns")])
def test_dense_blocks_by_rows_only_for_small_weights(monkeypatch, rng, limit, by):
    """A large batch is cut into row blocks only while W is at most DENSE_ROW_BLOCKS_MAX_WEIGHT_BYTES
    (each row block reads all of W); above, into column blocks; the same values either way."""
    from relprop.kernels.cpu import dense as cpu_dense

    x, w, b = rng.standard_normal((70, 33)), rng.standard_normal((50, 33)), rng.standard_normal(50)
    g = rng.standard_normal((70, 50))
    cut = []
    real = cpu_dense.run_chunks
    monkeypatch.setattr(cpu_dense, "run_chunks", lambda n, nb, *a: cut.append(n) or real(n, nb, *a))
    monkeypatch.setattr(config, "CONV_THREADS", 2)
    monkeypatch.setattr(config, "DENSE_MIN_THREADED_MACS", 0)
    monkeypatch.setattr(config, "DENSE_ROW_BLOCKS_MAX_WEIGHT_BYTES", limit)
    z, gx = K.dense_forward(x, w, b, backend="cpu"), K.dense_vjp(g, w, backend="cpu")
    assert cut == ([70, 70] if by == "rows" else [50, 33])  # what was cut: the batch, or W's columns
    assert_close(z, K.dense_forward(x, w, b, backend="reference"), reduction_len=33)
    assert_close(gx, K.dense_vjp(g, w, backend="reference"), reduction_len=50)


@contextlib.contextmanager
def streaming(min_weight_bytes=0):
    """The small-batch dense kernels for every W of at least ``min_weight_bytes``; yields the list
    of their calls (a context, not a fixture, so that each hypothesis example starts afresh)."""
    from relprop.kernels.cpu import dense as cpu_dense

    calls = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ("_stream_forward", "_stream_vjp"):
            real = getattr(cpu_dense, name)
            mp.setattr(cpu_dense, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
        mp.setattr(config, "DENSE_STREAM_MIN_WEIGHT_BYTES", min_weight_bytes)
        yield calls


@pytest.mark.parametrize("dtype", DTYPES)
@given(n=st.integers(1, 17), i=st.integers(1, 40), j=st.integers(1, 70), threads=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**32 - 1))
def test_dense_streaming_matches_reference(dtype, n, i, j, threads, seed):
    """The small-batch kernels (W read once, four rows against four samples): batches and row counts
    that are not multiples of four (every tail of the 4x4 blocks), batch 1, blocks of W per thread;
    past DENSE_STREAM_MAX_ROWS (VJP: DENSE_STREAM_VJP_MAX_ROWS) BLAS's blocks, the same values."""
    rng = np.random.default_rng(seed)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((n, i), (j, i), (j,)))
    g = rng.standard_normal((n, j)).astype(dtype)
    with streaming() as calls, pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_THREADS", threads)
        z = K.dense_forward(x, w, b, backend="cpu")
        gx = K.dense_vjp(g, w, backend="cpu")
    vjp_streams = 2 <= n <= config.DENSE_STREAM_VJP_MAX_ROWS  # one sample: BLAS's matrix-vector product
    def blocks(cols, align):  # one block per thread at multiples of align
        return -(-cols // max(align, -(-(-(-cols // threads)) // align) * align))

    assert calls == ["_stream_forward"] * (blocks(j, 4) if n <= config.DENSE_STREAM_MAX_ROWS else 0) \
        + ["_stream_vjp"] * (blocks(i, 16) if vjp_streams else 0)
    assert z.dtype == gx.dtype == dtype
    assert_close(z, K.dense_forward(x, w, b, backend="reference"), reduction_len=i)
    assert_close(gx, K.dense_vjp(g, w, backend="reference"), reduction_len=j)


def test_dense_streaming_wide_rows_and_thread_counts(rng):
    """Rows longer than one piece of the VJP (2048 columns: several pieces and a short last one), zeros
    and exact integers (the sums are exact in float32: equal to the reference); the same bits on one
    thread and on three (each output element is summed in one order whatever the split)."""
    x = rng.integers(-3, 4, (6, 4500)).astype(np.float32)
    w = rng.integers(-2, 3, (11, 4500)).astype(np.float32)
    x[2] = 0
    b = rng.integers(-2, 3, 11).astype(np.float32)
    g = rng.integers(-3, 4, (6, 11)).astype(np.float32)
    out = {}
    for threads in (1, 3):
        with streaming() as calls, pytest.MonkeyPatch.context() as mp:
            mp.setattr(config, "CONV_THREADS", threads)
            out[threads] = K.dense_forward(x, w, b, backend="cpu"), K.dense_vjp(g, w, backend="cpu")
        assert "_stream_forward" in calls and "_stream_vjp" in calls
    np.testing.assert_array_equal(out[1][0], K.dense_forward(x, w, b, backend="reference"))
    np.testing.assert_array_equal(out[1][1], K.dense_vjp(g, w, backend="reference"))
    assert out[1][0].tobytes() == out[3][0].tobytes() and out[1][1].tobytes() == out[3][1].tobytes()


def test_dense_streaming_propagates_nan(rng):
    x, w, b = rng.standard_normal((3, 50)), rng.standard_normal((9, 50)), rng.standard_normal(9)
    x[1, 7] = np.nan
    with streaming() as calls:
        z = K.dense_forward(x, w, b, backend="cpu", check_finite=False)
    assert calls == ["_stream_forward"] * len(calls) and calls
    assert np.isnan(z[1]).all() and np.isfinite(z[[0, 2]]).all()


@pytest.mark.parametrize("case", ["many samples", "small W", "strided W", "one-sample VJP"])
def test_dense_streaming_only_where_it_pays(monkeypatch, rng, case):
    """BLAS keeps the layers the streaming kernels do not speed up: more samples than
    DENSE_STREAM_MAX_ROWS (VJP: DENSE_STREAM_VJP_MAX_ROWS), W under DENSE_STREAM_MIN_WEIGHT_BYTES,
    a W that is not C-contiguous, the VJP of one sample; the values are the same either way."""
    n = {"many samples": 17, "one-sample VJP": 1}.get(case, 3)
    w = rng.standard_normal((40, 30))
    w = np.asfortranarray(w) if case == "strided W" else w
    x, b, g = rng.standard_normal((n, 30)), rng.standard_normal(40), rng.standard_normal((n, 40))
    monkeypatch.setattr(config, "CONV_THREADS", 1)
    with streaming(1 << 40 if case == "small W" else 0) as calls:
        if case == "strided W":  # the public functions hand the kernels contiguous arrays: call them directly
            from relprop.kernels.cpu import dense as cpu_dense
            gx = cpu_dense.dense_vjp(g, w, np.empty((n, 30)))
            z = cpu_dense.dense_forward(x, w, b, np.empty((n, 40)))
        else:
            gx = K.dense_vjp(g, w, backend="cpu")
            z = K.dense_forward(x, w, b, backend="cpu")
    assert calls == (["_stream_forward"] if case == "one-sample VJP" else [])  # one sample: the forward streams
    assert_close(z, K.dense_forward(x, w, b, backend="reference"), reduction_len=30)
    assert_close(gx, K.dense_vjp(g, w, backend="reference"), reduction_len=40)


# ---------------------------------------------------------------- direct convolution in lanes

def test_conv2d_lanes_dispatch(monkeypatch, rng):
    """Stride-1 layers with at most CONV_LANES_MAX_CHANNELS input and output channels take the lanes
    (the input-VJP where its flipped padding is >= 0); wider or strided layers do not."""
    taken = []
    real = cpu_conv._forward_lanes
    monkeypatch.setattr(cpu_conv, "_forward_lanes", lambda *a, **k: taken.append(a[1].shape) or real(*a, **k))
    x = rng.standard_normal((3, 6, 12, 12)).astype(np.float32)
    for w_shape, stride, padding, fwd, vjp in [
        ((16, 6, 5, 5), 1, 0, True, True),     # LeNet-5's second layer
        ((17, 6, 5, 5), 1, 0, False, False),   # K = 17: both go to the GEMMs
        ((4, 6, 1, 1), 1, 0, True, True),
        ((16, 6, 3, 3), 2, 1, False, False),   # stride 2
        ((4, 6, 1, 1), 1, 1, True, False),     # the VJP's flipped padding would be -1
    ]:
        w = rng.standard_normal(w_shape).astype(np.float32)
        taken.clear()
        z = K.conv2d_forward(x, w, None, stride, padding, backend="cpu")
        assert bool(taken) == fwd
        taken.clear()
        K.conv2d_vjp(np.ones_like(z), w, x.shape, stride, padding, backend="cpu")
        assert bool(taken) == vjp
    monkeypatch.setattr(config, "CONV_LANES", 0)
    taken.clear()
    K.conv2d_forward(x, rng.standard_normal((6, 6, 5, 5)).astype(np.float32), None, 1, 0, backend="cpu")
    assert not taken


@pytest.mark.parametrize("lanes", [1, 5, 16])
@pytest.mark.parametrize("kernel", [(5, 3), (3, 5), (2, 4)])  # the unrolled kw = 3 and 5, and the generic loop
def test_conv2d_lanes_are_bitwise_deterministic_and_threads_agree(lanes, kernel, rng):
    """Blocks of lanes shared out to 1, 2 or 3 threads (a short last block: 37 samples) give the same
    bits, and match the reference (forward and input-VJP)."""
    x = rng.standard_normal((37, 6, 12, 11)).astype(np.float32)
    w = rng.standard_normal((16, 6) + kernel).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    got = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_LANES", lanes)
        for threads in (1, 2, 3):
            mp.setattr(config, "CONV_THREADS", threads)
            z = K.conv2d_forward(x, w, b, 1, (1, 2), backend="cpu")
            gx = K.conv2d_vjp(z, w, x.shape, 1, (1, 2), backend="cpu")
            got.append(z.tobytes() + gx.tobytes())
    assert got[0] == got[1] == got[2]
    assert_close(z, K.conv2d_forward(x, w, b, 1, (1, 2), backend="reference"), reduction_len=6 * kernel[0] * kernel[1])
    assert_close(gx, K.conv2d_vjp(z, w, x.shape, 1, (1, 2), backend="reference"), reduction_len=16 * kernel[0] * kernel[1])


@given(k=st.integers(1, 5), c=st.integers(1, 3), kh=st.integers(1, 5), kw=st.sampled_from([3, 5]),
       ho=st.integers(1, 7), lanes=st.sampled_from([1, 8, 16]), seed=st.integers(0, 2**32 - 1))
def test_conv2d_lanes_row_pairs_change_no_bit(k, c, kh, kw, ho, lanes, seed):
    """The lanes kernel computes output rows in pairs (rows i and i + 1 from each input row they share)
    and an odd last row alone: each sums its terms in the same order either way.  Row r of a convolution
    equals, to the bit, the last row of the same convolution cut to r + 1 output rows, where r (even) is
    computed alone; the rows match the reference."""
    rng = np.random.default_rng(seed)
    wo = 3
    xb = rng.standard_normal((c, ho + kh - 1, (wo + kw - 1) * lanes)).astype(np.float32)
    w = rng.standard_normal((k, c, kh, kw)).astype(np.float32)
    zb = cpu_conv._lanes_conv(xb, w, 1, 1, lanes, np.empty((k, ho, wo * lanes), np.float32), 0, ho + kh - 1)
    for r in range(0, ho, 2):  # r + 1 rows: row r is the odd one out
        cut = cpu_conv._lanes_conv(np.ascontiguousarray(xb[:, :r + kh]), w, 1, 1, lanes,
                                   np.empty((k, r + 1, wo * lanes), np.float32), 0, r + kh)
        np.testing.assert_array_equal(cut[:, r], zb[:, r])
    # the lanes layout undone: x[l, c, i, j] = xb[c, i, j*L + l], z likewise
    x = xb.reshape(c, ho + kh - 1, wo + kw - 1, lanes).transpose(3, 0, 1, 2)
    z = zb.reshape(k, ho, wo, lanes).transpose(3, 0, 1, 2)
    assert_close(z, K.conv2d_forward(np.ascontiguousarray(x), w, None, 1, 0, backend="reference"),
                 reduction_len=c * kh * kw)


@given(k=st.integers(1, 5), c=st.integers(1, 3), kh=st.integers(1, 5), kw=st.sampled_from([2, 3, 5]),
       h=st.integers(1, 6), top=st.integers(0, 4), bottom=st.integers(0, 4), dh=st.integers(1, 2),
       lanes=st.sampled_from([1, 8]), seed=st.integers(0, 2**32 - 1))
def test_conv2d_lanes_skip_the_padding_rows_to_the_bit(k, c, kh, kw, h, top, bottom, dh, lanes, seed):
    """The lanes kernel skips the taps on input rows outside [r0, r1), the zero padding (an input-VJP of a
    small map is mostly padding): the same bits as multiplying the zeros, for paired and single rows,
    dilation 1 and 2, and every kernel width."""
    rng = np.random.default_rng(seed)
    rows = top + h + bottom
    assume(rows >= dh * (kh - 1) + 1)
    ho, wo = rows - dh * (kh - 1), 3
    xb = np.zeros((c, rows, (wo + kw - 1) * lanes), np.float32)
    xb[:, top:top + h] = rng.standard_normal((c, h, (wo + kw - 1) * lanes))
    w = rng.standard_normal((k, c, kh, kw)).astype(np.float32)
    every = cpu_conv._lanes_conv(xb, w, dh, 1, lanes, np.empty((k, ho, wo * lanes), np.float32), 0, rows)
    skipped = cpu_conv._lanes_conv(xb, w, dh, 1, lanes, np.empty((k, ho, wo * lanes), np.float32), top, top + h)
    assert every.tobytes() == skipped.tobytes()


# ---------------------------------------------------------------- conv + ReLU + 2x2 max-pool, fused

def _unfused(x, w, b, geometry, backend):
    """The triple as three kernels: the convolution with its ReLU, then the max-pool's maxima."""
    z = K.conv2d_forward(x, w, b, *geometry, backend=backend)
    a = K.relu_forward(z, backend=backend)
    return K.maxpool2d_forward(a, 2, 2, 0, backend=backend)[0]


def _fused(x, w, b, geometry, backend):
    return _ops.conv2d_relu_maxpool2x2(x, w, b, *geometry, backend)


@st.composite
def conv_pool_problem(draw):
    """A convolution whose output is at least 2x2 (one pooled value), its inputs drawn either normal or
    from a few small integers (exact ties in the windows, zeros after the ReLU), and the lanes per block."""
    n, c, k = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 7))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 2 - 2 * padding[0]), 14))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 2 - 2 * padding[1]), 14))
    stride = draw(st.sampled_from([(1, 1), (1, 1), (2, 1)]))  # (2, 1): not a lanes layer, the unfused path
    assume((h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1 >= 2)
    return ((n, c, h, w), (k, c, kh, kw), stride, padding, dilation, draw(st.sampled_from([1, 2, 3, 16])),
            draw(st.booleans()), draw(st.integers(0, 2**32 - 1)))


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=conv_pool_problem())
def test_conv2d_relu_maxpool_fused_matches_unfused_and_reference(dtype, problem):
    """The fused triple (the pool in the lanes' write-out) gives the unfused kernels' values exactly (the
    maximum taken before the bias and the ReLU: rounding is monotone) and the reference's; odd sizes drop
    the last row/column as the floor-mode pool does; short last blocks, batch 1, ties and zeros."""
    x_shape, w_shape, stride, padding, dilation, lanes, ties, seed = problem
    x, w, b = conv_inputs(np.random.default_rng(seed), x_shape, w_shape, ties, dtype)
    geometry = (stride, padding, dilation)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_LANES", lanes)
        got = _fused(x, w, b, geometry, "cpu")
        want = _unfused(x, w, b, geometry, "cpu")
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert_close(got, _fused(x, w, b, geometry, "reference"), reduction_len=int(np.prod(w_shape[1:])))
    np.testing.assert_array_equal(_fused(x, w, b, geometry, "reference"), _unfused(x, w, b, geometry, "reference"))


def _unfused_switches(x, w, b, geometry, backend, also=()):
    """The triple as a trace records it unfused: conv + ReLU (its ``also`` forwards in the same call), then
    the max-pool's maxima and switches."""
    _, a, extra = _ops.conv2d_forward_also(x, w, b, *geometry, backend, also, relu=True, keep_z=False)
    return _ops.maxpool2d_forward(a, (2, 2), (2, 2), (0, 0), backend) + (extra,)


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=conv_pool_problem())
def test_conv2d_relu_maxpool_fused_switches_match_unfused(dtype, problem):
    """With ``switches=True`` (a sweep's trace) the fused triple gives the unfused trace's maxima and
    switches to the bit: the switch is the first maximum of relu(z) in row-major order, so the many
    ties the ReLU makes (every negative z is 0) go to the window's first element, and the ``also``
    forwards equal the unfused call's; lanes and GEMM paths, short blocks, ties and zeros, odd sizes."""
    x_shape, w_shape, stride, padding, dilation, lanes, ties, seed = problem
    x, w, b = conv_inputs(np.random.default_rng(seed), x_shape, w_shape, ties, dtype)
    also = [(np.maximum(w, 0), np.maximum(b, 0))]
    geometry = (stride, padding, dilation)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_LANES", lanes)
        y, sw, extra = _ops.conv2d_relu_maxpool2x2(x, w, b, *geometry, "cpu", switches=True, also=also)
        y2, sw2, extra2 = _unfused_switches(x, w, b, geometry, "cpu", also)
    assert y.dtype == dtype and sw.dtype == np.int64 and y.shape == sw.shape == y2.shape
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(sw, sw2)
    np.testing.assert_array_equal(extra[0], extra2[0])
    y3, sw3, _ = _ops.conv2d_relu_maxpool2x2(x, w, b, *geometry, "reference", switches=True)
    y4, sw4, _ = _unfused_switches(x, w, b, geometry, "reference")
    np.testing.assert_array_equal(y3, y4)
    np.testing.assert_array_equal(sw3, sw4)
    assert_close(y, y3, reduction_len=int(np.prod(w_shape[1:])))


def test_conv2d_relu_maxpool_also_needs_switches(rng):
    """The ``also`` forwards come only with a trace's call (``switches=True``), which returns them."""
    x, w = rng.standard_normal((2, 1, 6, 6)), rng.standard_normal((2, 1, 3, 3))
    with pytest.raises(ValueError, match="needs switches=True"):
        _ops.conv2d_relu_maxpool2x2(x, w, None, (1, 1), (0, 0), (1, 1), "cpu", also=[(w, None)])
    y, sw, extra = _ops.conv2d_relu_maxpool2x2(x, w, None, (1, 1), (0, 0), (1, 1), "cpu", switches=True,
                                               also=[(2 * w, None)])
    np.testing.assert_allclose(extra[0], 2 * K.conv2d_forward(x, w, None, 1, 0, backend="reference"), rtol=1e-12)


def test_conv2d_relu_maxpool_switches_take_the_lanes_and_fall_back_on_nan(monkeypatch, rng):
    """LeNet-5's second layer records its switches in the lanes' write-out (thread counts agree to the
    bit); a NaN or an infinity in a pooled window sends the triple through the unfused kernels, whose
    NaN-aware pool gives the NaN's switch."""
    taken = []
    real = cpu_conv._from_lanes_pool_switches
    monkeypatch.setattr(cpu_conv, "_from_lanes_pool_switches", lambda *a: taken.append(1) or real(*a))
    x = rng.standard_normal((37, 6, 12, 12)).astype(np.float32)
    w = rng.standard_normal((16, 6, 5, 5)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    geometry = ((1, 1), (0, 0), (1, 1))
    got = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(config, "CONV_THREADS", threads)
        y, sw, _ = _ops.conv2d_relu_maxpool2x2(x, w, b, *geometry, "cpu", switches=True)
        got.append(y.tobytes() + sw.tobytes())
    assert taken and got[0] == got[1] == got[2]
    for bad in (np.nan, np.inf):
        x_bad = x.copy()
        x_bad[3, 2, 5, 5] = bad
        y, sw, _ = _ops.conv2d_relu_maxpool2x2(x_bad, w, b, *geometry, "cpu", switches=True)
        z = np.empty((37, 16, 8, 8), np.float32)
        cpu_conv.conv2d_forward(x_bad, w, b, *geometry, z, z)
        want, want_sw = K.maxpool2d_forward(z, 2, backend="reference", check_finite=False)
        assert not np.isfinite(want).all()
        np.testing.assert_array_equal(y, want)
        np.testing.assert_array_equal(sw, want_sw)


def test_conv2d_relu_maxpool_fused_takes_the_lanes_and_falls_back_on_nan(monkeypatch, rng):
    """LeNet-5's layers pool in the lanes' write-out (and thread counts agree to the bit); a NaN or an
    infinity in a pooled window sends the triple through the unfused kernels, so a NaN is not dropped by
    the selects of the fused maximum (the pool's own rule: the first NaN of a window wins)."""
    pooled = []
    real = cpu_conv._from_lanes_pool
    monkeypatch.setattr(cpu_conv, "_from_lanes_pool", lambda *a: pooled.append(a[5].shape) or real(*a))
    x = rng.standard_normal((37, 6, 12, 12)).astype(np.float32)
    w = rng.standard_normal((16, 6, 5, 5)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    geometry = ((1, 1), (0, 0), (1, 1))
    got = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(config, "CONV_THREADS", threads)
        got.append(_fused(x, w, b, geometry, "cpu").tobytes())
    assert pooled and got[0] == got[1] == got[2]
    np.testing.assert_array_equal(np.frombuffer(got[0], np.float32).reshape(37, 16, 4, 4),
                                  _unfused(x, w, b, geometry, "cpu"))
    pooled.clear()
    _fused(x, rng.standard_normal((32, 6, 5, 5)).astype(np.float32), None, geometry, "cpu")  # K = 32: GEMMs
    assert not pooled
    for bad in (np.nan, np.inf):
        x_bad = x.copy()
        x_bad[3, 2, 5, 5] = bad  # the outputs around it become +-inf (or NaN): the kernel must fall back
        got = cpu_conv.conv2d_relu_maxpool2x2(x_bad, w, b, *geometry, np.empty((37, 16, 4, 4), np.float32))
        z = np.empty((37, 16, 8, 8), np.float32)
        cpu_conv.conv2d_forward(x_bad, w, b, *geometry, z, z)
        want = K.maxpool2d_forward(z, 2, backend="reference", check_finite=False)[0]
        assert not np.isfinite(want).all()
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- chains of conv + ReLU + 2x2 max-pool triples

@st.composite
def conv_pool_chain_problem(draw):
    """Two or three conv + ReLU + 2x2 max-pool triples in a chain (each stage's pooled output at least 1x1),
    mostly lanes layers; a stage of 17 output channels or stride (2, 1) is not one (the chain then runs
    stage by stage).  Inputs normal or small integers (ties, zeros after the ReLU); lanes, block budget
    and threads drawn so that blocks are short, single-lane or many."""
    n, c = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    h, w = draw(st.integers(6, 30)), draw(st.integers(6, 30))
    x_shape, stages, hh, ww = (n, c, h, w), [], h, w
    for _ in range(draw(st.integers(2, 3))):
        k, kh, kw = draw(st.sampled_from([1, 2, 3, 5, 7, 7, 17])), draw(st.integers(1, 5)), draw(st.integers(1, 5))
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        stride = draw(st.sampled_from([(1, 1)] * 5 + [(2, 1)]))
        ho = (hh + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (ww + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        assume(ho >= 2 and wo >= 2)
        stages.append(((k, c, kh, kw), stride, padding, dilation))
        c, hh, ww = k, ho // 2, wo // 2
    return (x_shape, stages, draw(st.sampled_from([1, 8, 16, 64])), draw(st.sampled_from([1, 4096, 2 << 20])),
            draw(st.integers(1, 3)), draw(st.booleans()), draw(st.integers(0, 2**32 - 1)))


def _chain_inputs(x_shape, stages, ties, dtype, rng):
    if ties:
        x = rng.integers(-2, 3, x_shape).astype(dtype)
        params = [(rng.integers(-1, 2, s).astype(dtype), rng.integers(-2, 2, s[0]).astype(dtype)) for s, *_ in stages]
    else:
        x = rng.standard_normal(x_shape).astype(dtype)
        params = [(rng.standard_normal(s).astype(dtype), rng.standard_normal(s[0]).astype(dtype)) for s, *_ in stages]
    return x, [(w, b) + tuple(geometry) for (w, b), (_, *geometry) in zip(params, stages)]


def _stage_by_stage(x, stages, backend):
    for w, b, *geometry in stages:
        x = _ops.conv2d_relu_maxpool2x2(x, w, b, *geometry, backend)
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=conv_pool_chain_problem())
def test_conv2d_relu_maxpool_chain_matches_stage_by_stage_and_reference(dtype, problem):
    """A chain of triples in one call (the CPU kernel takes each block of samples through every stage,
    the maps between the stages kept in lanes) gives the stage-by-stage kernels' values to the bit, and
    the reference's; odd sizes, padding, dilation, batch 1, short and single-lane blocks, ties, zeros,
    1-3 threads, and chains that are not all lanes layers (stage by stage)."""
    x_shape, stage_shapes, lanes, budget, threads, ties, seed = problem
    x, stages = _chain_inputs(x_shape, stage_shapes, ties, dtype, np.random.default_rng(seed))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_LANES", lanes)
        mp.setattr(config, "CONV_LANES_CHAIN_BYTES", budget)
        mp.setattr(config, "CONV_THREADS", threads)
        got = _ops.conv2d_relu_maxpool2x2_chain(x, stages, "cpu")
        want = _stage_by_stage(x, stages, "cpu")
    assert got.dtype == dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()
    reference = _ops.conv2d_relu_maxpool2x2_chain(x, stages, "reference")
    assert reference.tobytes() == _stage_by_stage(x, stages, "reference").tobytes()
    # rounding differs from the reference's (another order of the sums), and a near-tie in a pooled window
    # then lets a later stage read a neighbouring value: the bound is the summed length of the whole chain
    assert_close(got, reference, reduction_len=int(sum(np.prod(w.shape[1:]) for w, *_ in stages)) * 4)


def test_conv2d_relu_maxpool_chain_takes_the_lanes_and_falls_back_on_nan(monkeypatch, rng):
    """LeNet-5's two triples run as one pass per block (the first pooled into the second's lanes), the same
    bits for 1-3 threads; a NaN or an infinity reaching a pooled window sends the chain stage by stage,
    whose unfused kernels keep the NaN (the pool's own rule)."""
    into = []
    real = cpu_conv._lanes_pool_into
    monkeypatch.setattr(cpu_conv, "_lanes_pool_into", lambda *a: into.append(1) or real(*a))
    x = rng.standard_normal((37, 1, 28, 28)).astype(np.float32)
    stages = [(rng.standard_normal((6, 1, 5, 5)).astype(np.float32), rng.standard_normal(6).astype(np.float32),
               (1, 1), (0, 0), (1, 1)),
              (rng.standard_normal((16, 6, 5, 5)).astype(np.float32), None, (1, 1), (0, 0), (1, 1))]
    got = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(config, "CONV_THREADS", threads)
        got.append(_ops.conv2d_relu_maxpool2x2_chain(x, stages, "cpu").tobytes())
    assert into and got[0] == got[1] == got[2] == _stage_by_stage(x, stages, "cpu").tobytes()
    for bad in (np.nan, np.inf):
        x_bad = x.copy()
        x_bad[3, 0, 5, 5] = bad
        got = _ops.conv2d_relu_maxpool2x2_chain(x_bad, stages, "cpu")
        want = _stage_by_stage(x_bad, stages, "cpu")
        assert not np.isfinite(want).all()
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=conv_pool_problem(), relu=st.sampled_from([None, "pair", "in place", "pooled"]))
def test_conv2d_also_forwards_equal_their_own_calls(dtype, problem, relu):
    """The ``also`` forwards (an LRP rule's z⁺ beside the trace's z) computed in the same call, from the same
    block of lanes or the same Winograd input transform, equal the plain convolution with those parameters,
    called alone, to the bit; with the fused ReLU (a pair or in place) and in the pooled triple; odd sizes,
    short blocks, threads."""
    x_shape, w_shape, stride, padding, dilation, lanes, ties, seed = problem
    rng = np.random.default_rng(seed)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in (x_shape, w_shape, (w_shape[0],)))
    w2, b2 = np.maximum(w, 0), np.maximum(b, 0)
    geometry = (stride, padding, dilation)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_LANES", lanes)
        mp.setattr(config, "CONV_THREADS", 1 + seed % 3)
        alone = _ops.conv2d_forward(x, w2, b2, *geometry, "cpu")
        if relu == "pooled":
            extra = _ops.conv2d_relu_maxpool2x2(x, w, b, *geometry, "cpu", switches=True, also=[(w2, b2)])[2]
        else:
            extra = _ops.conv2d_forward_also(x, w, b, *geometry, "cpu", [(w2, b2)], relu=relu is not None,
                                             keep_z=relu == "pair")[2]
    assert extra[0].tobytes() == alone.tobytes()


# ---------------------------------------------------------------- an LRP backward in one call

@st.composite
def relevance_problem(draw):
    """A convolution (stride 1 or 2, padding, dilation, 1-24 channels: the lanes, GEMM and im2col paths),
    its input a >= 0, a pre-activation z with exact zeros, an ε (0 included: a zero denominator gives 0)."""
    wide = draw(st.integers(0, 3)) == 0  # more than 16 channels: not a lanes layer
    n = draw(st.integers(1, 4))
    c = draw(st.sampled_from([17, 24] if wide else [1, 3, 6]))
    k = draw(st.sampled_from([5, 20] if wide else [1, 2, 5, 16]))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = draw(st.sampled_from([(1, 1)] * 6 + [(2, 1), (2, 2)]))
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 12))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 40))
    return ((n, c, h, w), (k, c, kh, kw), stride, padding, dilation, draw(st.sampled_from([0.0, 1e-6, 0.25])),
            draw(st.sampled_from([1, 8, 64])), draw(st.booleans()), draw(st.integers(0, 2**32 - 1)))


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=relevance_problem())
def test_conv2d_relevance_equals_its_three_kernels(dtype, problem):
    """a ⊙ Wᵀ(R / stab(z)) in one call (the CPU lanes path divides on the way into lanes and multiplies on
    the way out) gives the stabilised divide, the input-VJP and the product, one after the other, to the
    bit, and the reference's values; zeros in z (ε = 0: a zero denominator gives 0), narrow and wide rows
    (the lanes divide only from ``CONV_LANES_DIVIDE_MIN_WIDTH``, patched to 1 here half the time), short
    blocks, stride 2 and wide layers (their composed path)."""
    x_shape, w_shape, stride, padding, dilation, eps, lanes, narrow, seed = problem
    rng = np.random.default_rng(seed)
    a = np.maximum(rng.standard_normal(x_shape), 0).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    z = _ops.conv2d_forward(a, np.maximum(w, 0), None, stride, padding, dilation, "reference")
    z[rng.random(z.shape) < 0.2] = 0
    r = rng.standard_normal(z.shape).astype(dtype)
    geometry = (stride, padding, dilation)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_LANES", lanes)
        mp.setattr(config, "CONV_LANES_DIVIDE_MIN_WIDTH", 1 if narrow else 32)
        got = _ops.conv2d_relevance(r, z, eps, w, a, *geometry, "cpu")
        s = K.stabilized_divide(r, z, eps, backend="cpu")
        want = _ops.conv2d_vjp(s, w, a.shape, *geometry, "cpu") * a
    assert got.dtype == dtype and got.shape == a.shape
    assert got.tobytes() == want.tobytes()
    reference = _ops.conv2d_relevance(r, z, eps, w, a, *geometry, "reference")
    s_ref = K.stabilized_divide(r, z, eps, backend="reference")
    assert_close(got, reference, reduction_len=int(np.prod(w_shape[1:])) * max(1.0, float(np.abs(s_ref).max())))
