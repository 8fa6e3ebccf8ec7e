"""What the terminal hears: numbered phase lines, progress bars only where a person watches.

Why: long runs must say which phase runs (``[3/6] held-out protocol: lab_c``) and how long the
finished ones took; bars belong on a terminal, and a log file or a notebook (stderr not a TTY) gets
plain lines instead of carriage-return spam. ``set_quiet(True)`` silences both. Bottom layer:
imports only the standard library.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    """Silence phase lines and progress bars (``--quiet``)."""
    _state["quiet"] = bool(quiet)


def quiet() -> bool:
    """Whether phase lines and bars are silenced."""
    return bool(_state["quiet"])


def bars_wanted(progress: bool = True) -> bool:
    """Whether a progress bar should be drawn: asked for, not quiet, and stderr is a terminal."""
    return bool(progress) and not _state["quiet"] and sys.stderr.isatty()


BAR_SCREEN = {"TQDM_NCOLS": "100", "TQDM_NROWS": "24"}  # a terminal that reports no size: columns, rows


@contextmanager
def sized_bars() -> Iterator[None]:
    """Give progress bars a screen size while the block runs, where stderr is a terminal that reports none.

    Why: a bare pseudo-terminal (``docker exec -t``, ``script``, some CI runners) reports 0 rows and
    0 columns, and tqdm then hides every bar (it draws none below the screen's last row), leaving one
    empty line per bar. tqdm reads ``TQDM_NCOLS``/``TQDM_NROWS`` when first imported, so this wraps a
    CLI command before any bar exists; a size the user set is kept.
    """
    size = None
    if sys.stderr.isatty():
        try:
            size = os.get_terminal_size(sys.stderr.fileno())
        except (OSError, ValueError):  # no file descriptor behind sys.stderr
            size = None
    missing = {k: v for k, v in BAR_SCREEN.items() if k not in os.environ}
    if size is None or min(size) > 0 or not missing:
        yield
        return
    os.environ.update(missing)
    try:
        yield
    finally:
        for k in missing:
            os.environ.pop(k, None)


class ShiftbnWarning(UserWarning):
    """A result a person should doubt (statistics from few samples): the CLI prints it as one line
    ``shiftbn COMMAND: warning: ...``; the API raises it through ``warnings`` (filter it by this class)."""


def duration(seconds: float) -> str:
    """``0.4 s``, ``12.3 s``, ``2 min 05 s``: a duration as a person reads it."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


class Phases:
    """The numbered phases of one run, on stderr: ``[i/n] what ...`` when phase i starts and
    ``[i/n] what: done (3.2 s)`` when it ends, so every time printed is a finished phase's duration.

    Why: a command that prints nothing for minutes looks hung, and a time printed at a phase's start
    reads as its duration. On a pipe or in a notebook (no bars) these lines are the sign of life.
    Nothing prints under ``set_quiet(True)``. Used as a context manager, the last phase's end line
    prints on a normal exit only (an error is the last line of a failed run).

    Args:
        total: the number of phases (``n`` in ``[i/n]``).

    Example:
        >>> with Phases(2) as phases:
        ...     phases.start("loading the model and data")
        ...     phases.start("the cross-source matrix")
    """

    def __init__(self, total: int) -> None:
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be a whole number >= 1, got {total!r}")
        self.total, self.step = total, 0
        self._text: str | None = None
        self._started = 0.0

    def start(self, text: str) -> None:
        """End the running phase (its duration printed) and announce the next one."""
        self.finish()
        self.step = min(self.step + 1, self.total)
        self._text, self._started = text, time.monotonic()
        self._print(f"{text} ...")

    def finish(self) -> None:
        """End the running phase, if any: ``[i/n] what: done (duration)``."""
        if self._text is not None:
            self._print(f"{self._text}: done ({duration(time.monotonic() - self._started)})")
            self._text = None

    def _print(self, line: str) -> None:
        if not _state["quiet"]:
            print(f"[{self.step}/{self.total}] {line}", file=sys.stderr, flush=True)

    def __enter__(self) -> Phases:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.finish()
