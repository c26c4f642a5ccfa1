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


def logit_loglik_and_probs(v_diff: torch.Tensor, avail: torch.Tensor | None = None,
                           situation_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log probability of the chosen alternative and the probabilities of the others, for closed-form derivatives.

    v_diff: (N, T, A, R) utility differences; avail: (N, T, A) bool or None; situation_mask: (N, T) or None.
    Returns ll (N, T, R), as :func:`log_logit_chosen` and zero in padded situations, and P (N, T, A, R), zero
    where an alternative is unavailable or the situation padded.
    """
    if avail is not None:
        v_diff = v_diff.masked_fill(~avail.unsqueeze(-1), float("-inf"))
    m = None if situation_mask is None else situation_mask.unsqueeze(-1).to(v_diff.dtype)  # (N, T, 1)
    if v_diff.shape[-2] > 1:
        # log_logit_chosen's fast path, checked after the fact: a finite total means no sum overflowed
        # (one reduction over the A-times smaller sums instead of a max over v), and exp(v) is reused for P.
        e = torch.exp(v_diff)
        s = 1.0 + e.sum(dim=-2)
        if math.isfinite(float(s.sum())):
            ll = -torch.log(s)
            inv = s.reciprocal_() if m is None else s.reciprocal_().mul_(m)  # the mask rides on 1/s
            return (ll if m is None else ll * m), e.mul_(inv.unsqueeze(-2))
    ll = log_logit_chosen(v_diff)  # binary logit (softplus) or huge utilities (shifted logsumexp)
    p = torch.exp(v_diff + ll.unsqueeze(-2))
    if m is not None:
        ll, p = ll * m, p.mul_(m.unsqueeze(-2))
    return ll, p


def _plain_conditional_loglik(x_diff, beta, fixed_diff, avail, situation_mask):
    # The reference path: plain tensor ops, differentiated (to any order, under vmap) by autograd.
    v = _utility_diff(x_diff, beta)
    if fixed_diff is not None:
        v = v + fixed_diff.unsqueeze(-1)
    ll = log_logit_chosen(v, avail)  # (N, T, R)
    if situation_mask is not None:
        ll = ll * situation_mask.unsqueeze(-1).to(ll.dtype)
    return ll.sum(dim=1)


class _LogitKernel(torch.autograd.Function):
    """:func:`conditional_loglik` with its gradient in closed form.

    The forward pass keeps the choice probabilities ``P_ntar`` of the non-chosen alternatives (zero where
    unavailable or in a padded situation) instead of the autograd graph of a dozen temporaries; the backward
    pass is two matrix products: ``d ll_nr / d beta_nr = -sum_ta P_ntar x_ntak`` and
    ``d ll_nr / d fixed_nta = -P_ntar`` (and ``-P_ntar beta_nrk`` for ``x_diff``). Higher derivatives (a
    backward pass with ``create_graph=True``) recompute the plain path and differentiate it by autograd.
    """

    @staticmethod
    def forward(ctx, x_diff, beta, fixed_diff, avail, situation_mask):
        v = _utility_diff(x_diff, beta)
        if fixed_diff is not None:
            v = v + fixed_diff.unsqueeze(-1)
        ll, p = logit_loglik_and_probs(v, avail, situation_mask)
        ctx.save_for_backward(x_diff, beta, fixed_diff, avail, situation_mask, p)
        return ll.sum(dim=1)

    @staticmethod
    def backward(ctx, g):
        x_diff, beta, fixed_diff, avail, mask, p = ctx.saved_tensors
        need_x, need_beta, need_fixed = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the recomputed plain path instead
            inputs = [t for t, need in ((x_diff, need_x), (beta, need_beta), (fixed_diff, need_fixed)) if need]
            with torch.enable_grad():
                ll = _plain_conditional_loglik(x_diff, beta, fixed_diff, avail, mask)
                grads = iter(torch.autograd.grad(ll, inputs, g, create_graph=True))
            return (next(grads) if need_x else None, next(grads) if need_beta else None,
                    next(grads) if need_fixed else None, None, None)
        # Contract P with x (or beta) first and scale by g after: g never multiplies an (N, T, A, R) tensor.
        n, t, a, r = p.shape
        k = x_diff.shape[-1]
        flat = p.reshape(n, t * a, r)
        gx = gb = gf = None
        if need_beta:
            # (N, K, R) = sum_ta x P: as fast again as the (N, R, K) product with P transposed.
            s = torch.bmm(x_diff.reshape(n, t * a, k).transpose(1, 2), flat)
            gb = -(s * g.unsqueeze(1)).transpose(1, 2)
            if beta.shape[0] == 1:
                gb = gb.sum(dim=0, keepdim=True)
        if need_x:
            gbeta = g.unsqueeze(-1) * beta  # (N, R, K)
            gx = -torch.bmm(flat, gbeta).reshape(n, t, a, k)
        if need_fixed:
            gf = -torch.bmm(flat, g.unsqueeze(-1)).reshape(n, t, a)
        return gx, gb, gf, None, None


def conditional_loglik(
    x_diff: torch.Tensor,
    beta: torch.Tensor,
    *,
    fixed_diff: torch.Tensor | None = None,
    avail: torch.Tensor | None = None,
    situation_mask: torch.Tensor | None = None,
    closed_form_grad: bool = True,
) -> torch.Tensor:
    """Log of the product over a unit's situations of the logit probability of each choice, per draw.

    Parameters
    ----------
    x_diff : (N, T, A, K) attributes with random coefficients, alternative minus chosen.
    beta : (N, R, K) per-unit coefficient draws, or (1, R, K) shared (quadrature nodes, MixDPO).
    fixed_diff : (N, T, A) utility differences from fixed coefficients, or None.
    avail : (N, T, A) bool availability of the non-chosen alternatives, or None (all available).
    situation_mask : (N, T) float/bool, 0 for padded situations of unbalanced panels, or None.
    closed_form_grad : when a gradient is recorded, compute it in closed form from the saved choice
        probabilities (same values, a fraction of the time and memory). False differentiates the plain tensor
        operations by autograd, as needed under ``torch.func``/vmap transforms (e.g. a vectorized
        ``torch.autograd.functional.hessian``); second derivatives work either way.

    Returns
    -------
    (N, R) tensor: ``sum_t log L_nt(beta_nr)``.
    """
    tensors = (x_diff, beta, fixed_diff)
    if closed_form_grad and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _LogitKernel.apply(x_diff, beta, fixed_diff, avail, situation_mask)
    return _plain_conditional_loglik(x_diff, beta, fixed_diff, avail, situation_mask)


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
