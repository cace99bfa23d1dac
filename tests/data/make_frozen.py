"""Freeze every method's result on every zoo net (float64) before the layer-graph engine.

Run once at commit 1a62dc5 (relprop 0.1, three backward sweeps) to write frozen_v01.npz;
tests/test_frozen.py holds the one-engine code to these results at 1e-12 relative.  Do not
rerun it on later code: the point is that the numbers come from the old engines.
"""
import json
from pathlib import Path

import numpy as np

import relprop
from relprop import zoo

HERE = Path(__file__).resolve().parent
N = 2  # samples per net


def cases(name, m):
    """(method, options) pairs that run on zoo net ``name``."""
    conv = any(layer.kind == "conv2d" for layer in m.net.layers)
    out = []
    for method in relprop.known_methods():
        opts = {}
        if method in ("dtd.box", "lrp.epsilon_gamma_box"):
            opts = {"low": 0.0, "high": 1.0}
        elif method.startswith("pattern."):
            if name == "dtd_onelayer":  # 3 x 100 x 1568 float64 patterns: too large to ship for this
                continue
            opts = {"patterns": "fitted"}
        elif method == "expected_gradients":
            opts = {"data": "samples", "n": 6, "seed": 1}
        elif method in ("smoothgrad", "smoothgrad_squared"):
            opts = {"n": 4, "seed": 2}
        elif method == "integrated_gradients":
            opts = {"steps": 8}
        elif method == "occlusion":
            opts = {"window": 4 if conv else min(8, m.x.shape[-1] // 2)}
        elif method in ("gradcam", "guided_gradcam") and not conv:
            continue
        elif method == "erasure" and len(m.net.linear_layers()) < 2:
            continue
        out.append((method, opts))
    return out


def materialise(opts, m, patterns):
    opts = dict(opts)
    if opts.get("patterns") == "fitted":
        opts["patterns"] = patterns
    if opts.get("data") == "samples":
        opts["data"] = m.x[N:].astype(np.float64)
    return opts


def fit(m):
    import warnings

    warnings.simplefilter("ignore")  # units with empty regimes on 20-32 samples: zero patterns, as intended
    return relprop.fit_patterns(m.net, m.x.astype(np.float64), progress=False, mean_y="all")


def main():
    arrays, index = {}, {}
    for name in zoo.NAMES:
        m = zoo.load(name, patterns=False)
        x = m.x[:N].astype(np.float64)
        patterns = fit(m)
        for i, p in patterns.items():
            if name != "dtd_onelayer":
                for part in ("a", "a_plus", "a_minus"):
                    arrays[f"{name}|patterns|{i}|{part}"] = np.asarray(getattr(p, part))
        index[name] = []
        for method, opts in cases(name, m):
            R = relprop.explain(m.net, x, method, **materialise(opts, m, patterns))
            key = f"{name}|{method}"
            arrays[key] = np.asarray(R)
            index[name].append([method, opts])
    np.savez_compressed(HERE / "frozen_v01.npz", __index__=np.array(json.dumps(index)), **arrays)
    print(f"{len(arrays)} results frozen")


if __name__ == "__main__":
    main()
