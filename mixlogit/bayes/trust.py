"""The trust check of a variational fit: the Pareto k of the importance ratios p/q (Yao, Vehtari, Simpson and
Gelman 2018, "Yes, but did it work?: Evaluating variational inference").

``q`` is the guide's marginal over the population parameters (whitened, :mod:`mixlogit.bayes.model`) and
``log p = log prior + log p(y | globals)``, the units' coefficients integrated out by the kernel's simulated
marginal likelihood on fixed draws (:class:`mixlogit.bayes.marginal.MarginalLikelihood`). ArviZ's PSIS
(``arviz.psislw``) fits a generalized Pareto distribution to the largest ratios of ``n`` draws from ``q``; its
shape ``k`` says how heavy the tail of p/q is:

- ``k < 0.5``: the guide is a good approximation of the posterior;
- ``0.5 <= k < 0.7``: usable (the guide misses some of the posterior's shape, and importance-weighted
  estimates would still converge at a practical rate);
- ``k >= 0.7``: not usable: the guide misses a part of the posterior that matters, and no reweighting of its
  draws repairs that (the importance-weighted estimates themselves become unreliable). A fit with such a ``k``
  warns and suggests NUTS; its draws are left as the guide gives them rather than reweighted, so that nothing
  presents a failed approximation as a corrected one.

Loads without Pyro (results read from a file carry their check).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Draws of the guide the check uses by default (each costs one evaluation of the marginal likelihood).
TRUST_DRAWS = 200
#: The Pareto k from which a guide cannot be used (Yao et al. 2018), and below which it is good.
K_UNUSABLE, K_GOOD = 0.7, 0.5


@dataclass(frozen=True)
class TrustCheck:
    """The Pareto k of ``p/q`` over ``draws`` draws of the guide, and the marginal likelihood's points per unit."""

    pareto_k: float
    draws: int
    points: int

    @property
    def usable(self) -> bool:
        """True when ``k < 0.7``."""
        return bool(self.pareto_k < K_UNUSABLE)

    def reading(self) -> str:
        """The usual reading of ``k``, in words."""
        if self.pareto_k < K_GOOD:
            return "k < 0.5: good"
        if self.pareto_k < K_UNUSABLE:
            return "0.5 <= k < 0.7: usable"
        return "k >= 0.7: not usable, refit with method='nuts'"

    def __str__(self) -> str:
        return (f"Pareto k of p/q = {self.pareto_k:.3f} over {self.draws} draws of the guide ({self.reading()}; "
                f"p with {self.points} importance points per unit)")

    def to_dict(self) -> dict:
        return {"pareto_k": self.pareto_k, "draws": self.draws, "points": self.points}

    @classmethod
    def from_dict(cls, d: dict | None) -> TrustCheck | None:
        return None if d is None else cls(float(d["pareto_k"]), int(d["draws"]), int(d["points"]))


def pareto_k(log_ratios: np.ndarray) -> tuple[np.ndarray, float]:
    """ArviZ's PSIS of log importance ratios (n,): smoothed, normalized log weights (n,) and the Pareto k."""
    import arviz as az

    log_ratios = np.asarray(log_ratios, dtype=float)
    if not np.all(np.isfinite(log_ratios)):
        raise ValueError("the log importance ratios of the trust check are not all finite")
    lw, k = az.psislw(log_ratios - log_ratios.max())
    return np.asarray(lw), float(np.asarray(k))


def trust_check(guide, likelihood, draws: int = TRUST_DRAWS, seed: int = 0) -> TrustCheck:
    """The trust check of a fitted guide (one with ``globals``, a Pyro autoguide on the whitened population
    parameters, and ``param_context()``), with ``likelihood`` (:class:`~mixlogit.bayes.marginal.MarginalLikelihood`)
    giving ``log p`` at ``draws`` draws of the guide."""
    with guide.param_context(), torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(seed))
        q = guide.globals.get_posterior()
        u = q.sample((draws,))
        log_q = q.log_prob(u).numpy()
    _, k = pareto_k(likelihood.log_density(u) - log_q)
    return TrustCheck(pareto_k=k, draws=int(draws), points=int(likelihood.n_points))
