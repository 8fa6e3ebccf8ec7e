"""The core's API reference is generated from its docstrings: every public function and class (and
the public methods of its classes) has Google-style ``Args:``, ``Returns:`` and ``Example:``
sections, and every example runs.

Examples run as doctests in a fresh namespace holding ``np`` (numpy), ``torch``, ``nn``
(``torch.nn``), ``sb`` (``shiftbn``) and the names of the example's own package's ``__all__``
(as torch's docs use ``nn.BatchNorm1d`` without importing it; a top-level re-export's example sees
its home package's names); anything else an example imports.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io
import time

import numpy as np
import pytest
import sklearn.datasets  # noqa: F401 - imported once here, so no example's time includes it
import torch
import torch._dynamo  # noqa: F401 - an optimizer's first step imports it (seconds): so does Tent's, once per process
from torch import nn

import shiftbn as sb

CORE = ("shiftbn", "shiftbn.data", "shiftbn.samplers", "shiftbn.bn", "shiftbn.adapt", "shiftbn.evaluate")
HEADERS = ("Args:", "Returns:", "Example:")
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _public(package: str) -> list[tuple[str, object]]:
    """``(dotted name, object)`` of every function or class in ``package.__all__``."""
    mod = importlib.import_module(package)
    return [(f"{package}.{name}", getattr(mod, name)) for name in mod.__all__
            if inspect.isclass(getattr(mod, name)) or inspect.isfunction(getattr(mod, name))]


def _methods(cls: type, public: set[type] = frozenset()) -> list[tuple[str, object]]:
    """The public methods (plain, class and static) defined in ``cls``'s own body; not properties.

    An override without a docstring of its own is left out when a class of ``public`` up the MRO
    defines the method (it is checked there, and the reference shows that docstring for the override).
    """
    out = []
    for name, attr in vars(cls).items():
        if name.startswith("_") or isinstance(attr, property):
            continue
        if isinstance(attr, (classmethod, staticmethod)):
            attr = attr.__func__
        if inspect.isfunction(attr):
            if attr.__doc__ is None and any(name in vars(base) for base in cls.__mro__[1:] if base in public):
                continue
            out.append((name, attr))
    return out


def documented() -> list[tuple[str, str, object]]:
    """``(package, dotted name, object)`` of every name the API reference documents."""
    out = []
    for package in CORE:
        names = _public(package)
        public = {obj for _, obj in names if inspect.isclass(obj)}
        for name, obj in names:
            out.append((package, name, obj))
            if inspect.isclass(obj):
                out.extend((package, f"{name}.{m}", f) for m, f in _methods(obj, public))
    return out


DOCUMENTED = documented()
IDS = [name for _, name, _ in DOCUMENTED]


def missing_headers(obj: object) -> list[str]:
    """The sections of ``HEADERS`` that ``obj``'s own docstring lacks (each on a line of its own)."""
    lines = {line.strip() for line in (inspect.getdoc(obj) or "").splitlines()}
    return [h for h in HEADERS if h not in lines]


def _home(package: str, obj: object) -> str:
    """The package of ``CORE`` under ``package`` defining ``obj`` (a top-level re-export's home), else ``package``."""
    module = getattr(obj, "__module__", None) or ""
    homes = [p for p in CORE if p.startswith(package + ".") and (module == p or module.startswith(p + "."))]
    return max(homes, key=len) if homes else package


def run_examples(package: str, name: str, obj: object) -> tuple[int, int, str]:
    """Run ``obj``'s docstring examples in its home package's namespace; ``(examples, failures, report)``."""
    mod = importlib.import_module(_home(package, obj))
    globs = {"np": np, "torch": torch, "nn": nn, "sb": sb, **{n: getattr(mod, n) for n in mod.__all__}}
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs=globs)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for t in tests:
        runner.run(t, out=out.write)
    res = runner.summarize(verbose=False)
    return res.attempted, res.failed, out.getvalue()


@pytest.mark.parametrize(("package", "name", "obj"), DOCUMENTED, ids=IDS)
def test_docstring_has_sections(package, name, obj):
    missing = missing_headers(obj)
    assert not missing, f"{name}: its docstring lacks {missing} (Google style; see STYLE.md rule 6)"


@pytest.mark.parametrize(("package", "name", "obj"), DOCUMENTED, ids=IDS)
def test_examples_run(package, name, obj):
    start = time.perf_counter()
    attempted, failed, report = run_examples(package, name, obj)
    took = time.perf_counter() - start
    assert attempted > 0, f"{name}: its Example: section has no '>>>' line"
    assert failed == 0, f"{name}: {failed} of {attempted} example line(s) failed:\n{report}"
    assert took < 5.0, f"{name}: its example took {took:.1f} s; keep examples on tiny data"


def test_checks_catch_a_missing_section_and_a_failing_example():
    def no_returns(x):
        """Double ``x``.

        Why: a test of the test.

        Args:
            x: a number.

        Example:
            >>> 2 * 2
            5
        """
        return 2 * x

    assert missing_headers(no_returns) == ["Returns:"]
    attempted, failed, report = run_examples("shiftbn.samplers", "no_returns", no_returns)
    assert (attempted, failed) == (1, 1) and "Expected:" in report


def test_every_core_package_is_covered():
    covered = {package for package, _, _ in DOCUMENTED}
    assert covered == set(CORE)
    assert len(DOCUMENTED) > len(CORE)
