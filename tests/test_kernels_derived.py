"""The cache of arrays derived from weights (relprop.kernels.cpu._derived): the CPU convolutions' arrangements
of their weights are kept between calls, checked bit for bit against a copy of the weights on every hit, and
derived afresh when the weights changed in place (the convolution follows them)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relprop._config as config
import relprop.kernels as K
from helpers import assert_close
from relprop.kernels.cpu import _chunks, _derived, conv2d as cpu_conv


@pytest.fixture
def fresh_cache():
    """An empty cache of the default size, for this test alone; neither Winograd nor lanes (the row-shift
    paths run); every weight array's arrangements kept, however small."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_derived, "_CACHE", type(_derived._CACHE)())
        mp.setattr(config, "WINOGRAD", False)
        mp.setattr(config, "CONV_LANES", 0)
        mp.setattr(config, "CONV_TAPS_CACHE_MIN_BYTES", 1)
        mp.setattr(config, "RULE_WEIGHTS_KEPT_MIN_BYTES", 0)
        yield _derived._CACHE


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), dtype=st.sampled_from([np.float32, np.float64]), at=st.integers(0, 10 ** 6),
       data=st.data())
def test_same_bits_sees_any_changed_element(n, dtype, at, data):
    """Every element, at every offset of a block and of a word (odd sizes: byte words), and the bits, not the
    values: -0.0 against 0.0 and one NaN against another differ; a NaN against its own bits does not."""
    a = np.arange(n, dtype=dtype) - n / 3
    assert _derived._same_bits(a, a.copy())
    if n == 0:
        return
    i = at % n
    for new in (a[i] + 1, np.nan, -0.0 if a[i] == 0 else a[i] * 1.0000001 + 1e-30):
        b = a.copy()
        b[i] = new
        assert _derived._same_bits(b, a) == bool(np.array_equal(b.view(np.uint8), a.view(np.uint8)))
    c, d = a.copy(), a.copy()
    c[i], d[i] = 0.0, -0.0
    assert not _derived._same_bits(c, d)
    c[i] = np.nan
    assert _derived._same_bits(c, c.copy())
    big = np.zeros(4096 * 3 + 5, dtype)  # past the first block
    big2 = big.copy()
    big2[data.draw(st.integers(0, big.size - 1))] = 1
    assert not _derived._same_bits(big2, big) and _derived._same_bits(big, big.copy())


def test_same_bits_of_a_strided_array():
    a = np.arange(24.0).reshape(4, 6)[:, ::2]
    assert _derived._same_bits(a, np.ascontiguousarray(a))
    b = np.ascontiguousarray(a)
    b[1, 1] += 1
    assert not _derived._same_bits(a, b)


@pytest.mark.parametrize("kind", ["forward", "vjp", "vjp_shift_out", "vjp_bands", "flipped", "im2col_vjp"])
def test_taps_are_kept_and_rederived_when_the_weights_change(kind, fresh_cache, rng):
    w = rng.standard_normal((6, 5, 3, 2)).astype(np.float32)
    t = cpu_conv._taps(w, kind)
    np.testing.assert_array_equal(t, cpu_conv._arrange(w, kind))
    assert cpu_conv._taps(w, kind) is t  # kept
    w[3, 1, 2, 0] = -w[3, 1, 2, 0] + 1  # in place
    t2 = cpu_conv._taps(w, kind)
    assert t2 is not t
    np.testing.assert_array_equal(t2, cpu_conv._arrange(w, kind))


def test_kinds_share_one_copy_and_small_weights_are_not_kept(fresh_cache, rng):
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    cpu_conv._taps(w, "forward"), cpu_conv._taps(w, "vjp")
    copies = {id(e[1]) for e in fresh_cache.values()}
    assert len(fresh_cache) == 2 and len(copies) == 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "CONV_TAPS_CACHE_MIN_BYTES", w.nbytes + 1)
        v = rng.standard_normal(w.shape).astype(np.float32)
        assert cpu_conv._taps(v, "forward") is not cpu_conv._taps(v, "forward")
    assert len(fresh_cache) == 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "WINOGRAD_CACHE_BYTES", 0)  # no cache at all
        assert cpu_conv._taps(w, "vjp_bands") is not cpu_conv._taps(w, "vjp_bands")
    one = rng.standard_normal((8, 4, 1, 1)).astype(np.float32)  # 1x1: the forward's order is a view of w
    assert np.shares_memory(cpu_conv._taps(one, "forward"), one) and len(fresh_cache) == 2
    del w
    assert len(fresh_cache) == 0  # gone with the weights


@pytest.mark.parametrize("shape", [(1, 8, 7, 6), (3, 5, 9, 9)])  # the row-shift paths; K > C shifts on the way out
@pytest.mark.parametrize("k", [4, 12])
def test_convolutions_follow_weights_changed_in_place(shape, k, fresh_cache, rng):
    """Forward, input-VJP and the LRP backward through the cached arrangements, before and after the weights
    change in place, against the reference kernels."""
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((k, shape[1], 3, 3)).astype(np.float32)
    for step in range(2):
        z = K.conv2d_forward(x, w, None, 1, 1, 1, backend="cpu")
        g = rng.standard_normal(z.shape).astype(np.float32)
        gx = K.conv2d_vjp(g, w, x.shape, 1, 1, 1, backend="cpu")
        assert_close(z, K.conv2d_forward(x, w, None, 1, 1, 1, backend="reference"), reduction_len=9 * shape[1])
        assert_close(gx, K.conv2d_vjp(g, w, x.shape, 1, 1, 1, backend="reference"), reduction_len=9 * k)
        assert len(fresh_cache) >= 2  # the forward's and the VJP's arrangements were kept
        made = []
        with pytest.MonkeyPatch.context() as mp:
            arrange = cpu_conv._arrange
            mp.setattr(cpu_conv, "_arrange", lambda w_, kind: made.append(kind) or arrange(w_, kind))
            K.conv2d_forward(x, w, None, 1, 1, 1, backend="cpu"), K.conv2d_vjp(g, w, x.shape, 1, 1, 1, backend="cpu")
        assert made == []  # the same weights again: nothing arranged afresh
        w *= -1.5  # in place, for the second round


def test_one_call_checks_each_weight_array_once(fresh_cache, rng, monkeypatch):
    """Inside one_call, a weight array found unchanged is not compared again (another kind, a second lookup);
    outside it, and in the next block, every hit is compared; a nested block leaves the outer one's record."""
    checks = []
    real = _derived._same_bits
    monkeypatch.setattr(_derived, "_same_bits", lambda a, b: checks.append(1) or real(a, b))
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    for kind in ("forward", "vjp"):
        cpu_conv._taps(w, kind)  # kept (the second kind shares the first one's copy: compared once)
    checks.clear()
    for kind in ("forward", "vjp", "forward"):
        cpu_conv._taps(w, kind)
    assert len(checks) == 3  # outside a block: every hit
    for _ in range(2):  # each block compares once
        checks.clear()
        with _derived.one_call():
            cpu_conv._taps(w, "forward")
            with _derived.one_call():
                cpu_conv._taps(w, "vjp")
            cpu_conv._taps(w, "vjp")
            cpu_conv._taps(w, "forward")
        assert len(checks) == 1
    w[0, 0, 0, 0] += 1  # changed between blocks: the next block sees it
    with _derived.one_call():
        got = cpu_conv._taps(w, "forward")
    np.testing.assert_array_equal(got, cpu_conv._arrange(w, "forward"))


def test_an_explanation_checks_each_weight_array_once(fresh_cache, monkeypatch):
    """relprop.Explainer opens one_call: a gradient through a conv net compares each convolution's weights once,
    though it looks up two arrangements of them (the forward's and the input-VJP's)."""
    import relprop

    rng = np.random.default_rng(0)
    spec = [{"type": "conv2d", "in": 8, "out": 16, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "conv2d", "in": 16, "out": 12, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "flatten"}, {"type": "linear", "in": 12 * 6 * 6, "out": 3}]
    shapes = {"0.weight": (16, 8, 3, 3), "0.bias": (16,), "2.weight": (12, 16, 3, 3), "2.bias": (12,),
              "5.weight": (3, 12 * 6 * 6), "5.bias": (3,)}
    net = relprop.from_spec(spec, {k: rng.standard_normal(v).astype(np.float32) * 0.1 for k, v in shapes.items()})
    x = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
    explainer = relprop.Explainer(net, "gradient")
    first = explainer(x, 1)  # arranges and keeps
    checks = []
    real = _derived._same_bits
    monkeypatch.setattr(_derived, "_same_bits", lambda a, b: checks.append(1) or real(a, b))
    again = explainer(x, 1)
    assert len(checks) == 2  # two convolutions, each compared once
    np.testing.assert_array_equal(again, first)


needs_threads = pytest.mark.skipif(_chunks._BLAS_THREADS is None,
                                   reason="one thread only: NumPy's BLAS thread count cannot be set")


def _small_conv_net(rng):
    import relprop

    spec = [{"type": "conv2d", "in": 8, "out": 16, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "conv2d", "in": 16, "out": 12, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "flatten"}, {"type": "linear", "in": 12 * 6 * 6, "out": 3}]
    shapes = {"0.weight": (16, 8, 3, 3), "0.bias": (16,), "2.weight": (12, 16, 3, 3), "2.bias": (12,),
              "5.weight": (3, 12 * 6 * 6), "5.bias": (3,)}
    return relprop.from_spec(spec, {k: rng.standard_normal(v).astype(np.float32) * 0.1 for k, v in shapes.items()})


def _checks_by_thread(monkeypatch):
    """Patch _same_bits to record (thread, weight id) per comparison."""
    import threading

    seen = []
    real = _derived._same_bits
    monkeypatch.setattr(_derived, "_same_bits", lambda a, b: seen.append((threading.get_ident(), id(a))) or real(a, b))
    return seen


@needs_threads
def test_a_nets_weights_are_checked_ahead_on_another_thread(fresh_cache, monkeypatch):
    """From a net's second forward on, the weights its previous forward looked up are compared on the checker
    thread, in the order they were looked up, and the calling thread compares none; weights changed in place
    between forwards get the verdict "changed": the forward follows them (the reference's values)."""
    import threading

    monkeypatch.setattr(config, "CONV_THREADS", 2)
    rng = np.random.default_rng(1)
    net = _small_conv_net(rng)
    x = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
    first = net.forward(x)  # arranges and keeps; records the order
    seen = _checks_by_thread(monkeypatch)
    ws = [net.layers[0].weight, net.layers[2].weight]
    for _ in range(3):
        seen.clear()
        np.testing.assert_array_equal(net.forward(x), first)
        assert [wid for _, wid in seen] == [id(w) for w in ws]  # each once, in the forward's order
        assert threading.get_ident() not in {t for t, _ in seen}
    ws[1] *= -1  # in place
    seen.clear()
    changed = net.forward(x)
    assert threading.get_ident() not in {t for t, _ in seen[:2]}  # the verdicts came from the checker
    assert_close(changed, net.forward(x, backend="reference"), reduction_len=16 * 9)
    assert not np.allclose(changed, first)


@pytest.mark.parametrize("why", ["one thread", "switched off", "large batch", "no owner"])
def test_weights_are_checked_here_without_checks_ahead(fresh_cache, monkeypatch, why):
    import threading

    monkeypatch.setattr(config, "CONV_THREADS", 1 if why == "one thread" else 2)
    monkeypatch.setattr(config, "WEIGHT_CHECKS_AHEAD", why != "switched off")
    monkeypatch.setattr(config, "WEIGHT_CHECKS_AHEAD_MAX_SAMPLES", 1 if why == "large batch" else 16)
    rng = np.random.default_rng(2)
    net = _small_conv_net(rng)
    x = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
    run = (lambda: net.trace(x, keep=False).output) if why == "no owner" else (lambda: net.forward(x))
    run()
    seen = _checks_by_thread(monkeypatch)
    run()
    assert len(seen) == 2 and {t for t, _ in seen} == {threading.get_ident()}


def test_a_failed_checker_leaves_the_checks_to_the_caller(fresh_cache, monkeypatch):
    """If the checker thread fails, each lookup compares its weights on the calling thread: still exact."""
    monkeypatch.setattr(config, "CONV_THREADS", 2)
    rng = np.random.default_rng(3)
    net = _small_conv_net(rng)
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    first = net.forward(x)

    def broken(self):
        raise RuntimeError("checker down")

    monkeypatch.setattr(_derived._Ahead, "_run", broken)
    np.testing.assert_array_equal(net.forward(x), first)
    net.layers[0].weight[0, 0, 0, 0] += 1.0
    assert_close(net.forward(x), net.forward(x, backend="reference"), reduction_len=16 * 9)


def test_a_checker_failing_after_the_block_is_not_the_callers_error(fresh_cache, monkeypatch):
    """The block waits for its checker at the end; a checker that fails then (the lookups having compared on
    the calling thread) does not fail the caller's forward."""
    import threading

    monkeypatch.setattr(config, "CONV_THREADS", 2)
    rng = np.random.default_rng(3)
    net = _small_conv_net(rng)
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    first = net.forward(x)  # records the weights the next block checks ahead
    release = threading.Event()

    def late(self):
        release.wait(5)
        raise RuntimeError("checker down")

    monkeypatch.setattr(_derived._Ahead, "_run", late)
    monkeypatch.setattr(_derived._Ahead, "verdict", lambda self, w, copy: None)  # never waits for the checker
    timer = threading.Timer(0.05, release.set)
    timer.start()
    np.testing.assert_array_equal(net.forward(x), first)
    timer.join()

@needs_threads
def test_an_explainer_checks_ahead_too(fresh_cache, monkeypatch):
    """An Explainer is an owner of its own: its second call's checks (the forward's and the VJP's weights, and
    the z+ rules' modified weights) run on the checker thread, each weight array once."""
    import threading

    import relprop

    monkeypatch.setattr(config, "CONV_THREADS", 2)
    rng = np.random.default_rng(4)
    net = _small_conv_net(rng)
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    for method in ("gradient", "lrp.epsilon_plus_flat"):
        explainer = relprop.Explainer(net, method)
        first = explainer(x, 1)
        seen = _checks_by_thread(monkeypatch)
        np.testing.assert_array_equal(explainer(x, 1), first)
        assert seen and threading.get_ident() not in {t for t, _ in seen}
        assert len({wid for _, wid in seen}) == len(seen)
        monkeypatch.undo()
        monkeypatch.setattr(config, "CONV_THREADS", 2)


def test_new_explainers_get_the_same_modified_weights_until_the_weights_change(fresh_cache):
    """A rule's modified weights (z⁺'s W⁺; a dense layer's up to a bound) are kept beside the layer's weight
    arrangements: a second, new explainer (each call of relprop.explain) gets the same array, so the kernels'
    transforms of it are reused; weights changed in place give a new one, and the explanation follows them."""
    import relprop
    from relprop.rules import Gamma, ZPlus
    from relprop.rules.core import _params

    rng = np.random.default_rng(3)
    net = _small_conv_net(rng)
    conv, x = net.layers[2], rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
    first = _params(ZPlus(), conv, x, {})[0][0][0]
    assert _params(ZPlus(), conv, x, {})[0][0][0] is first  # an equal rule, a new state: the same W⁺
    np.testing.assert_array_equal(first, np.maximum(conv.weight, 0))
    assert _params(Gamma(0.25), conv, x, {})[0][0][0] is not first  # another rule: its own weights
    dense, xd = net.layers[5], x.reshape(2, -1)[:, :432]
    kept = _params(ZPlus(), dense, xd, {})[0][0][0]
    assert _params(ZPlus(), dense, xd, {})[0][0][0] is kept  # a small dense layer's too
    np.testing.assert_array_equal(kept, np.maximum(dense.weight, 0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "RULE_WEIGHTS_KEPT_MAX_BYTES", dense.weight.nbytes - 1)  # a large one's made afresh
        again = _params(ZPlus(), dense, xd, {})[0][0][0]
        assert again is not kept and _params(ZPlus(), dense, xd, {})[0][0][0] is not again
        np.testing.assert_array_equal(again, kept)

    before = relprop.explain(net, x, "lrp.zplus", target=1)
    conv.weight[...] = -conv.weight  # changed in place: no set_params, the same array
    changed = _params(ZPlus(), conv, x, {})[0][0][0]
    assert changed is not first
    np.testing.assert_array_equal(changed, np.maximum(conv.weight, 0))
    rebuilt = relprop.from_spec(net.spec(), {k: np.array(v) for k, v in net.state_dict().items()})
    after = relprop.explain(net, x, "lrp.zplus", target=1)
    np.testing.assert_array_equal(after, relprop.explain(rebuilt, x, "lrp.zplus", target=1))
    assert not np.array_equal(after, before)


def test_arrays_made_here_are_neither_checked_nor_copied(fresh_cache, monkeypatch):
    """A rule's modified weights (z⁺'s W⁺) are made by the cache from the layer's weights: their own arrangements
    (the taps of W⁺) are looked up without comparing W⁺ to a copy (it is current whenever w is, and w is
    compared), and no copy of W⁺ is kept; the layers' own weights are still compared, so a change in place is
    still followed through W⁺ to its arrangements."""
    import relprop
    from relprop.rules import ZPlus
    from relprop.rules.core import _params

    rng = np.random.default_rng(5)
    net = _small_conv_net(rng)
    x = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
    explainer = relprop.Explainer(net, "lrp.zplus")
    first = explainer(x, 1)
    plus = [_params(ZPlus(), net.layers[i], x, {})[0][0][0] for i in (0, 2)]
    entries = [e for e in fresh_cache.values() if any(e[0]() is p for p in plus)]
    assert entries and all(e[1] is None for e in entries)  # W⁺'s arrangements: no copy of W⁺ kept
    seen = _checks_by_thread(monkeypatch)
    again = explainer(x, 1)
    checked = {i for _, i in seen}
    weights = {id(layer.weight) for layer in net.layers if getattr(layer, "weight", None) is not None}
    assert checked and checked <= weights  # the layers' w compared (the small dense layer's too), W⁺ never
    assert {id(net.layers[i].weight) for i in (0, 2)} <= checked
    np.testing.assert_array_equal(again, first)
    net.layers[2].weight[...] *= -1  # in place: a new W⁺, and its taps made afresh
    changed = _params(ZPlus(), net.layers[2], x, {})[0][0][0]
    assert changed is not plus[1]
    np.testing.assert_array_equal(changed, np.maximum(net.layers[2].weight, 0))
    rebuilt = relprop.from_spec(net.spec(), {k: np.array(v) for k, v in net.state_dict().items()})
    np.testing.assert_array_equal(relprop.explain(net, x, "lrp.zplus", target=1),
                                  relprop.explain(rebuilt, x, "lrp.zplus", target=1))


def test_an_entry_goes_with_its_weights_and_a_collection_mid_lookup_is_harmless(fresh_cache):
    """Weights collected: their entries go, at once, or, if the lock is held (as every loop over the cache holds
    it: the weak reference's callback may run inside one, from the garbage collector, and once broke it with
    "OrderedDict mutated during iteration"), at the next lookup.  An array made here is kept by no entry of its
    own, so a rule's W⁺ and its arrangements go once the weights it came from change."""
    import gc

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    plus = _derived.derived(w, ("test", "plus"), lambda: np.maximum(w, 0))
    _derived.derived(plus, ("test", "taps"), lambda: plus.copy())  # an arrangement of an array made here
    assert len(fresh_cache) == 2 and all(e[1] is None for k, e in fresh_cache.items() if k[0] == id(plus))
    doomed = rng.standard_normal(9).astype(np.float32)
    _derived.derived(doomed, ("test", "doomed"), lambda: doomed * 2)
    key = (id(doomed), ("test", "doomed"))
    with _derived._LOCK:  # as a loop over the cache holds it: the callback only queues the key
        del doomed
        assert key in fresh_cache
    _derived.derived(w, ("test", "plus"), lambda: np.maximum(w, 0))  # the next lookup drops it
    assert key not in fresh_cache
    short = rng.standard_normal(9).astype(np.float32)
    _derived.derived(short, ("test", "short"), lambda: short * 2)
    del short  # the lock free: gone at once
    assert {k[0] for k in fresh_cache} == {id(w), id(plus)}
    del plus
    w[...] = -w  # changed: a new W⁺; the old one and its arrangement go
    new_plus = _derived.derived(w, ("test", "plus"), lambda: np.maximum(w, 0))
    gc.collect()
    assert {k[0] for k in fresh_cache} == {id(w)} and new_plus is fresh_cache[(id(w), ("test", "plus"))][2]
