"""Results files written before the architecture change (committed fixtures) still load, give the same numbers,
and are written back field for field: the saved-results format did not change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mixlogit as ml

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def expected():
    return json.loads((FIXTURES / "expected_v1.json").read_text())


@pytest.fixture(scope="module")
def data():
    # The data the fixtures were fitted on (recorded in expected_v1.json).
    return ml.simulate(n_persons=40, n_situations=4, n_alts=3, random={"x1": ("normal", 1.0, 0.5)},
                       fixed={"x2": 0.5}, seed=3).data


@pytest.mark.parametrize("name", ["msl_results_v1.json", "svi_results_v1.json"])
def test_an_old_file_is_written_back_field_for_field(name, tmp_path):
    path = FIXTURES / name
    res = ml.load(path)
    assert isinstance(res.model, ml.MixedLogit)
    assert res.to_dict() == json.loads(path.read_text())
    res.save(tmp_path / name)
    assert json.loads((tmp_path / name).read_text()) == json.loads(path.read_text())


def test_old_msl_file_gives_the_old_numbers(expected, data):
    res, exp = ml.load(FIXTURES / "msl_results_v1.json"), expected["msl"]
    assert isinstance(res, ml.MixedLogitResults)
    for got, want in [(res.params, exp["params"]), (res.bse, exp["bse"]), (res.robust_bse, exp["robust_bse"]),
                      (res.conf_int().to_numpy().ravel(), exp["conf_int"]), (res.predict(data), exp["predict"]),
                      (res.individual(data)["x1"], exp["individual_x1"]),
                      (ml.heterogeneity(res)[["mean", "sd", "mean.lo", "sd.hi"]].to_numpy().ravel(),
                       exp["heterogeneity_mean_sd"])]:
        np.testing.assert_allclose(np.asarray(got, dtype=float), want, rtol=1e-12, atol=1e-14)
    assert res.summary().splitlines()[:4] == exp["summary_head"]


def test_old_svi_file_gives_the_old_numbers(expected):
    res, exp = ml.load(FIXTURES / "svi_results_v1.json"), expected["svi"]
    assert isinstance(res, ml.BayesResults) and res.method == "svi"
    for got, want in [(res.params, exp["params"]), (res.bse, exp["bse"]),
                      (res.conf_int().to_numpy().ravel(), exp["conf_int"]),
                      (res.individual()["x1"], exp["individual_x1"]),
                      (ml.heterogeneity(res)[["mean", "sd", "mean.lo", "sd.hi"]].to_numpy().ravel(),
                       exp["heterogeneity_mean_sd"])]:
        np.testing.assert_allclose(np.asarray(got, dtype=float), want, rtol=1e-12, atol=1e-14)
