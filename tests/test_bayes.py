"""Bayesian mixed logit (mixlogit.bayes): priors, the model's density, guides, SVI, NUTS, results and errors.

Fits run on small simulated panels with fixed seeds; numbers are checked against closed forms, the kernel,
finite differences, the simulation truth, or a peer run (SVI against NUTS) side by side.
"""

from __future__ import annotations

import math
import warnings

import arviz as az
import numpy as np
import pytest
import torch
from scipy import stats

import mixlogit as ml
from mixlogit import load
from mixlogit.bayes import model as bayes_model
from mixlogit.bayes.guides import UnitGaussian, site_posterior
from mixlogit.bayes.model import StdNormalVector, prepare
from mixlogit.bayes.pilot import initialize, unit_laplace
from mixlogit.bayes.priors import IndependentPriors, Prior, PriorError, parse_prior, resolve_priors
from mixlogit.bayes.results import BayesResults
from mixlogit.cli import main

TRUTH = {"x1": ("normal", 1.0, 0.7), "x2": ("normal", -0.5, 0.5)}


@pytest.fixture(scope="module")
def sim():
    return ml.simulate(n_persons=120, n_situations=6, n_alts=3, random=TRUTH, fixed={"x3": 0.8}, seed=11)


@pytest.fixture(scope="module")
def svi(sim):
    return sim.model.fit(sim.data, method="svi", guide="fullrank", steps=1500, seed=0)


# ---------------------------------------------------------------------------------------------- priors
def test_prior_forms_and_defaults():
    assert parse_prior("normal(0, 10)") == Prior("normal", (0.0, 10.0))
    assert parse_prior(("halfnormal", 5)) == Prior("halfnormal", (5,))
    assert parse_prior({"family": "student_t", "df": 3, "loc": 0, "scale": 2}) == Prior("student_t", (3, 0, 2))
    spec = ml.MixedLogit(random={"a": "normal", "b": "lognormal"}, fixed=["c"]).spec_for(
        ml.simulate(n_persons=5, n_situations=1, random={"a": ("normal", 0, 1)}, fixed={"b": 1.0, "c": 1.0}).data)
    pri = resolve_priors(spec, {"sd": "halfcauchy(2.5)", "a": "normal(1, 2)"})
    assert str(pri["a"]) == "normal(1, 2)" and str(pri["b"]) == "normal(0, 3)"  # lognormal location: log scale
    assert str(pri["c"]) == "normal(0, 10)" and str(pri["sd.a"]) == "halfcauchy(2.5)"


@pytest.mark.parametrize("priors, match", [
    ({"sd": "gaussian(0, 1)"}, "unknown prior family 'gaussian'"),
    ({"x1": "normal(0, -1)"}, "prior for 'x1'.*scale must be > 0, got -1"),
    ({"x1": "normal(0)"}, "prior for 'x1'.*takes 2 parameter"),
    ({"x1": ("normal", 0, float("inf"))}, "scale must be a finite number"),
    ({"sd.x1": "normal(0, 1)"}, "'sd.x1' needs a prior on the positive half-line"),
    ({"x1": "halfnormal(1)"}, "'x1' needs a prior on the real line"),
    ({"beta": "normal(0, 1)"}, "unknown key 'beta'"),
    ({"corr": "lkj(2)"}, "no correlated random coefficients"),
    ({"x1": "normal(a, b)"}, "must be numbers"),
])
def test_bad_priors_are_named(sim, priors, match):
    with pytest.raises(PriorError, match=match):
        sim.model.fit(sim.data, method="svi", priors=priors, steps=10)


def test_independent_priors_log_density_and_standardization():
    p = IndependentPriors([parse_prior("normal(0, 10)"), parse_prior("cauchy(1, 2)"), parse_prior("normal(3, 1)")])
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    ref = stats.norm.logpdf(0.5, 0, 10) + stats.cauchy.logpdf(-1.0, 1, 2) + stats.norm.logpdf(2.0, 3, 1)
    assert float(p.log_prob(x)) == pytest.approx(ref, rel=1e-12)


def test_global_prior_is_the_priors_times_the_jacobian(sim):
    hm = prepare(sim.model, sim.data, None)
    u = torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4], dtype=torch.float64)  # identity whitening: v = u
    fixed, loc, log_sd = 0.3, [-0.2, 0.5], np.array([0.1, -0.4])
    ref = (stats.norm.logpdf(fixed, 0, 10) + stats.norm.logpdf(loc, 0, 10).sum()
           + stats.halfnorm.logpdf(np.exp(log_sd), scale=5).sum() + log_sd.sum())
    assert float(hm.prior_globals.log_prob(u)) == pytest.approx(ref, rel=1e-12)
    W = torch.tensor([[2.0, 0, 0, 0, 0], [0.5, 1.0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0.3, 0], [0, 0, 0, 0, 1]],
                     dtype=torch.float64)
    hm.set_preconditioner(torch.full((5,), 0.1, dtype=torch.float64), W)
    g = hm.natural(u)
    np.testing.assert_allclose(hm.standardized(g).numpy(), u.numpy(), atol=1e-12)
    v = (0.1 + W @ u).numpy()
    ref = (stats.norm.logpdf(v[0], 0, 10) + stats.norm.logpdf(v[1:3], 0, 10).sum()
           + stats.halfnorm.logpdf(np.exp(v[3:]), scale=5).sum() + v[3:].sum() + math.log(2.0 * 0.3))
    assert float(hm.prior_globals.log_prob(u)) == pytest.approx(ref, rel=1e-12)


# ---------------------------------------------------------------------------------------------- the model
def test_model_likelihood_is_the_logit_of_the_data(sim):
    """hm.loglik (the kernel with R = 1) against a direct softmax over the long table."""
    data = sim.data
    hm = prepare(sim.model, data, None)
    theta = torch.tensor([0.8, 1.1, -0.4, 0.6, 0.3], dtype=torch.float64)  # x3, x1, x2, sd.x1, sd.x2
    z = torch.as_tensor(np.random.default_rng(0).normal(size=(data.n_units, 2)))
    ll = hm.loglik(theta, z, slice(None)).numpy()
    beta = np.array([1.1, -0.4]) + np.array([0.6, 0.3]) * z.numpy()  # (N, 2)
    df = sim.df
    person = df["person"].to_numpy()
    v = beta[person, 0] * df["x1"] + beta[person, 1] * df["x2"] + 0.8 * df["x3"]
    v = v.to_numpy().reshape(-1, 3)
    logp = v - np.log(np.exp(v).sum(1, keepdims=True))
    chosen = df["choice"].to_numpy().reshape(-1, 3).argmax(1)
    per_sit = logp[np.arange(len(chosen)), chosen]
    ref = np.bincount(df["person"].to_numpy()[::3], weights=per_sit)
    np.testing.assert_allclose(ll, ref, rtol=1e-12)
    # several particles at once give the same numbers
    two = hm.loglik(torch.stack([theta, theta]).unsqueeze(1), torch.stack([z, z]), slice(None))
    np.testing.assert_allclose(two.numpy(), np.stack([ref, ref]), rtol=1e-12)


def test_laplace_modes_slopes_and_sites(sim):
    data = sim.data
    hm = prepare(sim.model, data, None)
    init = initialize(sim.model, data, hm, how="msl", seed=0, init_draws=50, init_units=2000)
    g = init.globals
    theta = hm.theta(g)
    z = init.a.clone().requires_grad_(True)
    f = hm.loglik(theta, z, slice(None)) - 0.5 * (z * z).sum(-1)
    (grad,) = torch.autograd.grad(f.sum(), z)
    assert float(grad.abs().max()) < 1e-6  # modes
    u0 = hm.standardized(g)
    eps = 1e-5
    for d in (0, 3):  # a fixed coefficient and a log-spread: slope of the mode against finite differences
        u = u0.clone()
        u[d] += eps
        a1, _, _ = unit_laplace(hm, hm.natural(u), iters=30)
        a0, _, _ = unit_laplace(hm, hm.natural(u0), iters=30)
        np.testing.assert_allclose(((a1 - a0) / eps).numpy(), init.B[..., d].numpy(), atol=2e-4)
    eta, R = init.sites(hm)
    q = site_posterior(g["loc"], hm.scale_matrix(g), eta, R)
    P = q.precision_tril @ q.precision_tril.transpose(-1, -2)
    np.testing.assert_allclose(q.loc.numpy(), init.a.numpy(), atol=1e-10)
    np.testing.assert_allclose(torch.linalg.inv(P).numpy(), init.V.numpy(), atol=1e-10)


def test_unit_gaussian_kl_and_log_prob_match_torch():
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    A = torch.randn(4, 3, 3, generator=gen, dtype=torch.float64)
    cov = A @ A.transpose(-1, -2) + torch.eye(3, dtype=torch.float64)
    ref = torch.distributions.MultivariateNormal(loc, covariance_matrix=cov)
    std = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64),
                                                 covariance_matrix=torch.eye(3, dtype=torch.float64))
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    for q in (UnitGaussian(loc, scale_tril=torch.linalg.cholesky(cov)),
              UnitGaussian(loc, precision_tril=torch.linalg.cholesky(torch.linalg.inv(cov)))):
        kl = torch.distributions.kl_divergence(q, StdNormalVector(3, (4,)))
        np.testing.assert_allclose(kl.numpy(), torch.distributions.kl_divergence(ref, std).numpy(), rtol=1e-10)
        np.testing.assert_allclose(q.log_prob(x).numpy(), ref.log_prob(x).numpy(), rtol=1e-10)
        draws = q.expand(torch.Size([4])).rsample(torch.Size([20000]))
        np.testing.assert_allclose(draws.mean(0).numpy(), loc.numpy(), atol=0.1)


# ---------------------------------------------------------------------------------------------- SVI
def test_svi_recovers_the_truth_and_reports_like_msl(sim, svi):
    res = svi
    assert isinstance(res, BayesResults)
    assert res.param_names == ["x3", "x1", "x2", "sd.x1", "sd.x2"]
    assert res.converged, res.message
    truth = sim.truth
    z = (res.params - truth) / res.bse
    assert (z.abs() < 3).all(), z
    assert (res.bse > 0).all() and (res.bse < 0.2).all()
    assert res.elbo.shape == (res.n_iter,) and np.isfinite(res.elbo).all()
    assert np.mean(res.elbo[-50:]) > np.mean(res.elbo[:50])  # the ELBO went up
    ci = res.conf_int(0.1)
    assert (ci["lower"] < res.params).all() and (res.params < ci["upper"]).all()
    text = res.summary()
    assert "SVI (fullrank guide" in text and "sd.x2" in text and "priors: x3 ~ normal(0, 10)" in text


def test_svi_is_reproducible_with_a_seed(sim, svi):
    again = sim.model.fit(sim.data, method="svi", guide="fullrank", steps=1500, seed=0)
    np.testing.assert_array_equal(again.draws, svi.draws)


def test_posterior_draws_and_individual_estimates(sim, svi):
    post = svi.posterior(n=300, seed=1)
    assert post.params.shape == (300, 5) and list(post.params.columns) == svi.param_names
    assert post.individual.shape == (300, 120, 2) and post.coefficients == ["x1", "x2"]
    ind = svi.individual()
    assert ind.shape == (120, 4) and list(ind.columns) == ["x1", "x2", "sd.x1", "sd.x2"]
    gap = np.abs(post.individual.mean(0) - ind[["x1", "x2"]].to_numpy())  # two Monte Carlo estimates
    assert gap.mean() < 0.04 and gap.max() < 0.25
    # individual estimates track the simulated coefficients (shrunk towards the mean)
    assert np.corrcoef(ind["x1"], sim.betas["x1"])[0, 1] > 0.5
    with pytest.raises(ValueError, match="n must be a positive integer"):
        svi.posterior(n=0)


def test_to_arviz_groups_dims_and_loo(sim, svi):
    idata = svi.to_arviz(n=400, draws=40)
    for g in ("posterior", "log_likelihood", "posterior_predictive", "observed_data", "sample_stats"):
        assert g in idata.groups(), g
    assert idata.posterior["beta"].dims == ("chain", "draw", "person", "coefficient")
    assert list(idata.posterior["coefficient"].values) == ["x1", "x2"]
    assert idata.log_likelihood["choice"].shape == (1, 400, 120)
    assert idata.posterior_predictive["choice"].shape == (1, 400, 720)
    assert idata.sample_stats["elbo"].shape == (svi.n_iter,)
    summ = az.summary(idata, var_names=svi.param_names, kind="stats")
    np.testing.assert_allclose(summ["mean"], svi.params, atol=0.03)
    loo = az.loo(idata, pointwise=True)
    assert np.isfinite(loo.elpd_loo) and (np.asarray(loo.pareto_k) < 0.7).mean() > 0.9
    from matplotlib.figure import Figure

    ax = Figure().add_subplot(1, 1, 1)
    az.plot_posterior(idata, var_names=["x1"], ax=ax)
    assert ax.get_title() == "x1"
    ax = Figure().add_subplot(1, 1, 1)
    az.plot_forest(idata, var_names=svi.param_names, combined=True, ax=ax)
    cond = svi.to_arviz(n=200, log_likelihood="conditional", individual=False)
    assert "beta" not in cond.posterior and np.isfinite(az.loo(cond).elpd_loo)


def test_save_load_round_trip(tmp_path, svi):
    path = svi.save(tmp_path / "r.json")
    back = load(path)
    assert isinstance(back, BayesResults) and back.method == "svi"
    np.testing.assert_array_equal(back.draws, svi.draws)
    pd_eq = np.testing.assert_allclose
    pd_eq(back.params.to_numpy(), svi.params.to_numpy(), rtol=1e-15)
    pd_eq(back.individual().to_numpy(), svi.individual().to_numpy(), rtol=1e-15)
    assert back.posterior(100).individual is None and back.priors == svi.priors
    with pytest.raises(FileExistsError, match="overwrite=True"):
        svi.save(path)
    assert "posterior" in back.to_arviz().groups()
    bad = tmp_path / "notes.txt"
    bad.write_text("not json")
    with pytest.raises(ValueError, match="notes.txt is not a mixlogit results file"):
        load(bad)


@pytest.mark.parametrize("guide", ["meanfield", "amortized"])
def test_other_guides_agree_with_fullrank(sim, svi, guide):
    res = sim.model.fit(sim.data, method="svi", guide=guide, steps=1500, seed=0)
    assert res.settings["guide"] == guide
    diff = (res.params - svi.params) / svi.bse
    assert (diff.abs() < 2.5).all(), diff


def test_minibatch_svi_subsamples_persons(sim, svi):
    res = sim.model.fit(sim.data, method="svi", subsample=40, num_particles=2, steps=1500, seed=0)
    assert res.settings["subsample"] == 40 and res.settings["num_particles"] == 2
    diff = (res.params - svi.params) / svi.bse
    assert (diff.abs() < 2.5).all(), diff


def test_correlated_and_lognormal_models():
    sim = ml.simulate(n_persons=100, n_situations=6, random={"a": ("normal", 1.0, 0.6), "b": ("normal", -1.0, 0.5)},
                      chol={"chol.b.a": 0.4}, seed=2)
    res = sim.model.fit(sim.data, method="svi", steps=1000)
    assert res.param_names == ["a", "b", "sd.a", "sd.b", "chol.b.a"]
    assert abs(res.params["chol.b.a"] - 0.4) < 3 * res.bse["chol.b.a"]
    hm = prepare(sim.model, sim.data, None)
    g = hm.natural(torch.tensor([0.1, -0.2, 0.3, -0.1, 0.4], dtype=torch.float64))
    L = hm.spec.cholesky(hm.theta(g))  # the reported Cholesky factor and the model's scale matrix agree
    C = hm.scale_matrix(g)
    np.testing.assert_allclose((L @ L.T).numpy(), (C @ C.T).numpy(), atol=1e-12)
    ln = ml.simulate(n_persons=100, n_situations=6, random={"p": ("-lognormal", 0.0, 0.5)}, fixed={"q": 1.0}, seed=4)
    r = ln.model.fit(ln.data, method="svi", steps=1000)
    assert (((r.params - ln.truth) / r.bse).abs() < 3).all()


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, err, match", [
    ({"guide": "laplace"}, ValueError, "unknown guide 'laplace'; accepted: meanfield, fullrank, amortized"),
    ({"steps": 0}, ValueError, "steps must be an integer >= 1, got 0"),
    ({"learning_rate": -0.1}, ValueError, "learning_rate must be a positive finite number"),
    ({"subsample": 500}, ValueError, "subsample=500 exceeds the number of units \\(120\\)"),
    ({"num_samples": 10}, TypeError, "unknown argument 'num_samples' for method='svi'"),
    ({"init": "zero"}, ValueError, "unknown init 'zero'"),
    ({"seed": 1.5}, TypeError, "seed must be a non-negative integer"),
])
def test_svi_argument_errors(sim, kwargs, err, match):
    with pytest.raises(err, match=match):
        sim.model.fit(sim.data, method="svi", **kwargs)


def test_nuts_argument_errors(sim):
    with pytest.raises(TypeError, match="unknown argument 'subsample' for method='nuts'"):
        sim.model.fit(sim.data, method="nuts", subsample=10)
    with pytest.raises(ValueError, match="chains must be an integer >= 1"):
        sim.model.fit(sim.data, method="nuts", chains=0)


def test_data_errors_are_the_msl_ones(sim):
    with pytest.raises(TypeError, match="data must be a mixlogit.ChoiceData"):
        sim.model.fit(sim.df, method="svi")
    with pytest.raises(ml.ChoiceDataError, match="attribute column 'nope'"):
        ml.MixedLogit(random={"nope": "normal"}).fit(sim.data, method="svi")


def test_nan_elbo_stops_keeps_the_best_parameters_and_says_why(sim, monkeypatch):
    calls = {"n": 0}
    real = bayes_model.conditional_loglik

    def broken(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] > 120 else out

    monkeypatch.setattr(bayes_model, "conditional_loglik", broken)
    with pytest.warns(RuntimeWarning, match=r"ELBO is NaN/infinite at step \d+; .*smaller learning_rate"):
        res = sim.model.fit(sim.data, method="svi", guide="fullrank", steps=400, seed=0)
    assert not res.converged and "NaN" in res.message
    assert np.isfinite(res.draws).all()
    assert (((res.params - sim.truth) / res.bse).abs() < 4).all()


# ---------------------------------------------------------------------------------------------- NUTS
def test_nuts_small_panel_agrees_with_svi():
    sim = ml.simulate(n_persons=25, n_situations=6, random={"x1": ("normal", 1.0, 0.6)}, fixed={"x2": -0.5}, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = sim.model.fit(sim.data, method="nuts", num_samples=120, num_warmup=100, chains=2, seed=0)
    assert res.draws.shape == (2, 120, 3)
    assert res.sample_stats["diverging"].shape == (2, 120) and res.sample_stats["tree_depth"].min() >= 1
    assert int(res.sample_stats["diverging"].sum()) == 0
    frame = res.summary_frame()
    assert (frame["r_hat"] < 1.1).all() and "r_hat" in res.summary()
    idata = res.to_arviz(draws=30)
    assert idata.posterior["beta"].dims == ("chain", "draw", "person", "coefficient")
    assert set(idata.sample_stats.data_vars) == {"diverging", "tree_depth"}
    svi = sim.model.fit(sim.data, method="svi", steps=1500, seed=0)
    assert (((svi.params - res.params) / res.bse).abs() < 1).all()  # the peer run agrees


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_fit_svi_then_report(tmp_path, capsys):
    sim = ml.simulate(n_persons=60, n_situations=4, random={"x1": ("normal", 1.0, 0.5)}, fixed={"x2": 0.5}, seed=7)
    csv = tmp_path / "d.csv"
    sim.df.to_csv(csv, index=False)
    out = tmp_path / "out"
    rc = main(["fit", str(csv), "--choice", "choice", "--alt", "alt", "--situation", "situation", "--panel",
               "person", "--random", "x1=normal", "--fixed", "x2", "--method", "svi", "--steps", "200",
               "--prior", "sd=halfnormal(2)", "--out", str(out)])
    assert rc == 0
    res = load(out / "results.json")
    assert isinstance(res, BayesResults) and res.priors["sd.x1"] == "halfnormal(2)"
    assert res.settings["data"]["file"] == str(csv.resolve())
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Heterogeneity" in text and "elpd_loo" in text and "Pareto k" in text
    for name in ("densities.png", "forest.png", "individual.png"):
        assert (out / name).stat().st_size > 5000
    rc = main(["fit", str(csv), "--choice", "choice", "--alt", "alt", "--situation", "situation", "--random",
               "x1=normal", "--method", "svi", "--prior", "x1=normal(0,-1)", "--out", str(tmp_path / "bad")])
    assert rc == 2 and "scale must be > 0" in capsys.readouterr().err
