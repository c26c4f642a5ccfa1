"""Improper priors are refused with the reason, and the reasons hold: the likelihood of a spread tends to a
positive constant at both ends (to the plain logit's as sd -> 0; for a single binary choice per unit, to
(1/2)^N as sd -> infinity), so 1/sd and a flat prior on sd leave the posterior improper."""

from __future__ import annotations

import math

import pytest
import torch

import mixlogit as ml
from mixlogit.bayes.priors import PriorError, resolve_priors
from mixlogit.draws import make_rule
from mixlogit.msl import MSLProblem


@pytest.fixture(scope="module")
def sim():
    return ml.simulate(n_persons=40, n_situations=4, n_alts=3, random={"x1": ("normal", 1.0, 0.5)},
                       fixed={"x3": 0.8}, seed=2)


@pytest.mark.parametrize("priors, name, family, reason", [
    ({"sd": "flat"}, "sd.x1", "flat", r"uniform on \(0, inf\)\) leaves the posterior improper.*positive constant"),
    ({"sd.x1": "uniform()"}, "sd.x1", "uniform", "leaves the posterior improper unless the likelihood falls faster"),
    ({"sd": ("jeffreys",)}, "sd.x1", "jeffreys", r"1/sd \(flat on log sd\) always makes the posterior improper"),
    ({"sd.x1": {"family": "loguniform"}}, "sd.x1", "loguniform", "integral of 1/sd diverges at zero"),
    ({"x1": "flat"}, "x1", "flat", "improper whenever the data separate the alternatives.*normal\\(0, 100\\)"),
    ({"fixed": "flat()"}, "x3", "flat", "improper whenever the data separate"),
])
def test_improper_priors_are_refused_with_the_reason(sim, priors, name, family, reason):
    spec = sim.model.spec_for(sim.data)
    with pytest.raises(PriorError, match=rf"prior for '{name}' is the improper '{family}': .*{reason}"):
        resolve_priors(spec, priors)


@pytest.mark.parametrize("method", ["svi", "nuts"])
def test_fits_refuse_a_flat_spread_prior_before_any_work(sim, method):
    with pytest.raises(PriorError, match="prior for 'sd.x1' is the improper 'flat'.*halfnormal\\(5\\)"):
        sim.model.fit(sim.data, method=method, priors={"sd": "flat"})


def test_proper_spread_priors_still_resolve(sim):
    pri = resolve_priors(sim.model.spec_for(sim.data), {"sd": "halfcauchy(2.5)"})
    assert str(pri["sd.x1"]) == "halfcauchy(2.5)"


def _loglik(sim_data, model, theta, draws=1000):
    spec = model.spec_for(sim_data)
    design = sim_data.design(spec.random_names, spec.fixed)
    rule = make_rule("halton", design.n_units, draws, spec.n_draw_dims, seed=0, antithetic=True)
    return MSLProblem(spec, design, rule).loglik(torch.tensor(theta, dtype=torch.float64))


def test_the_likelihood_tends_to_the_plain_logit_as_the_spread_vanishes(sim):
    # theta = [x3, x1, sd.x1]: at sd -> 0 the mixed logit is the plain logit, whose likelihood is positive, so
    # a 1/sd prior has infinite mass near zero.
    at_zero = _loglik(sim.data, sim.model, [0.8, 1.0, 0.0])
    assert math.isfinite(at_zero) and at_zero < 0
    for sd in (1e-4, 1e-6):
        assert _loglik(sim.data, sim.model, [0.8, 1.0, sd]) == pytest.approx(at_zero, abs=1e-5)


def test_the_likelihood_tends_to_a_constant_as_the_spread_grows():
    # One binary choice per unit, one attribute: as sd -> inf each choice is decided by the sign of the draw,
    # probability 1/2 whatever the data, so the likelihood tends to (1/2)^N > 0 and a flat prior on sd has
    # infinite mass at infinity.
    cs = ml.simulate(n_persons=60, n_situations=1, n_alts=2, random={"x1": ("normal", 0.5, 1.0)}, panel=False,
                     seed=5)
    n = cs.data.n_units
    values = [_loglik(cs.data, cs.model, [0.5, sd]) for sd in (1e2, 1e4, 1e6)]
    assert values[-1] == pytest.approx(-n * math.log(2), abs=1e-3)
    assert abs(values[-1] - values[-2]) < abs(values[-2] - values[-3]) + 1e-9  # converging, not falling away
    # And the limit is no worse than the generating spread's fit: nothing in the data pulls sd back.
    assert values[-1] > _loglik(cs.data, cs.model, [0.5, 1.0]) - 1.0
