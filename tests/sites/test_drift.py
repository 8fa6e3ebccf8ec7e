"""DriftMonitor: per-sample moments, distances, bootstrap p-values, the monitor file, the CLI, the study summary."""

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from torch import nn

import shiftbn as sb
from shiftbn.cli.main import main
from shiftbn.sites.sample_moments import sample_moments
from shiftbn.studies import drift_summary
from tests.cli.test_cli import _user_project
from tests.helpers import assert_same_state, reference_moments, state_of


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():  # stored statistics that are not the defaults
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _images(n: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 7, 7, generator=g) + offset


def test_sample_moments_give_exact_batch_moments():
    net, x = _net(), _images(40, 0)
    before = state_of(net)
    sm = sample_moments(net, x, batch_size=16)
    assert_same_state(net, before)
    ref = reference_moments(net, [x], bn_train=False)
    for layer in ("1", "4"):
        mean, var = sm.batch_moments(layer, np.ones((1, 40)))
        np.testing.assert_allclose(mean[0], ref[layer][1], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(var[0], ref[layer][2], rtol=1e-9, atol=1e-12)
    w = np.zeros((1, 40))
    w[0, :10] = 1
    sub = reference_moments(net, [x[:10]], bn_train=False)
    np.testing.assert_allclose(sm.batch_moments("4", w)[1][0], sub["4"][2], rtol=1e-9)
    assert sm.logits.shape == (40, 3)


def test_score_distance_equals_stats_shift_w2():
    net = _net()
    mon = sb.sites.DriftMonitor(net, _images(60, 1), n_null=50)
    new = _images(30, 2, offset=0.3)
    res = mon.score(new)
    moments = {}
    for name, x in (("ref", _images(60, 1)), ("new", new)):
        got = reference_moments(net, [x], bn_train=False)
        moments[name] = sb.BNStats({k: sb.bn.Moments(c, m, v * c) for k, (c, m, v) in got.items()}, len(x))
    shift = sb.stats_shift(sb.SourceStats(moments), reference="ref").query("source == 'new'")
    want = shift.set_index("layer")["value"]
    got = res.layers.set_index("layer")["distance"]
    for layer in ("1", "4"):
        assert got[layer] == pytest.approx(want[layer], rel=1e-8)
    assert list(res.layers["layer"]) == ["1", "4"] and res.alert and res.p_value < 0.05
    assert res.layers.notna().all().all()  # one row per layer, every cell a number (no summary row of NaN)
    scale = np.sqrt(mon.reference_var["4"].mean())
    assert res.layers.set_index("layer")["effect"]["4"] == pytest.approx(got["4"] / scale, rel=1e-9)
    assert res.effect == pytest.approx(res.layers["effect"].mean())


def test_p_values_are_uniform_without_shift_and_small_with_one():
    """Repeated draws (a fresh reference and batch each time) from one distribution: KS test against
    uniform at a fixed seed; the same draws shifted by 0.15 alert nearly always."""
    net = _net()
    pool = _images(2000, 3)
    rng = np.random.default_rng(0)
    ps, shifted = [], []
    for i in range(120):
        perm = rng.permutation(len(pool))
        mon = sb.sites.DriftMonitor(net, pool[perm[:80]], n_null=100, seed=i)
        ps.append(mon.score(pool[perm[80:96]]).p_value)
        if i < 30:
            shifted.append(mon.score(pool[perm[80:96]] + 0.15).p_value)
    assert stats.kstest(ps, "uniform").pvalue > 0.05
    assert 0.0 <= np.mean(np.array(ps) < 0.05) <= 0.12
    assert np.mean(np.array(shifted) < 0.05) >= 0.9


def test_monitor_file_round_trips_and_refuses_bad_files(tmp_path):
    net = _net()
    y = np.arange(60) % 3
    mon = sb.sites.DriftMonitor(net, _images(60, 1), labels=y, n_null=60, alpha=0.01, seed=4)
    path = mon.save(tmp_path / "ref.monitor")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    (size,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(json.loads(path.read_bytes()[8:8 + size])["__metadata__"]["shiftbn"])
    assert header["format"] == "shiftbn.drift-monitor" and header["version"] == 3 and header["alpha"] == 0.01
    back = sb.sites.DriftMonitor.load(net, path)
    new = _images(20, 5, offset=0.05)
    a, b = mon.score(new), back.score(new)
    assert a.p_value == b.p_value and a.score == b.score and a.predicted_drop == b.predicted_drop
    pd.testing.assert_frame_equal(a.layers, b.layers)
    bad = tmp_path / "bad.monitor"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="not a shiftbn drift-monitor file.*pickle"):
        sb.sites.DriftMonitor.load(net, bad)
    png = tmp_path / "slide.monitor"  # an image renamed: its first 8 bytes claim a huge header, never read whole
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(1000))
    with pytest.raises(ValueError, match=r"not a shiftbn drift-monitor file.*claim a [\d,]+-byte header"):
        sb.sites.DriftMonitor.load(net, png)
    (tmp_path / "stats.json").write_text('{"mean": [0.0]}')
    with pytest.raises(ValueError, match=r"not a shiftbn drift-monitor file.*looks like JSON\. Write one with Drift"):
        sb.sites.DriftMonitor.load(net, tmp_path / "stats.json")
    (tmp_path / "cut.monitor").write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated"):
        sb.sites.DriftMonitor.load(net, tmp_path / "cut.monitor")
    raw = path.read_bytes().replace(b'\\"version\\": 3', b'\\"version\\": 9')
    (tmp_path / "v9.monitor").write_bytes(raw)
    with pytest.raises(ValueError, match="version 9"):
        sb.sites.DriftMonitor.load(net, tmp_path / "v9.monitor")
    other = nn.Sequential(nn.Flatten(), nn.Linear(49, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="monitor of another model"):
        sb.sites.DriftMonitor.load(other, path)
    retrained = _net()
    with torch.no_grad():
        next(retrained.parameters()).add_(1e-3)  # same layers, other weights
    with pytest.raises(ValueError, match="monitor of another model"):
        sb.sites.DriftMonitor.load(retrained, path)
    damaged = bytearray(path.read_bytes())
    damaged[-3] ^= 0x01  # one bit of the last array
    (tmp_path / "damaged.monitor").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="sha256"):
        sb.sites.DriftMonitor.load(net, tmp_path / "damaged.monitor")
    with pytest.raises(ValueError, match="n_null"):
        sb.sites.DriftMonitor(net, _images(10, 1), n_null=5)


def test_monitor_cli_alerts_with_exit_1_and_refuses_bad_input(tmp_path, monkeypatch, capsys):
    proj = _user_project(tmp_path)
    monkeypatch.chdir(proj)
    common = ["--model", "usernet:make", "--weights", "w.pt", "--data", "data", "--batch-size", "4", "--no-progress"]
    assert main(["monitor", *common, "--reference", "site_a", "--out", "a.monitor", "--n-null", "50"]) == 1
    out = capsys.readouterr().out
    assert "source site_b" in out and "ALERT" in out and (proj / "a.monitor").is_file()
    assert main(["monitor", *common, "--reference", "site_a", "--save", "b.monitor", "--n-null", "50"]) == 1
    assert (proj / "b.monitor").is_file()  # --save: the first spelling of --out, kept as a hidden alias
    assert main(["monitor", *common, "--stats", "a.monitor", "--sources", "site_a"]) == 0
    assert "-> ok" in capsys.readouterr().out
    assert main(["monitor", *common, "--stats", "a.monitor", "--site", "site_a"]) == 0  # the old spelling
    cap = capsys.readouterr()
    assert "-> ok" in cap.out and "note: --site is now --sources" in cap.err
    assert main(["monitor", *common, "--stats", "a.monitor"]) == 1  # every site, site_b alerts
    capsys.readouterr()
    for bad in (["--stats", "nope.monitor"], ["--reference", "site_a", "--alpha", "2"],
                ["--reference", "site_z"], ["--stats", "w.pt"],
                ["--reference", "site_a", "--out", "a.monitor"]):  # exists, no --force
        assert main(["monitor", *common, *bad]) == 2, bad
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_drift_summary_by_hand():
    rows = []
    for sev, score, drop, pdrop, det in [(0.0, 0.1, 0.0, 0.0, 0.04), (0.1, 1.0, 0.01, 0.02, 0.5),
                                         (0.2, 3.0, 0.05, 0.01, 0.9), (0.4, 2.0, 0.2, 0.1, 1.0)]:
        for m, v in (("score", score), ("true_drop", drop), ("predicted_drop", pdrop), ("detection_rate", det),
                     ("detection_empirical", det)):
            rows.append({"shift": "blur", "severity": sev, "metric": m, "value": v, "seed": 0})
    s = drift_summary(pd.DataFrame(rows)).set_index("quantity")["value"]
    assert s["spearman_score_drop"] == pytest.approx(0.5)
    assert s["spearman_predicted_drop"] == pytest.approx(0.5)
    assert s["false_alarm_rate"] == pytest.approx(0.04)
    assert s["detection_rate"] == pytest.approx(0.8)


def _monitor_header(path):
    (size,) = struct.unpack("<Q", path.read_bytes()[:8])
    return json.loads(json.loads(path.read_bytes()[8:8 + size])["__metadata__"]["shiftbn"])


def test_an_edited_monitor_header_is_refused(tmp_path):
    """The checksum covers the header: alpha 0.05 -> 0.01 would turn an alert into "ok" unnoticed."""
    net = _net()
    path = sb.sites.DriftMonitor(net, _images(30, 1), n_null=20).save(tmp_path / "ref.monitor")
    raw = path.read_bytes()
    assert raw.count(b'\\"alpha\\": 0.05') == 1
    for field, edit in (("alpha", (b'\\"alpha\\": 0.05', b'\\"alpha\\": 0.01')),
                        ("n_null", (b'\\"n_null\\": 20', b'\\"n_null\\": 99')),
                        ("seed", (b'\\"seed\\": 0', b'\\"seed\\": 7'))):
        edited = tmp_path / f"{field}.monitor"
        edited.write_bytes(raw.replace(*edit))
        assert edited.read_bytes() != raw and len(edited.read_bytes()) == len(raw)
        with pytest.raises(ValueError, match="failed its sha256 check: the header or the arrays were changed"):
            sb.sites.DriftMonitor.load(net, edited)
    assert sb.sites.DriftMonitor.load(net, path).alpha == 0.05


def test_a_version_2_monitor_is_refused_with_the_fix(tmp_path, monkeypatch):
    from shiftbn.sites import drift_file

    net = _net()
    monkeypatch.setattr(drift_file, "VERSION", 2)
    path = sb.sites.DriftMonitor(net, _images(30, 1), n_null=20).save(tmp_path / "old.monitor")
    monkeypatch.undo()
    assert _monitor_header(path)["version"] == 2
    with pytest.raises(ValueError, match=r"older shiftbn \(version 2\), whose checksum does not cover its header.*"
                                         r"Refit the monitor and save it again"):
        sb.sites.DriftMonitor.load(net, path)


def test_a_fifo_as_monitor_file_is_refused_without_waiting(tmp_path, capsys):
    from tests.timeouts import deadline

    fifo = tmp_path / "pipe.monitor"
    os.mkfifo(fifo)
    with deadline(20):
        with pytest.raises(ValueError, match=r"pipe\.monitor is a FIFO \(named pipe\), not a regular file"):
            sb.sites.DriftMonitor.load(_net(), fifo)
        status = main(["monitor", "--model", "nowhere:make", "--weights", "w.pt", "--data", str(tmp_path),
                       "--stats", str(fifo)])
    err = capsys.readouterr().err
    assert status == 2 and "--stats" in err and "FIFO" in err and len(err.strip().splitlines()) == 1, err


def test_monitor_save_never_replaces_the_checkpoint_and_a_folder_is_no_monitor_file(tmp_path, capsys):
    (tmp_path / "w.pt").write_bytes(b"weights")
    (tmp_path / "link.pt").symlink_to(tmp_path / "w.pt")
    common = ["monitor", "--model", "nowhere:make", "--weights", str(tmp_path / "w.pt"), "--data", str(tmp_path)]
    for args, msg in ((["--reference", "a", "--out", str(tmp_path / "link.pt"), "--force"],
                       "is the --weights checkpoint; monitor never overwrites its input"),
                      (["--stats", str(tmp_path)], "is a folder; give a monitor file")):
        assert main([*common, *args]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "w.pt").read_bytes() == b"weights"


def test_validated_error_is_the_largest_in_range_error_of_the_validation_runs():
    """``VALIDATED_ERROR`` is recomputed from the strategy-choice runs: ATC's error for the model's stored
    statistics on a lab it never saw, inside the range check (outside it, the error is far larger)."""
    from shiftbn.sites.atc import OUT_OF_RANGE_ERROR, VALIDATED_ERROR

    root = Path(__file__).resolve().parents[2] / "analyses" / "results"
    t = pd.concat([pd.read_csv(root / f"strategy_choice{x}.csv") for x in ("", "_fashion")])
    t = t[t["strategy"].isin(["source", "ema"])]
    err = (t["pred_accuracy"] - t["value"]).abs()
    assert np.ceil(err[t["in_range"]].max() * 100) / 100 == VALIDATED_ERROR and t["in_range"].sum() == 29
    assert round(err[~t["in_range"]].max(), 2) == OUT_OF_RANGE_ERROR and (~t["in_range"]).sum() == 8


def _result(p, effect, n=30):
    return sb.sites.DriftResult(effect * 10, p, p < 0.05, n, float("nan"), float("nan"), pd.DataFrame(), effect)


def test_rank_sites_adjusts_p_values_by_benjamini_hochberg_and_ranks_alerts_by_effect():
    results = {"a": _result(0.04, 0.2), "b": _result(0.01, 0.1), "c": _result(0.03, 0.9), "d": _result(0.5, 2.0)}
    table = sb.sites.rank_sites(results, alpha=0.05)
    # by hand: sorted p 0.01, 0.03, 0.04, 0.5 (m = 4); adjusted = min over k >= i of p_k m / k
    want = {"b": 0.04, "c": 0.04 * 4 / 3, "a": 0.04 * 4 / 3, "d": 0.5}
    assert dict(zip(table["site"], table["p_adjusted"], strict=True)) == pytest.approx(want)
    assert list(table["site"]) == ["b", "d", "c", "a"]  # the one alert, then the others by effect
    assert list(table["alert"]) == [True, False, False, False] and list(table["rank"]) == [1, 2, 3, 4]
    assert sum(r.alert for r in results.values()) == 3  # unadjusted, three of four would alert
    with pytest.raises(ValueError, match="alpha"):
        sb.sites.rank_sites(results, alpha=1.5)


def test_monitor_prints_atc_only_with_its_validated_error_and_none_out_of_range(tmp_path, monkeypatch, capsys):
    """A model trained on site_a and site_c (its stored statistics: theirs, pooled), the reference site_a:
    site_c lies in range (an estimate with its band), site_b far outside (no estimate, one line why)."""
    from tests.helpers import write_user_project

    write_user_project(tmp_path, "monnet", (("site_a", 40, 12), ("site_b", 150, 12), ("site_c", 45, 12)))
    monkeypatch.chdir(tmp_path)
    import monnet

    from shiftbn.data.files import from_folder

    model = monnet.make()
    sb.sites.recalibrate(model, from_folder(tmp_path / "data").subset(["site_a", "site_c"]), method="precise",
                         batch_size=8)
    torch.save(model.state_dict(), tmp_path / "ac.pt")
    common = ["--model", "monnet:make", "--data", "data", "--batch-size", "8", "--no-progress", "--n-null", "50"]
    assert main(["monitor", *common, "--weights", "ac.pt", "--reference", "site_a"]) == 1
    out = capsys.readouterr().out
    rows = {line.split()[1]: line for line in out.splitlines() if re.match(r"\s+\d+ site_", line)}
    assert list(rows) == ["site_b", "site_c"]  # ranked: the larger effect first
    assert rows["site_b"].endswith("none (out of range)") and re.search(r"\d\.\d\d ± 0\.32$", rows["site_c"])
    assert re.search(r"site_b: no estimate: its statistics lie [\d.]+x as far from the model's stored ones", out)
    assert "NaN" not in out and "nan" not in out and "predicted accuracy 1.000" not in out
    assert "adjusted over 2 source(s) by Benjamini-Hochberg < 0.05" in out
    # one drifted source of 2 alerts only with p < 0.025, finer than 1/(20+1): said, with the --n-null that suffices
    assert main(["monitor", *common[:-2], "--n-null", "20", "--weights", "ac.pt", "--reference", "site_a"]) == 1
    err = capsys.readouterr().err  # (here both drifted: each p = 1/21 stays 1/21 adjusted, both alert)
    assert "one drifted source alone cannot alert at alpha 0.05: raise --n-null to at least 40" in err
    # an untrained model (BN's initial statistics): no range to check, so no estimate at all
    assert main(["monitor", *common, "--weights", "w.pt", "--reference", "site_a"]) == 1
    out = capsys.readouterr().out
    assert "±" not in out.split("predicted accuracy:")[0] and "stores no trained running statistics" in out
