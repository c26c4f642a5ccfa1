"""ChoiceData validation, availability / panel / weights handling, and wide_to_long.

Every bad-input test checks the exception type and that the message names the offending column, row label,
situation id or argument (DESIGN.md, house style). Model-level checks use tiny data so the file runs in a
few seconds.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import mixlogit as ml
from mixlogit import ChoiceData, ChoiceDataError, MixedLogit, wide_to_long

J_LABELS = ["a", "b", "c"]


def small_table(n_sit: int = 6, seed: int = 0) -> pd.DataFrame:
    """6 situations x 3 alternatives, persons 1,1,2,2,3,3, string row labels r0..r17, situation ids 100..105."""
    rng = np.random.default_rng(seed)
    J = len(J_LABELS)
    df = pd.DataFrame({
        "sit": np.repeat(np.arange(n_sit) + 100, J),
        "alt": np.tile(J_LABELS, n_sit),
        "pid": np.repeat(np.arange(n_sit) // 2 + 1, J),
    })
    ch = np.zeros(n_sit * J, int)
    ch[np.arange(n_sit) * J + rng.integers(0, J, n_sit)] = 1
    df["choice"] = ch
    df["x"] = rng.normal(size=len(df))
    df["w"] = 1.0
    df.index = [f"r{i}" for i in range(len(df))]
    return df


def from_small(df, **kw):
    return ChoiceData.from_long(df, choice="choice", alt="alt", situation="sit", **kw)


@pytest.fixture(scope="module")
def sim_panel():
    """Simulated panel: 60 persons x 4 situations x 3 alternatives, one normal and one fixed coefficient."""
    return ml.simulate(n_persons=60, n_situations=4, n_alts=3, random={"x1": ("normal", 1.0, 0.5)},
                       fixed={"x2": -1.0}, seed=3)


# ---------------------------------------------------------------------------------------------- good input
def test_from_long_facts():
    d = from_small(small_table(), panel="pid")
    assert (d.n_rows, d.n_situations, d.n_units) == (18, 6, 3)
    assert d.alternatives == J_LABELS
    assert d.is_panel
    assert d.numeric_columns() == ["x", "w"]
    des = d.design(["x"], [])
    assert tuple(des.x_rand.shape) == (3, 2, 3, 1)
    assert tuple(des.x_rand_diff.shape) == (3, 2, 2, 1)
    # The chosen alternative's index per (person, situation) matches the table.
    df = small_table()
    chosen_alt = df.loc[df.choice == 1, "alt"].map(J_LABELS.index).to_numpy().reshape(3, 2)
    np.testing.assert_array_equal(des.chosen.numpy(), chosen_alt)
    # x levels land in the right (unit, t, j) slots.
    np.testing.assert_array_equal(des.x_rand[..., 0].numpy().ravel(), df["x"].to_numpy())


def test_boolean_and_string_choice_columns_are_accepted():
    df = small_table()
    ref = from_small(df).design([], ["x"])
    for col in (df["choice"].astype(bool), df["choice"].map({0: "False", 1: "True"}),
                df["choice"].map({0: "0", 1: "1"})):
        d = from_small(df.assign(choice=col)).design([], ["x"])
        np.testing.assert_array_equal(d.chosen.numpy(), ref.chosen.numpy())


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("role", ["choice", "alt", "situation", "panel", "avail", "weights"])
def test_missing_column_names_column_and_role(role):
    df = small_table()
    cols = {"choice": "choice", "alt": "alt", "situation": "sit"}
    cols[role] = "nope"
    with pytest.raises(ChoiceDataError, match=rf"column 'nope' \(given as {role}=\) is not in the table"):
        ChoiceData.from_long(df, **cols)


def test_not_a_dataframe_and_empty_table():
    with pytest.raises(TypeError, match="df must be a pandas DataFrame, got ndarray"):
        ChoiceData.from_long(small_table().to_numpy(), choice="choice", alt="alt", situation="sit")
    with pytest.raises(ChoiceDataError, match="no rows"):
        from_small(small_table().iloc[:0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_attribute_names_column_and_row(bad):
    df = small_table()
    df.loc["r4", "x"] = bad
    data = from_small(df)  # only columns a model uses are checked
    with pytest.raises(ChoiceDataError, match=r"attribute column 'x' has a non-finite value .* in row 'r4'"):
        MixedLogit(fixed=["x"]).fit(data)
    with pytest.raises(ChoiceDataError, match=r"'x'.*row 'r4'"):
        MixedLogit(random={"x": "normal"}).fit(data, draws=5)


def test_non_numeric_attribute_names_column_row_and_value():
    df = small_table()
    df["x"] = df["x"].astype(object)
    df.loc["r7", "x"] = "high"
    data = from_small(df)
    assert "x" not in data.numeric_columns()
    with pytest.raises(ChoiceDataError, match=r"attribute column 'x' is not numeric .*row 'r7' holds 'high'"):
        MixedLogit(fixed=["x"]).fit(data)


def test_unknown_attribute_column_lists_numeric_columns():
    with pytest.raises(ChoiceDataError, match=r"attribute column 'nope' is not in the table; numeric columns are: "
                                              r"pid, x, w"):
        MixedLogit(fixed=["nope"]).fit(from_small(small_table()))


def test_situation_with_no_chosen_alternative():
    df = small_table()
    df.loc[df.sit == 103, "choice"] = 0
    with pytest.raises(ChoiceDataError,
                       match=r"situation .*103.* \(column 'sit'\) has 0 chosen alternatives in column 'choice'"):
        from_small(df)


def test_situation_with_two_chosen_alternatives():
    df = small_table()
    df.loc[df.sit == 101, "choice"] = [1, 1, 0]
    with pytest.raises(ChoiceDataError,
                       match=r"situation .*101.* \(column 'sit'\) has 2 chosen alternatives in column 'choice'"):
        from_small(df)


def test_situation_label_printed_plainly():
    df = small_table()
    df.loc[df.sit == 101, "choice"] = 0
    with pytest.raises(ChoiceDataError, match=r"^situation 101 \(column 'sit'\)"):
        from_small(df)


@pytest.mark.parametrize("value,shown", [(2, "2.0"), ("yes", "'yes'")])
def test_choice_must_be_binary(value, shown):
    df = small_table()
    if isinstance(value, str):
        df["choice"] = df["choice"].astype(str)
    df.loc["r5", "choice"] = value
    with pytest.raises(ChoiceDataError, match=rf"choice column 'choice' must hold 0/1 or True/False; row 'r5' holds "
                                              rf"{shown}"):
        from_small(df)


def test_chosen_alternative_unavailable_names_row_and_columns():
    df = small_table()
    df["av"] = 1
    row = df.index[(df.choice == 1).to_numpy()][2]
    df.loc[row, "av"] = 0
    with pytest.raises(ChoiceDataError, match=rf"row '{row}' is chosen \(column 'choice'\) but unavailable "
                                              r"\(column 'av'\)"):
        from_small(df, avail="av")


def test_availability_must_be_binary():
    df = small_table().assign(av=1.0)
    df.loc["r3", "av"] = 0.5
    with pytest.raises(ChoiceDataError, match=r"avail column 'av' must hold 0/1 or True/False; row 'r3' holds 0.5"):
        from_small(df, avail="av")


def test_panel_id_changing_within_situation():
    df = small_table()
    df.loc["r4", "pid"] = 9  # r3..r5 form situation 101
    with pytest.raises(ChoiceDataError, match=r"panel id \(column 'pid'\) changes within situation .*101.* "
                                              r"\(rows 'r3'..'r5'\)"):
        from_small(df, panel="pid")


@pytest.mark.parametrize("col,role", [("sit", "situation"), ("alt", "alt"), ("pid", "panel")])
def test_missing_id_value_names_row(col, role):
    df = small_table()
    df[col] = df[col].astype(object)
    df.loc["r8", col] = None
    with pytest.raises(ChoiceDataError, match=rf"{role} column '{col}' is missing in row 'r8'"):
        from_small(df, panel="pid")


def test_duplicate_alternative_in_situation():
    df = small_table()
    df.loc["r4", "alt"] = "c"  # situation 101 now lists 'c' twice (rows r4, r5)
    with pytest.raises(ChoiceDataError, match=r"alternative 'c' appears twice in situation .*101.* \(row 'r5'\); "
                                              r"column 'alt' must be unique within column 'sit'"):
        from_small(df)


def test_weights_varying_within_panel_unit():
    df = small_table()
    df.loc[df.sit == 103, "w"] = 2.0  # person 2 has situations 102 and 103
    with pytest.raises(ChoiceDataError, match=r"weights column 'w' varies within panel unit .*2.*; weights must be "
                                              r"constant within each panel unit"):
        from_small(df, panel="pid", weights="w")
    # Without a panel the unit is the situation, where the weight is constant: accepted.
    d = from_small(df, weights="w")
    np.testing.assert_array_equal(d.design([], ["x"]).weights.numpy(), [1, 1, 1, 2, 1, 1])


def test_weights_varying_within_situation():
    df = small_table()
    df.loc["r4", "w"] = 3.0
    with pytest.raises(ChoiceDataError, match=r"weights column 'w' varies within situation .*101"):
        from_small(df, weights="w")


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_weights_must_be_positive(bad):
    df = small_table()
    df.loc[df.sit == 100, "w"] = bad
    with pytest.raises(ChoiceDataError, match=rf"weights column 'w' must be positive; row 'r0' holds {bad}"):
        from_small(df, weights="w")


def test_unknown_distribution_name_names_column_and_accepted():
    with pytest.raises(ValueError, match=r"unknown distribution 'nrmal' for random coefficient 'x'; accepted: "
                                         r"normal, lognormal"):
        MixedLogit(random={"x": "nrmal"})


@pytest.mark.parametrize("draws", [0, -3, 1.5, True])
def test_draws_must_be_positive_integer(draws):
    data = from_small(small_table())
    with pytest.raises(ValueError, match=rf"draws must be a positive integer, got {draws!r}"):
        MixedLogit(random={"x": "normal"}).fit(data, draws=draws)
    # The same argument check applies to a model without random coefficients.
    with pytest.raises(ValueError, match="draws must be a positive integer"):
        MixedLogit(fixed=["x"]).fit(data, draws=draws)


def test_name_both_fixed_and_random():
    with pytest.raises(ValueError, match=r"'x' is both fixed and random"):
        MixedLogit(random={"x": "normal"}, fixed=["x"])


def test_model_argument_errors():
    with pytest.raises(ValueError, match=r"fixed lists 'x' twice"):
        MixedLogit(fixed=["x", "x"])
    with pytest.raises(ValueError, match="the model has no coefficients"):
        MixedLogit()
    with pytest.raises(ValueError, match=r"correlated names 'z', which is not a random coefficient"):
        MixedLogit(random={"x": "normal"}, correlated=["z"])
    with pytest.raises(ValueError, match=r"correlated coefficient 'y' has distribution 'lognormal'"):
        MixedLogit(random={"x": "normal", "y": "lognormal"}, correlated=True)
    with pytest.raises(TypeError, match="data must be a mixlogit.ChoiceData"):
        MixedLogit(fixed=["x"]).fit(small_table())
    with pytest.raises(ValueError, match=r"unknown method 'mcmc'"):
        MixedLogit(fixed=["x"]).fit(from_small(small_table()), method="mcmc")
    with pytest.raises(ValueError, match=r"unknown draw_type 'halton2'"):
        MixedLogit(random={"x": "normal"}).fit(from_small(small_table()), draw_type="halton2")


@pytest.mark.parametrize("kwargs,err,match", [
    ({"fixed": "x"}, TypeError, r"fixed must be a list of column names, e.g. \['loc', 'wk'\]; got str 'x'"),
    ({"random": ["x"]}, TypeError, r"random must be a dict mapping column -> distribution name"),
    ({"random": "x"}, TypeError, r"random must be a dict .*got str 'x'"),
    ({"random": {"x": "normal"}, "correlated": "x"}, TypeError, r"got the string 'x' \(write \['x'\]\)"),
    ({"random": {"x": "normal", "y": "normal"}, "correlated": ["x", "x"]}, ValueError, "correlated lists 'x' twice"),
    ({"fixed": [1]}, TypeError, "column names in random= and fixed= must be strings, got 1"),
])
def test_collections_are_not_split_into_characters(kwargs, err, match):
    with pytest.raises(err, match=match):
        MixedLogit(**kwargs)


def test_a_role_column_or_a_constant_cannot_be_an_attribute():
    data = from_small(small_table())
    with pytest.raises(ValueError, match=r"'choice' is the data's choice= column; it cannot also be an attribute"):
        MixedLogit(fixed=["x", "choice"]).fit(data)
    with pytest.raises(ValueError, match=r"fixed names 'asc.b', which is also an alternative-specific constant"):
        MixedLogit(fixed=["x", "asc.b"], asc=True).fit(data)


@pytest.mark.parametrize("kwargs,err,match", [
    ({"seed": "abc"}, TypeError, "seed must be a non-negative integer"),
    ({"seed": 1.5}, TypeError, "seed must be a non-negative integer"),
    ({"seed": -1}, ValueError, "seed must be a non-negative integer"),
    ({"maxiter": "10"}, ValueError, "maxiter must be an integer >= 1, got '10'"),
    ({"maxiter": -3}, ValueError, "maxiter must be an integer >= 1"),
    ({"gtol": -1.0}, ValueError, "gtol must be a positive finite number"),
    ({"gtol": float("nan")}, ValueError, "gtol must be a positive finite number"),
    ({"multistart": -1}, ValueError, "multistart must be an integer >= 0"),
    ({"start": {"x": float("nan")}}, ValueError, r"start\['x'\] must be a finite number, got nan"),
    ({"start": {"x": "abc"}}, ValueError, r"start\['x'\] must be a finite number, got 'abc'"),
    ({"start": ["a", "b"]}, ValueError, "start must be numbers"),
    ({"start": [np.nan]}, ValueError, r"start has non-finite values for \['x'\]"),
])
def test_msl_argument_errors_name_the_argument(kwargs, err, match):
    with pytest.raises(err, match=match):
        MixedLogit(fixed=["x"]).fit(from_small(small_table()), **kwargs)


def test_results_methods_want_choice_data(sim_panel):
    res = sim_panel.model.fit(sim_panel.data, draws=10)
    for call in (lambda: res.predict(sim_panel.df), lambda: res.individual(sim_panel.df),
                 lambda: res.elasticities(sim_panel.df, "x1")):
        with pytest.raises(TypeError, match=r"data must be a mixlogit.ChoiceData \(use ChoiceData.from_long\), "
                                            r"got DataFrame"):
            call()


def test_role_arguments_must_be_single_column_names():
    df = small_table()
    with pytest.raises(ValueError, match=r"choice= is required: the name of the choice column"):
        ChoiceData.from_long(df, choice=None, alt="alt", situation="sit")
    with pytest.raises(ValueError, match=r"choice= must be one column name, got \['choice'\]"):
        ChoiceData.from_long(df, choice=["choice"], alt="alt", situation="sit")


def test_an_object_column_with_gaps_names_the_missing_row():
    df = small_table()
    df["x"] = df["x"].astype(object)
    df.loc["r4", "x"] = None
    with pytest.raises(ValueError, match=r"attribute column 'x' is missing in row 'r4' \(1 such rows\)"):
        MixedLogit(fixed=["x"]).fit(from_small(df))


def test_labels_that_differ_only_in_type_are_refused():
    df = small_table()
    df["alt"] = df["alt"].astype(object)
    df.loc[df["alt"] == "a", "alt"] = 1
    df.loc["r1", "alt"] = "1"
    with pytest.raises(ValueError, match=r"column 'alt' holds the alternative labels 1 and '1', which differ only"):
        from_small(df)


def test_base_alt_that_does_not_exist():
    with pytest.raises(ValueError, match=r"base_alt 'zzz' is not an alternative in column 'alt'; alternatives are: "
                                         r"a, b, c"):
        MixedLogit(fixed=["x"], asc=True, base_alt="zzz").fit(from_small(small_table()))


def test_base_alt_sets_constant_names():
    spec = MixedLogit(fixed=["x"], asc=True, base_alt="b").spec_for(from_small(small_table()))
    assert spec.param_names == ["asc.a", "asc.c", "x"]
    spec = MixedLogit(fixed=["x"], asc=True).spec_for(from_small(small_table()))
    assert spec.param_names == ["asc.b", "asc.c", "x"]


# ---------------------------------------------------------------------------------------------- reporting
def test_non_convergence_is_flagged_and_warned(sim_panel):
    with pytest.warns(RuntimeWarning, match=r"MSL did not converge .*max\|gradient\|"):
        res = sim_panel.model.fit(sim_panel.data, draws=20, maxiter=1)
    assert res.converged is False
    assert res.n_iter == 1
    assert res.grad_norm > 1e-3
    assert np.isfinite(res.loglik)
    assert "converged: False" in res.summary()


def test_singular_hessian_is_flagged_and_warned(sim_panel):
    df = sim_panel.df.assign(x2_copy=sim_panel.df["x2"])
    data = ChoiceData.from_long(df, choice="choice", alt="alt", situation="situation", panel="person")
    with pytest.warns(RuntimeWarning, match="Hessian is singular or ill-conditioned"):
        res = MixedLogit(fixed=["x1", "x2", "x2_copy"]).fit(data)
    assert res.hessian_singular is True
    assert np.isfinite(res.loglik)
    assert np.all(np.isfinite(res.bse.to_numpy()))
    # Only the sum of the two collinear coefficients is identified; it matches the model with one copy.
    ref = MixedLogit(fixed=["x1", "x2"]).fit(data)
    assert ref.hessian_singular is False
    assert res.params["x2"] + res.params["x2_copy"] == pytest.approx(ref.params["x2"], abs=1e-4)
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-8)
    assert "WARNING: singular Hessian" in res.summary()


def test_save_refuses_to_overwrite(tmp_path, sim_panel):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well-posed MNL fit warns about nothing
        res = MixedLogit(fixed=["x1", "x2"]).fit(sim_panel.data)
    path = tmp_path / "r.json"
    res.save(path)
    before = path.read_text()
    with pytest.raises(FileExistsError, match=r"r\.json exists; pass overwrite=True"):
        res.save(path)
    assert path.read_text() == before
    res.save(path, overwrite=True)
    assert ml.load(path).loglik == res.loglik


# ---------------------------------------------------------------------------------------------- masking, panels, weights
def _loglik(model, data, theta, **kw):
    return model.make_problem(data, **kw).loglik(np.asarray(theta, float))


def test_unavailable_rows_equal_deleted_rows(sim_panel):
    """Marking rows unavailable (with absurd attribute values) gives the LL of the table without those rows."""
    df = sim_panel.df.copy()
    rng = np.random.default_rng(11)
    nonchosen = np.flatnonzero(df["choice"].to_numpy() == 0)
    drop = rng.choice(nonchosen, size=len(nonchosen) // 3, replace=False)
    df["av"] = 1
    df.loc[df.index[drop], "av"] = 0
    df.loc[df.index[drop], ["x1", "x2"]] = 500.0  # would dominate every utility if it leaked in
    full = ChoiceData.from_long(df, choice="choice", alt="alt", situation="situation", panel="person", avail="av")
    cut = ChoiceData.from_long(df.drop(index=df.index[drop]), choice="choice", alt="alt", situation="situation",
                               panel="person")
    assert full.n_units == cut.n_units  # same units -> same draws per unit
    theta = [-0.8, 0.9, 0.6]  # x2 fixed, x1 location, sd.x1
    model = sim_panel.model
    for kw in ({"draws": 50, "draw_type": "halton", "seed": 4}, {"draws": 30, "draw_type": "quadrature"}):
        a, b = _loglik(model, full, theta, **kw), _loglik(model, cut, theta, **kw)
        assert np.isfinite(a)
        assert a == pytest.approx(b, abs=1e-9)
    mnl = MixedLogit(fixed=["x1", "x2"])
    ra, rb = mnl.fit(full), mnl.fit(cut)
    assert ra.loglik == pytest.approx(rb.loglik, abs=1e-8)
    # Null log-likelihood: equal shares among the available alternatives.
    n_avail = df.groupby("situation")["av"].sum().to_numpy()
    assert ra.null_loglik == pytest.approx(-np.log(n_avail).sum(), abs=1e-9)
    assert rb.null_loglik == pytest.approx(ra.null_loglik, abs=1e-9)
    np.testing.assert_allclose(ra.params.to_numpy(), rb.params.to_numpy(), atol=1e-5)
    # Predicted probabilities: 0 on unavailable rows, equal to the cut table's on the others.
    pa, pb = ra.predict(full), ra.predict(cut)
    assert (pa.iloc[drop] == 0).all()
    np.testing.assert_allclose(pa.drop(index=df.index[drop]).to_numpy(), pb.to_numpy(), atol=1e-12)


def test_mnl_panel_grouping_does_not_change_loglik(sim_panel):
    df = sim_panel.df
    # Unbalanced: person p keeps only its first 1 + p % 4 situations.
    keep = df.groupby("person")["situation"].transform(lambda s: s.rank(method="dense") <= 1 + s.name % 4)
    df = df[keep.to_numpy()]
    panel = ChoiceData.from_long(df, choice="choice", alt="alt", situation="situation", panel="person")
    flat = ChoiceData.from_long(df, choice="choice", alt="alt", situation="situation")
    assert panel.n_units == 60 and flat.n_units == panel.n_situations
    assert panel.design([], ["x1"]).situation_mask.sum(1).unique().numel() == 4  # really unbalanced
    mnl = MixedLogit(fixed=["x1", "x2"])
    theta = [0.7, -0.9]
    assert _loglik(mnl, panel, theta) == pytest.approx(_loglik(mnl, flat, theta), abs=1e-9)
    rp, rf = mnl.fit(panel), mnl.fit(flat)
    assert rp.loglik == pytest.approx(rf.loglik, abs=1e-7)
    np.testing.assert_allclose(rp.params.to_numpy(), rf.params.to_numpy(), atol=1e-4)
    # By hand: sum over situations of log softmax of the chosen row.
    v = df["x1"].to_numpy() * theta[0] + df["x2"].to_numpy() * theta[1]
    lse = pd.Series(v).groupby(df["situation"].to_numpy()).transform(lambda s: np.log(np.exp(s).sum())).to_numpy()
    by_hand = float(((v - lse) * df["choice"].to_numpy()).sum())
    assert _loglik(mnl, panel, theta) == pytest.approx(by_hand, abs=1e-9)


def test_unbalanced_panel_mixed_loglik_is_sum_of_persons(sim_panel):
    """With shared quadrature nodes a person's likelihood does not depend on the others: padding must be inert."""
    df = sim_panel.df
    persons = [0, 1, 2, 3, 4]
    df = df[df["person"].isin(persons)]
    # Unbalanced: drop situations so persons have 4, 3, 2, 1, 4 situations.
    n_keep = {0: 4, 1: 3, 2: 2, 3: 1, 4: 4}
    rank = df.groupby("person")["situation"].rank(method="dense")
    df = df[(rank <= df["person"].map(n_keep)).to_numpy()]
    kw = {"draws": 40, "draw_type": "quadrature"}
    theta = [-0.8, 0.9, 0.6]
    model = sim_panel.model

    def data_of(d):
        return ChoiceData.from_long(d, choice="choice", alt="alt", situation="situation", panel="person")

    whole = _loglik(model, data_of(df), theta, **kw)
    parts = [_loglik(model, data_of(df[df["person"] == p]), theta, **kw) for p in persons]
    assert whole == pytest.approx(sum(parts), abs=1e-10)
    # Row order does not matter either.
    shuffled = df.sample(frac=1.0, random_state=0)
    assert _loglik(model, data_of(shuffled), theta, **kw) == pytest.approx(whole, abs=1e-10)


def test_weights_scale_loglik_and_equal_duplication(sim_panel):
    df = sim_panel.df[sim_panel.df["person"] < 20].copy()
    mnl = MixedLogit(fixed=["x1", "x2"])
    theta = [0.7, -0.9]

    def data_of(d, **kw):
        return ChoiceData.from_long(d, choice="choice", alt="alt", situation="situation", **kw)

    base = _loglik(mnl, data_of(df), theta)
    assert _loglik(mnl, data_of(df.assign(w=2.0), weights="w"), theta) == pytest.approx(2 * base, abs=1e-9)
    # Weight 3 on situation 5 == that situation present three times.
    w = np.where(df["situation"] == 5, 3.0, 1.0)
    dup = [df] + [df[df["situation"] == 5].assign(situation=s) for s in (10_001, 10_002)]
    a = _loglik(mnl, data_of(df.assign(w=w), weights="w"), theta)
    b = _loglik(mnl, data_of(pd.concat(dup, ignore_index=True)), theta)
    assert a == pytest.approx(b, abs=1e-9)
    # Panel weights: weight 2 on person 3 == person 3 duplicated under a new id.
    w = np.where(df["person"] == 3, 2.0, 1.0)
    p3 = df[df["person"] == 3].assign(person=999, situation=lambda d: d["situation"] + 50_000)
    a = _loglik(sim_panel.model, data_of(df.assign(w=w), panel="person", weights="w"), [-0.8, 0.9, 0.6],
                draws=30, draw_type="quadrature")
    b = _loglik(sim_panel.model, data_of(pd.concat([df, p3]), panel="person"), [-0.8, 0.9, 0.6],
                draws=30, draw_type="quadrature")
    assert a == pytest.approx(b, abs=1e-9)


# ---------------------------------------------------------------------------------------------- wide_to_long
def wide_table() -> pd.DataFrame:
    return pd.DataFrame({
        "sid": [10, 11, 12],
        "person": [7, 7, 8],
        "chosen": ["car", "bus", "rail"],
        "time_car": [10.0, 12.0, 14.0],
        "time_bus": [20.0, 22.0, 24.0],
        "time_rail": [15.0, 16.0, 17.0],
        "cost_car": [5.0, 6.0, 7.0],
        "cost_rail": [3.0, 3.5, 4.0],
        "av_car": [1, 1, 0],
        "av_bus": [1, 1, 1],
        "av_rail": [1, 0, 1],
    }, index=["s0", "s1", "s2"])


def test_wide_to_long_round_trip():
    wide = wide_table()
    alts = ["car", "bus", "rail"]
    long = wide_to_long(wide, alts, {"time": "time_{alt}", "cost": {"car": "cost_car", "rail": "cost_rail"}},
                        choice="chosen", situation="sid", avail={a: f"av_{a}" for a in alts}, keep=["person"])
    assert len(long) == 9
    assert list(long.columns) == ["sid", "alt", "choice", "time", "cost", "avail", "person"]
    assert long["sid"].tolist() == [10] * 3 + [11] * 3 + [12] * 3
    assert long["alt"].tolist() == alts * 3
    assert long["choice"].tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert long["time"].tolist() == [10, 20, 15, 12, 22, 16, 14, 24, 17]
    assert long["cost"].tolist() == [5, 0, 3, 6, 0, 3.5, 7, 0, 4]  # bus has no cost column -> 0
    assert long["avail"].tolist() == [1, 1, 1, 1, 1, 0, 0, 1, 1]
    assert long["person"].tolist() == [7] * 6 + [8] * 3
    # Back to wide: every attribute value is where it started.
    for a in alts:
        part = long[long["alt"] == a].set_index("sid")
        np.testing.assert_array_equal(part["time"].to_numpy(), wide[f"time_{a}"].to_numpy())
    back = long[long["choice"] == 1].set_index("sid")["alt"]
    assert back.tolist() == wide["chosen"].tolist()
    # The long table passes validation.
    d = ChoiceData.from_long(long, choice="choice", alt="alt", situation="sid", panel="person", avail="avail")
    assert (d.n_rows, d.n_situations, d.n_units) == (9, 3, 2)
    assert d.alternatives == ["bus", "car", "rail"]


def test_wide_to_long_numbers_situations_without_id():
    long = wide_to_long(wide_table().iloc[:2], ["car", "bus"], {"time": "time_{alt}"}, choice="chosen")
    assert long["situation"].tolist() == [0, 0, 1, 1]
    assert long["choice"].tolist() == [1, 0, 0, 1]
    assert long["time"].tolist() == [10, 20, 12, 22]


def test_wide_to_long_errors():
    wide = wide_table()
    with pytest.raises(ChoiceDataError, match=r"choice column 'chosen' holds 'rail' in row 's2', which is not one "
                                              r"of the alternatives"):
        wide_to_long(wide, ["car", "bus"], {"time": "time_{alt}"}, choice="chosen")
    with pytest.raises(ChoiceDataError, match=r"column 'time_tram' \(attribute 'time', alternative 'tram'\) is not "
                                              r"in the table"):
        wide_to_long(wide, ["car", "bus", "rail", "tram"], {"time": "time_{alt}"}, choice="chosen")
    with pytest.raises(ChoiceDataError, match=r"column 'who' \(given as keep\[0\]=\) is not in the table"):
        wide_to_long(wide, ["car", "bus", "rail"], {"time": "time_{alt}"}, choice="chosen", keep=["who"])
    with pytest.raises(ChoiceDataError, match=r"avail has no existing column for alternative 'rail'"):
        wide_to_long(wide, ["car", "bus", "rail"], {"time": "time_{alt}"}, choice="chosen",
                     avail={"car": "av_car", "bus": "av_bus"})
    with pytest.raises(TypeError, match="df must be a pandas DataFrame"):
        wide_to_long(wide.to_dict(), ["car"], {}, choice="chosen")
