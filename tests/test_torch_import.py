"""relprop.from_torch and torch.onnx.export + relprop.from_onnx on VGG- and ResNet-shaped PyTorch models.

torchvision cannot be installed beside the CPU torch here, so the models are written below with
torchvision's module structure (BasicBlock, Bottleneck, ResNet, VGG-BN), at reduced widths and
small images to keep the test fast.  Checks: the forward equals torch's to 1e-5 in float32 (random
weights and BatchNorm statistics), and lrp.epsilon, lrp.epsilon_plus_flat and lrp.alpha_beta equal
Zennit's in float64 to 1e-9 relative, the reference model canonized by hand as Zennit's canonizers
do it: BatchNorm merged into the convolution before it (by hand: zennit 0.5.1's MergeBatchNorm
leaves x/sqrt(1 + eps) behind, FINDINGS.md) and every residual add a ``zennit.layer.Sum`` over
``torch.stack`` (Zennit maps Sum to the Norm rule, as its ResNet canonizer does).
"""

import numpy as np
import pytest

import relprop

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
nn = torch.nn
from tests.torch_models import VGG, BasicBlock, Bottleneck, ResNet, fold_bn, import_zennit, randomize  # noqa: E402


MODELS = {
    "resnet18": (lambda **kw: ResNet(BasicBlock, [2, 2, 2, 2], **kw), (2, 3, 32, 32)),
    "resnet_bottleneck": (lambda **kw: ResNet(Bottleneck, [1, 1, 1, 1], width=8, **kw), (2, 3, 32, 32)),
    "vgg11_bn": (lambda **kw: VGG(**kw), (2, 3, 64, 64)),
}


def make(name, dtype=torch.float32, **kw):
    build, shape = MODELS[name]
    model = randomize(build(**kw)).to(dtype)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return model, x


def assert_close(actual, expected, rtol):
    expected = np.asarray(expected)
    scale = float(np.abs(expected).max())
    assert scale > 0  # a vacuous comparison proves nothing
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# -- forward parity ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_from_torch_forward_matches_torch(name):
    model, x = make(name)
    net = relprop.from_torch(model, x)
    with torch.no_grad():
        expected = model(x).numpy()
    assert_close(net.forward(x.numpy()), expected, 1e-5)
    x5 = torch.randn(5, *x.shape[1:], generator=torch.Generator().manual_seed(2))  # another batch size
    with torch.no_grad():
        assert_close(net.forward(x5.numpy()), model(x5).numpy(), 1e-5)


def test_from_torch_keeps_batchnorm_and_weights_exactly():
    model, x = make("resnet18")
    net = relprop.from_torch(model, x)
    spec, state = net.spec(), net.state_dict()
    bns = [i for i, e in enumerate(spec) if e["type"] == "batchnorm2d"]
    assert len(bns) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    np.testing.assert_array_equal(state[f"{bns[0]}.running_var"], model.bn1.running_var.numpy())
    np.testing.assert_array_equal(state["0.weight"], model.conv1.weight.detach().numpy())
    assert sum(e["type"] == "add" for e in spec) == 8
    assert model.training is False


def test_from_torch_restores_training_mode_and_checks_arguments():
    model, x = make("vgg11_bn")
    model.train()
    relprop.from_torch(model, x)
    assert model.training
    with pytest.raises(TypeError, match="torch.nn.Module"):
        relprop.from_torch(lambda t: t, x)
    with pytest.raises(TypeError, match="float tensor"):
        relprop.from_torch(model, x.to(torch.int64))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) or \(N, D\)"):
        relprop.from_torch(model, x[0])


def test_from_torch_unsupported_layer_names_it():
    model = nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"\(Sigmoid\): operator Sigmoid is not supported"):
        relprop.from_torch(model, torch.zeros(1, 6))


def test_legacy_export_to_file_then_from_onnx(tmp_path):
    """The TorchScript exporter folds BN into the convolutions in eval mode: the folded graph loads too."""
    model, x = make("resnet18")
    path = tmp_path / "resnet.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False)
    net = relprop.from_onnx(path)
    assert not any(e["type"] == "batchnorm2d" for e in net.spec())  # folded by the exporter
    with torch.no_grad():
        assert_close(net.forward(x.numpy()), model(x).numpy(), 1e-5)


def test_default_export_to_file_then_from_onnx(tmp_path):
    """``torch.onnx.export(model, x, path)`` at its defaults (the torch.export-based exporter, needs onnxscript):
    external data beside the model, ReduceMean + a fixed-shape Reshape for the pooling; batch 5 explained."""
    pytest.importorskip("onnxscript")
    model, x = make("resnet18")
    path = tmp_path / "resnet.onnx"
    torch.onnx.export(model, (x,), str(path))
    net = relprop.from_onnx(path)
    x5 = torch.randn(5, *x.shape[1:], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(net.forward(x5.numpy()), model(x5).numpy(), 1e-5)


# -- Zennit -------------------------------------------------------------------------------------------
def zennit_relevance(model, x, composite, target):
    from zennit.attribution import Gradient

    xt = torch.from_numpy(np.array(x)).requires_grad_(True)

    def start(out):  # R_c = f_c(x): relprop's output="logit"
        return torch.nn.functional.one_hot(torch.as_tensor(target), out.shape[1]).to(out) * out.detach()

    with Gradient(model, composite) as attributor:
        _, r = attributor(xt, start)
    return r.detach().numpy()


def _composites():
    zennit = import_zennit()
    zc, zr, zt = zennit.composites, zennit.rules, zennit.types
    return {
        "lrp.epsilon": lambda: zc.LayerMapComposite(layer_map=zc.layer_map_base() + [(zt.Linear, zr.Epsilon())]),
        "lrp.epsilon_plus_flat": zc.EpsilonPlusFlat,
        "lrp.alpha_beta": lambda: zc.LayerMapComposite(layer_map=zc.layer_map_base() + [(zt.Linear, zr.AlphaBeta())]),
    }


@pytest.mark.parametrize("method", ["lrp.epsilon", "lrp.epsilon_plus_flat", "lrp.alpha_beta"])
@pytest.mark.parametrize("name", list(MODELS))
def test_relevance_matches_zennit(name, method):
    composite = _composites()[method]
    model, x = make(name, torch.float64)
    net = relprop.from_torch(model, x)  # BN kept as layers: relprop folds them itself
    build, _ = MODELS[name]
    ref = build(zennit_sum=True) if name.startswith("resnet") else build()
    ref.load_state_dict(model.state_dict())
    ref = fold_bn(ref.to(torch.float64).eval())
    with torch.no_grad():
        assert_close(ref(x).numpy(), model(x).numpy(), 1e-12)  # the canonized reference is the same function
    xn = x.numpy()
    target = net.forward(xn).argmax(axis=1)
    expected = zennit_relevance(ref, xn, composite(), target)
    actual = relprop.explain(net, xn, method, target=target)
    assert_close(actual, expected, 1e-9)


def test_zoo_digits_resnet_recipe_trains():
    """The PyTorch recipe behind the zoo's digits_resnet, reduced (--quick): trains, imports, is seeded."""
    pytest.importorskip("sklearn")
    from relprop.zoo import train_resnet

    net, samples, meta, onnx_bytes = train_resnet.build(quick=True, progress=False)
    assert meta["quick"] and meta["test_score"] >= 0.95, meta["test_score"]
    again = relprop.from_onnx(onnx_bytes)
    np.testing.assert_array_equal(again.forward(samples["x"]), net.forward(samples["x"]))
