"""Integration rules over standard normal space: simulation draws and deterministic quadrature.

An :class:`IntegrationRule` is a set of points ``z`` in R^D with log-weights summing to (about) zero, so
that ``E[g(Z)] ~= sum_r w_r g(z_r)`` for ``Z ~ N(0, I_D)``. Simulation rules (pseudo-random, Halton,
Sobol, MLHS) give each unit (person, or choice situation without a panel) its own points; deterministic
rules (Gauss-Hermite, composite Gauss-Legendre) share their nodes across units and carry a coarser companion
rule from which the integration error is estimated.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.stats import qmc

from .budget import MAX_RULE_BYTES
from .distributions import std_normal_icdf
from .validation import check_bool

#: Names accepted by ``draw_type``.
DRAW_TYPES = ("halton", "halton-plain", "sobol", "mlhs", "pseudo", "gauss-hermite", "quadrature")
DETERMINISTIC = ("gauss-hermite", "quadrature")

#: Half-width of the truncated range of the composite rule; the normal mass outside is 2*Phi(-8.5) ~ 2e-17.
QUADRATURE_HALF_WIDTH = 8.5
#: Gauss-Legendre nodes per panel in the composite rule.
QUADRATURE_PANEL_ORDER = 8


@dataclass
class IntegrationRule:
    """Points and weights for expectations over ``N(0, I_D)``.

    Attributes
    ----------
    z : Tensor, shape (U, R, D)
        Points; ``U`` is the number of units, or 1 when the points are shared by every unit.
    log_weights : Tensor, shape (R,)
        Log of the weights (they sum to 1 up to the truncation error of a quadrature rule).
    kind : str
        The ``draw_type`` that made it.
    coarse : IntegrationRule or None
        For deterministic rules, the same rule with about half the nodes per dimension (always strictly fewer);
        the difference of the two log-likelihoods estimates the integration error of the coarse one and bounds
        that of this one. None for simulation rules, or with ``coarse_reason`` saying why there is none.
    coarse_reason : str or None
        Why a deterministic rule has no coarse companion (so no error estimate), else None.
    """

    z: torch.Tensor
    log_weights: torch.Tensor
    kind: str
    coarse: IntegrationRule | None = None
    coarse_reason: str | None = None

    @property
    def n_points(self) -> int:
        return int(self.z.shape[1])

    @property
    def shared(self) -> bool:
        return self.z.shape[0] == 1

    def for_units(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Points for a subset of units: shape (len(index), R, D), or (1, R, D) when shared."""
        return self.z if self.shared else self.z[index]

    def to(self, device) -> IntegrationRule:
        """The rule with its points and weights (and its coarse companion's) on ``device``, moved once."""
        return replace(self, z=self.z.to(device), log_weights=self.log_weights.to(device),
                       coarse=None if self.coarse is None else self.coarse.to(device))


def check_draws(n_draws, name="draws"):
    """Raise a ValueError naming ``name`` unless ``n_draws`` is a positive integer."""
    if isinstance(n_draws, bool) or not isinstance(n_draws, (int, np.integer)) or n_draws < 1:
        raise ValueError(f"{name} must be a positive integer, got {n_draws!r}")


def _uniform_to_normal(u: np.ndarray, dtype) -> torch.Tensor:
    # Keep points strictly inside (0, 1): a Halton or Sobol point can be exactly 0.
    eps = np.finfo(np.float64).eps
    return std_normal_icdf(torch.as_tensor(np.clip(u, eps, 1 - eps), dtype=torch.float64)).to(dtype)


def _halton(n_units, n_draws, dim, rng):
    # Train's construction: one long scrambled sequence cut into consecutive blocks, one block per unit.
    # Scrambling (random digit permutations) removes the correlation of plain Halton in higher dimensions.
    seed = int(rng.integers(2**31))
    sampler = qmc.Halton(d=dim, scramble=True, seed=seed)
    sampler.fast_forward(10)  # the first points of a Halton sequence cluster near the origin
    u = sampler.random(n_units * n_draws)
    return u.reshape(n_units, n_draws, dim)


def _halton_plain(n_units, n_draws, dim, rng):
    # The classic construction of Train, mlogit and xlogit, for replicating published results: unscrambled
    # Halton with primes 2, 3, 5, ..., the first 100 points dropped, consecutive blocks per unit. Not random
    # (the seed is unused); its dimensions correlate for large primes, so prefer "halton" beyond ~8 dimensions.
    sampler = qmc.Halton(d=dim, scramble=False)
    sampler.fast_forward(100)  # drop the first 100 points (the origin among them), as Train does
    return sampler.random(n_units * n_draws).reshape(n_units, n_draws, dim)


def _sobol(n_units, n_draws, dim, rng):
    # One Owen-scrambled Sobol net, randomized independently for every unit by a random digital shift (XOR of
    # the binary digits): a digitally shifted net is still a net, so each unit gets a full low-discrepancy set,
    # and the independent shifts keep the units' simulation errors independent. Far cheaper than one
    # scrambled sequence per unit.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # balance warning when n_draws is not a power of two
        base = qmc.Sobol(d=dim, scramble=True, seed=int(rng.integers(2**31))).random(n_draws)
    bits = 52
    base_int = (base * 2.0**bits).astype(np.uint64)
    shift = rng.integers(0, 2**bits, size=(n_units, 1, dim), dtype=np.uint64)
    # Centre each point in its cell of width 2^-52 so no coordinate is exactly 0.
    return ((base_int[None] ^ shift).astype(np.float64) + 0.5) / 2.0**bits


def _mlhs(n_units, n_draws, dim, rng):
    # Modified Latin hypercube (Hess, Train and Polak 2006): a randomly shifted grid, shuffled per dimension.
    shift = rng.random((n_units, 1, dim))
    grid = (np.arange(n_draws)[None, :, None] + shift) / n_draws
    grid = np.broadcast_to(grid, (n_units, n_draws, dim)).copy()
    return rng.permuted(grid, axis=1)


def _gauss_legendre_composite_1d(n_nodes: int, half_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre rule for E[g(Z)], Z ~ N(0,1), truncated to [-half_width, half_width].

    Panels of :data:`QUADRATURE_PANEL_ORDER` nodes (``round(n_nodes / order)`` of them) from ``2 * order``
    nodes on; below that one panel of exactly ``n_nodes`` nodes, so a small rule has the nodes it was asked for.
    """
    order = QUADRATURE_PANEL_ORDER
    if n_nodes < 2 * order:
        order, panels = n_nodes, 1
    else:
        panels = round(n_nodes / order)
    x, w = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(-half_width, half_width, panels + 1)
    half = 0.5 * (edges[1:] - edges[:-1])
    mid = 0.5 * (edges[1:] + edges[:-1])
    nodes = (mid[:, None] + half[:, None] * x[None, :]).ravel()
    weights = (half[:, None] * w[None, :]).ravel() * np.exp(-0.5 * nodes**2) / math.sqrt(2 * math.pi)
    return nodes, weights


def _gauss_hermite_1d(n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Hermite rule (probabilists') for E[g(Z)], Z ~ N(0,1)."""
    x, w = np.polynomial.hermite_e.hermegauss(n_nodes)
    return x, w / math.sqrt(2 * math.pi)


def _tensor_product(nodes: np.ndarray, weights: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    grids = np.meshgrid(*([nodes] * dim), indexing="ij")
    pts = np.stack([g.ravel() for g in grids], axis=-1)
    wgrid = np.meshgrid(*([weights] * dim), indexing="ij")
    w = np.prod(np.stack([g.ravel() for g in wgrid], axis=-1), axis=-1)
    return pts, w


def deterministic_rule(kind: str, n_points: int, dim: int, dtype=torch.float64, _with_coarse=True,
                       name: str = "draws"):
    """A shared-node rule with about ``n_points`` nodes in total (``n_points**(1/dim)`` per dimension).

    ``kind="gauss-hermite"``: plain Gauss-Hermite. Cheap, but slow to converge when the integrand is nearly a
    step in the coefficient (large attribute values, long panels).
    ``kind="quadrature"``: composite Gauss-Legendre with panels of :data:`QUADRATURE_PANEL_ORDER` nodes on
    ``[-8.5, 8.5]`` per dimension; robust for steep integrands. Either carries a ``coarse`` companion rule with
    about half the nodes per dimension (strictly fewer nodes than this rule) for the error estimate; where no
    coarser rule exists, ``coarse`` is None and ``coarse_reason`` says so. ``n_points`` is the number of nodes
    actually used. ``name`` is the argument that gave ``n_points``, for the error when the rule is too large.
    """
    if kind not in DETERMINISTIC:
        raise ValueError(f"draw_type {kind!r} is not a deterministic rule; accepted: {', '.join(DETERMINISTIC)}")
    if dim > 2:
        raise ValueError(
            f"draw_type={kind!r} supports 1 or 2 random coefficients (tensor-product rule), got {dim}; "
            "use draw_type='sobol' or 'halton' for more"
        )
    per_dim = max(2, round(n_points ** (1.0 / dim)))
    check_rule_size(per_dim**dim, 1, dim, name)
    x, w = _rule_1d(kind, per_dim)
    pts, wts = _tensor_product(x, w, dim)
    coarse, reason = None, None
    if _with_coarse:
        # The companion must have strictly fewer nodes, or the error estimate would be a false 0.
        n_coarse = len(x) // 2
        if n_coarse < 1:
            reason = f"a {len(x)}-node rule per dimension has no coarser companion"
        else:
            xc, wc = _rule_1d(kind, n_coarse)
            ptc, wtc = _tensor_product(xc, wc, dim)
            coarse = IntegrationRule(z=torch.as_tensor(ptc, dtype=dtype).unsqueeze(0),
                                     log_weights=torch.log(torch.as_tensor(wtc, dtype=dtype)), kind=kind)
    return IntegrationRule(
        z=torch.as_tensor(pts, dtype=dtype).unsqueeze(0),
        log_weights=torch.log(torch.as_tensor(wts, dtype=dtype)),
        kind=kind,
        coarse=coarse,
        coarse_reason=reason,
    )


def _rule_1d(kind: str, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    if kind == "gauss-hermite":
        return _gauss_hermite_1d(n_nodes)
    return _gauss_legendre_composite_1d(n_nodes, QUADRATURE_HALF_WIDTH)


def check_rule_size(n_points: int, n_units: int, dim: int, name: str = "draws") -> None:
    """Refuse a rule whose points (``n_units * n_points * dim`` float64 values) would exceed
    :data:`mixlogit.budget.MAX_RULE_BYTES`, naming the argument, the estimated size and the limit."""
    size = 8 * int(n_points) * int(n_units) * max(1, int(dim))
    if size > MAX_RULE_BYTES:
        raise ValueError(
            f"{name}={n_points} needs about {size / 2**30:.3g} GiB for the integration points "
            f"({n_units} units x {n_points} points x {dim} dimensions, float64); the limit is "
            f"{MAX_RULE_BYTES / 2**30:.3g} GiB: use fewer {name}"
        )


def make_rule(
    draw_type: str,
    n_units: int,
    n_draws: int,
    dim: int,
    *,
    seed: int | None = 0,
    antithetic: bool = False,
    dtype=torch.float64,
) -> IntegrationRule:
    """Build the integration rule for ``dim`` random coefficients.

    Parameters
    ----------
    draw_type : one of :data:`DRAW_TYPES`.
    n_units : number of units that get their own draws (persons for panel data, else choice situations).
    n_draws : draws per unit, or total nodes for a deterministic rule.
    dim : number of independent standard normal dimensions.
    seed : seed of every random choice (scrambling, shifts, pseudo-random draws).
    antithetic : pair every draw ``z`` with ``-z`` (simulation rules only; ``n_draws`` must be even).

    Returns
    -------
    IntegrationRule with ``z`` of shape (n_units, n_draws, dim), or (1, R, dim) for deterministic rules.
    """
    if draw_type not in DRAW_TYPES:
        raise ValueError(f"unknown draw_type {draw_type!r}; accepted: {', '.join(DRAW_TYPES)}")
    check_draws(n_draws)
    check_bool("antithetic", antithetic)
    if draw_type in DETERMINISTIC:
        if antithetic:
            raise ValueError(f"antithetic=True applies to simulation draws, not to draw_type={draw_type!r}")
        return deterministic_rule(draw_type, n_draws, dim, dtype)
    if antithetic and n_draws % 2:
        raise ValueError(f"antithetic=True needs an even number of draws, got draws={n_draws}")
    check_rule_size(n_draws, n_units, dim)
    base = n_draws // 2 if antithetic else n_draws
    rng = np.random.default_rng(seed)
    if draw_type == "pseudo":
        gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
        z = torch.randn(n_units, base, dim, generator=gen, dtype=torch.float64).to(dtype)
    else:
        makers = {"halton": _halton, "halton-plain": _halton_plain, "sobol": _sobol, "mlhs": _mlhs}
        u = makers[draw_type](n_units, base, dim, rng)
        z = _uniform_to_normal(u, dtype)
    if antithetic:
        z = torch.cat([z, -z], dim=1)
    log_w = torch.full((n_draws,), -math.log(n_draws), dtype=dtype)
    return IntegrationRule(z=z, log_weights=log_w, kind=draw_type)
