"""Per-case segmentation scores (evaluate.dense) against an independent numpy computation, their metric
table entries, case-level bootstrap intervals, and the (mean, sd) reading of regression outputs.

The reference finds edges by an explicit face-neighbour test and distances by brute force over all
pairs of edge voxels (no erosion, no distance transform), so it shares no code path with the scorer.
"""

import numpy as np
import pytest
import torch

from shiftbn.evaluate import (
    CaseScorer,
    bootstrap_interval,
    case_values,
    check_metrics,
    dense_columns,
    get_metric,
    metric_value,
    paired_difference,
    resample_indices,
)

TOL = 1e-6


def _edges(m: np.ndarray) -> np.ndarray:
    """Foreground voxels with a face neighbour that is background or outside the image."""
    padded = np.pad(m, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(m.ndim))
    interior = m.copy()
    for axis in range(m.ndim):
        for step in (-1, 1):
            interior &= np.roll(padded, step, axis=axis)[inner]
    return m & ~interior


def _directed(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    pa, pb = np.argwhere(a) * np.asarray(spacing), np.argwhere(b) * np.asarray(spacing)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(1)


def _reference(pred: np.ndarray, gt: np.ndarray, k: int, spacing=None) -> np.ndarray:
    """One case's row: dice, iou, hd95, asd per foreground class, quantity-major."""
    spacing = np.ones(pred.ndim) if spacing is None else np.asarray(spacing, dtype=float)
    diag = np.sqrt(((np.array(pred.shape) * spacing) ** 2).sum())
    cols = {q: [] for q in ("dice", "iou", "hd95", "asd")}
    for c in range(1, k):
        p, g = pred == c, gt == c
        if not p.any() and not g.any():
            vals = (1.0, 1.0, 0.0, 0.0)
        elif not p.any() or not g.any():
            vals = (0.0, 0.0, diag, diag)
        else:
            inter = (p & g).sum()
            d_pg, d_gp = _directed(_edges(p), _edges(g), spacing), _directed(_edges(g), _edges(p), spacing)
            vals = (2 * inter / (p.sum() + g.sum()), inter / (p | g).sum(),
                    max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)), np.concatenate([d_pg, d_gp]).mean())
        for q, v in zip(cols, vals, strict=True):
            cols[q].append(v)
    return np.concatenate([cols[q] for q in cols])


def _logits(labels: np.ndarray, k: int) -> torch.Tensor:
    """Logits whose argmax is ``labels`` (B, *S), with noise so they are not one-hot."""
    onehot = torch.nn.functional.one_hot(torch.as_tensor(labels), k).movedim(-1, 1).double()
    return 3 * onehot + 0.1 * torch.rand(onehot.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _blocky(rng, shape, k, block=3):
    """A label map of random blocks (structures of varied shape and size)."""
    coarse = rng.integers(0, k, size=tuple(-(-s // block) for s in shape))
    full = coarse
    for axis in range(len(shape)):
        full = np.repeat(full, block, axis=axis)
    return full[tuple(slice(0, s) for s in shape)]


def test_columns_are_quantity_major():
    assert CaseScorer(3).columns == dense_columns(3) == ["dice_1", "dice_2", "iou_1", "iou_2", "hd95_1", "hd95_2",
                                                         "asd_1", "asd_2"]


@pytest.mark.parametrize("shape", [(9, 11), (6, 7, 8)])
def test_identical_masks_score_perfectly(shape):
    gt = _blocky(np.random.default_rng(1), shape, 3)[None]
    rows = CaseScorer(3)(_logits(gt, 3), torch.as_tensor(gt))
    assert rows.dtype == torch.float64 and rows.device.type == "cpu" and rows.shape == (1, 8)
    np.testing.assert_allclose(rows[0].numpy(), [1, 1, 1, 1, 0, 0, 0, 0], atol=TOL)


@pytest.mark.parametrize("dims", [2, 3])
def test_parallel_plates_have_the_known_distance(dims):
    # A one-voxel-thick line (2-D) or plate (3-D) and its copy 3 voxels away along the last axis: every
    # voxel is an edge and its nearest counterpart lies straight across, so hd95 = asd = 3 * spacing.
    shape = (10,) * dims
    gt, pred = np.zeros(shape, int), np.zeros(shape, int)
    face = (slice(2, 7),) * (dims - 1)
    gt[(*face, 2)], pred[(*face, 5)] = 1, 1
    spacing = [0.7] * (dims - 1) + [1.5]
    rows = CaseScorer(2)(_logits(pred[None], 2), {"mask": torch.as_tensor(gt[None]), "spacing": [spacing]})
    np.testing.assert_allclose(rows[0].numpy(), [0, 0, 4.5, 4.5], atol=TOL)


@pytest.mark.parametrize(("shape", "shift", "spacing"), [((12, 12), (2, 1), (1.0, 1.0)),
                                                          ((12, 12), (0, 3), (2.0, 0.5)),
                                                          ((9, 10, 11), (1, 0, 2), (1.0, 1.0, 1.0)),
                                                          ((9, 10, 11), (2, 1, 1), (3.0, 0.8, 1.2))])
def test_shifted_squares_and_cubes_match_the_reference(shape, shift, spacing):
    gt = np.zeros(shape, int)
    gt[tuple(slice(2, 7) for _ in shape)] = 1
    pred = np.roll(gt, shift, axis=tuple(range(len(shape))))
    rows = CaseScorer(2)(_logits(pred[None], 2), {"mask": torch.as_tensor(gt[None]), "spacing": [spacing]})
    np.testing.assert_allclose(rows[0].numpy(), _reference(pred, gt, 2, spacing), atol=TOL, rtol=0)


def test_a_shift_along_a_coarse_axis_costs_more():
    gt = np.zeros((12, 12), int)
    gt[3:8, 3:8] = 1
    pred = np.roll(gt, 2, axis=0)
    fine = CaseScorer(2)(_logits(pred[None], 2), {"mask": torch.as_tensor(gt[None]), "spacing": [[0.5, 3.0]]})
    coarse = CaseScorer(2)(_logits(pred[None], 2), {"mask": torch.as_tensor(gt[None]), "spacing": [[3.0, 0.5]]})
    assert coarse[0, 2] == pytest.approx(6 * fine[0, 2])  # distances all along axis 0: scale by the spacing
    assert coarse[0, 0] == fine[0, 0]  # overlap does not depend on spacing


@pytest.mark.parametrize("dims", [2, 3])
def test_empty_mask_rules(dims):
    shape = (8, 10) if dims == 2 else (5, 6, 7)
    spacing = (2.0, 0.5) if dims == 2 else (2.0, 0.5, 1.0)
    diag = np.sqrt(((np.array(shape) * spacing) ** 2).sum())
    gt, pred = np.zeros(shape, int), np.zeros(shape, int)
    gt[(slice(1, 3),) * dims] = 1  # class 1: ground truth only (missed)
    pred[(slice(3, 5),) * dims] = 2  # class 2: prediction only (false alarm); class 3: in neither
    rows = CaseScorer(4)(_logits(pred[None], 4), {"mask": torch.as_tensor(gt[None]), "spacing": [spacing]})
    expected = [0, 0, 1, 0, 0, 1, diag, diag, 0, diag, diag, 0]
    np.testing.assert_allclose(rows[0].numpy(), expected, atol=TOL)
    np.testing.assert_allclose(rows[0].numpy(), _reference(pred, gt, 4, spacing), atol=TOL)


def test_default_spacing_is_one_and_a_single_spacing_serves_the_batch():
    rng = np.random.default_rng(2)
    gt, pred = _blocky(rng, (2, 10, 10), 3), _blocky(rng, (2, 10, 10), 3)
    scorer = CaseScorer(3)
    plain = scorer(_logits(pred, 3), torch.as_tensor(gt))
    ones = scorer(_logits(pred, 3), {"mask": torch.as_tensor(gt), "spacing": torch.ones(2, 2)})
    shared = scorer(_logits(pred, 3), {"mask": torch.as_tensor(gt), "spacing": np.array([2.0, 1.0])})
    per_case = scorer(_logits(pred, 3), {"mask": torch.as_tensor(gt), "spacing": np.array([[2.0, 1.0]] * 2)})
    assert torch.equal(plain, ones) and torch.equal(shared, per_case)


@pytest.mark.parametrize("shape", [(14, 13), (7, 8, 9)])
def test_multiclass_random_cases_match_the_reference(shape):
    rng = np.random.default_rng(3)
    k = 4
    gt = _blocky(rng, (3, *shape), k)
    pred = np.where(rng.random(gt.shape) < 0.15, rng.integers(0, k, size=gt.shape), gt)  # noisy copies
    pred[2] = np.roll(gt[2], 2, axis=0)
    spacing = rng.uniform(0.5, 2.0, size=(3, len(shape)))
    rows = CaseScorer(k)(_logits(pred, k), {"mask": torch.as_tensor(gt), "spacing": torch.as_tensor(spacing)})
    for b in range(3):
        np.testing.assert_allclose(rows[b].numpy(), _reference(pred[b], gt[b], k, spacing[b]), atol=TOL, rtol=0)


def test_a_mixed_batch_scores_each_case_as_alone():
    rng = np.random.default_rng(4)
    gt = _blocky(rng, (5, 10, 12), 3)
    gt[3] = 0  # nothing to find
    pred = gt.copy()  # case 0: perfect
    pred[1] = np.roll(gt[1], 1, axis=1)  # shifted
    pred[2] = 0  # everything missed
    pred[3, 2:4, 2:4] = 2  # a false alarm on an empty case
    pred[4] = np.where(rng.random(gt[4].shape) < 0.2, 1, gt[4])
    spacing = rng.uniform(0.5, 2.0, size=(5, 2))
    scorer = CaseScorer(3)
    rows = scorer(_logits(pred, 3), {"mask": torch.as_tensor(gt), "spacing": spacing})
    for b in range(5):
        np.testing.assert_allclose(rows[b].numpy(), _reference(pred[b], gt[b], 3, spacing[b]), atol=TOL, rtol=0)
        alone = scorer(_logits(pred[b:b + 1], 3), {"mask": torch.as_tensor(gt[b:b + 1]), "spacing": spacing[b:b + 1]})
        assert torch.equal(alone[0], rows[b])
    assert torch.isfinite(rows).all()


def test_a_case_with_nonfinite_logits_gets_a_nan_row():
    gt = np.zeros((2, 6, 6), int)
    gt[:, 1:4, 1:4] = 1
    logits = _logits(gt, 2)
    logits[1, 0, 0, 0] = float("nan")
    rows = CaseScorer(2)(logits, torch.as_tensor(gt))
    assert torch.equal(rows[0], torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.isnan(rows[1]).all()
    assert np.isnan(metric_value("dice", rows.numpy(), np.zeros(2)))


def test_bad_inputs_get_clear_errors():
    scorer = CaseScorer(3)
    gt = torch.zeros(2, 6, 6, dtype=torch.long)
    logits = _logits(gt.numpy(), 3)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        CaseScorer(1)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        CaseScorer(2.0)
    with pytest.raises(TypeError, match="tensor of logits"):
        scorer(logits.numpy(), gt)
    with pytest.raises(ValueError, match=r"CaseScorer\(3\); got shape \(2, 4, 6, 6\)"):
        scorer(torch.zeros(2, 4, 6, 6), gt)
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 6\)"):
        scorer(torch.zeros(2, 3, 6), gt[:, 0])
    with pytest.raises(ValueError, match=r"mask.argmax\(1\)"):
        scorer(logits, torch.nn.functional.one_hot(gt, 3).movedim(-1, 1))
    with pytest.raises(TypeError, match=r"integer label map, got torch.float32; cast it with .long\(\)"):
        scorer(logits, gt.float())
    with pytest.raises(ValueError, match=r"labels span \[0, 3\] but the scorer has 3 classes"):
        scorer(logits, gt + 3 * (gt == 0) * (torch.arange(6) == 5))
    with pytest.raises(ValueError, match=r"spacing has shape \(3, 2\)"):
        scorer(logits, {"mask": gt, "spacing": np.ones((3, 2))})
    with pytest.raises(ValueError, match="finite and positive"):
        scorer(logits, {"mask": gt, "spacing": [[1.0, 0.0], [1.0, 1.0]]})
    with pytest.raises(ValueError, match="needs a 'mask' key"):
        scorer(logits, {"label": gt})
    with pytest.raises(ValueError, match="an ignore label such as -1 or 255 is not supported"):
        scorer(logits, torch.where(gt == 0, 255, gt))
    with pytest.raises(ValueError, match="spacing must be numbers"):
        scorer(logits, {"mask": gt, "spacing": ["a", "b"]})
    with pytest.raises(TypeError, match="int label map .* got NoneType"):
        scorer(logits, None)


def test_metric_table_reads_the_rows():
    rows = np.array([[1.0, 0.5, 1.0, 1 / 3, 0.0, 2.0, 0.0, 1.0],
                     [0.0, 1.0, 0.0, 1.0, 10.0, 0.0, 8.0, 0.0]])
    y = np.zeros(2)
    assert metric_value("dice", rows, y) == pytest.approx((0.75 + 0.5) / 2)
    assert metric_value("iou", rows, y) == pytest.approx(((1 + 1 / 3) / 2 + 0.5) / 2)
    assert metric_value("hd95", rows, y) == pytest.approx((1.0 + 5.0) / 2)
    assert metric_value("asd", rows, y) == pytest.approx((0.5 + 4.0) / 2)
    assert metric_value("dice:2", rows, y) == pytest.approx(0.75)
    assert metric_value("hd95:1", torch.as_tensor(rows), None) == pytest.approx(5.0)
    np.testing.assert_array_equal(case_values("asd:1", rows), [0.0, 8.0])
    for name, higher, bounded in [("dice", True, True), ("iou:1", True, True), ("hd95", False, False),
                                  ("asd:2", False, False)]:
        m = get_metric(name)
        assert (m.higher_is_better, m.bounded, m.task) == (higher, bounded, "segmentation")
    assert check_metrics(["dice", "dice:3", "hd95"]) == ["dice", "dice:3", "hd95"]
    with pytest.raises(ValueError, match="unknown metric"):
        check_metrics(["dice:x"])
    with pytest.raises(ValueError, match="asks for class 3 but the rows hold foreground classes 1..2"):
        metric_value("dice:3", rows, y)
    with pytest.raises(ValueError, match="2 case rows but targets"):
        metric_value("dice", rows, np.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(2, 7\)"):
        metric_value("dice", rows[:, :7], y)
    with pytest.raises(ValueError, match="score each batch with CaseScorer"):  # the (N, K, H, W) outputs
        metric_value("dice", np.zeros((2, 3, 4, 4)), y)


def test_bootstrap_on_rows_resamples_cases():
    rng = np.random.default_rng(5)
    n = 30
    rows = np.concatenate([rng.uniform(0.3, 1.0, size=(n, 2)), rng.uniform(0.2, 0.9, size=(n, 2)),
                           rng.uniform(0, 10, size=(n, 4))], 1)
    y = np.zeros(n)
    iv = bootstrap_interval(rows, y, "dice", n_boot=200, level=0.9, seed=3)
    per_case = rows[:, :2].mean(1)
    reps = per_case[resample_indices(n, 200, seed=3)].mean(1)
    assert iv.value == pytest.approx(per_case.mean(), abs=1e-12)
    assert (iv.low, iv.high) == pytest.approx(tuple(np.quantile(reps, [0.05, 0.95])), abs=1e-12)
    slow = [metric_value("dice", rows[i], y[i]) for i in resample_indices(n, 200, seed=3)]  # the generic path
    np.testing.assert_allclose(reps, slow, atol=1e-12)
    hd = bootstrap_interval(rows, y, "hd95:2", n_boot=200, seed=3)
    assert hd.low < rows[:, 5].mean() < hd.high
    strata = np.repeat([0, 1], n // 2)
    stratified = bootstrap_interval(rows, y, "dice", n_boot=200, seed=3, strata=strata)
    reps = per_case[resample_indices(n, 200, seed=3, strata=strata)].mean(1)
    assert (stratified.low, stratified.high) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])), abs=1e-12)


def test_paired_difference_on_rows_pairs_cases():
    rng = np.random.default_rng(6)
    a = rng.uniform(0.5, 1.0, size=(40, 4))
    b = a.copy()
    b[:, 0] -= 0.1  # strategy B is 0.1 worse on every case: the paired interval is a point
    d = paired_difference(a, b, np.zeros(40), "dice", n_boot=100)
    assert (d.value, d.low, d.high) == pytest.approx((0.1, 0.1, 0.1), abs=1e-12)


def test_regression_reads_mean_and_sd_outputs():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    mean = np.array([1.5, 2.0, 2.0, 4.0])
    sd = np.array([0.2, 1.0, 0.5, 0.0])
    out = np.stack([mean, sd], 1)
    assert metric_value("mae", out, y) == metric_value("mae", mean, y) == pytest.approx(0.375)
    assert metric_value("r2", out, y) == metric_value("r2", mean[:, None], y)
    # |y - mean| = 0.5, 0, 1, 0 against 1.6449 sd = 0.329, 1.645, 0.822, 0: inside for cases 2 and 4
    assert metric_value("coverage90", out, y) == 0.5
    assert get_metric("coverage90").higher_is_better and get_metric("coverage90").bounded
    with pytest.raises(ValueError, match=r"coverage90 needs outputs \(N, 2\)"):
        metric_value("coverage90", mean, y)
    with pytest.raises(ValueError, match="contain NaN"):
        metric_value("coverage90", np.stack([mean, np.where(sd > 0.9, np.nan, sd)], 1), y)
    with pytest.raises(ValueError, match="one target per sample"):  # a length-1 target must not broadcast
        metric_value("coverage90", out, y[:1])
    with pytest.raises(ValueError, match="standard deviation >= 0"):
        metric_value("coverage90", np.stack([mean, -sd - 1], 1), y)
    with pytest.raises(ValueError, match="is for regression"):  # three columns are no (mean, sd)
        metric_value("mae", np.zeros((4, 3)), y)


def test_two_column_outputs_stay_logits_for_classification():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 2.0]])
    labels = np.array([0, 1, 1, 1])
    assert metric_value("accuracy", logits, labels) == 0.75
    assert metric_value("nll", logits, labels) == pytest.approx(np.mean(
        -np.log(np.exp(logits[np.arange(4), labels]) / np.exp(logits).sum(1))))
    with pytest.raises(ValueError, match="model has 2 outputs"):
        metric_value("accuracy", logits, np.array([0, 1, 2, 1]))


def test_coverage90_of_a_calibrated_normal_model_is_near_090():
    rng = np.random.default_rng(7)
    mean, sd = rng.normal(size=20000), rng.uniform(0.5, 2.0, size=20000)
    y = mean + sd * rng.normal(size=20000)
    iv = bootstrap_interval(np.stack([mean, sd], 1), y, "coverage90", n_boot=20, seed=0)
    assert iv.value == pytest.approx(0.90, abs=0.01)
