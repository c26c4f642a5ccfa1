"""The entry point of the Bayesian estimators: ``fit(model, data, method="svi" | "nuts", **options)``.

Each estimator's options are its keyword-only arguments (:func:`mixlogit.bayes.svi.fit_svi`,
:func:`mixlogit.bayes.nuts.fit_nuts`); :data:`SVI_OPTIONS` and :data:`NUTS_OPTIONS` list them. The options
both share (unknown names, ``init``, ``seed``, ``priors``) are checked here, before any work; each estimator
checks its own.
"""

from __future__ import annotations

import inspect

from ..data import ChoiceData
from ..validation import check_bool, check_seed
from .guides import GUIDES
from .nuts import fit_nuts
from .pilot import INITS
from .results import BayesResults
from .svi import fit_svi

__all__ = ["ESTIMATORS", "GUIDES", "INITS", "NUTS_OPTIONS", "OPTIONS", "SVI_OPTIONS", "fit"]

#: method -> estimator, called as ``estimator(model, data, **options)``.
ESTIMATORS = {"svi": fit_svi, "nuts": fit_nuts}


def _options(estimator) -> tuple[str, ...]:
    """The options an estimator takes: its keyword-only arguments, in order."""
    return tuple(name for name, p in inspect.signature(estimator).parameters.items() if p.kind is p.KEYWORD_ONLY)


#: method -> the names of its options.
OPTIONS = {method: _options(estimator) for method, estimator in ESTIMATORS.items()}
SVI_OPTIONS, NUTS_OPTIONS = OPTIONS["svi"], OPTIONS["nuts"]


def fit(model, data: ChoiceData, method: str = "svi", **kwargs) -> BayesResults:
    """Bayesian estimation of ``model`` on ``data``; called by ``MixedLogit.fit(data, method="svi" | "nuts")``.

    SVI keywords: ``steps=3000`` (most steps; it usually stops after 100 to 1000), ``guide=None``: ``"marginal"``
    (the population parameters alone, units integrated out: :mod:`mixlogit.bayes.marginal`), or with
    ``subsample`` ``"fullrank"``; also "meanfield" and "amortized" (see :mod:`mixlogit.bayes.guides`),
    ``subsample=None`` (units per step: minibatch SVI with a unit-level guide,
    ``pyro.plate("person", N, subsample_size=subsample)``), ``learning_rate=0.01`` (Adam;
    the standardized population parameters take 5x), ``seed=0``, ``priors=None`` (see
    :mod:`mixlogit.bayes.priors`), ``progress=False``, ``init="msl"`` (pilot MSL start) or ``"mnl"``,
    ``tol=1e-4`` (relative change of the windowed ELBO that counts as converged), ``window=None`` (steps per ELBO
    window, default ``clip(steps // 60, 50, 100)``, fewer when ``steps`` is small), ``num_draws=4000`` (posterior
    draws kept), ``init_draws=200``, ``init_units=2000`` (draws and units of the pilot fit),
    ``num_particles=1`` (ELBO particles per step, vectorized), ``marginal_draws=256`` (importance points per
    unit of the marginal likelihood, even), ``trust_draws=None`` (draws of the guide for the trust check, the
    Pareto k of p/q, :mod:`mixlogit.bayes.trust`: 200, or 0 (skipped) with ``subsample``). The window of the marginal guide is at most 20 steps.

    NUTS keywords: ``num_samples=1000``, ``num_warmup=1000``, ``chains=2``, ``seed=0``, ``priors=None``,
    ``progress=False``, ``init="msl"``, ``target_accept=0.8``, ``max_tree_depth=10``.

    Returns a :class:`mixlogit.bayes.results.BayesResults`.
    """
    if method not in ESTIMATORS:
        raise ValueError(f"unknown Bayesian method {method!r}; accepted: {', '.join(ESTIMATORS)}")
    _check_common(kwargs, OPTIONS[method], method)
    return ESTIMATORS[method](model, data, **kwargs)


def _check_common(kwargs, allowed, method):
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"unknown argument {unknown[0]!r} for method={method!r}; accepted: {', '.join(allowed)}")
    init = kwargs.get("init", "msl")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; accepted: {', '.join(INITS)}")
    check_seed(kwargs.get("seed", 0))
    check_bool("progress", kwargs.get("progress", False))
    priors = kwargs.get("priors")
    if priors is not None and not isinstance(priors, dict):
        raise TypeError(f"priors must be a dict mapping parameter names or groups to priors, got {priors!r}")
