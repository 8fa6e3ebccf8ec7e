"""Figures (seaborn) and the self-contained HTML report."""

from shiftbn.report.figures import (
    ema_curves,
    heldout_bars,
    lab_samples,
    matrix_heatmap,
    save,
    shift_profile,
    study_figure,
)
from shiftbn.report.html import findings, write_report

__all__ = ["ema_curves", "findings", "heldout_bars", "lab_samples", "matrix_heatmap", "save", "shift_profile",
           "study_figure", "write_report"]
