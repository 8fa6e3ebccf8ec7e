"""The matrix on segmentation (per-case Dice/HD95, outputs never kept whole) and regression data."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn
from torch.utils.data import TensorDataset

import shiftbn as sb
from shiftbn.data.segfiles import from_seg_folder, write_seg_folder
from shiftbn.evaluate import collect, prepare, score
from shiftbn.studies.models import unet3d

STRATEGIES = ["ema", "precise", "target", "prior:8", "batch:2", "tent:all"]


@pytest.fixture(scope="module")
def nifti(tmp_path_factory):
    ds = sb.load("seg-sites-3d", n=4, size=12)
    root = write_seg_folder(ds, tmp_path_factory.mktemp("nii") / "data", "nifti")
    return from_seg_folder(root, class_names=ds.class_names)


def _net():
    return unet3d(num_classes=3, width=4, seed=0).eval()


def _edges(m):
    return m & ~ndimage.binary_erosion(m)


def _reference(pred, gt, spacing):
    """Mean foreground Dice and HD95 of one case, by an independent numpy/scipy computation."""
    diag = float(np.sqrt(np.sum((np.array(gt.shape) * spacing) ** 2)))
    dice, hd = [], []
    for c in (1, 2):
        p, g = pred == c, gt == c
        if not p.any() and not g.any():
            dice.append(1.0)
            hd.append(0.0)
            continue
        if not p.any() or not g.any():
            dice.append(0.0)
            hd.append(diag)
            continue
        dice.append(2 * (p & g).sum() / (p.sum() + g.sum()))
        ep, eg = _edges(p), _edges(g)
        to_g = ndimage.distance_transform_edt(~eg, sampling=spacing)[ep]
        to_p = ndimage.distance_transform_edt(~ep, sampling=spacing)[eg]
        hd.append(max(np.percentile(to_g, 95), np.percentile(to_p, 95)))
    return float(np.mean(dice)), float(np.mean(hd))


def test_a_3d_unet_on_nifti_volumes_gets_a_dice_matrix_with_case_intervals(nifti):
    table = sb.cross_source_matrix(_net(), nifti, STRATEGIES, ci=0.9, n_boot=20, batch_size=2, stats_batch_size=2,
                                   progress=False)
    sources = nifti.sources_present
    assert set(table.metric) == {"dice", "hd95"}
    assert len(table) == len(STRATEGIES) * len(sources) * 2
    assert (table["n"] == 2).all()  # cases, the evaluation half of each site's 4 volumes
    dice = table[table.metric == "dice"]
    assert dice["value"].between(0, 1).all() and (dice["ci_low"] <= dice["ci_high"]).all()
    assert table["value"].notna().all()


def test_the_ema_cell_equals_an_independent_dice_and_hd95_of_the_plain_forward(nifti):
    net = _net()
    plan = prepare(nifti, ["ema"])
    ctx, labels = collect(net, plan, batch_size=2, progress=False)
    kept = {}
    table = score(ctx, plan, labels, ["dice", "hd95"], progress=False, keep_outputs=kept)
    for src in plan.eval_sources:
        part = plan.evaluation.subset(src)
        refs = []
        for i in range(len(part)):
            x, t, _ = part[i]
            with torch.no_grad():
                pred = net(x[None]).argmax(1)[0].numpy()
            refs.append(_reference(pred, t["mask"].numpy(), t["spacing"].numpy()))
        got = table[(table.eval_source == src)].set_index("metric")["value"]
        assert got["dice"] == pytest.approx(np.mean([r[0] for r in refs]), abs=1e-6)
        assert got["hd95"] == pytest.approx(np.mean([r[1] for r in refs]), abs=1e-5)
        assert kept[("ema", src)].shape == (len(part), 8)  # per-case rows, never the (N, K, D, H, W) outputs


def test_segmentation_outputs_are_scored_batch_by_batch_and_never_kept_whole(monkeypatch):
    """Memory stays flat in the number of cases: every kept array is (cases, 4 (K - 1))."""
    import shiftbn.evaluate.matrix as matrix

    largest = []
    real = matrix.case_scores

    def spy(outputs, targets):
        largest.append(outputs.shape[0])
        return real(outputs, targets)

    monkeypatch.setattr(matrix, "case_scores", spy)
    for n in (4, 12):
        ds = sb.load("seg-sites-2d", n=n, size=16)
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()
        plan = prepare(ds, ["ema", "batch:4"])
        ctx, labels = collect(net, plan, batch_size=4, progress=False)
        kept = {}
        score(ctx, plan, labels, ["dice"], progress=False, keep_outputs=kept)
        assert all(v.shape == (len(labels[s]), 8) for (_, s), v in kept.items())
    assert max(largest) <= 4  # the reduction only ever saw one batch of outputs


def test_metrics_that_do_not_fit_the_task_are_refused_naming_the_fitting_ones():
    ds = sb.load("seg-sites-2d", n=4, size=16)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)).eval()
    with pytest.raises(ValueError, match="do not fit this segmentation data.*dice"):
        sb.cross_source_matrix(net, ds, ["ema"], ["accuracy"], progress=False)


def test_regression_targets_are_scored_with_mae_through_the_same_path():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g)
    y = (x[:, 0] * 2 + 0.1 * torch.randn(60, generator=g)).tolist()
    sources = np.repeat([0, 1], 30)

    class Items(TensorDataset):
        def __getitem__(self, i):
            return self.tensors[0][i], float(y[i])

    ds = sb.SourceTaggedDataset(Items(x), sources, source_names=["a", "b"])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)).eval()
    table = sb.cross_source_matrix(net, ds, ["ema", "target"], ["mae", "r2"], transductive=True, progress=False)
    with torch.no_grad():
        out = net(x[:30]).numpy().ravel()
    ema_a = table[(table.strategy == "ema") & (table.eval_source == "a")].set_index("metric")["value"]
    assert ema_a["mae"] == pytest.approx(np.abs(out - np.array(y[:30])).mean(), abs=1e-6)
    assert sb.cross_source_matrix(net, ds, ["ema"], transductive=True, progress=False).metric.unique().tolist() == \
        ["mae"]
