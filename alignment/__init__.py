"""alignment: MixDPO, DPO with a learned distribution of preference strength, on mixlogit's kernel.

Importing the package is light (torch, scipy and mixlogit only); the trainer, which needs transformers and TRL,
is loaded on first access of ``MixDPOConfig`` or ``MixDPOTrainer``.
"""

from .losses import OBJECTIVES, dpo_loss, mixdpo_loss
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
_LAZY = {"MixDPOConfig": "alignment.trainer", "MixDPOTrainer": "alignment.trainer"}


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
    "dpo_loss",
    "make_strength",
    "mixdpo_loss",
    "register_strength",
]
