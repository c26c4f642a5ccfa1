"""Property-based checks over random valid long tables: row order, labels, attribute units and a save/load round
trip leave the fit unchanged. Small tables and few draws keep the whole file well under two minutes."""

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import mixlogit as ml
from mixlogit.simulate import simulate

SETTINGS = settings(max_examples=8, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def long_tables(draw):
    """A valid panel long table: 2-4 persons, 1-3 situations each, 2-3 alternatives, attributes x1 and x2."""
    n_persons = draw(st.integers(2, 4))
    n_alts = draw(st.integers(2, 3))
    values = st.floats(-3, 3, allow_nan=False, allow_infinity=False).map(lambda v: round(v, 3))
    rows = []
    sit = 0
    for p in range(n_persons):
        for _ in range(draw(st.integers(1, 3))):
            chosen = draw(st.integers(0, n_alts - 1))
            for j in range(n_alts):
                rows.append({"person": p, "situation": sit, "alt": j, "choice": int(j == chosen),
                             "x1": draw(values), "x2": draw(values)})
            sit += 1
    return pd.DataFrame(rows)


def data_of(df):
    return ml.ChoiceData.from_long(df, choice="choice", alt="alt", situation="situation", panel="person")


MODEL = ml.MixedLogit(random={"x1": "normal"}, fixed=["x2"])
THETA = np.array([-0.4, 0.7, 0.5])  # x2, x1, sd.x1


def quiet_fit(model, data, **kw):
    with warnings.catch_warnings():  # tiny random tables are often separated or unidentified: that is fine here
        warnings.simplefilter("ignore")
        return model.fit(data, maxiter=200, **kw)


@SETTINGS
@given(df=long_tables(), seed=st.integers(0, 2**16))
def test_row_shuffles_change_nothing(df, seed):
    shuffled = df.sample(frac=1.0, random_state=seed)
    a, b = data_of(df), data_of(shuffled)
    assert MODEL.make_problem(a, draws=8).loglik(THETA) == pytest.approx(
        MODEL.make_problem(b, draws=8).loglik(THETA), abs=1e-10)
    ra, rb = quiet_fit(MODEL, a, draws=8), quiet_fit(MODEL, b, draws=8)
    assert ra.loglik == pytest.approx(rb.loglik, abs=1e-10)
    np.testing.assert_allclose(ra.params.to_numpy(), rb.params.to_numpy(), rtol=0, atol=1e-10)
    pa, pb = ra.predict(a), ra.predict(b)
    np.testing.assert_allclose(pa.to_numpy(), pb.reindex(pa.index).to_numpy(), rtol=0, atol=1e-10)


@SETTINGS
@given(df=long_tables(), data=st.data())
def test_relabelling_alternatives_and_persons_changes_nothing(df, data):
    # Persons sort by label and the k-th person in that order gets the k-th block of simulation draws, so a
    # relabelling that reorders persons hands them other quasi-random draws: the simulated likelihood then
    # changes by simulation noise, and no exact property holds. A deterministic rule shares its nodes across
    # persons, so any bijection of labels must leave it unchanged (to rounding of the sum over persons).
    persons = sorted(df["person"].unique())
    alts = sorted(df["alt"].unique())
    new_p = data.draw(st.permutations([f"p{i}" for i in range(len(persons))]))
    new_a = data.draw(st.permutations([f"a{i}" for i in range(len(alts))]))
    relabelled = df.assign(person=df["person"].map(dict(zip(persons, new_p, strict=True))),
                           alt=df["alt"].map(dict(zip(alts, new_a, strict=True))))
    a, b = data_of(df), data_of(relabelled)
    kw = {"draws": 6, "draw_type": "quadrature"}
    assert MODEL.make_problem(a, **kw).loglik(THETA) == pytest.approx(MODEL.make_problem(b, **kw).loglik(THETA),
                                                                     abs=1e-10)
    # (Fits are not compared here: reordering the alternatives reorders float sums, and on the flat likelihoods of
    # separated tiny tables the optimizer paths then part; the likelihood itself is the property.)
    # An order-preserving relabelling of persons keeps every person's draws: exact with Halton draws too.
    shifted = df.assign(person=df["person"] * 10 + 3)
    assert MODEL.make_problem(a, draws=8).loglik(THETA) == pytest.approx(
        MODEL.make_problem(data_of(shifted), draws=8).loglik(THETA), abs=1e-10)


@pytest.fixture(scope="module")
def panel():
    return simulate(n_persons=40, n_situations=4, n_alts=3, random={"x1": ("normal", 1.0, 0.8)},
                    fixed={"x2": -0.7}, seed=11)


@settings(max_examples=4, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(c=st.sampled_from([1e-3, 0.1, 7.0, 1e4]), column=st.sampled_from(["x1", "x2"]))
def test_scaling_an_attribute_scales_its_coefficient(panel, c, column):
    df = panel.df
    base = panel.model.fit(data_of(df), draws=16, gtol=1e-9)
    scale = np.ones(base.n_params)
    names = base.param_names
    for n in (column, f"sd.{column}"):
        if n in names:
            scale[names.index(n)] = 1 / c
    scaled = panel.model.fit(data_of(df.assign(**{column: df[column] * c})), draws=16, gtol=1e-9,
                             start=base.theta * scale)
    # Exact: the likelihood of the scaled table at the scaled parameters is the original likelihood.
    p0 = panel.model.make_problem(data_of(df), draws=16)
    p1 = panel.model.make_problem(data_of(df.assign(**{column: df[column] * c})), draws=16)
    assert p1.loglik(base.theta * scale) == pytest.approx(p0.loglik(base.theta), abs=1e-10)
    # The fits are two optimizer runs: equal to their convergence tolerance.
    assert scaled.loglik == pytest.approx(base.loglik, abs=1e-8)
    np.testing.assert_allclose(scaled.params.to_numpy(), base.params.to_numpy() * scale, rtol=1e-5)
    np.testing.assert_allclose(scaled.bse.to_numpy(), base.bse.to_numpy() * scale, rtol=1e-5)


@SETTINGS
@given(df=long_tables())
def test_save_load_predict_is_exact(df):
    data = data_of(df)
    res = quiet_fit(MODEL, data, draws=8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.json"
        res.save(path)
        loaded = ml.load(path)
    pd.testing.assert_series_equal(loaded.predict(data), res.predict(data), check_exact=True)
    assert loaded.loglik == res.loglik and np.array_equal(loaded.theta, res.theta)
