"""The exact Hessian of the simulated log-likelihood from per-draw quantities, in closed form.

For one unit with draws ``beta_r = B_r(theta)`` (every coefficient, see :meth:`mixlogit.spec.Spec.scaled_coefficients`),
``ll_r = sum_t log L_t(beta_r)`` and posterior weights ``q_r`` (:func:`mixlogit.kernel.posterior_draw_weights`),
the log of the mixed probability ``log sum_r w_r exp(ll_r)`` has the Hessian

    sum_r q_r (J_r' H_r J_r + sum_k g_rk d2 B_rk / d theta2) + sum_r q_r G_r G_r' - Gbar Gbar',

with ``g_r, H_r`` the gradient and Hessian of ``ll_r`` in beta (the logit's: ``-sum_t sum_a P_ta x_ta`` and
``-sum_t Cov_P(x_t)``), ``J_r = d B_r / d theta``, ``G_r = J_r' g_r`` and ``Gbar = sum_r q_r G_r``. The kernel
terms are a few batched matrix products over the data; only the small map ``theta -> B`` is differentiated by
autograd, in reverse mode only (``torch.func`` transforms are not thread-safe, and chunks run on threads).
"""

from __future__ import annotations

import torch

from .kernel import _utility_diff, log_logit_chosen, logit_loglik_and_probs


def logit_derivatives(x_diff: torch.Tensor, beta: torch.Tensor, *, avail: torch.Tensor | None = None,
                      situation_mask: torch.Tensor | None = None):
    """Per-draw conditional log-likelihood with its gradient and Hessian in beta.

    x_diff : (N, T, A, K); beta : (N, R, K); avail : (N, T, A) bool or None; situation_mask : (N, T) or None.
    Returns ll (N, R), grad (N, R, K) and hess (N, R, K, K), all without autograd.
    """
    with torch.no_grad():
        n, t, a, k = x_diff.shape
        if a == 1 and avail is None:
            return _binary_logit_derivatives(x_diff[:, :, 0], beta, situation_mask)
        ll, p = logit_loglik_and_probs(_utility_diff(x_diff, beta), avail, situation_mask)  # p: (N, T, A, R)
        r = p.shape[-1]
        # m_ntr = sum_a P_ntar x_nta (the chosen alternative's x difference is zero)
        mean = torch.bmm(p.permute(0, 1, 3, 2).reshape(n * t, r, a), x_diff.reshape(n * t, a, k))
        mean = mean.reshape(n, t, r, k)
        grad = -mean.sum(dim=1)
        x2 = (x_diff.unsqueeze(-1) * x_diff.unsqueeze(-2)).reshape(n, t * a, k * k)
        second = torch.bmm(p.reshape(n, t * a, r).transpose(1, 2), x2).reshape(n, r, k, k)
        mt = mean.permute(0, 2, 1, 3).reshape(n * r, t, k)
        outer = torch.bmm(mt.transpose(1, 2), mt).reshape(n, r, k, k)
        return ll.sum(dim=1), grad, outer - second


def _binary_logit_derivatives(x_diff: torch.Tensor, beta: torch.Tensor, situation_mask: torch.Tensor | None):
    """:func:`logit_derivatives` of a binary choice (one non-chosen alternative, x_diff (N, T, K)) in elementwise
    form: with ``p = sigmoid(v)`` the other alternative's probability, the gradient is ``-sum_t p x`` and the
    Hessian ``-sum_t p (1 - p) x x'``, where the general form's per-situation products are (T x 1) matrices."""
    v = _utility_diff(x_diff.unsqueeze(2), beta)  # (N, T, 1, R)
    ll = log_logit_chosen(v)  # the kernel's binary log-probability, (N, T, R)
    p = torch.sigmoid(v[:, :, 0])
    if situation_mask is not None:
        m = situation_mask.unsqueeze(-1).to(v.dtype)
        ll, p = ll * m, p * m
    n, t, k = x_diff.shape
    grad = -torch.bmm(p.transpose(1, 2), x_diff)  # (N, R, K)
    x2 = (x_diff.unsqueeze(-1) * x_diff.unsqueeze(-2)).reshape(n, t, k * k)
    hess = -torch.bmm((p * (1.0 - p)).transpose(1, 2), x2).reshape(n, -1, k, k)
    return ll.sum(dim=1), grad, hess


def draw_jacobian(coef, theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``d B_r / d theta`` for every draw: (U, R, K, P) from ``coef(theta (U', P), z (U', R, D)) -> (U', R, K)``
    and draws z (U, R, D).

    Every draw gets its own copy of theta, so K reverse passes give all the Jacobians.
    """
    u, r, dim = z.shape
    th = theta.detach().expand(u * r, -1).clone().requires_grad_(True)
    with torch.enable_grad():
        b = coef(th, z.reshape(u * r, 1, dim))[:, 0, :]  # (U R, K)
        k = b.shape[-1]
        rows = [torch.autograd.grad(b[:, j].sum(), th, retain_graph=j < k - 1)[0] for j in range(k)]
    return torch.stack(rows, dim=1).reshape(u, r, k, -1)


def mixed_loglik_hessian(coef, theta: torch.Tensor, z: torch.Tensor, x_diff: torch.Tensor, weights: torch.Tensor,
                         log_weights: torch.Tensor, *, avail: torch.Tensor | None = None,
                         situation_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hessian in theta of ``sum_n weights_n log sum_r exp(log_weights_r + ll_nr)`` for one chunk of units.

    coef : (theta (P,) or (U, P), z) -> (U', R, K) every coefficient per draw (as
    :meth:`mixlogit.spec.Spec.scaled_coefficients`); z : (N or 1, R, D) the chunk's draws;
    x_diff : (N, T, A, K) the matching attribute differences; weights : (N,); log_weights : (R,) or (N, R).
    Returns (P, P).
    """
    theta = theta.detach()
    n = x_diff.shape[0]
    beta = coef(theta, z).detach()
    ll, g, h = logit_derivatives(x_diff, beta.expand(n, -1, -1), avail=avail, situation_mask=situation_mask)
    q = torch.softmax(ll + log_weights, dim=-1)  # (N, R) posterior weights of the draws
    c = weights.to(q.dtype).unsqueeze(-1) * q
    jac = draw_jacobian(coef, theta, z).expand(n, -1, -1, -1)  # (N, R, K, P)
    _, r, k, p = jac.shape
    gt = torch.einsum("nrkp,nrk->nrp", jac, g)  # G_r = J_r' g_r
    gbar = torch.einsum("nr,nrp->np", q, gt)
    cov = torch.einsum("nrp,nrq->pq", c.unsqueeze(-1) * gt, gt) - (weights.unsqueeze(-1) * gbar).T @ gbar
    hj = torch.bmm(h.reshape(n * r, k, k), jac.reshape(n * r, k, p))  # (NR, K, P)
    kern = (c.reshape(n * r, 1, 1) * jac.reshape(n * r, k, p)).reshape(-1, p).T @ hj.reshape(-1, p)
    cg = c.unsqueeze(-1) * g  # curvature of theta -> B, weighted by the gradient it multiplies

    def phi(th):
        return (coef(th, z).expand(n, -1, -1) * cg).sum()

    curv = torch.autograd.functional.hessian(phi, theta)
    return cov + kern + curv
