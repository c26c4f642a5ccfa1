"""The ``mixlogit`` command line, called in-process through :func:`mixlogit.cli.main`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import mixlogit as ml
from mixlogit.cli import main

ELEC_FAST = ["--dataset", "electricity", "--draws", "20", "--random", "pf=normal", "--fixed", "cl,loc,wk,tod,seas"]
ELEC_MNL = ["--dataset", "electricity", "--fixed", "pf,cl,loc,wk,tod,seas"]
FILES = ("results.json", "params.csv", "summary.txt")


@pytest.fixture(scope="module")
def elec_run(tmp_path_factory):
    """One fast electricity fit through the CLI (shared by the tests below)."""
    out = tmp_path_factory.mktemp("elec")
    rc = main(["fit", *ELEC_FAST, "--out", str(out)])
    return rc, out


def test_fit_dataset_writes_three_files(elec_run):
    rc, out = elec_run
    assert rc == 0
    for name in FILES:
        assert (out / name).is_file(), name
    res = ml.load(out / "results.json")
    assert res.param_names == ["cl", "loc", "wk", "tod", "seas", "pf", "sd.pf"]
    assert np.isfinite(res.loglik)
    # A normal pf nests the MNL (sd.pf = 0 reproduces it exactly), so the simulated optimum is at least as good.
    assert res.loglik > -4958.649
    # ... and it is the API's fit at the same settings.
    data = ml.ChoiceData.from_long(ml.datasets.load_electricity(), choice="choice", alt="alt", situation="chid",
                                   panel="id")
    api = ml.MixedLogit(random={"pf": "normal"}, fixed=["cl", "loc", "wk", "tod", "seas"]).fit(data, draws=20,
                                                                                               seed=0)
    assert res.loglik == pytest.approx(api.loglik, abs=1e-9)
    np.testing.assert_allclose(res.params.to_numpy(), api.params.to_numpy(), rtol=1e-6)
    assert res.null_loglik == pytest.approx(-5972.156, abs=1e-3)
    assert res.settings["draws"] == 20 and res.settings["draw_type"] == "halton" and res.settings["seed"] == 0
    assert res.converged is True
    assert (res.n_obs, res.n_units) == (4308, 361)
    params = pd.read_csv(out / "params.csv", index_col=0)
    assert list(params.index) == res.param_names
    np.testing.assert_allclose(params["estimate"].to_numpy(), res.params.to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(params["std.err"].to_numpy(), res.bse.to_numpy(), rtol=1e-12)
    text = (out / "summary.txt").read_text()
    assert f"log-likelihood: {res.loglik:.3f}" in text
    assert "20 halton draws" in text
    for name in res.param_names:
        assert name in text


def test_second_run_refuses_then_overwrite_replaces(elec_run, capsys):
    _, out = elec_run
    before = {n: (out / n).read_bytes() for n in FILES}
    with pytest.raises(SystemExit, match=r"results\.json.* exist; pass --overwrite"):
        main(["fit", *ELEC_FAST, "--out", str(out)])
    assert {n: (out / n).read_bytes() for n in FILES} == before
    # --overwrite replaces every file (an MNL this time: its published log-likelihood shows it was rewritten).
    capsys.readouterr()
    assert main(["fit", *ELEC_MNL, "--out", str(out), "--overwrite"]) == 0
    res = ml.load(out / "results.json")
    assert res.loglik == pytest.approx(-4958.649, abs=1e-3)
    assert res.param_names == ["pf", "cl", "loc", "wk", "tod", "seas"]
    assert "log-likelihood: -4958.649" in (out / "summary.txt").read_text()
    assert list(pd.read_csv(out / "params.csv", index_col=0).index) == res.param_names
    stdout = capsys.readouterr().out
    assert "ChoiceData(17232 rows, 4308 situations, 361 persons, 4 alternatives)" in stdout
    assert f"results written to {out}/" in stdout


@pytest.fixture(scope="module")
def sim_csv(tmp_path_factory):
    sim = ml.simulate(n_persons=100, n_situations=4, n_alts=3, random={"x1": ("normal", 1.0, 0.5)},
                      fixed={"x2": -1.0}, seed=7)
    path = tmp_path_factory.mktemp("csv") / "sim.csv"
    sim.df.to_csv(path, index=False)
    return path


def test_fit_csv_file_equals_api_fit(sim_csv, tmp_path):
    out = tmp_path / "out"
    rc = main(["fit", str(sim_csv), "--choice", "choice", "--alt", "alt", "--situation", "situation",
               "--panel", "person", "--random", "x1=normal", "--fixed", "x2", "--draws", "20", "--seed", "3",
               "--out", str(out)])
    assert rc == 0
    res = ml.load(out / "results.json")
    df = pd.read_csv(sim_csv)
    data = ml.ChoiceData.from_long(df, choice="choice", alt="alt", situation="situation", panel="person")
    ref = ml.MixedLogit(random={"x1": "normal"}, fixed=["x2"]).fit(data, draws=20, seed=3)
    assert res.param_names == ["x2", "x1", "sd.x1"]
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-9)
    np.testing.assert_allclose(res.params.to_numpy(), ref.params.to_numpy(), rtol=1e-9)
    assert res.n_units == 100 and res.n_obs == 400
    assert res.settings["seed"] == 3


def test_fit_csv_with_constants(sim_csv, tmp_path):
    out = tmp_path / "asc"
    rc = main(["fit", str(sim_csv), "--choice", "choice", "--alt", "alt", "--situation", "situation",
               "--fixed", "x1,x2", "--asc", "--base-alt", "2", "--out", str(out)])
    assert rc == 0
    res = ml.load(out / "results.json")
    assert res.param_names == ["asc.0", "asc.1", "x1", "x2"]
    assert res.n_units == 400  # no --panel: every situation is a unit
    # The data were simulated without constants: both are near zero.
    assert (res.params[["asc.0", "asc.1"]].abs() < 4 * res.bse[["asc.0", "asc.1"]]).all()


def test_missing_choice_argument(sim_csv, tmp_path):
    with pytest.raises(SystemExit, match=r"fitting a file needs --choice$"):
        main(["fit", str(sim_csv), "--alt", "alt", "--situation", "situation", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"needs --choice, --alt, --situation"):
        main(["fit", str(sim_csv), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_unknown_distribution_exit_code_and_stderr(tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["fit", "--dataset", "electricity", "--random", "pf=nrmal", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "mixlogit: error: unknown distribution 'nrmal' for random coefficient 'pf'; accepted: normal" in err
    assert not (out / "results.json").exists()


def test_bad_column_in_csv_exit_code_and_stderr(sim_csv, tmp_path, capsys):
    rc = main(["fit", str(sim_csv), "--choice", "chosen", "--alt", "alt", "--situation", "situation",
               "--fixed", "x2", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "column 'chosen' (given as choice=) is not in the table" in capsys.readouterr().err
    rc = main(["fit", str(sim_csv), "--choice", "choice", "--alt", "alt", "--situation", "situation",
               "--fixed", "x9", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "attribute column 'x9' is not in the table" in capsys.readouterr().err
    rc = main(["fit", str(sim_csv), "--choice", "choice", "--alt", "alt", "--situation", "situation",
               "--fixed", "x2", "--asc", "--base-alt", "zzz", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "base_alt 'zzz' is not an alternative in column 'alt'" in capsys.readouterr().err


def test_input_argument_errors(sim_csv, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"nope\.csv: no such file"):
        main(["fit", str(tmp_path / "nope.csv"), "--choice", "c", "--alt", "a", "--situation", "s"])
    with pytest.raises(SystemExit, match="give either FILE or --dataset, not both"):
        main(["fit", str(sim_csv), "--dataset", "electricity"])
    with pytest.raises(SystemExit, match="give a CSV FILE or --dataset NAME"):
        main(["fit", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"--random expects name=distribution pairs .*got 'pf'"):
        main(["fit", "--dataset", "electricity", "--random", "pf", "--out", str(tmp_path / "o")])
    # argparse's own errors: exit code 2 and a usage message naming the argument.
    with pytest.raises(SystemExit) as e:
        main(["fit", "--dataset", "nosuchdata"])
    assert e.value.code == 2
    assert "--dataset: invalid choice: 'nosuchdata'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["fit", "--dataset", "electricity", "--draw-type", "random"])
    assert e.value.code == 2
    assert "--draw-type: invalid choice: 'random'" in capsys.readouterr().err


def test_draws_zero_is_reported(tmp_path, capsys):
    rc = main(["fit", "--dataset", "electricity", "--random", "pf=normal", "--draws", "0",
               "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "draws must be a positive integer, got 0" in capsys.readouterr().err


def test_fit_refuses_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty.csv").write_text("")
    cases = [
        (["--dataset", "electricity", "--guide", "meanfield"], r"--guide applies to --method svi, not --method msl"),
        (["--dataset", "electricity", "--method", "svi", "--draws", "50"], r"--draws applies to --method msl, not"),
        (["--dataset", "electricity", "--method", "nuts", "--steps", "9"], r"--steps applies to --method svi, not"),
        (["--dataset", "electricity", "--out", str(tmp_path / "a_file")], r"a_file is a file, not a folder"),
        ([str(tmp_path), "--choice", "c", "--alt", "a", "--situation", "s"], r"is a folder; FILE must be a long"),
        ([str(tmp_path / "empty.csv"), "--choice", "c", "--alt", "a", "--situation", "s"],
         r"empty\.csv: cannot be read as CSV"),
        (["--dataset", "electricity", "--random", "", "--fixed", ""], r"give --random, --fixed or --asc"),
    ]
    for argv, match in cases:
        out = [] if "--out" in argv else ["--out", str(tmp_path / "o")]
        with pytest.raises(SystemExit, match=match):
            main(["fit", *argv, *out])
    assert not (tmp_path / "o").exists()  # nothing was fitted or written
