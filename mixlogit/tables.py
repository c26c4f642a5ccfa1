"""Plain-text tables shared by both front ends: GitHub-flavoured Markdown pipe tables that also read well in a
terminal (columns padded to a common width)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd


def _cell(v, floatfmt: str, missing: str) -> str:
    if isinstance(v, (float, np.floating)):
        return missing if not math.isfinite(v) else format(float(v), floatfmt)
    return str(v)


def markdown_table(rows: pd.DataFrame | Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   floatfmt: str = ".4g", missing: str = "") -> str:
    """A Markdown pipe table of a DataFrame (its index as the first column) or of a list of row dicts.

    ``columns`` picks and orders the columns (default: all, in order); floats are written with ``floatfmt``
    and non-finite floats as ``missing``. Text is left-aligned in the header and right-aligned in the body.
    An empty list of rows gives ``"(no rows)"``.
    """
    if isinstance(rows, pd.DataFrame):
        df = rows if columns is None else rows[list(columns)]
        header = [str(df.index.name or "")] + [str(c) for c in df.columns]
        body = [[str(idx)] + [_cell(v, floatfmt, missing) for v in row] for idx, row in
                zip(df.index, df.itertuples(index=False, name=None))]
    else:
        rows = list(rows)
        if not rows:
            return "(no rows)"
        header = [str(c) for c in (columns or list(rows[0]))]
        body = [[_cell(r.get(c, ""), floatfmt, missing) for c in header] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(v.rjust(w) for v, w in zip(b, widths)) + " |" for b in body]
    return "\n".join(out)
