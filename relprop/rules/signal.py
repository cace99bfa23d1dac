r"""Backward *signals* (not relevance) as rules: gradient, DeconvNet, Guided Backprop.

All three pass :math:`W^\top g` through dense and conv layers, route max-pool through the
switches recorded by the forward pass, spread average pooling and reshape flatten
(each layer's own VJP).  They differ only at ReLUs, with forward pre-activation z:

- :class:`Gradient` (saliency, [Simonyan2013]_): :math:`g^{\mathrm{in}} = g \cdot 1[z > 0]`
- :class:`DeconvNet` ([Zeiler2014]_): :math:`g^{\mathrm{in}} = \max(g, 0)` (the forward mask is ignored)
- :class:`GuidedBackprop` ([Springenberg2014]_): :math:`g^{\mathrm{in}} = \max(g, 0) \cdot 1[z > 0]`

The methods ``deconvnet`` and ``guided_backprop`` start from the one-hot of the target
class (docs/conventions.md).  Inside a relevance sweep (a ``{layer: rule}`` dict), :class:`Gradient`
on a dense/conv layer passes :math:`W^\top R` unnormalised and on a ReLU gates it.

References
----------
.. [Simonyan2013] K. Simonyan, A. Vedaldi, A. Zisserman. Deep inside convolutional networks: visualising image
   classification models and saliency maps. arXiv:1312.6034, 2013.
.. [Zeiler2014] M. D. Zeiler, R. Fergus. Visualizing and understanding convolutional networks. ECCV 2014.
.. [Springenberg2014] J. T. Springenberg, A. Dosovitskiy, T. Brox, M. Riedmiller. Striving for simplicity: the
   all convolutional net. arXiv:1412.6806, 2014.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import _config
from .._backend import array_namespace, to_numpy
from ..kernels import _ops
from ..nets.layers import LAYER_TYPES
from .core import LINEAR_KINDS, Rule, Unpooled, _snapshot, _unchanged, kept_beside_weights

__all__ = ["Gradient", "DeconvNet", "GuidedBackprop", "Pattern", "gradient_sweep"]

_ALL_KINDS = tuple(LAYER_TYPES)


@dataclass(frozen=True)
class Gradient(Rule):
    r"""The gradient: every layer's vector-Jacobian product, :math:`g^{\mathrm{in}} = J^\top g`.

    ReLU: :math:`g \cdot 1[z > 0]`; max-pool: g to the switch of its window (winner takes
    all, which is also LRP's max-pool rule); dense/conv: :math:`W^\top g`; flatten: reshape.
    """

    kinds = _ALL_KINDS
    #: reads no pre-activation z of a conv + ReLU pair (its ReLU gates by relu(z) > 0, the same as z > 0)
    needs_preactivations = False

    def backward(self, layer, rec, r, state):
        return layer.vjp(r, rec.a, rec.z, rec.aux, rec.backend)

    def reads_records(self, layer):
        return layer.kind != "maxpool2d"  # a max-pool's VJP reads its switches and its input's shape only


@dataclass(frozen=True)
class DeconvNet(Gradient):
    r"""DeconvNet [Zeiler2014]_: the gradient with the ReLU backward :math:`\max(g, 0)`,
    ignoring the forward mask; max-pool unpools through the recorded switches."""

    def backward(self, layer, rec, r, state):
        if layer.kind == "relu":
            return _ops.relu_backward_deconvnet(r, rec.backend)
        return super().backward(layer, rec, r, state)


@dataclass(frozen=True)
class GuidedBackprop(Gradient):
    r"""Guided Backprop [Springenberg2014]_: the gradient with the ReLU backward
    :math:`\max(g, 0) \cdot 1[z > 0]` (gate by the forward mask and rectify)."""

    def backward(self, layer, rec, r, state):
        if layer.kind == "relu":
            return _ops.relu_backward_guided(r, rec.z if rec.a is None else rec.a, rec.backend)  # z > 0 iff relu(z) > 0
        return super().backward(layer, rec, r, state)


@dataclass(frozen=True, eq=False)
class GateBeforeUnpool(Rule):
    r"""A max-pool whose only input is a ReLU, with that ReLU's backward moved below the pool:
    the ReLU's rule applied to g at the pooled side (gated by the pooled maxima y), then the
    unpooling; the ReLU itself then passes its signal on unchanged.

    Exact: the unpooling sends :math:`g_w` of window w to its switch :math:`s_w` only, where the
    ReLU's output is :math:`a_{s_w} = y_w`, so :math:`1[a_{s_w} > 0] = 1[y_w > 0]` and, windows
    apart (stride ≥ kernel), :math:`\max(g_w, 0)` is the same on either side; every other input
    position gets 0 both ways.  The gate then reads and writes the pooled arrays, a quarter of the
    full-size pass it replaces (which read the unpooled g and the ReLU's output from memory).
    """

    relu_layer: object
    relu_rule: Rule
    pool_rule: Rule
    #: hand the gated signal down still pooled (:class:`relprop.rules.core.Unpooled`), to a conv below the
    #: ReLU whose rule unpools it in its transposed pass (:class:`VjpOfUnpooled`)
    unpooled: bool = False
    kinds = ("maxpool2d",)
    needs_preactivations = False

    def reads_records(self, layer):
        return self.pool_rule.reads_records(layer)  # the gate reads the pooled maxima y, the pool's own output

    def backward(self, layer, rec, r, state):
        from ..engine import Record

        pooled = Record(None, rec.z, None, rec.backend)  # y stands in for the ReLU's output at the switches
        g = self.relu_rule.backward(self.relu_layer, pooled, r, state)
        if self.unpooled:
            return Unpooled(g, rec.switches, tuple(rec.a.shape))
        return self.pool_rule.backward(layer, rec, g, state)


@dataclass(frozen=True)
class VjpOfUnpooled(Rule):
    """The conv of a conv, ReLU, 2x2 max-pool triple under :class:`GateBeforeUnpool` with ``unpooled``: its
    VJP of the gated signal still on the pool's side, Wᵀ unpool(g) in one kernel call
    (:meth:`relprop.nets.layers.Conv2d.vjp_unpooled`: the unpooled map is never written whole); ``rule``
    (the conv's own) for any other signal."""

    rule: Rule
    kinds = ("conv2d",)
    needs_preactivations = False

    def reads_records(self, layer):
        return self.rule.reads_records(layer)

    def backward(self, layer, rec, r, state):
        if isinstance(r, Unpooled):
            w, _ = layer.params(r.g)
            return layer.vjp_unpooled(r.g, r.switches, w, None, rec.a.shape, rec.backend)
        return self.rule.backward(layer, rec, r, state)


def gates_before_unpools(net, rules):
    """``(rules', spans)``: ``rules`` with every ReLU → max-pool pair (the pool the ReLU's only
    reader, both under gradient-type rules) rewritten as :class:`GateBeforeUnpool` on the pool and a
    pass-through on the ReLU, and the (ReLU, pool) index pairs; ``(None, [])`` if there is no such
    pair.  Where the ReLU's input is the conv of a conv, ReLU, 2x2 max-pool triple
    (``Graph._conv_relu_pool``), the gated signal goes down still pooled and the conv's rule becomes
    :class:`VjpOfUnpooled` (``_config.UNPOOL_IN_VJP``).  For sweeps run down to the input without
    per-layer signals, from a layer not between the two of a pair (the signal between them changes:
    gated before the ReLU instead of after it)."""
    from .core import Pass

    signal_rules = (Gradient, DeconvNet, GuidedBackprop)
    out, spans = list(rules), []
    for i, layer in enumerate(net.layers):
        readers = net.readers(i)
        if layer.kind != "relu" or len(readers) != 1 or type(rules[i]) not in signal_rules:
            continue
        j = readers[0]
        pool = net.layers[j]
        if pool.kind != "maxpool2d" or net.parents(j) != (i,) or type(rules[j]) not in signal_rules:
            continue
        overlap = any(s < k for s, k in zip(pool.stride, pool.kernel))
        if overlap and type(rules[i]) is not Gradient:  # max(Σ g, 0) ≠ Σ max(g, 0) where windows share a switch
            continue
        # a conv + ReLU + 2x2 max-pool triple: the conv unpools the gated signal in its own transposed pass
        conv = net.parents(i)[0] if len(net.parents(i)) == 1 else None
        fuse = (_config.UNPOOL_IN_VJP and conv is not None and conv >= 0 and net._conv_relu_pool(conv)
                and conv + 1 == i and type(rules[conv]) in signal_rules)
        out[i], out[j] = Pass(), GateBeforeUnpool(layer, rules[i], rules[j], unpooled=fuse)
        if fuse:
            out[conv] = VjpOfUnpooled(rules[conv])
        spans.append((i, j))
    return (out, spans) if spans else (None, [])


def gradient_sweep(net, relu="gradient", times_input=False, name="gradient"):
    """The gradient-type sweep of ``net``: every layer's VJP, the ReLU backward chosen by ``relu``
    ("gradient": g·1[z > 0], "deconvnet": max(g, 0), "guided": max(g, 0)·1[z > 0]).  A ReLU
    read only by a max-pool gates below it (:class:`GateBeforeUnpool`) where the sweep runs whole."""
    from ..engine import Sweep

    rules = {"gradient": Gradient, "deconvnet": DeconvNet, "guided": GuidedBackprop}
    if relu not in rules:
        raise ValueError(f"relu={relu!r} is invalid; expected 'gradient', 'deconvnet' or 'guided'")
    plain = [rules[relu]()] * len(net.layers)
    whole, spans = gates_before_unpools(net, plain)
    return Sweep(net, plain, start="onehot", times_input=times_input, name=name, whole_rules=whole, whole_spans=spans)


@dataclass(frozen=True, eq=False)
class Pattern(Rule):
    r"""PatternNet / PatternAttribution at a dense/conv layer [Kindermans2018]_: the transposed
    pass with the pattern matrix in place of W, :math:`g^{\mathrm{in}} = A^\top g`
    (``times_weight=False``, PatternNet: the signal) or :math:`(W \odot A)^\top g`
    (``times_weight=True``, PatternAttribution).  ``matrix`` is shaped like the layer's
    weight (float64 on the host), or ``"filter"`` for the filter estimator S_w's
    A = W / ‖w_j‖²; W ⊙ A and S_w are formed from the layer's current weight, so a changed
    weight is never combined with a stale product, in place changes too: on NumPy kept beside the
    layer's weights (:func:`relprop.rules.core.kept_beside_weights`) or in the explainer with a copy of
    them, compared on each call; elsewhere formed on every call.  (Kept in the explainer alone, a weight
    changed in place went on with the old product.)

    .. [Kindermans2018] P.-J. Kindermans et al. Learning how to explain neural networks:
       PatternNet and PatternAttribution. ICLR 2018.
    """

    matrix: object = field(repr=False)
    times_weight: bool = False
    kinds = LINEAR_KINDS

    def backward(self, layer, rec, r, state):
        xp = array_namespace(r)
        if not (self.times_weight or isinstance(self.matrix, str)):  # A alone: the weights play no part
            key = ("pattern", xp.__name__, np.dtype(r.dtype).str)
            m = state.get(key)
            if m is None:
                m = state[key] = self._matrix(layer, r, xp)
        elif kept_beside_weights(layer, layer.weight, xp):
            from ..kernels.cpu._derived import derived

            m = derived(layer.weight, ("pattern", self, np.dtype(r.dtype).str), lambda: self._matrix(layer, r, xp))
        elif xp is np:  # kept here with a copy of the weights, compared on each call (cheaper than forming it)
            key = ("pattern", xp.__name__, np.dtype(r.dtype).str)
            hit = state.get(key)
            if hit is None or not _unchanged(hit[1]):
                hit = state[key] = (self._matrix(layer, r, xp), _snapshot((layer.weight,)))
            m = hit[0]
        else:
            m = self._matrix(layer, r, xp)
        shape = rec.a.shape
        return layer.vjp_with(r, m, shape, rec.backend)

    def _matrix(self, layer, r, xp):
        """The matrix of the transposed pass, A or W ⊙ A, from the layer's current weight (float64 on the host,
        then ``r``'s namespace and dtype)."""
        w = np.asarray(to_numpy(layer.weight), dtype=np.float64)
        if isinstance(self.matrix, str):  # "filter", S_w: a = w / (wᵀw) per unit, from the layer's current weight
            flat = w.reshape(w.shape[0], -1)
            norm2 = (flat * flat).sum(axis=1)
            host = (flat / np.where(norm2 > 0, norm2, 1.0)[:, None]).reshape(w.shape)
        else:
            host = np.asarray(to_numpy(self.matrix), dtype=np.float64)
        if self.times_weight:
            host = w * host
        return xp.ascontiguousarray(xp.asarray(host, dtype=r.dtype))
