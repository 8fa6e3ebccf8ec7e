"""Issue #22's end-to-end check: a BN 3-D U-Net trained on 3 generated sites, volumes read from NIfTI
files, a Dice matrix (ema, precise, target, prior:N, tent, batch) with case-level intervals from the API
and from ``shiftbn report``. Trains for about a minute: ``make test-slow``."""

import json

import pandas as pd
import pytest
import torch

import shiftbn as sb
from shiftbn.cli import main
from shiftbn.data.segfiles import from_seg_folder, write_seg_folder
from shiftbn.studies import train
from shiftbn.studies.models import unet3d

TRAIN = ["site_a", "site_b", "site_c"]
STRATEGIES = ["ema", "precise", "target", "prior:16", "tent:all:k=2", "batch:4:k=2"]


def _train(ds, steps=150, seed=0):
    model = unet3d(num_classes=3, width=4, seed=seed)
    train(model, ds.subset(TRAIN), steps=steps, batch_size=4, lr=0.05, seed=seed, progress=False)  # CE + soft Dice
    return model.eval()


@pytest.mark.slow
def test_a_trained_3d_unet_gets_a_dice_matrix_from_nifti_by_api_and_report(tmp_path):
    root = write_seg_folder(sb.load("seg-sites-3d", n=8, size=16), tmp_path / "volumes", "nifti")
    ds = from_seg_folder(root)
    model = _train(ds)
    torch.save(model.state_dict(), tmp_path / "unet.pt")

    table = sb.cross_source_matrix(model, ds, STRATEGIES, train_sources=TRAIN, ci=0.9, n_boot=100, batch_size=4,
                                   stats_batch_size=4, progress=False)
    dice = table[table.metric == "dice"]
    assert len(dice) == len(STRATEGIES) * 4 and (dice["n"] == 4).all()
    assert (dice["ci_low"] <= dice["value"]).all() and (dice["value"] <= dice["ci_high"]).all()
    trained = dice[(dice.strategy == "ema") & dice.eval_source.isin(TRAIN)]["value"].mean()
    untrained = sb.cross_source_matrix(unet3d(num_classes=3, width=4, seed=0).eval(), ds, ["ema"], ["dice"],
                                       eval_sources=TRAIN, batch_size=4, progress=False)["value"].mean()
    assert trained > untrained + 0.15, (trained, untrained)  # it learned something on the sites it saw

    out = tmp_path / "report"
    argv = ["report", "--model", "unet3d", "--model-kwargs", "width=4", "--weights", str(tmp_path / "unet.pt"),
            "--data", str(root), "--held-out", "site_d", "--strategies", *STRATEGIES, "--batch-size", "4",
            "--n-boot", "100", "--ci", "0.9", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    matrix = pd.read_csv(out / "matrix.csv")
    api = table.set_index(["strategy", "eval_source", "metric"])["value"]
    cli = matrix.set_index(["strategy", "eval_source", "metric"])["value"]
    pd.testing.assert_series_equal(cli.sort_index(), api.reindex(cli.index).sort_index(), check_names=False)
    report = json.loads((out / "report.json").read_text())
    assert [d["source"] for d in report["decisions"]] == ["site_a", "site_b", "site_c", "site_d"]
    assert "<h2>Cross-source matrix (dice)</h2>" in (out / "report.html").read_text()
