"""Building and caching the C kernel (``bn._native``): a damaged cache heals, a hung compiler is bounded,
one process builds at a time, the source ships as package data.

Processes that load a damaged library may die of a signal (``Bus error``), so those run in children.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shiftbn.bn import _native, native
from tests.timeouts import deadline

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _kernel_lines_heard():
    """These tests read the kernel's own lines on stderr, which the suite's quiet default would silence."""
    from shiftbn import _log

    _log.set_quiet(False)
    yield


needs_kernel = pytest.mark.skipif(not native.available(), reason="no C compiler here: the torch paths are tested")

# a child process: load the kernel, check one batch's sums and BN output against float64 torch; with
# caches as arguments, once per cache (a line "== <cache>" on stderr first); with "--go FILE N", after
# touching FILE.ready.N and waiting for FILE (so that two children start building at once)
_CHILD = r"""
import os, pathlib, sys, time
import torch
from shiftbn.bn import native

def check():
    assert native.available(), "kernel unavailable"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, 5, generator=g) * 3 + 100
    k = torch.full((3,), 100.0, dtype=torch.float64)
    t1, t2 = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    y = native.batch_norm_sums(x, k, t1, t2)
    d = x.double().transpose(0, 1).reshape(3, -1) - 100
    torch.testing.assert_close(t1, d.sum(1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(t2, (d ** 2).sum(1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True), rtol=1e-5,
                               atol=1e-5)

if sys.argv[1:2] == ["--go"]:
    go = sys.argv[2]
    pathlib.Path(go + ".ready." + sys.argv[3]).touch()
    while not pathlib.Path(go).exists():
        time.sleep(0.01)
    check()
    print("statistics ok")
else:
    for cache in sys.argv[1:]:
        os.environ["SHIFTBN_CACHE_DIR"] = cache
        native._state.clear()
        print("== " + cache, file=sys.stderr, flush=True)
        check()
        print("statistics ok " + cache)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CC", "SHIFTBN_NATIVE", "SHIFTBN_KERNEL_BUILD_TIMEOUT", "SHIFTBN_CACHE_DIR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _said(stderr: str) -> dict[str, list[str]]:
    """A child's stderr lines per cache (after each "== <cache>" line)."""
    out: dict[str, list[str]] = {}
    for line in _lines(stderr):
        if line.startswith("== "):
            cache = out.setdefault(line[3:], [])
        else:
            cache.append(line)
    return out


def _foreign_library() -> bytes:
    """A valid shared library that is not ours (one of torch's)."""
    libs = sorted((Path(torch.__file__).parent / "lib").glob("lib*.so*"), key=lambda p: p.stat().st_size)
    assert libs, "torch ships no shared library here"
    return libs[0].read_bytes()


_DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: os.urandom(len(data)),
    "empty": lambda data: b"",
    "foreign": lambda data: _foreign_library(),
}


@needs_kernel
@pytest.mark.slow  # an end-to-end run of 10+ s: make test-slow
def test_a_damaged_cached_kernel_is_rebuilt_by_the_next_process_with_one_line(monkeypatch, tmp_path):
    built = tmp_path / "built"
    monkeypatch.setenv("SHIFTBN_CACHE_DIR", str(built))
    monkeypatch.setattr(native, "_state", {})
    assert native.available()
    caches = []
    for damage, harm in _DAMAGE.items():
        cache = tmp_path / damage
        shutil.copytree(built, cache)
        (so,) = (cache / "kernels").glob("*.so")
        so.write_bytes(harm(so.read_bytes()))
        caches.append(str(cache))
    # one child heals the four caches in turn (a Bus error, -7, on the first would kill it)
    r = subprocess.run([sys.executable, "-c", _CHILD, *caches], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-1500:]}"
    said = _said(r.stderr)
    for cache in caches:
        assert f"statistics ok {cache}" in r.stdout
        assert len(said[cache]) == 1, said[cache]
        assert "damaged" in said[cache][0] and "rebuilding" in said[cache][0], said[cache]
        assert len(list(Path(cache, "kernels").glob("*.so"))) == 1  # the damaged file is gone
    # healed for good: the next process loads each silently
    r = subprocess.run([sys.executable, "-c", _CHILD, *caches], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and all(not lines for lines in _said(r.stderr).values()), r.stderr[-1500:]


@needs_kernel
def test_a_damaged_cache_heals_inside_one_process_too(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SHIFTBN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    assert native.available()
    (so,) = (tmp_path / "kernels").glob("*.so")
    # a new file at the same path: truncating the loaded library in place would crash this process (SIGBUS)
    so.unlink()
    so.write_bytes(b"\0" * 100)
    (record,) = (tmp_path / "kernels").glob("*.json")
    record.write_text("{not json")  # a damaged record as well: never trusted
    monkeypatch.setattr(native, "_state", {})
    capsys.readouterr()
    assert native.available()  # a fresh file name: dlopen cannot hand back an earlier library
    (line,) = _lines(capsys.readouterr().err)
    assert "damaged" in line and "unreadable" in line


def _fake_cc(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def _running(pid: int) -> bool:
    """Whether ``pid`` is alive (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@pytest.mark.parametrize("hangs_on", ["everything", "compiling"])
def test_a_hung_compiler_is_bounded_and_the_torch_path_is_used(monkeypatch, tmp_path, capsys, hangs_on):
    pids = tmp_path / "pids"
    real = shutil.which("cc") or "cc"
    version = "" if hangs_on == "everything" else f'[ "$1" = --version ] && exec {real} --version\n'
    cc = _fake_cc(tmp_path / "cc", f"{version}sleep 60 &\necho $! >> {pids}\nwait\n")
    monkeypatch.delenv("SHIFTBN_NATIVE", raising=False)
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("SHIFTBN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SHIFTBN_KERNEL_BUILD_TIMEOUT", "1.5")
    monkeypatch.setattr(native, "_state", {})
    start = time.monotonic()
    with deadline(20), pytest.warns(RuntimeWarning, match=r"TimeoutError.*1\.5 s.*using the torch reductions"):
        assert not native.available()
    assert time.monotonic() - start < 10  # today's code: 3 x 300 s
    said = _lines(capsys.readouterr().err)
    assert len(said) == (1 if hangs_on == "compiling" else 0), said
    if said:
        assert "building the BN statistics kernel" in said[0] and "at most 1.5 s" in said[0]
    for pid in pids.read_text().split():  # the compiler's own children are killed too
        for _ in range(100):
            if not _running(int(pid)):
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"the hung compiler's child {pid} is still running")
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))


@pytest.mark.parametrize("value", ["0", "-3", "abc", "inf", "nan"])
def test_a_bad_build_timeout_is_named_with_its_fix(monkeypatch, value):
    monkeypatch.delenv("SHIFTBN_NATIVE", raising=False)
    monkeypatch.setenv("SHIFTBN_KERNEL_BUILD_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"SHIFTBN_KERNEL_BUILD_TIMEOUT must be a positive number of seconds, "
                                         f"got '{value}'; set it to e.g. 120"):
        _native.build_timeout()
    monkeypatch.setattr(native, "_state", {})
    with pytest.warns(RuntimeWarning, match="SHIFTBN_KERNEL_BUILD_TIMEOUT.*using the torch reductions"):
        assert not native.available()


@needs_kernel
@pytest.mark.slow  # an end-to-end run of 10+ s: make test-slow
def test_concurrent_processes_build_the_kernel_once(tmp_path):
    log = tmp_path / "cc.log"
    real = shutil.which("cc") or "cc"
    # each compile logs its caller and lingers, so that both processes are inside the build at once
    cc = _fake_cc(tmp_path / "cc", f'[ "$1" = --version ] || {{ echo "$PPID" >> {log}; sleep 0.5; }}\n'
                                   f'exec {real} "$@"\n')
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = _env(CC=cc, SHIFTBN_CACHE_DIR=str(cache))
    kids = [subprocess.Popen([sys.executable, "-c", _CHILD, "--go", str(go), str(i)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        with deadline(60):
            while not all(Path(f"{go}.ready.{i}").exists() for i in range(2)):
                assert all(k.poll() is None for k in kids), [k.communicate() for k in kids]
                time.sleep(0.02)
        go.touch()
        outs = [k.communicate(timeout=120) for k in kids]
    finally:
        for k in kids:
            k.kill()
            k.wait()
    for k, (out, err) in zip(kids, outs, strict=True):
        assert k.returncode == 0 and "statistics ok" in out, err
    builders = set(log.read_text().split())
    assert len(builders) == 1, f"{len(builders)} processes compiled the kernel"
    said = sorted(_lines(outs[0][1]) + _lines(outs[1][1]))
    assert len(said) == 2 and "building" in said[0] and "waiting for process" in said[1], said
    assert len(list((cache / "kernels").glob("*.so"))) == 1


def test_the_c_source_is_package_data_and_part_of_the_cache_key(monkeypatch):
    text = _native.source()
    assert "int shiftbn_bn_batch(" in text
    assert (ROOT / "shiftbn" / "bn" / "_native" / "kernel.c").read_text() == text
    assert '"shiftbn.bn._native" = ["kernel.c"]' in (ROOT / "pyproject.toml").read_text()
    far = time.monotonic() + 60
    key = _native._machine_key("cc", far, 60)
    monkeypatch.setattr(_native, "source", lambda: text + "\n/* edited */\n")
    assert _native._machine_key("cc", far, 60) != key


def _project_copy(tmp_path: Path) -> Path:
    """The files a build reads, copied (a build writes build/ and *.egg-info beside them)."""
    copy = tmp_path / "project"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, copy / name)
    shutil.copytree(ROOT / "shiftbn", copy / "shiftbn", ignore=shutil.ignore_patterns("__pycache__"))
    return copy


# with -S: the install under test first, then the venv's packages without its .pth files (its own
# editable shiftbn would shadow the one under test)
_FIND_SOURCE = ("import site, sys; site.addsitedir(sys.argv[1]); sys.path.append(sys.argv[2]); "
                "from shiftbn.bn import _native; print(_native.__file__); print(len(_native.source()))")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["wheel", "editable"])
def test_an_installed_shiftbn_finds_the_c_source(tmp_path, how):
    project = _project_copy(tmp_path)
    target = tmp_path / "site"
    if how == "wheel":
        args = ["install", str(project), "--target", str(target)]
    else:
        args = ["install", "-e", str(project), "--prefix", str(tmp_path / "prefix")]
    r = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-build-isolation", "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    if how == "editable":
        (target,) = (tmp_path / "prefix").glob("lib/python*/site-packages")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    packages = str(Path(torch.__file__).parents[1])
    r = subprocess.run([sys.executable, "-S", "-c", _FIND_SOURCE, str(target), packages], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    where, size = r.stdout.split()
    home = target if how == "wheel" else project
    assert Path(where).is_relative_to(home), where
    assert int(size) == len(_native.source())
