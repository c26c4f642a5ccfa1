"""Preference-strength distributions for MixDPO: mixlogit coefficient distributions with learnable parameters.

DPO's Bradley-Terry likelihood ``sigmoid(beta * h)`` (``h`` the policy-minus-reference log-ratio margin) becomes a
binary mixed logit when the strength ``beta`` is random: ``P(chosen wins) = E_beta[sigmoid(beta * h)]``. Each
strength below is a :class:`torch.nn.Module` whose parameters are unconstrained (``mu``, ``log_sigma``,
``log_shape``, ``log_rate``) so an optimizer can train them next to the policy, and whose integrals go through
mixlogit's one kernel (:func:`mixlogit.kernel.conditional_loglik` and :func:`mixlogit.kernel.log_mixed_prob`) with
the pair as a situation with one non-chosen alternative whose attribute difference is ``-h``. The Gamma closed
form lives in :mod:`mixlogit.closed_forms`.

Integrators (``integrator=``):

========================  ===========================================================================
``"gauss-hermite"``       (LogNormal) Gauss-Hermite nodes of :func:`mixlogit.draws.deterministic_rule`. Cheap,
                          but slow to converge when ``sigmoid(beta h)`` is steep in ``log beta`` (large ``sigma``
                          or ``|h|``): worst absolute error of the probability over ``sigma <= 2``,
                          ``|h| <= 10``, ``mu`` in [-3, 1] is about 2e-3 with 16 nodes, 2e-4 with 32, 4e-6 with 64
                          and 3e-8 with 128 (``tests/test_strength.py`` holds these bounds).
``"quadrature"``          mixlogit's ``draw_type="quadrature"``: composite Gauss-Legendre on ``z`` in
                          [-8.5, 8.5]; within 1e-7 of mpmath for ``sigma <= 2``, ``|h| <= 10`` at the default
                          128 nodes (measured 1.6e-9). For Gamma the same ``z`` nodes are mapped to Gamma
                          quantiles (see :class:`GammaStrength`; default 256 nodes, within 1e-8 of the closed
                          form for shapes >= 0.2).
``"mc"``                  Independent reparameterized draws per example (unbiased probability), from the
                          module's own generator.
``"qmc"``                 (LogNormal) Randomized quasi-Monte Carlo: the one-dimensional rank-1 lattice
                          ``u_r = r / R`` in ``u = Phi(z)``, shifted by an independent uniform per example per
                          call and folded by the tent transform ``u -> 1 - |2u - 1|``. Each example's estimate
                          is unbiased; its sd falls like ``R^-2`` (measured 10x to 100x below plain MC at 16
                          to 64 points). In one dimension the lattice beats a scrambled Sobol set (which
                          jitters the points) by a further 3x.
``"closed-form"``         (Gamma) The CVZ-accelerated Lerch series, relative error below 1e-13.
``"exact"``               (Point) One node at ``beta``: plain DPO.
========================  ===========================================================================

Dtypes. Parameters are stored in float64 by default (they are a handful of scalars), and every computation runs
in the *working dtype* of the margin: float64 for float64 margins, float32 otherwise (bfloat16 and float16 margins
are upcast for the integration). Outputs are in the working dtype.
"""

from __future__ import annotations

import inspect
import math
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from scipy import special
from torch import nn

from mixlogit.closed_forms import (
    DEFAULT_TERMS,
    expected_neg_log_logistic_gamma,
    gamma_logistic_posterior_moments,
    log_expected_logistic_gamma,
)
from mixlogit.distributions import get_distribution, std_normal_icdf
from mixlogit.draws import deterministic_rule
from mixlogit.kernel import conditional_loglik, log_mixed_prob, posterior_draw_weights

#: Default number of nodes (or draws, or series terms) per integrator.
DEFAULT_NODES = {"gauss-hermite": 16, "quadrature": 128, "mc": 16, "qmc": 16, "closed-form": DEFAULT_TERMS,
                 "exact": 1}
DETERMINISTIC_INTEGRATORS = ("gauss-hermite", "quadrature")

_LOGNORMAL = get_distribution("lognormal")


class StrengthPosterior(NamedTuple):
    """Per-example posterior of ``beta`` given that the chosen response won: ``sigmoid(beta h) p(beta)``."""

    mean: torch.Tensor
    std: torch.Tensor


# ---------------------------------------------------------------------------------------------- validation
def _positive(name: str, value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a positive finite number, got {value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _finite(name: str, value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(
        float(value)
    ):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


#: Parameter dtypes a strength accepts (``dtype=``).
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _float_dtype(dtype) -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be a floating-point torch dtype ({', '.join(map(str, FLOAT_DTYPES))}), "
                         f"got {dtype!r}")
    return dtype


def _log_parameter(value: float, dtype: torch.dtype) -> nn.Parameter:
    """A positive parameter trained as its log, so that no optimizer step can leave the domain."""
    return nn.Parameter(torch.tensor(math.log(value), dtype=dtype))


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_margin(margin, name: str = "margin") -> torch.Tensor:
    """Validate a margin tensor (floating, finite); the error names the first non-finite indices."""
    if not isinstance(margin, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(margin).__name__}")
    if not margin.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {margin.dtype}")
    bad = ~torch.isfinite(margin)
    if bool(bad.any()):
        if margin.dim() == 0:
            raise ValueError(f"{name} is {float(margin)}; it must be finite")
        idx = bad.nonzero().tolist()[:5]
        raise ValueError(f"{name} has {int(bad.sum())} non-finite entries, first at indices {idx}")
    return margin


# ---------------------------------------------------------------------------------------------- base class
class Strength(nn.Module):
    """A distribution of the preference strength ``beta`` with learnable parameters.

    Subclasses provide the moments and :meth:`_rule` (points and log-weights); the base class integrates the
    binary logit with mixlogit's kernel. Calling the module is :meth:`log_prob_preferred`.
    """

    family: str = ""
    integrators: tuple[str, ...] = ()
    #: Per-family overrides of :data:`DEFAULT_NODES`.
    default_nodes: ClassVar[dict[str, int]] = {}

    def __init__(self, integrator: str, nodes: int | None, seed: int | None, generator: torch.Generator | None):
        super().__init__()
        if integrator not in self.integrators:
            raise ValueError(
                f"integrator {integrator!r} is not available for the {self.family} strength; "
                f"accepted: {', '.join(self.integrators)}"
            )
        self.integrator = integrator
        default = self.default_nodes.get(integrator, DEFAULT_NODES[integrator])
        self.nodes = default if nodes is None else _count("nodes", nodes)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an integer or None, got {seed!r}")
        self.seed = seed
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(seed) if seed is not None else torch.seed())
        self.generator = generator

    # ------------------------------------------------------------------ family interface
    def mean(self) -> torch.Tensor:
        """E[beta] (0-dim tensor, differentiable)."""
        raise NotImplementedError

    def std(self) -> torch.Tensor:
        """sd[beta] (0-dim tensor, differentiable)."""
        raise NotImplementedError

    def cv(self) -> torch.Tensor:
        """Coefficient of variation sd / mean (0-dim tensor)."""
        return self.std() / self.mean()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of beta, shape (n,), reparameterized (differentiable in the parameters)."""
        raise NotImplementedError

    def family_params(self) -> dict[str, float]:
        """The family's parameters (on their natural scale) as floats, for logging as ``beta/<name>``."""
        raise NotImplementedError

    def _rule(self, batch: int, dtype: torch.dtype, device: torch.device, coarse: bool = False):
        """Strength points and log-weights: ((1 or B, R, 1), (R,) or (B, R))."""
        raise NotImplementedError

    # ------------------------------------------------------------------ integration through the kernel
    #: Hold the nodes below the working dtype's largest finite value (set by :meth:`_with_finite_nodes`).
    _finite_nodes = False

    def _with_finite_nodes(self, fn, h: torch.Tensor):
        """``fn(h)`` again, with every strength node held at or below the working dtype's largest finite value.

        A node beyond the dtype's range (``exp(mu + sigma z)`` above 3.4e38 in float32) is inf, and ``inf * 0``
        is NaN where ``sigmoid(beta * 0)`` is 1/2 for every beta. Holding it at the largest finite value gives the
        right limit for every margin. Only the rare call whose result was not finite pays for this second pass,
        so the normal path has no extra operation.
        """
        self._finite_nodes = True
        try:
            return fn(h)
        finally:
            self._finite_nodes = False

    def _cond(self, h: torch.Tensor, coarse: bool = False):
        """Per-draw log sigmoid(beta_r h_b): (B, R), the draws (1 or B, R, 1) and log-weights."""
        if self._finite_nodes:
            # The rule in float64, held below the working dtype's largest value, then cast: no inf enters the
            # graph, so the gradients stay finite as well (a held node passes no gradient to the parameters).
            beta, log_w = self._rule(h.shape[0], torch.float64, h.device, coarse)
            beta, log_w = beta.clamp_max(torch.finfo(h.dtype).max).to(h.dtype), log_w.to(h.dtype)
        else:
            beta, log_w = self._rule(h.shape[0], h.dtype, h.device, coarse)
        if h.shape[0] == 0:  # the kernel cannot reshape an empty batch; the result is (0, R)
            return h.unsqueeze(-1).expand(-1, beta.shape[1]), beta, log_w
        # One situation, one non-chosen alternative whose attribute difference (rejected - chosen) is -h.
        cond = conditional_loglik((-h).reshape(-1, 1, 1, 1), beta)
        return cond, beta, log_w

    def _log_prob(self, h: torch.Tensor) -> torch.Tensor:
        """log E[sigmoid(beta h)] for a flat working-dtype margin (B,), without input checks."""
        cond, _, log_w = self._cond(h)
        return log_mixed_prob(cond, log_w)

    def _expected_log_prob(self, h: torch.Tensor) -> torch.Tensor:
        """E[log sigmoid(beta h)] for a flat working-dtype margin (B,), without input checks."""
        cond, _, log_w = self._cond(h)
        return (cond * torch.exp(log_w)).sum(-1)

    def _posterior(self, h: torch.Tensor) -> StrengthPosterior:
        cond, beta, log_w = self._cond(h)
        beta = beta[..., 0]
        w = posterior_draw_weights(cond, log_w)
        mean = (w * beta).sum(-1)
        var = (w * (beta - mean.unsqueeze(-1)) ** 2).sum(-1)
        return StrengthPosterior(mean, torch.sqrt(var))

    def _apply_flat(self, fn, margin: torch.Tensor):
        check_margin(margin)
        h = margin.reshape(-1).to(_working_dtype(margin.dtype))
        out = fn(h)
        if any(bool(torch.isnan(o).any()) for o in (out if isinstance(out, tuple) else (out,))):
            out = self._without_nan(fn, h, margin.dim())
        if isinstance(out, tuple):
            return type(out)(*(o.reshape(margin.shape) for o in out))
        return out.reshape(margin.shape)

    def _without_nan(self, fn, h: torch.Tensor, dim: int):
        """``fn(h)`` with the nodes held finite (NaN came out of the plain pass); a clear error if NaN remains."""
        out = self._with_finite_nodes(fn, h)
        for o in out if isinstance(out, tuple) else (out,):
            nan = torch.isnan(o)
            if bool(nan.any()):
                self.check_range(h.dtype)
                raise ValueError(
                    f"the {self._describe()} gives NaN in {h.dtype} at {'' if dim == 1 else 'flattened '}margin "
                    f"indices {nan.nonzero().squeeze(-1).tolist()[:5]}: its parameters are outside what {h.dtype} "
                    "can integrate; pass float64 margins"
                )
        return out

    def log_prob_preferred(self, margin: torch.Tensor) -> torch.Tensor:
        """``log E_beta[sigmoid(beta * margin)]``, elementwise; any shape, differentiable.

        margin : DPO log-ratio margin ``(pi - ref)(chosen) - (pi - ref)(rejected)`` in nats.
        Returns a tensor of the margin's shape in the working dtype (float64, else float32).
        """
        return self._apply_flat(self._log_prob, margin)

    def expected_log_prob(self, margin: torch.Tensor) -> torch.Tensor:
        """``E_beta[log sigmoid(beta * margin)]`` elementwise (the "expected" objective's negative)."""
        return self._apply_flat(self._expected_log_prob, margin)

    def posterior(self, margin: torch.Tensor) -> StrengthPosterior:
        """Per-example posterior mean and sd of beta given that the chosen response was preferred.

        The posterior density is proportional to ``sigmoid(beta * margin) p(beta)``; computed with the same rule
        as the likelihood (Revelt and Train weights, :func:`mixlogit.kernel.posterior_draw_weights`).
        Returns ``StrengthPosterior(mean, std)``, each of the margin's shape.
        """
        return self._apply_flat(self._posterior, margin)

    def error_estimate(self, margin: torch.Tensor) -> torch.Tensor:
        """Estimated absolute error of :meth:`log_prob_preferred` for deterministic rules, elementwise.

        The difference between the rule and its half-resolution companion: it estimates the companion's error and
        bounds this rule's (which converges faster) for the composite "quadrature" rule, pointwise. Gauss-Hermite
        errors oscillate in the margin, so there it bounds only the worst case over a range of margins. For the
        Gamma closed form it is the series' truncation bound ``4 / (3 + sqrt 8)^N`` (rounding comes on top:
        measured below 1e-13); zero for a point mass; not defined for simulation.
        """
        if self.integrator in ("exact", "closed-form"):
            bound = 4.0 / (3.0 + math.sqrt(8.0)) ** self.nodes if self.integrator == "closed-form" else 0.0
            return torch.full_like(margin, bound, dtype=_working_dtype(margin.dtype))
        if self.integrator not in DETERMINISTIC_INTEGRATORS:
            raise ValueError(
                f"error_estimate needs a deterministic integrator ({', '.join(DETERMINISTIC_INTEGRATORS)}), "
                f"not {self.integrator!r}: a simulation's error is its standard error across seeds"
            )

        def diff(h):
            fine = self._log_prob(h)
            cond, _, log_w = self._cond(h, coarse=True)
            return (fine - log_mixed_prob(cond, log_w)).abs()

        with torch.no_grad():
            return self._apply_flat(diff, margin)

    def forward(self, margin: torch.Tensor) -> torch.Tensor:
        return self.log_prob_preferred(margin)

    def check_range(self, dtype: torch.dtype = torch.float32) -> None:
        """Raise a ValueError when E[beta] is not finite in ``dtype``, the working dtype of the margins.

        The rewards ``E[beta] * log-ratio`` and the loss's derivative in the margin at 0, ``E[beta] / 2``, scale
        with the mean: a strength whose mean overflows the working dtype (e.g. a lognormal ``mu`` above about 88
        in float32, 709 in float64) cannot give finite results. The error names the parameters and the limit.
        """
        with torch.no_grad():
            mean = self.mean().detach()
            finite = bool(torch.isfinite(mean.to(torch.float64)) & torch.isfinite(mean.to(dtype)))
        if not finite:
            raise ValueError(
                f"the {self._describe()} has E[beta] = {float(mean):.4g}, which is not finite in {dtype} (largest "
                f"finite value {torch.finfo(dtype).max:.4g}): the rewards E[beta] * log-ratio and the loss's "
                "gradients cannot be represented. Choose parameters with a smaller E[beta]"
                + ("." if dtype == torch.float64 else ", or pass float64 log-probabilities (margins).")
            )

    def _describe(self) -> str:
        params = ", ".join(f"{k}={v:.4g}" for k, v in self.family_params().items())
        return f"{self.family} strength ({params})"

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v:.4g}" for k, v in self.family_params().items())
        return (f"{params}, mean={float(self.mean().detach()):.4g}, cv={float(self.cv().detach()):.4g}, "
                f"integrator={self.integrator!r}, nodes={self.nodes}")

    # ------------------------------------------------------------------ helpers for subclasses
    def _initial_location(self, name: str, value, mean, fix_mean: bool, dtype, *, check,
                          from_mean) -> float | None:
        """Shared handling of ``mean=`` / ``fix_mean=`` against the family's location parameter ``name``.

        Returns the location's initial value: ``check(name, value)`` when ``name`` itself is given, else
        ``from_mean(E[beta])`` (default E[beta] 0.1). With ``fix_mean`` it returns None: the mean is
        registered as the buffer ``target_mean`` and the family derives its location from it, so there is no
        location to learn.
        """
        if value is not None and mean is not None:
            raise ValueError(f"give either {name} or mean (E[beta]) for {type(self).__name__}, not both")
        if fix_mean and value is not None:
            raise ValueError(f"fix_mean=True pins E[beta]: pass mean=..., not {name}=...")
        self.fix_mean = bool(fix_mean)
        if value is not None:
            return check(name, value)
        mean = _positive("mean", 0.1 if mean is None else mean)
        if self.fix_mean:
            self.register_buffer("target_mean", torch.tensor(mean, dtype=dtype))
            return None
        return from_mean(mean)

    def _register_normal_rule(self):
        rule = deterministic_rule(self.integrator, self.nodes, 1)
        self.register_buffer("_z", rule.z[0, :, 0].clone(), persistent=False)
        self.register_buffer("_log_w", rule.log_weights.clone(), persistent=False)
        self.register_buffer("_z_coarse", rule.coarse.z[0, :, 0].clone(), persistent=False)
        self.register_buffer("_log_w_coarse", rule.coarse.log_weights.clone(), persistent=False)

    def _cached(self, key, make):
        """Constant tensors (nodes, weights) converted once per dtype and device instead of on every call."""
        cache = self.__dict__.setdefault("_const_cache", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _normal_nodes(self, dtype, device, coarse):
        """The rule's standard normal nodes (in the buffers' dtype) and its log-weights in ``dtype``."""
        z, log_w = (self._z_coarse, self._log_w_coarse) if coarse else (self._z, self._log_w)
        z = self._cached(("z", coarse, z.dtype, device), lambda: z.to(device=device))
        return z, self._cached(("log_w", coarse, dtype, device), lambda: log_w.to(device=device, dtype=dtype))

    def _uniform_log_weights(self, dtype, device):
        r = self.nodes
        return self._cached(("uniform", dtype, device),
                            lambda: torch.full((r,), -math.log(r), dtype=dtype, device=device))

    def _randn(self, shape, dtype, device, generator=None):
        gen = generator or self.generator
        return torch.randn(shape, generator=gen, dtype=dtype, device=gen.device).to(device)

    def _rand(self, shape, dtype, device, generator=None):
        gen = generator or self.generator
        return torch.rand(shape, generator=gen, dtype=dtype, device=gen.device).to(device)

    def _param(self, t: torch.Tensor, dtype, device) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- point
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

    def __init__(self, beta: float = 0.1, *, learnable: bool = False, integrator: str = "exact",
                 nodes: int | None = None, dtype: torch.dtype = torch.float64):
        super().__init__(integrator, nodes, 0, None)
        b = torch.tensor(_positive("beta", beta), dtype=_float_dtype(dtype))
        self.learnable = bool(learnable)
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
        return self._beta().expand(_count("n", n))

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

    def __init__(self, mu: float | None = None, sigma: float = 0.5, *, mean: float | None = None,
                 fix_mean: bool = False, integrator: str = "gauss-hermite", nodes: int | None = None,
                 seed: int | None = 0, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float64):
        super().__init__(integrator, nodes, seed, generator)
        dtype = _float_dtype(dtype)
        sigma = _positive("sigma", sigma)
        mu = self._initial_location("mu", mu, mean, fix_mean, dtype, check=_finite,
                                    from_mean=lambda m: math.log(m) - 0.5 * sigma**2)
        self.log_sigma = _log_parameter(sigma, dtype)
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
        z = self._randn((_count("n", n),), self.log_sigma.dtype, self.log_sigma.device, generator)
        return _LOGNORMAL.transform(self.loc, self.sigma, z)

    def family_params(self):
        return {"mu": float(self.loc.detach()), "sigma": float(self.sigma.detach())}

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
    # The quantile map is steep in z for small shapes: 256 nodes keep the probability within 1e-8 down to
    # shape 0.2 (128 nodes: 4e-5 at shape 0.2, 7e-7 at 0.5, 5e-9 at 1).
    default_nodes: ClassVar[dict[str, int]] = {"quadrature": 256}

    def __init__(self, shape: float = 2.0, rate: float | None = None, *, mean: float | None = None,
                 fix_mean: bool = False, integrator: str = "closed-form", nodes: int | None = None,
                 seed: int | None = 0, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float64):
        super().__init__(integrator, nodes, seed, generator)
        dtype = _float_dtype(dtype)
        shape = _positive("shape", shape)
        rate = self._initial_location("rate", rate, mean, fix_mean, dtype, check=_positive,
                                      from_mean=lambda m: shape / m)
        self.log_shape = _log_parameter(shape, dtype)
        if rate is not None:
            self.log_rate = _log_parameter(rate, dtype)
        if integrator == "quadrature":
            self._register_normal_rule()
            self._quantile_cache: dict = {}

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
        x = self._standard_gamma(self.shape, (_count("n", n),), generator).to(self.log_shape.device)
        return x / self.rate

    def family_params(self):
        return {"shape": float(self.shape.detach()), "rate": float(self.rate.detach())}

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

    def _log_prob(self, h):
        if self.integrator != "closed-form":
            return super()._log_prob(h)
        k, lam = self._param(self.shape, h.dtype, h.device), self._param(self.rate, h.dtype, h.device)
        return log_expected_logistic_gamma(h, k, lam, self.nodes)

    def _expected_log_prob(self, h):
        if self.integrator != "closed-form":
            return super()._expected_log_prob(h)
        k, lam = self._param(self.shape, h.dtype, h.device), self._param(self.rate, h.dtype, h.device)
        return -expected_neg_log_logistic_gamma(h, k, lam, self.nodes)

    def _posterior(self, h):
        if self.integrator != "closed-form":
            return super()._posterior(h)
        k, lam = self._param(self.shape, h.dtype, h.device), self._param(self.rate, h.dtype, h.device)
        return StrengthPosterior(*gamma_logistic_posterior_moments(h, k, lam, self.nodes))


# ---------------------------------------------------------------------------------------------- registry
#: Strength families by name (``make_strength``, the trainer's ``strength=`` option).
STRENGTHS: dict[str, type[Strength]] = {
    "point": PointStrength,
    "lognormal": LogNormalStrength,
    "gamma": GammaStrength,
}


def register_strength(name: str, cls: type[Strength]) -> None:
    """Add a strength family under ``name`` (a :class:`Strength` subclass)."""
    if not (isinstance(cls, type) and issubclass(cls, Strength)):
        raise TypeError(f"register_strength needs a Strength subclass, got {cls!r}")
    STRENGTHS[name] = cls


def make_strength(name: str, init: dict | None = None, integrator: str | None = None, nodes: int | None = None,
                  **kwargs) -> Strength:
    """Build a strength by family name.

    Parameters
    ----------
    name : "point", "lognormal" or "gamma" (or a name added by :func:`register_strength`).
    init : initial parameters, e.g. ``{"beta": 0.1}``, ``{"mu": -2.3, "sigma": 0.5}``, ``{"mean": 0.1, "sigma": 1}``,
        ``{"shape": 2.0, "rate": 20.0}``.
    integrator, nodes : see the module docstring; None keeps the family's default.
    kwargs : further constructor arguments (``fix_mean``, ``seed``, ``generator``, ``dtype``, ``learnable``).
    """
    if name not in STRENGTHS:
        raise ValueError(f"unknown strength {name!r}; accepted: {', '.join(STRENGTHS)}")
    cls = STRENGTHS[name]
    if init is not None and not isinstance(init, dict):
        raise ValueError(f"init must be a dict of initial parameters or None, got {type(init).__name__}")
    args = dict(init or {})
    for key, value in kwargs.items():
        if key in args:
            raise ValueError(f"{key!r} is given both in init and as a keyword argument")
        args[key] = value
    if integrator is not None:
        args["integrator"] = integrator
    if nodes is not None:
        args["nodes"] = nodes
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [k for k in args if k not in accepted]
    if unknown:
        raise ValueError(f"{name} strength does not take {', '.join(map(repr, unknown))}; "
                         f"accepted: {', '.join(accepted)}")
    return cls(**args)


__all__ = [
    "DEFAULT_NODES",
    "FLOAT_DTYPES",
    "STRENGTHS",
    "GammaStrength",
    "LogNormalStrength",
    "PointStrength",
    "Strength",
    "StrengthPosterior",
    "check_margin",
    "make_strength",
    "register_strength",
]
