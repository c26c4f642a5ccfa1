"""Model specification: which columns have fixed or random coefficients, and the parameter vector layout.

The parameter vector ``theta`` is laid out as ``[asc.*, fixed, random locations, sd.*, chol.*, sd.scale]`` and
:meth:`Spec.coefficients` maps it and standard normal draws to coefficient draws. Keeping this map in one
place lets MSL, the Bayesian estimators, prediction and individual-level estimates share it.

A random *scale* (``scale="lognormal"``, the scale-heterogeneity logit S-MNL of Fiebig, Keane, Louviere and Wasi
2010) multiplies every coefficient of a unit, fixed ones and constants included:
``U_nj = s_n (beta_n' x_nj) + eps_nj`` with ``s_n = exp(tau z_n - tau^2 / 2)``, so that ``E[s_n] = 1`` and
``tau = sd.scale`` is the sd of ``log s_n``. Its standard normal draw is the last column of the draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .distributions import get_distribution

#: Values accepted by ``MixedLogit(scale=...)``: None (no random scale) or a lognormal scale with mean one.
SCALE_FAMILIES = ("lognormal",)


def check_scale(scale) -> str | None:
    """``scale`` when it is None or one of :data:`SCALE_FAMILIES`; otherwise an error listing them."""
    if scale is not None and (not isinstance(scale, str) or scale not in SCALE_FAMILIES):
        raise ValueError(f"unknown scale {scale!r}; accepted: None (no random scale) or "
                         f"{', '.join(map(repr, SCALE_FAMILIES))}")
    return scale


@dataclass
class Spec:
    """A validated model specification.

    Attributes
    ----------
    random : dict column -> distribution name, in model order.
    fixed : fixed-coefficient columns (the ``asc.<alt>`` dummies first).
    correlated : random columns whose normal draws are correlated through a Cholesky factor.
    scale : None, or ``"lognormal"`` for a random scale of the whole utility (parameter ``sd.scale``).
    """

    random: dict[str, str]
    fixed: list[str]
    correlated: list[str] = field(default_factory=list)
    scale: str | None = None

    def __post_init__(self):
        check_scale(self.scale)
        self.dists = [get_distribution(d, where=f"random coefficient {c!r}") for c, d in self.random.items()]
        self.random_names = list(self.random)
        idx = {c: i for i, c in enumerate(self.random_names)}
        self.corr_index = [idx[c] for c in self.correlated]
        self.indep_index = [i for i, c in enumerate(self.random_names) if c not in self.correlated]
        # Strictly lower-triangular pairs (row a, column b) of the Cholesky factor among correlated columns.
        self.chol_pairs = [(a, b) for a in range(len(self.correlated)) for b in range(a)]

    # ------------------------------------------------------------------ layout
    @property
    def n_random(self) -> int:
        return len(self.random)

    @property
    def n_fixed(self) -> int:
        return len(self.fixed)

    @property
    def n_draw_dims(self) -> int:
        """Columns of the standard normal draws: one per random coefficient, plus one for a random scale."""
        return self.n_random + (1 if self.scale else 0)

    @property
    def heterogeneity_names(self) -> list[str]:
        """Rows of the heterogeneity table: the random coefficients, then ``scale`` for a random scale."""
        return self.random_names + (["scale"] if self.scale else [])

    @property
    def param_names(self) -> list[str]:
        return (
            list(self.fixed)
            + self.random_names
            + [f"sd.{c}" for c in self.random_names]
            + [f"chol.{self.correlated[a]}.{self.correlated[b]}" for a, b in self.chol_pairs]
            + (["sd.scale"] if self.scale else [])
        )

    @property
    def n_params(self) -> int:
        return self.n_fixed + 2 * self.n_random + len(self.chol_pairs) + (1 if self.scale else 0)

    def slices(self) -> dict[str, slice]:
        kf, kr = self.n_fixed, self.n_random
        return {
            "fixed": slice(0, kf),
            "loc": slice(kf, kf + kr),
            "spread": slice(kf + kr, kf + 2 * kr),
            "chol": slice(kf + 2 * kr, kf + 2 * kr + len(self.chol_pairs)),
            "scale": slice(kf + 2 * kr + len(self.chol_pairs), self.n_params),
        }

    # ------------------------------------------------------------------ maps
    def fixed_coefficients(self, theta: torch.Tensor) -> torch.Tensor:
        """theta: (P,) or (U, P). Returns (Kf,) or (U, Kf)."""
        return theta[..., self.slices()["fixed"]]

    def cholesky(self, theta: torch.Tensor) -> torch.Tensor:
        """Lower-triangular factor of the correlated block: (..., Kc, Kc); diagonal = their ``sd.*``."""
        sl = self.slices()
        kc = len(self.corr_index)
        spread = theta[..., sl["spread"]][..., self.corr_index]
        chol = theta[..., sl["chol"]]
        L = torch.diag_embed(spread)
        if self.chol_pairs:
            # Place the off-diagonal entries with a constant one-hot tensor: no in-place writes, so autograd
            # and vmap (vectorized Hessians) see a plain differentiable expression.
            place = torch.zeros(len(self.chol_pairs), kc, kc, dtype=theta.dtype, device=theta.device)
            for p, (a, b) in enumerate(self.chol_pairs):
                place[p, a, b] = 1.0
            L = L + torch.einsum("...p,pij->...ij", chol, place)
        return L

    def coefficients(self, theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Random-coefficient draws.

        theta : (P,) shared, or (U, P) one copy per unit (used to get per-unit scores by autograd).
        z : (U, R, Kr) or (1, R, Kr) standard normal draws.
        Returns (U', R, Kr) with U' the broadcast of the two leading sizes.
        """
        sl = self.slices()
        th = theta if theta.dim() == 2 else theta.unsqueeze(0)
        if not self.n_random:
            return torch.zeros(max(th.shape[0], z.shape[0]), z.shape[1], 0, dtype=theta.dtype, device=theta.device)
        loc = th[:, sl["loc"]].unsqueeze(1)  # (U, 1, Kr)
        spread = th[:, sl["spread"]].unsqueeze(1)
        cols = []
        for k, dist in enumerate(self.dists):
            if k in self.corr_index:
                cols.append(None)
            else:
                cols.append(dist.transform(loc[..., k], spread[..., k], z[..., k]))
        if self.corr_index:
            L = self.cholesky(th)  # (U, Kc, Kc)
            zc = z[..., self.corr_index]  # (U, R, Kc)
            bc = loc[..., self.corr_index] + zc @ L.transpose(-1, -2)
            for i, k in enumerate(self.corr_index):
                cols[k] = bc[..., i]
        return torch.stack(cols, dim=-1)

    def all_coefficients(self, theta: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Random-coefficient draws with the fixed coefficients appended, to match :attr:`Design.x_diff`.

        theta : (P,) or (S, P); beta : (U, S', Kr) draws with S' = S (one theta per draw) or any S' for a
        shared theta. Returns (U, S', Kr + Kf), so one kernel call covers draws that differ in the fixed part.
        """
        bf = self.fixed_coefficients(theta)
        bf = bf.expand(beta.shape[0], beta.shape[1], self.n_fixed) if bf.dim() == 1 else \
            bf.unsqueeze(0).expand(beta.shape[0], -1, -1)
        return torch.cat([beta, bf], -1)

    def scale_draws(self, theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        """Draws of the random scale ``s = exp(tau z_s - tau^2 / 2)`` (mean one), or None without one.

        theta : (P,) or (U, P); z : (U, R, D) or (1, R, D) standard normal draws, the scale's in the last column.
        Returns (U', R) with U' the broadcast of the two leading sizes.
        """
        if not self.scale:
            return None
        th = theta if theta.dim() == 2 else theta.unsqueeze(0)
        tau = th[:, self.slices()["scale"]]  # (U, 1)
        return torch.exp(tau * z[..., -1] - 0.5 * tau * tau)

    def scaled_coefficients(self, theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Every coefficient per draw, random ones then fixed ones (the column order of :attr:`Design.x_diff`),
        times the unit's scale draw when the model has a random scale.

        theta : (P,) or (U, P); z : (U, R, D) or (1, R, D). Returns (U', R, Kr + Kf).
        """
        beta = self.coefficients(theta, z)  # (U', R, Kr)
        bf = self.fixed_coefficients(theta)
        u, r = max(beta.shape[0], bf.shape[0] if bf.dim() == 2 else 1), z.shape[1]
        bf = bf.expand(u, r, self.n_fixed) if bf.dim() == 1 else bf.unsqueeze(1).expand(u, r, self.n_fixed)
        full = torch.cat([beta.expand(u, r, self.n_random), bf], -1)
        s = self.scale_draws(theta, z)
        return full if s is None else full * s.unsqueeze(-1)

    def to_dict(self) -> dict:
        out = {"random": dict(self.random), "fixed": list(self.fixed), "correlated": list(self.correlated)}
        if self.scale:
            out["scale"] = self.scale
        return out
