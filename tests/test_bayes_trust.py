"""The trust check of SVI results: the Pareto k of the importance ratios p/q of the population parameters
(Yao, Vehtari, Simpson and Gelman 2018), where it is shown, and what it says about good and bad guides."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import mixlogit as ml
from mixlogit.bayes.trust import TrustCheck, pareto_k, trust_check
from mixlogit.diagnostics.report import write_report


@pytest.fixture(scope="module")
def sim():
    """A panel where variational inference works: 150 persons x 8 situations, two normal coefficients."""
    truth = {"x1": ("normal", 1.0, 0.7), "x2": ("normal", -0.5, 0.5)}
    return ml.simulate(n_persons=150, n_situations=8, n_alts=3, random=truth, fixed={"x3": 0.8}, seed=1)


@pytest.fixture(scope="module")
def good(sim):
    """The default SVI fit, which neither fails to converge nor fails its check (warnings are errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return sim.model.fit(sim.data, method="svi", seed=0)


def test_pareto_k_recovers_the_tail_of_known_ratios():
    rng = np.random.default_rng(0)
    # Exact Pareto ratios r = U^-k (P(r > t) = t^(-1/k)): PSIS's k is the tail's shape.
    for k_true in (0.3, 0.8):
        _, k = pareto_k(-k_true * np.log(rng.uniform(size=20_000)))
        assert k == pytest.approx(k_true, abs=0.08)  # measured 0.32, 0.86
    # q = N(0, s^2) for p = N(0, 1): the tail of p/q has k -> 1 - s^2 (0.75, 0.36), approached slowly (a
    # log factor): 20,000 draws give 0.65 and 0.34. A q wider than p has bounded ratios: k < 0.
    ks = {}
    for s in (0.5, 0.8, 1.5):
        u = rng.normal(scale=s, size=20_000)
        ks[s] = pareto_k(-0.5 * u**2 + 0.5 * (u / s) ** 2)[1]
    assert 0.6 < ks[0.5] < 0.8 and 0.25 < ks[0.8] < 0.45 and ks[1.5] < 0.0
    with pytest.raises(ValueError, match="not all finite"):
        pareto_k(np.array([0.0, np.nan, 1.0]))


def test_good_fit_passes_and_shows_k_everywhere(sim, good, tmp_path):
    t = good.trust_check()
    assert isinstance(t, TrustCheck) and t.draws == 200 and t.points == 256
    assert t.pareto_k < 0.5 and t.usable and t.reading() == "k < 0.5: good"  # measured 0.36
    line = [s for s in good.summary().splitlines() if s.startswith("trust check:")]
    assert line == [(f"trust check: Pareto k of p/q = {t.pareto_k:.3f} over 200 draws of the guide (k < 0.5: good; "
                     "p with 256 importance points per unit)")]
    stats = good.to_arviz(n=100).sample_stats
    assert float(stats["pareto_k"]) == t.pareto_k and stats["pareto_k"].attrs["reading"] == t.reading()
    assert good.heterogeneity().attrs["trust"] == str(t)
    report = write_report(good, tmp_path / "rep").read_text()
    assert f"Trust check of the variational fit: {t}." in report


def test_trust_check_survives_save_and_load(good, tmp_path):
    path = good.save(tmp_path / "svi.json")
    back = ml.load(path)
    assert back.trust_check() == good.trust_check()
    assert back.trust_check().pareto_k == good.trust_check().pareto_k


def test_a_too_narrow_guide_fails_the_check(good):
    # The fitted guide with every sd shrunk 0.4x: for a near-normal posterior k should be about 1 - 0.4^2 = 0.84.
    sampler = good._sampler
    guide, likelihood = sampler.guide, sampler.likelihood
    with guide.param_context():
        scale = guide.globals.scale.detach().clone()
        assert trust_check(guide, likelihood, 400, seed=5).pareto_k < 0.7
        guide.set_initial_scales(0.4 * scale)
        try:
            narrow = trust_check(guide, likelihood, 400, seed=5)
        finally:
            guide.set_initial_scales(scale)
    assert narrow.pareto_k >= 0.7 and not narrow.usable
    assert narrow.reading() == "k >= 0.7: not usable, refit with method='nuts'"


def test_a_barely_trained_guide_fails_and_warns(sim):
    # Mean-field guide from the MNL start, 10 steps: centred several posterior sds off (measured k = 2.8).
    with pytest.warns(RuntimeWarning, match=r"SVI's trust check fails: Pareto k of p/q = \d+\.\d+ .*method='nuts'"):
        res = sim.model.fit(sim.data, method="svi", guide="meanfield", steps=10, init="mnl", seed=0)
    t = res.trust_check()
    assert t.pareto_k >= 0.7 and not t.usable
    assert "not usable, refit with method='nuts'" in res.summary()


def test_fullrank_guide_is_checked_too(sim):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = sim.model.fit(sim.data, method="svi", guide="fullrank", seed=0)
    assert res.trust_check().pareto_k < 0.7  # measured 0.02


def test_nuts_result_says_the_check_is_for_svi(sim):
    small = ml.simulate(n_persons=30, n_situations=4, n_alts=3, random={"x1": ("normal", 1.0, 0.5)}, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = small.model.fit(small.data, method="nuts", num_samples=30, num_warmup=30, chains=1, seed=0)
    with pytest.raises(ValueError, match="applies to SVI results.*NUTS fit draws from the posterior itself.*r_hat"):
        res.trust_check()
    assert "trust check" not in res.summary()


def test_trust_draws_option_and_minibatch_default(sim):
    with pytest.raises(ValueError, match="trust_draws must be 0 .* or at least 20"):
        sim.model.fit(sim.data, method="svi", trust_draws=5)
    small = ml.simulate(n_persons=40, n_situations=4, n_alts=3, random={"x1": ("normal", 1.0, 0.5)}, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = small.model.fit(small.data, method="svi", subsample=20, seed=0)  # minibatches: no check by default
    assert res.settings["guide"] == "fullrank" and res.settings["trust_draws"] == 0
    assert "trust check: not computed (trust_draws=0, the default of minibatch fits)" in res.summary()
    with pytest.raises(ValueError, match="ran without a trust check"):
        res.trust_check()
    assert "pareto_k" not in res.to_arviz(n=20).sample_stats
    torch.testing.assert_close(torch.tensor(res.draws.shape[-1]), torch.tensor(len(res.param_names)))
