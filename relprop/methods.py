"""The method registry, :class:`Explainer` and :func:`explain`.

A *method* is a factory ``factory(net, **options) -> prepared`` registered under a name
with :func:`register_method`; the prepared object is called as
``prepared(x, target, backend, return_layers)`` with a validated input and a resolved
backend, and returns an array of x's shape (or ``(R, per_layer)`` when
``return_layers=True`` and the method supports it).  The factory validates its options
and precomputes what repeated calls share (modified weights, patterns), so an
:class:`Explainer` pays for it once.

This module is the registry only and imports no method module, so nothing here depends
on them (no import cycle): the method modules import it and register their methods, and
the package ``relprop`` imports every method module — :mod:`relprop.rules` the gradient,
DeconvNet, Guided Backprop and LRP/DTD family, :mod:`relprop.patterns`
PatternNet/PatternAttribution, :mod:`relprop.attribution` the input-level methods,
:mod:`relprop.lime` LIME.
"""
from __future__ import annotations

import inspect

from ._backend import array_namespace, resolve_backend
from .engine import Unit, output_signal, resolve_target  # noqa: F401  (re-exported: methods use them)

#: name -> factory(net, **options)
METHODS: dict = {}

#: callables ``resolver(method_object) -> factory or None`` for non-string methods
#: (composites, {layer: rule} dicts); the rules package adds one.
METHOD_RESOLVERS: list = []


def register_method(name):
    """Decorator: register ``factory(net, **options)`` under ``name``."""

    def deco(factory):
        METHODS[name] = factory
        return factory

    return deco


def known_methods():
    """Sorted names of every registered method."""
    return sorted(METHODS)


def resolve_method(method):
    """Return ``(name, factory)`` for a method name, composite or {layer: rule} mapping."""
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known methods: {', '.join(sorted(METHODS))}")
        return method, METHODS[method]
    for resolver in METHOD_RESOLVERS:
        factory = resolver(method)
        if factory is not None:
            return getattr(method, "name", type(method).__name__), factory
    raise TypeError(
        f"method must be a method name, a composite or a {{layer_index: rule}} dict, got {type(method).__name__}"
    )


def _bind_options(name, factory, net, options):
    sig = inspect.signature(factory)
    try:
        sig.bind(net, **options)
    except TypeError:
        accepted = [p for p in list(sig.parameters)[1:] if sig.parameters[p].kind is not inspect.Parameter.VAR_KEYWORD]
        unknown = sorted(set(options) - set(accepted))
        raise TypeError(
            f"method {name!r} got unknown option(s) {unknown}; it accepts {accepted}"
        ) from None


class Explainer:
    """A method prepared for one net: cached per-net state for repeated calls.

    Parameters
    ----------
    net : relprop.nets.Graph
        Any relprop net (a :class:`~relprop.nets.Sequential` chain or a layer graph).
    method : str, composite or dict
        A registered method name (see :func:`known_methods`), a composite, or a
        ``{layer_index: rule}`` mapping covering every dense/conv layer.
    backend : None | "reference" | "cpu" | "cuda"
        None picks "cpu" for NumPy input, "cuda" for CuPy input.
    **options
        The method's options (``epsilon=``, ``gamma=``, ``patterns=``, ``steps=``, ...).

    Examples
    --------
    >>> explainer = Explainer(net, "lrp.epsilon_plus_flat")      # doctest: +SKIP
    >>> heatmaps = explainer(x)                                  # doctest: +SKIP
    """

    def __init__(self, net, method, backend=None, **options):
        from .nets import Graph

        if not isinstance(net, Graph):
            raise TypeError(f"net must be a relprop net (relprop.nets.Graph / Sequential), got {type(net).__name__}")
        self.net = net
        self.backend = backend
        self.name, factory = resolve_method(method)
        if isinstance(method, str):
            _bind_options(self.name, factory, net, options)
            self._method = factory(net, **options)
        else:
            self._method = factory(net, **options)

    def __call__(self, x, target=None, return_layers=False):
        """Explain ``x`` for ``target``: None (the argmax class per sample), an int, an int per
        sample, or a :class:`relprop.Unit` of any layer."""
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"explain({self.name!r}): x must be a NumPy or CuPy float array (N, ...), "
                            f"got {type(x).__name__}")
        backend = resolve_backend(self.backend, array_namespace(x))
        self.net.check_input(x, where=f"explain({self.name!r})")
        from .kernels.cpu._derived import one_call  # (here: the CPU kernels load when first used)

        # each weight array checked once (ahead, on another thread) against the CPU kernels' cached arrangements
        with one_call(self, x.shape[0]):
            out = self._method(x, target, backend, return_layers)
        R = out[0] if isinstance(out, tuple) else out
        xp = array_namespace(R)
        if not bool(xp.isfinite(R).all()):
            raise ValueError(f"explain({self.name!r}): the explanation is not finite (the input's scale or the "
                             "method's options overflow its arithmetic); rescale the input or use float64")
        return out

    def __repr__(self):
        return f"Explainer({self.name!r})"


def explain(net, x, method, target=None, backend=None, return_layers=False, **options):
    """Explain the decision of ``net`` on ``x``: an array of x's shape.

    A thin wrapper over :class:`Explainer`; build one Explainer when explaining many
    batches with the same method (it caches patterns and per-input-shape constants).  The
    rules' modified weights (z⁺'s W⁺: a convolution's, a dense layer's up to
    ``_config.RULE_WEIGHTS_KEPT_MAX_BYTES``) and their kernel arrangements are kept between
    calls either way (beside the layer's own, while its weights are unchanged).
    """
    return Explainer(net, method, backend=backend, **options)(x, target, return_layers=return_layers)
