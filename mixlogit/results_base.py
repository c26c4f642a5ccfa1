"""What every estimator's results share (statsmodels' ``LikelihoodModelResults`` pattern): the model they
came from, the summary layout, the alpha check, ``conf_int``, ``to_dict``/``save``/``from_dict``, and the
contract the diagnostics rely on.

A subclass (MSL: :class:`mixlogit.results.MixedLogitResults`; SVI/NUTS: :class:`mixlogit.bayes.results.
BayesResults`) adds only what differs: how it makes intervals, its summary head, its JSON fields and its
parameter draws. The diagnostics (:mod:`mixlogit.diagnostics`) ask a result for ``spec``, ``theta``,
``parameter_draws``, ``to_arviz``, ``heterogeneity`` and ``individual_estimates`` and never for its type, so a
third estimator is one more subclass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from .data import ChoiceData, Design, require_choice_data
from .diagnostics.statistics import check_level
from .persistence import write_json
from .spec import Spec

#: Version of the results files this code writes and reads (every format).
FORMAT_VERSION = 1


def check_alpha(alpha) -> float:
    """An interval's error rate: a number (not a bool or text such as "0.05") strictly between 0 and 1."""
    return check_level(alpha, "alpha")


def require_finite(d: dict, fields) -> None:
    """Every number in the fields ``fields`` of a results dict (those present and not null) must be finite; the
    error names the field (JSON written by Python holds NaN and Infinity as bare tokens, read back as floats)."""
    for name in fields:
        if d.get(name) is None:
            continue
        try:
            a = np.asarray(d[name], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"the field {name!r} does not hold numbers") from None
        bad = ~np.isfinite(a)
        if bad.any():
            where = "" if a.ndim == 0 else f" at position {tuple(int(i) for i in np.argwhere(bad)[0])}"
            what = "NaN (or null)" if np.isnan(a[bad]).any() else "an infinite value"
            raise ValueError(f"the field {name!r} holds {what}{where} ({int(bad.sum())} such entries); "
                             "a results file holds finite estimates")


class FitResults:
    """Base of all results: holds ``model`` (the :class:`~mixlogit.model.MixedLogit` that was fitted), ``spec``,
    ``param_names``, ``settings`` (how it was fitted), ``fit_time``, ``n_obs`` (choice situations) and
    ``n_units`` (persons, or situations without a panel).

    Subclasses define ``FORMAT`` and ``DESCRIPTION`` (the results file's format field and its name in errors),
    ``theta`` (the point estimate in the Spec layout), ``params`` and ``bse``, and the hooks below.
    """

    FORMAT: ClassVar[str]
    DESCRIPTION: ClassVar[str]
    #: The JSON fields that hold estimates, which must be finite when a file is read back.
    FINITE_FIELDS: ClassVar[tuple[str, ...]] = ()
    #: Indentation of the JSON file (None: one line).
    JSON_INDENT: ClassVar[int | None] = None

    def __init__(self, *, model, spec: Spec, settings: dict, fit_time: float, n_obs: int, n_units: int):
        self.model = model
        self.spec = spec
        self.param_names = spec.param_names
        self.settings = dict(settings)
        self.fit_time = float(fit_time)
        self.n_obs, self.n_units = int(n_obs), int(n_units)

    # ------------------------------------------------------------------ what a subclass defines
    theta: np.ndarray

    @property
    def params(self) -> pd.Series:
        raise NotImplementedError

    @property
    def bse(self) -> pd.Series:
        raise NotImplementedError

    def _interval(self, alpha: float, **options) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds (P,) of ``1 - alpha`` intervals."""
        raise NotImplementedError

    def summary_frame(self, alpha: float = 0.05) -> pd.DataFrame:
        raise NotImplementedError

    def _summary_head(self) -> list[str]:
        """The lines above the table."""
        raise NotImplementedError

    def _summary_foot(self) -> list[str]:
        """The lines below the table."""
        return []

    def _fields(self) -> dict:
        """The subclass's JSON fields (after format, version, model, spec, param_names)."""
        raise NotImplementedError

    @classmethod
    def _from_fields(cls, d: dict, model, spec: Spec) -> FitResults:
        raise NotImplementedError

    def parameter_draws(self, n: int = 1000, seed: int = 0) -> np.ndarray:
        """(n, P) draws of the parameters in the Spec layout (posterior draws, or the asymptotic normal)."""
        raise NotImplementedError

    def heterogeneity(self, level: float = 0.9, n: int = 2000) -> pd.DataFrame:
        """The heterogeneity table (see :func:`mixlogit.diagnostics.heterogeneity`)."""
        raise NotImplementedError

    def to_arviz(self, data: ChoiceData | None = None, **options):
        """arviz.InferenceData of the fit (see :func:`mixlogit.diagnostics.to_idata`)."""
        raise NotImplementedError

    def individual_estimates(self, data: ChoiceData | None = None) -> pd.DataFrame | None:
        """Each unit's estimated random coefficients for the plots, or None where there are none to show."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    @property
    def model_args(self) -> dict:
        """The model's constructor arguments (``MixedLogit(**res.model_args)`` rebuilds it)."""
        return self.model.to_dict()

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def conf_int(self, alpha: float = 0.05, **options) -> pd.DataFrame:
        """``1 - alpha`` intervals: DataFrame with columns ``lower``, ``upper``, indexed by parameter."""
        lo, hi = self._interval(check_alpha(alpha), **options)
        return pd.DataFrame({"lower": np.asarray(lo), "upper": np.asarray(hi)}, index=self.param_names)

    def summary(self) -> str:
        """A printable table of estimates with the fit's statistics above it."""
        table = self.summary_frame().to_string(float_format=lambda v: f"{v:.4f}")
        rule = "-" * max(len(x) for x in table.splitlines())
        return "\n".join([*self._summary_head(), rule, table, rule, *self._summary_foot()])

    def spec_for(self, data: ChoiceData) -> Spec:
        """The model's layout on ``data``, which must be the estimation's parameter layout."""
        require_choice_data(data)
        spec = self.model.spec_for(data)
        if spec.param_names != self.param_names:
            raise ValueError(f"data gives a different parameter layout, {spec.param_names}, from the results' "
                             f"{self.param_names} (do the alternatives differ from the estimation data?)")
        return spec

    def design_for(self, data: ChoiceData) -> Design:
        """The model's tensors on ``data``, which must give the estimation's parameter layout."""
        spec = self.spec_for(data)
        return data.design(spec.random_names, spec.fixed)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return {"format": self.FORMAT, "version": FORMAT_VERSION, "model": self.model.to_dict(),
                "spec": self.spec.to_dict(), "param_names": list(self.param_names), **self._fields()}

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the results as JSON (floats with full precision), atomically. Refuses to replace an existing
        file unless ``overwrite=True``, and results whose estimates are not finite (they could not be read back)."""
        d = self.to_dict()
        try:
            require_finite(d, self.FINITE_FIELDS)
        except ValueError as e:
            raise ValueError(f"cannot save {path}: {e}") from None
        return write_json(path, d, overwrite=overwrite, indent=self.JSON_INDENT)

    @classmethod
    def from_dict(cls, d: dict, model) -> FitResults:
        """Results from :meth:`to_dict`'s output. ``model`` is the fitted model, or a model class, which then
        rebuilds it from ``d["model"]`` (:func:`mixlogit.load` passes :class:`~mixlogit.model.MixedLogit`)."""
        if d.get("format") != cls.FORMAT:
            raise ValueError(f"not a {cls.DESCRIPTION} (format {d.get('format')!r})")
        require_finite(d, cls.FINITE_FIELDS)
        spec = Spec(**d["spec"])
        if isinstance(model, type):
            model = model(**d["model"])
        return cls._from_fields(d, model, spec)
