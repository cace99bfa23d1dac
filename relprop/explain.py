"""The method registry, :class:`Explainer` and :func:`explain`.

A *method* is a factory ``factory(net, **options) -> prepared`` registered under a name
with :func:`register_method`; the prepared object is called as
``prepared(x, target, backend, return_layers)`` with a validated input and a resolved
backend, and returns an array of x's shape (or ``(R, per_layer)`` when
``return_layers=True`` and the method supports it).  The factory validates its options
and precomputes what repeated calls share (modified weights, patterns), so an
:class:`Explainer` pays for it once.

Modules register their methods on import: this one the gradient family,
:mod:`relprop.rules` the LRP/DTD/DeconvNet/Guided Backprop family,
:mod:`relprop.patterns` PatternNet/PatternAttribution, :mod:`relprop.attribution` the
input-level methods.
"""
from __future__ import annotations

import inspect

import numpy as np

from ._backend import array_namespace, resolve_backend

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
    _load_method_modules()
    return sorted(METHODS)


def _load_method_modules():
    # Importing these registers their methods (they import this module, so import lazily).
    import importlib

    for mod in ("relprop.rules", "relprop.patterns", "relprop.attribution"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def resolve_method(method):
    """Return ``(name, factory)`` for a method name, composite or {layer: rule} mapping."""
    _load_method_modules()
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
    net : relprop.nets.Sequential
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
        from .nets import Sequential

        if not isinstance(net, Sequential):
            raise TypeError(f"net must be a relprop.nets.Sequential, got {type(net).__name__}")
        self.net = net
        self.backend = backend
        self.name, factory = resolve_method(method)
        if isinstance(method, str):
            _bind_options(self.name, factory, net, options)
            self._method = factory(net, **options)
        else:
            self._method = factory(net, **options)

    def __call__(self, x, target=None, return_layers=False):
        """Explain ``x`` for ``target`` (None: the argmax class per sample; an int; or an int per sample)."""
        backend = resolve_backend(self.backend, array_namespace(x))
        self.net.check_input(x, where=f"explain({self.name!r})")
        return self._method(x, target, backend, return_layers)

    def __repr__(self):
        return f"Explainer({self.name!r})"


def explain(net, x, method, target=None, backend=None, return_layers=False, **options):
    """Explain the decision of ``net`` on ``x``: an array of x's shape.

    A thin wrapper over :class:`Explainer`; build one Explainer when explaining many
    batches with the same method (it caches modified weights and patterns).
    """
    return Explainer(net, method, backend=backend, **options)(x, target, return_layers=return_layers)


# -- shared helpers of every method -----------------------------------------------------------
def resolve_target(logits, target):
    """Per-sample integer targets: argmax by default, an int for all, or an int array (N,)."""
    xp = array_namespace(logits)
    n, n_classes = logits.shape
    if target is None:
        return xp.argmax(logits, axis=1)
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        t = int(target)
        if not 0 <= t < n_classes:
            raise ValueError(f"target {t} is out of range for {n_classes} outputs")
        return xp.full((n,), t, dtype=np.int64)
    t = xp.asarray(target)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"target has shape {tuple(t.shape)}, expected an int or an int array of shape ({n},)")
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"target has dtype {t.dtype}, expected integers")
    if t.size and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        raise ValueError(f"target values must lie in [0, {n_classes}), got min {int(t.min())}, max {int(t.max())}")
    return t.astype(np.int64)


def output_signal(logits, target, mode="onehot"):
    """The signal that starts a backward sweep.

    ``"onehot"``: 1 at the target class (gradient-like methods); ``"logit"``: the target
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


# -- the gradient family ----------------------------------------------------------------------
class _GradientMethod:
    """Gradient (saliency, Simonyan et al. 2013): ∂f_c/∂x by the gradient sweep."""

    times_input = False

    def __init__(self, net):
        self.net = net

    def __call__(self, x, target, backend, return_layers=False):
        if return_layers:
            raise ValueError("return_layers=True is supported by the relevance methods only")
        trace = self.net.trace(x, backend, check=False)
        g = output_signal(trace.output, resolve_target(trace.output, target), "onehot")
        grad = self.net.backward(trace, g)
        return x * grad if self.times_input else grad


class _GradientTimesInput(_GradientMethod):
    """Gradient × Input: x ⊙ ∂f_c/∂x."""

    times_input = True


@register_method("gradient")
def gradient(net):
    """∂f_c/∂x: ReLU passes g·1[z > 0], max-pool routes g to the switch, linear layers pass Wᵀg."""
    return _GradientMethod(net)


@register_method("gradient_x_input")
def gradient_x_input(net):
    """x ⊙ ∂f_c/∂x."""
    return _GradientTimesInput(net)
