"""Annotator-level MixDPO in the trainer (``MixDPOConfig(strength_level="annotator")``): the annotator index, the
panel loss of a batch, the refit of phi on every cached margin, and ``strength_by_annotator.csv``.

The math is :mod:`alignment.panel`; this module ties it to the datasets and the margin cache:

- :class:`AnnotatorIndex` maps the training set's ``annotator_column`` to ids 0..A-1 in order of first appearance
  (a deterministic function of the dataset, stored in every checkpoint as ``annotators.json``, with the id of every
  training row, and checked on resume), and gives each dataset the column ``mixdpo_annotator_id`` (-1 for an annotator the training set lacks);
- :class:`AnnotatorPanel` computes a batch's loss: in training ``-sum_r q_a(r) log sigmoid(beta_r h_j)`` with
  ``q_a`` from the cached margins of every pair of annotator ``a`` (EM with cached margins; the cache already holds
  the batch's own margins when the loss is formed), in evaluation the posterior predictive ``-log sum_r q_a(r)
  sigmoid(beta_r h_j)``, which for an annotator unseen in training (``q`` = the population's weights) is the pair
  MixDPO loss;
- :class:`PanelRefit` refits phi on every cached margin by the panel objective, and writes the per-annotator table
  when training ends.

``strength_by_annotator.csv`` has one row per training annotator: ``annotator``, ``n_pairs`` (pairs whose margins
entered its posterior), ``mean``, ``sd``, ``q05``, ``q95`` (the posterior of its strength given its pairs) and, when
the dataset has a group column (``group_column``, else a column named ``group``), ``group`` (the annotator's groups
in order of appearance, joined by ``;`` if it has several). The posterior is the discrete one over the nodes of a
512-node composite rule ("quadrature") of the same family and parameters, so that the 90% interval is not limited
by the training rule's spacing; a family without that rule uses its training rule.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch

from mixlogit.persistence import read_json, write_json

from .batching import ANNOTATOR_ID_COLUMN, column_names
from .losses import _margin
from .margins import StrengthRefit
from .panel import annotator_log_weights, annotator_posterior, dense_strength, panel_pair_loss, rule_points
from .run_dir import ANNOTATORS_FILE, STRENGTH_BY_ANNOTATOR
from .strength_base import Strength
from .strength_fit import strength_vector

__all__ = ["ANNOTATORS_FILE", "STRENGTH_BY_ANNOTATOR", "AnnotatorIndex", "AnnotatorPanel", "PanelRefit"]


def _missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def _column(dataset, column: str, name: str) -> list:
    """The values of ``column`` of ``dataset`` (a Dataset, an IterableDataset or a list of dicts)."""
    columns = column_names(dataset)
    if column not in columns:
        raise ValueError(f"annotator_column={column!r} is not a column of {name} (its columns: {list(columns)}); "
                         "pass the column that names each pair's annotator, or strength_level='pair'.")
    if hasattr(dataset, "column_names") and hasattr(dataset, "__len__"):
        return list(dataset[column])
    return [example[column] for example in dataset]


def _labels(values: list, column: str, name: str) -> list[str]:
    """The values as text; a missing one (None, NaN, empty) is an error naming the column and the first bad row."""
    for i, v in enumerate(values):
        if _missing(v):
            bad = sum(_missing(x) for x in values)
            raise ValueError(f"annotator_column={column!r} of {name} is missing in row {i} (value {v!r}; {bad} "
                             "rows affected): every pair needs its annotator with strength_level='annotator'.")
    # Compared as text, as the group ids are: a JSON round trip of the index keeps them.
    return [str(v) for v in values]


class AnnotatorIndex:
    """The annotators of a training set: ``labels[id]``, the id of every row (``of_row``) and their groups.

    Built by :meth:`from_dataset`; ids follow first appearance, so the index is a function of the dataset alone.
    """

    def __init__(self, column: str, labels: list[str], of_row: np.ndarray, groups: list[str] | None = None):
        self.column, self.labels, self.of_row, self.groups = column, list(labels), np.asarray(of_row), groups
        self._ids = {label: i for i, label in enumerate(self.labels)}

    @classmethod
    def from_dataset(cls, dataset, column: str, group_column: str | None = None,
                     name: str = "train_dataset") -> AnnotatorIndex:
        labels = _labels(_column(dataset, column, name), column, name)
        ids: dict[str, int] = {}
        of_row = np.array([ids.setdefault(label, len(ids)) for label in labels], dtype=np.int64)
        if len(ids) == 1:
            warnings.warn(f"{name} has a single annotator ({next(iter(ids))!r} in column {column!r}): with one "
                          "annotator the spread of the strength is not identified (one draw of beta explains all "
                          "its pairs); the fitted spread will be arbitrary.", RuntimeWarning, stacklevel=3)
        groups = None
        if group_column is not None:
            per: list[list[str]] = [[] for _ in ids]
            for a, g in zip(of_row, _column(dataset, group_column, name), strict=True):
                if str(g) not in per[a]:
                    per[a].append(str(g))
            groups = [";".join(p) for p in per]
        return cls(column, list(ids), of_row, groups)

    @property
    def n_annotators(self) -> int:
        return len(self.labels)

    def ids(self, values: list, name: str) -> np.ndarray:
        """Ids of annotator labels (-1 for one the index lacks); a missing label is an error naming its row."""
        return np.array([self._ids.get(label, -1) for label in _labels(values, self.column, name)], dtype=np.int64)

    def to_json(self) -> dict:
        """``annotators.json``: the column, the labels (by id) and the id of every training row (by row index)."""
        return {"annotator_column": self.column, "labels": self.labels, "n_rows": int(self.of_row.size),
                "annotator_of_row": self.of_row.tolist()}

    def check_saved(self, folder: str) -> None:
        """Refuse to resume from ``folder`` when its saved index is not this one (another dataset or column)."""
        path = os.path.join(folder, ANNOTATORS_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"Cannot resume from {folder!r} with strength_level='annotator': it has no "
                             f"{ANNOTATORS_FILE} (it was trained with strength_level='pair'). Resume with that "
                             "setting, or start a new run.")
        saved = read_json(path)
        if saved.get("annotator_column") != self.column or saved.get("n_rows") != self.of_row.size:
            raise ValueError(f"Cannot resume from {folder!r}: it was trained with annotator_column="
                             f"{saved.get('annotator_column')!r} on {saved.get('n_rows')} rows, this run has "
                             f"{self.column!r} on {self.of_row.size}: resume with the checkpoint's dataset.")
        labels = saved.get("labels", [])
        if labels != self.labels:
            k = next((i for i, (a, b) in enumerate(zip(labels, self.labels)) if a != b), min(len(labels),
                                                                                          len(self.labels)))
            raise ValueError(f"Cannot resume from {folder!r}: its annotator index differs from this run's training "
                             f"set at id {k} ({labels[k] if k < len(labels) else None!r} there, "
                             f"{self.labels[k] if k < len(self.labels) else None!r} here): resume with the "
                             "checkpoint's dataset.")


class AnnotatorPanel:
    """Annotator-level MixDPO for :class:`~alignment.trainer.MixDPOTrainer` (see the module docstring)."""

    def __init__(self, index: AnnotatorIndex):
        self.index = index

    @classmethod
    def from_args(cls, args, train_dataset, eval_datasets=()) -> AnnotatorPanel | None:
        """The panel of a run (None with ``strength_level="pair"``); the annotator column of the training set and of
        every eval dataset (``(name, dataset)`` pairs) is checked here, before any tokenization."""
        if args.strength_level != "annotator":
            return None
        columns = column_names(train_dataset)
        group = args.group_column or ("group" if "group" in columns else None)
        index = AnnotatorIndex.from_dataset(train_dataset, args.annotator_column, group, "train_dataset")
        for name, dataset in eval_datasets:
            index.ids(_column(dataset, args.annotator_column, name), name)
        return cls(index)

    def add_ids(self, dataset, dataset_name: str):
        """``dataset`` with ``mixdpo_annotator_id``; a dataset without the annotator column (one passed to
        ``pair_margins``, which needs no annotator) gets -1 everywhere."""
        column, name = self.index.column, f"the {dataset_name} dataset"
        if not hasattr(dataset, "__len__"):  # an IterableDataset: ids as its examples stream by
            if column not in column_names(dataset):
                return dataset.map(lambda _: {ANNOTATOR_ID_COLUMN: -1})
            return dataset.map(lambda ex: {ANNOTATOR_ID_COLUMN: int(self.index.ids([ex[column]], name)[0])})
        if column not in column_names(dataset):
            ids = np.full(len(dataset), -1, dtype=np.int64)
        else:
            ids = self.index.ids(_column(dataset, column, name), name)
        # One column of ints, not a map: nothing for the datasets cache to fingerprint (the index is not hashable).
        return dataset.add_column(ANNOTATOR_ID_COLUMN, ids.tolist())

    def cached(self, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached margins (n_seen,) float64 and their annotators' ids (n_seen,) long."""
        rows = torch.nonzero(~torch.isnan(cache.margins)).reshape(-1)
        return cache.margins[rows], torch.as_tensor(self.index.of_row)[rows]

    def log_weights(self, strength: Strength, cache, annotators: torch.Tensor | None = None) -> torch.Tensor:
        """``log q_a(r)`` of every annotator from the cache, (A, R); the prior for an annotator not yet seen.

        With ``annotators`` ((k,) distinct ids) only their rows, (k, R), from their own cached pairs: ``q_a``
        depends on annotator ``a``'s pairs alone, so a batch costs O(its annotators' pairs x R), not O(n R).
        """
        h, ids = self.cached(cache)
        if annotators is None:
            return annotator_log_weights(strength, h, ids, self.index.n_annotators)
        local = torch.full((self.index.n_annotators,), -1, dtype=torch.long)
        local[annotators] = torch.arange(annotators.numel())
        keep = local[ids] >= 0
        return annotator_log_weights(strength, h[keep], local[ids[keep]], annotators.numel())

    def loss(self, strength: Strength, cache, tensors: tuple, annotator_ids: torch.Tensor, train: bool):
        """Per-pair losses and TRL's rewards of a batch, like :func:`alignment.losses.mixdpo_loss`.

        Args:
            tensors: the four (B,) log-prob tensors (policy chosen, policy rejected, reference chosen, reference
                rejected), nats.
            annotator_ids: (B,) ids (-1: not in the training set: the population's weights).
            train: the EM loss (True) or the posterior predictive loss (False).

        Returns:
            ``(losses, chosen_rewards, rejected_rewards)``, each (B,); rewards are ``E[beta] * log-ratio``.
        """
        h, chosen, rejected = _margin(tensors)
        losses = self.pair_losses(strength, cache, h, annotator_ids, train)
        with torch.no_grad():
            mean_beta = strength.mean().to(device=h.device, dtype=h.dtype)
        return losses, mean_beta * chosen.detach(), mean_beta * rejected.detach()

    def pair_losses(self, strength: Strength, cache, margins: torch.Tensor, annotator_ids, train: bool):
        """Per-pair losses (B,) of margins ``h`` (B,) by annotator ``ids`` (B,; -1: the population's weights):
        the EM loss (``train``) or the posterior predictive ``-log P(chosen preferred)``."""
        ids = torch.as_tensor(annotator_ids).detach().long().cpu()
        present = torch.unique(ids[ids >= 0])  # sorted: the batch's annotators
        log_q = self.log_weights(strength, cache, present)
        _, log_w = rule_points(strength, torch.float64, log_q.device)
        table = torch.cat([log_q, log_w.detach().unsqueeze(0)])  # last row: the population
        rows = torch.where(ids < 0, present.numel(), torch.searchsorted(present, ids.clamp_min(0)))
        return panel_pair_loss(strength, margins, table[rows], predictive=not train)

    def table(self, strength: Strength, cache, level: float = 0.9):
        """The per-annotator posterior strengths as a pandas DataFrame (the columns of ``strength_by_annotator.csv``)."""
        import pandas as pd

        h, ids = self.cached(cache)
        post = annotator_posterior(dense_strength(strength), h, ids, self.index.n_annotators, level)
        lo, hi = round(100 * (1 - level) / 2), round(100 * (1 + level) / 2)
        out = pd.DataFrame({"annotator": self.index.labels, "n_pairs": post["n_pairs"], "mean": post["mean"],
                            "sd": post["sd"], f"q{lo:02d}": post["low"], f"q{hi:02d}": post["high"]})
        if self.index.groups is not None:
            out["group"] = self.index.groups
        return out

    def save(self, folder: str, strength: Strength, cache) -> None:
        """Write ``annotators.json`` (the index) and ``strength_by_annotator.csv`` into ``folder``."""
        os.makedirs(folder, exist_ok=True)
        write_json(os.path.join(folder, ANNOTATORS_FILE), self.index.to_json(), overwrite=True, indent=2)
        self.table(strength, cache).to_csv(os.path.join(folder, STRENGTH_BY_ANNOTATOR), index=False)

    def check_checkpoint(self, folder: str) -> None:
        self.index.check_saved(folder)


class PanelRefit(StrengthRefit):
    """:class:`~alignment.margins.StrengthRefit` with the panel objective (each cached margin with its annotator),
    which also writes the index and ``strength_by_annotator.csv`` into ``output_dir`` when training ends."""

    def refit(self, step: int, margins: torch.Tensor, full: bool = True) -> None:
        # ``margins`` (the cache's seen margins) carry no annotators; the panel reads the cache itself.
        panel = self.trainer.panel
        h, ids = panel.cached(self.trainer.margin_cache)
        if h.numel() == 0:
            return
        self.last_fit = self._fit(h, full, annotator=ids, n_annotators=panel.index.n_annotators)
        self.history.append((int(step), strength_vector(self.trainer.strength)))

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        if args.should_save:
            self.trainer.panel.save(args.output_dir, self.trainer.strength, self.trainer.margin_cache)

