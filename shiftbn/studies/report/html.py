"""A single self-contained HTML report: embedded figures, tables and a plain-language reading.

The reading itself (``findings``) lives in ``shiftbn.studies.report.findings``.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from shiftbn.studies.report.reading import findings as findings  # re-exported: the reading lives there


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def _table_html(table: pd.DataFrame) -> str:
    """A table as HTML with one header row: a named or non-default index becomes columns."""
    t = table.copy()
    if not isinstance(t.index, pd.RangeIndex) or any(n is not None for n in t.index.names):
        t = t.reset_index()
    if isinstance(t.columns, pd.MultiIndex):
        t.columns = [" ".join(str(c) for c in col if str(c)) for col in t.columns]
    t.columns.name = None
    return t.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0)


def _caption(text: str | None) -> list[str]:
    return [f'<p class="caption">{html.escape(text)}</p>'] if text else []


def write_report(path: str | Path, *, title: str, summary: list[str], figures: dict[str, Path | None],
                 tables: dict[str, pd.DataFrame], meta: dict[str, str], captions: dict[str, str] | None = None,
                 lead: dict[str, pd.DataFrame] | None = None) -> Path:
    """Write ``report.html``: title, lead tables, findings, figures (embedded PNG) and tables; no network access.

    ``captions``: text shown under the figure or above the table of the same name; a figure None is a
    section of its caption alone. ``lead``: tables shown right after the title (the decision per site).
    """
    captions = captions or {}
    path = Path(path)
    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
           "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}"
           "table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}"
           "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}"
           "h1{font-size:20px;overflow-wrap:anywhere}#decision td{text-align:left;max-width:420px}"
           ".meta{color:#666;font-size:13px;overflow-wrap:anywhere}.caption{color:#444;font-size:14px;max-width:900px}")
    body = [f"<h1>{html.escape(title)}</h1>"]
    for name, table in (lead or {}).items():
        body += [f'<section id="decision"><h2>{html.escape(name)}</h2>', _table_html(table)]
        body += _caption(captions.get(name)) + ["</section>"]
    body += ['<p class="meta">' + " · ".join(f"{html.escape(k)}: {html.escape(str(v))}" for k, v in meta.items())
            + "</p>", "<h2>Findings</h2>"]
    body += [f"<p>{html.escape(p)}</p>" for p in summary]
    for name, fig in figures.items():
        image = [_img(fig)] if fig is not None else []
        body += [f"<h2>{html.escape(name)}</h2>", *image] + _caption(captions.get(name))
    for name, table in tables.items():
        body += [f"<h2>{html.escape(name)}</h2>"] + _caption(captions.get(name)) + [_table_html(table)]
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{css}</style></head><body>{''.join(body)}</body></html>")
    from shiftbn._io import atomic_write_text

    atomic_write_text(path, doc)
    return path
