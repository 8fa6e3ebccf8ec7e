"""Figures (seaborn), the self-contained HTML report and ``build_report`` for any model and data."""

from shiftbn.studies.report.build import Outputs, build_report, interval_cells, render_report
from shiftbn.studies.report.calibration import (
    calibration_table,
    confusion_figure,
    per_class_table,
    reliability_diagrams,
    reliability_points,
)
from shiftbn.studies.report.figures import (
    ema_curves,
    heldout_bars,
    lab_samples,
    matrix_heatmap,
    save,
    shift_profile,
    study_figure,
)
from shiftbn.studies.report.html import write_report
from shiftbn.studies.report.reading import findings

__all__ = ["Outputs", "build_report", "calibration_table", "confusion_figure", "ema_curves", "findings",
           "heldout_bars", "interval_cells", "lab_samples", "matrix_heatmap", "per_class_table", "reliability_diagrams",
           "reliability_points", "render_report", "save", "shift_profile", "study_figure", "write_report"]
