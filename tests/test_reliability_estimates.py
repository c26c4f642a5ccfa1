"""Estimates that do not mislead: boolean arguments, unit-free standard errors, unidentified parameters named,
honest integration errors, results independent of row order, impossible combinations refused."""

import numpy as np
import pandas as pd
import pytest

import mixlogit as ml
from mixlogit.budget import MAX_RULE_BYTES
from mixlogit.data import ChoiceDataError
from mixlogit.draws import deterministic_rule, make_rule
from mixlogit.simulate import simulate


@pytest.fixture(scope="module")
def sim():
    return simulate(n_persons=60, n_situations=4, n_alts=3, random={"x1": ("normal", 1.0, 0.6)},
                    fixed={"x2": -0.8}, seed=5)


def data_of(df, **kw):
    return ml.ChoiceData.from_long(df, choice="choice", alt="alt", situation="situation", panel="person", **kw)


# ---------------------------------------------------------------------------------------------- B1 booleans
@pytest.mark.parametrize("call", [
    lambda d, m: m.fit(d, draws=10, antithetic="no"),
    lambda d, m: m.make_problem(d, draws=10, antithetic="no"),
    lambda d, m: m.fit(d, draws=10, progress="no"),
    lambda d, m: ml.MixedLogit(fixed=["x2"], asc="no"),
    lambda d, m: make_rule("halton", 2, 10, 1, antithetic="no"),
    lambda d, m: simulate(n_persons=2, fixed={"x2": 1.0}, panel="no"),
], ids=["fit-antithetic", "problem-antithetic", "progress", "asc", "make_rule", "simulate-panel"])
def test_truthy_strings_are_refused_as_booleans(sim, call):
    with pytest.raises(TypeError, match=r"(antithetic|progress|asc|panel) must be True or False, got str 'no'"):
        call(data_of(sim.df), sim.model)


def test_results_boolean_options_are_checked(sim):
    res = sim.model.fit(data_of(sim.df), draws=20)
    with pytest.raises(TypeError, match="robust must be True or False, got str 'no'"):
        res.conf_int(0.05, robust="no")
    with pytest.raises(TypeError, match="cross must be True or False, got int 1"):
        res.elasticities(data_of(sim.df), "x2", cross=1)


# ---------------------------------------------------------------------------------------------- B2 units
@pytest.mark.parametrize("c", [1e-8, 1e8])
def test_standard_errors_do_not_depend_on_the_units_of_an_attribute(sim, c):
    model = ml.MixedLogit(fixed=["x1", "x2"])
    base = model.fit(data_of(sim.df), gtol=1e-9)
    scaled = model.fit(data_of(sim.df.assign(x2=sim.df["x2"] * c)), start=base.params.to_numpy() * [1, 1 / c],
                       gtol=1e-9)
    assert not scaled.hessian_singular
    assert scaled.params["x2"] == pytest.approx(base.params["x2"] / c, rel=1e-6)
    assert scaled.bse["x2"] == pytest.approx(base.bse["x2"] / c, rel=1e-6)
    assert scaled.bse["x1"] == pytest.approx(base.bse["x1"], rel=1e-6)


# ---------------------------------------------------------------------------------------------- B3 identification
def _separated(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(30):
        for t in range(4):
            x, z = rng.normal(size=3), rng.normal(size=3)
            c = int(np.argmax(x))  # x predicts every choice
            rows += [{"person": p, "situation": 10 * p + t, "alt": j, "choice": int(j == c), "x": x[j], "z": z[j], "k": 1.0,
                          "inc": float(p)} for j in range(3)]
    return pd.DataFrame(rows)


def test_random_coefficient_on_a_constant_attribute_is_named_not_identified():
    df = _separated()
    with pytest.warns(RuntimeWarning, match="not identified: k: column 'k' is constant within every choice"):
        res = ml.MixedLogit(random={"k": "normal"}, fixed=["z"]).fit(data_of(df), draws=20)
    assert set(res.unidentified) == {"k", "sd.k"}
    assert "neither its location nor its spread is identified" in res.unidentified["sd.k"]
    assert np.isnan(res.tvalues["sd.k"]) and np.isnan(res.pvalues["k"]) and np.isfinite(res.tvalues["z"])
    assert not np.isinf(res.summary_frame()["z"]).any()
    assert "not identified: sd.k: column 'k' is constant" in res.summary()


def test_fixed_coefficient_on_a_column_constant_within_situations_is_named():
    with pytest.warns(RuntimeWarning, match="inc: column 'inc' is constant within every choice situation"):
        res = ml.MixedLogit(fixed=["z", "inc"]).fit(data_of(_separated()))
    assert list(res.unidentified) == ["inc"]
    assert res.summary_frame().loc["inc", "note"] == "not identified"


def test_perfect_separation_is_not_reported_as_converged():
    with pytest.warns(RuntimeWarning, match=r"perfect separation: 'x' run off toward infinity.*not converged"):
        res = ml.MixedLogit(fixed=["x", "z"]).fit(data_of(_separated()))
    assert res.converged is False
    assert res.unidentified["x"].startswith("perfect separation: the log-likelihood keeps rising as 'x' grows")
    assert np.isnan(res.tvalues["x"])


def test_lognormal_pushed_to_zero_is_named(sim):
    # x1 enters with the wrong sign for a lognormal: the fit pushes its location toward -inf.
    df = sim.df.assign(x1=-sim.df["x1"].abs() * 5 - 1)
    model = ml.MixedLogit(random={"x1": "lognormal"}, fixed=["x2"])
    with pytest.warns(RuntimeWarning, match="lognormal coefficient 'x1' is pushed to zero"):
        res = model.fit(data_of(df), draws=20, start={"x2": -0.8, "x1": -30.0, "sd.x1": 0.1})
    assert {"x1", "sd.x1"} <= set(res.unidentified)
    assert np.isnan(res.tvalues["x1"]) and np.isnan(res.tvalues["sd.x1"])


def test_identified_fit_has_no_flags(sim):
    res = sim.model.fit(data_of(sim.df), draws=20)
    assert res.unidentified == {} and res.converged and "note" not in res.summary_frame()


# ---------------------------------------------------------------------------------------------- B4 integration error
@pytest.mark.parametrize("kind", ["gauss-hermite", "quadrature"])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 10, 16, 30, 64])
def test_coarse_rule_is_strictly_coarser(kind, n):
    rule = deterministic_rule(kind, n, 1)
    assert rule.coarse is not None and rule.coarse.n_points < rule.n_points
    if n < 16:
        assert rule.n_points == max(2, n)  # small quadrature rules have the nodes asked for, not 16


def test_two_node_rule_reports_a_nonzero_error_and_the_summary_states_the_nodes(sim):
    res = sim.model.fit(data_of(sim.df), draws=2, draw_type="gauss-hermite")
    assert res.integration_error > 1e-3
    assert res.settings["nodes"] == 2 and res.settings["coarse_nodes"] == 1
    assert "gauss-hermite rule, 2 nodes (draws=2)" in res.summary()
    assert "(against 1 nodes)" in res.summary()
    q = sim.model.fit(data_of(sim.df), draws=10, draw_type="quadrature")
    assert "quadrature rule, 10 nodes" in q.summary() and q.integration_error > 0


# ---------------------------------------------------------------------------------------------- B5 row order
def test_row_order_does_not_change_the_fit(sim):
    df = sim.df
    shuffled = df.sample(frac=1.0, random_state=3)
    a = sim.model.make_problem(data_of(df), draws=20)
    b = sim.model.make_problem(data_of(shuffled), draws=20)
    theta = sim.truth.to_numpy()
    assert a.loglik(theta) == pytest.approx(b.loglik(theta), abs=1e-10)
    assert data_of(shuffled).unit_labels == sorted(df["person"].unique().tolist())


def test_individual_estimates_follow_their_labels(sim):
    res = sim.model.fit(data_of(sim.df), draws=20)
    ind = res.individual(data_of(sim.df))
    ind_shuffled = res.individual(data_of(sim.df.sample(frac=1.0, random_state=1)))
    pd.testing.assert_frame_equal(ind, ind_shuffled, check_exact=False, rtol=1e-10)
    assert list(ind.index) == sorted(ind.index)


def test_units_with_mixed_label_types_sort_deterministically(sim):
    df = sim.df.assign(person=sim.df["person"].map(lambda p: str(p) if p % 2 else p))
    labels = data_of(df).unit_labels
    assert labels == data_of(df.iloc[::-1]).unit_labels
    assert labels == sorted(labels, key=lambda v: (type(v).__name__, str(v)))


# ---------------------------------------------------------------------------------------------- B6 refusals
def test_correlated_with_one_random_coefficient_is_refused():
    with pytest.raises(ValueError, match=r"correlated names one random coefficient \('x1'\); a correlation needs"):
        ml.MixedLogit(random={"x1": "normal"}, fixed=["x2"], correlated=True)
    with pytest.raises(ValueError, match="correlated names one random coefficient"):
        ml.MixedLogit(random={"x1": "normal", "x3": "lognormal"}, correlated=["x1"])


def test_complex_attribute_is_refused_naming_the_column(sim):
    df = sim.df.assign(x2=sim.df["x2"] + 1j)
    with pytest.raises(ChoiceDataError, match="attribute column 'x2' holds complex numbers"):
        sim.model.fit(data_of(df), draws=10)


def test_rule_too_large_for_memory_is_refused_naming_draws(sim):
    with pytest.raises(ValueError, match=r"draws=1000000000000 needs about .* GiB .*the limit is 4 GiB"):
        sim.model.fit(data_of(sim.df), draws=10**12, draw_type="quadrature")
    with pytest.raises(ValueError, match=r"draws=100000000 needs about 44.7 GiB .*60 units"):
        sim.model.make_problem(data_of(sim.df), draws=10**8)
    assert MAX_RULE_BYTES == 2**32


def test_a_coefficient_named_twice_in_random_is_refused(sim, tmp_path):
    from mixlogit.cli import main

    sim.df.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(SystemExit, match=r"--random names 'x1' twice \(normal and lognormal\); give each "):
        main(["fit", str(tmp_path / "d.csv"), "--choice", "choice", "--alt", "alt", "--situation", "situation",
              "--random", "x1=normal,x1=lognormal", "--out", str(tmp_path / "out")])


def test_arviz_individual_accepts_only_booleans(sim):
    from mixlogit.diagnostics import to_idata

    res = sim.model.fit(sim.data, draws=20)
    with pytest.raises(TypeError, match="individual must be True or False, got str 'no'"):
        to_idata(res.spec, res.parameter_draws(5)[None], individual="no")
