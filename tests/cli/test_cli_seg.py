"""Every command that runs the model on a NIfTI segmentation folder with ``--model unet3d``, and ``--forward``."""

import json
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

import shiftbn as sb
from shiftbn.cli import main
from shiftbn.data.segfiles import from_seg_folder, write_seg_folder
from shiftbn.studies.models import unet3d

FORWARD = textwrap.dedent('''
    import torch

    CALLS = []


    def micro(model, x):
        """Two micro-batches per batch: statistics stay exact in eval and sequential modes."""
        CALLS.append(len(x))
        return torch.cat([model(part) for part in torch.tensor_split(x, 2)])


    def counted(model, x):
        """The plain forward, recording each batch's size."""
        CALLS.append(len(x))
        return model(x)


    def broken(model, x):
        raise RuntimeError("my forward is broken")


    def ignores_the_model(model, x):
        return x


    NOT_CALLABLE = 3
''')


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("segcli")
    write_seg_folder(sb.load("seg-sites-3d", n=4, size=16, sites=2), root / "data", "nifti")
    torch.save(unet3d(width=4).state_dict(), root / "w.pt")
    (root / "segfwd_mod.py").write_text(FORWARD)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    sys.modules.pop("segfwd_mod", None)


def _user(root, *extra):
    return ["--model", "unet3d", "--model-kwargs", "width=4", "--weights", str(root / "w.pt"), "--data",
            str(root / "data"), "--batch-size", "4", "--no-progress", *extra]


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err


def test_stats_with_a_forward_equal_the_apis_and_the_plain_forward(root, capsys):
    out = root / "stats_fwd"
    assert main(["stats", *_user(root, "--mode", "eval", "--forward", "segfwd_mod:micro", "--out", str(out))]) == 0
    import segfwd_mod

    assert segfwd_mod.CALLS, "the CLI did not call the user's forward"
    cli = json.loads((out / "stats.json").read_text())
    model = unet3d(width=4)
    model.load_state_dict(torch.load(root / "w.pt", weights_only=True))
    ds = from_seg_folder(root / "data")
    for forward in (segfwd_mod.micro, None):  # micro-batched statistics are exact: equal to one batch's
        api = sb.collect_stats(model.eval(), ds, batch_size=4, mode="eval", progress=False, forward=forward)
        _close(json.loads(json.dumps(api.to_dict())), cli)


def _close(a, c):
    if isinstance(a, dict):
        assert a.keys() == c.keys()
        for k in a:
            _close(a[k], c[k])
    elif isinstance(a, list):
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(c, float), rtol=1e-9, atol=1e-12)
    elif isinstance(a, float):
        assert np.isclose(a, c, rtol=1e-9, atol=1e-12)
    else:
        assert a == c


@pytest.mark.parametrize(("spec", "words"), [
    ("segfwd_missing_mod:micro", ["--forward", "cannot import 'segfwd_missing_mod'"]),
    ("segfwd_mod:nothing", ["--forward segfwd_mod:nothing", "no callable 'nothing'"]),
    ("segfwd_mod:NOT_CALLABLE", ["--forward segfwd_mod:NOT_CALLABLE", "(NOT_CALLABLE is of type int)"]),
    ("segfwd_mod", ["--forward must look like package.module:function"]),
])
@pytest.mark.parametrize("verb", ["stats", "matrix", "report", "recalibrate", "monitor"])
def test_a_bad_forward_is_one_line_exit_2_on_every_verb(root, capsys, verb, spec, words):
    extra = {"stats": ["--out", str(root / "x")], "matrix": ["--out", str(root / "x")],
             "report": ["--out", str(root / "x")], "recalibrate": ["--target", "site_a", "--output",
                                                                  str(root / "x.pt")],
             "monitor": ["--reference", "site_a"]}[verb]
    assert main([verb, *_user(root, "--forward", spec, *extra)]) == 2
    _one_line_error(capsys, f"shiftbn {verb}: error:", *words)


def test_a_forward_that_raises_is_one_line_naming_it(root, capsys):
    assert main(["stats", *_user(root, "--forward", "segfwd_mod:broken", "--out", str(root / "broken"))]) == 2
    _one_line_error(capsys, "RuntimeError: my forward is broken", "broken")


def test_a_forward_that_never_calls_the_model_is_named(root, capsys):
    assert main(["stats", *_user(root, "--forward", "segfwd_mod:ignores_the_model", "--out", str(root / "no")), ]) == 2
    _one_line_error(capsys, "no data reached the BN layers", "the forward never called the model")


def test_matrix_defaults_to_dice_and_hd95_with_case_intervals(root, capsys):
    out = root / "matrix"
    assert main(["matrix", *_user(root, "--strategies", "ema", "target", "--n-boot", "10", "--out", str(out))]) == 0
    table = pd.read_csv(out / "matrix.csv")
    assert set(table["metric"]) == {"dice", "hd95"}
    assert (table["n"] == 2).all()  # cases: half of each site's 4 volumes is evaluated
    assert table["ci_low"].le(table["value"]).all() and table["value"].le(table["ci_high"]).all()
    assert table.loc[table["metric"] == "dice", "value"].between(0, 1).all()
    printed = capsys.readouterr().out
    assert "dice [95% interval]:" in printed and "hd95 [95% interval]:" in printed


def test_matrix_evaluates_in_batches_of_eval_batch_size_with_the_same_numbers(root):
    import segfwd_mod

    tables = {}
    for size in ("1", "256"):
        segfwd_mod.CALLS.clear()
        out = root / f"matrix_eval_{size}"
        assert main(["matrix", *_user(root, "--strategies", "ema", "target", "--no-ci", "--eval-batch-size", size,
                                      "--forward", "segfwd_mod:counted", "--out", str(out))]) == 0
        tables[size] = pd.read_csv(out / "matrix.csv")
        # statistics: batches of --batch-size 4 over each site's 2 calibration volumes; evaluation: 2 strategies x 2
        # sites x 2 volumes, one at a time with --eval-batch-size 1
        evaluation = 8 if size == "1" else 4
        assert sorted(segfwd_mod.CALLS).count(int(size) if size == "1" else 2) >= evaluation, segfwd_mod.CALLS
    assert segfwd_mod.CALLS.count(1) == 0  # 256: each site's 2 evaluation volumes in one batch
    np.testing.assert_allclose(tables["1"]["value"], tables["256"]["value"], rtol=1e-4, atol=1e-4)


def test_matrix_refuses_a_classification_metric_for_masks(root, capsys):
    assert main(["matrix", *_user(root, "--metrics", "accuracy", "--out", str(root / "m2"))]) == 2
    _one_line_error(capsys, "--metrics", "accuracy", "segmentation", "dice")


def test_matrix_refuses_a_class_the_masks_do_not_have_before_any_forward(root, capsys):
    import segfwd_mod

    segfwd_mod.CALLS.clear()
    out = root / "m7"
    assert main(["matrix", *_user(root, "--metrics", "dice", "dice:7", "--forward", "segfwd_mod:micro", "--out",
                                  str(out))]) == 2
    _one_line_error(capsys, "['dice:7'] (--metrics)", "3 classes", "foreground class 1..2", "'dice:2'")
    assert segfwd_mod.CALLS == [] and not (out / "matrix.csv").exists()


def test_recalibrate_writes_the_target_sites_statistics(root):
    out = root / "recal.pt"
    assert main(["recalibrate", *_user(root, "--target", "site_b", "--forward", "segfwd_mod:micro", "--output",
                                       str(out))]) == 0
    before, after = torch.load(root / "w.pt", weights_only=True), torch.load(out, weights_only=True)
    means = [k for k in before if k.endswith("running_mean")]
    assert means and all(not torch.equal(before[k], after[k]) for k in means)
    model = unet3d(width=4)
    model.load_state_dict(torch.load(root / "w.pt", weights_only=True))
    ds = from_seg_folder(root / "data")
    want = sb.collect_stats(model, ds.subset("site_b"), batch_size=4, progress=False)["site_b"]
    layer = means[0].removesuffix(".running_mean")
    torch.testing.assert_close(after[means[0]].double(), torch.as_tensor(want[layer].mean).double().reshape(-1),
                               rtol=1e-5, atol=1e-6)


def test_monitor_scores_bn_statistics_of_a_segmenter(root, capsys):
    status = main(["monitor", *_user(root, "--reference", "site_a", "--n-null", "20", "--forward",
                                     "segfwd_mod:micro")])
    assert status in (0, 1)
    printed = capsys.readouterr().out
    assert "source site_b (n=4): effect" in printed and "(all layers)" not in printed
    assert "one class prediction per sample" in printed  # no class predictions: no estimate
    assert "±" not in printed


def test_report_on_a_nifti_folder_is_a_segmentation_report(root, capsys):
    out = root / "report"
    assert main(["report", *_user(root, "--strategies", "ema", "target", "precise", "--n-boot", "10",
                                  "--forward", "segfwd_mod:micro", "--out", str(out))]) == 0
    printed = capsys.readouterr().out
    assert "Decision per source:" in printed and "Dice (mean over cases) by strategy" in printed
    html = (out / "report.html").read_text()
    for heading in ("Decision per source", "Cross-source matrix (dice)", "Cross-source matrix (hd95)",
                    "Per-case distributions per source", "Prediction vs ground truth", "Dice by strategy and source",
                    "HD95 by strategy and source"):
        assert f"<h2>{heading}</h2>" in html, heading
    assert "which a segmenter does not make" in html and "Calibration (ECE) per" not in html
    for fig in ("matrix.png", "matrix_hd95.png", "cases.png", "overlays.png"):
        assert (out / "figures" / fig).is_file()
    assert not (out / "figures" / "reliability.png").exists()
    decisions = json.loads((out / "report.json").read_text())["decisions"]
    assert [d["source"] for d in decisions] == ["site_a", "site_b"]
    assert all("Dice" in d["why"] and "n=2 cases" in d["why"] for d in decisions)
    assert all("--forward segfwd_mod:micro" in d["next_command"] for d in decisions if d["strategy"] != "ema")
    cases = pd.read_csv(out / "cases.csv")
    assert set(cases["metric"]) == {"dice", "hd95"}
    assert len(cases) == 2 * 3 * 2 * 2  # metrics x strategies x sites x cases


def test_the_monitor_keeps_no_dense_outputs_of_a_segmenter(root):
    from shiftbn.sites import DriftMonitor

    ds = from_seg_folder(root / "data")
    monitor = DriftMonitor(unet3d(width=4).eval(), ds.subset("site_a"), n_null=20, batch_size=2)
    assert monitor.moments.logits.shape == (4, 0) and monitor.atc is None
    result = monitor.score(ds.subset("site_b"))
    assert result.n == 4 and result.predicted_accuracy != result.predicted_accuracy  # NaN: no ATC
