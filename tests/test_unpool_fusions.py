"""The max-pool fusions of whole backward sweeps, against the unfused kernels and the NumPy reference.

Below a conv, ReLU, 2x2 stride-2 max-pool triple only the pool's switches carry a signal, so

* an LRP rule's modified forward z' = W'a + b' is recorded at the switches only
  (``gather_at_switches``; on the CPU Winograd path in the output transform), and its stabilised
  divide is taken on the pooled side (``DivideBeforeUnpool``);
* the conv's transposed pass reads the signal still pooled and unpools it as it goes
  (``conv2d_unpool_vjp``; on the CPU Winograd path in the input transform), for LRP
  (``DividedAbove``) and for the gradient-type sweeps (``GateBeforeUnpool(unpooled=True)``,
  ``VjpOfUnpooled``);
* the flat rule's kernel unpools the relevance as it sums it over the channels
  (``conv2d_flat_relevance``, ``FlatBelowPool``).

Every fused path must give the unfused kernels' bits, and the sweeps the plain rules' bits.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import relprop
import relprop._config as config
import relprop.kernels as K
from relprop.kernels import _ops
from relprop.kernels.cpu import conv2d as cpu_conv
from relprop.kernels.cpu import winograd as wg
from relprop.kernels.reference import pool2d as ref_pool
from relprop.kernels.cpu import pool2d as cpu_pool
from relprop.rules.core import DividedAbove, DivideBeforeUnpool, FlatBelowPool, UnpoolBelow
from relprop.rules.signal import VjpOfUnpooled
from helpers import assert_close, conv_inputs
from nets_factory import make_net

PATHS = ["winograd", "lanes", "unfused"]


def use_path(mp, path, chunk_tiles=512):
    """Send every 3x3 stride-1 convolution down ``path`` of the CPU kernels."""
    mp.setattr(config, "WINOGRAD", path == "winograd")
    mp.setattr(config, "WINOGRAD_MIN_CHANNELS", 1)
    mp.setattr(config, "WINOGRAD_MIN_WORK", 1)
    mp.setattr(config, "WINOGRAD_CHUNK_TILES", chunk_tiles)
    mp.setattr(config, "WINOGRAD_CHUNK_TILES_WIDE", chunk_tiles)
    mp.setattr(config, "WINOGRAD_FEW_TILES_MIN_MACS", 0)  # a small problem's threads share the phases
    mp.setattr(config, "WINOGRAD_THREADS_MIN_MACS", 0)  # ... and its chunks
    if path == "unfused":
        mp.setattr(config, "CONV_LANES", 0)


def gather(z, switches):
    return np.take_along_axis(z.reshape(z.shape[:2] + (-1,)), switches.reshape(switches.shape[:2] + (-1,)),
                              axis=2).reshape(switches.shape)


# ---------------------------------------------------------------------------------------------- kernels
@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(3, 11), w=st.integers(3, 11),
       kernel=st.sampled_from([2, 3]), seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]))
def test_gather_at_switches_matches_reference(n, c, h, w, kernel, seed, dtype):
    """Another map's values where a max-pool's windows chose (odd sizes, overlapping 3x3 windows), the CPU
    kernel (parallel and serial twins) against the reference, which is a plain take_along_axis."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, (n, c, h, w)).astype(dtype)  # ties
    _, sw = K.maxpool2d_forward(x, kernel, 2, backend="reference")
    z = rng.standard_normal(x.shape).astype(dtype)
    want = ref_pool.gather_at_switches(z, sw, np.empty(sw.shape, dtype))
    np.testing.assert_array_equal(want, gather(z, sw))
    for twin in (cpu_pool.gather_at_switches.parallel, cpu_pool.gather_at_switches.serial):
        np.testing.assert_array_equal(twin(z, sw, np.empty(sw.shape, dtype)), want)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads, chunk_tiles", [(1, 2), (2, 2), (2, 512)])
@given(n=st.integers(1, 3), c=st.integers(1, 5), k=st.sampled_from([1, 6, 17]), h=st.integers(2, 13),
       w=st.integers(2, 13), padding=st.integers(0, 2), ties=st.booleans(), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_triple_records_also_at_the_switches(path, threads, chunk_tiles, n, c, k, h, w, padding, ties, seed, dtype):
    """conv2d_relu_maxpool2x2(..., at_switches=True): the maxima and switches of the plain call, and z' at the
    switches equal to the whole z' gathered there, to the bit, on each CPU path (Winograd: in the output
    transform, both schedules; lanes: from the lanes at the switches; unfused: gathered) and the reference's."""
    rng = np.random.default_rng(seed)
    h, w = max(h, 4 - 2 * padding), max(w, 4 - 2 * padding)  # at least a 2x2 output
    x, wt, b = conv_inputs(rng, (n, c, h, w), (k, c, 3, 3), ties, dtype)
    also = [(np.maximum(wt, 0), np.maximum(b, 0)), (wt * 0.5, None)]
    geometry = ((1, 1), (padding, padding), (1, 1))
    with pytest.MonkeyPatch.context() as mp:
        use_path(mp, path, chunk_tiles)
        mp.setattr(config, "CONV_THREADS", threads)
        written, from_lanes = [], []
        real = wg._output_transform_at_switches
        mp.setattr(wg, "_output_transform_at_switches", lambda *a: written.append(1) or real(*a))
        real_lanes = cpu_conv._from_lanes_at_switches
        mp.setattr(cpu_conv, "_from_lanes_at_switches", lambda *a: from_lanes.append(1) or real_lanes(*a))
        y, sw, at = _ops.conv2d_relu_maxpool2x2(x, wt, b, *geometry, "cpu", switches=True, also=also, at_switches=True)
        y2, sw2, whole = _ops.conv2d_relu_maxpool2x2(x, wt, b, *geometry, "cpu", switches=True, also=also)
        lanes = path == "lanes" and cpu_conv._lanes_path((1, 1), c, k)  # (17 channels are too many for lanes)
    assert bool(written) == (path == "winograd") and bool(from_lanes) == lanes
    assert y.tobytes() == y2.tobytes() and sw.tobytes() == sw2.tobytes()
    for a, z in zip(at, whole):
        assert a.shape == y.shape and a.dtype == dtype
        assert a.tobytes() == gather(z, sw).tobytes()
    for a, (w2, b2) in zip(at, also):  # the reference's z' at these switches (ties may fall apart in Winograd's
        ref = _ops.conv2d_forward(x, w2, b2, *geometry, "reference")  # rounding: its own switches can differ)
        assert_close(a, gather(ref, sw), reduction_len=c * 9)
    _, rsw, rat = _ops.conv2d_relu_maxpool2x2(x, wt, b, *geometry, "reference", switches=True, also=also,
                                              at_switches=True)
    for r, (w2, b2) in zip(rat, also):
        assert r.tobytes() == gather(_ops.conv2d_forward(x, w2, b2, *geometry, "reference"), rsw).tobytes()


@pytest.mark.parametrize("path", ["winograd", "lanes"])
@pytest.mark.parametrize("threads", [1, 2])
def test_also_at_the_switches_after_the_nan_fallback(threads, path, rng):
    """A pooled window holding an infinity: the Winograd or lanes write-out gives up and the triple runs unfused;
    z' at the switches is then gathered at the unfused pool's switches, not at the abandoned ones."""
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    x[1, 2, 4, 4] = np.inf
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    also = [(np.abs(w), np.abs(b))]
    with pytest.MonkeyPatch.context() as mp:
        use_path(mp, path)
        mp.setattr(config, "CONV_THREADS", threads)
        y, sw, (at,) = _ops.conv2d_relu_maxpool2x2(x, w, b, (1, 1), (1, 1), (1, 1), "cpu", switches=True, also=also,
                                                   at_switches=True)
        z = K.conv2d_forward(x, w, b, 1, 1, backend="cpu", check_finite=False)
        zp = K.conv2d_forward(x, also[0][0], also[0][1], 1, 1, backend="cpu", check_finite=False)
    want_y, want_sw = K.maxpool2d_forward(np.maximum(z, 0), 2, backend="cpu", check_finite=False)
    assert not np.isfinite(want_y).all()
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(sw, want_sw)
    np.testing.assert_array_equal(at, gather(zp, want_sw))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads, chunk_tiles", [(1, 2), (2, 2), (2, 512)])
@given(n=st.integers(1, 3), c=st.integers(1, 5), k=st.sampled_from([1, 6, 17]), h=st.integers(2, 13),
       w=st.integers(2, 13), padding=st.integers(0, 2), times=st.booleans(), ties=st.booleans(),
       seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]))
def test_conv2d_unpool_vjp_equals_unpool_then_vjp(path, threads, chunk_tiles, n, c, k, h, w, padding, times, ties,
                                                  seed, dtype):
    """Wᵀ unpool(g) (⊙ a): on the Winograd path unpooled in the input transform (both schedules; odd sizes,
    whose last row or column no window covers), elsewhere unpooled first: the unpooling and the VJP (and the
    product) one after the other to the bit, and the reference's values."""
    rng = np.random.default_rng(seed)
    h, w = max(h, 4 - 2 * padding), max(w, 4 - 2 * padding)
    x, wt, b = conv_inputs(rng, (n, c, h, w), (k, c, 3, 3), ties, dtype)
    geometry = ((1, 1), (padding, padding), (1, 1))
    y, sw, _ = _ops.conv2d_relu_maxpool2x2(x, wt, b, *geometry, "reference", switches=True)
    g = rng.standard_normal(y.shape).astype(dtype)
    a = np.maximum(x, 0) if times else None
    full = _ops.conv2d_output_shape(x.shape, wt.shape, *geometry)
    with pytest.MonkeyPatch.context() as mp:
        use_path(mp, path, chunk_tiles)
        mp.setattr(config, "CONV_THREADS", threads)
        unpooled = []
        real = wg.conv3x3_winograd
        mp.setattr(cpu_conv, "conv3x3_winograd",
                   lambda *args, **kw: unpooled.append(kw.get("unpool") is not None) or real(*args, **kw))
        got = _ops.conv2d_unpool_vjp(g, sw, wt, a, x.shape, *geometry, "cpu")
        assert any(unpooled) == (path == "winograd")
        want = _ops.conv2d_vjp(_ops.maxunpool2d(g, sw, full, "cpu"), wt, x.shape, *geometry, "cpu")
        if times:
            want = want * a
    assert got.dtype == dtype and got.tobytes() == want.tobytes()
    assert_close(got, _ops.conv2d_unpool_vjp(g, sw, wt, a, x.shape, *geometry, "reference"), reduction_len=k * 9)


# ---------------------------------------------------------------------------------------------- sweeps
def _triples_net(dtype, c=2, h=13, w=11):
    """Two conv, ReLU, 2x2 max-pool triples (odd sizes: each pool drops a row or a column), a conv not
    followed by a pool, and a dense head."""
    spec = [{"type": "conv2d", "in": c, "out": 5, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "maxpool2d", "kernel": 2},
            {"type": "conv2d", "in": 5, "out": 6, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "maxpool2d", "kernel": 2},
            {"type": "conv2d", "in": 6, "out": 4, "kernel": 3, "padding": 1}, {"type": "relu"}, {"type": "flatten"}]
    flat = make_net(spec, dtype=dtype).shapes((1, c, h, w))[-1][1]
    return make_net(spec + [{"type": "linear", "in": flat, "out": 3}], dtype=dtype)


@pytest.mark.parametrize("threads", [1, 2])
@given(n=st.integers(1, 3), c=st.integers(1, 4), k=st.integers(1, 5),
       kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       padding=st.tuples(st.integers(0, 2), st.integers(0, 2)), h=st.integers(1, 13), w=st.integers(1, 13),
       pooled=st.booleans(), seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]))
def test_conv2d_flat_relevance_matches_reference(threads, n, c, k, kernel, stride, dilation, padding, h, w, pooled,
                                                 seed, dtype):
    """The flat rule's backward (Σ over the channels, unpooling as it reads where pooled, the transposed all-ones
    convolution, a copy per input channel): the CPU kernel against the reference, on any geometry (batch 1, odd
    sizes, strides, dilations, padding; ties in the pools), on one thread and shared out (the same bits)."""
    rng = np.random.default_rng(seed)
    (kh, kw), (dh, dw) = kernel, dilation
    h, w = max(h, (kh - 1) * dh + 1 - 2 * padding[0]), max(w, (kw - 1) * dw + 1 - 2 * padding[1])
    ho, wo = (_ops.conv2d_output_shape((n, c, h, w), (k, c, kh, kw), stride, padding, dilation))[2:]
    inv = rng.random((ho, wo)).astype(dtype)
    switches = None
    r = rng.integers(-2, 3, size=(n, k, ho, wo)).astype(dtype)  # ties and zeros
    if pooled and ho >= 2 and wo >= 2:
        y, switches = K.maxpool2d_forward(r, 2, backend="reference")
        r = rng.standard_normal(y.shape).astype(dtype)
    args = (r, switches, inv, kernel, stride, padding, dilation, (n, c, h, w))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_THREADS", threads)
        mp.setattr(config, "FLAT_THREADS_MIN_ELEMENTS", 0)
        got = _ops.conv2d_flat_relevance(*args, "cpu")
        mp.setattr(config, "FLAT_THREADS_MIN_ELEMENTS", 1 << 40)
        assert got.dtype == dtype and got.tobytes() == _ops.conv2d_flat_relevance(*args, "cpu").tobytes()
    want = _ops.conv2d_flat_relevance(*args, "reference")
    assert_close(got, want, reduction_len=k * kh * kw)
    np.testing.assert_array_equal(got, got[:, :1].repeat(c, axis=1))  # the same for every input channel


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_flat_below_a_pool_unpools_in_its_kernel(backend, monkeypatch):
    """ε+flat's first conv heads a conv, ReLU, max-pool triple: its whole sweep hands the relevance down pooled
    (UnpoolBelow) to the flat rule's kernel (FlatBelowPool): no unpooling pass, and the plain rules' bits, also
    with the unpooling switched back on, per layer and from a start inside the triple.  The flat rule's promise
    holds: all relevance reaching the first layer is passed on (no bias, every input counted)."""
    net = _triples_net(np.float64)
    x = np.random.default_rng(8).standard_normal((3, 2, 13, 11))
    explainer = _explainer(net, "lrp.epsilon_plus_flat", backend)
    rules = explainer._method.whole_rules
    assert isinstance(rules[0], FlatBelowPool) and isinstance(rules[2], UnpoolBelow)
    unpooled = []
    real = _ops.maxunpool2d
    monkeypatch.setattr(_ops, "maxunpool2d", lambda *a: unpooled.append(a[0].shape) or real(*a))
    got = explainer(x)
    assert unpooled == []  # neither pool's relevance written whole (the second's: DividedAbove)
    per_layer = explainer(x, return_layers=True)[1]  # (unpooled by the pools' rules)
    assert per_layer[0].tobytes() == got.tobytes()
    np.testing.assert_allclose(got.sum(axis=(1, 2, 3)), per_layer[1].sum(axis=(1, 2, 3)), rtol=1e-6)  # stab(n_j)
    monkeypatch.setattr(config, "UNPOOL_IN_VJP", False)
    assert explainer(x).tobytes() == got.tobytes()
    monkeypatch.setattr(config, "UNPOOL_IN_VJP", True)
    monkeypatch.setattr(config, "LRP_FLAT_BELOW_POOL", False)
    plain = _explainer(net, "lrp.epsilon_plus_flat", backend)
    assert not any(isinstance(r, FlatBelowPool) for r in plain._method.whole_rules or [])
    assert plain(x).tobytes() == got.tobytes()
    unit = relprop.Unit(layer=1, channel=2, position=(4, 3))
    assert explainer(x, unit).tobytes() == plain(x, unit).tobytes()


#: the convs whose triple each method's whole sweep fuses: not the first (its input, x, is not known to be
#: >= 0, so its z⁺ has an a⁻ term), none under γ or αβ (two groups, γ's masked by the sign of z)
LRP_FUSED = {"lrp.zplus": [3], "dtd.zplus": [3], "lrp.epsilon_plus_flat": [3], "lrp.gamma": [], "lrp.alpha_beta": []}


def _explainer(net, method, backend):
    return relprop.Explainer(net, method, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("method", list(LRP_FUSED))
@pytest.mark.parametrize("path", ["winograd", "lanes"])
def test_lrp_divides_above_the_unpooling(method, path, backend, monkeypatch):
    """z⁺ recorded at the switches, divided on the pooled side and unpooled in the conv's transposed pass:
    the plain rules' relevance to the bit (ties among zeros in the pools), with and without the unpooling in
    the VJP.  Rules it does not apply to (γ's and αβ's two groups, z⁺ on an input that may be negative) keep
    theirs."""
    dtype = np.float32
    net = _triples_net(dtype)
    x = np.random.default_rng(5).integers(-1, 2, size=(3, 2, 13, 11)).astype(dtype)
    use_path(monkeypatch, path)
    explainer = _explainer(net, method, backend)
    sweep = explainer._method
    divided = [i for i, r in enumerate(sweep.whole_rules or []) if isinstance(r, DividedAbove)]
    assert divided == LRP_FUSED[method]
    assert all(isinstance(sweep.whole_rules[i + 2], DivideBeforeUnpool) for i in divided)
    assert sweep._at_switches == frozenset(divided)
    unpooled = []
    real = _ops.conv2d_unpool_vjp
    monkeypatch.setattr(_ops, "conv2d_unpool_vjp", lambda *a: unpooled.append(a[0].shape) or real(*a))
    got = explainer(x)
    assert len(unpooled) == len(divided)
    monkeypatch.setattr(config, "UNPOOL_IN_VJP", False)  # divided above, unpooled whole
    assert explainer(x).tobytes() == got.tobytes()
    monkeypatch.setattr(config, "UNPOOL_IN_VJP", True)
    monkeypatch.setattr(config, "LRP_DIVIDE_BEFORE_UNPOOL", False)
    monkeypatch.setattr(config, "LRP_FLAT_BELOW_POOL", False)
    plain = _explainer(net, method, backend)
    assert plain._method.whole_rules is None
    want = plain(x)
    assert np.abs(want).max() > 0
    assert got.tobytes() == want.tobytes()
    # per-layer relevances and a start inside a triple run the plain rules
    assert explainer(x, return_layers=True)[0].tobytes() == want.tobytes()
    unit = relprop.Unit(layer=4, channel=1, position=(2, 3))
    assert explainer(x, unit).tobytes() == plain(x, unit).tobytes()


def test_lrp_division_above_a_trace_that_did_not_fuse(monkeypatch):
    """A sweep built with the rewrite, called while the trace does not fuse its triples (z' recorded whole):
    the division then runs below the unpooling, with the same bits."""
    net = _triples_net(np.float64)
    x = np.random.default_rng(6).standard_normal((2, 2, 13, 11))
    explainer = relprop.Explainer(net, "lrp.zplus", backend="cpu")
    got = explainer(x)
    monkeypatch.setattr(config, "TRACE_FUSED_POOLS", False)
    assert explainer(x).tobytes() == got.tobytes()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("method", ["gradient", "guided_backprop", "deconvnet", "gradient_x_input"])
def test_gradient_sweeps_unpool_in_the_conv_vjp(method, backend, monkeypatch):
    """The gated signal handed down still pooled and unpooled in the conv's transposed pass: the bits of the
    unpooling followed by the VJP, and of the plain rules."""
    dtype = np.float64
    net = _triples_net(dtype)
    x = np.random.default_rng(7).integers(-1, 2, size=(3, 2, 13, 11)).astype(dtype)
    use_path(monkeypatch, "winograd")
    explainer = relprop.Explainer(net, method, backend=backend)
    sweep = explainer._method
    assert [i for i, r in enumerate(sweep.whole_rules) if isinstance(r, VjpOfUnpooled)] == [0, 3]
    assert all(sweep.whole_rules[i + 2].unpooled for i in (0, 3))
    unpooled = []
    real = _ops.conv2d_unpool_vjp
    monkeypatch.setattr(_ops, "conv2d_unpool_vjp", lambda *a: unpooled.append(1) or real(*a))
    got = explainer(x)
    assert len(unpooled) == 2
    monkeypatch.setattr(config, "UNPOOL_IN_VJP", False)
    separate = relprop.Explainer(net, method, backend=backend)
    assert not any(isinstance(r, VjpOfUnpooled) for r in separate._method.whole_rules)
    want = separate(x)
    assert np.abs(want).max() > 0 and got.tobytes() == want.tobytes()
    separate._method.whole_rules = None  # the plain rules: the gate after the unpooling
    assert separate(x).tobytes() == want.tobytes()


def test_vjp_of_unpooled_passes_a_dense_signal_to_its_rule():
    """A conv rule that expects an unpooled signal and gets a dense one (a sweep started at the ReLU) runs
    the conv's own rule; :class:`Unpooled` reaches only the rules built for it."""
    net = _triples_net(np.float64)
    x = np.random.default_rng(8).standard_normal((2, 2, 13, 11))
    explainer = relprop.Explainer(net, "gradient", backend="cpu")
    unit = relprop.Unit(layer=1, channel=2, position=(3, 4))
    plain = relprop.Explainer(net, "gradient", backend="cpu")
    plain._method.whole_rules = None
    assert explainer(x, unit).tobytes() == plain(x, unit).tobytes()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_trace_records_also_at_the_switches(backend):
    """``Graph.trace(at_switches={i})``: layer i's ``also`` forward shaped like the pool's maxima, equal to the
    whole one (a trace without it) read at the switches; only where the triple is fused (``pooled``)."""
    net = _triples_net(np.float64)
    x = np.random.default_rng(9).standard_normal((2, 2, 13, 11))
    w, b = net.layers[3].params(x)
    also = {3: [(np.maximum(w, 0), np.maximum(b, 0))]}
    lean = net.trace(x, backend, preactivations=False, also=also, pooled={0, 3}, at_switches={3})
    whole = net.trace(x, backend, preactivations=False, also=also, pooled={0, 3})
    (z_s,), (z,) = lean.also[3], whole.also[3]
    assert z_s.shape == lean.outputs[5].shape and z.shape == lean.outputs[3 + 1].shape
    assert z_s.tobytes() == gather(z, lean.aux[5]).tobytes()
    unfused = net.trace(x, backend, preactivations=False, also=also, at_switches={3})  # not pooled: whole
    assert unfused.also[3][0].shape == z.shape
