"""Results files: JSON written atomically, never replacing an existing file unless asked to."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def write_json(path: str | os.PathLike, payload: dict, overwrite: bool = False, indent: int | None = None) -> Path:
    """Write ``payload`` to ``path`` through a temporary file, so an interrupted write leaves no half file.

    Refuses to replace an existing file unless ``overwrite=True``; creates missing parent folders.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name such as {path / 'results.json'}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh temporary name in the same folder (so the final rename is atomic and no user file is touched).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(payload, indent=indent))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def existing(folder: str | os.PathLike, names) -> list[Path]:
    """The paths ``folder/name`` among ``names`` that exist, in the order given."""
    folder = Path(folder)
    return [folder / n for n in names if (folder / n).exists()]


def refuse_to_overwrite(folder: str | os.PathLike, names, overwrite: bool) -> None:
    """Raise FileExistsError naming every one of ``folder/names`` that exists, unless ``overwrite`` is True."""
    present = [] if overwrite else existing(folder, names)
    if present:
        raise FileExistsError(f"{folder} already holds {', '.join(p.name for p in present)}; pass overwrite=True "
                              "(--overwrite on the command line) to replace them, or choose another folder")


def read_json(path: str | os.PathLike) -> dict:
    """Read a results file; a missing file or one that is not a JSON object gets an error naming the path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the results file in it (e.g. {path / 'results.json'})")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a mixlogit results file (not JSON text: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a mixlogit results file (a JSON {type(d).__name__}, not an object)")  # noqa: TRY004 (bad file content)
    return d


def jsonable(v):
    """A numpy scalar as the Python number or bool JSON writes; anything else unchanged."""
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    return v
