"""Property-based robustness of the public entry points (hypothesis).

The promise under test, for every registered method and the metrics: a valid call returns
finite values of the documented shape; an invalid one (wrong shape, dtype, non-finite values,
an out-of-range or malformed target, a list instead of an array) raises ValueError or
TypeError — never another exception, never a NaN result.  Sizes are tiny and the options of
the sampling methods small, so that the file stays well under a minute.
"""
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import relprop
import relprop.kernels as K
from relprop import metrics

from nets_factory import make_net

pytestmark = pytest.mark.filterwarnings("ignore::relprop.patterns.PatternWarning")

CNN = [{"type": "conv2d", "in": 1, "out": 2, "kernel": 3}, {"type": "relu"}, {"type": "maxpool2d", "kernel": 2},
       {"type": "flatten"}, {"type": "linear", "in": 18, "out": 3}]
SHAPE = (1, 8, 8)
CLASSES = 3
METHODS = relprop.known_methods()
#: small settings of the sampling methods, the options the methods need
FAST = {"integrated_gradients": {"steps": 3}, "smoothgrad": {"n": 2}, "smoothgrad_squared": {"n": 2},
        "expected_gradients": {"n": 2}, "occlusion": {"window": 3}}
SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                    deadline=None)


@pytest.fixture(scope="module")
def setup():
    net = make_net(CNN, seed=3)
    data = np.random.default_rng(0).standard_normal((40,) + SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patterns = relprop.fit_patterns(net, data, progress=False)
    return net, data, patterns


def options_for(method, data, patterns):
    opts = dict(FAST.get(method, {}))
    if method.startswith("pattern."):
        opts["patterns"] = patterns
    if method.endswith("box"):
        opts.update(low=-4.0, high=4.0)
    if method == "expected_gradients":
        opts["data"] = data[:8]
    return opts


# -- inputs -------------------------------------------------------------------------------------
@st.composite
def inputs(draw):
    """(x, valid): a net input, valid or broken in one way."""
    n = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).uniform(-2, 2, (n,) + SHAPE).astype(dtype)
    how = draw(st.sampled_from(["valid"] * 4 + ["nan", "inf", "int", "complex", "ndim", "size", "empty", "list",
                                                "scalar", "bool"]))
    if how == "nan":
        x.flat[draw(st.integers(0, x.size - 1))] = np.nan
    elif how == "inf":
        x.flat[draw(st.integers(0, x.size - 1))] = -np.inf
    elif how == "int":
        x = (x * 10).astype(np.int64)
    elif how == "complex":
        x = x.astype(np.complex128)
    elif how == "ndim":
        x = x[:, 0]
    elif how == "size":
        x = np.zeros((n, 1, 2, 2), dtype)                # smaller than the conv window
    elif how == "empty":
        x = x[:0]
    elif how == "list":
        x = x.tolist()
    elif how == "scalar":
        x = 1.5
    elif how == "bool":
        x = x > 0
    return x, how == "valid"


@st.composite
def targets(draw, n_max=3):
    """(target, valid for a batch of n): None, in-range ints, out-of-range and malformed targets."""
    kind = draw(st.sampled_from(["none", "int", "array", "big", "negative", "float", "str", "short", "float_array",
                                 "2d", "bool"]))
    if kind == "none":
        return None, lambda n: True
    if kind == "int":
        return draw(st.integers(0, CLASSES - 1)), lambda n: True
    if kind == "array":
        t = np.array(draw(st.lists(st.integers(0, CLASSES - 1), min_size=n_max, max_size=n_max)))
        return t, None                                   # valid when cut to the batch (see below)
    bad = {"big": CLASSES, "negative": -1, "float": 1.5, "str": "1", "short": np.array([0] * (n_max + 1)),
           "float_array": np.array([0.0] * n_max), "2d": np.zeros((n_max, 1), np.int64), "bool": True}[kind]
    return bad, lambda n: False


def check_result(r, n):
    if isinstance(r, tuple):
        r = r[0]
    assert hasattr(r, "shape") and r.shape[0] == n
    assert np.isfinite(r).all()


# -- every method ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@settings(SETTINGS, max_examples=15)
@given(case=inputs(), target=targets())
def test_explain_returns_finite_or_raises_a_named_error(setup, method, case, target):
    net, data, patterns = setup
    x, valid = case
    t, t_valid = target
    n = len(x) if isinstance(x, (np.ndarray, list)) else 0
    if t_valid is None:                                  # an int array: cut to the batch
        t = t[:max(n, 1)]
        t_valid = (lambda m: len(t) == m)
    ok = valid and t_valid(n)
    opts = options_for(method, data, patterns)
    if ok:
        check_result(relprop.explain(net, x, method, target=t, **opts), n)
    else:
        with pytest.raises((ValueError, TypeError)):
            relprop.explain(net, x, method, target=t, **opts)


@SETTINGS
@given(method=st.sampled_from(METHODS), option=st.sampled_from(["bogus", "nan", "negative", "string"]))
def test_bad_options_raise_at_construction_or_call(setup, method, option):
    net, data, patterns = setup
    opts = options_for(method, data, patterns)
    if option == "bogus":
        opts["no_such_option"] = 1
    else:
        numeric = [k for k in ("epsilon", "gamma", "steps", "n", "noise_level", "window", "batch_size", "alpha")
                   if k in opts or k in _defaults(method)]
        if not numeric:
            return
        key = numeric[0]
        opts[key] = {"nan": float("nan"), "negative": -3, "string": "3"}[option]
    x = data[:2]
    with pytest.raises((ValueError, TypeError)):
        relprop.explain(net, x, method, **opts)


def _defaults(method):
    import inspect

    from relprop.methods import resolve_method

    _, factory = resolve_method(method)
    return [p for p in list(inspect.signature(factory).parameters)[1:]]


def test_every_method_name_is_known_and_unknown_names_are_rejected(setup):
    net, data, _ = setup
    assert len(METHODS) >= 25
    for bad in ("lrp.bogus", "", "GRADIENT"):
        with pytest.raises(ValueError, match="unknown method"):
            relprop.explain(net, data[:1], bad)
    with pytest.raises(TypeError):
        relprop.explain(net, data[:1], 42)


# -- metrics ------------------------------------------------------------------------------------
@st.composite
def relevances(draw, n=2):
    how = draw(st.sampled_from(["valid", "summed", "nan", "inf", "complex", "shape", "list", "object"]))
    r = np.random.default_rng(draw(st.integers(0, 99))).standard_normal((n,) + SHAPE)
    if how == "summed":
        r = r[:, 0]
    elif how == "nan":
        r[0, 0, 1, 1] = np.nan
    elif how == "inf":
        r[1, 0, 0, 0] = np.inf
    elif how == "complex":
        r = r + 0j
    elif how == "shape":
        r = r[:, :, :5]
    elif how == "list":
        r = r.tolist()
    elif how == "object":
        r = r.astype(object)
    return r, how in ("valid", "summed")


@SETTINGS
@given(case=relevances(), patch=st.integers(-1, 9), fill=st.sampled_from(["random", "mean", 0.0, np.nan, "zeros"]))
def test_perturbation_metrics(setup, case, patch, fill):
    net, data, _ = setup
    x = data[:2]
    R, valid = case
    ok = valid and 1 <= patch <= 7 and fill in ("random", "mean", 0.0)     # patch 8: one patch, fewer than 2 steps
    if ok:
        curve = metrics.perturbation_curve(net, x, R, patch=patch, steps=2, fill=fill, seed=0)
        assert curve.shape == (2, 3) and np.isfinite(curve).all()
        assert np.isfinite(metrics.aopc(curve))
    else:
        with pytest.raises((ValueError, TypeError)):
            metrics.perturbation_curve(net, x, R, patch=patch, steps=2, fill=fill, seed=0)


@SETTINGS
@given(case=relevances())
def test_consistency_metrics(setup, case):
    net, data, _ = setup
    R, valid = case
    if valid:
        c = metrics.conservation(net, data[:2], R)
        assert np.isfinite(c["sum"]).all() and np.isfinite(c["absolute"]).all()
        p = metrics.positivity(R)
        assert np.isfinite(p["fraction"]).all() and np.isfinite(p["negative_mass"]).all()
    else:
        with pytest.raises((ValueError, TypeError)):
            metrics.conservation(net, data[:2], R)
        if not (isinstance(R, np.ndarray) and R.dtype.kind == "f" and np.isfinite(R).all()):
            with pytest.raises((ValueError, TypeError)):
                metrics.positivity(R)


# -- patterns -----------------------------------------------------------------------------------
@SETTINGS
@given(case=inputs(), mean_y=st.sampled_from(["all", "regime", "paper", None]))
def test_fit_patterns_returns_finite_patterns_or_raises(setup, case, mean_y):
    net, _, _ = setup
    x, valid = case
    if valid and mean_y in ("all", "regime"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patterns = relprop.fit_patterns(net, x, progress=False, mean_y=mean_y)
        for i in patterns:
            for name in ("a", "a_plus", "a_minus"):
                assert np.isfinite(getattr(patterns[i], name)).all()
    else:
        with pytest.raises((ValueError, TypeError)):
            relprop.fit_patterns(net, x, progress=False, mean_y=mean_y)


# -- kernels ------------------------------------------------------------------------------------
@SETTINGS
@given(x=inputs(), with_bias=st.sampled_from(["none", "array", "list", "wrong", "nan"]))
def test_conv_kernel_entry_point(x, with_bias):
    x, valid = x
    if isinstance(x, np.ndarray) and x.shape[0] == 0 and x.shape[1:] == SHAPE and x.dtype.kind == "f":
        valid = True                                     # a kernel maps an empty batch to an empty batch
    w = np.ones((2, 1, 3, 3), dtype=x.dtype if isinstance(x, np.ndarray) and x.dtype.kind == "f" else np.float64)
    b = {"none": None, "array": np.zeros(2, w.dtype), "list": [0.0, 0.0], "wrong": np.zeros(3, w.dtype),
         "nan": np.array([0.0, np.nan], w.dtype)}[with_bias]
    if valid and with_bias in ("none", "array"):
        out = K.conv2d_forward(x, w, b)
        assert out.shape == (x.shape[0], 2, 6, 6) and np.isfinite(out).all()
    else:
        with pytest.raises((ValueError, TypeError)):
            K.conv2d_forward(x, w, b)
