"""The bookkeeping columns MixDPO adds to a preference dataset, and the collator that carries them to the batch.

Two integer columns ride along with TRL's tokenized pairs and never reach the model:

- ``mixdpo_row``: the pair's index in the dataset as given, so that per-pair margins can be matched back to their
  rows after truncation has dropped some pairs;
- ``mixdpo_group_id``: the integer id of the pair's ``group_column`` label (ids follow first appearance, and one
  index is shared by every dataset of a trainer), for preference accuracy per group;
- ``mixdpo_annotator_id`` (``strength_level="annotator"`` only): the id of the pair's annotator in the training
  set's annotator index (:mod:`alignment.annotators`), -1 for an annotator the training set does not have.
"""

from __future__ import annotations

import torch

__all__ = [
    "ANNOTATOR_ID_COLUMN",
    "EXTRA_COLUMNS",
    "GROUP_ID_COLUMN",
    "NON_MODEL_KEYS",
    "ROW_COLUMN",
    "CollatorWithExtras",
    "add_group_ids",
    "add_row_index",
    "column_names",
    "model_inputs",
    "without_extras",
]

GROUP_ID_COLUMN = "mixdpo_group_id"
ROW_COLUMN = "mixdpo_row"
ANNOTATOR_ID_COLUMN = "mixdpo_annotator_id"
#: The columns added here; the collator passes them through as (B,) long tensors.
EXTRA_COLUMNS = (GROUP_ID_COLUMN, ROW_COLUMN, ANNOTATOR_ID_COLUMN)
#: Batch keys that are not arguments of the model's forward.
NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *EXTRA_COLUMNS})


def column_names(dataset) -> list[str]:
    """Columns of a ``Dataset`` or of an ``IterableDataset`` (whose first example names them)."""
    return getattr(dataset, "column_names", None) or list(next(iter(dataset)))


def model_inputs(inputs: dict) -> dict:
    """The entries of a batch that the model's forward takes."""
    return {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}


def without_extras(inputs: dict) -> dict:
    """A batch without the columns added here (what TRL's own methods expect)."""
    return {k: v for k, v in inputs.items() if k not in EXTRA_COLUMNS}


def add_row_index(dataset):
    """``dataset`` with ``mixdpo_row``, each pair's index in it."""
    return dataset.map(lambda _, i: {ROW_COLUMN: i}, with_indices=True)


def add_group_ids(dataset, group_column: str, index: dict[str, int], dataset_name: str):
    """``dataset`` with ``mixdpo_group_id``, the id in ``index`` of each pair's ``group_column`` label.

    ``index`` (label -> id) is updated in place: a label seen for the first time gets the next id.
    """
    if group_column not in column_names(dataset):
        raise ValueError(f"group_column={group_column!r} is not a column of the {dataset_name} dataset.")

    def add_group_id(example):
        key = str(example[group_column])
        if key not in index:
            index[key] = len(index)
        return {GROUP_ID_COLUMN: index[key]}

    # Not batched, in one process and never from the cache (the ids live in the caller's index), so that
    # ids follow first appearance and stay consistent across datasets.
    map_kwargs = {}
    if hasattr(dataset, "__len__"):  # IterableDataset.map takes neither argument
        map_kwargs = {
            "desc": f"Indexing groups of the {dataset_name} dataset",
            "load_from_cache_file": False,
        }
    return dataset.map(add_group_id, **map_kwargs)


class CollatorWithExtras:
    """Wrap a preference collator so the MixDPO bookkeeping columns (group id, row index, annotator id) reach the
    batch."""

    def __init__(self, base):
        self.base = base

    def __call__(self, examples):
        out = self.base(examples)
        for key in EXTRA_COLUMNS:
            if key in examples[0]:
                out[key] = torch.tensor([int(ex[key]) for ex in examples], dtype=torch.long)
        return out
