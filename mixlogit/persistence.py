"""Results files and folders, written atomically and never replacing what mixlogit did not write unless asked.

- :func:`write_json` writes one file through a temporary file in the same folder and a rename: an interrupted
  write (even SIGKILL) leaves the old file or the new one.
- :func:`replace_folder` writes a set of files (results.json, params.csv, summary.txt; a report and its plots) as
  a unit: into a fresh hidden sibling folder, which then takes the place of the folder. Files in the folder that
  the set does not replace (the user's own files, or a fit's files under its report) are carried over unchanged
  (hard links, or copies where the file system has none); the files the set replaces, such as an old model's
  report and plots, are gone from the new folder. A folder holding a subfolder or special file mixlogit did not
  write, or the current folder, is refused rather than copied or swapped away. The swap is one atomic exchange of the two folders
  (``renameat2`` with ``RENAME_EXCHANGE`` on Linux), so a kill at any moment leaves the old complete set or the
  new one. Where the system has no atomic exchange the folder is renamed aside and the new one renamed in; a
  kill between those two renames leaves the old set in the hidden sibling ``.NAME.old-*``. A killed write
  leaves its hidden sibling behind; the next write into the folder clears it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .validation import check_bool


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _user_mode(existing: Path | None, base: int = 0o666) -> int:
    """The mode open() would give: an existing file keeps its own, a new one gets ``base & ~umask``."""
    if existing is not None and existing.exists():
        return stat.S_IMODE(existing.stat().st_mode)
    return base & ~_umask()


def _target(path: Path) -> Path:
    """The file a write to ``path`` replaces: a symlink is followed to its target; anything that exists and is
    not a regular file (folder, device node, FIFO, socket) is refused, naming ``path``."""
    real = path.resolve() if path.is_symlink() else path
    if real.exists() or real.is_symlink():
        if real.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give a file name such as {path / 'results.json'}")
        if not real.is_file():
            raise FileExistsError(f"{path} exists and is not a regular file (a device, FIFO or socket); "
                                  "mixlogit writes only regular files: choose another path")
    elif path.is_symlink():
        raise FileNotFoundError(f"{path} is a symlink to {os.readlink(path)}, which does not exist")
    return real


def _os_error(e: OSError, path: Path, what: str) -> OSError:
    """``e`` reworded to name the user's ``path`` (never the hidden temporary file)."""
    return type(e)(e.errno, f"cannot {what} {path}: {e.strerror or e}")


def write_json(path: str | os.PathLike, payload: dict, overwrite: bool = False, indent: int | None = None) -> Path:
    """Write ``payload`` to ``path`` through a temporary file, so an interrupted write leaves no half file.

    Refuses to replace an existing file unless ``overwrite=True``, and refuses always a target that is not a
    regular file (a folder, device node or FIFO). A symlink is written through: the file it points to is
    replaced and the link stays. The file gets the user's normal permissions, as ``open()`` would give it (an
    existing file keeps its mode). Creates missing parent folders. Errors name ``path``.
    """
    check_bool("overwrite", overwrite)
    path = Path(path)
    real = _target(path)
    if real.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    text = json.dumps(payload, indent=indent)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        mode = _user_mode(real)
        # A fresh temporary name in the same folder (so the final rename is atomic and no user file is touched).
        fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp")
    except OSError as e:
        raise _os_error(e, path, "write") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _os_error(e, path, "write") from None
        raise
    return path


def existing(folder: str | os.PathLike, names) -> list[Path]:
    """The paths ``folder/name`` among ``names`` that exist, in the order given."""
    folder = Path(folder)
    return [folder / n for n in names if (folder / n).exists()]


def refuse_to_overwrite(folder: str | os.PathLike, names, overwrite: bool) -> None:
    """Raise FileExistsError naming every one of ``folder/names`` that exists, unless ``overwrite`` is True."""
    present = [] if check_bool("overwrite", overwrite) else existing(folder, names)
    if present:
        raise FileExistsError(f"{folder} already holds {', '.join(p.name for p in present)}; pass overwrite=True "
                              "(--overwrite on the command line) to replace them, or choose another folder")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system or file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _foreign(entry: os.DirEntry) -> bool:
    """Whether a folder entry that a new set does not replace cannot be carried over: only regular files and
    symlinks are (a folder would have to be copied whole; a FIFO or device cannot be copied)."""
    return not (entry.is_symlink() or entry.is_file(follow_symlinks=False))


def check_folder(folder: str | os.PathLike, replaces: Iterable[str], overwrite: bool) -> None:
    """Refuse, before any work, what :func:`replace_folder` would refuse: ``folder`` is a file, holds a file of
    ``replaces`` without ``overwrite=True``, holds a folder or special file it would have to carry over, or is
    (or holds) the current folder, which the swap would leave deleted under the running process."""
    check_bool("overwrite", overwrite)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder")
    _remove_leftovers(folder.resolve())
    replaces = list(dict.fromkeys(replaces))
    refuse_to_overwrite(folder, replaces, overwrite)
    if not folder.is_dir():
        return
    real = folder.resolve()
    if Path.cwd() == real or real in Path.cwd().parents:
        raise FileExistsError(f"{folder} is the current folder (or holds it); a results folder is replaced as a unit, "
                              "so give a folder below it, such as results")
    odd = sorted(e.name for e in os.scandir(real) if e.name not in replaces and _foreign(e))
    if odd:
        raise FileExistsError(f"{folder} holds {', '.join(odd)}, which mixlogit did not write and does not carry "
                              "over (only plain files are kept when the folder is rewritten as a unit): move "
                              f"{'it' if len(odd) == 1 else 'them'} or choose another folder")


def _remove_leftovers(real: Path) -> None:
    """Clear the hidden siblings that writes killed before they finished left behind (their process no longer
    runs; those of a running process are left alone): ``.NAME.tmp-PID-*`` is removed, and ``.NAME.old-PID-*``
    (the old set, renamed aside where the system has no atomic exchange) is moved back if NAME is missing."""
    if not real.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for p in real.parent.glob(f".{glob.escape(real.name)}.{kind}-*-*"):
            pid = p.name[len(real.name) + len(kind) + 3:].split("-", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                if kind == "old" and not real.exists():
                    os.replace(p, real)
                else:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass  # a process of another user: still running


@contextlib.contextmanager
def replace_folder(folder: str | os.PathLike, replaces: Iterable[str], overwrite: bool) -> Iterator[Path]:
    """Write a set of files into ``folder`` as a unit (see the module's notes): yields a fresh empty folder to
    write them into; when the block ends without an error, that folder takes the place of ``folder`` (a symlink
    to a folder is followed: the folder it points to is replaced).

    ``replaces`` names the files of the set and any others mixlogit writes that the new set makes stale (a
    previous model's report and plots). If ``folder`` holds one of them, it is refused unless ``overwrite=True``;
    with it they are gone from the new folder. Other plain files and symlinks there are carried over unchanged;
    a folder, a special file or the current folder is refused (:func:`check_folder`). On an error ``folder`` is
    left as it was. Errors name ``folder``.
    """
    check_folder(folder, replaces, overwrite)
    folder = Path(folder)
    replaces = set(replaces)
    real = folder.resolve()
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=real.parent, prefix=f".{real.name}.tmp-{os.getpid()}-"))
    except OSError as e:
        raise _os_error(e, folder, "write into") from None
    try:
        os.chmod(tmp, _user_mode(real if real.is_dir() else None, 0o777))
        yield tmp
        if real.is_dir():
            for entry in os.scandir(real):
                if entry.name in replaces:
                    continue
                if _foreign(entry):
                    raise FileExistsError(f"{folder} now holds {entry.name}, which mixlogit does not carry over; "
                                          "the folder is left as it was")
                if entry.is_symlink():
                    os.symlink(os.readlink(entry.path), tmp / entry.name)
                else:
                    _link_or_copy(entry.path, str(tmp / entry.name))
            if _exchange(tmp, real):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                old = Path(tempfile.mkdtemp(dir=real.parent, prefix=f".{real.name}.old-{os.getpid()}-"))
                os.replace(real, old)
                os.replace(tmp, real)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, real)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, FileExistsError):
            raise _os_error(e, folder, "write into") from None
        raise


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
