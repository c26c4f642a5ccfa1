"""Pointwise quantities for model checking: per-unit log-likelihoods at parameter draws and replicated
choices (posterior or asymptotic predictive), all through the one kernel of :mod:`mixlogit.kernel`.

Inputs are a Spec, a Design and parameter draws in the Spec layout; nothing here knows which estimator made
the draws.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..budget import chunk_size
from ..data import ChoiceData, Design
from ..draws import make_rule
from ..kernel import choice_probabilities, conditional_loglik, log_mixed_prob
from ..spec import Spec


def situations(data: ChoiceData, design: Design) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every choice situation in table order of the chosen rows: (unit position, situation position within
    the unit, situation label, chosen alternative code), four (n_situations,) arrays."""
    rows = np.flatnonzero(data.row_chosen)
    return (design.row_unit[rows].numpy(), design.row_t[rows].numpy(),
            data.df[data.situation].to_numpy()[rows], design.row_j[rows].numpy())


def marginal_loglik(spec: Spec, design: Design, theta_draws: np.ndarray, draws: int = 100,
                    seed: int = 0) -> np.ndarray:
    """log P_n(theta_s) per draw s and unit n, integrating each unit's coefficients with ``draws`` Halton
    draws (the same draws for every theta_s): (S, N). Unweighted."""
    th = torch.as_tensor(np.asarray(theta_draws, dtype=float), dtype=torch.float64)
    S, N = th.shape[0], design.n_units
    x = design.x_diff
    avail = design.avail_diff if design.has_unavailable else None
    D = spec.n_draw_dims  # random coefficients, and a random scale
    out = np.empty((S, N))
    R = draws if D else 1
    rule = make_rule("halton", N, draws, D, seed=seed) if D else None
    per = x.shape[1] * x.shape[2] * R
    # Units and parameter draws are both chunked: the kernel's tensor is (units, draws x R, T, A).
    unit_chunk = chunk_size(per, N)
    draw_chunk = chunk_size(per * unit_chunk)
    lw = torch.full((R,), -math.log(R), dtype=torch.float64)
    with torch.no_grad():
        for u0 in range(0, N, unit_chunk):
            c = slice(u0, min(u0 + unit_chunk, N))
            n = c.stop - c.start
            z = rule.z[c] if D else th.new_zeros(n, 1, 0)
            for s0 in range(0, S, draw_chunk):
                ths = th[s0:s0 + draw_chunk]
                betas = [spec.scaled_coefficients(t, z).expand(n, R, -1) for t in ths]
                beta = torch.cat(betas, 1)  # (n, s*R, K + Kf)
                cond = conditional_loglik(x[c], beta, avail=None if avail is None else avail[c],
                                          situation_mask=design.situation_mask[c])
                out[s0:s0 + len(ths), c] = log_mixed_prob(cond.reshape(n, len(ths), R), lw).T.numpy()
    return out


def conditional_loglik_draws(spec: Spec, design: Design, theta_draws: np.ndarray,
                             beta_draws: np.ndarray) -> np.ndarray:
    """sum_t log L_nt(beta_n^(s)) per draw s and unit n given individual coefficient draws (S, N, K) and the
    matching parameter draws (S, P) (for the fixed coefficients): (S, N)."""
    th = torch.as_tensor(np.asarray(theta_draws, dtype=float), dtype=torch.float64)
    bd = torch.as_tensor(np.asarray(beta_draws, dtype=float), dtype=torch.float64)
    S, N = bd.shape[:2]
    x = design.x_diff
    avail = design.avail_diff if design.has_unavailable else None
    out = np.empty((S, N))
    chunk = chunk_size(N * x.shape[1] * x.shape[2])
    with torch.no_grad():
        for s0 in range(0, S, chunk):
            b = bd[s0:s0 + chunk].transpose(0, 1)  # (N, s, K)
            cond = conditional_loglik(x, spec.all_coefficients(th[s0:s0 + chunk], b), avail=avail,
                                      situation_mask=design.situation_mask)
            out[s0:s0 + chunk] = cond.T.numpy()
    return out


def predictive_choices(spec: Spec, design: Design, situations, theta_draws: np.ndarray, beta_draws=None,
                       seed: int = 0) -> np.ndarray:
    """Replicated choices (alternative codes) of every situation per draw: (S, n_situations).

    ``situations`` is the output of :func:`situations`. With ``beta_draws`` (S, N, K) the units keep their own
    coefficients (posterior predictive of the same persons); without, every draw gets fresh coefficients from
    the population (new persons).
    """
    unit, t_pos = situations[0], situations[1]
    th = torch.as_tensor(np.asarray(theta_draws, dtype=float), dtype=torch.float64)
    S, N, K, D = th.shape[0], design.n_units, spec.n_random, spec.n_draw_dims
    x = design.x
    gen = torch.Generator().manual_seed(int(seed))
    out = np.empty((S, len(unit)), dtype=np.int64)
    lw = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        for s in range(S):
            if K and beta_draws is not None:
                br = torch.as_tensor(beta_draws[s], dtype=torch.float64).unsqueeze(1)
                b = spec.all_coefficients(th[s], br)
            else:  # fresh coefficients (and scale) from the population
                b = spec.scaled_coefficients(th[s], torch.randn(N, 1, D, generator=gen, dtype=torch.float64))
            p = choice_probabilities(x, b, lw, avail=design.avail)  # (N, T, J)
            p = p[unit, t_pos]
            u = torch.rand(p.shape[0], 1, generator=gen, dtype=p.dtype)
            out[s] = torch.searchsorted(torch.cumsum(p, -1), u).clamp_max(p.shape[-1] - 1).squeeze(-1).numpy()
    return out
