"""DPO and MixDPO losses on per-sequence log-probabilities (model-free; the trainer supplies the log-probs).

Both take TRL's four tensors: the policy's and the reference model's summed log-probabilities of the chosen and
the rejected completions, each of shape (B,) in nats, and return ``(losses, chosen_rewards, rejected_rewards)``,
each (B,), like TRL's ``dpo_loss``. The margin is ``h = (pi_c - ref_c) - (pi_r - ref_r)``.

- DPO: ``loss = -log sigmoid(beta h)``.
- MixDPO, ``objective="marginal"`` (the mixed-logit likelihood): ``loss = -log E_beta[sigmoid(beta h)]``.
- MixDPO, ``objective="expected"``: ``loss = E_beta[-log sigmoid(beta h)]``, an upper bound of the marginal
  loss by Jensen's inequality.

``label_smoothing = eps`` gives the conservative-DPO form ``(1 - eps) loss(h) + eps loss(-h)`` (noisy labels).
Rewards are TRL's, with beta replaced by its mean: ``E[beta] * (pi - ref)``, detached.

Low-precision inputs (bfloat16, float16) are upcast to float32 before the margin is formed; float64 stays
float64. The returned tensors are in that working dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixlogit.validation import check_fraction, check_positive

from .strength_base import Strength

#: Names accepted by ``objective``.
OBJECTIVES = ("marginal", "expected")


def check_objective(objective: str) -> str:
    """``objective`` when it is one of :data:`OBJECTIVES`."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; accepted: {', '.join(OBJECTIVES)}")
    return objective


_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _margin(tensors: tuple, check: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the four log-prob tensors; return (h, chosen log-ratio, rejected log-ratio) in the working dtype.

    ``check=False`` leaves the finiteness check (a device sync) to the caller: :func:`_raise_non_finite_inputs`.
    """
    for name, t in zip(_NAMES, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of per-sequence log-probs, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    shape = tensors[0].shape
    for name, t in zip(_NAMES[1:], tensors[1:]):
        if t.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {_NAMES[0]} has shape {tuple(shape)}; the four log-prob "
                "tensors must have the same shape (one entry per preference pair)"
            )
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    pc, pr, rc, rr = (t.to(dtype) for t in tensors)
    chosen, rejected = pc - rc, pr - rr
    h = chosen - rejected
    # Any non-finite input makes h non-finite, so one check (one device sync) covers all four tensors.
    if check and not bool(torch.isfinite(h).all()):
        _raise_non_finite_inputs(tensors, h)
    return h, chosen, rejected


def _raise_non_finite_inputs(tensors: tuple, h: torch.Tensor) -> None:
    """Name the non-finite log-prob entries (or the overflowing margins); return when there are none."""
    parts = []
    for name, t in zip(_NAMES, tensors):
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            parts.append(f"{name} {_where(t, bad)}")
    bad = ~torch.isfinite(h)
    if parts or bool(bad.any()):
        detail = "; ".join(parts) if parts else f"the margin overflows: it {_where(h, bad)}"
        raise ValueError(f"non-finite log-probabilities: {detail}")


def _where(t: torch.Tensor, bad: torch.Tensor) -> str:
    """Where ``bad`` holds: "at batch indices [...]" (the first ten), or "is nan" for a 0-dim tensor."""
    if t.dim() == 0:
        return f"is {float(t)}"
    return f"at batch indices {bad.nonzero().squeeze(-1).tolist()[:10]}"


def _raise_non_finite(strength: Strength, h, losses, chosen_rewards, rejected_rewards) -> None:
    """Name why the MixDPO loss or rewards came out non-finite from finite margins (the strength's range);
    return when all are finite after all."""
    for name, t in (("chosen_rewards", chosen_rewards), ("rejected_rewards", rejected_rewards),
                    ("losses", losses)):
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            mean, largest = float(strength.mean().detach()), float(h.abs().max().detach())
            raise ValueError(
                f"MixDPO {name} {_where(t, bad)}: not finite in {h.dtype} with the {strength.describe()} "
                f"(E[beta] = {mean:.4g}, largest |margin| {largest:.4g}): E[beta] or beta times the margin "
                f"overflows {h.dtype}. Choose a strength with a smaller E[beta]"
                + ("." if h.dtype == torch.float64 else ", or use float64 log-probabilities.")
            )


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain DPO sigmoid loss, written directly (the reference the kernel path is tested against).

    Each log-prob tensor has shape (B,) (any common shape works elementwise). ``beta > 0``.
    Returns ``(losses, chosen_rewards, rejected_rewards)``: ``-log sigmoid(beta h)`` and ``beta * log-ratio``.
    """
    check_positive("beta", beta)
    eps = check_fraction("label_smoothing", label_smoothing, closed=True)
    h, chosen, rejected = _margin((policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                   ref_rejected_logps))
    losses = -F.logsigmoid(beta * h)
    if eps:
        losses = (1.0 - eps) * losses - eps * F.logsigmoid(-beta * h)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def mixdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    strength: Strength,
    objective: str = "marginal",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MixDPO loss: DPO with the strength ``beta`` integrated over ``strength``'s distribution.

    Parameters
    ----------
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps : (B,) summed log-probs
        (nats). Gradients flow to the policy's and to ``strength``'s parameters.
    strength : a :class:`~alignment.strength.Strength` (PointStrength gives DPO exactly).
    objective : "marginal" (``-log E[sigmoid(beta h)]``, the mixed-logit likelihood) or "expected"
        (``E[-log sigmoid(beta h)]``).
    label_smoothing : eps in [0, 1]: ``(1 - eps) loss(h) + eps loss(-h)``.

    Returns
    -------
    losses, chosen_rewards, rejected_rewards : (B,) each; rewards are ``E[beta] * log-ratio`` (detached).
    """
    if not isinstance(strength, Strength):
        raise TypeError(
            f"strength must be an alignment Strength (PointStrength, LogNormalStrength, GammaStrength), "
            f"got {type(strength).__name__}"
        )
    check_objective(objective)
    eps = check_fraction("label_smoothing", label_smoothing, closed=True)
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h, chosen, rejected = _margin(tensors, check=False)
    fn = strength.log_prob_marginal if objective == "marginal" else strength.log_prob_expected
    flat = h.reshape(-1)

    def integrate(log_prob) -> torch.Tensor:
        if eps:
            # One call for both signs, so a simulation integrator draws once per call.
            both = log_prob(torch.cat([flat, -flat]))
            return -((1.0 - eps) * both[: flat.numel()] + eps * both[flat.numel():]).reshape(h.shape)
        return -log_prob(flat).reshape(h.shape)

    losses = integrate(fn)
    with torch.no_grad():
        mean_beta = strength.mean().to(device=h.device, dtype=h.dtype)
        chosen_rewards, rejected_rewards = mean_beta * chosen.detach(), mean_beta * rejected.detach()
        # One check (one device sync) for everything: a NaN or inf input, margin, loss or reward (a strength
        # beyond the working dtype's range gives E[beta] = inf) makes this sum non-finite. A sum that merely
        # overflows is told apart below, where each part is checked on its own.
        total = (h + losses + chosen_rewards + rejected_rewards).sum()
    if not bool(torch.isfinite(total)):
        _raise_non_finite_inputs(tensors, h)
        strength.check_range(h.dtype)
        # Strength nodes beyond the dtype's range (E[beta] within it): integrate again with them held finite.
        losses = integrate(lambda x: strength.with_finite_nodes(fn, x))
        _raise_non_finite(strength, h, losses, chosen_rewards, rejected_rewards)
    return losses, chosen_rewards, rejected_rewards


__all__ = ["OBJECTIVES", "check_objective", "dpo_loss", "mixdpo_loss"]
