"""A strength distribution fitted to fixed margins: the full-batch refit, the profile interval of its spread and the
likelihood-ratio test against a point strength.

With the policy held fixed, MixDPO's objective is a function of the 1-3 strength parameters phi alone:
``l(phi) = sum_j log E_phi[sigmoid(beta h_j)]`` over the pairs' margins h (``objective="marginal"``; the
``"expected"`` objective sums ``E_phi[log sigmoid(beta h_j)]``). Every evaluation is a pass of the kernel over n
scalars, so phi can be maximized to a stationary point by L-BFGS in milliseconds, where Adam at a small learning
rate would move it by about its learning rate per step (:class:`alignment.trainer.MixDPOTrainer` with
``strength_update="refit"`` calls :func:`fit_strength` on its cached margins).

The spread is reported as the sd of log beta (LogNormal: sigma; Gamma: sqrt(trigamma(shape)); a point mass: 0),
which is free of the arbitrary scale of h, with a profile-likelihood interval: the set of spreads whose profile
log-likelihood (the other parameters refitted) lies within ``chi2_1(level) / 2`` of the maximum. Zero spread is
the point strength, the boundary of the parameter space: the likelihood-ratio statistic against it is referred to
the mixture ``0.5 chi2_0 + 0.5 chi2_1`` (Self and Liang 1987), and the interval's lower end is 0 when the point
strength lies inside it.

With ``annotator=`` (one id per margin) both fit the annotator-level (panel) objective of :mod:`alignment.panel`
instead, one strength per annotator shared across its pairs.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from scipy import optimize, special, stats

from mixlogit.validation import check_choice, check_fraction

from .losses import check_objective
from .panel import check_annotator_ids, panel_loglik, panel_newton_terms
from .strength import PointStrength, Strength

__all__ = ["SPREAD_PARAMETERS", "fit_strength", "newton_step", "profile_spread", "sd_log_strength", "strength_vector"]

#: Per family: the unconstrained parameter that sets the spread, whether the spread grows with it, and the range
#: searched: sd of log beta from about 1e-3 (indistinguishable from a point mass) to about 4.
SPREAD_PARAMETERS: dict[str, tuple[str, bool, tuple[float, float]]] = {
    "lognormal": ("log_sigma", True, (math.log(1e-3), math.log(4.0))),
    "gamma": ("log_shape", False, (math.log(0.25), math.log(1e6))),
}
# |unconstrained parameter| above which a refit stops: a separable set of margins sends beta to infinity.
_PARAM_LIMIT = 12.0


def _bounds(strength: Strength, name: str) -> tuple[float, float]:
    spread = SPREAD_PARAMETERS.get(strength.family)
    if spread is not None and spread[0] == name:
        return spread[2]
    return -_PARAM_LIMIT, _PARAM_LIMIT


def _margins(margins) -> torch.Tensor:
    h = torch.as_tensor(margins, dtype=torch.float64).detach().reshape(-1)
    if h.numel() == 0:
        raise ValueError("no margins to fit the strength on")
    if not torch.isfinite(h).all():
        bad = int(torch.nonzero(~torch.isfinite(h))[0])
        raise ValueError(f"margins must be finite; margin {bad} is {float(h[bad])}")
    return h


def _objective(strength: Strength, h: torch.Tensor, objective: str, panel=None) -> torch.Tensor:
    """The objective summed over the pairs (nats); with ``panel = (annotator ids, A)``, the annotator-level one."""
    if panel is not None:
        return panel_loglik(strength, h, *panel).sum()
    lp = strength.log_prob_preferred(h) if objective == "marginal" else strength.expected_log_prob(h)
    return lp.sum()


def _panel(h: torch.Tensor, objective: str, annotator, n_annotators) -> tuple[torch.Tensor, int] | None:
    """``(ids, A)`` of an annotator-level fit (validated), or None for the pair objective."""
    if annotator is None:
        if n_annotators is not None:
            raise ValueError("n_annotators is given without annotator= (the annotator id of each margin)")
        return None
    if objective != "marginal":
        raise ValueError(f"the annotator-level (panel) objective is the marginal likelihood; objective={objective!r} "
                         "has no panel form: use objective='marginal'")
    ids = torch.as_tensor(annotator).reshape(-1)
    if n_annotators is None:
        n_annotators = int(ids.max()) + 1 if ids.numel() else 0
    return check_annotator_ids(ids, h.numel(), int(n_annotators)), int(n_annotators)


def strength_vector(strength: Strength) -> dict[str, float]:
    """The strength's trainable unconstrained parameters (log scale where positive), by name."""
    return {n: float(p.detach()) for n, p in strength.named_parameters() if p.requires_grad}


def sd_log_strength(strength: Strength) -> float:
    """The sd of log beta under the strength (scale-free): sigma, sqrt(trigamma(shape)), or 0 for a point mass."""
    if strength.family == "lognormal":
        return float(strength.sigma.detach())
    if strength.family == "gamma":
        return float(math.sqrt(special.polygamma(1, float(strength.shape.detach()))))
    if strength.family == "point":
        return 0.0
    raise ValueError(f"sd_log_strength does not know the {strength.family!r} family")


def _check_deterministic(strength: Strength) -> None:
    if strength.integrator in ("mc", "qmc"):
        raise ValueError(
            f"a strength refit needs a deterministic integrator (a fixed objective to maximize); the {strength.family} "
            f"strength uses {strength.integrator!r}: use one of "
            f"{[i for i in strength.integrators if i not in ('mc', 'qmc')]}"
        )


def _coordinates(strength: Strength, names: list[str]) -> np.ndarray:
    """The linear map A from the optimizer's coordinates v to the parameters (params = A v).

    The identity, except for a Gamma with both parameters free, which is fitted in (log shape, log mean): near a
    point mass its likelihood is a long ridge log_rate = log_shape - log(mean) in (log_shape, log_rate), on which
    a quasi-Newton method crawls, while in (log shape, log mean) the ridge is an axis.
    """
    a = np.eye(len(names))
    if strength.family == "gamma" and {"log_shape", "log_rate"} <= set(names):
        i, j = names.index("log_shape"), names.index("log_rate")
        a[j, i], a[j, j] = 1.0, -1.0  # log_rate = log_shape - log_mean
    return a



def _coordinate_bounds(strength: Strength, names: list[str], a: np.ndarray) -> list[tuple[float, float]]:
    """Box bounds of the optimizer's coordinates: a parameter's own range where the coordinate is that parameter."""
    bounds = []
    for k in range(len(names)):
        own = np.count_nonzero(a[:, k]) == 1
        bounds.append(_bounds(strength, names[k]) if own else (-_PARAM_LIMIT, _PARAM_LIMIT))
    return bounds


def newton_step(strength: Strength, margins, objective: str = "marginal", annotator=None,
                n_annotators: int | None = None, halvings: int = 4) -> dict[str, Any]:
    """One safeguarded Newton step of the objective in the strength's trainable parameters, in place.

    The cheap M-step of a generalized EM (Dempster, Laird and Rubin 1977): a step need only raise the objective,
    not maximize it, for the iteration to keep climbing. A training run's refits start from the previous refit's
    phi on margins of which a few percent have changed, where the objective is close to quadratic, so one Newton
    step lands within the optimizer's tolerance of the maximum at the cost of one gradient and Hessian (1-3
    parameters: 1-3 extra backward passes) and one value, where L-BFGS-B spends 8-25 values on the same move.

    The step is ``-H^{-1} g`` in the coordinates of :func:`fit_strength`, clipped to its bounds, halved up to
    ``halvings`` times until the objective rises; when the Hessian is not negative definite, or no halving
    rises, phi is left as it was (``accepted`` False: the caller's next full fit takes over).

    Args: as :func:`fit_strength` (margins (n,), nats). Returns: dict ``loglik`` (nats, summed over pairs),
    ``accepted``, ``params`` (:func:`strength_vector`).
    """
    check_objective(objective)
    _check_deterministic(strength)
    h = _margins(margins)
    panel = _panel(h, objective, annotator, n_annotators)
    named = [(n, p) for n, p in strength.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    a = _coordinates(strength, names)
    terms = panel_newton_terms(strength, h, *panel, params) if panel is not None and params else None
    if terms is None:
        value = _objective(strength, h, objective, panel)
        if not params or not torch.isfinite(value):
            return {"loglik": float(value.detach()), "accepted": False, "params": strength_vector(strength)}
        grads = torch.autograd.grad(value, params, create_graph=True)
        hess = np.array([[float(x) for x in torch.autograd.grad(g, params, retain_graph=True)] for g in grads])
        terms = float(value.detach()), np.array([float(x.detach()) for x in grads]), hess
    ll0, grad, hess = terms
    if not math.isfinite(ll0):
        return {"loglik": ll0, "accepted": False, "params": strength_vector(strength)}
    g = a.T @ grad  # chain rule through params = a v
    hess_v = a.T @ hess @ a
    start = np.array([float(p.detach()) for p in params])
    if not np.all(np.isfinite(hess_v)) or np.any(np.linalg.eigvalsh(0.5 * (hess_v + hess_v.T)) >= 0):
        return {"loglik": ll0, "accepted": False, "params": strength_vector(strength)}
    v0 = np.linalg.solve(a, start)
    lo, hi = np.array(_coordinate_bounds(strength, names, a)).T
    step = -np.linalg.solve(hess_v, g)
    for _ in range(halvings + 1):
        with torch.no_grad():
            for p, x in zip(params, a @ np.clip(v0 + step, lo, hi), strict=True):
                p.fill_(float(x))
            ll = float(_objective(strength, h, objective, panel))
        if math.isfinite(ll) and ll >= ll0:
            return {"loglik": ll, "accepted": True, "params": strength_vector(strength)}
        step = step / 2
    with torch.no_grad():
        for p, x in zip(params, start, strict=True):
            p.fill_(float(x))
    return {"loglik": ll0, "accepted": False, "params": strength_vector(strength)}


def fit_strength(strength: Strength, margins, objective: str = "marginal", max_iter: int = 200,
                 exclude: tuple[str, ...] = (), annotator=None, n_annotators: int | None = None) -> dict[str, Any]:
    """Maximize the objective over the strength's trainable parameters with the margins fixed, in place.

    L-BFGS-B (scipy) on the 1-3 unconstrained parameters, with the value and gradient from the kernel in float64
    and box bounds: the spread within :data:`SPREAD_PARAMETERS`' range, locations within +-12 on the log scale.

    Args:
        strength: the strength module (its trainable parameters are updated).
        margins: DPO margins h of the pairs, shape (n,), nats.
        objective: "marginal" or "expected".
        max_iter: L-BFGS-B iterations at most.
        exclude: parameter names held at their values (the profile likelihood fixes the spread).
        annotator: annotator id of each margin, (n,) ints, or None. Given, the objective is the annotator-level
            (panel) likelihood ``sum_a log E_phi[prod_{j in a} sigmoid(beta h_j)]`` of :mod:`alignment.panel`
            (``objective="marginal"`` only).
        n_annotators: number of annotators A (default: the largest id + 1).

    Returns:
        Dict: ``loglik`` (the objective at the fit, nats summed over pairs), ``grad_norm`` (largest absolute
        gradient per pair at the fit, in the optimizer's coordinates), ``converged`` (the optimizer's test,
        and no parameter at a bound), ``at_bound`` (names of parameters at a bound), ``params``
        (:func:`strength_vector`).
    """
    check_objective(objective)
    _check_deterministic(strength)
    h = _margins(margins)
    panel = _panel(h, objective, annotator, n_annotators)
    named = [(n, p) for n, p in strength.named_parameters() if p.requires_grad and n not in exclude]
    if not named:
        with torch.no_grad():
            ll = float(_objective(strength, h, objective, panel))
        return {"loglik": ll, "grad_norm": 0.0, "converged": True, "at_bound": [],
                "params": strength_vector(strength)}
    names = [n for n, _ in named]
    params = [p for _, p in named]
    a = _coordinates(strength, names)
    a_inv = np.linalg.inv(a)
    n = h.numel()

    def set_params(v: np.ndarray) -> None:
        with torch.no_grad():
            for p, value in zip(params, a @ v, strict=True):
                p.fill_(float(value))

    def value_and_grad(v: np.ndarray):
        set_params(v)
        for p in params:
            p.grad = None
        loss = -_objective(strength, h, objective, panel) / n
        if not torch.isfinite(loss):
            return np.inf, np.zeros_like(v)
        loss.backward()
        g = np.array([float(p.grad) for p in params])
        return float(loss.detach()), a.T @ g

    v0 = a_inv @ np.array([float(p.detach()) for p in params])
    bounds = _coordinate_bounds(strength, names, a)
    v0 = np.clip(v0, [b[0] for b in bounds], [b[1] for b in bounds])
    res = optimize.minimize(value_and_grad, v0, jac=True, method="L-BFGS-B", bounds=bounds,
                            options={"maxiter": max_iter, "ftol": 1e-15, "gtol": 1e-8})
    set_params(res.x)
    loss, grad = value_and_grad(res.x)
    for p in params:
        p.grad = None
    at_bound = [names[k] if k < len(names) else str(k) for k, (lo, hi) in enumerate(bounds)
                if res.x[k] <= lo + 1e-9 or res.x[k] >= hi - 1e-9]
    # At a bound the gradient need not vanish (the maximum lies outside the range): test the free coordinates.
    free = [k for k, (lo, hi) in enumerate(bounds) if lo + 1e-9 < res.x[k] < hi - 1e-9]
    grad_norm = float(np.abs(grad[free]).max()) if free else 0.0
    return {"loglik": -loss * n, "grad_norm": grad_norm, "converged": grad_norm < 1e-6 and not at_bound,
            "at_bound": at_bound, "params": strength_vector(strength)}


def _point_loglik(h: torch.Tensor, beta: float, learn: bool, objective: str) -> float:
    """Log-likelihood of a point strength at ``beta``, or at its maximum over beta when ``learn`` (a point mass
    has no per-annotator part: its panel likelihood is the pair likelihood)."""
    point = PointStrength(beta, learnable=learn)
    return fit_strength(point, h, objective)["loglik"]


def profile_spread(strength: Strength, margins, objective: str = "marginal", level: float = 0.95,
                   annotator=None, n_annotators: int | None = None) -> dict[str, Any]:
    """Maximum-likelihood spread with its profile-likelihood interval, and the LR test against a point strength.

    The strength is copied, not changed. With the mean pinned (``fix_mean``) the point strength it is tested
    against sits at the pinned mean; with the mean free, at its own best beta.

    Args:
        strength: a LogNormal or Gamma strength (any current parameters: it is refitted first).
        margins: DPO margins h, shape (n,), nats.
        objective: "marginal" or "expected".
        level: coverage of the interval (0 < level < 1).
        annotator, n_annotators: as in :func:`fit_strength`: the annotator-level (panel) objective, one strength
            per annotator (the test against a point strength is then the same: a point mass is shared by all).

    Returns:
        Dict: ``sd_log`` (the fitted sd of log beta), ``sd_log_low``/``sd_log_high`` (the interval; low is 0 when
        zero spread lies inside it, high is inf when the profile never falls far enough), ``cv``,
        ``cv_low``/``cv_high`` (the same interval in coefficients of variation), ``loglik``, ``loglik_point``,
        ``lr_stat`` (2 (loglik - loglik_point), >= 0), ``lr_pvalue`` (against 0.5 chi2_0 + 0.5 chi2_1),
        ``mean`` (fitted E[beta]) and ``converged``.
    """
    check_objective(objective)
    check_fraction("level", level)
    family = check_choice("strength family", strength.family, tuple(SPREAD_PARAMETERS))
    name, grows, (t_lo, t_hi) = SPREAD_PARAMETERS[family]
    h = _margins(margins)
    panel = _panel(h, objective, annotator, n_annotators)
    by = {} if panel is None else {"annotator": panel[0], "n_annotators": panel[1]}
    fitted = copy.deepcopy(strength)
    fit = fit_strength(fitted, h, objective, **by)
    ll_hat = fit["loglik"]
    spread = dict(fitted.named_parameters())[name]
    t_hat = float(spread.detach())
    pinned = bool(getattr(fitted, "fix_mean", False))
    mean = float(fitted.mean().detach())
    ll_point = _point_loglik(h, mean, not pinned, objective)
    # The mixture contains the point strength as a limit, so its maximum cannot be below the point's.
    lr = max(0.0, 2.0 * (ll_hat - ll_point))
    crit = stats.chi2.ppf(level, 1)

    probe = copy.deepcopy(fitted)
    probe_spread = dict(probe.named_parameters())[name]

    def deficit(t: float) -> float:
        with torch.no_grad():
            probe_spread.fill_(t)
        ll = fit_strength(probe, h, objective, exclude=(name,), **by)["loglik"]
        return 2.0 * (ll_hat - ll) - crit

    def bound(direction: float) -> float:
        """The t where the deficit crosses 0 going in ``direction`` from t_hat (+-inf when none in the range)."""
        step, prev = 0.25, t_hat
        while True:
            t = min(max(t_hat + direction * step, t_lo), t_hi)
            if deficit(t) > 0:
                return optimize.brentq(deficit, min(prev, t), max(prev, t), xtol=1e-6)
            if t in (t_lo, t_hi):
                return math.copysign(math.inf, direction)
            prev, step = t, step * 2

    toward_zero = -1.0 if grows else 1.0
    # The point strength (zero spread) inside the interval: its lower end is 0.
    t_zero_side = toward_zero * math.inf if lr <= crit else bound(toward_zero)
    t_far_side = bound(-toward_zero)

    def to_sd(t: float) -> float:
        if math.isinf(t):
            return 0.0 if (t > 0) != grows else math.inf
        return math.exp(t) if family == "lognormal" else math.sqrt(special.polygamma(1, math.exp(t)))

    def to_cv(t: float) -> float:
        if math.isinf(t):
            return 0.0 if (t > 0) != grows else math.inf
        return math.sqrt(math.expm1(math.exp(2 * t))) if family == "lognormal" else math.exp(-t / 2)

    ends = sorted([to_sd(t_zero_side), to_sd(t_far_side)])
    cv_ends = sorted([to_cv(t_zero_side), to_cv(t_far_side)])
    return {
        "sd_log": to_sd(t_hat),
        "sd_log_low": ends[0],
        "sd_log_high": ends[1],
        "cv": to_cv(t_hat),
        "cv_low": cv_ends[0],
        "cv_high": cv_ends[1],
        "loglik": ll_hat,
        "loglik_point": ll_point,
        "lr_stat": lr,
        "lr_pvalue": 0.5 * float(stats.chi2.sf(lr, 1)) if lr > 0 else 1.0,
        "mean": mean,
        "level": level,
        "converged": fit["converged"],
    }
