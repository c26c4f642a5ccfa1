"""DPO against MixDPO (LogNormal, Gamma; mean free or pinned) on the synthetic pluralistic task.

For each heterogeneity level (none 0.0, moderate 0.75, high 1.5: the sd of the group log-strengths) and each
seed, the task is generated (4 annotator groups, 3 annotators each), 25% of the pairs are held out and relabeled
by the oracle, a tiny GPT-NeoX is built from a config and briefly pretrained on the task's text, then every
method trains from that same model for the same steps (TRL's own DPOTrainer for DPO). Reported per level and
method, mean and sd over seeds: held-out preference accuracy against the oracle (micro, and macro over groups),
mean held-out margin h (nats), the learned E[beta] and CV, and training wall time; plus the paired accuracy gain
over DPO.

Usage:
    python benchmarks/bench_pluralistic.py            # 3 seeds x 3 levels x 5 methods (about 15-25 min, 2 cores)
    python benchmarks/bench_pluralistic.py --quick    # 3 seeds x 3 levels x 3 methods, shorter training
    python benchmarks/bench_pluralistic.py --csv out.csv
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

LEVELS = {"none": 0.0, "moderate": 0.75, "high": 1.5}
FULL_METHODS = [
    ("DPO", {"strength": "point"}),
    ("LogNormal", {"strength": "lognormal"}),
    ("Gamma", {"strength": "gamma"}),
    ("LogNormal-fixmean", {"strength": "lognormal", "strength_fix_mean": True}),
    ("Gamma-fixmean", {"strength": "gamma", "strength_fix_mean": True}),
]


def _ms(values):
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 methods, 600 pairs, 60 steps")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pairs", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for a tiny model)"
    )
    p.add_argument("--levels", default="none,moderate,high")
    p.add_argument("--csv", help="also write one row per (level, seed, method)")
    a = p.parse_args(argv)

    import torch
    from datasets.utils.logging import disable_progress_bar
    from tqdm.auto import tqdm

    from alignment.experiments import prepare_tiny_task, run_methods
    from mixlogit.tables import markdown_table

    disable_progress_bar()
    torch.set_num_threads(a.threads)
    methods = FULL_METHODS[:3] if a.quick else FULL_METHODS
    pairs = a.pairs or (600 if a.quick else 1200)
    steps = a.steps or (60 if a.quick else 150)
    pretrain = a.pretrain_steps or (120 if a.quick else 200)
    levels = [(name, LEVELS[name]) for name in a.levels.split(",")]
    t_start = time.perf_counter()
    records = []
    runs = [(lv, seed) for lv in levels for seed in range(a.seeds)]
    for (level, h), seed in tqdm(runs, desc="tasks (level x seed)", disable=False):
        train, test, tok, model = prepare_tiny_task(pairs, h, seed, pretrain_steps=pretrain, progress=False)
        for row in run_methods(train, test, tok, model, methods, steps=steps, seed=seed, progress=False):
            records.append({"level": level, "heterogeneity": h, "seed": seed, **row})

    table = []
    for level, h in levels:
        dpo = {r["seed"]: r for r in records if r["level"] == level and r["method"] == "DPO"}
        for label, _ in methods:
            rs = [r for r in records if r["level"] == level and r["method"] == label]
            acc, acc_sd = _ms([r["acc"] for r in rs])
            mac, mac_sd = _ms([r["acc_macro"] for r in rs])
            gain, gain_sd = _ms([r["acc"] - dpo[r["seed"]]["acc"] for r in rs])
            table.append(
                {
                    "heterogeneity": f"{level} ({h})",
                    "method": label,
                    "acc": f"{acc:.3f}±{acc_sd:.3f}",
                    "acc_macro": f"{mac:.3f}±{mac_sd:.3f}",
                    "gain_vs_DPO": f"{gain:+.3f}±{gain_sd:.3f}",
                    "margin": f"{statistics.mean(r['margin'] for r in rs):.2f}",
                    "E[beta]": f"{statistics.mean(r['beta_mean'] for r in rs):.3f}",
                    "CV": "{:.2f}±{:.2f}".format(*_ms([r["cv"] for r in rs])),
                    "train_s": f"{statistics.mean(r['train_s'] for r in rs):.1f}",
                }
            )
    print(
        f"\nSynthetic pluralistic task: {pairs} pairs (75% train / 25% held out, oracle labels), 4 groups x 3 "
        f"annotators, tiny GPT-NeoX (hidden 64, 2 layers, {pretrain} pretraining steps), {steps} steps of batch "
        f"16, lr 5e-4, beta 0.1, {a.seeds} seeds; mean±sd over seeds."
    )
    print(markdown_table(table, floatfmt=".3f", missing="nan"))
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s, {a.threads} torch thread(s)")
    if a.csv:
        import csv

        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
