"""Running a study cell by cell in a run folder, so that an interrupted run can resume."""

from __future__ import annotations

import inspect
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from shiftbn.protocols.common import as_seeds
from shiftbn.protocols.spec import PROTOCOLS, StudySpec
from shiftbn.runs import RunFolder

# The grid axis each protocol loops over (inside its seed loop); one cell = one seed x one value.
SPLIT_KEYS = {
    "held_out_sources": "held_out",
    "batch_composition": "modes",
    "ema_vs_precise": "batch_sizes",
    "normalization_batch_size": "ghost_sizes",
    "shared_domains": "train_norms",
    "leakage_probe": "compositions",
}


def _axis_values(spec: StudySpec, params: dict[str, Any], ds) -> list:
    key = SPLIT_KEYS[spec.protocol]
    if key in params and params[key] is not None:
        return list(params[key])
    if key == "held_out":
        return list(ds.sources_present)
    return list(inspect.signature(PROTOCOLS[spec.protocol]).parameters[key].default)


def run_study(spec: StudySpec, run: RunFolder, *, quick: bool = False, progress: bool = True) -> pd.DataFrame:
    """Run ``spec`` one (seed, grid value) cell at a time in ``run``; completed cells are reused.

    Each cell is the protocol called with one seed and one value of its main grid axis, so the
    combined table equals one uninterrupted call. Writes ``results.csv`` and ``figure.png`` and
    returns the table.
    """
    params = spec.resolved(quick)
    ds = spec.load_dataset()
    key = SPLIT_KEYS[spec.protocol]
    values = _axis_values(spec, params, ds)
    seeds = as_seeds(params.get("seeds", 0))
    cells = [(s, v) for s in seeds for v in values]
    frames = []
    for seed, value in tqdm(cells, desc=spec.name, disable=not progress):
        cell_params = {**params, "seeds": [seed], key: [value]}
        frames.append(run.cell(f"seed={seed}__{key}={value}",
                               lambda p=cell_params: PROTOCOLS[spec.protocol](ds, progress=False, **p)))
    table = pd.concat(frames, ignore_index=True)
    run.write_results(table)
    from shiftbn.report import save, study_figure

    save(study_figure(spec.protocol, table), run.path / "figure.png")
    return table
