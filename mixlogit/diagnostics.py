"""Heterogeneity diagnostics for every estimator: ArviZ export, the heterogeneity table, plots and a report.

MSL results are described by their asymptotic normal distribution (draws of theta from N(theta_hat, cov) for
ArviZ and plots; the delta method for the heterogeneity table), Bayesian results by their posterior draws, so
the estimators are compared with the same tools (``az.summary``, ``az.loo``, ``az.plot_forest``).

Everything is computed from a coefficient distribution's transform ``beta = T(loc, spread, z)``: moments by the
quadrature of :mod:`mixlogit.moments`, quantiles as ``T`` at normal quantiles (every family is monotone in
``z``), and the share of the population with the sign opposite to the mean by locating the sign change of ``T``
on a fine grid, so all families (and correlated normal marginals) go through one code path.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data import ChoiceData
from .kernel import choice_probabilities, conditional_loglik, log_mixed_prob
from .moments import marginal_draws
from .spec import Spec

#: Statistics of the heterogeneity table, in column order.
STATS = ("mean", "sd", "cv", "share_opposite", "q05", "q50", "q95")
#: Half-width and size of the z grid on which sign changes are located (mass outside: 2e-17).
_GRID_HALF_WIDTH, _GRID_SIZE = 8.5, 4097


# ---------------------------------------------------------------------------------------------- statistics
def _marginal_transform(spec: Spec, theta: torch.Tensor, k: int, z: torch.Tensor) -> torch.Tensor:
    """Random coefficient k at standard normal points z (its marginal distribution's transform)."""
    sl = spec.slices()
    loc = theta[sl["loc"]][k]
    if k in spec.corr_index:
        L = spec.cholesky(theta)
        i = spec.corr_index.index(k)
        return loc + torch.sqrt((L[i] ** 2).sum()) * z
    return spec.dists[k].transform(loc, theta[sl["spread"]][k], z)


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

    Returns (K, 7): mean, sd, coefficient of variation (sd / |mean|), share of the population whose
    coefficient has the sign opposite to the mean (zeros count for neither sign), and the 5%, 50%, 95%
    quantiles.
    """
    dtype = theta.dtype
    zg = torch.linspace(-_GRID_HALF_WIDTH, _GRID_HALF_WIDTH, _GRID_SIZE, dtype=dtype)
    cdf = torch.special.ndtr(zg)
    zq = torch.special.ndtri(torch.tensor([0.05, 0.5, 0.95], dtype=dtype))
    rows = []
    for k in range(spec.n_random):
        b, w = marginal_draws(spec, theta, k)
        mean = (w * b).sum()
        sd = torch.sqrt((w * (b - mean) ** 2).sum().clamp_min(0.0))
        bg = _marginal_transform(spec, theta, k, zg)
        below = _share_below_zero(bg, cdf)
        above = _share_below_zero(-bg, cdf)
        share = torch.where(mean >= 0, below, above)
        increasing = bg[-1] >= bg[0]
        q = _marginal_transform(spec, theta, k, torch.where(increasing, zq, -zq))
        cv = sd / mean.abs().clamp_min(torch.finfo(dtype).tiny)
        rows.append(torch.stack([mean, sd, cv, share, q[0], q[1], q[2]]))
    if not rows:
        return torch.zeros(0, len(STATS), dtype=dtype)
    return torch.stack(rows)


def _stats_over_draws(spec: Spec, theta_draws: np.ndarray) -> np.ndarray:
    """coefficient_stats for every row of theta_draws (S, P): (S, K, 7)."""
    th = torch.as_tensor(np.asarray(theta_draws, dtype=float), dtype=torch.float64)
    with torch.no_grad():
        try:
            return torch.func.vmap(lambda t: coefficient_stats(spec, t))(th).numpy()
        except (RuntimeError, NotImplementedError, ValueError):  # a transform vmap cannot batch: one at a time
            return np.stack([coefficient_stats(spec, t).numpy() for t in th])


def _is_bayes(res) -> bool:
    from .bayes.results import BayesResults

    return isinstance(res, BayesResults)


def _msl_raw_cov(res) -> np.ndarray:
    """Covariance of the raw (signed) MSL parameter vector."""
    f = np.where(res.params.to_numpy() * res.theta < 0, -1.0, 1.0)
    return res.cov.to_numpy() * np.outer(f, f)


def heterogeneity(res, level: float = 0.9, n: int = 2000) -> pd.DataFrame:
    """The heterogeneity table: one row per random coefficient.

    Columns: ``distribution``, then for each statistic in :data:`STATS` (mean, sd, coefficient of variation,
    share of the population with the sign opposite to the mean, 5%/50%/95% quantiles) its estimate and the
    bounds of a ``level`` interval (``<stat>.lo``, ``<stat>.hi``). Bayesian results: posterior means and
    equal-tailed credible intervals over (at most ``n``) posterior draws. MSL results: estimates at theta-hat
    with delta-method standard errors (Wald intervals, clipped to the statistic's range).
    ``df.attrs`` holds ``level`` and ``interval`` (how the interval was made).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    spec = res.spec
    if not spec.n_random:
        raise ValueError("the model has no random coefficients: there is no heterogeneity to describe")
    if _is_bayes(res):
        flat = res.draws.reshape(-1, res.draws.shape[-1])
        if len(flat) > n:
            flat = flat[np.linspace(0, len(flat) - 1, n).round().astype(int)]
        st = _stats_over_draws(spec, flat)  # (S, K, 7)
        est = st.mean(0)
        lo, hi = np.quantile(st, [(1 - level) / 2, (1 + level) / 2], axis=0)
        how = f"{level:.0%} equal-tailed credible interval over {len(flat)} posterior draws"
    else:
        from scipy import stats as sps

        from .moments import delta_method

        K = spec.n_random
        val, se = delta_method(lambda th: coefficient_stats(spec, th).reshape(-1), res.theta, _msl_raw_cov(res))
        est, se = val.reshape(K, -1), se.reshape(K, -1)
        q = sps.norm.ppf((1 + level) / 2)
        lo, hi = est - q * se, est + q * se
        how = f"{level:.0%} Wald interval, delta method"
    lo, hi = lo.copy(), hi.copy()
    # Clip to each statistic's range (sd, cv >= 0; share in [0, 1]).
    for j in (1, 2):
        lo[:, j] = np.maximum(lo[:, j], 0.0)
    lo[:, 3], hi[:, 3] = np.clip(lo[:, 3], 0, 1), np.clip(hi[:, 3], 0, 1)
    cols = {"distribution": [spec.random[c] + (" (correlated)" if c in spec.correlated else "")
                             for c in spec.random_names]}
    for j, s in enumerate(STATS):
        cols[s], cols[f"{s}.lo"], cols[f"{s}.hi"] = est[:, j], lo[:, j], hi[:, j]
    df = pd.DataFrame(cols, index=pd.Index(spec.random_names, name="coefficient"))
    df.attrs.update(level=level, interval=how)
    return df


# ---------------------------------------------------------------------------------------------- ArviZ
def _design_for(res, data: ChoiceData):
    from .model import MixedLogit

    model = MixedLogit(**res.model_args)
    spec = model.spec_for(data)
    if spec.param_names != res.param_names:
        raise ValueError(f"data gives the parameter layout {spec.param_names}, the results have "
                         f"{res.param_names} (do the alternatives differ from the estimation data?)")
    return data.design(spec.random_names, spec.fixed)


def _stack_fixed(design, theta, beta):
    """Attributes with the fixed ones appended to the random ones, and the coefficient draws to match:
    x (N, T, A, K + Kf) and beta (..., K + Kf), so one kernel call covers draws that differ in the fixed part."""
    return torch.cat([design.x_rand_diff, design.x_fixed_diff], -1)


def _situations(data: ChoiceData, design):
    """Unit and position of every choice situation (table order of the chosen rows) and its label."""
    rows = np.flatnonzero(data._chosen)
    return (design.row_unit[rows].numpy(), design.row_t[rows].numpy(),
            data.df[data.situation].to_numpy()[rows], design.row_j[rows].numpy())


def marginal_loglik(spec: Spec, design, theta_draws: np.ndarray, draws: int = 100, seed: int = 0) -> np.ndarray:
    """log P_n(theta_s) per draw s and unit n, integrating each unit's coefficients with ``draws`` Halton
    draws (the same draws for every theta_s): (S, N). Unweighted."""
    from .draws import make_rule

    th = torch.as_tensor(np.asarray(theta_draws, dtype=float), dtype=torch.float64)
    S, N = th.shape[0], design.n_units
    x = torch.cat([design.x_rand_diff, design.x_fixed_diff], -1)
    needs_avail = not bool((design.avail_diff | ~design.situation_mask.unsqueeze(-1)).all())
    K, Kf = spec.n_random, spec.n_fixed
    out = np.empty((S, N))
    if K:
        rule = make_rule("halton", N, draws, K, seed=seed)
        R = draws
    else:
        R = 1
    per = x.shape[1] * x.shape[2] * R
    unit_chunk = max(1, min(N, 2**21 // max(1, per)))
    draw_chunk = max(1, 2**21 // max(1, per * unit_chunk))
    with torch.no_grad():
        for u0 in range(0, N, unit_chunk):
            c = slice(u0, min(u0 + unit_chunk, N))
            n = c.stop - c.start
            z = rule.z[c] if K else None
            for s0 in range(0, S, draw_chunk):
                ths = th[s0:s0 + draw_chunk]
                betas = []
                for t in ths:
                    br = spec.coefficients(t, z) if K else t.new_zeros(n, 1, 0)
                    bf = spec.fixed_coefficients(t).expand(n, R, Kf)
                    betas.append(torch.cat([br.expand(n, R, K), bf], -1))
                beta = torch.cat(betas, 1)  # (n, s*R, K + Kf)
                cond = conditional_loglik(x[c], beta, avail=design.avail_diff[c] if needs_avail else None,
                                          situation_mask=design.situation_mask[c])
                cond = cond.reshape(n, len(ths), R)
                lw = torch.full((R,), -math.log(R), dtype=cond.dtype)
                out[s0:s0 + len(ths), c] = log_mixed_prob(cond, lw).T.numpy()
    return out


def conditional_loglik_draws(spec: Spec, design, theta_draws: np.ndarray, beta_draws: np.ndarray) -> np.ndarray:
    """sum_t log L_nt(beta_n^(s)) per draw s and unit n given individual coefficient draws (S, N, K): (S, N)."""
    th = torch.as_tensor(np.asarray(theta_draws, dtype=float), dtype=torch.float64)
    bd = torch.as_tensor(np.asarray(beta_draws, dtype=float), dtype=torch.float64)
    S, N = bd.shape[:2]
    x = torch.cat([design.x_rand_diff, design.x_fixed_diff], -1)
    needs_avail = not bool((design.avail_diff | ~design.situation_mask.unsqueeze(-1)).all())
    out = np.empty((S, N))
    chunk = max(1, 2**22 // max(1, N * x.shape[1] * x.shape[2]))
    with torch.no_grad():
        for s0 in range(0, S, chunk):
            b = bd[s0:s0 + chunk].transpose(0, 1)  # (N, s, K)
            bf = spec.fixed_coefficients(th[s0:s0 + chunk]).unsqueeze(0).expand(N, -1, -1)
            cond = conditional_loglik(x, torch.cat([b, bf], -1), avail=design.avail_diff if needs_avail else None,
                                      situation_mask=design.situation_mask)
            out[s0:s0 + chunk] = cond.T.numpy()
    return out


def predictive_choices(spec: Spec, design, situations, theta_draws: np.ndarray, beta_draws=None,
                       seed: int = 0) -> np.ndarray:
    """Replicated choices (alternative codes) of every situation per draw: (S, n_situations).

    With ``beta_draws`` (S, N, K) the units keep their own coefficients (posterior predictive of the same
    persons); without, every draw gets fresh coefficients from the population (new persons).
    """
    unit, t_pos = situations[0], situations[1]
    th = torch.as_tensor(np.asarray(theta_draws, dtype=float), dtype=torch.float64)
    S, N, K = th.shape[0], design.n_units, spec.n_random
    x = torch.cat([design.x_rand, design.x_fixed], -1)
    gen = torch.Generator().manual_seed(int(seed))
    out = np.empty((S, len(unit)), dtype=np.int64)
    lw = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        for s in range(S):
            if K and beta_draws is not None:
                br = torch.as_tensor(beta_draws[s], dtype=torch.float64).unsqueeze(1)
            elif K:
                br = spec.coefficients(th[s], torch.randn(N, 1, K, generator=gen, dtype=torch.float64))
            else:
                br = th.new_zeros(N, 1, 0)
            beta = torch.cat([br, spec.fixed_coefficients(th[s]).expand(N, 1, -1)], -1)
            p = choice_probabilities(x, beta, lw, avail=design.avail)  # (N, T, J)
            p = p[unit, t_pos]
            u = torch.rand(p.shape[0], 1, generator=gen, dtype=p.dtype)
            out[s] = torch.searchsorted(torch.cumsum(p, -1), u).clamp_max(p.shape[-1] - 1).squeeze(-1).numpy()
    return out


def _population_vars(spec: Spec, theta: np.ndarray, positive_spreads: bool) -> dict:
    """Population parameters as ArviZ variables (chain, draw) named as in ``params``."""
    sl = spec.slices()["spread"]
    out = {}
    for j, name in enumerate(spec.param_names):
        v = theta[..., j]
        if positive_spreads and sl.start <= j < sl.stop:
            v = np.abs(v)
        out[name] = v
    return out


def _to_idata(spec, theta, beta, data, design, *, log_likelihood, draws, seed, sample_stats, unit_dim,
              positive_spreads, individual):
    """Assemble InferenceData from theta (C, S, P) and optional individual draws beta (C, S, N, K)."""
    import arviz as az
    import xarray as xr

    C, S = theta.shape[:2]
    coords = {"chain": np.arange(C), "draw": np.arange(S)}
    post = {k: (("chain", "draw"), v) for k, v in _population_vars(spec, theta, positive_spreads).items()}
    groups = {}
    labels = None
    if design is not None:
        labels = list(data.unit_labels)
    if beta is not None and individual:
        units = labels if labels is not None else np.arange(beta.shape[2])
        post["beta"] = (("chain", "draw", unit_dim, "coefficient"), beta)
        coords[unit_dim] = units
        coords["coefficient"] = list(spec.random_names)
    groups["posterior"] = xr.Dataset(post, coords=coords)
    if design is not None:
        flat = theta.reshape(C * S, -1)
        if log_likelihood == "marginal":
            ll = marginal_loglik(spec, design, flat, draws=draws, seed=seed)
        else:
            if beta is None:
                raise ValueError("log_likelihood='conditional' needs individual draws, which these results lack; "
                                 "use log_likelihood='marginal'")
            ll = conditional_loglik_draws(spec, design, flat, beta.reshape(C * S, *beta.shape[2:]))
        ucoords = {"chain": np.arange(C), "draw": np.arange(S), unit_dim: labels}
        groups["log_likelihood"] = xr.Dataset({"choice": (("chain", "draw", unit_dim), ll.reshape(C, S, -1))},
                                              coords=ucoords)
        sits = _situations(data, design)
        scoords = {"situation": sits[2]}
        rep = predictive_choices(spec, design, sits, flat,
                                 None if beta is None else beta.reshape(C * S, *beta.shape[2:]), seed=seed + 1)
        groups["posterior_predictive"] = xr.Dataset(
            {"choice": (("chain", "draw", "situation"), rep.reshape(C, S, -1))},
            coords={"chain": np.arange(C), "draw": np.arange(S), **scoords})
        obs = xr.Dataset({"choice": (("situation",), sits[3])}, coords=scoords)
        obs["choice"].attrs["alternatives"] = ", ".join(map(str, data.alternatives))
        groups["observed_data"] = obs
    if sample_stats is not None:
        groups["sample_stats"] = sample_stats
    return az.InferenceData(**groups)


def bayes_to_arviz(res, data: ChoiceData | None = None, n: int | None = None, log_likelihood: str = "marginal",
                   draws: int = 100, seed: int = 0, individual: bool | None = None):
    """ArviZ InferenceData of a Bayesian fit.

    Groups: ``posterior`` (population parameters named as in ``params``; with individual draws also ``beta``
    with dims ``(chain, draw, person, coefficient)``, ``situation`` instead of ``person`` without a panel),
    and with data (the estimation data by default, while the results are in memory): ``log_likelihood``
    (variable ``choice``, one value per panel unit, or per choice situation without a panel),
    ``posterior_predictive`` (replicated choices per situation, alternative codes), ``observed_data``, and
    ``sample_stats`` (SVI: ``elbo`` per step; NUTS: ``diverging``, ``tree_depth``).

    ``n``: posterior draws to export (SVI default 1000 in one chain; NUTS default all, thinned evenly per
    chain otherwise). ``log_likelihood="marginal"`` integrates each unit's coefficients out with ``draws``
    Halton draws (comparable with MSL, good Pareto-k behaviour in ``az.loo``); ``"conditional"`` uses the
    individual draws (``log p(y_n | beta_n)``).
    """
    import xarray as xr

    from .bayes.samplers import StoredSampler, SVISampler

    if log_likelihood not in ("marginal", "conditional"):
        raise ValueError(f"unknown log_likelihood {log_likelihood!r}; accepted: marginal, conditional")
    data = data if data is not None else res._data
    sampler = res._sampler
    same_units = data is None or (res._data is data) or list(data.unit_labels) == list(res.unit_labels)
    need_beta = (individual is not False) or log_likelihood == "conditional"
    want = need_beta and same_units and not isinstance(sampler, StoredSampler) and res.spec.n_random > 0
    if isinstance(sampler, SVISampler):
        theta, beta = sampler.chains(1000 if n is None else n, seed=seed, individual=want)
    else:
        theta, beta = sampler.chains(n, seed=seed, individual=want)
    if beta is not None and individual is None:
        individual = beta.size <= 5 * 10**7
    design = _design_for(res, data) if data is not None else None
    stats = None
    if res.elbo is not None:
        stats = xr.Dataset({"elbo": (("svi_step",), res.elbo)}, coords={"svi_step": np.arange(1, len(res.elbo) + 1)})
    elif res.sample_stats:
        C, S = theta.shape[:2]
        ss = {}
        for k, v in res.sample_stats.items():
            v = np.asarray(v)
            if v.shape[:2] != (C, S):
                idx = np.unique(np.linspace(0, v.shape[1] - 1, S).round().astype(int))
                v = v[:, idx]
            ss[k] = (("chain", "draw"), v)
        stats = xr.Dataset(ss, coords={"chain": np.arange(C), "draw": np.arange(S)})
    unit_dim = "person" if (data is None or data.is_panel) else "situation"
    return _to_idata(res.spec, theta, beta, data, design, log_likelihood=log_likelihood, draws=draws, seed=seed,
                     sample_stats=stats, unit_dim=unit_dim, positive_spreads=True, individual=bool(individual))


def msl_draws(res, n: int = 1000, seed: int = 0) -> np.ndarray:
    """n draws of the raw MSL parameter vector from its asymptotic normal N(theta_hat, cov): (n, P)."""
    rng = np.random.default_rng(seed)
    cov = _msl_raw_cov(res)
    cov = 0.5 * (cov + cov.T)
    return rng.multivariate_normal(res.theta, cov, size=n, method="eigh")


def msl_to_arviz(res, data: ChoiceData | None = None, n: int = 1000, seed: int = 0, draws: int = 100):
    """ArviZ InferenceData of an MSL fit: ``n`` draws of the parameters from their asymptotic normal
    distribution (reported signs, so ``az.summary`` gives ``params`` and ``bse``), and with ``data``: the
    marginal ``log_likelihood`` per unit at each draw (``draws`` Halton draws per unit),
    ``posterior_predictive`` (fresh coefficients per draw: the choices of new persons like these) and
    ``observed_data``."""
    raw = msl_draws(res, n, seed)
    flip = np.where(res.params.to_numpy() * res.theta < 0, -1.0, 1.0)
    design = _design_for(res, data) if data is not None else None
    unit_dim = "person" if (data is None or data.is_panel) else "situation"
    idata = _to_idata(res.spec, raw[None], None, data, design, log_likelihood="marginal", draws=draws, seed=seed,
                      sample_stats=None, unit_dim=unit_dim, positive_spreads=False, individual=False)
    post = idata.posterior
    for j, name in enumerate(res.param_names):  # report the sign convention of ``params``
        if flip[j] < 0:
            post[name] = -post[name]
    return idata


def to_arviz(res, data: ChoiceData | None = None, **kwargs):
    """InferenceData of any result (MSL or Bayesian); see :func:`msl_to_arviz` and :func:`bayes_to_arviz`."""
    if _is_bayes(res):
        return bayes_to_arviz(res, data=data, **kwargs)
    return msl_to_arviz(res, data=data, **kwargs)


def theta_draws(res, n: int = 1000, seed: int = 0) -> np.ndarray:
    """Draws of the Spec-layout parameters: posterior draws (Bayes) or the asymptotic normal (MSL): (n, P)."""
    if _is_bayes(res):
        flat = res.draws.reshape(-1, res.draws.shape[-1])
        if n >= len(flat):
            return flat
        return flat[np.linspace(0, len(flat) - 1, n).round().astype(int)]
    return msl_draws(res, n, seed)


# ---------------------------------------------------------------------------------------------- plots
def _density_on_grid(spec: Spec, theta: np.ndarray, k: int, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Density of coefficient k on grid x (change of variables from z) and its point mass at zero."""
    z = torch.linspace(-7, 7, 1401, dtype=torch.float64)
    with torch.no_grad():
        b = _marginal_transform(spec, torch.as_tensor(theta, dtype=torch.float64), k, z).numpy()
    zn = z.numpy()
    db = np.gradient(b, zn)
    phi = np.exp(-0.5 * zn ** 2) / math.sqrt(2 * math.pi)
    flat = np.abs(db) < 1e-10
    mass0 = float(np.sum(phi[flat]) * (zn[1] - zn[0]))
    ok = ~flat
    if ok.sum() < 2:
        return np.zeros_like(x), mass0
    bb, dens = b[ok], phi[ok] / np.abs(db[ok])
    order = np.argsort(bb)
    return np.interp(x, bb[order], dens[order], left=0.0, right=0.0), mass0


def _panel_grid(n: int):
    """A figure with ``n`` panels, up to three per row; returns the figure and its ``n`` axes in order."""
    # Imported here: matplotlib is needed only for plots, and the Agg canvas draws without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, cols, k + 1) for k in range(n)]


PLOT_FILES = ("densities.png", "forest.png", "individual.png")


def refuse_to_overwrite(out: Path, names, overwrite: bool) -> None:
    """Raise FileExistsError if any of ``out/names`` exists and ``overwrite`` is False (names them all)."""
    if overwrite:
        return
    present = [n for n in names if (out / n).exists()]
    if present:
        raise FileExistsError(f"{out} already holds {', '.join(present)}; pass overwrite=True (--overwrite on the "
                              "command line) to replace them, or choose another folder")


def plot_heterogeneity(res, out_dir, data: ChoiceData | None = None, n: int = 200, seed: int = 0,
                       level: float = 0.9, overwrite: bool = False) -> dict[str, Path]:
    """Write the heterogeneity plots as PNG files into ``out_dir`` and return their paths. Existing plots there
    are replaced only with ``overwrite=True``.

    - ``densities.png``: the implied density of every random coefficient (median over ``n`` parameter draws)
      with a pointwise ``level`` band (posterior draws, or the asymptotic normal for MSL);
    - ``forest.png``: forest plot of the population parameters (``az.plot_forest``, ``level`` intervals);
    - ``individual.png``: individual-level estimates (posterior means of each unit's coefficients; for MSL the
      conditional means of Revelt and Train, which need ``data``) against the population density.
    """
    import arviz as az
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spec = res.spec
    out = Path(out_dir)
    refuse_to_overwrite(out, PLOT_FILES, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    th = theta_draws(res, n, seed)
    center = res.theta if not _is_bayes(res) else th.mean(0)
    K = spec.n_random
    names = spec.random_names
    if K:
        fig, axes = _panel_grid(K)
        for k, (name, ax) in enumerate(zip(names, axes)):
            with torch.no_grad():
                q = _marginal_transform(spec, torch.as_tensor(center), k,
                                        torch.tensor([-3.0, 3.0], dtype=torch.float64)).numpy()
            lo, hi = float(q.min()), float(q.max())
            pad = 0.15 * (hi - lo if hi > lo else 1.0)
            x = np.linspace(lo - pad, hi + pad, 400)
            dens = np.stack([_density_on_grid(spec, t, k, x)[0] for t in th])
            band = np.quantile(dens, [(1 - level) / 2, 0.5, (1 + level) / 2], axis=0)
            ax.fill_between(x, band[0], band[2], alpha=0.3, label=f"{level:.0%} band")
            ax.plot(x, band[1], label="median density")
            mass0 = _density_on_grid(spec, center, k, x)[1]
            title = f"{name} ({spec.random[name]})"
            if mass0 > 1e-3:
                title += f", P(beta=0)={mass0:.2f}"
            ax.set_title(title, fontsize=10)
            ax.axvline(0.0, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("coefficient")
            if k == 0:
                ax.legend(fontsize=8)
        paths["densities"] = out / "densities.png"
        fig.savefig(paths["densities"], dpi=110)

    idata = to_arviz(res, data=None) if _is_bayes(res) else msl_to_arviz(res, data=None, n=max(n, 500), seed=seed)
    var_names = [v for v in res.param_names]
    fig = Figure(figsize=(6, 0.35 * len(var_names) + 1.5), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    az.plot_forest(idata, var_names=var_names, combined=True, hdi_prob=level, ax=ax)
    ax.set_title(f"population parameters ({level:.0%} intervals)")
    paths["forest"] = out / "forest.png"
    fig.savefig(paths["forest"], dpi=110)

    ind = None
    if K:
        if _is_bayes(res):
            try:
                ind = res.individual()
            except ValueError:
                ind = None
        elif data is not None:
            ind = res.individual(data)
    if ind is not None:
        fig, axes = _panel_grid(K)
        for k, (name, ax) in enumerate(zip(names, axes)):
            v = ind[name].to_numpy()
            ax.hist(v, bins=min(40, max(10, len(v) // 10)), density=True, alpha=0.5,
                    label="individual posterior means")
            with torch.no_grad():
                q = _marginal_transform(spec, torch.as_tensor(center), k,
                                        torch.tensor([-3.0, 3.0], dtype=torch.float64)).numpy()
            x = np.linspace(min(q.min(), v.min()), max(q.max(), v.max()), 400)
            ax.plot(x, _density_on_grid(spec, center, k, x)[0], label="population density")
            ax.set_title(name, fontsize=10)
            if k == 0:
                ax.legend(fontsize=8)
        paths["individual"] = out / "individual.png"
        fig.savefig(paths["individual"], dpi=110)
    return paths


# ---------------------------------------------------------------------------------------------- report
def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{v:.4g}"
    return str(v)


def markdown_table(df: pd.DataFrame) -> str:
    """A DataFrame as a GitHub-flavoured Markdown table (index as first column)."""
    head = [df.index.name or ""] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [_fmt(v) for v in row.to_numpy()]) + " |")
    return "\n".join(lines)


def heterogeneity_display(table: pd.DataFrame) -> pd.DataFrame:
    """The heterogeneity table with each statistic as ``estimate [lo, hi]`` text (for reports)."""
    out = pd.DataFrame({"distribution": table["distribution"]}, index=table.index)
    for s in STATS:
        out[s] = [f"{v:.4g} [{a:.4g}, {b:.4g}]" for v, a, b in zip(table[s], table[f"{s}.lo"], table[f"{s}.hi"])]
    return out


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


def write_report(res, out_dir, data: ChoiceData | None = None, fmt: str = "md", level: float = 0.9,
                 overwrite: bool = False) -> Path:
    """Write the plots and ``report.md`` (or ``report.html``) with the summary, heterogeneity and (with data)
    leave-one-out tables into ``out_dir``; return the report's path. Existing report files there are replaced
    only with ``overwrite=True``."""
    if fmt not in ("md", "html"):
        raise ValueError(f"unknown report format {fmt!r}; accepted: md, html")
    out = Path(out_dir)
    refuse_to_overwrite(out, (f"report.{fmt}", *PLOT_FILES), overwrite)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_heterogeneity(res, out, data=data, level=level, overwrite=True)
    title = f"mixlogit report: {res.settings.get('method', 'msl').upper()}"
    het = heterogeneity(res, level=level) if res.spec.n_random else None
    loo = None
    if data is not None:
        idata = to_arviz(res, data=data) if _is_bayes(res) else msl_to_arviz(res, data=data)
        loo = loo_table(idata)
    if fmt == "md":
        parts = [f"# {title}", "", "## Summary", "", "```", res.summary(), "```", ""]
        if het is not None:
            parts += ["## Heterogeneity", "", f"Intervals: {het.attrs['interval']}.", "",
                      markdown_table(heterogeneity_display(het)), ""]
        if loo is not None:
            parts += ["## Leave-one-out cross-validation (az.loo)", "", markdown_table(loo[0]), "",
                      markdown_table(loo[1]), ""]
        parts += ["## Plots", ""] + [f"![{k}]({p.name})" for k, p in plots.items()] + [""]
        path = out / "report.md"
    else:
        import html

        parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>",
                 f"<h1>{html.escape(title)}</h1>", "<h2>Summary</h2>", f"<pre>{html.escape(res.summary())}</pre>"]
        if het is not None:
            parts += ["<h2>Heterogeneity</h2>", f"<p>Intervals: {html.escape(het.attrs['interval'])}.</p>",
                      heterogeneity_display(het).to_html()]
        if loo is not None:
            parts += ["<h2>Leave-one-out cross-validation (az.loo)</h2>", loo[0].to_html(), loo[1].to_html()]
        parts += ["<h2>Plots</h2>"] + [f"<p><img src='{p.name}' alt='{k}'></p>" for k, p in plots.items()]
        parts += ["</body></html>"]
        path = out / "report.html"
    path.write_text("\n".join(parts))
    return path
