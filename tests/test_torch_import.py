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
import copy
import sys
import types

import numpy as np
import pytest

import relprop

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
nn = torch.nn


def import_zennit():
    """``import zennit``, standing an empty module in for ``zennit.torchvision`` when torchvision is absent."""
    try:
        import zennit
    except ImportError as exc:
        if exc.name != "torchvision":
            pytest.skip(f"zennit is not installed: {exc}", allow_module_level=True)
        for name in [n for n in sys.modules if n == "zennit" or n.startswith("zennit.")]:
            del sys.modules[name]
        sys.modules["zennit.torchvision"] = types.ModuleType("zennit.torchvision")
        import zennit
    return zennit


# -- torchvision's structure, written out ----------------------------------------------------------------
def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None, zennit_sum=False):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.sum = _sum() if zennit_sum else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.sum(torch.stack([identity, out], dim=-1)) if self.sum is not None else out + identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None, zennit_sum=False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.sum = _sum() if zennit_sum else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.sum(torch.stack([identity, out], dim=-1)) if self.sum is not None else out + identity
        return self.relu(out)


def _sum():
    from zennit.layer import Sum

    return Sum()


class ResNet(nn.Module):
    """torchvision.models.ResNet at base width ``width`` (64 in torchvision)."""

    def __init__(self, block, layers, num_classes=10, width=16, zennit_sum=False):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0], 1, zennit_sum)
        self.layer2 = self._make_layer(block, 2 * width, layers[1], 2, zennit_sum)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], 2, zennit_sum)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], 2, zennit_sum)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride, zennit_sum):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        mods = [block(self.inplanes, planes, stride, downsample, zennit_sum)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, zennit_sum=zennit_sum) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGG(nn.Module):
    """torchvision.models.VGG with BN (``make_layers(cfg, batch_norm=True)``), widths / 8, 2x2 pooled features."""

    CFG_11 = [8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"]

    def __init__(self, cfg=CFG_11, num_classes=10, batch_norm=True, hidden=64):
        super().__init__()
        mods, cin = [], 3
        for v in cfg:
            if v == "M":
                mods.append(nn.MaxPool2d(2, 2))
            else:
                mods += [nn.Conv2d(cin, v, 3, padding=1)] + ([nn.BatchNorm2d(v)] if batch_norm else []) + \
                        [nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*mods)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(cin * 4, hidden), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def randomize(model, seed=0):
    """Random weights and non-trivial BatchNorm statistics (so a wrongly applied BN shows)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


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
def fold_bn(model):
    """A copy with every BatchNorm merged into the convolution before it (exact, float64) and replaced by
    Identity -- what Zennit's MergeBatchNorm canonizer means, without its x/sqrt(1 + eps) remainder."""
    model = copy.deepcopy(model)

    def merge(conv, bn):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.data = conv.weight.data * scale.reshape(-1, 1, 1, 1)
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)

    with torch.no_grad():
        for m in list(model.modules()):
            if isinstance(m, (BasicBlock, Bottleneck)) or m.__class__ is ResNet:
                for k in (1, 2, 3):
                    if hasattr(m, f"conv{k}"):
                        merge(getattr(m, f"conv{k}"), getattr(m, f"bn{k}"))
                        setattr(m, f"bn{k}", nn.Identity())
            elif isinstance(m, nn.Sequential):
                for j in range(len(m) - 1):
                    if isinstance(m[j], nn.Conv2d) and isinstance(m[j + 1], nn.BatchNorm2d):
                        merge(m[j], m[j + 1])
                        m[j + 1] = nn.Identity()
    return model


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
