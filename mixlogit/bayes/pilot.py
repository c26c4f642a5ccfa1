"""Starting values and coordinates from a pilot fit: the whitening of the population parameters and each
unit's Laplace approximation.

The pilot is an MNL fit refined by a short MSL fit (200 Halton draws, loose tolerance, at most 2000 units). The
population parameters ``v = [fixed, loc, log sd, correlations]`` are then whitened as ``v = center + W u``,
with ``W W'`` the (delta-method) inverse outer product of the pilot's per-unit scores, so that the posterior of
``u`` is close to N(0, I). Each unit then gets its Laplace approximation (mode ``a_n``, covariance ``V_n``, and
the slope ``B_n = dz_n*/du`` of the mode in the globals, by the implicit function theorem), which the guides
(:mod:`mixlogit.bayes.guides`) and NUTS's coordinates (:mod:`mixlogit.bayes.nuts`) start from.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..budget import chunk_size
from ..data import ChoiceData
from ..draws import IntegrationRule, make_rule
from ..msl import MSLProblem, maximize
from .model import HierarchicalMixedLogit

#: Starting values: ``"msl"`` (an MNL fit refined by a pilot MSL fit) or ``"mnl"`` (the MNL fit alone).
INITS = ("msl", "mnl")


@dataclass
class Init:
    """Starting values: natural global values, the initial sds of the global guide (whitened scale), and each
    unit's Laplace approximation of p(z_n | y_n, globals): mode ``a`` (N, K) and
    covariance ``V`` (N, K, K), and the slope of the mode in the standardized globals ``B`` (N, K, D)."""

    globals: dict[str, torch.Tensor]
    u_scale: torch.Tensor | None = None
    a: torch.Tensor | None = None
    V: torch.Tensor | None = None
    B: torch.Tensor | None = None
    pilot_loglik: float | None = None
    pilot_units: int = 0

    def sites(self, hm: HierarchicalMixedLogit) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian likelihood sites (eta, R) on the linear predictor that reproduce the Laplace approximations
        under the starting globals (see :func:`mixlogit.bayes.guides.site_posterior`)."""
        mu, C = self.globals["loc"], hm.scale_matrix(self.globals)
        P = torch.linalg.inv(self.V)
        P = 0.5 * (P + P.transpose(-1, -2))
        evals, Q = torch.linalg.eigh(P - torch.eye(hm.K, dtype=P.dtype))
        Ct_inv = torch.linalg.inv(C).transpose(-1, -2)
        # P - I = C' H C  =>  H = C^-T (P - I) C^-1 = R R' with R = C^-T Q sqrt(max(evals, 0))
        R = Ct_inv @ (Q * evals.clamp_min(0).sqrt().unsqueeze(-2))
        H = R @ R.transpose(-1, -2)
        # mean = P^-1 C' (eta - H mu)  =>  eta = H mu + C^-T P a
        eta = (H @ mu.unsqueeze(-1)).squeeze(-1) + (Ct_inv @ (P @ self.a.unsqueeze(-1))).squeeze(-1)
        return eta, R


def initialize(model, data: ChoiceData, hm: HierarchicalMixedLogit, *, how: str, seed: int, init_draws: int,
               init_units: int, slopes: bool = True) -> Init:
    """Starting values, and the preconditioner it sets on ``hm``.

    An MNL fit (``how="mnl"``), refined by a pilot MSL fit with ``init_draws`` Halton draws and a loose
    tolerance on at most ``init_units`` units (``how="msl"``). Standard errors from the outer product of the
    pilot's per-unit scores (scaled to all N units) standardize the global sites. Then each unit's Laplace
    approximation of ``p(z_n | y_n, globals)`` (see :func:`unit_laplace`).
    """
    spec, design = hm.spec, hm.design
    theta = np.asarray(model.start_values(data, spec), dtype=float)
    if hm.K and how == "mnl":
        theta[spec.slices()["spread"]] = np.maximum(0.1, 0.25 * np.abs(theta[spec.slices()["loc"]]))
    rng = np.random.default_rng(seed)
    n = design.n_units
    units = np.sort(rng.choice(n, size=init_units, replace=False)) if n > init_units else np.arange(n)
    sub = design.subset(torch.as_tensor(units)) if n > init_units else design
    if hm.Kz:
        rule = make_rule("halton", len(units), init_draws, hm.Kz, seed=seed)
    else:
        rule = IntegrationRule(z=torch.zeros(1, 1, 0, dtype=torch.float64),
                               log_weights=torch.zeros(1, dtype=torch.float64), kind="none")
    problem = MSLProblem(spec, sub, rule)
    pilot_ll, n_pilot = None, 0
    if how == "msl" and hm.Kz:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt = maximize(problem, theta, maxiter=200, gtol=1e-2)
        if np.all(np.isfinite(opt.theta)) and math.isfinite(opt.loglik):
            theta, pilot_ll, n_pilot = opt.theta, opt.loglik, len(units)
    if hm.K:
        # sd = 0 is a stationary point of every mixed logit likelihood, and a pilot with few draws can stop
        # near it. Start spreads at least at a tenth of the location's size (or 0.05); the optimizer shrinks a
        # spread that is truly small.
        sp, lc = spec.slices()["spread"], spec.slices()["loc"]
        theta[sp] = np.sign(theta[sp] + 1e-300) * np.maximum(np.abs(theta[sp]),
                                                              0.1 * np.maximum(np.abs(theta[lc]), 0.5))
    g = hm.globals_from_theta(theta)
    center, W = _whitening(hm, problem, theta, g, scale_to=len(units) / n)
    hm.set_preconditioner(center, W)
    init = Init(globals=g, u_scale=torch.full((hm.dim,), 0.7, dtype=torch.float64), pilot_loglik=pilot_ll,
                pilot_units=n_pilot)
    if hm.Kz:
        init.a, init.V, init.B = unit_laplace(hm, g, slopes=slopes)
    return init


def _whitening(hm: HierarchicalMixedLogit, problem: MSLProblem, theta: np.ndarray, g, scale_to: float):
    """Center and whitening matrix of the global site from a pilot: the covariance of
    ``v = [fixed, loc, log sd, corr]`` by the delta method from the inverse outer product of the pilot's
    per-unit scores (scaled by ``scale_to`` = pilot units / all units), its sds clamped to sane ranges;
    correlated coefficients' log-sds and the correlations get independent sds of 0.1."""
    spec, Kf, K = hm.spec, hm.Kf, hm.K
    center = hm.raw(g)
    D = hm.dim
    scores = problem.scores(theta)
    bhhh = scores.T @ scores
    try:
        cov_t = np.linalg.inv(bhhh + 1e-8 * max(np.trace(bhhh) / len(bhhh), 1e-12) * np.eye(len(bhhh))) * scale_to
        if not np.all(np.isfinite(cov_t)):
            raise np.linalg.LinAlgError("non-finite")
    except np.linalg.LinAlgError:
        cov_t = np.diag(np.full(len(theta), 1e-2))
    sl = spec.slices()
    # Rows of theta behind v's first Kf + 2K entries, and d v / d theta on them.
    rows = list(range(sl["fixed"].start, sl["fixed"].stop)) + list(range(sl["loc"].start, sl["loc"].stop)) + \
        list(range(sl["spread"].start, sl["spread"].stop)) + list(range(sl["scale"].start, sl["scale"].stop))
    # Their places in v: the first Kf + 2K entries, and log tau (a random scale) last.
    places = list(range(Kf + 2 * K)) + list(range(D - hm.n_scale, D))
    jac = np.ones(len(rows))
    if K:
        sp = theta[sl["spread"]]
        jac[Kf + K:Kf + 2 * K] = 1.0 / np.where(sp == 0, 1.0, sp)  # d log|s| / ds
    if hm.n_scale:
        jac[-1] = 1.0 / max(abs(float(theta[sl["scale"]][0])), 1e-3)  # d log tau / d tau
    cov = np.zeros((D, D))
    block = cov_t[np.ix_(rows, rows)] * np.outer(jac, jac)
    sd = np.sqrt(np.clip(np.diag(block), 0, None))
    lo = np.concatenate([np.full(Kf + K, 1e-4), np.full(K + hm.n_scale, 0.02)])
    hi = np.concatenate([np.full(Kf + K, 10.0), np.full(K + hm.n_scale, 1.0)])
    sd_c = np.clip(np.where(np.isfinite(sd) & (sd > 0), sd, hi), lo, hi)
    corr = block / np.outer(np.where(sd > 0, sd, 1.0), np.where(sd > 0, sd, 1.0))
    corr = 0.9 * np.nan_to_num(corr) + 0.1 * np.eye(len(rows))  # shrink: a preconditioner, not an estimate
    np.fill_diagonal(corr, 1.0)
    cov[np.ix_(places, places)] = corr * np.outer(sd_c, sd_c)
    for k in spec.corr_index:  # log marginal sds of correlated coefficients: no usable pilot covariance
        i = Kf + K + k
        cov[i, :], cov[:, i] = 0.0, 0.0
        cov[i, i] = 0.01
    for i in range(Kf + 2 * K, D - hm.n_scale):  # the correlations
        cov[i, i] = 0.01
    try:
        W = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        W = np.diag(np.sqrt(np.diag(cov)))
    return center, torch.as_tensor(W, dtype=torch.float64)


def unit_laplace(hm: HierarchicalMixedLogit, g: dict[str, torch.Tensor], iters: int = 10, slopes: bool = False):
    """Laplace approximation of every unit's posterior of ``z_n`` given the natural globals ``g``.

    Damped Newton on ``f_n(z) = log p(y_n | z, g) - |z|^2 / 2`` per unit: units are independent, so one
    backward pass gives every unit's gradient and K more give the K x K Hessians. Returns the modes (N, K),
    covariances ``(-Hessian)^-1`` (N, K, K) (the Hessian's eigenvalues kept >= 1, the prior's curvature:
    non-normal families can make the log-likelihood locally convex) and, with ``slopes``, the slopes of the modes
    in the standardized globals u, ``dz_n/du = V d(grad_z f_n)/du`` (N, K, D) by the implicit function theorem.
    """
    design, K = hm.design, hm.Kz
    u0 = hm.standardized(g).detach()
    with torch.no_grad():
        theta = hm.theta(g)
    size = chunk_size(design.x_rand_diff.shape[1] * max(1, design.x_rand_diff.shape[2]) * max(1, K))
    As, Vs, Bs = [], [], []

    def neg_hessian_and_grad(z, c):
        z = z.detach().requires_grad_(True)
        val = hm.loglik(theta, z, c) - 0.5 * (z * z).sum(-1)
        grad = torch.autograd.grad(val.sum(), z, create_graph=True)[0]
        H = torch.stack([torch.autograd.grad(grad[:, k].sum(), z, retain_graph=k < K - 1)[0] for k in range(K)], -1)
        negH = -0.5 * (H + H.transpose(-1, -2))
        evals, evecs = torch.linalg.eigh(negH)
        negH = evecs @ torch.diag_embed(evals.clamp_min(1.0)) @ evecs.transpose(-1, -2)
        return negH.detach(), grad.detach()

    for s in range(0, design.n_units, size):
        c = slice(s, min(s + size, design.n_units))
        z = torch.zeros(c.stop - c.start, K, dtype=theta.dtype)
        for _ in range(iters):
            negH, grad = neg_hessian_and_grad(z, c)
            step = torch.linalg.solve(negH, grad.unsqueeze(-1)).squeeze(-1)
            norm = step.norm(dim=-1, keepdim=True)
            z = z + step * (3.0 / norm.clamp_min(3.0))  # a trust region of radius 3 in z
        negH, _ = neg_hessian_and_grad(z, c)
        V = torch.linalg.inv(negH)
        V = 0.5 * (V + V.transpose(-1, -2))
        As.append(z)
        Vs.append(V)
        if slopes:
            # d(grad_z f)/du by the double-backward trick: one backward pass per coordinate of u.
            uu = u0.clone().requires_grad_(True)
            zz = z.detach().requires_grad_(True)
            val = hm.loglik(hm.theta(hm.natural(uu)), zz, c).sum()
            gz = torch.autograd.grad(val, zz, create_graph=True)[0]  # (n, K)
            v = torch.zeros_like(gz, requires_grad=True)
            r = torch.autograd.grad(gz, uu, grad_outputs=v, create_graph=True)[0]  # (D,) = sum v * dgz/du
            cross = torch.stack([torch.autograd.grad(r[d], v, retain_graph=d < len(r) - 1)[0]
                                 for d in range(len(r))], -1)  # (n, K, D)
            Bs.append(V @ cross.detach())
    return torch.cat(As), torch.cat(Vs), (torch.cat(Bs) if slopes else None)
