"""Results API: save/load, predict, individual-level estimates, elasticities, WTP, tables, exact Hessian and
sandwich covariance, correlated coefficients, coefficient moments, and the published MNL numbers.

Every check is against a number computed independently here (numpy brute force from the long table, finite
differences, closed forms, or published values). Fits are small (a few seconds each) and shared per module.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import optimize, stats

import mixlogit as ml
from mixlogit import ChoiceData, MixedLogit
from mixlogit.results import MixedLogitResults

DRAWS = 100


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sim1():
    """300 persons x 4 situations x 3 alternatives; x1 ~ normal(1, 0.5) random, x2 fixed at -1."""
    return ml.simulate(n_persons=300, n_situations=4, n_alts=3, random={"x1": ("normal", 1.0, 0.5)},
                       fixed={"x2": -1.0}, seed=1)


@pytest.fixture(scope="module")
def data1(sim1):
    return sim1.data


@pytest.fixture(scope="module")
def res1(sim1, data1):
    return sim1.model.fit(data1, draws=DRAWS, seed=5)


@pytest.fixture(scope="module")
def problem1(sim1, data1):
    return sim1.model.make_problem(data1, DRAWS, "halton", False, 5)


@pytest.fixture(scope="module")
def sim2():
    """Five independent random coefficients of five families, no fixed ones."""
    return ml.simulate(n_persons=150, n_situations=4, n_alts=3, random={
        "x1": ("normal", 1.0, 0.5), "price": ("-lognormal", 0.0, 0.4), "x3": ("uniform", 0.5, 1.0),
        "x4": ("triangular", -0.5, 1.0), "x5": ("lognormal", -0.5, 0.5)}, seed=2)


@pytest.fixture(scope="module")
def res2(sim2):
    return sim2.model.fit(sim2.data, draws=50)


@pytest.fixture(scope="module")
def sim3():
    """Two correlated normal coefficients."""
    return ml.simulate(n_persons=150, n_situations=4, n_alts=3,
                       random={"x1": ("normal", 1.0, 0.8), "x2": ("normal", -0.5, 0.6)},
                       chol={"chol.x2.x1": 0.5}, seed=3)


@pytest.fixture(scope="module")
def res3(sim3):
    return sim3.model.fit(sim3.data, draws=50)


@pytest.fixture(scope="module")
def elec():
    df = ml.datasets.load_electricity()
    return df, ChoiceData.from_long(df, choice="choice", alt="alt", situation="chid", panel="id")


ELEC_ATTRS = ["pf", "cl", "loc", "wk", "tod", "seas"]


@pytest.fixture(scope="module")
def elec_mnl(elec):
    return MixedLogit(fixed=ELEC_ATTRS).fit(elec[1])


# ---------------------------------------------------------------------------------------------- brute force helpers
def situations_of(df: pd.DataFrame, sit_col: str = "situation"):
    """Group row positions by situation, in order of first appearance."""
    return [np.asarray(ix) for ix in df.groupby(sit_col, sort=False).indices.values()]


def draws_of_unit(res, problem, n: int) -> np.ndarray:
    """(R, Kr) coefficient draws of unit n, through the estimation's spec and rule."""
    th = torch.as_tensor(res.theta, dtype=torch.float64)
    return problem.spec.coefficients(th, problem.rule.z[n:n + 1])[0].numpy()


def softmax_rows(v: np.ndarray) -> np.ndarray:
    v = v - v.max(axis=0, keepdims=True)
    e = np.exp(v)
    return e / e.sum(axis=0, keepdims=True)


# ---------------------------------------------------------------------------------------------- save / load
def test_save_load_exact_round_trip(tmp_path, res1, data1):
    path = res1.save(tmp_path / "res.json")
    loaded = ml.load(path)
    assert isinstance(loaded, MixedLogitResults)
    assert loaded.param_names == res1.param_names
    for attr in ("params", "bse", "robust_bse", "tvalues", "pvalues"):
        assert getattr(loaded, attr).equals(getattr(res1, attr)), attr
    assert loaded.cov.equals(res1.cov)
    assert loaded.robust_cov.equals(res1.robust_cov)
    assert np.array_equal(loaded.theta, res1.theta)
    assert np.array_equal(loaded.hessian, res1.hessian)
    assert loaded.loglik == res1.loglik
    assert loaded.null_loglik == res1.null_loglik
    assert loaded.settings == res1.settings
    assert loaded.converged == res1.converged and loaded.n_iter == res1.n_iter
    assert (loaded.aic, loaded.bic) == (res1.aic, res1.bic)
    assert loaded.predict(data1).equals(res1.predict(data1))
    assert loaded.individual(data1).equals(res1.individual(data1))


def test_save_refuses_overwrite_unless_asked(tmp_path, res1, elec_mnl):
    path = tmp_path / "sub" / "res.json"
    res1.save(path)  # creates the folder
    with pytest.raises(FileExistsError, match=r"res\.json exists; pass overwrite=True"):
        elec_mnl.save(path)
    assert ml.load(path).loglik == res1.loglik
    # A user's own file next to the results is never touched by the atomic write.
    mine = tmp_path / "sub" / "res.json.tmp"
    mine.write_text("my notes")
    elec_mnl.save(path, overwrite=True)
    assert ml.load(path).loglik == elec_mnl.loglik
    assert mine.read_text() == "my notes"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["res.json", "res.json.tmp"]
    with pytest.raises(IsADirectoryError, match=r"sub is a folder; give a file name"):
        elec_mnl.save(tmp_path / "sub", overwrite=True)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.json does not exist"):
        ml.load(tmp_path / "nothere.json")
    p = tmp_path / "other.json"
    p.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match=r"other\.json is not a mixlogit results file \(format 'something-else'"):
        ml.load(p)
    with pytest.raises(IsADirectoryError, match="is a folder; give the results file in it"):
        ml.load(tmp_path)
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"other\.json is not a mixlogit results file \(not JSON text"):
        ml.load(p)
    p.write_text('{"format": "mixlogit.results", "version": 99}')
    with pytest.raises(ValueError, match="has format version 99; this mixlogit reads version 1"):
        ml.load(p)
    p.write_text('{"format": "mixlogit.results", "version": 1}')
    with pytest.raises(ValueError, match=r"other\.json is damaged: the field 'spec' is missing"):
        ml.load(p)


# ---------------------------------------------------------------------------------------------- predict
def test_predict_sums_to_one_and_matches_brute_force(res1, data1, problem1, sim1):
    p = res1.predict(data1)
    df = sim1.df
    assert p.index.equals(df.index)
    sums = p.groupby(df["situation"]).sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-12)
    # Brute force from the long table: the person's draws are shared by their situations.
    b_x2 = res1.params["x2"]
    persons = pd.factorize(df["person"])[0]
    for rows in situations_of(df)[:: 97]:
        n = persons[rows[0]]
        beta = draws_of_unit(res1, problem1, n)[:, 0]  # (R,)
        v = np.outer(df["x1"].to_numpy()[rows], beta) + b_x2 * df["x2"].to_numpy()[rows, None]
        expected = softmax_rows(v).mean(axis=1)
        np.testing.assert_allclose(p.to_numpy()[rows], expected, rtol=1e-12, atol=1e-15)


def test_predict_zero_for_unavailable_rows(res1, sim1):
    df = sim1.df.copy()
    df["av"] = 1
    unavailable = (df["alt"] == 2) & (df["choice"] == 0) & (df["situation"] % 3 == 0)
    df.loc[unavailable, "av"] = 0
    data = ChoiceData.from_long(df, choice="choice", alt="alt", situation="situation", panel="person", avail="av")
    p = res1.predict(data)
    assert unavailable.sum() > 50
    assert (p[unavailable] == 0.0).all()
    np.testing.assert_allclose(p.groupby(df["situation"]).sum().to_numpy(), 1.0, atol=1e-12)
    # Available rows of a situation with alternative 2 removed: the 2-alternative mixed logit by hand.
    problem = sim1.model.make_problem(data, DRAWS, "halton", False, 5)  # the fit's settings
    persons = pd.factorize(df["person"])[0]
    rows = situations_of(df)
    checked = 0
    for r in rows:
        if not unavailable.to_numpy()[r].any():
            continue
        r_av = r[df["av"].to_numpy()[r] == 1]
        beta = draws_of_unit(res1, problem, persons[r[0]])[:, 0]
        v = np.outer(df["x1"].to_numpy()[r_av], beta) + res1.params["x2"] * df["x2"].to_numpy()[r_av, None]
        np.testing.assert_allclose(p.to_numpy()[r_av], softmax_rows(v).mean(axis=1), rtol=1e-12)
        checked += 1
        if checked == 5:
            break
    assert checked == 5


def test_elasticities_with_unavailable_rows(res1, sim1):
    df = sim1.df.copy()
    df["av"] = np.where((df["alt"] == 1) & (df["choice"] == 0) & (df["situation"] % 2 == 0), 0, 1)
    data = ChoiceData.from_long(df, choice="choice", alt="alt", situation="situation", panel="person", avail="av")
    e = res1.elasticities(data, "x2")
    unavailable = df["av"].to_numpy() == 0
    assert np.isnan(e.to_numpy()[unavailable]).all()
    assert np.isfinite(e.to_numpy()[~unavailable]).all()
    # Own elasticity of an available row: finite differences on the same (masked) data.
    eps = 1e-4
    lp = []
    for f in (1 + eps, 1 - eps):
        d2 = df.copy()
        d2.loc[d2["alt"] == 0, "x2"] *= f
        d2 = ChoiceData.from_long(d2, choice="choice", alt="alt", situation="situation", panel="person",
                                  avail="av")
        lp.append(np.log(res1.predict(d2).to_numpy(), where=~unavailable, out=np.zeros(len(df))))
    fd = (lp[0] - lp[1]) / (math.log1p(eps) - math.log1p(-eps))
    m = (df["alt"] == 0).to_numpy()
    np.testing.assert_allclose(e.to_numpy()[m], fd[m], rtol=1e-5, atol=1e-8)
    cross = res1.elasticities(data, "x2", cross=True)
    assert np.isfinite(cross.to_numpy()).all()


def test_predict_cross_section(res1, sim1):
    """Without a panel each situation gets its own draws: check against brute force too."""
    data = ChoiceData.from_long(sim1.df.head(90), choice="choice", alt="alt", situation="situation")
    p = res1.predict(data)
    problem = sim1.model.make_problem(data, DRAWS, "halton", False, 5)  # the fit's settings
    assert problem.rule.z.shape[0] == 30
    df = sim1.df.head(90)
    for s, rows in enumerate(situations_of(df)):
        beta = draws_of_unit(res1, problem, s)[:, 0]
        v = np.outer(df["x1"].to_numpy()[rows], beta) + res1.params["x2"] * df["x2"].to_numpy()[rows, None]
        np.testing.assert_allclose(p.to_numpy()[rows], softmax_rows(v).mean(axis=1), rtol=1e-12)


def test_predict_rejects_data_with_other_alternatives(sim1, data1):
    res = MixedLogit(fixed=["x1", "x2"], asc=True).fit(data1)
    assert res.param_names == ["asc.1", "asc.2", "x1", "x2"]
    two = sim1.df[sim1.df["alt"] < 2]
    two = two.assign(choice=(two["alt"] == 0).astype(int))
    other = ChoiceData.from_long(two, choice="choice", alt="alt", situation="situation", panel="person")
    with pytest.raises(ValueError, match="different parameter layout"):
        res.predict(other)


# ---------------------------------------------------------------------------------------------- individual
def test_individual_matches_revelt_train_brute_force(res1, data1, problem1, sim1):
    ind = res1.individual(data1)
    assert list(ind.columns) == ["x1", "sd.x1"]
    assert ind.index.tolist() == sorted(sim1.df["person"].unique().tolist())
    df = sim1.df
    b_x2 = res1.params["x2"]
    for n in (0, 7, 123, 299):
        beta = draws_of_unit(res1, problem1, n)[:, 0]  # (R,)
        log_l = np.zeros_like(beta)
        for rows in situations_of(df[df["person"] == n]):
            r = df.index.get_indexer(df[df["person"] == n].index[rows])
            v = np.outer(df["x1"].to_numpy()[r], beta) + b_x2 * df["x2"].to_numpy()[r, None]
            chosen = np.flatnonzero(df["choice"].to_numpy()[r] == 1)[0]
            log_l += np.log(softmax_rows(v)[chosen])
        w = np.exp(log_l - log_l.max())
        w /= w.sum()
        mean = float(w @ beta)
        sd = math.sqrt(float(w @ (beta - mean) ** 2))
        assert ind.loc[n, "x1"] == pytest.approx(mean, abs=1e-10)
        assert ind.loc[n, "sd.x1"] == pytest.approx(sd, abs=1e-10)
    # The conditional means average to about the population mean (Revelt and Train's check).
    assert ind["x1"].mean() == pytest.approx(res1.params["x1"], abs=0.05)


def test_individual_recovers_true_betas_with_long_panels():
    sim = ml.simulate(n_persons=60, n_situations=30, n_alts=3, random={"x1": ("normal", 1.0, 1.0)},
                      fixed={"x2": -1.0}, seed=4)
    data = sim.data
    res = sim.model.fit(data, draws=30)
    ind = res.individual(data)
    r = np.corrcoef(ind["x1"].to_numpy(), sim.betas["x1"].to_numpy())[0, 1]
    assert r > 0.8
    # The posterior sd is well below the population sd with 30 choices each.
    assert ind["sd.x1"].mean() < 0.6 * res.params["sd.x1"]


def test_individual_needs_random_coefficients(elec_mnl, elec):
    with pytest.raises(ValueError, match="no random coefficients"):
        elec_mnl.individual(elec[1])


# ---------------------------------------------------------------------------------------------- elasticities
def _scaled_predict(res, df, attr, alt, factor):
    df = df.copy()
    m = df["alt"] == alt
    df.loc[m, attr] = df.loc[m, attr] * factor
    d = ChoiceData.from_long(df, choice="choice", alt="alt", situation="situation", panel="person")
    return np.log(res.predict(d).to_numpy())


@pytest.mark.parametrize("attr", ["x1", "x2"])  # random and fixed coefficient
def test_own_elasticities_equal_finite_differences(res1, data1, sim1, attr):
    df = sim1.df
    e = res1.elasticities(data1, attr)
    assert e.index.equals(df.index)
    eps = 1e-4
    for alt in (0, 2):
        m = (df["alt"] == alt).to_numpy()
        up = _scaled_predict(res1, df, attr, alt, 1 + eps)
        dn = _scaled_predict(res1, df, attr, alt, 1 - eps)
        fd = (up - dn) / (math.log1p(eps) - math.log1p(-eps))
        np.testing.assert_allclose(e.to_numpy()[m], fd[m], rtol=1e-5, atol=1e-8)


def test_cross_elasticities_frame(res1, data1, sim1):
    df = sim1.df
    cross = res1.elasticities(data1, "x2", cross=True)
    assert cross.shape == (3, 3)
    assert list(cross.index) == ["0", "1", "2"] and list(cross.columns) == ["0", "1", "2"]
    assert (np.diag(cross.to_numpy()) < 0).all()  # negative coefficient
    own = res1.elasticities(data1, "x2")
    eps = 1e-4
    alt = df["alt"].to_numpy()
    for j in range(3):
        up = _scaled_predict(res1, df, "x2", j, 1 + eps)
        dn = _scaled_predict(res1, df, "x2", j, 1 - eps)
        fd = (up - dn) / (math.log1p(eps) - math.log1p(-eps))
        for i in range(3):
            assert cross.iloc[i, j] == pytest.approx(fd[alt == i].mean(), rel=1e-5)
        assert cross.iloc[j, j] == pytest.approx(own.to_numpy()[alt == j].mean(), rel=1e-12)


def test_mnl_elasticities_closed_form(elec_mnl, elec):
    """MNL: own beta x_i (1 - P_i), cross -beta x_j P_j (the same for every i: IIA)."""
    df, data = elec
    b = elec_mnl.params["pf"]
    P = elec_mnl.predict(data).to_numpy()
    x = df["pf"].to_numpy(float)
    own = elec_mnl.elasticities(data, "pf")
    np.testing.assert_allclose(own.to_numpy(), b * x * (1 - P), rtol=1e-10, atol=1e-12)
    cross = elec_mnl.elasticities(data, "pf", cross=True)
    assert list(cross.index) == ["1", "2", "3", "4"]
    alt = df["alt"].to_numpy()
    for j in range(4):
        col = -b * x[alt == j + 1] * P[alt == j + 1]
        for i in range(4):
            expected = (b * x * (1 - P))[alt == j + 1].mean() if i == j else col.mean()
            assert cross.iloc[i, j] == pytest.approx(expected, rel=1e-10)
    assert (np.diag(cross.to_numpy()) < 0).all()  # price coefficient < 0 and prices >= 0
    assert (cross.to_numpy()[~np.eye(4, dtype=bool)] > 0).all()


def test_elasticities_unknown_attribute(res1, data1):
    with pytest.raises(ValueError, match=r"attribute 'x9' is not a coefficient of the model"):
        res1.elasticities(data1, "x9")


# ---------------------------------------------------------------------------------------------- WTP
def test_wtp_fixed_price(res1):
    w = res1.wtp("x1", "x2")
    assert list(w.index) == ["mean", "sd"] and list(w.columns) == ["estimate", "std.err"]
    m, s, p = res1.params["x1"], res1.params["sd.x1"], res1.params["x2"]
    assert w.loc["mean", "estimate"] == pytest.approx(-m / p, rel=1e-12)
    assert w.loc["sd", "estimate"] == pytest.approx(s / abs(p), rel=1e-8)
    # Delta method by hand for the mean: gradient (-1/p, m/p^2) in (x1, x2).
    g = np.zeros(res1.n_params)
    names = res1.param_names
    g[names.index("x1")], g[names.index("x2")] = -1 / p, m / p**2
    se = math.sqrt(g @ res1.cov.to_numpy() @ g)
    assert w.loc["mean", "std.err"] == pytest.approx(se, rel=1e-8)
    assert (w["std.err"] > 0).all()


def test_wtp_fixed_attribute_and_price(elec_mnl):
    w = elec_mnl.wtp("cl", "pf")
    a, p = elec_mnl.params["cl"], elec_mnl.params["pf"]
    assert w.loc["mean", "estimate"] == pytest.approx(-a / p, rel=1e-12)
    assert w.loc["sd", "estimate"] == pytest.approx(0.0, abs=1e-12)


def test_wtp_fixed_attribute_and_price_std_err(elec_mnl):
    w = elec_mnl.wtp("cl", "pf")
    a, p = elec_mnl.params["cl"], elec_mnl.params["pf"]
    c = elec_mnl.cov.loc[["cl", "pf"], ["cl", "pf"]].to_numpy()
    g = np.array([-1 / p, a / p**2])
    assert w.loc["mean", "std.err"] == pytest.approx(math.sqrt(g @ c @ g), rel=1e-8)


def test_wtp_negative_lognormal_price(res2):
    w = res2.wtp("x1", "price")
    mu, s = res2.params["price"], res2.params["sd.price"]
    e_inv = -math.exp(-mu + s**2 / 2)  # E[1/beta] for beta = -exp(mu + s z)
    e_inv2 = math.exp(-2 * mu + 2 * s**2)
    ma, sa = res2.params["x1"], res2.params["sd.x1"]
    mean = -ma * e_inv
    assert w.loc["mean", "estimate"] == pytest.approx(mean, rel=1e-10)
    sd = math.sqrt((sa**2 + ma**2) * e_inv2 - mean**2)
    assert w.loc["sd", "estimate"] == pytest.approx(sd, rel=1e-7)
    assert (w["std.err"] > 0).all()
    # Delta method by hand for the mean: d/d(x1, price, sd.price) of -x1 * E[1/beta].
    idx = [res2.param_names.index(n) for n in ("x1", "price", "sd.price")]
    g = np.array([-e_inv, ma * e_inv, -ma * s * e_inv])
    se = math.sqrt(g @ res2.cov.to_numpy()[np.ix_(idx, idx)] @ g)
    assert w.loc["mean", "std.err"] == pytest.approx(se, rel=1e-6)
    # A Monte Carlo check of the two moments.
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 400_000))
    ratio = -(ma + sa * z[0]) / (-np.exp(mu + s * z[1]))
    assert ratio.mean() == pytest.approx(mean, rel=0.01)
    assert ratio.std() == pytest.approx(sd, rel=0.02)


def test_wtp_errors(res1, res2, res3):
    with pytest.raises(ValueError, match=r"random price coefficient needs it to be lognormal or -lognormal.*"
                                         r"'x1' is 'normal'"):
        res2.wtp("x3", "x1")
    with pytest.raises(ValueError, match=r"price 'zz' is not a coefficient of the model"):
        res1.wtp("x1", "zz")
    with pytest.raises(ValueError, match=r"attribute 'zz' is not a coefficient"):
        res1.wtp("zz", "x2")
    with pytest.raises(ValueError, match="attribute and price must differ"):
        res1.wtp("x2", "x2")
    with pytest.raises(ValueError, match=r"'x2' is 'normal' and correlated"):
        res3.wtp("x1", "x2")


# ---------------------------------------------------------------------------------------------- tables
def test_conf_int_pvalues_aic_bic(res1):
    ci = res1.conf_int()
    assert list(ci.columns) == ["lower", "upper"]
    np.testing.assert_allclose(ci["lower"], res1.params - 1.959964 * res1.bse, atol=1e-6)
    np.testing.assert_allclose(ci["upper"], res1.params + 1.959964 * res1.bse, atol=1e-6)
    ci90 = res1.conf_int(alpha=0.1, robust=True)
    np.testing.assert_allclose(ci90["upper"], res1.params + 1.644854 * res1.robust_bse, atol=1e-6)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\), got 1.5"):
        res1.conf_int(alpha=1.5)
    np.testing.assert_allclose(res1.tvalues, res1.params / res1.bse, rtol=1e-14)
    np.testing.assert_allclose(res1.pvalues, 2 * stats.norm.sf(np.abs(res1.params / res1.bse)), rtol=1e-12)
    assert res1.n_params == 3
    assert res1.n_obs == 1200 and res1.n_units == 300
    assert res1.aic == pytest.approx(2 * 3 - 2 * res1.loglik, rel=1e-14)
    assert res1.bic == pytest.approx(math.log(1200) * 3 - 2 * res1.loglik, rel=1e-14)
    np.testing.assert_allclose(res1.bse, np.sqrt(np.diag(res1.cov)), rtol=1e-14)


def test_summary_text(res1):
    text = res1.summary()
    for name in res1.param_names:
        assert name in text
    assert f"log-likelihood: {res1.loglik:.3f}" in text
    assert f"null: {res1.null_loglik:.3f}" in text
    assert f"{DRAWS} halton draws" in text
    assert f"{res1.params['x1']:.4f}" in text
    frame = res1.summary_frame()
    assert list(frame.columns) == ["estimate", "std.err", "z", "p", "robust.se", "lower", "upper"]
    assert frame["estimate"].equals(res1.params.rename("estimate")) or np.array_equal(frame["estimate"],
                                                                                       res1.params)


def test_truth_is_recovered(res1, sim1):
    """Estimates within 4 robust SEs of the simulated truth (a loose statistical sanity check)."""
    z = (res1.params - sim1.truth[res1.param_names]) / res1.robust_bse
    assert (z.abs() < 4).all(), z
    assert res1.converged is True and res1.hessian_singular is False


# ---------------------------------------------------------------------------------------------- Hessian and sandwich
def test_exact_hessian_equals_finite_differences(res1, sim1):
    data = ChoiceData.from_long(sim1.df[sim1.df["person"] < 40], choice="choice", alt="alt",
                                situation="situation", panel="person")
    problem = sim1.model.make_problem(data, 20, "halton", False, 1)
    theta = res1.theta
    h_exact = problem.hessian(theta)
    h = 1e-5
    fd = np.zeros_like(h_exact)
    for k in range(len(theta)):
        e = np.zeros_like(theta)
        e[k] = h
        fd[:, k] = (problem.value_and_grad(theta + e)[1] - problem.value_and_grad(theta - e)[1]) / (2 * h)
    np.testing.assert_allclose(h_exact, fd, rtol=1e-5, atol=1e-6 * np.abs(h_exact).max())
    np.testing.assert_array_equal(h_exact, h_exact.T)
    assert (np.linalg.eigvalsh(h_exact) < 0).all()


def test_scores_sum_to_gradient_and_sandwich_by_hand(res1, problem1):
    theta = res1.theta
    scores = problem1.scores(theta)
    assert scores.shape == (300, 3)
    value, grad = problem1.value_and_grad(theta)
    assert value == pytest.approx(res1.loglik, abs=1e-9)
    np.testing.assert_allclose(scores.sum(axis=0), grad, atol=1e-8)
    assert np.abs(grad).max() < 1e-4  # the fit converged
    hess = problem1.hessian(theta)
    np.testing.assert_allclose(res1.hessian, hess, rtol=1e-10, atol=1e-10)
    hinv = np.linalg.inv(-hess)
    meat = scores.T @ scores
    flip = np.array([1.0, 1.0, np.sign(theta[2])])  # sd.x1 is reported as |sd.x1|
    np.testing.assert_allclose(res1.cov.to_numpy(), hinv * np.outer(flip, flip), rtol=1e-8)
    np.testing.assert_allclose(res1.robust_cov.to_numpy(), (hinv @ meat @ hinv) * np.outer(flip, flip),
                               rtol=1e-8)
    np.testing.assert_allclose(res1.robust_bse.to_numpy(), np.sqrt(np.diag(hinv @ meat @ hinv)), rtol=1e-8)


# ---------------------------------------------------------------------------------------------- correlated coefficients
def test_random_cov_and_corr(res3):
    assert res3.param_names == ["x1", "x2", "sd.x1", "sd.x2", "chol.x2.x1"]
    cov, cov_se = res3.random_cov()
    corr, corr_se = res3.random_corr()
    for f in (cov, cov_se, corr, corr_se):
        assert list(f.index) == ["x1", "x2"] and list(f.columns) == ["x1", "x2"]
    th = res3.theta
    L = np.array([[th[2], 0.0], [th[4], th[3]]])
    np.testing.assert_allclose(cov.to_numpy(), L @ L.T, rtol=1e-12)
    d = np.sqrt(np.diag(L @ L.T))
    np.testing.assert_allclose(corr.to_numpy(), (L @ L.T) / np.outer(d, d), rtol=1e-12)
    np.testing.assert_allclose(np.diag(corr.to_numpy()), 1.0, rtol=1e-14)
    np.testing.assert_allclose(np.diag(corr_se.to_numpy()), 0.0, atol=1e-10)
    # Delta method by hand for var(x1) = s1^2 and cov(x1, x2) = s1 * c.
    flip = np.array([1.0, 1.0, np.sign(th[2]), np.sign(th[3]), 1.0])
    raw = res3.cov.to_numpy() * np.outer(flip, flip)  # covariance of the raw (signed) optimum
    s1, c = th[2], th[4]
    assert cov_se.loc["x1", "x1"] == pytest.approx(abs(2 * s1) * math.sqrt(raw[2, 2]), rel=1e-8)
    g = np.array([c, s1])
    se12 = math.sqrt(g @ raw[np.ix_([2, 4], [2, 4])] @ g)
    assert cov_se.loc["x1", "x2"] == pytest.approx(se12, rel=1e-8)
    assert (cov_se.to_numpy() > 0).all()
    # Marginal sds in coefficient_moments are the square roots of the covariance diagonal.
    mom = res3.coefficient_moments()
    np.testing.assert_allclose(mom["sd"].to_numpy(), d, rtol=1e-8)


def test_random_cov_built_from_params(res3):
    """The reported params (|sd| convention) build the same covariance as the raw optimum."""
    p = res3.params
    L = np.array([[p["sd.x1"], 0.0], [p["chol.x2.x1"], p["sd.x2"]]])
    np.testing.assert_allclose(res3.random_cov()[0].to_numpy(), L @ L.T, rtol=1e-12)


def _reflected(res, flip_index: list[int]) -> MixedLogitResults:
    """The same fit with theta -> D theta (D diagonal +-1), an equivalent parametrization, Hessian D H D."""
    d = res.to_dict()
    D = np.ones(res.n_params)
    D[flip_index] = -1.0
    d["theta"] = (np.asarray(d["theta"]) * D).tolist()
    d["hessian"] = (np.asarray(d["hessian"]) * np.outer(D, D)).tolist()
    d["meat"] = (np.asarray(d["meat"]) * np.outer(D, D)).tolist()
    return MixedLogitResults.from_dict(d, res.model)


def test_reported_params_invariant_to_independent_spread_sign(res1):
    other = _reflected(res1, [2])  # sd.x1 -> -sd.x1 has the same law
    np.testing.assert_allclose(other.params, res1.params, rtol=1e-15)
    np.testing.assert_allclose(other.cov, res1.cov, rtol=1e-12)
    np.testing.assert_allclose(other.robust_cov, res1.robust_cov, rtol=1e-12)


def test_reported_params_invariant_to_cholesky_column_sign(res3):
    # beta = mu + L z has the same law with column 1 of L negated: (sd.x1, chol.x2.x1) -> -(sd.x1, chol.x2.x1).
    other = _reflected(res3, [2, 4])
    np.testing.assert_allclose(other.random_cov()[0], res3.random_cov()[0], rtol=1e-12)
    np.testing.assert_allclose(other.params, res3.params, rtol=1e-12)
    np.testing.assert_allclose(other.cov, res3.cov, rtol=1e-10)


def test_random_cov_needs_correlated_model(res1):
    with pytest.raises(ValueError, match="no correlated random coefficients"):
        res1.random_cov()
    with pytest.raises(ValueError, match="no correlated random coefficients"):
        res1.random_corr()


# ---------------------------------------------------------------------------------------------- coefficient moments
def test_coefficient_moments_closed_forms(res2):
    mom = res2.coefficient_moments()
    assert list(mom.columns) == ["mean", "mean.se", "sd", "sd.se"]
    assert list(mom.index) == ["x1", "price", "x3", "x4", "x5"]
    p = res2.params
    # normal: mean and sd are the parameters, and so are their standard errors.
    assert mom.loc["x1", "mean"] == pytest.approx(p["x1"], rel=1e-10)
    assert mom.loc["x1", "sd"] == pytest.approx(p["sd.x1"], rel=1e-10)
    assert mom.loc["x1", "mean.se"] == pytest.approx(res2.bse["x1"], rel=1e-8)
    assert mom.loc["x1", "sd.se"] == pytest.approx(res2.bse["sd.x1"], rel=1e-8)
    # lognormal and -lognormal
    for name, sign in (("x5", 1.0), ("price", -1.0)):
        mu, s = p[name], p[f"sd.{name}"]
        mean = sign * math.exp(mu + s**2 / 2)
        assert mom.loc[name, "mean"] == pytest.approx(mean, rel=1e-8)
        assert mom.loc[name, "sd"] == pytest.approx(abs(mean) * math.sqrt(math.expm1(s**2)), rel=1e-8)
    # lognormal mean SE by hand: d mean / d(mu, s) = mean * (1, s).
    mu, s = p["x5"], p["sd.x5"]
    mean = math.exp(mu + s**2 / 2)
    idx = [res2.param_names.index("x5"), res2.param_names.index("sd.x5")]
    g = mean * np.array([1.0, s])
    se = math.sqrt(g @ res2.cov.to_numpy()[np.ix_(idx, idx)] @ g)
    assert mom.loc["x5", "mean.se"] == pytest.approx(se, rel=1e-6)
    # uniform on [m - s, m + s] and symmetric triangular
    assert mom.loc["x3", "mean"] == pytest.approx(p["x3"], rel=1e-8)
    assert mom.loc["x3", "sd"] == pytest.approx(p["sd.x3"] / math.sqrt(3), rel=1e-8)
    assert mom.loc["x4", "mean"] == pytest.approx(p["x4"], rel=1e-8)
    assert mom.loc["x4", "sd"] == pytest.approx(p["sd.x4"] / math.sqrt(6), rel=1e-8)
    assert (mom[["mean.se", "sd.se"]].to_numpy() > 0).all()
    # Both moments are linear in the parameters: the delta method is exact.
    b = res2.bse
    assert mom.loc["x3", "mean.se"] == pytest.approx(b["x3"], rel=1e-8)
    assert mom.loc["x3", "sd.se"] == pytest.approx(b["sd.x3"] / math.sqrt(3), rel=1e-8)
    assert mom.loc["x4", "mean.se"] == pytest.approx(b["x4"], rel=1e-8)
    assert mom.loc["x4", "sd.se"] == pytest.approx(b["sd.x4"] / math.sqrt(6), rel=1e-8)


def test_null_loglik_is_equal_shares_with_lognormal(res2):
    # 150 persons x 4 situations x 3 available alternatives.
    assert res2.null_loglik == pytest.approx(-600 * math.log(3), abs=1e-9)


def test_seed_none_predictions_are_reproducible(sim1):
    data = ChoiceData.from_long(sim1.df[sim1.df["person"] < 50], choice="choice", alt="alt",
                                situation="situation", panel="person")
    res = sim1.model.fit(data, draws=20, seed=None)
    np.testing.assert_array_equal(res.predict(data).to_numpy(), res.predict(data).to_numpy())
    # The seed drawn for the fit is recorded: refitting with it reproduces the fit and its predictions.
    again = sim1.model.fit(data, draws=20, seed=res.settings["seed"])
    assert again.loglik == res.loglik
    np.testing.assert_array_equal(again.predict(data).to_numpy(), res.predict(data).to_numpy())


def test_coefficient_moments_empty_for_mnl(elec_mnl):
    mom = elec_mnl.coefficient_moments()
    assert len(mom) == 0 and list(mom.columns) == ["mean", "mean.se", "sd", "sd.se"]


# ---------------------------------------------------------------------------------------------- published MNL numbers
def test_electricity_mnl_published_loglik(elec_mnl):
    assert elec_mnl.loglik == pytest.approx(-4958.649, abs=1e-3)
    assert elec_mnl.null_loglik == pytest.approx(-5972.156, abs=1e-3)
    assert elec_mnl.converged is True
    assert elec_mnl.n_obs == 4308 and elec_mnl.n_units == 361
    assert "log-likelihood: -4958.649" in elec_mnl.summary()


def test_electricity_mnl_matches_numpy_mnl(elec_mnl, elec):
    """Params and classical SEs against a plain numpy MNL (analytic gradient and Hessian)."""
    df = elec[0].sort_values(["chid", "alt"])
    X = df[ELEC_ATTRS].to_numpy(float).reshape(-1, 4, 6)
    y = df["choice"].to_numpy().reshape(-1, 4).argmax(axis=1)

    def probs(b):
        v = X @ b
        v -= v.max(axis=1, keepdims=True)
        e = np.exp(v)
        return e / e.sum(axis=1, keepdims=True)

    def nll(b):
        P = probs(b)
        ll = np.log(P[np.arange(len(y)), y]).sum()
        g = (X[np.arange(len(y)), y] - np.einsum("sj,sjk->sk", P, X)).sum(0)
        return -ll, -g

    r = optimize.minimize(nll, np.zeros(6), jac=True, method="BFGS", options={"gtol": 1e-8})
    assert -r.fun == pytest.approx(elec_mnl.loglik, abs=1e-6)
    np.testing.assert_allclose(elec_mnl.params[ELEC_ATTRS].to_numpy(), r.x, rtol=1e-4, atol=1e-5)
    P = probs(elec_mnl.params[ELEC_ATTRS].to_numpy())
    xbar = np.einsum("sj,sjk->sk", P, X)
    dx = X - xbar[:, None, :]
    info = np.einsum("sj,sjk,sjl->kl", P, dx, dx)
    se = np.sqrt(np.diag(np.linalg.inv(info)))
    np.testing.assert_allclose(elec_mnl.bse[ELEC_ATTRS].to_numpy(), se, rtol=1e-6)
