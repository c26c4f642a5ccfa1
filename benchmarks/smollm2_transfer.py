"""Does the tiny-LM pluralistic benchmark transfer to a real model? SmolLM2-135M-Instruct with LoRA, one seed.

The pluralistic benchmark (``benchmarks/bench_pluralistic.py``) trains a tiny GPT-NeoX pretrained on the task's
text. This check trains SmolLM2-135M-Instruct (the Q4_1 GGUF of ``make smollm2``, dequantized to fp32) with a LoRA
adapter (rank 16 on every linear layer; the reference is the base model with the adapter disabled) on the same
generator's text, at two heterogeneity levels, for these methods:

- DPO on the beta grid .03, .1, .3, 1 (MixDPOTrainer with ``strength="point"``, whose training matches TRL's DPOTrainer,
  ``tests/test_trainer.py::test_point_strength_matches_trl_dpotrainer``; it gives the margins of held-out pairs the same way as the others);
- MixDPO, per-pair LogNormal strength with a free mean from beta0 0.3 (refitted on cached margins);
- panel MixDPO, one LogNormal strength per annotator, free mean from beta0 0.3 (EM with cached margins);
- panel MixDPO with the mean pinned (the library's default) at beta .03 (DPO's best here) and .1.

``table.md`` shows each method at its beta of lowest validation NLL, as the tiny benchmark chooses. One seed: a
check of the direction and size of the tiny benchmark's differences on a real model, not a claim by itself. Each run is a CSV row in ``--output`` (oracle accuracy micro/macro/worst, held-out NLL on
the noisy labels, KL to the generator's true preference probabilities, the learned E[beta] and sd of log beta,
seconds per step); finished runs are kept, so the same command continues an interrupted check.

Usage:
    python benchmarks/smollm2_transfer.py --output DIR [--levels 0 1.5] [--steps 150] [--threads 1] [--methods DPO]
    python benchmarks/smollm2_transfer.py --output DIR --quick   # 2 steps on 64 pairs: a smoke run
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

#: (label, trainer, betas, MixDPOConfig overrides): DPO on a beta grid (the tiny benchmark's best, 1, and the smaller
#: ones the free mean found on this model), the free-mean variants from beta0 0.3, and the pinned-mean panel (the
#: library's default mean) at the grid's best DPO beta on this model (.03 at both levels) and at .1.
METHODS = [
    ("DPO", "mixdpo", (0.03, 0.1, 0.3, 1.0), {"strength": "point"}),
    ("MixDPO-LogNormal", "mixdpo", (0.3,), {"strength": "lognormal"}),
    ("panel-MixDPO-LogNormal", "mixdpo", (0.3,), {"strength": "lognormal", "strength_level": "annotator"}),
    ("panel-MixDPO-LogNormal-pinned", "mixdpo", (0.03, 0.1),
     {"strength": "lognormal", "strength_level": "annotator", "strength_fix_mean": True}),
]
COLUMNS = ["level", "method", "beta", "acc", "acc_macro", "acc_worst", "val_nll", "test_nll", "kl_true", "ece",
           "beta_mean", "sd_log", "annotator_spearman", "steps", "train_s", "s_per_step", "eval_s",
           "label_accuracy_test", "realized_sd_log"]


def _done(path: str) -> set[tuple[float, str, float]]:
    if not os.path.isfile(path):
        return set()
    with open(path, newline="") as f:
        return {(float(r["level"]), r["method"], float(r["beta"])) for r in csv.DictReader(f)}


def _margins(trainer, split):
    """h (nats) of every pair of ``split`` in row order (policy log-ratio minus the adapter-free reference's)."""
    import numpy as np

    m = trainer.pair_margins(split)
    if len(m["row"]) != len(split):
        raise RuntimeError(f"{len(split) - len(m['row'])} pairs were truncated; raise --max-length")
    h = np.empty(len(split))
    h[m["row"]] = m["margin"]
    return h


def run_one(model, tokenizer, task, label, kind, beta, overrides, a) -> dict:
    from peft import LoraConfig
    from pluralistic_runs import REFIT, _annotator_spearman, split_metrics
    from transformers.trainer_callback import PrinterCallback

    from alignment.config import MixDPOConfig
    from alignment.strength import make_strength
    from alignment.strength_fit import sd_log_strength
    from alignment.trainer import MixDPOTrainer

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules="all-linear")
    with tempfile.TemporaryDirectory() as tmp:
        kw = {"output_dir": tmp, "max_steps": a.steps, "learning_rate": a.lr, "beta": beta,
              "per_device_train_batch_size": a.batch_size, "per_device_eval_batch_size": 32,
              "max_length": a.max_length, "seed": 0, "data_seed": 0, "report_to": "none", "use_cpu": True,
              "save_strategy": "no", "logging_steps": max(1, a.steps // 10), "disable_tqdm": True,
              "lr_scheduler_type": "cosine", "warmup_steps": 0, "gradient_checkpointing": False, "bf16": False,
              "precompute_ref_log_probs": True, "precompute_ref_batch_size": 64}
        common = {"model": model, "train_dataset": task.train, "processing_class": tokenizer, "peft_config": lora}
        refit = {} if overrides.get("strength") == "point" else {
            **REFIT, "strength_refresh_steps": max(1, a.steps // 5)}
        trainer = MixDPOTrainer(args=MixDPOConfig(**kw, **refit, **{"strength_fix_mean": False, **overrides}), **common)
        trainer.remove_callback(PrinterCallback)
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        strength = getattr(trainer, "strength", None)
        if strength is None:  # TRL's DPO: the point strength at its beta
            strength = make_strength("point", init={"beta": beta})
        row = {"level": task.level, "method": label, "beta": beta, "steps": trainer.state.global_step,
               "train_s": train_s, "s_per_step": train_s / max(1, trainer.state.global_step)}
        row.update(split_metrics(trainer, strength, lambda split: _margins(trainer, split), task))
        row.update(beta_mean=float(strength.mean().detach()), sd_log=sd_log_strength(strength))
        if getattr(trainer, "panel", None) is not None:
            row["annotator_spearman"] = _annotator_spearman(trainer.panel, strength, trainer.margin_cache, task)
        row["eval_s"] = time.perf_counter() - t0
    row.update(label_accuracy_test=task.label_accuracy["test"], realized_sd_log=task.realized_sd_log_strength)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder of runs.csv and table.md (finished runs are kept)")
    p.add_argument("--levels", nargs="+", type=float, default=[0.0, 1.5], help="heterogeneity levels")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (cosine schedule)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per prompt + completion")
    p.add_argument("--train", type=int, default=2000, help="training pairs")
    p.add_argument("--validation", type=int, default=300, help="validation pairs")
    p.add_argument("--test", type=int, default=1000, help="test pairs")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--methods", nargs="+", choices=[m[0] for m in METHODS],
                   help="run only these methods (default: all; finished runs are kept either way)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 64/32/32 pairs, level 1.5 only")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.train, a.validation, a.test, a.levels = 2, 64, 32, 32, [1.5]
    if a.threads < 1 or a.steps < 1:
        p.error("--threads and --steps must be at least 1")

    import copy

    import pandas as pd
    import torch
    from bench_pluralistic import _append
    from datasets.utils.logging import disable_progress_bar

    from alignment import synthetic
    from alignment.models import load_smollm2
    from mixlogit.tables import markdown_table

    disable_progress_bar()
    torch.set_num_threads(a.threads)
    try:
        base, tokenizer = load_smollm2()
    except FileNotFoundError as e:
        print(f"smollm2_transfer: skipped: {e}")
        return 0
    os.makedirs(a.output, exist_ok=True)
    path = os.path.join(a.output, "runs.csv")
    done = _done(path)
    for level in a.levels:
        task = synthetic.benchmark_task(level, "strength", 0, n_train=a.train, n_validation=a.validation,
                                        n_test=a.test)
        for label, kind, betas, over in METHODS:
            for beta in betas:
                if (float(level), label, float(beta)) in done or (a.methods and label not in a.methods):
                    continue
                print(f"level {level}: {label} (beta {beta}) ...", flush=True)
                row = run_one(copy.deepcopy(base), tokenizer, task, label, kind, beta, over, a)
                _append(path, row, COLUMNS)
                print(f"  acc {row['acc']:.4f}, test NLL {row['test_nll']:.4f}, {row['s_per_step']:.2f} s/step, "
                      f"evaluation {row['eval_s']:.0f} s", flush=True)
    runs = pd.read_csv(path)
    # Each method at its beta of lowest validation NLL (the pluralistic benchmark's rule), then every run.
    best = runs.loc[runs.groupby(["level", "method"])["val_nll"].idxmin()].sort_values(["level", "method"])
    table = ("Each method at its beta of lowest validation NLL:\n\n"
             + markdown_table(best.to_dict("records"), floatfmt=".4g", missing="") + "\n\nEvery run:\n\n"
             + markdown_table(runs.to_dict("records"), floatfmt=".4g", missing=""))
    tmp = os.path.join(a.output, "table.md.tmp")
    with open(tmp, "w") as f:
        f.write(table + "\n")
    os.replace(tmp, os.path.join(a.output, "table.md"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
