"""MSL's optimizers (:mod:`mixlogit.optimize`): the default BFGS refreshed with the exact Hessian reaches BFGS's
optimum (same LL, same standard errors) in fewer value+gradient evaluations, on E1 and on a simulated panel; the
other optimizers and the fallbacks reach it too; an unknown optimizer is refused with the accepted ones."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import mixlogit as ml
from mixlogit import msl, optimize

E1 = ml.MixedLogit(random={c: "normal" for c in ["pf", "cl", "loc", "wk", "tod", "seas"]})


@pytest.fixture
def counts(monkeypatch):
    """Evaluations of problems with draws (not the plain-logit fit that makes the start), by method."""
    calls = {"value_and_grad": 0, "hessian": 0}
    for name in calls:
        original = getattr(msl.MSLProblem, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            calls[_name] += self.rule.n_points > 1
            return _original(self, *a, **kw)

        monkeypatch.setattr(msl.MSLProblem, name, counted)
    return calls


def _fit(model, data, counts, **kw):
    for name in counts:
        counts[name] = 0
    res = model.fit(data, **kw)
    return res, dict(counts)


def _same_optimum(res, ref, ll_tol=1e-8, se_rtol=1e-6):
    assert res.converged and ref.converged
    assert res.grad_norm < 1e-5  # the same gradient test as BFGS's gtol
    assert abs(res.loglik - ref.loglik) < ll_tol
    np.testing.assert_allclose(res.bse.to_numpy(), ref.bse.to_numpy(), rtol=se_rtol)
    np.testing.assert_allclose(res.params.to_numpy(), ref.params.to_numpy(), atol=1e-4 * ref.bse.to_numpy().min())


@pytest.fixture(scope="module")
def electricity():
    df = ml.datasets.load_electricity()
    return ml.ChoiceData.from_long(df, choice="choice", alt="alt", situation="chid", panel="id")


def test_e1_bfgs_hessian_reaches_bfgs_optimum_in_fewer_evaluations(electricity, counts):
    kw = {"draws": 300, "draw_type": "halton-plain"}
    ref, ref_calls = _fit(E1, electricity, counts, optimizer="bfgs", **kw)
    res, calls = _fit(E1, electricity, counts, **kw)  # the default
    assert res.settings["optimizer"] == "bfgs-hessian" and ref.settings["optimizer"] == "bfgs"
    _same_optimum(res, ref)
    # One Hessian more (the refresh; the other is the standard errors'), each worth about 8 evaluations here,
    # against at least 20 evaluations fewer.
    assert (ref_calls["hessian"], calls["hessian"]) == (1, 2)
    assert calls["value_and_grad"] + 20 <= ref_calls["value_and_grad"], (calls, ref_calls)
    assert res.n_iter < ref.n_iter


@pytest.fixture(scope="module")
def panel():
    sim = ml.simulate(n_persons=150, n_situations=6, n_alts=3, random={"a": ("normal", 1.0, 0.8),
                      "b": ("normal", -0.5, 0.6), "c": ("lognormal", -0.3, 0.5)}, fixed={"d": 0.7}, seed=3)
    return sim.data, ml.MixedLogit(random={"a": "normal", "b": "normal", "c": "lognormal"}, fixed=["d"])


def test_simulated_panel_every_optimizer_reaches_bfgs_optimum(panel, counts):
    data, model = panel
    ref, ref_calls = _fit(model, data, counts, draws=200, optimizer="bfgs")
    res, calls = _fit(model, data, counts, draws=200, optimizer="bfgs-hessian")
    _same_optimum(res, ref)
    assert calls["value_and_grad"] < ref_calls["value_and_grad"], (calls, ref_calls)
    trust, trust_calls = _fit(model, data, counts, draws=200, optimizer="trust-exact")
    _same_optimum(trust, ref, se_rtol=1e-4)  # its own end point: a gradient below 1e-5 in 2-norm
    # trust-exact evaluates the Hessian at every iterate, and the standard errors reuse the last one.
    assert trust_calls["hessian"] == trust_calls["value_and_grad"] < ref_calls["value_and_grad"]


def test_refresh_without_a_negative_definite_hessian_falls_back_to_bhhh(panel, counts, monkeypatch):
    data, model = panel
    ref = model.fit(data, draws=100, optimizer="bfgs")
    monkeypatch.setattr(optimize, "positive_definite_inverse", lambda matrix: None)
    monkeypatch.setattr(optimize, "REFRESH_GAIN", np.inf)  # refresh after the first iteration, far from the optimum
    res, calls = _fit(model, data, counts, draws=100)
    _same_optimum(res, ref, se_rtol=1e-4)
    assert calls["hessian"] == 2


def test_trust_exact_short_of_gtol_is_finished_by_bfgs(panel, monkeypatch):
    data, model = panel
    ref = model.fit(data, draws=200, optimizer="bfgs")
    real = optimize._trust_exact

    def two_steps(problem, start, *, maxiter, gtol, callback):
        return real(problem, start, maxiter=2, gtol=gtol, callback=callback)

    monkeypatch.setattr(optimize, "_trust_exact", two_steps)
    res = model.fit(data, draws=200, optimizer="trust-exact")
    _same_optimum(res, ref, se_rtol=1e-4)
    assert res.n_iter > 2


def test_mixed_precision_with_the_default_optimizer_stays_within_its_bar(panel):
    data, model = panel
    double = model.fit(data, draws=200, optimizer="bfgs")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        mixed = model.fit(data, draws=200, precision="mixed")
    assert mixed.converged
    assert np.max(np.abs(mixed.params - double.params) / double.bse) < 0.01
    np.testing.assert_allclose(mixed.bse.to_numpy(), double.bse.to_numpy(), rtol=0.01)


@pytest.mark.parametrize("bad", ["newton", "BFGS", None, 3])
def test_unknown_optimizer_is_refused_with_the_accepted_ones(panel, bad):
    data, model = panel
    with pytest.raises(ValueError, match="unknown optimizer .*'bfgs-hessian', 'bfgs', 'trust-exact'"):
        model.fit(data, draws=10, optimizer=bad)
    with pytest.raises(ValueError, match="accepted: 'bfgs-hessian', 'bfgs', 'trust-exact'"):
        optimize.search(None, np.zeros(2), bad)
