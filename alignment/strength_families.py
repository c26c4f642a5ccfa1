"""The built-in strength families: a point mass (plain DPO), the LogNormal and the Gamma.

Each is a :class:`~alignment.strength_base.Strength` with unconstrained learnable parameters (``log_beta``,
``mu`` and ``log_sigma``, ``log_shape`` and ``log_rate``) and declares its contract: its integrators, its
parameters (``param_names``) and how a run centred on DPO's beta starts (``default_init``). The integrators are
described in :mod:`alignment.strength`; the Gamma closed form lives in :mod:`mixlogit.closed_forms`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from scipy import special, stats
from torch import nn

from mixlogit.closed_forms import (
    expected_neg_log_logistic_gamma,
    gamma_logistic_posterior_moments,
    log_expected_logistic_gamma,
)
from mixlogit.distributions import get_distribution, std_normal_icdf
from mixlogit.validation import check_bool, check_count, check_finite, check_positive_number

from .strength_base import (
    DETERMINISTIC_INTEGRATORS,
    Strength,
    StrengthPosterior,
    check_float_dtype,
    log_parameter,
)

_LOGNORMAL = get_distribution("lognormal")
# Spread a training run starts from: CV 0.53 for both families (sigma = 0.5 gives sqrt(exp(0.25) - 1) = 0.53;
# shape = 4 gives 1/sqrt(4) = 0.5), wide enough to move either way.
_RUN_SIGMA = 0.5
_RUN_SHAPE = 4.0


class PointStrength(Strength):
    """A point mass at ``beta``: MixDPO with this strength is plain DPO.

    Parameters
    ----------
    beta : the DPO strength (> 0).
    learnable : train ``beta`` (as the parameter ``log_beta``) instead of holding it fixed (a buffer).
    dtype : dtype of the stored value (float64 keeps e.g. 0.1 exact for float64 margins).
    """

    family = "point"
    integrators = ("exact",)
    param_names = ("beta",)
    # DPO's beta is a hyperparameter, not learned: a "point" run must reproduce DPOTrainer exactly.
    fixed_in_training = True

    @classmethod
    def default_init(cls, beta, init, fix_mean=False):
        return {"beta": float(init.get("beta", beta))}

    def __init__(self, beta: float = 0.1, *, learnable: bool = False, integrator: str = "exact",
                 nodes: int | None = None, dtype: torch.dtype = torch.float64):
        super().__init__(integrator, nodes, 0, None)
        b = torch.tensor(check_positive_number("beta", beta), dtype=check_float_dtype(dtype))
        self.learnable = check_bool("learnable", learnable)
        if self.learnable:
            self.log_beta = nn.Parameter(torch.log(b))
        else:
            self.register_buffer("beta", b)

    def _beta(self) -> torch.Tensor:
        return torch.exp(self.log_beta) if self.learnable else self.beta

    def mean(self):
        return self._beta()

    def std(self):
        return torch.zeros_like(self._beta())

    def cv(self):
        return torch.zeros_like(self._beta())

    def sample(self, n, generator=None):
        return self._beta().expand(check_count("n", n))

    def family_params(self):
        return {"beta": float(self._beta().detach())}

    def _rule(self, batch, dtype, device, coarse=False):
        beta = self._param(self._beta(), dtype, device).reshape(1, 1, 1)
        return beta, torch.zeros(1, dtype=dtype, device=device)

    def _posterior(self, h):
        b = self._param(self._beta(), h.dtype, h.device).expand(h.shape)
        return StrengthPosterior(b, torch.zeros_like(h))


# ---------------------------------------------------------------------------------------------- lognormal
class LogNormalStrength(Strength):
    """``beta = exp(mu + sigma z)``, ``z ~ N(0, 1)`` (mixlogit's ``"lognormal"`` transform, loc ``mu``, spread ``sigma``).

    Parameters
    ----------
    mu : mean of log beta. Default: ``log(0.1) - sigma^2 / 2`` (E[beta] = 0.1), or from ``mean``.
    sigma : sd of log beta (> 0); trained as ``log_sigma``.
    mean : E[beta] (> 0) instead of ``mu``; with ``fix_mean=True`` it stays pinned and ``mu`` is derived
        as ``log(mean) - sigma^2 / 2`` (only ``sigma`` is learned).
    integrator : "gauss-hermite" (default), "quadrature", "mc" or "qmc".
    nodes : nodes or draws per example (defaults: 16, 128, 16, 16).
    seed, generator : randomness of "mc" and "qmc" (and of :meth:`sample`).
    dtype : dtype of the parameters.
    """

    family = "lognormal"
    integrators = ("gauss-hermite", "quadrature", "mc", "qmc")
    param_names = ("mu", "sigma")
    supports_fix_mean = True

    @classmethod
    def default_init(cls, beta, init, fix_mean=False):
        sigma = float(init.get("sigma", _RUN_SIGMA))
        if fix_mean:
            return {"sigma": sigma}
        return {"mu": float(init.get("mu", math.log(beta) - sigma**2 / 2)), "sigma": sigma}

    def __init__(self, mu: float | None = None, sigma: float = 0.5, *, mean: float | None = None,
                 fix_mean: bool = False, integrator: str = "gauss-hermite", nodes: int | None = None,
                 seed: int | None = 0, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float64):
        super().__init__(integrator, nodes, seed, generator)
        dtype = check_float_dtype(dtype)
        sigma = check_positive_number("sigma", sigma)
        mu = self._initial_location("mu", mu, mean, fix_mean, dtype, check=check_finite,
                                    from_mean=lambda m: math.log(m) - 0.5 * sigma**2)
        self.log_sigma = log_parameter(sigma, dtype)
        if mu is not None:
            self.mu = nn.Parameter(torch.tensor(mu, dtype=dtype))
        if integrator in DETERMINISTIC_INTEGRATORS:
            self._register_normal_rule()
        elif integrator == "qmc":
            # The rank-1 lattice of one dimension: R equispaced points, randomly shifted per example per call.
            self.register_buffer("_u", torch.arange(self.nodes, dtype=torch.float64) / self.nodes, persistent=False)

    @property
    def sigma(self) -> torch.Tensor:
        return torch.exp(self.log_sigma)

    @property
    def loc(self) -> torch.Tensor:
        """mu, the mean of log beta (derived from the pinned mean when ``fix_mean``)."""
        if self.fix_mean:
            return torch.log(self.target_mean) - 0.5 * self.sigma**2
        return self.mu

    def mean(self):
        return torch.exp(self.loc + 0.5 * self.sigma**2)

    def std(self):
        return self.mean() * self.cv()

    def cv(self):
        return torch.sqrt(torch.expm1(self.sigma**2))

    def sample(self, n, generator=None):
        z = self._randn((check_count("n", n),), self.log_sigma.dtype, self.log_sigma.device, generator)
        return _LOGNORMAL.transform(self.loc, self.sigma, z)

    def family_params(self):
        return {"mu": float(self.loc.detach()), "sigma": float(self.sigma.detach())}

    def exact_distribution(self):
        p = self.family_params()
        return stats.lognorm(s=p["sigma"], scale=math.exp(p["mu"]))

    def _rule(self, batch, dtype, device, coarse=False):
        r = self.nodes
        if self.integrator in DETERMINISTIC_INTEGRATORS:
            # Shared nodes: transform in the parameters' dtype (R values), then one cast to the working dtype.
            z, log_w = self._normal_nodes(dtype, device, coarse)
            beta = _LOGNORMAL.transform(self.loc.to(device), self.sigma.to(device), z)
            return beta.to(dtype).reshape(1, -1, 1), log_w
        mu, sigma = self._param(self.loc, dtype, device), self._param(self.sigma, dtype, device)
        if self.integrator == "mc":
            z = self._randn((batch, r), dtype, device)
        else:
            # qmc: a randomly shifted lattice (one uniform shift per example: each estimate is unbiased and the
            # examples independent) with the tent transform u -> 1 - |2u - 1|, which keeps u uniform and makes
            # the integrand periodic, so the error falls like R^-2 instead of the R^-1 of a plain shift.
            u = torch.remainder(self._u.to(device=device) + self._rand((batch, 1), torch.float64, device), 1.0)
            u = 1.0 - (2.0 * u - 1.0).abs()
            eps = torch.finfo(torch.float64).eps
            z = std_normal_icdf(u.clamp(eps, 1.0 - eps)).to(dtype)
        return _LOGNORMAL.transform(mu, sigma, z).unsqueeze(-1), self._uniform_log_weights(dtype, device)


# ---------------------------------------------------------------------------------------------- gamma
class GammaStrength(Strength):
    """``beta ~ Gamma(shape k, rate lam)``: mean ``k / lam``, cv ``1 / sqrt(k)``.

    Parameters
    ----------
    shape : k > 0; trained as ``log_shape``.
    rate : lam > 0; trained as ``log_rate``. Default ``shape / 0.1`` (E[beta] = 0.1), or ``shape / mean``.
    mean : E[beta] instead of ``rate``; with ``fix_mean=True`` it stays pinned and ``rate = shape / mean`` is
        derived (only ``shape`` is learned).
    integrator :
        ``"closed-form"`` (default): :func:`mixlogit.closed_forms.log_expected_logistic_gamma`, the CVZ-accelerated
        Lerch series with ``nodes`` terms (default 20); the "expected" objective and the posterior have closed
        forms too (:func:`~mixlogit.closed_forms.expected_neg_log_logistic_gamma`,
        :func:`~mixlogit.closed_forms.gamma_logistic_posterior_moments`).
        ``"quadrature"``: mixlogit's composite Gauss-Legendre nodes ``z`` mapped to ``beta = G_k^{-1}(Phi(z)) / lam``
        (``G_k`` the Gamma(k, 1) CDF, computed by scipy at the current ``k`` without gradient). The derivative in
        ``k`` enters through the weights instead: ``w_r`` proportional to ``gl_r (x_r)^(k - k0)`` with ``k0`` the
        detached value, i.e. ``gl_r`` at ``k = k0`` with the score ``d/dk log p(x_r; k)`` as derivative (the
        lgamma terms cancel in the normalization). ``lam`` and the margin enter pathwise. Default 256 nodes:
        within 1e-8 of the closed form (probability and gradients to 1e-5) for shapes 0.2 to 50 and
        ``|h| <= 10``. Like any rule truncated at ``|z| = 8.5`` it cannot resolve probabilities that live in
        the last 1e-17 of the Gamma's lower tail (``log P`` below about -30 at large shapes): use the closed form.
        ``"mc"``: reparameterized Gamma draws (implicit reparameterization, as torch.distributions.Gamma) from the
        module's generator, ``nodes`` per example.
    """

    family = "gamma"
    integrators = ("closed-form", "quadrature", "mc")
    param_names = ("shape", "rate")
    supports_fix_mean = True
    # The quantile map is steep in z for small shapes: 256 nodes keep the probability within 1e-8 down to
    # shape 0.2 (128 nodes: 4e-5 at shape 0.2, 7e-7 at 0.5, 5e-9 at 1).
    default_nodes: ClassVar[dict[str, int]] = {"quadrature": 256}

    def __init__(self, shape: float = 2.0, rate: float | None = None, *, mean: float | None = None,
                 fix_mean: bool = False, integrator: str = "closed-form", nodes: int | None = None,
                 seed: int | None = 0, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float64):
        super().__init__(integrator, nodes, seed, generator)
        dtype = check_float_dtype(dtype)
        shape = check_positive_number("shape", shape)
        rate = self._initial_location("rate", rate, mean, fix_mean, dtype, check=check_positive_number,
                                      from_mean=lambda m: shape / m)
        self.log_shape = log_parameter(shape, dtype)
        if rate is not None:
            self.log_rate = log_parameter(rate, dtype)
        if integrator == "quadrature":
            self._register_normal_rule()
            self._quantile_cache: dict = {}

    @classmethod
    def default_init(cls, beta, init, fix_mean=False):
        shape = float(init.get("shape", _RUN_SHAPE))
        if fix_mean:
            return {"shape": shape}
        return {"shape": shape, "rate": float(init.get("rate", shape / beta))}

    @property
    def shape(self) -> torch.Tensor:
        return torch.exp(self.log_shape)

    @property
    def rate(self) -> torch.Tensor:
        if self.fix_mean:
            return self.shape / self.target_mean
        return torch.exp(self.log_rate)

    def mean(self):
        return self.shape / self.rate

    def std(self):
        return torch.sqrt(self.shape) / self.rate

    def cv(self):
        return torch.rsqrt(self.shape)

    def _standard_gamma(self, k: torch.Tensor, size, generator=None) -> torch.Tensor:
        gen = generator or self.generator
        # torch's own Gamma sampler with its implicit-reparameterization gradient, but from our generator.
        return torch._standard_gamma(k.to(gen.device).expand(size).contiguous(), generator=gen)

    def sample(self, n, generator=None):
        x = self._standard_gamma(self.shape, (check_count("n", n),), generator).to(self.log_shape.device)
        return x / self.rate

    def family_params(self):
        return {"shape": float(self.shape.detach()), "rate": float(self.rate.detach())}

    def exact_distribution(self):
        p = self.family_params()
        return stats.gamma(a=p["shape"], scale=1.0 / p["rate"])

    # ------------------------------------------------------------------ integrators
    def _gamma_quantiles(self, k0: float, coarse: bool) -> tuple[np.ndarray, np.ndarray]:
        """Gamma(k0, 1) quantiles at the rule's ``Phi(z)`` and their logs (float64; cached for the latest k0)."""
        key = (k0, coarse)
        if key not in self._quantile_cache:
            z = (self._z_coarse if coarse else self._z).cpu().numpy()
            # Lower half from the CDF, upper half from the survival function: no 1 - u rounding in the tail.
            lower = special.gammaincinv(k0, special.ndtr(np.minimum(z, 0.0)))
            upper = special.gammainccinv(k0, special.ndtr(-np.maximum(z, 0.0)))
            x = np.maximum(np.where(z <= 0, lower, upper), np.finfo(np.float64).tiny)
            # The log is taken in float64: a small-shape quantile (1e-85) underflows in float32.
            self._quantile_cache = {key: (x, np.log(x))}
        return self._quantile_cache[key]

    def _rule(self, batch, dtype, device, coarse=False):
        k, lam = self._param(self.shape, dtype, device), self._param(self.rate, dtype, device)
        if self.integrator == "mc":
            x = self._standard_gamma(k, (batch, self.nodes)).to(device=device, dtype=dtype)
            return (x / lam).unsqueeze(-1), self._uniform_log_weights(dtype, device)
        # quadrature: Gamma quantiles at the (detached) current shape, score-function weights for d/dk
        k0 = float(self.shape.detach())
        x, log_x = (torch.as_tensor(a, dtype=dtype, device=device) for a in self._gamma_quantiles(k0, coarse))
        _, log_gl = self._normal_nodes(dtype, device, coarse)
        log_w = torch.log_softmax(log_gl + (k - k.detach()) * log_x, dim=-1)
        return (x / lam).reshape(1, -1, 1), log_w

    def log_prob_marginal(self, h):
        if self.integrator != "closed-form":
            return super().log_prob_marginal(h)
        k, lam = self._param(self.shape, h.dtype, h.device), self._param(self.rate, h.dtype, h.device)
        return log_expected_logistic_gamma(h, k, lam, self.nodes)

    def log_prob_expected(self, h):
        if self.integrator != "closed-form":
            return super().log_prob_expected(h)
        k, lam = self._param(self.shape, h.dtype, h.device), self._param(self.rate, h.dtype, h.device)
        return -expected_neg_log_logistic_gamma(h, k, lam, self.nodes)

    def _posterior(self, h):
        if self.integrator != "closed-form":
            return super()._posterior(h)
        k, lam = self._param(self.shape, h.dtype, h.device), self._param(self.rate, h.dtype, h.device)
        return StrengthPosterior(*gamma_logistic_posterior_moments(h, k, lam, self.nodes))




__all__ = ["GammaStrength", "LogNormalStrength", "PointStrength"]
