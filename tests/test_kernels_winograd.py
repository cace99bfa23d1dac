"""The CPU Winograd F(4x4, 3x3) convolution against the NumPy reference.

The dispatcher sends a 3x3 stride-1 convolution (and its input-VJP, the forward of the flipped
weights with padding 2 - p) to :mod:`relprop.kernels.cpu.winograd` only for wide layers and
large batches; these tests lower the thresholds so that every small, awkward shape takes it:
batch 1, sizes that are not a multiple of the 4x4 tile (the last tiles overhang the output),
padding 0, 1 and 2, one and several channels, chunks of one tile row (bands of one sample)
up to whole batches.
"""
import threading
import time

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import relprop._config as config
import relprop.kernels as K
from relprop.kernels import _ops
from helpers import assert_close, conv_inputs
from relprop.kernels.cpu import conv2d as cpu_conv
from relprop.kernels.cpu import _derived as derived_cache
from relprop.kernels.cpu import winograd as wg

DTYPES = [np.float32, np.float64]


def always_winograd(mp, chunk_tiles=512):
    """Every eligible 3x3 convolution takes the Winograd path, in chunks of ``chunk_tiles`` tiles."""
    mp.setattr(config, "WINOGRAD", True)
    mp.setattr(config, "WINOGRAD_MIN_CHANNELS", 1)
    mp.setattr(config, "WINOGRAD_MIN_WORK", 1)
    mp.setattr(config, "WINOGRAD_CHUNK_TILES", chunk_tiles)
    mp.setattr(config, "WINOGRAD_CHUNK_TILES_WIDE", chunk_tiles)
    mp.setattr(config, "WINOGRAD_FEW_TILES_MIN_MACS", 0)  # a small problem's threads share the phases
    mp.setattr(config, "WINOGRAD_THREADS_MIN_MACS", 0)  # ... and its chunks


def spy(mp):
    """Count the calls of the Winograd convolution made by the dispatcher."""
    calls = []
    real = cpu_conv.conv3x3_winograd

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    mp.setattr(cpu_conv, "conv3x3_winograd", counted)
    return calls


@st.composite
def winograd_problem(draw):
    n, c, k = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(max(1, 3 - 2 * padding[0]), 13))
    w = draw(st.integers(max(1, 3 - 2 * padding[1]), 13))
    chunk = draw(st.sampled_from([1, 3, 512]))  # one tile (bands of a sample), a few, the whole batch
    return (n, c, h, w), (k, c, 3, 3), padding, chunk, draw(st.integers(0, 2**32 - 1))


@pytest.mark.parametrize("dtype", DTYPES)
@given(problem=winograd_problem())
def test_winograd_matches_reference(dtype, problem):
    x_shape, w_shape, padding, chunk, seed = problem
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    with pytest.MonkeyPatch.context() as mp:
        always_winograd(mp, chunk)
        calls = spy(mp)
        z = K.conv2d_forward(x, w, b, 1, padding, 1, backend="cpu")
        g = rng.standard_normal(z.shape).astype(dtype)
        gx = K.conv2d_vjp(g, w, x_shape, 1, padding, 1, backend="cpu")
        assert len(calls) == 2  # the forward and the input-VJP both went through Winograd
    assert z.dtype == dtype and gx.dtype == dtype
    assert_close(z, K.conv2d_forward(x, w, b, 1, padding, 1, backend="reference"), reduction_len=w_shape[1] * 9)
    assert_close(gx, K.conv2d_vjp(g, w, x_shape, 1, padding, 1, backend="reference"), reduction_len=w_shape[0] * 9)


def test_winograd_is_exact_in_float64(rng):
    """The transforms are exact linear algebra: float64 agrees with the direct sum to rounding."""
    x = rng.standard_normal((3, 16, 23, 18))
    w = rng.standard_normal((20, 16, 3, 3))
    b = rng.standard_normal(20)
    with pytest.MonkeyPatch.context() as mp:
        always_winograd(mp, 7)
        z = K.conv2d_forward(x, w, b, 1, 1, 1, backend="cpu")
        g = rng.standard_normal(z.shape)
        gx = K.conv2d_vjp(g, w, x.shape, 1, 1, 1, backend="cpu")
    z_ref = K.conv2d_forward(x, w, b, 1, 1, 1, backend="reference")
    gx_ref = K.conv2d_vjp(g, w, x.shape, 1, 1, 1, backend="reference")
    assert np.abs(z - z_ref).max() <= 1e-12 * np.abs(z_ref).max()
    assert np.abs(gx - gx_ref).max() <= 1e-12 * np.abs(gx_ref).max()


def test_winograd_float32_error_on_a_wide_layer(rng):
    """The default thresholds' kind of layer (128 -> 128 channels, 8x8, 256 tiles): float32 within
    1e-4 of the output's range of the float64 direct sum (the docstring's ~1e-5)."""
    x = rng.standard_normal((64, 128, 8, 8))
    w = rng.standard_normal((128, 128, 3, 3)) * np.sqrt(2 / (128 * 9))
    with pytest.MonkeyPatch.context() as mp:
        calls = spy(mp)
        mp.setattr(config, "WINOGRAD", True)
        z = K.conv2d_forward(x.astype(np.float32), w.astype(np.float32), None, 1, 1, 1, backend="cpu")
        assert calls, "the default thresholds should send this layer to Winograd"
    z_ref = K.conv2d_forward(x, w, None, 1, 1, 1, backend="reference")
    assert np.abs(z - z_ref).max() <= 1e-4 * np.abs(z_ref).max()


def test_filter_transform_is_g_w_gt(rng):
    w = rng.standard_normal((5, 4, 3, 3))
    u = wg.filter_transform(w)
    G = wg._G
    for k in range(5):
        for c in range(4):
            np.testing.assert_allclose(u[:, c, k].reshape(6, 6), G @ w[k, c] @ G.T, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_winograd_zero_input_gives_the_bias_exactly(dtype):
    x = np.zeros((2, 3, 9, 7), dtype)
    w = np.ones((4, 3, 3, 3), dtype)
    b = np.arange(4, dtype=dtype) - 1.5
    with pytest.MonkeyPatch.context() as mp:
        always_winograd(mp)
        z = K.conv2d_forward(x, w, b, 1, 1, 1, backend="cpu")
    assert z.tobytes() == np.broadcast_to(b[None, :, None, None], z.shape).astype(dtype).tobytes()


def test_winograd_on_strided_views_and_deterministic(rng):
    x = rng.standard_normal((4, 6, 11, 20)).astype(np.float32)[:, ::2, :, ::2]  # (4, 3, 11, 10), not contiguous
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    with pytest.MonkeyPatch.context() as mp:
        always_winograd(mp, 5)
        z1 = K.conv2d_forward(x, w, None, 1, 2, 1, backend="cpu")
        z2 = K.conv2d_forward(np.ascontiguousarray(x), w, None, 1, 2, 1, backend="cpu")
    assert z1.tobytes() == z2.tobytes()
    assert_close(z1, K.conv2d_forward(x, w, None, 1, 2, 1, backend="reference"), reduction_len=27)


@pytest.mark.parametrize("threads", [1, 2, 3])
@given(n=st.integers(1, 3), c=st.integers(1, 5), k=st.sampled_from([1, 17, 40, 70]), hw=st.integers(2, 14),
       padding=st.integers(0, 2), seed=st.integers(0, 2**32 - 1))
def test_winograd_schedules_agree(threads, n, c, k, hw, padding, seed):
    """Both schedules (chunks of tiles per thread; few tiles: shared buffers, GEMMs split by blocks of
    output channels, K not a multiple of the 16-channel blocks) against the reference, and each one
    bitwise reproducible."""
    rng = np.random.default_rng(seed)
    h = max(hw, 3 - 2 * padding)
    x = rng.standard_normal((n, c, h, h + 1)).astype(np.float32)
    w = rng.standard_normal((k, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    u = wg.transformed_filters(w)
    ho, wo = h + 2 * padding - 2, h + 1 + 2 * padding - 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_THREADS", threads)
        mp.setattr(config, "WINOGRAD_CHUNK_TILES", 512)  # one chunk of at most 3 * 4 * 4 tiles
        mp.setattr(config, "WINOGRAD_THREADS_MIN_MACS", 0)
        few = []
        real = wg._few_tiles
        mp.setattr(wg, "_few_tiles", lambda *a: few.append(1) or real(*a))
        tiles = n * -(-ho // 4) * -(-wo // 4)
        outs = []
        for bound in (0, 0, 36 * tiles * c * k + 1):  # shared phases (twice), then too little work for them
            mp.setattr(config, "WINOGRAD_FEW_TILES_MIN_MACS", bound)
            few.clear()
            outs.append(wg.conv3x3_winograd(x, u, b, (padding, padding), np.empty((n, k, ho, wo), np.float32),
                                            cpu_conv._gemm_batch))
            # these problems are one chunk: the few-tiles schedule when threaded and worth it
            assert bool(few) == (threads > 1 and bound == 0)
    assert outs[0].tobytes() == outs[1].tobytes()
    assert_close(outs[0], K.conv2d_forward(x, w, b, 1, padding, 1, backend="reference"), reduction_len=c * 9)
    assert_close(outs[2], outs[0], reduction_len=c * 9)


def test_winograd_vjp_is_the_adjoint(rng):
    """<conv(x), g> == <x, conv_vjp(g)> in float64 through the Winograd path (padding 0 and 2 swap)."""
    x = rng.standard_normal((2, 5, 10, 9))
    w = rng.standard_normal((7, 5, 3, 3))
    with pytest.MonkeyPatch.context() as mp:
        always_winograd(mp, 2)
        for p in (0, 1, 2, (0, 2)):
            z = K.conv2d_forward(x, w, None, 1, p, 1, backend="cpu")
            g = rng.standard_normal(z.shape)
            gx = K.conv2d_vjp(g, w, x.shape, 1, p, 1, backend="cpu")
            assert np.vdot(z, g) == pytest.approx(np.vdot(x, gx), rel=1e-12)


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, dilation, expected", [
    ((64, 128, 8, 8), (128, 128, 3, 3), (1, 1), (1, 1), (1, 1), True),     # CIFAR-VGG's layers
    ((64, 64, 32, 32), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1), True),
    ((4, 256, 56, 56), (256, 256, 3, 3), (1, 1), (1, 1), (1, 1), True),    # VGG-16's
    ((4, 512, 14, 14), (512, 512, 3, 3), (1, 1), (1, 1), (1, 1), True),
    ((64, 32, 16, 16), (32, 32, 3, 3), (1, 1), (1, 1), (1, 1), False),     # too few channels
    ((64, 3, 32, 32), (64, 3, 3, 3), (1, 1), (1, 1), (1, 1), False),
    ((1, 128, 16, 16), (128, 128, 3, 3), (1, 1), (1, 1), (1, 1), True),    # CIFAR-VGG's at batch 1
    ((1, 64, 16, 16), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1), True),       # 16 tiles
    ((1, 64, 4, 4), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1), True),         # one tile
    ((64, 128, 8, 8), (128, 128, 3, 3), (2, 2), (1, 1), (1, 1), False),    # stride
    ((64, 128, 8, 8), (128, 128, 3, 3), (1, 1), (1, 1), (2, 2), False),    # dilation
    ((64, 128, 8, 8), (128, 128, 3, 3), (1, 1), (3, 3), (1, 1), False),    # padding beyond 2
    ((64, 128, 8, 8), (128, 128, 5, 5), (1, 1), (1, 1), (1, 1), False),    # not 3x3
])
def test_winograd_applies_where_it_pays(x_shape, w_shape, stride, padding, dilation, expected):
    assert wg.winograd_applies(x_shape, w_shape, stride, padding, dilation) is expected
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "WINOGRAD", False)
        assert not wg.winograd_applies(x_shape, w_shape, stride, padding, dilation)


def test_winograd_work_bound():
    """``WINOGRAD_MIN_WORK`` bounds tiles x C x K from below, inclusive."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "WINOGRAD_MIN_WORK", 16 * 64 * 64)
        assert wg.winograd_applies((1, 64, 16, 16), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1))
        mp.setattr(config, "WINOGRAD_MIN_WORK", 16 * 64 * 64 + 1)
        assert not wg.winograd_applies((1, 64, 16, 16), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1))


@pytest.mark.parametrize("also", [0, 1])
def test_winograd_small_work_runs_on_the_calling_thread(also):
    """Below ``WINOGRAD_THREADS_MIN_MACS`` (counting every filter set) every chunk of a convolution of
    several chunks runs on the calling thread; from it, the threads take chunks.  Same values either way."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 8, 12, 13)).astype(np.float32)
    w = rng.standard_normal((2, 16, 8, 3, 3)).astype(np.float32)
    b = np.zeros(16, np.float32)
    tiles = 3 * 3 * 4
    macs = 36 * tiles * 8 * 16 * (1 + also)
    outs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_THREADS", 2)
        mp.setattr(config, "WINOGRAD_CHUNK_TILES", 4)  # one tile row a chunk: 9 chunks
        seen = []
        real = wg._input_transform


        def transform(*a):  # a chunk long enough (2 ms) for the pool's thread to wake and take one
            seen.append(threading.get_ident())
            time.sleep(0.002)
            return real(*a)

        mp.setattr(wg, "_input_transform", transform)
        for bound, alone in ((macs + 1, True), (macs, False)):
            mp.setattr(config, "WINOGRAD_THREADS_MIN_MACS", bound)
            seen.clear()
            out = np.empty((3, 16, 12, 13), np.float32)
            extra = [(wg.transformed_filters(w[1]), b, np.empty_like(out))] if also else []
            for _ in range(3):  # threaded, the pool's thread takes chunks in every call
                wg.conv3x3_winograd(x, wg.transformed_filters(w[0]), b, (1, 1), out, cpu_conv._gemm_batch, also=extra)
            assert len(seen) >= 9
            assert (set(seen) == {threading.get_ident()}) is alone
            outs.append([out] + [e[2] for e in extra])
    for a, c in zip(*outs):
        assert_close(a, c, reduction_len=8 * 9)
    assert_close(outs[0][0], K.conv2d_forward(x, w[0], b, 1, 1, 1, backend="reference"), reduction_len=8 * 9)


def test_filter_transforms_are_cached_and_checked(rng):
    """A second call with the same weights reuses U; weights changed in place are transformed afresh
    (and the convolution follows them); the VJP's flipped orientation is its own entry."""
    x = rng.standard_normal((2, 4, 9, 9))
    w = rng.standard_normal((5, 4, 3, 3))
    u1 = wg.transformed_filters(w)
    assert wg.transformed_filters(w) is u1
    uf = wg.transformed_filters(w, flipped=True)
    assert uf is not u1 and wg.transformed_filters(w, flipped=True) is uf
    np.testing.assert_allclose(uf, wg.filter_transform(np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])))
    with pytest.MonkeyPatch.context() as mp:
        always_winograd(mp)
        K.conv2d_forward(x, w, None, 1, 1, 1, backend="cpu")
        w[2, 1, 0, 2] += 1.0  # in place: same array, new values
        assert wg.transformed_filters(w) is not u1
        z = K.conv2d_forward(x, w, None, 1, 1, 1, backend="cpu")
        g = rng.standard_normal(z.shape)
        gx = K.conv2d_vjp(g, w, x.shape, 1, 1, 1, backend="cpu")
    assert_close(z, K.conv2d_forward(x, w, None, 1, 1, 1, backend="reference"), reduction_len=36)
    assert_close(gx, K.conv2d_vjp(g, w, x.shape, 1, 1, 1, backend="reference"), reduction_len=45)


def test_filter_cache_is_bounded_and_forgets_collected_weights(rng):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(derived_cache, "_CACHE", type(derived_cache._CACHE)())
        cache = derived_cache._CACHE
        w = rng.standard_normal((8, 8, 3, 3))
        one = w.nbytes + 4 * w.nbytes  # the copy and U (36 values per 9 weights)
        mp.setattr(config, "WINOGRAD_CACHE_BYTES", 2 * one)
        ws = [rng.standard_normal((8, 8, 3, 3)) for _ in range(3)]
        for wi in ws:
            wg.transformed_filters(wi)
        assert len(cache) == 2 and (id(ws[0]), ("winograd", False)) not in cache  # least recently used out
        del ws[2], wi
        assert len(cache) == 1  # the collected array's entry went with it
        mp.setattr(config, "WINOGRAD_CACHE_BYTES", 0)
        assert wg.transformed_filters(w) is not wg.transformed_filters(w)  # no cache


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk_tiles", [2, 512])  # many chunks; one chunk (the few-tiles schedule when threaded)
@pytest.mark.parametrize("shape", [(3, 6, 9, 10), (1, 4, 5, 5)])
def test_further_weight_sets_share_the_input_transform(threads, chunk_tiles, shape, rng):
    """``also``: the same convolution with further weights in the same call, each bit for bit what a call
    of its own gives (Winograd transforms x once for all), with and without the fused ReLU; the direct
    paths run them one after another."""
    from relprop.kernels import _ops

    x = rng.standard_normal(shape).astype(np.float32)
    c = shape[1]
    w = rng.standard_normal((7, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    sets = [(np.maximum(w, 0), np.maximum(b, 0)), (np.minimum(w, 0), None)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_THREADS", threads)
        for winograd in (True, False):
            if winograd:
                always_winograd(mp, chunk_tiles)
            else:
                mp.setattr(config, "WINOGRAD", False)
            for relu, keep_z in ((False, True), (True, True), (True, False)):
                z, a, extra = _ops.conv2d_forward_also(x, w, b, (1, 1), (1, 1), (1, 1), "cpu", sets, relu=relu,
                                                       keep_z=keep_z)
                alone = _ops.conv2d_forward(x, w, b, (1, 1), (1, 1), (1, 1), "cpu", relu=relu, keep_z=keep_z)
                if relu:
                    assert (z is None) == (not keep_z) and a.tobytes() == alone[1].tobytes()
                    if keep_z:
                        assert z.tobytes() == alone[0].tobytes()
                else:
                    assert a is None and z.tobytes() == alone.tobytes()
                for (w2, b2), z2 in zip(sets, extra):
                    assert z2.tobytes() == _ops.conv2d_forward(x, w2, b2, (1, 1), (1, 1), (1, 1), "cpu").tobytes()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("chunk_tiles", [2, 512])  # many chunks; one chunk (the few-tiles schedule when threaded)
@given(n=st.integers(1, 3), c=st.integers(1, 5), k=st.sampled_from([1, 17, 40]), h=st.integers(2, 14),
       w=st.integers(2, 14), padding=st.integers(0, 2), ties=st.booleans(), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_winograd_pools_in_its_write_out(threads, chunk_tiles, n, c, k, h, w, padding, ties, seed, dtype):
    """A conv + ReLU + 2x2 max-pool triple on the Winograd path (the pool in the output transform) gives
    the unfused kernels' values exactly and the reference's; odd sizes and the tiles' overhang are
    dropped; ties (small integers) and zeros; both schedules, bitwise reproducible."""
    rng = np.random.default_rng(seed)
    h, w = max(h, 4 - 2 * padding), max(w, 4 - 2 * padding)  # at least a 2x2 output
    x, wt, b = conv_inputs(rng, (n, c, h, w), (k, c, 3, 3), ties, dtype)
    geometry = ((1, 1), (padding, padding), (1, 1))
    pooled = []
    with pytest.MonkeyPatch.context() as mp:
        always_winograd(mp, chunk_tiles)
        mp.setattr(config, "CONV_THREADS", threads)
        real = wg._output_transform_pool
        mp.setattr(wg, "_output_transform_pool", lambda *a: pooled.append(1) or real(*a))
        got = [_ops.conv2d_relu_maxpool2x2(x, wt, b, *geometry, "cpu") for _ in range(2)]
        z = K.conv2d_forward(x, wt, b, *geometry, backend="cpu")
        want = K.maxpool2d_forward(K.relu_forward(z, backend="cpu"), 2, backend="cpu")[0]
    assert pooled and got[0].dtype == dtype and got[0].tobytes() == got[1].tobytes()
    np.testing.assert_array_equal(got[0], want)
    assert_close(got[0], _ops.conv2d_relu_maxpool2x2(x, wt, b, *geometry, "reference"), reduction_len=c * 9)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("chunk_tiles", [2, 512])  # many chunks; one chunk (the few-tiles schedule when threaded)
@given(n=st.integers(1, 3), c=st.integers(1, 5), k=st.sampled_from([1, 17, 40]), h=st.integers(2, 14),
       w=st.integers(2, 14), padding=st.integers(0, 2), ties=st.booleans(), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_winograd_pools_with_switches_in_its_write_out(threads, chunk_tiles, n, c, k, h, w, padding, ties, seed, dtype):
    """The triple with the pool's switches (a sweep's trace) on the Winograd path: the maxima, the switches
    (first maximum of relu(z) in row-major order: ties, zeros) and the ``also`` forward (z+, from the same
    input transform) equal the unfused trace's to the bit; both schedules, odd sizes, the tiles' overhang."""
    rng = np.random.default_rng(seed)
    h, w = max(h, 4 - 2 * padding), max(w, 4 - 2 * padding)  # at least a 2x2 output
    x, wt, b = conv_inputs(rng, (n, c, h, w), (k, c, 3, 3), ties, dtype)
    also = [(np.maximum(wt, 0), np.maximum(b, 0))]
    geometry = ((1, 1), (padding, padding), (1, 1))
    pooled = []
    with pytest.MonkeyPatch.context() as mp:
        always_winograd(mp, chunk_tiles)
        mp.setattr(config, "CONV_THREADS", threads)
        real = wg._output_transform_pool_switches
        mp.setattr(wg, "_output_transform_pool_switches", lambda *a: pooled.append(1) or real(*a))
        y, sw, extra = _ops.conv2d_relu_maxpool2x2(x, wt, b, *geometry, "cpu", switches=True, also=also)
        _, a, extra2 = _ops.conv2d_forward_also(x, wt, b, *geometry, "cpu", also, relu=True, keep_z=False)
        y2, sw2 = _ops.maxpool2d_forward(a, (2, 2), (2, 2), (0, 0), "cpu")
    assert pooled and y.dtype == dtype
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(sw, sw2)
    np.testing.assert_array_equal(extra[0], extra2[0])


@pytest.mark.parametrize("threads", [1, 2])
def test_winograd_pool_falls_back_on_nan(threads, rng):
    """A NaN or an infinity in a pooled window: the triple runs unfused, so the NaN is not dropped."""
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    x[1, 2, 4, 4] = np.inf
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    with pytest.MonkeyPatch.context() as mp:
        always_winograd(mp)
        mp.setattr(config, "CONV_THREADS", threads)
        got = _ops.conv2d_relu_maxpool2x2(x, w, b, (1, 1), (1, 1), (1, 1), "cpu")
        z = K.conv2d_forward(x, w, b, 1, 1, backend="cpu", check_finite=False)  # NaN where inf - inf
    want = K.maxpool2d_forward(np.maximum(z, 0), 2, backend="cpu", check_finite=False)[0]
    assert not np.isfinite(want).all()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads, chunk_tiles", [(1, 2), (2, 2), (2, 512), (3, 4)])
@given(n=st.integers(1, 3), c=st.integers(1, 6), k=st.sampled_from([1, 5, 17]), h=st.integers(1, 11),
       w=st.integers(1, 11), padding=st.integers(0, 2), eps=st.sampled_from([0.0, 1e-6]), seed=st.integers(0, 2**32 - 1))
def test_winograd_relevance_divides_and_multiplies_in_its_transforms(threads, chunk_tiles, n, c, k, h, w, padding, eps,
                                                                     seed, dtype):
    """An LRP backward a ⊙ Wᵀ(R / stab(z)) through the Winograd input-VJP, R divided as it enters the input
    transform and the result multiplied by a as it leaves the output transform: the stabilised divide, the
    VJP and the product one after the other to the bit, in both schedules (chunks of tiles; few tiles, the
    threads sharing the phases); zeros in z (ε = 0: a zero denominator gives 0)."""
    assume(h + 2 * padding - 2 >= 1 and w + 2 * padding - 2 >= 1)
    rng = np.random.default_rng(seed)
    a = np.maximum(rng.standard_normal((n, c, h, w)), 0).astype(dtype)
    wt = rng.standard_normal((k, c, 3, 3)).astype(dtype)
    geometry = ((1, 1), (padding, padding), (1, 1))
    z = K.conv2d_forward(a, np.maximum(wt, 0), None, 1, padding, 1, backend="reference").astype(dtype)
    z[rng.random(z.shape) < 0.2] = 0
    r = rng.standard_normal(z.shape).astype(dtype)
    with pytest.MonkeyPatch.context() as mp:
        always_winograd(mp, chunk_tiles)
        mp.setattr(config, "CONV_THREADS", threads)
        calls = spy(mp)
        got = _ops.conv2d_relevance(r, z, eps, wt, a, *geometry, "cpu")
        assert calls  # the Winograd path
        s = K.stabilized_divide(r, z, eps, backend="cpu")
        want = _ops.conv2d_vjp(s, wt, a.shape, *geometry, "cpu") * a
    assert got.tobytes() == want.tobytes()
