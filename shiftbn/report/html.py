"""A single self-contained HTML report: embedded figures, tables and a plain-language reading."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def findings(matrix: pd.DataFrame, heldout: pd.DataFrame | None, shift: pd.DataFrame | None,
             metric: str = "accuracy") -> list[str]:
    """Two paragraphs of plain language generated from the numbers (which lab is worst, which strategy
    helps most, by how much, and where in the network the shift shows)."""
    m = matrix[matrix["metric"] == metric]
    src = m[m["strategy"] == "source"].set_index("eval_source")["value"]
    worst = src.idxmin()
    main = m[~m["is_cross_source"].astype(bool)]
    per_strategy = main.groupby("strategy")["value"]
    on_worst = main[main["eval_source"] == worst]
    best_row = on_worst.loc[on_worst["value"].idxmax()]
    first = (f"With the statistics stored in the model (its training EMA), the worst lab is {worst} at "
             f"{src[worst]:.1%} {metric}, against {src.drop(worst).mean():.1%} on average elsewhere. "
             f"On {worst}, the best strategy is {best_row['strategy']} at {best_row['value']:.1%} "
             f"({100 * (best_row['value'] - src[worst]):+.1f} points). Averaged over labs, "
             f"{per_strategy.mean().idxmax()} does best ({per_strategy.mean().max():.1%}) and "
             f"{per_strategy.min().idxmax()} has the best worst-lab {metric} ({per_strategy.min().max():.1%}).")
    parts = [first]
    if heldout is not None and len(heldout):
        h = heldout[heldout["is_held_out"].astype(bool) & (heldout["metric"] == metric)]
        by = h.groupby(["held_out", "strategy"])["value"].mean().unstack()
        text = "When each lab is held out of training and seen only at test, "
        if "source" in by and "target" in by:
            gain = by["target"] - by["source"]
            top = gain.idxmax()
            text += (f"recomputing BN statistics on its unlabeled data (target/AdaBN) changes {metric} by "
                     f"{100 * gain.mean():+.1f} points on average, most on {top} ({by['source'][top]:.1%} → "
                     f"{by['target'][top]:.1%}). ")
        text += f"The best strategy on held-out labs overall is {by.mean().idxmax()} ({by.mean().max():.1%})."
        if shift is not None and len(shift):
            s = shift[shift["source"] == worst]
            if len(s):
                top = s.loc[s["value"].idxmax()]
                text += (f" The shift profile places {worst}'s largest statistics shift at layer {top['layer']} "
                         f"(depth {int(top['depth'])}); a shift that enters early, as an intensity change does, "
                         "is the kind BN recalibration can undo.")
        parts.append(text)
    return parts


def write_report(path: str | Path, *, title: str, summary: list[str], figures: dict[str, Path],
                 tables: dict[str, pd.DataFrame], meta: dict[str, str]) -> Path:
    """Write ``report.html``: title, findings, figures (embedded PNG) and tables; no network access."""
    path = Path(path)
    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
           "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}"
           "table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}"
           "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}"
           ".meta{color:#666;font-size:13px}")
    body = [f"<h1>{html.escape(title)}</h1>",
            '<p class="meta">' + " · ".join(f"{html.escape(k)}: {html.escape(str(v))}" for k, v in meta.items())
            + "</p>", "<h2>Findings</h2>"]
    body += [f"<p>{html.escape(p)}</p>" for p in summary]
    for name, fig in figures.items():
        body += [f"<h2>{html.escape(name)}</h2>", _img(fig)]
    for name, table in tables.items():
        body += [f"<h2>{html.escape(name)}</h2>", table.to_html(float_format=lambda v: f"{v:.3f}", border=0)]
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{css}</style></head><body>{''.join(body)}</body></html>")
    from shiftbn._io import atomic_write_text

    atomic_write_text(path, doc)
    return path
