r"""THE backward sweep: one engine over the layer graph for every method.

Every method — gradient, gradient × input, DeconvNet, Guided Backprop, every LRP/DTD rule
and composite, PatternNet/PatternAttribution, Grad-CAM's partial sweep, and the input-level
methods that wrap them — is a :class:`Sweep`: one rule per layer (:mod:`relprop.rules`),
run in reverse topological order from a start signal:

1. the traced forward pass (:meth:`relprop.nets.Graph.trace`) records every layer's
   output and the max-pool switches, once (except what no rule reads: a conv's z, and the
   ReLU output inside a conv, ReLU, max-pool triple, which then runs as one kernel call);
2. the start signal is placed at the output of the start layer: the net output for a class
   target (one-hot, or R_c = f_c(x) for relevance methods), or any layer for a
   :class:`Unit` target (1 at the unit for gradient-type methods, its activation for
   relevance methods);
3. for each layer i from the start down, its rule turns the signal at its output into the
   signal at its input(s), :math:`R^{\mathrm{in}} = \mathrm{rule}_i(\text{layer}_i, \text{record}_i, R_i)`;
   where a layer's output is read by several layers, the signals arriving from the readers
   are summed (docs/conventions.md, "Graphs").

Nothing is recomputed: a rule finds the layer input, its output (the pre-activation of a
dense/conv layer) and the switches in its :class:`Record`.  A rule may write into the
signal it is handed when the engine says it is scratch (no one else holds it).
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from . import _config
from ._backend import array_namespace

__all__ = ["Unit", "Record", "Sweep", "resolve_target", "output_signal", "start_layer"]

INPUT = -1


@dataclass(frozen=True)
class Unit:
    """A unit of any layer as the thing to explain (Captum's neuron attribution).

    ``Unit(layer=k, channel=c)``: channel c of layer k's output, its activations summed over
    the positions (for a dense layer: unit c); ``Unit(layer=k, channel=c, position=(i, j))``:
    one position.  ``layer`` is an index into ``net.layers`` (negative counts from the end).
    The sweep starts at layer k with the unit's activation (relevance methods) or 1
    (gradient-type methods); ``Unit(layer=-1, channel=c)`` is the class target c.
    """

    layer: int
    channel: int
    position: tuple | None = None

    def __post_init__(self):
        for name in ("layer", "channel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"Unit: {name}={v!r} is invalid; expected an int")
            object.__setattr__(self, name, int(v))
        if self.position is not None:
            pos = self.position
            if isinstance(pos, numbers.Integral) and not isinstance(pos, bool):
                pos = (pos,)
            try:
                pos = tuple(pos)
            except TypeError:
                raise ValueError(f"Unit: position={self.position!r} is invalid; expected (i, j) or None") from None
            if not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in pos):
                raise ValueError(f"Unit: position={self.position!r} is invalid; expected integers (i, j)")
            object.__setattr__(self, "position", tuple(int(p) for p in pos))

    def resolve(self, net, x_shape):
        """(layer index, output shape of that layer) after checking the unit exists for this input."""
        n = len(net.layers)
        if not -n <= self.layer < n:
            raise ValueError(f"Unit: layer {self.layer} does not exist; the net has layers 0..{n - 1}")
        k = self.layer % n
        shape = net.shapes(x_shape)[k]
        where = f"Unit: layer {k} ({net.layers[k].kind}) outputs {tuple(shape[1:])} per sample"
        if not 0 <= self.channel < shape[1]:
            raise ValueError(f"{where}; channel {self.channel} does not exist (expected 0..{shape[1] - 1})")
        if self.position is not None:
            spatial = tuple(shape[2:])
            if len(self.position) != len(spatial):
                raise ValueError(f"{where}; position {self.position} needs {len(spatial)} coordinate(s)"
                                 + ("" if spatial else " (a dense output has no positions: use position=None)"))
            if not all(0 <= p < s for p, s in zip(self.position, spatial)):
                raise ValueError(f"{where}; position {self.position} is outside {spatial}")
        return k, shape

    def mask(self, like):
        """1 at the unit (every position of the channel without ``position``), 0 elsewhere."""
        xp = array_namespace(like)
        m = xp.zeros(like.shape, dtype=like.dtype)
        if self.position is None:
            m[:, self.channel] = 1
        else:
            m[(slice(None), self.channel) + self.position] = 1
        return m

    def value(self, a):
        """The unit's activation per sample (summed over positions without ``position``): shape (N,)."""
        if self.position is None:
            v = a[:, self.channel]
            return v.reshape(v.shape[0], -1).sum(axis=1)
        return a[(slice(None), self.channel) + self.position]


# -- targets and start signals ------------------------------------------------------------------
def resolve_target(logits, target):
    """Per-sample integer targets: argmax by default, an int for all, or an int array (N,)."""
    xp = array_namespace(logits)
    n, n_classes = logits.shape[0], logits.shape[1]
    if isinstance(target, Unit):
        raise ValueError("a Unit target has no class index; this method explains classes only")
    if target is None:
        return xp.argmax(logits.reshape(n, -1), axis=1)
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        t = int(target)
        if not 0 <= t < n_classes:
            raise ValueError(f"target {t} is out of range for {n_classes} outputs")
        return xp.full((n,), t, dtype=np.int64)
    if isinstance(target, (bool, np.bool_, float, str, bytes)) or not hasattr(target, "__len__") \
            and not hasattr(target, "shape"):
        raise TypeError(f"target={target!r} is invalid; expected None, an int, an int array of shape ({n},) "
                        "or a relprop.Unit")
    t = xp.asarray(target)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"target has shape {tuple(t.shape)}, expected an int or an int array of shape ({n},)")
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"target has dtype {t.dtype}, expected integers")
    if t.size and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        raise ValueError(f"target values must lie in [0, {n_classes}), got min {int(t.min())}, max {int(t.max())}")
    return t.astype(np.int64)


def output_signal(logits, target, mode="onehot"):
    """The signal that starts a sweep at the net output.

    ``"onehot"``: 1 at the target class (gradient-type methods); ``"logit"``: the target
    logit f_c(x) at the target class, 0 elsewhere (relevance methods, R_c = f_c(x)).
    """
    xp = array_namespace(logits)
    rows = xp.arange(logits.shape[0])
    g = xp.zeros_like(logits)
    if mode == "onehot":
        g[rows, target] = 1
    elif mode == "logit":
        g[rows, target] = logits[rows, target]
    else:
        raise ValueError(f"output={mode!r} is invalid; expected 'logit' or 'onehot'")
    return g


def start_layer(net, target, x_shape):
    """The layer whose output the sweep starts at: the output layer, or a Unit's layer (validated)."""
    if isinstance(target, Unit):
        return target.resolve(net, x_shape)[0]
    return len(net.layers) - 1


def start_signal(trace, k, target, mode):
    """The seed at layer k's output for ``target`` (class targets: k is the output layer)."""
    a = trace.layer_output(k)
    if isinstance(target, Unit):
        m = target.mask(a)
        if mode == "logit":
            m *= a
        elif mode != "onehot":
            raise ValueError(f"output={mode!r} is invalid; expected 'logit' or 'onehot'")
        return m
    return output_signal(a, resolve_target(a, target), mode)


# -- what a rule sees ---------------------------------------------------------------------------
@dataclass
class Record:
    """What the sweep knows about layer i: its input ``a`` (a list for a join), its output
    ``z`` (the pre-activation of a dense/conv layer), ``aux`` (max-pool switches), the
    resolved ``backend``, whether ``a`` is known to be non-negative, and whether the signal
    handed to the rule may be overwritten (``r_scratch``)."""

    a: object
    z: object
    aux: object
    backend: str
    known_nonneg: bool = False
    r_scratch: bool = False
    #: {(group, term): z⁽ᵏ⁾} the rule's modified forwards computed by the trace, its to take
    also: dict | None = None

    @property
    def switches(self):
        return self.aux

    def nonneg(self):
        """a ≥ 0 everywhere: known from the layer types, else checked once (cached)."""
        if not self.known_nonneg:
            self.known_nonneg = bool(array_namespace(self.a).min(self.a) >= 0)
        return self.known_nonneg


_PASS_SIGN = ("maxpool2d", "avgpool2d", "adaptive_avgpool2d", "flatten", "sumpool", "identity", "dropout")


def nonneg_outputs(net):
    """Per layer: is its output non-negative by construction (a ReLU, or pooling/reshaping/joining
    only non-negative inputs)?"""
    out = []
    for i, layer in enumerate(net.layers):
        ps = net.parents(i)
        parents_nonneg = all(p != INPUT and out[p] for p in ps)
        out.append(layer.kind == "relu" or ((layer.kind in _PASS_SIGN or layer.n_inputs is None) and parents_nonneg))
    return out


def nonneg_inputs(net):
    """Per layer: is its (single) input non-negative by construction?"""
    outs = nonneg_outputs(net)
    return [all(p != INPUT and outs[p] for p in net.parents(i)) for i in range(len(net.layers))]


# -- the sweep ------------------------------------------------------------------------------------
class _Lazy(Mapping):
    """{key: make(key, spec)} for ``specs`` {key: spec}, each value made when it is first read.  The trace's
    ``also``: a rule's modified weights are looked up when the trace reaches their layer, as the layer's own
    arrangements are, so that their check against the weights (made ahead on another thread for small batches,
    :mod:`relprop.kernels.cpu._derived`) still runs beside the layers before; all at the start, the call waited
    for every check first (CIFAR-VGG b1 ε+flat 0.8 ms)."""

    def __init__(self, specs, make):
        self._specs, self._make, self._made = specs, make, {}

    def __getitem__(self, key):
        if key not in self._made:
            self._made[key] = self._make(key, self._specs[key])
        return self._made[key]

    def __contains__(self, key):  # (Mapping's reads the value)
        return key in self._specs

    def get(self, key, default=None):
        return self[key] if key in self._specs else default

    def __iter__(self):
        return iter(self._specs)

    def __len__(self):
        return len(self._specs)


class Sweep:
    """A prepared backward sweep over ``net``: one rule per layer and their cached state.

    Parameters
    ----------
    net : relprop.nets.Graph
        For relevance methods the canonical net (batch norms folded, :func:`relprop.nets.canonical`).
    rules : list of Rule
        One per layer.
    start : {"logit", "onehot"}
        The start signal: R_c = f_c(x) / the unit's activation (relevance), or 1 (gradient-type).
    times_input : bool
        Multiply the signal at the input by x (gradient × input).
    name : str
        For messages.
    source : relprop.nets.Graph or None
        The user's net when ``net`` is its canonical form: if a parameter of ``source``
        changes, the canonical net is rebuilt before the next call (no stale folded weights).
    whole_rules : list of Rule or None
        Rules with the same result at the net input, used instead of ``rules`` when the sweep
        runs whole (down to the input, no per-layer signals) from a layer outside every span
        ``lo <= start < hi`` of ``whole_spans``: rewrites that change only the signal between
        layers lo and hi, such as the gradient's ReLU gate moved below a max-pool
        (:class:`relprop.rules.signal.GateBeforeUnpool`).  An LRP sweep without them gets its own where a
        conv, ReLU, max-pool triple's conv rule divides by one traced forward: the division moved above
        the unpooling (:class:`relprop.rules.core.DivideBeforeUnpool`, ``_config.LRP_DIVIDE_BEFORE_UNPOOL``).

    Calling it as ``sweep(x, target, backend, return_layers)`` runs the traced forward (up
    to the start layer), places the start signal and runs the rules down to the input.  With
    ``return_layers=True`` it returns ``(R, per_layer)``: ``per_layer[i]`` is what layer i's rule
    sent to its input(s) (a list for a join; None where no signal reached the layer) and
    ``per_layer[-1]`` the start signal; in a chain ``per_layer[0] is R``.
    """

    def __init__(self, net, rules, start="logit", times_input=False, name="sweep", source=None, whole_rules=None,
                 whole_spans=()):
        if start not in ("logit", "onehot"):
            raise ValueError(f"output={start!r} is invalid; expected 'logit' or 'onehot'")
        if len(rules) != len(net.layers):
            raise ValueError(f"need one rule per layer ({len(net.layers)}), got {len(rules)}")
        for layer, rule in zip(net.layers, rules):
            rule.check_layer(layer)
        if whole_rules is not None:
            if len(whole_rules) != len(net.layers):
                raise ValueError(f"need one whole-sweep rule per layer ({len(net.layers)}), got {len(whole_rules)}")
            for layer, rule in zip(net.layers, whole_rules):
                rule.check_layer(layer)
        self.net = net
        self.rules = list(rules)
        self.whole_rules = None if whole_rules is None else list(whole_rules)
        self.whole_spans = tuple(whole_spans)
        self.start = start
        self.times_input = times_input
        self.name = name
        self.source = None if source is net else source
        self._source_versions = None if self.source is None else self.source.versions()
        self._nonneg = nonneg_inputs(net)
        self._state = [{} for _ in net.layers]
        self._call = None  # a token of the __call__ running (see state())
        # the layers whose recorded output z some rule reads: its own rule, or the rule of the ReLU
        # that reads it (a ReLU's rule gets z as its input); the trace keeps z only there
        needs = [getattr(rule, "needs_preactivations", True) for rule in self.rules]
        self.preactivations = frozenset(i for i in range(len(needs)) if needs[i] or (i + 1 < len(needs) and needs[i + 1]))
        # the rules' modified forwards the trace computes with the layer's own (one input transform)
        self._pooled = {}  # whole -> the conv layers whose triple the trace fuses
        self._traced_terms = {}
        if _config.TRACE_MODIFIED_FORWARDS:
            for i, (layer, rule) in enumerate(zip(net.layers, self.rules)):
                terms = rule.traced_terms(layer, self._nonneg[i]) if hasattr(rule, "traced_terms") else []
                if terms:
                    self._traced_terms[i] = terms
        # whole LRP sweeps divide above the unpooling of conv, ReLU, max-pool triples; the trace then
        # records those convs' traced forwards at the pool's switches only
        self._at_switches = frozenset()
        if _config.LRP_DIVIDE_BEFORE_UNPOOL and _config.TRACE_FUSED_POOLS and self._traced_terms:
            from .rules.core import divides_before_unpools

            base = self.rules if self.whole_rules is None else self.whole_rules
            traced = {i: t for i, t in self._traced_terms.items() if base[i] is self.rules[i]}
            rewritten, spans = divides_before_unpools(net, base, traced, self.preactivations, self._nonneg)
            if spans:
                self.whole_rules = rewritten
                self.whole_spans = self.whole_spans + tuple(spans)
                self._at_switches = frozenset(i for i, _ in spans)
        # and a flat rule below a max-pool takes the pooled relevance and unpools it as it sums it
        if _config.LRP_FLAT_BELOW_POOL and _config.TRACE_FUSED_POOLS:
            from .rules.core import flats_below_pools

            base = self.rules if self.whole_rules is None else self.whole_rules
            rewritten, spans = flats_below_pools(net, base, self.preactivations)
            if spans:
                self.whole_rules = rewritten
                self.whole_spans = self.whole_spans + tuple(spans)

    def _refresh(self):
        """Re-fold the user's net if its parameters changed since the canonical net was made."""
        if self.source is not None and self.source.versions() != self._source_versions:
            from .nets import canonical

            self.net = canonical(self.source)
            self._source_versions = self.source.versions()
            self._state = [{} for _ in self.net.layers]
            self._pooled = {}

    def __call__(self, x, target, backend, return_layers=False):
        self._refresh()
        k = start_layer(self.net, target, x.shape)
        self._call = object()
        try:
            also = _Lazy({i: terms for i, terms in self._traced_terms.items() if i <= k},
                         lambda i, terms: self.rules[i].term_params(self.net.layers[i], x, self.state(i), terms))
            whole = self._whole(k, None, return_layers)
            trace = self.net.trace(x, backend, check=False, upto=k, preactivations=self.preactivations, also=also,
                                   pooled=self.pooled(whole), at_switches=self._at_switches if whole else ())
            r = self.backward(trace, start_signal(trace, k, target, self.start), k, return_layers=return_layers)
        finally:
            self._call = None
        if self.times_input:
            if return_layers:
                return x * r[0], r[1]
            return x * r
        return r

    def _whole(self, start, stop, return_layers):
        """Does a sweep from ``start`` run the whole rules (see the class doc)?"""
        return stop is None and not return_layers and self.whole_rules is not None \
            and not any(lo <= start < hi for lo, hi in self.whole_spans)

    def pooled(self, whole):
        """The conv layers i whose conv, ReLU, 2x2 max-pool triple the trace may run as one kernel call that
        writes neither z nor relu(z) (:meth:`relprop.nets.Graph.trace`'s ``pooled``; it skips a triple the
        trace stops inside): z read by no rule (:attr:`preactivations`), and the ReLU's and the pool's
        rules (the whole sweep's with ``whole``) reading neither's values
        (:meth:`relprop.rules.Rule.reads_records`)."""
        if not _config.TRACE_FUSED_POOLS:
            return frozenset()
        hit = self._pooled.get(whole)
        if hit is None:
            net, rules = self.net, self.whole_rules if whole else self.rules
            hit = self._pooled[whole] = frozenset(
                i for i in range(len(net.layers) - 2) if i not in self.preactivations
                and net._conv_relu_pool(i) and not rules[i + 1].reads_records(net.layers[i + 1])
                and not rules[i + 2].reads_records(net.layers[i + 2]))
        return hit

    def state(self, i):
        """Layer i's cache (denominators of constant terms, ...), emptied when its parameters change; its
        ``"_call"`` is a token of the :meth:`__call__` running (None outside one): what is kept for one call
        only, the rules' modified weights (:func:`relprop.rules.core._params`), carries it."""
        st = self._state[i]
        version = self.net.layers[i].version
        if st.get("_version", 0) != version:
            st.clear()
            st["_version"] = version
        st["_call"] = self._call
        return st

    def backward(self, trace, seed, start=None, stop=None, return_layers=False):
        """Run the rules from layer ``start`` (default: the output layer) down.

        ``seed`` is the signal at layer ``start``'s output.  Returns the signal at the net
        input, or, with ``stop=j``, the summed signal at layer j's output (Grad-CAM's
        gradient at a feature map); ``(R, per_layer)`` with ``return_layers=True``.
        """
        net = self.net
        n = len(net.layers)
        start = n - 1 if start is None else start
        acc, owned = [None] * n, [False] * n
        acc[start], owned[start] = seed, not return_layers
        at_input, input_owned = None, False
        per_layer = [None] * n + [seed] if return_layers else None
        lowest = -1 if stop is None else stop
        rules = self.whole_rules if self._whole(start, stop, return_layers) else self.rules
        for i in range(start, lowest, -1):
            r = acc[i]
            if r is None:  # no signal reached this layer (not an ancestor of the start)
                continue
            acc[i] = None
            layer = net.layers[i]
            src = getattr(rules[i], "also_of", i)  # whose traced forwards this rule takes (its own, mostly)
            extra = trace.also.pop(src, None)
            rec = Record(trace.layer_input(i), trace.outputs[i], trace.aux.get(i), trace.backend, self._nonneg[i],
                         r_scratch=owned[i], also=None if extra is None else dict(zip(self._traced_terms[src], extra)))
            r_in = rules[i].backward(layer, rec, r, self.state(i))
            if return_layers:
                per_layer[i] = r_in
            parts = r_in if layer.n_inputs is None else [r_in]
            for p, part in zip(net.parents(i), parts):
                if part is None:  # the rule sends nothing further down (e.g. training stops at the first layer)
                    continue
                # a part may be handed on as is (ReLU under LRP), or to several parents (add)
                exclusive = not return_layers and (part is not r or owned[i]) and sum(q is part for q in parts) == 1
                if p == INPUT:
                    if at_input is None:
                        at_input, input_owned = part, exclusive
                    elif input_owned:
                        at_input += part
                    else:
                        at_input, input_owned = at_input + part, True
                elif acc[p] is None:
                    acc[p], owned[p] = part, exclusive
                elif owned[p]:
                    acc[p] += part
                else:
                    acc[p], owned[p] = acc[p] + part, True
        if stop is not None:
            out = acc[stop]
            if out is None:
                out = array_namespace(seed).zeros_like(trace.layer_output(stop))
        else:
            out = at_input if at_input is not None else array_namespace(seed).zeros_like(trace.x)
        if return_layers:
            return out, per_layer
        return out

    def __repr__(self):
        body = "".join(f"\n  ({i}) {layer.kind}: {rule!r}" for i, (layer, rule) in
                       enumerate(zip(self.net.layers, self.rules)))
        return f"Sweep({self.name!r}, start={self.start!r}{body}\n)"
