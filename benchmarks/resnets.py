"""ImageNet ResNet-18/50 in torchvision's layout, for the benchmarks (no torchvision needed).

Why: the benchmarks time the statistics engine on the models medical-imaging groups fine-tune; with
torchvision installed, ``torchvision.models.resnet18`` has the same module names and state-dict keys
(a test checks the keys against torchvision's documented layout). Seeded like shiftbn's small models.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Initialize parameters from ``seed`` without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: two 3x3 conv-BN, identity or ``downsample`` (1x1 conv, BN) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (v1.5: stride on the 3x3): 1x1, 3x3, 1x1 conv-BN, expansion 4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """An ImageNet ResNet with torchvision's module names, so its state dicts load with ``strict=True``.

    Why: the models medical-imaging groups fine-tune are torchvision ResNets; their BN layers (names
    like ``layer2.0.downsample.1``) must be the same here. ``block``: ``BasicBlock`` or ``Bottleneck``;
    ``layers``: blocks per stage (4 ints); ``in_channels``: input channels (3 for RGB, 1 for grey).
    Initialized like torchvision (Kaiming-normal fan-out convs, BN weight 1 bias 0) from ``seed``.
    Input (N, in_channels, H, W), any H, W >= 1 (output stride 32); returns logits (N, num_classes).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int] | list[int],
                 num_classes: int = 1000, in_channels: int = 3, seed: int = 0) -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise TypeError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {list(layers)}")
        with _seeded(seed):
            self.inplanes = 64
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(block, 64, int(layers[0]), 1)
            self.layer2 = self._make_layer(block, 128, int(layers[1]), 2)
            self.layer3 = self._make_layer(block, 256, int(layers[2]), 2)
            self.layer4 = self._make_layer(block, 512, int(layers[3]), 2)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512 * block.expansion, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        out = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        out += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet18(ResNet):
    """ResNet-18 (basic blocks 2-2-2-2, 20 BN layers, 11,689,512 parameters at 1000 classes)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, seed: int = 0) -> None:
        super().__init__(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, seed=seed)


class ResNet50(ResNet):
    """ResNet-50 (bottlenecks 3-4-6-3, 53 BN layers, 25,557,032 parameters at 1000 classes)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, seed: int = 0) -> None:
        super().__init__(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, seed=seed)


def resnet18(num_classes: int = 1000, in_channels: int = 3, seed: int = 0) -> ResNet18:
    """torchvision-style factory for ``ResNet18`` (same state-dict keys as ``torchvision.models.resnet18``)."""
    return ResNet18(in_channels=in_channels, num_classes=num_classes, seed=seed)


def resnet50(num_classes: int = 1000, in_channels: int = 3, seed: int = 0) -> ResNet50:
    """torchvision-style factory for ``ResNet50`` (same state-dict keys as ``torchvision.models.resnet50``)."""
    return ResNet50(in_channels=in_channels, num_classes=num_classes, seed=seed)
