"""``mixdpo demo``: the truth beside the fits, a takeaway drawn from the measured numbers, files written as a unit.

A small run (2 seeds, 10 steps) checks what the demo prints and writes against what it measured and against the
generator's own strengths; :func:`alignment.demo.takeaway` is checked on hand-made rows, each of its branches.
"""

import os
import re

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest.importorskip("trl")

from alignment import synthetic
from alignment.cli import main
from alignment.demo import DEMO_FILES, DEMO_METHODS, takeaway

SMALL = ["--pairs", "400", "--test-pairs", "200", "--steps", "10", "--pretrain-steps", "10", "--seeds", "2"]


def _rows(nll, acc, sd_log=None, mean=None):
    """Rows of three seeds for methods DPO, A and B: ``nll[m]``/``acc[m]`` are per-seed lists."""
    rows = []
    for m in nll:
        for s in range(3):
            rows.append({"seed": s, "method": m, "test_nll": nll[m][s], "acc": acc[m][s],
                         "sd_log": (sd_log or {}).get(m, 0.5), "beta_mean": (mean or {}).get(m, [1.0] * 3)[s]})
    return rows


TRUTHS = [{"sd_log": 1.5}, {"sd_log": 1.6}, {"sd_log": 1.4}]


def test_takeaway_names_the_best_likelihood_and_counts_its_seeds():
    rows = _rows({"DPO": [.50, .50, .50], "A": [.49, .51, .48], "B": [.43, .44, .52]},
                 {"DPO": [.98] * 3, "A": [.98] * 3, "B": [.981] * 3}, sd_log={"A": 0.3, "B": 0.9})
    text = takeaway(rows, TRUTHS, 1.0)
    # B's mean NLL (0.463) is the lowest; it is below DPO's in 2 of the 3 seeds.
    assert "B predicts the held-out labels best: NLL 0.463 against DPO's 0.500 nats a pair, lower in 2 of 3 seeds" \
        in text
    assert "No variant moves held-out oracle accuracy by half a point in any seed (DPO: 98.0%)" in text
    assert "The true sd of log-strength is 1.50; fitted: A 0.30, B 0.90." in text
    assert "ran from" not in text


def test_takeaway_says_when_nothing_beats_dpo_and_reports_accuracy_moves():
    rows = _rows({"DPO": [.40] * 3, "A": [.41] * 3, "B": [.45] * 3},
                 {"DPO": [.90] * 3, "A": [.92, .93, .91], "B": [.90] * 3}, mean={"B": [30.0, 20.0, 25.0]})
    text = takeaway(rows, TRUTHS, 1.0)
    assert "No MixDPO variant predicts the held-out labels better than DPO at beta 1." in text
    assert "A moves it most, by +2.0 points on average (per seed +2.0, +3.0, +1.0)" in text
    assert "B's E[beta] ran from 1 to 25 (pin it with strength_fix_mean=True, the default)." in text


def test_demo_prints_and_writes_what_it_measured(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", *SMALL, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == sorted(DEMO_FILES)
    runs = pd.read_csv(out / "demo.csv")
    assert len(runs) == 2 * len(DEMO_METHODS) and set(runs["seed"]) == {0, 1}
    assert list(dict.fromkeys(runs["method"])) == [label for label, _ in DEMO_METHODS]
    # The truth is the generator's: the sd of log-strength over each seed's training pairs.
    for seed in (0, 1):
        task = synthetic.benchmark_task(1.5, "strength", seed, n_train=400, n_validation=40, n_test=200)
        truth = np.std(np.log(np.asarray(task.train["true_strength"])), ddof=1)
        assert runs.loc[runs["seed"] == seed, "true_sd_log"].to_numpy() == pytest.approx(truth, rel=1e-12)
    # DPO is a point strength at beta 1; pinned means stay at beta; every number is finite.
    dpo = runs[runs["method"] == "DPO"]
    assert (dpo["beta_mean"] == 1.0).all() and (dpo["sd_log"] == 0.0).all()
    pinned = runs[runs["method"].str.contains("pinned")]
    assert pinned["beta_mean"].to_numpy() == pytest.approx(1.0, rel=1e-6)
    assert np.isfinite(runs[["acc", "test_nll", "cv", "sd_log"]].to_numpy()).all()
    assert ((runs["acc"] > 0.5) & (runs["test_nll"] < np.log(2) + 0.05)).all()
    # The printed table's DPO accuracy is the CSV's mean over seeds, and the takeaway is the one written.
    line = next(row for row in printed.splitlines() if re.match(r"\|\s+DPO \|", row))
    assert float(line.split("|")[2].split()[0]) == pytest.approx(dpo["acc"].mean(), abs=5e-4)
    written = (out / "demo.md").read_text()
    said = re.search(r"Takeaway: (.+)", printed).group(1)
    assert f"Takeaway: {said}" in written
    truths = [{"sd_log": v} for v in runs.groupby("seed")["true_sd_log"].first()]
    assert said == takeaway(runs.to_dict("records"), truths, 1.0)


def test_demo_refuses_an_occupied_output_before_training(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.csv").write_text("mine\n")
    assert main(["demo", *SMALL, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mixdpo demo: error: --output" in err and "demo.csv" in err and "--overwrite" in err
    assert (out / "demo.csv").read_text() == "mine\n"  # untouched
    with pytest.raises(SystemExit):
        main(["demo", "--heterogeneity", "0.7"])  # the generator's levels only
    assert "invalid choice: 0.7" in capsys.readouterr().err
