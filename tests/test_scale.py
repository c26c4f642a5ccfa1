"""The random scale of the whole utility (``MixedLogit(scale="lognormal")``, S-MNL) and the Netherlands train data.

Numbers are checked against mlogit's printed MNL log-likelihood on the train data, against closed forms of the
lognormal scale, against the identity between S-MNL with one attribute and a lognormal random coefficient, and
against a simulation with a known scale spread.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import mixlogit as ml
from mixlogit.datasets import TRAIN_ATTRIBUTES, TRAIN_COLUMNS, load_train
from mixlogit.draws import make_rule


@pytest.fixture(scope="module")
def train_data():
    return ml.ChoiceData.from_long(load_train(), **TRAIN_COLUMNS)


@pytest.fixture(scope="module")
def smnl(train_data):
    return ml.MixedLogit(fixed=TRAIN_ATTRIBUTES, scale="lognormal").fit(train_data, draws=128,
                                                                         draw_type="quadrature")


def test_train_data_is_the_netherlands_binary_panel(train_data):
    raw = load_train(raw=True)
    assert raw.shape == (2929, 11)
    assert (train_data.n_units, train_data.n_situations, len(train_data.alternatives)) == (235, 2929, 2)
    counts = raw.groupby("id").size()
    assert (counts.min(), counts.max()) == (5, 19)
    df = load_train()
    # Prices in euros and times in hours: the first trip costs 2400 guilder cents and takes 150 minutes.
    assert df["price"].iloc[0] == pytest.approx(24.0 / 2.20371, rel=1e-12)
    assert df["time"].iloc[0] == pytest.approx(2.5, rel=1e-12)


def test_mnl_on_train_matches_mlogit(train_data):
    """mlogit's vignette prints logLik -1724.2 for this model (price/100/2.20371, time/60, change, comfort)."""
    res = ml.MixedLogit(fixed=TRAIN_ATTRIBUTES).fit(train_data)
    assert res.loglik == pytest.approx(-1724.15, abs=0.005)
    assert round(res.loglik, 1) == -1724.2
    # mlogit's vignette estimates of the three attributes whose units agree (its price is scaled differently).
    for name, value in {"time": -1.7205514, "change": -0.3263409, "comfort": -0.9457256}.items():
        assert res.params[name] == pytest.approx(value, abs=5e-4)


def test_smnl_on_train_quadrature_agrees_with_10000_halton(train_data, smnl):
    assert smnl.converged
    theta = smnl.theta
    halton = ml.MixedLogit(fixed=TRAIN_ATTRIBUTES, scale="lognormal").make_problem(train_data, draws=10_000)
    assert abs(halton.loglik(theta) - smnl.loglik) < 0.05
    # The scale is strongly heterogeneous on this panel: the likelihood-ratio test against MNL rejects tau = 0.
    mnl = ml.MixedLogit(fixed=TRAIN_ATTRIBUTES).fit(train_data)
    assert 2 * (smnl.loglik - mnl.loglik) > 50
    assert abs(smnl.params["sd.scale"]) / smnl.bse["sd.scale"] > 5


def test_smnl_hessian_is_exact(train_data, smnl):
    """The autograd Hessian against central differences of the exact gradient."""
    problem = ml.MixedLogit(fixed=TRAIN_ATTRIBUTES, scale="lognormal").make_problem(
        train_data, draws=128, draw_type="quadrature")
    theta = smnl.theta
    h = problem.hessian(theta)
    eps = 1e-5
    fd = np.empty_like(h)
    for i in range(len(theta)):
        e = np.zeros_like(theta)
        e[i] = eps
        fd[:, i] = (problem.value_and_grad(theta + e)[1] - problem.value_and_grad(theta - e)[1]) / (2 * eps)
    np.testing.assert_allclose(h, fd, rtol=1e-5, atol=1e-4)


def test_scale_heterogeneity_row_is_the_closed_form(smnl):
    """E[s] = 1 by construction; sd(s) = sqrt(exp(tau^2) - 1); median exp(-tau^2 / 2)."""
    het = smnl.heterogeneity()
    tau = abs(smnl.params["sd.scale"])
    row = het.loc["scale"]
    assert row["mean"] == pytest.approx(1.0, abs=1e-9)
    assert row["sd"] == pytest.approx(math.sqrt(math.expm1(tau**2)), rel=1e-6)
    assert row["q50"] == pytest.approx(math.exp(-tau**2 / 2), rel=1e-9)
    assert row["share_opposite"] == 0.0


def test_one_attribute_smnl_is_a_lognormal_coefficient(train_data):
    """s * b with s = exp(tau z - tau^2/2) is exp(log b - tau^2/2 + tau z): the same model as a lognormal random
    coefficient with location log b - tau^2/2, so the two log-likelihoods agree on the same rule."""
    b, tau = 0.8, 0.7
    df = load_train()
    df["neg_price"] = -df["price"]
    data = ml.ChoiceData.from_long(df, **TRAIN_COLUMNS)
    scaled = ml.MixedLogit(fixed=["neg_price"], scale="lognormal").make_problem(data, draws=64,
                                                                                 draw_type="gauss-hermite")
    lognormal = ml.MixedLogit(random={"neg_price": "lognormal"}).make_problem(data, draws=64,
                                                                              draw_type="gauss-hermite")
    a = scaled.loglik(np.array([b, tau]))
    c = lognormal.loglik(np.array([math.log(b) - tau**2 / 2, tau]))
    assert a == pytest.approx(c, abs=1e-10)


def test_zero_scale_spread_is_the_model_without_scale(train_data):
    base = ml.MixedLogit(random={"price": "normal"}, fixed=["time", "change", "comfort"])
    scaled = ml.MixedLogit(random={"price": "normal"}, fixed=["time", "change", "comfort"], scale="lognormal")
    theta = np.array([-1.5, -0.3, -0.9, -0.3, 0.2])
    p0 = base.make_problem(train_data, draws=200, seed=3)
    p1 = scaled.make_problem(train_data, draws=200, seed=3)
    # The first draw columns of the scaled model's Halton sequence are the unscaled model's.
    np.testing.assert_array_equal(p1.rule.z[..., :1].numpy(), p0.rule.z.numpy())
    assert p1.loglik(np.append(theta, 0.0)) == pytest.approx(p0.loglik(theta), abs=1e-9)


def _simulate_smnl(n_persons: int, n_situations: int, beta: np.ndarray, tau: float, seed: int) -> pd.DataFrame:
    """A binary panel with U_j = s_n beta' x_j + Gumbel, log s_n ~ N(-tau^2/2, tau^2)."""
    rng = np.random.default_rng(seed)
    s = np.exp(tau * rng.standard_normal(n_persons) - tau**2 / 2)
    x = rng.standard_normal((n_persons, n_situations, 2, len(beta)))
    u = s[:, None, None] * (x @ beta) + rng.gumbel(size=(n_persons, n_situations, 2))
    chosen = u.argmax(-1)
    rows = []
    for n in range(n_persons):
        for t in range(n_situations):
            for j in range(2):
                rows.append({"id": n, "sit": n * n_situations + t, "alt": j, "choice": int(chosen[n, t] == j),
                             **{f"x{k}": x[n, t, j, k] for k in range(len(beta))}})
    return pd.DataFrame(rows)


def test_smnl_recovers_a_known_scale_spread():
    beta, tau = np.array([1.0, -0.5]), 0.8
    df = _simulate_smnl(400, 10, beta, tau, seed=11)
    data = ml.ChoiceData.from_long(df, choice="choice", alt="alt", situation="sit", panel="id")
    res = ml.MixedLogit(fixed=["x0", "x1"], scale="lognormal").fit(data, draws=96, draw_type="quadrature")
    est, se = res.params, res.bse
    truth = {"x0": 1.0, "x1": -0.5, "sd.scale": tau}
    for name, value in truth.items():  # params report |sd.scale| (its sign is not identified)
        assert abs(est[name] - value) < 3.5 * se[name], (name, est[name], se[name])
    ind = res.individual(data)
    assert list(ind.columns) == ["scale", "sd.scale"] and len(ind) == 400
    assert (ind["scale"] > 0).all()


def test_scale_with_random_coefficients_predicts_and_scales_elasticities(train_data):
    model = ml.MixedLogit(random={"price": "normal"}, fixed=["time", "change", "comfort"], scale="lognormal")
    res = model.fit(train_data, draws=100, seed=1)
    assert [n for n in res.param_names] == ["time", "change", "comfort", "price", "sd.price", "sd.scale"]
    p = res.predict(train_data)
    sums = p.groupby(train_data.df["choiceid"]).sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-12)
    own = res.elasticities(train_data, "time")
    assert own.notna().all() and (own < 0).all()
    het = res.heterogeneity()
    assert list(het.index) == ["price", "scale"]
    ind = res.individual(train_data)
    assert list(ind.columns) == ["price", "scale", "sd.price", "sd.scale"]


def test_scale_survives_save_and_load(tmp_path, smnl, train_data):
    path = smnl.save(tmp_path / "smnl.json")
    back = ml.load(path)
    assert back.model.scale == "lognormal"
    pd.testing.assert_series_equal(back.params, smnl.params)
    np.testing.assert_allclose(back.predict(train_data).to_numpy(), smnl.predict(train_data).to_numpy(), atol=1e-12)


def test_scale_bad_input(train_data):
    with pytest.raises(ValueError, match=r"unknown scale 'gamma'; accepted: None .*'lognormal'"):
        ml.MixedLogit(fixed=["price"], scale="gamma")
    with pytest.raises(ValueError, match="nothing|no coefficients for it to scale"):
        ml.MixedLogit(scale="lognormal")
    # The Bayesian estimators take a random scale (tests/test_bayes_scale.py) but not every SVI guide.
    with pytest.raises(ValueError, match="guide='fullrank' builds each unit's posterior on the linear predictor"):
        ml.MixedLogit(fixed=["price"], scale="lognormal").fit(train_data, method="svi", guide="fullrank")


def test_scale_draws_have_mean_one():
    spec = ml.MixedLogit(fixed=["a"], scale="lognormal").spec_for(ml.ChoiceData.from_long(
        pd.DataFrame({"s": [0, 0], "j": [0, 1], "y": [1, 0], "a": [0.0, 1.0]}), choice="y", alt="j", situation="s"))
    rule = make_rule("quadrature", 1, 256, 1)
    s = spec.scale_draws(torch.tensor([1.0, 1.3], dtype=torch.float64), rule.z)
    w = torch.exp(rule.log_weights)
    assert float((w * s).sum()) == pytest.approx(1.0, abs=1e-10)
    assert float((w * torch.log(s) ** 2).sum() - (w * torch.log(s)).sum() ** 2) == pytest.approx(1.69, abs=1e-8)


def test_cli_fits_smnl_on_the_train_data(tmp_path, capsys):
    from mixlogit.cli import main

    rc = main(["fit", "--dataset", "train", "--draws", "64", "--draw-type", "gauss-hermite",
               "--out", str(tmp_path / "train")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "sd.scale" in out and "scale='lognormal'" in out
    params = pd.read_csv(tmp_path / "train" / "params.csv", index_col=0)
    assert params.loc["sd.scale", "estimate"] == pytest.approx(1.099, abs=0.01)
