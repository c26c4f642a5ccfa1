"""A MixDPO run folder: its file names, the saved strength (``strength.pt`` + ``strength.json``) and the run records.

``mixdpo train --output RUN`` and :class:`~alignment.trainer.MixDPOTrainer` write, into ``RUN`` and into every
``RUN/checkpoint-N``:

- ``strength.pt``: the strength module's state dict;
- ``strength.json``: the strength settings of the run (family, initial parameters, integrator, nodes,
  ``fix_mean``, DPO's ``beta``, objective, ``format_version``), its groups, and the parameters and moments
  reached (``params``, ``mean``, ``std``, ``cv``). :func:`load_strength` rebuilds the module from the two.

With ``strength_level="annotator"`` (and ``strength_update="refit"``) the trainer also writes ``margin_cache.pt``
(every training pair's latest margin), ``annotators.json`` (the annotator index: labels and the annotator id of
every training row) and ``strength_by_annotator.csv`` (the per-annotator posterior strengths).

``mixdpo train`` adds, into ``RUN``: ``metrics.json`` (the final evaluation), ``mixdpo_run.json`` (models, data
and options of the run, with absolute paths so that the folder works from any working directory),
``log_history.json`` (the trainer's ``state.log_history``: every logged step and the final evaluation) and
``margins.npz`` (the margins of the evaluation pairs after training); ``mixdpo report`` writes into
``RUN/report``. JSON files are written atomically (:func:`mixlogit.persistence.write_json`).

Units. A margin ``h`` is the policy's log-ratio minus the reference's, chosen over rejected: ``h = [log pi(y_w|x)
- log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]``, in nats (:data:`MARGIN_UNIT`); ``margins.npz`` and
``mixdpo evaluate``'s ``margin_mean*`` hold h. TRL's ``rewards/*`` metrics (``rewards/margins``, ...) are beta
times log-ratios (E[beta] h under MixDPO), DPO's logits (:data:`REWARD_UNIT`). :func:`metric_unit` names the
unit of a metric in the command line's tables.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any

import numpy as np
import torch

from mixlogit.persistence import read_json, write_json
from mixlogit.validation import check_bool

from .strength import STRENGTHS, Strength, build_strength, default_strength_init

__all__ = [
    "ADAPTER_FILES",
    "ANNOTATORS_FILE",
    "FORMAT_VERSION",
    "LOG_HISTORY_FILE",
    "MARGINS_FILE",
    "MARGIN_CACHE_NAME",
    "MARGIN_UNIT",
    "METRICS_FILE",
    "REPORT_DIR",
    "REPORT_FILE",
    "REWARD_UNIT",
    "RUN_FILE",
    "RUN_RESULTS",
    "STRENGTH_BY_ANNOTATOR",
    "STRENGTH_CONFIG_NAME",
    "STRENGTH_WEIGHTS_NAME",
    "load_strength",
    "metric_unit",
    "read_margins",
    "read_metrics",
    "read_run_record",
    "read_strength_config",
    "remove_stale_adapter",
    "restore_strength",
    "run_files_present",
    "save_margins",
    "save_strength",
    "strength_from_settings",
    "strength_settings",
    "write_run_records",
]

logger = logging.getLogger(__name__)

STRENGTH_WEIGHTS_NAME = "strength.pt"
STRENGTH_CONFIG_NAME = "strength.json"
#: Version of the ``strength.json`` layout.
FORMAT_VERSION = 1
#: With ``strength_update="refit"``: every training pair's latest margin (in every checkpoint too).
MARGIN_CACHE_NAME = "margin_cache.pt"
#: With ``strength_level="annotator"``: the annotator index of the run, in every checkpoint too.
ANNOTATORS_FILE = "annotators.json"
#: With ``strength_level="annotator"``: the per-annotator posterior strengths, in every checkpoint too.
STRENGTH_BY_ANNOTATOR = "strength_by_annotator.csv"
#: Written by ``mixdpo train``: the margins of the evaluation pairs after training.
MARGINS_FILE = "margins.npz"
#: Written by ``mixdpo train``: how the run was made (model and reference paths, data, options).
RUN_FILE = "mixdpo_run.json"
#: Written by ``mixdpo train``: the trainer's final evaluation metrics.
METRICS_FILE = "metrics.json"
#: Written by ``mixdpo train``: ``trainer.state.log_history`` (a list of the logged dicts), checkpoints or not.
LOG_HISTORY_FILE = "log_history.json"
#: The unit of a margin h (policy log-ratio minus reference log-ratio), and of the losses.
MARGIN_UNIT = "nats"
#: The unit of TRL's ``rewards/*`` metrics: beta (E[beta]) times log-ratios, the logits of DPO's sigmoid.
REWARD_UNIT = "beta*h (logits)"
#: The report folder inside the run folder (``mixdpo report``'s default ``--out``), and its summary.
REPORT_DIR = "report"
REPORT_FILE = "report.md"
#: A PEFT adapter's files: left in a folder, they make a full model saved there load as that adapter.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
#: Files of a ``mixdpo train`` run, named first when a new run would replace them.
RUN_RESULTS = ("metrics.json", "model.safetensors", "adapter_model.safetensors", STRENGTH_WEIGHTS_NAME,
               STRENGTH_CONFIG_NAME, RUN_FILE, MARGINS_FILE, LOG_HISTORY_FILE)


# ---------------------------------------------------------------------------------------------- the strength
def strength_settings(family: str, beta: float, init: dict[str, float] | None = None, integrator: str | None = None,
                      nodes: int | None = None, fix_mean: bool = False, objective: str = "marginal",
                      learnable: bool = False) -> dict[str, Any]:
    """The settings part of ``strength.json``: everything :func:`strength_from_settings` needs.

    ``init`` is completed by the family's defaults (E[beta] = ``beta``), and ``fix_mean`` holds only for a
    family that supports it.
    """
    return {
        "family": family,
        "init": default_strength_init(family, beta, init, fix_mean),
        "integrator": integrator,
        "nodes": nodes,
        "fix_mean": bool(fix_mean) and STRENGTHS[family].supports_fix_mean,
        "beta": float(beta),
        "objective": objective,
        # Only the point mass has a choice (a learned-beta DPO); the key is absent from older strength.json files.
        "learnable": bool(learnable),
        "format_version": FORMAT_VERSION,
    }


def strength_from_settings(info: dict[str, Any]) -> Strength:
    """The strength (initial parameters) of the settings of :func:`strength_settings` or of a ``strength.json``."""
    return build_strength(info["family"], info["init"], info.get("integrator"), info.get("nodes"),
                          info.get("fix_mean", False), info["beta"], info.get("learnable", False))


def save_strength(strength: Strength, output_dir: str, meta: dict[str, Any]) -> None:
    """Write ``strength.pt`` (state dict) and ``strength.json`` (``meta``, then the current parameters and moments)."""
    os.makedirs(output_dir, exist_ok=True)
    torch.save(strength.state_dict(), os.path.join(output_dir, STRENGTH_WEIGHTS_NAME))
    with torch.no_grad():
        info = {
            **meta,
            "params": {k: float(v) for k, v in strength.family_params().items()},
            "mean": float(strength.mean()),
            "std": float(strength.std()),
            "cv": float(strength.cv()),
        }
    # Saving into a folder again replaces the strength's files, as TRL replaces the model's.
    write_json(os.path.join(output_dir, STRENGTH_CONFIG_NAME), info, overwrite=True, indent=2)


def read_strength_config(checkpoint_dir: str) -> dict[str, Any] | None:
    """The ``strength.json`` of a checkpoint or run directory, or None when there is none.

    A damaged file (not JSON, a field missing or of the wrong type, a NaN parameter) is refused with an error
    naming the file and the field.
    """
    path = os.path.join(checkpoint_dir, STRENGTH_CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged: it is not JSON text ({e})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} is damaged: it holds a JSON {type(info).__name__}, not an object")  # noqa: TRY004
    _check_strength_info(info, path)
    return info


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_strength_info(info: dict[str, Any], path: str) -> None:
    """Each field of a ``strength.json`` has the type and range :func:`save_strength` writes."""
    def bad(field: str, what: str):
        raise ValueError(f"{path} is damaged: field {field!r} must be {what}, got {info.get(field)!r}")

    for field in ("family", "init", "beta"):
        if field not in info:
            raise ValueError(f"{path} is damaged: the field {field!r} is missing")
    if not isinstance(info["family"], str) or info["family"] not in STRENGTHS:
        bad("family", f"one of {', '.join(map(repr, STRENGTHS))}")
    if not isinstance(info["init"], dict):
        bad("init", "an object of the family's initial parameters")
    if not (_number(info["beta"]) and math.isfinite(info["beta"]) and info["beta"] > 0):
        bad("beta", "a positive finite number")
    for field in ("integrator", "objective"):
        if info.get(field) is not None and not isinstance(info[field], str):
            bad(field, "a string or null")
    nodes = info.get("nodes")
    if nodes is not None and not (isinstance(nodes, int) and not isinstance(nodes, bool) and nodes > 0):
        bad("nodes", "a positive integer or null")
    if not isinstance(info.get("fix_mean", False), bool):
        bad("fix_mean", "true or false")
    params = info.get("params", {})
    if not isinstance(params, dict):
        bad("params", "an object of the family's parameters")
    numbers = {f"init.{k}": v for k, v in info["init"].items()}
    numbers.update({f"params.{k}": v for k, v in params.items()})
    numbers.update({k: info[k] for k in ("mean", "std", "cv") if k in info})
    for field, value in numbers.items():
        if not (_number(value) and math.isfinite(value)):
            raise ValueError(f"{path} is damaged: field {field!r} must be a finite number, got {value!r}")


def load_strength(run_dir: str):
    """Rebuild the strength module saved in a checkpoint or run directory.

    Returns:
        ``(strength, info)``: the module with its saved parameters, and the ``strength.json`` contents.
    """
    info = read_strength_config(run_dir)
    if info is None:
        raise FileNotFoundError(
            f"{run_dir!r} has no {STRENGTH_CONFIG_NAME}: it was not written by MixDPOTrainer."
        )
    path = os.path.join(run_dir, STRENGTH_CONFIG_NAME)
    try:
        strength = strength_from_settings(info)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is damaged: its settings do not make a strength: {e}") from None
    weights = os.path.join(run_dir, STRENGTH_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{run_dir!r} has {STRENGTH_CONFIG_NAME} but no {STRENGTH_WEIGHTS_NAME}")
    try:
        strength.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - an unpickling or shape error: the file is damaged, whatever the kind
        raise ValueError(f"{weights} is damaged: {type(e).__name__}: {e}") from None
    strength.check_parameters(f" loaded from {weights}")
    return strength, info


def restore_strength(strength: Strength, checkpoint: str, settings: dict[str, Any], map_location=None) -> None:
    """Load a checkpoint's strength state into ``strength``, a run's strength with ``settings``, to resume it.

    A checkpoint of another family or another ``fix_mean`` is refused with the reason; one without
    ``strength.json`` is accepted only for the point mass (which has no state).
    """
    info = read_strength_config(checkpoint)
    family = settings["family"]
    if info is None:
        if any(p.requires_grad for p in strength.parameters()):
            raise ValueError(
                f"Cannot resume from {checkpoint!r}: it has no {STRENGTH_CONFIG_NAME}, so it was not "
                f"written by MixDPOTrainer and holds no strength={family!r} state."
            )
        logger.warning(
            "Checkpoint %s has no %s (not written by MixDPOTrainer); strength=%r needs no state, resuming.",
            checkpoint,
            STRENGTH_CONFIG_NAME,
            family,
        )
        return
    if info.get("family") != family:
        raise ValueError(
            f"Cannot resume from {checkpoint!r}: its strength family is {info.get('family')!r} but "
            f"this run has strength={family!r}. Resume with strength={info.get('family')!r}, or "
            "start a new run."
        )
    if bool(info.get("fix_mean", False)) != settings["fix_mean"]:
        raise ValueError(
            f"Cannot resume from {checkpoint!r}: it was trained with strength_fix_mean="
            f"{info.get('fix_mean')} but this run has strength_fix_mean={settings['fix_mean']}."
        )
    if bool(info.get("learnable", False)) != bool(settings.get("learnable", False)):
        raise ValueError(
            f"Cannot resume from {checkpoint!r}: it was trained with strength_learnable="
            f"{bool(info.get('learnable', False))} but this run has strength_learnable="
            f"{bool(settings.get('learnable', False))}."
        )
    state = torch.load(os.path.join(checkpoint, STRENGTH_WEIGHTS_NAME), map_location=map_location,
                       weights_only=True)
    strength.load_state_dict(state)
    strength.check_parameters(f" of {checkpoint!r}")


# ---------------------------------------------------------------------------------------------- run records
def metric_unit(name: str) -> str:
    """The unit of a metric or a margin summary named ``name`` (``eval_`` prefix or not), for tables: ``"nats"`` for
    margins h, losses and log-probabilities, :data:`REWARD_UNIT` for TRL's ``rewards/*`` (accuracies excepted),
    ``""`` for the rest (accuracies, counts, beta)."""
    base = name.removeprefix("eval_")
    if base.startswith("rewards/"):
        return "" if base.startswith("rewards/accuracies") else REWARD_UNIT
    return MARGIN_UNIT if ("margin" in base or base.startswith("logps/") or base == "loss") else ""


def save_margins(folder: str, margins: dict[str, np.ndarray]) -> None:
    """Write ``margins.npz``: the arrays of ``margins`` (``margin``: h in nats; labels, an object array, as strings:
    the file loads without pickle) and ``margin_unit`` (``"nats"``, a 0-d string)."""
    np.savez(
        os.path.join(folder, MARGINS_FILE),
        **{k: (v.astype(str) if v.dtype == object else v) for k, v in margins.items()},
        margin_unit=np.array(MARGIN_UNIT),
    )


def read_margins(folder: str) -> dict[str, np.ndarray]:
    """The arrays over pairs of a run's ``margins.npz`` (``row``, ``margin`` in nats, ...; ``group`` as an object
    array); its ``margin_unit`` is checked and left out."""
    path = os.path.join(folder, MARGINS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} has no {MARGINS_FILE}; pass the dataset to compute margins on.")
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    unit = str(out.pop("margin_unit", MARGIN_UNIT))  # files written before the unit was recorded hold nats too
    if unit != MARGIN_UNIT:
        raise ValueError(f"{path} holds margins in {unit!r}; this version reads margins in {MARGIN_UNIT}")
    if "group" in out:
        out["group"] = out["group"].astype(object)
    return out


def write_run_records(folder: str, run: dict[str, Any], metrics: dict[str, float], overwrite: bool = False,
                      log_history: list[dict[str, Any]] | None = None) -> None:
    """Write ``mixdpo_run.json`` (how the run was made), ``metrics.json`` (its final evaluation) and, given a
    ``log_history`` (the trainer's ``state.log_history``), ``log_history.json``; each atomically."""
    check_bool("overwrite", overwrite)
    write_json(os.path.join(folder, RUN_FILE), run, overwrite=overwrite, indent=2)
    write_json(os.path.join(folder, METRICS_FILE), metrics, overwrite=overwrite, indent=2)
    if log_history is not None:
        write_json(os.path.join(folder, LOG_HISTORY_FILE), list(log_history), overwrite=overwrite, indent=2)


def read_run_record(folder: str, required: bool = False) -> dict[str, Any]:
    """The ``mixdpo_run.json`` of a run folder; ``{}`` when there is none, unless ``required``."""
    path = os.path.join(folder, RUN_FILE)
    if not check_bool("required", required) and not os.path.isfile(path):
        return {}
    return read_json(path)


def read_metrics(folder: str) -> dict[str, Any] | None:
    """The ``metrics.json`` of a run folder, or None when there is none."""
    path = os.path.join(folder, METRICS_FILE)
    return read_json(path) if os.path.isfile(path) else None


# ---------------------------------------------------------------------------------------------- the folder
def _run_file_first(name: str) -> tuple[int, str]:
    return (RUN_RESULTS.index(name) if name in RUN_RESULTS else len(RUN_RESULTS), name)


def _checkpoint_step(name: str) -> int:
    step = name.rsplit("-", 1)[-1]
    return int(step) if step.isdigit() else -1


def run_files_present(folder: str, keep_checkpoints: bool = False) -> tuple[list[str], str | None]:
    """What a new run in ``folder`` would replace, and the folder's latest ``checkpoint-N``.

    Returns ``(names, latest)``: the entries of ``folder``, the run's own files first (in the order of
    :data:`RUN_RESULTS`), without the checkpoints when ``keep_checkpoints`` (a resumed run continues them);
    ``latest`` is None without checkpoints.
    """
    check_bool("keep_checkpoints", keep_checkpoints)
    entries = sorted(os.listdir(folder))
    checkpoints = [n for n in entries if n.startswith("checkpoint-") and os.path.isdir(os.path.join(folder, n))]
    present = sorted((n for n in entries if not (keep_checkpoints and n in checkpoints)), key=_run_file_first)
    return present, max(checkpoints, key=_checkpoint_step, default=None)


def remove_stale_adapter(folder: str) -> None:
    """An adapter left by an earlier LoRA run in ``folder`` would make a new full model load as that adapter."""
    for name in ADAPTER_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.remove(path)
            print(f"removed {path} of the earlier LoRA run (--overwrite)", file=sys.stderr)
