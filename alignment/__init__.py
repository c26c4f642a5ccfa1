"""alignment: MixDPO, DPO with a learned distribution of preference strength, on mixlogit's kernel.

Importing the package is light (torch, scipy and mixlogit only); the configuration and the trainer, which need
transformers and TRL, are loaded on first access of ``MixDPOConfig`` or ``MixDPOTrainer``.

Layers, bottom-up (a module imports only modules below it): data and synthetic, models, strength_base,
strength_families, strength (the registry), losses, panel, evaluate, batching, run_dir, config, annotators,
trainer, annotator_diagnostics, diagnostics, experiments, commands, cli. Only config, trainer, experiments and commands import TRL.
"""

from . import synthetic
from .data import load_preference_data, validate_preference_dataset
from .diagnostics import (
    annotator_strength_to_arviz,
    plot_annotator_strength,
    plot_strength,
    strength_to_arviz,
)

# Eager on purpose: the submodule alignment.evaluate shares the function's name, and an eager import keeps
# ``alignment.evaluate`` the function even after the submodule is imported elsewhere.
from .evaluate import evaluate, pair_logratios
from .losses import OBJECTIVES, dpo_loss, mixdpo_loss
from .run_dir import load_strength, save_strength
from .strength import (
    DEFAULT_NODES,
    STRENGTHS,
    GammaStrength,
    LogNormalStrength,
    PointStrength,
    Strength,
    StrengthPosterior,
    make_strength,
    register_strength,
)

# Not in __all__: a star import stays light too.
_LAZY = {"MixDPOConfig": "alignment.config", "MixDPOTrainer": "alignment.trainer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alignment' has no attribute {name!r}")


__all__ = [
    "DEFAULT_NODES",
    "OBJECTIVES",
    "STRENGTHS",
    "GammaStrength",
    "LogNormalStrength",
    "PointStrength",
    "Strength",
    "StrengthPosterior",
    "annotator_strength_to_arviz",
    "dpo_loss",
    "evaluate",
    "load_preference_data",
    "load_strength",
    "make_strength",
    "mixdpo_loss",
    "pair_logratios",
    "plot_annotator_strength",
    "plot_strength",
    "register_strength",
    "save_strength",
    "strength_to_arviz",
    "synthetic",
    "validate_preference_dataset",
]
