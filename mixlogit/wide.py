"""Wide tables (one row per choice situation, a column per alternative and attribute) turned into the long
format :meth:`mixlogit.data.ChoiceData.from_long` reads."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .data import ChoiceDataError, first_label, first_value, require_columns


def wide_to_long(
    df: pd.DataFrame,
    alternatives: list,
    varying: dict[str, dict[object, str]] | dict[str, str],
    choice: str,
    situation: str | None = None,
    avail: dict[object, str] | None = None,
    keep: list[str] | None = None,
) -> pd.DataFrame:
    """Turn a wide table (one row per situation) into the long format ``from_long`` reads.

    Parameters
    ----------
    alternatives : the alternative labels.
    varying : attribute name -> either ``{alt: column}`` or a pattern with ``{alt}``, e.g. ``"time_{alt}"``.
    choice : column holding the chosen alternative's label.
    situation : id column, or None to number situations from 0.
    avail : ``{alt: column}`` of 0/1 availability, or None.
    keep : further columns copied to every row of the situation (e.g. a panel id, weights).

    Returns a DataFrame with columns ``situation``, ``alt``, ``choice``, the attributes, ``avail`` (if given)
    and ``keep``; rows ordered by situation then alternative.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    keep = list(keep or [])
    require_columns(df, {"choice": choice, **({"situation": situation} if situation is not None else {}),
                         **{f"keep[{i}]": k for i, k in enumerate(keep)}})
    sit = df[situation].to_numpy() if situation is not None else np.arange(len(df))
    def is_alt(a) -> np.ndarray:
        # Numeric codes compare as numbers (1.0 == 1 after read_csv), anything else by its text.
        col = df[choice]
        if pd.api.types.is_numeric_dtype(col) and isinstance(a, (int, float, np.number)):
            return (col.to_numpy() == a)
        return (col.astype(str) == str(a)).to_numpy()

    bad = ~np.logical_or.reduce([is_alt(a) for a in alternatives])
    if bad.any():
        row = first_label(df.index, bad)
        raise ChoiceDataError(
            f"choice column {choice!r} holds {first_value(df[choice], bad)!r} in row {row!r}, which is not one of the "
            f"alternatives {alternatives!r}"
        )
    parts = []
    for a in alternatives:
        part = {"situation" if situation is None else situation: sit, "alt": a,
                "choice": is_alt(a).astype(int)}
        for name, spec in varying.items():
            col = spec.format(alt=a) if isinstance(spec, str) else spec.get(a)
            if col is None:
                part[name] = 0.0  # attribute absent for this alternative
                continue
            if col not in df.columns:
                raise ChoiceDataError(f"column {col!r} (attribute {name!r}, alternative {a!r}) is not in the table; "
                                      f"columns are: {', '.join(map(str, df.columns))}")
            part[name] = df[col].to_numpy()
        if avail is not None:
            if a not in avail:
                raise ChoiceDataError(f"avail has no existing column for alternative {a!r} (it names none)")
            if avail[a] not in df.columns:
                raise ChoiceDataError(f"column {avail[a]!r} (avail, alternative {a!r}) is not in the table; columns "
                                      f"are: {', '.join(map(str, df.columns))}")
            part["avail"] = df[avail[a]].to_numpy()
        for k in keep:
            part[k] = df[k].to_numpy()
        parts.append(pd.DataFrame(part))
    out = pd.concat(parts, ignore_index=True)
    # parts are alternative-major; reorder to situation-major (row a*len(df)+i -> i*n_alt+a).
    order = np.arange(len(out)).reshape(len(alternatives), len(df)).T.ravel()
    return out.iloc[order].reset_index(drop=True)
