"""Model factories for ``shiftbn matrix --model benchmarks.camelyon_model:resnet18_2`` (no arguments)."""

from __future__ import annotations

from benchmarks.resnets import resnet18


def resnet18_2():
    """ResNet-18 with two outputs (normal / tumor), as the Camelyon-shaped benchmark evaluates."""
    return resnet18(num_classes=2)
