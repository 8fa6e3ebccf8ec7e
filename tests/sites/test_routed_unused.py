"""``per_site_model(..., unused=...)``: BN layers no forward calls (timm's SplitBN ``aux_bn``)."""

import pytest
import torch
from torch import nn

from shiftbn.bn import collect_stats, use_stats
from shiftbn.sites import per_site_model


class WithAux(nn.Module):
    """A BN used only in training (like timm's SplitBatchNorm2d aux_bn): never called in a forward here."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.aux_bn = nn.BatchNorm2d(3)
        self.aux_bn.running_mean.fill_(0.25)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 2, 3, 3, generator=g) + s, torch.zeros(6), torch.full((6,), s)) for s in (0, 1)]
    model = WithAux().eval()
    return model, collect_stats(model, batches, source_names=["a", "b"], progress=False), batches


def test_statistics_without_the_unused_layer_are_refused_with_the_way_out(setup):
    model, stats, _ = setup
    with pytest.raises(ValueError, match=r"lack BN layer\(s\) \['aux_bn'\].*no forward called these layers.*"
                                         r"unused='keep'"):
        per_site_model(model, stats)
    with pytest.raises(ValueError, match="unused must be 'refuse' or 'keep'"):
        per_site_model(model, stats, unused="drop")


def test_keep_gives_every_site_the_unused_layers_running_stats_and_routes_the_others_exactly(setup):
    model, stats, batches = setup
    routed = per_site_model(model, stats, unused="keep")
    x = torch.cat([b[0][:3] for b in batches])
    sites = ["a"] * 3 + ["b"] * 3
    out = routed(x, site=sites)
    for name, rows in (("a", slice(0, 3)), ("b", slice(3, 6))):
        with use_stats(model, stats[name]), torch.no_grad():
            torch.testing.assert_close(out[rows], model(x[rows]), rtol=0, atol=1e-6)
    aux = dict(routed.routed_layers())["aux_bn"]
    assert torch.equal(aux.site_mean, torch.full((2, 3), 0.25))
