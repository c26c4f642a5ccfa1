"""Integration rules: moments of N(0,1), error estimates, antithetic pairs, errors."""

import math

import numpy as np
import pytest
import torch

from mixlogit.draws import deterministic_rule, make_rule


@pytest.mark.parametrize("kind", ["halton", "sobol", "mlhs", "pseudo"])
def test_simulation_draws_have_standard_normal_moments(kind):
    rule = make_rule(kind, n_units=50, n_draws=512, dim=3, seed=1)
    z = rule.z.numpy()
    assert z.shape == (50, 512, 3)
    assert np.isfinite(z).all()
    tol = 0.01 if kind != "pseudo" else 0.02
    assert abs(z.mean()) < tol
    assert abs(z.std() - 1) < tol
    # Dimensions are not correlated (scrambled Halton fixes plain Halton's defect).
    c = np.corrcoef(z.reshape(-1, 3).T)
    assert np.abs(c[np.triu_indices(3, 1)]).max() < 0.02
    torch.testing.assert_close(torch.logsumexp(rule.log_weights, 0), torch.tensor(0.0, dtype=torch.float64))


def test_draws_are_reproducible_by_seed_and_differ_across_seeds():
    a = make_rule("halton", 10, 100, 2, seed=3).z
    b = make_rule("halton", 10, 100, 2, seed=3).z
    c = make_rule("halton", 10, 100, 2, seed=4).z
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_qmc_beats_pseudo_random_on_a_smooth_integral():
    # E[sigmoid(z1 + z2/2)] = 1/2 by symmetry; per-unit errors of QMC rules are far below pseudo-random ones
    # (measured: pseudo 1.1e-2, Halton 1.1e-3, MLHS 1.5e-3, Sobol 1.8e-4).
    def err(kind):
        z = make_rule(kind, 200, 256, 2, seed=0).z
        est = torch.sigmoid(z[..., 0] + 0.5 * z[..., 1]).mean(1)
        return float((est - 0.5).abs().mean())

    pseudo = err("pseudo")
    assert err("sobol") < 0.05 * pseudo
    assert err("halton") < 0.2 * pseudo
    assert err("mlhs") < 0.2 * pseudo


def test_antithetic_pairs_and_even_count():
    rule = make_rule("pseudo", 4, 10, 2, seed=0, antithetic=True)
    torch.testing.assert_close(rule.z[:, :5], -rule.z[:, 5:])
    with pytest.raises(ValueError, match="even number of draws"):
        make_rule("pseudo", 4, 11, 2, antithetic=True)


@pytest.mark.parametrize("kind", ["gauss-hermite", "quadrature"])
def test_deterministic_rules_integrate_gaussian_moments(kind):
    rule = deterministic_rule(kind, 128, 1)
    z, w = rule.z[0, :, 0], torch.exp(rule.log_weights)
    # 128 composite nodes are 16 panels of width 1.06: accurate to ~1e-13 here; Gauss-Hermite is exact.
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-10)
    assert float((w * z**2).sum()) == pytest.approx(1.0, abs=1e-10)
    assert float((w * z**4).sum()) == pytest.approx(3.0, abs=1e-10)
    assert float((w * torch.exp(z)).sum()) == pytest.approx(math.exp(0.5), rel=1e-10)
    assert rule.coarse is not None and rule.coarse.n_points == 64


def test_composite_rule_handles_a_step_that_gauss_hermite_does_not():
    # E[sigmoid(40 (z - 0.3))], z ~ N(0, 1): the integrand is nearly a step at 0.3.
    def est(kind, n):
        r = deterministic_rule(kind, n, 1)
        return float((torch.exp(r.log_weights) * torch.sigmoid(40 * (r.z[0, :, 0] - 0.3))).sum())

    import mpmath

    with mpmath.workdps(30):
        exact = float(mpmath.quad(lambda z: mpmath.npdf(z) / (1 + mpmath.exp(-40 * (z - mpmath.mpf("0.3")))),
                                  [-mpmath.inf, 0.2, 0.3, 0.4, mpmath.inf]))
    assert abs(est("quadrature", 1000) - exact) < 1e-8  # measured 3.7e-9
    assert abs(est("quadrature", 1000) - est("quadrature", 2000)) < 1e-6  # the error estimate's size
    assert abs(est("gauss-hermite", 20) - exact) > 0.05  # measured 0.083


def test_two_dimensional_rules_and_errors():
    rule = deterministic_rule("quadrature", 48 * 48, 2)
    assert rule.z.shape == (1, 48 * 48, 2)
    w = torch.exp(rule.log_weights)
    z = rule.z[0]
    assert float((w * z[:, 0] * z[:, 1]).sum()) == pytest.approx(0.0, abs=1e-12)
    assert float((w * torch.exp(z.sum(-1))).sum()) == pytest.approx(math.e, rel=1e-8)
    with pytest.raises(ValueError, match="1 or 2 random coefficients"):
        deterministic_rule("quadrature", 1000, 3)
    with pytest.raises(ValueError, match="unknown draw_type 'halton2'"):
        make_rule("halton2", 1, 10, 1)
    with pytest.raises(ValueError, match="draws must be a positive integer"):
        make_rule("halton", 1, 0, 1)
