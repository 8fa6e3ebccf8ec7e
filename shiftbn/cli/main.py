"""The ``shiftbn`` command line: the top-level parser, the dispatch to one module per command, and the
error boundary (every error one line, exit status 2)."""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

import shiftbn._log as _log
import shiftbn.cli.dist as dist
from shiftbn._version import __version__
from shiftbn.cli import demo, matrix, merge, monitor, recalibrate, report, run, stats
from shiftbn.cli._malloc import keep_freed_memory
from shiftbn.cli._parser import EPILOG, Parser
from shiftbn.cli._renamed import old_spelling_notes
from shiftbn.cli._user import describe, first_line

# Only the standard library and torch-free shiftbn modules above: ``--help`` and argument errors
# answer before torch is imported (the commands import what they need).

# Each module declares its own sub-parser (``register(subparsers)``) and runs it (``run(args)``); this
# order is the order of ``shiftbn --help``.
COMMAND_MODULES = (demo, run, stats, matrix, recalibrate, merge, report, monitor)
COMMANDS = {m.__name__.rpartition(".")[2]: m for m in COMMAND_MODULES}


def build_parser() -> Parser:
    """The top-level parser with every command's sub-parser."""
    ap = Parser(prog="shiftbn", epilog=EPILOG,
                description="How BatchNorm networks trained on several sources behave under domain "
                            "shift, and BN recalibration that fixes what can be fixed.")
    ap.add_argument("--version", action="version", version=f"shiftbn {__version__}")
    dist.add_args(ap)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")  # bare `shiftbn` prints this help (main)
    for module in COMMAND_MODULES:
        module.register(sub)
    ap.commands = sub.choices  # each command's parser: its options name the keywords of its errors (_as_flags)
    return ap


# Errors a user can fix from the message alone (ours, the OS's, torch's about shapes and dtypes).
_EXPECTED = (ValueError, TypeError, OSError, ImportError, KeyError, RuntimeError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``shiftbn`` console script; returns the exit status.

    Every error prints one line and returns 2; an unexpected one also names where it was raised
    and how to see the traceback (``SHIFTBN_DEBUG=1`` re-raises every error). A command may return
    its own status (``monitor``: 1 on an alert).
    """
    if argv is None:  # the shiftbn process itself (console script, python -m shiftbn), not a caller's program
        keep_freed_memory()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # an argument error (one line, printed): its status; --help and --version exit
        if e.code in (0, None):
            raise
        return int(e.code) if isinstance(e.code, int) else 2
    if args.command is None:  # bare `shiftbn`: the overview, not an error
        parser.print_help()
        return 0
    debug = os.environ.get("SHIFTBN_DEBUG", "") not in ("", "0")
    was_quiet, threads_before = _log.quiet(), None
    _log.set_quiet(was_quiet or getattr(args, "quiet", False))
    try:
        threads_before = _set_threads(getattr(args, "threads", None))
        with dist.session(args), old_spelling_notes(args), _log.sized_bars():
            status = COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print(f"shiftbn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the boundary: a user's model may raise anything
        if debug:
            raise
        if dist.should_print(e):
            line = _as_flags(_error_line(e), _options(parser, args.command))
            print(f"shiftbn {args.command}: {dist.prefix(e)}error: {line}", file=sys.stderr)
        return 2
    finally:  # main() called in-process (tests, notebooks) leaves the process as it found it
        _log.set_quiet(was_quiet)
        if threads_before is not None:
            _set_threads(threads_before)
    _note_skipped(args)
    return int(status or 0)


def _note_skipped(args) -> None:
    """One stderr line about unreadable image files the command skipped (after it succeeded)."""
    bad = getattr(args, "skipped", None)
    if bad is None or not len(bad):
        return
    listed = getattr(args, "out", None) and args.out / "skipped.csv"
    listed = f"; listed in {listed}" if listed and listed.is_file() else ""
    print(f"shiftbn {args.command}: skipped {len(bad)} unreadable image file(s), e.g. {bad['path'].iloc[0]}{listed}",
          file=sys.stderr)


def _set_threads(n: int | None) -> int | None:
    """``torch.set_num_threads(n)`` before any work; returns the previous count (None when ``n`` is None).

    Why not a default count: torch's own (the physical cores, or ``$OMP_NUM_THREADS``) is already
    one per core, and a count the caller chose (an embedding process, a test) must stand.
    """
    if n is None:
        return None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def _error_line(e: BaseException) -> str:
    """The message of an error a user can act on; for one raised in the user's code or of an unexpected
    type, also where it was raised and how to see the traceback."""
    frames = _frames(e)
    user = [f for f in frames if not _is_library(f.filename)]
    if isinstance(e, _EXPECTED) and not (frames and frames[-1] in user):
        return first_line(e) or type(e).__name__
    frame = (user or frames)[-1]
    where = f"{frame.name} ({Path(frame.filename).name}:{frame.lineno})"
    return f"{describe(e)} (raised in {where}); run with SHIFTBN_DEBUG=1 for the traceback"


_KEYWORD = re.compile(r"\b([a-z][a-z0-9_]*)=('[^']*'|\"[^\"]*\"|[^\s,;:()\[\]]*)")


def _as_flags(text: str, options: set[str]) -> str:
    """A library message in the command line's words: ``method='target' needs target=`` becomes
    ``--method target needs --target`` where the command has those options (other keywords stay)."""
    def flag(m: re.Match) -> str:
        name = "--" + m.group(1).replace("_", "-")
        if name not in options:
            return m.group(0)
        value = m.group(2).strip("'\"")
        return f"{name} {value}" if value else name

    return _KEYWORD.sub(flag, text)


def _options(parser: Parser, command: str) -> set[str]:
    """The option strings of ``command``'s sub-parser."""
    return set(parser.commands[command]._option_string_actions)


def _frames(e: BaseException) -> list:
    import traceback

    return list(traceback.extract_tb(e.__traceback__))


def _is_library(filename: str) -> bool:
    """Whether a traceback file belongs to shiftbn, an installed package or the standard library."""
    path = str(Path(filename).resolve())
    roots = (str(Path(__file__).resolve().parents[1]), sys.prefix, sys.base_prefix,
             str(Path(importlib.__file__).resolve().parents[1]))
    return path.startswith(roots) or filename.startswith("<")


def run_as_script() -> None:
    """``python -m shiftbn``: drop the working folder python put first on
    ``sys.path`` (``--model`` searches it last, for its own module only), run ``main``, exit."""
    if not sys.flags.safe_path and sys.path and sys.path[0] in ("", str(Path.cwd())):
        del sys.path[0]
    sys.exit(main())


if __name__ == "__main__":
    run_as_script()
