"""The report of a fit: summary, heterogeneity table, leave-one-out table and the plots, as Markdown or
HTML next to the PNG files."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from ..data import ChoiceData
from ..persistence import replace_folder
from ..tables import markdown_table
from .arviz import loo_table
from .plots import PLOT_FILES, draw_plots
from .statistics import STATS

REPORT_FORMATS = ("md", "html")
#: The report files :func:`write_report` writes (one of them, with the plots).
REPORT_FILES = tuple(f"report.{f}" for f in REPORT_FORMATS)


def heterogeneity_display(table: pd.DataFrame) -> pd.DataFrame:
    """The heterogeneity table with each statistic as ``estimate [lo, hi]`` text (for reports)."""
    out = pd.DataFrame({"distribution": table["distribution"]}, index=table.index)
    for s in STATS:
        out[s] = [f"{v:.4g} [{a:.4g}, {b:.4g}]" for v, a, b in zip(table[s], table[f"{s}.lo"], table[f"{s}.hi"])]
    return out


def write_report(res, out_dir, data: ChoiceData | None = None, fmt: str = "md", level: float = 0.9,
                 overwrite: bool = False) -> Path:
    """Write the plots and ``report.md`` (or ``report.html``) with the summary, heterogeneity and (with data)
    leave-one-out tables into ``out_dir``; return the report's path. Existing report files there are replaced
    only with ``overwrite=True``. The report and its plots are written as a unit
    (:func:`mixlogit.persistence.replace_folder`): an interruption leaves the old report and plots or the new
    ones; other files in ``out_dir`` (such as the fit's results) stay."""
    if fmt not in REPORT_FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; accepted: {', '.join(REPORT_FORMATS)}")
    out = Path(out_dir)
    with replace_folder(out, (f"report.{fmt}", *PLOT_FILES), overwrite) as tmp:
        path = _write(res, tmp, data, fmt, level)
    return out / path.name


def _write(res, out: Path, data: ChoiceData | None, fmt: str, level: float) -> Path:
    plots = draw_plots(res, out, data=data, level=level)
    title = f"mixlogit report: {res.settings.get('method', 'msl').upper()}"
    het = res.heterogeneity(level=level) if res.spec.heterogeneity_names else None
    loo = loo_table(res.to_arviz(data=data)) if data is not None else None
    if fmt == "md":
        parts = [f"# {title}", "", "## Summary", "", "```", res.summary(), "```", ""]
        if het is not None:
            parts += ["## Heterogeneity", "", f"Intervals: {het.attrs['interval']}.", ""]
            if "trust" in het.attrs:
                parts += [f"Trust check of the variational fit: {het.attrs['trust']}.", ""]
            parts += [markdown_table(heterogeneity_display(het)), ""]
        if loo is not None:
            parts += ["## Leave-one-out cross-validation (az.loo)", "", markdown_table(loo[0]), "",
                      markdown_table(loo[1]), ""]
        parts += ["## Plots", ""] + [f"![{k}]({p.name})" for k, p in plots.items()] + [""]
        path = out / "report.md"
    else:
        parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>",
                 f"<h1>{html.escape(title)}</h1>", "<h2>Summary</h2>", f"<pre>{html.escape(res.summary())}</pre>"]
        if het is not None:
            parts += ["<h2>Heterogeneity</h2>", f"<p>Intervals: {html.escape(het.attrs['interval'])}.</p>"]
            if "trust" in het.attrs:
                parts += [f"<p>Trust check of the variational fit: {html.escape(het.attrs['trust'])}.</p>"]
            parts += [heterogeneity_display(het).to_html()]
        if loo is not None:
            parts += ["<h2>Leave-one-out cross-validation (az.loo)</h2>", loo[0].to_html(), loo[1].to_html()]
        parts += ["<h2>Plots</h2>"] + [f"<p><img src='{p.name}' alt='{k}'></p>" for k, p in plots.items()]
        parts += ["</body></html>"]
        path = out / "report.html"
    path.write_text("\n".join(parts))
    return path
