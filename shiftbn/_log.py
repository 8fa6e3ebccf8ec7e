"""What the terminal hears: one line per phase, progress bars only where a person watches.

Why: long runs must say which phase runs (``[3/6] held-out protocol: lab_c``); bars belong on a
terminal, and a log file (stdout or stderr not a TTY) gets plain lines instead of carriage-return
spam. ``set_quiet(True)`` silences both. Bottom layer: imports only the standard library and tqdm.
"""

from __future__ import annotations

import sys
import time

_state = {"quiet": False, "start": time.monotonic()}


def set_quiet(quiet: bool) -> None:
    """Silence phase lines and progress bars (``--quiet``)."""
    _state["quiet"] = bool(quiet)


def quiet() -> bool:
    return bool(_state["quiet"])


def bars_wanted(progress: bool = True) -> bool:
    """Whether a progress bar should be drawn: asked for, not quiet, and stderr is a terminal."""
    return bool(progress) and not _state["quiet"] and sys.stderr.isatty()


def phase(step: int, total: int, text: str) -> None:
    """Announce a phase on stderr as ``[step/total] text (elapsed)``, one line, flushed."""
    if _state["quiet"]:
        return
    elapsed = time.monotonic() - _state["start"]
    print(f"[{step}/{total}] {text} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
