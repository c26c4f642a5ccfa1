"""Checkpoints that survive a kill: staged, sealed with a record, renamed into the run folder.

A checkpoint is written into a staging folder ``RUN/.staging-checkpoint-N/checkpoint-N`` (everything: the
model, optimizer, scheduler, RNG states, trainer state, and MixDPO's ``strength.pt`` and ``strength.json``).
When it is complete, :func:`seal` adds its record, ``mixdpo_checkpoint.json`` (the run's id, the step, and
the size of every file), and renames the folder to ``RUN/checkpoint-N``. A process killed at any moment leaves
either no ``checkpoint-N`` or a complete one; a staging folder it leaves behind is never offered for resuming
and is removed by the next save (or by ``--overwrite``). The record also tells whose a checkpoint is: a run
resumed from it keeps its id, so ``mixdpo train --resume RUN/checkpoint-N --output RUN`` can tell the files
the run wrote itself from another run's (:func:`foreign_entries`).

This protects against the process dying (SIGKILL, out of memory): files are not fsync'ed, so a power cut in
the seconds after a save is not covered.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from typing import Any

from mixlogit.persistence import read_json, write_json

from .run_dir import RUN_FILE, read_run_record

__all__ = [
    "CHECKPOINT_RECORD",
    "STAGING_PREFIX",
    "check_resumable",
    "checkpoint_problem",
    "checkpoint_run_id",
    "complete_checkpoints",
    "foreign_entries",
    "last_complete",
    "new_run_id",
    "remove_staging",
    "restore_model_weights",
    "save_atomically",
    "seal",
    "staging_dir",
]

#: The record that seals a complete checkpoint (written last, inside the staged folder).
CHECKPOINT_RECORD = "mixdpo_checkpoint.json"
#: Staging folders in a run folder start with this (a leading dot: Trainer's ``checkpoint-*`` globs skip them).
STAGING_PREFIX = ".staging-"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
#: The file transformers' Trainer writes last into a checkpoint: a checkpoint without a record (written by an
#: older version or plain TRL) counts as complete when it has this file and it parses.
_TRAINER_STATE = "trainer_state.json"


def new_run_id() -> str:
    """A fresh run id (a resumed run keeps the id of its checkpoint)."""
    return uuid.uuid4().hex


def staging_dir(run_dir: str, step: int) -> str:
    """The staging folder of the checkpoint of ``step`` (the same name in every process of a distributed run)."""
    return os.path.join(run_dir, f"{STAGING_PREFIX}checkpoint-{step}")


def remove_staging(run_dir: str) -> list[str]:
    """Remove the staging folders that killed saves left in ``run_dir``; returns their names."""
    if not os.path.isdir(run_dir):
        return []
    names = sorted(n for n in os.listdir(run_dir) if n.startswith(STAGING_PREFIX))
    for name in names:
        shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    return names


def _file_sizes(folder: str) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
    return sizes


def seal(staged: str, run_dir: str, run_id: str, step: int) -> str:
    """Record the complete checkpoint ``staged`` and rename it to ``run_dir/checkpoint-<step>``; returns that path.

    A checkpoint of the same step already there (a run resumed from an earlier step saves it again) is moved
    aside first and removed after the rename.
    """
    record = {"run_id": run_id, "step": int(step), "files": _file_sizes(staged)}
    write_json(os.path.join(staged, CHECKPOINT_RECORD), record, indent=2)
    final = os.path.join(run_dir, f"checkpoint-{step}")
    old = None
    if os.path.lexists(final):
        old = os.path.join(run_dir, f"{STAGING_PREFIX}replaced-checkpoint-{step}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    parent = os.path.dirname(staged)
    if os.path.basename(parent).startswith(STAGING_PREFIX):
        shutil.rmtree(parent, ignore_errors=True)
    return final


def save_atomically(trainer, run_dir: str, save) -> str:
    """Save ``trainer``'s checkpoint of its current step atomically; returns its path in ``run_dir``.

    ``save(staging)`` writes the checkpoint as transformers' ``Trainer._save_checkpoint`` does, with
    ``staging`` in place of ``run_dir``; then the main process seals it (:func:`seal`), fixes the trainer
    state's ``best_model_checkpoint`` if it named the staging folder, and applies ``save_total_limit`` in
    ``run_dir`` (the rotation inside ``save`` saw only the staging folder).
    """
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    step, acc, args = trainer.state.global_step, trainer.accelerator, trainer.args
    staging = staging_dir(run_dir, step)
    if args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    acc.wait_for_everyone()
    save(staging)
    acc.wait_for_everyone()
    final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
    if args.should_save:
        staged = os.path.join(staging, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        best = trainer.state.best_model_checkpoint
        if best and best.startswith(staging):
            trainer.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            trainer.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        seal(staged, run_dir, trainer.run_id, step)
        rotate_checkpoints(run_dir, args.save_total_limit, trainer.state.best_model_checkpoint, use_mtime=True)
    acc.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------- reading
def _record(checkpoint: str) -> dict[str, Any] | None:
    path = os.path.join(checkpoint, CHECKPOINT_RECORD)
    if not os.path.isfile(path):
        return None
    try:
        return read_json(path)
    except (OSError, ValueError):
        return {}


def checkpoint_problem(checkpoint: str) -> str | None:
    """Why ``checkpoint`` is not a complete checkpoint (a phrase), or None when it is one."""
    if not os.path.isdir(checkpoint):
        return "is not a directory"
    record = _record(checkpoint)
    if record is None:
        state = os.path.join(checkpoint, _TRAINER_STATE)
        try:
            read_json(state)
        except (OSError, ValueError):
            return f"is incomplete (it has neither {CHECKPOINT_RECORD} nor a readable {_TRAINER_STATE})"
        return None
    if not isinstance(record.get("files"), dict):
        return f"is incomplete (its {CHECKPOINT_RECORD} cannot be read)"
    for name, size in record["files"].items():
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            return f"is incomplete ({name} is missing)"
        if os.path.getsize(path) != size:
            return f"is incomplete ({name} has {os.path.getsize(path)} bytes, {size} when it was saved)"
    return None


def check_resumable(checkpoint: str, other_checks=None) -> None:
    """Raise a ValueError when ``checkpoint`` is incomplete, naming the last complete one beside it.

    ``other_checks()`` (the strength's) runs first for a checkpoint without a record, so a folder that is no
    MixDPO checkpoint at all gets their more telling error.
    """
    problem = checkpoint_problem(checkpoint)
    if other_checks is not None and (problem is None or _record(checkpoint) is None):
        other_checks()
    if problem:
        last = last_complete(os.path.dirname(os.path.abspath(checkpoint)))
        hint = f"; the last complete checkpoint there is {last}" if last else ""
        raise ValueError(f"Cannot resume from {checkpoint}: it {problem}{hint}")


def checkpoint_run_id(checkpoint: str) -> str | None:
    """The id of the run that wrote ``checkpoint`` (None for a checkpoint without a record)."""
    record = _record(checkpoint)
    return record.get("run_id") if record else None


def complete_checkpoints(run_dir: str) -> list[str]:
    """The complete ``checkpoint-N`` folders of ``run_dir``, by step."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(run_dir) if (m := _CHECKPOINT.match(n))]
    return [os.path.join(run_dir, n) for _, n in sorted(found) if checkpoint_problem(os.path.join(run_dir, n)) is None]


def last_complete(run_dir: str) -> str | None:
    """The complete checkpoint of ``run_dir`` with the highest step, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def foreign_entries(folder: str, run_id: str | None, resumed: str) -> list[str]:
    """The entries of ``folder`` that a run resumed from checkpoint ``resumed`` (run ``run_id``) did not write.

    The run's own entries are the checkpoints with its id (and ``resumed`` itself), staging folders, and, when
    some of its checkpoints are in ``folder`` (the run trained there), every other file, except a run record
    (``mixdpo_run.json``) of another run. In a folder where the run never trained, everything else is foreign.
    """
    if not os.path.isdir(folder):
        return []
    resumed = os.path.realpath(resumed)
    own, foreign, other = False, [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(STAGING_PREFIX):
            continue
        if _CHECKPOINT.match(name) and os.path.isdir(path):
            if os.path.realpath(path) == resumed or (run_id is not None and checkpoint_run_id(path) == run_id):
                own = True
            else:
                foreign.append(name)
        elif name == RUN_FILE:
            if run_id is None or read_run_record(folder).get("run_id") != run_id:
                foreign.append(name)
        else:
            other.append(name)
    return foreign if own else foreign + other


# ---------------------------------------------------------------------------------------------- the weights
def restore_model_weights(model, checkpoint: str) -> bool:
    """Load the weights of ``checkpoint`` into ``model`` as ``from_pretrained`` reads them; True if it did.

    Transformers' ``Trainer`` resumes by loading ``model.safetensors`` with ``load_state_dict(strict=False)``,
    which skips the names a model class renames when it saves (GPT-NeoX saves ``lm_head`` as ``embed_out``):
    those weights silently keep their initial values. When the file's names differ from the model's, the
    checkpoint is loaded with the model class's own ``from_pretrained`` and its state copied in, strictly.
    """
    from safetensors import safe_open

    path = os.path.join(checkpoint, "model.safetensors")
    if not os.path.isfile(path) or not hasattr(type(model), "from_pretrained"):
        return False
    with safe_open(path, framework="pt") as f:
        saved = set(f.keys())
    if saved == set(model.state_dict()):
        return False
    dtype = next(model.parameters()).dtype
    loaded = type(model).from_pretrained(checkpoint, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    return True
