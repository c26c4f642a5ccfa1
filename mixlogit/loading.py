"""Reading results files back: :func:`load` tells MSL and Bayesian files apart by their format field,
rebuilds the fitted model and hands it to the results class, so loaded results own their model as fitted
ones do."""

from __future__ import annotations

import os

from .bayes.results import BayesResults
from .model import MixedLogit
from .persistence import read_json
from .results import MixedLogitResults
from .results_base import FORMAT_VERSION

#: Results class of each format field.
RESULT_CLASSES = {cls.FORMAT: cls for cls in (MixedLogitResults, BayesResults)}


def load(path: str | os.PathLike):
    """Read results written by ``save``: :class:`~mixlogit.results.MixedLogitResults` (MSL) or
    :class:`~mixlogit.bayes.results.BayesResults` (SVI, NUTS), told apart by the file's format field."""
    d = read_json(path)
    fmt = d.get("format")
    if fmt not in RESULT_CLASSES:
        expected = " or ".join(repr(f) for f in RESULT_CLASSES)
        raise ValueError(f"{path} is not a mixlogit results file (format {fmt!r}; expected {expected})")
    version = d.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {version!r}; this mixlogit reads version {FORMAT_VERSION} "
                         "(upgrade mixlogit to read it)")
    try:
        return RESULT_CLASSES[fmt].from_dict(d, MixedLogit)
    except KeyError as e:
        raise ValueError(f"{path} is damaged: the field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is damaged: {e}") from None
