"""Choice data: validation of long-format tables and their conversion to padded tensors.

A long-format table has one row per alternative per choice situation. ``ChoiceData.from_long`` checks it
once (every error names the column and the row or situation at fault) and :meth:`ChoiceData.design` turns
the columns a model uses into the tensors the kernel consumes.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Hashable

import numpy as np
import pandas as pd
import torch

from .design import Design
from .devices import resolve_device


class ChoiceDataError(ValueError):
    """Raised for malformed choice data; the message names the column and row or situation."""


def plain_value(v: object) -> object:
    """A numpy scalar as the plain Python value, so messages read ``101`` rather than ``np.int64(101)``."""
    return v.item() if isinstance(v, np.generic) else v


def first_label(index: pd.Index, mask: np.ndarray) -> object:
    """The index label of the first row where ``mask`` (rows,) is True, for messages."""
    return plain_value(index[np.flatnonzero(mask)[0]])


def first_value(s: pd.Series, mask: np.ndarray) -> object:
    """The value of ``s`` in the first row where ``mask`` is True, found by position (an index that repeats a
    label would give a Series by label)."""
    return plain_value(s.iloc[np.flatnonzero(mask)[0]])


REQUIRED_ROLES = ("choice", "alt", "situation")


def require_columns(df: pd.DataFrame, columns: dict[str, str | None]) -> None:
    """Each role's column (role -> column name, None when not given) must be one name that is in ``df``; the
    roles in :data:`REQUIRED_ROLES` must be given, and no column name may appear twice in ``df``. Errors name the
    role and the columns there are."""
    dup = df.columns[df.columns.duplicated()]
    if len(dup):
        raise ChoiceDataError(f"column {plain_value(dup[0])!r} appears {int((df.columns == dup[0]).sum())} times in the "
                              "table; column names must be unique (rename or drop the copies)")
    for role, col in columns.items():
        if col is None and role in REQUIRED_ROLES:
            raise ChoiceDataError(f"{role}= is required: the name of the {role} column")
        if col is not None and (isinstance(col, (list, tuple, set, dict)) or not isinstance(col, Hashable)):
            raise ChoiceDataError(f"{role}= must be one column name, got {col!r}")
        if col is not None and col not in df.columns:
            raise ChoiceDataError(
                f"column {col!r} (given as {role}=) is not in the table; columns are: {', '.join(map(str, df.columns))}"
            )


def require_choice_data(data, name: str = "data") -> None:
    """Raise a TypeError unless ``data`` is a :class:`ChoiceData` (a raw DataFrame is the common slip)."""
    if not isinstance(data, ChoiceData):
        raise TypeError(f"{name} must be a mixlogit.ChoiceData (use ChoiceData.from_long), got {type(data).__name__}")


def _numeric_column(df: pd.DataFrame, col: str, role: str) -> np.ndarray:
    """A column as finite float64, or an error naming the column and the first bad row."""
    s = df[col]
    if s.dtype == bool:
        return s.to_numpy(dtype=np.float64)
    if pd.api.types.is_complex_dtype(s) or (s.dtype == object and s.map(lambda v: isinstance(v, complex)).any()):
        raise ChoiceDataError(f"{role} column {col!r} holds complex numbers (dtype {s.dtype}); attributes must be "
                              "real: take the real part or the modulus first")
    if not (pd.api.types.is_numeric_dtype(s)):
        missing = s.isna().to_numpy()
        bad = pd.to_numeric(s, errors="coerce").isna().to_numpy() & ~missing
        if not bad.any() and missing.any():  # numbers with gaps (an object column holding None)
            row = first_label(df.index, missing)
            raise ChoiceDataError(f"{role} column {col!r} is missing in row {row!r} ({int(missing.sum())} such "
                                  "rows); fill or drop them first")
        bad = bad if bad.any() else np.arange(len(s)) == 0
        row = first_label(df.index, bad)
        raise ChoiceDataError(
            f"{role} column {col!r} is not numeric (dtype {s.dtype}); row {row!r} holds {first_value(s, bad)!r}. "
            "Encode categories as numeric dummies."
        )
    v = s.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(v)
    if bad.any():
        row = first_label(df.index, bad)
        raise ChoiceDataError(
            f"{role} column {col!r} has a non-finite value ({plain_value(v[bad][0])}) in row {row!r} "
            f"({int(bad.sum())} such rows); fill or drop them first"
        )
    return v


def _binary_column(df: pd.DataFrame, col: str, role: str) -> np.ndarray:
    s = df[col]
    if s.dtype == object or pd.api.types.is_string_dtype(s):
        mapped = s.astype(str).str.upper().map({"TRUE": 1.0, "FALSE": 0.0, "1": 1.0, "0": 0.0})
        if mapped.isna().any():
            row = first_label(df.index, mapped.isna().to_numpy())
            raise ChoiceDataError(
                f"{role} column {col!r} must hold 0/1 or True/False; row {row!r} holds "
                f"{first_value(s, mapped.isna().to_numpy())!r}"
            )
        v = mapped.to_numpy(dtype=np.float64)
    else:
        v = _numeric_column(df, col, role)
    bad = (v != 0) & (v != 1)
    if bad.any():
        row = first_label(df.index, bad)
        raise ChoiceDataError(f"{role} column {col!r} must hold 0/1 or True/False; row {row!r} holds {plain_value(v[bad][0])}")
    return v.astype(bool)


def factorize_sorted(values) -> tuple[np.ndarray, pd.Index]:
    """Codes and labels of ``values`` with the labels in sorted order, whatever the order of the rows: natural
    order where the labels compare, else by (type name, text). Unit and situation codes come from here, so
    each unit's draws follow its label, never its position in the table."""
    codes, labels = pd.factorize(values, sort=False)
    plain = [plain_value(v) for v in labels]
    try:
        order = sorted(range(len(plain)), key=lambda i: plain[i])
    except TypeError:  # labels of several types
        order = sorted(range(len(plain)), key=lambda i: (type(plain[i]).__name__, str(plain[i])))
    rank = np.empty(len(plain), dtype=np.int64)
    rank[np.asarray(order, dtype=np.int64)] = np.arange(len(plain))
    return rank[codes], labels.take(order)


class ChoiceData:
    """A validated long-format choice table.

    Build it with :meth:`from_long` (or :func:`wide_to_long` first). Attributes: ``df`` (the table, original
    index and order), ``choice``, ``alt``, ``situation``, ``panel``, ``avail``, ``weights`` (column names),
    ``alternatives`` (sorted), ``n_situations``, ``n_units``, ``n_rows``.
    """

    #: Where :meth:`design` puts its tensors (see :meth:`to`); None: the CPU, or the device a fit names.
    device: torch.device | None = None

    def __init__(self, df, choice, alt, situation, panel, avail, weights, _arrays):
        self.df = df
        self.choice, self.alt, self.situation, self.panel = choice, alt, situation, panel
        self.avail, self.weights = avail, weights
        (self._chosen, self._avail, self._alt_code, self._unit_code, self._t_code,
         self._unit_weights, self.alternatives, self.unit_labels) = _arrays

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_long(
        cls,
        df: pd.DataFrame,
        choice: str,
        alt: str,
        situation: str,
        panel: str | None = None,
        avail: str | None = None,
        weights: str | None = None,
    ) -> ChoiceData:
        """Validate a long table: one row per alternative per choice situation.

        Parameters
        ----------
        df : the table. ``choice`` holds 1/True on the chosen alternative's row and 0/False elsewhere.
        alt : alternative label column (any hashable labels; alternatives may differ across situations).
        situation : choice-situation id column.
        panel : person id column for panel data (one coefficient draw per person), or None.
        avail : 0/1 availability column, or None (every listed alternative is available).
        weights : positive weight column, constant within a panel unit (within a situation without panel).
        """
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
        if len(df) == 0:
            raise ChoiceDataError("the table has no rows")
        require_columns(df, {"choice": choice, "alt": alt, "situation": situation, "panel": panel,
                              "avail": avail, "weights": weights})
        for role, col in {"alt": alt, "situation": situation, "panel": panel}.items():
            if col is not None and df[col].isna().any():
                row = first_label(df.index, df[col].isna().to_numpy())
                raise ChoiceDataError(f"{role} column {col!r} is missing in row {row!r}")
        chosen = _binary_column(df, choice, "choice")
        av = _binary_column(df, avail, "avail") if avail is not None else np.ones(len(df), bool)

        sit_codes, sit_labels = factorize_sorted(df[situation])
        dup = pd.DataFrame({"s": sit_codes, "a": df[alt].to_numpy()}).duplicated().to_numpy()
        if dup.any():
            i = int(np.flatnonzero(dup)[0])  # by position: the index may repeat labels
            raise ChoiceDataError(
                f"alternative {plain_value(df[alt].iloc[i])!r} appears twice in situation {plain_value(df[situation].iloc[i])!r} "
                f"(row {plain_value(df.index[i])!r}); column {alt!r} must be unique within column {situation!r}"
            )
        n_chosen = np.bincount(sit_codes, weights=chosen.astype(float), minlength=len(sit_labels))
        bad = n_chosen != 1
        if bad.any():
            s = np.flatnonzero(bad)[0]
            raise ChoiceDataError(
                f"situation {plain_value(sit_labels[s])!r} (column {situation!r}) has {int(n_chosen[s])} chosen alternatives "
                f"in column {choice!r}; exactly one is required ({int(bad.sum())} situations affected)"
            )
        unavailable_choice = chosen & ~av
        if unavailable_choice.any():
            row = first_label(df.index, unavailable_choice)
            raise ChoiceDataError(
                f"row {row!r} is chosen (column {choice!r}) but unavailable (column {avail!r})"
            )
        if panel is not None:
            per_sit = pd.DataFrame({"s": sit_codes, "p": df[panel].to_numpy()}).groupby("s")["p"].nunique()
            if (per_sit > 1).any():
                s = int(per_sit.index[(per_sit > 1).to_numpy()][0])
                rows = np.flatnonzero(sit_codes == s)
                raise ChoiceDataError(
                    f"panel id (column {panel!r}) changes within situation {plain_value(sit_labels[s])!r} "
                    f"(rows {plain_value(df.index[rows[0]])!r}..{plain_value(df.index[rows[-1]])!r}); a situation belongs to one person"
                )
            unit_codes, unit_labels = factorize_sorted(df[panel])
        else:
            unit_codes, unit_labels = sit_codes, sit_labels
        if weights is not None:
            w = _numeric_column(df, weights, "weights")
            if (w <= 0).any():
                row = first_label(df.index, w <= 0)
                raise ChoiceDataError(f"weights column {weights!r} must be positive; row {row!r} holds {plain_value(w[w <= 0][0])}")
            spread = pd.Series(w).groupby(unit_codes).agg(lambda x: x.max() - x.min())
            if (spread > 0).any():
                u = int(spread.index[(spread > 0).to_numpy()][0])
                unit_name = "panel unit" if panel is not None else "situation"
                raise ChoiceDataError(
                    f"weights column {weights!r} varies within {unit_name} {plain_value(unit_labels[u])!r}; "
                    f"weights must be constant within each {unit_name}"
                )
            unit_w = pd.Series(w).groupby(unit_codes).first().sort_index().to_numpy()
        else:
            unit_w = np.ones(len(unit_labels))

        # Position of each situation within its unit, in sorted order of the situation labels.
        sit_unit = np.zeros(len(sit_labels), dtype=np.int64)
        sit_unit[sit_codes] = unit_codes
        sit_t = pd.Series(np.arange(len(sit_labels))).groupby(sit_unit).cumcount().to_numpy()
        t_codes = sit_t[sit_codes]
        alt_codes, alternatives = pd.factorize(df[alt], sort=True)
        # Constants are named asc.<label>, so labels must stay distinct as text (1 and "1" would collide).
        as_text: dict[str, object] = {}
        for a in alternatives:
            other = as_text.setdefault(str(a), a)
            if other is not a:
                raise ChoiceDataError(f"column {alt!r} holds the alternative labels {plain_value(other)!r} and {plain_value(a)!r}, "
                                      "which differ only in type; use one type for the labels")
        arrays = (chosen, av, alt_codes, unit_codes, t_codes, unit_w, [plain_value(a) for a in alternatives],
                  [plain_value(u) for u in unit_labels])
        return cls(df, choice, alt, situation, panel, avail, weights, arrays)

    # ------------------------------------------------------------------ facts
    @property
    def n_rows(self) -> int:
        return len(self.df)

    @property
    def n_units(self) -> int:
        return len(self.unit_labels)

    @property
    def n_situations(self) -> int:
        return int(self.df[self.situation].nunique())

    @property
    def is_panel(self) -> bool:
        return self.panel is not None

    @property
    def row_chosen(self) -> np.ndarray:
        """(rows,) bool: the chosen row of every situation, in table order."""
        return self._chosen

    @property
    def row_available(self) -> np.ndarray:
        """(rows,) bool: whether each row's alternative is available, in table order."""
        return self._avail

    def numeric_columns(self) -> list[str]:
        """Columns that can serve as attributes (numeric, not an id/choice/avail/weights column)."""
        roles = {self.choice, self.alt, self.situation, self.panel, self.avail, self.weights}
        return [c for c in self.df.columns if c not in roles and pd.api.types.is_numeric_dtype(self.df[c])]

    def fingerprint(self, columns=()) -> str:
        """sha256 (hex) of the role columns and the attribute ``columns`` (names that are not columns, such as
        ``asc.<alt>``, are skipped), in a canonical order: roles in a fixed order, attributes sorted by name, rows
        sorted by (situation, alternative), so a shuffled table gives the same fingerprint."""
        roles = {"choice": self.choice, "alt": self.alt, "situation": self.situation, "panel": self.panel,
                 "avail": self.avail, "weights": self.weights}
        cols = [(r, c) for r, c in roles.items() if c is not None]
        cols += [("attribute", c) for c in sorted({c for c in columns if c in self.df.columns} - set(roles.values()))]
        order = np.lexsort((self.df[self.alt].astype(str).to_numpy(), self.df[self.situation].astype(str).to_numpy()))
        h = hashlib.sha256()
        for role, c in cols:
            s = self.df[c].iloc[order]
            h.update(f"\x1e{role}:{c}\x1f".encode())
            numeric = pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
            h.update(s.to_numpy(np.float64).tobytes() if numeric else "\x1f".join(map(str, s)).encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (f"ChoiceData({self.n_rows} rows, {self.n_situations} situations, {self.n_units} "
                f"{'persons' if self.is_panel else 'units'}, {len(self.alternatives)} alternatives)")

    # ------------------------------------------------------------------ tensors
    def attribute_matrix(self, columns: list[str]) -> np.ndarray:
        """(rows, K) float64 matrix of attribute columns; ``asc.<alt>`` names give alternative dummies."""
        out = np.zeros((self.n_rows, len(columns)))
        roles = {"choice": self.choice, "alt": self.alt, "situation": self.situation, "panel": self.panel,
                 "avail": self.avail, "weights": self.weights}
        for k, col in enumerate(columns):
            role = next((r for r, c in roles.items() if c is not None and c == col), None)
            if role:
                raise ChoiceDataError(f"{col!r} is the data's {role}= column; it cannot also be an attribute with a "
                                      "coefficient")
            if col.startswith("asc.") and col not in self.df.columns:
                label = col[4:]
                match = [a for a in self.alternatives if str(a) == label]
                if not match:
                    raise ChoiceDataError(
                        f"{col!r}: alternative {label!r} is not in column {self.alt!r}; "
                        f"alternatives are: {', '.join(map(str, self.alternatives))}"
                    )
                out[:, k] = (self.df[self.alt].to_numpy() == match[0]).astype(float)
            else:
                if col not in self.df.columns:
                    raise ChoiceDataError(
                        f"attribute column {col!r} is not in the table; numeric columns are: "
                        f"{', '.join(map(str, self.numeric_columns()))}"
                    )
                out[:, k] = _numeric_column(self.df, col, "attribute")
        return out

    def to(self, device) -> ChoiceData:
        """The same data with :meth:`design` on ``device`` (e.g. ``"cuda"``): a ValueError names a device that is
        not available here and those that are. The table is shared, not copied."""
        out = copy.copy(self)
        out.device = resolve_device(device)
        return out

    def design(self, random_columns: list[str], fixed_columns: list[str], dtype=torch.float64) -> Design:
        """Padded tensors for a model with these random and fixed columns (see :class:`Design`), on the data's
        device (:meth:`to`): built on the CPU whatever torch's default device, then moved once."""
        with torch.device("cpu"):
            return self._cpu_design(random_columns, fixed_columns, dtype).to(self.device or "cpu")

    def _cpu_design(self, random_columns: list[str], fixed_columns: list[str], dtype) -> Design:
        n, j = self.n_units, len(self.alternatives)
        t = int(self._t_code.max()) + 1
        u, tt, jj = self._unit_code, self._t_code, self._alt_code

        def levels(cols):
            x = np.zeros((n, t, j, len(cols)))
            x[u, tt, jj] = self.attribute_matrix(cols)
            return torch.as_tensor(x, dtype=dtype)

        x_r, x_f = levels(random_columns), levels(fixed_columns)
        avail = np.zeros((n, t, j), bool)
        avail[u, tt, jj] = self._avail
        chosen = np.zeros((n, t), np.int64)
        chosen[u[self._chosen], tt[self._chosen]] = jj[self._chosen]
        sit_mask = np.zeros((n, t), bool)
        sit_mask[u, tt] = True
        chosen_t = torch.as_tensor(chosen)
        # Indices of the non-chosen alternatives: a stable sort puts the chosen slot last.
        is_chosen = torch.arange(j).view(1, 1, j) == chosen_t.unsqueeze(-1)
        others = torch.argsort(is_chosen.to(torch.int8), dim=-1, stable=True)[..., : j - 1]
        avail_t = torch.as_tensor(avail)

        def diff(x):
            xc = torch.gather(x, 2, chosen_t.view(n, t, 1, 1).expand(n, t, 1, x.shape[-1]))
            xo = torch.gather(x, 2, others.unsqueeze(-1).expand(n, t, j - 1, x.shape[-1]))
            return xo - xc

        return Design(
            x_rand=x_r, x_fixed=x_f, avail=avail_t, chosen=chosen_t,
            x_rand_diff=diff(x_r), x_fixed_diff=diff(x_f),
            avail_diff=torch.gather(avail_t, 2, others),
            situation_mask=torch.as_tensor(sit_mask),
            weights=torch.tensor(self._unit_weights, dtype=dtype),  # a copy: the array may be read-only
            row_unit=torch.as_tensor(u), row_t=torch.as_tensor(tt), row_j=torch.as_tensor(jj),
        )
