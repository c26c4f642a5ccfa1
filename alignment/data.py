"""Preference datasets: loading, validation of TRL's formats, and tokenization of pairs.

Accepted formats (TRL's preference formats):

- standard, explicit prompt: ``prompt``, ``chosen``, ``rejected`` are strings;
- conversational, explicit prompt: ``prompt``, ``chosen``, ``rejected`` are lists of ``{"role", "content"}``
  messages;
- implicit prompt (standard or conversational): only ``chosen`` and ``rejected``, which share the prompt as a common
  prefix. TRL splits such pairs (``trl.data_utils.maybe_extract_prompt``): its ``DPOTrainer`` does so for the
  trainer's datasets, and the TRL-side entry points (``mixdpo evaluate``, ``mixdpo report --data``, the experiment
  harness) do so before evaluating. This module needs no TRL, so :func:`tokenize_pair` and the evaluation take
  explicit prompts only (``validate_preference_dataset(..., require_prompt=True)`` says how to convert).

Every check raises a ``ValueError`` that names the offending dataset, column or row and lists what is accepted.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from mixlogit.validation import check_bool, check_choice

__all__ = [
    "ACCEPTED_FORMATS",
    "TRUNCATION_MODES",
    "detect_format",
    "drop_empty_completions",
    "load_preference_data",
    "tokenize_pair",
    "validate_preference_dataset",
]

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = (
    "standard (prompt, chosen, rejected: strings), "
    "conversational (prompt, chosen, rejected: lists of {'role', 'content'} messages), "
    "or implicit prompt (chosen, rejected only, sharing the prompt as a common prefix)"
)
_REQUIRED = ("chosen", "rejected")
_SPLIT_FIRST = (
    "implicit-prompt pairs (chosen and rejected only) must be split into prompt and completions first, e.g. "
    "dataset.map(trl.data_utils.maybe_extract_prompt)"
)
#: How a pair longer than ``max_length`` is cut (TRL's ``truncation_mode``): keep its first or its last tokens.
TRUNCATION_MODES = ("keep_start", "keep_end")
_CSV = ("{!r} is a CSV file, which is not read as preference pairs: pass JSONL (one JSON object per line with prompt, "
        "chosen and rejected), a .json list of such objects, or a `datasets` save_to_disk directory; e.g. convert it "
        "with datasets.load_dataset('csv', data_files=PATH)['train'].to_json('pairs.jsonl')")


def load_preference_data(path: str | os.PathLike, split: str = "train"):
    """Load preference pairs from a JSONL file or a ``datasets.save_to_disk`` directory.

    Args:
        path: a ``.jsonl`` file (one JSON object per line), a ``.json`` file holding a list of objects, or a
            directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
        split: the split to take when the directory holds a ``DatasetDict``.

    Returns:
        ``datasets.Dataset``, validated with :func:`validate_preference_dataset`.
    """
    import datasets

    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise ValueError(
                f"{path!r} is a directory but not one written by `datasets` `save_to_disk`: {e}. Pass a JSONL file "
                "or a `save_to_disk` directory."
            ) from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path!r} holds the splits {sorted(ds)}, not {split!r}: pick one with `split`.")
            ds = ds[split]
    elif os.path.isfile(path):
        if path.lower().endswith((".csv", ".tsv")):
            raise ValueError(_CSV.format(path))
        rows: list[dict[str, Any]] = []
        lines: list[int] = []  # JSONL line number of each row, for error messages
        with io.StringIO(_read_text(path)) as f:
            if path.endswith(".json"):
                try:
                    rows = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path!r} is not valid JSON: {e}") from e
                if not isinstance(rows, list):
                    raise ValueError(f"{path!r} must hold a JSON list of objects, got {type(rows).__name__}.")
            else:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        if lineno == 1 and not line.lstrip().startswith(("{", "[")) and ("," in line or "\t" in line):
                            raise ValueError(_CSV.format(path)) from None  # a header line: a CSV named otherwise
                        raise ValueError(f"{path!r} line {lineno} is not valid JSON: {e}") from e
                    lines.append(lineno)
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(  # noqa: TRY004 - malformed file content, not a wrong argument type
                    f"{path!r} record {i} must be a JSON object, got {type(row).__name__}."
                )
        if not rows:
            raise ValueError(f"{path!r} holds no preference pairs.")
        ds = _table_from_rows(rows, path, lines)
    else:
        raise ValueError(
            f"No such preference data file or directory: {path!r} (expected a .jsonl file or a "
            "`save_to_disk` directory)."
        )
    validate_preference_dataset(ds, name=path)
    return ds


def _read_text(path: str) -> str:
    """The file's text (UTF-8, with or without a byte-order mark); the error names the file and the first line
    that is not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line, byte = data.count(b"\n", 0, e.start) + 1, data[e.start:e.start + 1]
        raise ValueError(f"{path!r} line {line} is not UTF-8 text (byte {byte!r} at offset {e.start}): "
                         "convert the file to UTF-8.") from None


def _json_kind(value: Any) -> str | None:
    """The JSON type of a value, as named in error messages (None for null, which fits any column)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _json_kinds(value: Any, field: str):
    """``(field, kind)`` of a value and of everything nested in it (list items as ``field[]``)."""
    yield field, _json_kind(value)
    if isinstance(value, list):
        for item in value:
            yield from _json_kinds(item, field + "[]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _json_kinds(item, f"{field}.{key}")


def _first_type_conflict(rows: list[dict[str, Any]]):
    """The first field whose JSON type differs from an earlier value's.

    Returns ``(column, field, row, kind, first_row, first_kind)``, or None when every field keeps one type.
    """
    seen: dict[str, tuple[int, str]] = {}
    for i, row in enumerate(rows):
        for column, value in row.items():
            for field, kind in _json_kinds(value, column):
                if kind is None:
                    continue
                first = seen.setdefault(field, (i, kind))
                if first[1] != kind:
                    return column, field, i, kind, first[0], first[1]
    return None


def _table_from_rows(rows: list[dict[str, Any]], path: str, lines: list[int]):
    """``datasets.Dataset.from_list(rows)``, with Arrow's type errors turned into one naming the column and row."""
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_list(rows)
    except (pa.ArrowException, TypeError, ValueError) as e:
        conflict = _first_type_conflict(rows)
        if conflict is None:
            raise ValueError(f"{path!r} could not be read as a table of preference pairs: {e}") from e
        column, field, row, kind, first_row, first_kind = conflict

        def where(i: int) -> str:
            return f"row {i} (line {lines[i]})" if lines else f"row {i}"

        at = "" if field == column else f" at {field}"
        raise ValueError(
            f"{path!r} column {column!r} holds {kind}{at} in {where(row)} but {first_kind} in {where(first_row)}: "
            "a column must have one type in every row (prompt, chosen and rejected: all strings, or all lists "
            "of {'role', 'content'} messages)."
        ) from None


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def detect_format(example: dict[str, Any]) -> str:
    """Name the TRL format of one example.

    Returns:
        ``"standard"``, ``"conversational"``, ``"implicit_standard"`` or ``"implicit_conversational"``.

    Raises:
        ValueError: a required field is missing or has the wrong type; the message lists the accepted formats.
    """
    missing = [k for k in _REQUIRED if k not in example]
    if missing:
        raise ValueError(
            f"missing field(s) {missing} (present: {sorted(example)}); accepted formats: {ACCEPTED_FORMATS}."
        )
    chosen, rejected = example["chosen"], example["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        kind = "standard"
    elif _is_messages(chosen) and _is_messages(rejected):
        kind = "conversational"
    else:
        raise ValueError(
            f"fields 'chosen' and 'rejected' must both be strings or both be lists of {{'role', 'content'}} "
            f"messages, got {type(chosen).__name__} and {type(rejected).__name__}; accepted formats: "
            f"{ACCEPTED_FORMATS}."
        )
    if "prompt" not in example:
        return "implicit_" + kind
    prompt = example["prompt"]
    if kind == "standard" and not isinstance(prompt, str):
        raise ValueError(
            f"field 'prompt' must be a string when 'chosen' and 'rejected' are strings, got "
            f"{type(prompt).__name__}; accepted formats: {ACCEPTED_FORMATS}."
        )
    if kind == "conversational" and not _is_messages(prompt):
        raise ValueError(
            f"field 'prompt' must be a list of {{'role', 'content'}} messages when 'chosen' and 'rejected' are, "
            f"got {type(prompt).__name__}; accepted formats: {ACCEPTED_FORMATS}."
        )
    return kind


def validate_preference_dataset(
    dataset,
    group_column: str | None = None,
    name: str = "dataset",
    max_rows: int = 1000,
    require_prompt: bool = False,
) -> str:
    """Check that a dataset holds preference pairs in one of TRL's formats.

    Args:
        dataset: ``datasets.Dataset``, ``datasets.IterableDataset`` or a list of dicts.
        group_column: a subgroup or annotator column that must exist, or None.
        name: how the dataset is named in error messages (e.g. ``"train_dataset"`` or a file path).
        max_rows: rows whose types are checked one by one (all of them when the dataset is smaller); the column
            names are always checked.
        require_prompt: refuse implicit-prompt pairs (those that tokenizing with :func:`tokenize_pair` and the
            evaluation cannot take: they must be split with TRL first).

    Returns:
        The format name of the first row (see :func:`detect_format`).

    Raises:
        ValueError: empty dataset, missing ``chosen``/``rejected`` (or prompt of the wrong type), rows of mixed
            formats, a null value, a missing ``group_column``, or (with ``require_prompt``) no ``prompt``; the
            message names the column and row.
    """
    check_bool("require_prompt", require_prompt)
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # IterableDataset without resolved features, or a list of dicts
        try:
            first = next(iter(dataset))
        except StopIteration:
            raise ValueError(f"{name} is empty: it holds no preference pairs.") from None
        columns = list(first)
    missing = [k for k in _REQUIRED if k not in columns]
    if missing:
        raise ValueError(
            f"{name} is missing the field(s) {missing} (its columns: {list(columns)}); accepted formats: "
            f"{ACCEPTED_FORMATS}."
        )
    if require_prompt and "prompt" not in columns:
        raise ValueError(f"{name} row 0 has no 'prompt' (its columns: {list(columns)}): {_SPLIT_FIRST}")
    if group_column is not None and group_column not in columns:
        raise ValueError(
            f"group_column={group_column!r} is not a column of {name} (its columns: {list(columns)}); pass the "
            "name of the subgroup or annotator column, or group_column=None."
        )
    kind = None
    count = empty = 0
    for i, example in enumerate(dataset):
        if i >= max_rows:
            break
        count += 1
        for key in ("prompt", "chosen", "rejected"):
            if key in example and example[key] is None:
                raise ValueError(f"{name} row {i}: field {key!r} is null; every pair needs a prompt, a chosen and "
                                 "a rejected completion.")
        try:
            row_kind = detect_format(example)
        except ValueError as e:
            raise ValueError(f"{name} row {i}: {e}") from None
        if kind is None:
            kind = row_kind
        elif row_kind != kind:
            raise ValueError(f"{name} row {i} is {row_kind} but row 0 is {kind}: all rows must share one format.")
        if group_column is not None and example[group_column] is None:
            raise ValueError(f"{name} row {i}: group_column {group_column!r} is null.")
        if row_kind.endswith("conversational"):
            _check_roles(example, f"{name} row {i}", explicit=not row_kind.startswith("implicit"))
        empty += not row_kind.startswith("implicit") and not any(
            _completion_text(example[k]).strip() for k in _REQUIRED)
    if count == 0:
        raise ValueError(f"{name} is empty: it holds no preference pairs.")
    if empty == count:
        raise ValueError(f"{name}: the chosen and rejected completions of all {count} rows checked are empty, so "
                         "there is no preference to learn; check the 'chosen' and 'rejected' columns.")
    return kind


ROLES = ("system", "user", "assistant")  # the message roles of conversational rows


def _check_roles(example: dict[str, Any], where: str, explicit: bool) -> None:
    """Roles are system, user or assistant, and a completion (all of it with an explicit prompt, the last
    message of an implicit-prompt pair) is from the assistant; the error names the row, field and role."""
    for key in ("prompt", *_REQUIRED):
        for j, message in enumerate(example.get(key) or ()):
            if (role := message["role"]) not in ROLES:
                raise ValueError(f"{where}: field {key!r} message {j} has role {role!r}; accepted roles: "
                                 f"{', '.join(map(repr, ROLES))}.")
            if key != "prompt" and (explicit or j == len(example[key]) - 1) and role != "assistant":
                raise ValueError(f"{where}: field {key!r} message {j} has role {role!r}, but the completion must "
                                 "be from the 'assistant'.")


def _completion_text(value) -> str:
    """A completion's text: the string, or the content of its last message."""
    return value if isinstance(value, str) else str((value[-1].get("content") or "") if value else "")


def drop_empty_completions(
    dataset,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    name: str = "dataset",
    log: bool = True,
):
    """Drop tokenized pairs whose chosen or rejected completion is empty after truncation to ``max_length``.

    A pair whose completion keeps no token carries no preference signal (its log-probability would be 0, and a
    per-token average would be 0/0); it is dropped and the count is logged, never turned into a NaN.

    Args:
        dataset: ``datasets.Dataset`` with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (token id lists).
        max_length: maximum tokens of prompt + completion, or None for no truncation.
        truncation_mode: ``"keep_start"`` (keep the first ``max_length`` tokens) or ``"keep_end"``.
        name: dataset name for the log message.
        log: log the count of dropped pairs at WARNING level (callers that report a total pass False).

    Returns:
        ``(dataset, n_dropped)``.
    """
    check_choice("truncation_mode", truncation_mode, TRUNCATION_MODES)
    check_bool("log", log)

    def keeps_tokens(ex) -> bool:
        n_prompt = len(ex["prompt_ids"])
        for key in ("chosen_ids", "rejected_ids"):
            n = len(ex[key])
            if n == 0:
                return False
            if max_length is not None and truncation_mode == "keep_start" and n_prompt >= max_length:
                return False
        return True

    n_before = len(dataset) if hasattr(dataset, "__len__") else None
    kwargs = {"desc": f"Dropping empty completions from {name}"} if n_before is not None else {}
    dataset = dataset.filter(keeps_tokens, **kwargs)
    if n_before is None:
        return dataset, 0
    n_dropped = n_before - len(dataset)
    if n_before and not len(dataset):
        raise ValueError(f"{name}: every one of its {n_before} pairs has an empty chosen or rejected completion after "
                         f"truncation to max_length={max_length}; no pair is left (raise max_length).")
    if n_dropped and log:
        logger.warning("Dropped %d of %d pairs of %s whose chosen or rejected completion is empty after "
                       "truncation to max_length=%s.", n_dropped, n_before, name, max_length)
    return dataset, n_dropped


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _ids(tokenizer, text_or_messages, add_generation_prompt: bool = False) -> list[int]:
    # Same calls as TRL's preprocessing (special tokens added by default), so log-probs agree with the trainer's.
    if isinstance(text_or_messages, str):
        return list(tokenizer(text=text_or_messages)["input_ids"])
    out = tokenizer.apply_chat_template(
        text_or_messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"])


def tokenize_pair(example: dict[str, Any], tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Token ids of a pair, split into prompt and completions the way TRL's DPOTrainer splits them.

    Standard pairs get the tokenizer's EOS appended to both completions; conversational pairs go through the chat
    template. The completion starts where the tokenized prompt and the tokenized prompt + completion diverge.

    Args:
        example: a pair with an explicit ``prompt`` (an implicit-prompt pair is split by TRL first, e.g. with
            ``trl.data_utils.maybe_extract_prompt``).
        tokenizer: the model's tokenizer.

    Returns:
        ``(prompt_ids, chosen_ids, rejected_ids)``.

    Raises:
        ValueError: the pair has no ``prompt``.
    """
    if "prompt" not in example:
        raise ValueError(f"the pair has no 'prompt' (its fields: {sorted(example)}): {_SPLIT_FIRST}")
    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    if isinstance(chosen, str):
        eos = tokenizer.eos_token or ""
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        p = _ids(tokenizer, prompt)
        pc, pr = _ids(tokenizer, prompt + chosen), _ids(tokenizer, prompt + rejected)
    else:
        p = _ids(tokenizer, prompt, add_generation_prompt=True)
        pc, pr = _ids(tokenizer, prompt + chosen), _ids(tokenizer, prompt + rejected)
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    return p[:n], pc[n:], pr[n:]
