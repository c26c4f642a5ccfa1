"""``mixdpo demo``: DPO against MixDPO on the synthetic pluralistic task, over several seeds, with the truth beside it.

The task is the pluralistic benchmark's generator (:func:`alignment.synthetic.benchmark_task`, strength arm): 50
groups x 4 annotators whose strengths are lognormal with sd of log-strength ``heterogeneity``, and labels that agree
with the annotators' own oracle 80% of the time at every level. Each seed builds its own tokenizer and tiny GPT-NeoX
(pretrained briefly on the task's text) and trains, from that model, every method of :data:`DEMO_METHODS` at one
``beta``, with the benchmark's settings (cosine schedule, phi refitted on every pair's cached margin).

What it measures on the held-out pairs (labelled by the same annotators, never seen in training):
- oracle accuracy: the share of pairs whose margin h has the sign of the annotator's oracle reward gap;
- NLL: the mean negative log-probability of the annotators' own (noisy) labels under each method's model of them
  (DPO: sigmoid(beta h); MixDPO: E_beta sigmoid(beta h); panel MixDPO: the annotator's posterior predictive);
- the fitted strength's exact E[beta], CV and sd of log beta, next to the generator's sd of log-strength and CV.
  E[beta] is in the policy's units (beta per nat of log-ratio) and the truth's in reward units, so only the
  scale-free CV and sd of log beta can be compared with the truth.

It prints a table (means over seeds, with the seeds' range), a takeaway computed from those numbers, and writes
``demo.md``, ``demo.csv`` (one row per seed and method) and two PNGs to the output folder as one unit (see
:func:`mixlogit.persistence.replace_folder`; an occupied folder needs ``--overwrite``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any

import numpy as np

from mixlogit.persistence import check_folder, replace_folder
from mixlogit.tables import markdown_table

__all__ = ["DEMO_FILES", "DEMO_METHODS", "check_demo", "check_demo_output", "run_demo", "summary_rows", "takeaway"]

#: The files one demo writes (and replaces, with ``--overwrite``).
DEMO_FILES = ("demo.md", "demo.csv", "strength_true_vs_fitted.png", "heldout_by_seed.png")
_REFIT = {"strength_update": "refit", "strength_refit_steps": 10}
#: (label, MixDPOConfig overrides); ``{"strength": "point"}`` is TRL's own DPOTrainer.
DEMO_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("DPO", {"strength": "point"}),
    ("MixDPO (pinned mean, default)", {"strength": "lognormal", "strength_fix_mean": True, **_REFIT}),
    ("MixDPO (free mean)", {"strength": "lognormal", "strength_fix_mean": False, **_REFIT}),
    ("panel MixDPO (pinned mean)", {"strength": "lognormal", "strength_fix_mean": True, "strength_level": "annotator",
                                    "annotator_column": "annotator_id", **_REFIT}),
]
_TRUTH = "truth (generator)"
#: Below this sd of log beta a fitted density is drawn as a marked value (a spike the plot's grid would miss).
POINT_SD_LOG = 0.05


def check_demo_output(folder: str, overwrite: bool) -> None:
    """Refuse, before any training, an output folder the demo could not write its files into as a unit."""
    try:
        check_folder(folder, DEMO_FILES, overwrite)
    except (FileExistsError, NotADirectoryError) as e:
        raise ValueError(f"--output {folder}: {e}".replace("overwrite=True (--overwrite on the command line)",
                                                             "--overwrite")) from None


def check_demo(a) -> None:
    """The check of ``mixdpo demo``'s flags: the tiny demo's ``--output`` (SmolLM2's is the trainer's own)."""
    if a.model == "tiny":
        check_demo_output(a.output, a.overwrite)


def _seed_task(level: float, seed: int, n_train: int, n_test: int, pretrain_steps: int):
    from . import synthetic

    task = synthetic.benchmark_task(level, "strength", seed, n_train=n_train, n_validation=n_train // 10,
                                    n_test=n_test)
    texts = synthetic.task_texts(task.train)
    tokenizer = synthetic.build_tokenizer(texts)
    model = synthetic.tiny_gpt_neox(tokenizer, seed=seed)
    synthetic.pretrain(model, tokenizer, texts, steps=pretrain_steps, seed=seed, progress=False)
    return task, tokenizer, model


def _truth(task) -> dict[str, float]:
    """The generator's strength distribution over the training pairs (reward units): sd of log-strength and CV."""
    s = np.asarray(task.train["true_strength"], dtype=float)
    return {"sd_log": float(np.std(np.log(s), ddof=1)), "cv": float(np.std(s, ddof=1) / np.mean(s))}


@contextlib.contextmanager
def _quiet_tqdm():
    """``TQDM_DISABLE=1`` for the block (bars created inside it stay hidden), restored afterwards."""
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = before


def _run_one(task, tokenizer, model, label: str, overrides: dict[str, Any], beta: float, steps: int, seed: int,
             workdir: str):
    """Train one method from ``model`` and measure it on the held-out pairs: ``(row of demo.csv, strength)``."""
    import torch
    from transformers.trainer_callback import PrinterCallback

    from . import experiments, metrics
    from .evaluate import evaluate
    from .strength import make_strength
    from .strength_fit import sd_log_strength

    kw = experiments.trainer_kwargs(os.path.join(workdir, str(seed)), steps, 5e-4, beta, 16, 32, seed, False)
    kw.update(lr_scheduler_type="cosine", precompute_ref_log_probs=True)
    if overrides.get("strength_update") == "refit":
        kw["strength_refresh_steps"] = int(0.8 * steps)  # one refresh of every cached margin late in training
    with _quiet_tqdm():  # TRL's reference log-prob bar reads TQDM_DISABLE when it starts; the demo's bar exists
        trainer = experiments.make_trainer(model, tokenizer, task.train, kw, overrides)
        trainer.remove_callback(PrinterCallback)
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
    test = experiments.with_explicit_prompt(task.test)
    pairs = evaluate(trainer.model, trainer.ref_model, test, tokenizer, max_length=32)["pairs"]
    h = np.full(len(test), np.nan)
    h[pairs["row"].to_numpy()] = pairs["margin"].to_numpy()
    if np.isnan(h).any():
        raise RuntimeError(f"{label}: {int(np.isnan(h).sum())} held-out pairs have no margin (truncated away)")
    strength = getattr(trainer, "strength", None) or make_strength("point", init={"beta": beta})
    p = experiments.preferred_probability(trainer, strength, h, test, "test")
    nll = metrics.pair_probability_metrics(p, np.ones(len(h)))["nll"]
    acc = metrics.oracle_accuracy(h, np.asarray(test["oracle_margin"]))["accuracy"]
    with torch.no_grad():
        mean, cv = float(strength.mean()), float(strength.cv())
    row = {"seed": seed, "method": label, "acc": acc, "test_nll": nll, "beta_mean": mean, "cv": cv,
           "sd_log": sd_log_strength(strength), "train_s": train_s}
    return row, strength


def _range(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} [{v.min():.3f}, {v.max():.3f}]" if len(v) > 1 else f"{v[0]:.3f}"


def summary_rows(rows, truths) -> list[dict[str, Any]]:
    """The printed table: the truth, then each method, as means over seeds with the seeds' [min, max]."""
    import pandas as pd

    df = pd.DataFrame(rows)
    table = [{"method": _TRUTH, "held-out oracle accuracy": "", "held-out NLL (nats/pair)": "", "E[beta]": "",
              "CV": _range([t["cv"] for t in truths]), "sd of log beta": _range([t["sd_log"] for t in truths]),
              "train s": ""}]
    for label in dict.fromkeys(df["method"]):
        d = df[df["method"] == label]
        table.append({"method": label, "held-out oracle accuracy": _range(d["acc"]),
                      "held-out NLL (nats/pair)": _range(d["test_nll"]), "E[beta]": _range(d["beta_mean"]),
                      "CV": _range(d["cv"]), "sd of log beta": _range(d["sd_log"]),
                      "train s": f"{d['train_s'].median():.1f}"})
    return table


def takeaway(rows, truths, beta: float) -> str:
    """A few sentences drawn from the measured rows (one dict per seed and method, with ``acc``, ``test_nll``,
    ``beta_mean``, ``sd_log``; the baseline labelled ``"DPO"``) and the truths (``sd_log`` per seed)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    wide = {k: df.pivot(index="seed", columns="method", values=k) for k in ("acc", "test_nll", "sd_log", "beta_mean")}
    others = [m for m in dict.fromkeys(df["method"]) if m != "DPO"]
    n = len(wide["acc"])
    d_nll = {m: wide["test_nll"][m] - wide["test_nll"]["DPO"] for m in others}
    d_acc = {m: 100 * (wide["acc"][m] - wide["acc"]["DPO"]) for m in others}
    best = min(others, key=lambda m: d_nll[m].mean())
    parts = []
    if d_nll[best].mean() < 0:
        parts.append(f"{best} predicts the held-out labels best: NLL {wide['test_nll'][best].mean():.3f} against "
                     f"DPO's {wide['test_nll']['DPO'].mean():.3f} nats a pair, lower in {int((d_nll[best] < 0).sum())}"
                     f" of {n} seeds.")
    else:
        parts.append(f"No MixDPO variant predicts the held-out labels better than DPO at beta {beta:g}.")
    moved = {m: d_acc[m].mean() for m in others}
    big = max(others, key=lambda m: abs(moved[m]))
    if max(float(d_acc[m].abs().max()) for m in others) < 0.5:
        parts.append("No variant moves held-out oracle accuracy by half a point in any seed "
                     f"(DPO: {100 * wide['acc']['DPO'].mean():.1f}%).")
    else:
        parts.append(f"Accuracy against DPO ({100 * wide['acc']['DPO'].mean():.1f}%): {big} moves it most, by "
                     f"{moved[big]:+.1f} points on average (per seed {', '.join(f'{v:+.1f}' for v in d_acc[big])}).")
    truth = float(np.mean([t["sd_log"] for t in truths]))
    fits = ", ".join(f"{m} {wide['sd_log'][m].mean():.2f}" for m in others)
    parts.append(f"The true sd of log-strength is {truth:.2f}; fitted: {fits}.")
    for m in others:
        far = wide["beta_mean"][m].mean() / beta
        if far > 10 or far < 0.1:
            parts.append(f"{m}'s E[beta] ran from {beta:g} to {wide['beta_mean'][m].mean():.3g} (pin it with "
                         "strength_fix_mean=True, the default).")
    parts.append(f"DPO here has one beta ({beta:g}); the README's benchmark compares against DPO's best beta chosen on "
                 "validation data.")
    return " ".join(parts)


def _relative_log_density(strength, x: np.ndarray) -> np.ndarray | None:
    """The density of log(beta / E[beta]) at ``x`` under ``strength`` (None for a point mass)."""
    import torch

    dist = strength.exact_distribution()
    if dist is None:
        return None
    with torch.no_grad():
        mean = float(strength.mean())
    beta = mean * np.exp(x)
    return beta * dist.pdf(beta)


def _plots(folder, rows, fits, truths, level: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from scipy import stats

    seeds = sorted(fits)
    fig, axes = plt.subplots(1, len(seeds), figsize=(4.6 * len(seeds), 3.8), sharey=True, squeeze=False)
    x = np.linspace(-5.0, 3.0, 400)
    for ax, seed in zip(axes[0], seeds):
        if level > 0:  # the generator's population: log-strength normal with sd level; relative to its mean
            ax.plot(x, stats.norm(-level**2 / 2, level).pdf(x), color="k", lw=2.2, label=f"truth: sd log {level:g}")
        else:
            ax.axvline(0.0, color="k", lw=2.2, label="truth: one strength")
        rel = np.log(truths[seed]["annotators"] / truths[seed]["annotators"].mean())
        ax.hist(rel, bins=30, density=True, color="0.85", label="the 200 annotators (realized)")
        for i, (label, strength, sd_log) in enumerate(fits[seed]):
            y = _relative_log_density(strength, x) if sd_log > POINT_SD_LOG else None
            if y is None:  # a point, or a spike narrower than the grid: a marked value at the mean
                what = "point" if sd_log == 0 else f"nearly a point (sd log {sd_log:.3f})"
                ax.axvline(0.0, color=f"C{i}", ls=":", lw=1.5, label=f"{label}: {what}")
            else:
                ax.plot(x, y, color=f"C{i}", lw=1.6, ls=("-", "--", "-.", (0, (5, 1)))[i % 4],
                        label=f"{label}: sd log {sd_log:.2f}")
        ax.set_title(f"seed {seed}")
        ax.set_xlabel("log(beta / E[beta])")
        ax.legend(fontsize=6.5, loc="upper left")
    axes[0][0].set_ylabel("density of log relative strength")
    fig.suptitle("True vs fitted strength distributions, scale-free (each relative to its own mean)")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, DEMO_FILES[2]), dpi=120)
    plt.close(fig)

    df = pd.DataFrame(rows)
    methods = list(dict.fromkeys(df["method"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (col, name) in zip(axes, (("acc", "held-out oracle accuracy"), ("test_nll", "held-out NLL (nats/pair)"))):
        for seed, d in df.groupby("seed"):
            d = d.set_index("method").loc[methods]
            ax.plot(range(len(methods)), d[col], marker="o", lw=1, label=f"seed {seed}")
        ax.set_xticks(range(len(methods)), [m.replace(" (", "\n(") for m in methods], fontsize=7)
        ax.set_ylabel(name)
        ax.set_title(name + " by method, one line per seed")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, DEMO_FILES[3]), dpi=120)
    plt.close(fig)


def run_demo(output: str, overwrite: bool, level: float = 1.5, seeds=(0, 1, 2), n_train: int = 2000,
             n_test: int = 2000, steps: int = 150, pretrain_steps: int = 200, beta: float = 1.0,
             methods=None) -> list[dict[str, Any]]:
    """Run the demo, print its table and takeaway, write :data:`DEMO_FILES` into ``output``; returns the rows."""
    import warnings

    import datasets
    import pandas as pd
    from tqdm.auto import tqdm

    methods = DEMO_METHODS if methods is None else methods
    check_demo_output(output, overwrite)
    datasets.disable_progress_bars()  # TRL's per-run tokenization bars would bury the demo's own progress
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    t0 = time.perf_counter()
    print(f"MixDPO demo: the pluralistic benchmark's task (strength arm, sd of log-strength {level:g}, 50 groups x 4 "
          f"annotators, label accuracy 0.80), {n_train} training and {n_test} held-out pairs; a tiny GPT-NeoX per seed; "
          f"{len(methods)} methods at beta {beta:g}, {steps} steps each; seeds {', '.join(map(str, seeds))}.")
    rows, truths, fits = [], {}, {}
    bar = tqdm(total=len(seeds) * len(methods), desc="runs")
    with tempfile.TemporaryDirectory(prefix="mixdpo-demo-") as work:
        for seed in seeds:
            task, tokenizer, model = _seed_task(level, seed, n_train, n_test, pretrain_steps)
            truths[seed] = {**_truth(task), "annotators": task.annotators["true_strength"].to_numpy(float)}
            fits[seed] = []
            for label, overrides in methods:
                bar.set_postfix_str(f"seed {seed}: {label}")
                row, strength = _run_one(task, tokenizer, model, label, overrides, beta, steps, seed, work)
                row.update(true_sd_log=truths[seed]["sd_log"], true_cv=truths[seed]["cv"])
                rows.append(row)
                fits[seed].append((label, strength, row["sd_log"]))
                bar.update()
    bar.close()
    truth_list = [truths[s] for s in seeds]
    table = markdown_table(summary_rows(rows, truth_list), floatfmt=".3f", missing="")
    words = takeaway(rows, truth_list, beta)
    print("\n" + table + "\n\nTakeaway: " + words)
    with replace_folder(output, DEMO_FILES, overwrite) as tmp:
        pd.DataFrame(rows).to_csv(os.path.join(tmp, "demo.csv"), index=False)
        _plots(tmp, rows, fits, truths, level)
        with open(os.path.join(tmp, "demo.md"), "w") as f:
            f.write(f"# mixdpo demo\n\nHeterogeneity {level:g} (sd of log-strength), beta {beta:g}, seeds "
                    f"{list(seeds)}, {steps} steps, {n_train} training / {n_test} held-out pairs.\n\n{table}\n\n"
                    f"Takeaway: {words}\n")
    print(f"\nwrote {', '.join(DEMO_FILES)} to {output}; total {time.perf_counter() - t0:.0f} s")
    return rows
