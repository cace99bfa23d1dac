"""The shipped zoo: held-out quality, the training script's reproducibility, the data sets."""
import numpy as np
import pytest

import relprop
from relprop.nets import data
from relprop.nets.train import accuracy, train
from relprop.zoo import train as zoo_train


@pytest.mark.parametrize("name, minimum", [("digits_mlp", 0.93), ("digits_cnn", 0.95), ("detector", 0.95),
                                           ("dtd_onelayer", 0.75), ("pattern_toy", 0.99)])
def test_shipped_net_quality(name, minimum):
    model = relprop.zoo.load(name)
    assert model.net.forward(model.x[:2]).shape[0] == 2
    score = zoo_train.evaluate(name, model.net)
    assert score >= minimum, f"{name}: held-out {score:.4f} < {minimum}"


def test_zoo_load_errors_and_contents():
    with pytest.raises(ValueError, match="unknown zoo net"):
        relprop.zoo.load("resnet50")
    det = relprop.zoo.load("detector")
    assert det.x.shape[1:] == (1, 28, 56) and det.masks is not None and det.masks.shape == det.x.shape
    assert det.patterns is not None
    # the fitted patterns are shaped like the weights of every dense/conv layer
    for i in det.net.linear_layers():
        assert det.patterns[i].a_plus.shape == det.net[i].weight.shape
    # dtd_onelayer keeps the DTD derivation's b_j <= 0
    assert (relprop.zoo.load("dtd_onelayer").net[0].bias <= 0).all()


def test_detector_relevance_lies_on_the_target_half():
    """The issue's criterion: >= 80% of the positive relevance on the half holding the 0-3 digit."""
    det = relprop.zoo.load("detector")
    for method, options in [("lrp.epsilon_plus_flat", {}), ("dtd.box", {"low": 0.0, "high": 1.0}),
                            ("pattern.attribution", {"patterns": det.patterns})]:
        R = relprop.explain(det.net, det.x, method, **options)
        pos = np.maximum(R, 0)
        share = (pos * det.masks).sum() / pos.sum()
        assert share >= 0.8, f"{method}: {share:.3f}"


@pytest.mark.parametrize("name, minimum", [("digits_cnn", 0.95), ("detector", 0.95)])
def test_training_script_reproduces_quality(name, minimum):
    """A reduced (--quick) run of ``python -m relprop.zoo.train`` reaches the shipped quality bar."""
    net, samples, meta = zoo_train.build(name, quick=True, progress=False)
    assert meta["test_score"] >= minimum, meta
    net2, _, meta2 = zoo_train.build(name, quick=True, progress=False)
    assert meta2["test_score"] == meta["test_score"]  # seeded: the same net again
    np.testing.assert_array_equal(net2[0].weight, net[0].weight)


def test_data_sets():
    x, y = data.digits("train", 8)
    assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8) and 0 <= x.min() and x.max() <= 1
    x28, y28 = data.digits("train", 28)
    assert x28.shape[1:] == (1, 28, 28) and np.array_equal(y, y28)
    xt, _ = data.digits("test", 8)
    assert len(xt) + len(x) == 1797
    xd, yd, mask = data.detection("test", 50, seed=3)
    assert xd.shape == (50, 1, 28, 56) and set(np.unique(yd)) <= {0, 1, 2, 3}
    assert mask.shape == xd.shape and mask.dtype == bool
    # exactly one half is the target half, and both sides occur
    halves = mask[:, 0, 0, [0, 28]]
    assert (halves.sum(1) == 1).all() and 0 < halves[:, 0].sum() < 50
    xa, ya = data.pattern_toy(2000, seed=0)
    # x = a_s y + a_d eps: the second coordinate is pure distractor, x1 - x2 = y
    np.testing.assert_allclose(xa[:, 0] - xa[:, 1], ya.reshape(-1), atol=1e-5)


def test_trainer_learns_a_separable_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    y = (x[:, 0] - x[:, 2] > 0).astype(np.int64)
    spec = [{"type": "linear", "in": 5, "out": 8}, {"type": "relu"}, {"type": "linear", "in": 8, "out": 2}]
    net = relprop.nets.train.init_net(spec, seed=1)
    train(net, x, y, epochs=20, batch_size=32, lr=1e-2, seed=0, progress=False)
    assert accuracy(net, x, y) > 0.95
