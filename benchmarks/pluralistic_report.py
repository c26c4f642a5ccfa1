"""The summary of a pluralistic benchmark folder: beta chosen on validation, paired differences, tables and plots.

Imported by ``benchmarks/bench_pluralistic.py`` (``--summary`` runs it alone). Reads every ``runs/seed<S>.csv`` of
the folder and writes ``runs.csv`` (all rows), ``summary.csv`` (one row per arm, level and method), ``table.md``
and two PNGs: ``accuracy_nll.png`` (oracle accuracy and held-out NLL against heterogeneity per method, as paired
differences from the best-beta DPO with 95% intervals over seeds; baselines and MixDPO variants in separate panels) and ``frontier.png`` (win rate against the reference vs KL(pi || ref): the DPO beta frontier
and every method's chosen run).
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pandas as pd
from scipy import stats

from alignment.metrics import matched_kl_gain
from mixlogit.tables import markdown_table

#: Arms in the order the tables and plots show them: the full method list first.
ARM_ORDER = ("strength", "direction", "clickers")
#: Metrics compared with the best-beta DPO of the same seed (paired), and the sign that counts as better.
PAIRED = {"acc": 1, "acc_macro": 1, "acc_worst": 1, "test_nll": -1, "kl_true": -1, "ece": -1, "win_gain": 1}
#: The stationarity target: the largest change of an unconstrained strength parameter over the last 20% of steps.
PHI_TOL = 0.02
#: A run whose likelihood-ratio test of a zero spread has p >= this has a spread the data do not identify: its
#: log-spread sits on a flat likelihood near the boundary and may wander without that being a convergence failure,
#: so it is counted apart instead of against the stationarity target.
SPREAD_ALPHA = 0.05


def load(out: str) -> pd.DataFrame:
    files = sorted(glob.glob(os.path.join(out, "runs", "seed*.csv")))
    if not files:
        raise SystemExit(f"bench_pluralistic: no runs in {out}/runs; run the benchmark first.")
    return pd.concat([pd.read_csv(f) for f in files], ignore_index=True)


def select(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, level, seed, method): the run whose beta has the best validation NLL (noisy labels), with its
    matched-KL win-rate gain over that seed's DPO frontier."""
    trained = runs[runs["method"] != "reference"]
    best = trained.loc[trained.groupby(["arm", "level", "seed", "method"])["val_nll"].idxmin()].copy()
    gains = []
    for _, r in best.iterrows():
        f = trained[(trained["arm"] == r["arm"]) & (trained["level"] == r["level"]) & (trained["seed"] == r["seed"])
                    & (trained["method"] == "DPO") & (trained["kl_ref"] > 0)]
        ok = len(f) >= 2 and r["kl_ref"] > 0
        gains.append(matched_kl_gain(r["kl_ref"], r["win"], f["kl_ref"], f["win"])["gain"] if ok else np.nan)
    best["win_gain"] = gains
    return best


def interval(x) -> tuple[float, float, float]:
    """Mean and 95% t-interval of the values (nan where fewer than two)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return (float(x.mean()) if len(x) else np.nan), np.nan, np.nan
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def _verdict(lo: float, hi: float, sign: int) -> str:
    """"better" or "worse" only when the 95% interval of the difference excludes 0; ``sign`` +1 where higher is better."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return ""
    lo, hi = sorted((sign * lo, sign * hi))
    return "better" if lo > 0 else "worse" if hi < 0 else "no difference"


def summary_rows(runs: pd.DataFrame, best: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (arm, level), cell in best.groupby(["arm", "level"], sort=True):
        dpo = cell[cell["method"] == "DPO"].set_index("seed")
        ref = runs[(runs["arm"] == arm) & (runs["level"] == level) & (runs["method"] == "reference")]
        for method, m in cell.groupby("method", sort=False):
            m = m.set_index("seed")
            row = {"arm": arm, "level": level, "method": method, "seeds": len(m),
                   "beta": float(m["beta"].median()), "reference_acc": float(ref["acc"].mean())}
            for col in ("acc", "acc_macro", "acc_worst", "acc_minority", "test_nll", "kl_true", "ece", "kl_ref",
                        "win", "win_gain", "beta_mean", "cv", "sd_log", "s_per_step", "realized_sd_log",
                        "annotator_spearman"):
                if col in m:
                    row[col] = float(m[col].mean())
            if m["sd_log_low"].notna().any():
                inside = (m["sd_log_low"] <= m["realized_sd_log"]) & (m["realized_sd_log"] <= m["sd_log_high"])
                row.update(sd_log_low=float(m["sd_log_low"].mean()), sd_log_high=float(m["sd_log_high"].mean()),
                           spread_covered=float(inside.mean()), lr_pvalue=float(m["lr_pvalue"].median()))
            unidentified = m["lr_pvalue"] >= SPREAD_ALPHA if "lr_pvalue" in m else pd.Series(False, m.index)
            identified = m.loc[~unidentified, "phi_change"]
            row["spread_unidentified"] = int(unidentified.sum())
            row["phi_stationary"] = int((identified < PHI_TOL).sum())
            row["phi_identified"] = int(identified.notna().sum())
            row["phi_change_max"] = float(identified.max()) if len(identified) else np.nan
            row["phi_change_median"] = float(identified.median()) if len(identified) else np.nan
            common = m.index.intersection(dpo.index)
            for col, sign in PAIRED.items():
                mean, lo, hi = interval(m.loc[common, col] - dpo.loc[common, col]) if method != "DPO" else (
                    np.nan, np.nan, np.nan)
                row[f"d_{col}"], row[f"d_{col}_lo"], row[f"d_{col}_hi"] = mean, lo, hi
                row[f"d_{col}_verdict"] = _verdict(lo, hi, sign)
            rows.append(row)
    return pd.DataFrame(rows)


def _fmt_diff(r, col, digits=3) -> str:
    if not np.isfinite(r.get(f"d_{col}", np.nan)):
        return ""
    if not np.isfinite(r[f"d_{col}_lo"]):
        return f"{r[f'd_{col}']:+.{digits}f}"
    return f"{r[f'd_{col}']:+.{digits}f} [{r[f'd_{col}_lo']:+.{digits}f}, {r[f'd_{col}_hi']:+.{digits}f}]"


def _stationary(r) -> str:
    """Runs whose strength parameters moved less than PHI_TOL over the last 20% of steps, of the runs whose spread
    is identified; the runs with an unidentified spread (LR test p >= SPREAD_ALPHA) are counted apart."""
    text = f"{r['phi_stationary']}/{r['phi_identified']}"
    return text + (f" ({r['spread_unidentified']} n.i.)" if r["spread_unidentified"] else "")


def markdown(summary: pd.DataFrame, runs: pd.DataFrame) -> str:
    parts = []
    tasks = runs[runs["method"] == "reference"].groupby(["arm", "level"]).agg(
        seeds=("seed", "nunique"), base_strength=("base_strength", "mean"),
        expected=("expected_label_accuracy", "mean"), train=("label_accuracy_train", "mean"),
        validation=("label_accuracy_validation", "mean"), test=("label_accuracy_test", "mean"),
        realized_sd_log=("realized_sd_log", "mean"), untrained_acc=("acc", "mean")).reset_index()
    parts.append("### The generated tasks (means over seeds)\n\nLabel accuracy against each annotator's own oracle, "
                 "expected and realized per split; the realized sd of the annotators' log-strength; the untrained "
                 "policy's own oracle accuracy.\n")
    parts.append(markdown_table(tasks.to_dict("records"), floatfmt=".3f"))
    parts.append("\nThe stationarity columns: 'd phi < .02' counts the chosen runs whose unconstrained strength "
                 "parameters moved less than 0.02 over the last 20% of steps (a full refit at 80% of the steps "
                 "against the end), among those whose spread is identified; 'n.i.' counts runs whose likelihood-"
                 "ratio test of a zero spread has p >= 0.05, where the log-spread sits on a flat likelihood and its "
                 "movement is not a convergence failure. 'max d phi' is the largest change among identified runs.\n")
    order = sorted(dict.fromkeys(summary["arm"]), key=lambda a: (ARM_ORDER.index(a) if a in ARM_ORDER else 99, a))
    for arm in order:
        s = summary[summary["arm"] == arm]
        table = []
        for _, r in s.iterrows():
            spread = (f"{r['sd_log']:.2f} [{r['sd_log_low']:.2f}, {r['sd_log_high']:.2f}]"
                      if np.isfinite(r.get("sd_log_low", np.nan)) else f"{r['sd_log']:.2f}")
            table.append({
                "level": r["level"], "method": r["method"], "n": r["seeds"], "beta": r["beta"],
                "acc": r["acc"], "macro": r["acc_macro"], "worst": r["acc_worst"], "NLL": r["test_nll"],
                "KL(true)": r["kl_true"], "ECE": r["ece"], "sd log beta [95%]": spread,
                "realized sd": r["realized_sd_log"], "KL(pi|ref)": r["kl_ref"], "win": r["win"],
                "d acc vs DPO [95%]": _fmt_diff(r, "acc"), "d NLL vs DPO": _fmt_diff(r, "test_nll", 4),
                "d win @KL": _fmt_diff(r, "win_gain"), "d phi < .02": _stationary(r),
                "max d phi": r["phi_change_max"],
                "annotator Spearman": r.get("annotator_spearman", np.nan), "s/step": r["s_per_step"],
            })
        parts.append(f"\n### Arm: {arm}\n")
        parts.append(markdown_table(table, floatfmt=".3f", missing=""))
    return "\n".join(parts) + "\n"


def plots(summary: pd.DataFrame, best: pd.DataFrame, runs: pd.DataFrame, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    # One row per (arm, group of methods): the baselines apart from the MixDPO variants, so no panel holds more
    # than six lines. Plotted are the paired differences from the best-beta DPO of the same seed (the zero line),
    # which the near-ceiling absolute accuracies would hide.
    rows = []
    arms = sorted(dict.fromkeys(summary["arm"]), key=lambda a: (ARM_ORDER.index(a) if a in ARM_ORDER else 99, a))
    for arm in arms:
        methods = [m for m in dict.fromkeys(summary.loc[summary["arm"] == arm, "method"]) if m != "DPO"]
        groups = [("baselines", [m for m in methods if not m.startswith(("MixDPO", "panel-"))]),
                  ("MixDPO", [m for m in methods if m.startswith("MixDPO")]),
                  ("panel MixDPO", [m for m in methods if m.startswith("panel-")])]
        groups = [(g, ms) for g, ms in groups if ms]
        if len(methods) <= 6:
            groups = [("methods", methods)]
        rows += [(arm, g, ms) for g, ms in groups]
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 3.6 * len(rows)), squeeze=False)
    for i, (arm, group, methods) in enumerate(rows):
        cell = summary[summary["arm"] == arm]
        for j, (col, label) in enumerate((("acc", "oracle accuracy (test)"), ("test_nll", "NLL, noisy test labels"))):
            ax = axes[i, j]
            ax.axhline(0.0, color="k", lw=1.2, label="best-beta DPO (zero)")
            for k, method in enumerate(methods):
                m = cell[cell["method"] == method].sort_values("level")
                mean, lo, hi = (m[f"d_{col}{suffix}"].to_numpy() for suffix in ("", "_lo", "_hi"))
                err = np.vstack([mean - lo, hi - mean])
                ax.errorbar(m["level"].to_numpy() + (k - len(methods) / 2) * 0.02, mean,
                            yerr=np.where(np.isfinite(err), err, 0), marker="o", ms=3, capsize=2, lw=1, label=method)
            ax.set_xlabel("heterogeneity (sd of log-strength)")
            ax.set_ylabel(f"{label}\nminus best-beta DPO's")
            ax.set_title(f"arm {arm}: {group}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[i, 0].legend(fontsize=7, ncol=2)
    fig.suptitle("Paired difference from the best-beta DPO of the same seed (each method at its beta chosen on "
                 "validation NLL); bars: 95% t-intervals over seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the suptitle above the first row
    first = os.path.join(out, "accuracy_nll.png")
    fig.savefig(first, dpi=110)
    plt.close(fig)

    arm = arms[0]  # the arm with the full method list
    levels = sorted(runs.loc[runs["arm"] == arm, "level"].unique())
    fig, axes = plt.subplots(1, len(levels), figsize=(4.5 * len(levels), 4), squeeze=False)
    trained = runs[(runs["arm"] == arm) & (runs["method"] != "reference")]
    for ax, level in zip(axes[0], levels, strict=True):
        dpo = trained[(trained["level"] == level) & (trained["method"] == "DPO")].groupby("beta")[
            ["kl_ref", "win"]].mean().sort_values("kl_ref")
        ax.plot(dpo["kl_ref"], dpo["win"], "k-o", label="DPO over its beta grid")
        for b, r in dpo.iterrows():
            ax.annotate(f"{b:g}", (r["kl_ref"], r["win"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
        chosen = best[(best["arm"] == arm) & (best["level"] == level) & (best["method"] != "DPO")]
        # More methods than a colour cycle has colours: colour and marker together keep every method distinct.
        for k, (method, m) in enumerate(chosen.groupby("method", sort=True)):
            ax.plot(m["kl_ref"].mean(), m["win"].mean(), "os^Dv"[k // 10], color=plt.get_cmap("tab10")(k % 10),
                    ms=6, label=method)
        ax.set_xscale("log")
        # Minor log ticks get labels like "2x10^-1" that overlap on a short range: plain numbers, major ticks only.
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("KL(pi || ref), nats (held-out prompts)")
        ax.set_ylabel("win rate vs reference (oracle reward)")
        ax.set_title(f"arm {arm}, level {level}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    second = os.path.join(out, "frontier.png")
    fig.savefig(second, dpi=110)
    plt.close(fig)
    return [first, second]


def summarize(out: str) -> pd.DataFrame:
    runs = load(out)
    best = select(runs)
    summary = summary_rows(runs, best)
    runs.to_csv(os.path.join(out, "runs.csv"), index=False)
    summary.to_csv(os.path.join(out, "summary.csv"), index=False)
    with open(os.path.join(out, "settings.json")) as f:
        settings = json.load(f)
    scale = settings["scale"]
    head = (f"# Pluralistic benchmark\n\n{runs['seed'].nunique()} seed(s); train/validation/test "
            f"{scale['n_train']}/{scale['n_validation']}/{scale['n_test']} pairs; tiny GPT-NeoX, "
            f"{scale['pretrain_steps']} pretraining steps, {scale['steps']} steps of batch {scale['batch_size']}, "
            f"lr {scale['lr']} (cosine). Each method's beta is chosen per seed by validation NLL; differences are "
            "paired with the best-beta DPO of the same seed (95% t-intervals; a gain counts only when its interval "
            "excludes 0). 'd win @KL' is the win rate minus the DPO frontier's at the same KL.\n\n")
    text = head + markdown(summary, runs)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    print(text)
    for path in plots(summary, best, runs, out):
        print(f"wrote {path}")
    return summary
