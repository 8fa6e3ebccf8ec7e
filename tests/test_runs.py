import json

import pandas as pd
import pytest

from shiftbn.runs import RunFolder, atomic_write_text


def test_cells_are_written_once_and_read_back(tmp_path):
    run = RunFolder(tmp_path / "r", {"a": 1})
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"x": [1.5, 2.5], "name": ["p", "q"]})

    first = run.cell("seed=0 / lab a", compute)
    again = RunFolder(tmp_path / "r", {"a": 1}, resume=True).cell("seed=0 / lab a", compute)
    assert calls == [1]
    pd.testing.assert_frame_equal(first, again)
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [entry["status"] for entry in log] == ["computed", "skipped"]
    assert json.loads((tmp_path / "r" / "environment.json").read_text())["torch"]


def test_existing_run_needs_resume_and_same_config(tmp_path):
    RunFolder(tmp_path / "r", {"a": 1})
    with pytest.raises(FileExistsError, match="--resume"):
        RunFolder(tmp_path / "r", {"a": 1})
    with pytest.raises(ValueError, match="different configuration"):
        RunFolder(tmp_path / "r", {"a": 2}, resume=True)


def test_failed_cell_leaves_nothing_behind(tmp_path):
    run = RunFolder(tmp_path / "r", {})

    def boom():
        raise RuntimeError("midway")

    with pytest.raises(RuntimeError):
        run.cell("k", boom)
    assert not run.done("k")
    assert list((tmp_path / "r" / "cells").iterdir()) == []


def test_atomic_write_replaces_whole_file_and_results_parquet(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    run = RunFolder(tmp_path / "r", {})
    run.write_results(pd.DataFrame({"v": [1.0]}))
    assert (tmp_path / "r" / "results.csv").exists()
    pytest.importorskip("pyarrow")
    assert pd.read_parquet(tmp_path / "r" / "results.parquet")["v"].tolist() == [1.0]
