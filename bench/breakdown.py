"""Where a call's time goes on the CPU backend: thread time per kernel family, a method beside the forward.

    python bench/breakdown.py [net] [method] [rounds]     # defaults: cifar_vgg lrp.epsilon_plus_flat 7
    python bench/breakdown.py vgg16 gradient

The 3x3 convolutions run as Winograd F(4x4, 3x3) (:mod:`relprop.kernels.cpu.winograd`): per chunk of tiles an
input transform, 36 GEMMs, an output transform.  :class:`KernelClock` wraps those three (module globals that
the convolution looks up at each call) and sums each one's time over the threads; the rest of the process's
CPU time (the first, direct convolution, the dense layers, the element-wise passes, Python) is "other".
Each family's time of the method over the forward's says how far apart the two are by construction: an
LRP rule with a modified forward (z⁺) multiplies three times per convolution (W a and W⁺a in the trace,
W⁺ᵀs in the backward) against the forward's once, so its GEMM row is ~3 whatever the kernels' speed, and
the whole can only come below 3 as far as its other rows do.

Medians over ``rounds`` alternating calls; thread times count a thread's wall time inside the kernel
(on an otherwise idle machine, its CPU time).  The peers' nets (:data:`bench.nets.PEER_NETS`), random
weights.  torch is imported first when it is installed, as in a user's code.
"""
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np

try:  # as a user's code would (relprop's threading behaves differently with torch's OpenMP loaded)
    import torch  # noqa: F401
except ImportError:  # pragma: no cover
    pass

import relprop
from relprop.kernels.cpu import conv2d as _conv2d, winograd as _winograd

#: family -> [(module, global name)], each a function the convolutions call through its module's globals
FAMILIES = {
    "Winograd GEMMs": [(_conv2d, "_gemm_batch")],
    "Winograd input transform": [(_winograd, "_input_transform")],
    "Winograd output transforms": [(_winograd, n) for n in sorted(vars(_winograd)) if n.startswith("_output_transform")],
}


class KernelClock:
    """Sums, per family of :data:`FAMILIES`, the time spent inside its functions on every thread while
    :meth:`running`; ``times`` maps family -> seconds, plus "other" (the process's CPU time less the
    families') and "wall"."""

    def __init__(self):
        self.times = {}
        self._lock = threading.Lock()

    def _wrap(self, family, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                with self._lock:
                    self.times[family] = self.times.get(family, 0.0) + dt
        return timed

    @contextmanager
    def running(self):
        saved = [(mod, name, getattr(mod, name)) for names in FAMILIES.values() for mod, name in names]
        for family, names in FAMILIES.items():
            for mod, name in names:
                setattr(mod, name, self._wrap(family, getattr(mod, name)))
        self.times = {family: 0.0 for family in FAMILIES}
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            yield self
        finally:
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            for mod, name, fn in saved:
                setattr(mod, name, fn)
            self.times["other"] = cpu - sum(self.times[f] for f in FAMILIES)
            self.times["wall"] = wall


def breakdown(calls, rounds=7):
    """{label: {family: median seconds}} for each zero-argument callable of ``calls`` ({label: call}),
    the calls alternating round by round (two warm-up calls each first)."""
    for call in calls.values():
        call(), call()
    samples = {label: [] for label in calls}
    clock = KernelClock()
    for _ in range(rounds):
        for label, call in calls.items():
            with clock.running():
                call()
            samples[label].append(dict(clock.times))
    return {label: {k: float(np.median([s[k] for s in runs])) for k in runs[0]} for label, runs in samples.items()}


def net_breakdown(net_name, method, rounds=7, batch=None):
    """:func:`breakdown` of relprop's forward and ``method`` on one of the peers' nets."""
    from bench.nets import PEER_NETS, random_weights

    spec, shape, default_batch = PEER_NETS[net_name]
    net = relprop.from_spec(spec, random_weights(spec))
    x = np.random.default_rng(1).normal(size=(batch or default_batch,) + shape).astype(np.float32)
    target = net.forward(x).argmax(axis=1)
    explainer = relprop.Explainer(net, method)
    return breakdown({"forward": lambda: net.forward(x), method: lambda: explainer(x, target)}, rounds)


def table(result):
    """The breakdown as text: one row per family, milliseconds per call, then each later column over the first."""
    labels = list(result)
    first, later = labels[0], labels[1:]
    cpu = [sum(v for k, v in r.items() if k != "wall") for r in result.values()]
    lines = [(k if k == "wall" else f"{k} (thread time)", [r[k] for r in result.values()]) for k in result[first]]
    lines.append(("all (CPU time)", cpu))
    width = max(len(name) for name, _ in lines) + 2
    cols = max(12, *(len(label) + 2 for label in labels))
    ratio_cols = [len(f"{label} ÷ {first}") + 2 for label in later]
    rows = [" " * width + "".join(f"{label:>{cols}s}" for label in labels)
            + "".join(f"{label + ' ÷ ' + first:>{c}s}" for label, c in zip(later, ratio_cols))]
    for name, values in lines:
        ratios = [v / values[0] if values[0] > 0 else float("nan") for v in values[1:]]
        rows.append(f"{name:{width}s}" + "".join(f"{1e3 * v:>{cols - 3}.1f} ms" for v in values)
                    + "".join(f"{r:>{c}.2f}" for r, c in zip(ratios, ratio_cols)))
    return "\n".join(rows)


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
    args = sys.argv[1:]
    name = args[0] if args else "cifar_vgg"
    method = args[1] if len(args) > 1 else "lrp.epsilon_plus_flat"
    rounds = int(args[2]) if len(args) > 2 else 7
    print(f"{name}, {method}, medians of {rounds} alternating rounds")
    print(table(net_breakdown(name, method, rounds)))
