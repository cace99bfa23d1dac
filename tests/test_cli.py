"""`relprop demo` and `relprop explain` end to end, and the pictures."""
import numpy as np
import pytest

import relprop
from relprop import cli


def test_demo_smoke(tmp_path, capfd):
    cli.main(["demo", "--out", str(tmp_path), "--methods", "gradient,lrp.epsilon_plus_flat,pattern.attribution",
              "--rows", "2"])
    out = capfd.readouterr().out
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 10_000
    assert "lrp.epsilon_plus_flat" in out and "R+ target" in out and "S_a+-" in out


def test_demo_rejects_unknown_method(tmp_path):
    with pytest.raises((SystemExit, ValueError)):
        cli.main(["demo", "--out", str(tmp_path), "--methods", "lrp.bogus"])


def test_explain_command_on_a_saved_net(tmp_path):
    model = relprop.zoo.load("digits_cnn")
    net_path = tmp_path / "net.npz"
    model.net.save(net_path)
    np.save(tmp_path / "x.npy", model.x[:3])
    cli.main(["explain", "--model", str(net_path), "--input", str(tmp_path / "x.npy"), "--method", "lrp.epsilon",
              "--out", str(tmp_path / "R.npy"), "--png", str(tmp_path / "heat.png")])
    R = np.load(tmp_path / "R.npy")
    np.testing.assert_allclose(R, relprop.explain(model.net, model.x[:3], "lrp.epsilon"), rtol=1e-5, atol=1e-6)
    assert (tmp_path / "heat.png").exists() or list(tmp_path.glob("heat*.png"))


def test_heatmap_colours():
    r = np.array([[-2.0, 0.0, 1.0, 2.0]])
    rgb = relprop.viz.heatmap(r)
    assert rgb.shape == (1, 4, 3)
    red, white, blue = rgb[0, 3], rgb[0, 1], rgb[0, 0]
    assert red[0] > 0.9 and red[2] < 0.1          # positive -> red
    assert blue[2] > 0.9 and blue[0] < 0.1        # negative -> blue
    assert white.min() > 0.9                      # zero -> white (centred at 0)
    np.testing.assert_allclose(rgb[0, 2], (rgb[0, 3] + white) / 2, atol=0.05)  # symmetric, linear scale
