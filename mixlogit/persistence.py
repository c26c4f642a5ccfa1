"""Results files: JSON written atomically, never replacing an existing file unless asked to."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | os.PathLike, payload: dict, overwrite: bool = False, indent: int | None = None) -> Path:
    """Write ``payload`` to ``path`` through a temporary file, so an interrupted write leaves no half file.

    Refuses to replace an existing file unless ``overwrite=True``; creates missing parent folders.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=indent))
    tmp.replace(path)
    return path


def read_json(path: str | os.PathLike) -> dict:
    """Read a results file; a missing file or one that is not a JSON object gets an error naming the path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a mixlogit results file (not JSON: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a mixlogit results file (a JSON {type(d).__name__}, not an object)")  # noqa: TRY004 (bad file content)
    return d
