"""Kernel benchmarks: the layers of LeNet-5 and of a VGG-style CIFAR net, reference vs cpu.

Shapes (float32):

* LeNet-5 on 1x28x28, batch 256: conv5x5 1->6, maxpool 2, conv5x5 6->16, maxpool 2,
  fc 256->120->84->10 (16*4*4 = 256).
* CIFAR-VGG on 3x32x32, batch 64: conv3x3 pad 1 3->64, 64->64, maxpool 2, 64->128,
  128->128, maxpool 2, 128->256, 256->256, maxpool 2, fc 4096->512->10.

Each benchmark records its GFLOP/s and the fraction of the float32 GEMM rate measured in the
same session (``extra_info["gflops"]``, ``extra_info["frac_of_gemm"]``; see conftest.py);
max-pooling is memory-bound and records GB/s instead.  The NumPy reference kernels are
written for reading, not speed: on the large layers they run a single round.

Run: ``pytest bench/test_bench_kernels.py --benchmark-only`` (a table of rates ends the run).
"""
import time

import numpy as np
import pytest

from relprop._backend import kernels
from relprop.kernels import _ops

BACKENDS = ["reference", "cpu"]

# name, x shape, w shape, padding
CONVS = [
    ("lenet.conv1", (256, 1, 28, 28), (6, 1, 5, 5), 0),
    ("lenet.conv2", (256, 6, 12, 12), (16, 6, 5, 5), 0),
    ("vgg.conv1", (64, 3, 32, 32), (64, 3, 3, 3), 1),
    ("vgg.conv2", (64, 64, 32, 32), (64, 64, 3, 3), 1),
    ("vgg.conv3", (64, 64, 16, 16), (128, 64, 3, 3), 1),
    ("vgg.conv4", (64, 128, 16, 16), (128, 128, 3, 3), 1),
    ("vgg.conv5", (64, 128, 8, 8), (256, 128, 3, 3), 1),
    ("vgg.conv6", (64, 256, 8, 8), (256, 256, 3, 3), 1),
]
# name, x shape (2x2 windows, stride 2)
POOLS = [
    ("lenet.pool1", (256, 6, 24, 24)),
    ("lenet.pool2", (256, 16, 8, 8)),
    ("vgg.pool1", (64, 64, 32, 32)),
    ("vgg.pool2", (64, 128, 16, 16)),
    ("vgg.pool3", (64, 256, 8, 8)),
]
# name, batch, in, out
DENSES = [
    ("lenet.fc1", 256, 256, 120),
    ("lenet.fc2", 256, 120, 84),
    ("lenet.fc3", 256, 84, 10),
    ("vgg.fc1", 64, 4096, 512),
    ("vgg.fc2", 64, 512, 10),
]
#: the reference kernels run one round above this many FLOPs (a few seconds at most each)
SLOW_REFERENCE_FLOPS = 2e8


def _ids(items):
    return [item[0] for item in items]


def _run(benchmark, fn, backend, flops):
    """Benchmark ``fn``; slow reference calls get a single round, cpu calls a warm-up first."""
    if backend == "reference" and flops > SLOW_REFERENCE_FLOPS:
        return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    if backend != "reference":
        fn()  # compile (or load Numba's cache) and wake the thread pools outside the timing
    return benchmark(fn)


def _conv_case(x_shape, w_shape, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal(w_shape) * np.sqrt(2.0 / np.prod(w_shape[1:]))).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    geometry = ((1, 1), (padding, padding), (1, 1))
    z_shape = _ops.conv2d_output_shape(x_shape, w_shape, *geometry)
    flops = 2.0 * np.prod(z_shape) * np.prod(w_shape[1:])
    return x, w, b, geometry, z_shape, flops


def _conv_label(name, x_shape, w_shape):
    return f"{name} {'x'.join(map(str, x_shape))}->{w_shape[0]}"


@pytest.mark.benchmark(group="conv2d_forward")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,x_shape,w_shape,padding", CONVS, ids=_ids(CONVS))
def test_conv2d_forward(benchmark, record_rate, name, x_shape, w_shape, padding, backend):
    x, w, b, geometry, _, flops = _conv_case(x_shape, w_shape, padding)
    z = _run(benchmark, lambda: _ops.conv2d_forward(x, w, b, *geometry, backend), backend, flops)
    assert z.shape[:2] == (x_shape[0], w_shape[0])
    record_rate(benchmark, flops=flops, backend=backend, label=_conv_label(name, x_shape, w_shape))


@pytest.mark.benchmark(group="conv2d_vjp")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,x_shape,w_shape,padding", CONVS, ids=_ids(CONVS))
def test_conv2d_vjp(benchmark, record_rate, name, x_shape, w_shape, padding, backend):
    x, w, _, geometry, z_shape, flops = _conv_case(x_shape, w_shape, padding)
    g = np.random.default_rng(1).standard_normal(z_shape).astype(np.float32)
    gx = _run(benchmark, lambda: _ops.conv2d_vjp(g, w, x_shape, *geometry, backend), backend, flops)
    assert gx.shape == x_shape
    record_rate(benchmark, flops=flops, backend=backend, label=_conv_label(name, x_shape, w_shape))


WINOGRAD_CONVS = [c for c in CONVS if c[2][1] >= 64] + [
    ("vgg16.conv2", (4, 64, 224, 224), (64, 64, 3, 3), 1),
    ("vgg16.conv6", (4, 256, 56, 56), (256, 256, 3, 3), 1),
    ("vgg16.conv12", (4, 512, 14, 14), (512, 512, 3, 3), 1),
]


@pytest.mark.benchmark(group="conv2d_winograd")
@pytest.mark.parametrize("direction", ["forward", "vjp"])
@pytest.mark.parametrize("name,x_shape,w_shape,padding", WINOGRAD_CONVS, ids=_ids(WINOGRAD_CONVS))
def test_conv2d_winograd_vs_direct(benchmark, record_rate, monkeypatch, request, name, x_shape, w_shape, padding,
                                   direction):
    """The Winograd F(4x4, 3x3) path against the direct (row-shift GEMM) path on the same layer, in
    alternating rounds: ``extra_info["direct_over_winograd"]`` (> 1: Winograd is faster) and the
    float32 difference of the two relative to the output's range."""
    import relprop._config as config
    from relprop.kernels.cpu import winograd

    x, w, b, geometry, z_shape, flops = _conv_case(x_shape, w_shape, padding)
    g = np.random.default_rng(1).standard_normal(z_shape).astype(np.float32)
    if not winograd.winograd_applies(x_shape, w_shape, *geometry):
        pytest.skip("below the Winograd thresholds")
    if direction == "forward":
        run = lambda: _ops.conv2d_forward(x, w, b, *geometry, "cpu")  # noqa: E731
    else:
        run = lambda: _ops.conv2d_vjp(g, w, x_shape, *geometry, "cpu")  # noqa: E731

    def direct():
        monkeypatch.setattr(config, "WINOGRAD", False)
        try:
            return run()
        finally:
            monkeypatch.setattr(config, "WINOGRAD", True)

    ours, theirs = run(), direct()  # compile, transform the filters, and compare
    err = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    assert err < 1e-4
    smoke = bool(request.config.getoption("benchmark_disable", False))
    times = {"winograd": [], "direct": []}
    for _ in range(1 if smoke else 5):
        for label, fn in (("winograd", run), ("direct", direct)):
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    ratio = float(np.median(times["direct"]) / np.median(times["winograd"]))
    benchmark.extra_info.update(direct_over_winograd=ratio, max_rel_diff=err)
    record_rate(benchmark, flops=flops, backend="cpu", label=f"{_conv_label(name, x_shape, w_shape)} winograd")


@pytest.mark.benchmark(group="maxpool2d")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,x_shape", POOLS, ids=_ids(POOLS))
def test_maxpool2d_with_switches(benchmark, record_rate, name, x_shape, backend):
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    out, switches = _run(benchmark, lambda: _ops.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0), backend), backend, 0)
    record_rate(benchmark, nbytes=x.nbytes + out.nbytes + switches.nbytes, backend=backend,
           label=f"{name} {'x'.join(map(str, x_shape))}")


def _alternating_medians(fns, rounds):
    """Median seconds of each callable, timed round-robin so that all see the same machine load, the
    order reversed every other round (whichever runs first after another finds its memory cold)."""
    times = [[] for _ in fns]
    for r in range(rounds):
        order = list(enumerate(fns))
        for k, fn in (order[::-1] if r % 2 else order):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def _ratio(request, fast, slow, rounds):
    """slow's median time over fast's, alternating for ``rounds`` rounds (one in a smoke run)."""
    smoke = bool(request.config.getoption("benchmark_disable", False))
    t_fast, t_slow = _alternating_medians((fast, slow), 1 if smoke else rounds)
    return t_slow / t_fast


def _time_against(benchmark, request, key, fast, slow, rounds):
    """``fast`` timed once as the benchmark, and ``extra_info[key]`` = :func:`_ratio` of the two."""
    ratio = _ratio(request, fast, slow, rounds)
    benchmark.pedantic(fast, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info[key] = ratio


@pytest.mark.benchmark(group="maxpool2d_rows")
@pytest.mark.parametrize("name,x_shape", POOLS, ids=_ids(POOLS))
def test_maxpool2d_rows_vs_planes(benchmark, request, name, x_shape):
    """The CPU 2x2 max-pool's branch-free row kernel against its plane scan, alternating:
    ``extra_info["planes_over_rows"]`` (> 1: the rows are faster); both give the same bits."""
    from relprop.kernels.cpu import pool2d

    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    shape = x_shape[:2] + (x_shape[2] // 2, x_shape[3] // 2)
    out, sw = np.empty(shape, np.float32), np.empty(shape, np.int64)
    out_p, sw_p = np.empty(shape, np.float32), np.empty(shape, np.int64)
    rows = lambda: pool2d.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0), out, sw)  # noqa: E731
    planes = lambda: pool2d._maxpool_planes(x, (2, 2), (2, 2), (0, 0), out_p, sw_p)  # noqa: E731
    rows(), planes()
    assert out.tobytes() == out_p.tobytes() and np.array_equal(sw, sw_p)
    _time_against(benchmark, request, "planes_over_rows", rows, planes, 20)


@pytest.mark.benchmark(group="conv2d_relu")
@pytest.mark.parametrize("name,x_shape,w_shape,padding", CONVS, ids=_ids(CONVS))
def test_conv2d_relu_fused_vs_separate(benchmark, request, name, x_shape, w_shape, padding):
    """A conv + ReLU pair as one call (the ReLU in the write-out; z not kept, as in a forward) against
    the conv and then the ReLU kernel, alternating: ``extra_info["separate_over_fused"]``."""
    x, w, b, geometry, _, _ = _conv_case(x_shape, w_shape, padding)
    fused = lambda: _ops.conv2d_forward(x, w, b, *geometry, "cpu", relu=True, keep_z=False)[1]  # noqa: E731
    separate = lambda: _ops.relu_forward(_ops.conv2d_forward(x, w, b, *geometry, "cpu"), "cpu")  # noqa: E731
    assert fused().tobytes() == separate().tobytes()
    _time_against(benchmark, request, "separate_over_fused", fused, separate, 20)


#: the convolutions a 2x2 max-pool follows in LeNet-5 and CIFAR-VGG
CONV_POOLS = [c for c in CONVS if c[0] in ("lenet.conv1", "lenet.conv2", "vgg.conv2", "vgg.conv4", "vgg.conv6")]


@pytest.mark.benchmark(group="conv2d_relu_maxpool")
@pytest.mark.parametrize("name,x_shape,w_shape,padding", CONV_POOLS, ids=_ids(CONV_POOLS))
def test_conv2d_relu_maxpool_fused_vs_separate(benchmark, request, name, x_shape, w_shape, padding):
    """A conv + ReLU + 2x2 max-pool triple of a forward as one call (the pool in the write-out of the lanes
    and Winograd paths) against the conv + ReLU pair and then the pool's maxima, alternating:
    ``extra_info["separate_over_fused"]``."""
    x, w, b, geometry, _, _ = _conv_case(x_shape, w_shape, padding)
    fused = lambda: _ops.conv2d_relu_maxpool2x2(x, w, b, *geometry, "cpu")  # noqa: E731

    def separate():
        a = _ops.conv2d_forward(x, w, b, *geometry, "cpu", relu=True, keep_z=False)[1]
        return _ops.maxpool2d_forward(a, (2, 2), (2, 2), (0, 0), "cpu", switches=False)[0]

    assert fused().tobytes() == separate().tobytes()
    _time_against(benchmark, request, "separate_over_fused", fused, separate, 20)


@pytest.mark.benchmark(group="conv2d_relu_maxpool")
@pytest.mark.parametrize("name,x_shape,w_shape,padding", CONV_POOLS, ids=_ids(CONV_POOLS))
def test_conv2d_relu_maxpool_switches_fused_vs_separate(benchmark, request, name, x_shape, w_shape, padding):
    """The same triple as a sweep's trace runs it (``switches=True``: the pool's switches recorded, z and
    relu(z) never written) against the conv + ReLU pair and then the pool with its switches, alternating:
    ``extra_info["separate_over_fused"]``."""
    x, w, b, geometry, _, _ = _conv_case(x_shape, w_shape, padding)
    fused = lambda: _ops.conv2d_relu_maxpool2x2(x, w, b, *geometry, "cpu", switches=True)[:2]  # noqa: E731

    def separate():
        a = _ops.conv2d_forward(x, w, b, *geometry, "cpu", relu=True, keep_z=False)[1]
        return _ops.maxpool2d_forward(a, (2, 2), (2, 2), (0, 0), "cpu")

    assert all(f.tobytes() == s.tobytes() for f, s in zip(fused(), separate()))
    _time_against(benchmark, request, "separate_over_fused", fused, separate, 20)


@pytest.mark.benchmark(group="conv2d_relu_maxpool")
def test_conv2d_relu_maxpool_chain_vs_stage_by_stage(benchmark, request):
    """LeNet-5's two conv + ReLU + 2x2 max-pool triples at batch 256 as one chain (each block of samples
    through both, the map between them kept in lanes) against the two fused triples one after the other,
    alternating: ``extra_info["separate_over_chain"]``."""
    convs = {c[0]: c for c in CONVS}
    x, w1, b1, g1, _, _ = _conv_case(*convs["lenet.conv1"][1:])
    _, w2, b2, g2, _, _ = _conv_case(*convs["lenet.conv2"][1:])
    stages = [(w1, b1) + g1, (w2, b2) + g2]
    chain = lambda: _ops.conv2d_relu_maxpool2x2_chain(x, stages, "cpu")  # noqa: E731

    def separate():
        return _ops.conv2d_relu_maxpool2x2(_ops.conv2d_relu_maxpool2x2(x, w1, b1, *g1, "cpu"), w2, b2, *g2, "cpu")

    assert chain().tobytes() == separate().tobytes()
    _time_against(benchmark, request, "separate_over_chain", chain, separate, 40)

RELEVANCES = [c for c in CONVS if c[0] in ("lenet.conv2", "vgg.conv2", "vgg.conv4")]


@pytest.mark.benchmark(group="conv2d_relevance")
@pytest.mark.parametrize("name,x_shape,w_shape,padding", RELEVANCES, ids=_ids(RELEVANCES))
def test_conv2d_relevance_one_call_vs_three(benchmark, request, name, x_shape, w_shape, padding):
    """An LRP backward a ⊙ W⁺ᵀ(R / stab(z⁺)) as one call (divided and multiplied inside the transposed
    convolution where it runs as Winograd or in lanes) against the stabilised divide, the input-VJP and
    the product, alternating: ``extra_info["three_over_one"]``."""
    x, w, _, geometry, z_shape, _ = _conv_case(x_shape, w_shape, padding)
    a, wp = np.maximum(x, 0), np.maximum(w, 0)
    z = _ops.conv2d_forward(a, wp, None, *geometry, "cpu")
    r = np.random.default_rng(1).standard_normal(z_shape).astype(np.float32)
    one = lambda: _ops.conv2d_relevance(r, z, 1e-6, wp, a, *geometry, "cpu")  # noqa: E731

    def three():
        s = _ops.stabilized_divide(r, z, 1e-6, "cpu")
        c = _ops.conv2d_vjp(s, wp, a.shape, *geometry, "cpu")
        return np.multiply(c, a, out=c)

    assert one().tobytes() == three().tobytes()
    _time_against(benchmark, request, "three_over_one", one, three, 15)

UNPOOLED = [c for c in CONVS if c[0] in ("vgg.conv2", "vgg.conv4", "vgg.conv6")]


@pytest.mark.benchmark(group="conv2d_unpool_vjp")
@pytest.mark.parametrize("name,x_shape,w_shape,padding", UNPOOLED, ids=_ids(UNPOOLED))
def test_conv2d_unpool_vjp_one_call_vs_two(benchmark, request, name, x_shape, w_shape, padding):
    """The backward of a conv + ReLU + 2x2 max-pool triple from the pool's side, a ⊙ W⁺ᵀ unpool(s), as one
    call (unpooled in the Winograd input transform) against the unpooling and then the transposed
    convolution with the product, alternating: ``extra_info["two_over_one"]``; and the trace's z⁺ recorded
    at the switches only against whole: ``extra_info["whole_over_at_switches"]``."""
    x, w, b, geometry, z_shape, _ = _conv_case(x_shape, w_shape, padding)
    a, wp = np.maximum(x, 0), np.maximum(w, 0)
    _, sw, _ = _ops.conv2d_relu_maxpool2x2(a, w, b, *geometry, "cpu", switches=True)
    s = np.random.default_rng(1).standard_normal(sw.shape).astype(np.float32)
    one = lambda: _ops.conv2d_unpool_vjp(s, sw, wp, a, a.shape, *geometry, "cpu")  # noqa: E731
    two = lambda: _ops.conv2d_relevance(_ops.maxunpool2d(s, sw, z_shape, "cpu"), None, 0.0, wp, a, *geometry,  # noqa: E731
                                        "cpu")
    assert one().tobytes() == two().tobytes()
    also = [(wp, np.maximum(b, 0))]
    at = lambda: _ops.conv2d_relu_maxpool2x2(a, w, b, *geometry, "cpu", switches=True, also=also,  # noqa: E731
                                             at_switches=True)
    whole = lambda: _ops.conv2d_relu_maxpool2x2(a, w, b, *geometry, "cpu", switches=True, also=also)  # noqa: E731
    _time_against(benchmark, request, "two_over_one", one, two, 15)
    benchmark.extra_info["whole_over_at_switches"] = _ratio(request, at, whole, 15)


FLATS = [c for c in CONVS if c[0] in ("lenet.conv1", "vgg.conv1")]


@pytest.mark.benchmark(group="conv2d_flat_relevance")
@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("name,x_shape,w_shape,padding", FLATS, ids=_ids(FLATS))
def test_conv2d_flat_relevance_one_call_vs_composed(benchmark, request, name, x_shape, w_shape, padding, pooled):
    """The flat rule's backward at a first layer as one call (channel sum, separable all-ones transposed
    convolution, copies; with ``pooled``, unpooling as it sums) against what it replaced: the unpooling, the
    channel sum (``einsum`` with the inverse denominators) and the 1 → 1 channel transposed convolution,
    alternating: ``extra_info["composed_over_one"]``."""
    x, w, b, geometry, z_shape, _ = _conv_case(x_shape, w_shape, padding)
    rng = np.random.default_rng(2)
    r = rng.standard_normal(z_shape).astype(np.float32)
    inv = np.full(z_shape[2:], 1.0 / np.prod(w_shape[1:]), np.float32)
    sw = None
    if pooled:
        _, sw = _ops.maxpool2d_forward(r, (2, 2), (2, 2), (0, 0), "cpu")
        r = rng.standard_normal(sw.shape).astype(np.float32)
    ones = np.ones((1, 1) + w_shape[2:], np.float32)
    inv_k = np.broadcast_to(inv, z_shape[1:])

    def composed():
        full = r if sw is None else _ops.maxunpool2d(r, sw, z_shape, "cpu")
        s1 = np.ascontiguousarray(np.einsum("nk...,k...->n...", full, inv_k)[:, None])
        c1 = _ops.conv2d_vjp(s1, ones, (x_shape[0], 1) + x_shape[2:], *geometry, "cpu")
        return c1 if x_shape[1] == 1 else np.array(np.broadcast_to(c1, x_shape), order="C")

    one = lambda: _ops.conv2d_flat_relevance(r, sw, inv, w_shape[2:], *geometry, x_shape, "cpu")  # noqa: E731
    np.testing.assert_allclose(one(), composed(), rtol=1e-4, atol=1e-5)
    _time_against(benchmark, request, "composed_over_one", one, composed, 15)


@pytest.mark.benchmark(group="stabilized_divide")
@pytest.mark.parametrize("name,x_shape", POOLS, ids=_ids(POOLS))
def test_stabilized_divide_in_place_own_kernel_vs_shared(benchmark, request, name, x_shape):
    """The stabilised divide in place (out = r, as the sweeps call it) on its own kernel against the loop that
    writes a separate ``out`` given r (what ran before: LLVM's overlap check sends it to scalar code),
    alternating: ``extra_info["shared_over_own"]``."""
    from relprop.kernels.cpu import elementwise

    rng = np.random.default_rng(0)
    r = rng.standard_normal(x_shape).astype(np.float32)
    z = rng.choice(np.array([-1.0, 1.0], np.float32), size=x_shape)  # stab(z) = ±1: r keeps its scale
    own = lambda: elementwise.stabilized_divide(r, z, 0.0, r)  # noqa: E731
    shared = lambda: elementwise._divide_to(r, z, 0.0, r)  # noqa: E731
    _time_against(benchmark, request, "shared_over_own", own, shared, 15)


def _dense_case(n, i, j):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, i)).astype(np.float32)
    w = (rng.standard_normal((j, i)) * np.sqrt(2.0 / i)).astype(np.float32)
    return x, w, rng.standard_normal(j).astype(np.float32), 2.0 * n * i * j


@pytest.mark.benchmark(group="dense_forward")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,n,i,j", DENSES, ids=_ids(DENSES))
def test_dense_forward(benchmark, record_rate, name, n, i, j, backend):
    x, w, b, flops = _dense_case(n, i, j)
    _run(benchmark, lambda: _ops.dense_forward(x, w, b, backend), backend, flops)
    record_rate(benchmark, flops=flops, backend=backend, label=f"{name} {n}x{i}->{j}")


@pytest.mark.benchmark(group="dense_vjp")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,n,i,j", DENSES, ids=_ids(DENSES))
def test_dense_vjp(benchmark, record_rate, name, n, i, j, backend):
    _, w, _, flops = _dense_case(n, i, j)
    g = np.random.default_rng(1).standard_normal((n, j)).astype(np.float32)
    _run(benchmark, lambda: _ops.dense_vjp(g, w, backend), backend, flops)
    record_rate(benchmark, flops=flops, backend=backend, label=f"{name} {n}x{j}->{i}")


#: VGG-16's classifier at batch 4 (the first layer's W is 411 MB), and batch 2 and 8 of its middle layer
STREAMED_DENSES = [("vgg16.fc1", 4, 25088, 4096), ("vgg16.fc2", 4, 4096, 4096), ("vgg16.fc3", 4, 4096, 1000),
                   ("vgg16.fc2", 2, 4096, 4096), ("vgg16.fc2", 8, 4096, 4096)]


@pytest.mark.benchmark(group="dense_streaming")
@pytest.mark.parametrize("direction", ["forward", "vjp"])
@pytest.mark.parametrize("name,n,i,j", STREAMED_DENSES, ids=_ids(STREAMED_DENSES))
def test_dense_streaming_vs_blas(benchmark, request, name, n, i, j, direction):
    """The CPU dense kernels for a few samples (W read once, each element loaded once for every
    sample) against BLAS's column blocks, alternating: ``extra_info["blas_over_streaming"]`` (> 1:
    streaming is faster) and ``extra_info["GB_per_s"]``, W's bytes over the streaming time.  A smoke
    run takes a W of a few MB."""
    import relprop._config as config
    from relprop.kernels.cpu import dense as cpu_dense

    if request.config.getoption("benchmark_disable", False):
        i, j = min(i, 1024), min(j, 1024)
    x, w, b, _ = _dense_case(n, i, j)
    g = np.random.default_rng(1).standard_normal((n, j)).astype(np.float32)
    out = np.empty((n, j if direction == "forward" else i), np.float32)
    call = (lambda: cpu_dense.dense_forward(x, w, b, out)) if direction == "forward" else \
        (lambda: cpu_dense.dense_vjp(g, w, out))

    def blas():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(config, "DENSE_STREAM_MAX_ROWS", 0)
            mp.setattr(config, "DENSE_STREAM_VJP_MAX_ROWS", 0)
            return call()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "DENSE_STREAM_MIN_WEIGHT_BYTES", 0)
        reference = blas().copy()
        np.testing.assert_allclose(call(), reference, rtol=1e-4, atol=1e-4 * float(np.abs(reference).max()))
        _time_against(benchmark, request, "blas_over_streaming", call, blas, 7)
    if not benchmark.disabled:
        benchmark.extra_info["GB_per_s"] = w.nbytes / benchmark.stats.stats.min / 1e9


@pytest.mark.benchmark(group="gemm")
def test_gemm_float32_2048(benchmark, record_rate):
    """The yardstick itself: np.matmul of two 2048x2048 float32 matrices."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2048, 2048)).astype(np.float32) for _ in range(2))
    out = np.empty_like(a)
    benchmark(np.matmul, a, b, out=out)
    record_rate(benchmark, flops=2.0 * a.shape[0] ** 3, backend="numpy", label="np.matmul 2048x2048")


# ---------------------------------------------------------------- a whole CIFAR-VGG forward

VGG = [("conv", 3, 64), ("conv", 64, 64), ("pool",), ("conv", 64, 128), ("conv", 128, 128), ("pool",),
       ("conv", 128, 256), ("conv", 256, 256), ("pool",), ("flatten",), ("dense", 4096, 512), ("dense", 512, 10)]


def _vgg_params(rng):
    params = []
    for layer in VGG:
        if layer[0] == "conv":
            _, c, k = layer
            params.append(((rng.standard_normal((k, c, 3, 3)) * np.sqrt(2.0 / (9 * c))).astype(np.float32),
                           np.zeros(k, np.float32)))
        elif layer[0] == "dense":
            _, i, j = layer
            params.append(((rng.standard_normal((j, i)) * np.sqrt(2.0 / i)).astype(np.float32),
                           np.zeros(j, np.float32)))
        else:
            params.append(None)
    return params


def vgg_forward(x, params, backend):
    """Logits of the CIFAR-VGG net, layer by layer through the kernels (ReLU after every conv/dense but the last)."""
    cpu = kernels(backend)
    relu = (lambda a: _ops.relu_forward(a, backend)) if hasattr(cpu, "relu_forward") else (lambda a: np.maximum(a, 0))
    a, last = x, max(i for i, layer in enumerate(VGG) if layer[0] == "dense")
    for i, (layer, p) in enumerate(zip(VGG, params)):
        if layer[0] == "conv":
            a = relu(_ops.conv2d_forward(a, p[0], p[1], (1, 1), (1, 1), (1, 1), backend))
        elif layer[0] == "pool":
            a, _ = _ops.maxpool2d_forward(a, (2, 2), (2, 2), (0, 0), backend)
        elif layer[0] == "flatten":
            a = a.reshape(a.shape[0], -1)
        else:
            a = _ops.dense_forward(a, p[0], p[1], backend)
            a = a if i == last else relu(a)
    return a


def vgg_flops(batch):
    flops, hw = 0.0, 32
    for layer in VGG:
        if layer[0] == "conv":
            flops += 2.0 * batch * layer[2] * layer[1] * 9 * hw * hw
        elif layer[0] == "pool":
            hw //= 2
        elif layer[0] == "dense":
            flops += 2.0 * batch * layer[1] * layer[2]
    return flops


@pytest.mark.benchmark(group="forward_net")
def test_vgg_forward_cpu(benchmark, record_rate):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    params = _vgg_params(rng)
    logits = benchmark.pedantic(vgg_forward, args=(x, params, "cpu"), rounds=15, warmup_rounds=1)
    assert logits.shape == (64, 10)
    record_rate(benchmark, flops=vgg_flops(64), backend="cpu", label="vgg forward 64x3x32x32")


@pytest.mark.benchmark(group="conv2d_lanes")
@pytest.mark.parametrize("name,x_shape,w_shape,padding", CONVS[:3], ids=_ids(CONVS[:3]))
def test_conv2d_lanes_vs_gemm(benchmark, request, name, x_shape, w_shape, padding):
    """The narrow layers' direct convolution with the batch in lanes (forward with its ReLU, and the
    input-VJP) against the GEMM paths (``_config.CONV_LANES = 0``), alternating:
    ``extra_info["gemm_over_lanes"]`` for the forward and ``vjp_gemm_over_lanes``.  vgg.conv1 is the
    control: 64 output channels, no lanes either way (its VJP measured 0.76x in lanes)."""
    from relprop import _config

    x, w, b, geometry, _, _ = _conv_case(x_shape, w_shape, padding)
    g = np.random.default_rng(1).standard_normal(_ops.conv2d_forward(x, w, b, *geometry, "cpu").shape)
    g = g.astype(np.float32)

    def with_lanes(lanes, fn):
        def run():
            saved, _config.CONV_LANES = _config.CONV_LANES, lanes
            try:
                return fn()
            finally:
                _config.CONV_LANES = saved
        return run

    fwd = lambda: _ops.conv2d_forward(x, w, b, *geometry, "cpu", relu=True, keep_z=False)[1]  # noqa: E731
    vjp = lambda: _ops.conv2d_vjp(g, w, x.shape, *geometry, "cpu")  # noqa: E731
    on = _config.CONV_LANES
    smoke = bool(request.config.getoption("benchmark_disable", False))
    rounds = 1 if smoke else 20
    ratios = {}
    for key, fn in (("gemm_over_lanes", fwd), ("vjp_gemm_over_lanes", vjp)):
        lanes, gemm = with_lanes(on, fn), with_lanes(0, fn)
        np.testing.assert_allclose(lanes(), gemm(), rtol=1e-4, atol=1e-4 * float(np.abs(gemm()).max()))
        t_lanes, t_gemm = _alternating_medians((lanes, gemm), rounds)
        ratios[key] = t_gemm / t_lanes
    benchmark.pedantic(with_lanes(on, fwd), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(ratios)
