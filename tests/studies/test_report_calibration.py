"""The report's calibration and confusion figures: labels a reader can use (no wall of "0.00"), bin counts."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from shiftbn.studies.report.calibration import confusion_figure, reliability_diagrams, reliability_points  # noqa: E402


def _outputs(k: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 3.0  # mostly right: most off-diagonal cells stay empty
    return y, logits


def test_confusion_labels_only_the_cells_something_fell_into():
    y, logits = _outputs(10, 60)
    fig = confusion_figure({("ema", "a"): logits}, {"a": y}, ["a"], "ema")
    texts = [t.get_text() for t in fig.axes[0].texts if t.get_text()]
    cm = np.zeros((10, 10), int)
    np.add.at(cm, (y, logits.argmax(1)), 1)
    assert len(texts) == (cm > 0).sum() < 50 and "0.00" not in texts
    plt.close(fig)
    y, logits = _outputs(12, 60)  # more classes than can be labeled legibly: colours only
    fig = confusion_figure({("ema", "a"): logits}, {"a": y}, ["a"], "ema")
    assert not [t for t in fig.axes[0].texts if t.get_text()]
    plt.close(fig)


def test_reliability_panels_show_each_bins_sample_count():
    y, logits = _outputs(3, 50)
    other = logits * 0.3
    fig = reliability_diagrams({("ema", "a"): logits, ("target", "a"): other}, {"a": y}, ["a"])
    counts = next(ax for ax in fig.axes if ax.get_ylabel() == "samples per bin")
    heights = [p.get_height() for p in counts.patches]
    want = [*reliability_points(logits, y)["n"], *reliability_points(other, y)["n"]]
    assert heights == want and sum(heights) == 100
    plt.close(fig)


def test_confusion_figure_does_not_draw_the_figure_once_per_site(monkeypatch):
    # seaborn's heatmap drew the whole canvas for each panel: quadratic in the number of sites
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    draws = []
    real = FigureCanvasAgg.draw
    monkeypatch.setattr(FigureCanvasAgg, "draw", lambda self, *a, **k: (draws.append(1), real(self, *a, **k))[1])
    sites = [f"s{i}" for i in range(6)]
    outputs, labels = {}, {}
    for i, site in enumerate(sites):
        labels[site], outputs[("ema", site)] = _outputs(3, 40 + i)
    fig = confusion_figure(outputs, labels, sites, "ema")
    assert len(draws) <= 1 and len([ax for ax in fig.axes if ax.get_title()]) == 6
    plt.close(fig)
