"""One seed of the pluralistic benchmark: the task of every (arm, level), one pretrained tiny LM, every method's runs.

Imported by ``benchmarks/bench_pluralistic.py``, which holds the command line, the worker processes, the resume
logic and the summary. Each run is one configuration of TRL's ``DPOTrainer`` (DPO, rDPO, IPO) or of
:class:`alignment.trainer.MixDPOTrainer` (learned-beta DPO, MixDPO), trained from the same pretrained model, and
gives one CSV row of metrics (see :func:`evaluate_run`).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from alignment import metrics, synthetic
from alignment.data import tokenize_pair
from alignment.experiments import preferred_probability
from alignment.strength import make_strength
from alignment.strength_fit import profile_spread, sd_log_strength, strength_vector

BETAS = (0.03, 0.1, 0.3, 1.0, 3.0)  # the DPO grid
#: Columns of a run's CSV row (the summary reads them by name).
COLUMNS = ["seed", "arm", "level", "method", "beta", "acc", "acc_macro", "acc_worst", "acc_minority", "val_nll",
           "test_nll", "kl_true", "ece", "brier", "margin_mean", "beta_mean", "cv", "sd_log", "sd_log_low",
           "sd_log_high", "lr_stat", "lr_pvalue", "phi_change", "kl_ref", "win", "reward", "train_s", "s_per_step",
           "base_strength", "expected_label_accuracy", "label_accuracy_train", "label_accuracy_validation",
           "label_accuracy_test", "realized_sd_log", "annotator_spearman"]
MIX_BETAS = (0.1, 0.3, 1.0)  # beta0 of the MixDPO variants (the pinned mean, or the free mean's start)
HELDOUT_SAMPLES = 32  # completions per held-out prompt for KL and win rate
MAX_NEW_TOKENS = 5  # three words and eos, plus one


@dataclass(frozen=True)
class Method:
    """A family of runs that differ only in beta: ``label`` names it, each run is ``(label, beta)``."""

    label: str
    trainer: str  # "trl" or "mixdpo"
    overrides: dict[str, Any] = field(default_factory=dict)
    betas: tuple[float, ...] = BETAS


#: phi is refitted on every pair's cached margin every 10 steps (one Newton step each after the first); the cache
#: is refreshed once, at 80% of the steps, and when training ends, so the refits at 80% and at the end both see the
#: current policy's margins (the stationarity check compares them). A refresh is a no-grad pass over the 2,000
#: training pairs, about a fifth of a DPO run's training time on the tiny model, so the earlier grid's five a run
#: (every 20% of the steps) were the largest cost of a MixDPO run after its training steps.
STEPS = 150  # optimizer steps of every run (full and --quick)
REFIT = {"strength_update": "refit", "strength_refit_steps": 10, "strength_refresh_steps": int(0.8 * STEPS)}


def _mix(label, betas=MIX_BETAS, **over):
    return Method(label, "mixdpo", {**REFIT, **over}, betas)


#: Annotator-level (panel) MixDPO, one strength per annotator (``strength_level="annotator"``): the free mean from one
#: start (its refits land on the same E[beta] from .1, .3 or 1) in every arm; the pinned mean on the MixDPO grid in
#: the strength arm only (the grid of arms "direction" and "clickers" is sized to fit the benchmark's wall time).
PANEL_METHODS = [
    _mix("panel-MixDPO-LogNormal", (0.3,), strength="lognormal", strength_level="annotator"),
    _mix("panel-MixDPO-Gamma", (0.3,), strength="gamma", strength_level="annotator"),
    _mix("panel-MixDPO-LogNormal-pinned", strength="lognormal", strength_level="annotator", strength_fix_mean=True),
]
#: The full method list (arm "strength"); arms "direction" and "clickers" run :data:`OTHER_ARMS_METHODS`.
METHODS = [
    Method("DPO", "trl"),
    Method("DPO-learned-beta", "mixdpo", {"strength": "point", "strength_learnable": True, **REFIT}, (0.1,)),
    Method("rDPO-ls0.1", "trl", {"loss_type": ["robust"], "label_smoothing": 0.1}, (0.1, 0.3, 1.0)),
    Method("rDPO-ls0.2", "trl", {"loss_type": ["robust"], "label_smoothing": 0.2}, (0.1, 0.3, 1.0)),
    Method("IPO", "trl", {"loss_type": ["ipo"]}, (0.1, 0.3, 1.0)),
    _mix("MixDPO-LogNormal", strength="lognormal"),
    _mix("MixDPO-LogNormal-pinned", strength="lognormal", strength_fix_mean=True),
    _mix("MixDPO-Gamma", strength="gamma"),
    _mix("MixDPO-Gamma-pinned", strength="gamma", strength_fix_mean=True),
    _mix("MixDPO-LogNormal-pinned-expected", strength="lognormal", strength_fix_mean=True, objective="expected"),
    *PANEL_METHODS,
]
#: Arms "direction" and "clickers", sized to fit the grid's wall time: the DPO beta grid (for the best-beta DPO),
#: the per-pair MixDPO variant of lowest validation NLL on the strength arm (LogNormal, free mean; the issue's
#: selection criterion, fixed before these arms run) and panel MixDPO (LogNormal, free mean; the Gamma panel is
#: within 0.1 point and 0.002 nats of it on the strength arm).
OTHER_ARMS_METHODS = ["DPO", "MixDPO-LogNormal", "panel-MixDPO-LogNormal"]
QUICK_METHODS = [
    Method("DPO", "trl", betas=(0.1, 1.0)),
    Method("DPO-learned-beta", "mixdpo", METHODS[1].overrides, (0.1,)),
    Method("MixDPO-LogNormal-pinned", "mixdpo", METHODS[6].overrides, (0.3,)),
    Method("panel-MixDPO-LogNormal-pinned", "mixdpo", PANEL_METHODS[2].overrides, (0.3,)),
]
BY_LABEL = {m.label: m for m in METHODS}


def methods_for(arm: str, quick: bool) -> list[Method]:
    if quick:
        return QUICK_METHODS
    return METHODS if arm == "strength" else [BY_LABEL[label] for label in OTHER_ARMS_METHODS]


@dataclass
class Scale:
    """Sizes of one benchmark run (the full run's or ``--quick``'s)."""

    n_train: int = 2000
    n_validation: int = 1000
    n_test: int = 5000
    steps: int = STEPS
    pretrain_steps: int = 200
    batch_size: int = 16
    lr: float = 5e-4


def trainer_settings(output_dir: str, beta: float, seed: int, scale: Scale) -> dict[str, Any]:
    """TrainingArguments shared by every method: one cosine-decayed schedule, no checkpoints, fp32 on the CPU."""
    return {
        "output_dir": output_dir, "max_steps": scale.steps, "learning_rate": scale.lr, "beta": beta,
        "per_device_train_batch_size": scale.batch_size, "per_device_eval_batch_size": 64, "max_length": 32,
        "seed": seed, "data_seed": seed, "report_to": "none", "use_cpu": True, "save_strategy": "no",
        "logging_steps": max(1, scale.steps // 10), "dataloader_num_workers": 0, "disable_tqdm": True,
        # A decayed schedule lets the policy (and a refitted strength) settle; the same for every method.
        "lr_scheduler_type": "cosine", "warmup_steps": 0, "gradient_checkpointing": False, "bf16": False,
        # The frozen reference is scored once per run instead of at every step and margin refresh.
        "precompute_ref_log_probs": True, "precompute_ref_batch_size": 256,
    }


class SeedContext:
    """What every run of one seed shares: the pretrained model, the tokenizer, reference log-probs and samples."""

    def __init__(self, seed: int, scale: Scale, model_cache: str | None = None):
        self.seed, self.scale = seed, scale
        base = synthetic.benchmark_task(0.0, "strength", seed, n_train=scale.n_train,
                                        n_validation=scale.n_validation, n_test=scale.n_test)
        texts = synthetic.task_texts(base.train)
        self.tokenizer = synthetic.build_tokenizer(texts)
        self.model = synthetic.tiny_gpt_neox(self.tokenizer, seed=seed)
        if model_cache and os.path.isfile(model_cache):
            self.model.load_state_dict(torch.load(model_cache, weights_only=True))
            self.model.eval()
        else:
            synthetic.pretrain(self.model, self.tokenizer, texts, steps=scale.pretrain_steps, seed=seed,
                               progress=False)
            if model_cache:
                tmp = model_cache + ".tmp"
                torch.save(self.model.state_dict(), tmp)
                os.replace(tmp, model_cache)
        self.heldout = base.heldout_prompts
        self.ref_samples = metrics.sample_completions(self.model, self.tokenizer, self.heldout, HELDOUT_SAMPLES,
                                                      MAX_NEW_TOKENS, seed + 1)
        self._ref: dict[int, np.ndarray] = {}
        self._batches: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # Training splits saved as Arrow files: the datasets library then caches what a trainer derives from
        # them (TRL's tokenization, the reference log-probs keyed by the reference's hash) next to the file, so
        # the second and later runs on a task load them (0.03-0.13 s) where each in-memory run redid them
        # (1.8-2.0 s). The same tokens and log-probs either way; removed with the context.
        self._disk = tempfile.TemporaryDirectory(prefix="pluralistic-splits-")
        self._train_splits: dict[int, Any] = {}

    def train_split(self, task):
        """``task.train`` as a file-backed dataset (saved once per task), for the trainers' cached preprocessing."""
        from datasets import load_from_disk

        key = id(task.train)
        if key not in self._train_splits:
            path = os.path.join(self._disk.name, str(len(self._train_splits)))
            task.train.save_to_disk(path)
            self._train_splits[key] = (task.train, load_from_disk(path))  # keep task.train alive: id stays unique
        return self._train_splits[key][1]

    def _batch(self, split) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ``(input_ids, attention_mask, completion_mask)`` of every chosen then every rejected
        completion of ``split`` (tokenized as TRL tokenizes them), shape (2n, L) each; cached per split."""
        key = id(split)
        if key not in self._batches:
            ids = [tokenize_pair(ex, self.tokenizer) for ex in split.select_columns(["prompt", "chosen", "rejected"])]
            seqs = [(p, c) for p, c, _ in ids] + [(p, r) for p, _, r in ids]
            width = max(len(p) + len(c) for p, c in seqs)
            input_ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(seqs), width), dtype=torch.long)
            completion = torch.zeros((len(seqs), width), dtype=torch.bool)
            for i, (p, c) in enumerate(seqs):
                input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                attention[i, : len(p) + len(c)] = 1
                completion[i, len(p) : len(p) + len(c)] = True
            self._batches[key] = (input_ids, attention, completion)
        return self._batches[key]

    @torch.no_grad()
    def logps(self, model, split) -> np.ndarray:
        """Summed completion log-probs (nats) of the 2n sequences of :meth:`_batch`, in batches of 512."""
        input_ids, attention, completion = self._batch(split)
        out = []
        for start in range(0, len(input_ids), 512):
            sl = slice(start, start + 512)
            logits = model(input_ids=input_ids[sl], attention_mask=attention[sl]).logits[:, :-1].float()
            token = torch.log_softmax(logits, -1).gather(-1, input_ids[sl, 1:, None]).squeeze(-1)
            out.append((token * completion[sl, 1:]).sum(-1).double())
        return torch.cat(out).numpy()

    def margins(self, model, split) -> np.ndarray:
        """DPO margins h (nats) of ``split``'s pairs under ``model`` against the pretrained reference."""
        key = id(split)
        if key not in self._ref:  # the reference's log-probs of a split are the same for every run
            self._ref[key] = self.logps(self.model, split)
        ratio = self.logps(model, split) - self._ref[key]
        n = len(ratio) // 2
        return ratio[:n] - ratio[n:]

    def reference_accuracy(self, split) -> float:
        """Oracle accuracy of the untrained policy's own preference: log pi_ref(chosen) > log pi_ref(rejected)."""
        lp = self.logps(self.model, split)
        n = len(lp) // 2
        return metrics.oracle_accuracy(lp[:n] - lp[n:], np.asarray(split["oracle_margin"]))["accuracy"]


def _strength_of(trainer, beta: float):
    strength = getattr(trainer, "strength", None)
    return strength if strength is not None else make_strength("point", init={"beta": beta})


def _train(ctx: SeedContext, task, method: Method, beta: float, workdir: str):
    from trl import DPOConfig, DPOTrainer

    from alignment.config import MixDPOConfig
    from alignment.trainer import MixDPOTrainer

    kw = trainer_settings(workdir, beta, ctx.seed, ctx.scale)
    common = {"model": copy.deepcopy(ctx.model), "ref_model": copy.deepcopy(ctx.model),
              "train_dataset": ctx.train_split(task), "processing_class": ctx.tokenizer}
    if method.trainer == "trl":
        trainer = DPOTrainer(args=DPOConfig(**kw, **method.overrides), **common)
    else:
        # A method names its mean pinned (strength_fix_mean=True); the others learn it (the library pins by default).
        trainer = MixDPOTrainer(args=MixDPOConfig(**kw, **{"strength_fix_mean": False, **method.overrides}), **common)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - t0


def _phi_change(trainer, steps: int) -> float:
    """Largest change of any unconstrained strength parameter from the refit at 80% of the steps to the end."""
    refit = getattr(trainer, "strength_refit", None)
    if refit is None or not refit.history:
        return 0.0
    final = strength_vector(trainer.strength)
    late = [params for step, params in refit.history if step >= 0.8 * steps]
    start = late[0] if late else refit.history[-1][1]
    return max(abs(final[k] - start[k]) for k in final) if final else 0.0


def split_metrics(trainer, strength, margins_of, task) -> dict[str, Any]:
    """NLL of the validation and test labels, and the test split's accuracy and calibration metrics.

    ``margins_of(split)`` gives the policy's margins h (nats, (n,)) of a split's pairs in row order.
    """
    row: dict[str, Any] = {}
    for name, split in (("val", task.validation), ("test", task.test)):
        h = margins_of(split)
        p = preferred_probability(trainer, strength, h, split, name)
        probs = metrics.pair_probability_metrics(p, np.ones(len(h)), np.asarray(split["p_true"]))
        row[f"{name}_nll"] = probs["nll"]
        if name == "test":
            acc = metrics.oracle_accuracy(h, np.asarray(split["oracle_margin"]), np.asarray(split["group"]))
            row.update(acc=acc["accuracy"], acc_macro=acc["accuracy_macro"], acc_worst=acc["worst_accuracy"],
                       kl_true=probs["kl_true"], ece=probs["ece"], brier=probs["brier"],
                       margin_mean=float(np.mean(h)))
            minority = np.asarray(split["minority"])
            if minority.any():
                row["acc_minority"] = float(np.mean(np.sign(h[minority]) == np.sign(
                    np.asarray(split["oracle_margin"])[minority])))
    return row


def _annotator_spearman(panel, strength, cache, task) -> float:
    """Spearman correlation of the annotators' posterior mean strengths with the generator's true strengths."""
    from scipy.stats import spearmanr

    table = panel.table(strength, cache)
    truth = task.annotators.set_index("annotator_id")["true_strength"].loc[table["annotator"]].to_numpy()
    if np.ptp(truth) == 0:  # level 0: every annotator has the same strength, no ranking to recover
        return math.nan
    return float(spearmanr(table["mean"].to_numpy(), truth).statistic)


def evaluate_run(ctx: SeedContext, task, method: Method, beta: float) -> dict[str, Any]:
    """Train one (method, beta) on ``task`` and measure it: one CSV row."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer, train_s = _train(ctx, task, method, beta, tmp)
    policy = trainer.model
    policy.eval()
    strength = _strength_of(trainer, beta)
    row: dict[str, Any] = {"method": method.label, "beta": beta, "train_s": train_s,
                           "s_per_step": train_s / ctx.scale.steps}
    panel = getattr(trainer, "panel", None)
    row.update(split_metrics(trainer, strength, lambda split: ctx.margins(policy, split), task))
    row.update(beta_mean=float(strength.mean().detach()), cv=float(strength.cv().detach()),
               sd_log=sd_log_strength(strength), phi_change=_phi_change(trainer, ctx.scale.steps))
    cache = getattr(trainer, "margin_cache", None)
    if cache is not None and strength.family in ("lognormal", "gamma"):
        if panel is None:
            prof = profile_spread(strength, cache.seen(), trainer.args.objective)
        else:
            h, ids = panel.cached(cache)
            prof = profile_spread(strength, h, "marginal", annotator=ids, n_annotators=panel.index.n_annotators)
            row["annotator_spearman"] = _annotator_spearman(panel, strength, cache, task)
        row.update(sd_log_low=prof["sd_log_low"], sd_log_high=prof["sd_log_high"], lr_stat=prof["lr_stat"],
                   lr_pvalue=prof["lr_pvalue"])
    kl = metrics.policy_kl(policy, ctx.model, ctx.tokenizer, ctx.heldout, HELDOUT_SAMPLES, MAX_NEW_TOKENS, ctx.seed)
    win = metrics.win_rate(None, None, ctx.tokenizer, ctx.heldout, synthetic.oracle_reward, HELDOUT_SAMPLES,
                           MAX_NEW_TOKENS, ctx.seed, policy_samples=kl["samples"], ref_samples=ctx.ref_samples)
    row.update(kl_ref=kl["kl"], win=win["win_rate"], reward=win["reward_policy"])
    return {k: (float(v) if isinstance(v, (np.floating, float)) and not math.isnan(v) else v) for k, v in row.items()}


def task_row(task) -> dict[str, Any]:
    """The generator's facts of one (seed, arm, level): base strength, label accuracies, realized spread."""
    return {"base_strength": task.base_strength, "expected_label_accuracy": task.expected_label_accuracy,
            **{f"label_accuracy_{k}": v for k, v in task.label_accuracy.items()},
            "realized_sd_log": task.realized_sd_log_strength}
