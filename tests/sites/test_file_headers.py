"""Statistics and drift-monitor files whose header was edited and re-hashed: a valid checksum proves only
that nothing changed since the last hash, so every field a later verb uses is checked on reading too.

The fuzz tests write a valid file, change one header field (or array) to a value shiftbn never writes,
recompute the checksum so that it is valid again, and require the reader to refuse the file.
"""

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load, save
from torch import nn

import shiftbn as sb
import shiftbn.sites.files as files_mod
from shiftbn.bn import COLLECT_MODES, split_site
from shiftbn.sites import drift_file
from tests.timeouts import deadline

FUZZ = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).eval()


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 1, 6, 6, generator=g)
    return sb.SourceTaggedDataset(torch.utils.data.TensorDataset(x, torch.arange(10) % 3), ["a"] * 4 + ["b"] * 6)


def parts(path):
    """The shiftbn header (a dict) and the arrays of a safetensors file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8:8 + n])["__metadata__"]["shiftbn"]), load(data)


def rewrite(path, meta, arrays, digest):
    """Write ``meta`` and ``arrays`` to ``path`` with a checksum recomputed by ``digest``: a valid file."""
    meta = {k: v for k, v in meta.items() if k != "sha256"}
    meta["sha256"] = digest(meta, arrays)
    path.write_bytes(save(arrays, metadata={"shiftbn": json.dumps(meta)}))
    return path


def forge_stats(path, edit, out=None):
    """``path`` with ``edit(meta, arrays)`` applied and the checksum recomputed (to ``out``, default in place)."""
    meta, arrays = parts(path)
    edit(meta, arrays)
    return rewrite(out or path, meta, arrays, files_mod._digest)


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    model = _model()
    path = tmp_path_factory.mktemp("stats") / "two.stats"
    sb.sites.save_stats(sb.collect_stats(model, _data(), batch_size=4, progress=False), path, model=model, min_count=4)
    return path


@pytest.fixture(scope="module")
def monitor_file(tmp_path_factory):
    model = _model()
    path = tmp_path_factory.mktemp("monitor") / "ref.monitor"
    sb.sites.DriftMonitor(model, _data().subset("b"), labels=np.arange(6) % 3, n_null=20).save(path)
    return path


def test_layer_names_that_disagree_with_the_fingerprint_are_refused(stats_file, tmp_path):
    """Issue #20 item 4: a renamed layer passed every check and left that layer uncalibrated."""
    def rename(meta, arrays):
        for s in meta["sources"]:
            s["layers"][1][0] = "4x"

    bad = forge_stats(stats_file, rename, tmp_path / "renamed.stats")
    for read in (sb.sites.read_stats, sb.sites.read_stats_header, sb.sites.merge_stats):
        with pytest.raises(ValueError, match=r"renamed\.stats is malformed: source 'a' layer '4x' is no BN layer of "
                                             r"the model in its fingerprint \(BN layers \['1', '4'\]\)"):
            read(bad)

    def widen(meta, arrays):  # the arrays of layer '4' get a third channel; the model's layer has 2
        for k in ("0/1/mean", "0/1/m2"):
            arrays[k] = np.append(arrays[k], 0.5)

    with pytest.raises(ValueError, match=r"source 'a' layer '4' has 3 channels; the model's layer '4' has 2"):
        sb.sites.read_stats(forge_stats(stats_file, widen, tmp_path / "wide.stats"))
    assert len(sb.sites.read_stats(forge_stats(stats_file, lambda m, a: None, tmp_path / "same.stats"))) == 2


def test_save_stats_refuses_statistics_that_do_not_fit_the_model(tmp_path):
    model = _model()
    stats = sb.collect_stats(model, _data(), batch_size=4, progress=False)
    other = nn.Sequential(nn.Conv2d(1, 5, 3), nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match=r"cannot write .*x\.stats: source 'a' layer '1' has 3 channels; the "
                                         r"model's layer '1' has 5"):
        sb.sites.save_stats(stats, tmp_path / "x.stats", model=other)
    assert not (tmp_path / "x.stats").exists()


def test_a_fifo_as_statistics_file_is_refused_without_waiting(stats_file, tmp_path):
    fifo = tmp_path / "site.stats"
    os.mkfifo(fifo)
    with deadline(20):
        for read in (sb.sites.read_stats, sb.sites.merge_stats):
            with pytest.raises(ValueError, match=r"site\.stats is a FIFO \(named pipe\), not a regular file"):
                read(fifo)
        with pytest.raises(ValueError, match="is a character device"):
            sb.sites.read_stats("/dev/zero")


# --- fuzz: forged fields of a statistics header --------------------------------------------------------------

_not_count = st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.booleans(), st.none(),
                       st.text(max_size=3), st.lists(st.integers(), max_size=2))
_not_text = st.one_of(st.integers(), st.floats(allow_nan=True), st.none(), st.lists(st.text(max_size=2), max_size=2))


def _new_key(names):
    """Layer keys that name no BN layer of ``names`` (neither ``name`` nor a call site ``name@k``)."""
    return st.text(min_size=1, max_size=6).filter(lambda k: split_site(k)[0] not in names)


@st.composite
def stats_forgeries(draw):
    """``(what, edit)``: an edit of a statistics file's header or arrays that no shiftbn writer makes."""
    i, j = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    kind = draw(st.sampled_from(["num_samples", "num_samples_high", "count", "key", "key_twice", "passes",
                                 "mode", "min_count", "min_count_high", "num_features", "bn_name", "bn_twice",
                                 "source_name", "source_twice", "no_source", "no_layer", "channels",
                                 "format_version", "version_text"]))
    value = draw(_not_count)
    text = draw(_not_text)
    key = draw(_new_key({"1", "4"}))
    delta = draw(st.integers(1, 1000))
    size = draw(st.integers(1, 6).filter(lambda c: c not in (2, 3)))

    def edit(meta, arrays):
        src, fp = meta["sources"][i], meta["fingerprint"]
        if kind == "num_samples":
            src["num_samples"] = value
        elif kind == "num_samples_high":  # more samples than the layers counted values
            src["num_samples"] = sum(c for _, c in src["layers"]) + delta
        elif kind == "count":
            src["layers"][j][1] = value
        elif kind == "key":
            src["layers"][j][0] = key
        elif kind == "key_twice":
            src["layers"][j][0] = src["layers"][1 - j][0]
        elif kind == "passes":
            meta["passes"] = value
        elif kind == "mode":
            meta["mode"] = draw_mode
        elif kind == "min_count":
            meta["min_count"] = value if value is not None else 0
        elif kind == "min_count_high":  # a floor the file's own sources do not meet
            meta["min_count"] = min(s["num_samples"] for s in meta["sources"]) + delta
        elif kind == "num_features":
            fp["bn_layers"][j]["num_features"] = value if value is not None else size
        elif kind == "bn_name":
            fp["bn_layers"][j]["name"] = key
        elif kind == "bn_twice":
            fp["bn_layers"][j]["name"] = fp["bn_layers"][1 - j]["name"]
        elif kind == "source_name":
            src["name"] = text if text is not None else ""
        elif kind == "source_twice":
            src["name"] = meta["sources"][1 - i]["name"]
        elif kind == "no_source":
            meta["sources"] = []
        elif kind == "no_layer":
            for k in (f"{i}/0/mean", f"{i}/0/m2", f"{i}/1/mean", f"{i}/1/m2"):
                del arrays[k]
            src["layers"] = []
        elif kind == "channels":  # both arrays of one layer resized alike
            for part in ("mean", "m2"):
                arrays[f"{i}/{j}/{part}"] = np.full(size, 0.5)
        elif kind == "format_version":
            meta["format_version"] = value if value != 1 else 0
        elif kind == "version_text":
            meta["shiftbn_version"] = text

    draw_mode = draw(st.one_of(st.text(max_size=10).filter(lambda m: m not in COLLECT_MODES), _not_text))
    return kind, edit


@FUZZ
@given(forgery=stats_forgeries())
def test_fuzz_no_forged_statistics_header_is_accepted(stats_file, tmp_path, forgery):
    kind, edit = forgery
    bad = forge_stats(stats_file, edit, tmp_path / "forged.stats")
    assert bad.read_bytes() != stats_file.read_bytes()
    for read in (sb.sites.read_stats_header, sb.sites.merge_stats):  # merge refuses what recalibrate would
        with pytest.raises(ValueError):
            read(bad)


# --- fuzz: forged fields of a drift-monitor header -----------------------------------------------------------

def forge_monitor(path, edit, out):
    meta, arrays = parts(path)
    edit(meta, arrays)
    return rewrite(out, meta, arrays, drift_file._digest)


@st.composite
def monitor_forgeries(draw):
    """``(what, edit)``: an edit of a monitor file's header that no shiftbn writer makes."""
    kind = draw(st.sampled_from(["alpha", "alpha_range", "n_null", "seed", "n_reference", "layer", "layer_twice",
                                 "no_layers", "atc_threshold", "atc_accuracy", "atc_n", "atc_score", "atc_keys",
                                 "num_features", "version"]))
    anything = draw(st.one_of(_not_count, _not_text))
    alpha = draw(st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(float("nan")),
                           st.integers(), st.booleans(), st.none(), st.text(max_size=3)))
    small = draw(st.integers(max_value=19))
    key = draw(_new_key({"1", "4"}))
    delta = draw(st.integers(-5, 5).filter(bool))
    bad_float = draw(st.one_of(st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.text(max_size=3),
                               st.none(), st.booleans()))
    accuracy = draw(st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1 + 1e-9), st.just(float("nan"))))
    j = draw(st.integers(0, 1))

    def edit(meta, arrays):
        if kind == "alpha":
            meta["alpha"] = anything if not isinstance(anything, float) else alpha
        elif kind == "alpha_range":
            meta["alpha"] = alpha
        elif kind == "n_null":
            meta["n_null"] = small
        elif kind == "seed":
            meta["seed"] = -1 - abs(small) if isinstance(anything, int) else anything
        elif kind == "n_reference":
            meta["n_reference"] = meta["n_reference"] + delta
        elif kind == "layer":
            meta["layers"][j] = key
        elif kind == "layer_twice":
            meta["layers"][j] = meta["layers"][1 - j]
        elif kind == "no_layers":
            meta["layers"] = [] if isinstance(anything, list) else anything
        elif kind == "atc_threshold":
            meta["atc"]["threshold"] = bad_float
        elif kind == "atc_accuracy":
            meta["atc"]["accuracy"] = accuracy
        elif kind == "atc_n":
            meta["atc"]["n"] = meta["atc"]["n"] + delta
        elif kind == "atc_score":
            meta["atc"]["score"] = key
        elif kind == "atc_keys":
            del meta["atc"][sorted(meta["atc"])[j]]
        elif kind == "num_features":
            meta["model"]["bn_layers"][j]["num_features"] += delta if delta > 0 else 1
        elif kind == "version":
            meta["version"] = anything if anything != 3 else 2

    return kind, edit


@FUZZ
@given(forgery=monitor_forgeries())
def test_fuzz_no_forged_monitor_header_is_accepted(monitor_file, tmp_path, forgery):
    kind, edit = forgery
    bad = forge_monitor(monitor_file, edit, tmp_path / "forged.monitor")
    assert bad.read_bytes() != monitor_file.read_bytes()
    with pytest.raises(ValueError):
        sb.sites.DriftMonitor.load(_model(), bad)


def test_a_rehashed_monitor_file_with_valid_fields_reads_back(monitor_file, tmp_path):
    """The forging helper itself writes files the reader accepts: the fuzz refusals are the fields' doing."""
    def half_alpha(meta, arrays):
        meta["alpha"] = 0.025

    forged = forge_monitor(monitor_file, half_alpha, tmp_path / "a.monitor")
    assert sb.sites.DriftMonitor.load(_model(), forged).alpha == 0.025
