"""The ``shiftbn`` command line: ``main`` and the error boundary, one module per command."""

from shiftbn.cli.main import main

__all__ = ["main"]
