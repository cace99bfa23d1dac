"""A small trainer for :class:`~relprop.nets.Sequential`: minibatch SGD with momentum or Adam.

Everything runs on relprop's own kernels: the forward pass is ``net.trace``, the signal at
each layer's output comes from the layers' vector-Jacobian products (the gradient sweep of
``net.backward``, walked here one layer at a time so that the gradient at every dense/conv
output is at hand), and the parameter gradients from the weight-VJP kernels of the
``train`` family (:func:`relprop.kernels.dense_weight_vjp`,
:func:`relprop.kernels.conv2d_weight_vjp`).

Losses: ``"cross_entropy"`` (softmax over the logits, integer labels),
``"binary_cross_entropy"`` (one sigmoid per output, 0/1 targets: one-vs-rest detectors) and
``"squared"`` (½‖f(x) − y‖², real targets; the DTD detection-pooling net and the linear toy).
Training is seeded: the same seed, data and backend give the same net.
"""
from __future__ import annotations

import numpy as np

from .. import _validate as V
from .._backend import array_namespace, resolve_backend
from ..kernels import _ops
from .io import from_spec

#: the losses :func:`train` knows
LOSSES = ("cross_entropy", "binary_cross_entropy", "squared")

__all__ = ["train", "accuracy", "predict", "init_weights", "init_net", "clip_bias"]


def init_weights(spec, seed=0, dtype=np.float32, bias=0.0):
    """He-normal weights (std √(2 / fan_in)) and constant biases for every dense/conv layer of ``spec``."""
    rng = np.random.default_rng(seed)
    weights, shape = {}, None
    for i, layer in enumerate(spec):
        if layer["type"] == "linear":
            shape = (int(layer["out"]), int(layer["in"]))
        elif layer["type"] == "conv2d":
            k = layer["kernel"]
            kh, kw = (int(k), int(k)) if np.isscalar(k) else (int(k[0]), int(k[1]))
            shape = (int(layer["out"]), int(layer["in"]), kh, kw)
        else:
            continue
        fan_in = int(np.prod(shape[1:]))
        weights[f"{i}.weight"] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)
        weights[f"{i}.bias"] = np.full(shape[0], bias, dtype=dtype)
    return weights


def init_net(spec, seed=0, dtype=np.float32, bias=0.0):
    """A net of ``spec`` with :func:`init_weights`."""
    return from_spec(spec, init_weights(spec, seed, dtype, bias))


def clip_bias(maximum=0.0):
    """A ``constraint`` for :func:`train`: keep every bias ≤ ``maximum`` (the DTD net's b_j ≤ 0)."""

    def constraint(net):
        for layer in net.layers:
            if layer.is_linear and layer.bias is not None:
                layer.set_params(layer.weight, np.minimum(layer.bias, maximum))

    constraint.__name__ = f"clip_bias({maximum})"
    return constraint


def _loss_and_signal(logits, y, loss):
    """Mean loss over the batch and its gradient w.r.t. the logits."""
    n = logits.shape[0]
    if loss == "cross_entropy":
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        rows = np.arange(n)
        value = -float(np.mean(np.log(np.maximum(p[rows, y], 1e-30))))
        p[rows, y] -= 1
        return value, p / n
    t = y.reshape(logits.shape).astype(logits.dtype)
    if loss == "binary_cross_entropy":  # one sigmoid per output (one-vs-rest), stable form
        value = float(np.mean(np.sum(np.maximum(logits, 0) - logits * t + np.log1p(np.exp(-np.abs(logits))), axis=1)))
        return value, (0.5 * (1 + np.tanh(0.5 * logits)) - t) / n
    diff = logits - t
    return 0.5 * float(np.mean(np.sum(diff * diff, axis=1))), diff / n


class _WeightGradient:
    """The gradient rule that also records ∂loss/∂W, ∂loss/∂b of each dense/conv layer it passes.

    The engine hands it g = ∂loss/∂(layer output); the weight VJP kernels turn (a, g) into the
    parameter gradients, and the input gradient goes on down.
    """

    def __init__(self, grads, first):
        from ..rules.signal import Gradient

        self.grads, self.first, self.kinds, self._grad = grads, first, Gradient.kinds, Gradient()

    def check_layer(self, layer):
        self._grad.check_layer(layer)

    def backward(self, layer, rec, g, state):
        if layer.is_linear:
            a, g = rec.a, np.ascontiguousarray(g)
            if layer.kind == "linear":
                dw, db = _ops.dense_weight_vjp(a, g, rec.backend)
            else:
                dw, db = _ops.conv2d_weight_vjp(a, g, layer.weight.shape, layer.stride, layer.padding,
                                                layer.dilation, rec.backend)
            self.grads[layer.index] = (dw, None if layer.bias is None else db)
            if layer.index == self.first:  # nothing below needs a gradient: skip the input VJP
                return None
        return self._grad.backward(layer, rec, g, state)


def gradients(net, x, y, loss="cross_entropy", backend=None):
    """(loss, {layer index: (dW, db)}) for one batch: the forward trace, then the engine's backward
    sweep with the gradient rule at every layer (batch norms are held fixed at their running statistics).

    db is None for a layer without bias.
    """
    from ..engine import Sweep

    trace = net.trace(x, backend, check=False)
    value, g = _loss_and_signal(trace.output, y, loss)
    grads = {}
    first = net.linear_layers()[0] if net.is_chain and net.linear_layers() else -1
    rule = _WeightGradient(grads, first)
    Sweep(net, [rule] * len(net.layers), start="onehot", name="train").backward(trace, g)
    return value, grads


class _Optimizer:
    """SGD with (heavy-ball) momentum, or Adam (Kingma & Ba 2015) with bias correction.

    Weight decay is L2 on the weights only (not the biases), added to the gradient for SGD
    and decoupled (AdamW, Loshchilov & Hutter 2019) for Adam.
    """

    def __init__(self, kind, lr, momentum, weight_decay, betas=(0.9, 0.999), eps=1e-8):
        self.kind, self.lr, self.momentum, self.weight_decay = kind, lr, momentum, weight_decay
        self.betas, self.eps = betas, eps
        self.state = {}
        self.t = 0

    def step(self, net, grads, lr):
        self.t += 1
        b1, b2 = self.betas
        for i, (dw, db) in grads.items():
            layer = net.layers[i]
            new = []
            for slot, (p, gp) in enumerate(((layer.weight, dw), (layer.bias, db))):
                if p is None:
                    new.append(None)
                    continue
                gp = gp.astype(p.dtype, copy=False)
                decay = self.weight_decay if slot == 0 else 0.0
                key = (i, slot)
                if self.kind == "sgd":
                    if decay:
                        gp = gp + decay * p
                    v = self.state.get(key)
                    v = gp.copy() if v is None else self.momentum * v + gp
                    self.state[key] = v
                    new.append(p - lr * v)
                else:
                    m, s = self.state.get(key, (np.zeros_like(p), np.zeros_like(p)))
                    m = b1 * m + (1 - b1) * gp
                    s = b2 * s + (1 - b2) * gp * gp
                    self.state[key] = (m, s)
                    m_hat = m / (1 - b1 ** self.t)
                    s_hat = s / (1 - b2 ** self.t)
                    upd = m_hat / (np.sqrt(s_hat) + self.eps)
                    if decay:
                        upd = upd + decay * p
                    new.append((p - lr * upd).astype(p.dtype, copy=False))
            layer.set_params(new[0], new[1])


def train(net, x, y, epochs=10, batch_size=64, lr=1e-3, optimizer="adam", momentum=0.9, weight_decay=0.0,
          seed=0, progress=True, backend=None, constraint=None, loss="cross_entropy", augment=None,
          lr_schedule="cosine"):
    """Train ``net`` in place on (x, y); return the mean loss of every epoch.

    Parameters
    ----------
    net : Sequential
    x : ndarray (N, ...)
        Inputs in the net's layout, float32 or float64 (the weights are trained in their own dtype).
    y : ndarray (N,)
        Integer class labels for ``loss="cross_entropy"``; 0/1 targets (N, outputs) for
        ``"binary_cross_entropy"``; real targets (N,) or (N, outputs) for ``"squared"``.
    epochs, batch_size, lr : int, int, float
    optimizer : "adam" | "sgd"
    momentum : float
        SGD momentum (ignored by Adam).
    weight_decay : float
        L2 penalty on the weights (decoupled for Adam).
    seed : int
        Seeds the shuffling and ``augment``.
    progress : bool
        Show a tqdm progress bar.
    backend : None | "reference" | "cpu" | "cuda"
    constraint : callable(net) or None
        Called after every step, e.g. :func:`clip_bias` to keep b ≤ 0.
    loss : "cross_entropy" | "binary_cross_entropy" | "squared"
    augment : callable(x_batch, rng) -> x_batch, optional
        Data augmentation applied to every minibatch.
    lr_schedule : "cosine" | "constant"
        Cosine decay of the learning rate to 0 over the run, or a constant rate.

    Returns
    -------
    list of float
        The mean training loss of each epoch.
    """
    from tqdm.auto import tqdm

    where = "train"
    V.check_float_array("x", x, where=where)
    net.check_input(x[:1], where=where)
    y = np.asarray(y)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{where}: y has {y.shape[0]} samples but x has {x.shape[0]}")
    V.check_param(where, "loss", loss, loss in LOSSES, " or ".join(map(repr, LOSSES)))
    V.check_param(where, "optimizer", optimizer, optimizer in ("adam", "sgd"), "'adam' or 'sgd'")
    V.check_param(where, "lr_schedule", lr_schedule, lr_schedule in ("cosine", "constant"), "'cosine' or 'constant'")
    V.check_param(where, "epochs", epochs, int(epochs) == epochs and epochs >= 1, "an int >= 1")
    V.check_param(where, "batch_size", batch_size, int(batch_size) == batch_size and batch_size >= 1, "an int >= 1")
    V.check_param(where, "lr", lr, lr > 0, "a number > 0")
    if loss == "cross_entropy":
        n_out = net.shapes(x[:1].shape)[-1][1]
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
            raise TypeError(f"{where}: cross_entropy needs integer labels of shape (N,), got {y.dtype} {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= n_out):
            raise ValueError(f"{where}: labels must lie in [0, {n_out}), got [{y.min()}, {y.max()}]")
    backend = resolve_backend(backend, array_namespace(x))
    rng = np.random.default_rng(seed)
    opt = _Optimizer(optimizer, lr, momentum, weight_decay)
    n = x.shape[0]
    steps = -(-n // int(batch_size))
    total = int(epochs) * steps
    history = []
    bar = tqdm(total=total, disable=not progress, desc="train", unit="batch", leave=False)
    step = 0
    try:
        for _ in range(int(epochs)):
            order = rng.permutation(n)
            losses = []
            for s in range(steps):
                idx = order[s * batch_size:(s + 1) * batch_size]
                xb = x[idx]
                if augment is not None:
                    xb = augment(xb, rng)
                rate = lr if lr_schedule == "constant" else 0.5 * lr * (1 + np.cos(np.pi * step / total))
                value, grads = gradients(net, np.ascontiguousarray(xb), y[idx], loss, backend)
                opt.step(net, grads, rate)
                if constraint is not None:
                    constraint(net)
                losses.append(value)
                step += 1
                bar.update(1)
            history.append(float(np.mean(losses)))
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    finally:
        bar.close()
    return history


def predict(net, x, batch_size=256, backend=None):
    """The logits of ``net`` on ``x``, computed in batches."""
    outs = [net.forward(np.ascontiguousarray(x[s:s + batch_size]), backend=backend)
            for s in range(0, x.shape[0], batch_size)]
    return np.concatenate(outs, axis=0)


def accuracy(net, x, y, batch_size=256, backend=None):
    """Fraction of samples whose argmax logit equals the label."""
    return float(np.mean(np.argmax(predict(net, x, batch_size, backend), axis=1) == np.asarray(y)))
