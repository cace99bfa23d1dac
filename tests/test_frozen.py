"""Every method on every zoo net gives what relprop 0.1 gave (float64, 1e-12 relative).

tests/data/frozen_v01.npz was written by tests/data/make_frozen.py at relprop 0.1, before
the backward sweeps were merged into one engine over the layer graph: these tests hold the
engine to the old results.
"""
import json
from pathlib import Path

import numpy as np
import pytest

import relprop
from relprop import zoo
from relprop.patterns import LayerPatterns, Patterns

DATA = Path(__file__).resolve().parent / "data"
FROZEN = np.load(DATA / "frozen_v01.npz")
INDEX = json.loads(str(FROZEN["__index__"]))
N = 2
CASES = [(name, method, opts) for name, entries in INDEX.items() for method, opts in entries]


def _patterns(name, net):
    layers = {}
    for i in net.linear_layers():
        a, ap, am = (FROZEN[f"{name}|patterns|{i}|{part}"] for part in ("a", "a_plus", "a_minus"))
        layers[i] = LayerPatterns(i, net.layers[i].kind, tuple(a.shape), a, ap, am)
    return Patterns(layers, mean_y="all")


@pytest.mark.parametrize("name, method, opts", CASES, ids=[f"{n}-{m}" for n, m, _ in CASES])
def test_same_result_as_v01(name, method, opts):
    m = zoo.load(name, patterns=False)
    opts = dict(opts)
    if opts.get("patterns") == "fitted":
        opts["patterns"] = _patterns(name, m.net)
    if opts.get("data") == "samples":
        opts["data"] = m.x[N:].astype(np.float64)
    R = np.asarray(relprop.explain(m.net, m.x[:N].astype(np.float64), method, **opts))
    want = FROZEN[f"{name}|{method}"]
    scale = max(np.abs(want).max(), 1e-300)
    np.testing.assert_allclose(R, want, rtol=1e-12, atol=1e-12 * scale)
