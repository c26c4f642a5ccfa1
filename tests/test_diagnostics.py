"""Heterogeneity diagnostics, ArviZ export and plots (mixlogit.diagnostics), for MSL and Bayesian results."""

from __future__ import annotations

import math

import arviz as az
import numpy as np
import pytest
import torch
from scipy import stats

import mixlogit as ml
from mixlogit import diagnostics as dg
from mixlogit.draws import make_rule
from mixlogit.msl import MSLProblem
from mixlogit.spec import Spec


def _stats(random: dict, theta: list[float], correlated=()):
    spec = Spec(random=random, fixed=[], correlated=list(correlated))
    return spec, dg.coefficient_stats(spec, torch.tensor(theta, dtype=torch.float64)).numpy()


# ---------------------------------------------------------------------------------------------- closed forms
def test_normal_stats_match_closed_forms():
    _, st = _stats({"a": "normal"}, [0.8, 0.5])
    mean, sd, cv, share, q05, q50, q95 = st[0]
    assert mean == pytest.approx(0.8, abs=1e-9)
    assert sd == pytest.approx(0.5, abs=1e-9)
    assert cv == pytest.approx(0.5 / 0.8, rel=1e-8)
    assert share == pytest.approx(stats.norm.cdf(-0.8 / 0.5), abs=1e-6)
    np.testing.assert_allclose([q05, q50, q95], 0.8 + 0.5 * stats.norm.ppf([0.05, 0.5, 0.95]), atol=1e-9)


def test_negative_mean_counts_positive_share_and_negative_spread_is_the_same_law():
    _, st = _stats({"a": "normal"}, [-1.0, 2.0])
    _, st_neg = _stats({"a": "normal"}, [-1.0, -2.0])
    assert st[0, 3] == pytest.approx(stats.norm.sf(0.5), abs=1e-6)  # P(beta > 0) = Phi(-|mu| / s)
    np.testing.assert_allclose(st_neg, st, atol=1e-9)  # transforms are even in the spread


def test_lognormal_cv_mean_and_no_opposite_sign():
    s = 0.6
    _, st = _stats({"a": "lognormal"}, [0.2, s])
    assert st[0, 0] == pytest.approx(math.exp(0.2 + s * s / 2), rel=1e-8)
    assert st[0, 2] == pytest.approx(math.sqrt(math.exp(s * s) - 1), rel=1e-7)
    assert st[0, 3] == 0.0
    np.testing.assert_allclose(st[0, 4:], np.exp(0.2 + s * stats.norm.ppf([0.05, 0.5, 0.95])), rtol=1e-9)
    _, neg = _stats({"a": "-lognormal"}, [0.2, s])  # decreasing in z: quantiles still come out ordered
    np.testing.assert_allclose(neg[0, 4:], -np.exp(0.2 + s * stats.norm.ppf([0.95, 0.5, 0.05])), rtol=1e-9)
    assert neg[0, 3] == 0.0


def test_uniform_triangular_censored_truncated_shares():
    _, st = _stats({"a": "uniform"}, [0.5, 2.0])  # U(-1.5, 2.5)
    assert st[0, 1] == pytest.approx(2.0 / math.sqrt(3), rel=1e-6)
    assert st[0, 3] == pytest.approx(1.5 / 4.0, abs=1e-6)
    _, st = _stats({"a": "triangular"}, [0.5, 2.0])  # mode 0.5 on [-1.5, 2.5]: P(beta<0) = 1.5^2 / (2 * 2^2)
    assert st[0, 3] == pytest.approx(1.5**2 / 8.0, abs=1e-5)
    assert st[0, 1] == pytest.approx(2.0 / math.sqrt(6), rel=1e-5)
    # Censored: beta = max(0, N(-0.5, 1)); mean mu Phi(mu) + phi(mu), E[beta^2] = (mu^2 + 1) Phi(mu) + mu phi(mu).
    mu = -0.5
    _, st = _stats({"a": "censored_normal"}, [mu, 1.0])
    mean = mu * stats.norm.cdf(mu) + stats.norm.pdf(mu)
    var = (mu**2 + 1.0) * stats.norm.cdf(mu) + mu * stats.norm.pdf(mu) - mean**2
    assert st[0, 0] == pytest.approx(mean, rel=1e-5) and st[0, 1] == pytest.approx(math.sqrt(var), rel=1e-5)
    assert st[0, 3] == 0.0  # no negative values; the mass at zero is not the opposite sign
    np.testing.assert_allclose(st[0, 4:], [0.0, 0.0, mu + stats.norm.ppf(0.95)], atol=1e-6)
    # Truncated: N(-0.5, 1) conditioned on beta > 0 (scipy's truncnorm).
    _, st = _stats({"a": "truncated_normal"}, [mu, 1.0])
    tn = stats.truncnorm(-mu, np.inf, loc=mu, scale=1.0)
    assert st[0, 0] == pytest.approx(tn.mean(), rel=1e-5) and st[0, 1] == pytest.approx(tn.std(), rel=1e-5)
    assert st[0, 3] == 0.0
    np.testing.assert_allclose(st[0, 4:], tn.ppf([0.05, 0.5, 0.95]), rtol=1e-5)


def test_correlated_coefficient_uses_its_marginal():
    # chol entry 0.6 between a (sd 0.8) and b (diag 0.3): sd of b = sqrt(0.6^2 + 0.3^2)
    _, st = _stats({"a": "normal", "b": "normal"}, [1.0, -2.0, 0.8, 0.3, 0.6], correlated=["a", "b"])
    sd_b = math.sqrt(0.6**2 + 0.3**2)
    assert st[1, 1] == pytest.approx(sd_b, rel=1e-8)
    assert st[1, 3] == pytest.approx(stats.norm.cdf(-2.0 / sd_b), abs=1e-6)


def test_share_is_differentiable_for_the_delta_method():
    spec = Spec(random={"a": "normal"}, fixed=[])
    th = torch.tensor([0.8, 0.5], dtype=torch.float64, requires_grad=True)
    dg.coefficient_stats(spec, th)[0, 3].backward()
    # d/dmu Phi(-mu/s) = -phi(mu/s)/s ; d/ds = phi(mu/s) mu / s^2
    phi = stats.norm.pdf(0.8 / 0.5)
    np.testing.assert_allclose(th.grad.numpy(), [-phi / 0.5, phi * 0.8 / 0.25], rtol=1e-4)


# ---------------------------------------------------------------------------------------------- MSL results
@pytest.fixture(scope="module")
def msl_fit():
    sim = ml.simulate(n_persons=150, n_situations=5, n_alts=3, random={"x1": ("normal", 1.0, 0.6)},
                      fixed={"x2": -0.5}, seed=3)
    data = sim.data
    res = sim.model.fit(data, draws=200)
    return res, data


def test_msl_heterogeneity_delta_method_reproduces_bse(msl_fit):
    res, _ = msl_fit
    het = dg.heterogeneity(res)
    assert list(het.index) == ["x1"] and het.attrs["level"] == 0.9
    q = stats.norm.ppf(0.95)
    # For a normal coefficient mean = loc and sd = |spread|: the delta method gives exactly their bse.
    assert het.loc["x1", "mean"] == pytest.approx(res.params["x1"], rel=1e-9)
    assert het.loc["x1", "mean.hi"] - het.loc["x1", "mean"] == pytest.approx(q * res.bse["x1"], rel=1e-6)
    assert het.loc["x1", "sd"] == pytest.approx(res.params["sd.x1"], rel=1e-6)
    assert het.loc["x1", "sd.hi"] - het.loc["x1", "sd"] == pytest.approx(q * res.bse["sd.x1"], rel=1e-5)
    assert 0 <= het.loc["x1", "share_opposite.lo"] <= het.loc["x1", "share_opposite"] <= het.loc["x1", "share_opposite.hi"]
    share = stats.norm.cdf(-abs(res.params["x1"]) / abs(res.params["sd.x1"]))
    assert het.loc["x1", "share_opposite"] == pytest.approx(share, rel=1e-5)


def test_msl_to_arviz_matches_params_and_gives_finite_loo(msl_fit):
    res, data = msl_fit
    idata = dg.to_arviz(res, data=data, n=2000, seed=1, draws=50)
    for g in ("posterior", "log_likelihood", "posterior_predictive", "observed_data"):
        assert g in idata.groups()
    summ = az.summary(idata, var_names=res.param_names, kind="stats")
    np.testing.assert_allclose(summ["mean"].to_numpy(), res.params.to_numpy(), atol=4 * res.bse.max() / math.sqrt(2000))
    np.testing.assert_allclose(summ["sd"].to_numpy(), res.bse.to_numpy(), rtol=0.1)
    assert idata.log_likelihood["choice"].dims == ("chain", "draw", "person")
    assert idata.observed_data["choice"].shape == (data.n_situations,)
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo)
    # The marginal log-likelihood is the MSL kernel's: averaged over draws from the asymptotic normal it sits
    # about k/2 = 1.5 below the maximum (k = 3 parameters), up to the noise of 50 instead of 200 Halton draws.
    m = float(idata.log_likelihood["choice"].sum("person").mean())
    assert res.loglik - 3.5 < m < res.loglik + 0.5, (m, res.loglik)


def test_marginal_loglik_is_the_msl_kernel(msl_fit):
    res, data = msl_fit
    spec = res.spec
    design = data.design(spec.random_names, spec.fixed)
    ll = dg.marginal_loglik(spec, design, res.theta[None], draws=50, seed=4)[0]
    problem = MSLProblem(spec, design, make_rule("halton", design.n_units, 50, 1, seed=4))
    with torch.no_grad():
        ref = problem.unit_loglik(torch.as_tensor(res.theta), slice(None)).numpy()
    np.testing.assert_allclose(ll, ref, rtol=1e-12, atol=1e-12)


def test_predictive_choices_follow_the_model_probabilities(msl_fit):
    res, data = msl_fit
    spec = res.spec
    design = data.design(spec.random_names, spec.fixed)
    sits = dg.situations(data, design)
    th = np.repeat(res.theta[None], 400, axis=0)
    rep = dg.predictive_choices(spec, design, sits, th, seed=0)
    freq = np.bincount(rep.ravel(), minlength=3) / rep.size
    prob = res.predict(data).to_numpy().reshape(-1, 3).mean(0)  # the table is situation-major, 3 alternatives
    np.testing.assert_allclose(freq, prob, atol=0.01)


def test_plots_and_report_for_msl(msl_fit, tmp_path):
    res, data = msl_fit
    paths = dg.plot_heterogeneity(res, tmp_path, data=data, n=50)
    assert set(paths) == {"densities", "forest", "individual"}
    for p in paths.values():
        assert p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError, match=r"already holds densities.png, forest.png, individual.png; pass "
                                              r"overwrite=True \(--overwrite on the command line\)"):
        dg.write_report(res, tmp_path, data=data)
    report = dg.write_report(res, tmp_path, data=data, overwrite=True)
    text = report.read_text()
    assert "## Heterogeneity" in text and "share_opposite" in text and "elpd_loo" in text
    assert "![forest](forest.png)" in text
    # The report carries the numbers: the heterogeneity row of x1 and the log-likelihood.
    het = dg.heterogeneity(res)
    m, lo, hi = het.loc["x1", ["mean", "mean.lo", "mean.hi"]]
    assert f"{m:.4g} [{lo:.4g}, {hi:.4g}]" in text
    assert f"{res.loglik:.3f}" in text
    html = dg.write_report(res, tmp_path / "h", fmt="html")
    assert "<table" in html.read_text()
    with pytest.raises(ValueError, match="unknown report format 'pdf'"):
        dg.write_report(res, tmp_path, fmt="pdf")


def test_heterogeneity_errors(msl_fit):
    res, _ = msl_fit
    with pytest.raises(ValueError, match="level must be in"):
        dg.heterogeneity(res, level=1.5)
    sim = ml.simulate(n_persons=30, n_situations=2, fixed={"x": 1.0}, seed=0)
    mnl = sim.model.fit(sim.data)
    with pytest.raises(ValueError, match="no random coefficients"):
        dg.heterogeneity(mnl)


def test_cli_report_on_msl_results(tmp_path):
    from mixlogit.cli import main

    sim = ml.simulate(n_persons=60, n_situations=4, random={"x1": ("normal", 1.0, 0.5)}, fixed={"x2": 0.5}, seed=8)
    csv = tmp_path / "d.csv"
    sim.df.to_csv(csv, index=False)
    out = tmp_path / "msl"
    assert main(["fit", str(csv), "--choice", "choice", "--alt", "alt", "--situation", "situation", "--panel",
                 "person", "--random", "x1=normal", "--fixed", "x2", "--draws", "50", "--out", str(out)]) == 0
    assert main(["report", str(out), "--format", "html"]) == 0
    text = (out / "report.html").read_text()
    assert "Heterogeneity" in text and "elpd_loo" in text and "individual.png" in text
    assert main(["report", str(out), "--no-data", "--out", str(tmp_path / "r2")]) == 0
    # Running it again refuses to replace the report unless asked.
    assert main(["report", str(out), "--no-data", "--out", str(tmp_path / "r2")]) == 2
    assert main(["report", str(out), "--no-data", "--out", str(tmp_path / "r2"), "--overwrite"]) == 0
    assert "elpd_loo" not in (tmp_path / "r2" / "report.md").read_text()
    with pytest.raises(SystemExit, match="results.json does not exist"):
        main(["report", str(tmp_path / "nothing")])
