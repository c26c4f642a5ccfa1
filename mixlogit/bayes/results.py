"""Results of the Bayesian estimators (SVI, NUTS): posterior tables in statsmodels style, posterior draws,
ArviZ export, individual-level estimates and a JSON save/load round trip."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..budget import MAX_INDIVIDUAL_ELEMENTS
from ..data import ChoiceData
from ..diagnostics import LOG_LIKELIHOODS, heterogeneity_from_draws, to_idata
from ..persistence import jsonable
from ..results_base import FitResults
from ..spec import Spec
from ..validation import check_bool
from .samplers import StoredSampler, SVISampler, random_rows, thin
from .trust import TrustCheck

#: The format field of Bayesian results files (the name is the module's before it moved into the package; saved
#: files keep it), which :func:`mixlogit.load` also reads.
FORMAT = "mixlogit.bayes_results"


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


class BayesResults(FitResults):
    """Posterior of a Bayesian mixed logit fit (``method="svi"`` or ``"nuts"``).

    Attributes: ``params`` (posterior means), ``bse`` (posterior sds), ``conf_int()`` (equal-tailed credible
    intervals), ``draws`` ((chains, draws, P) population draws, Spec layout, spreads positive), ``elbo`` (SVI:
    ELBO per step), ``sample_stats`` (NUTS: ``diverging``, ``tree_depth`` per draw), ``converged``,
    ``message``, ``priors`` (parameter -> prior), ``settings``, ``fit_time``; SVI: :meth:`trust_check` (the
    Pareto k of p/q, :mod:`mixlogit.bayes.trust`).
    """

    FORMAT = FORMAT
    DESCRIPTION = "mixlogit Bayesian results file"
    FINITE_FIELDS = ("draws", "individual_mean", "individual_sd", "elbo")

    def __init__(self, *, method, model, spec: Spec, draws, individual_mean, individual_sd, unit_labels, elbo,
                 sample_stats, converged, message, n_iter, settings, priors, fit_time, n_obs, n_units, sampler=None,
                 data=None, trust: TrustCheck | None = None):
        super().__init__(model=model, spec=spec, settings=settings, fit_time=fit_time, n_obs=n_obs,
                         n_units=n_units)
        self.method = method
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
        self.priors = dict(priors)
        self.trust = trust
        # The sampler draws from the fitted posterior (individual draws included) while the fit is in memory;
        # results read from a file keep their population draws only. ``_data`` is the estimation data, the
        # default of :meth:`to_arviz`.
        self._sampler = sampler if sampler is not None else StoredSampler(self.draws)
        self._data = data

    @classmethod
    def from_fit(cls, *, method, model, data, spec: Spec, sampler, **fields) -> BayesResults:
        """The results of a fit of ``model`` (a :class:`mixlogit.MixedLogit`) on ``data`` that has just run:
        the model, units and sampler as every estimator records them, the rest (``fields``) as given."""
        return cls(method=method, model=model, spec=spec, unit_labels=list(data.unit_labels),
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

    def _interval(self, alpha: float):
        """Equal-tailed ``1 - alpha`` credible intervals."""
        flat = self.draws.reshape(-1, self.draws.shape[-1])
        return np.quantile(flat, [alpha / 2, 1 - alpha / 2], axis=0)

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Equal-tailed ``1 - alpha`` credible intervals: DataFrame with columns ``lower``, ``upper``."""
        return super().conf_int(alpha)

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

    def _summary_head(self) -> list[str]:
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
        if self.method == "svi":
            head.append(f"trust check: {self.trust}" if self.trust is not None else
                        "trust check: not computed (trust_draws=0, the default of minibatch fits)")
        if "diverging" in self.sample_stats:
            head.append(f"divergences: {int(self.sample_stats['diverging'].sum())}   max tree depth: "
                        f"{int(self.sample_stats['tree_depth'].max()) if self.sample_stats['tree_depth'].size else 0}")
        head.append(f"converged: {self.converged} ({self.message}; {self.fit_time:.1f} s)")
        head.append("priors: " + ", ".join(f"{k} ~ {v}" for k, v in self.priors.items()))
        return head

    def _summary_foot(self) -> list[str]:
        return ["intervals: 95% equal-tailed credible intervals"]

    def __repr__(self):
        return (f"<BayesResults {self.method} params={self.n_params} draws={self.draws.shape[0] * self.draws.shape[1]} "
                f"converged={self.converged}>")

    def trust_check(self) -> TrustCheck:
        """The trust check of an SVI fit: the Pareto k of the importance ratios p/q of the population parameters
        (``.pareto_k``, ``.usable`` for k < 0.7, ``.reading()``); see :mod:`mixlogit.bayes.trust`."""
        if self.method != "svi":
            raise ValueError(f"the trust check (Pareto k of p/q) applies to SVI results: it asks how far the "
                             f"variational guide q is from the posterior p; a {self.method.upper()} fit draws from "
                             f"the posterior itself, so check its r_hat and ess_bulk (summary_frame()) and "
                             f"divergences (sample_stats) instead")
        if self.trust is None:
            raise ValueError("this SVI fit ran without a trust check (trust_draws=0, the default with subsample=); "
                             "refit with trust_draws=200")
        return self.trust

    # ------------------------------------------------------------------ draws
    def posterior(self, n: int = 1000, seed: int = 0, individual: bool | None = None) -> PosteriorDraws:
        """``n`` posterior draws of the population parameters and (when available) of every unit's random
        coefficients. ``individual=None`` includes them when ``n * N * K`` is at most
        :data:`MAX_INDIVIDUAL_ELEMENTS`; results read from a file carry population draws only."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if individual is not None:
            check_bool("individual", individual)
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

    # ------------------------------------------------------------------ diagnostics contract
    def parameter_draws(self, n: int = 1000, seed: int = 0) -> np.ndarray:
        """(about) ``n`` posterior draws of the parameters, evenly thinned over the chains in order: (n, P)."""
        flat = self.draws.reshape(-1, self.draws.shape[-1])
        return flat[thin(len(flat), n)]

    def heterogeneity(self, level: float = 0.9, n: int = 2000) -> pd.DataFrame:
        """The heterogeneity table: posterior means and equal-tailed credible intervals over (at most ``n``)
        posterior draws."""
        table = heterogeneity_from_draws(self.spec, self.parameter_draws(n), level)
        if self.trust is not None:
            table.attrs["trust"] = str(self.trust)
        return table

    def individual_estimates(self, data: ChoiceData | None = None) -> pd.DataFrame | None:
        """The posterior means and sds of the estimation units' coefficients, or None where they were not kept."""
        try:
            return self.individual()
        except ValueError:
            return None

    def to_arviz(self, data: ChoiceData | None = None, n: int | None = None, log_likelihood: str = "marginal",
                 draws: int = 100, seed: int = 0, individual: bool | None = None):
        """ArviZ InferenceData of the posterior.

        Groups: ``posterior`` (population parameters named as in ``params``; with individual draws also ``beta``
        with dims ``(chain, draw, person, coefficient)``, ``situation`` instead of ``person`` without a panel),
        and with data (the estimation data by default, while the results are in memory): ``log_likelihood``
        (variable ``choice``, one value per panel unit, or per choice situation without a panel),
        ``posterior_predictive`` (replicated choices per situation, alternative codes), ``observed_data``, and
        ``sample_stats`` (SVI: ``elbo`` per step; NUTS: ``diverging``, ``tree_depth``).

        ``n``: posterior draws to export (SVI default 1000 in one chain; NUTS default all, thinned evenly per
        chain otherwise). ``log_likelihood="marginal"`` integrates each unit's coefficients out with ``draws``
        Halton draws (comparable with MSL, good Pareto-k behaviour in ``az.loo``); ``"conditional"`` uses the
        individual draws (``log p(y_n | beta_n)``). ``individual=None`` exports the individual draws when they
        number at most :data:`mixlogit.budget.MAX_INDIVIDUAL_ELEMENTS`.
        """
        import xarray as xr

        if log_likelihood not in LOG_LIKELIHOODS:
            raise ValueError(f"unknown log_likelihood {log_likelihood!r}; accepted: {', '.join(LOG_LIKELIHOODS)}")
        data = data if data is not None else self._data
        sampler = self._sampler
        same_units = data is None or data is self._data or list(data.unit_labels) == list(self.unit_labels)
        if individual is not None:
            check_bool("individual", individual)
        need_beta = (individual is not False) or log_likelihood == "conditional"
        want = need_beta and same_units and not isinstance(sampler, StoredSampler) and self.spec.n_random > 0
        if isinstance(sampler, SVISampler):
            theta, beta = sampler.chains(1000 if n is None else n, seed=seed, individual=want)
        else:
            theta, beta = sampler.chains(n, seed=seed, individual=want)
        if beta is not None and individual is None:
            individual = beta.size <= MAX_INDIVIDUAL_ELEMENTS
        C, S = theta.shape[:2]
        stats = None
        if self.elbo is not None:
            stats = xr.Dataset({"elbo": (("svi_step",), self.elbo)},
                               coords={"svi_step": np.arange(1, len(self.elbo) + 1)})
            if self.trust is not None:  # the trust check: one value for the fit
                stats["pareto_k"] = ((), self.trust.pareto_k)
                stats["pareto_k"].attrs["reading"] = self.trust.reading()
        elif self.sample_stats:
            ss = {k: (("chain", "draw"), v if v.shape[:2] == (C, S) else v[:, thin(v.shape[1], S)])
                  for k, v in self.sample_stats.items()}
            stats = xr.Dataset(ss, coords={"chain": np.arange(C), "draw": np.arange(S)})
        return to_idata(self.spec, theta, beta=beta, individual=bool(individual), data=data,
                        design=self.design_for(data) if data is not None else None, log_likelihood=log_likelihood,
                        draws=draws, seed=seed, sample_stats=stats)

    # ------------------------------------------------------------------ persistence
    def _fields(self) -> dict:
        ind = self._individual
        return {
            "method": self.method, "draws": self.draws.tolist(),
            "unit_labels": [jsonable(u) for u in self.unit_labels],
            "individual_mean": None if ind is None else ind[self.spec.random_names].to_numpy().tolist(),
            "individual_sd": None if ind is None else ind[[f"sd.{n}" for n in self.spec.random_names]]
            .to_numpy().tolist(),
            "elbo": None if self.elbo is None else self.elbo.tolist(),
            "sample_stats": {k: v.tolist() for k, v in self.sample_stats.items()},
            "converged": self.converged, "message": self.message, "n_iter": self.n_iter,
            "settings": self.settings, "priors": self.priors, "fit_time": self.fit_time, "n_obs": self.n_obs,
            "n_units": self.n_units,
            # Only results that have a trust check carry the field: a file written before it reads back unchanged.
            **({} if self.trust is None else {"trust": self.trust.to_dict()}),
        }

    @classmethod
    def _from_fields(cls, d: dict, model, spec: Spec) -> BayesResults:
        return cls(method=d["method"], model=model, spec=spec, draws=np.asarray(d["draws"]),
                   individual_mean=d["individual_mean"], individual_sd=d["individual_sd"],
                   unit_labels=d["unit_labels"], elbo=d["elbo"], sample_stats=d["sample_stats"],
                   converged=d["converged"], message=d["message"], n_iter=d["n_iter"], settings=d["settings"],
                   priors=d["priors"], fit_time=d["fit_time"], n_obs=d["n_obs"], n_units=d["n_units"],
                   trust=TrustCheck.from_dict(d.get("trust")))
