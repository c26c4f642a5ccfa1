"""Posterior draws behind a Bayesian result: from a fitted guide (SVI), from MCMC chains (NUTS), or read back
from a results file. Every sampler answers ``chains(n, seed, individual)`` and ``draw_theta(n, seed)``."""

from __future__ import annotations

import numpy as np
import torch

from ..budget import chunk_size


def thin(total: int, n: int | None = None) -> np.ndarray:
    """Indices of about ``n`` of ``total`` draws, evenly spaced and in order (all of them when ``n`` is None or
    at least ``total``): thinning keeps the first and last draw and never repeats one."""
    if n is None or n >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, max(1, n)).round().astype(int))


def random_rows(total: int, n: int, seed: int, what: str = "stored posterior draws") -> np.ndarray:
    """Sorted indices of ``n`` of ``total`` draws picked at random without replacement; the error names
    ``what`` the draws are when there are fewer than ``n``."""
    if n > total:
        raise ValueError(f"n={n} exceeds the {total} {what}")
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))


class SVISampler:
    """Draws from a fitted variational guide (globals, then each unit's coefficients given the globals)."""

    kind = "svi"

    def __init__(self, guide):
        self.guide = guide
        self.hm = guide.hm

    def _ctx(self):
        return self.guide.param_context()

    def draw_globals(self, n: int, seed: int):
        """n draws of the natural globals."""
        with self._ctx(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.guide.sample_globals(n)

    def draw_theta(self, n: int, seed: int = 0) -> np.ndarray:
        return self.hm.theta(self.draw_globals(n, seed)).numpy()

    def _unit_coefficients(self, g, theta: torch.Tensor, seed: int):
        """Chunk by chunk of units: (units, coefficients (n, B, K)), every unit's coefficients drawn given each
        of the n global draws ``g`` (``theta`` (n, P): the same draws in the Spec layout)."""
        n, N, K = theta.shape[0], self.hm.n_units, max(1, self.hm.K)
        size = chunk_size(n * K * K)
        with self._ctx(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) + 1)
            for s in range(0, N, size):
                c = slice(s, min(s + size, N))
                z = self.guide.sample_z(g, c)  # (n, B, K)
                yield c, self.hm.spec.coefficients(theta, z)

    def chains(self, n: int, seed: int = 0, individual: bool = True):
        """theta (1, n, P) and individual coefficients (1, n, N, K) (or None)."""
        g = self.draw_globals(n, seed)
        theta = self.hm.theta(g)
        beta = None
        if individual and self.hm.K:
            beta = torch.empty(n, self.hm.n_units, self.hm.K, dtype=theta.dtype)
            for c, b in self._unit_coefficients(g, theta, seed):
                beta[:, c] = b
            beta = beta.numpy()[None]
        return theta.numpy()[None], beta

    def individual_moments(self, n: int = 200, seed: int = 0):
        """Posterior mean and sd of every unit's random coefficients: two (N, K) arrays."""
        if not self.hm.K:
            return None, None
        g = self.draw_globals(n, seed)
        theta = self.hm.theta(g)
        mean, sd = np.empty((self.hm.n_units, self.hm.K)), np.empty((self.hm.n_units, self.hm.K))
        for c, b in self._unit_coefficients(g, theta, seed):
            mean[c] = b.mean(0).numpy()
            sd[c] = b.std(0).numpy()
        return mean, sd


class NUTSSampler:
    """Stored MCMC draws: theta (C, S, P) and z (C, S, N, K) (or None), so that every draw of the population
    parameters comes with every unit's coefficients."""

    kind = "nuts"

    def __init__(self, hm, theta: torch.Tensor, z: torch.Tensor | None):
        self.hm, self.theta, self.z = hm, theta, z

    def _beta(self, theta, z):  # theta (..., P), z (..., N, K)
        shape = theta.shape[:-1]
        th = theta.reshape(-1, theta.shape[-1])
        zz = z.reshape(-1, *z.shape[-2:])
        return self.hm.spec.coefficients(th, zz).reshape(*shape, *zz.shape[-2:])

    def chains(self, n: int | None = None, seed: int = 0, individual: bool = True):
        """About ``n`` draws of every chain, thinned evenly: theta (C, S', P) and, with ``individual``, every
        unit's coefficients (C, S', N, K) (or None)."""
        C, S = self.theta.shape[:2]
        idx = thin(S, None if n is None else n // C)
        theta = self.theta[:, idx]
        beta = None
        if individual and self.z is not None:
            beta = self._beta(theta, self.z[:, idx]).numpy()
        return theta.numpy(), beta

    def draw_theta(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` draws (n, P) picked at random from all chains."""
        flat = self.theta.reshape(-1, self.theta.shape[-1]).numpy()
        return flat[random_rows(len(flat), n, seed)]

    def individual_moments(self):
        if self.z is None or not self.hm.K:  # no random coefficients (a random scale alone has a z column)
            return None, None
        C, S = self.theta.shape[:2]
        sums = sq = 0.0
        for c in range(C):
            b = self._beta(self.theta[c], self.z[c])  # (S, N, K)
            sums = sums + b.sum(0)
            sq = sq + (b ** 2).sum(0)
        n = C * S
        mean = sums / n
        var = (sq - n * mean ** 2) / max(1, n - 1)
        return mean.numpy(), var.clamp_min(0).sqrt().numpy()


class StoredSampler:
    """Population draws (C, S, P) read back from a results file (no individual draws)."""

    kind = "stored"

    def __init__(self, draws: np.ndarray):
        self.draws = draws

    def chains(self, n: int | None = None, seed: int = 0, individual: bool = True):
        """About ``n`` draws of every chain, thinned evenly (all of them when ``n`` is None): (C, S', P) and
        None."""
        C, S = self.draws.shape[:2]
        return self.draws[:, thin(S, None if n is None else n // C)], None

    def draw_theta(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` draws (n, P) picked at random from all chains."""
        flat = self.draws.reshape(-1, self.draws.shape[-1])
        return flat[random_rows(len(flat), n, seed)]
