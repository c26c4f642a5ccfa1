"""Annotator-level MixDPO after training: ArviZ with an ``annotator`` dim, the caterpillar plot, ``mixdpo train
--strength-level annotator``, ``mixdpo report`` of such a run, and the population for an unseen annotator.

The posterior draws are checked against the exact table (``strength_by_annotator.csv``) to Monte Carlo error, the
population's interval against the family's closed-form quantiles, the plot's points against the table, and the
evaluation loss of unseen annotators against the pair MixDPO loss under the population.
"""

import copy
import json
import math
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from alignment.annotator_diagnostics import (
    annotator_group_summary,
    annotator_strength_figure,
    annotator_strength_to_arviz,
    plot_annotator_strength,
    population_strength,
    read_annotator_table,
)
from alignment.annotators import AnnotatorIndex, AnnotatorPanel
from alignment.margins import MarginCache
from alignment.panel import rule_points
from alignment.run_dir import load_strength
from alignment.strength import make_strength


@pytest.fixture(scope="module")
def tiny():
    from alignment import synthetic

    task = synthetic.benchmark_task(1.0, seed=0, n_groups=3, annotators_per_group=2, n_train=48, n_validation=16,
                                    n_test=16)
    tok = synthetic.build_tokenizer(synthetic.task_texts(task.train))
    return task, tok, synthetic.tiny_gpt_neox(tok, hidden_size=32, num_layers=1, seed=0)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A panel trainer after 4 steps, saved into its output folder (as ``mixdpo train`` saves a run)."""
    from alignment.config import MixDPOConfig
    from alignment.trainer import MixDPOTrainer

    task, tok, model = tiny
    out = tmp_path_factory.mktemp("panel") / "out"
    args = MixDPOConfig(output_dir=str(out), per_device_train_batch_size=8, per_device_eval_batch_size=16,
                        max_steps=4, learning_rate=1e-3, beta=0.1, max_length=32, seed=0, report_to="none",
                        use_cpu=True, save_strategy="no", disable_tqdm=True, bf16=False, strength_update="refit",
                        strength_refit_steps=2, strength_level="annotator", strength_init={"sigma": 1.0},
                        strength_fix_mean=True)
    tr = MixDPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args,
                       train_dataset=task.train, eval_dataset=task.validation, processing_class=tok)
    tr.train()
    tr.save_model(str(out))
    return tr, out


# ---------------------------------------------------------------------------------------------- the batch's weights
def test_a_batch_needs_only_its_annotators_weights():
    rng = np.random.default_rng(0)
    who = rng.integers(0, 12, size=300)
    panel = AnnotatorPanel(AnnotatorIndex("annotator_id", [f"a{i}" for i in range(12)], who))
    cache = MarginCache(who.size)
    seen = torch.arange(0, 300, 2)  # half the pairs cached; annotator 11 keeps none of them below
    cache.update(seen, torch.as_tensor(rng.normal(0, 2, seen.numel())))
    cache.margins[torch.as_tensor(who == 11)] = float("nan")
    s = make_strength("lognormal", init={"mu": -1.0, "sigma": 0.8}, integrator="quadrature")
    full = panel.log_weights(s, cache)
    some = torch.tensor([2, 5, 11])
    torch.testing.assert_close(panel.log_weights(s, cache, some), full[some], rtol=0, atol=1e-12)
    _, log_w = rule_points(s)
    torch.testing.assert_close(full[11], log_w.detach(), rtol=0, atol=1e-12)  # no pairs: the prior


# ---------------------------------------------------------------------------------------------- ArviZ
def test_arviz_has_an_annotator_dim_from_the_trainer_and_from_its_run_folder(trained, tiny):
    import arviz as az
    import matplotlib.pyplot as plt

    tr, out = trained
    task = tiny[0]
    idata = annotator_strength_to_arviz(tr, n_draws=4000, seed=3)
    again = annotator_strength_to_arviz(str(out), n_draws=4000, seed=3)
    np.testing.assert_array_equal(again.posterior["beta_annotator"].values, idata.posterior["beta_annotator"].values)
    post = idata.posterior["beta_annotator"]
    assert post.dims == ("chain", "draw", "annotator") and post.shape == (1, 4000, 6)
    labels = tr.panel.index.labels
    assert post["annotator"].values.tolist() == labels
    groups = dict(zip(task.annotators["annotator_id"], task.annotators["group"], strict=True))
    assert post["group"].values.tolist() == [groups[a] for a in labels]  # the group coordinate
    # The constant data are the table's exact moments; the draws agree with them to Monte Carlo error.
    table = read_annotator_table(str(out))
    for col in ("mean", "sd", "q05", "q95"):
        np.testing.assert_array_equal(idata.constant_data[f"beta_annotator_{col}"].values, table[col].to_numpy())
    draws = post.values[0]
    se = table["sd"].to_numpy() / math.sqrt(4000)
    assert (np.abs(draws.mean(0) - table["mean"].to_numpy()) < 4 * se).all()
    # The table's 90% ends are quantiles of the same discrete posterior: P(beta <= q05) >= 0.05 > P(beta < q05).
    tol = 4 * math.sqrt(0.05 * 0.95 / 4000)
    for col, p in (("q05", 0.05), ("q95", 0.95)):
        end = table[col].to_numpy()
        assert ((draws <= end).mean(0) > p - tol).all() and ((draws < end).mean(0) < p + tol).all(), col
    assert idata.constant_data["n_pairs"].values.tolist() == table["n_pairs"].tolist()
    # The population (an unseen annotator's strength): mean pinned to beta = 0.1 by fix_mean.
    assert idata.posterior.attrs["beta_mean"] == pytest.approx(0.1, rel=1e-6)
    population = idata.posterior["beta"].values.ravel()
    assert abs((population <= idata.posterior.attrs["beta_q05"]).mean() - 0.05) < tol
    assert abs((population <= idata.posterior.attrs["beta_q95"]).mean() - 0.95) < tol
    summary = az.summary(idata, var_names=["beta_annotator"], kind="stats")
    assert summary.index.tolist() == [f"beta_annotator[{a}]" for a in labels]
    np.testing.assert_allclose(summary["mean"].to_numpy(), draws.mean(0), atol=1e-3)
    assert az.plot_forest(idata, var_names=["beta_annotator"], combined=True, hdi_prob=0.9).size == 1
    plt.close("all")
    by_group = post.groupby("group").mean(("chain", "draw", "annotator"))
    assert sorted(by_group["group"].values.tolist()) == ["g00", "g01", "g02"]


def test_arviz_from_a_run_folder_needs_its_index_and_cache(trained, tmp_path):
    import shutil

    _, out = trained
    folder = tmp_path / "run"
    shutil.copytree(out, folder)
    index = json.loads((folder / "annotators.json").read_text())
    del index["annotator_of_row"]
    (folder / "annotators.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="annotators.json has no 'annotator_of_row'"):
        annotator_strength_to_arviz(str(folder))
    (folder / "margin_cache.pt").unlink()
    with pytest.raises(FileNotFoundError, match="strength_by_annotator.csv but no margin_cache.pt"):
        annotator_strength_to_arviz(str(folder))
    plot_annotator_strength(str(folder), str(tmp_path / "plots"))  # the plot needs only the table and strength
    (folder / "strength_by_annotator.csv").unlink()
    with pytest.raises(FileNotFoundError, match="has no strength_by_annotator.csv"):
        plot_annotator_strength(str(folder), str(tmp_path / "plots"))


@pytest.mark.parametrize(("family", "init"), [("lognormal", {"mu": -2.3, "sigma": 0.8}),
                                              ("gamma", {"shape": 3.0, "rate": 30.0})])
def test_population_is_the_familys_distribution(family, init):
    s = make_strength(family, init=init, integrator="quadrature")
    pop = population_strength(s)
    law = (stats.lognorm(init["sigma"], scale=math.exp(init["mu"])) if family == "lognormal"
           else stats.gamma(init["shape"], scale=1 / init["rate"]))
    assert pop["mean"] == pytest.approx(law.mean(), rel=1e-6)
    assert pop["sd"] == pytest.approx(law.std(), rel=1e-4)
    # The interval's ends are nodes of the 512-node rule: within a node's spacing of the exact quantiles.
    assert pop["low"] == pytest.approx(law.ppf(0.05), rel=0.02)
    assert pop["high"] == pytest.approx(law.ppf(0.95), rel=0.02)


# ---------------------------------------------------------------------------------------------- the plot
def _table(n_groups=3, per_group=4, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    a = n_groups * per_group
    mean = np.exp(rng.normal(-2.3, spread, a))
    return pd.DataFrame({"annotator": [f"a{i}" for i in range(a)], "n_pairs": rng.integers(5, 40, a), "mean": mean,
                         "sd": mean / 3, "q05": mean / 2, "q95": mean * 2,
                         "group": [f"g{i // per_group}" for i in range(a)]})


def test_caterpillar_plot_sorts_annotators_and_shows_population_and_groups(trained, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    import alignment.annotator_diagnostics as diag

    table = _table(spread=1.0)
    pop = {"mean": 0.1, "sd": 0.05, "low": 0.03, "high": 0.2}
    monkeypatch.setattr(diag, "_summaries", lambda source: (source, pop, "lognormal"))
    fig = annotator_strength_figure(table)
    ax, gx = fig.axes
    points = ax.collections[1].get_offsets()
    np.testing.assert_allclose(points[:, 1], np.sort(table["mean"]))  # sorted by posterior mean
    assert ax.get_yscale() == "log"  # the intervals span far more than a factor of 10
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [0.1]  # the population mean
    groups = annotator_group_summary(table)
    assert [t.get_text() for t in gx.get_xticklabels()] == [f"{g} (n=4)" for g in groups.index]
    bars = [c.get_segments()[0][0][1] for c in gx.collections if type(c).__name__ == "LineCollection"]
    np.testing.assert_allclose(bars, groups["mean_of_means"].to_numpy())
    np.testing.assert_allclose(groups["mean_of_means"].to_numpy(),
                               table.groupby("group")["mean"].mean()[groups.index].to_numpy())
    plt.close(fig)
    narrow = _table(spread=0.05).drop(columns="group")
    narrow[["q05", "q95"]] = np.c_[narrow["mean"] * 0.8, narrow["mean"] * 1.2]
    fig = annotator_strength_figure(narrow)
    assert len(fig.axes) == 1 and fig.axes[0].get_yscale() == "linear"  # no groups, a narrow spread
    plt.close(fig)
    monkeypatch.undo()
    path = plot_annotator_strength(str(trained[1]), str(tmp_path))
    assert os.path.basename(path) == "strength_by_annotator.png"
    assert plt.imread(path).shape[:2] == (506, 1210)  # two panels at 110 dpi


# ---------------------------------------------------------------------------------------------- the command line
def _jsonl(path, ds, rename=None):
    with open(path, "w") as f:
        for row in ds:
            if rename:
                row = {**row, "annotator_id": rename + row["annotator_id"]}
            f.write(json.dumps(row) + "\n")
    return path


def test_cli_train_annotator_level_report_and_unseen_annotators(tiny, tmp_path, capsys):
    from alignment.cli import main

    task, tok, model = tiny
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    data = _jsonl(tmp_path / "train.jsonl", task.train)
    unseen = _jsonl(tmp_path / "eval.jsonl", task.validation, rename="new-")  # no eval annotator is a train one
    run = tmp_path / "run"
    assert main(["train", "--model", str(base), "--data", str(data), "--eval-data", str(unseen), "--output",
                 str(run), "--strength-level", "annotator", "--annotator-column", "annotator_id", "--fix-mean",
                 "--max-steps", "2", "--batch-size", "8", "--max-length", "32", "--lr", "1e-3", "--cpu"]) == 0
    assert json.loads((run / "mixdpo_run.json").read_text())["strength_level"] == "annotator"
    table = read_annotator_table(str(run))
    assert len(table) == 6 and table["n_pairs"].sum() == len(task.train)
    # Every eval pair's annotator is unseen: its loss is the pair MixDPO loss under the population.
    strength, _ = load_strength(str(run))
    h = torch.as_tensor(np.load(run / "margins.npz")["margin"], dtype=torch.float32)
    population_loss = -float(strength.log_prob_preferred(h).mean())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_loss"] == pytest.approx(population_loss, rel=1e-5)
    # mixdpo evaluate does not use the strength (accuracy and margins of policy against reference).
    assert main(["evaluate", "--model", str(run), "--data", str(unseen)]) == 0
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    text = (run / "report" / "report.md").read_text()
    assert "## Per-annotator strength" in text and "6 annotators, 48 pairs" in text
    assert "![](strength_by_annotator.png)" in text and (run / "report" / "strength_by_annotator.png").is_file()
    assert len(re.findall(r"\| +g0[012] \| +2 \| +16 \|", text)) == 3  # the group table: 2 annotators per group


@pytest.mark.parametrize(("args", "message"), [
    (["--strength", "point"],
     "--strength-level annotator with --strength point: strength_level='annotator' needs a random strength"),
    (["--integrator", "mc"],
     ("--strength-level annotator with --strength lognormal --integrator 'mc': strength_integrator='mc' has no "
      "panel form")),
    (["--objective", "expected"],
     "--strength-level annotator fits the panel marginal likelihood; --objective 'expected' has no panel form"),
])
def test_cli_refuses_annotator_level_without_its_requirements(args, message, tmp_path, capsys):
    from alignment.cli import main

    # Neither data nor model exist: the flags are refused first.
    assert main(["train", "--model", "no/such-model", "--data", str(tmp_path / "none.jsonl"), "--output",
                 str(tmp_path / "o"), "--strength-level", "annotator", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mixdpo train: error: {message}") and err.count("\n") == 1, err


def test_cli_names_the_annotator_column_and_its_first_missing_row(tmp_path, capsys):
    from alignment.cli import main

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "who": w} for w in ("x", "y", None, "x")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = ["train", "--model", "no/such-model", "--data", str(data), "--output", str(tmp_path / "o"),
             "--strength-level", "annotator"]
    assert main(train) == 2
    assert capsys.readouterr().err.startswith(
        f"mixdpo train: error: --annotator-column 'annotator_id' is not a column of --data {data} (its columns: "
        "prompt, chosen, rejected, who)")
    assert main([*train, "--annotator-column", "who"]) == 2
    assert capsys.readouterr().err.startswith(
        f"mixdpo train: error: --annotator-column 'who' of --data {data} is missing in row 2 (value None)")
    with pytest.raises(SystemExit):
        main([*train[:-1], "person"])
    assert "invalid choice: 'person'" in capsys.readouterr().err
