"""Models: the 3D CNN runs, the model table builds every entry, and the ResNets that left it say where they went."""

import pytest
import torch
from torch import nn

from shiftbn.studies.models import MODELS, SmallCNN3d, build_model


def test_small_cnn3d_forward_and_bn3d():
    model = SmallCNN3d(in_channels=1, num_classes=4)
    twin = SmallCNN3d(1, 4)
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), twin.state_dict().values(),
                                                 strict=True))
    out = model(torch.randn(2, 1, 8, 16, 16))
    assert out.shape == (2, 4)
    assert sum(isinstance(m, nn.BatchNorm3d) for m in model.modules()) == 3
    assert model.features[1].num_batches_tracked.item() == 1


def test_build_model_covers_the_table():
    v = build_model("SmallCNN3d", (1, 8, 16, 16), 2, width=4)
    assert v(torch.randn(2, 1, 8, 16, 16)).shape == (2, 2)
    with pytest.raises(ValueError, match=r"volume inputs \(C, D, H, W\)"):
        build_model("SmallCNN3d", (3, 96, 96), 2)
    with pytest.raises(ValueError, match=r"image inputs \(C, H, W\)"):
        build_model("SmallCNN", (1, 8, 16, 16), 2)
    for name, shape in [("SmallCNN", (1, 16, 16)), ("SmallResNet", (1, 16, 16)), ("MLP", (16,)),
                        ("SharedHeadNet", (1, 16, 16))]:
        assert isinstance(build_model(name, shape, 3), MODELS[name])


@pytest.mark.parametrize("name", ["ResNet18", "ResNet50"])
def test_imagenet_resnets_left_the_table_with_a_pointer(name):
    with pytest.raises(ValueError, match=rf"{name} is no longer built in.*torchvision\.models\.{name.lower()}"):
        build_model(name, (3, 96, 96), 2)
