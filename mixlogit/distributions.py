"""Distributions of random coefficients.

Every distribution maps *standard normal* draws ``z`` to coefficient draws through a differentiable
transform ``beta = T(loc, spread, z)``. Using the normal as the single base measure lets one set of draws or
quadrature nodes serve every family (uniform-based families use ``u = Phi(z)``), and keeps the transform
smooth in ``(loc, spread)`` so that autograd gives exact gradients and Hessians.

The transforms are even in ``spread`` for every family (``T(loc, -s, z)`` has the law of ``T(loc, s, z)``),
which is why the sign of a spread is not identified and summaries report its absolute value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_SQRT2 = math.sqrt(2.0)


def std_normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Phi(z), elementwise."""
    return torch.special.ndtr(z)


def std_normal_icdf(u: torch.Tensor) -> torch.Tensor:
    """Phi^{-1}(u), elementwise."""
    return torch.special.ndtri(u)


@dataclass(frozen=True)
class CoefficientDistribution:
    """A two-parameter family ``beta = T(loc, spread, z)`` with ``z ~ N(0, 1)``.

    Subclasses implement :meth:`transform`; summaries compute moments from the transform by quadrature.
    """

    name: str

    def transform(self, loc: torch.Tensor, spread: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Coefficient draws. ``loc``, ``spread`` broadcast against ``z`` (any shape)."""
        raise NotImplementedError

    @property
    def spread_label(self) -> str:
        return "sd"

    def describe(self) -> str:
        return self.name


class Normal(CoefficientDistribution):
    """beta = loc + spread * z."""

    def transform(self, loc, spread, z):
        return loc + spread * z


class LogNormal(CoefficientDistribution):
    """beta = sign * exp(loc + spread * z): loc and spread are the mean and sd of log|beta|."""

    def __init__(self, name: str, sign: float):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "sign", sign)

    def transform(self, loc, spread, z):
        return self.sign * torch.exp(loc + spread * z)


class Uniform(CoefficientDistribution):
    """beta = loc + spread * (2u - 1), u = Phi(z): uniform on [loc - spread, loc + spread]."""

    def transform(self, loc, spread, z):
        return loc + spread * (2.0 * std_normal_cdf(z) - 1.0)


class Triangular(CoefficientDistribution):
    """Symmetric triangular on [loc - spread, loc + spread] with mode loc (inverse-CDF transform)."""

    def transform(self, loc, spread, z):
        # Write both branches in terms of the smaller tail probability so neither loses precision.
        tail = std_normal_cdf(-z.abs())  # min(u, 1-u)
        t = torch.sqrt(2.0 * tail) - 1.0  # in [-1, 0]
        t = torch.where(z < 0, t, -t)
        return loc + spread * t


class CensoredNormal(CoefficientDistribution):
    """beta = max(0, loc + spread * z): a point mass at zero plus the positive part of a normal."""

    def transform(self, loc, spread, z):
        return torch.clamp_min(loc + spread * z, 0.0)


class TruncatedNormal(CoefficientDistribution):
    """Normal(loc, spread^2) truncated to beta > 0, drawn by the inverse CDF.

    With ``a = Phi(-loc/|spread|)`` the mass below zero, ``beta = loc + |spread| Phi^{-1}(a + u (1 - a))``.
    The upper tail form ``Phi^{-1}(1 - p) = -Phi^{-1}(p)`` is used for accuracy.
    """

    def transform(self, loc, spread, z):
        s = spread.abs() if isinstance(spread, torch.Tensor) else abs(spread)
        # P(beta > b) for the untruncated normal at the truncation point b=0 is q = Phi(loc/s).
        q = std_normal_cdf(loc / s)
        upper = std_normal_cdf(-z)  # 1 - u, computed without cancellation
        p = (upper * q).clamp_min(torch.finfo(upper.dtype).tiny)
        return loc - s * std_normal_icdf(p)


_REGISTRY: dict[str, CoefficientDistribution] = {
    "normal": Normal("normal"),
    "lognormal": LogNormal("lognormal", 1.0),
    "-lognormal": LogNormal("-lognormal", -1.0),
    "uniform": Uniform("uniform"),
    "triangular": Triangular("triangular"),
    "censored_normal": CensoredNormal("censored_normal"),
    "truncated_normal": TruncatedNormal("truncated_normal"),
}

#: Names accepted in ``MixedLogit(random={...})``.
DISTRIBUTION_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_distribution(name: str, *, where: str | None = None) -> CoefficientDistribution:
    """Look a distribution up by name; the error lists the accepted names (``where`` says for what)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"unknown distribution {name!r}{' for ' + where if where else ''}; "
            f"accepted: {', '.join(DISTRIBUTION_NAMES)}"
        )
    return _REGISTRY[name]
