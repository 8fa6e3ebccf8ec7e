import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shiftbn import _io
from shiftbn._io import FolderLock, LockedError, atomic_save_torch, atomic_write_bytes, atomic_write_text
from shiftbn.studies import runs

IO_FILE = Path(_io.__file__)


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that takes the folder lock (loading _io.py alone: fast) and waits."""
    folder.mkdir(parents=True, exist_ok=True)
    code = textwrap.dedent(f"""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("shiftbn_io_alone", {str(IO_FILE)!r})
        io = importlib.util.module_from_spec(spec); spec.loader.exec_module(io)
        lock = io.FolderLock({str(folder)!r}); lock.acquire()
        print("locked", flush=True); time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_io_is_a_bottom_module_importing_only_the_standard_library():
    tree = ast.parse(IO_FILE.read_text())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert top <= set(sys.stdlib_module_names) | {"__future__"}, top


def test_runs_keeps_the_atomic_writers_importable():
    assert runs.atomic_write_bytes is atomic_write_bytes and runs.atomic_write_text is atomic_write_text
    assert runs.atomic_save_torch is atomic_save_torch


def test_atomic_save_torch_round_trips(tmp_path):
    import torch

    atomic_save_torch(tmp_path / "w.pt", {"a": torch.arange(3)})
    assert torch.load(tmp_path / "w.pt", weights_only=True)["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]


def test_lock_held_by_another_process_names_its_pid_and_dies_with_it(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(LockedError, match=f"process {proc.pid}") as info:
            FolderLock(tmp_path).acquire()
        assert info.value.pid == proc.pid
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    with FolderLock(tmp_path) as lock:  # a dead holder's lock does not block
        assert lock.locked
    assert not lock.locked


def test_lock_is_shared_within_a_process_and_released_with_the_last_share(tmp_path):
    a, b = FolderLock(tmp_path), FolderLock(tmp_path)
    a.acquire()
    b.acquire()
    a.release()
    code = (f"import importlib.util; s = importlib.util.spec_from_file_location('m', {str(IO_FILE)!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            f"m.FolderLock({str(tmp_path)!r}).acquire()")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 1  # b still holds it
    b.release()
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_a_write_past_the_file_size_limit_names_the_file_and_leaves_it_as_it_was(tmp_path):
    import errno
    import resource

    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # Python ignores SIGXFSZ: the write fails EFBIG
    try:
        with pytest.raises(OSError, match=r"cannot write .*out\.bin: the file-size limit was hit \(5,000 bytes to "
                                          r"write; see ulimit -f\).*nothing was written") as info:
            atomic_write_bytes(path, b"x" * 5000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.errno == errno.EFBIG
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def _writer_killed_mid_write(folder: Path, kill: bool) -> tuple[subprocess.Popen, Path]:
    """A process (``_io.py`` loaded alone) stopped inside ``atomic_write_bytes`` after its temp file is
    written, before the rename; SIGKILLed when ``kill``. Returns it and its temp file."""
    code = textwrap.dedent(f"""
        import importlib.util, os, time
        spec = importlib.util.spec_from_file_location("shiftbn_io_alone", {str(IO_FILE)!r})
        io = importlib.util.module_from_spec(spec); spec.loader.exec_module(io)
        def stop(src, dst):
            print(src, flush=True); time.sleep(60)
        io.os.replace = stop
        io.atomic_write_bytes(io.Path({str(folder / "cell.csv")!r}), b"data")
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_file() and tmp.name.startswith(f".cell.csv.{proc.pid}.") and tmp.name.endswith(".tmp")
    if kill:
        _stop(proc)
    return proc, tmp


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    proc.stdout.close()


def test_only_temp_files_of_dead_writers_are_removed(tmp_path):
    dead, dead_tmp = _writer_killed_mid_write(tmp_path, kill=True)
    live, live_tmp = _writer_killed_mid_write(tmp_path, kill=False)
    try:
        mine = tmp_path / f".x.csv.{os.getpid()}.abc123.tmp"
        mine.write_bytes(b"")
        others = [tmp_path / ".notes.tmp", tmp_path / "data.99999999.x.tmp", tmp_path / "cell.csv"]
        for p in others:
            p.write_bytes(b"")
        assert _io.remove_stale_temps(tmp_path) == [dead_tmp]
        assert not dead_tmp.exists() and live_tmp.exists() and mine.exists() and all(p.exists() for p in others)
    finally:
        _stop(live)
    assert _io.remove_stale_temps(tmp_path) == [live_tmp]
    assert _io.remove_stale_temps(tmp_path / "missing") == []
