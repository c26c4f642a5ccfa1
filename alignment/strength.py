"""Preference-strength distributions for MixDPO: the registry of families, and the one place to build a strength.

DPO's Bradley-Terry likelihood ``sigmoid(beta * h)`` (``h`` the policy-minus-reference log-ratio margin) becomes a
binary mixed logit when the strength ``beta`` is random: ``P(chosen wins) = E_beta[sigmoid(beta * h)]``. Each
strength is a :class:`torch.nn.Module` whose parameters are unconstrained (``mu``, ``log_sigma``,
``log_shape``, ``log_rate``) so an optimizer can train them next to the policy, and whose integrals go through
mixlogit's one kernel (:func:`mixlogit.kernel.conditional_loglik` and :func:`mixlogit.kernel.log_mixed_prob`) with
the pair as a situation with one non-chosen alternative whose attribute difference is ``-h``. The Gamma closed
form lives in :mod:`mixlogit.closed_forms`.

Integrators (``integrator=``):

========================  ===========================================================================
``"gauss-hermite"``       (LogNormal) Gauss-Hermite nodes of :func:`mixlogit.draws.deterministic_rule`. Cheap,
                          but slow to converge when ``sigmoid(beta h)`` is steep in ``log beta`` (large ``sigma``
                          or ``|h|``): worst absolute error of the probability over ``sigma <= 2``,
                          ``|h| <= 10``, ``mu`` in [-3, 1] is about 2e-3 with 16 nodes, 2e-4 with 32, 4e-6 with 64
                          and 3e-8 with 128 (``tests/test_strength.py`` holds these bounds).
``"quadrature"``          mixlogit's ``draw_type="quadrature"``: composite Gauss-Legendre on ``z`` in
                          [-8.5, 8.5]; within 1e-7 of mpmath for ``sigma <= 2``, ``|h| <= 10`` at the default
                          128 nodes (measured 1.6e-9). For Gamma the same ``z`` nodes are mapped to Gamma
                          quantiles (see :class:`GammaStrength`; default 256 nodes, within 1e-8 of the closed
                          form for shapes >= 0.2).
``"mc"``                  Independent reparameterized draws per example (unbiased probability), from the
                          module's own generator.
``"qmc"``                 (LogNormal) Randomized quasi-Monte Carlo: the one-dimensional rank-1 lattice
                          ``u_r = r / R`` in ``u = Phi(z)``, shifted by an independent uniform per example per
                          call and folded by the tent transform ``u -> 1 - |2u - 1|``. Each example's estimate
                          is unbiased; its sd falls like ``R^-2`` (measured 10x to 100x below plain MC at 16
                          to 64 points). In one dimension the lattice beats a scrambled Sobol set (which
                          jitters the points) by a further 3x.
``"closed-form"``         (Gamma) The CVZ-accelerated Lerch series, relative error below 1e-13.
``"exact"``               (Point) One node at ``beta``: plain DPO.
========================  ===========================================================================

The base class is in :mod:`alignment.strength_base` (with the dtype rules), the built-in families in
:mod:`alignment.strength_families`; this module re-exports both. :data:`STRENGTHS` is the one registry: the
trainer's configuration, the command line and the run folder all take their family names and parameter names
from it, so a family added with :func:`register_strength` works everywhere.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from mixlogit.validation import check_bool, check_finite

from .strength_base import DEFAULT_NODES, FLOAT_DTYPES, Strength, StrengthPosterior, check_margin
from .strength_families import GammaStrength, LogNormalStrength, PointStrength

# ---------------------------------------------------------------------------------------------- registry
#: Strength families by name: the one list of them (``make_strength``, ``MixDPOConfig(strength=...)``,
#: ``mixdpo train --strength``, :func:`alignment.run_dir.load_strength`).
STRENGTHS: dict[str, type[Strength]] = {
    "point": PointStrength,
    "lognormal": LogNormalStrength,
    "gamma": GammaStrength,
}


def register_strength(name: str, cls: type[Strength]) -> None:
    """Add a strength family under ``name`` (a :class:`Strength` subclass)."""
    if not (isinstance(cls, type) and issubclass(cls, Strength)):
        raise TypeError(f"register_strength needs a Strength subclass, got {cls!r}")
    STRENGTHS[name] = cls


def make_strength(name: str, init: dict | None = None, integrator: str | None = None, nodes: int | None = None,
                  **kwargs) -> Strength:
    """Build a strength by family name.

    Parameters
    ----------
    name : "point", "lognormal" or "gamma" (or a name added by :func:`register_strength`).
    init : initial parameters, e.g. ``{"beta": 0.1}``, ``{"mu": -2.3, "sigma": 0.5}``, ``{"mean": 0.1, "sigma": 1}``,
        ``{"shape": 2.0, "rate": 20.0}``.
    integrator, nodes : see the module docstring; None keeps the family's default.
    kwargs : further constructor arguments (``fix_mean``, ``seed``, ``generator``, ``dtype``, ``learnable``).
    """
    if name not in STRENGTHS:
        raise ValueError(f"unknown strength {name!r}; accepted: {', '.join(STRENGTHS)}")
    cls = STRENGTHS[name]
    if init is not None and not isinstance(init, dict):
        raise ValueError(f"init must be a dict of initial parameters or None, got {type(init).__name__}")
    args = dict(init or {})
    for key, value in kwargs.items():
        if key in args:
            raise ValueError(f"{key!r} is given both in init and as a keyword argument")
        args[key] = value
    if integrator is not None:
        args["integrator"] = integrator
    if nodes is not None:
        args["nodes"] = nodes
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [k for k in args if k not in accepted]
    if unknown:
        raise ValueError(f"{name} strength does not take {', '.join(map(repr, unknown))}; "
                         f"accepted: {', '.join(accepted)}")
    return cls(**args)


def strength_class(family: str) -> type[Strength]:
    """The class registered as ``family``; the error lists the registered names."""
    if family not in STRENGTHS:
        raise ValueError(f"Unknown strength {family!r}; accepted: {list(STRENGTHS)}.")
    return STRENGTHS[family]


def parse_strength_init(value, name: str = "strength_init") -> dict | None:
    """Initial family parameters given as a dict, as a JSON object string (command lines) or as None."""
    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a dict of the family's initial parameters or a JSON object, got {value!r}")
    try:
        init = json.loads(value)
    except json.JSONDecodeError:
        init = None
    if not isinstance(init, dict):
        raise ValueError(  # noqa: TRY004 (valid JSON, but not an object: a bad value, not a bad type)
            f"{name} must be a JSON object of the family's initial parameters, e.g. "
            f"'{{\"sigma\": 1.0}}', got {value!r}"
        )
    return init


def default_strength_init(
    family: str, beta: float, init: dict[str, float] | None = None, fix_mean: bool = False
) -> dict[str, float]:
    """Initial family parameters of a training run, completed so that the distribution's mean equals ``beta``.

    Args:
        family: a name in :data:`STRENGTHS` (``"point"``, ``"lognormal"``, ``"gamma"`` or a registered one).
        beta: target mean (DPO's beta).
        init: user-given parameters, a subset of the family's ``param_names`` (point ``beta``; lognormal
            ``mu``, ``sigma``; gamma ``shape``, ``rate``); the family's ``default_init`` fills in the rest.
        fix_mean: the mean is pinned to ``beta``, so only the spread parameters are returned.

    Returns:
        Dict of family parameters.
    """
    cls = strength_class(family)
    fix_mean = check_bool("fix_mean", fix_mean)
    init = dict(init or {})
    unknown = sorted(set(init) - set(cls.param_names))
    if unknown:
        raise ValueError(
            f"strength_init has parameter(s) {unknown} that the {family!r} family does not have; "
            f"its parameters are {list(cls.param_names)}."
        )
    for key, value in init.items():
        check_finite(f"strength_init[{key!r}]", value)
    completed = cls.default_init(beta, init, fix_mean and cls.supports_fix_mean)
    dropped = sorted(set(init) - set(completed))
    if dropped:  # a location the pinned mean replaces would otherwise be dropped without a word
        raise ValueError(
            f"strength_init sets {dropped}, which a pinned mean (strength_fix_mean=True, the default) derives from "
            f"beta = {beta}; pass strength_fix_mean=False (mixdpo train --no-fix-mean) to start the {family!r} "
            f"family's mean from these values and learn it."
        )
    return completed


def build_strength(
    family: str,
    init: dict[str, float],
    integrator: str | None = None,
    nodes: int | None = None,
    fix_mean: bool = False,
    mean: float | None = None,
    learnable: bool = False,
) -> Strength:
    """The strength of a training run: :func:`make_strength` with the run's settings.

    ``fix_mean`` and ``mean`` (E[beta], pinned when ``fix_mean``) reach only a family that ``supports_fix_mean``;
    a family that is ``fixed_in_training`` (the point mass: DPO's beta) gets its parameters frozen unless
    ``learnable`` (a learned-beta DPO). Every other family is always learned, so ``learnable`` is refused for it.
    """
    cls = strength_class(family)
    fix_mean = check_bool("fix_mean", fix_mean)
    learnable = check_bool("learnable", learnable)
    kwargs: dict[str, Any] = {"init": init, "integrator": integrator, "nodes": nodes}
    if cls.supports_fix_mean:
        kwargs.update(fix_mean=fix_mean, mean=mean if fix_mean else None)
    if learnable:
        if not cls.fixed_in_training:
            raise ValueError(
                f"strength_learnable applies to the point strength (a learned-beta DPO); the {family!r} "
                "family's parameters are always learned."
            )
        kwargs["learnable"] = True
    strength = make_strength(family, **kwargs)
    if cls.fixed_in_training and not learnable:
        for p in strength.parameters():
            p.requires_grad_(False)
    return strength


__all__ = [
    "DEFAULT_NODES",
    "FLOAT_DTYPES",
    "STRENGTHS",
    "GammaStrength",
    "LogNormalStrength",
    "PointStrength",
    "Strength",
    "StrengthPosterior",
    "build_strength",
    "check_margin",
    "default_strength_init",
    "make_strength",
    "parse_strength_init",
    "register_strength",
    "strength_class",
]
