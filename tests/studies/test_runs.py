import json
import os

import pandas as pd
import pytest

from shiftbn.studies.runs import RunFolder, atomic_write_text


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


def _table(n=4):
    return pd.DataFrame({"x": [float(i) + 0.5 for i in range(n)], "name": [f"r{i}" for i in range(n)]})


def test_environment_records_the_device_used(tmp_path):
    from shiftbn.studies.runs import environment

    assert environment(device="meta")["device"] == "meta"
    RunFolder(tmp_path / "r", {}, device="meta").close()
    assert json.loads((tmp_path / "r" / "environment.json").read_text())["device"] == "meta"
    assert json.loads((tmp_path / "r" / "run.json").read_text())["numerics"]["device"] == "meta"


@pytest.mark.parametrize("damage, why", [
    (lambda b: b[: len(b) - 12], "checksum mismatch"),                       # truncated mid-row
    (lambda b: b.split(b"\n", 1)[1], "no checksum"),                          # header lost
    (lambda b: b.replace(b"r1", b"r9"), "checksum mismatch"),                 # a flipped value
])
def test_damaged_cell_is_recomputed_on_resume_never_trusted(tmp_path, damage, why):
    calls = []

    def compute():
        calls.append(1)
        return _table()

    with RunFolder(tmp_path / "r", {"a": 1}) as run:
        full = run.cell("k", compute)
        path = run.cell_path("k")
    path.write_bytes(damage(path.read_bytes()))
    with RunFolder(tmp_path / "r", {"a": 1}, resume=True) as run:
        assert not run.done("k")
        with pytest.warns(RuntimeWarning, match=why):
            again = run.cell("k", compute)
        assert run.done("k")
    assert calls == [1, 1]
    pd.testing.assert_frame_equal(again, full)
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["status"] == "computed" and log[-1]["note"] == f"recomputed: {why}"


def test_keys_that_slug_alike_are_different_cells(tmp_path):
    keys = ["site a", "site/a", "site_a", "Site a", "é", "è", "", "a" * 300]
    with RunFolder(tmp_path / "r", {}) as run:
        for i, key in enumerate(keys):
            run.cell(key, lambda i=i: _table(i + 1))
    with RunFolder(tmp_path / "r", {}, resume=True) as run:
        assert [len(run.cell(key, lambda: pytest.fail("recomputed"))) for key in keys] == list(range(1, 9))
        names = {run.cell_path(k).name for k in keys}
    assert len(names) == len(keys) and all(len(n) < 120 for n in names)
    assert "site_a" in run.cell_path("site a").name  # still readable


def test_old_style_folder_is_refused_clearly_on_resume(tmp_path):
    folder = tmp_path / "old"
    (folder / "cells").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"a": 1}))
    (folder / "cells" / "k.csv").write_text("x\n1\n")
    with pytest.raises(ValueError, match="older shiftbn.*another --out"):
        RunFolder(folder, {"a": 1}, resume=True)


def test_resume_names_the_changed_config_key_and_both_values(tmp_path):
    RunFolder(tmp_path / "r", {"a": 1, "params": {"steps": 150, "lr": 0.1}}).close()
    with pytest.raises(ValueError, match=r"different configuration: params\.steps was 150, now 300"):
        RunFolder(tmp_path / "r", {"a": 1, "params": {"steps": 300, "lr": 0.1}}, resume=True)
    with pytest.raises(ValueError, match=r"params\.seeds was '<absent>', now \[0\]"):
        RunFolder(tmp_path / "r", {"a": 1, "params": {"steps": 150, "lr": 0.1, "seeds": [0]}}, resume=True)


def test_resume_under_another_thread_count_or_device_is_refused(tmp_path):
    import torch

    RunFolder(tmp_path / "r", {}).close()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.raises(ValueError, match=f"numerics: torch_threads was {threads}, now {threads + 1}"):
            RunFolder(tmp_path / "r", {}, resume=True)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="device was 'cpu', now 'meta'"):
        RunFolder(tmp_path / "r", {}, resume=True, device="meta")
    RunFolder(tmp_path / "r", {}, resume=True).close()


def test_live_run_refuses_a_second_process_and_close_releases(tmp_path):
    import subprocess
    import sys

    from tests.test_io import IO_FILE

    run = RunFolder(tmp_path / "r", {})
    code = (f"import importlib.util; s = importlib.util.spec_from_file_location('m', {str(IO_FILE)!r}); "
            f"m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            f"m.FolderLock({str(tmp_path / 'r')!r}).acquire()")
    busy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert busy.returncode == 1 and f"in use by process {os.getpid()}" in busy.stderr
    run.close()
    run.close()
    with pytest.raises(ValueError, match="closed"):
        run.cell("k", _table)
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_out_that_is_a_file_is_refused_clearly(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        RunFolder(tmp_path / "f", {})
    with pytest.raises(FileExistsError, match="a parent is a file"):
        RunFolder(tmp_path / "f" / "sub", {})


def test_starting_while_another_process_starts_the_same_folder_is_refused(tmp_path):
    from shiftbn.studies.runs import LockedError
    from tests.test_io import _holder

    proc = _holder(tmp_path / "r")  # the other process holds the lock but has not written config.json yet
    try:
        with pytest.raises(LockedError, match=f"process {proc.pid}"):
            RunFolder(tmp_path / "r", {"a": 1})
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["run.lock"]  # nothing written


def test_a_cell_written_but_not_logged_is_logged_as_recovered_on_resume(tmp_path):
    with RunFolder(tmp_path / "r", {"a": 1}) as run:
        run.cell("c", lambda: pd.DataFrame({"x": [1]}))
    log_path = tmp_path / "r" / "log.jsonl"
    log_path.write_text("")  # as if killed after the cell's atomic write, before its log line
    with RunFolder(tmp_path / "r", {"a": 1}, resume=True) as run:
        run.cell("c", lambda: pytest.fail("a whole cell must not be recomputed"))
    log = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert [e["status"] for e in log] == ["computed", "skipped"]
    assert "recovered" in log[0]["note"]


def test_resume_removes_the_temp_files_of_a_writer_killed_mid_write(tmp_path):
    """A SIGKILL between an atomic write's temp file and its rename leaves ``.<name>.<pid>.<rand>.tmp``;
    resuming removes it (its writer is dead), the cell is computed again, a live process's file stays."""
    from tests.test_io import _stop, _writer_killed_mid_write

    folder = tmp_path / "r"
    with RunFolder(folder, {"a": 1}) as run:
        run.cell("c", lambda: pd.DataFrame({"x": [1]}))
    _, dead_tmp = _writer_killed_mid_write(folder / "cells", kill=True)
    _, root_tmp = _writer_killed_mid_write(folder, kill=True)
    live, live_tmp = _writer_killed_mid_write(folder / "cells", kill=False)
    try:
        with RunFolder(folder, {"a": 1}, resume=True) as run:
            assert not dead_tmp.exists() and not root_tmp.exists() and live_tmp.exists()
            assert run.cell("c", lambda: pytest.fail("recomputed")).equals(pd.DataFrame({"x": [1]}))
    finally:
        _stop(live)
    with RunFolder(folder, {"a": 1}, resume=True):
        pass
    assert not [p.name for p in folder.rglob("*.tmp")]
