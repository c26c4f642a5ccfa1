"""The shared kernel against brute-force numpy and closed forms."""

import numpy as np
import pytest
import torch

from mixlogit.kernel import (
    choice_probabilities,
    conditional_loglik,
    log_logit_chosen,
    log_mixed_prob,
    posterior_draw_weights,
)


def _brute(x_diff, beta, fixed, avail, mask, logw):
    n, t = x_diff.shape[:2]
    r = beta.shape[1]
    out = np.zeros((n, r))
    for i in range(n):
        b = beta[i if beta.shape[0] > 1 else 0]
        for s in range(t):
            if not mask[i, s]:
                continue
            v = x_diff[i, s] @ b.T + fixed[i, s][:, None]  # (A, R)
            v = np.where(avail[i, s][:, None], v, -np.inf)
            out[i] += -np.log1p(np.exp(v).sum(0))
    mixed = np.log((np.exp(out) * np.exp(logw)).sum(1))
    return out, mixed


@pytest.mark.parametrize("shared", [True, False])
def test_conditional_loglik_matches_brute_force(shared):
    rng = np.random.default_rng(0)
    n, t, a, k, r = 5, 4, 3, 2, 7
    x = rng.normal(size=(n, t, a, k))
    beta = rng.normal(size=(1 if shared else n, r, k))
    fixed = rng.normal(size=(n, t, a))
    avail = rng.random((n, t, a)) > 0.3
    mask = np.ones((n, t), bool)
    mask[0, 3] = mask[2, 2:] = False
    logw = np.log(rng.dirichlet(np.ones(r)))
    cl = conditional_loglik(torch.tensor(x), torch.tensor(beta), fixed_diff=torch.tensor(fixed),
                            avail=torch.tensor(avail), situation_mask=torch.tensor(mask))
    ref_cl, ref_mixed = _brute(x, beta, fixed, avail, mask, logw)
    np.testing.assert_allclose(cl.numpy(), ref_cl, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(log_mixed_prob(cl, torch.tensor(logw)).numpy(), ref_mixed, rtol=1e-12)


def test_log_logit_chosen_equals_log_softmax_and_is_stable():
    rng = np.random.default_rng(1)
    v = torch.tensor(rng.normal(scale=3, size=(6, 4, 5)))  # (..., A, R)
    full = torch.cat([torch.zeros(6, 1, 5, dtype=v.dtype), v], dim=1)
    ref = torch.log_softmax(full, dim=1)[:, 0, :]
    torch.testing.assert_close(log_logit_chosen(v), ref, rtol=1e-13, atol=1e-13)
    # Huge utility differences take the shifted path and stay finite and exact.
    big = torch.tensor([[[1e4], [-1e4], [3.0]]], dtype=torch.float64)  # (1, A=3, R=1)
    out = log_logit_chosen(big)
    assert torch.isfinite(out).all()
    assert out.item() == pytest.approx(-1e4, rel=1e-12)
    # Binary case is the log-sigmoid.
    h = torch.linspace(-50, 50, 11, dtype=torch.float64).view(11, 1, 1)
    torch.testing.assert_close(log_logit_chosen(-h)[:, 0], torch.nn.functional.logsigmoid(h.view(11)))


def test_choice_probabilities_sum_to_one_and_posterior_weights():
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.normal(size=(3, 2, 4, 2)))
    beta = torch.tensor(rng.normal(size=(3, 50, 2)))
    logw = torch.full((50,), -np.log(50.0), dtype=torch.float64)
    avail = torch.ones(3, 2, 4, dtype=torch.bool)
    avail[0, 0, 1] = False
    p = choice_probabilities(x, beta, logw, avail=avail)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 2, dtype=torch.float64))
    assert p[0, 0, 1] == 0
    # Brute force: the average over draws of each draw's logit probabilities, unavailable alternatives excluded.
    xn, bn, an = x.numpy(), beta.numpy(), avail.numpy()
    brute = np.zeros((3, 2, 4))
    for n in range(3):
        for t in range(2):
            for r in range(50):
                e = np.where(an[n, t], np.exp(xn[n, t] @ bn[n, r]), 0.0)
                brute[n, t] += e / e.sum() / 50
    np.testing.assert_allclose(p.numpy(), brute, rtol=1e-12, atol=1e-15)
    ll = torch.tensor(rng.normal(size=(3, 50)))
    w = posterior_draw_weights(ll, logw)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, dtype=torch.float64))
    expected = np.exp(ll.numpy()) / np.exp(ll.numpy()).sum(-1, keepdims=True)  # equal weights cancel
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("n_alts", [1, 3])
def test_closed_form_gradient_equals_autograd_to_second_order(shared, n_alts):
    rng = np.random.default_rng(3)
    n, t, k, r = 4, 3, 2, 5
    x = torch.tensor(rng.normal(size=(n, t, n_alts, k)), requires_grad=True)
    beta = torch.tensor(rng.normal(size=(1 if shared else n, r, k)), requires_grad=True)
    fixed = torch.tensor(rng.normal(size=(n, t, n_alts)), requires_grad=True)
    avail = torch.tensor(rng.random((n, t, n_alts)) > 0.3)
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[0, 2] = mask[3, 1:] = False
    with torch.no_grad():
        x[1, 0] = 400.0  # a huge utility: the shifted (overflow-safe) path
    ins = (x, beta, fixed)

    def f(closed):
        return lambda *a: conditional_loglik(a[0], a[1], fixed_diff=a[2], avail=avail, situation_mask=mask,
                                             closed_form_grad=closed)

    torch.testing.assert_close(f(True)(*ins), f(False)(*ins), rtol=0, atol=0)  # the very same values
    g = torch.tensor(rng.normal(size=(n, r)))
    fast = torch.autograd.grad((f(True)(*ins) * g).sum(), ins)
    slow = torch.autograd.grad((f(False)(*ins) * g).sum(), ins)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(f(True), ins)
    assert torch.autograd.gradgradcheck(f(True), ins)  # double backward recomputes the plain path
    scale = torch.tensor([0.7, -0.3], dtype=torch.float64)

    def of_scale(closed):
        return lambda s: (f(closed)(x.detach(), beta.detach() * s, fixed.detach()) * g).sum()

    torch.testing.assert_close(torch.autograd.functional.hessian(of_scale(True), scale, vectorize=True),
                               torch.autograd.functional.hessian(of_scale(False), scale), rtol=1e-12, atol=1e-12)


def test_closed_form_gradient_is_only_taken_when_recording():
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    beta = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    assert conditional_loglik(x, beta).grad_fn.name().endswith("_LogitKernelBackward")
    assert conditional_loglik(x, beta, closed_form_grad=False).grad_fn.name() == "SumBackward1"
    with torch.no_grad():
        assert conditional_loglik(x, beta).grad_fn is None
