"""Checks and warnings around a training run: how many optimizer steps it will take, whether the learned strength
ran away, which ``report_to`` names transformers accepts, and how ``mixdpo train`` records its paths.

Pure functions of numbers and strings (transformers is imported only to list its reporting integrations), used by
:class:`~alignment.trainer.MixDPOTrainer` (the strength guard) and by ``mixdpo train``.
"""

from __future__ import annotations

import math
import os

__all__ = ["DRIFT_CV", "DRIFT_RATIO", "FEW_STEPS", "NAMED_MODELS", "STRENGTH_UPDATES", "check_report_to", "few_steps_warning",
           "planned_optimizer_steps", "recorded_path", "strength_drift_warning"]

#: How phi is trained (``MixDPOConfig.strength_update``, ``mixdpo train --strength-update``).
STRENGTH_UPDATES = ("gradient", "refit")
#: A run of fewer optimizer steps than this is warned about (``mixdpo train``).
FEW_STEPS = 20
#: The strength guard: E[beta] above this many times its start value (or below its start over this), ...
DRIFT_RATIO = 10.0
#: ... or a coefficient of variation of beta above this, is warned about at the end of training.
DRIFT_CV = 10.0
#: Models that :func:`alignment.models.load_causal_lm` knows by name: recorded as given, not as paths.
NAMED_MODELS = ("smollm2",)


def planned_optimizer_steps(n_pairs: int, batch_size: int, grad_accum: int = 1, epochs: float = 1.0,
                            max_steps: int = 0, world_size: int = 1) -> int:
    """The optimizer steps a training of ``n_pairs`` pairs will take, as transformers' ``Trainer`` counts them.

    Args:
        n_pairs: training pairs (after the pairs dropped by truncation).
        batch_size: pairs per device and batch; ``world_size`` devices share an optimizer step.
        grad_accum: batches per optimizer step (the last, partial one of an epoch counts as a step).
        epochs: passes over the pairs (fractions allowed), used when ``max_steps`` is 0 or negative.
        max_steps: the steps, when positive (``--max-steps``).

    Returns:
        The number of optimizer steps (at least 1 when there are pairs).
    """
    if max_steps > 0:
        return int(max_steps)
    batches = math.ceil(n_pairs / (batch_size * world_size))
    return math.ceil(epochs * max(math.ceil(batches / grad_accum), 1))


def few_steps_warning(steps: int, minimum: int = FEW_STEPS) -> str | None:
    """The warning of a run of ``steps`` optimizer steps, or None when there are at least ``minimum``."""
    if steps >= minimum:
        return None
    return (f"only {steps} optimizer step{'s' if steps != 1 else ''} will run (fewer than {minimum}): the policy and "
            "the strength barely move from their start, so the learned distribution says where the optimizer "
            "stopped rather than what the data hold. Train longer with --epochs or --max-steps, or take more steps "
            "per epoch with a smaller --batch-size (or --grad-accum)")


def strength_drift_warning(start_mean: float, mean: float, cv: float, fix_mean: bool = False,
                           can_fix_mean: bool = True) -> str | None:
    """The warning of a learned strength that ran away, or None.

    The strength ran away when E[beta] ended more than :data:`DRIFT_RATIO` times above or below ``start_mean``, or
    its coefficient of variation ``cv`` exceeds :data:`DRIFT_CV`. With the mean free the likelihood can rise by
    sharpening beta instead of moving the policy (see ``MixDPOConfig.strength_fix_mean``), so the warning names the
    option that pins the mean, ``strength_fix_mean=True`` (``mixdpo train --fix-mean``), when the family has one
    (``can_fix_mean``) and it is not already on (``fix_mean``).

    Args:
        start_mean: E[beta] before training (DPO's ``beta`` unless ``strength_init`` says otherwise).
        mean, cv: E[beta] and sd[beta] / E[beta] after training.
    """
    ratio = mean / start_mean if start_mean > 0 else math.inf
    moved = not (1.0 / DRIFT_RATIO <= ratio <= DRIFT_RATIO)
    if not (moved or not math.isfinite(cv) or cv > DRIFT_CV):
        return None
    facts = (f"E[beta] went from {start_mean:.4g} to {mean:.4g} ({ratio:.3g}x its start) and its CV is {cv:.3g} "
             f"(the guard: E[beta] within {DRIFT_RATIO:g}x of its start, CV at most {DRIFT_CV:g})")
    if fix_mean or not can_fix_mean:
        fix = ("the mean is pinned, so the spread grew alone" if fix_mean else "this family has no mean to pin")
        return (f"MixDPO: the learned strength ran away: {facts}; {fix}: lower the strength's learning rate "
                "(strength_learning_rate, mixdpo train --strength-lr) or train for fewer steps.")
    return (f"MixDPO: the learned strength ran away: {facts}. With the mean free the likelihood can rise by sharpening "
            "beta instead of moving the policy; keep the mean pinned (strength_fix_mean=True, the default; drop "
            "--no-fix-mean), or lower the strength's learning rate (strength_learning_rate, --strength-lr).")


def check_report_to(value: str, flag: str = "--report-to") -> str | list[str]:
    """``--report-to`` for transformers' ``report_to``: ``"none"``, ``"all"`` (every installed integration), or
    integration names joined by commas (``"tensorboard,wandb"``), each known to transformers and installed.

    Returns:
        ``"none"`` or ``"all"``, else the list of names. Raises a ValueError naming ``flag`` and what is accepted.
    """
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    names = [n.strip() for n in str(value).split(",") if n.strip()]
    if names in (["none"], ["all"]):
        return names[0]
    accepted = f"none, all, or names joined by commas from {', '.join(INTEGRATION_TO_CALLBACK)}"
    if not names or {"none", "all"} & set(names):
        raise ValueError(f"{flag} {value!r}: pass none or all alone, or integration names; accepted: {accepted}")
    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise ValueError(f"{flag} {value!r}: {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} "
                         f"not a transformers reporting integration; accepted: {accepted}")
    installed = get_available_reporting_integrations()
    # flyte and azure_ml are never (or not always) listed as installed by transformers: left to its own check.
    missing = [n for n in names if n not in installed and n not in ("flyte", "azure_ml")]
    if missing:
        raise ValueError(f"{flag} {value!r}: the {', '.join(missing)} integration{'s are' if len(missing) > 1 else ' is'}"
                         f" not installed (installed: {', '.join(installed) or 'none'}); install "
                         f"{'them' if len(missing) > 1 else 'it'} (e.g. pip install {' '.join(missing)}) or pass "
                         f"{flag} none")
    return names


def recorded_path(path: str | None) -> str | None:
    """A model or data path as a run records it: absolute (the run folder then works from any working directory),
    except the models known by name (:data:`NAMED_MODELS`)."""
    if path is None or path in NAMED_MODELS:
        return path
    return os.path.abspath(path)
