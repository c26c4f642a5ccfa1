"""Floating-point precision of the simulated likelihood's largest pass.

``precision="double"`` (the default) computes everything in float64. ``precision="mixed"`` computes the
N x T x A x R pass (utilities, logit probabilities, their sum over a unit's situations) in float32, from
coefficient draws made in float64; the per-draw results are cast back to float64 before they are averaged over
draws and summed over units, and the gradient's sums over draws and units (the chain rule through the draws)
run in float64 too. The exact Hessian, the standard errors and the reported log-likelihood stay float64.
"""

from __future__ import annotations

import torch

#: Values accepted by ``precision=``, and the dtype of the N x T x A x R pass for each.
PRECISIONS = {"double": torch.float64, "mixed": torch.float32}


#: The optimizer's search in each precision ends after an iteration that gains less log-likelihood than this
#: (None: only by its gradient tolerance). The float32 pass leaves the value with noise of about 1e-6 on E1 (the
#: electricity data at 1,000 draws), so near the optimum a mixed search's line searches cannot succeed and would
#: spend as many evaluations again as the whole search. A gain of 1e-5 means the optimum is about a Newton step of
#: sqrt(2e-5) ~ 0.005 standard errors away; the float64 check after the search takes over from there (converged:
#: max|gradient| < 1e-4, or a float64 Newton step shorter than 0.01 standard errors, else exact Newton steps).
SEARCH_STOP_GAIN = {"double": None, "mixed": 1e-5}


def check_precision(precision) -> str:
    """``precision`` when it is one of :data:`PRECISIONS`; otherwise a ValueError listing them."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; accepted: {', '.join(map(repr, PRECISIONS))} "
                         "(double: float64 throughout; mixed: float32 for the units x situations x alternatives x "
                         "draws pass, float64 sums over draws and units)")
    return precision


def kernel_dtype(precision: str) -> torch.dtype:
    """The dtype of the N x T x A x R pass for ``precision`` (checked)."""
    return PRECISIONS[check_precision(precision)]
