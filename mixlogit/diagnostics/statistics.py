"""The heterogeneity table: statistics of every random coefficient's population distribution.

Everything is computed from a coefficient distribution's transform ``beta = T(loc, spread, z)``
(:func:`mixlogit.moments.marginal_transform`): moments by the quadrature of :mod:`mixlogit.moments`, quantiles as
``T`` at normal quantiles (every family is monotone in ``z``), and the share of the population with the sign
opposite to the mean by locating the sign change of ``T`` on a fine grid, so all families (and correlated
normal marginals) go through one code path.

The table is built from (spec, parameter draws) or from (spec, estimate, covariance); which estimator produced
them is the results object's business (``res.heterogeneity()``), never this module's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from ..moments import delta_method, marginal_draws, marginal_transform
from ..spec import Spec

#: Statistics of the heterogeneity table, in column order.
STATS = ("mean", "sd", "cv", "share_opposite", "q05", "q50", "q95")
#: Half-width and size of the z grid on which sign changes are located (mass outside: 2e-17).
_GRID_HALF_WIDTH, _GRID_SIZE = 8.5, 4097


def _share_below_zero(b: torch.Tensor, cdf: torch.Tensor) -> torch.Tensor:
    """P(beta < 0) from values b of a monotone transform on a z grid with normal CDF values ``cdf``.

    Each grid cell contributes its normal mass times the fraction of the cell where the linear interpolant of
    b is negative; the crossing cell makes the result a smooth function of the parameters (delta method).
    """
    lo, hi = b[:-1], b[1:]
    mass = cdf[1:] - cdf[:-1]
    crossing = (lo < 0) != (hi < 0)
    den = torch.where(crossing, lo - hi, torch.ones_like(lo))
    frac_cross = torch.where(lo < 0, lo / den, hi / (-den))
    frac = torch.where(crossing, frac_cross, (lo < 0).to(b.dtype))
    return (mass * frac).sum() + torch.where(b[0] < 0, cdf[0], torch.zeros_like(cdf[0]))


def coefficient_stats(spec: Spec, theta: torch.Tensor) -> torch.Tensor:
    """Heterogeneity statistics of every random coefficient, differentiable in ``theta`` (P,).

    Returns (K, 7), one row per :attr:`Spec.heterogeneity_names` (a random scale last): mean, sd, coefficient of variation (sd / |mean|), share of the population whose
    coefficient has the sign opposite to the mean (zeros count for neither sign), and the 5%, 50%, 95%
    quantiles.
    """
    dtype = theta.dtype
    zg = torch.linspace(-_GRID_HALF_WIDTH, _GRID_HALF_WIDTH, _GRID_SIZE, dtype=dtype)
    cdf = torch.special.ndtr(zg)
    zq = torch.special.ndtri(torch.tensor([0.05, 0.5, 0.95], dtype=dtype))
    rows = []
    for k in range(len(spec.heterogeneity_names)):
        b, w = marginal_draws(spec, theta, k)
        mean = (w * b).sum()
        sd = torch.sqrt((w * (b - mean) ** 2).sum().clamp_min(0.0))
        bg = marginal_transform(spec, theta, k, zg)
        below = _share_below_zero(bg, cdf)
        above = _share_below_zero(-bg, cdf)
        share = torch.where(mean >= 0, below, above)
        increasing = bg[-1] >= bg[0]
        q = marginal_transform(spec, theta, k, torch.where(increasing, zq, -zq))
        cv = sd / mean.abs().clamp_min(torch.finfo(dtype).tiny)
        rows.append(torch.stack([mean, sd, cv, share, q[0], q[1], q[2]]))
    if not rows:
        return torch.zeros(0, len(STATS), dtype=dtype)
    return torch.stack(rows)


def stats_over_draws(spec: Spec, theta_draws: np.ndarray) -> np.ndarray:
    """coefficient_stats for every row of theta_draws (S, P): (S, K, 7)."""
    th = torch.as_tensor(np.asarray(theta_draws, dtype=float), dtype=torch.float64)
    with torch.no_grad():
        try:
            return torch.func.vmap(lambda t: coefficient_stats(spec, t))(th).numpy()
        except (RuntimeError, NotImplementedError, ValueError):  # a transform vmap cannot batch: one at a time
            return np.stack([coefficient_stats(spec, t).numpy() for t in th])


def check_level(level, name: str = "level") -> float:
    """An interval level (or, named ``alpha``, an error rate): a number, not a bool or text such as "0.9",
    strictly between 0 and 1."""
    if isinstance(level, bool) or not isinstance(level, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number in (0, 1), got {type(level).__name__} {level!r}")
    if not 0 < level < 1:
        raise ValueError(f"{name} must be in (0, 1), got {level}")
    return float(level)


def _require_random(spec: Spec) -> None:
    if not spec.heterogeneity_names:
        raise ValueError("the model has no random coefficients: there is no heterogeneity to describe")


def heterogeneity_from_draws(spec: Spec, theta_draws: np.ndarray, level: float = 0.9) -> pd.DataFrame:
    """The heterogeneity table from parameter draws (S, P) in the Spec layout: posterior means of the
    statistics and equal-tailed ``level`` credible intervals over the draws."""
    level = check_level(level)
    _require_random(spec)
    st = stats_over_draws(spec, theta_draws)  # (S, K, 7)
    lo, hi = np.quantile(st, [(1 - level) / 2, (1 + level) / 2], axis=0)
    how = f"{level:.0%} equal-tailed credible interval over {len(theta_draws)} posterior draws"
    return heterogeneity_frame(spec, st.mean(0), lo, hi, level, how)


def heterogeneity_delta(spec: Spec, theta: np.ndarray, cov: np.ndarray, level: float = 0.9) -> pd.DataFrame:
    """The heterogeneity table at an estimate ``theta`` (P,) with covariance ``cov`` (P, P), both in the Spec
    layout: the statistics at ``theta`` with delta-method Wald intervals (clipped to each statistic's range)."""
    level = check_level(level)
    _require_random(spec)
    K = len(spec.heterogeneity_names)
    val, se = delta_method(lambda th: coefficient_stats(spec, th).reshape(-1), theta, cov)
    est, se = val.reshape(K, -1), se.reshape(K, -1)
    q = sps.norm.ppf((1 + level) / 2)
    return heterogeneity_frame(spec, est, est - q * se, est + q * se, level, f"{level:.0%} Wald interval, delta method")


def heterogeneity_frame(spec: Spec, est: np.ndarray, lo: np.ndarray, hi: np.ndarray, level: float,
                        how: str) -> pd.DataFrame:
    """Assemble the table from (K, 7) estimates and bounds: columns ``distribution``, then ``<stat>``,
    ``<stat>.lo``, ``<stat>.hi`` for each of :data:`STATS`; ``df.attrs`` holds ``level`` and ``interval``."""
    lo, hi = np.array(lo, dtype=float), np.array(hi, dtype=float)
    # Clip to each statistic's range (sd, cv >= 0; share in [0, 1]).
    for j in (1, 2):
        lo[:, j] = np.maximum(lo[:, j], 0.0)
    lo[:, 3], hi[:, 3] = np.clip(lo[:, 3], 0, 1), np.clip(hi[:, 3], 0, 1)
    cols = {"distribution": [spec.random[c] + (" (correlated)" if c in spec.correlated else "")
                             for c in spec.random_names] + ([f"{spec.scale} scale, mean 1"] if spec.scale else [])}
    for j, s in enumerate(STATS):
        cols[s], cols[f"{s}.lo"], cols[f"{s}.hi"] = est[:, j], lo[:, j], hi[:, j]
    df = pd.DataFrame(cols, index=pd.Index(spec.heterogeneity_names, name="coefficient"))
    df.attrs.update(level=level, interval=how)
    return df


def heterogeneity(res, level: float = 0.9, n: int = 2000) -> pd.DataFrame:
    """The heterogeneity table of any result: one row per random coefficient (``res.heterogeneity``).

    Columns: ``distribution``, then for each statistic in :data:`STATS` (mean, sd, coefficient of variation,
    share of the population with the sign opposite to the mean, 5%/50%/95% quantiles) its estimate and the
    bounds of a ``level`` interval (``<stat>.lo``, ``<stat>.hi``). Bayesian results: posterior means and
    equal-tailed credible intervals over (at most ``n``) posterior draws. MSL results: estimates at theta-hat
    with delta-method standard errors (Wald intervals, clipped to the statistic's range).
    """
    return res.heterogeneity(level=level, n=n)
