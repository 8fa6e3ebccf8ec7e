"""tools/system-deps.sh names the package that holds the DejaVu Mono faces on this Debian release."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "system-deps.sh"


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize(("has_mono_package", "want", "not_want"), [
    (True, "fonts-dejavu-mono", "fonts-dejavu-core"),  # Debian 13: the Mono faces moved out of core
    (False, "fonts-dejavu-core", "fonts-dejavu-mono"),  # Debian 12: they ship in core
])
def test_missing_mono_faces_name_the_package_that_exists(tmp_path, has_mono_package, want, not_want):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    _stub(bin_, "id", "echo 1000")  # not root: the script prints the command instead of installing
    _stub(bin_, "chromium", "exit 0")
    _stub(bin_, "apt-cache", f'[ "$1 $2" = "show fonts-dejavu-mono" ] && exit {0 if has_mono_package else 100}; '
                             "exit 0")
    fonts = tmp_path / "fonts"
    for face in ("dejavu/DejaVuSans.ttf", "dejavu/DejaVuSerifCondensed.ttf", "liberation/LiberationSans-Regular.ttf"):
        (fonts / face).parent.mkdir(parents=True, exist_ok=True)
        (fonts / face).write_bytes(b"")
    env = {**os.environ, "PATH": f"{bin_}:/usr/bin:/bin", "SHIFTBN_FONTS_ROOT": str(fonts)}
    res = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and want in res.stderr and not_want not in res.stderr, res.stderr
    (fonts / "dejavu" / "DejaVuSansMono.ttf").write_bytes(b"")  # every face there: no font package asked for
    res = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert "fonts-" not in res.stderr, res.stderr
