"""The matrix refuses statistics it cannot compute and says when they come from few samples."""

import warnings

import numpy as np
import pytest
from torch import nn

import shiftbn as sb
from shiftbn._log import ShiftbnWarning
from shiftbn.data import ArrayDataset, SourceTaggedDataset
from shiftbn.evaluate.matrix import MIN_STATS_SAMPLES


def _images(n=60):
    """``blobs-labs`` as 2x2 one-channel images: a conv BN layer takes statistics even from one sample."""
    ds = sb.load("blobs-labs", n=n, n_features=4)
    x = np.stack([ds.base[i][0].numpy().reshape(1, 2, 2) for i in range(len(ds))])
    return SourceTaggedDataset(ArrayDataset(x, ds.labels), ds.source_ids, ds.labels, source_names=ds.source_names)


def _model():
    return nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))


@pytest.mark.parametrize("n", [0, 1])
def test_num_samples_below_two_is_refused_naming_the_argument(n):
    ds = _images()
    with pytest.raises(ValueError, match=r"num_samples must be >= 2 .*variance.*got " + str(n)):
        sb.cross_source_matrix(_model(), ds, ["target", "stats:*"], progress=False, num_samples=n)


def test_statistics_from_few_samples_warn_once_naming_the_sources():
    ds = _images()
    with pytest.warns(ShiftbnWarning, match=rf"fewer than {MIN_STATS_SAMPLES} samples.*lab_0: 3") as rec:
        sb.cross_source_matrix(_model(), ds, ["target", "stats:*"], progress=False, num_samples=3)
    assert len([w for w in rec if issubclass(w.category, ShiftbnWarning)]) == 1
    with warnings.catch_warnings():  # enough samples, or no statistics needed: silent
        warnings.simplefilter("error", ShiftbnWarning)
        big = _images(4 * 2 * MIN_STATS_SAMPLES + 80)
        sb.cross_source_matrix(_model(), big, ["target"], progress=False)
        sb.cross_source_matrix(_model(), ds, ["ema"], progress=False)


class _CountingSegmenter(nn.Module):
    """A 3-class 2-D segmenter that counts its forward passes."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("metric", ["dice:7", "hd95:3", "dice:0"])
def test_a_class_the_masks_do_not_have_is_refused_before_any_forward(metric):
    ds = sb.load("seg-sites-2d", n=3, size=8, sites=2)
    model = _CountingSegmenter().eval()
    with pytest.raises(ValueError, match=rf"{metric}.*\(metrics=\).*3 classes.*foreground class 1\.\.2"):
        sb.cross_source_matrix(model, ds, ["ema", "target"], [metric, "dice"], progress=False)
    assert model.calls == 0


def test_without_class_names_the_first_batch_checks_the_class_against_the_output_channels():
    named = sb.load("seg-sites-2d", n=3, size=8, sites=2)
    ds = SourceTaggedDataset(named.base, named.source_ids, source_names=named.source_names)
    assert ds.class_names is None
    model = _CountingSegmenter().eval()
    with pytest.raises(ValueError, match=r"dice:7.*\(metrics=\).*3 channels.*foreground class 1\.\.2"):
        sb.cross_source_matrix(model, ds, ["ema"], ["dice:7"], batch_size=2, progress=False)
    assert model.calls == 1
    table = sb.cross_source_matrix(model, ds, ["ema"], ["dice:2"], batch_size=2, progress=False)
    assert list(table.metric.unique()) == ["dice:2"]
