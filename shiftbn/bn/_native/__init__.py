"""Build, cache and load shiftbn's C kernel (``kernel.c``, shipped beside this file) for ``bn.native``.

Why: the kernel is compiled once per machine with the system compiler and cached; a damaged cache
file (a killed copy, a full disk, a foreign file) must never crash or disable later processes, and a
compiler that hangs must not stall them. So each build is recorded with its size and SHA-256 and
checked before ``dlopen`` (a mismatch is rebuilt under a fresh file name, never loaded); the whole
build is bounded (``SHIFTBN_KERNEL_BUILD_TIMEOUT`` seconds, default 60; the compiler's process group
is killed past it); and one process builds at a time (a file lock in the cache folder: the others wait
within the same bound, then load what it built). Each of these says so in one line on stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import shiftbn._log as _log
from shiftbn._io import FolderLock, LockedError, atomic_write_text

BUILD_TIMEOUT_S = 60.0
"""Default bound, in seconds, on building the kernel (compiler runs and the wait for another process
building it); ``SHIFTBN_KERNEL_BUILD_TIMEOUT`` overrides it."""

_FLAGS = ["-O3", "-shared", "-fPIC", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
          "-ffp-contract=fast"]  # x * a + b as one FMA, as torch's own BN kernel is built
_OPTIONAL = (["-march=native", "-fopenmp"], ["-fopenmp"], [])  # tried in this order


def source() -> str:
    """The kernel's C source (package data ``shiftbn/bn/_native/kernel.c``)."""
    return (resources.files(__package__) / "kernel.c").read_text(encoding="utf-8")


def cache_dir() -> Path:
    """``$SHIFTBN_CACHE_DIR/kernels``, else ``$XDG_CACHE_HOME/shiftbn/kernels`` (``~/.cache``)."""
    root = os.environ.get("SHIFTBN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "shiftbn")
    return Path(root) / "kernels"


def build_timeout() -> float:
    """Seconds a build may take: ``SHIFTBN_KERNEL_BUILD_TIMEOUT``, else ``BUILD_TIMEOUT_S``."""
    raw = os.environ.get("SHIFTBN_KERNEL_BUILD_TIMEOUT", "").strip()
    if not raw:
        return BUILD_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"SHIFTBN_KERNEL_BUILD_TIMEOUT must be a positive number of seconds, got {raw!r}; "
                         f"set it to e.g. 120, or unset it for the default {BUILD_TIMEOUT_S:g}")
    return seconds


def load() -> ctypes.CDLL | None:
    """The kernel's library, built on first use (``None`` when ``SHIFTBN_NATIVE=0``).

    Raises:
        TimeoutError: the build (or the wait for another process building it) passed its bound.
        RuntimeError, OSError: no compiler, or it failed (its last words in the message).
    """
    if os.environ.get("SHIFTBN_NATIVE", "1") == "0":
        return None
    budget = build_timeout()
    deadline = time.monotonic() + budget
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    key = _machine_key(cc, deadline, budget)
    folder = cache_dir()
    path, why = _check(folder, key)
    if path is None or why is not None:
        path = _build(cc, folder, key, deadline, budget)
    return ctypes.CDLL(str(path))


def _say(text: str) -> None:
    """One line on stderr, flushed (silenced by ``--quiet``)."""
    if not _log.quiet():
        print(f"shiftbn: {text}", file=sys.stderr, flush=True)


def _too_slow(what: str, budget: float) -> TimeoutError:
    return TimeoutError(f"{what} did not finish within {budget:g} s; set SHIFTBN_KERNEL_BUILD_TIMEOUT to allow "
                        "longer, or SHIFTBN_NATIVE=0 to skip the kernel")


def _run(cmd: list[str], deadline: float, budget: float) -> tuple[int, str, str]:
    """Run ``cmd`` until ``deadline`` (monotonic); past it, kill its whole process group (a compiler's
    own children too) and raise ``TimeoutError``."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _too_slow(cmd[0], budget)
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=left)
        except BaseException as e:  # the timeout, and Ctrl-C: never leave a compiler running
            with contextlib.suppress(OSError, AttributeError):
                os.killpg(p.pid, signal.SIGKILL)
            p.kill()
            if isinstance(e, subprocess.TimeoutExpired):
                raise _too_slow(f"{cmd[0]} {cmd[1]}", budget) from None
            raise
    return p.returncode, out, err


def _machine_key(cc: str, deadline: float, budget: float) -> str:
    """What the compiled file depends on: source, compiler, flags, CPU (``-march=native``)."""
    try:
        version = _run([cc, "--version"], deadline, budget)[1]
    except TimeoutError:
        raise
    except OSError:  # no such compiler: the build says so
        version = ""
    cpu = ""
    try:
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        cpu = platform.processor()
    return hashlib.sha256("\0".join([source(), cc, version, " ".join(_FLAGS), platform.machine(), cpu]).encode()
                          ).hexdigest()[:20]


def _check(folder: Path, key: str) -> tuple[Path | None, str | None]:
    """The cached build and ``None`` when its bytes are those recorded at build time; else the recorded
    file (or ``None``) and why it is refused; ``(None, None)`` when nothing is cached."""
    record = folder / f"bnstats-{key}.json"
    try:
        entry = json.loads(record.read_text())
        name, size, digest = str(entry["file"]), int(entry["bytes"]), str(entry["sha256"])
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, TypeError, KeyError):
        return None, f"its record {record} is unreadable"
    if Path(name).name != name or not name.startswith(f"bnstats-{key}"):
        return None, f"its record {record} names a foreign file {name!r}"
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"{path} is unreadable ({e.strerror or type(e).__name__})"
    if len(data) != size:
        return path, f"{path} has {len(data)} bytes, {size} were built"
    if hashlib.sha256(data).hexdigest() != digest:
        return path, f"{path} does not match the SHA-256 recorded when it was built"
    return path, None


def _build(cc: str, folder: Path, key: str, deadline: float, budget: float) -> Path:
    """Build into the cache under a fresh name and record its size and digest, one process at a time;
    a cache that cannot be written gets a build for this process only."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = _lock(folder, key, deadline, budget)
    except TimeoutError:
        raise
    except OSError:  # a read-only cache
        _say(f"building the BN statistics kernel with {cc} for this process (cache {folder} is not writable; "
             f"at most {budget:g} s)")
        return _compile(cc, Path(tempfile.mkdtemp(prefix="shiftbn-")), key, deadline, budget)
    try:
        path, why = _check(folder, key)  # again: the process we waited for may have built it
        if path is not None and why is None:
            return path
        if why is None:
            _say(f"building the BN statistics kernel for this machine with {cc} (once; at most {budget:g} s, "
                 "SHIFTBN_KERNEL_BUILD_TIMEOUT)")
        else:
            _say(f"the cached BN statistics kernel is damaged ({why}); rebuilding it with {cc} "
                 f"(at most {budget:g} s)")
        built = _compile(cc, folder, key, deadline, budget)
        data = built.read_bytes()
        atomic_write_text(folder / f"bnstats-{key}.json", json.dumps(
            {"file": built.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}) + "\n")
        if path is not None and path != built:  # the damaged file: never loaded, nobody maps it
            with contextlib.suppress(OSError):
                path.unlink()
        return built
    finally:
        lock.release()


def _lock(folder: Path, key: str, deadline: float, budget: float) -> FolderLock:
    """This key's build lock, waiting (polling, until ``deadline``) while another process holds it."""
    lock = FolderLock(folder, f"bnstats-{key}.lock")
    waiting = False
    while True:
        try:
            lock.acquire()
            return lock
        except LockedError as e:
            who = f"process {e.pid}" if e.pid is not None else "another process"
            if time.monotonic() >= deadline:
                raise _too_slow(f"the kernel build by {who}", budget) from None
            if not waiting:
                _say(f"waiting for {who}, which is building the BN statistics kernel (at most {budget:g} s)")
                waiting = True
            time.sleep(0.05)


def _compile(cc: str, folder: Path, key: str, deadline: float, budget: float) -> Path:
    """Compile to ``folder/bnstats-<key>-<random>.so`` (complete or absent: built aside, then renamed);
    raises with the compiler's last words."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        src, obj = Path(tmp) / "kernel.c", Path(tmp) / "kernel.so"
        src.write_text(source(), encoding="utf-8")
        errors = []
        for extra in _OPTIONAL:
            code, _, err = _run([cc, *_FLAGS, *extra, str(src), "-o", str(obj), "-lm"], deadline, budget)
            if code == 0 and obj.is_file():
                out = folder / f"bnstats-{key}-{secrets.token_hex(4)}.so"  # fresh: never a name dlopen has seen
                os.replace(obj, out)
                return out
            errors.append(err.strip().splitlines()[-1:] or [f"exit status {code}, no output file"])
        raise RuntimeError(f"{cc} failed: {errors[-1][0][:200]}")
