"""MkDocs hook: the command-line reference, generated from ``shiftbn --help`` at build time.

Why: the CLI's own help is the one source of truth for its options; a hand-copied page drifts.
Each command's help comes from ``python -m shiftbn <command> --help`` in a subprocess (so the page
does not depend on how the CLI's modules are arranged inside), and the list of commands from the
top-level help. A command whose help fails to print fails the build.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mkdocs.structure.files import File

PAGE = "reference/cli.md"
_ROOT = Path(__file__).resolve().parent.parent


def _help(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "100", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "shiftbn", *args, "--help"], cwd=_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"`shiftbn {' '.join(args)} --help` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.rstrip()


def _commands(top: str) -> list[str]:
    """Command names from the top-level help: the indented names under the ``COMMAND`` group."""
    names, inside = [], False
    for line in top.splitlines():
        if re.match(r"^\s+COMMAND\s*$", line) or line.strip().startswith("{"):
            inside = True
            continue
        if inside:
            m = re.match(r"^ {4}([a-z][a-z0-9-]*)(\s|$)", line)
            if m:
                names.append(m.group(1))
            elif line and not line.startswith(" "):
                break
    if not names:
        raise RuntimeError("found no commands in `shiftbn --help`; the CLI reference hook needs updating")
    return names


def render() -> str:
    top = _help()
    parts = ["# Command line", "",
             "Generated at build time from `shiftbn --help` and `shiftbn <command> --help`: what the installed",
             "version says, option for option. Every command prints one line and exits with status 2 on a",
             "bad argument; `SHIFTBN_DEBUG=1` shows a traceback instead. `python -m shiftbn` is the same",
             "command line.", "", _ROOT.joinpath("tools", "cli_intro.md").read_text(encoding="utf-8"),
             "## shiftbn", "", "```text", top, "```", ""]
    for name in _commands(top):
        parts += [f"## shiftbn {name}", "", "```text", _help(name), "```", ""]
    return "\n".join(parts)


def on_files(files, config):
    files.append(File.generated(config, PAGE, content=render()))
    return files
