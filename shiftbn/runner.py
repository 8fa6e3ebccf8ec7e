"""Running a study cell by cell in a run folder, so that an interrupted run resumes exactly."""

from __future__ import annotations

import pandas as pd
from tqdm.auto import tqdm

from shiftbn._log import bars_wanted
from shiftbn.protocols import StudySpec
from shiftbn.runs import RunFolder


def run_study(spec: StudySpec, run: RunFolder, *, quick: bool = False, progress: bool = True) -> pd.DataFrame:
    """Run ``spec`` one (seed, axis value) cell at a time in ``run``; completed cells are reused.

    Each cell is the study's own ``cell`` for one seed and one value of its axis, so the combined
    table equals one uninterrupted ``Study.run``. Writes ``results.csv`` and ``figure.png`` and
    returns the table.
    """
    study = spec.build(quick)
    ds = spec.load_dataset()
    frames = []
    for seed, value in tqdm(list(study.cells(ds)), desc=spec.name, disable=not bars_wanted(progress)):
        frames.append(run.cell(f"seed={seed}__{study.axis}={value}",
                               lambda s=seed, v=value: study.cell(ds, s, v)))
    table = pd.concat(frames, ignore_index=True)
    run.write_results(table)
    from shiftbn.report import save, study_figure

    save(study_figure(study.figure, table), run.path / "figure.png")
    return table
