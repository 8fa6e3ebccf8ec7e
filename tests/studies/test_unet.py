"""The small U-Nets: logits per voxel, BatchNorm everywhere, seeded, trainable, named for the CLI."""

import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn.integrations.models import model_factory
from shiftbn.studies.models import MODELS, UNet2d, UNet3d, build_model, unet2d, unet3d


@pytest.mark.parametrize(("factory", "shape", "bn"), [(unet2d, (2, 1, 20, 17), nn.BatchNorm2d),
                                                      (unet3d, (2, 1, 8, 9, 12), nn.BatchNorm3d)])
def test_logits_per_voxel_with_bn_layers(factory, shape, bn):
    net, twin = factory(num_classes=4, width=2), factory(num_classes=4, width=2)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), twin.state_dict().values(), strict=True))
    out = net(torch.randn(shape))
    assert out.shape == (shape[0], 4, *shape[2:])  # odd sides too: up-sampling goes to the skip's size
    assert sum(isinstance(m, bn) for m in net.modules()) == 10
    assert not torch.equal(net.head.weight, factory(num_classes=4, width=2, seed=1).head.weight)


def test_bad_inputs_are_refused_naming_the_shape():
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\).*\(1, 1, 8, 8\)"):
        unet3d(width=2)(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="sides >= 4"):
        unet2d(width=2)(torch.zeros(1, 1, 3, 8))
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        unet2d(width=0)


def test_named_in_the_model_table_and_for_the_cli():
    assert isinstance(build_model("UNet3d", (1, 8, 8, 8), 3, width=2), MODELS["UNet3d"])
    with pytest.raises(ValueError, match="volume inputs"):
        build_model("UNet3d", (1, 8, 8), 3)
    assert isinstance(model_factory("unet3d")(num_classes=2, width=2), UNet3d)
    assert isinstance(model_factory("unet2d", "--model")(width=2), UNet2d)


def test_a_few_steps_reduce_the_loss_on_seg_sites_2d():
    ds = sb.load("seg-sites-2d", n=4, size=24, sites=2)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.stack([ds[i][1]["mask"] for i in range(len(ds))])
    net = unet2d(num_classes=3, width=4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0] and losses[-1] == min(losses)
