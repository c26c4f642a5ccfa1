"""The experiment harness: DPO against MixDPO variants trained from one base model, and the SmolLM2 demo.

Public, so that the benchmarks (``benchmarks/pluralistic_runs.py``, ``benchmarks/bench_trainer_step.py``) and the
``mixdpo demo`` command (:mod:`alignment.demo`) share one implementation: :func:`trainer_kwargs` (the trainer
settings of a tiny CPU run), :func:`make_trainer` (TRL's own ``DPOTrainer`` for the DPO baseline,
:class:`~alignment.trainer.MixDPOTrainer` otherwise), :func:`preferred_probability` (each method's model of the
held-out labels), :func:`with_explicit_prompt` (TRL's split of implicit-prompt pairs, before an evaluation) and the
SmolLM2 demo's settings and pairs. This is the TRL side: it re-exports ``MixDPOConfig`` and
``MixDPOTrainer``, so :mod:`alignment.commands` reaches all of TRL through one deferred import of this module.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
from trl import DPOConfig, DPOTrainer
from trl.data_utils import maybe_extract_prompt

from .config import MixDPOConfig
from .models import load_smollm2, smollm2_dir
from .trainer import MixDPOTrainer

__all__ = [
    "MixDPOConfig",
    "MixDPOTrainer",
    "demo_smollm2",
    "make_trainer",
    "preferred_probability",
    "smollm2_pairs",
    "smollm2_setup",
    "trainer_kwargs",
    "with_explicit_prompt",
]

def with_explicit_prompt(dataset):
    """``dataset`` with an explicit ``prompt``, for :func:`alignment.evaluate.evaluate`, which takes no other.

    Implicit-prompt pairs (``chosen`` and ``rejected`` only) are split by TRL's own
    ``trl.data_utils.maybe_extract_prompt``, the rule ``DPOTrainer`` applies to its datasets, so that evaluation
    sees the prompts training saw. A dataset with a ``prompt`` column is returned as it is, without importing TRL.
    """
    if "prompt" in (dataset.column_names or ()):
        return dataset
    return dataset.map(maybe_extract_prompt)


def preferred_probability(trainer, strength, h: np.ndarray, split, name: str) -> np.ndarray:
    """P(chosen preferred) of each pair of ``split`` (shape (n,)) under the run's model of the labels.

    Per-pair models integrate beta over the learned population; annotator-level (panel) MixDPO predicts a pair of
    a training annotator from that annotator's posterior ``q_a`` (its training pairs' final margins), the
    posterior predictive its own evaluation loss uses, and an unseen annotator's from the population.
    ``name`` names the split in errors about its annotators.
    """
    import torch

    hh = torch.as_tensor(h, dtype=torch.float64)
    panel = getattr(trainer, "panel", None)
    with torch.no_grad():
        if panel is None:
            return torch.exp(strength.log_prob_preferred(hh)).numpy()
        ids = panel.index.ids(split[panel.index.column], name)
        return torch.exp(-panel.pair_losses(strength, trainer.margin_cache, hh, ids, train=False)).numpy()


def trainer_kwargs(
    output_dir: str,
    steps: int,
    lr: float,
    beta: float,
    batch_size: int,
    max_length: int,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    return {
        "output_dir": output_dir,
        "max_steps": steps,
        "learning_rate": lr,
        "beta": beta,
        "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": batch_size,
        "max_length": max_length,
        "seed": seed,
        "data_seed": seed,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": max(1, steps // 5),
        "dataloader_num_workers": 0,
        "disable_tqdm": not progress,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        # TRL turns activation checkpointing on by default; a tiny model needs no memory saving, only the time.
        "gradient_checkpointing": False,
        # TRL defaults to bf16 autocast, which on a CPU without native bf16 is emulated: slower and less exact.
        "bf16": False,
    }


def make_trainer(base_model, tokenizer, train_dataset, trainer_kwargs: dict[str, Any], overrides=None):
    """A trainer whose policy and frozen reference are copies of ``base_model``.

    ``overrides`` None or ``{"strength": "point"}`` gives TRL's own ``DPOTrainer`` (the baseline is TRL's, not
    ours); anything else a :class:`~alignment.trainer.MixDPOTrainer` with those ``MixDPOConfig`` fields.
    """
    policy, ref = copy.deepcopy(base_model), copy.deepcopy(base_model)
    common = {
        "model": policy,
        "ref_model": ref,
        "train_dataset": train_dataset,
        "processing_class": tokenizer,
    }
    if not overrides or overrides == {"strength": "point"}:
        return DPOTrainer(args=DPOConfig(**trainer_kwargs), **common)
    # The labels say which methods pin the mean ("-fixmean"); the others learn it (the library pins by default).
    return MixDPOTrainer(args=MixDPOConfig(**trainer_kwargs, **{"strength_fix_mean": False, **overrides}), **common)


def smollm2_setup(output_dir: str, steps: int, learning_rate: float = 1e-4, seed: int = 0, **overrides):
    """MixDPO configuration and LoRA adapter of the SmolLM2 demo (and its test): LogNormal strength, rank-8 LoRA
    on the attention's q and v projections, precomputed reference log-probs, fp32 on the CPU.

    Returns:
        ``(MixDPOConfig, peft.LoraConfig)``.
    """
    from peft import LoraConfig

    kw = {
        "output_dir": output_dir,
        "strength": "lognormal",
        "beta": 0.1,
        "learning_rate": learning_rate,
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "max_length": 64,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "precompute_ref_log_probs": True,
        "dataloader_num_workers": 0,
        "seed": seed,
        "gradient_checkpointing": False,
        "bf16": False,
    }
    kw.update(overrides)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]
    )
    return MixDPOConfig(**kw), lora


def demo_smollm2(output_dir: str, steps: int, seed: int):
    """``mixdpo demo --model smollm2``: a few LoRA MixDPO steps on SmolLM2-135M-Instruct, timed; returns the
    trainer."""
    import torch
    from transformers import TrainerCallback

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    print(f"loaded SmolLM2-135M-Instruct from {smollm2_dir()} in {time.perf_counter() - t0:.0f} s")
    train = smollm2_pairs()
    cfg, lora = smollm2_setup(output_dir, steps, seed=seed)
    trainer = MixDPOTrainer(
        model=model, args=cfg, train_dataset=train, processing_class=tok, peft_config=lora
    )
    times = []

    class _Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(_Timer())
    trainer.train()
    steady = times[1:] or times
    print(
        f"\nSmolLM2 LoRA MixDPO: {len(times)} steps, batch 2 pairs, {torch.get_num_threads()} threads; "
        f"step time median {sorted(steady)[len(steady) // 2]:.2f} s (first step {times[0]:.2f} s)"
    )
    print(f"learned strength: {trainer.strength}")
    return trainer


def smollm2_pairs():
    """A handful of conversational preference pairs for the SmolLM2 demo and test."""
    import datasets

    qa = [
        ("What is the capital of France?", "The capital of France is Paris.", "France has no capital."),
        ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs."),
        ("What color is the sky on a clear day?", "It is blue.", "It is green."),
        ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5."),
        ("Name a planet in our solar system.", "Mars is a planet.", "The Moon is a planet."),
        ("What do bees make?", "Bees make honey.", "Bees make milk."),
        ("Which is larger, an elephant or a mouse?", "An elephant.", "A mouse."),
        ("What is frozen water called?", "Ice.", "Steam."),
    ]
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for q, good, bad in qa:
        rows["prompt"].append([{"role": "user", "content": q}])
        rows["chosen"].append([{"role": "assistant", "content": good}])
        rows["rejected"].append([{"role": "assistant", "content": bad}])
    return datasets.Dataset.from_dict(rows)
