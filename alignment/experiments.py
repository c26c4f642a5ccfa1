"""The experiment harness: DPO against MixDPO variants trained from one base model, and the two demos.

Public, so that the benchmarks (``benchmarks/bench_pluralistic.py``, ``benchmarks/bench_trainer_step.py``) and the
``mixdpo demo`` command share one implementation: :func:`trainer_kwargs` (the trainer settings of a tiny CPU
run), :func:`make_trainer` (TRL's own ``DPOTrainer`` for the DPO baseline, :class:`~alignment.trainer.MixDPOTrainer`
otherwise), :func:`run_methods` (train and evaluate each method), :func:`prepare_tiny_task` (the synthetic
pluralistic task and a tiny GPT-NeoX), :func:`with_explicit_prompt` (TRL's split of implicit-prompt pairs, before
an evaluation) and the SmolLM2 demo's settings and pairs. This is the TRL side: it re-exports ``MixDPOConfig`` and
``MixDPOTrainer``, so :mod:`alignment.commands` reaches all of TRL through one deferred import of this module.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from typing import Any

from trl import DPOConfig, DPOTrainer
from trl.data_utils import maybe_extract_prompt

from mixlogit.tables import markdown_table

from . import synthetic
from .config import MixDPOConfig
from .evaluate import evaluate
from .models import load_smollm2, smollm2_dir
from .trainer import MixDPOTrainer

__all__ = [
    "DEFAULT_METHODS",
    "MixDPOConfig",
    "MixDPOTrainer",
    "demo_smollm2",
    "demo_tiny",
    "make_trainer",
    "prepare_tiny_task",
    "run_methods",
    "smollm2_pairs",
    "smollm2_setup",
    "trainer_kwargs",
    "with_explicit_prompt",
]

#: Methods of the synthetic comparison: (label, MixDPOConfig overrides).
DEFAULT_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("DPO", {"strength": "point"}),
    ("MixDPO-LogNormal", {"strength": "lognormal"}),
    ("MixDPO-Gamma", {"strength": "gamma"}),
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


def run_methods(
    train,
    test,
    tokenizer,
    base_model,
    methods=None,
    steps: int = 150,
    lr: float = 5e-4,
    beta: float = 0.1,
    batch_size: int = 16,
    max_length: int = 32,
    seed: int = 0,
    progress: bool = True,
    output_dir: str | None = None,
    group_column: str = "group",
    trainer_callback=None,
) -> list[dict[str, Any]]:
    """Train DPO and MixDPO variants from the same base model and evaluate them on held-out pairs.

    Args:
        train, test: preference datasets (``test`` ideally relabeled by the oracle).
        tokenizer, base_model: the starting policy, also the frozen reference (deep-copied per method).
        methods: ``[(label, MixDPOConfig overrides)]``; ``{"strength": "point"}`` runs ``trl.DPOTrainer``
            itself (the baseline is TRL's, not ours). Default :data:`DEFAULT_METHODS`.
        steps, lr, beta, batch_size, max_length, seed: shared training settings.
        progress: show the trainer's progress bars.
        output_dir: scratch directory of the trainers (default: a temporary directory).
        group_column: group column of ``test`` for macro accuracy.
        trainer_callback: called as ``fn(label, trainer)`` after training, e.g. to collect diagnostics.

    Returns:
        One dict per method: ``method``, ``acc`` and ``acc_macro`` (held-out preference accuracy, micro and over
        groups), ``margin`` (mean held-out margin h, nats), ``beta_mean``, ``cv`` (learned), ``train_s``
        (training wall time, s), ``s_per_step``.
    """
    methods = DEFAULT_METHODS if methods is None else methods
    test = with_explicit_prompt(test)  # the trainers split their own data; evaluate needs explicit prompts
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out_root = output_dir or tmp
        for label, overrides in methods:
            kw = trainer_kwargs(
                os.path.join(out_root, label), steps, lr, beta, batch_size, max_length, seed, progress
            )
            trainer = make_trainer(base_model, tokenizer, train, kw, overrides)
            policy, ref = trainer.model, trainer.ref_model
            if not progress:  # without progress bars the trainer prints every log dict instead; keep quiet
                from transformers.trainer_callback import PrinterCallback

                trainer.remove_callback(PrinterCallback)
            t0 = time.perf_counter()
            trainer.train()
            train_s = time.perf_counter() - t0
            res = evaluate(policy, ref, test, tokenizer, group_column=group_column, max_length=max_length)
            strength = getattr(trainer, "strength", None)
            row = {
                "method": label,
                "acc": res["accuracy"],
                "acc_macro": res["accuracy_macro"],
                "margin": res["margin_mean"],
                "beta_mean": float(strength.mean().detach()) if strength is not None else beta,
                "cv": float(strength.cv().detach()) if strength is not None else 0.0,
                "train_s": train_s,
                "s_per_step": train_s / steps,
            }
            if trainer_callback is not None:
                trainer_callback(label, trainer)
            rows.append(row)
    return rows


def prepare_tiny_task(
    n_pairs: int = 1200,
    heterogeneity: float = 1.0,
    seed: int = 0,
    groups: int = 4,
    pretrain_steps: int = 200,
    hidden_size: int = 64,
    num_layers: int = 2,
    progress: bool = True,
):
    """The synthetic pluralistic task and a tiny GPT-NeoX briefly pretrained on its text.

    Returns:
        ``(train, test, tokenizer, model)``: ``test`` is 25% of the pairs, relabeled by the oracle.
    """
    ds = synthetic.pluralistic_task(n_pairs, groups, heterogeneity, seed)
    train, test = synthetic.train_test_split(ds, test_size=0.25, seed=seed)
    texts = synthetic.task_texts(train)
    tokenizer = synthetic.build_tokenizer(texts)
    model = synthetic.tiny_gpt_neox(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    synthetic.pretrain(model, tokenizer, texts, steps=pretrain_steps, seed=seed, progress=progress)
    return train, test, tokenizer, model


def demo_tiny(pairs: int, heterogeneity: float, seed: int, steps: int, pretrain_steps: int) -> list[dict[str, Any]]:
    """``mixdpo demo``: DPO and three MixDPO variants on the tiny synthetic task; prints and returns the table."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    print(
        f"MixDPO demo: synthetic pluralistic task, {pairs} pairs, 4 groups, heterogeneity {heterogeneity}; "
        f"tiny GPT-NeoX built from a config (hidden 64, 2 layers), seed {seed}."
    )
    train, test, tok, model = prepare_tiny_task(pairs, heterogeneity, seed, pretrain_steps=pretrain_steps)
    methods = DEFAULT_METHODS + [
        ("MixDPO-LogNormal-fixmean", {"strength": "lognormal", "strength_fix_mean": True})
    ]
    rows = []
    for label, overrides in tqdm(methods, desc="Methods"):
        rows += run_methods(
            train, test, tok, model, [(label, overrides)], steps=steps, seed=seed, progress=True
        )
    print()
    print(
        f"Held-out pairs ({len(test)}, relabeled by the oracle): preference accuracy (micro / macro over groups), "
        "mean margin h (nats), learned E[beta] and CV, training wall time."
    )
    print(markdown_table(rows, floatfmt=".3f", missing="nan"))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return rows


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
