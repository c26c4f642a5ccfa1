"""The information matrix in scale-free units: scaled to unit diagonal, so that judging it singular, inverting it
and finding its null directions do not depend on the units the attributes are measured in."""

from __future__ import annotations

import numpy as np

#: Largest condition number of the information matrix scaled to unit diagonal that counts as invertible.
MAX_SCALED_CONDITION = 1e13


def scaled_information(neg_hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(D^-1/2 (-H) D^-1/2, D^-1/2)`` with ``D`` the diagonal of ``-H``: the information matrix in units where
    every parameter has unit curvature, so its conditioning does not depend on the units of the attributes.
    None when a diagonal entry is not positive and finite (a direction with no curvature)."""
    h = 0.5 * (neg_hessian + neg_hessian.T)
    d = np.diag(h)
    if not np.all(np.isfinite(h)) or np.any(~(d > 0)):
        return None
    s = 1.0 / np.sqrt(d)
    return h * np.outer(s, s), s


def invert_information(neg_hessian: np.ndarray) -> tuple[np.ndarray, bool]:
    """Inverse of the information matrix; a pseudo-inverse and ``singular=True`` when it is not invertible.

    Singularity is judged on the matrix scaled to unit diagonal, which is inverted there and scaled back: an
    attribute measured in other units scales its row and column only, and leaves every other standard error
    as it was.
    """
    scaled = scaled_information(neg_hessian)
    if scaled is not None:
        c, s = scaled
        try:
            cond = np.linalg.cond(c)
            if np.isfinite(cond) and cond <= MAX_SCALED_CONDITION:
                np.linalg.cholesky(c)
                return np.linalg.inv(c) * np.outer(s, s), False
        except np.linalg.LinAlgError:
            pass
        return np.linalg.pinv(c) * np.outer(s, s), True
    finite = np.where(np.isfinite(neg_hessian), neg_hessian, 0.0)
    return np.linalg.pinv(finite), True
