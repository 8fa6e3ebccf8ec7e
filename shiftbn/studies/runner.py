"""Running a study cell by cell in a run folder, so that an interrupted run resumes exactly; under
``torch.distributed`` the cells are spread over the ranks."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from shiftbn._log import bars_wanted
from shiftbn.bn.distributed import RankSync, solo
from shiftbn.studies.runs import RunFolder
from shiftbn.studies.spec import StudySpec


def run_study(spec: StudySpec, run: RunFolder | None, *, quick: bool = False, progress: bool = True) -> pd.DataFrame:
    """Run ``spec`` one (seed, axis value) cell at a time in ``run``; completed cells are reused.

    Each cell is the study's own ``cell`` for one seed and one value of its axis, so the combined
    table equals one uninterrupted ``Study.run``. Writes ``results.csv`` and ``figure.png`` and
    returns the table.

    Under ``torch.distributed`` (W ranks, e.g. ``torchrun``): the cells still to compute are dealt to
    the ranks in rounds of W, each computed whole on one rank as by one process (``solo``); rank 0
    alone holds ``run`` (other ranks pass ``None``), writes each round's cells as they arrive (so a
    resume, in any number of processes, recomputes only unfinished cells), then ``results.csv`` and
    the figure. Every rank returns the same table. A cell's error is raised on every rank after the
    round's other cells are stored; a rank that dies makes the others raise ``PeerLostError`` and
    leaves only whole cells in the folder (no ``results.csv``).
    """
    study = spec.build(quick)
    ds = spec.load_dataset()
    cells = list(study.cells(ds))
    keys = [f"seed={seed}__{study.axis}={value}" for seed, value in cells]
    sync = RankSync()
    if sync.world == 1:
        if run is None:
            raise ValueError("run_study needs a RunFolder")
        frames = [run.cell(key, lambda s=seed, v=value: study.cell(ds, s, v))
                  for key, (seed, value) in tqdm(list(zip(keys, cells, strict=True)), desc=spec.name,
                                                 disable=not bars_wanted(progress))]
        table = pd.concat(frames, ignore_index=True)
    else:
        table = _spread(study, ds, cells, keys, run, sync, spec.name, progress)
    if run is not None:
        run.write_results(table)
        from shiftbn.studies.report import save, study_figure

        save(study_figure(study.figure, table, word=ds.source_word), run.path / "figure.png")
    return table


def _spread(study, ds, cells: list[tuple[int, Any]], keys: list[str], run: RunFolder | None, sync: RankSync,
            name: str, progress: bool) -> pd.DataFrame:
    """The cells dealt to the ranks in rounds; rank 0 stores them; every rank gets the combined table."""
    lead = sync.rank == 0

    def status() -> list[str] | None:
        if lead and run is None:
            raise ValueError("under torch.distributed rank 0 must hold the RunFolder (other ranks pass None)")
        return [run._read(k)[1] for k in keys] if lead else None

    why = sync.gather(status)[0]  # "" = stored whole; else why it must be computed
    todo = [i for i, w in enumerate(why) if w]
    fresh: dict[int, pd.DataFrame] = {}
    bar = tqdm(total=len(todo), desc=name, disable=not (lead and bars_wanted(progress)))
    for start in range(0, len(todo), sync.world):
        mine = todo[start:start + sync.world]

        def compute(mine=mine) -> dict[str, Any] | None:
            if sync.rank >= len(mine):
                return None
            i = mine[sync.rank]
            t0 = time.perf_counter()
            try:
                with solo():
                    table = study.cell(ds, *cells[i])
            except Exception as exc:  # stored rounds stay; every rank raises it below
                return {"i": i, "ok": False, "type": type(exc).__name__, "message": str(exc)}
            return {"i": i, "ok": True, "table": table, "seconds": time.perf_counter() - t0}

        got = [g for g in sync.gather(compute) if g is not None]
        if lead:
            for g in got:
                if g["ok"]:
                    fresh[g["i"]] = run.store(keys[g["i"]], g["table"], g["seconds"], why[g["i"]])
        failed = [g for g in got if not g["ok"]]
        if failed:
            g = failed[0]
            raise RuntimeError(f"cell {keys[g['i']]!r} failed on rank {mine.index(g['i'])} of "
                               f"{sync.world}: {g['type']}: {g['message']}")
        bar.update(len(mine))
    bar.close()

    def combined() -> pd.DataFrame | None:
        if not lead:
            return None
        frames = [fresh[i] if i in fresh else run.cell(k, _vanished(k)) for i, k in enumerate(keys)]
        return pd.concat(frames, ignore_index=True)

    return sync.gather(combined)[0]


def _vanished(key: str):
    def compute() -> pd.DataFrame:
        raise RuntimeError(f"cell {key!r} was stored whole when the run started and is gone or damaged now; "
                           "another process is writing this run folder")

    return compute
