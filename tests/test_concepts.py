"""relprop.concepts: CAVs and TCAV against known answers (a planted concept, a random concept), the
directional derivative's gradient, and bad input."""
import numpy as np
import pytest

import relprop
from relprop import concepts

pytest.importorskip("sklearn")

S = 12
BAR = np.zeros((3, 3))
BAR[1, :] = 1.0  # the planted pattern: a bright horizontal bar


def _images(n, pattern, rng):
    """Noise in [0, 0.5]; with ``pattern``, a bar pasted at a random place."""
    x = rng.uniform(0, 0.5, size=(n, 1, S, S))
    if pattern:
        for k in range(n):
            i, j = rng.integers(0, S - 3, size=2)
            x[k, 0, i:i + 3, j:j + 3] = np.maximum(x[k, 0, i:i + 3, j:j + 3], BAR)
    return x.astype(np.float32)


def _bar_net():
    """Class 1 iff a bar is present: a matched filter for the bar, ReLU, max pooling, a linear read-out."""
    rng = np.random.default_rng(0)
    w = np.zeros((4, 1, 3, 3), np.float32)
    w[0, 0] = BAR - BAR.mean()
    w[1:] = rng.normal(size=(3, 1, 3, 3)).astype(np.float32) * 0.3  # three distracting random filters
    spec = [{"type": "conv2d", "in": 1, "out": 4, "kernel": 3}, {"type": "relu"},
            {"type": "maxpool2d", "kernel": 5}, {"type": "flatten"}, {"type": "linear", "in": 16, "out": 2}]
    W = np.zeros((2, 4, 4), np.float32)
    W[1] = np.array([4.0, 0.2, -0.2, 0.1])[:, None]
    W[0] = -W[1]
    return relprop.from_spec(spec, {"0.weight": w, "0.bias": np.zeros(4, np.float32), "4.weight": W.reshape(2, -1),
                                    "4.bias": np.array([8.0, -8.0], np.float32)})


def test_planted_concept_is_significant_and_a_random_one_is_not():
    net = _bar_net()
    rng = np.random.default_rng(2)
    with_bar = _images(60, True, rng)
    assert (np.argmax(net.forward(with_bar), 1) == 1).mean() >= 0.95  # the class does depend on the pattern
    assert (np.argmax(net.forward(_images(60, False, rng)), 1) == 0).mean() >= 0.9
    concept = _images(80, True, rng)
    randoms = [_images(80, False, rng) for _ in range(11)]
    r = concepts.tcav(net, 1, with_bar, 1, concept, randoms, seed=0)
    assert r.mean >= 0.9 and r.p_value < 0.01 and r.significant(0.01)
    assert r.scores.shape == (11,) and r.random_scores.shape == (11,) and r.sensitivities.shape == (11, 60)
    assert np.nanmean(r.accuracies) > 0.65  # the bar is anywhere: a weak but real linear signal
    # the same examples of the *other* class: the bar speaks against it
    r0 = concepts.tcav(net, 1, with_bar, 0, concept, randoms, seed=0)
    assert r0.mean <= 0.1 and r0.p_value < 0.01
    # a random "concept" (more noise images): not significant at 0.05
    random_concept = _images(80, False, rng)
    rr = concepts.tcav(net, 1, with_bar, 1, random_concept, randoms, seed=0)
    assert rr.p_value >= 0.05 and not rr.significant(0.05), rr


def test_set_level_test_is_calibrated_where_welch_is_not():
    """test="sets": each random set's mean score against the others is the null; the concept is one more draw.
    Measured on this task over 30 random concept sets: Welch rejects 23% at 0.05 (35% of another 40), the set
    test 3%."""
    net = _bar_net()
    rng = np.random.default_rng(2)
    with_bar = _images(60, True, rng)
    randoms = [_images(80, False, rng) for _ in range(11)]
    r = concepts.tcav(net, 1, with_bar, 1, _images(80, True, rng), randoms, seed=0, test="sets")
    assert r.mean >= 0.9 and r.p_value < 0.01
    assert abs(r.random_mean - 0.5) < 0.15 and r.random_scores.shape == (11,)
    # the fifth random concept drawn here is one that Welch's test calls significant; the set test does not
    for _ in range(4):
        _images(80, False, rng)
    c = _images(80, False, rng)
    assert concepts.tcav(net, 1, with_bar, 1, c, randoms, seed=0).p_value < 0.05
    assert concepts.tcav(net, 1, with_bar, 1, c, randoms, seed=0, test="sets").p_value >= 0.05
    with pytest.raises(ValueError, match="test="):
        concepts.tcav(net, 1, with_bar, 1, c, randoms, test="z")


def test_cav_points_towards_a_planted_direction(rng):
    d = 20
    net = relprop.from_spec([{"type": "linear", "in": d, "out": d}, {"type": "relu"},
                             {"type": "linear", "in": d, "out": 2}],
                            {"0.weight": np.eye(d), "0.bias": np.full(d, 10.0), "2.weight": np.ones((2, d))})
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    random_x = rng.normal(size=(200, d))
    concept_x = rng.normal(size=(200, d)) + 3.0 * u
    v = concepts.cav(net, 1, concept_x, random_x)
    assert abs(np.linalg.norm(v.vector) - 1) < 1e-12 and v.layer == 1
    assert v.vector @ u > 0.9  # the normal points at the concept
    assert v.accuracy is not None and v.accuracy > 0.9
    flipped = concepts.cav(net, 1, random_x, concept_x)
    assert flipped.vector @ u < -0.9


def test_layer_gradients_are_the_gradient_at_that_layer(rng):
    w1, w2 = rng.normal(size=(6, 5)), rng.normal(size=(3, 6))
    net = relprop.from_spec([{"type": "linear", "in": 5, "out": 6}, {"type": "relu"},
                             {"type": "linear", "in": 6, "out": 3}], {"0.weight": w1, "2.weight": w2})
    x = rng.normal(size=(7, 5))
    g = concepts.layer_gradients(net, x, 1, 2, batch_size=3)  # ∂f_2/∂(ReLU output) = w2[2] for every x
    np.testing.assert_allclose(g, np.broadcast_to(w2[2], (7, 6)))
    g0 = concepts.layer_gradients(net, x, 0, 2)  # below the ReLU: gated by z > 0
    np.testing.assert_allclose(g0, w2[2] * (x @ w1.T > 0))
    a = concepts.layer_activations(net, x, 1, batch_size=2)
    np.testing.assert_allclose(a, np.maximum(x @ w1.T, 0))


def test_bad_input(rng):
    net = _bar_net()
    good = _images(4, True, rng)
    randoms = [_images(4, False, rng) for _ in range(10)]
    with pytest.raises(ValueError, match="concept_x has 1 example"):
        concepts.cav(net, 1, good[:1], randoms[0])
    with pytest.raises(ValueError, match="random_x has 1 example"):
        concepts.cav(net, 1, good, randoms[0][:1])
    with pytest.raises(ValueError, match="concept_x has 1 example"):
        concepts.tcav(net, 1, good, 1, good[:1], randoms)
    with pytest.raises(ValueError, match=r"random_sets\[3\] has 1 example"):
        concepts.tcav(net, 1, good, 1, good, randoms[:3] + [randoms[3][:1]] + randoms[4:])
    with pytest.raises(ValueError, match="at least 10"):
        concepts.tcav(net, 1, good, 1, good, randoms[:9])
    with pytest.raises(TypeError, match="list of example sets"):
        concepts.tcav(net, 1, good, 1, good, np.concatenate(randoms))
    bad = good.copy()
    bad[1, 0, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        concepts.cav(net, 1, bad, randoms[0])
    with pytest.raises(ValueError, match="NaN"):
        concepts.tcav(net, 1, bad, 1, good, randoms)
    with pytest.raises(ValueError, match="target"):
        concepts.tcav(net, 1, good, 5, good, randoms)
    with pytest.raises(ValueError, match="classifier"):
        concepts.cav(net, 1, good, randoms[0], classifier="forest")
    with pytest.raises(ValueError, match="C=0"):
        concepts.cav(net, 1, good, randoms[0], C=0)
    with pytest.raises(ValueError, match="layer=7"):
        concepts.cav(net, 7, good, randoms[0])
    with pytest.raises(ValueError, match="dimensions"):
        concepts.cav(net, 1, good[:, 0], randoms[0])
    blank = np.zeros_like(good)  # every activation at layer 1 is 0: nothing separates the sets
    with pytest.raises(ValueError, match="no direction"):
        concepts.cav(net, 1, blank, blank.copy())
