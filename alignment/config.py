"""Configuration of MixDPO training: :class:`MixDPOConfig`, TRL's ``DPOConfig`` plus the strength distribution.

The strength families and their parameter names come from the one registry, :data:`alignment.strength.STRENGTHS`
(a family added with :func:`~alignment.strength.register_strength` is accepted here too), and the objectives
from :data:`alignment.losses.OBJECTIVES`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from trl import DPOConfig

from mixlogit.validation import check_bool, check_choice, check_count, check_non_negative, check_positive

from .losses import check_objective
from .panel import STRENGTH_LEVELS, panel_integrator
from .run_checks import STRENGTH_UPDATES
from .strength import default_strength_init, parse_strength_init, strength_class

__all__ = ["STRENGTH_LEVELS", "STRENGTH_LR_CAP", "STRENGTH_LR_MULTIPLIER", "STRENGTH_UPDATES", "MixDPOConfig",
           "check_supported", "checkpointing_default", "default_bf16", "default_strength_update", "resolve_checkpointing", "to_mixdpo_config"]

logger = logging.getLogger(__name__)

# Default strength learning rate = this multiple of the policy's, capped. Adam moves every parameter by about
# its learning rate per step whatever the gradient's scale. The strength parameters are O(1) numbers on a log
# scale, while DPO's policy learning rates (1e-7 to 1e-5) are tuned for weight updates that are tiny relative
# to the weights; 1000x lets the strength move by O(1) in a few thousand steps, and the cap keeps it from
# jumping by more than about 1% of its scale per step when the policy rate is itself large.
STRENGTH_LR_MULTIPLIER = 1000.0
STRENGTH_LR_CAP = 1e-2


@dataclass
class MixDPOConfig(DPOConfig):
    r"""Configuration of :class:`~alignment.trainer.MixDPOTrainer`: every ``trl.DPOConfig`` field plus the strength
    distribution.

    Args:
        strength (`str`, defaults to `"lognormal"`):
            Family of the preference-strength distribution p_phi(beta): `"point"` (beta fixed at `beta`: plain DPO),
            `"lognormal"`, `"gamma"`, or a family added with `alignment.strength.register_strength`.
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
        strength_fix_mean (`bool`, defaults to `True`):
            Pin the mean of the strength distribution to `beta` and learn only its shape (pass `False`, or
            `mixdpo train --no-fix-mean`, to learn the mean too). Pinned is the default because it is what the
            pluralistic benchmark (benchmarks/bench_pluralistic.py, 10 seeds) supports. The location of beta and
            the scale of the policy's log-ratio margins are confounded, so with the mean free the likelihood can
            rise by sharpening beta instead of moving the policy: there the free mean (started at beta 0.1-0.3,
            chosen on validation) drifted to E[beta] 2-9 (up to 59) and lost 0.5-1.7 points of oracle accuracy
            to best-beta DPO on the strength arm, with win rates at matched KL no better. With the mean pinned, accuracy and matched-KL
            win rate equal the same-beta DPO's at every level while the held-out likelihood improves as the
            annotators' heterogeneity grows, and the learned spread grows with it. A family without a
            mean to pin (`"point"`) ignores it.
        objective (`str`, defaults to `"marginal"`):
            `"marginal"`: -log E_beta[sigmoid(beta h)] (the mixed-logit likelihood); `"expected"`:
            E_beta[-log sigmoid(beta h)] (an upper bound by Jensen).
        strength_learnable (`bool`, defaults to `False`):
            Learn the point strength's beta (a learned-beta DPO: `strength="point"`, beta starting at `beta`). The
            other families' parameters are always learned.
        strength_update (`str`, *optional*):
            How phi is trained. `"refit"`: every pair's latest margin h is kept (refreshed when the pair is in a
            batch), and every `strength_refit_steps` optimizer steps phi is set to the maximum of the objective over
            all cached margins (L-BFGS on the 1-3 scalars, no LM forward pass); when training ends one no-grad pass
            refreshes every margin and phi is refitted once more, so the reported phi is a stationary point of the
            objective on the final policy's margins. `"gradient"`: jointly with the policy by the optimizer (Adam at
            `strength_learning_rate`), which moves phi by about its learning rate per step whatever the gradient,
            so after a short run phi sits wherever it had got to. None (the default): `"refit"` for a strength
            with something to fit (a random family on a deterministic rule, or a learnable point), the setting
            the pluralistic benchmark measured; `"gradient"` otherwise (a frozen point, or Monte Carlo rules, whose
            objective is not a fixed function to maximize).
        strength_refit_steps (`int`, defaults to `10`):
            Optimizer steps between refits (`strength_update="refit"`).
        strength_refresh_steps (`int`, *optional*):
            With `strength_update="refit"`, also refresh every cached margin by a no-grad pass over the training
            set every this many steps before refitting (None: only when training ends). Cached margins are as old
            as the last visit of their pair, up to an epoch; a refresh makes the refit that of the current policy.
        group_column (`str`, *optional*):
            Subgroup or annotator column of the datasets; it survives preprocessing, and evaluation then reports
            the macro (over groups) preference accuracy `rewards/accuracies_macro` next to TRL's micro one.
        strength_level (`str`, defaults to `"pair"`):
            `"pair"`: every pair has its own draw of beta (MixDPO). `"annotator"`: one beta per annotator, shared
            by all its pairs: the panel likelihood -sum_a log E_beta[prod_{j in a} sigmoid(beta h_j)] (see
            `alignment.panel`), trained by EM with cached margins (the policy's loss weights each pair's
            log-likelihood at the rule's nodes by its annotator's posterior weights, computed from every cached
            margin) and phi refitted on all cached margins. It requires `strength_update="refit"` (refused
            otherwise: phi's panel objective needs every margin, which only the cache has), the `"marginal"`
            objective, and a random strength (a point strength is refused: one beta shared by every annotator has
            no per-annotator part). Its integrator must be a deterministic rule; when `strength_integrator` is
            None it is set to `"quadrature"` (16 Gauss-Hermite nodes resolve a product of many sigmoids poorly:
            0.19 nats off on 200 annotators x 20 pairs). The end of training writes `strength_by_annotator.csv`.
        annotator_column (`str`, defaults to `"annotator_id"`):
            Column naming each pair's annotator (`strength_level="annotator"`); every pair needs one.

    Two of TRL's defaults assume an accelerator and are decided by the hardware and the model here instead, so that
    `MixDPOConfig(output_dir=..., strength="lognormal")` trains as written on a machine without a GPU:

    - `bf16` (TRL: True): None means `default_bf16(fp16, use_cpu)`, bf16 autocast only where the accelerator has
      native bf16 (False on the CPU, where it is emulated: slower and less exact);
    - `gradient_checkpointing` (TRL: True): None means `checkpointing_default(model, device)`, settled by
      `MixDPOTrainer` once it has the model: on where the model supports it (`model.supports_gradient_checkpointing`),
      except on the CPU, where memory is rarely what limits the models trained there and recomputing the activations
      in the backward pass would only cost time (about 20-30% per step). An explicit True or False is kept.
    """

    strength: str = field(default="lognormal", metadata={"help": "point | lognormal | gamma | a registered family"})
    strength_init: dict | str | None = field(default=None, metadata={"help": "initial family parameters"})
    strength_integrator: str | None = field(default=None, metadata={"help": "integrator of E_beta[.]"})
    strength_nodes: int | None = field(default=None, metadata={"help": "quadrature nodes or draws"})
    strength_learning_rate: float | None = field(default=None, metadata={"help": "learning rate of phi"})
    strength_fix_mean: bool = field(default=True, metadata={"help": "pin E[beta] to beta (False: learn it)"})
    objective: str = field(default="marginal", metadata={"help": "marginal | expected"})
    strength_learnable: bool = field(default=False, metadata={"help": "learn the point strength's beta"})
    strength_update: str | None = field(default=None, metadata={"help": "refit | gradient (None: refit if any)"})
    strength_refit_steps: int = field(default=10, metadata={"help": "steps between refits of phi"})
    strength_refresh_steps: int | None = field(default=None, metadata={"help": "steps between margin refreshes"})
    group_column: str | None = field(default=None, metadata={"help": "subgroup or annotator column"})
    strength_level: str = field(default="pair", metadata={"help": "pair | annotator: what one beta belongs to"})
    annotator_column: str = field(default="annotator_id", metadata={"help": "annotator column (annotator level)"})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (None: where the accelerator has it)"})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "activation checkpointing (None: where the model supports it, not on CPUs)"})

    def __post_init__(self):
        strength_class(self.strength)
        check_objective(self.objective)
        self.strength_init = parse_strength_init(self.strength_init)
        if self.strength_learning_rate is not None:
            check_non_negative("strength_learning_rate", self.strength_learning_rate)
        check_count("strength_nodes", self.strength_nodes, allow_none=True)
        check_bool("strength_fix_mean", self.strength_fix_mean)
        check_bool("strength_learnable", self.strength_learnable)
        if self.strength_update is None:
            self.strength_update = default_strength_update(self.strength, self.strength_integrator,
                                                           self.strength_learnable)
        check_choice("strength_update", self.strength_update, STRENGTH_UPDATES)
        check_count("strength_refit_steps", self.strength_refit_steps)
        check_count("strength_refresh_steps", self.strength_refresh_steps, allow_none=True)
        self._check_strength_level()
        try:
            check_positive("beta", self.beta)
        except ValueError as e:
            raise ValueError(f"{e}: beta is the mean of the strength distribution.") from None
        # Validate the initial parameters now, so that a typo fails at configuration time.
        default_strength_init(self.strength, self.beta, self.strength_init, self.strength_fix_mean)
        if self.strength_learnable and not strength_class(self.strength).fixed_in_training:
            raise ValueError(
                f"strength_learnable=True applies to strength='point' (a learned-beta DPO); the "
                f"{self.strength!r} family's parameters are always learned."
            )
        if self.bf16 is None:
            self.bf16 = default_bf16(bool(self.fp16), bool(self.use_cpu))
        # transformers >= 5 resolves gradient_checkpointing (an alias of activation_checkpointing) to False: the
        # "decide with the model" of None is kept aside for resolve_checkpointing.
        self._checkpointing_auto = (self.gradient_checkpointing is None
                                    and getattr(self, "activation_checkpointing", None) is None)
        if self.gradient_checkpointing is not None and getattr(self, "activation_checkpointing", False) is None:
            self.activation_checkpointing = self.gradient_checkpointing  # TRL's name, not a deprecated use
        super().__post_init__()

    def _check_strength_level(self) -> None:
        check_choice("strength_level", self.strength_level, STRENGTH_LEVELS)
        if self.strength_level == "pair":
            return
        if not isinstance(self.annotator_column, str) or not self.annotator_column:
            raise ValueError(f"annotator_column must be the name of the annotator column, got {self.annotator_column!r}")
        # Refuses a point strength (with the reason) and a rule without a panel form; fills in "quadrature".
        self.strength_integrator = panel_integrator(self.strength, self.strength_integrator)
        if self.strength_update != "refit":
            raise ValueError(
                f"strength_level='annotator' needs strength_update='refit', got {self.strength_update!r}: the panel "
                "objective of phi involves every pair of an annotator, so phi is refitted on the cached margins of "
                "all pairs rather than moved by minibatch gradients."
            )
        if self.objective != "marginal":
            raise ValueError(f"strength_level='annotator' fits the panel marginal likelihood; objective="
                             f"{self.objective!r} has no panel form: use objective='marginal'.")

    @property
    def resolved_strength_learning_rate(self) -> float:
        """The strength learning rate in use (the explicit one, or the documented default)."""
        if self.strength_learning_rate is not None:
            return float(self.strength_learning_rate)
        return min(STRENGTH_LR_MULTIPLIER * self.learning_rate, STRENGTH_LR_CAP)


def default_strength_update(strength: str, integrator: str | None, learnable: bool) -> str:
    """``MixDPOConfig.strength_update`` when it is not given: ``"refit"`` when there is something to fit on a fixed
    objective (a random family, or a learnable point, on a deterministic rule), ``"gradient"`` otherwise."""
    cls = strength_class(strength)
    has_free = learnable or not cls.fixed_in_training
    rule = integrator if integrator is not None else (cls.integrators[0] if cls.integrators else None)
    return "refit" if has_free and rule not in ("mc", "qmc") else "gradient"


def default_bf16(fp16: bool = False, use_cpu: bool = False) -> bool:
    """``MixDPOConfig.bf16`` when it is not given: True where the accelerator has native bf16 (CUDA with bf16
    support, or another accelerator, as TRL assumes), False with ``fp16``, ``use_cpu`` or no accelerator."""
    import torch

    if fp16 or use_cpu:
        return False
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: XPU, NPU, MPS, ...
    return bool(accelerator is not None and accelerator.is_available())


def checkpointing_default(model, device_type: str) -> bool:
    """Whether ``gradient_checkpointing=None`` turns activation checkpointing on for ``model`` trained on a device of
    type ``device_type`` (``"cpu"``, ``"cuda"``, ...): where the model supports it, except on the CPU (see
    :class:`MixDPOConfig`). A model given by name (a string) is assumed to support it."""
    if device_type == "cpu":
        return False
    return isinstance(model, str) or bool(getattr(model, "supports_gradient_checkpointing", False))


def resolve_checkpointing(args, model) -> None:
    """Settle a ``MixDPOConfig``'s ``gradient_checkpointing=None`` for ``model`` (:func:`checkpointing_default` on
    ``args.device``); an explicit value, or a plain ``DPOConfig``'s, is left alone."""
    if not getattr(args, "_checkpointing_auto", False):
        return
    on = checkpointing_default(model, args.device.type)
    args.gradient_checkpointing = on
    if hasattr(args, "activation_checkpointing"):  # transformers >= 5 reads this name
        args.activation_checkpointing = on
    args._checkpointing_auto = False


def to_mixdpo_config(args) -> MixDPOConfig:
    """Upgrade a plain ``DPOConfig`` (same fields, MixDPO defaults for the rest)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DPOConfig) if f.init}
    return MixDPOConfig(**values)


def check_supported(args) -> None:
    """Refuse the ``DPOConfig`` options that MixDPO does not implement (TRL's other losses, f-divergences, LD-DPO,
    WPO), with the setting to use instead; warn that ``label_smoothing`` is ignored, as TRL does."""
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
