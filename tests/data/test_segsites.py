"""Generated segmentation sites: deterministic, the item contract, sites that differ as scanners do."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import shiftbn as sb
from shiftbn.data.segsites import SEG_SITES, SegSite, seg_sites_2d, seg_sites_3d


def _arrays(ds):
    xs, ms, sps = zip(*[(x, y["mask"], y["spacing"]) for x, y, _ in (ds[i] for i in range(len(ds)))], strict=True)
    return torch.stack(xs), torch.stack(ms), torch.stack(sps)


def test_same_seed_same_cases_and_case_k_does_not_depend_on_n():
    a, b = _arrays(seg_sites_2d(n=3, size=16, seed=5)), _arrays(seg_sites_2d(n=3, size=16, seed=5))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    other = _arrays(seg_sites_2d(n=3, size=16, seed=6))
    assert not torch.equal(a[0], other[0])
    more = seg_sites_2d(n=5, size=16, seed=5)
    assert torch.equal(more[5][0], a[0][3])  # site_b's first case: position 3 with n=3, 5 with n=5


@pytest.mark.parametrize(("loader", "spatial", "k"), [("seg-sites-2d", (16, 16), 2), ("seg-sites-3d", (8, 8, 8), 3)])
def test_items_follow_the_segmentation_contract(loader, spatial, k):
    ds = sb.load(loader, n=2, size=spatial[0], sites=3)
    assert ds.labels is None and ds.class_names == ("background", "organ", "lesion")
    assert ds.source_names == ("site_a", "site_b", "site_c") and ds.source_word == "site"
    x, y, s = ds[4]
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, *spatial)
    assert y["mask"].dtype == torch.int64 and tuple(y["mask"].shape) == spatial
    assert y["spacing"].dtype == torch.float64 and y["spacing"].tolist() == list(SEG_SITES["site_c"].spacing_for(k))
    assert s == 2 and ds.metadata["case"].tolist()[4] == "site_c_000"
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert tuple(batch[1]["mask"].shape) == (3, *spatial) and tuple(batch[1]["spacing"].shape) == (3, k)
    parts = ds.split(fractions=(0.5, 0.0, 0.5))
    assert len(parts.train) + len(parts.test) == len(ds)


def test_sites_differ_in_intensity_statistics_and_every_site_has_both_structures():
    ds = seg_sites_3d(n=6, size=16)
    x, m, sp = _arrays(ds)
    means = [x[ds.source_ids == s].mean().item() for s in range(4)]
    stds = [x[ds.source_ids == s].std().item() for s in range(4)]
    assert min(abs(a - b) for i, a in enumerate(means) for b in means[i + 1:]) > 0.05, means
    assert max(stds) / min(stds) > 2, stds
    for s in range(4):
        masks = m[ds.source_ids == s]
        assert (masks == 1).any() and (masks == 2).any(), ds.source_names[s]
    assert len({tuple(v) for v in sp.tolist()}) == 4  # one spacing per site
    present = [(m == c).flatten(1).any(1) for c in (1, 2)]
    assert not all(bool(p.all()) for p in present)  # some case lacks a structure


def test_structure_size_follows_the_spacing_and_mm_stays_put():
    # the same anatomy seen with a 1.5x larger voxel covers fewer voxels
    fine, coarse = SegSite(spacing=(1.0, 1.0, 1.0)), SegSite(spacing=(1.5, 1.5, 1.5))
    a = seg_sites_2d(n=20, size=32, sites={"fine": fine})
    b = seg_sites_2d(n=20, size=32, sites={"fine": fine, "coarse": coarse})
    fg = [(ds.base.masks[ds.source_ids == ds.source_id(name)] > 0).float().mean().item()
          for ds, name in ((a, "fine"), (b, "coarse"))]
    assert fg[1] < 0.7 * fg[0]


def test_bad_parameters_are_refused_naming_them():
    with pytest.raises(ValueError, match="sites must be 1 to 6"):
        seg_sites_2d(sites=7)
    with pytest.raises(ValueError, match="size must be an integer >= 8"):
        seg_sites_3d(size=4)
    with pytest.raises(ValueError, match="gamma"):
        SegSite(gamma=0)
    with pytest.raises(ValueError, match="spacing"):
        SegSite(spacing=(1.0, 1.0))
    with pytest.raises(TypeError, match="SegSite"):
        seg_sites_2d(sites={"a": 3})


def test_built_in_names_and_np_free_of_global_rng():
    state = np.random.get_state()[1].copy(), torch.random.get_rng_state().clone()
    sb.load("seg-sites-2d", n=1, size=8)
    assert np.array_equal(np.random.get_state()[1], state[0]) and torch.equal(torch.random.get_rng_state(), state[1])
    assert {"seg-sites-2d", "seg-sites-3d"} <= set(sb.data.DATASETS)
