"""The parser class every command shares: help that shows defaults, errors in one line.

Why: each command module builds its own sub-parser; one class and one epilog keep their help and
their errors alike. Standard library only (``--help`` stays fast).
"""

from __future__ import annotations

import argparse

EPILOG = "Errors print one line and exit with status 2. Docs: README.md (CLI reference)."


def listing(items: list[str], sep: str, width: int = 76) -> str:
    """``items`` joined by ``sep`` into indented lines of at most ``width`` characters, never split inside one."""
    lines, line = [], ""
    for item in items:
        piece = item if not line else line + sep + item
        if line and len(piece) > width - 2:
            lines.append(line + sep.rstrip())
            line = item
        else:
            line = piece
    return "\n".join("  " + x for x in [*lines, line])


class Help(argparse.HelpFormatter):
    """Every option's help ends with its default (unless the text already names it); a description
    or epilog with line breaks keeps them (the strategy grammar), others are wrapped."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.required or "default" in text or default is argparse.SUPPRESS
                or isinstance(default, bool) or action.nargs == 0):
            return text
        if default is None:
            shown = "none"
        elif isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default)) or "none"
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults and whose errors are one line (no usage block);
    sub-commands get the same class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
