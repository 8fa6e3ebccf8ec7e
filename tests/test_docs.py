"""The tutorials (and the README's example) run as written.

Every ```python block of a page runs, in order, in one namespace, in a fresh folder; every ```bash
block runs its ``shiftbn ...`` lines through ``shiftbn.cli.main`` in the same folder (in process:
no interpreter start per command), and each must exit 0. A block preceded by
``<!-- not-run: REASON -->`` is skipped (it needs several processes, a GPU or the user's files),
and a page marked ``<!-- needs: MODULE -->`` runs only where MODULE imports. The tutorials use the
built-in data at a tiny size, so the whole file takes seconds.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md"))
PAGES = [*TUTORIALS, ROOT / "README.md"]

_BLOCK = re.compile(r"(?:<!-- not-run: (?P<reason>[^>]*?) -->\s*\n)?^```(?P<lang>\w*)[^\n]*\n(?P<code>.*?)^```\s*$",
                    re.S | re.M)
_NEEDS = re.compile(r"<!-- needs: (?P<module>[\w.]+) -->")


def blocks(page: Path) -> list[tuple[str, str, str | None]]:
    """``(lang, code, reason_not_run)`` of every fenced python/bash block, in page order."""
    found = []
    for m in _BLOCK.finditer(page.read_text(encoding="utf-8")):
        if m["lang"] in ("python", "bash"):
            found.append((m["lang"], m["code"], m["reason"]))
    return found


def _commands(code: str) -> list[str]:
    """The logical lines of a bash block (``\\`` continuations joined, comments and blanks dropped)."""
    text = re.sub(r"\s*\\\n\s*", " ", code)
    return [line for line in (ln.split(" #")[0].strip() for ln in text.splitlines()) if line and line[0] != "#"]


def run_page(page: Path) -> int:
    """Run a page's blocks in the current folder; returns how many ran."""
    from shiftbn.cli import main

    namespace: dict = {"__name__": "__tutorial__"}
    ran = 0
    for i, (lang, code, reason) in enumerate(blocks(page)):
        if reason is not None:
            continue
        if lang == "python":
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)  # noqa: S102 - the page's own code
        else:
            for line in _commands(code):
                argv = shlex.split(line)
                assert argv[0] == "shiftbn", f"{page.name}[block {i}]: only shiftbn lines run: {line}"
                assert main(argv[1:]) == 0, f"{page.name}[block {i}]: `{line}` failed"
        ran += 1
    return ran


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_runs_as_written(page, tmp_path, monkeypatch):
    needs = _NEEDS.search(page.read_text(encoding="utf-8"))
    if needs and importlib.util.find_spec(needs["module"]) is None:
        pytest.skip(f"needs {needs['module']}: run make test-integrations")
    monkeypatch.chdir(tmp_path)
    assert run_page(page) > 0, f"{page.name} has no block that runs"


def test_every_skipped_block_says_why():
    for page in PAGES:
        for _lang, code, reason in blocks(page):
            assert reason is None or reason.strip(), f"{page.name}: a not-run block without a reason:\n{code}"


def test_the_block_reader_sees_blocks_commands_and_markers(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n<!-- not-run: needs a GPU -->\n```bash\nshiftbn demo \\\n"
                    "  --quick   # a comment\n```\n\n```text\nnot code\n```\n", encoding="utf-8")
    assert blocks(page) == [("python", "x = 1\n", None), ("bash", "shiftbn demo \\\n  --quick   # a comment\n",
                                                                   "needs a GPU")]
    assert _commands(blocks(page)[1][1]) == ["shiftbn demo --quick"]
