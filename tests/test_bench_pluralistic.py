"""The pluralistic benchmark's smoke run (``--quick``): its files and columns, that training learns, and that the
output folder is resumed, refused or replaced as documented."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_pluralistic.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _run(*args, check=True):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True, env=ENV,
                          timeout=600, cwd=ROOT)
    if check and proc.returncode:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick"
    proc = _run("--quick", "--output", str(out))
    return out, proc


def test_quick_run_writes_its_files_and_columns(quick):
    out, proc = quick
    for name in ("runs.csv", "summary.csv", "table.md", "accuracy_nll.png", "frontier.png", "settings.json"):
        assert (out / name).is_file(), name
    runs = pd.read_csv(out / "runs.csv")
    for col in ("seed", "arm", "level", "method", "beta", "acc", "acc_macro", "acc_worst", "val_nll", "test_nll",
                "kl_true", "ece", "sd_log", "phi_change", "kl_ref", "win", "s_per_step", "realized_sd_log",
                "expected_label_accuracy", "label_accuracy_train"):
        assert col in runs.columns, col
    assert set(runs["level"]) == {0.0, 1.5}
    assert (runs["expected_label_accuracy"] - 0.80).abs().max() < 1e-9
    summary = pd.read_csv(out / "summary.csv")
    assert {"d_acc", "d_acc_lo", "d_test_nll", "d_win_gain"} <= set(summary.columns)
    assert "Arm: strength" in proc.stdout and "d acc vs DPO" in proc.stdout


def test_trained_dpo_beats_the_untrained_policy_by_a_tenth(quick):
    runs = pd.read_csv(quick[0] / "runs.csv")
    for level, cell in runs.groupby("level"):
        untrained = cell.loc[cell["method"] == "reference", "acc"].item()
        dpo = cell.loc[cell["method"] == "DPO", "acc"].max()
        assert dpo >= untrained + 0.1, (level, dpo, untrained)


def test_refit_strengths_are_stationary(quick):
    runs = pd.read_csv(quick[0] / "runs.csv")
    refit = runs[runs["method"].isin(["DPO-learned-beta", "MixDPO-LogNormal-pinned"])]
    assert len(refit) and (refit["phi_change"] < 0.02).all()


def test_output_folder_is_resumed_refused_or_replaced(quick, tmp_path):
    out, _ = quick
    again = _run("--quick", "--output", str(out))  # same settings: every run is kept, nothing is redone
    assert "runs finished in" in again.stdout
    assert len(pd.read_csv(out / "runs.csv")) == len(pd.read_csv(out / "runs.csv").drop_duplicates(
        ["arm", "level", "method", "beta"]))
    other = _run("--output", str(out), "--arms", "strength", "--levels", "0.0", "--seeds", "1", check=False)
    assert other.returncode and "holds a run with other settings" in other.stderr and "--overwrite" in other.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = _run("--quick", "--output", str(foreign), check=False)
    assert refused.returncode and "holds no benchmark run" in refused.stderr
    assert (foreign / "notes.txt").read_text() == "mine"
    bad = _run("--quick", "--output", str(tmp_path / "x"), "--levels", "0.7", check=False)
    assert bad.returncode and "accepted levels are 0.0, 0.5, 1.0, 1.5" in bad.stderr


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pluralistic_module", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_has_a_panel_row_with_its_annotator_columns(quick):
    runs = pd.read_csv(quick[0] / "runs.csv")
    panel = runs[runs["method"] == "panel-MixDPO-LogNormal-pinned"]
    assert len(panel) == 2 and "annotator_spearman" in runs.columns
    # Level 0: every annotator has one strength, nothing to rank; level 1.5: a correlation in [-1, 1].
    by_level = panel.set_index("level")["annotator_spearman"]
    assert pd.isna(by_level[0.0]) and -1 <= by_level[1.5] <= 1
    assert panel["sd_log_high"].notna().all()  # the panel's profile interval of the spread


def test_added_methods_continue_a_kept_run_and_old_files_gain_the_new_columns(tmp_path):
    bench = _bench_module()
    kept = {"format": 1, "scale": {"steps": 150}, "methods": {"strength": [["DPO", "trl", [1.0], {}]]}}
    grown = {**kept, "methods": {"strength": [["DPO", "trl", [1.0], {}], ["panel", "mixdpo", [0.3], {}]]}}
    assert bench._grown(kept, grown)
    assert not bench._grown(kept, kept)  # nothing added: the plain equality check applies
    assert not bench._grown(kept, {**grown, "scale": {"steps": 100}})  # other sizes: the kept runs are not these
    assert not bench._grown(grown, kept)  # a method removed
    changed = {**kept, "methods": {"strength": [["DPO", "trl", [0.3], {}]]}}
    assert not bench._grown(kept, changed)
    path = tmp_path / "seed0.csv"
    path.write_text("seed,method,acc\n0,DPO,0.9\n")
    bench._upgrade_header(str(path), ["seed", "method", "acc", "annotator_spearman"])
    assert path.read_text() == "seed,method,acc,annotator_spearman\n0,DPO,0.9,\n"
