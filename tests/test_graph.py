"""The layer graph: residual and branching nets, BatchNorm folding, the new layers, Unit targets,
and the one backward engine's promises on them (gradient = finite differences, conservation at
every add, concat and average pool)."""
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import relprop
from relprop import Unit
from relprop.nets import canonical

from nets_factory import concat_spec, graph_weights, residual_spec

F64 = np.float64


# -- an independent NumPy forward of a spec ----------------------------------------------------------------
def _conv(x, w, b, stride, padding):
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    win = sliding_window_view(x, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]  # (N, C, Ho, Wo, kh, kw)
    return np.einsum("nchwij,kcij->nkhw", win, w) + b[None, :, None, None]


def _maxpool(x, k, stride, padding):
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=-np.inf)
    return sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride].max(axis=(4, 5))


def _adaptive(x, out):
    h, w = x.shape[2:]
    y = np.empty(x.shape[:2] + (out, out))
    for i in range(out):
        for j in range(out):
            r0, r1 = (i * h) // out, -(-((i + 1) * h) // out)
            c0, c1 = (j * w) // out, -(-((j + 1) * w) // out)
            y[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return y


def numpy_forward(spec, weights, x):
    outs = []
    for i, e in enumerate(spec):
        ins = [x if p == "input" else outs[p] for p in e.get("inputs", ["input"] if i == 0 else [i - 1])]
        a, t = ins[0], e["type"]
        if t == "conv2d":
            y = _conv(a, weights[f"{i}.weight"], weights[f"{i}.bias"], e.get("stride", 1), e.get("padding", 0))
        elif t == "batchnorm2d":
            g, b, m, v = (weights[f"{i}.{k}"][None, :, None, None] for k in
                          ("weight", "bias", "running_mean", "running_var"))
            y = g * (a - m) / np.sqrt(v + 1e-5) + b
        elif t == "relu":
            y = np.maximum(a, 0)
        elif t == "add":
            y = sum(ins)
        elif t == "concat":
            y = np.concatenate(ins, axis=1)
        elif t == "maxpool2d":
            y = _maxpool(a, e["kernel"], e["stride"], e["padding"])
        elif t == "adaptive_avgpool2d":
            y = _adaptive(a, e["output_size"])
        elif t == "flatten":
            y = a.reshape(a.shape[0], -1)
        elif t == "linear":
            y = a @ weights[f"{i}.weight"].T + weights[f"{i}.bias"]
        outs.append(y)
    return outs


NETS = {"residual": (residual_spec, (2, 3, 7, 6)), "concat": (concat_spec, (2, 2, 5, 7))}


@pytest.fixture(params=list(NETS))
def graph(request):
    make, shape = NETS[request.param]
    spec = make()
    rng = np.random.default_rng(3)
    weights = graph_weights(spec, rng)
    return request.param, spec, weights, relprop.from_spec(spec, weights), rng.normal(size=shape)


def test_forward_equals_numpy(graph):
    _, spec, weights, net, x = graph
    want = numpy_forward(spec, weights, x)
    trace = net.trace(x)
    for i, w in enumerate(want):
        np.testing.assert_allclose(trace.layer_output(i), w, rtol=1e-12, atol=1e-12, err_msg=f"layer {i}")
    assert isinstance(net, relprop.nets.Graph) and not isinstance(net, relprop.Sequential)


def test_batchnorm_folding_keeps_the_forward(graph):
    name, _, _, net, x = graph
    folded = canonical(net)
    if name == "residual":
        kinds = [layer.kind for layer in folded.layers]
        assert kinds.count("batchnorm2d") == 0 and kinds.count("identity") == 6
        assert canonical(net) is folded  # cached
    np.testing.assert_allclose(folded.forward(x), net.forward(x), rtol=1e-12, atol=1e-13)


def test_gradient_equals_finite_differences(graph):
    _, _, _, net, x = graph
    x = x[:1]
    g = relprop.explain(net, x, "gradient", target=1)
    h = 1e-6
    fd = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        fd[idx] = (net.forward(x + e)[0, 1] - net.forward(x - e)[0, 1]) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["lrp.zero", "lrp.epsilon", "lrp.epsilon_plus_flat", "lrp.alpha_beta",
                                    "lrp.zplus", "dtd.box"])
def test_joins_and_pools_conserve(graph, method):
    _, _, _, net, x = graph
    opts = {"low": -4.0, "high": 4.0} if method == "dtd.box" else {}
    R, per_layer = relprop.explain(net, x, method, return_layers=True, **opts)
    folded = canonical(net)
    seed = per_layer[-1]
    for i, layer in enumerate(folded.layers):
        if layer.kind not in ("add", "concat", "adaptive_avgpool2d", "maxpool2d", "flatten", "identity", "relu"):
            continue
        # the relevance at layer i's output: what its readers sent back (or the seed at the output layer)
        arrived = seed if i == len(folded.layers) - 1 else sum(
            (per_layer[r][folded.parents(r).index(i)] if folded.layers[r].n_inputs is None else per_layer[r])
            for r in folded.readers(i))
        sent = per_layer[i]
        total_in = sum(s.sum() for s in sent) if isinstance(sent, list) else sent.sum()
        np.testing.assert_allclose(total_in, arrived.sum(), rtol=1e-5, err_msg=f"layer {i} ({layer.kind})")


def test_conservation_end_to_end_without_bias():
    """LRP-0 on a bias-free residual net whose BNs are pure scalings conserves f_c(x) exactly."""
    spec = residual_spec()
    rng = np.random.default_rng(4)
    w = graph_weights(spec, rng)
    for i, e in enumerate(spec):
        if e["type"] in ("conv2d", "linear"):
            w[f"{i}.bias"] = np.zeros_like(w[f"{i}.bias"])
        if e["type"] == "batchnorm2d":
            w[f"{i}.bias"][:] = 0
            w[f"{i}.running_mean"][:] = 0
    net = relprop.from_spec(spec, w)
    x = rng.normal(size=(3, 3, 8, 8))
    R = relprop.explain(net, x, "lrp.zero", stabilizer=1e-15)  # the adds' and the pool's stabiliser: ~0
    f = net.forward(x)
    np.testing.assert_allclose(R.reshape(3, -1).sum(1), f.max(1), rtol=1e-9)


def test_every_method_runs_on_a_graph(graph):
    name, _, _, net, x = graph
    patterns = relprop.fit_patterns(net, np.random.default_rng(0).normal(size=(64,) + x.shape[1:]), progress=False)
    for method in relprop.known_methods():
        if method == "erasure":
            continue
        opts = {}
        if method.startswith("pattern."):
            opts["patterns"] = patterns
        if method.endswith("box"):
            opts.update(low=-4.0, high=4.0)
        if method == "expected_gradients":
            opts["data"] = x
        R = relprop.explain(net, x, method, **opts)
        assert np.isfinite(R).all(), method
    with pytest.raises(ValueError, match="graph with branches"):
        relprop.explain(net, x, "erasure", layer=3)


def test_graph_save_load_round_trip(graph, tmp_path):
    _, spec, _, net, x = graph
    net.save(tmp_path / "g")
    back = relprop.load(tmp_path / "g")  # finds g.npz
    assert back.spec() == net.spec()
    np.testing.assert_array_equal(back.forward(x), net.forward(x))


# -- Unit targets ------------------------------------------------------------------------------------------
def test_unit_gradient_is_the_derivative_of_its_activation(graph):
    _, _, _, net, x = graph
    x = x[:1]
    k = 5 if graph[0] == "residual" else 7
    for unit in (Unit(layer=k, channel=1), Unit(layer=k, channel=2, position=(1, 2))):
        g = relprop.explain(net, x, "gradient", target=unit)
        fd = np.empty_like(x)
        h = 1e-6
        for idx in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[idx] = h
            fd[idx] = (unit.value(net.trace(x + e).layer_output(k))[0]
                       - unit.value(net.trace(x - e).layer_output(k))[0]) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def test_lrp0_from_a_unit_conserves_its_activation():
    spec = [{"type": "conv2d", "in": 2, "out": 4, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "conv2d", "in": 4, "out": 3, "kernel": 3}, {"type": "relu"}, {"type": "flatten"},
            {"type": "linear", "in": 3 * 4 * 4, "out": 2}]
    rng = np.random.default_rng(0)
    w = graph_weights(spec, rng)
    for i in (0, 2, 5):
        w[f"{i}.bias"] = np.zeros_like(w[f"{i}.bias"])
    net = relprop.from_spec(spec, w)
    x = np.abs(rng.normal(size=(2, 2, 6, 6)))
    unit = Unit(layer=3, channel=1)
    R = relprop.explain(net, x, "lrp.zero", target=unit)
    np.testing.assert_allclose(R.reshape(2, -1).sum(1), unit.value(net.trace(x).layer_output(3)), rtol=1e-10)


@pytest.mark.parametrize("method", ["gradient", "lrp.epsilon", "lrp.epsilon_plus_flat", "deconvnet"])
def test_unit_of_the_output_layer_is_the_class_target(graph, method):
    _, _, _, net, x = graph
    a = relprop.explain(net, x, method, target=1)
    b = relprop.explain(net, x, method, target=Unit(layer=-1, channel=1))
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_bad_units(graph):
    _, _, _, net, x = graph
    n = len(net.layers)
    with pytest.raises(ValueError, match=f"layer {n} does not exist"):
        relprop.explain(net, x, "gradient", target=Unit(n, 0))
    with pytest.raises(ValueError, match="channel 99 does not exist"):
        relprop.explain(net, x, "gradient", target=Unit(0, 99))
    with pytest.raises(ValueError, match="position .* is outside"):
        relprop.explain(net, x, "gradient", target=Unit(0, 0, (50, 0)))
    with pytest.raises(ValueError, match="dense output has no positions"):
        relprop.explain(net, x, "gradient", target=Unit(-1, 0, (0, 0)))
    with pytest.raises(ValueError, match="channel=.* expected an int"):
        Unit(0, 1.5)


# -- bad graphs --------------------------------------------------------------------------------------------
def test_bad_graphs_name_the_layer():
    spec = residual_spec()
    w = graph_weights(spec, np.random.default_rng(0))
    cyc = [dict(e) for e in spec]
    cyc[8]["inputs"] = [7, 9]
    with pytest.raises(ValueError, match=r"layer 8: input 9 is invalid; expected an earlier layer index"):
        relprop.from_spec(cyc, w)
    bad = [dict(e) for e in spec]
    bad[8]["inputs"] = [7, "nowhere"]
    with pytest.raises(ValueError, match="layer 8: input 'nowhere' is invalid"):
        relprop.from_spec(bad, w)
    one = [dict(e) for e in spec]
    one[8]["inputs"] = [7]
    with pytest.raises(ValueError, match="layer 8: a join needs two or more inputs"):
        relprop.from_spec(one, w)
    mismatch = [dict(e) for e in spec]
    mismatch[17]["inputs"] = [14, 9]  # (8, 4, 3) + (4, 7, 6)
    net = relprop.from_spec(mismatch, w)
    with pytest.raises(ValueError, match=r"layer 17 \(add\): input 1 has shape"):
        net.forward(np.zeros((1, 3, 7, 6)))
    cat = concat_spec()
    cat[5]["inputs"] = [1, 1]
    cw = graph_weights(concat_spec(), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"layer 6 \(conv2d\): expects input \(N, 5, H, W\), got \(1, 6, 5, 7\)"):
        relprop.from_spec(cat, cw).forward(np.zeros((1, 2, 5, 7)))
    spatial = [dict(e) for e in spec]
    spatial[17] = {"type": "concat", "axis": 1, "inputs": [14, 9]}
    with pytest.raises(ValueError, match=r"layer 17 \(concat\): input 1 has shape \(1, 4, 7, 6\), which does not"):
        relprop.from_spec(spatial, w).forward(np.zeros((1, 3, 7, 6)))
    neg = dict(w)
    neg["1.running_var"] = -np.ones(4)
    with pytest.raises(ValueError, match=r"layer 1 \(batchnorm2d\): running_var has 4 negative entries"):
        relprop.from_spec(spec, neg)


# -- the new layers against PyTorch's definitions ---------------------------------------------------------
@pytest.mark.parametrize("k, s, p, ceil", [(3, 2, 1, True), (2, 2, 0, True), (3, 3, 1, False), (3, 2, 0, True)])
def test_maxpool_padding_and_ceil_mode(k, s, p, ceil):
    rng = np.random.default_rng(k * 10 + s)
    x = rng.normal(size=(2, 3, 7, 8))
    x[0, 0, :3, :3] = 5.0  # ties: the first maximum wins
    net = relprop.from_spec([{"type": "maxpool2d", "kernel": k, "stride": s, "padding": p, "ceil_mode": ceil},
                             {"type": "flatten"}])
    y = net.trace(x).layer_output(0)
    torch = pytest.importorskip("torch")
    t = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.max_pool2d(t, k, s, p, ceil_mode=ceil)
    np.testing.assert_array_equal(y, ty.detach().numpy())
    g = rng.normal(size=y.shape)
    ty.backward(torch.tensor(g))
    got = relprop.nets.Sequential(net.layers[:1])
    tr = got.trace(x)
    vjp = got.layers[0].vjp(g, x, tr.layer_output(0), tr.aux[0], "cpu")
    np.testing.assert_allclose(vjp, t.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("out", [1, 2, 3, 4])
def test_adaptive_avgpool_bins(out):
    rng = np.random.default_rng(out)
    x = rng.normal(size=(2, 3, 7, 6))
    net = relprop.from_spec([{"type": "adaptive_avgpool2d", "output_size": out}, {"type": "flatten"}])
    y = net.trace(x).layer_output(0)
    np.testing.assert_allclose(y, _adaptive(x, out), rtol=1e-12)
    g = rng.normal(size=y.shape)
    layer = net.layers[0]
    vjp = layer.vjp(g, x, y, None, "cpu")
    # adjoint identity <vjp, x> = <g, y> (the layer is linear)
    np.testing.assert_allclose((vjp * x).sum(), (g * y).sum(), rtol=1e-12)


def test_dropout_identity_and_batchnorm1d():
    spec = [{"type": "linear", "in": 4, "out": 3}, {"type": "batchnorm1d", "features": 3, "eps": 1e-3},
            {"type": "dropout", "p": 0.3}, {"type": "identity"}, {"type": "relu"}, {"type": "linear", "in": 3,
                                                                                   "out": 2}]
    rng = np.random.default_rng(0)
    w = graph_weights(spec, rng)
    net = relprop.from_spec(spec, w)
    x = rng.normal(size=(5, 4))
    z = x @ w["0.weight"].T + w["0.bias"]
    bn = w["1.weight"] * (z - w["1.running_mean"]) / np.sqrt(w["1.running_var"] + 1e-3) + w["1.bias"]
    want = np.maximum(bn, 0) @ w["5.weight"].T + w["5.bias"]
    np.testing.assert_allclose(net.forward(x), want, rtol=1e-12)
    assert net.input_ndim == 2
    # a standalone BN (input normalisation) gets the composite's rule for dense layers
    spec2 = [{"type": "batchnorm1d", "features": 4}] + spec
    for e in spec2[1:]:
        pass
    w2 = {f"{int(k.split('.')[0]) + 1}.{k.split('.', 1)[1]}": v for k, v in w.items()}
    w2.update({"0.weight": rng.uniform(0.5, 1.5, 4), "0.bias": rng.normal(size=4), "0.running_mean":
               rng.normal(size=4), "0.running_var": rng.uniform(0.5, 2, 4)})
    net2 = relprop.from_spec(spec2, w2)
    sweep = relprop.Explainer(net2, "lrp.epsilon_plus_flat")._method
    assert type(sweep.rules[0]).__name__ == "Epsilon"
    assert np.isfinite(relprop.explain(net2, x, "lrp.epsilon_plus_flat")).all()


def test_relu_first_net_accepts_dense_input():
    net = relprop.from_spec([{"type": "relu"}, {"type": "linear", "in": 3, "out": 2}],
                            {"1.weight": np.ones((2, 3)), "1.bias": np.zeros(2)})
    assert net.forward(np.ones((1, 3))).shape == (1, 2)


# -- caches follow parameter changes (issue 11's fuzz finding: stale modified weights) -------------------
STALE_METHODS = ["lrp.zplus", "lrp.epsilon_plus_flat", "lrp.alpha_beta", "lrp.gamma", "lrp.wsquare", "dtd.box",
                 "signal.filter", "attribution.filter", "pattern.attribution", "pattern.net", "lrp.epsilon"]


@pytest.mark.parametrize("method", STALE_METHODS)
def test_explainer_follows_set_params(graph, method):
    """An Explainer built before ``set_params`` explains the new weights, exactly as a fresh one does."""
    _, _, _, net, x = graph
    opts = {"low": -4.0, "high": 4.0} if method == "dtd.box" else {}
    if method.startswith("pattern."):
        opts["patterns"] = relprop.fit_patterns(net, np.random.default_rng(1).normal(size=(32,) + x.shape[1:]),
                                                progress=False)
    explainer = relprop.Explainer(net, method, **opts)
    before = explainer(x)
    rng = np.random.default_rng(2)
    for layer in net.layers:
        if layer.is_linear:
            layer.set_params(layer.weight * rng.uniform(0.5, 1.5, layer.weight.shape), layer.bias)
        elif layer.kind == "batchnorm2d":
            layer.set_params(running_var=layer.running_var * 2.0)
    after = explainer(x)
    fresh = relprop.Explainer(net, method, **opts)(x)
    np.testing.assert_allclose(after, fresh, rtol=1e-12, atol=1e-14)
    assert not np.allclose(after, before)


# -- Unit targets through the input-level methods that wrap the sweep ------------------------------------
def test_smoothgrad_and_integrated_gradients_explain_a_unit(graph):
    _, _, _, net, x = graph
    k = 5 if graph[0] == "residual" else 7
    unit = Unit(layer=k, channel=1)
    g = relprop.explain(net, x, "gradient", target=unit)
    sg = relprop.explain(net, x, "smoothgrad", target=unit, n=3, noise_level=0.0)
    np.testing.assert_allclose(sg, g, rtol=1e-12, atol=1e-14)  # no noise: the unit's gradient
    lrp = relprop.explain(net, x, "lrp.epsilon", target=unit)
    sg_lrp = relprop.explain(net, x, "smoothgrad", target=unit, n=2, noise_level=0.0, base="lrp.epsilon")
    np.testing.assert_allclose(sg_lrp, lrp, rtol=1e-12, atol=1e-14)
    # completeness: Σ IG = a_unit(x) − a_unit(0), up to the Riemann sum's error
    ig, gap = relprop.explain(net, x, "integrated_gradients", target=unit, steps=256, return_gap=True)
    a_x = unit.value(net.trace(x).layer_output(k))
    assert np.abs(gap).sum() <= 1e-2 * np.abs(a_x - unit.value(net.trace(0 * x).layer_output(k))).sum() + 1e-9
    with pytest.raises(ValueError, match="channel 99 does not exist"):
        relprop.explain(net, x, "integrated_gradients", target=Unit(k, 99))
    with pytest.raises(ValueError, match="Unit target has no class index"):
        relprop.explain(net, x, "occlusion", target=unit, window=2)


CHAIN = [{"type": "conv2d", "in": 2, "out": 4, "kernel": 3, "padding": 1}, {"type": "relu"},
         {"type": "conv2d", "in": 4, "out": 5, "kernel": 3, "padding": 2}, {"type": "relu"},
         {"type": "maxpool2d", "kernel": 2}, {"type": "conv2d", "in": 5, "out": 3, "kernel": 2, "stride": 2},
         {"type": "relu"}, {"type": "flatten"}, {"type": "linear", "in": 12, "out": 4}]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("which", ["concat", "chain"])
def test_conv_relu_pairs_are_fused_exactly(which, backend, monkeypatch):
    """A conv read only by the ReLU after it runs as one kernel call: every recorded output is the
    unfused one bit for bit; ``preactivations=False`` drops exactly those convs' z; the gradient-type
    methods (which trace without z) and LRP give what the unfused trace gives."""
    from relprop.nets.graph import Graph

    from relprop.kernels.cpu import winograd
    from test_kernels_winograd import always_winograd

    rng = np.random.default_rng(5)
    spec, shape = (concat_spec(), (2, 2, 5, 7)) if which == "concat" else (CHAIN, (3, 2, 9, 8))
    net, x = relprop.from_spec(spec, graph_weights(spec, rng)), rng.normal(size=shape)
    if which == "chain":  # its 3x3 pairs through the Winograd kernels (the fused write-out of each path)
        always_winograd(monkeypatch)
        calls = []
        real = winograd.conv3x3_winograd
        monkeypatch.setattr("relprop.kernels.cpu.conv2d.conv3x3_winograd", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = [i for i in range(len(net.layers)) if net._conv_relu(i)]
    assert fused, "the test nets have conv + ReLU pairs"
    # a conv read by more than the ReLU after it (a residual branch) is never fused
    assert all(net.readers(i) == (i + 1,) and net.layers[i + 1].kind == "relu" for i in fused)
    tr = net.trace(x, backend)
    lean = net.trace(x, backend, preactivations=False)
    results = {m: relprop.explain(net, x, m, backend=backend) for m in ("gradient", "guided_backprop", "lrp.epsilon")}
    with monkeypatch.context() as mp:
        mp.setattr(Graph, "_conv_relu", lambda self, i: False)
        plain = net.trace(x, backend)
        for m, r in results.items():
            assert r.tobytes() == relprop.explain(net, x, m, backend=backend).tobytes(), m
    for i, (a, b) in enumerate(zip(tr.outputs, plain.outputs)):
        assert a.tobytes() == b.tobytes(), i
        assert (lean.outputs[i] is None) == (i in fused)
        if i not in fused:
            assert lean.outputs[i].tobytes() == b.tobytes(), i
    # (the reference's NumPy reductions may round differently in differently aligned buffers)
    np.testing.assert_allclose(net.forward(x), plain.output, rtol=1e-12, atol=1e-12)
    # a trace that stops at a fused conv (a Unit target there) records its z
    k = fused[0]
    assert net.trace(x, backend, upto=k, preactivations=False).output.tobytes() == plain.outputs[k].tobytes()
    if which == "chain" and backend == "cpu":
        assert calls


def test_a_conv_read_by_more_than_its_relu_is_not_fused():
    spec = [{"type": "conv2d", "in": 1, "out": 2, "kernel": 3}, {"type": "relu"},
            {"type": "add", "inputs": [0, 1]}]
    net = relprop.from_spec(spec, graph_weights(spec, np.random.default_rng(0)))
    assert not net._conv_relu(0)
    x = np.random.default_rng(1).normal(size=(2, 1, 5, 5))
    z = net.trace(x, "cpu", preactivations=False).outputs[0]
    np.testing.assert_allclose(net.forward(x), z + np.maximum(z, 0), rtol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("ceil", [False, True])
def test_a_forward_records_no_max_pool_switches(backend, ceil, monkeypatch):
    """``trace(keep=False)`` (``net.forward`` and the input-level methods' forwards) asks every max-pool
    for its maxima only: no switches recorded, the same output bit for bit as a full trace (ceil mode's
    -inf extension included)."""
    from relprop.kernels import _ops

    spec = [{"type": "conv2d", "in": 2, "out": 3, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "maxpool2d", "kernel": 2, "ceil_mode": ceil}, {"type": "conv2d", "in": 3, "out": 2, "kernel": 2},
            {"type": "relu"}, {"type": "maxpool2d", "kernel": 3, "stride": 2, "padding": 1}, {"type": "flatten"}]
    rng = np.random.default_rng(3)
    net = relprop.from_spec(spec, graph_weights(spec, rng))
    x = np.round(rng.normal(size=(3, 2, 9, 9)), 1)  # ties
    asked = []
    real = _ops.maxpool2d_forward
    monkeypatch.setattr(_ops, "maxpool2d_forward", lambda *a, **k: asked.append(a[5:] + tuple(k.values())) or real(*a, **k))
    lean = net.trace(x, backend, keep=False)
    # the first pool without ceil mode runs inside its conv + ReLU (test_conv_relu_pool_triples_...)
    assert asked == [(False,)] * (2 if ceil else 1) and lean.aux == {}
    asked.clear()
    full = net.trace(x, backend)
    assert asked == [(True,), (True,)] and sorted(full.aux) == [2, 5]
    assert lean.output.tobytes() == full.output.tobytes()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("method", ["lrp.epsilon_plus_flat", "lrp.alpha_beta", "lrp.epsilon", "lrp.zplus",
                                    "lrp.epsilon_gamma_box", "lrp.wsquare", "lrp.flat"])
def test_lrp_sweeps_keep_z_only_where_a_rule_reads_it(method, backend, monkeypatch):
    """A sweep keeps a fused convolution's z only where its rule (a plain term: ε, LRP-0, z^B; or a
    group gated by z's sign) or the rule of the ReLU after it reads z: z⁺, αβ, flat and w² compute
    their own forward.  The relevance is the same bit for bit as with every z kept."""
    from relprop.engine import Sweep

    rng = np.random.default_rng(7)
    net, x = relprop.from_spec(CHAIN, graph_weights(CHAIN, rng)), rng.normal(size=(3, 2, 9, 8))
    seen, real_call = [], Sweep.__call__
    monkeypatch.setattr(Sweep, "__call__", lambda self, *a, **k: seen.append(self) or real_call(self, *a, **k))
    options = {"low": -4.0, "high": 4.0} if method == "lrp.epsilon_gamma_box" else {}
    explainer = relprop.Explainer(net, method, backend=backend, **options)
    lean = explainer(x)
    sweep = seen[-1]
    fused = [i for i in range(len(sweep.net.layers)) if sweep.net._conv_relu(i)]
    assert fused
    for i in fused:
        assert (i in sweep.preactivations) == sweep.rules[i].needs_preactivations, (i, sweep.rules[i])
    if method in ("lrp.epsilon_plus_flat", "lrp.zplus", "lrp.wsquare", "lrp.flat", "lrp.alpha_beta"):
        assert not any(i in sweep.preactivations for i in fused)
    if method == "lrp.epsilon":
        assert all(i in sweep.preactivations for i in fused)
    sweep.preactivations = True  # every z recorded
    assert explainer(x).tobytes() == lean.tobytes()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_conv_relu_pool_triples_are_fused_in_a_forward(backend, monkeypatch):
    """A forward that keeps no record runs a conv, the ReLU read only by a 2x2 stride-2 unpadded max-pool,
    and that pool as one call (the CPU lanes kernels pool in their write-out), with the full trace's output
    bit for bit; a ReLU read by another layer, another pool geometry, ceil mode, a trace that keeps its
    outputs or one that stops at the ReLU are not fused."""
    from relprop.nets import layers

    spec = [{"type": "conv2d", "in": 1, "out": 6, "kernel": 5}, {"type": "relu"}, {"type": "maxpool2d", "kernel": 2},
            {"type": "conv2d", "in": 6, "out": 5, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "maxpool2d", "kernel": 2, "ceil_mode": True},
            {"type": "conv2d", "in": 5, "out": 4, "kernel": 1}, {"type": "relu"}, {"type": "maxpool2d", "kernel": 3},
            {"type": "conv2d", "in": 4, "out": 3, "kernel": 1}, {"type": "relu"}, {"type": "maxpool2d", "kernel": 2},
            {"type": "maxpool2d", "kernel": 2, "inputs": [10]}, {"type": "add", "inputs": [11, 12]},
            {"type": "flatten"}]
    rng = np.random.default_rng(4)
    net = relprop.from_spec(spec, graph_weights(spec, rng))
    x = np.round(rng.normal(size=(3, 1, 29, 31)), 1)  # odd sizes: the pools drop a row and a column
    assert [i for i in range(len(spec)) if net._conv_relu_pool(i)] == [0]
    called = []
    real = layers.Conv2d.forward_relu_pool
    monkeypatch.setattr(layers.Conv2d, "forward_relu_pool", lambda self, *a: called.append(1) or real(self, *a))
    out = net.forward(x, backend)
    assert called == [1]
    full = net.trace(x, backend)
    assert called == [1]
    assert out.tobytes() == full.output.tobytes()
    np.testing.assert_array_equal(net.trace(x, backend, keep=False, upto=1).output, full.outputs[1])
    assert called == [1]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_chains_of_conv_relu_pool_triples_run_as_one_call_in_a_forward(backend, monkeypatch):
    """A forward that keeps no record runs consecutive conv + ReLU + 2x2 max-pool triples, each pooled output
    read only by the next convolution, as one call (the CPU kernel takes each block of samples through the
    whole chain), with the full trace's output bit for bit and the option off's; a pooled output that
    another layer reads ends the chain there, and so does a forward that stops inside it (``upto``)."""
    from relprop.nets import layers

    triple = [{"type": "conv2d", "in": 1, "out": 4, "kernel": 5}, {"type": "relu"}, {"type": "maxpool2d", "kernel": 2},
              {"type": "conv2d", "in": 4, "out": 6, "kernel": 3, "padding": 1}, {"type": "relu"},
              {"type": "maxpool2d", "kernel": 2},
              {"type": "conv2d", "in": 6, "out": 5, "kernel": 2, "padding": 1}, {"type": "relu"},
              {"type": "maxpool2d", "kernel": 2}]
    chain = triple + [{"type": "flatten"}, {"type": "linear", "in": 45, "out": 3}]
    # the second pool's output also read by a max-pool beside the third triple: two calls, [0, 3] and [6]
    branched = triple + [{"type": "maxpool2d", "kernel": 2, "inputs": [5]}, {"type": "flatten", "inputs": [8]},
                         {"type": "flatten", "inputs": [9]}, {"type": "concat", "inputs": [10, 11]}]
    rng = np.random.default_rng(5)
    x = np.round(rng.normal(size=(3, 1, 29, 31)), 1)  # odd sizes: the pools drop a row and a column
    chains, singles = [], []
    real_chain, real_single = layers.Conv2d.forward_relu_pool_chain, layers.Conv2d.forward_relu_pool
    monkeypatch.setattr(layers.Conv2d, "forward_relu_pool_chain",
                        staticmethod(lambda convs, *a: chains.append(len(convs)) or real_chain(convs, *a)))
    monkeypatch.setattr(layers.Conv2d, "forward_relu_pool",
                        lambda self, *a, **k: singles.append(1) or real_single(self, *a, **k))
    for spec, want_chains, want_singles in ((chain, [3], []), (branched, [2], [1])):
        net = relprop.from_spec(spec, graph_weights(spec, rng))
        chains.clear(), singles.clear()
        out = net.forward(x, backend)
        assert chains == want_chains and singles == want_singles
        full = net.trace(x, backend)
        assert out.tobytes() == full.output.tobytes()
        chains.clear()
        assert net.trace(x, backend, keep=False, upto=4).output.tobytes() == full.outputs[4].tobytes()
        assert chains == []  # it stops inside the second triple
        for upto in (5, 7):  # the chain of two, then (7) a conv + ReLU pair
            assert net.trace(x, backend, keep=False, upto=upto).output.tobytes() == full.outputs[upto].tobytes()
        assert chains == [2, 2]
        with monkeypatch.context() as mp:
            mp.setattr(relprop._config, "GRAPH_CHAINS", False)
            chains.clear()
            assert net.forward(x, backend).tobytes() == out.tobytes() and chains == []


POOLED_CHAIN = [{"type": "conv2d", "in": 1, "out": 4, "kernel": 5}, {"type": "relu"}, {"type": "maxpool2d", "kernel": 2},
                {"type": "conv2d", "in": 4, "out": 6, "kernel": 3, "padding": 1}, {"type": "relu"},
                {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"}, {"type": "linear", "in": 24, "out": 3}]
#: the sweeps whose trace runs both conv + ReLU + 2x2 max-pool triples as one call, and those that cannot (ε reads z)
POOLED_METHODS = ["gradient", "gradient_x_input", "deconvnet", "guided_backprop", "lrp.epsilon_plus_flat", "lrp.zplus",
                  "lrp.alpha_beta", "lrp.flat", "lrp.wsquare"]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("method", POOLED_METHODS + ["lrp.epsilon", "lrp.zero"])
def test_sweeps_trace_conv_relu_pool_triples_in_one_call(method, backend, monkeypatch):
    """A sweep whose rules read neither the pre-activation nor the ReLU's output of a conv, ReLU, 2x2 max-pool
    triple has its trace run the triple as one call recording the pool's maxima and switches only (z⁺ from
    the same call); the explanation is bit for bit the one of a trace that writes every output, whole, with
    per-layer signals, and from a Unit at the ReLU (not fused: the sweep starts there) or at the pool."""
    rng = np.random.default_rng(11)
    net = relprop.from_spec(POOLED_CHAIN, graph_weights(POOLED_CHAIN, rng))
    x = np.round(rng.normal(size=(3, 1, 13, 15)), 1)  # odd sizes: the pools drop a row and a column
    explainer = relprop.Explainer(net, method, backend=backend)
    sweep = explainer._method
    last = len(net.layers) - 1
    pooled = sweep.pooled(sweep._whole(last, None, False))
    assert pooled == (frozenset() if method in ("lrp.epsilon", "lrp.zero") else {0, 3})
    got = [explainer(x), explainer(x, return_layers=True), explainer(x, Unit(layer=1, channel=2)),
           explainer(x, Unit(layer=2, channel=1, position=(1, 2)))]
    monkeypatch.setattr(relprop._config, "TRACE_FUSED_POOLS", False)
    want = [explainer(x), explainer(x, return_layers=True), explainer(x, Unit(layer=1, channel=2)),
            explainer(x, Unit(layer=2, channel=1, position=(1, 2)))]
    for g, w in zip(got, want):
        g_all, w_all = (list(g[1]) + [g[0]], list(w[1]) + [w[0]]) if isinstance(g, tuple) else ([g], [w])
        assert len(g_all) == len(w_all)
        for a, b in zip(g_all, w_all):
            a, b = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
            assert [None if v is None else v.tobytes() for v in a] == [None if v is None else v.tobytes() for v in b]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_pooled_trace_records_switches_and_leaves_the_relu_unwritten(backend):
    """``trace(pooled={i})``: the pool's maxima and switches as the full trace records them, z not kept, and the
    ReLU's output an Unwritten of its shape whose values cannot be read; a triple the sweep starts inside
    (``upto``) or a trace that keeps nothing is not run this way."""
    from relprop.nets.graph import Unwritten

    rng = np.random.default_rng(12)
    net = relprop.from_spec(POOLED_CHAIN, graph_weights(POOLED_CHAIN, rng))
    x = rng.normal(size=(2, 1, 13, 15)).astype(np.float32)
    full = net.trace(x, backend, preactivations=False)
    lean = net.trace(x, backend, preactivations=False, pooled={0, 3})
    for i in (1, 4):
        assert isinstance(lean.outputs[i], Unwritten) and lean.outputs[i].shape == full.outputs[i].shape
        assert lean.outputs[i].dtype == np.float32 and lean.outputs[i - 1] is None
        with pytest.raises(TypeError, match="not written"):
            np.asarray(lean.outputs[i])
    for i in (2, 5):
        assert lean.outputs[i].tobytes() == full.outputs[i].tobytes()
        np.testing.assert_array_equal(lean.aux[i], full.aux[i])
    assert lean.output.tobytes() == full.output.tobytes()
    assert not isinstance(net.trace(x, backend, upto=1, pooled={0}).outputs[1], Unwritten)
