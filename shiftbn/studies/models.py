"""Small BN networks for studies, demos and tests: ``SmallCNN``, ``SmallResNet``, ``MLP``, ``SharedHeadNet``,
``SmallCNN3d``, and the segmenters ``UNet2d``/``UNet3d`` (``unet2d``/``unet3d``). For ImageNet ResNets use
``torchvision.models`` (or ``benchmarks/resnets.py`` in the repository)."""

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


def _three_blocks(cin: int, w: int, conv: type, bn: type, pool: type, gap: type) -> nn.Sequential:
    """Three conv-BN-ReLU blocks (widths w, 2w, 2w; a 2x pooling after the second), global pooling."""
    return nn.Sequential(
        conv(cin, w, 3, padding=1, bias=False), bn(w), nn.ReLU(),
        conv(w, 2 * w, 3, padding=1, bias=False), bn(2 * w), nn.ReLU(),
        pool(2),
        conv(2 * w, 2 * w, 3, padding=1, bias=False), bn(2 * w), nn.ReLU(),
        gap(1), nn.Flatten(),
    )


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks, global pooling, a linear classifier. Input (N, C, H, W)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        with _seeded(seed):
            self.features = _three_blocks(in_channels, width, nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d,
                                          nn.AdaptiveAvgPool2d)
            self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    """A ResNet-ish network: stem + 3 stages of basic blocks (9 BN layers). Input (N, C, H, W)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        with _seeded(seed):
            w = width
            self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
            self.layer1 = _Block(w, w, 1)
            self.layer2 = _Block(w, 2 * w, 2)
            self.layer3 = _Block(2 * w, 4 * w, 2)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))


class MLP(nn.Module):
    """Linear-BN1d-ReLU layers then a linear classifier. Input (N, in_features)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64, depth: int = 2, seed: int = 0) -> None:
        super().__init__()
        with _seeded(seed):
            layers: list[nn.Module] = []
            d = in_features
            for _ in range(depth):
                layers += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU()]
                d = hidden
            self.body = nn.Sequential(*layers)
            self.classifier = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x.flatten(1)))


class SharedHeadNet(nn.Module):
    """A BN module shared across domains: one conv-BN head applied to two feature levels.

    Input (N, C, H, W); the stem's output and its 2x max-pooled version (two "domains" with different
    statistics, like FPN levels under a RetinaNet head) go through the same head; logits are the
    mean of both. ``joint=False``: the head's BN normalizes each level separately (call sites
    ``head_bn@0``/``@1``); ``joint=True``: both levels in one BN call (shared statistics).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8, joint: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        self.joint = joint
        with _seeded(seed):
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU())
            self.head_conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.head_bn = nn.BatchNorm2d(width)
            self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stem(x)
        levels = [self.head_conv(f), self.head_conv(nn.functional.max_pool2d(f, 2))]
        if self.joint:
            flat = torch.cat([h.flatten(2) for h in levels], dim=2).unsqueeze(-1)
            parts = torch.split(self.head_bn(flat).squeeze(-1), [h[0, 0].numel() for h in levels], dim=2)
            normed = [p.reshape(h.shape) for p, h in zip(parts, levels, strict=True)]
        else:
            normed = [self.head_bn(h) for h in levels]
        return torch.stack([self.classifier(torch.relu(h).mean(dim=(2, 3))) for h in normed]).mean(0)


class SmallCNN3d(nn.Module):
    """Three Conv3d-BN3d-ReLU blocks, global pooling, a linear classifier. Input (N, C, D, H, W).

    Why: volumetric models (3D U-Net encoders) put BatchNorm3d after every convolution; this is the
    smallest such network for tests and demos.
    """

    sample_ndim = 4

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        with _seeded(seed):
            self.features = _three_blocks(in_channels, width, nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d,
                                          nn.AdaptiveAvgPool3d)
            self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _double_conv(cin: int, cout: int, conv: type, bn: type) -> nn.Sequential:
    return nn.Sequential(conv(cin, cout, 3, padding=1, bias=False), bn(cout), nn.ReLU(),
                         conv(cout, cout, 3, padding=1, bias=False), bn(cout), nn.ReLU())


class _UNet(nn.Module):
    """Two levels down, two up, skip connections; Conv-BN-ReLU twice per level; logits (B, K, *spatial).

    Up-sampling is nearest-neighbour to the skip's exact size, so any input of side >= 4 works
    (odd sides included); widths w, 2w, 4w (bottleneck), 2w, w; 10 BN layers.
    """

    sample_ndim = 3
    _layers: tuple[type, type, type] = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)

    def __init__(self, in_channels: int = 1, num_classes: int = 3, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__} {name} must be an integer >= 1, got {value!r}")
        conv, bn, pool = self._layers
        w = width
        with _seeded(seed):
            self.enc0 = _double_conv(in_channels, w, conv, bn)
            self.enc1 = _double_conv(w, 2 * w, conv, bn)
            self.bottleneck = _double_conv(2 * w, 4 * w, conv, bn)
            self.dec1 = _double_conv(4 * w + 2 * w, 2 * w, conv, bn)
            self.dec0 = _double_conv(2 * w + w, w, conv, bn)
            self.head = conv(w, num_classes, 1)
        self.pool = pool(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.sample_ndim + 1:
            raise ValueError(f"{type(self).__name__} takes (B, C, {'D, ' if self.sample_ndim == 4 else ''}H, W) "
                             f"inputs, got shape {tuple(x.shape)}")
        if min(x.shape[2:]) < 4:
            raise ValueError(f"{type(self).__name__} needs spatial sides >= 4 (two 2x poolings), got "
                             f"{tuple(x.shape[2:])}")
        s0 = self.enc0(x)
        s1 = self.enc1(self.pool(s0))
        b = self.bottleneck(self.pool(s1))
        d1 = self.dec1(torch.cat([nn.functional.interpolate(b, size=s1.shape[2:]), s1], dim=1))
        d0 = self.dec0(torch.cat([nn.functional.interpolate(d1, size=s0.shape[2:]), s0], dim=1))
        return self.head(d0)


class UNet2d(_UNet):
    """A small 2-D U-Net with BatchNorm2d (see ``unet2d``). Input (B, C, H, W), logits (B, K, H, W)."""


class UNet3d(_UNet):
    """A small 3-D U-Net with BatchNorm3d (see ``unet3d``). Input (B, C, D, H, W), logits (B, K, D, H, W)."""

    sample_ndim = 4
    _layers = (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d)


def unet2d(in_channels: int = 1, num_classes: int = 3, width: int = 8, seed: int = 0) -> UNet2d:
    """A small 2-D U-Net with BatchNorm: 2 levels down, 2 up, Conv-BN-ReLU twice per level.

    Why: most multi-site medical models are BN segmenters; this is the smallest faithful one for
    tests, demos and the CLI (``--model unet2d``). Up-sampling is nearest-neighbour, so any side >= 4 works.

    Args:
        in_channels: input channels C (default 1).
        num_classes: output classes K, background included (default 3).
        width: channels of the first level (default 8; then 2x and 4x).
        seed: seeds the initial weights (the global RNG is left alone).

    Returns:
        A ``UNet2d`` mapping (B, C, H, W) to logits (B, K, H, W), with 10 BatchNorm2d layers.

    Example:
        >>> net = unet2d(num_classes=3, width=4)
        >>> tuple(net(torch.zeros(2, 1, 16, 16)).shape)
        (2, 3, 16, 16)
    """
    return UNet2d(in_channels, num_classes, width, seed)


def unet3d(in_channels: int = 1, num_classes: int = 3, width: int = 8, seed: int = 0) -> UNet3d:
    """A small 3-D U-Net with BatchNorm3d: 2 levels down, 2 up, Conv-BN-ReLU twice per level.

    Why: volumetric segmenters (3-D U-Nets with ``norm="batch"``) are the main multi-site medical
    models; this one trains on CPU in seconds (``--model unet3d``).

    Args:
        in_channels: input channels C (default 1).
        num_classes: output classes K, background included (default 3).
        width: channels of the first level (default 8; then 2x and 4x).
        seed: seeds the initial weights.

    Returns:
        A ``UNet3d`` mapping (B, C, D, H, W) to logits (B, K, D, H, W), with 10 BatchNorm3d layers.

    Example:
        >>> net = unet3d(width=2)
        >>> tuple(net(torch.zeros(1, 1, 8, 8, 8)).shape)
        (1, 3, 8, 8, 8)
    """
    return UNet3d(in_channels, num_classes, width, seed)


MODELS = {"SmallCNN": SmallCNN, "SmallResNet": SmallResNet, "MLP": MLP, "SharedHeadNet": SharedHeadNet,
          "SmallCNN3d": SmallCNN3d, "UNet2d": UNet2d, "UNet3d": UNet3d}
_ELSEWHERE = {"ResNet18": "resnet18", "ResNet50": "resnet50"}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0, **kwargs) -> nn.Module:
    """A named model for inputs of ``input_shape`` (one sample, e.g. (1, 16, 16), (1, 8, 16, 16) or (16,)).

    ``name``: one of ``MODELS``; extra keyword arguments (``width``, ``hidden``, ...) go to it. Image
    models take (C, H, W) samples; a model with ``sample_ndim = 4`` (``SmallCNN3d``, ``UNet3d``) takes
    (C, D, H, W). ``UNet2d``/``UNet3d`` are segmenters: ``num_classes`` counts the background.
    """
    if name in _ELSEWHERE:
        raise ValueError(f"{name} is no longer built in; give the model as a factory instead, e.g. "
                         f"model = lambda seed: torchvision.models.{_ELSEWHERE[name]}(num_classes={num_classes}) "
                         "(pip install torchvision), or copy benchmarks/resnets.py from the repository")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    if name == "MLP":
        features = 1
        for d in input_shape:
            features *= int(d)
        return MLP(features, num_classes, seed=seed, **kwargs)
    ndim = getattr(MODELS[name], "sample_ndim", 3)
    if len(input_shape) != ndim:
        kind = "volume inputs (C, D, H, W)" if ndim == 4 else "image inputs (C, H, W)"
        raise ValueError(f"{name} needs {kind}, got a sample of shape {tuple(input_shape)}")
    return MODELS[name](in_channels=int(input_shape[0]), num_classes=num_classes, seed=seed, **kwargs)
