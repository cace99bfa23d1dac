"""`relprop demo --show features|maximize|tcav|lime`: each view runs end to end (toy sizes) and writes its PNG."""
import numpy as np
import pytest

from relprop import cli, demo

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def test_features_view(tmp_path, capsys):
    png, top = demo.demo_features("digits_cnn", out=tmp_path, channels=2, k=4)
    assert png.exists() and png.stat().st_size > 5_000 and top.values.shape == (16, 4)
    assert "receptive field 14x14" in capsys.readouterr().out


def test_maximize_view(tmp_path, capsys):
    png, res = demo.demo_maximize("digits_cnn", out=tmp_path, steps=4)
    assert png.exists() and res.image.shape == (10, 1, 28, 28)
    assert res.image.min() >= 0 and res.image.max() <= 1
    assert "logit 0" in capsys.readouterr().out


def test_tcav_view(tmp_path, capsys):
    png, results = demo.demo_tcav("digits_cnn", out=tmp_path, classes=(0,), n_random=10)
    assert png.exists() and set(results["digit 0"]) == set(demo.TCAV_CONCEPTS)
    assert results["digit 0"]["ring"].mean > results["digit 0"]["vertical stroke"].mean  # rings make a 0
    assert "TCAV" in capsys.readouterr().out


def test_lime_view_and_show_flag(tmp_path, capsys):
    pytest.importorskip("skimage")
    png, fit = demo.demo_lime("detector", out=tmp_path, rows=1, samples=60)
    assert png.exists() and len(fit.coef) == 1 and np.isfinite(fit.coef[0]).all()
    args = cli._parser().parse_args(["demo", "--show", "lime", "--out", str(tmp_path)])
    assert args.show == "lime" and args.model is None and cli.VIEWS["lime"] is demo.demo_lime
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["demo", "--show", "bogus"])
