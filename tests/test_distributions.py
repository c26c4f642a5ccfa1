"""Coefficient distributions: moments against closed forms, laws against scipy, sign symmetry of spreads."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from mixlogit.distributions import DISTRIBUTION_NAMES, get_distribution
from mixlogit.draws import deterministic_rule

RULE = deterministic_rule("quadrature", 4096, 1)
Z, W = RULE.z[0, :, 0], torch.exp(RULE.log_weights)


def moments(name, loc, s):
    b = get_distribution(name).transform(torch.tensor(loc, dtype=torch.float64), torch.tensor(s, dtype=torch.float64), Z)
    m = float((W * b).sum())
    return m, math.sqrt(float((W * (b - m) ** 2).sum()))


@pytest.mark.parametrize(
    "name,loc,s,mean,sd",
    [
        ("normal", 0.7, 1.3, 0.7, 1.3),
        ("lognormal", -0.5, 0.6, math.exp(-0.5 + 0.18), math.exp(-0.5 + 0.18) * math.sqrt(math.exp(0.36) - 1)),
        ("-lognormal", -0.5, 0.6, -math.exp(-0.5 + 0.18), math.exp(-0.5 + 0.18) * math.sqrt(math.exp(0.36) - 1)),
        ("uniform", 1.0, 2.0, 1.0, 2.0 / math.sqrt(3)),
        ("triangular", 1.0, 2.0, 1.0, 2.0 / math.sqrt(6)),
        ("truncated_normal", 0.5, 1.5, stats.truncnorm(-0.5 / 1.5, np.inf, 0.5, 1.5).mean(),
         stats.truncnorm(-0.5 / 1.5, np.inf, 0.5, 1.5).std()),
    ],
)
def test_moments_match_closed_forms(name, loc, s, mean, sd):
    m, v = moments(name, loc, s)
    assert m == pytest.approx(mean, rel=1e-7)
    assert v == pytest.approx(sd, rel=1e-6)


def test_censored_normal_mean_and_mass_at_zero():
    loc, s = 0.4, 1.2
    b = get_distribution("censored_normal").transform(torch.tensor(loc), torch.tensor(s), torch.randn(400_000, generator=torch.Generator().manual_seed(0)))
    a = loc / s
    assert float((b == 0).double().mean()) == pytest.approx(stats.norm.cdf(-a), abs=3e-3)
    m, _ = moments("censored_normal", loc, s)
    # The kink at zero limits the composite rule's order, hence the looser tolerance.
    assert m == pytest.approx(loc * stats.norm.cdf(a) + s * stats.norm.pdf(a), rel=1e-5)


@pytest.mark.parametrize(
    "name,ref",
    [
        ("triangular", stats.triang(c=0.5, loc=-1.0, scale=4.0)),
        ("uniform", stats.uniform(loc=-1.0, scale=4.0)),
        ("truncated_normal", stats.truncnorm(-1.0 / 2.0, np.inf, 1.0, 2.0)),
        ("lognormal", stats.lognorm(s=2.0, scale=math.e)),
    ],
)
def test_laws_match_scipy(name, ref):
    z = torch.randn(20_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    b = get_distribution(name).transform(torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64), z)
    assert stats.kstest(b.numpy(), ref.cdf).pvalue > 0.01


@pytest.mark.parametrize("name", DISTRIBUTION_NAMES)
def test_spread_sign_is_not_identified(name):
    assert moments(name, 0.3, 0.9) == pytest.approx(moments(name, 0.3, -0.9), rel=1e-9)


def test_gradients_are_finite_everywhere():
    z = torch.linspace(-8, 8, 101, dtype=torch.float64)
    for name in DISTRIBUTION_NAMES:
        loc = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        s = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        get_distribution(name).transform(loc, s, z).sum().backward()
        assert torch.isfinite(loc.grad) and torch.isfinite(s.grad), name


def test_unknown_distribution_lists_accepted_names():
    with pytest.raises(ValueError, match="unknown distribution 'nrmal'; accepted: normal, lognormal"):
        get_distribution("nrmal")
