"""Bayesian mixed logit: variational inference (Pyro SVI) and NUTS, on the one kernel.

The hierarchical model, for units ``n`` (persons with a panel, else choice situations)::

    fixed coefficients b ~ priors["fixed" / name]          locations mu_k ~ priors["loc" / name]
    spreads s_k > 0      ~ priors["sd" / "sd.name"]        correlations Omega ~ LKJ(eta)  (correlated block)
    z_n ~ N(0, I_K)                                        (non-centered: one standard normal vector per unit)
    beta_n = Spec.coefficients(theta, z_n)                 (the same map MSL uses, every family)
    log p(y_n | beta_n, b) = kernel.conditional_loglik(...) (the same kernel MSL uses, R = 1)

so the likelihood is the kernel's, summed per unit inside ``pyro.plate("person", N, subsample_size=B)`` and
added with ``pyro.factor``: no second implementation of the logit probability.

``theta`` is laid out as in :class:`mixlogit.spec.Spec` (``[asc.*, fixed, locations, sd.*, chol.*]``), so the
posterior is reported under the MSL names. With correlated coefficients the covariance of the correlated block
is ``C C'`` with ``C = diag(s) chol(Omega)``; ``sd.x`` and ``chol.a.b`` report the entries of ``C`` (as MSL does)
and the priors on ``sd.x`` are priors on marginal standard deviations.

Coordinates. All population parameters form one sample site ``"globals"``, whitened with a pilot estimate:
``[fixed, loc, log sd, correlations] = center + W u``, with ``W W'`` the (delta-method) inverse outer product of
the pilot's per-unit scores, so that the posterior of ``u`` is close to N(0, I): one learning rate and NUTS's
diagonal mass matrix fit every parameter. The pilot is an MNL fit refined by a short MSL fit (200 Halton draws,
loose tolerance, at most 2000 units); each unit then gets its Laplace approximation (mode ``a_n``, covariance
``V_n``, and the slope ``B_n = dz_n*/du`` of the mode in the globals, by the implicit function theorem).

Guides (``guide=``), each with a full-covariance Gaussian per unit:

- ``"fullrank"`` (default): full-rank normal on ``u``; each unit
  ``q(z_n | u) = N(a_n + B_n (u - u_0), (I + C' R_n R_n' C)^-1)``: the mean moves with the population as the
  posterior mode does, the precision is a Gaussian likelihood site ``R_n R_n'`` on the linear predictor
  ``w = mu + C z`` combined with the prior, so it follows the population spread. A Gaussian posterior factorizes
  exactly this way, which keeps the uncertainty of the population parameters honest (the 90% intervals of the
  locations covered the truth in 87.5% of 120 cases on 60 simulated panels, ``benchmarks/bench_bayes.py
  --calibration``) and the optimization short.
- ``"meanfield"``: diagonal normal on ``u`` and free unit guides ``q(z_n) = N(a_n, L_n L_n')`` independent of the
  globals (mean-field across blocks). Fast, but it understates the uncertainty of the population parameters
  and can shrink spreads.
- ``"amortized"``: full-rank on ``u``; each unit's likelihood site comes from its Laplace site at the start
  corrected by a small network of per-unit summaries, so the learned parameters do not grow with N.

SVI minimizes the negative ELBO (``TraceMeanField_ELBO``: analytic KL terms for the units) with Adam, the
population parameters at 5 x ``learning_rate``, the learning rate decaying 0.7x per window of steps to a tenth;
it stops at the first window (after five) whose average ELBO does not beat the previous one by more than ``tol``
(relative) or twice the noise of the averages, and over which the window-averaged population parameters moved
less than 0.1 posterior sd. A NaN ELBO stops the run with the best parameters so far.
NUTS (Pyro) samples ``u`` and ``e_n`` with ``z_n = a_n + B_n (u - u_0) + chol(V_n) e_n`` (see
:class:`_LaplaceCoordinates`), chains one after the other, each after the first from a jittered start.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal
from pyro.infer.autoguide.initialization import init_to_value
from pyro.poutine.messenger import Messenger
from torch.distributions import biject_to, constraints

from .data import ChoiceData, Design, require_choice_data
from .draws import IntegrationRule, make_rule
from .kernel import conditional_loglik
from .msl import MSLProblem, maximize
from .priors import IndependentPriors, describe, lkj_distribution, resolve_priors
from .spec import Spec
from .validation import check_int, check_seed

GUIDES = ("meanfield", "fullrank", "amortized")
SVI_OPTIONS = ("steps", "guide", "subsample", "learning_rate", "seed", "priors", "progress", "init", "tol",
               "num_draws", "init_draws", "init_units", "window", "num_particles")
NUTS_OPTIONS = ("num_samples", "num_warmup", "chains", "seed", "priors", "progress", "init", "target_accept",
                "max_tree_depth", "init_draws", "init_units")
INITS = ("msl", "mnl")
#: Learning rate of the (standardized) population parameters relative to ``learning_rate``.
GLOBAL_LR_FACTOR = 5.0
#: Per-window decay of the learning rate, its floor (relative), and the fewest windows before stopping.
LR_DECAY, LR_FLOOR, MIN_WINDOWS = 0.7, 0.1, 5
#: Largest move of the window-averaged population parameters (whitened: posterior sds) that counts as converged.
MAX_DRIFT = 0.1
#: Largest number of elements of a temporary (units x draws x K x K) tensor when drawing from a guide.
CHUNK_ELEMENTS = 2**22


# ---------------------------------------------------------------------------------------------- distributions
class StdNormalVector(dist.TorchDistribution):
    """N(0, I_K) as a vector-valued distribution: the prior of every unit's ``z``."""

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, k: int, batch_shape=(), dtype=torch.float64):
        self.k, self._dtype = k, dtype
        super().__init__(torch.Size(batch_shape), torch.Size([k]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return StdNormalVector(self.k, batch_shape, self._dtype)

    def rsample(self, sample_shape=()):
        return torch.randn(self._extended_shape(sample_shape), dtype=self._dtype)

    def log_prob(self, value):
        return -0.5 * (value * value).sum(-1) - 0.5 * self.k * math.log(2 * math.pi)


class UnitGaussian(dist.TorchDistribution):
    """N(loc, Sigma) per unit: the guide of ``z_n``. loc (..., K) and either ``scale_tril`` (Sigma = L L') or
    ``precision_tril`` (Sigma^-1 = L L'), (..., K, K) lower triangular with a positive diagonal."""

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor | None = None,
                 precision_tril: torch.Tensor | None = None):
        if (scale_tril is None) == (precision_tril is None):
            raise ValueError("give exactly one of scale_tril, precision_tril")
        self.loc = loc
        self.scale_tril, self.precision_tril = scale_tril, precision_tril
        tril = scale_tril if scale_tril is not None else precision_tril
        batch = torch.broadcast_shapes(loc.shape[:-1], tril.shape[:-2])
        super().__init__(batch, loc.shape[-1:], validate_args=False)

    @property
    def _tril(self):
        return self.scale_tril if self.scale_tril is not None else self.precision_tril

    def expand(self, batch_shape, _instance=None):
        k = self.event_shape[0]
        loc = self.loc.expand(*batch_shape, k)
        tril = self._tril.expand(*batch_shape, k, k)
        if self.scale_tril is not None:
            return UnitGaussian(loc, scale_tril=tril)
        return UnitGaussian(loc, precision_tril=tril)

    def _whiten(self, x: torch.Tensor) -> torch.Tensor:
        """Sigma^-1/2-style whitening: L^-1 x (scale) or L' x (precision)."""
        tril = self._tril.expand(*x.shape, x.shape[-1])
        if self.scale_tril is not None:
            return torch.linalg.solve_triangular(tril, x.unsqueeze(-1), upper=False).squeeze(-1)
        return (tril.transpose(-1, -2) @ x.unsqueeze(-1)).squeeze(-1)

    def rsample(self, sample_shape=()):
        eps = torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype)
        tril = self._tril.expand(*eps.shape, eps.shape[-1])
        if self.scale_tril is not None:
            return self.loc + (tril @ eps.unsqueeze(-1)).squeeze(-1)
        return self.loc + torch.linalg.solve_triangular(tril.transpose(-1, -2), eps.unsqueeze(-1),
                                                        upper=True).squeeze(-1)

    def _log_det_scale(self) -> torch.Tensor:
        """log det Sigma^(1/2)."""
        ld = torch.log(torch.diagonal(self._tril, dim1=-2, dim2=-1)).sum(-1)
        return ld if self.scale_tril is not None else -ld

    def log_prob(self, value):
        w = self._whiten(value - self.loc)
        return -0.5 * (w * w).sum(-1) - self._log_det_scale() - 0.5 * value.shape[-1] * math.log(2 * math.pi)

    def trace_covariance(self) -> torch.Tensor:
        if self.scale_tril is not None:
            return (self.scale_tril * self.scale_tril).sum((-2, -1))
        k = self.event_shape[0]
        eye = torch.eye(k, dtype=self.loc.dtype).expand_as(self.precision_tril)
        inv = torch.linalg.solve_triangular(self.precision_tril, eye, upper=False)
        return (inv * inv).sum((-2, -1))


@torch.distributions.kl.register_kl(UnitGaussian, StdNormalVector)
def _kl_unit_gaussian_std_normal(q: UnitGaussian, p: StdNormalVector):
    # KL(N(m, Sigma) || N(0, I)) = (tr Sigma + m'm - K) / 2 - log det Sigma^(1/2)
    k = q.event_shape[0]
    return 0.5 * (q.trace_covariance() + (q.loc * q.loc).sum(-1) - k) - q._log_det_scale()


# ---------------------------------------------------------------------------------------------- the model
class GlobalPrior(dist.TorchDistribution):
    """The prior of all population parameters as one vector ``u`` (D,) on a whitened scale.

    ``v = center + W u`` holds ``[fixed (Kf), loc (K), log sd (K), corr (Kc (Kc - 1) / 2, unconstrained)]``;
    the density of ``u`` is the product of the parameters' priors times the Jacobian of ``u -> parameters``.
    ``W`` (lower triangular) whitens the posterior when it is the Cholesky factor of an estimate of the
    posterior covariance of ``v``: every direction the optimizer or sampler sees then has a posterior sd near one
    and no correlations, which is what Adam's and NUTS's diagonal preconditioning handle well.
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector

    def __init__(self, hm: HierarchicalMixedLogit, batch_shape=()):
        self.hm = hm
        super().__init__(torch.Size(batch_shape), torch.Size([hm.dim]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return GlobalPrior(self.hm, batch_shape)

    def log_prob(self, u):
        hm = self.hm
        v = hm.center + (hm.W @ u.unsqueeze(-1)).squeeze(-1)
        g = hm.split(v)
        lp = hm.log_det_W
        if hm.Kf:
            lp = lp + hm.prior_fixed.log_prob(g["fixed"])
        if hm.K:
            log_sd = v[..., hm.Kf + hm.K: hm.Kf + 2 * hm.K]
            lp = lp + hm.prior_loc.log_prob(g["loc"]) + hm.prior_sd.log_prob(g["sd"]) + log_sd.sum(-1)
        if hm.Kc:
            raw = v[..., hm.Kf + 2 * hm.K:]
            lp = lp + hm.prior_corr.log_prob(g["corr"]) + _CORR.log_abs_det_jacobian(raw, g["corr"])
        return lp

    def sample(self, sample_shape=()):
        hm = self.hm
        shape = tuple(sample_shape) + tuple(self.batch_shape)
        with torch.no_grad():
            g = {}
            if hm.Kf:
                g["fixed"] = hm.prior_fixed.sample(shape)
            if hm.K:
                g["loc"] = hm.prior_loc.sample(shape)
                g["sd"] = hm.prior_sd.sample(shape)
            if hm.Kc:
                g["corr"] = hm.prior_corr.sample(shape)
            return hm.standardized(g)


_CORR = biject_to(constraints.corr_cholesky)


class HierarchicalMixedLogit:
    """The Pyro model of a mixed logit on one data set (see the module docstring).

    One global sample site ``"globals"`` (D,): all population parameters on a whitened scale (see
    :class:`GlobalPrior` and :meth:`set_preconditioner`); :meth:`natural` turns it into a dict of natural values
    ``fixed`` (Kf,), ``loc`` (K,), ``sd`` (K,) and ``corr`` (Kc, Kc) (Cholesky factor of the correlation matrix
    of the correlated block). Local site ``"z"`` (N, K): each unit's standard normal vector, in the order of
    ``spec.random_names``.
    """

    def __init__(self, spec: Spec, design: Design, priors: dict | None = None, subsample: int | None = None):
        self.spec, self.design = spec, design
        self.priors = resolve_priors(spec, priors)
        self.n_units, self.K, self.Kf = design.n_units, spec.n_random, spec.n_fixed
        self.Kc = len(spec.corr_index)
        self.subsample = subsample
        d = design
        self._needs_avail = not bool((d.avail_diff | ~d.situation_mask.unsqueeze(-1)).all())
        self._unit_weighted = not bool((d.weights == 1).all())
        self.dim = self.Kf + 2 * self.K + self.Kc * (self.Kc - 1) // 2
        if self.Kf:
            self.prior_fixed = IndependentPriors([self.priors[n] for n in spec.fixed])
        if self.K:
            self.prior_loc = IndependentPriors([self.priors[n] for n in spec.random_names])
            self.prior_sd = IndependentPriors([self.priors[f"sd.{n}"] for n in spec.random_names])
        if self.Kc:
            self.prior_corr = lkj_distribution(self.priors["corr"], self.Kc)
        self.global_names = ["globals"]
        self._indep_mask = torch.ones(self.K, dtype=torch.float64)
        self._corr_idx = torch.as_tensor(spec.corr_index, dtype=torch.long)
        self._indep_mask[self._corr_idx] = 0.0
        self._corr_place = torch.zeros(self.Kc, self.Kc, self.K, self.K, dtype=torch.float64)
        for i, a in enumerate(spec.corr_index):
            for j, b in enumerate(spec.corr_index):
                self._corr_place[i, j, a, b] = 1.0
        self._chol_a = torch.as_tensor([a for a, _ in spec.chol_pairs], dtype=torch.long)
        self._chol_b = torch.as_tensor([b for _, b in spec.chol_pairs], dtype=torch.long)
        self.set_preconditioner(torch.zeros(self.dim, dtype=torch.float64), torch.eye(self.dim, dtype=torch.float64))

    def set_preconditioner(self, center: torch.Tensor, W: torch.Tensor):
        """Whitening of the global site: ``v = center + W u`` (see :class:`GlobalPrior`). The model, priors
        included, does not change; only the coordinates the optimizer and sampler work in do."""
        self.center = center.detach().clone()
        self.W = W.detach().clone()
        self.log_det_W = float(torch.log(torch.diagonal(self.W)).sum())
        self.prior_globals = GlobalPrior(self)

    # -------------------------------------------------------------- globals <-> theta
    def split(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Natural values from the raw vector v = [fixed, loc, log sd, corr unconstrained] (..., D)."""
        g, Kf, K = {}, self.Kf, self.K
        if Kf:
            g["fixed"] = v[..., :Kf]
        if K:
            g["loc"] = v[..., Kf:Kf + K]
            g["sd"] = torch.exp(v[..., Kf + K:Kf + 2 * K])
        if self.Kc:
            g["corr"] = _CORR(v[..., Kf + 2 * K:])
        return g

    def raw(self, g: dict[str, torch.Tensor]) -> torch.Tensor:
        """The raw vector v (..., D) of natural values (inverse of :meth:`split`)."""
        parts = []
        if self.Kf:
            parts.append(g["fixed"])
        if self.K:
            parts += [g["loc"], torch.log(g["sd"])]
        if self.Kc:
            parts.append(_CORR.inv(g["corr"]))
        return torch.cat(parts, -1)

    def natural(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Natural global values from the whitened site value u (..., D)."""
        return self.split(self.center + (self.W @ u.unsqueeze(-1)).squeeze(-1))

    def standardized(self, g: dict[str, torch.Tensor]) -> torch.Tensor:
        """The whitened site value u (..., D) of natural global values."""
        v = self.raw(g) - self.center
        return torch.linalg.solve_triangular(self.W, v.unsqueeze(-1), upper=False).squeeze(-1)

    def unpack(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Natural global values from a draw of the global guide's latent (the whitened u)."""
        return self.natural(u)

    def scale_matrix(self, g: dict[str, torch.Tensor]) -> torch.Tensor:
        """C (..., K, K) with ``w = loc + C z`` the linear predictor of the random coefficients (column order):
        ``diag(sd)`` for independent coefficients, the Cholesky factor ``diag(s) chol(Omega)`` on the correlated
        block."""
        C = torch.diag_embed(g["sd"] * self._indep_mask)
        if self.Kc:
            Cc = g["sd"][..., self._corr_idx].unsqueeze(-1) * g["corr"]
            C = C + torch.einsum("...ab,abkl->...kl", Cc, self._corr_place)
        return C

    def theta(self, g: dict[str, torch.Tensor]) -> torch.Tensor:
        """Spec-layout parameters (..., P) from natural global values (any leading batch shape)."""
        parts = []
        if self.Kf:
            parts.append(g["fixed"])
        if self.K:
            parts.append(g["loc"])
            spread = g["sd"]
            if self.Kc:
                Cc = g["sd"][..., self.spec.corr_index].unsqueeze(-1) * g["corr"]
                diag = torch.diagonal(Cc, dim1=-2, dim2=-1)
                idx = torch.as_tensor(self.spec.corr_index).expand(diag.shape)
                parts.append(spread.scatter(-1, idx, diag))
                parts.append(Cc[..., self._chol_a, self._chol_b])
            else:
                parts.append(spread)
        return torch.cat(parts, dim=-1)

    def globals_from_theta(self, theta: np.ndarray) -> dict[str, torch.Tensor]:
        """Natural global values from a Spec-layout vector (signs of spreads and Cholesky columns normalized)."""
        th = torch.as_tensor(np.asarray(theta, dtype=float), dtype=torch.float64)
        sl = self.spec.slices()
        g = {}
        if self.Kf:
            g["fixed"] = th[sl["fixed"]].clone()
        if self.K:
            g["loc"] = th[sl["loc"]].clone()
            sd = th[sl["spread"]].abs().clamp_min(0.05)
            if self.Kc:
                C = self.spec.cholesky(th)
                C = C * torch.where(torch.diagonal(C) < 0, -1.0, 1.0).unsqueeze(0)  # C diag(+-1) C' = C C'
                marginal = C.pow(2).sum(-1).sqrt().clamp_min(0.05)
                omega = (C @ C.T) / torch.outer(marginal, marginal)
                omega = 0.98 * omega + 0.02 * torch.eye(self.Kc, dtype=th.dtype)  # strictly inside the LKJ support
                corr = torch.linalg.cholesky(omega)
                sd = sd.clone()
                sd[self.spec.corr_index] = marginal
                g["corr"] = corr / corr.pow(2).sum(-1, keepdim=True).sqrt()
            g["sd"] = sd
        return g

    # -------------------------------------------------------------- likelihood
    def loglik(self, theta: torch.Tensor, z: torch.Tensor | None, index) -> torch.Tensor:
        """Weighted ``sum_t log L_nt(beta_n)`` per unit for units ``index`` (a slice or index tensor).

        theta : (P,) or (S, 1, P) (S particles); z : (B, K) or (S, B, K). Returns (B,) or (S, B).
        """
        d, spec = self.design, self.spec
        if theta.dim() > 1:
            return self._loglik_particles(theta, z, index)
        if self.K:
            beta = spec.coefficients(theta, z.unsqueeze(1))
        else:
            beta = theta.new_zeros(1, 1, 0)
        fixed = d.x_fixed_diff[index] @ spec.fixed_coefficients(theta) if self.Kf else None
        ll = conditional_loglik(
            d.x_rand_diff[index], beta, fixed_diff=fixed,
            avail=d.avail_diff[index] if self._needs_avail else None,
            situation_mask=d.situation_mask[index],
        )[:, 0]
        return ll * d.weights[index] if self._unit_weighted else ll

    def _loglik_particles(self, theta, z, index):
        # Several particles at once: each particle's coefficients are draws of one kernel call, with the fixed
        # coefficients stacked onto the random ones so that they too can differ across particles.
        d, spec = self.design, self.spec
        th = theta.reshape(-1, theta.shape[-1])  # (S, P)
        S = th.shape[0]
        n = d.x_rand_diff[index].shape[0]
        if self.K:
            beta = spec.coefficients(th, z.reshape(S, n, self.K)).transpose(0, 1)  # (n, S, K)
        else:
            beta = th.new_zeros(n, S, 0)
        if self.Kf:
            beta = torch.cat([beta, spec.fixed_coefficients(th).unsqueeze(0).expand(n, S, self.Kf)], -1)
        x = torch.cat([d.x_rand_diff[index], d.x_fixed_diff[index]], -1) if self.Kf else d.x_rand_diff[index]
        ll = conditional_loglik(x, beta, avail=d.avail_diff[index] if self._needs_avail else None,
                                situation_mask=d.situation_mask[index]).transpose(0, 1)  # (S, n)
        return ll * d.weights[index] if self._unit_weighted else ll

    def potential_energy(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Minus the log joint density of ``{"globals": u, "z": z}`` (all unconstrained), up to a constant: the
        density of :meth:`model` without subsampling, for NUTS."""
        u = params["globals"]
        z = params.get("z")
        theta = self.theta(self.natural(u))
        lp = self.prior_globals.log_prob(u) + self.loglik(theta, z, slice(None)).sum()
        if z is not None:
            lp = lp - 0.5 * (z * z).sum()
        return -lp

    def model(self):
        """The Pyro model (no arguments: the data are held by the object)."""
        u = pyro.sample("globals", self.prior_globals)
        theta = self.theta(self.natural(u))
        with pyro.plate("person", self.n_units, subsample_size=self.subsample) as idx:
            index = slice(None) if self.subsample is None else idx
            z = pyro.sample("z", StdNormalVector(self.K)) if self.K else None
            pyro.factor("loglik", self.loglik(theta, z, index))


# ---------------------------------------------------------------------------------------------- guides
def _softplus_inv(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def _tril_from_raw(raw: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Lower-triangular factor with a positive (softplus) diagonal from an unconstrained square matrix."""
    return torch.where(mask, raw, torch.zeros((), dtype=raw.dtype)) + torch.diag_embed(
        torch.nn.functional.softplus(torch.diagonal(raw, dim1=-2, dim2=-1)))


class FreeLocalGuide(torch.nn.Module):
    """Mean-field unit guides: ``q(z_n) = N(a_n, L_n L_n')`` with a full Cholesky factor per unit, independent
    of the population parameters."""

    def __init__(self, a0: torch.Tensor, V0: torch.Tensor):
        super().__init__()
        K = a0.shape[-1]
        L0 = torch.linalg.cholesky(V0)
        self.register_buffer("_tril", torch.tril(torch.ones(K, K, dtype=torch.bool), -1))
        self.a = torch.nn.Parameter(a0.clone())
        diag = torch.diagonal(L0, dim1=-2, dim2=-1).clamp_min(1e-6)
        self.L_raw = torch.nn.Parameter(torch.tril(L0, -1) + torch.diag_embed(_softplus_inv(diag)))

    def z_dist(self, mu, C, index, u=None) -> UnitGaussian:
        return UnitGaussian(self.a[index], scale_tril=_tril_from_raw(self.L_raw[index], self._tril))


def _site_posterior(mu: torch.Tensor, C: torch.Tensor, eta: torch.Tensor, R: torch.Tensor) -> UnitGaussian:
    """q(z_n) from a Gaussian likelihood site and the population: the exact posterior of ``z ~ N(0, I)`` under
    a pseudo-likelihood ``exp(eta' w - w' R R' w / 2)`` of the linear predictor ``w = mu + C z``.

    Precision ``I + C' R R' C``, mean ``precision^-1 C' (eta - R R' mu)``. mu (..., 1, K), C (..., 1, K, K) and
    eta (B, K), R (B, K, K) broadcast to (..., B, K[, K]).
    """
    CtR = C.transpose(-1, -2) @ R
    K = eta.shape[-1]
    P = torch.eye(K, dtype=eta.dtype) + CtR @ CtR.transpose(-1, -2)
    L = torch.linalg.cholesky(P)
    Rt_mu = (R.transpose(-1, -2) @ mu.unsqueeze(-1))  # (..., B, K, 1)
    lin = C.transpose(-1, -2) @ (eta.unsqueeze(-1) - R @ Rt_mu)
    mean = torch.cholesky_solve(lin, L).squeeze(-1)
    return UnitGaussian(mean, precision_tril=L)


class StructuredLocalGuide(torch.nn.Module):
    """Unit guides that move with the population parameters as the exact posterior does.

    ``q(z_n | u) = N(a_n + B_n (u - u_0), (I + C' R_n R_n' C)^-1)`` with ``u`` the population parameters on the
    guide's standardized scale and ``C`` the scale matrix of the random coefficients (``w = mu + C z``). The
    mean follows the slope ``B_n = d z_n* / d u`` of the unit's posterior mode (Laplace, at the start; fixed),
    the precision is that of a Gaussian likelihood site ``R_n R_n'`` on ``w`` combined with the N(0, I) prior,
    so it shrinks and grows with the population spread. For a Gaussian likelihood this family contains the exact
    joint posterior (which factorizes as q(u) prod_n q(z_n | u)): the optimizer needs no coordinated moves of
    thousands of unit parameters, and the uncertainty of the population parameters stays honest.
    """

    def __init__(self, a0: torch.Tensor, B0: torch.Tensor, R0: torch.Tensor, u0: torch.Tensor):
        super().__init__()
        self.register_buffer("u0", u0.clone())
        self.register_buffer("B", B0.clone())
        self.a = torch.nn.Parameter(a0.clone())
        self.R = torch.nn.Parameter(R0.clone())

    def z_dist(self, mu, C, index, u) -> UnitGaussian:
        a = self.a[index] + (self.B[index] @ (u - self.u0).unsqueeze(-1)).squeeze(-1)
        R = self.R[index]
        CtR = C.transpose(-1, -2) @ R
        P = torch.eye(a.shape[-1], dtype=a.dtype) + CtR @ CtR.transpose(-1, -2)
        return UnitGaussian(a, precision_tril=torch.linalg.cholesky(P))


class AmortizedGuide(torch.nn.Module):
    """Unit likelihood sites from a network of per-unit data summaries: the learned parameters do not grow
    with N (the starting sites are stored: K + K^2 numbers per unit).

    ``features`` (N, F): standardized summaries (:func:`unit_features`). The site of unit n is its Laplace site
    at the starting values (``base_eta``, ``base_R``, see :meth:`Init.sites`) corrected by a one-hidden-layer
    network of the features: ``eta = base_eta + scale * o_1``, ``R = base_R M`` with M lower triangular,
    ``exp(o_2 / 2)`` on the diagonal and ``o_3 / 10`` below. The last layer starts at zero (M = I).
    """

    def __init__(self, features: torch.Tensor, base_eta: torch.Tensor, base_R: torch.Tensor, hidden: int = 32):
        super().__init__()
        K = base_eta.shape[-1]
        self.register_buffer("features", features)
        self.register_buffer("base_eta", base_eta)
        self.register_buffer("base_R", base_R)
        self.register_buffer("scale", base_eta.abs().mean(0).clamp_min(1e-3))
        self.register_buffer("_tril", torch.tril(torch.ones(K, K, dtype=torch.bool), -1))
        self.K = K
        f = features.shape[-1]
        self.net = torch.nn.Sequential(torch.nn.Linear(f, hidden, dtype=features.dtype), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, K + K * K, dtype=features.dtype))
        torch.nn.init.zeros_(self.net[2].weight)
        torch.nn.init.zeros_(self.net[2].bias)

    def z_dist(self, mu, C, index, u=None) -> UnitGaussian:
        o = self.net(self.features[index])
        K = self.K
        eta = self.base_eta[index] + self.scale * o[..., :K]
        raw = o[..., K:].reshape(*o.shape[:-1], K, K)
        M = torch.where(self._tril, 0.1 * raw, torch.zeros((), dtype=raw.dtype)) + torch.diag_embed(
            torch.exp(0.5 * torch.diagonal(raw, dim1=-2, dim2=-1)))
        return _site_posterior(mu, C, eta, self.base_R[index] @ M)


def unit_features(base_eta: torch.Tensor, base_R: torch.Tensor, design: Design) -> torch.Tensor:
    """Per-unit summaries for the amortized guide, standardized over units: (N, 2K + 1).

    The one-step site (eta_n and the diagonal of R_n R_n') and log(number of situations).
    """
    info = (base_R * base_R).sum(-1)  # diag(R R')
    n_sit = design.situation_mask.sum(1, keepdim=True).clamp_min(1).to(base_eta.dtype)
    f = torch.cat([base_eta, torch.log1p(info), torch.log(n_sit)], dim=-1)
    sd = f.std(0, keepdim=True)
    return (f - f.mean(0, keepdim=True)) / torch.where(sd > 0, sd, torch.ones_like(sd))


class Guide(torch.nn.Module):
    """Globals by a Pyro autoguide (diagonal or full-rank normal on the standardized unconstrained scale),
    units by a :class:`FreeLocalGuide` (meanfield), :class:`StructuredLocalGuide` (fullrank) or
    :class:`AmortizedGuide`."""

    def __init__(self, hm: HierarchicalMixedLogit, kind: str, init: Init):
        super().__init__()
        self.hm, self.kind = hm, kind
        auto = AutoDiagonalNormal if kind == "meanfield" else AutoMultivariateNormal
        u0 = hm.standardized(init.globals)
        self.globals = auto(poutine.block(hm.model, expose=hm.global_names),
                            init_loc_fn=init_to_value(values={"globals": u0}), init_scale=0.1)
        self.local = None
        if hm.K:
            if kind == "meanfield":
                self.local = FreeLocalGuide(init.a, init.V)
            else:
                eta, R = init.sites(hm)
                if kind == "amortized":
                    self.local = AmortizedGuide(unit_features(eta, R, hm.design), eta, R)
                else:
                    self.local = StructuredLocalGuide(init.a, init.B, R, u0)

    def set_initial_scales(self, se: torch.Tensor):
        """Initial sds of the global guide on the unconstrained scale (one value per coordinate)."""
        from pyro.nn import PyroParam

        self.globals.scale = PyroParam(se.clone(), dist.constraints.softplus_positive)

    def z_dist(self, g: dict[str, torch.Tensor], index, draws: bool = False, u: torch.Tensor | None = None
               ) -> UnitGaussian:
        """q(z_n | globals) for units ``index``; ``g`` natural globals (and ``u``, their whitened site value, if
        at hand), with a leading dim of draws when ``draws`` (then the result has batch shape (n, B))."""
        mu, C = g["loc"], self.hm.scale_matrix(g)
        if u is None and isinstance(self.local, StructuredLocalGuide):
            u = self.hm.standardized(g)
        if draws:
            mu, C = mu.unsqueeze(-2), C.unsqueeze(-3)
            u = None if u is None else u.unsqueeze(-2)
        return self.local.z_dist(mu, C, index, u)

    def forward(self):
        hm = self.hm
        u = self.globals()["globals"]
        g = hm.natural(u)
        with pyro.plate("person", hm.n_units, subsample_size=hm.subsample) as idx:
            if hm.K:
                index = slice(None) if hm.subsample is None else idx
                pyro.sample("z", self.z_dist(g, index, u=u))
        return g

    def sample_globals(self, n: int) -> dict[str, torch.Tensor]:
        """n draws of the natural globals from the guide (leading dim n)."""
        with torch.no_grad():
            return self.hm.unpack(self.globals.get_posterior().sample((n,)))

    def sample_z(self, g: dict[str, torch.Tensor], index) -> torch.Tensor:
        """Draws of z (n, B, K) for units ``index`` given n global draws ``g``."""
        with torch.no_grad():
            q = self.z_dist(g, index, draws=True)
            n = g["loc"].shape[0]
            return q.expand(torch.Size([n, *q.batch_shape[-1:]])).rsample()


# ---------------------------------------------------------------------------------------------- initialization
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
        under the starting globals (see :func:`_site_posterior`)."""
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
    approximation of ``p(z_n | y_n, globals)`` (see :func:`_unit_laplace`).
    """
    spec, design = hm.spec, hm.design
    theta = np.asarray(model.start_values(data, spec), dtype=float)
    if hm.K and how == "mnl":
        theta[spec.slices()["spread"]] = np.maximum(0.1, 0.25 * np.abs(theta[spec.slices()["loc"]]))
    rng = np.random.default_rng(seed)
    n = design.n_units
    units = np.sort(rng.choice(n, size=init_units, replace=False)) if n > init_units else np.arange(n)
    sub = design.subset(torch.as_tensor(units)) if n > init_units else design
    if hm.K:
        rule = make_rule("halton", len(units), init_draws, hm.K, seed=seed)
    else:
        rule = IntegrationRule(z=torch.zeros(1, 1, 0, dtype=torch.float64),
                               log_weights=torch.zeros(1, dtype=torch.float64), kind="none")
    problem = MSLProblem(spec, sub, rule)
    pilot_ll, n_pilot = None, 0
    if how == "msl" and hm.K:
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
    if hm.K:
        init.a, init.V, init.B = _unit_laplace(hm, g, slopes=slopes)
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
        list(range(sl["spread"].start, sl["spread"].stop))
    jac = np.ones(len(rows))
    if K:
        sp = theta[sl["spread"]]
        jac[Kf + K:] = 1.0 / np.where(sp == 0, 1.0, sp)  # d log|s| / ds
    cov = np.zeros((D, D))
    n = len(rows)
    cov[:n, :n] = cov_t[np.ix_(rows, rows)] * np.outer(jac, jac)
    sd = np.sqrt(np.clip(np.diag(cov[:n, :n]), 0, None))
    lo = np.concatenate([np.full(Kf + K, 1e-4), np.full(K, 0.02)])
    hi = np.concatenate([np.full(Kf + K, 10.0), np.full(K, 1.0)])
    sd_c = np.clip(np.where(np.isfinite(sd) & (sd > 0), sd, hi), lo, hi)
    corr = cov[:n, :n] / np.outer(np.where(sd > 0, sd, 1.0), np.where(sd > 0, sd, 1.0))
    corr = 0.9 * np.nan_to_num(corr) + 0.1 * np.eye(n)  # shrink: a preconditioner, not an estimate
    np.fill_diagonal(corr, 1.0)
    cov[:n, :n] = corr * np.outer(sd_c, sd_c)
    for k in spec.corr_index:  # log marginal sds of correlated coefficients: no usable pilot covariance
        i = Kf + K + k
        cov[i, :], cov[:, i] = 0.0, 0.0
        cov[i, i] = 0.01
    for i in range(Kf + 2 * K, D):
        cov[i, i] = 0.01
    try:
        W = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        W = np.diag(np.sqrt(np.diag(cov)))
    return center, torch.as_tensor(W, dtype=torch.float64)


def _unit_laplace(hm: HierarchicalMixedLogit, g: dict[str, torch.Tensor], iters: int = 10, slopes: bool = False):
    """Laplace approximation of every unit's posterior of ``z_n`` given the natural globals ``g``.

    Damped Newton on ``f_n(z) = log p(y_n | z, g) - |z|^2 / 2`` per unit: units are independent, so one
    backward pass gives every unit's gradient and K more give the K x K Hessians. Returns the modes (N, K),
    covariances ``(-Hessian)^-1`` (N, K, K) (the Hessian's eigenvalues kept >= 1, the prior's curvature:
    non-normal families can make the log-likelihood locally convex) and, with ``slopes``, the slopes of the modes
    in the standardized globals u, ``dz_n/du = V d(grad_z f_n)/du`` (N, K, D) by the implicit function theorem.
    """
    design, K = hm.design, hm.K
    u0 = hm.standardized(g).detach()
    with torch.no_grad():
        theta = hm.theta(g)
    per_unit = design.x_rand_diff.shape[1] * max(1, design.x_rand_diff.shape[2]) * max(1, K)
    size = max(1, 2**20 // max(1, per_unit))
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


# ---------------------------------------------------------------------------------------------- validation
def _check_common(kwargs, allowed, method):
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"unknown argument {unknown[0]!r} for method={method!r}; accepted: {', '.join(allowed)}")
    init = kwargs.get("init", "msl")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; accepted: {', '.join(INITS)}")
    check_seed(kwargs.get("seed", 0))
    priors = kwargs.get("priors")
    if priors is not None and not isinstance(priors, dict):
        raise TypeError(f"priors must be a dict mapping parameter names or groups to priors, got {priors!r}")


# ---------------------------------------------------------------------------------------------- fitting
def fit(model, data: ChoiceData, method: str = "svi", **kwargs):
    """Bayesian estimation of ``model`` on ``data``; called by ``MixedLogit.fit(data, method="svi" | "nuts")``.

    SVI keywords: ``steps=3000`` (most steps; it usually stops after 500 to 1000), ``guide="fullrank"``
    ("meanfield", "fullrank" or "amortized", see the module docstring), ``subsample=None`` (units per step:
    minibatch SVI, ``pyro.plate("person", N, subsample_size=subsample)``), ``learning_rate=0.01`` (Adam; the
    standardized population parameters take 5x), ``seed=0``, ``priors=None`` (see :mod:`mixlogit.priors`),
    ``progress=False``, ``init="msl"`` (pilot MSL start) or ``"mnl"``, ``tol=1e-4`` (relative change of the
    windowed ELBO that counts as converged), ``window=None`` (steps per ELBO window, default
    ``clip(steps // 60, 50, 100)``, fewer when ``steps`` is small), ``num_draws=4000`` (posterior draws kept),
    ``init_draws=200``, ``init_units=2000`` (draws and units of the pilot fit), ``num_particles=1`` (ELBO particles per step,
    vectorized).

    NUTS keywords: ``num_samples=1000``, ``num_warmup=1000``, ``chains=2``, ``seed=0``, ``priors=None``,
    ``progress=False``, ``init="msl"``, ``target_accept=0.8``, ``max_tree_depth=10``.

    Returns a :class:`mixlogit.bayes_results.BayesResults`.
    """
    if method == "svi":
        _check_common(kwargs, SVI_OPTIONS, method)
        return _fit_svi(model, data, **kwargs)
    if method == "nuts":
        _check_common(kwargs, NUTS_OPTIONS, method)
        return _fit_nuts(model, data, **kwargs)
    raise ValueError(f"unknown Bayesian method {method!r}; accepted: svi, nuts")


def _prepare(model, data, priors, subsample=None):
    require_choice_data(data)
    spec = model.spec_for(data)
    design = data.design(spec.random_names, spec.fixed)
    return HierarchicalMixedLogit(spec, design, priors, subsample=subsample)


class _SnapshotState:
    """Best parameters so far (by windowed ELBO), to return them if the run breaks down."""

    def __init__(self, module):
        self.module = module
        self.state = copy.deepcopy(module.state_dict())
        self.step = 0
        self.elbo = -math.inf

    def save(self, step, elbo):
        self.state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.step, self.elbo = step, elbo

    def restore(self):
        self.module.load_state_dict(self.state)


def _fit_svi(model, data, steps=3000, guide="fullrank", subsample=None, learning_rate=0.01, seed=0, priors=None,
             progress=False, init="msl", tol=1e-4, window=None, num_draws=4000, init_draws=200, init_units=2000,
             num_particles=1):
    t0 = time.perf_counter()
    steps = check_int("steps", steps)
    if guide not in GUIDES:
        raise ValueError(f"unknown guide {guide!r}; accepted: {', '.join(GUIDES)}")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not (
            math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive finite number, got {learning_rate!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    num_draws = check_int("num_draws", num_draws, 2)
    num_particles = check_int("num_particles", num_particles)
    init_draws = check_int("init_draws", init_draws)
    init_units = check_int("init_units", init_units)
    n_units = data.n_units if isinstance(data, ChoiceData) else 0
    if subsample is not None:
        subsample = check_int("subsample", subsample)
        if subsample > n_units:
            raise ValueError(f"subsample={subsample} exceeds the number of units ({n_units}); use subsample=None "
                             "for full-batch SVI")
        if subsample == n_units:
            subsample = None
    if window is None:  # at least MIN_WINDOWS windows fit into the step budget
        window = max(10, min(int(np.clip(steps // 60, 50, 100)), steps // MIN_WINDOWS))
    window = check_int("window", window)

    hm = _prepare(model, data, priors, subsample)
    with pyro.settings.context(module_local_params=True), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        start = initialize(model, data, hm, how=init, seed=int(seed), init_draws=init_draws, init_units=init_units)
        g = Guide(hm, guide, start)
        # Several particles are drawn in one vectorized pass (the kernel takes them as draws).
        elbo_fn = TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                                      max_plate_nesting=1)
        with warnings.catch_warnings(), pyro.validation_enabled(False):
            warnings.filterwarnings("ignore", message=".*mean field.*")
            g()  # builds the autoguide's parameters
            g.set_initial_scales(start.u_scale)
            params = [p for p in g.parameters() if p.requires_grad]
            global_params = [p for p in g.globals.parameters() if p.requires_grad]
            ids = {id(p) for p in global_params}
            local_params = [p for p in params if id(p) not in ids]
            # The population parameters are standardized (posterior sd about one): they take larger steps.
            groups = [{"params": global_params, "base_lr": GLOBAL_LR_FACTOR * learning_rate}]
            if local_params:
                groups.append({"params": local_params, "base_lr": learning_rate})
            opt = torch.optim.Adam([{**gr, "lr": gr["base_lr"]} for gr in groups])
            trace, best = [], _SnapshotState(g)
            converged, message, windows, centers = False, "", [], []
            center_sum = torch.zeros(hm.dim, dtype=torch.float64)
            bar = _progress(progress, steps)
            for step in range(1, steps + 1):
                opt.zero_grad(set_to_none=True)
                loss = elbo_fn.differentiable_loss(hm.model, g)
                value = float(loss.detach())
                if not math.isfinite(value):
                    best.restore()
                    message = (f"ELBO is NaN/infinite at step {step}; stopped and kept the best parameters so far "
                               f"(step {best.step}). Try a smaller learning_rate (e.g. {learning_rate / 10:g}).")
                    warnings.warn(message, RuntimeWarning, stacklevel=3)
                    break
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 100.0 * math.sqrt(len(params)))
                opt.step()
                trace.append(-value)
                center_sum += g.globals.loc.detach()
                if bar:
                    bar.update(1)
                if step % window:
                    continue
                mean = float(np.mean(trace[-window:]))
                windows.append(mean)
                centers.append(center_sum / window)
                center_sum = torch.zeros_like(center_sum)
                if bar:
                    bar.set_postfix(elbo=f"{mean:.1f}")
                if mean > best.elbo:
                    best.save(step, mean)
                # Learning rate: 0.7x per window down to a tenth; converged at the first plateau after that.
                decay = max(LR_FLOOR, LR_DECAY ** len(windows))
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * decay
                # Converged: the windowed ELBO stopped improving and the population parameters stopped moving
                # (their window averages, on the whitened scale where a posterior sd is about one).
                drift = float((centers[-1] - centers[-2]).abs().max()) if len(centers) > 1 else math.inf
                if len(windows) >= MIN_WINDOWS and drift < MAX_DRIFT and _plateau(windows, trace, window, tol):
                    converged = True
                    message = (f"converged after {step} steps (windowed ELBO: no improvement beyond {tol:g} "
                               f"relative or its noise; population parameters moved < {MAX_DRIFT} posterior sd)")
                    break
            if bar:
                bar.close()
            if not message:
                message = f"ELBO still improving after {steps} steps"
                warnings.warn(f"SVI did not converge: {message}; increase steps", RuntimeWarning, stacklevel=3)
        from .bayes_results import BayesResults, SVISampler

        sampler = SVISampler(g)
        draws = sampler.draw_theta(num_draws, seed=int(seed) + 1)
        ind_mean, ind_sd = sampler.individual_moments(n=200, seed=int(seed) + 2)
    settings = {"method": "svi", "steps": steps, "guide": guide, "subsample": subsample,
                "learning_rate": learning_rate, "seed": int(seed), "init": init, "tol": tol, "window": window,
                "num_draws": num_draws, "init_draws": init_draws, "init_units": init_units,
                "num_particles": num_particles, "steps_run": len(trace)}
    return BayesResults(
        method="svi", model_args=_model_args(model), spec=hm.spec, draws=draws[None], individual_mean=ind_mean,
        individual_sd=ind_sd, unit_labels=list(data.unit_labels), elbo=np.asarray(trace), sample_stats={},
        converged=converged, message=message, n_iter=len(trace), settings=settings, priors=describe(hm.priors),
        fit_time=time.perf_counter() - t0, n_obs=data.n_situations, n_units=data.n_units, sampler=sampler,
        data=data,
    )


def _plateau(windows, trace, window, tol) -> bool:
    """True when the last window's mean ELBO is not better than the previous one by more than ``tol`` (relative)
    or by more than twice the standard error of the difference (the noise of the estimate)."""
    prev, cur = windows[-2], windows[-1]
    a, b = np.asarray(trace[-2 * window:-window]), np.asarray(trace[-window:])
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return (cur - prev) < max(tol * abs(cur), 2.0 * se)


def _progress(enabled, total):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="SVI", unit="step", leave=False)


def _model_args(model) -> dict:
    base = model.base_alt
    if isinstance(base, np.integer):
        base = int(base)
    return {"random": dict(model.random), "fixed": list(model.fixed), "asc": bool(model.asc), "base_alt": base,
            "correlated": list(model.correlated)}


# ---------------------------------------------------------------------------------------------- NUTS
class _DepthCounter(Messenger):
    """Counts the tree doublings of one NUTS iteration (Pyro samples one direction per doubling)."""

    def __init__(self):
        super().__init__()
        self.depth = 0

    def _pyro_sample(self, msg):
        if msg["name"].startswith("direction_t="):
            self.depth += 1


class _NUTS(pyro.infer.NUTS):
    """Pyro's NUTS, recording the tree depth of every iteration."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tree_depths: list[int] = []

    def sample(self, params):
        counter = _DepthCounter()
        with counter:
            out = super().sample(params)
        self.tree_depths.append(counter.depth)
        return out


def _fit_nuts(model, data, num_samples=1000, num_warmup=1000, chains=2, seed=0, priors=None, progress=False,
              init="msl", target_accept=0.8, max_tree_depth=10, init_draws=200, init_units=2000):
    from pyro.infer import MCMC

    t0 = time.perf_counter()
    num_samples = check_int("num_samples", num_samples)
    num_warmup = check_int("num_warmup", num_warmup, 0)
    chains = check_int("chains", chains)
    max_tree_depth = check_int("max_tree_depth", max_tree_depth)
    if not (isinstance(target_accept, float) and 0 < target_accept < 1):
        raise ValueError(f"target_accept must be a float in (0, 1), got {target_accept!r}")
    init_draws = check_int("init_draws", init_draws)
    init_units = check_int("init_units", init_units)
    hm = _prepare(model, data, priors)
    samples, diverging, depths, accept = [], [], [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        start = initialize(model, data, hm, how=init, seed=int(seed), init_draws=init_draws, init_units=init_units)
        lat = _LaplaceCoordinates(hm, start)
        rng = np.random.default_rng(int(seed) + 17)
        for c in range(chains):
            values = _jittered(hm, start, rng if c else None)
            kernel = _NUTS(potential_fn=lat.potential_energy, target_accept_prob=target_accept,
                           max_tree_depth=max_tree_depth)
            torch.manual_seed(int(seed) * 1000 + c)
            mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup, num_chains=1,
                        initial_params=lat.initial(values), disable_progbar=not progress)
            with warnings.catch_warnings(), pyro.validation_enabled(False):
                warnings.simplefilter("ignore", UserWarning)
                mcmc.run()
            s = lat.natural_samples({k: v.detach() for k, v in mcmc.get_samples().items()})
            samples.append(s)
            div = np.zeros(num_samples, dtype=bool)
            diag = mcmc.diagnostics()
            idx = [i for i in diag.get("divergences", {}).get("chain 0", []) if 0 <= i < num_samples]
            div[idx] = True
            diverging.append(div)
            depths.append(np.asarray(kernel.tree_depths[num_warmup:num_warmup + num_samples]))
            accept.append(float(diag.get("acceptance rate", {}).get("chain 0", float("nan"))))
    stacked = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    theta = hm.theta({k: v for k, v in stacked.items() if k != "z"}).numpy()  # (C, S, P)
    z = stacked.get("z")
    from .bayes_results import BayesResults, NUTSSampler

    sampler = NUTSSampler(hm, torch.as_tensor(theta), z)
    ind_mean, ind_sd = sampler.individual_moments()
    sample_stats = {"diverging": np.stack(diverging), "tree_depth": np.stack(depths)}
    n_div = int(sample_stats["diverging"].sum())
    rhat = _max_rhat(theta) if chains > 1 else float("nan")
    converged = n_div == 0 and (chains == 1 or rhat < 1.01)
    message = (f"{chains} chain(s) x {num_samples} draws after {num_warmup} warmup; divergences: {n_div}; "
               f"max r_hat: {rhat:.3f}; acceptance rate: {', '.join(f'{a:.2f}' for a in accept)}")
    if not converged:
        warnings.warn(f"NUTS diagnostics flag a problem: {message}", RuntimeWarning, stacklevel=3)
    settings = {"method": "nuts", "num_samples": num_samples, "num_warmup": num_warmup, "chains": chains,
                "seed": int(seed), "init": init, "target_accept": target_accept, "max_tree_depth": max_tree_depth,
                "init_draws": init_draws, "init_units": init_units}
    return BayesResults(
        method="nuts", model_args=_model_args(model), spec=hm.spec, draws=theta, individual_mean=ind_mean,
        individual_sd=ind_sd, unit_labels=list(data.unit_labels), elbo=None, sample_stats=sample_stats,
        converged=converged, message=message, n_iter=num_samples, settings=settings, priors=describe(hm.priors),
        fit_time=time.perf_counter() - t0, n_obs=data.n_situations, n_units=data.n_units, sampler=sampler,
        data=data,
    )


class _LaplaceCoordinates:
    """Coordinates in which NUTS samples: the whitened globals ``u`` and, per unit, ``e_n`` with
    ``z_n = a_n + B_n (u - u_0) + L_n e_n`` (``a_n``, ``B_n``, ``L_n L_n' = V_n``: the unit's Laplace mode, its slope
    in the globals, and covariance). For a Gaussian posterior ``(u, e)`` would be independent standard normals,
    which is what NUTS with a diagonal mass matrix samples best. The map is affine in ``e`` with a constant
    Jacobian, so the target density is the model's: ``p(u, z(u, e))``.
    """

    def __init__(self, hm: HierarchicalMixedLogit, start: Init):
        self.hm = hm
        self.u0 = hm.standardized(start.globals)
        if hm.K:
            self.a, self.B = start.a, start.B
            self.L = torch.linalg.cholesky(start.V)

    def z(self, u: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """z (..., N, K) from u (..., D) and e (..., N, K)."""
        shift = (self.B @ (u - self.u0).unsqueeze(-2).unsqueeze(-1)).squeeze(-1)
        return self.a + shift + (self.L @ e.unsqueeze(-1)).squeeze(-1)

    def potential_energy(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Minus the log density of the model (up to a constant) at ``{"globals": u, "e": e}``."""
        u = params["globals"]
        z = self.z(u, params["e"]) if self.hm.K else None
        return self.hm.potential_energy({"globals": u, "z": z})

    def initial(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"globals": values["globals"]}
        if self.hm.K:
            rhs = (values["z"] - self.z(values["globals"], torch.zeros_like(values["z"]))).unsqueeze(-1)
            out["e"] = torch.linalg.solve_triangular(self.L, rhs, upper=False).squeeze(-1)
        return out

    def natural_samples(self, samples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Natural globals and z from draws of (u, e)."""
        out = self.hm.natural(samples["globals"])
        if self.hm.K:
            out["z"] = self.z(samples["globals"], samples["e"])
        return out


def _jittered(hm: HierarchicalMixedLogit, start: Init, rng) -> dict[str, torch.Tensor]:
    """Initial values of a chain: the pilot start, perturbed by about one posterior sd (on the whitened scale)
    for chains after the first, so that r_hat compares chains from different starting points."""
    u = hm.standardized(start.globals)
    z0 = None if start.a is None else start.a.clone()
    if rng is not None:
        u = u + torch.as_tensor(rng.normal(size=tuple(u.shape)))
        if z0 is not None:
            z0 = z0 + 0.1 * torch.as_tensor(rng.normal(size=tuple(z0.shape)))
    values = {"globals": u}
    if z0 is not None:
        values["z"] = z0
    return values


def _max_rhat(theta: np.ndarray) -> float:
    import arviz as az

    r = az.rhat(az.convert_to_dataset(theta))
    return float(np.nanmax(np.asarray(r.to_array())))
