"""PyTorch models with torchvision's module structure (torchvision cannot be installed beside the CPU torch
here): BasicBlock, Bottleneck, ResNet, VGG with BN; random weights; BatchNorm merged by hand.

Shared by tests/test_torch_import.py and bench/test_bench_import.py; needs torch (import it after
``pytest.importorskip("torch")``).  ``zennit_sum=True`` builds every residual add as
``zennit.layer.Sum`` over ``torch.stack`` (what Zennit's ResNet canonizer does; Sum gets the Norm rule).
"""
import copy
import sys
import types

import torch

nn = torch.nn


def import_zennit():
    """``import zennit``, standing an empty module in for ``zennit.torchvision`` when torchvision is absent.

    zennit's ``__init__`` imports its torchvision canonizers, and torchvision cannot be installed beside
    the CPU torch here (FINDINGS.md); none of it is used.  Skips the calling test module (pytest) when
    zennit itself is not installed (``pip install --no-deps zennit``)."""
    import pytest

    try:
        import zennit
    except ImportError as exc:
        if exc.name != "torchvision":
            pytest.skip(f"zennit is not installed (pip install --no-deps zennit): {exc}", allow_module_level=True)
        for name in [n for n in sys.modules if n == "zennit" or n.startswith("zennit.")]:
            del sys.modules[name]
        sys.modules["zennit.torchvision"] = types.ModuleType("zennit.torchvision")
        import zennit
    return zennit


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
