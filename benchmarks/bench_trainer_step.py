"""Whole training-step time of MixDPO against TRL's DPO in the trainer, on the tiny GPT-NeoX of the demo.

A step is what the trainer does per optimizer update: ``trainer.training_step`` (policy forward with TRL's fused
LM head, reference forward, loss, TRL's and MixDPO's metrics, backward) then the optimizer and scheduler steps.
The trainers share the model, batches and settings; their steps are interleaved (DPO, LogNormal, Gamma, DPO, ...)
so that load from other processes hits them alike (the order rotates each round), and the ratio is taken per
round, then the median.

With ``--panel`` every trainer trains on the training split of the pluralistic benchmark's task
(``alignment.synthetic.benchmark_task``: 200 annotators in 50 groups, 2,000 pairs, ``annotator_id``), and a row of
annotator-level MixDPO is added (``strength_level="annotator"``, ``strength_update="refit"``, LogNormal on its
128-node panel rule, ``fix_mean``). Its step is timed as the others' (training_step + optimizer + scheduler) plus
its refit callback's ``on_step_end`` (the refit of phi on every cached margin, every ``strength_refit_steps``
steps: the part of its cost outside ``training_step``). Its margin cache is filled by one no-grad pass and phi
fitted before the clock starts, the steady state after the first epoch (every step then computes the annotators'
weights from all 2,000 cached margins, and each timed refit is one Newton step, as in a run after its first). The median of per-round ratios leaves the refit steps out (1 in 10), so the table also gives
the ratio of mean step times, which spreads them over all steps.

Usage: python benchmarks/bench_trainer_step.py [--steps 60] [--batch-size 16] [--threads 1] [--panel]
Target (issue 5): MixDPO / DPO <= 1.05; (issue 13) panel MixDPO / DPO <= 1.05.
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
    p.add_argument("--panel", action="store_true",
                   help="add annotator-level MixDPO and time every row on the pluralistic task with annotators")
    p.add_argument("--refit-steps", type=int, default=10, help="steps between the panel's refits of phi")
    a = p.parse_args(argv)

    import torch
    from datasets.utils.logging import disable_progress_bar

    from alignment import synthetic
    from alignment.experiments import make_trainer, trainer_kwargs
    from mixlogit.tables import markdown_table

    disable_progress_bar()
    torch.set_num_threads(a.threads)
    if a.panel:
        ds = synthetic.benchmark_task(1.5, seed=a.seed, n_validation=16, n_test=16).train
    else:
        ds = synthetic.pluralistic_task(512, 4, 1.0, a.seed)
    tok = synthetic.build_tokenizer(synthetic.task_texts(ds))
    base = synthetic.tiny_gpt_neox(tok, hidden_size=a.hidden, num_layers=a.layers, seed=a.seed)
    n = a.warmup + a.steps
    specs = [
        ("DPO (trl)", None),
        ("MixDPO-LogNormal (GH16)", {"strength": "lognormal"}),
        ("MixDPO-Gamma (closed form)", {"strength": "gamma"}),
    ]
    if a.panel:
        specs.append(("panel MixDPO-LogNormal (refit)", {
            "strength": "lognormal", "strength_level": "annotator", "strength_update": "refit",
            "strength_refit_steps": a.refit_steps, "strength_fix_mean": True, "strength_init": {"sigma": 1.0}}))
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
            refit = getattr(tr, "strength_refit", None)
            if refit is not None:
                # The steady state after the first epoch: every pair cached, phi fitted, the run past its first
                # (full) refit, so the timed refits are those of the rest of a run (one Newton step each).
                refit.refresh()
                refit.refit(0, tr.margin_cache.seen(), full=True)
                tr.state.global_step = a.refit_steps
            trainers.append((label, tr))
        # Same batches for everyone (the data order is seeded identically; take them from the DPO trainer). The
        # panel's batches also carry its row and annotator ids, so it takes them from its own loader: the same
        # pairs in the same order (checked on the first batch).
        def batches_of(trainer):
            return list(itertools.islice(itertools.cycle(trainer.get_train_dataloader()), n))

        batches = batches_of(trainers[0][1])
        own = {label: batches_of(tr) for label, tr in trainers if getattr(tr, "strength_refit", None) is not None}
        for label, theirs in own.items():
            if not torch.equal(theirs[0]["input_ids"], batches[0]["input_ids"]):
                raise RuntimeError(f"{label} would train on other batches than DPO")
        times = {label: [] for label, _ in trainers}
        for i, batch in enumerate(batches):
            # Rotate who goes first in each round, so that no trainer always runs on a cold cache.
            for label, tr in trainers[i % len(trainers) :] + trainers[: i % len(trainers)]:
                inputs = dict(own[label][i] if label in own else batch)
                t0 = time.perf_counter()
                tr.training_step(tr.model, inputs)
                tr.optimizer.step()
                tr.lr_scheduler.step()
                tr.optimizer.zero_grad(set_to_none=True)
                refit = getattr(tr, "strength_refit", None)
                if refit is not None:  # Trainer's loop runs the refit callback after each optimizer step
                    tr.state.global_step += 1
                    refit.on_step_end(tr.args, tr.state, tr.control)
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
                "ratio_of_means": statistics.mean(t) / statistics.mean(dpo),
            }
        )
    print(
        f"Whole training step (training_step + optimizer + scheduler), tiny GPT-NeoX hidden {a.hidden}, "
        f"{a.layers} layers, {a.batch_size} pairs/step, {a.steps} interleaved steps after {a.warmup} warm-up, "
        f"{a.threads} torch thread(s), load average {os.getloadavg()[0]:.1f}"
        + (f"; {len(ds)} pairs of {len(set(ds['annotator_id']))} annotators, the panel's step with its refit callback "
           f"(a refit every {a.refit_steps} steps)" if a.panel else "")
    )
    print(markdown_table(rows, floatfmt=".3f", missing="nan"))
    pair_rows = rows[1:3]
    worst = max(r["ratio_vs_dpo"] for r in pair_rows)
    print(f"\nworst MixDPO/DPO step-time ratio (median of per-round ratios): {worst:.3f} (target <= 1.05)")
    if a.panel:
        panel = rows[3]
        print(f"panel MixDPO/DPO step-time ratio: {panel['ratio_vs_dpo']:.3f} (median of per-round ratios), "
              f"{panel['ratio_of_means']:.3f} (ratio of mean step times, refits included; target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
