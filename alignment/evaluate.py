"""Preference evaluation of a policy against its reference: accuracy and margins, micro and macro over groups.

For each pair the DPO margin is ``h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]``
(summed completion log-probabilities, nats). Preference accuracy is the share of pairs with ``h > 0`` (a tie
counts as a miss). Micro statistics weight every pair equally; macro statistics average the per-group values,
so that a small group counts as much as a large one.

The pairs need an explicit ``prompt``: implicit-prompt pairs (``chosen`` and ``rejected`` only) are refused with
a ValueError that says how to split them with TRL (``dataset.map(trl.data_utils.maybe_extract_prompt)``), which
the TRL-side entry points (``mixdpo evaluate``, the experiment harness) do before calling here.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from mixlogit.validation import check_choice, check_count

from .data import TRUNCATION_MODES, tokenize_pair, validate_preference_dataset

__all__ = ["evaluate", "pair_logratios", "sequence_logps", "summarize_margins"]


def _check_batching(batch_size, max_length, truncation_mode) -> None:
    """Validate the batching arguments up front (before any tokenization or forward pass)."""
    check_count("batch_size", batch_size)
    check_count("max_length", max_length, allow_none=True)
    check_choice("truncation_mode", truncation_mode, TRUNCATION_MODES)


def _device_of(model):
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        import torch

        return torch.device("cpu")


def sequence_logps(
    model,
    pairs: list[tuple[list[int], list[int]]],
    pad_token_id: int,
    batch_size: int = 16,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> np.ndarray:
    """Summed log-probabilities of completions given prompts.

    Args:
        model: a causal LM (``model(input_ids, attention_mask).logits``).
        pairs: ``(prompt_ids, completion_ids)`` per sequence.
        pad_token_id: id used for right padding.
        batch_size: sequences per forward.
        max_length: truncate prompt + completion to this many tokens (as TRL's collator does), or None.
        truncation_mode: ``"keep_start"`` or ``"keep_end"``.

    Returns:
        float64 array of shape ``(len(pairs),)``: ``sum_t log p(completion_t | prefix)`` in nats.
    """
    import torch

    _check_batching(batch_size, max_length, truncation_mode)
    device = _device_of(model)
    out = np.empty(len(pairs), dtype=np.float64)
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            seqs, masks = [], []
            for prompt_ids, completion_ids in chunk:
                ids = list(prompt_ids) + list(completion_ids)
                mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
                if max_length is not None and len(ids) > max_length:
                    sl = (
                        slice(None, max_length)
                        if truncation_mode == "keep_start"
                        else slice(-max_length, None)
                    )
                    ids, mask = ids[sl], mask[sl]
                seqs.append(ids)
                masks.append(mask)
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(seqs), width), dtype=torch.long)
            completion = torch.zeros((len(seqs), width), dtype=torch.bool)
            for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
                input_ids[i, : len(s)] = torch.tensor(s)
                attention[i, : len(s)] = 1
                completion[i, : len(s)] = torch.tensor(m, dtype=torch.bool)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            targets = input_ids[:, 1:].to(device)
            token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            token_logp = token_logp * completion[:, 1:].to(device)
            out[start : start + len(chunk)] = token_logp.sum(-1).double().cpu().numpy()
    return out


def _reference_context(model, ref_model):
    """The model that plays the reference, and a context to enter while using it."""
    if ref_model is not None:
        return ref_model, contextlib.nullcontext()
    if hasattr(model, "disable_adapter"):  # a PEFT model: the base model without its adapter is the reference
        return model, model.disable_adapter()
    raise ValueError(
        "ref_model is None and the model is not a PEFT model, so there is no reference policy: pass "
        "ref_model (e.g. the model before preference training)."
    )


def pair_logratios(
    model,
    ref_model,
    dataset,
    tokenizer,
    group_column: str | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> dict[str, np.ndarray]:
    """Policy-minus-reference log-ratios and DPO margins of every pair.

    Args:
        model: the policy (a causal LM, or a PEFT model whose disabled adapter is the reference).
        ref_model: the reference causal LM, or None for a PEFT ``model``.
        dataset: preference pairs in a TRL format with an explicit ``prompt`` (see :mod:`alignment.data`).
        tokenizer: the tokenizer of both models.
        group_column: column holding the subgroup or annotator label, or None.
        batch_size, max_length, truncation_mode: as in :func:`sequence_logps`.

    Returns:
        Dict of arrays over the pairs kept (those whose completions keep at least one token after truncation):
        ``row`` (index in ``dataset``), ``chosen_logratio``, ``rejected_logratio``, ``margin`` (nats) and, with
        ``group_column``, ``group`` (str labels); plus ``n_dropped`` (int).
    """
    _check_batching(batch_size, max_length, truncation_mode)
    validate_preference_dataset(dataset, group_column, "dataset", require_prompt=True)
    rows, prompts_chosen, prompts_rejected = [], [], []
    n_dropped = 0
    for i, example in enumerate(dataset):
        prompt_ids, chosen_ids, rejected_ids = tokenize_pair(example, tokenizer)
        too_long = (
            max_length is not None and truncation_mode == "keep_start" and len(prompt_ids) >= max_length
        )
        if not chosen_ids or not rejected_ids or too_long:
            n_dropped += 1
            continue
        rows.append(i)
        prompts_chosen.append((prompt_ids, chosen_ids))
        prompts_rejected.append((prompt_ids, rejected_ids))
    if not rows:
        raise ValueError(
            f"every pair of the dataset has an empty completion after truncation to max_length="
            f"{max_length}; raise max_length."
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw = {
        "pad_token_id": pad,
        "batch_size": batch_size,
        "max_length": max_length,
        "truncation_mode": truncation_mode,
    }
    was_training = model.training
    model.eval()
    try:
        policy = sequence_logps(model, prompts_chosen + prompts_rejected, **kw)
        ref, ctx = _reference_context(model, ref_model)
        ref_was_training = ref.training
        ref.eval()
        with ctx:
            reference = sequence_logps(ref, prompts_chosen + prompts_rejected, **kw)
        if ref_was_training:
            ref.train()
    finally:
        if was_training:
            model.train()
    n = len(rows)
    logratio = policy - reference
    out: dict[str, Any] = {
        "row": np.asarray(rows),
        "chosen_logratio": logratio[:n],
        "rejected_logratio": logratio[n:],
    }
    out["margin"] = out["chosen_logratio"] - out["rejected_logratio"]
    if group_column is not None:
        labels = dataset[group_column]
        out["group"] = np.array([str(labels[i]) for i in rows], dtype=object)
    out["n_dropped"] = n_dropped
    return out


def summarize_margins(margin: np.ndarray, group: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy and mean margin, micro and (with groups) macro.

    Args:
        margin: DPO margins h, shape (n,).
        group: group labels, shape (n,), or None.

    Returns:
        Dict with ``n_pairs``, ``accuracy``, ``margin_mean`` (micro), ``accuracy_macro``, ``margin_mean_macro``
        (equal to the micro ones without groups), ``n_groups`` and ``by_group`` (a pandas DataFrame indexed by
        group with columns ``n``, ``accuracy``, ``margin_mean``; None without groups).
    """
    import pandas as pd

    margin = np.asarray(margin, dtype=np.float64)
    if margin.size == 0:
        raise ValueError("no pairs to summarize")
    if not np.isfinite(margin).all():
        raise ValueError(f"non-finite margins at pairs {np.flatnonzero(~np.isfinite(margin))[:10].tolist()}")
    hit = margin > 0
    res: dict[str, Any] = {
        "n_pairs": int(margin.size),
        "accuracy": float(hit.mean()),
        "margin_mean": float(margin.mean()),
    }
    if group is None:
        res.update(
            accuracy_macro=res["accuracy"], margin_mean_macro=res["margin_mean"], n_groups=1, by_group=None
        )
        return res
    frame = pd.DataFrame({"group": np.asarray(group, dtype=object), "hit": hit, "margin": margin})
    by = frame.groupby("group", sort=True).agg(
        n=("hit", "size"), accuracy=("hit", "mean"), margin_mean=("margin", "mean")
    )
    res.update(
        accuracy_macro=float(by["accuracy"].mean()),
        margin_mean_macro=float(by["margin_mean"].mean()),
        n_groups=len(by),
        by_group=by,
    )
    return res


def evaluate(
    model,
    ref_model,
    dataset,
    tokenizer,
    group_column: str | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> dict[str, Any]:
    """Preference accuracy and margins of ``model`` against ``ref_model`` on ``dataset``.

    Args:
        model: the aligned policy (causal LM; a PEFT model may take ``ref_model=None``).
        ref_model: the reference policy.
        dataset: preference pairs in a TRL format with an explicit ``prompt`` (implicit-prompt pairs are refused:
            split them first with ``dataset.map(trl.data_utils.maybe_extract_prompt)``).
        tokenizer: tokenizer of both models.
        group_column: subgroup or annotator column for macro statistics, or None.
        batch_size: sequences per forward.
        max_length: truncation of prompt + completion in tokens (as in training), or None.
        truncation_mode: ``"keep_start"`` or ``"keep_end"``.

    Returns:
        Dict: ``n_pairs``, ``n_dropped`` (pairs whose completion is empty after truncation), ``accuracy`` and
        ``margin_mean`` (micro), ``accuracy_macro`` and ``margin_mean_macro`` (mean over groups), ``n_groups``,
        ``by_group`` (DataFrame or None) and ``pairs`` (DataFrame: ``row``, ``margin``, ``chosen_logratio``,
        ``rejected_logratio`` and ``group``). Margins are in nats of log-ratio (multiply by beta for rewards).
    """
    import pandas as pd

    lr = pair_logratios(
        model, ref_model, dataset, tokenizer, group_column, batch_size, max_length, truncation_mode
    )
    res = summarize_margins(lr["margin"], lr.get("group"))
    res["n_dropped"] = lr["n_dropped"]
    res["pairs"] = pd.DataFrame({k: v for k, v in lr.items() if k != "n_dropped"})
    return res
