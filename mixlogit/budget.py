"""Memory budgets: the one place that says how large a temporary tensor or a returned array may grow.

Every chunked computation (the simulated likelihood, pointwise log-likelihoods, draws from a guide) sizes its
chunks with :func:`chunk_size` from :data:`CHUNK_ELEMENTS`, so 10,000 draws on thousands of persons stay within
a couple of GiB whatever the estimator.
"""

from __future__ import annotations

#: Largest number of elements of one temporary float64 tensor in a chunked computation (32 MiB).
CHUNK_ELEMENTS = 2**22
#: The simulated likelihood's hot loop (value, gradient, Hessian) runs fastest on chunks that stay in cache
#: (about 4 MiB): it takes an eighth of the budget.
MSL_CHUNK_ELEMENTS = CHUNK_ELEMENTS // 8
#: Largest number of elements of individual-level draws (draws x units x coefficients) returned or exported
#: without being asked for explicitly.
MAX_INDIVIDUAL_ELEMENTS = 20_000_000
#: Largest integration rule (points of every unit, float64) that is built: larger ``draws=`` are refused
#: before any memory is taken (4 GiB).
MAX_RULE_BYTES = 2**32


def chunk_size(per_item: int, total: int | None = None, budget: int = CHUNK_ELEMENTS) -> int:
    """How many items (units, draws) of ``per_item`` elements each fit in ``budget``: at least 1, at most
    ``total`` when given."""
    n = max(1, budget // max(1, int(per_item)))
    return n if total is None else max(1, min(int(total), n))
