"""The hierarchical mixed logit as a Pyro model, on the one kernel MSL uses.

For units ``n`` (persons with a panel, else choice situations)::

    fixed coefficients b ~ priors["fixed" / name]          locations mu_k ~ priors["loc" / name]
    spreads s_k > 0      ~ priors["sd" / "sd.name"]        correlations Omega ~ LKJ(eta)  (correlated block)
    z_n ~ N(0, I_K)                                        (non-centered: one standard normal vector per unit)
    beta_n = Spec.coefficients(theta, z_n)                 (the same map MSL uses, every family)
    log p(y_n | beta_n, b) = kernel.conditional_loglik(...) (the same kernel MSL uses, R = 1)

so the likelihood is the kernel's, summed per unit inside ``pyro.plate("person", N, subsample_size=B)`` and
added with ``pyro.factor``: no second implementation of the logit probability.

With a random scale (``scale="lognormal"``, S-MNL) every unit also has a scale ``s_n = exp(tau z_ns - tau^2 / 2)``
multiplying its whole utility, ``tau = sd.scale ~ priors["sd.scale"]``, its standard normal draw the last column of
``z_n`` (as in MSL's draws): ``z`` then has ``Kz = K + 1`` columns.

``theta`` is laid out as in :class:`mixlogit.spec.Spec` (``[asc.*, fixed, locations, sd.*, chol.*, sd.scale]``), so the
posterior is reported under the MSL names. With correlated coefficients the covariance of the correlated block
is ``C C'`` with ``C = diag(s) chol(Omega)``; ``sd.x`` and ``chol.a.b`` report the entries of ``C`` (as MSL does)
and the priors on ``sd.x`` are priors on marginal standard deviations.

Coordinates. All population parameters form one sample site ``"globals"``, whitened with a pilot estimate
(:mod:`mixlogit.bayes.pilot`): ``[fixed, loc, log sd, correlations, log tau] = center + W u``, so that the posterior of
``u`` is close to N(0, I): one learning rate and NUTS's diagonal mass matrix fit every parameter.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch.distributions import biject_to, constraints

from ..data import ChoiceData, Design, require_choice_data
from ..kernel import conditional_loglik
from ..spec import Spec
from .priors import IndependentPriors, lkj_distribution, resolve_priors


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
            raw = v[..., hm.Kf + 2 * hm.K:hm.dim - hm.n_scale]
            lp = lp + hm.prior_corr.log_prob(g["corr"]) + _CORR.log_abs_det_jacobian(raw, g["corr"])
        if hm.n_scale:  # log tau is the coordinate: the Jacobian of tau = exp(v) is tau
            lp = lp + hm.prior_scale.log_prob(g["scale"]) + v[..., -1:].sum(-1)
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
            if hm.n_scale:
                g["scale"] = hm.prior_scale.sample(shape)
            return hm.standardized(g)


_CORR = biject_to(constraints.corr_cholesky)


class HierarchicalMixedLogit:
    """The Pyro model of a mixed logit on one data set (see the module docstring).

    One global sample site ``"globals"`` (D,): all population parameters on a whitened scale (see
    :class:`GlobalPrior` and :meth:`set_preconditioner`); :meth:`natural` turns it into a dict of natural values
    ``fixed`` (Kf,), ``loc`` (K,), ``sd`` (K,), ``corr`` (Kc, Kc) (Cholesky factor of the correlation matrix
    of the correlated block) and with a random scale ``scale`` (1,) (tau, the sd of log s). Local site ``"z"``
    (N, Kz): each unit's standard normal vector, in the order of ``spec.random_names``, then the scale's.
    """

    def __init__(self, spec: Spec, design: Design, priors: dict | None = None, subsample: int | None = None):
        self.spec, self.design = spec, design
        self.priors = resolve_priors(spec, priors)
        self.n_units, self.K, self.Kf = design.n_units, spec.n_random, spec.n_fixed
        self.Kc = len(spec.corr_index)
        self.subsample = subsample
        self._needs_avail = design.has_unavailable
        self._unit_weighted = not bool((design.weights == 1).all())
        self.n_scale = 1 if spec.scale else 0
        self.Kz = spec.n_draw_dims  # columns of z: one per random coefficient, and the scale's
        self.dim = self.Kf + 2 * self.K + self.Kc * (self.Kc - 1) // 2 + self.n_scale
        if self.Kf:
            self.prior_fixed = IndependentPriors([self.priors[n] for n in spec.fixed])
        if self.K:
            self.prior_loc = IndependentPriors([self.priors[n] for n in spec.random_names])
            self.prior_sd = IndependentPriors([self.priors[f"sd.{n}"] for n in spec.random_names])
        if self.Kc:
            self.prior_corr = lkj_distribution(self.priors["corr"], self.Kc)
        if self.n_scale:
            self.prior_scale = IndependentPriors([self.priors["sd.scale"]])
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
            g["corr"] = _CORR(v[..., Kf + 2 * K:self.dim - self.n_scale])
        if self.n_scale:
            g["scale"] = torch.exp(v[..., -1:])
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
        if self.n_scale:
            parts.append(torch.log(g["scale"]))
        return torch.cat(parts, -1)

    def natural(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Natural global values from the whitened site value u (..., D)."""
        return self.split(self.center + (self.W @ u.unsqueeze(-1)).squeeze(-1))

    def standardized(self, g: dict[str, torch.Tensor]) -> torch.Tensor:
        """The whitened site value u (..., D) of natural global values."""
        v = self.raw(g) - self.center
        return torch.linalg.solve_triangular(self.W, v.unsqueeze(-1), upper=False).squeeze(-1)

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
        if self.n_scale:
            parts.append(g["scale"])
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
        if self.n_scale:
            g["scale"] = th[sl["scale"]].abs().clamp_min(0.05)
        return g

    # -------------------------------------------------------------- likelihood
    def loglik(self, theta: torch.Tensor, z: torch.Tensor | None, index) -> torch.Tensor:
        """Weighted ``sum_t log L_nt(beta_n)`` per unit for units ``index`` (a slice or index tensor).

        theta : (P,) or (S, 1, P) (S particles); z : (B, K) or (S, B, K). Returns (B,) or (S, B).
        """
        d, spec = self.design, self.spec
        if theta.dim() > 1 or self.n_scale:  # a random scale multiplies the fixed part too: one kernel call
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
        single = theta.dim() == 1
        th = theta.reshape(-1, theta.shape[-1])  # (S, P)
        S = th.shape[0]
        x = self._x_diff[index]  # (n, T, A, K + Kf)
        n = x.shape[0]
        if self.n_scale:  # every coefficient times the unit's scale draw, per particle
            coef = spec.scaled_coefficients(th, z.reshape(S, n, self.Kz)).transpose(0, 1)  # (n, S, K + Kf)
        elif self.K:
            coef = spec.all_coefficients(th, spec.coefficients(th, z.reshape(S, n, self.K)).transpose(0, 1))
        else:
            coef = spec.all_coefficients(th, th.new_zeros(n, S, 0))
        ll = conditional_loglik(x, coef,
                                avail=d.avail_diff[index] if self._needs_avail else None,
                                situation_mask=d.situation_mask[index]).transpose(0, 1)  # (S, n)
        ll = ll[0] if single else ll
        return ll * d.weights[index] if self._unit_weighted else ll

    @functools.cached_property
    def _x_diff(self) -> torch.Tensor:
        """Random then fixed attribute differences of all units (built on first use: one particle needs none)."""
        return self.design.x_diff if (self.Kf or self.n_scale) else self.design.x_rand_diff

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
            z = pyro.sample("z", StdNormalVector(self.Kz)) if self.Kz else None
            pyro.factor("loglik", self.loglik(theta, z, index))


def prepare(model, data: ChoiceData, priors: dict | None, subsample: int | None = None) -> HierarchicalMixedLogit:
    """The Pyro model of ``model`` (a :class:`mixlogit.MixedLogit`) on ``data``, with ``priors`` resolved."""
    require_choice_data(data)
    spec = model.spec_for(data)
    design = data.design(spec.random_names, spec.fixed)
    return HierarchicalMixedLogit(spec, design, priors, subsample=subsample)

