"""Per-case segmentation scores: Dice, IoU, HD95 and average surface distance per foreground class.

Why: a segmentation cell is a mean over cases (images or volumes) and its interval resamples cases,
so every batch is reduced at once to one row of numbers per case and its outputs are dropped.

Definitions, per case and foreground class ``c`` (``P``: prediction == c, ``G``: ground truth == c):

- ``dice = 2 |P & G| / (|P| + |G|)``, ``iou = |P & G| / |P | G|`` (torchmetrics' ``dice_score`` and
  ``mean_iou``, per class, per case).
- Edges: the voxels of a mask that a binary erosion by the face-connected cross removes (scipy's
  default structure; voxels outside the image count as background, so a mask touching the border has
  an edge there). This is MONAI's ``get_mask_edges`` without sub-voxel areas.
- Surface distances: from every edge voxel of ``P`` to the nearest edge voxel of ``G`` and back,
  Euclidean in physical units (the spacing, e.g. mm; exact EDT as MONAI's ``get_surface_distance``).
- ``hd95``: the larger of the two directed 95th percentiles (linear interpolation), as MONAI's
  ``compute_hausdorff_distance(percentile=95)``; ``asd``: the mean of both directed sets concatenated,
  as MONAI's ``compute_average_surface_distance(symmetric=True)``.

Empty masks (never dropped, so means stay finite and a missed structure counts):

- ``P`` and ``G`` both empty: perfect agreement, ``dice = iou = 1``, ``hd95 = asd = 0``.
- exactly one of them empty: ``dice = iou = 0``, ``hd95 = asd =`` the image diagonal in physical
  units, ``sqrt(sum((size_i * spacing_i) ** 2))``, the largest distance the image allows.

A case whose logits hold NaN or inf has an all-NaN row (its prediction is undefined), so every mean it
enters is NaN rather than a number computed from an arbitrary argmax.

Row layout (``dense_columns``): ``R = 4 (K - 1)`` columns, quantity-major, ``dice_1 .. dice_{K-1},
iou_1 .., hd95_1 .., asd_1 ..``; the number of classes is read back from ``R`` alone.

torchmetrics 1.9's surface-distance helpers are not used for the distances: its ``distance_transform``
accepts 2-D images only (3-D raises) and its PyTorch engine holds every foreground-background pair
(quadratic memory); scipy's EDT is exact, linear and takes the spacing.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

QUANTITIES = ("dice", "iou", "hd95", "asd")
_PERCENTILE = 95.0


def dense_columns(num_classes: int) -> list[str]:
    """The column names of ``CaseScorer(num_classes)``'s rows, quantity-major.

    Why: one rule for the row layout, so the metric table and a report read the columns by name.

    Args:
        num_classes: K, the number of classes including background (class 0).

    Returns:
        ``[dice_1, .., dice_{K-1}, iou_1, .., hd95_1, .., asd_1, ..]``, ``4 (K - 1)`` names.

    Example:
        >>> dense_columns(3)
        ['dice_1', 'dice_2', 'iou_1', 'iou_2', 'hd95_1', 'hd95_2', 'asd_1', 'asd_2']
    """
    return [f"{q}_{c}" for q in QUANTITIES for c in range(1, num_classes)]


def parse_dense_name(name: str) -> tuple[str, int | None] | None:
    """``"dice"`` -> ``("dice", None)``, ``"hd95:2"`` -> ``("hd95", 2)``; ``None`` for any other name.

    Why: the per-class metrics (``dice:<c>``) are parametrized names of the metric table, not entries.

    Args:
        name: a metric name.

    Returns:
        ``(quantity, class or None)``, or ``None`` when ``name`` is not a segmentation metric.

    Example:
        >>> parse_dense_name("dice:2"), parse_dense_name("asd"), parse_dense_name("dice:x")
        (('dice', 2), ('asd', None), None)
    """
    base, sep, cls = name.partition(":")
    if base not in QUANTITIES:
        return None
    if not sep:
        return base, None
    return (base, int(cls)) if cls.isdigit() else None


def case_values(name: str, rows: np.ndarray | torch.Tensor) -> np.ndarray:
    """One segmentation metric per case from ``CaseScorer`` rows.

    Why: a matrix cell is the mean of these values, and case-level bootstrap or paired comparisons
    resample them.

    Args:
        name: ``dice``, ``iou``, ``hd95`` or ``asd`` (per case: the mean over the foreground classes),
            or ``<quantity>:<c>`` for foreground class ``c`` alone (e.g. ``dice:2``).
        rows: (N, R) per-case rows of ``CaseScorer`` (``R = 4 (K - 1)``, ``dense_columns``).

    Returns:
        float64 array (N,).

    Raises:
        ValueError: ``name`` is not a segmentation metric, ``rows`` is not (N, 4 (K - 1)), or class
            ``c`` is not a foreground class of the rows.

    Example:
        >>> rows = np.array([[1.0, 0.5, 1.0, 1 / 3, 0, 2, 0, 1]])  # K = 3: dice_1, dice_2, iou_1, ..
        >>> case_values("dice", rows), case_values("hd95:2", rows)
        (array([0.75]), array([2.]))
    """
    parsed = parse_dense_name(name)
    if parsed is None:
        raise ValueError(f"{name!r} is not a segmentation metric; use one of {QUANTITIES} or e.g. 'dice:1'")
    quantity, cls = parsed
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] == 0 or rows.shape[1] % len(QUANTITIES):
        raise ValueError(f"segmentation metrics take CaseScorer rows (N, 4 (K - 1)); got shape {rows.shape}. Score "
                         "each batch with CaseScorer(num_classes) and stack its rows")
    k1 = rows.shape[1] // len(QUANTITIES)
    block = rows[:, QUANTITIES.index(quantity) * k1:(QUANTITIES.index(quantity) + 1) * k1]
    if cls is None:
        return block.mean(axis=1)
    if not 1 <= cls <= k1:
        raise ValueError(f"{name!r} asks for class {cls} but the rows hold foreground classes 1..{k1}")
    return block[:, cls - 1].copy()


class CaseScorer:
    """Scores one batch of segmentation logits per case: Dice, IoU, HD95, ASD per foreground class.

    Why: the evaluation keeps only these (N, R) rows, never the (N, K, *S) outputs, so its memory is
    flat in the number of cases. Definitions and empty-mask rules: the module docstring.

    Args:
        num_classes: K >= 2, the number of classes (channels of the logits) including background 0.

    Returns:
        A stateless scorer; ``scorer(outputs, target)`` gives the float64 CPU rows (B, R) of one
        batch, columns ``scorer.columns`` (``dense_columns(num_classes)``).

    Raises:
        ValueError: ``num_classes`` is not an int >= 2.

    Example:
        >>> scorer = CaseScorer(2)
        >>> mask = torch.zeros(1, 6, 6, dtype=torch.long)
        >>> mask[0, 1:4, 1:4] = 1
        >>> logits = torch.nn.functional.one_hot(mask, 2).movedim(-1, 1).float()
        >>> scorer(logits, mask).tolist()  # dice, iou, hd95, asd of a perfect prediction
        [[1.0, 1.0, 0.0, 0.0]]
    """

    def __init__(self, num_classes: int):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background + at least one class); got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.columns = dense_columns(self.num_classes)

    def __call__(self, outputs: torch.Tensor, target: torch.Tensor | Mapping) -> torch.Tensor:
        """Per-case rows of one batch.

        Args:
            outputs: logits (B, K, *S), S = (H, W) or (D, H, W); the prediction is ``outputs.argmax(1)``.
            target: int label map (B, *S) with values in [0, K), or a dict ``{"mask": (B, *S),
                "spacing": (B, len(S)) or (len(S),)}``, spacing in physical units per axis of S
                (default 1).

        Returns:
            float64 CPU tensor (B, R), columns ``self.columns``.

        Raises:
            TypeError: ``outputs`` is not a tensor, or the mask is not an integer label map.
            ValueError: shapes, labels or spacing do not fit (the message names them and the fix).
        """
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(f"outputs must be a tensor of logits (B, K, *S); got {type(outputs).__name__}")
        if outputs.ndim not in (4, 5) or outputs.shape[1] != self.num_classes:
            raise ValueError(f"outputs must be logits (B, {self.num_classes}, H, W) or (B, {self.num_classes}, D, H, "
                             f"W) for CaseScorer({self.num_classes}); got shape {tuple(outputs.shape)}")
        mask, spacing = _unpack(target, outputs.shape)
        _check_labels(mask, self.num_classes)
        outputs = outputs.detach()
        pred = outputs.argmax(1).cpu()
        finite = torch.isfinite(outputs).flatten(1).all(1).cpu()
        rows = torch.cat([_overlap(pred, mask, self.num_classes), _distances(pred, mask, spacing, self.num_classes)], 1)
        rows[~finite] = float("nan")
        return rows


def _unpack(target, shape: torch.Size) -> tuple[torch.Tensor, np.ndarray]:
    """The label map (CPU int64) and the (B, d) float64 spacing of a target."""
    batch, spatial = shape[0], tuple(shape[2:])
    spacing = None
    if isinstance(target, Mapping):
        if "mask" not in target:
            raise ValueError(f"a dict target needs a 'mask' key (and optionally 'spacing'); got keys {list(target)}")
        mask, spacing = target["mask"], target.get("spacing")
    else:
        mask = target
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.as_tensor(np.asarray(mask))
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"target must be an int label map (B, *S) or a dict with 'mask'; got "
                            f"{type(mask).__name__}") from None
    if tuple(mask.shape) != (batch, *spatial):
        raise ValueError(f"target mask has shape {tuple(mask.shape)} but the logits {tuple(shape)} need "
                         f"{(batch, *spatial)}; a one-hot mask (B, K, *S) must be passed as mask.argmax(1)")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"target mask must be an integer label map, got {mask.dtype}; cast it with .long()")
    if spacing is None:
        return mask.cpu().long(), np.ones((batch, len(spatial)))
    try:
        spacing = np.asarray(spacing.detach().cpu() if isinstance(spacing, torch.Tensor) else spacing, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be numbers, (B, {len(spatial)}) physical voxel sizes; got {spacing!r}"
                         ) from None
    if spacing.shape == (len(spatial),):
        spacing = np.broadcast_to(spacing, (batch, len(spatial)))
    if spacing.shape != (batch, len(spatial)):
        raise ValueError(f"spacing has shape {spacing.shape}; give one spacing per case and spatial axis, "
                         f"({batch}, {len(spatial)}) (or ({len(spatial)},) for all cases)")
    if not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ValueError("spacing must be finite and positive (physical size of a voxel per axis); got "
                         f"{spacing.tolist()}")
    return mask.cpu().long(), spacing


def _check_labels(mask: torch.Tensor, k: int) -> None:
    if not mask.numel():
        return
    low, high = int(mask.min()), int(mask.max())
    if low < 0 or high >= k:
        fix = (f"build CaseScorer with num_classes={high + 1}" if low >= 0 and high < 64 else
               "give every voxel a class (an ignore label such as -1 or 255 is not supported: map it to a class)")
        raise ValueError(f"target labels span [{low}, {high}] but the scorer has {k} classes [0, {k}); {fix}")


def _overlap(pred: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, 2 (K - 1)): dice per class, then iou per class; the empty-mask rules applied."""
    from torchmetrics.functional.segmentation import dice_score, mean_iou  # lazy: torchmetrics costs ~1 s

    classes = torch.arange(k).view(1, k, *([1] * (pred.ndim - 1)))
    p, g = pred.unsqueeze(1) == classes, mask.unsqueeze(1) == classes  # bool one-hot: K bytes a voxel
    dice = dice_score(p, g, num_classes=k, include_background=False, average="none", input_format="one-hot")
    iou = mean_iou(p, g, num_classes=k, include_background=False, per_class=True, input_format="one-hot")
    dice, iou = dice.reshape(len(pred), k - 1).double(), iou.reshape(len(pred), k - 1).double()
    both_empty = ~(p[:, 1:] | g[:, 1:]).flatten(2).any(2)
    dice[both_empty], iou[both_empty] = 1.0, 1.0  # torchmetrics: NaN and -1 there
    return torch.cat([dice, iou], 1)


def _distances(pred: torch.Tensor, mask: torch.Tensor, spacing: np.ndarray, k: int) -> torch.Tensor:
    """(B, 2 (K - 1)): hd95 per class, then asd per class; the empty-mask rules applied."""
    pred, mask = pred.numpy(), mask.numpy()
    out = np.zeros((len(pred), 2, k - 1))
    size = np.asarray(pred.shape[1:], dtype=np.float64)
    for b in range(len(pred)):
        diagonal = float(np.sqrt(((size * spacing[b]) ** 2).sum()))
        for c in range(1, k):
            p, g = pred[b] == c, mask[b] == c
            has_p, has_g = bool(p.any()), bool(g.any())
            if has_p != has_g:
                out[b, :, c - 1] = diagonal
            elif has_p:
                to_g, to_p = _surface_distances(p, g, spacing[b])
                out[b, 0, c - 1] = max(np.percentile(to_g, _PERCENTILE), np.percentile(to_p, _PERCENTILE))
                out[b, 1, c - 1] = np.concatenate([to_g, to_p]).mean()
    return torch.from_numpy(out.reshape(len(pred), 2 * (k - 1)))


def _surface_distances(p: np.ndarray, g: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each edge voxel of ``p`` to the edges of ``g``, and back (both masks non-empty)."""
    from scipy import ndimage

    box = ndimage.find_objects((p | g).astype(np.uint8))[0]  # every edge lies in the union's bounding box
    p, g = p[box], g[box]
    edge_p, edge_g = p & ~ndimage.binary_erosion(p), g & ~ndimage.binary_erosion(g)
    to_g = ndimage.distance_transform_edt(~edge_g, sampling=spacing)[edge_p]
    to_p = ndimage.distance_transform_edt(~edge_p, sampling=spacing)[edge_g]
    return to_g, to_p
