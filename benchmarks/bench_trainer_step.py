"""Whole training-step time of MixDPO against TRL's DPO in the trainer, on the tiny GPT-NeoX of the demo.

A step is what the trainer does per optimizer update: ``trainer.training_step`` (policy forward with TRL's fused
LM head, reference forward, loss, TRL's and MixDPO's metrics, backward) then the optimizer and scheduler steps.
The trainers share the model, batches and settings; their steps are interleaved (DPO, LogNormal, Gamma, DPO, ...)
so that load from other processes hits them alike (the order rotates each round), and the ratio is taken per
round, then the median.

Usage: python benchmarks/bench_trainer_step.py [--steps 60] [--batch-size 16] [--threads 1]
Target (issue 5): MixDPO / DPO <= 1.05.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="measured steps per trainer")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import torch
    from datasets.utils.logging import disable_progress_bar

    from alignment import synthetic
    from alignment.experiments import make_trainer, trainer_kwargs
    from mixlogit.tables import markdown_table

    disable_progress_bar()
    torch.set_num_threads(a.threads)
    ds = synthetic.pluralistic_task(512, 4, 1.0, a.seed)
    tok = synthetic.build_tokenizer(synthetic.task_texts(ds))
    base = synthetic.tiny_gpt_neox(tok, hidden_size=a.hidden, num_layers=a.layers, seed=a.seed)
    n = a.warmup + a.steps
    specs = [
        ("DPO (trl)", None),
        ("MixDPO-LogNormal (GH16)", {"strength": "lognormal"}),
        ("MixDPO-Gamma (closed form)", {"strength": "gamma"}),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = []
        for label, over in specs:
            kw = trainer_kwargs(
                os.path.join(tmp, str(len(trainers))), n, 5e-4, 0.1, a.batch_size, 32, a.seed, False
            )
            tr = make_trainer(base, tok, ds, kw, over)
            tr.create_optimizer_and_scheduler(num_training_steps=n)
            tr.model.train()
            tr.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which we bypass
            trainers.append((label, tr))
        # Same batches for everyone (the data order is seeded identically; take them from the DPO trainer).
        loader = trainers[0][1].get_train_dataloader()
        batches = list(itertools.islice(itertools.cycle(loader), n))
        times = {label: [] for label, _ in trainers}
        for i, batch in enumerate(batches):
            # Rotate who goes first in each round, so that no trainer always runs on a cold cache.
            for label, tr in trainers[i % len(trainers) :] + trainers[: i % len(trainers)]:
                inputs = dict(batch)
                t0 = time.perf_counter()
                tr.training_step(tr.model, inputs)
                tr.optimizer.step()
                tr.lr_scheduler.step()
                tr.optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                if i >= a.warmup:
                    times[label].append(dt)
    dpo = times[specs[0][0]]
    rows = []
    for label, _ in specs:
        t = times[label]
        ratios = [x / y for x, y in zip(t, dpo, strict=True)]
        rows.append(
            {
                "trainer": label,
                "median_ms": 1000 * statistics.median(t),
                "mean_ms": 1000 * statistics.mean(t),
                "ratio_vs_dpo": statistics.median(ratios),
                "ratio_of_medians": statistics.median(t) / statistics.median(dpo),
            }
        )
    print(
        f"Whole training step (training_step + optimizer + scheduler), tiny GPT-NeoX hidden {a.hidden}, "
        f"{a.layers} layers, {a.batch_size} pairs/step, {a.steps} interleaved steps after {a.warmup} warm-up, "
        f"{a.threads} torch thread(s), load average {os.getloadavg()[0]:.1f}"
    )
    print(markdown_table(rows, floatfmt=".3f", missing="nan"))
    worst = max(r["ratio_vs_dpo"] for r in rows[1:])
    print(f"\nworst MixDPO/DPO step-time ratio (median of per-round ratios): {worst:.3f} (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
