"""The user-facing model: ``MixedLogit(random=..., fixed=..., asc=..., correlated=...).fit(data, method=...)``."""

from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np
import torch

from .data import ChoiceData, ChoiceDataError, require_choice_data
from .devices import require_device, resolve_device
from .distributed import shard_problem, world
from .distributions import get_distribution
from .draws import DETERMINISTIC, DRAW_TYPES, IntegrationRule, check_draws, make_rule
from .msl import SEPARATION, MSLProblem, identification_problems, maximize
from .optimize import OPTIMIZERS, check_optimizer, find_optimum
from .persistence import jsonable
from .precision import SEARCH_STOP_GAIN, check_precision
from .results import MixedLogitResults
from .spec import Spec, check_scale
from .validation import check_bool, check_int, check_positive, check_seed

METHODS = ("msl", "svi", "nuts")
_NORMAL_FAMILIES = ("normal",)


def no_draws_rule(dtype=torch.float64) -> IntegrationRule:
    """The trivial rule for a model without random coefficients (plain MNL)."""
    return IntegrationRule(z=torch.zeros(1, 1, 0, dtype=dtype), log_weights=torch.zeros(1, dtype=dtype), kind="none")


class MixedLogit:
    """Mixed (random-coefficient) logit model.

    Parameters
    ----------
    random : dict column -> distribution name (see :data:`mixlogit.distributions.DISTRIBUTION_NAMES`).
    fixed : columns with fixed coefficients.
    asc : add alternative-specific constants ``asc.<alt>`` for every alternative but ``base_alt``.
    base_alt : the reference alternative for the constants (default: the first alternative in sorted order).
    correlated : False, True (all random coefficients, which must be normal) or a list of random normal columns
        whose draws are correlated through a full Cholesky factor.
    scale : None, or ``"lognormal"``: a random scale ``s_n`` of the whole utility, one per unit (a person in a
        panel, else a choice situation), lognormal with ``E[s] = 1``; its parameter ``sd.scale`` is the sd of
        ``log s``. With fixed coefficients alone this is the scale-heterogeneity logit (S-MNL); with random
        ones it scales them too, ``U = s_n beta_n' x + eps``.
    """

    def __init__(self, random: dict[str, str] | None = None, fixed: list[str] | None = None, asc: bool = False,
                 base_alt=None, correlated: bool | list[str] = False, scale: str | None = None):
        # A string where a collection is expected would be split into characters: say so instead.
        if random is not None and not isinstance(random, dict):
            raise TypeError(f"random must be a dict mapping column -> distribution name, e.g. {{'pf': 'normal'}}; "
                            f"got {type(random).__name__} {random!r}")
        if fixed is not None and (isinstance(fixed, (str, bytes, dict)) or not hasattr(fixed, "__iter__")):
            raise TypeError(f"fixed must be a list of column names, e.g. ['loc', 'wk']; got {type(fixed).__name__} "
                            f"{fixed!r}")
        if isinstance(correlated, str):
            raise TypeError(f"correlated must be True, False or a list of random coefficient names; got the string "
                            f"{correlated!r} (write [{correlated!r}])")
        check_bool("asc", asc)
        if not (correlated is None or isinstance(correlated, (bool, np.bool_, list, tuple))):
            raise TypeError(f"correlated must be True, False or a list of random coefficient names; got "
                            f"{type(correlated).__name__} {correlated!r}")
        random = dict(random or {})
        fixed = list(fixed or [])
        for name in [*random, *fixed]:
            if not isinstance(name, str):
                raise TypeError(f"column names in random= and fixed= must be strings, got {name!r}")
        for col, dist in random.items():
            get_distribution(dist, where=f"random coefficient {col!r}")
        both = sorted(set(random) & set(fixed))
        if both:
            raise ValueError(f"{both[0]!r} is both fixed and random; list each column in one of random= or fixed=")
        if len(set(fixed)) != len(fixed):
            dup = next(c for c in fixed if fixed.count(c) > 1)
            raise ValueError(f"fixed lists {dup!r} twice")
        if correlated is True:
            correlated = list(random)
        elif correlated is False or correlated is None:
            correlated = []
        else:
            correlated = list(correlated)
        if len(set(correlated)) != len(correlated):
            dup = next(c for c in correlated if correlated.count(c) > 1)
            raise ValueError(f"correlated lists {dup!r} twice")
        for c in correlated:
            if c not in random:
                raise ValueError(f"correlated names {c!r}, which is not a random coefficient; random are: {list(random)}")
            if random[c] not in _NORMAL_FAMILIES:
                raise ValueError(
                    f"correlated coefficient {c!r} has distribution {random[c]!r}; correlation is supported for "
                    "'normal' coefficients only"
                )
        if len(correlated) == 1:
            raise ValueError(f"correlated names one random coefficient ({correlated[0]!r}); a correlation needs at "
                             "least two normal random coefficients: add another or drop correlated=")
        check_scale(scale)
        if not random and not fixed and not asc:
            if scale:
                raise ValueError(f"scale={scale!r} multiplies the utility, but the model has no coefficients for it "
                                 "to scale: give random=, fixed= or asc=True")
            raise ValueError("the model has no coefficients: give random=, fixed= or asc=True")
        self.random, self.fixed, self.asc, self.base_alt = random, fixed, bool(asc), base_alt
        self.correlated, self.scale = correlated, scale

    def __repr__(self):
        return (f"MixedLogit(random={self.random}, fixed={self.fixed}, asc={self.asc}, base_alt={self.base_alt!r}, "
                f"correlated={self.correlated or False}" + (f", scale={self.scale!r})" if self.scale else ")"))

    def to_dict(self) -> dict:
        """The constructor's arguments as JSON values: ``MixedLogit(**m.to_dict())`` rebuilds the model."""
        return {"random": dict(self.random), "fixed": list(self.fixed), "asc": bool(self.asc),
                "base_alt": jsonable(self.base_alt),
                "correlated": list(self.correlated), **({"scale": self.scale} if self.scale else {})}

    # ------------------------------------------------------------------ spec for a data set
    def spec_for(self, data: ChoiceData) -> Spec:
        """The parameter layout on ``data`` (resolves the constants' names)."""
        asc_cols = []
        if self.asc:
            alts = data.alternatives
            base = alts[0] if self.base_alt is None else self.base_alt
            if not any(a == base or str(a) == str(base) for a in alts):
                raise ValueError(
                    f"base_alt {self.base_alt!r} is not an alternative in column {data.alt!r}; "
                    f"alternatives are: {', '.join(map(str, alts))}"
                )
            asc_cols = [f"asc.{a}" for a in alts if str(a) != str(base)]
        elif self.base_alt is not None:
            raise ValueError("base_alt is only used with asc=True")
        clash = sorted(set(asc_cols) & set(self.fixed))
        if clash:
            raise ValueError(f"fixed names {clash[0]!r}, which is also an alternative-specific constant of asc=True; "
                             "drop it from fixed= (asc=True adds the constants) or rename the column")
        return Spec(random=self.random, fixed=asc_cols + self.fixed, correlated=self.correlated, scale=self.scale)

    # ------------------------------------------------------------------ fitting
    def fit(self, data: ChoiceData, method: str = "msl", **kwargs):
        """Estimate the model.

        ``method="msl"``: maximum simulated likelihood, see :meth:`fit_msl` for the keyword arguments.
        ``method="svi"`` / ``"nuts"``: Bayesian estimation (:mod:`mixlogit.bayes`).
        """
        require_choice_data(data)
        if method == "msl":
            return self.fit_msl(data, **kwargs)
        if method in ("svi", "nuts"):
            from .bayes.fit import fit as fit_bayes  # the one deferred import: Pyro loads only when used

            return fit_bayes(self, data, method=method, **kwargs)
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}")

    def make_problem(self, data: ChoiceData, draws: int = 1000, draw_type: str = "halton",
                     antithetic: bool = False, seed: int | None = 0) -> MSLProblem:
        """The simulated log-likelihood of this model on ``data`` (used by fit, predict and diagnostics)."""
        check_bool("antithetic", antithetic)
        spec = self.spec_for(data)
        design = data.design(spec.random_names, spec.fixed)  # on the data's device (ChoiceData.to)
        with torch.device("cpu"):  # the draws are made on the CPU whatever torch's default device, moved once
            if spec.n_draw_dims:
                rule = make_rule(draw_type, design.n_units, draws, spec.n_draw_dims, seed=seed, antithetic=antithetic)
            else:
                check_draws(draws)
                if draw_type not in DRAW_TYPES:
                    raise ValueError(f"unknown draw_type {draw_type!r}; accepted: {', '.join(DRAW_TYPES)}")
                rule = no_draws_rule()
        return MSLProblem(spec, design, rule.to(design.device))

    def start_values(self, data: ChoiceData, spec: Spec) -> np.ndarray:
        """Starting values: a plain MNL fit for the fixed coefficients and the random ones' locations,
        spreads (and ``sd.scale``) 0.1 (lognormal locations start at the log of the MNL coefficient's magnitude)."""
        design = data.design([], spec.fixed + spec.random_names)
        with torch.device("cpu"):
            rule = no_draws_rule().to(design.device)
        mnl_problem = MSLProblem(Spec(random={}, fixed=spec.fixed + spec.random_names), design, rule)
        opt = maximize(mnl_problem, np.zeros(mnl_problem.spec.n_params))
        b = opt.theta
        kf = spec.n_fixed
        loc = []
        for k, (col, dist) in enumerate(spec.random.items()):
            v = b[kf + k]
            if dist == "lognormal":
                loc.append(np.log(max(v, 1e-2)))
            elif dist == "-lognormal":
                loc.append(np.log(max(-v, 1e-2)))
            else:
                loc.append(v)
        return np.concatenate([b[:kf], loc, np.full(spec.n_random, 0.1), np.zeros(len(spec.chol_pairs)),
                               np.full(1 if spec.scale else 0, 0.1)])

    def fit_msl(self, data: ChoiceData, draws: int = 1000, draw_type: str = "halton", antithetic: bool = False,
                seed: int | None = 0, start=None, multistart: int = 0, maxiter: int = 2000, gtol: float = 1e-5,
                progress: bool = False, precision: str = "double", device=None, distributed: bool = False,
                optimizer: str = OPTIMIZERS[0]):
        """Maximum simulated likelihood.

        Parameters
        ----------
        draws : draws per unit (persons for panel data, else choice situations); nodes for deterministic rules.
        draw_type : "halton" | "sobol" | "mlhs" | "pseudo" | "gauss-hermite" | "quadrature".
        antithetic : pair each draw with its mirror image.
        seed : seed for the draws and for multistart perturbations; None draws one, which is recorded in
            ``res.settings["seed"]`` so that prediction reuses the fit's draws.
        start : starting values (array or dict name -> value); default from an MNL fit.
        multistart : number of extra starts (random perturbations of the default start); the best is kept.
        maxiter, gtol : the optimizer's limits (iterations, largest absolute gradient entry). Converged means max|gradient| < gtol, or (where the simulated likelihood
            has kinks, as with censored coefficients) the Newton step with the exact Hessian is shorter than
            0.01 standard errors.
        progress : show a progress bar of iterations.
        precision : "double" (float64 throughout) or "mixed": the optimizer's values and gradients take the units
            x situations x alternatives x draws pass in float32, with float64 sums over draws and units
            (:mod:`mixlogit.precision`); convergence is checked, and the log-likelihood, Hessian and standard
            errors computed, in float64.
        device : where every tensor of the fit lives, e.g. "cuda"; default: the data's device
            (:meth:`mixlogit.data.ChoiceData.to`), else the CPU. Data moved to another device are refused.
        optimizer : "bfgs-hessian" (BFGS refreshed once with the exact Hessian near the optimum), "bfgs" (BFGS
            started from the BHHH matrix alone) or "trust-exact" (trust-region Newton with the exact Hessian at
            every step); see :mod:`mixlogit.optimize`. All stop at the same gradient test.
        distributed : split the persons over the ranks of the initialized torch.distributed process group
            (:mod:`mixlogit.distributed`); every rank returns the same result, bit for bit that of one process.

        Returns
        -------
        :class:`mixlogit.results.MixedLogitResults` with exact-Hessian standard errors.
        """
        t0 = time.perf_counter()
        seed = int(np.random.default_rng().integers(2**31)) if seed is None else check_seed(seed)
        check_int("multistart", multistart, 0)
        check_bool("progress", progress)
        check_bool("antithetic", antithetic)
        check_int("maxiter", maxiter, 1)
        check_positive("gtol", gtol)
        check_precision(precision)
        check_bool("distributed", distributed)
        check_optimizer(optimizer)
        placed = self._placed(data, device)
        problem = self.make_problem(placed, draws, draw_type, antithetic, seed)
        spec = problem.spec
        if distributed:  # refused here, before any fitting, when the ranks hold different problems
            shard_problem(problem, {"draws": draws, "draw_type": draw_type, "antithetic": antithetic, "seed": seed,
                                    "precision": precision, "start": start, "multistart": multistart,
                                    "maxiter": maxiter, "gtol": gtol, "optimizer": optimizer})
        search = problem if precision == "double" else dataclasses.replace(problem, precision=precision)
        x0 = self._resolve_start(start, spec) if start is not None else self.start_values(placed, spec)
        starts = [x0]
        rng = np.random.default_rng(seed)
        for _ in range(multistart):
            starts.append(x0 + rng.normal(scale=0.5 * np.maximum(np.abs(x0), 0.1)))
        best, hessian = find_optimum(problem, search, starts, optimizer=optimizer, maxiter=maxiter, gtol=gtol,
                                     stop_gain=SEARCH_STOP_GAIN[precision], progress=progress)
        converged = best.converged
        scores = problem.scores(best.theta)
        integration_error = None
        rule_settings = {}
        if problem.rule.kind in DETERMINISTIC:
            coarse = problem.rule.coarse
            rule_settings = {"nodes": problem.rule.n_points, "coarse_nodes": None if coarse is None else coarse.n_points}
            if coarse is not None:
                integration_error = abs(best.loglik - problem.loglik(best.theta, coarse))
            else:
                rule_settings["integration_error_note"] = problem.rule.coarse_reason
        null_ll = problem.null_loglik()
        unidentified = identification_problems(problem, best.theta, hessian) if np.all(np.isfinite(hessian)) else {}
        separated = [n for n, why in unidentified.items() if why.startswith(SEPARATION)]
        if separated:
            converged = False
            warnings.warn(f"{SEPARATION}: {', '.join(map(repr, separated))} run off toward infinity (the likelihood "
                          "approaches its supremum only in the limit); the fit has not converged", RuntimeWarning,
                          stacklevel=3)
        others = {n: why for n, why in unidentified.items() if n not in separated}
        if others:
            warnings.warn("not identified: " + "; ".join(f"{n}: {why}" for n, why in others.items()),
                          RuntimeWarning, stacklevel=3)
        if not converged and not separated:
            warnings.warn(f"MSL did not converge ({best.message}; max|gradient| = {best.grad_norm:.3g})",
                          RuntimeWarning, stacklevel=3)
        return MixedLogitResults.from_fit(
            model=self, spec=spec, data=data if data.device is None else data.to("cpu"),  # results live on the CPU
            theta=best.theta, loglik=best.loglik, null_loglik=null_ll,
            hessian=hessian, scores=scores, weights=problem.design.weights.cpu().numpy(), converged=converged,
            n_iter=best.n_iter, message=best.message, grad_norm=best.grad_norm,
            integration_error=integration_error,
            settings={"method": "msl", "draws": int(draws), "draw_type": draw_type, "antithetic": bool(antithetic),
                      "seed": seed, "multistart": multistart, "gtol": gtol, "optimizer": optimizer, "precision": precision,
                      "device": str(problem.device), **({"ranks": world()[1]} if distributed else {}), **rule_settings,
                      **({"unidentified": unidentified} if unidentified else {})},
            fit_time=time.perf_counter() - t0,
        )

    @staticmethod
    def _placed(data: ChoiceData, device) -> ChoiceData:
        """``data`` on the fit's device: ``device`` when given (data moved to another one are refused), else the
        data's own (:meth:`ChoiceData.to`), else the CPU."""
        if device is None:
            return data if data.device is not None else data.to("cpu")
        dev = resolve_device(device)
        if data.device is not None:
            require_device(dev, data.device, "the data", f"move them with data.to({str(dev)!r}) or fit with "
                           f"device={str(data.device)!r}")
        return data.to(dev)

    def _resolve_start(self, start, spec: Spec) -> np.ndarray:
        names = spec.param_names
        if isinstance(start, dict):
            unknown = [k for k in start if k not in names]
            if unknown:
                raise ValueError(f"start names {unknown[0]!r}, not a parameter; parameters are: {names}")
            x = np.zeros(len(names))
            x[spec.slices()["spread"]] = 0.1
            x[spec.slices()["scale"]] = 0.1
            for k, v in start.items():
                if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
                    raise ValueError(f"start[{k!r}] must be a finite number, got {v!r}")
                x[names.index(k)] = float(v)
            return x
        try:
            x = np.asarray(start, dtype=float).ravel()
        except (TypeError, ValueError):
            raise ValueError(f"start must be numbers (an array of {len(names)} values or a dict name -> value), "
                             f"got {start!r}") from None
        if x.shape != (len(names),):
            raise ValueError(f"start has {x.size} values; the model has {len(names)} parameters: {names}")
        if not np.all(np.isfinite(x)):
            bad = [names[i] for i in np.flatnonzero(~np.isfinite(x))]
            raise ValueError(f"start has non-finite values for {bad}")
        return x


__all__ = ["ChoiceDataError", "MixedLogit"]
