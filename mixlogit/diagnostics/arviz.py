"""ArviZ conversion: parameter draws (and optional individual draws) to ``arviz.InferenceData``, and the
leave-one-out table.

:func:`to_idata` takes draws in the Spec layout with the data and design they belong to; each results class
decides which draws it has (posterior draws, or the asymptotic normal of an MSL fit) and calls it, so every
estimator is compared with the same ArviZ tools (``az.summary``, ``az.loo``, ``az.plot_forest``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..data import ChoiceData, Design
from ..spec import Spec
from ..validation import check_bool
from .pointwise import conditional_loglik_draws, marginal_loglik, predictive_choices, situations

LOG_LIKELIHOODS = ("marginal", "conditional")


def to_idata(spec: Spec, theta: np.ndarray, *, beta: np.ndarray | None = None, individual: bool = False,
             data: ChoiceData | None = None, design: Design | None = None, log_likelihood: str = "marginal",
             draws: int = 100, seed: int = 0, sample_stats=None, signs: np.ndarray | None = None):
    """InferenceData from population draws ``theta`` (C, S, P) in the Spec layout.

    ``signs`` (P,) multiplies the exported population variables (an MSL fit reports the spreads' signs of its
    ``params``). ``beta`` (C, S, N, K): individual coefficient draws, exported as ``beta`` with dims
    ``(chain, draw, person | situation, coefficient)`` when ``individual`` is True and used for the
    conditional log-likelihood and the posterior predictive. With ``data`` and its ``design``: groups
    ``log_likelihood`` (variable ``choice``, one value per unit: ``"marginal"`` integrates each unit's
    coefficients out with ``draws`` Halton draws, ``"conditional"`` uses ``beta``), ``posterior_predictive``
    (replicated choices per situation, alternative codes) and ``observed_data``. ``sample_stats``: an
    ``xarray.Dataset`` added as is.
    """
    import arviz as az
    import xarray as xr

    if log_likelihood not in LOG_LIKELIHOODS:
        raise ValueError(f"unknown log_likelihood {log_likelihood!r}; accepted: {', '.join(LOG_LIKELIHOODS)}")
    check_bool("individual", individual)
    C, S = theta.shape[:2]
    unit_dim = "person" if (data is None or data.is_panel) else "situation"
    coords = {"chain": np.arange(C), "draw": np.arange(S)}
    post = {name: (("chain", "draw"), theta[..., j] * (1.0 if signs is None else signs[j]))
            for j, name in enumerate(spec.param_names)}
    labels = list(data.unit_labels) if design is not None else None
    if beta is not None and individual:
        post["beta"] = (("chain", "draw", unit_dim, "coefficient"), beta)
        coords[unit_dim] = labels if labels is not None else np.arange(beta.shape[2])
        coords["coefficient"] = list(spec.random_names)
    groups = {"posterior": xr.Dataset(post, coords=coords)}
    if design is not None:
        flat = theta.reshape(C * S, -1)
        flat_beta = None if beta is None else beta.reshape(C * S, *beta.shape[2:])
        if log_likelihood == "marginal":
            ll = marginal_loglik(spec, design, flat, draws=draws, seed=seed)
        elif flat_beta is None:
            raise ValueError("log_likelihood='conditional' needs individual draws, which these results lack; "
                             "use log_likelihood='marginal'")
        else:
            ll = conditional_loglik_draws(spec, design, flat, flat_beta)
        groups["log_likelihood"] = xr.Dataset(
            {"choice": (("chain", "draw", unit_dim), ll.reshape(C, S, -1))},
            coords={"chain": np.arange(C), "draw": np.arange(S), unit_dim: labels})
        sits = situations(data, design)
        scoords = {"situation": sits[2]}
        rep = predictive_choices(spec, design, sits, flat, flat_beta, seed=seed + 1)
        groups["posterior_predictive"] = xr.Dataset(
            {"choice": (("chain", "draw", "situation"), rep.reshape(C, S, -1))},
            coords={"chain": np.arange(C), "draw": np.arange(S), **scoords})
        obs = xr.Dataset({"choice": (("situation",), sits[3])}, coords=scoords)
        obs["choice"].attrs["alternatives"] = ", ".join(map(str, data.alternatives))
        groups["observed_data"] = obs
    if sample_stats is not None:
        groups["sample_stats"] = sample_stats
    return az.InferenceData(**groups)


def to_arviz(res, data: ChoiceData | None = None, **kwargs):
    """InferenceData of any result (``res.to_arviz``): MSL fits export draws from the asymptotic normal of
    their estimates, Bayesian fits their posterior draws."""
    return res.to_arviz(data=data, **kwargs)


def loo_table(idata) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``az.loo`` of an InferenceData with a log-likelihood group: the estimates and the Pareto-k table
    (counts of units with k <= 0.7 (good), 0.7 < k <= 1 (bad), k > 1 (very bad))."""
    import arviz as az

    loo = az.loo(idata, pointwise=True)
    k = np.asarray(loo.pareto_k)
    est = pd.DataFrame({"value": [float(loo.elpd_loo), float(loo.se), float(loo.p_loo)]},
                       index=pd.Index(["elpd_loo", "se", "p_loo"], name="loo"))
    bins = pd.DataFrame({"count": [int((k <= 0.7).sum()), int(((k > 0.7) & (k <= 1)).sum()), int((k > 1).sum())]},
                        index=pd.Index(["good (k <= 0.7)", "bad (0.7 < k <= 1)", "very bad (k > 1)"],
                                       name="Pareto k"))
    bins["share"] = bins["count"] / max(1, len(k))
    return est, bins
