"""Per-pair margins of a MixDPO run: the no-grad margin pass, the cache of every pair's latest margin, and the refit
of the strength on that cache (``MixDPOConfig(strength_update="refit")``).

:class:`PairMarginsMixin` gives :class:`~alignment.trainer.MixDPOTrainer` its :meth:`pair_margins`;
:class:`MarginCache` holds the latest margin h of every training pair (by the row index the trainer adds to its
datasets), filled as pairs are visited; :class:`StrengthRefit` is the trainer callback that, every
``strength_refit_steps`` optimizer steps, moves phi to the maximum of the objective on the cached margins
(:func:`alignment.strength_fit.fit_strength` at the first refit and after a cache refresh, one Newton step from the
last refit in between), and at the end of training refreshes every margin with one no-grad
pass and refits once more. The cache travels with checkpoints (``margin_cache.pt``), so a resumed run refits on
the same margins as an uninterrupted one.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback

from .batching import GROUP_ID_COLUMN, ROW_COLUMN
from .run_dir import MARGIN_CACHE_NAME
from .strength_fit import fit_strength, newton_step, strength_vector

__all__ = ["MARGIN_CACHE_NAME", "MarginCache", "PairMarginsMixin", "StrengthRefit"]


class MarginCache:
    """The latest DPO margin of every training pair, NaN until the pair is first seen.

    Args:
        n_rows: number of rows of the training dataset (row indices run over 0..n_rows-1).
    """

    def __init__(self, n_rows: int):
        self.margins = torch.full((int(n_rows),), float("nan"), dtype=torch.float64)

    def update(self, rows: torch.Tensor, margins: torch.Tensor) -> None:
        """Store ``margins`` (shape (b,), nats) for the pairs ``rows`` (shape (b,), int)."""
        self.margins[rows.detach().long().cpu()] = margins.detach().double().cpu()

    def seen(self) -> torch.Tensor:
        """The cached margins of the pairs seen so far, shape (n_seen,)."""
        return self.margins[~torch.isnan(self.margins)]

    def save(self, folder: str) -> None:
        torch.save({"margins": self.margins}, os.path.join(folder, MARGIN_CACHE_NAME))

    def load(self, folder: str) -> None:
        """Restore the cache of a checkpoint; a checkpoint without one (a run with gradient updates) is refused."""
        path = os.path.join(folder, MARGIN_CACHE_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"Cannot resume from {folder!r} with strength_update='refit': it has no {MARGIN_CACHE_NAME} "
                "(it was trained with strength_update='gradient'). Resume with that setting, or start a new run."
            )
        try:
            margins = torch.load(path, map_location="cpu", weights_only=True)["margins"]
        except Exception as e:  # noqa: BLE001 - an unpickling or shape error: the file is damaged, whatever the kind
            raise ValueError(f"{path} is damaged: {type(e).__name__}: {e}") from None
        if margins.shape != self.margins.shape:
            raise ValueError(
                f"{path} holds margins of {margins.shape[0]} pairs but this run's training dataset has "
                f"{self.margins.shape[0]}: resume with the dataset the checkpoint was trained on."
            )
        self.margins = margins.to(torch.float64)


class StrengthRefit(TrainerCallback):
    """Refit phi on the cached margins every ``every`` optimizer steps, and on fresh margins when training ends.

    ``history`` keeps ``(step, unconstrained parameters)`` after each refit, the trace the benchmarks read to
    check that phi has stopped moving.
    """

    #: The refits after the run's first are one Newton step from the current phi (:func:`newton_step`, the M-step of
    #: a generalized EM: each raises the objective, and from a nearby maximum lands on the new one). The first refit
    #: (within the first ``every`` steps), those after a cache refresh and the last are full L-BFGS-B fits, which on
    #: the tiny benchmark model cost 8-25 objective values where a step costs 3-4. False: every refit is full.
    partial = True

    def __init__(self, trainer, every: int, refresh_every: int | None = None):
        self.trainer, self.every, self.refresh_every = trainer, int(every), refresh_every
        self.history: list[tuple[int, dict[str, float]]] = []
        self.last_fit: dict[str, Any] | None = None
        #: Optimizer step of the last refresh (a refresh at the last step makes the end-of-training one redundant).
        self.refreshed_at: int | None = None

    def _fit(self, margins: torch.Tensor, full: bool, **panel) -> dict[str, Any]:
        """Full fit or one Newton step of the trainer's strength on ``margins`` (on its device), in place."""
        strength = self.trainer.strength
        device = next(iter(strength.parameters())).device
        panel = {k: v.to(device) if torch.is_tensor(v) else v for k, v in panel.items()}
        objective = "marginal" if panel else self.trainer.args.objective
        if full or not self.partial:
            return fit_strength(strength, margins.to(device), objective, **panel)
        return newton_step(strength, margins.to(device), objective, **panel)

    def refit(self, step: int, margins: torch.Tensor, full: bool = True) -> None:
        if margins.numel() == 0:
            return
        self.last_fit = self._fit(margins, full)
        self.history.append((int(step), strength_vector(self.trainer.strength)))

    def refresh(self) -> None:
        """Recompute every training pair's margin under the current policy (one no-grad pass)."""
        fresh = self.trainer.pair_margins(self.trainer.train_dataset, batch_size=256)
        self.trainer.margin_cache.update(torch.as_tensor(fresh["row"]), torch.as_tensor(fresh["margin"]))

    def on_step_end(self, args, state, control, **kwargs):
        refresh = bool(self.refresh_every) and state.global_step % self.refresh_every == 0
        if refresh:
            self.refresh()
            self.refreshed_at = state.global_step
        if refresh or state.global_step % self.every == 0:
            # Full fits depend on the step alone, so a resumed run refits as an uninterrupted one does.
            full = refresh or state.global_step <= self.every
            self.refit(state.global_step, self.trainer.margin_cache.seen(), full=full)

    def on_train_end(self, args, state, control, **kwargs):
        if self.refreshed_at != state.global_step:  # else the cache already holds the final policy's margins
            self.refresh()
        self.refit(state.global_step, self.trainer.margin_cache.seen())


class PairMarginsMixin:
    """:meth:`pair_margins` for :class:`~alignment.trainer.MixDPOTrainer` (a TRL ``DPOTrainer``)."""

    @torch.no_grad()
    def pair_margins(self, dataset=None, batch_size: int | None = None) -> dict[str, Any]:
        """DPO margins h of every pair under the current policy and the reference.

        Args:
            dataset: raw or prepared preference dataset (default: the trainer's eval dataset, else its train one).
            batch_size: pairs per forward (default: ``per_device_eval_batch_size``).

        Returns:
            Dict of numpy arrays over the kept pairs: ``row`` (index in ``dataset``; pairs dropped by truncation
            are absent), ``margin`` (h, nats), ``chosen_logratio``, ``rejected_logratio`` and, with a
            ``group_column``, ``group`` (labels).
        """
        import numpy as np
        from torch.utils.data import DataLoader

        if dataset is None:
            dataset = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        if isinstance(dataset, dict):
            raise TypeError("pair_margins takes one dataset, not a dict of eval datasets.")
        prepared = "prompt_ids" in dataset.column_names and ROW_COLUMN in dataset.column_names
        if not prepared:
            dataset = self._prepare_dataset(dataset, self.processing_class, self.args, "margins")
        if self.precompute_ref_logps and "ref_chosen_logps" not in dataset.column_names:
            if self.ref_model is None and not self._is_peft() and self.state.global_step > 0:
                raise ValueError(
                    "The reference log-probs of this dataset cannot be computed after training: "
                    "precompute_ref_log_probs=True and no ref_model (full fine-tuning). Pass the "
                    "dataset as eval_dataset at construction, or pass a ref_model."
                )
            dataset = self._precompute_ref_logps(
                dataset, "margins", batch_size or self.args.per_device_eval_batch_size
            )
        keep = [c for c in dataset.column_names if c in self._signature_columns_or_default()]
        loader = DataLoader(
            dataset.select_columns(keep),
            batch_size=batch_size or self.args.per_device_eval_batch_size,
            collate_fn=self.data_collator,
            shuffle=False,
        )
        was_training = self.model.training
        self.model.eval()
        out: dict[str, list] = {"row": [], "chosen_logratio": [], "rejected_logratio": [], "group_id": []}
        try:
            for batch in loader:
                batch = self._prepare_inputs(batch)
                c, r, rc, rr, _, _ = self._policy_and_ref_logps(self.model, batch)
                out["chosen_logratio"].append((c - rc).float().cpu().numpy())
                out["rejected_logratio"].append((r - rr).float().cpu().numpy())
                out["row"].append(batch[ROW_COLUMN].cpu().numpy())
                if GROUP_ID_COLUMN in batch:
                    out["group_id"].append(batch[GROUP_ID_COLUMN].cpu().numpy())
        finally:
            if was_training:
                self.model.train()
        result = {k: np.concatenate(v) for k, v in out.items() if v}
        result["margin"] = result["chosen_logratio"] - result["rejected_logratio"]
        if "group_id" in result:
            names = self.group_names
            result["group"] = np.array([names[g] for g in result.pop("group_id")], dtype=object)
        return result

    def _signature_columns_or_default(self) -> list[str]:
        self._set_signature_columns_if_needed()
        return list(self._signature_columns)

    def _is_peft(self) -> bool:
        from accelerate.utils import is_peft_model

        return is_peft_model(self.model)

