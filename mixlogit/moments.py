"""Differentiable summaries of the coefficient distributions and the delta method.

Moments are computed from each distribution's transform with the composite quadrature rule of
:mod:`mixlogit.draws`, so every family (including truncated and censored ones) is handled by one code path and
autograd gives the Jacobians the delta method needs.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .draws import deterministic_rule
from .spec import Spec

#: Nodes of the 1-D rule used for moments and quantiles of coefficient distributions.
MOMENT_NODES = 2048


@lru_cache(maxsize=1)
def _moment_rule():
    rule = deterministic_rule("quadrature", MOMENT_NODES, 1)
    z = rule.z[0, :, 0]
    return z, torch.exp(rule.log_weights)


def marginal_transform(spec: Spec, theta: torch.Tensor, k: int, z: torch.Tensor) -> torch.Tensor:
    """Random coefficient ``k`` at standard normal points ``z`` (any shape): the transform of its marginal
    distribution. theta: (P,). A correlated normal coefficient has a normal marginal with sd
    ``sqrt((L L')_kk)``; every other family applies its own transform. ``k = Kr`` (one past the random
    coefficients) is a random scale: lognormal with sd ``tau`` of its log and mean one."""
    sl = spec.slices()
    if spec.scale and k == spec.n_random:
        tau = theta[sl["scale"]][0]
        return torch.exp(tau * z - 0.5 * tau * tau)
    loc = theta[sl["loc"]][k]
    if k in spec.corr_index:
        L = spec.cholesky(theta)
        i = spec.corr_index.index(k)
        return loc + torch.sqrt((L[i] ** 2).sum()) * z
    return spec.dists[k].transform(loc, theta[sl["spread"]][k], z)


def marginal_draws(spec: Spec, theta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadrature nodes of the marginal distribution of random coefficient ``k``.

    Returns (beta_nodes (M,), weights (M,)) such that ``E[g(beta_k)] ~= sum w g(beta)``.
    """
    z, w = _moment_rule()
    return marginal_transform(spec, theta, k, z), w


def coefficient_mean_sd(spec: Spec, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Population mean and sd of every random coefficient: two (Kr,) tensors, differentiable in theta."""
    means, sds = [], []
    for k in range(spec.n_random):
        b, w = marginal_draws(spec, theta, k)
        m = (w * b).sum()
        means.append(m)
        sds.append(torch.sqrt(((w * (b - m) ** 2).sum()).clamp_min(0.0)))
    if not means:
        e = torch.zeros(0, dtype=theta.dtype)
        return e, e
    return torch.stack(means), torch.stack(sds)


def delta_method(fn, theta: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of ``fn(theta)`` (a (M,) tensor function) and their delta-method standard errors."""
    th = torch.as_tensor(theta, dtype=torch.float64)
    val = fn(th).detach().numpy()
    jac = torch.autograd.functional.jacobian(fn, th).numpy().reshape(len(val), len(th))
    var = np.einsum("ij,jk,ik->i", jac, cov, jac)
    return val, np.sqrt(np.clip(var, 0.0, None))
