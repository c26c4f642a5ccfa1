"""MixDPO for Hugging Face causal LMs: a drop-in subclass of TRL's ``DPOTrainer``.

Switching from DPO is a change of class::

    from alignment.trainer import MixDPOConfig, MixDPOTrainer
    cfg = MixDPOConfig(output_dir="out", beta=0.1, strength="lognormal")
    trainer = MixDPOTrainer(model=model, ref_model=ref_model, args=cfg, train_dataset=ds, processing_class=tok)
    trainer.train()
    trainer.strength          # the learned strength distribution (an nn.Module)

What changes relative to ``trl.DPOTrainer`` (trl >= 1.16, < 2):

- the loss is MixDPO's ``-log E_beta[sigmoid(beta h)]`` (``objective="marginal"``) or ``E_beta[-log sigmoid(beta
  h)]`` (``objective="expected"``) from :func:`alignment.losses.mixdpo_loss`, with ``beta ~ p_phi``, instead of
  ``-log sigmoid(beta h)``; ``strength="point"`` gives DPO's sigmoid loss with ``beta`` exactly;
- phi (the strength parameters) is trained jointly with the policy, in its own optimizer param group with its
  own learning rate, saved in every checkpoint (``strength.pt`` + ``strength.json``) and restored on resume;
- logs ``beta/mean``, ``beta/std``, ``beta/cv`` and ``beta/<family parameter>`` next to TRL's metrics, and
  with a ``group_column`` also ``rewards/accuracies_macro`` (preference accuracy averaged over groups).

TRL computes its losses inline in ``DPOTrainer._compute_loss`` (there is no narrower hook between the four
log-probability tensors and the loss), so that method is overridden here: the policy and reference log-probs
are computed as TRL does (TRL's fused LM head, TRL's ``compute_ref_log_probs`` for the reference, precomputed
reference log-probs when ``precompute_ref_log_probs=True``), then the MixDPO loss replaces the sigmoid loss.
TRL's alternative losses (``loss_type`` other than ``"sigmoid"``), f-divergences, ``ld_alpha``, WPO weighting
and vision-language datasets are refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from trl import DPOConfig, DPOTrainer

from .data import drop_empty_completions, validate_preference_dataset

__all__ = [
    "STRENGTH_FAMILIES",
    "MixDPOConfig",
    "MixDPOTrainer",
    "default_strength_init",
    "load_strength",
    "save_strength",
]

logger = logging.getLogger(__name__)

STRENGTH_FAMILIES = ("point", "lognormal", "gamma")
OBJECTIVES = ("marginal", "expected")
STRENGTH_WEIGHTS_NAME = "strength.pt"
STRENGTH_CONFIG_NAME = "strength.json"
# Extra columns this trainer adds during preprocessing and carries through the collator (never to the model).
GROUP_ID_COLUMN = "mixdpo_group_id"
ROW_COLUMN = "mixdpo_row"
_EXTRA_KEYS = (GROUP_ID_COLUMN, ROW_COLUMN)
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *_EXTRA_KEYS}
_FAMILY_PARAMS = {"point": ("beta",), "lognormal": ("mu", "sigma"), "gamma": ("shape", "rate")}
# Default spread of the initial strength distribution: CV 0.53 for both families (sigma = 0.5 gives
# sqrt(exp(0.25) - 1) = 0.53; shape = 4 gives 1/sqrt(4) = 0.5), wide enough to move either way.
_DEFAULT_SIGMA = 0.5
_DEFAULT_SHAPE = 4.0
# Default strength learning rate = this multiple of the policy's, capped. Adam moves every parameter by about
# its learning rate per step whatever the gradient's scale. The strength parameters are O(1) numbers on a log
# scale, while DPO's policy learning rates (1e-7 to 1e-5) are tuned for weight updates that are tiny relative
# to the weights; 1000x lets the strength move by O(1) in a few thousand steps, and the cap keeps it from
# jumping by more than about 1% of its scale per step when the policy rate is itself large.
STRENGTH_LR_MULTIPLIER = 1000.0
STRENGTH_LR_CAP = 1e-2


def default_strength_init(
    family: str, beta: float, init: dict[str, float] | None = None, fix_mean: bool = False
) -> dict[str, float]:
    """Initial family parameters, completed so that the distribution's mean equals ``beta``.

    Args:
        family: ``"point"``, ``"lognormal"`` or ``"gamma"``.
        beta: target mean (DPO's beta).
        init: user-given parameters (a subset of the family's: point ``beta``; lognormal ``mu``, ``sigma``;
            gamma ``shape``, ``rate``); the missing ones are filled in.
        fix_mean: the mean is pinned to ``beta``, so only the spread parameter is returned.

    Returns:
        Dict of family parameters.
    """
    if family not in _FAMILY_PARAMS:
        raise ValueError(f"Unknown strength {family!r}; accepted: {list(STRENGTH_FAMILIES)}.")
    init = dict(init or {})
    unknown = sorted(set(init) - set(_FAMILY_PARAMS[family]))
    if unknown:
        raise ValueError(
            f"strength_init has parameter(s) {unknown} that the {family!r} family does not have; "
            f"its parameters are {list(_FAMILY_PARAMS[family])}."
        )
    for key, value in init.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"strength_init[{key!r}] must be a finite number, got {value!r}.")
    if family == "point":
        return {"beta": float(init.get("beta", beta))}
    if family == "lognormal":
        sigma = float(init.get("sigma", _DEFAULT_SIGMA))
        if fix_mean:
            return {"sigma": sigma}
        return {"mu": float(init.get("mu", math.log(beta) - sigma**2 / 2)), "sigma": sigma}
    shape = float(init.get("shape", _DEFAULT_SHAPE))
    if fix_mean:
        return {"shape": shape}
    return {"shape": shape, "rate": float(init.get("rate", shape / beta))}


def _build_strength(
    family: str,
    init: dict[str, float],
    integrator: str | None,
    nodes: int | None,
    fix_mean: bool,
    mean: float,
):
    from .strength import make_strength

    kwargs: dict[str, Any] = {"init": init, "integrator": integrator, "nodes": nodes}
    if family != "point":
        kwargs.update(fix_mean=fix_mean, mean=mean if fix_mean else None)
    strength = make_strength(family, **kwargs)
    if family == "point":
        # DPO's beta is a hyperparameter, not learned: "point" must reproduce DPOTrainer exactly.
        for p in strength.parameters():
            p.requires_grad_(False)
    return strength


@dataclass
class MixDPOConfig(DPOConfig):
    r"""Configuration of :class:`MixDPOTrainer`: every ``trl.DPOConfig`` field plus the strength distribution.

    Args:
        strength (`str`, defaults to `"lognormal"`):
            Family of the preference-strength distribution p_phi(beta): `"point"` (beta fixed at `beta`: plain DPO),
            `"lognormal"` or `"gamma"`.
        strength_init (`dict`, *optional*):
            Initial family parameters (lognormal: `mu`, `sigma`; gamma: `shape`, `rate`). Missing ones are chosen
            so that the initial mean equals `beta`; the default spread is sigma = 0.5 or shape = 4 (CV about 0.5).
            A JSON string is accepted (for command lines).
        strength_integrator (`str`, *optional*):
            How E_beta[.] is computed (family-specific; None: the family's default, e.g. Gauss-Hermite for the
            lognormal and the closed form for the gamma).
        strength_nodes (`int`, *optional*):
            Quadrature nodes or draws of the integrator (None: the family's default).
        strength_learning_rate (`float`, *optional*):
            Learning rate of the strength parameters. Default: `min(1000 * learning_rate, 1e-2)` (the strength
            parameters are O(1) on a log scale; see `STRENGTH_LR_MULTIPLIER`).
        strength_fix_mean (`bool`, defaults to `False`):
            Pin the mean of the strength distribution to `beta` and learn only its shape. The location of beta and
            the scale of the policy's log-ratio margins are partly confounded: with the mean free, the likelihood
            can rise by sharpening beta instead of moving the policy, which weakens DPO's implicit KL anchor.
            On the synthetic pluralistic benchmark (benchmarks/bench_pluralistic.py) the free mean drifts up
            (Gamma: E[beta] 0.1 -> 0.14-1.2; LogNormal: to 7-120 with CV up to ~100, unstable across seeds) while
            held-out log-ratio margins shrink 3-9x; with the mean pinned the spread stays small and grows with
            the annotators' heterogeneity, and accuracy stays at DPO's. Pin the mean when the strength should stay
            interpretable as DPO's beta.
        objective (`str`, defaults to `"marginal"`):
            `"marginal"`: -log E_beta[sigmoid(beta h)] (the mixed-logit likelihood); `"expected"`:
            E_beta[-log sigmoid(beta h)] (an upper bound by Jensen).
        group_column (`str`, *optional*):
            Subgroup or annotator column of the datasets; it survives preprocessing, and evaluation then reports
            the macro (over groups) preference accuracy `rewards/accuracies_macro` next to TRL's micro one.
    """

    strength: str = field(default="lognormal", metadata={"help": "point | lognormal | gamma"})
    strength_init: dict | str | None = field(default=None, metadata={"help": "initial family parameters"})
    strength_integrator: str | None = field(default=None, metadata={"help": "integrator of E_beta[.]"})
    strength_nodes: int | None = field(default=None, metadata={"help": "quadrature nodes or draws"})
    strength_learning_rate: float | None = field(default=None, metadata={"help": "learning rate of phi"})
    strength_fix_mean: bool = field(default=False, metadata={"help": "pin E[beta] to beta"})
    objective: str = field(default="marginal", metadata={"help": "marginal | expected"})
    group_column: str | None = field(default=None, metadata={"help": "subgroup or annotator column"})

    def __post_init__(self):
        if self.strength not in STRENGTH_FAMILIES:
            raise ValueError(f"Unknown strength {self.strength!r}; accepted: {list(STRENGTH_FAMILIES)}.")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"Unknown objective {self.objective!r}; accepted: {list(OBJECTIVES)}.")
        if isinstance(self.strength_init, str):
            try:
                self.strength_init = json.loads(self.strength_init)
            except json.JSONDecodeError as e:
                raise ValueError(f"strength_init must be a dict or a JSON object string: {e}") from e
        if self.strength_init is not None and not isinstance(self.strength_init, dict):
            raise ValueError(
                f"strength_init must be a dict of family parameters, got {self.strength_init!r}."
            )
        if self.strength_learning_rate is not None and not self.strength_learning_rate >= 0:
            raise ValueError(f"strength_learning_rate must be >= 0, got {self.strength_learning_rate}.")
        if self.strength_nodes is not None and self.strength_nodes < 1:
            raise ValueError(f"strength_nodes must be a positive integer, got {self.strength_nodes}.")
        if not self.beta > 0:
            raise ValueError(
                f"beta must be > 0 (it is the mean of the strength distribution), got {self.beta}."
            )
        # Validate the initial parameters now, so that a typo fails at configuration time.
        default_strength_init(self.strength, self.beta, self.strength_init, self.strength_fix_mean)
        super().__post_init__()

    @property
    def resolved_strength_learning_rate(self) -> float:
        """The strength learning rate in use (the explicit one, or the documented default)."""
        if self.strength_learning_rate is not None:
            return float(self.strength_learning_rate)
        return min(STRENGTH_LR_MULTIPLIER * self.learning_rate, STRENGTH_LR_CAP)


def _to_mixdpo_config(args) -> MixDPOConfig:
    """Upgrade a plain ``DPOConfig`` (same fields, MixDPO defaults for the rest)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DPOConfig) if f.init}
    return MixDPOConfig(**values)


def save_strength(strength, output_dir: str, meta: dict[str, Any]) -> None:
    """Write ``strength.pt`` (state dict) and ``strength.json`` (family, configuration, current moments)."""
    os.makedirs(output_dir, exist_ok=True)
    torch.save(strength.state_dict(), os.path.join(output_dir, STRENGTH_WEIGHTS_NAME))
    with torch.no_grad():
        info = {
            **meta,
            "params": {k: float(v) for k, v in strength.family_params().items()},
            "mean": float(strength.mean()),
            "std": float(strength.std()),
            "cv": float(strength.cv()),
        }
    with open(os.path.join(output_dir, STRENGTH_CONFIG_NAME), "w") as f:
        json.dump(info, f, indent=2)


def read_strength_config(checkpoint_dir: str) -> dict[str, Any] | None:
    """The ``strength.json`` of a checkpoint or run directory, or None when there is none."""
    path = os.path.join(checkpoint_dir, STRENGTH_CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_strength(run_dir: str):
    """Rebuild the strength module saved in a checkpoint or run directory.

    Returns:
        ``(strength, info)``: the module with its saved parameters, and the ``strength.json`` contents.
    """
    info = read_strength_config(run_dir)
    if info is None:
        raise FileNotFoundError(
            f"{run_dir!r} has no {STRENGTH_CONFIG_NAME}: it was not written by MixDPOTrainer."
        )
    strength = _build_strength(
        info["family"],
        info["init"],
        info.get("integrator"),
        info.get("nodes"),
        info.get("fix_mean", False),
        info["beta"],
    )
    state = torch.load(os.path.join(run_dir, STRENGTH_WEIGHTS_NAME), map_location="cpu", weights_only=True)
    strength.load_state_dict(state)
    return strength, info


class _CollatorWithExtras:
    """Wrap a preference collator so the MixDPO bookkeeping columns (group id, row index) reach the batch."""

    def __init__(self, base):
        self.base = base

    def __call__(self, examples):
        out = self.base(examples)
        for key in _EXTRA_KEYS:
            if key in examples[0]:
                out[key] = torch.tensor([int(ex[key]) for ex in examples], dtype=torch.long)
        return out


class MixDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with a learned distribution of preference strength (MixDPO).

    Takes exactly ``trl.DPOTrainer``'s arguments; ``args`` should be a :class:`MixDPOConfig` (a plain
    ``DPOConfig`` is upgraded with MixDPO's defaults). After construction ``trainer.strength`` is the strength
    module (parameters on the trainer's device), and ``trainer.group_names`` the groups of ``group_column``.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "mixdpo"]
    _name = "MixDPO"

    def __init__(
        self,
        model,
        ref_model=None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            args = MixDPOConfig(output_dir="mixdpo-output")
        elif not isinstance(args, MixDPOConfig):
            if not isinstance(args, DPOConfig):
                raise TypeError(
                    f"`args` must be a MixDPOConfig (or a trl.DPOConfig), got {type(args).__name__}."
                )
            args = _to_mixdpo_config(args)
        self._check_supported(args)
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
        init = default_strength_init(args.strength, args.beta, args.strength_init, args.strength_fix_mean)
        self._strength_meta = {
            "family": args.strength,
            "init": init,
            "integrator": args.strength_integrator,
            "nodes": args.strength_nodes,
            "fix_mean": bool(args.strength_fix_mean) and args.strength != "point",
            "beta": float(args.beta),
            "objective": args.objective,
            "format_version": 1,
        }
        self._strength = _build_strength(
            args.strength,
            init,
            args.strength_integrator,
            args.strength_nodes,
            self._strength_meta["fix_mean"],
            args.beta,
        )
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self._strength.to(self.accelerator.device)
        self.data_collator = _CollatorWithExtras(self.data_collator)

    # ------------------------------------------------------------------ configuration checks
    @staticmethod
    def _named_eval_datasets(eval_dataset):
        if eval_dataset is None:
            return []
        if isinstance(eval_dataset, dict):
            return [(f"eval_dataset[{k!r}]", v) for k, v in eval_dataset.items()]
        return [("eval_dataset", eval_dataset)]

    @staticmethod
    def _check_supported(args) -> None:
        if list(args.loss_type) != ["sigmoid"]:
            raise ValueError(
                f"MixDPO replaces DPO's sigmoid loss; loss_type={args.loss_type} is not supported. "
                "Use loss_type='sigmoid' (the default)."
            )
        if args.f_divergence_type != "reverse_kl":
            raise ValueError(
                f"f_divergence_type={args.f_divergence_type!r} is not supported by MixDPOTrainer; "
                "use the default 'reverse_kl'."
            )
        if args.ld_alpha is not None:
            raise ValueError("ld_alpha (LD-DPO) is not supported by MixDPOTrainer; leave it None.")
        if args.use_weighting:
            raise ValueError("use_weighting (WPO) is not supported by MixDPOTrainer; leave it False.")
        if args.label_smoothing:
            # TRL's sigmoid loss ignores it too; MixDPO keeps DPOTrainer's behaviour rather than guess a meaning.
            logger.warning(
                "label_smoothing=%s is ignored by the sigmoid (MixDPO) loss, as by TRL's DPOTrainer.",
                args.label_smoothing,
            )

    # ------------------------------------------------------------------ public attributes
    @property
    def strength(self):
        """The strength distribution module p_phi(beta) being learned."""
        return self._strength

    @property
    def group_names(self) -> list[str]:
        """Group labels of ``group_column``, in the order of their integer ids."""
        return sorted(self._group_index, key=self._group_index.get)

    # ------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        columns = getattr(dataset, "column_names", None) or list(next(iter(dataset)))
        if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns):
            validate_preference_dataset(dataset, args.group_column, f"{dataset_name} dataset")
            if ROW_COLUMN not in columns:
                dataset = dataset.map(lambda _, i: {ROW_COLUMN: i}, with_indices=True)
            n_before = len(dataset) if hasattr(dataset, "__len__") else None
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            dataset, _ = drop_empty_completions(
                dataset, args.max_length, args.truncation_mode, f"the {dataset_name} dataset", log=False
            )
            if n_before is not None:
                n_dropped = n_before - len(dataset)
                if n_dropped:
                    logger.warning(
                        "MixDPO: dropped %d of %d pairs of the %s dataset whose completion is empty after "
                        "truncation to max_length=%s (they carry no preference signal).",
                        n_dropped,
                        n_before,
                        dataset_name,
                        args.max_length,
                    )
                if len(dataset) == 0:
                    raise ValueError(
                        f"Every pair of the {dataset_name} dataset has an empty completion after "
                        f"truncation to max_length={args.max_length}; raise max_length."
                    )
        if args.group_column is not None and GROUP_ID_COLUMN not in columns:
            if args.group_column not in (getattr(dataset, "column_names", None) or list(next(iter(dataset)))):
                raise ValueError(
                    f"group_column={args.group_column!r} is not a column of the {dataset_name} dataset."
                )
            index = self._group_index

            def add_group_id(example):
                key = str(example[args.group_column])
                if key not in index:
                    index[key] = len(index)
                return {GROUP_ID_COLUMN: index[key]}

            # Not batched, in one process and never from the cache (the ids live in this trainer's index), so that
            # ids follow first appearance and stay consistent across datasets.
            map_kwargs = {}
            if hasattr(dataset, "__len__"):  # IterableDataset.map takes neither argument
                map_kwargs = {
                    "desc": f"Indexing groups of the {dataset_name} dataset",
                    "load_from_cache_file": False,
                }
            dataset = dataset.map(add_group_id, **map_kwargs)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for key in _EXTRA_KEYS:
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    # ------------------------------------------------------------------ optimisation
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        params = [p for p in self._strength.parameters() if p.requires_grad]
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
        inputs = {k: v for k, v in inputs.items() if k not in _EXTRA_KEYS}
        return super().compute_ref_log_probs(model, inputs)

    def _policy_and_ref_logps(self, model, inputs):
        """Summed completion log-probs of the policy (with grad) and of the reference (without).

        Returns:
            ``(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, outputs, seq_len)``; each
            log-prob tensor has shape ``(batch,)`` in nats.
        """
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
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
        from .losses import mixdpo_loss

        mode = "train" if self.model.training else "eval"
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, outputs, seq_len = (
            self._policy_and_ref_logps(model, inputs)
        )
        losses, chosen_rewards, rejected_rewards = mixdpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            strength=self._strength,
            objective=self.args.objective,
        )
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
                model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
                outputs = model(**model_kwargs)
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

    # ------------------------------------------------------------------ per-pair margins
    @torch.no_grad()
    def pair_margins(self, dataset=None, batch_size: int | None = None) -> dict[str, Any]:
        """DPO margins h of every pair under the current policy and the reference.

        Args:
            dataset: raw or prepared preference dataset (default: the trainer's eval dataset, else its train one).
            batch_size: pairs per forward (default: ``per_device_eval_batch_size``).

        Returns:
            Dict of numpy arrays over the kept pairs: ``row`` (index in ``dataset``; pairs dropped by truncation
            are absent), ``margin`` (h, nats), ``chosen_logratio``, ``rejected_logratio`` and, with a
            ``group_column``, ``group`` (labels).
        """
        import numpy as np
        from torch.utils.data import DataLoader

        if dataset is None:
            dataset = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        if isinstance(dataset, dict):
            raise TypeError("pair_margins takes one dataset, not a dict of eval datasets.")
        prepared = "prompt_ids" in dataset.column_names and ROW_COLUMN in dataset.column_names
        if not prepared:
            dataset = self._prepare_dataset(dataset, self.processing_class, self.args, "margins")
        if self.precompute_ref_logps and "ref_chosen_logps" not in dataset.column_names:
            if self.ref_model is None and not self._is_peft() and self.state.global_step > 0:
                raise ValueError(
                    "The reference log-probs of this dataset cannot be computed after training: "
                    "precompute_ref_log_probs=True and no ref_model (full fine-tuning). Pass the "
                    "dataset as eval_dataset at construction, or pass a ref_model."
                )
            dataset = self._precompute_ref_logps(
                dataset, "margins", batch_size or self.args.per_device_eval_batch_size
            )
        keep = [c for c in dataset.column_names if c in self._signature_columns_or_default()]
        loader = DataLoader(
            dataset.select_columns(keep),
            batch_size=batch_size or self.args.per_device_eval_batch_size,
            collate_fn=self.data_collator,
            shuffle=False,
        )
        was_training = self.model.training
        self.model.eval()
        out: dict[str, list] = {"row": [], "chosen_logratio": [], "rejected_logratio": [], "group_id": []}
        try:
            for batch in loader:
                batch = self._prepare_inputs(batch)
                c, r, rc, rr, _, _ = self._policy_and_ref_logps(self.model, batch)
                out["chosen_logratio"].append((c - rc).float().cpu().numpy())
                out["rejected_logratio"].append((r - rr).float().cpu().numpy())
                out["row"].append(batch[ROW_COLUMN].cpu().numpy())
                if GROUP_ID_COLUMN in batch:
                    out["group_id"].append(batch[GROUP_ID_COLUMN].cpu().numpy())
        finally:
            if was_training:
                self.model.train()
        result = {k: np.concatenate(v) for k, v in out.items() if v}
        result["margin"] = result["chosen_logratio"] - result["rejected_logratio"]
        if "group_id" in result:
            names = self.group_names
            result["group"] = np.array([names[g] for g in result.pop("group_id")], dtype=object)
        return result

    def _signature_columns_or_default(self) -> list[str]:
        self._set_signature_columns_if_needed()
        return list(self._signature_columns)

    def _is_peft(self) -> bool:
        from accelerate.utils import is_peft_model

        return is_peft_model(self.model)

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

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            self._restore_strength(os.fspath(resume_from_checkpoint))
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint or None,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _restore_strength(self, checkpoint: str) -> None:
        info = read_strength_config(checkpoint)
        family = self._strength_meta["family"]
        if info is None:
            if family == "point":
                logger.warning(
                    "Checkpoint %s has no %s (not written by MixDPOTrainer); strength='point' needs no "
                    "state, resuming.",
                    checkpoint,
                    STRENGTH_CONFIG_NAME,
                )
                return
            raise ValueError(
                f"Cannot resume from {checkpoint!r}: it has no {STRENGTH_CONFIG_NAME}, so it was not "
                f"written by MixDPOTrainer and holds no strength={family!r} state."
            )
        if info.get("family") != family:
            raise ValueError(
                f"Cannot resume from {checkpoint!r}: its strength family is {info.get('family')!r} but "
                f"this run has strength={family!r}. Resume with strength={info.get('family')!r}, or "
                "start a new run."
            )
        if bool(info.get("fix_mean", False)) != self._strength_meta["fix_mean"]:
            raise ValueError(
                f"Cannot resume from {checkpoint!r}: it was trained with strength_fix_mean="
                f"{info.get('fix_mean')} but this run has strength_fix_mean="
                f"{self._strength_meta['fix_mean']}."
            )
        state = torch.load(
            os.path.join(checkpoint, STRENGTH_WEIGHTS_NAME),
            map_location=self.accelerator.device,
            weights_only=True,
        )
        self._strength.load_state_dict(state)
