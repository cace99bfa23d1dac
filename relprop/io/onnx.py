"""ONNX graphs -> relprop nets: :func:`from_onnx` and :func:`to_spec`.

An ONNX graph of the supported operators (:data:`SUPPORTED_OPS`) becomes a relprop layer
spec plus a PyTorch-style state dict (:func:`relprop.nets.from_spec`'s format): every node
that computes on the activations becomes one layer (``"inputs"`` names its parents when they
are not simply the previous layer), and everything computed from initializers and
``Constant`` nodes alone is folded into the weights.  The mapping:

=====================================  ==================================================
ONNX                                   relprop layer
=====================================  ==================================================
Conv (group 1, 2-D)                    conv2d (a following Add of a per-channel constant
                                       is folded into its bias)
Gemm, MatMul (+ Add of a constant)     linear, W = α·op(B)ᵀ, b = β·C
Relu                                   relu
MaxPool                                maxpool2d (``ceil_mode`` kept)
AveragePool                            avgpool2d (padding counted, as count_include_pad=1)
GlobalAveragePool, ReduceMean(2, 3)    adaptive_avgpool2d(1) (+ flatten when keepdims=0)
BatchNormalization                     batchnorm2d / batchnorm1d (inference statistics)
Add of two activations                 add
Concat (axis 1)                        concat
Flatten(axis=1), Reshape to (N, -1),   flatten (a Reshape that keeps the batch and
Squeeze of the 1×1 spatial axes        flattens the rest, also the fixed [B, F] form)
Identity, Dropout                      nothing (the tensor passes through)
Softmax / LogSoftmax at the end        dropped with a warning: explanations start at the
                                       logits
=====================================  ==================================================

Asymmetric padding (``pads`` begin ≠ end, ``auto_pad`` SAME_*) is folded to the symmetric
padding relprop's layers take when both place the windows identically for the model's
declared input size; otherwise it raises NotImplementedError naming the node.
"""
from __future__ import annotations

import os
import re
import warnings

import numpy as np

__all__ = ["from_onnx", "to_spec", "SUPPORTED_OPS"]

#: ONNX operators (default domain) that :func:`from_onnx` maps to relprop layers
SUPPORTED_OPS = ("Add", "AveragePool", "BatchNormalization", "Concat", "Constant", "Conv", "Dropout", "Flatten",
                 "Gemm", "GlobalAveragePool", "Identity", "LogSoftmax", "MatMul", "MaxPool", "ReduceMean", "Relu",
                 "Reshape", "Shape", "Softmax", "Squeeze")

_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64"}


def _onnx():
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("relprop.from_onnx needs the onnx package: pip install 'relprop[onnx]'") from exc
    return onnx


# -- reading the model ------------------------------------------------------------------------------
def load_model(source):
    """An ``onnx.ModelProto`` from a path, bytes or a ModelProto (external data loaded, checked)."""
    onnx = _onnx()
    from google.protobuf.message import DecodeError

    if isinstance(source, onnx.ModelProto):
        model, what = source, "model"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        what = "ONNX bytes"
        try:
            model = onnx.load_from_string(bytes(source))
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{what}: not an ONNX model (or truncated): {exc}") from exc
    elif isinstance(source, (str, os.PathLike)):
        what = os.fspath(source)
        if not os.path.isfile(what):
            raise FileNotFoundError(f"from_onnx: no such file {what!r}")
        try:
            model = onnx.load(what)  # reads external data (path.onnx.data) from beside the model
        except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{what}: not an ONNX model (or truncated): {type(exc).__name__}: {exc}") from exc
        except (FileNotFoundError, OSError, onnx.checker.ValidationError) as exc:
            raise ValueError(f"{what}: cannot read the model's external data ({exc}); keep the .data file "
                             "beside the model") from exc
    else:
        raise TypeError(f"from_onnx: expected a path, bytes or an onnx.ModelProto, got {type(source).__name__}")
    if model.ir_version <= 0 or not model.HasField("graph") or len(model.graph.node) == 0 or \
            len(model.graph.output) == 0:
        raise ValueError(f"{what}: not an ONNX model (or truncated): no graph, nodes or outputs "
                         f"(ir_version {model.ir_version}, {len(model.graph.node)} nodes)")
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError(f"{what}: initializer {init.name!r} keeps its data in an external file that was not "
                             "loaded; load the model with onnx.load(path) (the .data file beside it) or pass the "
                             "path to from_onnx")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise ValueError(f"{what}: invalid ONNX model: {first}") from exc
    return model


def _tensor(init, what):
    """numpy array of a TensorProto; refuses external data that was not loaded."""
    onnx = _onnx()
    if init.data_location == onnx.TensorProto.EXTERNAL:
        raise ValueError(f"{what}: initializer {init.name!r} keeps its data in an external file that was not "
                         "loaded; load the model with onnx.load(path) or pass the path to from_onnx")
    return onnx.numpy_helper.to_array(init)


# -- the converter ----------------------------------------------------------------------------------
class _Act:
    """An activation tensor: produced by relprop layer ``layer`` (or the net input, -1), per-sample ``shape``.

    ``shape`` holds the dimensions after the batch, each an int or None (unknown).
    ``fresh`` is True for the bias-free output of a MatMul, Gemm or Conv straight out of its
    layer, so that a following Add of a constant can become that layer's bias.
    """

    __slots__ = ("layer", "shape", "fresh")

    def __init__(self, layer, shape, fresh=False):
        self.layer, self.shape, self.fresh = layer, tuple(shape), fresh


def _where(node, k):
    name = node.name or f"#{k} -> {node.output[0] if node.output else '?'}"
    return f"node {name!r} ({node.op_type})"


def _attrs(node):
    onnx = _onnx()
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _prod(dims):
    return None if any(d is None for d in dims) else int(np.prod(dims, dtype=np.int64))


def _pool_out(n, k, s, pb, pe, d, ceil):
    """Output length of a sliding window (PyTorch's and ONNX's rule, incl. ceil_mode)."""
    span = d * (k - 1) + 1
    num = n + pb + pe - span
    out = (-(-num // s) if ceil else num // s) + 1
    if ceil and (out - 1) * s >= n + pb:  # the last window must start inside the input or the left padding
        out -= 1
    return out


class _Converter:
    def __init__(self, model, what):
        self.what = what
        self.model = model
        graph = model.graph
        self.consts = {}
        for init in graph.initializer:
            self.consts[init.name] = _tensor(init, what)
        for sparse in graph.sparse_initializer:
            raise ValueError(f"{what}: sparse initializer {sparse.values.name!r} is not supported")
        self.acts = {}
        self.spec, self.weights, self.origin = [], {}, []
        self.input_name, self.input_shape, self.export_batch = self._read_input(graph)
        self.acts[self.input_name] = _Act(-1, self.input_shape)
        self.consumers = {}
        for node in graph.node:
            for name in node.input:
                if name:
                    self.consumers[name] = self.consumers.get(name, 0) + 1
        if len(graph.output) != 1:
            raise ValueError(f"{what}: the graph has {len(graph.output)} outputs "
                             f"({', '.join(o.name for o in graph.output)}); relprop nets have one output")
        self.output_name = graph.output[0].name
        for o in graph.output:
            self.consumers[o.name] = self.consumers.get(o.name, 0) + 1

    # -- input ------------------------------------------------------------------------------------
    def _read_input(self, graph):
        inits = set(self.consts)
        inputs = [i for i in graph.input if i.name not in inits]
        if len(inputs) != 1:
            names = ", ".join(repr(i.name) for i in inputs) or "none"
            raise ValueError(f"{self.what}: the graph has {len(inputs)} inputs ({names}); relprop nets take one "
                             "input of shape (N, C, H, W) or (N, D)")
        inp = inputs[0]
        ttype = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise ValueError(f"{self.what}: input {inp.name!r} is not a tensor")
        if ttype.elem_type not in _FLOAT_TYPES:
            raise ValueError(f"{self.what}: input {inp.name!r} has element type "
                             f"{_onnx().helper.tensor_dtype_to_np_dtype(ttype.elem_type)}; expected a float tensor")
        if not ttype.HasField("shape"):
            raise ValueError(f"{self.what}: input {inp.name!r} declares no shape; expected (N, C, H, W) or (N, D)")
        dims = []
        for d in ttype.shape.dim:
            dims.append(int(d.dim_value) if d.HasField("dim_value") else None)
        if len(dims) not in (2, 4):
            raise ValueError(f"{self.what}: input {inp.name!r} has rank {len(dims)} (shape "
                             f"{_show(dims)}); expected (N, C, H, W) or (N, D) with the batch first")
        if dims[0] is not None and any(d is None for d in dims[1:]):
            free = [k for k, d in enumerate(dims) if d is None]
            raise ValueError(f"{self.what}: input {inp.name!r} has shape {_show(dims)}: the free (batch) dimension "
                             f"is axis {free[0]}, not the first; relprop nets take the batch first, "
                             "(N, C, H, W) or (N, D)")
        return inp.name, tuple(dims[1:]), dims[0]

    # -- helpers ----------------------------------------------------------------------------------
    def act(self, node, k, j, what="input"):
        name = node.input[j] if j < len(node.input) else ""
        if name in self.acts:
            return self.acts[name]
        if name in self.consts:
            raise NotImplementedError(f"{_where(node, k)}: {what} {j} ({name!r}) is a constant; relprop expects "
                                      "an activation there")
        raise ValueError(f"{_where(node, k)}: input {name!r} is produced by no node of the graph")

    def const(self, node, k, j, what="input", optional=False):
        name = node.input[j] if j < len(node.input) else ""
        if not name:
            if optional:
                return None
            raise ValueError(f"{_where(node, k)}: {what} (input {j}) is missing")
        if name in self.consts:
            return self.consts[name]
        raise NotImplementedError(f"{_where(node, k)}: {what} (input {j}, {name!r}) is computed from the net "
                                  "input; relprop needs a constant (an initializer or a Constant node) there")

    def emit(self, entry, parents, shape, node, k, weights=None, fresh=False):
        i = len(self.spec)
        default = [i - 1] if i > 0 else [-1]
        parents = [int(p) for p in parents]
        if parents != default:
            entry = dict(entry, inputs=["input" if p < 0 else p for p in parents])
        self.spec.append(entry)
        self.origin.append(_where(node, k))
        for key, v in (weights or {}).items():
            self.weights[f"{i}.{key}"] = v
        self.acts[node.output[0]] = _Act(i, shape, fresh)
        return i

    def alias(self, node, src):
        self.acts[node.output[0]] = _Act(src.layer, src.shape, False)

    def unused_outputs(self, node, k, first=1):
        for name in node.output[first:]:
            if name and self.consumers.get(name):
                raise NotImplementedError(f"{_where(node, k)}: output {name!r} is used; relprop takes only the "
                                          "first output of this operator")

    # -- driver -----------------------------------------------------------------------------------
    def run(self):
        graph = self.model.graph
        needed = self._needed(graph)
        for k, node in enumerate(graph.node):
            if not any(o in needed for o in node.output):
                continue  # feeds nothing that reaches the output
            if node.domain not in ("", "ai.onnx"):
                raise ValueError(f"{_where(node, k)}: operator {node.domain}.{node.op_type} is not supported; "
                                 f"supported (default domain): {', '.join(SUPPORTED_OPS)}")
            if node.op_type == "Constant":
                self.consts[node.output[0]] = self._constant(node, k)
                continue
            ins = [n for n in node.input if n]
            if ins and all(n in self.consts for n in ins):
                self._fold(node, k)
                continue
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None:
                raise ValueError(f"{_where(node, k)}: operator {node.op_type} is not supported; supported: "
                                 f"{', '.join(SUPPORTED_OPS)}")
            handler(node, k, _attrs(node))
        out = self.acts.get(self.output_name)
        if out is None:
            raise ValueError(f"{self.what}: the graph output {self.output_name!r} does not depend on the input")
        if out.layer < 0:
            raise ValueError(f"{self.what}: the graph output is the input itself; there are no layers to explain")
        if out.layer != len(self.spec) - 1:
            raise ValueError(f"{self.what}: the graph output is layer {out.layer}'s output but layers follow it "
                             f"({self.origin[out.layer + 1]}); relprop's output is the last layer")
        return self.spec, self.weights

    def _needed(self, graph):
        needed, producers = {self.output_name}, {}
        for node in graph.node:
            for o in node.output:
                producers[o] = node
        stack = [self.output_name]
        while stack:
            node = producers.get(stack.pop())
            if node is None:
                continue
            for name in node.input:
                if name and name not in needed:
                    needed.add(name)
                    stack.append(name)
        return needed

    def _constant(self, node, k):
        onnx = _onnx()
        a = _attrs(node)
        if "value" in a:
            return _tensor(a["value"], self.what)
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                           ("value_ints", np.int64)):
            if key in a:
                return np.asarray(a[key], dtype=dtype)
        raise ValueError(f"{_where(node, k)}: Constant with {sorted(a)} is not supported "
                         f"(onnx {onnx.__version__}); expected value, value_float(s) or value_int(s)")

    def _fold(self, node, k):
        """A node computing on constants only: evaluate it once with ONNX's reference evaluator."""
        if node.op_type in ("Identity", "Dropout"):
            self.consts[node.output[0]] = self.consts[node.input[0]]
            return
        from onnx.reference import ReferenceEvaluator

        feeds = {n: self.consts[n] for n in node.input if n}
        try:
            outs = ReferenceEvaluator(node).run(None, feeds)
        except Exception as exc:  # the evaluator raises many types; name the node
            raise ValueError(f"{_where(node, k)}: cannot fold this node of constants: {exc}") from exc
        for name, v in zip(node.output, outs):
            if name:
                self.consts[name] = np.asarray(v)

    # -- operators --------------------------------------------------------------------------------
    def _pads(self, node, k, a, x, kernel, strides, dilations, ceil=False):
        """Symmetric (ph, pw) for the node's pads / auto_pad, folding an asymmetric one when it is equivalent."""
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        hw = x.shape[1:3]
        if auto in ("NOTSET", ""):
            pads = list(a.get("pads", [0, 0, 0, 0]))
        elif auto == "VALID":
            pads = [0, 0, 0, 0]
        elif auto in ("SAME_UPPER", "SAME_LOWER"):
            if any(n is None for n in hw):
                raise NotImplementedError(f"{_where(node, k)}: auto_pad={auto} needs the input's spatial size, "
                                          "which the model does not declare")
            total = [max((-(-n // s) - 1) * s + d * (kk - 1) + 1 - n, 0)
                     for n, s, d, kk in zip(hw, strides, dilations, kernel)]
            small = [t // 2 for t in total]
            begin = small if auto == "SAME_UPPER" else [t - s for t, s in zip(total, small)]
            pads = begin + [t - b for t, b in zip(total, begin)]
        else:
            raise ValueError(f"{_where(node, k)}: auto_pad={auto!r} is invalid")
        if len(pads) != 4:
            raise ValueError(f"{_where(node, k)}: pads={pads} is invalid for a 2-D window; expected 4 values")
        begin, end = pads[:2], pads[2:]
        if begin == end:
            return tuple(begin)
        for axis in range(2):
            n = hw[axis]
            if begin[axis] == end[axis]:
                continue
            same = n is not None and _pool_out(n, kernel[axis], strides[axis], begin[axis], end[axis],
                                               dilations[axis], ceil) == \
                _pool_out(n, kernel[axis], strides[axis], begin[axis], begin[axis], dilations[axis], ceil)
            if not same:
                raise NotImplementedError(
                    f"{_where(node, k)}: asymmetric padding pads={pads} (begin {begin}, end {end}) is not "
                    "supported: relprop's layers pad both sides equally, and for this input size the extra "
                    "padding changes the output")
        return tuple(begin)

    def _window(self, node, k, a, x):
        if len(x.shape) != 3:
            raise NotImplementedError(f"{_where(node, k)}: only 2-D windows on (N, C, H, W) are supported, got "
                                      f"input {_show((None,) + x.shape)}")
        kernel = list(a["kernel_shape"]) if "kernel_shape" in a else None
        strides = list(a.get("strides", [1, 1]))
        dilations = list(a.get("dilations", [1, 1]))
        return kernel, strides, dilations

    def op_Conv(self, node, k, a):
        x = self.act(node, k, 0)
        w = self.const(node, k, 1, "the weight")
        b = self.const(node, k, 2, "the bias", optional=True)
        where = _where(node, k)
        group = int(a.get("group", 1))
        if group != 1:
            raise NotImplementedError(f"{where}: grouped convolution (group={group}) is not supported; relprop's "
                                      "conv2d has group 1")
        if w.ndim != 4:
            raise NotImplementedError(f"{where}: only 2-D convolutions are supported; the weight has shape "
                                      f"{tuple(w.shape)}")
        kernel, strides, dilations = self._window(node, k, a, x)
        if kernel is not None and tuple(kernel) != tuple(w.shape[2:]):
            raise ValueError(f"{where}: kernel_shape={kernel} contradicts the weight of shape {tuple(w.shape)}")
        kernel = list(w.shape[2:])
        c = x.shape[0]
        if c is not None and c != w.shape[1]:
            raise ValueError(f"{where}: the weight of shape {tuple(w.shape)} expects {w.shape[1]} input channels, "
                             f"the input has {c} (shape {_show((None,) + x.shape)})")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{where}: the bias has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
        pad = self._pads(node, k, a, x, kernel, strides, dilations)
        out = tuple(None if n is None else _pool_out(n, kk, s, p, p, d, False)
                    for n, kk, s, p, d in zip(x.shape[1:], kernel, strides, pad, dilations))
        entry = {"type": "conv2d", "in": int(w.shape[1]), "out": int(w.shape[0]), "kernel": kernel,
                 "stride": strides, "padding": list(pad), "dilation": dilations}
        weights = {"weight": w} if b is None else {"weight": w, "bias": b}
        self.emit(entry, [x.layer], (int(w.shape[0]),) + out, node, k, weights, fresh=True)

    def _linear(self, node, k, x, w, b):
        """Emit linear with weight w (out, in), bias b (out,) or None."""
        where = _where(node, k)
        if len(x.shape) != 1:
            raise NotImplementedError(f"{where}: a dense layer on an input of shape {_show((None,) + x.shape)}; "
                                      "relprop's linear takes (N, D) (flatten first)")
        if x.shape[0] is not None and x.shape[0] != w.shape[1]:
            raise ValueError(f"{where}: the weight expects {w.shape[1]} input features (shape {tuple(w.shape)} as "
                             f"(out, in)), the input has {x.shape[0]}")
        weights = {"weight": np.ascontiguousarray(w)}
        if b is not None:
            weights["bias"] = np.ascontiguousarray(b)
        entry = {"type": "linear", "in": int(w.shape[1]), "out": int(w.shape[0])}
        self.emit(entry, [x.layer], (int(w.shape[0]),), node, k, weights, fresh=b is None)

    def op_Gemm(self, node, k, a):
        where = _where(node, k)
        if int(a.get("transA", 0)):
            raise ValueError(f"{where}: transA=1 transposes the activation, so the batch would not be first; "
                             "relprop needs (N, D) activations")
        x = self.act(node, k, 0)
        bmat = self.const(node, k, 1, "B (the weight)")
        c = self.const(node, k, 2, "C (the bias)", optional=True)
        if bmat.ndim != 2:
            raise ValueError(f"{where}: B has shape {tuple(bmat.shape)}, expected a matrix")
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        w = bmat if int(a.get("transB", 0)) else bmat.T  # (out, in)
        if alpha != 1.0:
            w = (alpha * w).astype(bmat.dtype)
        bias = None
        if c is not None:
            bias = self._bias(node, k, c, w.shape[0], "C")
            if beta != 1.0:
                bias = (beta * bias).astype(bias.dtype)
        self._linear(node, k, x, w, bias)

    def _bias(self, node, k, c, out, name, conv=False):
        """A constant that broadcasts along the output features / channels only -> (out,)."""
        c = np.asarray(c)
        ok_shapes = {(), (1,), (out,), (1, out)} if not conv else {(), (1,), (out, 1, 1), (1, out, 1, 1)}
        if tuple(c.shape) not in ok_shapes:
            want = "(out,) or (1, out)" if not conv else "(C, 1, 1) or (1, C, 1, 1)"
            raise ValueError(f"{_where(node, k)}: {name} has shape {tuple(c.shape)}; a bias must broadcast over the "
                             f"{out} {'channels' if conv else 'output features'} only, {want}")
        if not np.issubdtype(c.dtype, np.floating):
            raise TypeError(f"{_where(node, k)}: {name} has dtype {c.dtype}, expected a float tensor")
        return np.ascontiguousarray(np.broadcast_to(c.reshape(-1) if c.size > 1 else c.reshape(()), (out,)))

    def op_MatMul(self, node, k, a):
        x = self.act(node, k, 0)
        w = self.const(node, k, 1, "the weight")
        if w.ndim != 2:
            raise NotImplementedError(f"{_where(node, k)}: MatMul with a weight of shape {tuple(w.shape)}; relprop "
                                      "supports (N, D) @ (D, out) as a linear layer")
        self._linear(node, k, x, w.T, None)

    def op_Add(self, node, k, a):
        names = list(node.input)
        acts = [n for n in names if n in self.acts]
        if len(acts) == 2:
            xa, xb = self.acts[names[0]], self.acts[names[1]]
            if xa.shape != xb.shape and all(d is not None for d in xa.shape + xb.shape):
                raise NotImplementedError(f"{_where(node, k)}: adds tensors of shapes {_show((None,) + xa.shape)} "
                                          f"and {_show((None,) + xb.shape)}; relprop's add needs equal shapes")
            shape = tuple(p if p is not None else q for p, q in zip(xa.shape, xb.shape))
            self.emit({"type": "add"}, [xa.layer, xb.layer], shape, node, k)
            return
        j = 0 if names[0] in self.acts else 1
        x, c = self.acts[names[j]], self.consts[names[1 - j]]
        layer = x.layer
        if not (x.fresh and self.consumers.get(names[j], 0) == 1):
            raise NotImplementedError(
                f"{_where(node, k)}: adds a constant to an activation that is not the output of a MatMul, Gemm "
                "or Conv used only here; relprop supports such an Add only as a bias")
        entry = self.spec[layer]
        conv = entry["type"] == "conv2d"
        out = entry["out"]
        bias = self._bias(node, k, c, out, "the added constant", conv=conv)
        key = f"{layer}.bias"
        if key in self.weights:
            bias = self.weights[key] + bias
        w = self.weights[f"{layer}.weight"]
        self.weights[key] = np.ascontiguousarray(bias.astype(w.dtype))
        self.acts[node.output[0]] = _Act(layer, x.shape, False)
        self.origin[layer] += f" + {_where(node, k)}"

    def op_Relu(self, node, k, a):
        x = self.act(node, k, 0)
        self.emit({"type": "relu"}, [x.layer], x.shape, node, k)

    def _pool_window(self, node, k, a, x):
        """(kernel, strides, pads, ceil_mode, output size in floor mode, in ceil mode) of a 2-D pooling
        node; a size is None where the input's is not declared."""
        kernel, strides, dilations = self._window(node, k, a, x)
        if kernel is None:
            raise ValueError(f"{_where(node, k)}: kernel_shape is missing")
        if dilations != [1, 1]:
            raise NotImplementedError(f"{_where(node, k)}: dilated pooling (dilations={dilations}) is not supported")
        ceil = bool(a.get("ceil_mode", 0))
        pad = self._pads(node, k, a, x, kernel, strides, dilations, ceil)

        def size(ceil_mode):
            return tuple(None if n is None else _pool_out(n, kk, s, p, p, 1, ceil_mode)
                         for n, kk, s, p in zip(x.shape[1:], kernel, strides, pad))

        return kernel, strides, pad, ceil, size(False), size(True)

    def op_MaxPool(self, node, k, a):
        x = self.act(node, k, 0)
        self.unused_outputs(node, k)
        kernel, strides, pad, ceil, floor, ceiled = self._pool_window(node, k, a, x)
        out = ceiled if ceil else floor
        entry = {"type": "maxpool2d", "kernel": kernel, "stride": strides, "padding": list(pad)}
        if ceil and out != floor:  # ceil_mode that changes nothing for the declared size is left out
            entry["ceil_mode"] = True
        self.emit(entry, [x.layer], (x.shape[0],) + out, node, k)

    def op_AveragePool(self, node, k, a):
        x = self.act(node, k, 0)
        where = _where(node, k)
        kernel, strides, pad, ceil, out, ceiled = self._pool_window(node, k, a, x)
        if ceil and any(n is None for n in x.shape[1:]):
            raise NotImplementedError(f"{where}: ceil_mode=1 needs the input's spatial size, which the model does "
                                      "not declare")
        if ceil and out != ceiled:
            raise NotImplementedError(f"{where}: ceil_mode=1 average pooling with a partial last window is not "
                                      "supported (relprop's avgpool2d has no ceil_mode)")
        if any(pad) and not int(a.get("count_include_pad", 0)):
            raise NotImplementedError(f"{where}: count_include_pad=0 with padding {list(pad)} is not supported; "
                                      "relprop's avgpool2d counts the padding (count_include_pad=1)")
        entry = {"type": "avgpool2d", "kernel": kernel, "stride": strides, "padding": list(pad)}
        self.emit(entry, [x.layer], (x.shape[0],) + out, node, k)

    def _global_pool(self, node, k, x, keepdims):
        i = self.emit({"type": "adaptive_avgpool2d", "output_size": 1}, [x.layer], (x.shape[0], 1, 1), node, k)
        if not keepdims:
            self.emit({"type": "flatten"}, [i], (x.shape[0],), node, k)

    def op_GlobalAveragePool(self, node, k, a):
        x = self.act(node, k, 0)
        if len(x.shape) != 3:
            raise NotImplementedError(f"{_where(node, k)}: only (N, C, H, W) inputs are supported, got "
                                      f"{_show((None,) + x.shape)}")
        self._global_pool(node, k, x, True)

    def op_ReduceMean(self, node, k, a):
        x = self.act(node, k, 0)
        where = _where(node, k)
        if len(node.input) > 1 and node.input[1]:
            axes = [int(v) for v in np.asarray(self.const(node, k, 1, "axes")).reshape(-1)]
        else:
            axes = [int(v) for v in a.get("axes", [])]
        rank = len(x.shape) + 1
        axes = sorted({ax + rank if ax < 0 else ax for ax in axes})
        if axes != [2, 3] or rank != 4:
            raise NotImplementedError(f"{where}: ReduceMean over axes {axes or 'all'} of a rank-{rank} tensor; "
                                      "relprop supports the mean over the spatial axes (2, 3) of (N, C, H, W) only "
                                      "(global average pooling)")
        self._global_pool(node, k, x, bool(a.get("keepdims", 1)))

    def op_BatchNormalization(self, node, k, a):
        x = self.act(node, k, 0)
        where = _where(node, k)
        self.unused_outputs(node, k)
        if int(a.get("training_mode", 0)):
            raise NotImplementedError(f"{where}: training_mode=1 (batch statistics); export the model in eval mode")
        names = ("scale", "B", "input_mean", "input_var")
        scale, bias, mean, var = (self.const(node, k, j + 1, n) for j, n in enumerate(names))
        c = scale.shape[0] if scale.ndim == 1 else None
        for n, v in zip(names, (scale, bias, mean, var)):
            if v.ndim != 1 or v.shape[0] != c:
                raise ValueError(f"{where}: {n} has shape {tuple(v.shape)}, expected ({c},) like scale")
        if x.shape[0] is not None and x.shape[0] != c:
            raise ValueError(f"{where}: the statistics have {c} channels, the input has {x.shape[0]} "
                             f"(shape {_show((None,) + x.shape)})")
        if len(x.shape) == 3:
            kind = "batchnorm2d"
        elif len(x.shape) == 1:
            kind = "batchnorm1d"
        else:
            raise NotImplementedError(f"{where}: BatchNormalization of a rank-{len(x.shape) + 1} tensor")
        if np.any(np.asarray(var) < 0):
            raise ValueError(f"{where}: input_var has negative entries")
        entry = {"type": kind, "features": int(c), "eps": float(a.get("epsilon", 1e-5))}
        weights = {"weight": scale, "bias": bias, "running_mean": mean, "running_var": var}
        self.emit(entry, [x.layer], x.shape, node, k, weights)

    def op_Concat(self, node, k, a):
        where = _where(node, k)
        xs = [self.act(node, k, j) for j in range(len(node.input))]
        rank = len(xs[0].shape) + 1
        axis = int(a["axis"])
        axis = axis + rank if axis < 0 else axis
        if axis == 0:
            raise ValueError(f"{where}: concatenation along the batch axis 0 is not supported")
        if axis != 1:
            raise NotImplementedError(f"{where}: concatenation along axis {axis}; relprop concatenates channels / "
                                      "features (axis 1) only")
        if len(xs) == 1:
            self.alias(node, xs[0])
            return
        if any(len(x.shape) != rank - 1 or any(p is not None and q is not None and p != q for p, q in
                                                zip(x.shape[1:], xs[0].shape[1:])) for x in xs):
            raise ValueError(f"{where}: inputs of shapes {[_show((None,) + x.shape) for x in xs]} do not "
                             "concatenate along axis 1")
        chans = [x.shape[0] for x in xs]
        shape = (None if None in chans else sum(chans),) + xs[0].shape[1:]
        self.emit({"type": "concat", "axis": 1}, [x.layer for x in xs], shape, node, k)

    def _flatten(self, node, k, x):
        if len(x.shape) == 1:
            self.alias(node, x)
        else:
            self.emit({"type": "flatten"}, [x.layer], (_prod(x.shape),), node, k)

    def op_Flatten(self, node, k, a):
        x = self.act(node, k, 0)
        rank = len(x.shape) + 1
        axis = int(a.get("axis", 1))
        axis = axis + rank if axis < 0 else axis
        if axis != 1:
            raise NotImplementedError(f"{_where(node, k)}: Flatten(axis={a.get('axis', 1)}) of a rank-{rank} "
                                      "tensor; relprop flattens everything but the batch (axis=1) only")
        self._flatten(node, k, x)

    def op_Reshape(self, node, k, a):
        x = self.act(node, k, 0)
        target = [int(v) for v in np.asarray(self.const(node, k, 1, "shape")).reshape(-1)]
        allowzero = int(a.get("allowzero", 0))
        feat = _prod(x.shape)
        where = _where(node, k)
        if len(target) == 2:
            first, second = target
            keeps_batch = (first == 0 and not allowzero) or \
                (first == -1 and feat is not None and second == feat) or \
                (first > 0 and feat is not None and second == feat) or \
                (first > 0 and second == -1 and first == self.export_batch)
            flattens = second == -1 or (feat is not None and second == feat)
            if keeps_batch and flattens:
                self._flatten(node, k, x)
                return
        if len(target) == len(x.shape) + 1 and all(
                t == d or (t == 0 and not allowzero) for t, d in zip(target[1:], x.shape)) and \
                (target[0] in (0, -1) or target[0] == self.export_batch):
            self.alias(node, x)  # reshapes to the shape it has
            return
        raise NotImplementedError(f"{where}: Reshape of {_show((None,) + x.shape)} to {target}; relprop supports "
                                  "Reshape to (N, -1) (flatten, incl. a fixed [batch, features] shape) only")

    def op_Squeeze(self, node, k, a):
        x = self.act(node, k, 0)
        if len(node.input) > 1 and node.input[1]:
            axes = [int(v) for v in np.asarray(self.const(node, k, 1, "axes")).reshape(-1)]
        else:
            axes = [int(v) for v in a.get("axes", [])]
        rank = len(x.shape) + 1
        axes = sorted({ax + rank if ax < 0 else ax for ax in axes})
        if rank == 4 and axes == [2, 3] and x.shape[1:] == (1, 1):
            self._flatten(node, k, x)
            return
        raise NotImplementedError(f"{_where(node, k)}: Squeeze of axes {axes} of {_show((None,) + x.shape)}; "
                                  "relprop supports squeezing the 1x1 spatial axes after global pooling only")

    def op_Shape(self, node, k, a):
        """The shape at the export's batch size, as a constant: how exporters write ``x.view(x.size(0), -1)``.

        Only a Reshape may use it, and Reshape accepts the export batch as "keep the batch", so the net
        still takes any batch size.
        """
        x = self.act(node, k, 0)
        full = (self.export_batch,) + x.shape
        if any(d is None for d in full):
            raise NotImplementedError(f"{_where(node, k)}: Shape of a tensor of shape {_show(full)}: relprop folds "
                                      "Shape only when the model declares every dimension (export it at a fixed "
                                      "batch size)")
        start, end = int(a.get("start", 0)), a.get("end")
        self.consts[node.output[0]] = np.array(full[start:None if end is None else int(end)], dtype=np.int64)

    def op_Identity(self, node, k, a):
        self.alias(node, self.act(node, k, 0))

    def op_Dropout(self, node, k, a):
        x = self.act(node, k, 0)
        self.unused_outputs(node, k)
        if len(node.input) > 2 and node.input[2]:
            if bool(np.asarray(self.const(node, k, 2, "training_mode"))):
                raise NotImplementedError(f"{_where(node, k)}: Dropout in training mode; export in eval mode")
        self.alias(node, x)

    def _softmax(self, node, k, a):
        x = self.act(node, k, 0)
        where = _where(node, k)
        if node.output[0] != self.output_name:
            raise NotImplementedError(f"{where}: {node.op_type} inside the graph is not supported; only a trailing "
                                      "one (on the logits) is, and it is dropped")
        rank = len(x.shape) + 1
        axis = int(a.get("axis", -1))
        if (axis + rank if axis < 0 else axis) == 0:
            raise ValueError(f"{where}: {node.op_type} over the batch axis")
        warnings.warn(f"{self.what}: dropped the trailing {node.op_type} ({where}); relprop's net outputs the "
                      "logits, where explanations start", UserWarning, stacklevel=4)
        self.alias(node, x)

    op_Softmax = op_LogSoftmax = _softmax


def _show(dims):
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


# -- public -----------------------------------------------------------------------------------------
def to_spec(model):
    """``(spec, weights)`` of an ONNX model in :func:`relprop.nets.from_spec`'s format (see the module doc).

    Parameters
    ----------
    model : str, os.PathLike, bytes or onnx.ModelProto
        A ``.onnx`` file (its external data, e.g. ``model.onnx.data``, is read from beside
        it), its bytes, or a loaded model.
    """
    model = load_model(model)
    what = model.graph.name or "ONNX model"
    return _Converter(model, f"ONNX graph {what!r}").run()


def from_onnx(model):
    """Load an ONNX model as a relprop net.

    ``relprop.from_onnx(path_or_ModelProto)``: the graph's operators become relprop layers
    (see :mod:`relprop.io.onnx` for the mapping and :data:`SUPPORTED_OPS`), the initializers
    their weights, in PyTorch's layouts.  A trailing Softmax/LogSoftmax is dropped with a
    warning.  The net takes the batch first, at any batch size (a model exported at batch 2
    explains batch 5).

    Parameters
    ----------
    model : str, os.PathLike, bytes or onnx.ModelProto

    Returns
    -------
    relprop.nets net (``relprop.nets.Graph``; a chain is a ``Sequential``)

    Raises
    ------
    ValueError
        Not an ONNX file (or truncated), an unsupported operator (naming the node, its op type
        and :data:`SUPPORTED_OPS`), more than one input or output, a batch that is not the
        first axis, weights whose shapes contradict the graph.
    NotImplementedError
        A supported operator with settings relprop cannot represent (grouped convolution,
        asymmetric padding that changes the output, ReduceMean over other axes, ...).
    """
    from ..nets.io import from_spec

    model = load_model(model)
    what = f"ONNX graph {model.graph.name!r}" if model.graph.name else "ONNX model"
    conv = _Converter(model, what)
    spec, weights = conv.run()
    try:
        net = from_spec(spec, weights)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{what}: {_with_origin(str(exc), conv.origin)}") from exc
    shape = conv.input_shape
    if all(d is not None for d in shape):
        try:
            net.shapes((1,) + tuple(shape))
        except ValueError as exc:
            raise ValueError(f"{what}: the weights contradict the graph for its input shape "
                             f"{_show((None,) + shape)}: {_with_origin(str(exc), conv.origin)}") from exc
    return net


def _with_origin(message, origin):
    m = re.match(r"layer (\d+)", message)
    if m and int(m.group(1)) < len(origin):
        return f"{message} [layer {m.group(1)} is {origin[int(m.group(1))]}]"
    return message

