"""Griffe extension: read shiftbn's docstring conventions the way the API pages need them.

Why: the project's docstrings (checked by tests/test_docstrings.py) use an ``Example:`` header and
``Args: None.`` for methods without arguments; griffe's Google parser knows ``Examples:`` and takes
``None.`` for a parameter. The docstrings stay as they are; this rewrites them for the API reference only.
"""

from __future__ import annotations

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ARGS_NONE = re.compile(r"^\s*Args:\s*\n\s*None\.\s*$\n?", re.MULTILINE)


class ShiftbnDocstrings(griffe.Extension):
    """Rename ``Example:`` sections to ``Examples:`` and drop ``Args: None.``."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        doc = obj.docstring
        if doc is not None:
            doc.value = _EXAMPLE.sub(r"\1Examples:", _ARGS_NONE.sub("", doc.value))
