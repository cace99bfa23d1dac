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

**Work, and the floor it sets.**  The clock also counts each family's work (:data:`WORK`): the GEMMs'
multiply-adds, the transformed values the input transforms write (36 per tile and input channel) and
the output transforms read (36 per tile and output channel).  The method's work over the forward's is
fixed by the net and the rule, not by the kernels: 3 for z⁺'s GEMMs; for the input transforms
1 + (the convolutions' output channels x output pixels, which the backward transforms) / (their input
channels x input pixels, which the forward transforms), so more than 2 where a block widens the
channels; for the output transforms the same the other way, plus the trace's z⁺.  :func:`floor` is
the method's CPU time if every family ran at the forward's speed per unit of work, and the rest took
no longer than the forward's own rest (the trace repeats all of it: the first convolution, the dense
layers, the glue): what kernels as fast as the forward's would give, before the backward's own extra
passes.  ε+flat on the peers' nets (one run, GEMM 283 GFLOP/s): floor 2.45 forwards on CIFAR-VGG b64,
2.58 on VGG-16 b4 (against 2.79 and 2.92 measured).
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


#: family -> the work of one call from its arguments: the GEMM batch's multiply-adds (count x m x n x k);
#: the input transform's output V (36 x tiles x C, its 7th argument), the output transforms' input M
#: (36 x tiles x K, the first)
WORK = {
    "Winograd GEMMs": lambda args: int(args[0]) * int(args[1]) * int(args[2]) * int(args[3]),
    "Winograd input transform": lambda args: int(args[6].size),
    "Winograd output transforms": lambda args: int(args[0].size),
}


class KernelClock:
    """Sums, per family of :data:`FAMILIES`, the time spent inside its functions on every thread while
    :meth:`running`; ``times`` maps family -> seconds, plus "other" (the process's CPU time less the
    families') and "wall"; ``work`` maps family -> its units of :data:`WORK` done meanwhile."""

    def __init__(self):
        self.times, self.work = {}, {}
        self._lock = threading.Lock()

    def _wrap(self, family, fn):
        units = WORK.get(family)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                done = units(args) if units is not None else 0
                with self._lock:
                    self.times[family] = self.times.get(family, 0.0) + dt
                    self.work[family] = self.work.get(family, 0) + done
        return timed

    @contextmanager
    def running(self):
        saved = [(mod, name, getattr(mod, name)) for names in FAMILIES.values() for mod, name in names]
        for family, names in FAMILIES.items():
            for mod, name in names:
                setattr(mod, name, self._wrap(family, getattr(mod, name)))
        self.times = {family: 0.0 for family in FAMILIES}
        self.work = {family: 0 for family in FAMILIES}
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            yield self
        finally:
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            for mod, name, fn in saved:
                setattr(mod, name, fn)
            self.times["other"] = cpu - sum(self.times[f] for f in FAMILIES)
            self.times["wall"] = wall


def breakdown(calls, rounds=7, work=None):
    """{label: {family: median seconds}} for each zero-argument callable of ``calls`` ({label: call}),
    the calls alternating round by round (two warm-up calls each first).  ``work``: a dict that receives
    {label: {family: units of :data:`WORK` per call}} (the same every call: the shapes fix it)."""
    for call in calls.values():
        call(), call()
    samples = {label: [] for label in calls}
    clock = KernelClock()
    for _ in range(rounds):
        for label, call in calls.items():
            with clock.running():
                call()
            samples[label].append(dict(clock.times))
            if work is not None:
                work[label] = dict(clock.work)
    return {label: {k: float(np.median([s[k] for s in runs])) for k in runs[0]} for label, runs in samples.items()}


def floor(times, work, first="forward"):
    """{label: the floor of its CPU time over ``first``'s} for every other label of a :func:`breakdown`
    (``times``, ``work``): each family's time at ``first``'s speed per unit of work, and the rest as
    ``first``'s rest (see the module doc).  A family ``first`` does not run cannot be priced: None then."""
    base = times[first]
    cpu = sum(v for k, v in base.items() if k != "wall")
    out = {}
    if not any(work[first].get(family, 0) for family in FAMILIES):  # (LeNet-5's 5x5 convolutions: none ran)
        return {label: None for label in times if label != first}
    for label in times:
        if label == first:
            continue
        total = base["other"]
        for family in FAMILIES:
            done, ref = work[label].get(family, 0), work[first].get(family, 0)
            if done and not ref:
                total = None
                break
            total += base[family] * done / ref if ref else 0.0
        out[label] = None if total is None else total / cpu
    return out


def net_breakdown(net_name, method, rounds=7, batch=None, work=None):
    """:func:`breakdown` of relprop's forward and ``method`` on one of the peers' nets (``work`` as there)."""
    from bench.nets import PEER_NETS, random_weights

    spec, shape, default_batch = PEER_NETS[net_name]
    net = relprop.from_spec(spec, random_weights(spec))
    x = np.random.default_rng(1).normal(size=(batch or default_batch,) + shape).astype(np.float32)
    target = net.forward(x).argmax(axis=1)
    explainer = relprop.Explainer(net, method)
    return breakdown({"forward": lambda: net.forward(x), method: lambda: explainer(x, target)}, rounds, work)


def table(result, work=None):
    """The breakdown as text: one row per family, milliseconds per call, then each later column over the first;
    with ``work`` (:func:`breakdown`'s), each family's work over the first's too, and the :func:`floor`."""
    labels = list(result)
    first, later = labels[0], labels[1:]
    cpu = [sum(v for k, v in r.items() if k != "wall") for r in result.values()]
    lines = [(k, k if k == "wall" else f"{k} (thread time)", [r[k] for r in result.values()]) for k in result[first]]
    lines.append(("all", "all (CPU time)", cpu))
    width = max(len(name) for _, name, _ in lines) + 2
    cols = max(12, *(len(label) + 2 for label in labels))
    ratio_cols = [len(f"{label} ÷ {first}") + 2 for label in later]
    work_cols = [len(f"work ÷ {first}") + 2 for _ in later] if work else []
    rows = [" " * width + "".join(f"{label:>{cols}s}" for label in labels)
            + "".join(f"{label + ' ÷ ' + first:>{c}s}" for label, c in zip(later, ratio_cols))
            + "".join(f"{'work ÷ ' + first:>{c}s}" for c in work_cols)]
    for key, name, values in lines:
        ratios = [v / values[0] if values[0] > 0 else float("nan") for v in values[1:]]
        row = (f"{name:{width}s}" + "".join(f"{1e3 * v:>{cols - 3}.1f} ms" for v in values)
               + "".join(f"{r:>{c}.2f}" for r, c in zip(ratios, ratio_cols)))
        if work and key in FAMILIES:
            ref = work[first].get(key, 0)
            row += "".join(f"{work[label].get(key, 0) / ref:>{c}.2f}" if ref else f"{'-':>{c}s}"
                           for label, c in zip(later, work_cols))
        rows.append(row)
    if work:
        for label, value in floor(result, work, first).items():
            text = "-" if value is None else f"{value:.2f}"
            rows.append(f"floor of {label} ÷ {first} (every family at {first}'s speed per unit of work, "
                        f"the rest as {first}'s): {text}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
    args = sys.argv[1:]
    name = args[0] if args else "cifar_vgg"
    method = args[1] if len(args) > 1 else "lrp.epsilon_plus_flat"
    rounds = int(args[2]) if len(args) > 2 else 7
    print(f"{name}, {method}, medians of {rounds} alternating rounds")
    work = {}
    result = net_breakdown(name, method, rounds, work=work)
    print(table(result, work))
