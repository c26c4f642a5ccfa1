"""Variational families (``guide=`` in SVI) with a full-covariance Gaussian per unit; the default guide,
``"marginal"``, has none (the units are integrated out: :mod:`mixlogit.bayes.marginal`).

- ``"fullrank"`` (the default with ``subsample=``): full-rank normal on the whitened population parameters
  ``u``; each unit ``q(z_n | u) = N(a_n + B_n (u - u_0), (I + C' R_n R_n' C)^-1)``: the mean moves with the
  population as the posterior mode does, the precision is a Gaussian likelihood site ``R_n R_n'`` on the linear predictor
  ``w = mu + C z`` combined with the prior, so it follows the population spread. A Gaussian posterior factorizes
  exactly this way, which keeps the uncertainty of the population parameters honest (the 90% intervals of the
  locations covered the truth in 87.5% of 120 cases on 60 simulated panels, ``benchmarks/bench_bayes.py
  --calibration``) and the optimization short.
- ``"meanfield"``: diagonal normal on ``u`` and free unit guides ``q(z_n) = N(a_n, L_n L_n')`` independent of the
  globals (mean-field across blocks). Fast, but it understates the uncertainty of the population parameters
  and can shrink spreads.
- ``"amortized"``: full-rank on ``u``; each unit's likelihood site comes from its Laplace site at the start
  corrected by a small network of per-unit summaries, so the learned parameters do not grow with N.

The unit guides start from each unit's Laplace approximation (:mod:`mixlogit.bayes.pilot`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal
from pyro.infer.autoguide.initialization import init_to_value
from pyro.nn import PyroParam
from torch.distributions import constraints

from ..data import Design
from .model import HierarchicalMixedLogit, StdNormalVector
from .pilot import Init

#: Guides of ``fit(method="svi", guide=...)``; ``"marginal"`` is :mod:`mixlogit.bayes.marginal`'s (no unit guides).
GUIDES = ("meanfield", "fullrank", "amortized", "marginal")


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


def site_posterior(mu: torch.Tensor, C: torch.Tensor, eta: torch.Tensor, R: torch.Tensor) -> UnitGaussian:
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
        return site_posterior(mu, C, eta, self.base_R[index] @ M)


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
        if hm.Kz:
            if kind == "meanfield":
                self.local = FreeLocalGuide(init.a, init.V)
            else:
                eta, R = init.sites(hm)
                if kind == "amortized":
                    self.local = AmortizedGuide(unit_features(eta, R, hm.design), eta, R)
                else:
                    self.local = StructuredLocalGuide(init.a, init.B, R, u0)

    @staticmethod
    def param_context():
        """The Pyro settings under which the guide's parameters live (module-local, not in Pyro's global
        param store): every use of the guide, fitting or drawing, runs inside this context."""
        return pyro.settings.context(module_local_params=True)

    def set_initial_scales(self, se: torch.Tensor):
        """Initial sds of the global guide on the unconstrained scale (one value per coordinate)."""
        self.globals.scale = PyroParam(se.clone(), dist.constraints.softplus_positive)

    def z_dist(self, g: dict[str, torch.Tensor], index, draws: bool = False, u: torch.Tensor | None = None
               ) -> UnitGaussian:
        """q(z_n | globals) for units ``index``; ``g`` natural globals (and ``u``, their whitened site value, if
        at hand), with a leading dim of draws when ``draws`` (then the result has batch shape (n, B))."""
        if isinstance(self.local, FreeLocalGuide):  # independent of the globals
            n = next(iter(g.values())).shape[0] if draws else None
            q = self.local.z_dist(None, None, index)
            return q.expand(torch.Size([n, *q.batch_shape])) if draws else q
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
            if hm.Kz:
                index = slice(None) if hm.subsample is None else idx
                pyro.sample("z", self.z_dist(g, index, u=u))
        return g

    def sample_globals(self, n: int) -> dict[str, torch.Tensor]:
        """n draws of the natural globals from the guide (leading dim n)."""
        with torch.no_grad():
            return self.hm.natural(self.globals.get_posterior().sample((n,)))

    def sample_z(self, g: dict[str, torch.Tensor], index) -> torch.Tensor:
        """Draws of z (n, B, K) for units ``index`` given n global draws ``g``."""
        with torch.no_grad():
            q = self.z_dist(g, index, draws=True)
            n = next(iter(g.values())).shape[0]
            return q.expand(torch.Size([n, *q.batch_shape[-1:]])).rsample()

