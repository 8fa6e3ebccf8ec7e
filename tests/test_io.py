import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shiftbn import _io, runs
from shiftbn._io import FolderLock, LockedError, atomic_save_torch, atomic_write_bytes, atomic_write_text

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
