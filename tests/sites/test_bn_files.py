import json
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import shiftbn as sb
import shiftbn._io as io_mod
import shiftbn.sites.files as files_mod
from tests.helpers import reference_moments

SITES = [f"site_{k}" for k in "abcde"]


def _model(width=4):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 3, 1),
                      nn.BatchNorm2d(3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():  # stored statistics of their own, so eval-mode collection is not trivial
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
    return m.eval()


def _sites(n_per=(7, 12, 5, 9, 16)):
    """Five sites of different sizes and offsets (up to 300: the float64 merge must stay exact)."""
    g = torch.Generator().manual_seed(1)
    xs, src = [], []
    for k, (name, n) in enumerate(zip(SITES[:len(n_per)], n_per, strict=True)):
        xs.append(torch.randn(n, 2, 6, 6, generator=g) * (1 + k) + 75.0 * k)
        src += [name] * n
    x = torch.cat(xs)
    return sb.SourceTaggedDataset(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), src)


def _rel_close(a, b, rtol=1e-12):
    scale = max(np.max(np.abs(b)), 1e-300)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def test_five_site_files_merge_to_one_pass_over_the_union(tmp_path):
    model, ds = _model(), _sites()
    paths = []
    for s in SITES:  # each site alone, as it would on its own machine
        st = sb.collect_stats(model, ds.subset(s), mode="eval", batch_size=4, progress=False)
        paths.append(sb.sites.save_stats(st, tmp_path / f"{s}.stats", model=model))
    merged = sb.sites.merge_stats(*paths, model=model)
    assert list(merged) == SITES and merged.mode == "eval"
    union = sb.collect_stats(model, ds, by_source=False, mode="eval", batch_size=5, progress=False)["pooled"]
    pooled = merged.pooled()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    ref = reference_moments(model, [x], bn_train=False)  # independent float64 numpy reference
    assert pooled.num_samples == union.num_samples == len(ds) == 49
    assert list(pooled.layers) == list(union.layers) == ["1", "4", "8"]
    for k in pooled.layers:
        assert pooled[k].count == union[k].count == ref[k][0]
        _rel_close(pooled[k].mean, union[k].mean)
        _rel_close(pooled[k].var, union[k].var)
        _rel_close(pooled[k].mean, ref[k][1])
        _rel_close(pooled[k].var, ref[k][2])
    assert np.abs(pooled["1"].mean).max() > 50  # the offsets reached the first layer: the test can fail


@pytest.mark.parametrize("mode", ["batch", "sequential", "eval"])
def test_pooling_is_exact_where_the_batches_are_the_same(tmp_path, mode):
    """The contract of ``merge`` / ``--pool``: site files merge to exactly what one run over the union
    gives per source, in every mode; pooled, that equals one pass over the union in mixed batches in eval
    mode, and at the first BN layer in every mode; deeper layers differ in batch and sequential mode, and
    agree again when the one pass uses the very same single-source batches."""
    model, ds = _model(), _sites((8, 12, 6))
    paths = [sb.sites.save_stats(sb.collect_stats(model, ds.subset(s), mode=mode, batch_size=4, progress=False),
                           tmp_path / f"{s}.stats", model=model) for s in SITES[:3]]
    merged = sb.sites.merge_stats(*paths, model=model)
    per_source = sb.collect_stats(model, ds, mode=mode, batch_size=4, progress=False)
    for s in SITES[:3]:  # a site's batches do not depend on the other sites in the data
        for k in per_source[s].layers:
            _rel_close(merged[s][k].mean, per_source[s][k].mean)
            _rel_close(merged[s][k].var, per_source[s][k].var)
    pooled = merged.pooled()
    mixed = sb.collect_stats(model, ds, by_source=False, mode=mode, batch_size=4, progress=False)["pooled"]
    for k in pooled.layers:
        exact = mode == "eval" or k == "1"
        gap = np.abs(pooled[k].var - mixed[k].var).max() / np.abs(mixed[k].var).max()
        assert (gap < 1e-12) if exact else (gap > 1e-4), (k, gap)
    sampler = sb.SourceBatchSampler(ds.source_ids, 4, mode="single", seed=0)
    same = sb.collect_stats(model, ds, sampler=sampler, mode=mode, progress=False)
    one_pass = sb.collect_stats(model, ds, sampler=sampler, by_source=False, mode=mode, progress=False)["pooled"]
    for k in pooled.layers:
        if mode != "sequential":  # sequential normalizes the one pass with pooled statistics, the sites with theirs
            _rel_close(same.pooled()[k].mean, one_pass[k].mean)
            _rel_close(same.pooled()[k].var, one_pass[k].var)


def _two_sources(model):
    ds = _sites((6, 10))
    return sb.collect_stats(model, ds.subset(SITES[:2]), batch_size=4, progress=False)


def test_round_trip_is_bit_exact_and_deterministic(tmp_path):
    model = _model()
    st = _two_sources(model)
    st.passes = 3
    p = sb.sites.save_stats(st, tmp_path / "a.stats", model=model, extra={"site": "x", "n": [1, 2]})
    back = sb.sites.read_stats(p, model=model)
    assert list(back) == list(st) and back.mode == st.mode and back.passes == 3
    for name in st:
        assert back[name].num_samples == st[name].num_samples
        assert list(back[name].layers) == list(st[name].layers)
        for k, m in st[name].layers.items():
            assert back[name][k].count == m.count
            assert back[name][k].mean.dtype == np.float64
            assert back[name][k].mean.tobytes() == m.mean.tobytes() and back[name][k].m2.tobytes() == m.m2.tobytes()
    header = sb.sites.read_stats_header(p)
    assert header.sources == {n: st[n].num_samples for n in st} and header.extra == {"site": "x", "n": [1, 2]}
    assert header.fingerprint == sb.sites.model_fingerprint(model)
    p2 = sb.sites.save_stats(back, tmp_path / "b.stats", model=model, extra={"site": "x", "n": [1, 2]})
    assert p2.read_bytes() == p.read_bytes()


def test_a_bnstats_is_stored_under_its_source_name(tmp_path):
    model = _model()
    bn = _two_sources(model).pooled()
    back = sb.sites.read_stats(sb.sites.save_stats(bn, tmp_path / "p.stats", model=model, source="hospital_3"))
    assert list(back) == ["hospital_3"] and back["hospital_3"]["4"].count == bn["4"].count
    with pytest.raises(ValueError, match="renames a single source"):
        sb.sites.save_stats(_two_sources(model), tmp_path / "q.stats", model=model, source="x")
    with pytest.raises(TypeError, match="not sample moments"):
        sb.sites.save_stats(sb.SourceStats({"a": sb.buffer_stats(model)}), tmp_path / "q.stats", model=model)
    with pytest.raises(TypeError, match="JSON-serializable"):
        sb.sites.save_stats(bn, tmp_path / "q.stats", model=model, extra={"x": object()})
    assert not (tmp_path / "q.stats").exists()


class _Renamed(nn.Module):
    def __init__(self):
        super().__init__()
        m = _model()
        self.body = nn.Sequential(OrderedDict((f"l{i}", mod) for i, mod in enumerate(m)))

    def forward(self, x):
        return self.body(x)


class _Wrapped(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("other, field", [
    (lambda: _perturbed(), r"weights differ .*tensor '3\.weight' values"),
    (lambda: _Renamed(), r"BN layer names differ: in the file only \['1', '4', '8'\]"),
    (lambda: _model(width=5), r"BN layer '1': num_features 4 in the file, 5 in the model"),
    (lambda: _Wrapped(_model()), r"BN layer names differ.*ddp_model\.module"),
])
def test_statistics_of_another_model_are_refused_naming_the_field(tmp_path, other, field):
    model = _model()
    p = sb.sites.save_stats(_two_sources(model), tmp_path / "a.stats", model=model)
    with pytest.raises(ValueError, match="another model: " + field):
        sb.sites.read_stats(p, model=other())
    with pytest.raises(ValueError, match="another model"):
        sb.sites.merge_stats(p, model=other())


def _perturbed():
    m = _model()
    with torch.no_grad():
        m[3].weight[0, 0] += 1e-6
    return m


def test_a_recalibrated_model_still_matches_its_statistics(tmp_path):
    model = _model()
    st = _two_sources(model)
    p = sb.sites.save_stats(st, tmp_path / "a.stats", model=model)
    sb.load_stats(model, st["site_b"])  # BN running statistics are not part of the fingerprint
    model.train()
    assert sb.sites.read_stats(p, model=model)["site_b"]["1"].count == st["site_b"]["1"].count
    fp = sb.sites.model_fingerprint(model)
    assert not any("running" in t["name"] or "num_batches" in t["name"] for t in fp["tensors"])
    assert {"1.weight", "1.bias", "0.weight"} <= {t["name"] for t in fp["tensors"]}


def test_another_format_version_is_refused(tmp_path, monkeypatch):
    model = _model()
    st = _two_sources(model)
    for version, fix in ((2, "upgrade shiftbn"), (0, "export the statistics again")):
        monkeypatch.setattr(files_mod, "FORMAT_VERSION", version)
        p = sb.sites.save_stats(st, tmp_path / f"v{version}.stats", model=model)
        monkeypatch.setattr(files_mod, "FORMAT_VERSION", 1)
        with pytest.raises(ValueError, match=f"format version {version}.*reads version 1: {fix}"):
            sb.sites.read_stats(p)


def test_truncated_and_flipped_files_are_refused(tmp_path):
    model = _model()
    p = sb.sites.save_stats(_two_sources(model), tmp_path / "a.stats", model=model)
    data = p.read_bytes()
    bad = tmp_path / "bad.stats"
    for cut in (0, 3, 8, 20, len(data) // 2, len(data) - 8, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a shiftbn statistics file|truncated|damaged"):
            sb.sites.read_stats(bad)
    positions = sorted(set(range(0, len(data), 5)) | set(range(len(data) - 64, len(data))))
    for i in positions:  # header (length, layout, shiftbn JSON) and arrays: a flip anywhere is caught
        flipped = bytearray(data)
        flipped[i] ^= 0x01 if i % 2 else 0xFF
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ValueError):
            sb.sites.read_stats(bad)
    bad.write_bytes(data + b"\0")
    with pytest.raises(ValueError, match="damaged or truncated"):
        sb.sites.read_stats(bad)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_is_never_used(tmp_path, monkeypatch):
    model = _model()
    good = sb.sites.save_stats(_two_sources(model), tmp_path / "a.stats", model=model)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.stats"
    evil.write_bytes(pickle.dumps({"x": _Payload(marker)}, protocol=2))
    with pytest.raises(ValueError, match="pickle"):
        sb.sites.read_stats(evil)
    torch.save({"x": torch.zeros(2)}, tmp_path / "t.stats")
    with pytest.raises(ValueError, match="pickle or torch.save"):
        sb.sites.read_stats(tmp_path / "t.stats")
    (tmp_path / "s.json").write_text(json.dumps(_two_sources(model).to_dict()))
    with pytest.raises(ValueError, match="looks like JSON"):
        sb.sites.read_stats(tmp_path / "s.json")

    def refuse(*a, **k):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for _ in range(2):  # the valid file still reads, with every unpickler disabled
        assert len(sb.sites.read_stats(good, model=model)) == 2
        with pytest.raises(ValueError):
            sb.sites.read_stats(evil)
    assert not marker.exists()


def test_min_count_refuses_small_sources(tmp_path):
    model = _model()
    st = _two_sources(model)  # 6 and 10 samples
    with pytest.raises(ValueError, match=r"\{'site_a': 6\} hold fewer than min_count 7 samples"):
        sb.sites.save_stats(st, tmp_path / "a.stats", model=model, min_count=7)
    assert not (tmp_path / "a.stats").exists()
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="min_count must be a whole number"):
            sb.sites.save_stats(st, tmp_path / "a.stats", model=model, min_count=bad)
    p = sb.sites.save_stats(st, tmp_path / "a.stats", model=model, min_count=6)
    assert sb.sites.read_stats_header(p).min_count == 6


def test_merge_rules(tmp_path):
    model = _model()
    st = _two_sources(model)
    a = sb.sites.save_stats(sb.SourceStats({"site_a": st["site_a"]}), tmp_path / "a.stats", model=model)
    a2 = sb.sites.save_stats(sb.SourceStats({"site_a": st["site_b"]}), tmp_path / "a2.stats", model=model)
    with pytest.raises(ValueError, match=r"source 'site_a' is in both .*a\.stats and .*a2\.stats"):
        sb.sites.merge_stats(a, a2)
    both = sb.sites.merge_stats([a, a2], duplicates="merge")["site_a"]  # a list works too
    expect = st["site_a"].merge(st["site_b"])
    assert both.num_samples == 16
    for k in expect.layers:
        assert both[k].mean.tobytes() == expect[k].mean.tobytes()
    other = sb.sites.save_stats(sb.SourceStats({"site_c": st["site_b"]}), tmp_path / "c.stats", model=_perturbed())
    with pytest.raises(ValueError, match=r"different models.*tensor '3\.weight' values"):
        sb.sites.merge_stats(a, other)
    ev = sb.sites.save_stats(sb.SourceStats({"site_e": st["site_b"]}, mode="eval"), tmp_path / "e.stats", model=model)
    with pytest.raises(ValueError, match="different modes"):
        sb.sites.merge_stats(a, ev)
    with pytest.raises(TypeError, match="wrap BNStats"):
        sb.sites.merge_stats(a, st["site_b"])
    mixed = sb.sites.merge_stats(a, sb.SourceStats({"site_z": st["site_b"]}))  # in memory: trusted as it is
    assert list(mixed) == ["site_a", "site_z"]
    with pytest.raises(FileNotFoundError, match="statistics file not found"):
        sb.sites.merge_stats(tmp_path / "nope.stats")
    with pytest.raises(ValueError, match="is a folder"):
        sb.sites.read_stats(tmp_path)


def test_an_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    model = _model()
    st = _two_sources(model)
    p = sb.sites.save_stats(st, tmp_path / "a.stats", model=model)
    before = p.read_bytes()

    def crash(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(io_mod.os, "fsync", crash)  # after the bytes went to the temp file, before the rename
    with pytest.raises(OSError, match="disk full"):
        sb.sites.save_stats(st, tmp_path / "a.stats", model=model, extra={"new": True})
    with pytest.raises(OSError, match="disk full"):
        sb.sites.save_stats(st, tmp_path / "b.stats", model=model)
    assert p.read_bytes() == before and sb.sites.read_stats_header(p).extra is None
    assert sorted(os.listdir(tmp_path)) == ["a.stats"]
