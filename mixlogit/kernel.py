"""The one kernel: log of the expectation of (a product of) logit choice probabilities over coefficient draws.

Everything that integrates a logit probability over a coefficient distribution goes through
:func:`conditional_loglik` and :func:`log_mixed_prob`: the MSL estimator, individual-level estimates,
prediction, the Bayesian estimators' checks, and the MixDPO loss in :mod:`alignment` (a binary logit whose one
random coefficient is the preference strength and whose one attribute is the DPO margin).

Conventions. Units ``n`` (persons, or choice situations without a panel) have up to ``T`` situations; in each,
the chosen alternative is set apart and the kernel sees only the ``A`` others through utility *differences*
``x_diff = x_alt - x_chosen``. Then ``log L_nt(beta) = -log(1 + sum_a exp(beta' x_diff_nta))``, computed in a
numerically stable way; log-probabilities are summed over situations and combined over draws by logsumexp,
never by multiplying raw probabilities.
"""

from __future__ import annotations

import math

import torch


def _utility_diff(x_diff: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Utility differences per draw.

    x_diff: (N, T, A, K); beta: (N, R, K) or (1, R, K). Returns (N, T, A, R).
    """
    n, t, a, k = x_diff.shape
    if beta.shape[0] == 1:
        v = x_diff.reshape(n * t * a, k) @ beta[0].transpose(0, 1)  # (NTA, R)
    else:
        v = torch.bmm(x_diff.reshape(n, t * a, k), beta.transpose(1, 2))  # (N, TA, R)
    return v.reshape(n, t, a, -1)


def log_logit_chosen(v_diff: torch.Tensor, avail: torch.Tensor | None = None) -> torch.Tensor:
    """Log logit probability of the chosen alternative from utility differences.

    v_diff: (..., A, R) utilities of the non-chosen alternatives minus the chosen one's.
    avail: (..., A) bool, False for alternatives that were not available (or padding), or None.
    Returns (..., R): ``-log(1 + sum_a exp(v_diff_a))``.
    """
    if avail is not None:
        v_diff = v_diff.masked_fill(~avail.unsqueeze(-1), float("-inf"))
    if v_diff.shape[-2] == 1:
        # softplus switches to the identity above `threshold`; torch's default of 20 costs 2e-9 in float64.
        threshold = 40.0 if v_diff.dtype == torch.float64 else 20.0
        return -torch.nn.functional.softplus(v_diff.squeeze(-2), threshold=threshold)
    # Largest exponent that cannot overflow the dtype even after summing A terms.
    safe = math.log(torch.finfo(v_diff.dtype).max) - math.log(v_diff.shape[-2] + 1) - 1.0
    if float(v_diff.detach().max()) < safe:
        # Fast path (the common case): no exponent can overflow, so skip the max-shift and its extra passes.
        # log(1 + s) rather than log1p(s): twice as fast on CPU, and its absolute error (what a sum of
        # log-likelihoods needs) stays below 1e-16.
        return -torch.log(1.0 + torch.exp(v_diff).sum(dim=-2))
    # logsumexp over {0, v_1..v_A}: shift by m = max(0, max_a v_a) so nothing overflows.
    m = v_diff.amax(dim=-2).clamp_min(0.0)
    s = torch.exp(-m) + torch.exp(v_diff - m.unsqueeze(-2)).sum(dim=-2)
    return -(m + torch.log(s))


def conditional_loglik(
    x_diff: torch.Tensor,
    beta: torch.Tensor,
    *,
    fixed_diff: torch.Tensor | None = None,
    avail: torch.Tensor | None = None,
    situation_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log of the product over a unit's situations of the logit probability of each choice, per draw.

    Parameters
    ----------
    x_diff : (N, T, A, K) attributes with random coefficients, alternative minus chosen.
    beta : (N, R, K) per-unit coefficient draws, or (1, R, K) shared (quadrature nodes, MixDPO).
    fixed_diff : (N, T, A) utility differences from fixed coefficients, or None.
    avail : (N, T, A) bool availability of the non-chosen alternatives, or None (all available).
    situation_mask : (N, T) float/bool, 0 for padded situations of unbalanced panels, or None.

    Returns
    -------
    (N, R) tensor: ``sum_t log L_nt(beta_nr)``.
    """
    v = _utility_diff(x_diff, beta)
    if fixed_diff is not None:
        v = v + fixed_diff.unsqueeze(-1)
    ll = log_logit_chosen(v, avail)  # (N, T, R)
    if situation_mask is not None:
        ll = ll * situation_mask.unsqueeze(-1).to(ll.dtype)
    return ll.sum(dim=1)


def log_mixed_prob(cond_loglik: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """Log of the integrated (mixed) probability from per-draw conditional log-likelihoods.

    cond_loglik: (N, R); log_weights: (R,) or (N, R), weights summing to one. Returns (N,):
    ``log sum_r w_r exp(cond_loglik_nr)``.
    """
    return torch.logsumexp(cond_loglik + log_weights, dim=-1)


def posterior_draw_weights(cond_loglik: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """Weights of each draw in the unit's conditional (posterior) distribution of beta.

    Revelt and Train's individual-level weights: ``w_r L_n(beta_r) / sum_s w_s L_n(beta_s)``. Shape (N, R).
    """
    return torch.softmax(cond_loglik + log_weights, dim=-1)


def choice_probabilities(
    x: torch.Tensor,
    beta: torch.Tensor,
    log_weights: torch.Tensor,
    *,
    fixed_utility: torch.Tensor | None = None,
    avail: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unconditional (mixed) probabilities of every alternative.

    x : (N, T, J, K) attributes with random coefficients; beta : (N or 1, R, K); log_weights : (R,);
    fixed_utility : (N, T, J) or None; avail : (N, T, J) bool or None.
    Returns (N, T, J): ``sum_r w_r softmax_j(beta_r' x)``.
    """
    v = _utility_diff(x, beta)  # same product, applied to levels instead of differences
    if fixed_utility is not None:
        v = v + fixed_utility.unsqueeze(-1)
    if avail is not None:
        # A padded situation (no alternative available) would give 0/0; treat it as all-available instead.
        avail = avail | ~avail.any(dim=-1, keepdim=True)
        v = v.masked_fill(~avail.unsqueeze(-1), float("-inf"))
    logp = torch.log_softmax(v, dim=2)
    return torch.exp(torch.logsumexp(logp + log_weights, dim=-1))
