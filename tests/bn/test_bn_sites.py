import pytest

import shiftbn as sb
from shiftbn.bn import site_key, split_site
from shiftbn.studies.models import SharedHeadNet


@pytest.mark.parametrize("name", ["head_bn", "layer1.0.bn1", "features.8", "<root>", "odd@name", "x@1"])
@pytest.mark.parametrize("k", [0, 1, 12])
def test_site_key_round_trips_names_with_dots(name, k):
    key = site_key(name, k)
    assert key == f"{name}@{k}"
    assert split_site(key) == (name, k)


@pytest.mark.parametrize("key", ["head_bn", "layer1.0.bn1", "odd@name", "a@", "a@-1", "a@1x"])
def test_split_site_of_a_plain_key_has_no_index(key):
    assert split_site(key) == (key, None)


def test_site_key_rejects_bad_arguments():
    with pytest.raises(ValueError, match="call index"):
        site_key("a", -1)
    with pytest.raises(ValueError, match="call index"):
        site_key("a", True)
    with pytest.raises(TypeError, match="str"):
        site_key(3, 0)
    with pytest.raises(TypeError, match="str"):
        split_site(None)


def test_collected_site_keys_split_back_to_the_layer():
    import torch

    model = SharedHeadNet(in_channels=1, width=4)
    g = torch.Generator().manual_seed(0)
    stats = sb.collect_stats(model, [torch.randn(4, 1, 8, 8, generator=g)], by_source=False, progress=False)
    keys = list(stats["pooled"])
    sites = [split_site(k) for k in keys if split_site(k)[1] is not None]
    assert sites == [("head_bn", 0), ("head_bn", 1)]
    assert all(site_key(n, k) in keys for n, k in sites)
