r"""Input-level methods: SmoothGrad, Integrated/Expected Gradients, Grad-CAM, occlusion, erasure.

Each method wraps the backward sweep (docs/conventions.md, "Input-level methods"): it builds many
*modified inputs* (noisy copies, path points, occluded copies, ...), pushes them through
the net and reduces.  Speed comes from batching and memory must stay bounded, so every
method streams its modified inputs through the net in chunks of at most ``batch_size``
(default :data:`relprop._config.DEFAULT_BATCH_SIZE`; the count is of modified inputs per
pass, whatever the number of samples) and never materialises all of them at once.

Targets are fixed once, from the *original* input: the argmax of f(x) per sample unless
``target`` is given, and every modified input of a sample is explained for that class.

Random methods take ``seed=`` (None, an int or a :class:`numpy.random.Generator`); an int
gives the same draws on every call, a Generator advances.  Draws are made in the order of
the modified inputs, so the result does not depend on ``batch_size``.

All methods register with :func:`relprop.methods.register_method` and are called through
``relprop.explain(net, x, name, **options)`` / ``relprop.Explainer``:

============================  ==========================================================
``smoothgrad``                mean over n noisy copies of any base method
``smoothgrad_squared``        mean of the squared base maps
``integrated_gradients``      right Riemann sum along the straight path from a baseline
``expected_gradients``        baselines drawn from data, α ~ U(0, 1)
``gradcam``                   ReLU(Σ_k α_k A^k) at a layer, upsampled: shape (N, 1, H, W)
``guided_gradcam``            guided backprop ⊙ the upsampled cam: x's shape
``occlusion``                 mean over covering windows of f_c(x) − f_c(x occluded)
``erasure``                   f_c(x) − f_c(unit zeroed) at a hidden layer: that layer's shape
============================  ==========================================================
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import numpy as np

from . import _config
from . import _validate as V
from ._backend import array_namespace
from .engine import Unit
from .methods import Explainer, output_signal, register_method, resolve_target
from .rules.signal import gradient_sweep

__all__ = ["smoothgrad", "smoothgrad_squared", "integrated_gradients", "expected_gradients", "gradcam",
           "guided_gradcam", "occlusion", "erasure"]


# -- shared plumbing --------------------------------------------------------------------------
from ._validate import check_int as _check_int  # noqa: E402


def _check_batch_size(where, batch_size):
    return None if batch_size is None else _check_int(where, "batch_size", batch_size, 1)


def _batch(batch_size):
    return _config.DEFAULT_BATCH_SIZE if batch_size is None else batch_size


def _check_seed(where, seed):
    if seed is None or isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return int(seed)
    raise TypeError(f"{where}: seed must be None, an int or a numpy.random.Generator, got {type(seed).__name__}")


def _rng(seed):
    """A fresh generator for an int (same draws every call); a Generator is used as is."""
    return np.random.default_rng(seed)


def _no_layers(where, return_layers):
    if return_layers:
        raise ValueError(f"{where}: return_layers=True is supported by the relevance methods only")


def _forward(net, x, backend, batch_size):
    """Logits of ``x`` in chunks of ``batch_size`` (nothing kept for a backward sweep)."""
    xp = array_namespace(x)
    outs = [net.trace(x[s:s + batch_size], backend, keep=False, check=False).output
            for s in range(0, x.shape[0], batch_size)]
    return outs[0] if len(outs) == 1 else xp.concatenate(outs)


def _forward_from(net, a, start, backend):
    """Run layers ``start, start + 1, ...`` of a chain on ``a`` (the input of layer ``start``)."""
    for layer in net.layers[start:]:
        a, _ = layer.forward(a, backend)
    return a


def _check_target(net, x, target):
    """Validate ``target`` against x's batch and the number of outputs without a forward pass."""
    if target is not None:
        resolve_target(array_namespace(x).zeros(net.shapes(x.shape)[-1], dtype=np.float32), target)


def _targets(net, x, target, logits):
    """Per-sample class indices, or a validated :class:`relprop.Unit` (which every sample shares)."""
    if isinstance(target, Unit):
        target.resolve(net, x.shape)
        return target
    return resolve_target(logits, target)


def _of(targets, owners):
    """The targets of some points: their samples' classes, or the shared Unit."""
    return targets if isinstance(targets, Unit) else targets[owners]


def _scores(net, xb, tb, backend):
    """f_t(x) per sample: the target logit, or the Unit's activation (summed over its positions)."""
    if isinstance(tb, Unit):
        k = tb.layer % len(net.layers)
        return tb.value(net.trace(xb, backend, check=False, upto=k).layer_output(k))
    return _pick(net.trace(xb, backend, keep=False, check=False).output, tb)


def _gradient(net, xb, tb, backend, relu="gradient"):
    """∂f_t/∂x of a batch (one traced forward and one backward sweep of the engine); ``tb`` per-sample
    classes or a Unit."""
    if isinstance(tb, Unit):
        return gradient_sweep(net, relu)(xb, tb, backend)
    trace = net.trace(xb, backend, check=False, preactivations=False)  # the gradient rules read no z
    return gradient_sweep(net, relu).backward(trace, output_signal(trace.output, tb, "onehot"))


def _pick(logits, t):
    xp = array_namespace(logits)
    return logits[xp.arange(logits.shape[0]), t]


def _sum_by_owner(acc, vals, p0, m):
    """Add the values of points p0, p0+1, ... into ``acc[p // m]`` (points are owner-major).

    A chunk is a partial head owner, whole owners (one reshape-sum) and a partial tail.
    """
    n, pos = vals.shape[0], 0
    head = (-p0) % m
    if head:
        pos = min(head, n)
        acc[p0 // m] += vals[:pos].sum(axis=0)
    full = (n - pos) // m
    if full:
        i = (p0 + pos) // m
        acc[i:i + full] += vals[pos:pos + full * m].reshape((full, m) + vals.shape[1:]).sum(axis=1)
        pos += full * m
    if pos < n:
        acc[(p0 + pos) // m] += vals[pos:].sum(axis=0)
    return acc


def _progress(total, progress, desc):
    """A tqdm bar over ``total`` modified inputs, shown only once a call has run for 2 s."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="input", disable=not progress, delay=2.0, leave=False)


def _accumulate(xp, n_owners, m, item_shape, dtype, batch_size, evaluate, progress=False, desc=None):
    """Σ over the m points of every owner of ``evaluate(p0, p1, owners)``, streamed in chunks.

    ``evaluate`` returns the values of points p0..p1-1 (shape (p1 - p0, *item_shape));
    at most ``batch_size`` points exist at a time.
    """
    acc = xp.zeros((n_owners,) + tuple(item_shape), dtype=dtype)
    total = n_owners * m
    with _progress(total, progress, desc) as bar:
        for p0 in range(0, total, batch_size):
            p1 = min(p0 + batch_size, total)
            owners = xp.arange(p0, p1) // m
            _sum_by_owner(acc, evaluate(p0, p1, owners), p0, m)
            bar.update(p1 - p0)
    return acc


def _resolve_layer(net, where, layer):
    n = len(net.layers)
    layer = _check_int(where, "layer", layer, -n)
    layer = layer + n if layer < 0 else layer
    if layer >= n - 1:
        raise ValueError(f"{where}: layer={layer} is the output layer; pick a hidden layer in [0, {n - 2}]")
    return layer


# -- SmoothGrad -------------------------------------------------------------------------------
class _SmoothGrad:
    def __init__(self, net, n, noise_level, seed, base, base_options, squared, batch_size, progress):
        where = "smoothgrad_squared" if squared else "smoothgrad"
        self.progress = V.check_bool(where, "progress", progress)
        self.n = _check_int(where, "n", n, 1)
        if not isinstance(noise_level, numbers.Real) or not noise_level >= 0 or not math.isfinite(noise_level):
            raise ValueError(f"{where}: noise_level={noise_level!r} is invalid; expected a finite number >= 0")
        self.noise_level = float(noise_level)
        self.seed = _check_seed(where, seed)
        self.batch_size = _check_batch_size(where, batch_size)
        self.net, self.squared, self.where = net, V.check_bool(where, "squared", squared), where
        if base_options is not None and not isinstance(base_options, Mapping):
            raise TypeError(f"{where}: base_options must be a dict of the base method's options, "
                            f"got {type(base_options).__name__}")
        base_options = dict(base_options or {})
        if base in ("smoothgrad", "smoothgrad_squared"):
            raise ValueError(f"{where}: base={base!r} would nest SmoothGrad in itself")
        if base in ("gradient", "gradient_x_input") and not base_options:
            self.base, self.times_input = None, base == "gradient_x_input"  # the direct sweep
        else:
            self.base = Explainer(net, base, **base_options)._method

    def __call__(self, x, target, backend, return_layers=False):
        _no_layers(self.where, return_layers)
        xp, batch_size, n = array_namespace(x), _batch(self.batch_size), self.n
        logits = None if isinstance(target, Unit) else _forward(self.net, x, backend, batch_size)
        targets = _targets(self.net, x, target, logits)
        # σ = noise_level · (max x − min x) per sample
        flat = x.reshape(x.shape[0], -1)
        sigma = self.noise_level * (flat.max(axis=1) - flat.min(axis=1))
        sigma = sigma.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        rng = _rng(self.seed)

        def evaluate(p0, p1, owners):
            noise = rng.standard_normal((p1 - p0,) + x.shape[1:], dtype=x.dtype)
            xb = x[owners] + xp.asarray(noise) * sigma[owners]
            if self.base is None:
                r = _gradient(self.net, xb, _of(targets, owners), backend)
                if self.times_input:
                    r = xb * r
            else:
                r = self.base(xb, _of(targets, owners), backend, False)
            return r * r if self.squared else r

        return _accumulate(xp, x.shape[0], n, x.shape[1:], x.dtype, batch_size, evaluate, self.progress,
                           self.where) / n


@register_method("smoothgrad")
def smoothgrad(net, n=20, noise_level=0.1, seed=None, base="gradient", base_options=None, squared=False,
               batch_size=None, progress=True):
    r"""SmoothGrad (Smilkov et al. 2017): :math:`\frac1n \sum_{k=1}^n M(x + \varepsilon_k)`,
    :math:`\varepsilon_k \sim \mathcal N(0, \sigma^2)`, σ = noise_level · (max x − min x) per sample.

    Parameters
    ----------
    n : int >= 1
        Noisy copies per sample (every copy is noisy).
    noise_level : float >= 0
        σ relative to each sample's value range; 0 gives exactly the base method.
    seed : None | int | numpy.random.Generator
    base : str
        Any registered method name (``"gradient"``, ``"gradient_x_input"``,
        ``"lrp.epsilon_plus_flat"``, ...); ``base_options`` are passed to it.
    squared : bool
        Average M(x + ε)² instead (``smoothgrad_squared``).
    batch_size : int
        Noisy copies per pass (default ``_config.DEFAULT_BATCH_SIZE``).
    progress : bool
        A tqdm progress bar over the noisy copies, shown once a call has run for 2 s.
    """
    return _SmoothGrad(net, n, noise_level, seed, base, base_options, squared, batch_size, progress)


@register_method("smoothgrad_squared")
def smoothgrad_squared(net, n=20, noise_level=0.1, seed=None, base="gradient", base_options=None,
                       batch_size=None, progress=True):
    r"""SmoothGrad²: :math:`\frac1n \sum_k M(x + \varepsilon_k)^2` (see :func:`smoothgrad`)."""
    return _SmoothGrad(net, n, noise_level, seed, base, base_options, True, batch_size, progress)


# -- Integrated Gradients and Expected Gradients ----------------------------------------------
def _baselines(where, baseline, x):
    """Normalise ``baseline`` to an array (B, N or 1, *x.shape[1:]) of x's dtype."""
    xp = array_namespace(x)
    item = tuple(x.shape[1:])
    if isinstance(baseline, (list, tuple)):
        if not baseline:
            raise ValueError(f"{where}: baseline is an empty list")
        parts = [_baselines(where, b, x) for b in baseline]
        rows = max(p.shape[1] for p in parts)  # mixing shared and per-sample baselines: broadcast
        return xp.concatenate([xp.broadcast_to(p, (p.shape[0], rows) + item) for p in parts])
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        V.check_finite_number(where, "baseline", baseline, x.dtype)
        return xp.full((1, 1) + item, baseline, dtype=x.dtype)
    if not hasattr(baseline, "shape"):
        raise TypeError(f"{where}: baseline must be a number, an array or a list of them, "
                        f"got {type(baseline).__name__}")
    if np.dtype(baseline.dtype).kind not in "fiub":
        raise TypeError(f"{where}: baseline has dtype {baseline.dtype}; expected real numbers")
    with np.errstate(over="ignore"):
        b = xp.asarray(baseline, dtype=x.dtype)
    shape = tuple(b.shape)
    if shape == item:
        b = b[None, None]
    elif shape == tuple(x.shape):
        b = b[None]
    elif len(shape) == x.ndim + 1 and shape[2:] == item and shape[1] in (1, x.shape[0]):
        pass
    else:
        raise ValueError(
            f"{where}: baseline has shape {shape}; expected a number, x[0]'s shape {item}, x's shape "
            f"{tuple(x.shape)}, or a set of baselines (B, N or 1, *{item})"
        )
    if not bool(xp.isfinite(b).all()):
        raise ValueError(f"{where}: baseline contains NaN or Inf (in {np.dtype(x.dtype)}: values beyond its range "
                         "overflow to Inf)")
    return b


class _IntegratedGradients:
    where = "integrated_gradients"

    def __init__(self, net, steps, baseline, batch_size, return_gap, progress):
        self.net = net
        self.steps = _check_int(self.where, "steps", steps, 1)
        self.baseline, self.return_gap = baseline, V.check_bool(self.where, "return_gap", return_gap)
        self.batch_size = _check_batch_size(self.where, batch_size)
        self.progress = V.check_bool(self.where, "progress", progress)
        if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
            V.check_finite_number(self.where, "baseline", baseline)

    def __call__(self, x, target, backend, return_layers=False):
        _no_layers(self.where, return_layers)
        xp, batch_size, m = array_namespace(x), _batch(self.batch_size), self.steps
        base = _baselines(self.where, self.baseline, x)  # (B, N or 1, ...)
        n_base, n = base.shape[0], x.shape[0]
        unit = isinstance(target, Unit)
        logits = None if unit else _forward(self.net, x, backend, batch_size)
        targets = _targets(self.net, x, target, logits)
        per_sample = base.shape[1] != 1
        alphas = (xp.arange(1, m + 1, dtype=x.dtype) / m).reshape((-1,) + (1,) * (x.ndim - 1))

        def baseline_of(i, b):
            return base[b, i if per_sample else 0]

        # the points of sample i are contiguous (baseline-major, then k = 1..m), and each chunk
        # adds its (x − x') ⊙ ∇f into the sample's sum: memory is bounded by batch_size and N,
        # whatever the number of baselines
        def evaluate(p0, p1, owners):
            p = xp.arange(p0, p1)
            x0 = baseline_of(owners, (p // m) % n_base)
            delta = x[owners] - x0
            xb = x0 + alphas[p % m] * delta  # x' + (k/m)(x − x')
            return delta * _gradient(self.net, xb, _of(targets, owners), backend)

        ig = _accumulate(xp, n, n_base * m, x.shape[1:], x.dtype, batch_size, evaluate, self.progress,
                         self.where) / (m * n_base)
        if not self.return_gap:
            return ig
        f_base = xp.zeros(n, dtype=x.dtype)  # Σ_b f_c(x'_b), streamed over (sample, baseline) pairs
        for q0 in range(0, n * n_base, batch_size):
            q = xp.arange(q0, min(q0 + batch_size, n * n_base))
            i = q // n_base
            f = _scores(self.net, baseline_of(i, q % n_base), _of(targets, i), backend)
            _sum_by_owner(f_base, f, q0, n_base)
        f_x = _scores(self.net, x, targets, backend) if unit else _pick(logits, targets)
        return ig, _gap(ig, f_x, f_base / n_base)


def _gap(attr, f_x, f_base):
    """Completeness gap Σ attribution − (f_c(x) − f_c(x'))."""
    return attr.reshape(attr.shape[0], -1).sum(axis=1) - (f_x - f_base)


@register_method("integrated_gradients")
def integrated_gradients(net, steps=50, baseline=0.0, batch_size=None, return_gap=False, progress=True):
    r"""Integrated Gradients (Sundararajan et al. 2017), right Riemann sum:

    .. math:: \mathrm{IG}(x) = (x - x') \odot \frac1m \sum_{k=1}^{m}
              \nabla f_c\!\left(x' + \tfrac{k}{m}(x - x')\right)

    Parameters
    ----------
    steps : int >= 1
        m, the number of path points per sample and baseline.
    baseline : number | array | list
        A number; an array shaped like ``x[0]`` (shared) or like ``x`` (one per sample); or
        a *set* of baselines to average the attributions over: a list of the above, or an
        array (B, N, ...) / (B, 1, ...) with a leading baseline axis.
    batch_size : int
        Path points per pass (default ``_config.DEFAULT_BATCH_SIZE``): the m·N·B points are
        streamed, never held at once, and the memory does not grow with the number of
        baselines B beyond the baselines themselves.
    return_gap : bool
        Return ``(IG, gap)`` with the completeness gap ``gap[i] = Σ IG_i − (f_c(x_i) −
        f_c(x'))`` (averaged over the baselines of a set), shape (N,).
    progress : bool
        A tqdm progress bar over the path points, shown once a call has run for 2 s.

    Baselines must be finite in x's dtype (NaN, Inf, or a number beyond float32's range for
    float32 input, raise ValueError).
    """
    return _IntegratedGradients(net, steps, baseline, batch_size, return_gap, progress)


class _ExpectedGradients:
    where = "expected_gradients"

    def __init__(self, net, data, n, seed, batch_size, return_gap, progress):
        if data is None:
            raise ValueError(f"{self.where}: data= is required (the array the baselines are drawn from)")
        if not hasattr(data, "shape") or data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f"{self.where}: data must be an array (M, ...) of inputs with M >= 1")
        V.check_real_array(self.where, "data", data)
        self.net, self.data = net, data
        self.n = _check_int(self.where, "n", n, 1)
        self.seed = _check_seed(self.where, seed)
        self.batch_size = _check_batch_size(self.where, batch_size)
        self.return_gap = V.check_bool(self.where, "return_gap", return_gap)
        self.progress = V.check_bool(self.where, "progress", progress)

    def __call__(self, x, target, backend, return_layers=False):
        _no_layers(self.where, return_layers)
        xp, batch_size, m, nx = array_namespace(x), _batch(self.batch_size), self.n, x.shape[0]
        if tuple(self.data.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"{self.where}: data has shape {tuple(self.data.shape)}, "
                             f"expected (M, *{tuple(x.shape[1:])})")
        with np.errstate(over="ignore"):
            data = xp.asarray(self.data, dtype=x.dtype)
        V.check_finite("data", data, self.where)  # also values beyond float32's range for float32 x
        logits = _forward(self.net, x, backend, batch_size)
        targets = resolve_target(logits, target)
        rng = _rng(self.seed)
        # one baseline index and one α per point, drawn up front (N·n numbers)
        pick = xp.asarray(rng.integers(0, data.shape[0], size=nx * m))
        alpha = xp.asarray(rng.random(nx * m)).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))

        def evaluate(p0, p1, owners):
            x0, xi, a = data[pick[p0:p1]], x[owners], alpha[p0:p1]
            return (xi - x0) * _gradient(self.net, x0 + a * (xi - x0), targets[owners], backend)

        eg = _accumulate(xp, nx, m, x.shape[1:], x.dtype, batch_size, evaluate, self.progress, self.where) / m
        if not self.return_gap:
            return eg
        f0 = _pick(_forward(self.net, data[pick], backend, batch_size), xp.repeat(targets, m))
        return eg, _gap(eg, _pick(logits, targets), f0.reshape(nx, m).mean(axis=1))


@register_method("expected_gradients")
def expected_gradients(net, data=None, n=50, seed=None, batch_size=None, return_gap=False, progress=True):
    r"""Expected Gradients (Erion et al. 2021): :math:`\frac1n \sum_{k=1}^n (x - x'_k) \odot
    \nabla f_c(x'_k + \alpha_k (x - x'_k))`, x'_k drawn uniformly from ``data`` (with
    replacement), α_k ~ U(0, 1).

    ``return_gap=True`` returns ``(EG, gap)``, gap = Σ EG − (f_c(x) − mean_k f_c(x'_k)) (zero
    only in expectation).  ``data`` must be finite; ``progress`` shows a tqdm bar over the n·N
    points once a call has run for 2 s.
    """
    return _ExpectedGradients(net, data, n, seed, batch_size, return_gap, progress)


# -- Grad-CAM ---------------------------------------------------------------------------------
def _default_cam_layer(net, where):
    convs = [i for i, layer in enumerate(net.layers) if layer.kind == "conv2d"]
    if not convs:
        raise ValueError(f"{where}: the net has no conv layer; pass layer= (a layer with (N, K, h, w) output)")
    i = convs[-1]
    return i + 1 if i + 1 < len(net.layers) and net.layers[i + 1].kind == "relu" else i


def _zoom(cam, size, order):
    """Resize (N, h, w) maps to ``size`` with half-pixel centres (PyTorch's align_corners=False)."""
    xp = array_namespace(cam)
    if xp is np:
        from scipy import ndimage
    else:  # pragma: no cover - needs a GPU
        from cupyx.scipy import ndimage
    factors = (1.0, size[0] / cam.shape[1], size[1] / cam.shape[2])
    out = ndimage.zoom(cam, factors, order=order, grid_mode=True, mode="nearest")
    assert out.shape[1:] == tuple(size), (out.shape, size)
    return out


class _GradCAM:
    def __init__(self, net, layer, relu, upsample, batch_size, guided):
        self.where = "guided_gradcam" if guided else "gradcam"
        self.net, self.relu, self.guided = net, V.check_bool(self.where, "relu", relu), guided
        self.layer = _default_cam_layer(net, self.where) if layer is None else _resolve_layer(net, self.where, layer)
        if upsample not in ("bilinear", "nearest", None):
            raise ValueError(f"{self.where}: upsample={upsample!r} is invalid; expected 'bilinear', 'nearest' or None")
        if guided and upsample is None:
            raise ValueError("guided_gradcam: upsample=None is invalid; the cam must match the input size")
        self.upsample = upsample
        self.batch_size = _check_batch_size(self.where, batch_size)

    def __call__(self, x, target, backend, return_layers=False):
        _no_layers(self.where, return_layers)
        xp, batch_size, layer = array_namespace(x), _batch(self.batch_size), self.layer
        a_shape = self.net.shapes(x.shape)[layer]
        if len(a_shape) != 4:
            raise ValueError(f"{self.where}: layer {layer} ({self.net.layers[layer].kind}) has output shape "
                             f"{a_shape}; Grad-CAM needs feature maps (N, K, h, w)")
        if self.upsample is not None and x.ndim != 4:
            raise ValueError(f"{self.where}: upsampling needs an image input (N, C, H, W), got {tuple(x.shape)}")
        _check_target(self.net, x, target)
        out = []
        for s in range(0, x.shape[0], batch_size):
            xb = x[s:s + batch_size]
            t = target if target is None or isinstance(target, numbers.Integral) else target[s:s + batch_size]
            trace = self.net.trace(xb, backend, check=False)
            g = output_signal(trace.output, resolve_target(trace.output, t), "onehot")
            a = trace.layer_output(layer)
            alpha = gradient_sweep(self.net).backward(trace, g, stop=layer).mean(axis=(2, 3))  # α_k = mean ∂y_c/∂A^k
            cam = (alpha[:, :, None, None] * a).sum(axis=1)
            if self.relu:
                cam = xp.maximum(cam, 0)
            if self.upsample is not None:
                cam = _zoom(cam, x.shape[2:], 1 if self.upsample == "bilinear" else 0)
            cam = cam[:, None]  # (n, 1, ·, ·): broadcasts over channels
            if self.guided:
                cam = gradient_sweep(self.net, "guided").backward(trace, g) * cam
            out.append(cam.astype(x.dtype, copy=False))
        return out[0] if len(out) == 1 else xp.concatenate(out)


@register_method("gradcam")
def gradcam(net, layer=None, relu=True, upsample="bilinear", batch_size=None):
    r"""Grad-CAM (Selvaraju et al. 2017): cam = ReLU(Σ_k α_k A^k), α_k = mean over positions of ∂y_c/∂A^k.

    Returns an array (N, 1, H, W) (one channel, broadcasting against x), or
    (N, 1, h, w) at the layer's resolution with ``upsample=None``.

    Parameters
    ----------
    layer : int
        Index in ``net.layers`` of the layer whose output is A (negative counts from the
        end); default the ReLU right after the last conv (or the last conv itself).
    relu : bool
        False gives the signed map (Captum's LayerGradCam default).
    upsample : "bilinear" | "nearest" | None
        ``scipy.ndimage.zoom(order=1 or 0, grid_mode=True, mode="nearest")``: half-pixel
        centres as PyTorch's ``interpolate(align_corners=False)``.
    batch_size : int
        Samples per pass.
    """
    return _GradCAM(net, layer, relu, upsample, batch_size, guided=False)


@register_method("guided_gradcam")
def guided_gradcam(net, layer=None, relu=True, upsample="bilinear", batch_size=None):
    """Guided Grad-CAM: guided backprop (``relu="guided"`` sweep) ⊙ the upsampled cam, x's shape."""
    return _GradCAM(net, layer, relu, upsample, batch_size, guided=True)


# -- occlusion --------------------------------------------------------------------------------
def placements(size, window, stride):
    """Window starts 0, s, 2s, … along an axis of ``size``, the last clipped to the border.

    ⌈(size − window)/stride⌉ + 1 placements (as Captum); with stride <= window every position
    is covered, with stride > window the positions between windows are not.
    """
    count = -(-(size - window) // stride) + 1
    return np.minimum(np.arange(count) * stride, size - window)


def _as_image(x):
    """View (N, D) input as (N, 1, 1, D) so that one code path handles both."""
    return x if x.ndim == 4 else x.reshape(x.shape[0], 1, 1, -1)


def _window_masks(xp, y0, x0, size, window):
    """Boolean masks (B, H, W) of the windows starting at (y0[b], x0[b])."""
    rows, cols = xp.arange(size[0]), xp.arange(size[1])
    my = (rows >= y0[:, None]) & (rows < y0[:, None] + window[0])
    mx = (cols >= x0[:, None]) & (cols < x0[:, None] + window[1])
    return my[:, :, None] & mx[:, None, :]


def _coverage(size, window, stride, starts):
    """How many windows cover each position along one axis."""
    cover = np.zeros(size, dtype=np.int64)
    for s in starts:
        cover[s:s + window] += 1
    return cover


class _Occlusion:
    where = "occlusion"

    def __init__(self, net, window, stride, baseline, batch_size, progress):
        self.net = net
        self.window = V.pair("window", window, self.where, minimum=1)
        self.stride = self.window if stride is None else V.pair("stride", stride, self.where, minimum=1)
        number = isinstance(baseline, numbers.Real) and not isinstance(baseline, bool)
        if not number and not hasattr(baseline, "shape"):
            raise TypeError(f"{self.where}: baseline must be a number or an array, got {type(baseline).__name__}")
        if number:
            V.check_finite_number(self.where, "baseline", baseline)
        else:
            V.check_real_array(self.where, "baseline", baseline)
        self.baseline = baseline
        self.batch_size = _check_batch_size(self.where, batch_size)
        self.progress = V.check_bool(self.where, "progress", progress)

    def __call__(self, x, target, backend, return_layers=False):
        _no_layers(self.where, return_layers)
        xp, batch_size = array_namespace(x), _batch(self.batch_size)
        img = _as_image(x)
        size = img.shape[2:]
        window, stride = self.window, self.stride
        if x.ndim == 2:  # features along one axis: int window/stride apply to it
            window, stride = (1, window[1]), (1, stride[1])
        if window[0] > size[0] or window[1] > size[1]:
            raise ValueError(f"{self.where}: window {window} is larger than the input's spatial size {tuple(size)}")
        if isinstance(self.baseline, numbers.Real):
            V.check_finite_number(self.where, "baseline", self.baseline, x.dtype)
            fill = None
        else:
            with np.errstate(over="ignore"):
                b = xp.asarray(self.baseline, dtype=x.dtype)
            V.check_finite("baseline", b, self.where)
            if tuple(b.shape) not in (tuple(x.shape), tuple(x.shape[1:])):
                raise ValueError(f"{self.where}: baseline has shape {tuple(b.shape)}, expected a number, "
                                 f"{tuple(x.shape[1:])} or {tuple(x.shape)}")
            fill = _as_image(xp.broadcast_to(b, x.shape))
        ys, xs = placements(size[0], window[0], stride[0]), placements(size[1], window[1], stride[1])
        n_place = len(ys) * len(xs)
        y_start = xp.asarray(np.repeat(ys, len(xs)))
        x_start = xp.asarray(np.tile(xs, len(ys)))
        logits = _forward(self.net, x, backend, batch_size)
        targets = resolve_target(logits, target)
        f_x = _pick(logits, targets)

        def evaluate(p0, p1, owners):
            q = xp.arange(p0, p1) % n_place
            mask = _window_masks(xp, y_start[q], x_start[q], size, window)  # (B, H, W)
            xb = xp.where(mask[:, None], self.baseline if fill is None else fill[owners], img[owners])
            f = _pick(self.net.trace(xb.reshape((-1,) + x.shape[1:]), backend, keep=False, check=False).output,
                      targets[owners])
            return (f_x[owners] - f)[:, None, None] * mask  # f_c(x) − f_c(x occluded) on the window

        total = _accumulate(xp, x.shape[0], n_place, size, x.dtype, batch_size, evaluate, self.progress, self.where)
        cover = _coverage(size[0], window[0], stride[0], ys)[:, None] * _coverage(size[1], window[1], stride[1], xs)
        # stride > window leaves positions that no window covers: their attribution is 0 (not 0/0)
        cover = xp.asarray(cover, dtype=x.dtype)
        attr = xp.where(cover > 0, total / xp.maximum(cover, 1), 0).astype(x.dtype, copy=False)
        return xp.ascontiguousarray(xp.broadcast_to(attr[:, None], img.shape)).reshape(x.shape)


@register_method("occlusion")
def occlusion(net, window=4, stride=None, baseline=0.0, batch_size=None, progress=True):
    """Occlusion (Zeiler & Fergus 2014): attribution = mean, over the windows covering a
    feature, of f_c(x) − f_c(x with the window filled by ``baseline``).

    Windows are window×window pixels over all channels, placed at 0, s, 2s, … along each
    axis with the last clipped to the border (⌈(D − w)/s⌉ + 1 per axis). For (N, D) input
    the window slides along the features.  ``stride`` defaults to ``window``; ``baseline``
    is a number or an array shaped like x or x[0], finite in x's dtype.  With ``stride``
    larger than ``window`` some pixels lie between windows: no window covers them and their
    attribution is 0.  Occluded copies are streamed through the net ``batch_size`` at a time
    (``progress``: a tqdm bar, shown once a call has run for 2 s).  Returns x's shape (equal
    over the channels).
    """
    return _Occlusion(net, window, stride, baseline, batch_size, progress)


# -- representation erasure -------------------------------------------------------------------
class _Erasure:
    where = "erasure"

    def __init__(self, net, layer, group, batch_size, progress):
        self.net = net
        self.progress = V.check_bool(self.where, "progress", progress)
        if layer is None:
            linear = net.linear_layers()
            if not linear or linear[-1] == 0:
                raise ValueError(f"{self.where}: the net has no hidden layer before its last dense/conv layer; "
                                 "pass layer=")
            layer = linear[-1] - 1
        self.layer = _resolve_layer(net, self.where, layer)
        if not net.is_chain:
            raise ValueError(f"{self.where}: the net is a graph with branches; erasure reruns the layers after "
                             "the erased one and supports chains (Sequential) only")
        if group not in ("unit", "channel"):
            raise ValueError(f"{self.where}: group={group!r} is invalid; expected 'unit' or 'channel'")
        self.group = group
        self.batch_size = _check_batch_size(self.where, batch_size)

    def __call__(self, x, target, backend, return_layers=False):
        _no_layers(self.where, return_layers)
        xp, batch_size, layer = array_namespace(x), _batch(self.batch_size), self.layer
        # the hidden representation and the logits of every sample (one forward per chunk)
        parts, logit_parts = [], []
        for s in range(0, x.shape[0], batch_size):
            trace = self.net.trace(x[s:s + batch_size], backend, check=False)
            parts.append(trace.layer_output(layer))
            logit_parts.append(trace.output)
        a, logits = xp.concatenate(parts), xp.concatenate(logit_parts)
        targets = resolve_target(logits, target)
        f_x = _pick(logits, targets)
        channel = self.group == "channel"
        if channel and a.ndim < 3:
            raise ValueError(f"{self.where}: group='channel' needs feature maps, "
                             f"layer {layer} outputs {tuple(a.shape)}")
        n_units = a.shape[1] if channel else int(np.prod(a.shape[1:]))

        effect = xp.empty((x.shape[0], n_units), dtype=x.dtype)
        total = x.shape[0] * n_units
        bar = _progress(total, self.progress, self.where)
        for p0 in range(0, total, batch_size):  # erased copies, owner-major, batch_size at a time
            p1 = min(p0 + batch_size, total)
            bar.update(p1 - p0)
            owners, u, rows = xp.arange(p0, p1) // n_units, xp.arange(p0, p1) % n_units, xp.arange(p1 - p0)
            ab = a[owners]
            if channel:
                ab[rows, u] = 0
            else:
                ab.reshape(p1 - p0, -1)[rows, u] = 0
            f = _pick(_forward_from(self.net, ab, layer + 1, backend), targets[owners])
            effect[owners, u] = f_x[owners] - f
        bar.close()
        if channel:
            return xp.ascontiguousarray(xp.broadcast_to(effect.reshape(effect.shape + (1,) * (a.ndim - 2)), a.shape))
        return effect.reshape(a.shape)


@register_method("erasure")
def erasure(net, layer=None, group="unit", batch_size=None, progress=True):
    """Representation erasure (Li et al. 2017) at the output of hidden layer ``layer``.

    Returns the per-unit effect f_c(x) − f_c(x with that unit of layer ``layer``'s output
    set to 0), **shaped like that layer's output** (N, *units), not like x.  ``layer``
    defaults to the input of the last dense/conv layer (the penultimate representation);
    ``group="channel"`` erases whole feature maps (the effect is repeated over their
    positions).  Erased copies are run from layer + 1 on, ``batch_size`` at a time
    (``progress``: a tqdm bar, shown once a call has run for 2 s).
    """
    return _Erasure(net, layer, group, batch_size, progress)
