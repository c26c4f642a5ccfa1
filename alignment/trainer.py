"""MixDPO for Hugging Face causal LMs: a drop-in subclass of TRL's ``DPOTrainer``.

Switching from DPO is a change of class::

    from alignment import MixDPOConfig, MixDPOTrainer
    cfg = MixDPOConfig(output_dir="out", beta=0.1, strength="lognormal")
    trainer = MixDPOTrainer(model=model, ref_model=ref_model, args=cfg, train_dataset=ds, processing_class=tok)
    trainer.train()
    trainer.strength          # the learned strength distribution (an nn.Module)

What changes relative to ``trl.DPOTrainer`` (trl >= 1.16, < 2):

- the loss is MixDPO's ``-log E_beta[sigmoid(beta h)]`` (``objective="marginal"``) or ``E_beta[-log sigmoid(beta
  h)]`` (``objective="expected"``) from :func:`alignment.losses.mixdpo_loss`, with ``beta ~ p_phi``, instead of
  ``-log sigmoid(beta h)``; ``strength="point"`` gives DPO's sigmoid loss with ``beta`` exactly;
- phi (the strength parameters) is trained jointly with the policy, in its own optimizer param group with its
  own learning rate, saved in every checkpoint (``strength.pt`` + ``strength.json``, see
  :mod:`alignment.run_dir`) and restored on resume; checkpoints are written atomically, each with a record
  of its run (:mod:`alignment.checkpoints`), and resuming restores every weight (Trainer's own resume skips
  the weights a model class renames when it saves);
- with ``strength_level="annotator"`` one strength per annotator, shared by its pairs (panel MixDPO, EM with the
  margin cache: :mod:`alignment.annotators`), and ``strength_by_annotator.csv`` in the output folder;
- logs ``beta/mean``, ``beta/std``, ``beta/cv`` and ``beta/<family parameter>`` next to TRL's metrics, and
  with a ``group_column`` also ``rewards/accuracies_macro`` (preference accuracy averaged over groups).
- warns (RuntimeWarning) when training ends with E[beta] more than 10x from its start or a CV above 10, naming
  ``strength_fix_mean=True`` (:func:`alignment.run_checks.strength_drift_warning`);
- ``gradient_checkpointing=None`` (MixDPOConfig's default) follows the model's support, off on the CPU.

TRL computes its losses inline in ``DPOTrainer._compute_loss`` (there is no narrower hook between the four
log-probability tensors and the loss), so that method is overridden here: the policy and reference log-probs
are computed as TRL does (TRL's fused LM head, TRL's ``compute_ref_log_probs`` for the reference, precomputed
reference log-probs when ``precompute_ref_log_probs=True``), then the MixDPO loss replaces the sigmoid loss.
TRL's alternative losses (``loss_type`` other than ``"sigmoid"``), f-divergences, ``ld_alpha``, WPO weighting
and vision-language datasets are refused with a clear error.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import ClassVar

import torch
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from . import checkpoints
from .annotators import AnnotatorPanel, PanelRefit
from .batching import (
    ANNOTATOR_ID_COLUMN,
    EXTRA_COLUMNS,
    GROUP_ID_COLUMN,
    ROW_COLUMN,
    CollatorWithExtras,
    add_group_ids,
    add_row_index,
    column_names,
    model_inputs,
    without_extras,
)
from .config import MixDPOConfig, check_supported, resolve_checkpointing, to_mixdpo_config
from .data import drop_empty_completions, validate_preference_dataset
from .losses import mixdpo_loss
from .margins import MarginCache, PairMarginsMixin, StrengthRefit
from .run_checks import strength_drift_warning
from .run_dir import restore_strength, save_strength, strength_from_settings, strength_settings

__all__ = ["MixDPOTrainer"]

logger = logging.getLogger(__name__)


class _ZeroGradsAfterStep(TrainerCallback):
    def __init__(self, module):
        self.module = module

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.module.zero_grad(set_to_none=True)


class MixDPOTrainer(PairMarginsMixin, DPOTrainer):
    """``trl.DPOTrainer`` with a learned distribution of preference strength (MixDPO).

    Takes exactly ``trl.DPOTrainer``'s arguments; ``args`` should be a :class:`MixDPOConfig` (a plain
    ``DPOConfig`` is upgraded with MixDPO's defaults). After construction ``trainer.strength`` is the strength
    module (parameters on the trainer's device), and ``trainer.group_names`` the groups of ``group_column``.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "mixdpo"]
    _name = "MixDPO"

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None):
        if args is None:
            args = MixDPOConfig(output_dir="mixdpo-output")
        elif not isinstance(args, MixDPOConfig):
            if not isinstance(args, DPOConfig):
                raise TypeError(
                    f"`args` must be a MixDPOConfig (or a trl.DPOConfig), got {type(args).__name__}."
                )
            args = to_mixdpo_config(args)
        check_supported(args)
        resolve_checkpointing(args, model)  # MixDPOConfig's gradient_checkpointing=None: decided by the model
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        validate_preference_dataset(train_dataset, args.group_column, "train_dataset")
        first = next(iter(train_dataset))
        if "image" in first or "images" in first:
            raise ValueError("MixDPOTrainer supports text preference datasets only; this one has images.")
        for name, ds in self._named_eval_datasets(eval_dataset):
            validate_preference_dataset(ds, args.group_column, name)
        self._group_index: dict[str, int] = {}
        self._group_counts: dict[str, dict[int, list[float]]] = {"train": {}, "eval": {}}
        self._strength_meta = strength_settings(args.strength, args.beta, args.strength_init, args.strength_integrator,
                                                args.strength_nodes, args.strength_fix_mean, args.objective,
                                                args.strength_learnable)
        self._strength = strength_from_settings(self._strength_meta)
        self._start_mean = float(self._strength.mean().detach())  # for the guard at the end of training
        #: With ``strength_level="annotator"``: the annotator index and the panel loss (alignment.annotators).
        self.panel = AnnotatorPanel.from_args(args, train_dataset, self._named_eval_datasets(eval_dataset))
        #: Written into every checkpoint's record; a run resumed from a checkpoint takes its id.
        self.run_id = checkpoints.new_run_id()
        super().__init__(model=model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config)
        self._strength.to(self.accelerator.device)
        self.data_collator = CollatorWithExtras(self.data_collator)
        # Trainer zeroes the model's gradients after each optimizer step, and the strength is not in the model.
        self.add_callback(_ZeroGradsAfterStep(self._strength))
        #: With ``strength_update="refit"``: every training pair's latest margin, and the callback refitting phi.
        self.margin_cache = self.strength_refit = None
        if args.strength_update == "refit":
            self.margin_cache = MarginCache(max(self.train_dataset[ROW_COLUMN]) + 1)
            refit = StrengthRefit if self.panel is None else PanelRefit
            self.strength_refit = refit(self, args.strength_refit_steps, args.strength_refresh_steps)
            self.add_callback(self.strength_refit)

    # ------------------------------------------------------------------ configuration checks
    @staticmethod
    def _named_eval_datasets(eval_dataset):
        if eval_dataset is None:
            return []
        if isinstance(eval_dataset, dict):
            return [(f"eval_dataset[{k!r}]", v) for k, v in eval_dataset.items()]
        return [("eval_dataset", eval_dataset)]

    # ------------------------------------------------------------------ public attributes
    @property
    def strength(self):
        """The strength distribution module p_phi(beta) being learned."""
        return self._strength

    @property
    def strength_settings(self) -> dict:
        """The strength's settings as ``strength.json`` records them (family, start, beta, objective, ...)."""
        return dict(self._strength_meta)

    @property
    def group_names(self) -> list[str]:
        """Group labels of ``group_column``, in the order of their integer ids."""
        return sorted(self._group_index, key=self._group_index.get)

    # ------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        columns = column_names(dataset)
        if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns):
            validate_preference_dataset(dataset, args.group_column, f"{dataset_name} dataset")
            if ROW_COLUMN not in columns:
                dataset = add_row_index(dataset)
            n_before = len(dataset) if hasattr(dataset, "__len__") else None
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            dataset, _ = drop_empty_completions(
                dataset, args.max_length, args.truncation_mode, f"the {dataset_name} dataset", log=False
            )
            if n_before is not None:
                n_dropped = n_before - len(dataset)
                if n_dropped:
                    logger.warning("MixDPO: dropped %d of %d pairs of the %s dataset whose completion is empty after "
                                   "truncation to max_length=%s (they carry no preference signal).", n_dropped,
                                   n_before, dataset_name, args.max_length)
                if len(dataset) == 0:
                    raise ValueError(
                        f"Every pair of the {dataset_name} dataset has an empty completion after "
                        f"truncation to max_length={args.max_length}; raise max_length."
                    )
        if args.group_column is not None and GROUP_ID_COLUMN not in columns:
            dataset = add_group_ids(dataset, args.group_column, self._group_index, dataset_name)
        if self.panel is not None and ANNOTATOR_ID_COLUMN not in columns:
            dataset = self.panel.add_ids(dataset, dataset_name)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for key in EXTRA_COLUMNS:
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    # ------------------------------------------------------------------ optimisation
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        params = [p for p in self._strength.parameters() if p.requires_grad]
        if self.args.strength_update == "refit":
            params = []  # phi is set by the refits, not by the optimizer
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if params and not any(id(p) in present for p in params):
            optimizer.add_param_group(
                {
                    "params": params,
                    "lr": self.args.resolved_strength_learning_rate,
                    "weight_decay": 0.0,
                }
            )
        return optimizer

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        # The strength module lives outside the DDP-wrapped model, so average its gradients by hand.
        if self.accelerator.num_processes > 1:
            for p in self._strength.parameters():
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        return loss

    # ------------------------------------------------------------------ loss
    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(model, without_extras(inputs))

    def _policy_and_ref_logps(self, model, inputs):
        """Summed completion log-probs of the policy (with grad) and of the reference (without).

        Returns:
            ``(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, outputs, seq_len)``; each
            log-prob tensor has shape ``(batch,)`` in nats.
        """
        model_kwargs = model_inputs(inputs)
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = completion_mask.size(1) - 1
        # Prompt-learning PEFT prepends virtual tokens; keep the positions of the real tokens.
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)  # the batch is [chosen..., rejected...]
        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(
                self.ref_model or self.model, inputs
            )
        return chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, outputs, seq_len

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, outputs, seq_len = (
            self._policy_and_ref_logps(model, inputs)
        )
        if self.margin_cache is not None and mode == "train":
            margin = ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)).detach()
            # Every rank caches every rank's pairs, so that the refits (and the strength) agree across ranks.
            self.margin_cache.update(self.accelerator.gather(inputs[ROW_COLUMN]), self.accelerator.gather(margin))
        logps = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
        if self.panel is not None:
            losses, chosen_rewards, rejected_rewards = self.panel.loss(
                self._strength, self.margin_cache, logps, inputs[ANNOTATOR_ID_COLUMN], mode == "train")
        else:
            losses, chosen_rewards, rejected_rewards = mixdpo_loss(*logps, strength=self._strength,
                                                                   objective=self.args.objective)
        loss = losses.mean()
        if self.aux_loss_enabled:
            aux_loss = outputs.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss).mean().item()
            )
        self._log_metrics(
            mode,
            inputs,
            outputs,
            seq_len,
            chosen_logps,
            rejected_logps,
            chosen_rewards.detach(),
            rejected_rewards.detach(),
        )
        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_inputs(inputs))
            return loss, outputs
        return loss

    def _log_metrics(
        self, mode, inputs, outputs, seq_len, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards
    ) -> None:
        """TRL's metrics (same names and definitions) plus ``beta/*`` and per-group reward accuracies."""
        acc = self.accelerator
        metrics = self._metrics[mode]
        mask = inputs["completion_mask"][..., 1:]
        chosen_mask, rejected_mask = mask.chunk(2, dim=0)

        def token_mean(values, m):
            total = acc.gather_for_metrics((values * m).sum()).sum()
            count = acc.gather_for_metrics(m.sum()).sum()
            return (total / count).item() if count > 0 else 0.0

        metrics["entropy"].append(token_mean(outputs.entropy[:, -seq_len:].detach(), mask))
        if mode == "train":
            n_tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].detach().chunk(2, dim=0)
        metrics["logits/chosen"].append(token_mean(chosen_logits, chosen_mask))
        metrics["logits/rejected"].append(token_mean(rejected_logits, rejected_mask))
        chosen_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
        metrics["mean_token_accuracy"].append(token_mean(chosen_top1.float(), chosen_mask))

        correct = (chosen_rewards > rejected_rewards).float()
        metrics["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(acc.gather(correct).mean().item())
        metrics["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(acc.gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(acc.gather(rejected_logps.detach()).mean().item())

        with torch.no_grad():
            s = self._strength
            metrics["beta/mean"].append(float(s.mean()))
            metrics["beta/std"].append(float(s.std()))
            metrics["beta/cv"].append(float(s.cv()))
            for name, value in s.family_params().items():
                metrics[f"beta/{name}"].append(float(value))

        if GROUP_ID_COLUMN in inputs:
            gids = acc.gather(inputs[GROUP_ID_COLUMN]).tolist()
            hits = acc.gather(correct).tolist()
            counts = self._group_counts[mode]
            for g, hit in zip(gids, hits, strict=True):
                c = counts.setdefault(int(g), [0.0, 0.0])
                c[0] += hit
                c[1] += 1.0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        counts = self._group_counts[mode]
        if counts:
            prefix = "eval_" if mode == "eval" else ""
            names = self.group_names
            per_group = {g: c[0] / c[1] for g, c in counts.items() if c[1] > 0}
            logs[f"{prefix}rewards/accuracies_macro"] = sum(per_group.values()) / len(per_group)
            for g, value in per_group.items():
                label = names[g] if g < len(names) else str(g)
                logs[f"{prefix}rewards/accuracies/{label}"] = value
            counts.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            meta = {
                **self._strength_meta,
                "group_column": self.args.group_column,
                "group_names": self.group_names,
            }
            save_strength(self._strength, output_dir or self.args.output_dir, meta)
            if self.margin_cache is not None:
                self.margin_cache.save(output_dir or self.args.output_dir)
            if self.panel is not None:
                self.panel.save(output_dir or self.args.output_dir, self._strength, self.margin_cache)

    # Atomic checkpoints. Trainer._save_checkpoint writes every file of a checkpoint (through save_model, the
    # strength's too) under ``_get_output_dir(trial)/checkpoint-N``; there is no public hook before the files are
    # written (a callback's on_save runs after). So while it runs, _get_output_dir answers a staging folder, and
    # the complete checkpoint is then sealed and renamed into the run folder (alignment.checkpoints).
    def _get_output_dir(self, trial):
        return getattr(self, "_staging", None) or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        def save(staging):
            self._staging = staging
            try:
                super(MixDPOTrainer, self)._save_checkpoint(model, trial)
            finally:
                self._staging = None

        checkpoints.save_atomically(self, super()._get_output_dir(trial), save)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled or self._is_peft()):
            checkpoints.restore_model_weights(self.model if model is None else model, resume_from_checkpoint)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = checkpoints.last_complete(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir})")
        ckpt = os.fspath(resume_from_checkpoint) if isinstance(resume_from_checkpoint, (str, os.PathLike)) else None
        if ckpt is not None:
            checkpoints.check_resumable(ckpt, lambda: self._restore_strength(ckpt))
            self.run_id = checkpoints.checkpoint_run_id(ckpt) or self.run_id
        if self.args.should_save:
            checkpoints.remove_staging(self.args.output_dir)
        if ckpt is not None and (finished := self._finished_checkpoint(ckpt)) is not None:
            return finished
        out = super().train(resume_from_checkpoint=resume_from_checkpoint or None, trial=trial,
                            ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        with torch.no_grad():  # the guard: warn when E[beta] ran 10x from its start or the CV past 10
            drift = strength_drift_warning(self._start_mean, float(self._strength.mean()), float(self._strength.cv()),
                                           self._strength_meta["fix_mean"], type(self._strength).supports_fix_mean)
        if drift:
            warnings.warn(drift, RuntimeWarning, stacklevel=2)
        return out

    def _finished_checkpoint(self, checkpoint: str):
        """Finish a run from a checkpoint written at its last step, without training (None if steps remain).

        Transformers' resume arithmetic re-enters the epoch that held ``max_steps`` and runs the rest of it before
        it checks the limit, so resuming from the final checkpoint of a run killed before its final save would
        train past ``max_steps``. Here the weights are loaded and the run ends at the checkpoint's step.
        """
        from transformers.trainer import TRAINER_STATE_NAME
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        if not (self.args.max_steps > 0 and state.global_step >= self.args.max_steps):
            return None
        self._load_from_checkpoint(checkpoint)
        self.state = state
        # A training of no steps: callbacks see it begin (progress bars, loggers) and end (the final refit).
        self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        self.control.should_training_stop = True
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        loss = sum(losses) / len(losses) if losses else float("nan")
        return TrainOutput(state.global_step, loss, {"train_loss": loss})

    def _restore_strength(self, checkpoint: str) -> None:
        restore_strength(self._strength, checkpoint, self._strength_meta, map_location=self.accelerator.device)
        if self.margin_cache is not None:
            self.margin_cache.load(checkpoint)
        if self.panel is not None:
            self.panel.check_checkpoint(checkpoint)
