"""The panel refit's Newton terms from closed forms: equal to autograd's derivatives of the panel objective, and the
same Newton step; and the binary-logit form of mixlogit's per-draw derivatives equal to the general one."""

import numpy as np
import pytest
import torch

from alignment import strength_fit
from alignment.panel import panel_integrator, panel_loglik, panel_newton_terms
from alignment.strength import make_strength
from alignment.strength_fit import newton_step
from mixlogit.kernel_grad import logit_derivatives


def _table(seed=0, n=600, annotators=60):
    rng = np.random.default_rng(seed)
    return torch.as_tensor(rng.normal(0.5, 2.0, n)), torch.as_tensor(rng.integers(0, annotators, n)), annotators


def _autograd_terms(strength, h, ids, n_annotators):
    params = [p for p in strength.parameters() if p.requires_grad]
    value = panel_loglik(strength, h, ids, n_annotators).sum()
    grads = torch.autograd.grad(value, params, create_graph=True)
    hess = np.array([[float(x) for x in torch.autograd.grad(g, params, retain_graph=True)] for g in grads])
    return float(value.detach()), np.array([float(g.detach()) for g in grads]), hess


@pytest.mark.parametrize("init, fix_mean", [({"sigma": 0.8}, True), ({"mu": -0.3, "sigma": 1.3}, False)])
def test_closed_form_terms_equal_autograd(init, fix_mean):
    h, ids, a = _table()
    extra = {"mean": 0.7} if fix_mean else {}
    s = make_strength("lognormal", init=init, integrator=panel_integrator("lognormal", None), fix_mean=fix_mean,
                      **extra)
    params = [p for p in s.parameters() if p.requires_grad]
    value, grad, hess = panel_newton_terms(s, h, ids, a, params)
    ref_value, ref_grad, ref_hess = _autograd_terms(s, h, ids, a)
    assert value == pytest.approx(ref_value, abs=1e-9)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(hess, ref_hess, rtol=1e-10, atol=1e-10)


def test_newton_step_is_the_same_with_either_derivatives(monkeypatch):
    """A refit as in training: phi fitted on the cache, then a tenth of the margins move and one Newton step."""
    h, ids, a = _table(seed=1)
    start = make_strength("lognormal", init={"sigma": 0.4}, integrator="quadrature", nodes=128, fix_mean=True,
                          mean=1.0)
    strength_fit.fit_strength(start, h, annotator=ids, n_annotators=a)
    h = h.clone()
    h[::10] += 0.5

    def step(closed_form: bool):
        s = make_strength("lognormal", init={"sigma": 0.4}, integrator="quadrature", nodes=128, fix_mean=True,
                          mean=1.0)
        s.load_state_dict(start.state_dict())
        if not closed_form:
            monkeypatch.setattr(strength_fit, "panel_newton_terms", lambda *args, **kw: None)
        out = newton_step(s, h, "marginal", annotator=ids, n_annotators=a)
        monkeypatch.undo()
        return out

    fast, slow = step(True), step(False)
    assert fast["accepted"] and slow["accepted"]
    assert fast["params"]["log_sigma"] != pytest.approx(strength_fit.strength_vector(start)["log_sigma"], abs=1e-6)
    assert fast["params"]["log_sigma"] == pytest.approx(slow["params"]["log_sigma"], abs=1e-12)
    assert fast["loglik"] == pytest.approx(slow["loglik"], abs=1e-9)


def test_binary_logit_derivatives_equal_the_general_form():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, 1, 3, dtype=torch.float64, generator=gen)
    beta = torch.randn(30, 16, 3, dtype=torch.float64, generator=gen)
    mask = torch.rand(30, 6, generator=gen) < 0.7
    fast = logit_derivatives(x, beta, situation_mask=mask)
    general = logit_derivatives(x, beta, situation_mask=mask, avail=torch.ones(30, 6, 1, dtype=torch.bool))
    for a, b in zip(fast, general, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
