"""Calibration of the Bayesian estimators on simulated panels: do the 90% credible intervals cover the truth?

The design of the issue on honest spreads: 200 persons x 8 situations of 3 alternatives, three random coefficients
(x1 normal(1, 0.7), x2 normal(-0.5, 0.5), x3 lognormal with log-location -0.3 and log-sd 0.5), 60 replications,
the default SVI (marginal guide) and NUTS (one chain of ``--nuts-samples`` draws after as many warmup). Every fit
appends its intervals to ``runs.csv`` (flushed to disk), so a killed run resumes where it stopped; the summary
gives, per estimator and group (the three locations, the three spreads), the coverage with its 95%
Clopper-Pearson interval, against the target 0.85 (nominal 0.90).

    python benchmarks/bayes_calibration.py [--reps 60] [--methods svi nuts] [--out DIR]
    python benchmarks/bayes_calibration.py --summary-only
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import warnings

import numpy as np
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pluralistic import _append  # the benchmarks' one flushed, resumable CSV append

import mixlogit as ml

TRUTH = {"x1": ("normal", 1.0, 0.7), "x2": ("normal", -0.5, 0.5), "x3": ("lognormal", -0.3, 0.5)}
GROUPS = {"means": ["x1", "x2", "x3"], "spreads": ["sd.x1", "sd.x2", "sd.x3"]}
FIELDS = ["method", "rep", "param", "truth", "lower", "upper", "covered", "pareto_k", "seconds"]
LEVEL, TARGET = 0.9, 0.85
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bayes_calibration")


def simulate(rep: int, persons: int = 200, situations: int = 8):
    """Replication ``rep`` of the design (its own seed)."""
    return ml.simulate(n_persons=persons, n_situations=situations, n_alts=3, random=TRUTH, seed=5000 + rep)


def fit(method: str, sim, rep: int, nuts_samples: int = 500):
    """The default SVI, or NUTS with one chain, on one replication."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if method == "svi":
            return sim.model.fit(sim.data, method="svi", seed=rep)
        return sim.model.fit(sim.data, method="nuts", num_samples=nuts_samples, num_warmup=nuts_samples, chains=1,
                             seed=rep)


def interval_rows(method: str, rep: int, sim, res, seconds: float) -> list[dict]:
    """One row per population parameter: the truth, the equal-tailed 90% interval and whether it covers."""
    ci = res.conf_int(alpha=1 - LEVEL)
    k = res.trust_check().pareto_k if method == "svi" else float("nan")
    return [{"method": method, "rep": rep, "param": n, "truth": float(sim.truth[n]), "lower": ci.loc[n, "lower"],
             "upper": ci.loc[n, "upper"], "covered": int(ci.loc[n, "lower"] <= sim.truth[n] <= ci.loc[n, "upper"]),
             "pareto_k": k, "seconds": seconds} for n in res.param_names]


def read_runs(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def coverage(rows: list[dict], method: str, params: list[str]) -> tuple[int, int]:
    """(intervals covering the truth, intervals) of ``method`` over ``params``."""
    hits = [int(r["covered"]) for r in rows if r["method"] == method and r["param"] in params]
    return sum(hits), len(hits)


def summary(rows: list[dict]) -> str:
    """Markdown table: coverage per estimator and group with its 95% Clopper-Pearson interval."""
    lines = [f"| estimator | replications | group | coverage of {LEVEL:.0%} intervals | 95% interval | >= {TARGET} |",
             "|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        reps = len({r["rep"] for r in rows if r["method"] == method})
        for group, params in GROUPS.items():
            k, n = coverage(rows, method, params)
            ci = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
            lines.append(f"| {method} | {reps} | {group} | {k / n:.3f} ({k}/{n}) | [{ci.low:.3f}, {ci.high:.3f}] | "
                         f"{k / n >= TARGET} |")
        ks = [float(r["pareto_k"]) for r in rows if r["method"] == method and r["param"] == "x1"]
        secs = [float(r["seconds"]) for r in rows if r["method"] == method and r["param"] == "x1"]
        note = f"median fit {np.median(secs):.1f} s"
        if method == "svi":
            note += f"; Pareto k median {np.median(ks):.2f}, max {np.max(ks):.2f}, >= 0.7 in {sum(k >= 0.7 for k in ks)}"
        lines.append(f"| {method} | | {note} | | | |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--methods", nargs="+", default=["svi", "nuts"], choices=["svi", "nuts"])
    ap.add_argument("--persons", type=int, default=200)
    ap.add_argument("--situations", type=int, default=8)
    ap.add_argument("--nuts-samples", type=int, default=500, help="NUTS draws (and warmup) of the one chain")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "runs.csv")
    if not args.summary_only:
        for rep in range(args.reps):
            for method in args.methods:  # interleaved: a partial run has both estimators on the same panels
                if any(r["method"] == method and int(r["rep"]) == rep for r in read_runs(path)):
                    continue
                sim = simulate(rep, args.persons, args.situations)
                t = time.perf_counter()
                res = fit(method, sim, rep, args.nuts_samples)
                seconds = time.perf_counter() - t
                for row in interval_rows(method, rep, sim, res, seconds):
                    _append(path, row, FIELDS)
                print(f"rep {rep} {method}: {seconds:.1f} s", flush=True)
    table = summary(read_runs(path))
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
