"""The pluralistic benchmark: tuned DPO baselines against MixDPO on many annotators with known strengths.

For each seed, arm and heterogeneity level, :func:`alignment.synthetic.benchmark_task` draws the task (50 groups x 4
annotators, labels at 0.80 expected accuracy against each annotator's own oracle; train 2,000 / validation 1,000 /
test 5,000 pairs), one tiny GPT-NeoX is pretrained on the seed's text, and every method trains from it for the same
steps: TRL's DPOTrainer for DPO (beta .03-3), rDPO (label smoothing .1, .2) and IPO; MixDPOTrainer for the
learned-beta DPO and the MixDPO variants (LogNormal and Gamma, free or pinned mean, beta0 .1/.3/1; the "expected"
objective as an ablation), whose strengths are refitted on every pair's margin so that they reach a stationary
point. Each method's beta is chosen per seed by validation log-likelihood on the noisy labels, never on test. The
summary reports, per arm, level and method, means over seeds and paired differences against the best-beta DPO of
the same seed with 95% t-intervals; a gain counts only when its interval excludes 0.

Usage:
    python benchmarks/bench_pluralistic.py --output DIR             # the full grid, 10 seeds, 2 workers
    python benchmarks/bench_pluralistic.py --output DIR --quick     # a smoke run (about a minute)
    python benchmarks/bench_pluralistic.py --output DIR --summary   # tables and plots of the runs kept in DIR

DIR keeps every finished run (runs/seed<S>.csv), so an interrupted run continues where it stopped when started
again with the same settings; a folder holding other settings or other files is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

ARMS = ("strength", "direction", "clickers")
LEVELS = (0.0, 0.5, 1.0, 1.5)
SETTINGS_FILE = "settings.json"
FORMAT = 1


def _settings(a) -> dict:
    import dataclasses

    from pluralistic_runs import Scale, methods_for

    scale = Scale(n_train=600, n_validation=300, n_test=600, steps=150, pretrain_steps=120) if a.quick else Scale()
    arms = ["strength"] if a.quick else a.arms
    levels = [0.0, 1.5] if a.quick else a.levels
    return {
        "format": FORMAT, "quick": a.quick, "arms": arms, "levels": levels, "scale": dataclasses.asdict(scale),
        "methods": {arm: [[m.label, m.trainer, list(m.betas), m.overrides] for m in methods_for(arm, a.quick)]
                    for arm in arms},
    }


def prepare_output(out: str, settings: dict, overwrite: bool) -> None:
    """Create ``out``, or check that it holds a run of the same settings (to continue it); never replace one
    without ``overwrite``."""
    path = os.path.join(out, SETTINGS_FILE)
    if os.path.isdir(out) and os.listdir(out):
        if overwrite:
            shutil.rmtree(out)
        elif not os.path.isfile(path):
            raise SystemExit(f"bench_pluralistic: --output {out} is not empty and holds no benchmark run "
                             f"({SETTINGS_FILE} is missing); choose another folder or pass --overwrite to replace it.")
        else:
            with open(path) as f:
                kept = json.load(f)
            if _grown(kept, settings):
                # Methods were added to the benchmark: the kept runs stay valid, the new ones are run.
                _write_settings(path, settings)
                return
            if kept != settings:
                changed = sorted(k for k in set(kept) | set(settings) if kept.get(k) != settings.get(k))
                raise SystemExit(f"bench_pluralistic: --output {out} holds a run with other settings ({', '.join(changed)}"
                                 "); continue it with the same flags, choose another folder, or pass --overwrite.")
            return
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    os.makedirs(os.path.join(out, "models"), exist_ok=True)
    _write_settings(path, settings)


def _write_settings(path: str, settings: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=1)
    os.replace(tmp, path)


def _grown(kept: dict, settings: dict) -> bool:
    """True when ``settings`` only adds methods to ``kept`` (every kept method unchanged, everything else equal)."""
    if kept == settings or {k: v for k, v in kept.items() if k != "methods"} != {
            k: v for k, v in settings.items() if k != "methods"}:
        return False
    return all(all(m in settings["methods"].get(arm, []) for m in methods) for arm, methods in kept["methods"].items())


def _upgrade_header(path: str, fields: list[str]) -> None:
    """Rewrite a runs file whose header lacks columns added since it was written (the new ones left empty)."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames == fields:
            return
        rows = list(reader)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _done(path: str) -> set[tuple]:
    if not os.path.isfile(path):
        return set()
    with open(path, newline="") as f:
        return {(r["arm"], float(r["level"]), r["method"], float(r["beta"])) for r in csv.DictReader(f)}


def _append(path: str, row: dict, fields: list[str]) -> None:
    """Append one row (the header first in a new file), flushed to disk: a killed run loses at most the run it was in."""
    new = not os.path.isfile(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def run_seed(out: str, settings: dict, seed: int) -> None:
    """Every missing run of one seed, appended to ``runs/seed<seed>.csv``."""
    from pluralistic_runs import COLUMNS, Method, Scale, SeedContext, evaluate_run, task_row

    from alignment import synthetic

    path = os.path.join(out, "runs", f"seed{seed}.csv")
    _upgrade_header(path, COLUMNS)
    done = _done(path)
    scale = Scale(**settings["scale"])
    todo = [(arm, lv, Method(label, trainer, over, tuple(betas)), b)
            for arm in settings["arms"] for lv in settings["levels"]
            for label, trainer, betas, over in settings["methods"][arm] for b in betas]
    todo = [t for t in todo if (t[0], float(t[1]), t[2].label, float(t[3])) not in done]
    refs = {(arm, float(lv)) for arm in settings["arms"] for lv in settings["levels"]
            if (arm, float(lv), "reference", 0.0) not in done}
    if not todo and not refs:
        return
    ctx = SeedContext(seed, scale, os.path.join(out, "models", f"seed{seed}.pt"))
    tasks = {}

    def task_of(arm, lv):
        if (arm, lv) not in tasks:
            tasks[(arm, lv)] = synthetic.benchmark_task(lv, arm, seed, n_train=scale.n_train,
                                                        n_validation=scale.n_validation, n_test=scale.n_test)
        return tasks[(arm, lv)]

    for arm, lv in sorted(refs):
        task = task_of(arm, lv)
        _append(path, {"seed": seed, "arm": arm, "level": lv, "method": "reference", "beta": 0.0,
                       "acc": ctx.reference_accuracy(task.test), **task_row(task)}, COLUMNS)
    for arm, lv, method, beta in todo:
        task = task_of(arm, lv)
        row = evaluate_run(ctx, task, method, beta)
        _append(path, {"seed": seed, "arm": arm, "level": lv, **row, **task_row(task)}, COLUMNS)


def n_expected(settings: dict, seeds: int) -> int:
    per_seed = sum(len(betas) for arm in settings["arms"] for _ in settings["levels"]
                   for _, _, betas, _ in settings["methods"][arm])
    return seeds * (per_seed + len(settings["arms"]) * len(settings["levels"]))


def _count(out: str) -> int:
    total = 0
    for name in os.listdir(os.path.join(out, "runs")):
        with open(os.path.join(out, "runs", name)) as f:
            total += max(0, sum(1 for _ in f) - 1)
    return total


def run_workers(a, settings: dict) -> None:
    """``a.workers`` one-thread processes, worker i taking the seeds s with s % workers == i; one progress bar."""
    from tqdm import tqdm

    flags = ["--output", a.output, "--seeds", str(a.seeds), "--workers", str(a.workers),
             "--arms", *a.arms, "--levels", *map(str, a.levels)] + (["--quick"] if a.quick else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *flags, "--worker", str(i)], env=env)
             for i in range(a.workers)]
    total = n_expected(settings, a.seeds)
    with tqdm(total=total, initial=_count(a.output), desc="runs", disable=False, unit="run") as bar:
        while any(p.poll() is None for p in procs):
            time.sleep(5)
            bar.update(_count(a.output) - bar.n)
        bar.update(_count(a.output) - bar.n)
    failed = [i for i, p in enumerate(procs) if p.returncode]
    if failed:
        raise SystemExit(f"bench_pluralistic: worker(s) {failed} failed; the runs they finished are kept in "
                         f"{a.output}, and running the same command again continues the rest.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder of the runs, the table and the plots")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 levels, 4 runs per level, small data")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 10; 1 with --quick)")
    p.add_argument("--workers", type=int, default=None, help="one-thread worker processes (default 2; 1 with --quick)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="arms (default: all)")
    p.add_argument("--levels", nargs="+", type=float, default=list(LEVELS), help="levels (default: all four)")
    p.add_argument("--overwrite", action="store_true", help="replace a folder holding other runs or files")
    p.add_argument("--summary", action="store_true", help="only summarize the runs kept in --output")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.seeds = a.seeds or (1 if a.quick else 10)
    a.workers = a.workers or (1 if a.quick else 2)
    bad = [lv for lv in a.levels if lv not in LEVELS]
    if bad:
        p.error(f"--levels {bad}: accepted levels are {', '.join(map(str, LEVELS))}")
    if a.seeds < 1 or a.workers < 1:
        p.error("--seeds and --workers must be at least 1")

    import torch
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    settings = _settings(a)
    if a.worker is not None:
        torch.set_num_threads(1)
        for seed in range(a.worker, a.seeds, a.workers):
            run_seed(a.output, settings, seed)
        return 0
    if not a.summary:
        prepare_output(a.output, settings, a.overwrite)
        t0 = time.perf_counter()
        if a.workers == 1:
            torch.set_num_threads(1)
            for seed in range(a.seeds):
                run_seed(a.output, settings, seed)
        else:
            run_workers(a, settings)
        print(f"runs finished in {time.perf_counter() - t0:.0f} s ({a.workers} one-thread worker(s))")
    from pluralistic_report import summarize

    summarize(a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
