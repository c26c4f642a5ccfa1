"""Annotator-level ("panel") MixDPO: one strength per annotator, shared across that annotator's pairs (the math).

Per-pair MixDPO gives every pair its own draw of beta. When annotator ``a`` labels the pairs ``j in a``, one strength
per annotator is the panel mixed logit with units = annotators and situations = pairs::

    L(phi) = -sum_a log sum_r w_r exp(sum_{j in a} log sigmoid(beta_r h_j))

with ``(beta_r, w_r)`` the strength family's own rule (its points and log-weights, the ones
:class:`~alignment.strength_base.Strength` integrates a single pair with). The margins are packed into
``x_diff = -h`` of shape (A, T_max, 1, 1), a padded pair masked out by ``situation_mask``, and integrated by
:func:`mixlogit.kernel.conditional_loglik` and :func:`mixlogit.kernel.log_mixed_prob`: the same two calls as
mixlogit's MSL on a binary panel, so the two front ends compute one number (``tests/test_panel_mixdpo.py``).

Training with minibatches (EM with cached margins). ``q_a(r)`` proportional to ``w_r prod_{j in a} sigmoid(beta_r
h~_j)`` (Revelt and Train's weights, :func:`mixlogit.kernel.posterior_draw_weights`) is computed from every pair's
cached margin ``h~`` for every annotator, O(n R); a pair's policy loss is ``-sum_r q_a(r) log sigmoid(beta_r h_j)``
with ``q_a`` detached. By Fisher's identity its gradient in ``h_j`` is the panel objective's,
``-E_{q_a}[beta sigmoid(-beta h_j)]``, exactly when the cache holds the current margins. phi is refitted on all
cached margins (:func:`alignment.strength_fit.fit_strength` with ``annotator=``), without an LM forward pass.

Only rules of shared points and weights have a panel form: the deterministic integrators (``"gauss-hermite"``,
``"quadrature"``) and the point mass. Simulation draws would need one set of draws per annotator held fixed across
steps, and the Gamma's closed form integrates one pair only. Margins are float64 here (the cache's dtype).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mixlogit.kernel import conditional_loglik, log_mixed_prob, posterior_draw_weights
from mixlogit.validation import check_fraction

from .strength import strength_class
from .strength_base import DETERMINISTIC_INTEGRATORS, Strength

__all__ = [
    "DENSE_NODES",
    "PANEL_CHUNK_ELEMENTS",
    "POINT_PANEL_MESSAGE",
    "STRENGTH_LEVELS",
    "annotator_log_weights",
    "annotator_posterior",
    "check_annotator_ids",
    "dense_strength",
    "panel_conditional_loglik",
    "panel_integrator",
    "panel_loglik",
    "panel_newton_terms",
    "panel_pair_loss",
    "rule_points",
]

#: Elements (annotators x padded pairs x nodes) of the largest packed tensor: annotators are packed in chunks of
#: similar pair counts, so one annotator with many pairs does not pad every other one to its length.
PANEL_CHUNK_ELEMENTS = 2**22
#: What one draw of beta belongs to (``MixDPOConfig.strength_level``).
STRENGTH_LEVELS = ("pair", "annotator")
#: Why the panel refuses a point strength.
POINT_PANEL_MESSAGE = (
    "strength_level='annotator' needs a random strength (e.g. strength='lognormal' or 'gamma'): a point strength "
    "is one fixed beta shared by every annotator, so it has no per-annotator part and the panel objective is then "
    "exactly the pair objective; use strength_level='pair' for DPO"
)
#: Nodes of the dense rule of the per-annotator posteriors (:func:`dense_strength`).
DENSE_NODES = 512
# Integrators whose rule is one set of points and weights shared by every unit ("exact": the point mass).
_SHARED_RULES = (*DETERMINISTIC_INTEGRATORS, "exact")


def panel_integrator(family: str, integrator: str | None) -> str:
    """The integrator an annotator-level run uses for ``family``: ``integrator`` when it has a panel form, else the
    family's ``"quadrature"`` (or first deterministic) rule when None; a ValueError names the accepted ones.

    ``"quadrature"`` is the default rather than Gauss-Hermite: a product of 20 or more sigmoids is a narrow bump in
    log beta, which few Gauss-Hermite nodes resolve poorly. On 200 annotators x 20 pairs (``h ~ N(0, 4)``, sigma 1;
    ``benchmarks/panel_recovery.py``) the panel log-likelihood with 16 Gauss-Hermite nodes is 0.19 nats off, with
    32 nodes 6e-4; the 128-node composite rule is within 5e-9 of 512 nodes.
    """
    cls = strength_class(family)
    if cls.fixed_in_training:
        raise ValueError(POINT_PANEL_MESSAGE)
    usable = [i for i in cls.integrators if i in DETERMINISTIC_INTEGRATORS]
    if integrator is None:
        if not usable:
            raise ValueError(f"strength_level='annotator' needs a deterministic rule of points and weights "
                             f"({', '.join(DETERMINISTIC_INTEGRATORS)}); the {family!r} family has only "
                             f"{', '.join(cls.integrators)}")
        return "quadrature" if "quadrature" in usable else usable[0]
    if integrator not in usable:
        raise ValueError(
            f"strength_integrator={integrator!r} has no panel form (one rule of points and weights shared by all of "
            f"an annotator's pairs); with strength_level='annotator' the {family!r} family accepts: "
            f"{', '.join(usable) or 'none'}"
        )
    return integrator


def rule_points(strength: Strength, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The strength's rule: points ``beta`` (R,) and log-weights (R,), in ``dtype`` on ``device``.

    The rule is built in float64 and held at or below ``dtype``'s largest finite value before the cast (as
    :meth:`Strength.with_finite_nodes` does), so a far lognormal node cannot put inf into a float32 loss.
    Differentiable in the strength's parameters.
    """
    if strength.integrator not in _SHARED_RULES:
        raise ValueError(
            f"the panel objective needs a rule of points and weights shared by all of an annotator's pairs "
            f"(integrator {', '.join(map(repr, _SHARED_RULES))}); the {strength.family} strength uses "
            f"{strength.integrator!r}"
        )
    if device is None:
        device = next(iter([*strength.parameters(), *strength.buffers()]), torch.zeros(())).device
    # Strength._rule is the family's one rule (the one log_prob_preferred integrates a pair with).
    beta, log_w = strength._rule(1, torch.float64, torch.device(device))
    beta = beta.reshape(-1).clamp_max(torch.finfo(dtype).max).to(dtype)
    return beta, log_w.reshape(-1).to(dtype)


def dense_strength(strength: Strength, nodes: int = DENSE_NODES) -> Strength:
    """The same family and parameters on a ``nodes``-node composite rule ("quadrature"), for per-annotator
    posteriors whose interval ends are not limited by the training rule's spacing; the strength itself when its
    family has no such rule or its constructor takes other arguments."""
    cls = type(strength)
    if "quadrature" not in cls.integrators:
        return strength
    try:
        dense = cls(integrator="quadrature", nodes=nodes, fix_mean=bool(getattr(strength, "fix_mean", False)))
        dense.load_state_dict(strength.state_dict())
    except (TypeError, ValueError, RuntimeError):
        return strength
    return dense.to(next(iter(strength.parameters())).device)


def check_annotator_ids(annotator, n_margins: int, n_annotators: int) -> torch.Tensor:
    """``annotator`` (n,) as a long tensor of ids in [0, n_annotators); the error names the first bad entry."""
    a = torch.as_tensor(annotator).reshape(-1)
    if a.dtype.is_floating_point or a.dtype == torch.bool:
        raise ValueError(f"annotator ids must be integers, got dtype {a.dtype}")
    a = a.long()
    if a.numel() != n_margins:
        raise ValueError(f"annotator has {a.numel()} ids but there are {n_margins} margins: one id per margin")
    bad = (a < 0) | (a >= n_annotators)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"annotator id {int(a[i])} at margin {i} is outside 0..{n_annotators - 1} "
                         f"(n_annotators={n_annotators})")
    return a


def _chunks(annotator: torch.Tensor, n_annotators: int, n_nodes: int, budget: int):
    """Annotators in chunks of similar pair counts whose packed tensor (members x longest x R) fits ``budget``.

    Yields ``(members (m,), pairs (p,), local annotator of each pair (p,), position of each pair (p,), T)``.
    """
    device = annotator.device
    counts = torch.bincount(annotator, minlength=n_annotators)
    order = torch.argsort(counts, descending=True, stable=True)
    # Pairs grouped by annotator, in their original order within an annotator.
    by_annotator = torch.argsort(annotator, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    i = 0
    while i < n_annotators:
        longest = max(int(counts[order[i]]), 1)
        size = max(1, budget // (longest * n_nodes))
        members = order[i:i + size]
        i += size
        lengths = counts[members]
        local = torch.repeat_interleave(torch.arange(len(members), device=device), lengths)
        offsets = torch.cumsum(lengths, 0) - lengths
        position = torch.arange(int(lengths.sum()), device=device) - torch.repeat_interleave(offsets, lengths)
        pairs = by_annotator[torch.repeat_interleave(starts[members], lengths) + position]
        yield members, pairs, local, position, longest


def panel_conditional_loglik(strength: Strength, margins: torch.Tensor, annotator, n_annotators: int,
                             chunk_elements: int = PANEL_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Per annotator and node, ``sum_{j in a} log sigmoid(beta_r h_j)``, through mixlogit's kernel.

    Args:
        strength: the strength (its rule gives the nodes; differentiable in its parameters).
        margins: h of the pairs, shape (n,), nats (oriented so that the chosen response won); any float dtype, the
            computation runs in float64.
        annotator: annotator id of each margin, (n,) ints in [0, n_annotators).
        n_annotators: A. An annotator without margins gets 0 at every node (its posterior is the prior).
        chunk_elements: largest packed tensor (see :data:`PANEL_CHUNK_ELEMENTS`).

    Returns:
        ``(cond (A, R), beta (R,), log_w (R,))``, float64.
    """
    h = torch.as_tensor(margins).to(torch.float64).reshape(-1)
    a = check_annotator_ids(annotator, h.numel(), n_annotators).to(h.device)
    beta, log_w = rule_points(strength, torch.float64, h.device)
    cond = h.new_zeros((n_annotators, beta.numel()))
    for members, x, mask in _packed(h, a, n_annotators, beta.numel(), chunk_elements):
        part = conditional_loglik(x, beta.reshape(1, -1, 1), situation_mask=mask)
        cond = cond.index_copy(0, members, part)
    return cond, beta, log_w


def _packed(h: torch.Tensor, annotator: torch.Tensor, n_annotators: int, n_nodes: int, budget: int):
    """The margins as the kernel's panel, chunk by chunk: ``(members (m,), x_diff (m, T, 1, 1), mask (m, T))``,
    one situation per pair whose one non-chosen alternative has attribute difference -h; padding masked."""
    for members, pairs, local, position, longest in _chunks(annotator, n_annotators, n_nodes, budget):
        m = len(members)
        x = h.new_zeros((m, longest))
        x[local, position] = -h[pairs]
        mask = torch.zeros((m, longest), dtype=torch.bool, device=h.device)
        mask[local, position] = True
        yield members, x.reshape(m, longest, 1, 1), mask


def _jacobian(beta: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """``d beta / d params`` (R, P) for scalar params: one batched reverse pass (a loop where a rule's autograd
    Function cannot be batched)."""
    r = beta.numel()
    try:
        rows = torch.autograd.grad(beta, params, grad_outputs=torch.eye(r, dtype=beta.dtype, device=beta.device),
                                   is_grads_batched=True, retain_graph=True)
        return torch.stack([x.reshape(r) for x in rows], dim=1).detach()
    except RuntimeError:
        rows = [torch.stack(torch.autograd.grad(beta[i], params, retain_graph=True)) for i in range(r)]
        return torch.stack(rows).reshape(r, -1).detach()


def panel_newton_terms(strength: Strength, margins, annotator, n_annotators: int, params: list[torch.Tensor],
                       chunk_elements: int = PANEL_CHUNK_ELEMENTS) -> tuple[float, np.ndarray, np.ndarray] | None:
    """Value, gradient (P,) and Hessian (P, P) of the panel log-likelihood in ``params`` (the strength's trainable
    parameters), from mixlogit's per-draw closed forms instead of nested autograd over the data.

    With ``c_ar = sum_{j in a} log sigmoid(beta_r h_j)``, its derivatives ``g_ar, k_ar`` in beta_r
    (:func:`mixlogit.kernel_grad.logit_derivatives`) and the EM weights ``q_ar``, the objective
    ``L = sum_a log sum_r w_r exp(c_ar)`` has ``dL/dbeta_r = G_r = sum_a q_ar g_ar`` and
    ``d2L/dbeta_r dbeta_s = delta_rs sum_a q_ar (k_ar + g_ar^2) - sum_a q_ar g_ar q_as g_as``; the chain rule through
    the rule's points ``beta(phi)`` (R,) gives ``J' (d2L/dbeta2) J + sum_r G_r d2 beta_r / dphi2`` with ``J = dbeta /
    dphi``. Only the map phi -> beta (R scalars) is differentiated by autograd. None when the rule's weights
    depend on phi (the caller then differentiates the objective itself).
    """
    from mixlogit.kernel_grad import logit_derivatives

    h = torch.as_tensor(margins).to(torch.float64).reshape(-1).detach()
    a = check_annotator_ids(annotator, h.numel(), n_annotators).to(h.device)
    with torch.enable_grad():
        beta, log_w = rule_points(strength, torch.float64, h.device)
    if log_w.requires_grad or not beta.requires_grad:
        return None
    r = beta.numel()
    b = beta.detach().reshape(1, r, 1)
    ll, g, k = (h.new_zeros((n_annotators, r)) for _ in range(3))
    for members, x, mask in _packed(h, a, n_annotators, r, chunk_elements):
        part_ll, part_g, part_k = logit_derivatives(x, b.expand(len(members), -1, -1), situation_mask=mask)
        ll[members], g[members], k[members] = part_ll, part_g[..., 0], part_k[..., 0, 0]
    logits = ll + log_w.detach()
    value = float(torch.logsumexp(logits, dim=-1).sum())
    q = torch.softmax(logits, dim=-1)
    qg = q * g  # (A, R)
    big_g = qg.sum(0)  # (R,)
    try:
        with torch.enable_grad():
            grads = torch.autograd.grad(beta, params, grad_outputs=big_g, create_graph=True)  # J' G, scalars
            curvature = [[float(x) for x in torch.autograd.grad(gp, params, retain_graph=True)] for gp in grads]
            jac = _jacobian(beta, params)  # (R, P)
    except RuntimeError:  # a parameter the points do not depend on (a family's own rule): differentiate L itself
        return None
    diag = (q * (k + g * g)).sum(0)  # (R,)
    proj = qg @ jac  # (A, P): J' (q_a g_a) for every annotator
    hess = jac.T @ (diag.unsqueeze(-1) * jac) - proj.T @ proj + torch.tensor(curvature, dtype=torch.float64)
    return value, np.array([float(x.detach()) for x in grads]), hess.numpy()


def panel_loglik(strength: Strength, margins, annotator, n_annotators: int) -> torch.Tensor:
    """Per-annotator log marginal likelihood ``log sum_r w_r exp(sum_{j in a} log sigmoid(beta_r h_j))``: (A,).

    Its sum is the negative of the panel objective L(phi). Differentiable in the strength's parameters.
    """
    cond, _, log_w = panel_conditional_loglik(strength, margins, annotator, n_annotators)
    return log_mixed_prob(cond, log_w)


@torch.no_grad()
def annotator_log_weights(strength: Strength, margins, annotator, n_annotators: int) -> torch.Tensor:
    """Log of the EM weights ``q_a(r)`` proportional to ``w_r prod_{j in a} sigmoid(beta_r h~_j)``: (A, R), detached.

    ``margins`` are the cached ones (only the pairs seen so far: an annotator without any gets the prior ``w``).
    The weights are :func:`mixlogit.kernel.posterior_draw_weights` on :func:`panel_conditional_loglik`.
    """
    cond, _, log_w = panel_conditional_loglik(strength, margins, annotator, n_annotators)
    # A float64 softmax keeps its relative precision down to ~1e-308, so its log loses nothing that matters; a
    # node whose weight underflows gets -inf, which both pair losses treat as weight 0.
    return torch.log(posterior_draw_weights(cond, log_w))


def panel_pair_loss(strength: Strength, margins: torch.Tensor, log_q: torch.Tensor,
                    predictive: bool = False) -> torch.Tensor:
    """Per-pair loss of annotator-level MixDPO, differentiable in the margins (not in phi, which the refit sets).

    Args:
        margins: h of the batch's pairs, (B,), nats, with the policy's gradient; the loss is in their working dtype
            (float64 stays, anything else float32).
        log_q: log-weights of each pair's annotator over the rule's nodes, (B, R) (rows of
            :func:`annotator_log_weights`, or the prior ``log w`` for an annotator without cached pairs).
        predictive: False (training): ``-sum_r q(r) log sigmoid(beta_r h)``, whose gradient is the panel
            objective's when ``q`` comes from fresh margins. True (evaluation): ``-log sum_r q(r) sigmoid(beta_r
            h)``, the posterior predictive loss (the pair MixDPO loss for an annotator with the prior as ``q``).

    Returns:
        (B,) losses, nats.
    """
    dtype = torch.float64 if margins.dtype == torch.float64 else torch.float32
    h = margins.reshape(-1).to(dtype)
    beta, _ = rule_points(strength, dtype, h.device)
    beta, log_q = beta.detach(), log_q.detach().to(device=h.device, dtype=dtype)
    if log_q.shape != (h.numel(), beta.numel()):
        raise ValueError(f"log_q has shape {tuple(log_q.shape)}; expected ({h.numel()}, {beta.numel()}): one row "
                         "of node weights per pair")
    if h.numel() == 0:
        return h.clone()
    cond = conditional_loglik((-h).reshape(-1, 1, 1, 1), beta.reshape(1, -1, 1))  # (B, R) log sigmoid(beta h)
    if predictive:
        return -log_mixed_prob(cond, log_q)
    # Nodes of zero weight contribute 0 (not 0 * -inf: cond is finite for finite margins and nodes).
    return -(torch.exp(log_q) * cond).sum(-1)


def _weighted_quantiles(points: np.ndarray, weights: np.ndarray, probs: tuple[float, ...]) -> np.ndarray:
    """Quantiles of discrete distributions: for each row of weights (A, R) over the points (R,), the smallest point
    whose cumulative weight reaches p (the usual left-continuous inverse of a step CDF): (A, len(probs))."""
    order = np.argsort(points)
    cdf = np.cumsum(weights[:, order], axis=1)
    out = np.empty((weights.shape[0], len(probs)))
    for k, p in enumerate(probs):
        idx = np.minimum((cdf < p - 1e-12).sum(axis=1), len(points) - 1)
        out[:, k] = points[order][idx]
    return out


@torch.no_grad()
def annotator_posterior(strength: Strength, margins, annotator, n_annotators: int,
                        level: float = 0.9) -> dict[str, Any]:
    """Posterior of each annotator's strength given its pairs: moments and a central interval.

    The posterior is the discrete distribution of the rule's nodes with the EM weights ``q_a`` (Revelt and Train);
    the interval's ends are its ``(1 -+ level) / 2`` quantiles (smallest node whose cumulative weight reaches the
    probability), so they are as fine as the rule's nodes: pass a strength with a dense rule (e.g. 512
    ``"quadrature"`` nodes) for smooth intervals. An annotator without margins gets the population (prior) rule.

    Returns:
        Dict of numpy arrays over annotators 0..A-1: ``n_pairs`` (margins used), ``mean``, ``sd``, ``low``, ``high``.
    """
    level = check_fraction("level", level)
    cond, beta, log_w = panel_conditional_loglik(strength, margins, annotator, n_annotators)
    q = posterior_draw_weights(cond, log_w).cpu().numpy()
    b = beta.cpu().numpy()
    mean = q @ b
    sd = np.sqrt((q * (b[None, :] - mean[:, None]) ** 2).sum(axis=1))
    ends = _weighted_quantiles(b, q, ((1 - level) / 2, (1 + level) / 2))
    n_pairs = np.bincount(torch.as_tensor(annotator).reshape(-1).long().cpu().numpy(), minlength=n_annotators)
    return {"n_pairs": n_pairs, "mean": mean, "sd": sd, "low": ends[:, 0], "high": ends[:, 1]}
