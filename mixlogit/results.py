"""Estimation results: statsmodels-style tables, prediction, individual-level estimates, elasticities, WTP,
and an exact save/load round trip."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .data import ChoiceData
from .diagnostics import heterogeneity_delta, to_idata
from .information import invert_information
from .kernel import choice_probabilities, posterior_draw_weights
from .moments import coefficient_mean_sd, delta_method
from .results_base import FitResults
from .spec import Spec
from .validation import check_bool

#: The format field of MSL results files.
FORMAT = "mixlogit.results"


class MixedLogitResults(FitResults):
    """Results of a maximum simulated likelihood fit.

    Attributes (statsmodels names): ``params``, ``bse``, ``cov``, ``robust_bse``, ``robust_cov``, ``tvalues``,
    ``pvalues``, ``loglik``, ``null_loglik``, ``aic``, ``bic``, ``converged``, ``n_iter``, ``integration_error``.
    Spreads (``sd.*``) are reported as absolute values: their sign is not identified. ``theta`` keeps the raw
    optimum (signed), which prediction and the log-likelihood use.
    """

    FORMAT = FORMAT
    DESCRIPTION = "mixlogit results file"
    FINITE_FIELDS = ("theta", "loglik", "null_loglik", "hessian", "meat")
    JSON_INDENT = 1

    def __init__(self, *, model, spec: Spec, theta, loglik, null_loglik, hessian, meat, n_obs, n_units,
                 converged, n_iter, message, grad_norm, integration_error, settings, fit_time):
        super().__init__(model=model, spec=spec, settings=settings, fit_time=fit_time, n_obs=n_obs,
                         n_units=n_units)
        self.theta = np.asarray(theta, dtype=float)
        self.loglik, self.null_loglik = float(loglik), float(null_loglik)
        self.hessian = np.asarray(hessian, dtype=float)
        self.meat = np.asarray(meat, dtype=float)
        self.converged, self.n_iter, self.message = bool(converged), int(n_iter), str(message)
        self.grad_norm = float(grad_norm)
        self.integration_error = None if integration_error is None else float(integration_error)
        cov, self.hessian_singular = invert_information(-self.hessian)
        if self.hessian_singular:
            warnings.warn("the Hessian is singular or ill-conditioned at the optimum: standard errors are from a "
                          "pseudo-inverse and unreliable (is a parameter unidentified?)", RuntimeWarning, stacklevel=4)
        # Sign flips of spreads are reparametrizations: carry them into the covariances.
        self._flip = np.ones(len(self.theta))
        sp, sc = spec.slices()["spread"], spec.slices()["scale"]
        self._flip[sp] = np.where(self.theta[sp] < 0, -1.0, 1.0)
        self._flip[sc] = np.where(self.theta[sc] < 0, -1.0, 1.0)  # sd.scale enters only through tau^2 and tau*z
        # For correlated coefficients the flip is a sign change of a Cholesky column: the off-diagonal
        # entries of that column change sign with its diagonal (L D, D = diag(+-1), leaves L L' unchanged).
        ch = spec.slices()["chol"].start
        for p, (_, b) in enumerate(spec.chol_pairs):
            self._flip[ch + p] = self._flip[sp.start + spec.corr_index[b]]
        f = self._flip
        self.cov = pd.DataFrame(cov * np.outer(f, f), index=self.param_names, columns=self.param_names)
        robust = cov @ self.meat @ cov
        self.robust_cov = pd.DataFrame(robust * np.outer(f, f), index=self.param_names, columns=self.param_names)

    @classmethod
    def from_fit(cls, *, model, spec, data: ChoiceData, theta, loglik, null_loglik, hessian, scores, weights,
                 converged, n_iter, message, grad_norm, integration_error, settings, fit_time):
        ws = scores * weights[:, None]
        return cls(model=model, spec=spec, theta=theta, loglik=loglik, null_loglik=null_loglik,
                   hessian=hessian, meat=ws.T @ ws, n_obs=data.n_situations, n_units=data.n_units,
                   converged=converged, n_iter=n_iter, message=message, grad_norm=grad_norm,
                   integration_error=integration_error, settings=settings, fit_time=fit_time)

    # ------------------------------------------------------------------ tables
    @property
    def params(self) -> pd.Series:
        return pd.Series(self.theta * self._flip, index=self.param_names, name="params")

    @property
    def bse(self) -> pd.Series:
        return pd.Series(np.sqrt(np.clip(np.diag(self.cov), 0, None)), index=self.param_names, name="bse")

    @property
    def robust_bse(self) -> pd.Series:
        """Sandwich standard errors H^-1 B H^-1 with B the outer product of per-unit scores; for panel data the
        unit is the person, so these are cluster-robust by panel."""
        return pd.Series(np.sqrt(np.clip(np.diag(self.robust_cov), 0, None)), index=self.param_names,
                         name="robust_bse")

    @property
    def unidentified(self) -> dict[str, str]:
        """Parameters the data do not identify: name -> reason (see
        :func:`mixlogit.msl.identification_problems`); their z and p are NaN."""
        return dict(self.settings.get("unidentified") or {})

    @property
    def tvalues(self) -> pd.Series:
        z = (self.params / self.bse).rename("z")
        bad = [n for n in self.unidentified if n in z.index]
        z[bad] = np.nan
        return z

    @property
    def pvalues(self) -> pd.Series:
        return pd.Series(2 * stats.norm.sf(np.abs(self.tvalues)), index=self.param_names, name="p")

    @property
    def aic(self) -> float:
        return 2 * self.n_params - 2 * self.loglik

    @property
    def bic(self) -> float:
        return math.log(self.n_obs) * self.n_params - 2 * self.loglik

    def _interval(self, alpha: float, robust: bool = False):
        """Wald intervals; ``robust=True`` uses the sandwich standard errors."""
        se = self.robust_bse if check_bool("robust", robust) else self.bse
        q = stats.norm.ppf(1 - alpha / 2)
        return self.params - q * se, self.params + q * se

    def conf_int(self, alpha: float = 0.05, robust: bool = False) -> pd.DataFrame:
        """Wald intervals: DataFrame with columns ``lower``, ``upper`` (``robust=True``: sandwich SEs)."""
        return super().conf_int(alpha, robust=robust)

    def summary_frame(self, alpha: float = 0.05) -> pd.DataFrame:
        ci = self.conf_int(alpha)
        frame = pd.DataFrame({"estimate": self.params, "std.err": self.bse, "z": self.tvalues, "p": self.pvalues,
                              "robust.se": self.robust_bse, "lower": ci["lower"], "upper": ci["upper"]})
        if self.unidentified:
            frame["note"] = ["not identified" if n in self.unidentified else "" for n in frame.index]
        return frame

    def _summary_foot(self) -> list[str]:
        return [f"not identified: {n}: {why}" for n, why in self.unidentified.items()]

    def _summary_head(self) -> list[str]:
        s = self.settings
        random = self.spec.n_draw_dims  # random coefficients, and a random scale
        rule = "no random coefficients" if not random else f"{s.get('draws')} {s.get('draw_type')} draws"
        if random and s.get("nodes") is not None:
            rule = f"{s.get('draw_type')} rule, {s['nodes']} nodes (draws={s.get('draws')})"
        head = [
            f"Mixed logit, {s.get('method', 'msl').upper()} ({rule})",
            f"units: {self.n_units}   choice situations: {self.n_obs}   parameters: {self.n_params}",
            (f"log-likelihood: {self.loglik:.3f}   null: {self.null_loglik:.3f}   "
             f"rho2: {1 - self.loglik / self.null_loglik:.4f}"),
            f"AIC: {self.aic:.2f}   BIC: {self.bic:.2f}",
            (f"converged: {self.converged} ({self.n_iter} iterations, max|grad| {self.grad_norm:.1e}, "
             f"{self.fit_time:.1f} s)"),
        ]
        if self.integration_error is not None:
            head.append(f"estimated integration error of the log-likelihood: {self.integration_error:.2e} "
                        f"(against {s.get('coarse_nodes', 'a coarser rule of')} nodes)")
        elif s.get("integration_error_note"):
            head.append(f"integration error not estimated: {s['integration_error_note']}")
        if self.hessian_singular:
            head.append("WARNING: singular Hessian; standard errors unreliable")
        return head

    def __repr__(self):
        return f"<MixedLogitResults LL={self.loglik:.3f} params={self.n_params} converged={self.converged}>"

    # ------------------------------------------------------------------ random coefficients
    def random_cov(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Covariance matrix of the correlated random coefficients and its delta-method standard errors."""
        return self._correlated_matrix(lambda c: c)

    def random_corr(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Correlation matrix of the correlated random coefficients and its delta-method standard errors."""

        def corr(c):
            d = torch.sqrt(torch.diagonal(c))
            return c / torch.outer(d, d)

        return self._correlated_matrix(corr)

    def _correlated_matrix(self, of_cov) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``of_cov(L L')`` (a (k, k) function of the covariance of the correlated block) and its delta-method
        standard errors, as (k, k) frames labelled by coefficient."""
        names = self.spec.correlated
        if not names:
            raise ValueError("the model has no correlated random coefficients (use correlated=True or a list)")
        k = len(names)

        def fn(th):
            L = self.spec.cholesky(th)
            return of_cov(L @ L.T).reshape(-1)

        val, se = delta_method(fn, self.theta, self._raw_cov())
        return (pd.DataFrame(val.reshape(k, k), index=names, columns=names),
                pd.DataFrame(se.reshape(k, k), index=names, columns=names))

    def coefficient_moments(self) -> pd.DataFrame:
        """Population mean and sd of every random coefficient (implied by its distribution), delta-method SEs."""
        kr = self.spec.n_random
        if not kr:
            return pd.DataFrame(columns=["mean", "mean.se", "sd", "sd.se"])

        def fn(th):
            m, s = coefficient_mean_sd(self.spec, th)
            return torch.cat([m, s])

        val, se = delta_method(fn, self.theta, self._raw_cov())
        return pd.DataFrame({"mean": val[:kr], "mean.se": se[:kr], "sd": val[kr:], "sd.se": se[kr:]},
                            index=self.spec.random_names)

    def wtp(self, attribute: str, price: str) -> pd.DataFrame:
        """Willingness to pay for ``attribute`` in units of ``price``: the distribution of ``-beta_a / beta_p``.

        Returns a DataFrame with rows ``mean`` and ``sd`` and columns ``estimate``, ``std.err`` (delta method).
        Supported: a fixed price coefficient (any attribute distribution), or a lognormal / -lognormal price
        coefficient independent of the attribute's (the ratio of a normal price coefficient has no moments).
        """
        sp = self.spec
        names = sp.random_names + sp.fixed
        for role, col in (("attribute", attribute), ("price", price)):
            if col not in names:
                raise ValueError(f"{role} {col!r} is not a coefficient of the model; coefficients: {names}")
        if attribute == price:
            raise ValueError("attribute and price must differ")
        sl = sp.slices()

        def moments_of(th, col):  # mean, E[b^2] of a coefficient
            if col in sp.fixed:
                b = th[sl["fixed"]][sp.fixed.index(col)]
                return b, b * b
            m, s = coefficient_mean_sd(sp, th)
            k = sp.random_names.index(col)
            return m[k], s[k] ** 2 + m[k] ** 2

        if price in sp.random:
            dist = sp.random[price]
            if dist not in ("lognormal", "-lognormal") or price in sp.correlated or attribute in sp.correlated:
                raise ValueError(
                    f"WTP with a random price coefficient needs it to be lognormal or -lognormal and uncorrelated; "
                    f"{price!r} is {dist!r}{' and correlated' if price in sp.correlated else ''}"
                )

        def fn(th):
            ma, m2a = moments_of(th, attribute)
            if price in sp.fixed:
                inv1 = 1.0 / moments_of(th, price)[0]
                inv2 = inv1 * inv1
            else:
                k = sp.random_names.index(price)
                loc, s = th[sl["loc"]][k], th[sl["spread"]][k]
                sign = -1.0 if sp.random[price] == "-lognormal" else 1.0
                inv1 = sign * torch.exp(-loc + 0.5 * s * s)  # E[1/b] for b = sign*exp(loc + s z)
                inv2 = torch.exp(-2 * loc + 2 * s * s)
            mean = -ma * inv1
            var = m2a * inv2 - mean * mean
            # sqrt has an infinite slope at 0 (fixed attribute and price): keep the Jacobian finite there.
            positive = var > 1e-300
            sd = torch.where(positive, torch.sqrt(torch.where(positive, var, torch.ones_like(var))), 0.0 * var)
            return torch.stack([mean, sd])

        val, se = delta_method(fn, self.theta, self._raw_cov())
        return pd.DataFrame({"estimate": val, "std.err": se}, index=["mean", "sd"])

    def _raw_cov(self) -> np.ndarray:
        """Covariance of the raw (signed) parameter vector ``theta``."""
        f = self._flip
        return self.cov.to_numpy() * np.outer(f, f)

    # ------------------------------------------------------------------ diagnostics contract
    def parameter_draws(self, n: int = 1000, seed: int = 0) -> np.ndarray:
        """n draws of the raw parameter vector from its asymptotic normal N(theta_hat, cov): (n, P)."""
        cov = self._raw_cov()
        return np.random.default_rng(seed).multivariate_normal(self.theta, 0.5 * (cov + cov.T), size=n,
                                                               method="eigh")

    def heterogeneity(self, level: float = 0.9, n: int = 2000) -> pd.DataFrame:
        """The heterogeneity table at theta-hat with delta-method Wald intervals (``n`` is not used: no draws
        are needed)."""
        return heterogeneity_delta(self.spec, self.theta, self._raw_cov(), level)

    def to_arviz(self, data: ChoiceData | None = None, n: int = 1000, seed: int = 0, draws: int = 100):
        """ArviZ InferenceData of the fit: ``n`` draws of the parameters from their asymptotic normal
        distribution (reported signs, so ``az.summary`` gives ``params`` and ``bse``), and with ``data``: the
        marginal ``log_likelihood`` per unit at each draw (``draws`` Halton draws per unit),
        ``posterior_predictive`` (fresh coefficients per draw: the choices of new persons like these) and
        ``observed_data``."""
        design = self.design_for(data) if data is not None else None
        return to_idata(self.spec, self.parameter_draws(n, seed)[None], data=data, design=design,
                        log_likelihood="marginal", draws=draws, seed=seed, signs=self._flip)

    def individual_estimates(self, data: ChoiceData | None = None) -> pd.DataFrame | None:
        """Revelt-Train conditional means on ``data``; None without data."""
        return None if data is None else self.individual(data)

    # ------------------------------------------------------------------ data-level outputs
    def _problem(self, data: ChoiceData):
        """The fitted model's simulated likelihood on ``data`` with the fit's integration settings."""
        self.spec_for(data)  # the same parameter layout, or a named error
        s = self.settings
        return self.model.make_problem(data, s.get("draws", 1000), s.get("draw_type", "halton"),
                                       s.get("antithetic", False), s.get("seed", 0))

    def _per_draw(self, data: ChoiceData):
        """Yield (chunk, x (n, T, J, K'), beta (n or 1, R, K'), fixed utility (n, T, J) or None, problem) over
        unit chunks. Without a random scale, x and beta hold the Kr random columns and the fixed coefficients
        enter through the fixed utility; with one, every coefficient is a (scaled) draw: K' = Kr + Kf."""
        problem = self._problem(data)
        th = torch.as_tensor(self.theta, dtype=torch.float64)
        d, sp = problem.design, self.spec
        x_all = d.x if sp.scale else None
        for c in problem.chunks:
            z = problem.rule.for_units(c)
            if sp.scale:
                yield c, x_all[c], sp.scaled_coefficients(th, z), None, problem
            else:
                fixed = d.x_fixed[c] @ sp.fixed_coefficients(th) if sp.n_fixed else None
                yield c, d.x_rand[c], sp.coefficients(th, z), fixed, problem

    def predict(self, data: ChoiceData) -> pd.Series:
        """Mixed choice probability of every row of ``data.df`` (same index), integrating over the
        coefficient distribution with the fit's integration settings."""
        out = None
        with torch.no_grad():
            for c, x, beta, fixed, problem in self._per_draw(data):
                d = problem.design
                if out is None:
                    out = torch.zeros(d.avail.shape, dtype=torch.float64)
                out[c] = choice_probabilities(x, beta, problem.rule.log_weights, fixed_utility=fixed, avail=d.avail[c])
            d = problem.design
            p = out[d.row_unit, d.row_t, d.row_j].numpy()
        p = np.where(data.row_available, p, 0.0)
        return pd.Series(p, index=data.df.index, name="prob")

    def individual(self, data: ChoiceData) -> pd.DataFrame:
        """Individual-level (conditional) estimates of the random coefficients (Revelt and Train):
        ``E[beta | y_n]`` and its sd for each unit, indexed by panel id (or situation id). With a random scale,
        the columns ``scale`` and ``sd.scale`` hold ``E[s_n | y_n]`` and its sd, and the random coefficients'
        columns the unscaled ``beta_n`` (the unit's coefficients are ``s_n beta_n``)."""
        sp = self.spec
        if not sp.heterogeneity_names:
            raise ValueError("the model has no random coefficients")
        means, sds = [], []
        problem = self._problem(data)
        th = torch.as_tensor(self.theta, dtype=torch.float64)
        with torch.no_grad():
            for c in problem.chunks:
                z = problem.rule.for_units(c)
                beta = sp.coefficients(th, z)  # (n or 1, R, Kr)
                if sp.scale:
                    s = sp.scale_draws(th, z).unsqueeze(-1)  # (n or 1, R, 1)
                    n0 = max(beta.shape[0], s.shape[0])
                    beta = torch.cat([beta.expand(n0, -1, -1), s.expand(n0, -1, -1)], -1)
                w = posterior_draw_weights(problem.unit_cond_loglik(th, c), problem.rule.log_weights)  # (n, R)
                m = torch.einsum("nr,nrk->nk", w, beta.expand(w.shape[0], -1, -1))
                v = torch.einsum("nr,nrk->nk", w, (beta.expand(w.shape[0], -1, -1) - m[:, None, :]) ** 2)
                means.append(m)
                sds.append(v.sqrt())
        names = sp.heterogeneity_names
        df = pd.DataFrame(torch.cat(means).numpy(), columns=names, index=pd.Index(data.unit_labels, name="unit"))
        sd = pd.DataFrame(torch.cat(sds).numpy(), columns=[f"sd.{n}" for n in names], index=df.index)
        return pd.concat([df, sd], axis=1)

    def elasticities(self, data: ChoiceData, attribute: str, cross: bool = False):
        """Elasticities of the mixed choice probabilities with respect to ``attribute``.

        ``cross=False``: the own elasticity of each row's probability, a Series on ``data.df``'s index:
        ``x_i / P_i * E[beta L_i (1 - L_i)]``. ``cross=True``: a J x J DataFrame, entry (i, j) the elasticity
        of ``P_i`` with respect to alternative j's attribute, averaged over situations where both are available.
        """
        check_bool("cross", cross)
        sp = self.spec
        if attribute not in sp.random_names + sp.fixed:
            raise ValueError(f"attribute {attribute!r} is not a coefficient of the model; "
                             f"coefficients: {sp.random_names + sp.fixed}")
        own_out, cross_sum, cross_n = None, None, None
        with torch.no_grad():
            names = sp.random_names + (sp.fixed if sp.scale else [])  # the columns of x and beta
            bf = sp.fixed_coefficients(torch.as_tensor(self.theta, dtype=torch.float64))
            for c, xc, beta, fixed, problem in self._per_draw(data):
                d = problem.design
                v = torch.einsum("ntjk,nrk->ntjr", xc, beta.expand(xc.shape[0], -1, -1))
                if fixed is not None:
                    v = v + fixed.unsqueeze(-1)
                av = d.avail[c] | ~d.avail[c].any(-1, keepdim=True)
                v = v.masked_fill(~av.unsqueeze(-1), float("-inf"))
                L = torch.softmax(v, dim=2)  # (n, T, J, R)
                w = torch.exp(problem.rule.log_weights)
                if attribute in names:
                    k = names.index(attribute)
                    bk = beta[..., k].unsqueeze(1).unsqueeze(1)  # (n|1, 1, 1, R)
                    x = xc[..., k]
                else:
                    k = sp.fixed.index(attribute)
                    bk = bf[k]
                    x = d.x_fixed[c][..., k]
                P = (L * w).sum(-1)  # (n, T, J)
                if own_out is None:
                    own_out = torch.zeros(d.avail.shape, dtype=torch.float64)
                    J = d.avail.shape[-1]
                    cross_sum = torch.zeros(J, J, dtype=torch.float64)
                    cross_n = torch.zeros(J, J, dtype=torch.float64)
                # E[beta L_i L_j] for all i, j, then the diagonal correction for own effects.
                m = torch.einsum("ntir,ntjr,r->ntij", L * bk, L, w)
                diag = (L * bk * w).sum(-1)
                eij = -m * x.unsqueeze(-2) / P.clamp_min(1e-300).unsqueeze(-1)
                own = (diag - torch.diagonal(m, dim1=-2, dim2=-1)) * x / P.clamp_min(1e-300)
                idx = torch.arange(eij.shape[-1])
                eij[..., idx, idx] = own
                own_out[c] = own
                valid = (d.avail[c].unsqueeze(-1) & d.avail[c].unsqueeze(-2)) & d.situation_mask[c][..., None, None]
                cross_sum += torch.where(valid, eij, 0.0).sum((0, 1))
                cross_n += valid.sum((0, 1))
        d = problem.design
        if cross:
            labels = [str(a) for a in data.alternatives]
            return pd.DataFrame((cross_sum / cross_n.clamp_min(1)).numpy(), index=labels, columns=labels)
        e = own_out[d.row_unit, d.row_t, d.row_j].numpy()
        return pd.Series(np.where(data.row_available, e, np.nan), index=data.df.index, name=f"elasticity.{attribute}")

    # ------------------------------------------------------------------ persistence
    def _fields(self) -> dict:
        return {
            "theta": self.theta.tolist(), "loglik": self.loglik,
            "null_loglik": self.null_loglik, "hessian": self.hessian.tolist(), "meat": self.meat.tolist(),
            "n_obs": self.n_obs, "n_units": self.n_units, "converged": self.converged, "n_iter": self.n_iter,
            "message": self.message, "grad_norm": self.grad_norm, "integration_error": self.integration_error,
            "settings": self.settings, "fit_time": self.fit_time,
        }

    @classmethod
    def _from_fields(cls, d: dict, model, spec: Spec) -> MixedLogitResults:
        return cls(model=model, spec=spec, theta=d["theta"], loglik=d["loglik"],
                   null_loglik=d["null_loglik"], hessian=d["hessian"], meat=d["meat"], n_obs=d["n_obs"],
                   n_units=d["n_units"], converged=d["converged"], n_iter=d["n_iter"], message=d["message"],
                   grad_norm=d["grad_norm"], integration_error=d["integration_error"], settings=d["settings"],
                   fit_time=d["fit_time"])
