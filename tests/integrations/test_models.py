"""timm, torchvision and MONAI models: exact statistics, restored models, matrix, per-site routing,
export and statistics files. Random-init models, 32x32 (3-D: 16^3) inputs, a few samples per source.

Every model gets the cheap checks; the costly ones (the all-layer reference, the matrix, export) run on
one model per library and kind of BN layer (``DEEP``, ``MATRIX`` and the export parameters)."""

import copy

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import TensorDataset

import shiftbn as sb
from tests.helpers import assert_same_state, moments_of, reference_moments, state_of
from tests.integrations._lib import need

N_PER_SOURCE, BATCH = 8, 4


def _tv(name):
    def make():
        return need("torchvision").models.get_model(name, weights=None, num_classes=3)
    return make


def _timm(name, split_bn=False):
    def make():
        timm = need("timm")
        model = timm.create_model(name, pretrained=False, num_classes=3)
        if split_bn:  # AugMix --split-bn: every BN becomes SplitBatchNorm2d with aux_bn layers
            from timm.layers import convert_splitbn_model

            model = convert_splitbn_model(model, 2)
        return model
    return make


def _monai_densenet():
    return need("monai").networks.nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=3)


def _monai_unet3d():
    return need("monai").networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16),
                                            strides=(2, 2), num_res_units=1, norm="batch")


# name -> (factory, input shape of one sample)
MODELS = {
    "torchvision:resnet18": (_tv("resnet18"), (3, 32, 32)),
    "torchvision:densenet121": (_tv("densenet121"), (3, 32, 32)),
    "torchvision:efficientnet_b0": (_tv("efficientnet_b0"), (3, 32, 32)),
    "torchvision:mobilenet_v3_small": (_tv("mobilenet_v3_small"), (3, 32, 32)),
    "timm:resnet50d": (_timm("resnet50d"), (3, 32, 32)),
    "timm:efficientnet_b0": (_timm("efficientnet_b0"), (3, 32, 32)),
    "timm:regnety_002": (_timm("regnety_002"), (3, 32, 32)),
    "timm:resnet18+splitbn": (_timm("resnet18", split_bn=True), (3, 32, 32)),
    "monai:DenseNet121": (_monai_densenet, (3, 32, 32)),
    "monai:UNet-3d": (_monai_unet3d, (1, 16, 16, 16)),
}
# the all-layer reference: plain torch BN (torchvision), timm's BatchNormAct2d (a subclass with its own
# forward) and SplitBatchNorm2d, MONAI's 3-D BN; the other models check the first layer and the layer set
DEEP = {"torchvision:resnet18", "timm:efficientnet_b0", "timm:resnet18+splitbn", "monai:UNet-3d"}
# the matrix once per library (a segmentation UNet has no classification matrix)
MATRIX = {"torchvision:resnet18", "timm:efficientnet_b0", "monai:DenseNet121"}


def _data(shape, classes=3):
    """Two sources (the second shifted), labels 0..classes-1, as a SourceTaggedDataset and as
    single-source batches ``(x, y, source_id)`` in a fixed order."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * N_PER_SOURCE, *shape, generator=g)
    x[N_PER_SOURCE:] = x[N_PER_SOURCE:] * 1.5 + 0.5
    y = torch.arange(2 * N_PER_SOURCE) % classes
    src = np.repeat([0, 1], N_PER_SOURCE)
    ds = sb.SourceTaggedDataset(TensorDataset(x, y), src, source_names=["site_a", "site_b"])
    batches = [(x[i:i + BATCH], y[i:i + BATCH], torch.full((BATCH,), int(src[i])))
               for i in range(0, len(x), BATCH)]
    return ds, batches


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    make, shape = MODELS[request.param]
    torch.manual_seed(0)
    model = make().eval()
    ds, batches = _data(shape)
    stats = sb.collect_stats(model, batches, source_names=list(ds.source_names), progress=False)
    return request.param, model, ds, batches, stats


def test_statistics_equal_an_independent_float64_reference(case):
    name, model, ds, batches, stats = case
    reference = _without_split(model) if "splitbn" in name else model
    for sid, source in enumerate(ds.source_names):
        xs = [b[0] for b in batches if int(b[2][0]) == sid]
        got = stats[source]
        if name in DEEP:
            ref = reference_moments(reference, xs, bn_train=True)
            called, (first, (n, mean, var)) = list(ref), next(iter(ref.items()))
        else:
            called, (first, (n, mean, var)) = _called_and_first(reference, xs)
        assert got.layers[first].count == n
        np.testing.assert_allclose(got.layers[first].mean, mean, rtol=0, atol=1e-12 * (1 + np.abs(mean).max()))
        np.testing.assert_allclose(got.layers[first].var, var, rtol=1e-12, atol=1e-14)
        missing = [k for k in called if k not in got.layers]
        assert not missing, f"{name}: BN layers called but not measured: {missing}"
        if name in DEEP:
            for layer, (_n, mean, var) in ref.items():  # deeper layers: float32 BN outputs differ in the last bits
                np.testing.assert_allclose(got.layers[layer].mean, mean, rtol=1e-3,
                                           atol=1e-4 * (1 + np.sqrt(var).max()))
                np.testing.assert_allclose(got.layers[layer].var, var, rtol=1e-3, atol=1e-6 * (1 + var.max()))


def _called_and_first(model, xs):
    """The names of the BN layers a train-mode forward of ``xs`` calls, in call order, and the float64
    (count, mean, var) of the first one's input: the cheap part of ``reference_moments``."""
    m = copy.deepcopy(model).eval()
    called, first = [], []
    hooks = []

    def record(module, args, name):
        if name not in called:
            called.append(name)
        if name == called[0]:
            a = args[0].detach().double().numpy()
            first.append(np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]))

    for name, mod in m.named_modules():
        if isinstance(mod, _BatchNorm):
            mod.train(True)
            hooks.append(mod.register_forward_pre_hook(lambda module, args, name=name: record(module, args, name)))
    try:
        with torch.no_grad():
            for x in xs:
                m(x)
    finally:
        for h in hooks:
            h.remove()
    return called, (called[0], moments_of(first))


def _without_split(model):
    """A copy whose SplitBatchNorm2d layers normalize the whole batch in train mode (as they do in eval,
    where their aux_bn layers never run): the reference of the layers a forward calls."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if type(m).__name__ == "SplitBatchNorm2d":
            m.num_splits, m.aux_bn = 1, torch.nn.ModuleList()
    return ref


def test_every_verb_restores_the_model_bit_for_bit(case):
    name, model, ds, batches, stats = case
    before = state_of(model)
    sb.collect_stats(model, ds, batch_size=BATCH, mode="eval", progress=False)
    assert_same_state(model, before)
    with sb.use_stats(model, stats["site_b"]), torch.no_grad():
        model(batches[0][0])
    assert_same_state(model, before)
    unused = "keep" if "splitbn" in name else "refuse"
    sb.sites.per_site_model(model, stats, unused=unused)
    assert_same_state(model, before)
    if name in MATRIX:
        table = sb.cross_source_matrix(model, ds, ["ema", "target"], ["accuracy"], batch_size=BATCH,
                                       progress=False)
        assert_same_state(model, before)
        assert set(table["eval_source"]) == {"site_a", "site_b"} and set(table["strategy"]) == {"ema", "target"}
        assert table["value"].between(0, 1).all()


def test_per_site_model_equals_use_stats(case):
    # in float64: a random-init deep net under batch-mode statistics is chaotic in eval (outputs up to ~1e4),
    # so float32 rounding differences between two correct forwards grow to O(1); in float64 they stay ~1e-13
    # (the statistics are the float32 run's: per_site_model and use_stats both cast them to the buffers' dtype)
    name, model, ds, batches, stats = case
    model = copy.deepcopy(model).double()
    batches = [(x.double(), y, s) for x, y, s in batches]
    routed = sb.sites.per_site_model(model, stats, unused="keep" if "splitbn" in name else "refuse")
    x = torch.cat([batches[0][0][:2], batches[-1][0][:2]])
    sites = ["site_a", "site_a", "site_b", "site_b"]
    with torch.no_grad():
        out = routed(x, site=sites)
        for source, rows in (("site_a", slice(0, 2)), ("site_b", slice(2, 4))):
            with sb.use_stats(model, stats[source]):
                expected = model(x[rows])
            scale = max(1.0, expected.abs().max().item())
            torch.testing.assert_close(out[rows], expected, rtol=0, atol=1e-6 * scale)


def test_splitbn_statistics_refused_with_the_way_out():
    timm = need("timm")
    from timm.layers import convert_splitbn_model

    model = convert_splitbn_model(timm.create_model("resnet18", pretrained=False, num_classes=3), 2).eval()
    _, batches = _data((3, 32, 32))
    stats = sb.collect_stats(model, batches[:1], progress=False)
    with pytest.raises(ValueError, match=r"aux_bn.*no forward called these layers.*unused='keep'"):
        sb.sites.per_site_model(model, stats)


@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:efficientnet_b0"])
def test_exported_per_site_model_equals_eager(name, tmp_path):
    make, shape = MODELS[name]
    model = make().eval()
    ds, batches = _data(shape)
    stats = sb.collect_stats(model, batches, source_names=list(ds.source_names), progress=False)
    routed = sb.sites.per_site_model(model, stats)
    x = torch.cat([batches[0][0][:2], batches[-1][0][:2]])
    ids = torch.tensor([0, 0, 1, 1])
    ep = torch.export.export(routed, (x,), {"site": ids})
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, site=ids), routed(x, site=ids), rtol=1e-6, atol=1e-6)


def test_statistics_files_round_trip_and_are_tied_to_the_model(case, tmp_path):
    _, model, _, _, stats = case
    sb.sites.save_stats(stats, tmp_path / "a.safetensors", model=model)
    back = sb.sites.read_stats(tmp_path / "a.safetensors", model=model)
    for layer, m in stats["site_a"].layers.items():
        np.testing.assert_array_equal(back["site_a"].layers[layer].mean, m.mean)
        np.testing.assert_array_equal(back["site_a"].layers[layer].m2, m.m2)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(p for p in other.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="holds statistics of another model"):
        sb.sites.read_stats(tmp_path / "a.safetensors", model=other)
