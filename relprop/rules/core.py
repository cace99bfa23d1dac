r"""The generic backward step of every rule, and the sweep that walks a net with it.

A rule says how the signal or relevance at a layer's output becomes the one at its
input.  Most LRP rules are one computation with modified inputs and weights (DESIGN.md,
"Rules as data"; Zennit's ``BasicHook``).  For a dense or conv layer with input
:math:`a`, weights :math:`W`, bias :math:`b` and relevance :math:`R` at its output, a
rule is a list of *terms* :math:`k = 1..K`, each a modified input
:math:`a^{(k)} = h_k(a)` and modified parameters :math:`(W^{(k)}, b^{(k)})`, grouped into
*groups* :math:`g` that share one denominator:

.. math::
    z^{(g)} &= \sum_{k \in g} \sigma_k \left(W^{(k)} a^{(k)} + b^{(k)}\right)
        && \text{(modified forward)} \\
    s^{(g)} &= \lambda_g\, m_g \odot R / \mathrm{stab}\!\left(z^{(g)}\right)
        && \text{(stabilised ratio)} \\
    c^{(k)} &= W^{(k)\top} s^{(g(k))} && \text{(transposed layer)} \\
    R^{\mathrm{in}} &= \sum_k \sigma_k\, a^{(k)} \odot c^{(k)} && \text{(reduce)}

with :math:`\sigma_k = \pm 1` the sign of a term (z^B subtracts its bound terms),
:math:`\lambda_g` the weight of a group (α and −β of LRP-αβ), :math:`m_g` an optional
mask on the sign of the original pre-activation (LRP-γ), and
:math:`\mathrm{stab}(z) = z + \epsilon\,\mathrm{sign}_0(z)`, :math:`\mathrm{sign}_0(0) = +1`
(docs/conventions.md).  :math:`W^{(k)} a` is the layer's own forward with other weights
(``layer.forward_with``), :math:`W^{(k)\top} s` its transposed pass
(``layer.vjp_with``): the dense transpose or the conv backward-data.

What the computation never does twice:

- the plain term :math:`(a, W, b)` reuses the pre-activation recorded by the traced
  forward (the ε rule runs no forward at all);
- modified weights (:math:`W^+`, :math:`W^-`, :math:`W^2`, ones, γ-modified) are made
  once per net, rule, layer, array namespace and dtype, and cached by the sweep;
- terms whose input is the same for every sample (the ones of flat and w², the box
  bounds of z^B) run their forward once at batch 1, cached per input shape; a group
  made only of such terms caches its whole denominator;
- terms on :math:`a^-` are skipped where the layer input is non-negative (known from
  the layer types, e.g. behind a ReLU, or checked once with ``a.min() >= 0``);
- all-ones weights (flat) give every input channel the same :math:`c`, so their
  transposed pass runs on :math:`\sum_k s_k` with a single 1 → 1 channel;
- ``s`` is written into z or R in place when nothing else reads them (buffers are not
  reallocated per layer).

Layers without weights take fixed rules: a ReLU, identity or dropout passes relevance
(:class:`Pass`), max-pool sends it to the switch of its window, flatten reshapes and
concat slices (the layer's own VJP, :class:`Gradient`), average, adaptive-average and sum
pooling and the residual add split it in proportion to their inputs (:class:`Norm`).
Signal methods (gradient, DeconvNet, Guided Backprop) are rules too: the layer's VJP
everywhere, with their own ReLU backward.  The engine that runs the rules over the layer
graph is :mod:`relprop.engine`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import _config
from .._backend import array_namespace, kernels
from ..kernels import _ops

__all__ = ["Rule", "Term", "Group", "LinearRule", "Pass", "Norm", "keep", "positive", "negative", "square", "ones",
           "GammaMod", "check_real", "LINEAR_KINDS", "PARAMETRIC_KINDS", "PROPORTIONAL_KINDS"]

#: layer kinds that carry weights (the ones composites assign LRP rules to)
LINEAR_KINDS = ("linear", "conv2d")
#: layer kinds a weight-modifying rule can run on (a batch norm is a diagonal linear layer)
PARAMETRIC_KINDS = LINEAR_KINDS + ("batchnorm2d", "batchnorm1d")
#: layers without weights whose relevance splits in proportion to the inputs (the ε rule on 1/n or 1 weights)
PROPORTIONAL_KINDS = ("avgpool2d", "adaptive_avgpool2d", "sumpool", "add")


# -- parameter modifiers: named functions p -> p' (module-level so they have names and pickle) -------------
def keep(p, xp):
    """p' = p."""
    return p


def positive(p, xp):
    """p' = p⁺ = max(p, 0)."""
    return xp.maximum(p, 0)


def negative(p, xp):
    """p' = p⁻ = min(p, 0)."""
    return xp.minimum(p, 0)


def square(p, xp):
    """p' = p²."""
    return p * p


def ones(p, xp):
    """p' = 1."""
    return xp.ones_like(p)


@dataclass(frozen=True)
class GammaMod:
    """p' = p + γ·part(p), part = :func:`positive` or :func:`negative` (LRP-γ)."""

    gamma: float
    part: Callable

    def __call__(self, p, xp):
        return p + self.gamma * self.part(p, xp)


# -- validation of rule parameters ---------------------------------------------------------------------------
def check_real(where, name, value, minimum=None, strict=False):
    """``value`` as a finite float, ``>= minimum`` (``> minimum`` if strict); else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{where}: {name}={value!r} is invalid; expected a finite real number")
    value = float(value)
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{where}: {name}={value!r} is invalid; expected {name} {'>' if strict else '>='} {minimum}")
    return value


# -- rules ---------------------------------------------------------------------------------------------------
class Rule:
    """Base class: how a signal at a layer's output becomes the one at its input.

    Subclasses implement ``backward(layer, rec, r, state) -> r_in`` where ``rec`` is the
    layer's :class:`Record`, ``r`` the signal at its output and ``state`` a dict the
    sweep keeps per layer (cached modified weights).  ``kinds`` lists the layer kinds
    the rule applies to.
    """

    kinds: tuple = LINEAR_KINDS
    #: does the rule read a convolution's pre-activation z where only a ReLU reads it?  Sweeps whose
    #: rules all say no trace without keeping those z (:meth:`relprop.nets.Graph.trace`)
    needs_preactivations = True

    def backward(self, layer, rec, r, state):
        raise NotImplementedError

    def reads_records(self, layer):
        """Does this rule read the values of ``layer``'s recorded input and output, not only their shapes?
        Where neither the ReLU's rule nor the max-pool's of a conv, ReLU, max-pool triple does, the sweep's
        trace leaves the ReLU's output unwritten (:class:`relprop.nets.graph.Unwritten`)."""
        return True

    def check_layer(self, layer):
        """Raise ValueError if this rule cannot run on ``layer``."""
        if layer.kind not in self.kinds:
            raise ValueError(
                f"{layer.where}: rule {self!r} applies to {'/'.join(self.kinds)} layers only"
            )


@dataclass(frozen=True)
class Term:
    """One term k of a rule: modified input a⁽ᵏ⁾, parameters W⁽ᵏ⁾ / b⁽ᵏ⁾, and its sign σ_k.

    ``input``: ``"a"`` (a), ``"pos"`` (a⁺), ``"neg"`` (a⁻), ``"ones"`` (1, the same for
    every sample), or the name of a rule attribute holding a per-feature constant (z^B's
    ``"low"`` / ``"high"``).  ``weight`` / ``bias``: modifiers ``p -> p'``; ``bias=None``
    drops the bias.
    """

    input: str = "a"
    weight: Callable = keep
    bias: Callable | None = keep
    sign: int = 1

    @property
    def plain(self):
        """True for (a, W, ·): its forward is the recorded pre-activation (minus b if the bias is dropped)."""
        return self.input == "a" and self.weight is keep

    @property
    def constant(self):
        """True when the input is the same for every sample (ones, box bounds)."""
        return self.input not in ("a", "pos", "neg")


@dataclass(frozen=True)
class Group:
    """Terms sharing one denominator z⁽ᵍ⁾; ``weight`` λ_g scales their share of R_in and
    ``where`` (``"positive"`` / ``"negative"`` / None) keeps only outputs whose original
    pre-activation has that sign."""

    terms: tuple
    weight: float = 1.0
    where: str | None = None


class LinearRule(Rule):
    """A rule given as data: ``groups`` (of :class:`Term`) and ``stabilizer`` ε.

    ``backward`` is the generic computation of the module docstring.  Subclasses are
    frozen dataclasses defining the ``groups`` property.
    """

    kinds = PARAMETRIC_KINDS
    groups: tuple = ()

    @property
    def needs_preactivations(self):
        """Only a plain term (a, W) reads the recorded z, and a group's ``where`` its sign: z⁺, w²,
        flat and αβ compute their own forward, so a sweep of them need not keep z."""
        return any(g.where is not None or any(t.plain for t in g.terms) for g in self.groups)

    def traced_terms(self, layer, nonneg):
        """The (group, term) indices whose forward z⁽ᵏ⁾ = W⁽ᵏ⁾a + b⁽ᵏ⁾ a sweep has the trace compute
        beside the layer's own (:meth:`relprop.nets.Graph.trace`'s ``also``): at a convolution, the
        terms with modified weights that read a itself (input a, or a⁺ where the input is ≥ 0 by
        construction, ``nonneg``), e.g. z⁺'s W⁺a + b⁺ behind a ReLU, γ's (W + γW⁺)a + b."""
        if layer.kind != "conv2d":
            return []
        return [(gi, ti) for gi, g in enumerate(self.groups) if g.weight != 0 for ti, t in enumerate(g.terms)
                if not t.plain and (t.input == "a" or (t.input == "pos" and nonneg))]

    def term_params(self, layer, like, state, terms):
        """(W⁽ᵏ⁾, b⁽ᵏ⁾) of the (group, term) indices ``terms``, in ``like``'s namespace and dtype (cached)."""
        params = _params(self, layer, like, state)
        return [params[gi][ti] for gi, ti in terms]

    #: ε of stab(); the ε rule names it ``epsilon``, every other rule ``stabilizer``
    @property
    def eps(self):
        return self.stabilizer

    def backward(self, layer, rec, r, state):
        return relevance(self, layer, rec, r, state)


@dataclass(frozen=True)
class Pass(Rule):
    """ReLU (and identity, dropout) under LRP: relevance passes unchanged, R_in = R."""

    kinds = ("relu", "identity", "dropout")
    needs_preactivations = False

    def backward(self, layer, rec, r, state):
        return r

    def reads_records(self, layer):
        return False


@dataclass(frozen=True)
class Norm(Rule):
    r"""The proportional split of a layer without weights (Zennit's ``Norm``; docs/conventions.md):

    .. math:: R_k = \frac{x_k}{\mathrm{stab}\left(\sum_m x_m\right)} R

    for the residual add (x_m its inputs) and, with the layer's own weights 1/n or 1, for
    average, adaptive-average and sum pooling — the ε rule with ε = ``stabilizer``.
    """

    stabilizer: float = 1e-6
    kinds = PROPORTIONAL_KINDS

    @property
    def eps(self):
        return self.stabilizer

    def backward(self, layer, rec, r, state):
        return proportional(self.eps, layer, rec, r)


# -- the generic computation ---------------------------------------------------------------------------------
def _params(rule, layer, like, state):
    """[(W⁽ᵏ⁾, b⁽ᵏ⁾) per term, per group], in ``like``'s namespace and dtype.

    Not kept in the explainer's ``state`` from one call to the next: weights changed in place (the same arrays,
    no ``set_params``, so the layer's version stays) must give the new W⁽ᵏ⁾.  Kept there, a kept explainer
    went on with the old W⁺ and returned the old net's relevance, silently.  The W⁽ᵏ⁾ that are worth keeping
    are kept by :func:`_term_weight`, which checks the weights they came from (once per call); the rest cost
    one element-wise pass over the weights.  Kept in ``state`` only where that is safe: the layer's own
    weights and biases unmodified (ε's, LRP-0's: the arrays themselves, whatever they hold); small weights
    (under ``_config.RULE_WEIGHTS_KEPT_MIN_BYTES``) with a copy of the weights and bias they came from,
    compared on each call; and within one call of a sweep (``state["_call"]``,
    :meth:`relprop.engine.Sweep.state`; the trace and the backward both ask for z⁺'s W⁺), during which
    nothing changes the weights."""
    xp = array_namespace(like)
    key = ("params", xp.__name__, np.dtype(like.dtype).str)
    hit = state.get(key)
    # (a sweep's state is emptied when the layer's parameters are set anew, and until then layer.params hands
    # out the same arrays: a hit needs no look at them)
    if hit is not None and (hit[0] is None or hit[0] is state.get("_call") or _unchanged(hit[2])):
        return hit[1]
    w, b = layer.params(like)
    groups = rule.groups  # (made on each read)
    params = [
        [(_term_weight(rule, layer, (gi, ti), t, w, xp), None if (b is None or t.bias is None) else t.bias(b, xp))
         for ti, t in enumerate(g.terms)]
        for gi, g in enumerate(groups)
    ]
    plain = all(t.weight is keep and t.bias in (keep, None) for g in groups for t in g.terms)
    call = None if plain else state.get("_call")
    # small weights formed afresh (_term_weight) are kept with a copy of what they came from, compared on the
    # next call (a few words: cheaper than forming them again, and fresh arrays slowed the kernels that read
    # them, LeNet-5 b1 ε+flat 0.46 against 0.42 ms)
    snapshot = None
    if not plain and xp is np and w.nbytes < _config.RULE_WEIGHTS_KEPT_MIN_BYTES:
        snapshot = _snapshot((w, b))
    if plain or call is not None or snapshot is not None:
        state[key] = (call, params, snapshot)
    return params


def _snapshot(arrays):
    """[(array, copy)] of ``arrays`` (None skipped): what :func:`_unchanged` compares them with later."""
    return [(p, p.copy()) for p in arrays if p is not None]


def _unchanged(snapshot):
    """Do the arrays of ``snapshot`` [(array, copy)] (or None) still hold their copies' bits?"""
    if snapshot is None:
        return False
    from ..kernels.cpu._derived import _same_bits

    return all(_same_bits(p, c) for p, c in snapshot)


def _same_params(kept, params, xp):
    """Are ``kept`` and ``params`` ([(W⁽ᵏ⁾, b⁽ᵏ⁾)]) the same: each weight the very array (:func:`_term_weight`
    hands out the same one while the layer's weights are unchanged), each bias equal (a modified bias, b⁺, is
    formed afresh on every call; it is short)?  What a cached forward of the constant terms was made with."""
    if len(kept) != len(params):
        return False
    for (w0, b0), (w1, b1) in zip(kept, params):
        if w0 is not w1 or (b0 is None) != (b1 is None):
            return False
        if b0 is not None and b0 is not b1 and (b0.shape != b1.shape or not bool(xp.all(b0 == b1))):
            return False
    return True


def kept_beside_weights(layer, w, xp):
    """Is what a rule forms from the weights ``w`` of ``layer`` kept beside them
    (:func:`relprop.kernels.cpu._derived.derived`, checked against them)?  On NumPy, at a convolution, or a
    dense layer of at most ``_config.RULE_WEIGHTS_KEPT_MAX_BYTES``, from ``_config.RULE_WEIGHTS_KEPT_MIN_BYTES``
    on (see :func:`_term_weight`)."""
    return xp is np and w.nbytes >= _config.RULE_WEIGHTS_KEPT_MIN_BYTES and (
        layer.kind == "conv2d" or (layer.kind == "linear" and w.nbytes <= _config.RULE_WEIGHTS_KEPT_MAX_BYTES))


def _term_weight(rule, layer, index, term, w, xp):
    """W⁽ᵏ⁾ of term ``index`` (group, term) of ``rule``.  On NumPy arrays, at a convolution or a dense layer of
    at most ``_config.RULE_WEIGHTS_KEPT_MAX_BYTES``, kept beside the CPU kernels' arrangements of the layer's
    weights w (:func:`relprop.kernels.cpu._derived.derived`, which makes it afresh once w changes): a new
    explainer of the same rule then gets the same W⁽ᵏ⁾ back, and with it the Winograd transforms cached for
    that array.  Made afresh, each new explainer (every call of :func:`relprop.explain`) transformed new z⁺
    weights and ran its kernels on freshly faulted memory: ε+flat on CIFAR-VGG b64 took 2x a kept explainer's
    time (286 against 140 ms); αβ formed its dense layers' W⁺ and W⁻ anew (11 ms of 310).  (A large dense
    layer's copies, VGG-16's 411 MB, would push the convolutions' transforms out of the cache.)  Weights under
    ``_config.RULE_WEIGHTS_KEPT_MIN_BYTES`` are formed afresh: cheaper than the lookup."""
    if term.weight is keep or not kept_beside_weights(layer, w, xp):
        return term.weight(w, xp)
    kind = ("rule weights", rule, index)
    try:
        hash(kind)
    except TypeError:  # a rule holding arrays (z^B's bounds): not a key
        return term.weight(w, xp)
    from ..kernels.cpu._derived import derived

    return derived(w, kind, lambda: term.weight(w, xp))


def _constant_input(rule, term, a, xp):
    """The batch-1 input of a constant term: ones, or a box bound broadcast to (1,) + a.shape[1:]."""
    shape = (1,) + tuple(a.shape[1:])
    if term.input == "ones":
        return xp.ones(shape, dtype=a.dtype)
    value = getattr(rule, term.input)
    try:
        out = np.broadcast_to(np.asarray(value), shape)
    except ValueError:
        raise ValueError(
            f"{rule!r}: {term.input} has shape {np.shape(value)}, which does not broadcast to the layer input "
            f"{tuple(a.shape[1:])} (per sample); give a scalar or per-feature bounds such as (1, C, 1, 1)"
        ) from None
    return xp.ascontiguousarray(xp.asarray(out, dtype=a.dtype))


def _bias_shape(b, z):
    """b reshaped to broadcast against z: (J,) for dense, (K, 1, 1) for conv."""
    return b.reshape(b.shape + (1,) * (z.ndim - 2))


def _stab_inverse(z, eps, xp):
    """1 / stab(z), 0 where stab(z) = 0 (ε = 0 and z = 0): for small cached denominators."""
    den = z + eps * xp.where(z >= 0, 1, -1).astype(z.dtype)
    zero = den == 0
    return xp.where(zero, 0, 1 / xp.where(zero, 1, den))


def _transposed(layer, s, w, term, a_shape, backend, xp):
    """c = W'ᵀ s.  All-ones weights (flat) give every input channel the same c = 1ᵀ (Σ_k s_k):
    sum s over the output channels and run the transposed layer with one 1 → 1 channel of ones."""
    if term.weight is not ones or not layer.is_linear:
        return layer.vjp_with(s, w, a_shape, backend)
    return _ones_transposed(layer, xp.ascontiguousarray(s.sum(axis=1, keepdims=True)), w, a_shape, backend, xp)


def _ones_transposed(layer, s1, w, a_shape, backend, xp):
    """c = 1ᵀ s for all-ones weights, from s1 = Σ_k s_k (N, 1, ...): the transposed layer with one 1 → 1
    channel of ones, the same for every input channel (no copy for a single one: LeNet-5's first layer)."""
    w1 = xp.ones((1, 1) + tuple(w.shape[2:]), dtype=s1.dtype)
    c1 = layer.vjp_with(s1, w1, (a_shape[0], 1) + tuple(a_shape[2:]), backend)
    return c1 if a_shape[1] == 1 else xp.array(xp.broadcast_to(c1, a_shape), order="C")


def _fused_term(group, inputs, layer):
    """Does ``group`` reach a convolution's input through one term only (z⁺ behind a ReLU, whose a⁻ term is
    0; ε and LRP-0 on a conv), on the input itself, with no sign mask and weight 1: its backward is then
    a ⊙ W'ᵀ(R / stab(z)), one kernel call (:meth:`relprop.nets.layers.Conv2d.relevance_with`)?"""
    active = [t for t, x in zip(group.terms, inputs) if x is not None]
    return (layer.kind == "conv2d" and len(active) == 1 and active[0].input in ("a", "pos") and active[0].sign > 0
            and active[0].weight is not ones and group.where is None and group.weight == 1)


def _flat_sum(group, layer):
    """Is ``group`` the flat rule's one all-ones term (on ones) over a dense/conv layer, with no sign mask and
    weight 1: its c needs only Σ_k R_k / stab(z_k), which :func:`relevance` takes in one pass?"""
    term = group.terms[0]
    return (len(group.terms) == 1 and term.weight is ones and term.input == "ones" and term.sign > 0
            and group.where is None and group.weight == 1 and layer.is_linear)


def _flat_conv(rule, gi, layer, a, r, switches, state, backend):
    """R_in of the flat group ``gi`` of ``rule`` at a convolution, R_in = Σ_{j ∋ i} Σ_k R_k,j / stab(n_j) for
    every input channel (:func:`relprop.kernels.reference.conv2d.conv2d_flat_relevance`): r at its output,
    or with ``switches`` the pooled side of a max-pool above it (:class:`FlatBelowPool`).  n_j, the real
    inputs of output j (a forward of ones with all-ones weights), is cached per input shape."""
    xp = array_namespace(a)
    key = ("flat inverse", gi, xp.__name__, np.dtype(a.dtype).str, tuple(a.shape[1:]))
    inv = state.get(key)
    if inv is None:
        (w, b), = _params(rule, layer, a, state)[gi]
        n_j = layer.forward_with(xp.ones((1,) + tuple(a.shape[1:]), dtype=a.dtype), w, b, backend)
        inv = state[key] = xp.ascontiguousarray(_stab_inverse(n_j, rule.eps, xp)[0, 0])  # one for every k
    return _ops.conv2d_flat_relevance(r, switches, inv, layer.kernel, layer.stride, layer.padding, layer.dilation,
                                      a.shape, backend)


@dataclass(frozen=True)
class Unpooled:
    """A signal below a 2x2 stride-2 max-pool, kept on the pooled side: ``unpool(g)`` by ``switches``, of
    ``shape``.  A rule above a conv, ReLU, max-pool triple hands it down through the ReLU to the conv's rule,
    whose transposed pass unpools as it reads (:meth:`relprop.nets.layers.Conv2d.vjp_unpooled`): the
    unpooled map, three quarters zeros, is never written whole."""

    g: object
    switches: object
    shape: tuple


@dataclass(frozen=True)
class DivideBeforeUnpool(Rule):
    r"""The max-pool of a conv, ReLU, 2x2 max-pool triple whose conv's rule divides by one traced forward
    z' = W'a + b' (z⁺ behind a ReLU): that division, moved above the unpooling.

    .. math:: \frac{\mathrm{unpool}(R)}{\mathrm{stab}(z')} = \mathrm{unpool}\left(\frac{R}{\mathrm{stab}(z'_s)}\right)

    with :math:`z'_s` z' at the switches.  Exact, to the bit: the unpooling sends :math:`R_w` of
    window w to its switch :math:`s_w` only (the windows do not overlap), so the quotient there is the
    same, and every other position gets 0 either way (a zero's sign aside).  The trace then writes z'
    at the switches only (``Graph.trace``'s ``at_switches``: a quarter of its full-size write), the
    division reads and writes pooled arrays, and the quotient goes down still pooled (:class:`Unpooled`)
    to the conv's :class:`DividedAbove`, which unpools it in its transposed pass.  ``conv``: the conv's
    layer index, whose traced forward ``term`` (group, term) this rule takes (the sweep hands it over as
    ``rec.also``); ``epsilon``: the conv rule's ε."""

    conv: int
    term: tuple
    epsilon: float
    kinds = ("maxpool2d",)
    needs_preactivations = False

    @property
    def also_of(self):
        """The layer whose traced forwards this rule takes."""
        return self.conv

    def reads_records(self, layer):
        return False  # the switches and the input's shape only (the unpooling's)

    def backward(self, layer, rec, r, state):
        z_s, divide = rec.also[self.term], kernels(rec.backend).stabilized_divide
        if z_s.shape != r.shape:  # a trace that did not fuse the triple recorded z' whole: divide below the unpooling
            return divide(_ops.maxunpool2d(r, rec.switches, rec.a.shape, rec.backend), z_s, float(self.epsilon), z_s)
        q = divide(r, z_s, float(self.epsilon), r if rec.r_scratch else z_s)
        if not _config.UNPOOL_IN_VJP:
            return _ops.maxunpool2d(q, rec.switches, rec.a.shape, rec.backend)
        return Unpooled(q, rec.switches, tuple(rec.a.shape))


@dataclass(frozen=True)
class DividedAbove(Rule):
    r"""The conv of :class:`DivideBeforeUnpool`'s triple: its rule's one term with the division done above,
    :math:`R^{\mathrm{in}} = a \odot W'^\top s` for the quotient s (:class:`Unpooled`), in one kernel call
    (:meth:`relprop.nets.layers.Conv2d.vjp_unpooled`)."""

    rule: Rule
    term: tuple
    kinds = ("conv2d",)
    needs_preactivations = False

    def backward(self, layer, rec, r, state):
        (w, _), = self.rule.term_params(layer, rec.a, state, [self.term])
        if isinstance(r, Unpooled):
            return layer.vjp_unpooled(r.g, r.switches, w, rec.a, rec.a.shape, rec.backend)
        return layer.relevance_with(r, None, 0.0, w, rec.a, rec.backend)


@dataclass(frozen=True)
class UnpoolBelow(Rule):
    """The max-pool of a conv, ReLU, 2x2 max-pool triple whose conv's rule takes the pooled relevance and
    unpools it itself (:class:`FlatBelowPool`): R handed down as it is, with the switches
    (:class:`Unpooled`), the same as unpooling it here (the winner-takes-all of :class:`Gradient`)."""

    kinds = ("maxpool2d",)
    needs_preactivations = False

    def reads_records(self, layer):
        return False  # the switches and the input's shape only

    def backward(self, layer, rec, r, state):
        if not _config.UNPOOL_IN_VJP:
            return _ops.maxunpool2d(r, rec.switches, rec.a.shape, rec.backend)
        return Unpooled(r, rec.switches, tuple(rec.a.shape))


@dataclass(frozen=True)
class FlatBelowPool(Rule):
    r"""The conv of :class:`UnpoolBelow`'s triple under the flat rule (``rule``, whose group ``group`` is
    the all-ones term): the pooled relevance unpooled as the kernel sums it over the channels,

    .. math:: R^{\mathrm{in}}_i = \sum_{j \ni i} \frac{1}{\mathrm{stab}(n_j)} \sum_k \mathrm{unpool}(R)_{k,j}

    in one call (:func:`relprop.kernels.reference.conv2d.conv2d_flat_relevance`): the unpooled map is
    never written (LeNet-5's first layer and its pool at b256: 0.47 ms, against 1.19 ms for the unpooling
    and the flat rule's channel sum and transposed convolution)."""

    rule: Rule
    group: int
    kinds = ("conv2d",)
    needs_preactivations = False

    def backward(self, layer, rec, r, state):
        if isinstance(r, Unpooled):
            return _flat_conv(self.rule, self.group, layer, rec.a, r.g, r.switches, state, rec.backend)
        return self.rule.backward(layer, rec, r, state)


def flats_below_pools(net, rules, preactivations):
    """``(rules', spans)``: ``rules`` with every conv, ReLU, 2x2 max-pool triple whose conv's rule is the flat
    rule alone (one all-ones group, :func:`_flat_sum`) and whose pool's is the unpooling (:class:`Gradient`)
    rewritten as :class:`FlatBelowPool`, :class:`Pass`, :class:`UnpoolBelow`, and the (conv, pool) index
    pairs; ``(None, [])`` if there is none.  For sweeps run down to the input without per-layer relevances,
    from a layer not inside a triple (as :func:`divides_before_unpools`)."""
    from .signal import Gradient

    out, spans = list(rules), []
    for i, rule in enumerate(rules[:-2]):
        if not isinstance(rule, LinearRule) or i in preactivations or not net._conv_relu_pool(i) \
                or type(rules[i + 1]) is not Pass or type(rules[i + 2]) is not Gradient:
            continue
        live = [gi for gi, g in enumerate(rule.groups) if g.weight != 0]
        if len(live) == 1 and _flat_sum(rule.groups[live[0]], net.layers[i]):
            out[i], out[i + 2] = FlatBelowPool(rule, live[0]), UnpoolBelow()
            spans.append((i, i + 2))
    return (out, spans) if spans else (None, [])


def divides_before_unpools(net, rules, traced_terms, preactivations, nonneg):
    """``(rules', spans)``: ``rules`` with every conv, ReLU, 2x2 max-pool triple whose trace is fused
    (:meth:`relprop.engine.Sweep.pooled`) and whose conv rule divides by one traced forward alone
    rewritten as :class:`DividedAbove`, the ReLU's :class:`Pass` and :class:`DivideBeforeUnpool`, and the
    (conv, pool) index pairs; ``(None, [])`` if there is none.  ``traced_terms``: per conv layer, the
    (group, term) indices the trace computes (:meth:`LinearRule.traced_terms`); ``nonneg``: per layer, is
    its input non-negative by construction.  The conv rule qualifies where it has one group (weight 1, no
    sign mask) whose z is that term's forward alone: every other term on a⁻ of a non-negative input and
    without a bias (z⁺ behind a ReLU; not γ or αβ, whose two groups divide by two forwards).  For sweeps
    run down to the input without per-layer relevances, from a layer not inside a triple."""
    from .signal import Gradient

    out, spans = list(rules), []
    for i, terms in sorted(traced_terms.items()):
        rule = rules[i]
        if (len(terms) != 1 or not isinstance(rule, LinearRule) or i in preactivations or not net._conv_relu_pool(i)
                or type(rules[i + 1]) is not Pass or type(rules[i + 2]) is not Gradient):
            continue
        (gi, ti), groups = terms[0], rule.groups  # (a property: made on each call)
        group = groups[gi]
        if sum(g.weight != 0 for g in groups) != 1 or group.where is not None or group.weight != 1 \
                or group.terms[ti].sign <= 0:
            continue
        if any(k != ti and not (t.input == "neg" and nonneg[i] and t.bias is None) for k, t in enumerate(group.terms)):
            continue
        out[i], out[i + 2] = DividedAbove(rule, (gi, ti)), DivideBeforeUnpool(i, (gi, ti), rule.eps)
        spans.append((i, i + 2))
    return (out, spans) if spans else (None, [])


def proportional(eps, layer, rec, r):
    """R_in = a ⊙ Jᵀ (R / stab(z)) for a layer without weights that is linear in its input(s):
    pooling (Jᵀ its VJP) and the add (Jᵀ copies s to every input, so R_k = x_k s)."""
    a, backend = rec.a, rec.backend
    xp = array_namespace(r)
    s = kernels(backend).stabilized_divide(r, rec.z, float(eps), r) if rec.r_scratch else \
        _ops.stabilized_divide(r, rec.z, eps, backend)
    c = layer.vjp(s, a, rec.z, rec.aux, backend)
    if layer.n_inputs is None:  # a join: c is [s, s, ...]
        return [ck * ak for ck, ak in zip(c, a)]
    return xp.multiply(c, a, out=c)


def relevance(rule, layer, rec, r, state):
    """R_in of ``rule`` at ``layer`` for relevance ``r`` at its output (the generic computation)."""
    a, backend = rec.a, rec.backend
    xp = array_namespace(r)
    K = kernels(backend)
    if not layer.parametric:  # a pooling layer or an add under the ε rule: the proportional split
        return proportional(rule.eps, layer, rec, r)
    params = _params(rule, layer, a, state)
    dkey = (xp.__name__, np.dtype(a.dtype).str, tuple(a.shape[1:]))
    r_in = None
    groups = [(gi, g, p) for gi, (g, p) in enumerate(zip(rule.groups, params)) if g.weight != 0]
    scratch = rec.r_scratch and len(groups) == 1  # r may become s only if no other group reads it
    for gi, group, gparams in groups:
        if layer.kind == "conv2d" and _flat_sum(group, layer):  # flat at a convolution: one kernel call
            c = _flat_conv(rule, gi, layer, a, r, None, state, backend)
            r_in = c if r_in is None else r_in + c
            continue
        # 1. modified forward z⁽ᵍ⁾ = Σ_k σ_k (W⁽ᵏ⁾ a⁽ᵏ⁾ + b⁽ᵏ⁾), remembering each term's input
        z, owned, inputs = None, False, []
        for ti, (term, (w, b)) in enumerate(zip(group.terms, gparams)):
            if term.input == "neg" and rec.nonneg():
                inputs.append(None)  # a⁻ = 0: only its bias (if any) reaches z, nothing goes down
                if b is None:
                    continue
                zk, k_owned = xp.broadcast_to(_bias_shape(b, r), r.shape), False  # r: z's shape
            elif term.constant:
                ckey = ("const", gi, ti) + dkey
                hit = state.get(ckey)
                if hit is None or not _same_params(hit[0], [(w, b)], xp):  # made with these W⁽ᵏ⁾, b⁽ᵏ⁾
                    x1 = _constant_input(rule, term, a, xp)
                    hit = state[ckey] = ([(w, b)], x1, layer.forward_with(x1, w, b, backend))
                x_k, zk = hit[1:]
                inputs.append(x_k)
                k_owned = False
            elif term.plain:
                inputs.append(a)
                _, b0 = layer.params(a)
                zk, k_owned = rec.z, False
                if term.bias is None and b0 is not None:  # recorded z has the bias; this term drops it
                    zk, k_owned = rec.z - _bias_shape(b0, rec.z), True
            else:
                x_k = a if (term.input == "a" or (term.input == "pos" and rec.nonneg())) else (
                    xp.maximum(a, 0) if term.input == "pos" else xp.minimum(a, 0))
                inputs.append(x_k)
                zk = rec.also.pop((gi, ti), None) if rec.also else None  # computed by the trace
                zk, k_owned = (layer.forward_with(x_k, w, b, backend) if zk is None else zk), True
            if z is None:
                z, owned = (zk, k_owned) if term.sign > 0 else (-zk, True)
            else:
                shape = np.broadcast_shapes(z.shape, zk.shape)
                if not owned or z.shape != shape:  # copy before accumulating in place (batch-1 stays batch-1)
                    z, owned = xp.array(xp.broadcast_to(z, shape), order="C"), True
                if term.sign > 0:
                    z += zk
                else:
                    z -= zk
        if z is None:
            continue
        # 2. s⁽ᵍ⁾ = λ_g m_g R / stab(z⁽ᵍ⁾)
        if z.shape != r.shape:  # only constant terms: a per-position denominator, cached with its inverse
            ikey = ("inv", gi) + dkey
            hit = state.get(ikey)
            if hit is None or not _same_params(hit[0], gparams, xp):  # z is a function of them (and of dkey)
                hit = state[ikey] = (list(gparams), _stab_inverse(z, rule.eps, xp))
            inv = hit[1]
            if _flat_sum(group, layer):
                # flat: s1 = Σ_k R_k inv_k in one pass, no full-size s (LeNet-5's first layer: 0.15 ms against
                # 0.52 for the product and the sum; the same bits); c = 1ᵀ s1 for every input channel
                s1 = xp.einsum("nk...,k...->n...", r, inv[0])[:, None]
                c = _ones_transposed(layer, xp.ascontiguousarray(s1), gparams[0][0], a.shape, backend, xp)
                r_in = c if r_in is None else r_in + c
                continue
            s = xp.multiply(r, inv, out=r) if scratch else r * inv
        elif _fused_term(group, inputs, layer):
            # 2.-4. in one kernel call: R_in = a ⊙ Wᵀ(R / stab(z)), neither s nor the product written whole
            # (the CPU kernels divide as R enters the transposed convolution and multiply as it leaves)
            (w, _), x_k = next((p, x) for p, x in zip(gparams, inputs) if x is not None)
            c = layer.relevance_with(r, z, rule.eps, w, x_k, backend)
            if r_in is None:
                r_in = c
            else:
                r_in += c
            continue
        elif owned or scratch:  # in place: into z or r, whichever is ours
            s = K.stabilized_divide(r, z, float(rule.eps), z if owned else r)
        else:
            s = _ops.stabilized_divide(r, z, rule.eps, backend)
        if group.where is not None:
            s *= (rec.z > 0) if group.where == "positive" else (rec.z < 0)
        if group.weight != 1:
            s *= group.weight
        # 3.-4. c⁽ᵏ⁾ = W⁽ᵏ⁾ᵀ s⁽ᵍ⁾ and R_in += σ_k a⁽ᵏ⁾ ⊙ c⁽ᵏ⁾
        for term, (w, _), x_k in zip(group.terms, gparams, inputs):
            if x_k is None:
                continue
            c = _transposed(layer, s, w, term, a.shape, backend, xp)
            if term.input != "ones":
                xp.multiply(c, x_k, out=c)
            if r_in is None:
                r_in = c if term.sign > 0 else xp.negative(c, out=c)
            elif term.sign > 0:
                r_in += c
            else:
                r_in -= c
    if r_in is None:
        r_in = xp.zeros(a.shape, dtype=a.dtype)
    return r_in
