"""Metrics of the pluralistic benchmark: held-out likelihood and calibration, oracle accuracy, KL to the
reference, win rate under the oracle reward, and the win-rate gain at matched KL.

- **Pair metrics** (:func:`pair_probability_metrics`, :func:`oracle_accuracy`) take numpy arrays over held-out
  preference pairs: a model's probability that the first response is preferred, the noisy label, the
  generator's true probability, DPO margins and oracle reward gaps. Logarithms are natural (nats).
- **Policy metrics** (:func:`sample_completions`, :func:`policy_kl`, :func:`win_rate`) sample completions from
  a causal LM by ancestral sampling (temperature 1, no top-k or top-p truncation, so the samples follow the
  distribution that :func:`alignment.evaluate.sequence_logps` scores) and average over them. Their standard
  errors are Monte Carlo errors given the prompts (held fixed: the spread between prompts is no part of them).
- :func:`matched_kl_gain` compares a method with the DPO frontier (win rate against KL over DPO's beta grid)
  at the method's own KL, since a policy that moves further from its reference can buy win rate with KL.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mixlogit.validation import check_count, check_finite, check_int, check_seed

from .evaluate import sequence_logps, summarize_margins

__all__ = ["matched_kl_gain", "oracle_accuracy", "pair_probability_metrics", "policy_kl",
           "sample_completions", "win_rate"]

#: Probabilities are clipped to [EPS, 1 - EPS] before a logarithm: a certain miss costs 27.6 nats, not inf.
EPS = 1e-12


# ----------------------------------------------------------------------------------------------- validation
def _vector(name: str, value, n: int | None = None, per: str = "pair") -> np.ndarray:
    """A finite 1-D float64 array (of length ``n`` when given); errors name the argument and the bad index."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a 1-D array of numbers, got {type(value).__name__}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if n is not None and arr.size != n:
        raise ValueError(f"{name} must have one value per {per} ({n}), got {arr.size}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name} must be finite; index {bad[0]} is {float(arr[bad[0]])!r} "
                         f"({bad.size} non-finite in all)")
    return arr


def _probability(name: str, value, n: int | None = None) -> np.ndarray:
    arr = _vector(name, value, n)
    bad = np.flatnonzero((arr < 0) | (arr > 1))
    if bad.size:
        raise ValueError(f"{name} must be probabilities in [0, 1]; index {bad[0]} is {float(arr[bad[0]])!r}")
    return arr


def _groups(value, n: int) -> np.ndarray | None:
    import pandas as pd

    if value is None:
        return None
    arr = np.asarray(value, dtype=object)
    if arr.ndim != 1 or arr.size != n:
        raise ValueError(f"group must be a 1-D array with one label per pair ({n}), got shape {arr.shape}")
    bad = np.flatnonzero(pd.isna(arr))
    if bad.size:
        raise ValueError(f"group must have a label for every pair; index {bad[0]} is {arr[bad[0]]!r}")
    return arr


# ----------------------------------------------------------------------------------------------- pair metrics
def _calibration_error(p: np.ndarray, label: np.ndarray, bins: int) -> float:
    """ECE over equal-mass bins of the confidence max(p, 1 - p) (see :func:`pair_probability_metrics`)."""
    confidence = np.maximum(p, 1.0 - p)
    # A pair at exactly p = 1/2 predicts neither side and scores 1/2, so that writing a pair the other way
    # round (p -> 1 - p, label -> 1 - label) changes nothing.
    correct = np.where(p == 0.5, 0.5, ((p > 0.5) == (label == 1)).astype(np.float64))
    # Bin b holds ranks [b n / bins, (b + 1) n / bins); tied confidences all join the bin of their lowest
    # rank, so the order in which the pairs come cannot move a pair from one bin to another.
    first_rank = np.searchsorted(np.sort(confidence), confidence, side="left")
    which = first_rank * bins // p.size
    n_b = np.bincount(which, minlength=bins)
    gap = np.bincount(which, weights=correct - confidence, minlength=bins)
    return float(np.abs(gap[n_b > 0]).sum() / p.size)


def _pair_scores(p: np.ndarray, label: np.ndarray, p_true: np.ndarray | None, bins: int) -> dict[str, float]:
    from scipy.special import rel_entr

    clipped = np.clip(p, EPS, 1.0 - EPS)
    out = {
        "n": int(p.size),
        "nll": float(-np.mean(np.where(label == 1, np.log(clipped), np.log1p(-clipped)))),
        "ece": _calibration_error(p, label, bins),
        "brier": float(np.mean((p - label) ** 2)),
    }
    if p_true is not None:
        out["kl_true"] = float(np.mean(rel_entr(p_true, clipped) + rel_entr(1.0 - p_true, 1.0 - clipped)))
    return out


def pair_probability_metrics(p_hat, label, p_true=None, group=None, bins: int = 10) -> dict[str, Any]:
    """Held-out likelihood and calibration of predicted preference probabilities.

    Args:
        p_hat: shape (n,), the model's probability that the first response of each pair is preferred.
        label: shape (n,), the observed (noisy) label in {0, 1}: 1 where the annotator preferred the first.
        p_true: shape (n,), the generator's true probability that the first response is preferred, or None.
        group: shape (n,), group labels (any hashable, no missing values), or None.
        bins: number of equal-mass bins of the calibration error.

    Returns:
        Dict with ``n`` (pairs); ``nll``: mean negative log-likelihood of the labels, nats per pair (``p_hat``
        clipped to [1e-12, 1 - 1e-12]); ``kl_true`` (only with ``p_true``): mean Bernoulli
        KL(p_true || p_hat), nats per pair, 0 where ``p_hat == p_true``; ``ece``: expected calibration error;
        ``brier``: mean squared error of ``p_hat`` against the label; ``by_group``: a pandas DataFrame indexed
        by group (sorted) with columns ``n``, ``nll``, ``ece``, ``brier`` (and ``kl_true``), or None.

    The calibration error is that of the predicted side. Each pair predicts its more likely response with
    confidence ``c = max(p_hat, 1 - p_hat)`` in [1/2, 1] and is correct when the label agrees (a pair at
    ``p_hat = 1/2`` scores 1/2). The pairs are sorted by confidence and cut into ``bins`` bins of equal size
    (tied confidences stay in one bin), and ``ECE = sum_b (n_b / n) |mean correct_b - mean c_b|``. Which
    response of a pair is "first" is arbitrary, and ECE, NLL, KL and Brier all stay the same when a pair is
    written the other way round (``p -> 1 - p``, ``label -> 1 - label``); a reliability diagram of
    P(first preferred) would depend on that ordering. With calibrated probabilities the ECE of n pairs is
    binomial noise of order ``sqrt(bins / n)``, not 0.
    """
    p = _probability("p_hat", p_hat)
    y = _vector("label", label, p.size)
    bad = np.flatnonzero((y != 0) & (y != 1))
    if bad.size:
        raise ValueError(f"label must be 0 or 1 (1: the first response preferred); index {bad[0]} is "
                         f"{float(y[bad[0]])!r}")
    q = None if p_true is None else _probability("p_true", p_true, p.size)
    g = _groups(group, p.size)
    check_count("bins", bins)
    res: dict[str, Any] = _pair_scores(p, y, q, bins)
    res["by_group"] = None
    if g is not None:
        import pandas as pd

        rows = {name: _pair_scores(p[g == name], y[g == name], None if q is None else q[g == name], bins)
                for name in pd.unique(g)}
        res["by_group"] = pd.DataFrame.from_dict(rows, orient="index").sort_index()
        res["by_group"].index.name = "group"
    return res


def oracle_accuracy(margin, oracle_gap, group=None) -> dict[str, Any]:
    """Agreement of the policy's preferences with the oracle: micro, macro over groups, and the worst group.

    Args:
        margin: shape (n,), the policy's DPO margin h(first, second) (nats of log-ratio).
        oracle_gap: shape (n,), the oracle reward difference r(first) - r(second); never 0.
        group: shape (n,), group labels, or None.

    Returns:
        Dict with ``n_pairs``; ``accuracy`` (micro: the share of pairs whose margin has the oracle gap's sign;
        a zero margin is a miss); ``accuracy_macro`` (mean of the group accuracies); ``worst_group`` (the
        group with the lowest accuracy, the first in sorted order on ties), ``worst_accuracy``, ``n_groups``;
        ``by_group`` (DataFrame indexed by group: ``n``, ``accuracy``, and ``margin_mean`` of the margin
        oriented by the oracle, ``h * sign(gap)``). Without groups the macro and worst values are the micro
        one, and ``worst_group`` and ``by_group`` are None.
    """
    h = _vector("margin", margin)
    gap = _vector("oracle_gap", oracle_gap, h.size)
    zero = np.flatnonzero(gap == 0)
    if zero.size:
        raise ValueError(f"oracle_gap must be non-zero (a tie has no oracle preference); index {zero[0]} "
                         f"is 0")
    g = _groups(group, h.size)
    # Oriented toward the oracle's preferred response, the margin is positive exactly where the policy agrees.
    res = summarize_margins(h * np.sign(gap), g)
    out: dict[str, Any] = {key: res[key] for key in ("n_pairs", "accuracy", "accuracy_macro")}
    out.update(worst_group=None, worst_accuracy=res["accuracy"], n_groups=res["n_groups"],
               by_group=res["by_group"])
    if g is not None:
        worst = res["by_group"]["accuracy"].idxmin()
        out.update(worst_group=worst, worst_accuracy=float(res["by_group"].loc[worst, "accuracy"]))
    return out


# ----------------------------------------------------------------------------------------------- sampling
@contextlib.contextmanager
def _eval_mode(model):
    """The model in eval mode for the duration (dropout off), then back in the mode it was in."""
    mode = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(mode)


def _prompt_ids(tokenizer, prompts) -> list[list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")
    ids = tokenizer(list(prompts))["input_ids"]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompts[{i}] ({prompts[i]!r}) has no tokens")
    return [list(r) for r in ids]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _sample_ids(model, tokenizer, prompt_ids, n_per_prompt, max_new_tokens, seed) -> list[list[list[int]]]:
    """Token ids of ``n_per_prompt`` completions per prompt, up to and including the first eos (if any)."""
    import torch
    from transformers import GenerationConfig

    eos, pad = tokenizer.eos_token_id, _pad_id(tokenizer)
    if eos is None:
        raise ValueError("the tokenizer has no eos token, so sampled completions could never stop")
    device = next(model.parameters()).device
    width = max(len(r) for r in prompt_ids)
    # Left padding: every prompt ends where generation starts. generate counts positions from the attention
    # mask, so a padded prompt sees the positions that sequence_logps gives it unpadded.
    input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, row in enumerate(prompt_ids):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention[i, width - len(row):] = 1
    # A config of its own: a checkpoint's generation defaults (top_k=50, a temperature, a repetition
    # penalty) would sample from another distribution than the one that is scored.
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, num_return_sequences=n_per_prompt,
                              eos_token_id=eos, pad_token_id=pad, use_cache=True)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), _eval_mode(model):
        torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             generation_config=config)
    new = out[:, width:].cpu().numpy()
    is_eos = new == eos
    # A finished row is filled with pad ids after its eos; a pad id sampled before any eos is a real token.
    length = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, new.shape[1])
    rows = [new[i, : length[i]].tolist() for i in range(new.shape[0])]
    return [rows[k * n_per_prompt : (k + 1) * n_per_prompt] for k in range(len(prompt_ids))]


def _decode(tokenizer, ids: list[list[list[int]]]) -> list[list[str]]:
    flat = tokenizer.batch_decode([r for per in ids for r in per], skip_special_tokens=True)
    n = len(ids[0])
    return [flat[k * n : (k + 1) * n] for k in range(len(ids))]


def _check_sampling(n_per_prompt, max_new_tokens, seed, minimum: int = 1) -> None:
    check_int("n_per_prompt", n_per_prompt, minimum)
    check_count("max_new_tokens", max_new_tokens)
    check_seed(seed)


def sample_completions(model, tokenizer, prompts: Sequence[str], n_per_prompt: int, max_new_tokens: int,
                       seed: int) -> list[list[str]]:
    """Ancestral samples of completions from a causal LM.

    Temperature 1 and no top-k or top-p truncation, so the completions follow the model's own distribution.
    Each completion stops at the eos token or after ``max_new_tokens`` tokens. All prompts are sampled in one
    batch. The torch generator is seeded with ``seed`` inside ``torch.random.fork_rng``, so the caller's
    global random state is the same after the call as before it.

    Args:
        model: a causal LM with ``generate``.
        tokenizer: its tokenizer (must have an eos token).
        prompts: P prompt strings.
        n_per_prompt: completions per prompt.
        max_new_tokens: most tokens in a completion, its eos included.
        seed: seed of the sampling.

    Returns:
        P lists of ``n_per_prompt`` strings: the decoded completions, without prompt or special tokens.
    """
    _check_sampling(n_per_prompt, max_new_tokens, seed)
    ids = _sample_ids(model, tokenizer, _prompt_ids(tokenizer, prompts), n_per_prompt, max_new_tokens, seed)
    return _decode(tokenizer, ids)


def _by_prompt_mean(values: np.ndarray) -> tuple[float, float]:
    """Mean over prompts of the per-prompt means of ``values`` (P, n), and its Monte Carlo standard error
    given the prompts: ``sqrt(sum_p s_p^2 / n) / P`` with ``s_p^2`` the sample variance within prompt p."""
    p, n = values.shape
    return float(values.mean()), float(math.sqrt(values.var(axis=1, ddof=1).sum() / n) / p)


def _logps(model, prompt_ids, ids, pad: int, batch_size: int) -> np.ndarray:
    """log model(completion | prompt) of every sample, shape (P, n). Each distinct (prompt, completion) is
    scored once: a trained policy repeats its likely completions, so this saves most forward passes."""
    keys = [(k, tuple(row)) for k, per in enumerate(ids) for row in per]
    unique = list(dict.fromkeys(keys))
    pairs = [(prompt_ids[k], list(row)) for k, row in unique]
    with _eval_mode(model):
        lp = sequence_logps(model, pairs, pad, batch_size=batch_size)
    where = {key: i for i, key in enumerate(unique)}
    return lp[[where[key] for key in keys]].reshape(len(ids), -1)


def policy_kl(policy, ref, tokenizer, prompts: Sequence[str], n_per_prompt: int = 16,
              max_new_tokens: int = 6, seed: int = 0, batch_size: int = 128) -> dict[str, Any]:
    """Monte Carlo KL(pi || pi_ref) of the policy from its reference on held-out prompts.

    ``KL_x = E_{y ~ pi(.|x)} [log pi(y|x) - log ref(y|x)]`` per prompt x, estimated from ``n_per_prompt``
    completions sampled from the policy (as :func:`sample_completions` samples them: same ``seed``, same
    completions) and averaged over the prompts. Each log-probability is that of the completion the sampler
    emitted: its tokens and its eos or, for a completion cut at ``max_new_tokens``, its tokens without an eos.
    This is the KL between the two models' distributions over completions of at most ``max_new_tokens``.

    Args:
        policy, ref: causal LMs sharing ``tokenizer``.
        tokenizer: their tokenizer (must have an eos token).
        prompts: P prompt strings.
        n_per_prompt: completions per prompt (>= 2, for the standard error).
        max_new_tokens: most tokens in a completion, its eos included.
        seed: seed of the sampling.
        batch_size: sequences per scoring forward.

    Returns:
        Dict with ``kl`` (nats per completion, mean over prompts), ``se`` (its Monte Carlo standard error
        given the prompts), ``kl_by_prompt`` (shape (P,)), ``truncated`` (share of completions cut at
        ``max_new_tokens`` without an eos), ``n_per_prompt`` and ``samples`` (the decoded completions, P lists
        of ``n_per_prompt`` strings, which :func:`win_rate` takes as ``policy_samples``).
    """
    _check_sampling(n_per_prompt, max_new_tokens, seed, minimum=2)
    check_count("batch_size", batch_size)
    prompt_ids = _prompt_ids(tokenizer, prompts)
    ids = _sample_ids(policy, tokenizer, prompt_ids, n_per_prompt, max_new_tokens, seed)
    pad = _pad_id(tokenizer)
    diff = _logps(policy, prompt_ids, ids, pad, batch_size) - _logps(ref, prompt_ids, ids, pad, batch_size)
    kl, se = _by_prompt_mean(diff)
    eos = tokenizer.eos_token_id
    truncated = float(np.mean([row[-1] != eos for per in ids for row in per]))
    return {"kl": kl, "se": se, "kl_by_prompt": diff.mean(axis=1), "truncated": truncated,
            "n_per_prompt": int(n_per_prompt), "samples": _decode(tokenizer, ids)}


def _check_samples(name: str, samples, n_prompts: int, n_per_prompt: int) -> list[list[str]]:
    shape_ok = isinstance(samples, Sequence) and len(samples) == n_prompts and all(
        isinstance(per, Sequence) and not isinstance(per, str) and len(per) == n_per_prompt
        for per in samples)
    if not shape_ok:
        raise ValueError(f"{name} must be {n_prompts} lists (one per prompt) of {n_per_prompt} completions "
                         f"(n_per_prompt), as sample_completions returns them")
    return [list(per) for per in samples]


def _rewards(name: str, reward_fn, samples: list[list[str]]) -> np.ndarray:
    out = np.array([[float(reward_fn(y)) for y in per] for per in samples])
    bad = np.argwhere(~np.isfinite(out))
    if bad.size:
        k, j = bad[0]
        raise ValueError(f"reward_fn returned {float(out[k, j])!r} for {name}[{k}][{j}] "
                         f"({samples[k][j]!r}); rewards must be finite")
    return out


def win_rate(policy, ref, tokenizer, prompts: Sequence[str], reward_fn: Callable[[str], float],
             n_per_prompt: int = 16, max_new_tokens: int = 6, seed: int = 0, *,
             policy_samples: list[list[str]] | None = None,
             ref_samples: list[list[str]] | None = None) -> dict[str, Any]:
    """Win rate of the policy against its reference under a reward: P(r(y_pi) > r(y_ref)) + P(tie) / 2.

    For each prompt, ``n_per_prompt`` completions are sampled from the policy (seed ``seed``) and as many from
    the reference (seed ``seed + 1``, so that a policy compared with itself gets independent samples); the
    j-th of one is paired with the j-th of the other. A pair scores 1 (the policy's reward is higher), 1/2
    (equal rewards) or 0.

    Args:
        policy, ref: causal LMs sharing ``tokenizer`` (either may be None when its samples are given).
        tokenizer: their tokenizer.
        prompts: P prompt strings.
        reward_fn: reward of a decoded completion (str -> finite float), e.g. ``synthetic.oracle_reward``.
        n_per_prompt: completions per prompt and model (>= 2).
        max_new_tokens: most tokens in a completion, its eos included.
        seed: seed of the sampling.
        policy_samples: the policy's completions (P lists of ``n_per_prompt`` strings, e.g. ``samples`` of
            :func:`policy_kl` with the same ``seed``), or None to sample them here.
        ref_samples: the reference's completions, so that a benchmark samples the reference once per seed
            (:func:`sample_completions` with seed ``seed + 1`` gives the ones sampled here), or None.

    Returns:
        Dict with ``win_rate`` and ``se`` (its Monte Carlo standard error given the prompts), ``tie_rate``,
        ``reward_policy`` and ``reward_ref`` (mean rewards), ``n_pairs``, ``samples`` and ``ref_samples``.
    """
    _check_sampling(n_per_prompt, max_new_tokens, seed, minimum=2)
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be a callable str -> float, got {type(reward_fn).__name__}")
    prompt_ids = _prompt_ids(tokenizer, prompts)
    drawn = []
    for name, model, given, s in (("policy_samples", policy, policy_samples, seed),
                                  ("ref_samples", ref, ref_samples, seed + 1)):
        if given is None:
            ids = _sample_ids(model, tokenizer, prompt_ids, n_per_prompt, max_new_tokens, s)
            given = _decode(tokenizer, ids)
        drawn.append(_check_samples(name, given, len(prompt_ids), n_per_prompt))
    r_pi = _rewards("policy_samples", reward_fn, drawn[0])
    r_ref = _rewards("ref_samples", reward_fn, drawn[1])
    score = (r_pi > r_ref) + 0.5 * (r_pi == r_ref)
    rate, se = _by_prompt_mean(score)
    return {"win_rate": rate, "se": se, "tie_rate": float(np.mean(r_pi == r_ref)),
            "reward_policy": float(r_pi.mean()), "reward_ref": float(r_ref.mean()),
            "n_pairs": int(score.size), "samples": drawn[0], "ref_samples": drawn[1]}


# ----------------------------------------------------------------------------------------------- frontier
def matched_kl_gain(kl: float, win: float, frontier_kl, frontier_win) -> dict[str, Any]:
    """Win-rate gain of a method over the DPO frontier at the method's KL.

    The frontier is DPO's (KL, win rate) points over its beta grid. Its win rate at the method's KL is the
    linear interpolation in log KL between the neighbouring points (sorted by KL), and the gain is the
    method's win rate minus that value. Nothing is extrapolated beyond the frontier's KL range.

    Args:
        kl: the method's KL(pi || pi_ref), nats (a number).
        win: the method's win rate (a number).
        frontier_kl: shape (m,), m >= 2 distinct positive KLs of the frontier's points (any order).
        frontier_win: shape (m,), their win rates.

    Returns:
        Dict with ``gain`` (``win`` minus the frontier's win rate at ``kl``), ``frontier_win`` (that
        interpolated value) and ``inside`` (whether ``kl`` lies in the frontier's KL range, end points
        included). Outside it (also for ``kl <= 0``, which a Monte Carlo estimate near 0 can give) ``gain``
        and ``frontier_win`` are NaN and ``inside`` is False.
    """
    kl, win = check_finite("kl", kl), check_finite("win", win)
    fk = _vector("frontier_kl", frontier_kl)
    fw = _vector("frontier_win", frontier_win, fk.size, per="frontier point")
    if fk.size < 2:
        raise ValueError(f"frontier_kl must have at least 2 points to interpolate between, got {fk.size}")
    bad = np.flatnonzero(fk <= 0)
    if bad.size:
        raise ValueError(f"frontier_kl must be positive (the interpolation is in log KL); index {bad[0]} is "
                         f"{float(fk[bad[0]])!r}")
    order = np.argsort(fk, kind="stable")
    fk, fw = fk[order], fw[order]
    dup = np.flatnonzero(np.diff(fk) == 0)
    if dup.size:
        raise ValueError(f"frontier_kl must be distinct; {float(fk[dup[0]])!r} appears more than once")
    if not fk[0] <= kl <= fk[-1]:
        return {"gain": math.nan, "frontier_win": math.nan, "inside": False}
    at = float(np.interp(math.log(kl), np.log(fk), fw))
    return {"gain": win - at, "frontier_win": at, "inside": True}
