"""Old spellings on the command line: renamed flags keep working for one release, and say so.

Why: one word per concept (a data source is a *source*; the model's stored statistics are the
strategy ``ema``). Scripts written with the old words (``--site``, ``--strategies source``) still
run; each use prints one ``note:`` line on stderr naming the new spelling.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from shiftbn._log import ShiftbnWarning

OLD_SPELLING = "goes in the next release"
"""Every deprecation message of shiftbn ends its sentence with this; the CLI prints those as notes."""


class OldFlag(argparse.Action):
    """``--site`` for ``--source``: stores into the new flag's ``dest`` and keeps a note naming the new flag."""

    def __init__(self, option_strings, dest, *, new: str, **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        notes = namespace.__dict__.setdefault("old_spellings", [])
        notes.append(f"{option_string} is now {self.new}; {option_string} {OLD_SPELLING}")
        setattr(namespace, self.dest, values)


@contextmanager
def old_spelling_notes(args: argparse.Namespace) -> Iterator[None]:
    """Print each old spelling used, on the command line or met inside (shiftbn's deprecation warnings),
    as one line ``shiftbn COMMAND: note: ...`` on stderr, and each ``ShiftbnWarning`` as one line
    ``shiftbn COMMAND: warning: ...``; other warnings show as Python shows them."""
    for note in getattr(args, "old_spellings", []):
        print(f"shiftbn {args.command}: note: {note}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings("default", category=DeprecationWarning, message=f".*{OLD_SPELLING}")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if issubclass(category, DeprecationWarning) and OLD_SPELLING in str(message):
                print(f"shiftbn {args.command}: note: {message}", file=sys.stderr)
            elif issubclass(category, ShiftbnWarning):
                print(f"shiftbn {args.command}: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
