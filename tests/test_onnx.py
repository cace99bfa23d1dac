"""relprop.from_onnx: ONNX graphs built with onnx.helper (no torch needed), one per operator and whole
VGG- and ResNet-shaped nets.

Every imported net is checked three ways: the spec/weights the importer writes (``relprop.io.to_spec``)
equal the expected ones, its forward equals onnxruntime's to 1e-5 relative in float32, and it
round-trips through save/load.  The bad inputs of the issue each raise a clear error.
"""
import warnings

import numpy as np
import pytest

import relprop
from relprop.io import to_spec

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto  # noqa: E402
from onnx import helper as oh  # noqa: E402
from onnx import numpy_helper as onh  # noqa: E402


# -- building graphs -------------------------------------------------------------------------------------
class Builder:
    """Collects nodes and initializers; ``model()`` wraps them with one float input ``x`` and output."""

    def __init__(self, seed=0):
        self.nodes, self.inits, self.rng, self.n = [], [], np.random.default_rng(seed), 0

    def const(self, value, name=None):
        self.n += 1
        name = name or f"c{self.n}"
        self.inits.append(onh.from_array(np.asarray(value), name))
        return name

    def w(self, *shape, scale=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = np.sqrt(2.0 / fan_in) if scale is None else scale
        return self.const((self.rng.normal(size=shape) * scale).astype(np.float32))

    def node(self, op, inputs, outputs=1, name=None, **attrs):
        self.n += 1
        outs = [f"t{self.n}_{j}" for j in range(outputs)]
        self.nodes.append(oh.make_node(op, list(inputs), outs, name=name or f"{op.lower()}{self.n}", **attrs))
        return outs[0] if outputs == 1 else outs

    # layers
    def conv(self, x, cin, cout, k, bias=True, **attrs):
        ins = [x, self.w(cout, cin, k, k)] + ([self.const(self.rng.normal(size=cout).astype(np.float32) * 0.1)]
                                              if bias else [])
        return self.node("Conv", ins, **attrs)

    def bn(self, x, c):
        r = self.rng
        p = [r.uniform(0.5, 1.5, c), r.normal(size=c) * 0.1, r.normal(size=c) * 0.1, r.uniform(0.5, 2.0, c)]
        return self.node("BatchNormalization", [x] + [self.const(v.astype(np.float32)) for v in p], epsilon=1e-5)

    def gemm(self, x, fin, fout, **attrs):
        return self.node("Gemm", [x, self.w(fout, fin), self.const(self.rng.normal(size=fout).astype(np.float32))],
                         transB=1, **attrs)

    def model(self, out, in_dims, opset=18, name="g", out_rank=2):
        graph = oh.make_graph(self.nodes, name, [oh.make_tensor_value_info("x", TensorProto.FLOAT, in_dims)],
                              [_out(out, out_rank)], self.inits)
        m = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def _out(name, rank=2):
    return oh.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)


def ort_forward(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def assert_close(actual, expected, rtol=1e-5):
    scale = float(np.abs(expected).max())
    assert scale > 0  # a vacuous comparison proves nothing
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def check_parity(model, shape, tmp_path, seed=1):
    """relprop's forward == onnxruntime's (float32, 1e-5), and save/load keeps it; returns the net."""
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    net = relprop.from_onnx(model)
    out = net.forward(x)
    assert_close(out, ort_forward(model, x))
    net.save(tmp_path / "net.npz")
    back = relprop.load(tmp_path / "net.npz")
    assert back.spec() == net.spec()
    np.testing.assert_array_equal(back.forward(x), out)
    return net


IMG = ["N", 3, 8, 8]


# -- one graph per operator: spec and parity -------------------------------------------------------------
def test_conv_relu_gemm_spec_and_weights(tmp_path):
    b = Builder()
    h = b.conv("x", 3, 4, 3, pads=[1, 1, 1, 1], strides=[2, 2], dilations=[1, 1])
    h = b.node("Relu", [h])
    h = b.node("Flatten", [h], axis=1)
    y = b.gemm(h, 4 * 4 * 4, 5)
    m = b.model(y, IMG)
    spec, weights = to_spec(m)
    assert spec == [
        {"type": "conv2d", "in": 3, "out": 4, "kernel": [3, 3], "stride": [2, 2], "padding": [1, 1],
         "dilation": [1, 1]},
        {"type": "relu"}, {"type": "flatten"}, {"type": "linear", "in": 64, "out": 5}]
    arrays = {i.name: onh.to_array(i) for i in m.graph.initializer}
    conv_w, conv_b, fc_w, fc_b = (arrays[n] for n in (m.graph.node[0].input[1], m.graph.node[0].input[2],
                                                      m.graph.node[3].input[1], m.graph.node[3].input[2]))
    assert sorted(weights) == ["0.bias", "0.weight", "3.bias", "3.weight"]
    np.testing.assert_array_equal(weights["0.weight"], conv_w)
    np.testing.assert_array_equal(weights["0.bias"], conv_b)
    np.testing.assert_array_equal(weights["3.weight"], fc_w)  # transB=1: already (out, in)
    np.testing.assert_array_equal(weights["3.bias"], fc_b)
    check_parity(m, (3, 3, 8, 8), tmp_path)


def test_conv_dilation_no_bias(tmp_path):
    b = Builder()
    h = b.conv("x", 3, 4, 3, bias=False, pads=[2, 2, 2, 2], dilations=[2, 2])
    y = b.node("Flatten", [b.node("Relu", [h])])
    m = b.model(y, IMG)
    spec, weights = to_spec(m)
    assert spec[0]["dilation"] == [2, 2] and spec[0]["padding"] == [2, 2] and "0.bias" not in weights
    check_parity(m, (2, 3, 8, 8), tmp_path)


def test_conv_asymmetric_pads_folded_when_equivalent(tmp_path):
    """pads (1, 2) on 9x9 with k=3, s=2: the extra end padding is never read -> symmetric (1, 1)."""
    b = Builder()
    y = b.node("Flatten", [b.conv("x", 3, 4, 3, pads=[1, 1, 2, 2], strides=[2, 2])])
    m = b.model(y, ["N", 3, 9, 9])
    assert to_spec(m)[0][0]["padding"] == [1, 1]
    check_parity(m, (2, 3, 9, 9), tmp_path)


def test_conv_same_upper_auto_pad(tmp_path):
    b = Builder()
    y = b.node("Flatten", [b.conv("x", 3, 4, 3, auto_pad="SAME_UPPER")])
    m = b.model(y, IMG)
    assert to_spec(m)[0][0]["padding"] == [1, 1]
    check_parity(m, (2, 3, 8, 8), tmp_path)


def test_conv_asymmetric_pads_that_change_the_output_raise():
    b = Builder()
    y = b.node("Flatten", [b.conv("x", 3, 4, 3, pads=[0, 0, 1, 1], strides=[2, 2], name="padconv")])
    with pytest.raises(NotImplementedError, match=r"'padconv' \(Conv\).*asymmetric padding"):
        relprop.from_onnx(b.model(y, IMG))


@pytest.mark.parametrize("trans_b,alpha,beta,c_shape", [(0, 0.5, 2.0, (1, 5)), (1, 1.0, 1.0, (5,)),
                                                         (1, 1.0, 0.5, ())])
def test_gemm_attributes(trans_b, alpha, beta, c_shape, tmp_path):
    b = Builder()
    w = b.rng.normal(size=(5, 6) if trans_b else (6, 5)).astype(np.float32)
    c = b.rng.normal(size=c_shape).astype(np.float32)
    y = b.node("Gemm", ["x", b.const(w), b.const(c)], transB=trans_b, alpha=alpha, beta=beta)
    m = b.model(y, ["N", 6])
    spec, weights = to_spec(m)
    assert spec == [{"type": "linear", "in": 6, "out": 5}]
    np.testing.assert_allclose(weights["0.weight"], alpha * (w if trans_b else w.T), rtol=1e-7)
    np.testing.assert_allclose(weights["0.bias"], beta * np.broadcast_to(c.reshape(-1) if c.size > 1 else c, (5,)),
                               rtol=1e-7)
    check_parity(m, (4, 6), tmp_path)


def test_gemm_trans_a_is_batch_not_first():
    b = Builder()
    y = b.node("Gemm", ["x", b.w(6, 5)], transA=1, name="ta")
    with pytest.raises(ValueError, match=r"'ta' \(Gemm\): transA=1.*batch"):
        relprop.from_onnx(b.model(y, [6, "N"]) if False else b.model(y, ["N", 6]))


@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_is_one_linear_layer(bias_first, tmp_path):
    b = Builder()
    w = b.rng.normal(size=(6, 5)).astype(np.float32)
    c = b.rng.normal(size=5).astype(np.float32)
    h = b.node("MatMul", ["x", b.const(w)])
    bias = b.const(c)
    h = b.node("Add", [bias, h] if bias_first else [h, bias])
    h = b.node("Relu", [h])
    y = b.node("Add", [b.node("MatMul", [h, b.w(5, 3)]), b.const(np.zeros((1, 3), np.float32))])
    m = b.model(y, ["N", 6])
    spec, weights = to_spec(m)
    assert spec == [{"type": "linear", "in": 6, "out": 5}, {"type": "relu"}, {"type": "linear", "in": 5, "out": 3}]
    np.testing.assert_array_equal(weights["0.weight"], w.T)
    np.testing.assert_array_equal(weights["0.bias"], c)
    check_parity(m, (4, 6), tmp_path)


def test_conv_then_add_of_a_channel_constant_is_its_bias(tmp_path):
    b = Builder()
    c = b.rng.normal(size=(1, 4, 1, 1)).astype(np.float32)
    h = b.node("Add", [b.conv("x", 3, 4, 3, bias=False), b.const(c)])
    m = b.model(b.node("Flatten", [b.node("Relu", [h])]), IMG)
    spec, weights = to_spec(m)
    assert [e["type"] for e in spec] == ["conv2d", "relu", "flatten"]
    np.testing.assert_array_equal(weights["0.bias"], c.reshape(4))
    check_parity(m, (2, 3, 8, 8), tmp_path)


def test_add_of_a_constant_elsewhere_raises():
    b = Builder()
    y = b.node("Add", [b.node("Relu", ["x"]), b.const(np.ones(6, np.float32))], name="shift")
    with pytest.raises(NotImplementedError, match=r"'shift' \(Add\).*bias"):
        relprop.from_onnx(b.model(y, ["N", 6]))


def test_maxpool_pads_strides(tmp_path):
    b = Builder()
    h = b.node("MaxPool", [b.conv("x", 3, 4, 3, pads=[1, 1, 1, 1])], kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1])
    m = b.model(b.node("Flatten", [h]), IMG)
    assert to_spec(m)[0][1] == {"type": "maxpool2d", "kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]}
    check_parity(m, (3, 3, 8, 8), tmp_path)


def test_maxpool_default_stride_is_one(tmp_path):
    b = Builder()
    m = b.model(b.node("Flatten", [b.node("MaxPool", ["x"], kernel_shape=[2, 2])]), IMG)
    assert to_spec(m)[0][0]["stride"] == [1, 1]
    check_parity(m, (2, 3, 8, 8), tmp_path)


def test_maxpool_ceil_mode(tmp_path):
    b = Builder()
    h = b.node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    m = b.model(b.node("Flatten", [h]), IMG)
    assert to_spec(m)[0][0] == {"type": "maxpool2d", "kernel": [3, 3], "stride": [2, 2], "padding": [0, 0],
                                "ceil_mode": True}
    net = check_parity(m, (2, 3, 8, 8), tmp_path)
    assert net.forward(np.zeros((1, 3, 8, 8), np.float32)).shape == (1, 3 * 4 * 4)


@pytest.mark.parametrize("pads,count_include_pad", [([1, 1, 1, 1], 1), ([0, 0, 0, 0], 0)])
def test_averagepool(pads, count_include_pad, tmp_path):
    b = Builder()
    h = b.node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=pads,
               count_include_pad=count_include_pad)
    m = b.model(b.node("Flatten", [h]), IMG)
    assert to_spec(m)[0][0] == {"type": "avgpool2d", "kernel": [3, 3], "stride": [2, 2], "padding": pads[:2]}
    check_parity(m, (2, 3, 8, 8), tmp_path)


def test_averagepool_excluding_padding_raises():
    b = Builder()
    h = b.node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="avg")
    with pytest.raises(NotImplementedError, match=r"'avg' \(AveragePool\): count_include_pad=0"):
        relprop.from_onnx(b.model(b.node("Flatten", [h]), IMG))


def _pooled_head(b, pool_node):
    return b.gemm(pool_node, 4, 3)


def test_global_average_pool(tmp_path):
    b = Builder()
    h = b.node("GlobalAveragePool", [b.node("Relu", [b.conv("x", 3, 4, 3)])])
    m = b.model(_pooled_head(b, b.node("Flatten", [h])), IMG)
    spec, _ = to_spec(m)
    assert spec[2:4] == [{"type": "adaptive_avgpool2d", "output_size": 1}, {"type": "flatten"}]
    check_parity(m, (2, 3, 8, 8), tmp_path)


@pytest.mark.parametrize("opset,keepdims", [(18, 1), (18, 0), (13, 1), (13, 0)])
def test_reduce_mean_over_spatial_axes(opset, keepdims, tmp_path):
    b = Builder()
    h = b.node("Relu", [b.conv("x", 3, 4, 3)])
    if opset >= 18:
        h = b.node("ReduceMean", [h, b.const(np.array([-2, -1], np.int64))], keepdims=keepdims)
    else:
        h = b.node("ReduceMean", [h], axes=[2, 3], keepdims=keepdims)
    if keepdims:  # the torch.export exporter's form: a fixed-shape Reshape after the pooling
        h = b.node("Reshape", [h, b.const(np.array([2, 4], np.int64))], **({"allowzero": 1} if opset >= 14 else {}))
    m = b.model(_pooled_head(b, h), IMG, opset=opset)
    spec, _ = to_spec(m)
    assert spec[2:4] == [{"type": "adaptive_avgpool2d", "output_size": 1}, {"type": "flatten"}]
    if keepdims:  # fixed batch 2 in the Reshape: ORT runs batch 2, relprop any batch
        x = np.random.default_rng(3).normal(size=(5, 3, 8, 8)).astype(np.float32)
        out = relprop.from_onnx(m).forward(x)
        assert_close(out[:2], ort_forward(m, x[:2]))
        assert_close(out[2:4], ort_forward(m, x[2:4]))
    else:
        check_parity(m, (3, 3, 8, 8), tmp_path)


def test_reduce_mean_over_channels_raises():
    b = Builder()
    h = b.node("ReduceMean", ["x", b.const(np.array([1], np.int64))], name="rm")
    with pytest.raises(NotImplementedError, match=r"'rm' \(ReduceMean\).*spatial axes"):
        relprop.from_onnx(b.model(b.node("Flatten", [h]), IMG))


def test_batchnorm_2d_and_1d(tmp_path):
    b = Builder()
    h = b.node("Relu", [b.bn(b.conv("x", 3, 4, 3, pads=[1, 1, 1, 1]), 4)])
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])])
    h = b.node("Relu", [b.bn(b.gemm(h, 4, 6), 6)])
    m = b.model(b.gemm(h, 6, 3), IMG)
    spec, weights = to_spec(m)
    assert spec[1] == {"type": "batchnorm2d", "features": 4, "eps": pytest.approx(1e-5)}
    assert spec[6] == {"type": "batchnorm1d", "features": 6, "eps": pytest.approx(1e-5)}
    bn = m.graph.node[1]
    arrays = {i.name: onh.to_array(i) for i in m.graph.initializer}
    for key, j in (("weight", 1), ("bias", 2), ("running_mean", 3), ("running_var", 4)):
        np.testing.assert_array_equal(weights[f"1.{key}"], arrays[bn.input[j]])
    check_parity(m, (3, 3, 8, 8), tmp_path)


def test_add_of_two_activations_is_an_add_layer(tmp_path):
    b = Builder()
    a = b.node("Relu", [b.conv("x", 3, 4, 3, pads=[1, 1, 1, 1])])
    h = b.conv(a, 4, 4, 3, pads=[1, 1, 1, 1])
    h = b.node("Relu", [b.node("Add", [h, a])])
    m = b.model(b.node("Flatten", [h]), IMG)
    spec, _ = to_spec(m)
    assert spec[3] == {"type": "add", "inputs": [2, 1]}
    check_parity(m, (2, 3, 8, 8), tmp_path)


def test_add_of_the_input(tmp_path):
    b = Builder()
    h = b.node("Add", [b.conv("x", 3, 3, 3, pads=[1, 1, 1, 1]), "x"])
    m = b.model(b.node("Flatten", [h]), IMG)
    assert to_spec(m)[0][1] == {"type": "add", "inputs": [0, "input"]}
    check_parity(m, (2, 3, 8, 8), tmp_path)


def test_concat_of_branches(tmp_path):
    b = Builder()
    s = b.node("Relu", [b.conv("x", 3, 4, 1)])
    p = b.conv(s, 4, 2, 3, pads=[1, 1, 1, 1])
    q = b.conv(s, 4, 3, 1)
    h = b.node("Relu", [b.node("Concat", [p, q], axis=1)])
    m = b.model(b.gemm(b.node("Flatten", [b.node("GlobalAveragePool", [h])]), 5, 2), IMG)
    spec, _ = to_spec(m)
    assert spec[2] == {"type": "conv2d", "in": 4, "out": 2, "kernel": [3, 3], "stride": [1, 1], "padding": [1, 1],
                       "dilation": [1, 1]}
    assert spec[3]["inputs"] == [1] and spec[4] == {"type": "concat", "axis": 1, "inputs": [2, 3]}
    check_parity(m, (2, 3, 8, 8), tmp_path)


@pytest.mark.parametrize("shape", [[0, -1], [-1, 48], [2, 48], [2, -1]])
def test_reshape_to_n_minus_one_is_flatten(shape, tmp_path):
    b = Builder()
    h = b.node("Reshape", [b.node("Relu", [b.conv("x", 3, 3, 3)]), b.const(np.array(shape, np.int64))])
    m = b.model(b.gemm(h, 48, 4), [2, 3, 6, 6])
    assert to_spec(m)[0][2] == {"type": "flatten"}
    x = np.random.default_rng(0).normal(size=(4, 3, 6, 6)).astype(np.float32)
    out = relprop.from_onnx(m).forward(x)  # exported at batch 2, explains batch 4
    assert_close(out[:2], ort_forward(m, x[:2]))
    assert_close(out[2:], ort_forward(m, x[2:]))


def test_reshape_to_a_shape_computed_from_shape(tmp_path):
    """x.view(x.size(0), -1) as a tracer writes it without folding: Shape -> Gather -> Unsqueeze -> Concat."""
    b = Builder()
    h = b.node("Relu", [b.conv("x", 3, 3, 3)])
    n = b.node("Unsqueeze", [b.node("Gather", [b.node("Shape", [h]), b.const(np.array(0, np.int64))], axis=0),
                             b.const(np.array([0], np.int64))])
    shape = b.node("Concat", [n, b.const(np.array([-1], np.int64))], axis=0)
    m = b.model(b.gemm(b.node("Reshape", [h, shape]), 48, 4), [2, 3, 6, 6])
    assert [e["type"] for e in to_spec(m)[0]] == ["conv2d", "relu", "flatten", "linear"]
    x = np.random.default_rng(0).normal(size=(4, 3, 6, 6)).astype(np.float32)
    out = relprop.from_onnx(m).forward(x)
    assert_close(out[:2], ort_forward(m, x[:2]))
    assert_close(out[2:], ort_forward(m, x[2:]))
    b = Builder()  # with a free batch the shape is not a constant
    h = b.node("Reshape", ["x", b.node("Shape", ["x"], name="sh")])
    with pytest.raises(NotImplementedError, match=r"'sh' \(Shape\).*fixed batch"):
        relprop.from_onnx(b.model(b.node("Flatten", [h]), IMG))


def test_reshape_that_is_not_a_flatten_raises():
    b = Builder()
    h = b.node("Reshape", ["x", b.const(np.array([0, 3, 64], np.int64))], name="r")
    with pytest.raises(NotImplementedError, match=r"'r' \(Reshape\).*\(N, -1\)"):
        relprop.from_onnx(b.model(b.node("Flatten", [h]), IMG))


def test_constant_nodes_identity_dropout_folded(tmp_path):
    """Reshape's shape from a Constant node, Identity of an initializer, Identity and Dropout on the way."""
    b = Builder()
    h = b.node("Relu", [b.conv("x", 3, 2, 3)])
    h = b.node("Dropout", [h, b.const(np.array(0.5, np.float32))])
    shape = b.node("Constant", [], value=onh.from_array(np.array([-1, 72], np.int64), "s"))
    h = b.node("Identity", [b.node("Reshape", [h, shape])])
    w = b.node("Identity", [b.w(4, 72)])
    y = b.node("Gemm", [h, w], transB=1)
    m = b.model(y, IMG)
    spec, _ = to_spec(m)
    assert [e["type"] for e in spec] == ["conv2d", "relu", "flatten", "linear"]
    check_parity(m, (2, 3, 8, 8), tmp_path)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_trailing_softmax_dropped_with_a_warning(op):
    b = Builder()
    logits = b.gemm(b.node("Relu", [b.gemm("x", 6, 5)]), 5, 3)
    m = b.model(b.node(op, [logits], axis=1), ["N", 6])
    with pytest.warns(UserWarning, match=f"dropped the trailing {op}"):
        net = relprop.from_onnx(m)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    probs = ort_forward(m, x)
    z = net.forward(x)
    soft = np.exp(z - z.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    assert_close(soft if op == "Softmax" else np.log(soft), probs)


def test_softmax_inside_raises():
    b = Builder()
    h = b.node("Softmax", [b.gemm("x", 6, 5)], axis=1, name="sm")
    m = b.model(b.gemm(h, 5, 3), ["N", 6])
    with pytest.raises(NotImplementedError, match=r"'sm' \(Softmax\).*trailing"):
        relprop.from_onnx(m)


def test_dead_branch_is_pruned(tmp_path):
    b = Builder()
    h = b.node("Relu", [b.gemm("x", 6, 5)])
    b.node("Sigmoid", [h])  # feeds nothing
    check_parity(b.model(b.gemm(h, 5, 3), ["N", 6]), (3, 6), tmp_path)


# -- whole nets --------------------------------------------------------------------------------------
def vgg_graph(seed=0):
    """VGG-BN-shaped: (conv-BN-ReLU) x2 - maxpool - conv-BN-ReLU - maxpool - flatten - FC-ReLU-dropout-FC."""
    b = Builder(seed)
    h, cin = "x", 3
    for cout, pool in ((8, False), (8, True), (16, True)):
        h = b.node("Relu", [b.bn(b.conv(h, cin, cout, 3, pads=[1, 1, 1, 1]), cout)])
        if pool:
            h = b.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
        cin = cout
    h = b.node("Flatten", [h])
    h = b.node("Dropout", [b.node("Relu", [b.gemm(h, 16 * 4 * 4, 32)])])
    return b.model(b.gemm(h, 32, 10), ["N", 3, 16, 16], name="vgg")


def resnet_graph(seed=0):
    """ResNet-shaped: stem conv-BN-ReLU-maxpool, a BasicBlock, a strided block with a 1x1 downsample,
    global average pooling (ReduceMean + fixed Reshape as torch.export writes it), FC."""
    b = Builder(seed)
    h = b.node("Relu", [b.bn(b.conv("x", 3, 8, 3, bias=False, pads=[1, 1, 1, 1]), 8)])
    h = b.node("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])

    def block(h, cin, cout, stride):
        r = b.node("Relu", [b.bn(b.conv(h, cin, cout, 3, bias=False, pads=[1, 1, 1, 1], strides=[stride] * 2), cout)])
        r = b.bn(b.conv(r, cout, cout, 3, bias=False, pads=[1, 1, 1, 1]), cout)
        skip = h if stride == 1 else b.bn(b.conv(h, cin, cout, 1, bias=False, strides=[stride] * 2), cout)
        return b.node("Relu", [b.node("Add", [r, skip])])

    h = block(block(h, 8, 8, 1), 8, 16, 2)
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])])
    return b.model(b.gemm(h, 16, 10), ["N", 3, 16, 16], name="resnet")


def test_vgg_shaped_net(tmp_path):
    net = check_parity(vgg_graph(), (3, 3, 16, 16), tmp_path)
    assert len(net.layers) == 15  # 3x (conv, BN, ReLU), 2 max-pools, flatten, FC, ReLU, FC: dropout is no layer


def test_resnet_shaped_net(tmp_path):
    net = check_parity(resnet_graph(), (3, 3, 16, 16), tmp_path)
    kinds = [e["type"] for e in net.spec()]
    assert kinds.count("add") == 2 and kinds.count("batchnorm2d") == 6


@pytest.mark.parametrize("method", ["gradient", "lrp.epsilon", "lrp.epsilon_plus_flat"])
def test_imported_resnet_explains_on_every_cpu_backend(method):
    """The imported graph is an ordinary net: methods run on it, the fast backend equals the reference one."""
    net = relprop.from_onnx(resnet_graph())
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16))
    ref = relprop.explain(net, x, method, backend="reference")
    R = relprop.explain(net, x, method, backend="cpu")
    assert R.shape == x.shape and np.abs(ref).max() > 0
    np.testing.assert_allclose(R, ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())


# -- files -------------------------------------------------------------------------------------------
def test_file_with_external_data(tmp_path):
    m = resnet_graph()
    path = tmp_path / "m.onnx"
    onnx.save_model(resnet_graph(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    assert (tmp_path / "m.onnx.data").exists()
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    assert_close(relprop.from_onnx(path).forward(x), ort_forward(m, x))
    assert_close(relprop.from_onnx(str(path)).forward(x), ort_forward(m, x))
    bare = onnx.load(str(path), load_external_data=False)
    with pytest.raises(ValueError, match="external"):
        relprop.from_onnx(bare)
    (tmp_path / "m.onnx.data").rename(tmp_path / "moved.data")
    with pytest.raises(ValueError, match="external data|not an ONNX|invalid"):
        relprop.from_onnx(path)


def test_model_bytes_and_path_agree(tmp_path):
    m = vgg_graph()
    onnx.save_model(m, str(tmp_path / "v.onnx"))
    a = relprop.from_onnx(tmp_path / "v.onnx")
    b = relprop.from_onnx(m.SerializeToString())
    assert a.spec() == b.spec()
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k])


# -- bad input ----------------------------------------------------------------------------------------
def test_unsupported_operator_names_node_op_and_list():
    b = Builder()
    y = b.node("Sigmoid", [b.gemm("x", 6, 5)], name="squash")
    with pytest.raises(ValueError, match=r"'squash' \(Sigmoid\): operator Sigmoid is not supported; "
                                         r"supported: Add, AveragePool, .*Relu"):
        relprop.from_onnx(b.model(y, ["N", 6]))


def test_two_inputs_raise():
    b = Builder()
    y = b.node("Add", ["x", "x2"])
    graph = oh.make_graph(b.nodes, "two", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6]),
                                           oh.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", 6])],
                          [_out(y)])
    m = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    with pytest.raises(ValueError, match=r"2 inputs \('x', 'x2'\)"):
        relprop.from_onnx(m)


def test_two_outputs_raise():
    b = Builder()
    h = b.gemm("x", 6, 5)
    y = b.node("Relu", [h])
    graph = oh.make_graph(b.nodes, "two", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [_out(y),
                           _out(h)], b.inits)
    with pytest.raises(ValueError, match="2 outputs"):
        relprop.from_onnx(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]))


@pytest.mark.parametrize("dims", [[3, 8, 8, "N"], [6, "N"]])
def test_batch_not_first_raises(dims):
    b = Builder()
    m = b.model(b.node("Relu", ["x"]), dims, out_rank=len(dims))
    with pytest.raises(ValueError, match="batch.*not the first"):
        relprop.from_onnx(m)


def test_rank_three_input_raises():
    b = Builder()
    with pytest.raises(ValueError, match=r"rank 3.*\(N, C, H, W\)"):
        relprop.from_onnx(b.model(b.node("Relu", ["x"]), ["N", 8, 8], out_rank=3))


def test_grouped_conv_raises():
    b = Builder()
    y = b.node("Conv", ["x", b.w(6, 1, 3, 3)], group=3, name="dw")
    with pytest.raises(NotImplementedError, match=r"'dw' \(Conv\): grouped convolution \(group=3\)"):
        relprop.from_onnx(b.model(b.node("Flatten", [y]), IMG))


def test_not_an_onnx_file(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 10)
    with pytest.raises(ValueError, match="not an ONNX model"):
        relprop.from_onnx(text)
    with pytest.raises(FileNotFoundError, match="no such file"):
        relprop.from_onnx(tmp_path / "missing.onnx")
    with pytest.raises(TypeError, match="expected a path"):
        relprop.from_onnx(42)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncated_file(keep, tmp_path):
    data = vgg_graph().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="not an ONNX model|invalid ONNX model|no graph"):
        relprop.from_onnx(path)


def test_weights_contradicting_the_graph():
    b = Builder()
    y = b.node("Gemm", [b.node("Relu", ["x"]), b.w(5, 7)], transB=1, name="fc")
    with pytest.raises(ValueError, match=r"'fc' \(Gemm\): the weight expects 7 input features.*has 6"):
        relprop.from_onnx(b.model(y, ["N", 6]))
    b = Builder()
    y = b.node("Conv", ["x", b.w(4, 2, 3, 3)], name="c")
    with pytest.raises(ValueError, match=r"'c' \(Conv\).*expects 2 input channels, the input has 3"):
        relprop.from_onnx(b.model(b.node("Flatten", [y]), IMG))
    b = Builder()
    h = b.conv("x", 3, 4, 3)
    y = b.node("BatchNormalization", [h] + [b.const(np.ones(5, np.float32)) for _ in range(4)], name="bn")
    with pytest.raises(ValueError, match=r"'bn' \(BatchNormalization\).*5 channels, the input has 4"):
        relprop.from_onnx(b.model(b.node("Flatten", [y]), IMG))
    b = Builder()
    y = b.node("Conv", ["x", b.w(4, 3, 3, 3), b.const(np.zeros(3, np.float32))], name="cb")
    with pytest.raises(ValueError, match=r"'cb' \(Conv\): the bias has shape \(3,\), expected \(4,\)"):
        relprop.from_onnx(b.model(b.node("Flatten", [y]), IMG))


def test_kernel_shape_contradicting_the_weight():
    b = Builder()
    y = b.node("Conv", ["x", b.w(4, 3, 3, 3)], kernel_shape=[5, 5], name="k")
    with pytest.raises(ValueError, match=r"'k' \(Conv\): kernel_shape=\[5, 5\] contradicts the weight"):
        relprop.from_onnx(b.model(b.node("Flatten", [y]), IMG))


def test_geometry_contradiction_names_the_node():
    """A flatten whose size disagrees with the dense layer after it: found by the net's shape check."""
    b = Builder()
    h = b.node("Flatten", [b.conv("x", 3, 2, 3)])
    y = b.node("MatMul", [h, b.w(50, 4)], name="fc")
    with pytest.raises(ValueError, match=r"'fc' \(MatMul\).*50 input features.*72"):
        relprop.from_onnx(b.model(y, IMG))


def test_no_onnx_at_import():
    import subprocess
    import sys

    code = "import sys, relprop; assert 'onnx' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_warnings_are_only_for_softmax():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relprop.from_onnx(vgg_graph())


# -- the zoo's ONNX file and the command line --------------------------------------------------------
def test_zoo_digits_resnet_onnx_equals_shipped_net():
    m = relprop.zoo.load("digits_resnet")
    path = relprop.zoo.onnx_path("digits_resnet")
    assert path.stat().st_size < 100_000  # tiny
    net = relprop.from_onnx(path)
    assert net.spec() == m.net.spec()
    state = net.state_dict()
    assert sorted(state) == sorted(m.net.state_dict())
    for k, v in m.net.state_dict().items():
        np.testing.assert_array_equal(state[k], v)
    kinds = [e["type"] for e in net.spec()]
    assert kinds.count("add") == 2 and kinds.count("batchnorm2d") == 6
    out = net.forward(m.x)
    np.testing.assert_array_equal(out, m.net.forward(m.x))
    model = onnx.load(str(path))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    expected = np.concatenate([sess.run(None, {name: m.x[i:i + 1]})[0] for i in range(len(m.x))])
    assert_close(out, expected)
    assert np.mean(out.argmax(1) == m.y) >= 0.9


def test_cli_explain_loads_onnx(tmp_path):
    from relprop import cli

    m = relprop.zoo.load("digits_resnet")
    np.save(tmp_path / "x.npy", m.x[:3])
    rc = cli.main(["explain", "--model", str(relprop.zoo.onnx_path("digits_resnet")), "--input",
                   str(tmp_path / "x.npy"), "--method", "lrp.epsilon_plus_flat", "--out", str(tmp_path / "R.npy")])
    assert rc == 0
    R = np.load(tmp_path / "R.npy")
    np.testing.assert_allclose(R, relprop.explain(m.net, m.x[:3], "lrp.epsilon_plus_flat"), rtol=1e-5, atol=1e-7)


def test_cli_demo_digits_resnet(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from relprop import cli

    png, rows = cli.demo("digits_resnet", methods=["gradient", "lrp.epsilon_plus_flat"], out=tmp_path, aopc=False)
    assert png.exists() and len(rows) == 2
    assert "digits_resnet" in capsys.readouterr().out
