"""Posterior draws behind a Bayesian result: from a fitted guide (SVI), from MCMC chains (NUTS), or read back
from a results file. Every sampler answers ``chains(n, seed, individual)`` and ``draw_theta(n, seed)``."""

from __future__ import annotations

import numpy as np
import torch

from ..budget import chunk_size


class SVISampler:
    """Draws from a fitted variational guide (globals, then each unit's coefficients given the globals)."""

    kind = "svi"

    def __init__(self, guide):
        self.guide = guide
        self.hm = guide.hm

    def _ctx(self):
        import pyro

        return pyro.settings.context(module_local_params=True)

    def draw_globals(self, n: int, seed: int):
        """n draws of the natural globals."""
        with self._ctx(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.guide.sample_globals(n)

    def draw_theta(self, n: int, seed: int = 0) -> np.ndarray:
        return self.hm.theta(self.draw_globals(n, seed)).numpy()

    def _units_chunk(self, n: int) -> int:
        k = max(1, self.hm.K)
        return chunk_size(n * k * k)

    def chains(self, n: int, seed: int = 0, individual: bool = True):
        """theta (1, n, P) and individual coefficients (1, n, N, K) (or None)."""
        g = self.draw_globals(n, seed)
        theta = self.hm.theta(g)
        beta = None
        if individual and self.hm.K:
            beta = torch.empty(n, self.hm.n_units, self.hm.K, dtype=theta.dtype)
            size = self._units_chunk(n)
            with self._ctx(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed) + 1)
                for s in range(0, self.hm.n_units, size):
                    c = slice(s, min(s + size, self.hm.n_units))
                    z = self.guide.sample_z(g, c)  # (n, B, K)
                    beta[:, c] = self.hm.spec.coefficients(theta, z)
            beta = beta.numpy()[None]
        return theta.numpy()[None], beta

    def individual_moments(self, n: int = 200, seed: int = 0):
        """Posterior mean and sd of every unit's random coefficients: two (N, K) arrays."""
        if not self.hm.K:
            return None, None
        g = self.draw_globals(n, seed)
        theta = self.hm.theta(g)
        N, K = self.hm.n_units, self.hm.K
        mean, sd = np.empty((N, K)), np.empty((N, K))
        size = self._units_chunk(n)
        with self._ctx(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) + 1)
            for s in range(0, N, size):
                c = slice(s, min(s + size, N))
                z = self.guide.sample_z(g, c)
                b = self.hm.spec.coefficients(theta, z)  # (n, B, K)
                mean[c] = b.mean(0).numpy()
                sd[c] = b.std(0).numpy()
        return mean, sd


class NUTSSampler:
    """Stored MCMC draws: theta (C, S, P) and z (C, S, N, K) (or None)."""

    kind = "nuts"

    def __init__(self, hm, theta: torch.Tensor, z: torch.Tensor | None):
        self.hm, self.theta, self.z = hm, theta, z

    def _beta(self, theta, z):  # theta (..., P), z (..., N, K)
        shape = theta.shape[:-1]
        th = theta.reshape(-1, theta.shape[-1])
        zz = z.reshape(-1, *z.shape[-2:])
        return self.hm.spec.coefficients(th, zz).reshape(*shape, *zz.shape[-2:])

    def chains(self, n: int | None = None, seed: int = 0, individual: bool = True):
        C, S = self.theta.shape[:2]
        idx = np.arange(S)
        if n is not None and n < C * S:
            per = max(1, n // C)
            idx = np.unique(np.linspace(0, S - 1, per).round().astype(int))
        theta = self.theta[:, idx]
        beta = None
        if individual and self.z is not None:
            beta = self._beta(theta, self.z[:, idx]).numpy()
        return theta.numpy(), beta

    def draw_theta(self, n: int, seed: int = 0) -> np.ndarray:
        flat = self.theta.reshape(-1, self.theta.shape[-1]).numpy()
        return _subsample_rows(flat, n, seed)

    def individual_moments(self):
        if self.z is None:
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
    """Population draws read back from a results file (no individual draws)."""

    kind = "stored"

    def __init__(self, draws: np.ndarray):
        self.draws = draws

    def chains(self, n: int | None = None, seed: int = 0, individual: bool = True):
        C, S = self.draws.shape[:2]
        idx = np.arange(S)
        if n is not None and n < C * S:
            idx = np.unique(np.linspace(0, S - 1, max(1, n // C)).round().astype(int))
        return self.draws[:, idx], None

    def draw_theta(self, n: int, seed: int = 0) -> np.ndarray:
        return _subsample_rows(self.draws.reshape(-1, self.draws.shape[-1]), n, seed)


def _subsample_rows(flat: np.ndarray, n: int, seed: int) -> np.ndarray:
    if n > len(flat):
        raise ValueError(f"n={n} exceeds the {len(flat)} stored posterior draws")
    idx = np.sort(np.random.default_rng(seed).choice(len(flat), size=n, replace=False))
    return flat[idx]
