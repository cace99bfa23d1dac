"""`relprop demo` and `relprop explain` end to end, and the heatmap pictures."""
import subprocess
import sys

import numpy as np
import pytest

import relprop
from relprop import cli, demo, viz, zoo

pytest.importorskip("matplotlib")


def test_demo_smoke(tmp_path, capsys):
    png, rows = cli.demo("detector", out=tmp_path)
    out = capsys.readouterr().out
    assert png.exists() and png.stat().st_size > 10_000 and png.suffix == ".png"
    assert str(png) in out and "conserv. err" in out and "rho(S)" in out
    methods = {r["method"] for r in rows}
    assert {"gradient", "lrp.epsilon_plus_flat", "dtd.box", "pattern.attribution"} <= methods
    for r in rows:
        if r["method"] in ("lrp.epsilon_plus_flat", "dtd.box", "pattern.attribution"):
            assert r["target"] >= 0.8, r
        assert np.isfinite(r["ms_per_image"]) and np.isfinite(r.get("aopc", 0.0))
    by = {r["method"]: r for r in rows}
    assert by["dtd.box"]["conservation"] < 1e-3  # z^B/z+ without bias: conservative
    # PatternNet's rho table (issue 11): S_a+- within 0.05 of S_a or above on every layer, the
    # random-direction baseline near 0, no layer whose held-out inputs collapse in rank
    lines = out[out.index("rho(S) per layer"):].splitlines()
    head = lines[1].split()
    table = [dict(zip(head, line.split())) for line in lines[2:] if line.split() and line.split()[0].isdigit()]
    assert len(table) == 4, out
    for row in table:
        assert float(row["S_a+-"]) >= float(row["S_a"]) - 0.05, row
        assert abs(float(row["random"])) < 0.05, row
        assert row["S_x"] == "nan"
    assert "warning: layer" not in out


def test_demo_methods_flag(tmp_path, capsys):
    assert cli.main(["demo", "--methods", "gradient,lrp.epsilon_plus_flat", "--out", str(tmp_path / "d.png"),
                     "--no-aopc", "--no-quality", "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "lrp.epsilon_plus_flat" in out and "R+ target" in out and (tmp_path / "d.png").exists()


def test_demo_rejects_unknown_method(tmp_path):
    with pytest.raises((SystemExit, ValueError)):
        cli.main(["demo", "--out", str(tmp_path), "--methods", "lrp.bogus"])


def test_demo_other_zoo_net(tmp_path):
    png, rows = cli.demo("digits_mlp", methods=["gradient", "lrp.epsilon"], out=tmp_path, aopc=False)
    assert png.exists() and len(rows) == 2


def test_explain_subcommand(tmp_path):
    m = zoo.load("digits_cnn")
    np.save(tmp_path / "x.npy", m.x[:3])
    np.save(tmp_path / "one.npy", m.x[0])  # a single input without batch axis
    rc = cli.main(["explain", "--model", "digits_cnn", "--input", str(tmp_path / "x.npy"), "--method",
                   "lrp.epsilon", "--out", str(tmp_path / "R.npy"), "--png", str(tmp_path / "R.png"),
                   "--option", "epsilon=0.01"])
    assert rc == 0
    R = np.load(tmp_path / "R.npy")
    assert R.shape == m.x[:3].shape and (tmp_path / "R.png").exists()
    np.testing.assert_allclose(R, relprop.explain(m.net, m.x[:3], "lrp.epsilon", epsilon=0.01), rtol=1e-5, atol=1e-6)
    # a user's own net saved with net.save, and one input without the batch axis
    m.net.save(tmp_path / "net.npz")
    cli.main(["explain", "--model", str(tmp_path / "net.npz"), "--input", str(tmp_path / "one.npy"),
              "--method", "dtd.box", "--out", str(tmp_path / "r1.npy"), "--png", str(tmp_path / "r1.png")])
    r1 = np.load(tmp_path / "r1.npy")
    assert r1.shape == m.x[0].shape and (tmp_path / "r1.png").exists()
    np.testing.assert_allclose(r1.sum(), m.net.forward(m.x[:1]).max(), rtol=1e-3)


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "relprop", "methods"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "lrp.epsilon" in res.stdout


def test_heatmap_colours():
    r = np.array([[-2.0, 0.0, 2.0]])
    rgb = viz.heatmap(r)
    np.testing.assert_allclose(rgb[0, 0], [0, 0, 1])  # most negative: blue
    np.testing.assert_allclose(rgb[0, 1], [1, 1, 1])  # zero: white
    np.testing.assert_allclose(rgb[0, 2], [1, 0, 0])  # most positive: red
    # symmetric scaling: +1 next to -4 is a pale red, and a percentile saturates the outlier
    rgb = viz.heatmap(np.array([[1.0, -4.0]]))
    assert rgb[0, 0, 0] == 1 and rgb[0, 0, 1] > 0.7
    rgb = viz.heatmap(np.array([[1.0, 1.0, 1.0, 100.0]]), percentile=50)
    np.testing.assert_allclose(rgb[0, 0], [1, 0, 0])
    # channels are summed, flat vectors reshaped, the grey input blended where |R| ~ 0
    assert viz.heatmap(np.ones((3, 4, 5))).shape == (4, 5, 3)
    assert viz.heatmap(np.ones(64)).shape == (8, 8, 3)
    blended = viz.heatmap(np.zeros((2, 2)), x=np.array([[0.0, 1.0], [0.0, 0.0]]), blend=1.0)
    assert blended[0, 1, 0] < blended[0, 0, 0]
    with pytest.raises(ValueError, match="image_shape"):
        viz.heatmap(np.ones(10))


def test_grid_figure(tmp_path):
    x = np.random.default_rng(0).random((2, 1, 6, 9)).astype(np.float32)
    fig = viz.grid(x, {"a": x - 0.5, "b": -x}, path=tmp_path / "g.png", row_titles=["r0", "r1"], title="t",
                   footnote="f", outline=np.ones((2, 6, 9), bool))
    assert (tmp_path / "g.png").exists()
    assert [ax.get_title() for ax in fig.axes[:3]] == ["input", "a", "b"]


def test_demo_warns_when_held_out_inputs_collapse_in_rank():
    from relprop.metrics import SignalQuality

    nan = np.full(2, np.nan)
    q = SignalQuality(layers=[0, 6], kinds=["conv2d", "conv2d"], units=[[0], [0]], rho={"S_a": nan},
                      per_unit={"S_a": [nan[:1], nan[:1]]}, rank=[21, 581], dims=[21, 780])
    notes = demo._rank_notes(q)
    assert len(notes) == 1 and "layer 6" in notes[0] and "581 of 780" in notes[0]
