"""How MSL's cost grows with the data: simulated panels of 12,500, 25,000 and 50,000 persons x 10 situations x 5
alternatives, 4 normal random coefficients, 500 Halton draws, on one torch thread.

A whole fit at 50,000 persons takes about 40 value+gradient evaluations of several seconds each, too long for a
small shared machine, so by default each size times a fixed amount of the fit's work instead: ``--evals``
value+gradient evaluations, the per-person scores and one exact Hessian, at the true parameters (``--full``
fits instead). Each size runs in its own process, so its peak memory is its own; the peak of the evaluations is
measured apart from building the data (the kernel's high-water mark is reset between the two). One row per size
is appended to ``benchmarks/results/cost_growth/runs.csv``; sizes already there are skipped, so an interrupted run
resumes where it stopped.

Linear growth means the seconds per evaluation double with the persons. Bounded memory means what the
evaluations take beyond the data and draws they hold (the working memory of one chunk per thread) stays flat.

    python benchmarks/cost_growth.py [--persons 12500 25000 50000] [--evals 3] [--precision double] [--full]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "cost_growth"
FIELDS = ["persons", "draws", "precision", "mode", "evals", "build_s", "value_grad_s", "value_grad_cpu_s",
          "scores_s", "scores_cpu_s", "hessian_s", "hessian_cpu_s", "fit_s", "fit_cpu_s", "n_iter", "held_gib",
          "build_peak_gib", "eval_peak_gib", "eval_working_gib", "chunks", "loglik"]

# Runs in a fresh process per size; prints one JSON row.
CHILD = r"""
import json, sys, time
import numpy as np, torch
import mixlogit as ml

def rss_gib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 2**20

persons, draws, evals, precision, full = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
torch.set_num_threads(1)
t0 = time.perf_counter()
truth = {"x1": ("normal", 1.0, 0.5), "x2": ("normal", -0.5, 0.4), "x3": ("normal", 0.8, 0.6), "x4": ("normal", 0.3, 0.3)}
sim = ml.simulate(n_persons=persons, n_situations=10, n_alts=5, random=truth, seed=0)
data, model = sim.data, sim.model
problem = model.make_problem(data, draws=draws, seed=0)
problem.precision = precision
d = problem.design
# What the fit holds for its whole run: the data's tensors, the draws and every column's differences (built once,
# for the Hessian).
held = sum(t.element_size() * t.numel() for t in (d.x_rand, d.x_fixed, d.x_rand_diff, d.x_fixed_diff, problem.rule.z,
                                                   problem.x_all_diff))
row = {"persons": persons, "draws": draws, "precision": precision, "mode": "fit" if full else "evaluations",
       "evals": evals, "build_s": time.perf_counter() - t0, "held_gib": held / 2**30,
       "build_peak_gib": rss_gib("VmHWM"), "chunks": len(problem.chunks)}
before = rss_gib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark: the evaluations' own peak from here
theta = sim.truth.to_numpy()
def timed(name, fn, repeats=1):
    # Wall seconds, and CPU seconds: on a shared machine the CPU time of one thread is the steadier measure of cost.
    t, c = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        out = fn()
    row[name + "_s"], row[name + "_cpu_s"] = (time.perf_counter() - t) / repeats, (time.process_time() - c) / repeats
    return out

if full:
    res = timed("fit", lambda: model.fit(data, draws=draws, seed=0, precision=precision))
    row.update(n_iter=res.n_iter, loglik=res.loglik)
else:
    row["loglik"] = timed("value_grad", lambda: problem.value_and_grad(theta), evals)[0]
    timed("scores", lambda: problem.scores(theta))
    timed("hessian", lambda: problem.hessian(theta))
row["eval_peak_gib"] = rss_gib("VmHWM")
row["eval_working_gib"] = row["eval_peak_gib"] - before
print(json.dumps(row))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persons", type=int, nargs="+", default=[12_500, 25_000, 50_000])
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--evals", type=int, default=3, help="value+gradient evaluations timed per size")
    ap.add_argument("--precision", default="double", choices=["double", "mixed"])
    ap.add_argument("--full", action="store_true", help="a whole fit per size instead of a fixed number of evaluations")
    ap.add_argument("--out", type=Path, default=OUT, help="folder of runs.csv (default: %(default)s)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "runs.csv"
    mode = "fit" if args.full else "evaluations"
    done = []
    if path.exists():
        with path.open() as f:
            done = list(csv.DictReader(f))
    for persons in args.persons:
        key = (str(persons), str(args.draws), args.precision, mode)
        if any((r["persons"], r["draws"], r["precision"], r["mode"]) == key for r in done):
            print(f"{persons} persons: kept from {path}", flush=True)
            continue
        proc = subprocess.run([sys.executable, "-c", CHILD, str(persons), str(args.draws), str(args.evals),
                               args.precision, "1" if args.full else "0"], check=False, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{persons} persons failed:\n{proc.stderr[-2000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        done.append({k: str(v) for k, v in row.items()})
        print(f"{persons} persons: {json.dumps(row)}", flush=True)
    def work(r):  # persons x draws: what the cost must be linear in
        return int(r["persons"]) * int(r["draws"])

    rows = sorted((r for r in done if r["precision"] == args.precision and r["mode"] == mode),
                  key=lambda r: (work(r), int(r["draws"])))
    if not rows:
        return
    parts = ["fit"] if args.full else ["value_grad", "scores", "hessian"]
    base = rows[0]
    print(f"\n{args.precision} precision, one torch thread; seconds wall / CPU, and the CPU time's ratio to "
          f"{int(base['persons']):,} persons x {base['draws']} draws (linear growth: the ratio of persons x draws); "
          "working = peak of the evaluations beyond what the fit holds")
    print(f"{'persons':>8} {'draws':>5} {'ratio':>5} " + " ".join(f"{p + ' s':>22}" for p in parts)
          + f" {'held GiB':>8} {'peak GiB':>8} {'working MiB':>11}")
    for r in rows:
        cols = [f"{float(r[p + '_s']):>7.2f} / {float(r[p + '_cpu_s']):>6.2f} "
                f"({float(r[p + '_cpu_s']) / float(base[p + '_cpu_s']):>4.2f})" for p in parts]
        print(f"{int(r['persons']):>8,} {r['draws']:>5} {work(r) / work(base):>5.1f} " + " ".join(cols)
              + f" {float(r['held_gib']):>8.2f} {float(r['eval_peak_gib']):>8.2f} "
              f"{1024 * float(r['eval_working_gib']):>11.1f}")


if __name__ == "__main__":
    main()
