"""The benchmarks' ResNets match torchvision's state dicts key for key and init like it (global RNG untouched)."""

import pytest
import torch
from torch import nn

from benchmarks.resnets import BasicBlock, ResNet, ResNet18, ResNet50, resnet18, resnet50


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def _torchvision_keys(blocks: tuple[int, ...], bottleneck: bool, num_classes: int) -> dict[str, tuple[int, ...]]:
    """torchvision's ResNet state dict (key -> shape), written out from its documented layout, not from our code."""
    keys = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    cin = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
        cout = planes * 4 if bottleneck else planes
        for b in range(n):
            p = f"layer{stage}.{b}"
            if bottleneck:
                shapes = [(planes, cin, 1, 1), (planes, planes, 3, 3), (cout, planes, 1, 1)]
            else:
                shapes = [(planes, cin, 3, 3), (planes, planes, 3, 3)]
            for k, shape in enumerate(shapes, start=1):
                keys[f"{p}.conv{k}.weight"] = shape
                keys.update(_bn(f"{p}.bn{k}", shape[0]))
            if b == 0 and (stage > 1 or cin != cout):
                keys[f"{p}.downsample.0.weight"] = (cout, cin, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", cout))
            cin = cout
    keys["fc.weight"] = (num_classes, cin)
    keys["fc.bias"] = (num_classes,)
    return keys


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny forwards gain nothing from threads; on a loaded 2-core machine two OpenMP threads made
    # one 2x3x32x32 ResNet forward 100x slower (3 s instead of 0.03 s).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def r18() -> ResNet18:
    return resnet18()


@pytest.fixture(scope="module")
def r50() -> ResNet50:
    return resnet50()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_resnet18_matches_torchvision_state_dict(r18):
    assert _n_params(r18) == 11_689_512 and _n_bn(r18) == 20
    sd = r18.state_dict()
    expected = _torchvision_keys((2, 2, 2, 2), bottleneck=False, num_classes=1000)
    assert len(sd) == len(expected) == 122
    assert list(sd) == list(expected), "key order differs from torchvision"
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert not any(k.startswith("layer1.0.downsample") for k in sd)
    assert sd["layer2.0.downsample.1.running_var"].shape == (128,)
    assert sd["layer4.1.bn2.running_var"].shape == (512,)


def test_resnet50_matches_torchvision_state_dict(r50):
    assert _n_params(r50) == 25_557_032 and _n_bn(r50) == 53
    sd = r50.state_dict()
    expected = _torchvision_keys((3, 4, 6, 3), bottleneck=True, num_classes=1000)
    assert len(sd) == len(expected) == 320
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: stride on the 3x3
    assert r50.layer2[0].conv2.stride == (2, 2) and r50.layer2[0].conv1.stride == (1, 1)
    assert sd["fc.weight"].shape == (1000, 2048)


def test_torchvision_shaped_state_dict_loads_strict(r18):
    expected = _torchvision_keys((2, 2, 2, 2), bottleneck=False, num_classes=1000)
    g = torch.Generator().manual_seed(1)
    foreign = {k: (torch.randn(s, generator=g) if s else torch.tensor(7)) for k, s in expected.items()}
    model = ResNet18()
    result = model.load_state_dict(foreign, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.layer2[0].downsample[1].running_var, foreign["layer2.0.downsample.1.running_var"])
    assert model.bn1.num_batches_tracked.item() == 7
    assert r18.state_dict()["conv1.weight"].shape == (64, 3, 7, 7)


def test_resnet18_forward_and_channels_last():
    model = resnet18(num_classes=5, in_channels=1).eval()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert ref.shape == (2, 5) and torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_resnet50_forward(r50):
    with torch.no_grad():
        out = r50.eval()(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


def test_resnet_init_is_seeded_like_torchvision_and_leaves_global_rng(r18):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = ResNet18(num_classes=3, seed=0), ResNet18(num_classes=3, seed=0), ResNet18(num_classes=3, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (out_channels * k * k)).
    w = r18.layer3[0].conv1.weight
    expected_std = (2.0 / (256 * 3 * 3)) ** 0.5
    assert abs(w.std().item() / expected_std - 1) < 0.02
    assert abs(w.mean().item()) < 0.02 * expected_std
    bns = [m for m in r18.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in bns)


def test_resnet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="4 positive"):
        ResNet(BasicBlock, (2, 2, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="BasicBlock or Bottleneck"):
        ResNet(nn.Conv2d, (2, 2, 2, 2))  # type: ignore[arg-type]
