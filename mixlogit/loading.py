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


def check_version(path, d: dict) -> None:
    """The file's version field must be a version this mixlogit reads (1 to FORMAT_VERSION); the advice says
    whether the file is newer (upgrade), older than any version, or malformed."""
    reads = f"this mixlogit reads version {FORMAT_VERSION}" if FORMAT_VERSION == 1 else (
        f"this mixlogit reads versions 1 to {FORMAT_VERSION}")
    if "version" not in d:
        raise ValueError(f"{path} has no version field; {reads} (the file is damaged or was not written by mixlogit)")
    version = d["version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(  # noqa: TRY004 (bad file content, not a bad argument)
            f"{path} has a malformed version field {version!r} (a {type(version).__name__}, not an "
            f"integer); {reads} (the file is damaged or was not written by mixlogit)")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {version}; {reads}: the file was written by a newer "
                         "mixlogit; upgrade mixlogit to read it")
    if version < 1:
        raise ValueError(f"{path} has format version {version}, older than any mixlogit wrote ({reads}, and no "
                         "earlier version exists); the file is damaged or was not written by mixlogit")


def load(path: str | os.PathLike):
    """Read results written by ``save``: :class:`~mixlogit.results.MixedLogitResults` (MSL) or
    :class:`~mixlogit.bayes.results.BayesResults` (SVI, NUTS), told apart by the file's format field."""
    d = read_json(path)
    fmt = d.get("format")
    if fmt not in RESULT_CLASSES:
        expected = " or ".join(repr(f) for f in RESULT_CLASSES)
        raise ValueError(f"{path} is not a mixlogit results file (format {fmt!r}; expected {expected})")
    check_version(path, d)
    try:
        return RESULT_CLASSES[fmt].from_dict(d, MixedLogit)
    except KeyError as e:
        raise ValueError(f"{path} is damaged: the field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is damaged: {e}") from None
