"""evaluate.dense's per-case Dice, HD95 and ASD against MONAI's compute_dice, compute_hausdorff_distance
(percentile=95) and compute_average_surface_distance(symmetric=True), on random 2-D and 3-D cases with
per-case anisotropic spacing.

MONAI returns NaN or inf where a mask is empty (shiftbn scores those by its documented rules), so the
distance comparison uses cases where every class is in both masks; Dice is compared on all cases with
``ignore_empty=False`` (MONAI's 1 for two empty masks, 0 for one, as shiftbn). MONAI computes in float32.
"""

import numpy as np
import pytest
import torch

from shiftbn.evaluate.dense import CaseScorer
from tests.integrations._lib import need

K = 3


def _label_map(rng, shape):
    """Random boxes of classes 1..K-1, drawn again until every class is left visible."""
    while True:
        out = np.zeros(shape, np.int64)
        for c in range(1, K):
            size = rng.integers(2, [s // 2 for s in shape])
            start = rng.integers(0, [s - z for s, z in zip(shape, size, strict=True)])
            out[tuple(slice(a, a + z) for a, z in zip(start, size, strict=True))] = c
        if all((out == c).any() for c in range(1, K)):
            return out


def _cases(rng, shape, n):
    """n cases of (ground truth, prediction), independent random boxes."""
    return np.stack([_label_map(rng, shape) for _ in range(n)]), np.stack([_label_map(rng, shape) for _ in range(n)])


def _onehot(labels):
    return torch.nn.functional.one_hot(torch.as_tensor(labels), K).movedim(-1, 1).float()


@pytest.mark.parametrize("shape", [(24, 20), (12, 14, 10)])
def test_dense_scores_match_monai(shape):
    need("monai")
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    rng = np.random.default_rng(0)
    gt, pred = _cases(rng, shape, 6)
    spacing = rng.uniform(0.5, 2.0, size=(6, len(shape)))
    rows = CaseScorer(K)(_onehot(pred), {"mask": torch.as_tensor(gt), "spacing": spacing}).numpy()
    dice, hd95, asd = rows[:, :K - 1], rows[:, 2 * (K - 1):3 * (K - 1)], rows[:, 3 * (K - 1):]

    y_pred, y = _onehot(pred), _onehot(gt)
    ref_dice = compute_dice(y_pred, y, include_background=False, ignore_empty=False).numpy()
    np.testing.assert_allclose(dice, ref_dice, atol=1e-6)

    sp = [list(map(float, s)) for s in spacing]
    ref_hd = compute_hausdorff_distance(y_pred, y, include_background=False, percentile=95, spacing=sp).numpy()
    ref_asd = compute_average_surface_distance(y_pred, y, include_background=False, symmetric=True, spacing=sp).numpy()
    np.testing.assert_allclose(hd95, ref_hd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(asd, ref_asd, rtol=1e-5, atol=1e-5)


def test_empty_masks_dice_matches_monai_ignore_empty_false():
    need("monai")
    from monai.metrics import compute_dice

    gt = np.zeros((3, 8, 8), np.int64)
    pred = gt.copy()
    gt[1, 2:5, 2:5] = 1  # missed
    pred[2, 2:5, 2:5] = 2  # false alarm; case 0: both empty
    rows = CaseScorer(K)(_onehot(pred), torch.as_tensor(gt)).numpy()
    ref = compute_dice(_onehot(pred), _onehot(gt), include_background=False, ignore_empty=False).numpy()
    np.testing.assert_allclose(rows[:, :K - 1], ref, atol=1e-6)
