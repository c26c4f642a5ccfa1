"""Results of the Bayesian estimators (SVI, NUTS): posterior tables in statsmodels style, posterior draws,
ArviZ export, individual-level estimates and a JSON save/load round trip."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from ..budget import MAX_INDIVIDUAL_ELEMENTS
from ..persistence import write_json
from ..spec import Spec
from .samplers import StoredSampler, SVISampler, random_rows

#: The format field of Bayesian results files (the name is the module's before it moved into the package; saved
#: files keep it), which :func:`mixlogit.load` also reads.
FORMAT = "mixlogit.bayes_results"
FORMAT_VERSION = 1


@dataclass
class PosteriorDraws:
    """Posterior draws.

    params : DataFrame (n, P), population parameters under the MSL names (spreads positive).
    theta : (n, P) the same values as an array in the Spec layout (what :meth:`Spec.coefficients` takes).
    individual : (n, N, K) draws of every unit's random coefficients, or None.
    coefficients : names of the K random coefficients; units : the N unit labels (panel ids or situations).
    """

    params: pd.DataFrame
    theta: np.ndarray
    individual: np.ndarray | None
    coefficients: list[str]
    units: list


class BayesResults:
    """Posterior of a Bayesian mixed logit fit (``method="svi"`` or ``"nuts"``).

    Attributes: ``params`` (posterior means), ``bse`` (posterior sds), ``conf_int()`` (equal-tailed credible
    intervals), ``draws`` ((chains, draws, P) population draws, Spec layout, spreads positive), ``elbo`` (SVI:
    ELBO per step), ``sample_stats`` (NUTS: ``diverging``, ``tree_depth`` per draw), ``converged``,
    ``message``, ``priors`` (parameter -> prior), ``settings``, ``fit_time``.
    """

    FORMAT: ClassVar[str] = FORMAT

    def __init__(self, *, method, model_args, spec: Spec, draws, individual_mean, individual_sd, unit_labels, elbo,
                 sample_stats, converged, message, n_iter, settings, priors, fit_time, n_obs, n_units, sampler=None,
                 data=None):
        self.method = method
        self.model_args = dict(model_args)
        self.spec = spec
        self.param_names = spec.param_names
        self.draws = np.asarray(draws, dtype=float)
        if self.draws.ndim != 3 or self.draws.shape[-1] != len(self.param_names):
            raise ValueError(f"draws must have shape (chains, draws, {len(self.param_names)}), got {self.draws.shape}")
        names = spec.random_names
        idx = pd.Index(unit_labels, name="unit")
        self._individual = None
        if individual_mean is not None:
            self._individual = pd.concat([
                pd.DataFrame(np.asarray(individual_mean), columns=names, index=idx),
                pd.DataFrame(np.asarray(individual_sd), columns=[f"sd.{n}" for n in names], index=idx)], axis=1)
        self.unit_labels = list(unit_labels)
        self.elbo = None if elbo is None else np.asarray(elbo, dtype=float)
        self.sample_stats = {k: np.asarray(v) for k, v in (sample_stats or {}).items()}
        self.converged, self.message, self.n_iter = bool(converged), str(message), int(n_iter)
        self.settings = dict(settings)
        self.priors = dict(priors)
        self.fit_time = float(fit_time)
        self.n_obs, self.n_units = int(n_obs), int(n_units)
        self._sampler = sampler if sampler is not None else StoredSampler(self.draws)
        self._data = data

    @classmethod
    def from_fit(cls, *, method, model, data, spec: Spec, sampler, **fields) -> BayesResults:
        """The results of a fit of ``model`` (a :class:`mixlogit.MixedLogit`) on ``data`` that has just run:
        the model, units and sampler as every estimator records them, the rest (``fields``) as given."""
        return cls(method=method, model_args=model.to_dict(), spec=spec, unit_labels=list(data.unit_labels),
                   n_obs=data.n_situations, n_units=data.n_units, sampler=sampler, data=data, **fields)

    # ------------------------------------------------------------------ tables
    @property
    def theta(self) -> np.ndarray:
        """Posterior mean in the Spec layout."""
        return self.draws.reshape(-1, self.draws.shape[-1]).mean(0)

    @property
    def params(self) -> pd.Series:
        return pd.Series(self.theta, index=self.param_names, name="params")

    @property
    def bse(self) -> pd.Series:
        flat = self.draws.reshape(-1, self.draws.shape[-1])
        return pd.Series(flat.std(0, ddof=1), index=self.param_names, name="bse")

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Equal-tailed ``1 - alpha`` credible intervals: DataFrame with columns ``lower``, ``upper``."""
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        flat = self.draws.reshape(-1, self.draws.shape[-1])
        lo, hi = np.quantile(flat, [alpha / 2, 1 - alpha / 2], axis=0)
        return pd.DataFrame({"lower": lo, "upper": hi}, index=self.param_names)

    def summary_frame(self, alpha: float = 0.05) -> pd.DataFrame:
        """Posterior mean (``estimate``), sd (``std.err``), credible interval, and for several chains ``r_hat``
        and ``ess_bulk``."""
        ci = self.conf_int(alpha)
        out = pd.DataFrame({"estimate": self.params, "std.err": self.bse, "lower": ci["lower"],
                            "upper": ci["upper"]})
        if self.draws.shape[0] > 1 or self.method == "nuts":
            import arviz as az

            ds = az.convert_to_dataset(self.draws)
            out["r_hat"] = np.asarray(az.rhat(ds)["x"]) if self.draws.shape[0] > 1 else np.nan
            out["ess_bulk"] = np.asarray(az.ess(ds, method="bulk")["x"])
        return out

    def summary(self) -> str:
        """A printable table of posterior summaries and fit diagnostics."""
        s = self.settings
        if self.method == "svi":
            what = (f"SVI ({s.get('guide')} guide, {self.n_iter} steps"
                    + (f", subsample {s['subsample']}" if s.get("subsample") else "") + ")")
        else:
            what = f"NUTS ({s.get('chains')} chains x {s.get('num_samples')} draws, {s.get('num_warmup')} warmup)"
        head = [f"Mixed logit, Bayesian {what}",
                (f"units: {self.n_units}   choice situations: {self.n_obs}   parameters: {self.n_params}   "
                 f"posterior draws: {self.draws.shape[0] * self.draws.shape[1]}")]
        if self.elbo is not None and len(self.elbo):
            w = int(s.get("window", 100))
            head.append(f"ELBO (mean of the last {min(w, len(self.elbo))} steps): {np.mean(self.elbo[-w:]):.3f}")
        if "diverging" in self.sample_stats:
            head.append(f"divergences: {int(self.sample_stats['diverging'].sum())}   max tree depth: "
                        f"{int(self.sample_stats['tree_depth'].max()) if self.sample_stats['tree_depth'].size else 0}")
        head.append(f"converged: {self.converged} ({self.message}; {self.fit_time:.1f} s)")
        head.append("priors: " + ", ".join(f"{k} ~ {v}" for k, v in self.priors.items()))
        table = self.summary_frame().to_string(float_format=lambda v: f"{v:.4f}")
        rule = "-" * max(len(x) for x in table.splitlines())
        return "\n".join(head + [rule, table, rule, "intervals: 95% equal-tailed credible intervals"])

    def __repr__(self):
        return (f"<BayesResults {self.method} params={self.n_params} draws={self.draws.shape[0] * self.draws.shape[1]} "
                f"converged={self.converged}>")

    # ------------------------------------------------------------------ draws
    def posterior(self, n: int = 1000, seed: int = 0, individual: bool | None = None) -> PosteriorDraws:
        """``n`` posterior draws of the population parameters and (when available) of every unit's random
        coefficients. ``individual=None`` includes them when ``n * N * K`` is at most
        :data:`MAX_INDIVIDUAL_ELEMENTS`; results read from a file carry population draws only."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        K = self.spec.n_random
        can = K > 0 and not isinstance(self._sampler, StoredSampler)
        if individual is None:
            individual = can and n * self.n_units * K <= MAX_INDIVIDUAL_ELEMENTS
        if individual and not can:
            raise ValueError("individual draws are not available: the model has no random coefficients or the "
                             "results were read from a file")
        if isinstance(self._sampler, SVISampler):
            theta, beta = self._sampler.chains(n, seed, individual=individual)
            theta, beta = theta[0], (None if beta is None else beta[0])
        else:
            theta_c, beta_c = self._sampler.chains(None, seed, individual=individual)
            flat = theta_c.reshape(-1, theta_c.shape[-1])
            idx = random_rows(len(flat), n, seed, what="posterior draws of this NUTS run")
            theta = flat[idx]
            beta = None if beta_c is None else beta_c.reshape(-1, *beta_c.shape[2:])[idx]
        return PosteriorDraws(params=pd.DataFrame(theta, columns=self.param_names), theta=theta, individual=beta,
                              coefficients=list(self.spec.random_names), units=list(self.unit_labels))

    def individual(self, data=None) -> pd.DataFrame:
        """Posterior mean and sd of every unit's random coefficients, indexed by unit (panel id or situation id),
        columns ``x`` and ``sd.x`` as in :meth:`MixedLogitResults.individual`. ``data`` is accepted for symmetry
        with MSL results and must hold the estimation units."""
        if not self.spec.n_random:
            raise ValueError("the model has no random coefficients")
        if self._individual is None:
            raise ValueError("these results carry no individual-level estimates")
        if data is not None and list(data.unit_labels) != list(self.unit_labels):
            raise ValueError("data holds other units than the estimation data; Bayesian individual-level "
                             "estimates exist for the estimation units only")
        return self._individual.copy()

    def to_arviz(self, data=None, n: int | None = None, log_likelihood: str = "marginal", draws: int = 100,
                 seed: int = 0, individual: bool | None = None):
        """ArviZ InferenceData; see :func:`mixlogit.diagnostics.bayes_to_arviz`."""
        from ..diagnostics import bayes_to_arviz

        return bayes_to_arviz(self, data=data, n=n, log_likelihood=log_likelihood, draws=draws, seed=seed,
                              individual=individual)

    def heterogeneity(self, level: float = 0.9):
        """See :func:`mixlogit.diagnostics.heterogeneity`."""
        from ..diagnostics import heterogeneity

        return heterogeneity(self, level=level)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        ind = self._individual
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "method": self.method, "model": self.model_args,
            "spec": self.spec.to_dict(), "param_names": self.param_names, "draws": self.draws.tolist(),
            "unit_labels": [_jsonable(u) for u in self.unit_labels],
            "individual_mean": None if ind is None else ind[self.spec.random_names].to_numpy().tolist(),
            "individual_sd": None if ind is None else ind[[f"sd.{n}" for n in self.spec.random_names]]
            .to_numpy().tolist(),
            "elbo": None if self.elbo is None else self.elbo.tolist(),
            "sample_stats": {k: v.tolist() for k, v in self.sample_stats.items()},
            "converged": self.converged, "message": self.message, "n_iter": self.n_iter,
            "settings": self.settings, "priors": self.priors, "fit_time": self.fit_time, "n_obs": self.n_obs,
            "n_units": self.n_units,
        }

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the results as JSON (population draws, individual-level means and sds, ELBO trace, sample
        statistics, settings). Refuses to replace an existing file unless ``overwrite=True``."""
        return write_json(path, self.to_dict(), overwrite=overwrite)

    @classmethod
    def from_dict(cls, d: dict) -> BayesResults:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a mixlogit Bayesian results file (format {d.get('format')!r})")
        spec = Spec(**d["spec"])
        return cls(method=d["method"], model_args=d["model"], spec=spec, draws=np.asarray(d["draws"]),
                   individual_mean=d["individual_mean"], individual_sd=d["individual_sd"],
                   unit_labels=d["unit_labels"], elbo=d["elbo"], sample_stats=d["sample_stats"],
                   converged=d["converged"], message=d["message"], n_iter=d["n_iter"], settings=d["settings"],
                   priors=d["priors"], fit_time=d["fit_time"], n_obs=d["n_obs"], n_units=d["n_units"])


def _jsonable(v):
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v
