"""A synthetic pluralistic preference task, and a tiny causal LM that can learn it on a CPU.

The task: a prompt asks for a short review of an item; a response is a few words from a small vocabulary. An
oracle reward scores a response as the sum of its words' values (a linear score of bag-of-words features).
Annotators are nested in groups, and annotator a prefers y1 over y2 with the Bradley-Terry probability
``sigmoid(beta_a * (r(y1) - r(y2)))``, where the strengths are lognormal:

    log beta_g = log(base_strength) - h^2 / 2 + h * z_g           (group level, sd = h = heterogeneity)
    log beta_a = log beta_g - (h/2)^2 / 2 + (h / 2) * z_a         (annotator level, sd = h / 2)

so every strength has expectation ``base_strength`` whatever the heterogeneity (the -s^2/2 terms are the
lognormal mean correction). With ``heterogeneity=0`` every annotator has the same strength (plain DPO's
assumption holds); with a large one some groups answer nearly at random and others nearly deterministically.

The tiny model helpers (:func:`build_tokenizer` here; :func:`tiny_gpt_neox` and :func:`pretrain` from
:mod:`alignment.tiny_lm`) build everything from configs in memory, so nothing is fetched from a model hub.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mixlogit.validation import check_count, check_fraction, check_non_negative, check_positive

from .tiny_lm import pretrain, tiny_gpt_neox

__all__ = [
    "ARMS",
    "LEVELS",
    "WORD_VALUES",
    "BenchmarkTask",
    "benchmark_task",
    "build_tokenizer",
    "oracle_reward",
    "pluralistic_task",
    "pretrain",
    "task_texts",
    "tiny_gpt_neox",
    "train_test_split",
]

# Oracle values of the response words; the oracle reward of a response is the sum over its words.
WORD_VALUES: dict[str, float] = {
    "superb": 1.0,
    "great": 0.75,
    "good": 0.5,
    "nice": 0.25,
    "plain": 0.0,
    "dull": -0.25,
    "weak": -0.5,
    "bad": -0.75,
    "awful": -1.0,
}
_ITEMS = ["film", "book", "song", "meal", "game", "hotel", "phone", "class", "park", "show"]
_VERBS = ["review", "describe", "rate", "judge"]
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<unk>"


def oracle_reward(response: str) -> float:
    """Oracle reward of a response: the sum of :data:`WORD_VALUES` over its words (unknown words count 0)."""
    return float(sum(WORD_VALUES.get(w, 0.0) for w in response.split()))


def _group_names(groups: int | Sequence[str]) -> list[str]:
    if isinstance(groups, (int, np.integer)):
        if groups < 1:
            raise ValueError(
                f"`groups` must be a positive number of groups or a list of names, got {groups}."
            )
        return [f"g{i}" for i in range(int(groups))]
    names = [str(g) for g in groups]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"`groups` must be a non-empty list of distinct names, got {list(groups)!r}.")
    return names


def pluralistic_task(
    n_pairs: int,
    groups: int | Sequence[str] = 4,
    heterogeneity: float = 1.0,
    seed: int = 0,
    *,
    annotators_per_group: int = 3,
    base_strength: float = 2.0,
    response_words: int = 3,
    min_oracle_gap: float = 0.25,
):
    """Generate a synthetic pluralistic preference dataset in TRL's standard format.

    Args:
        n_pairs: number of preference pairs (rows).
        groups: number of annotator groups, or their names.
        heterogeneity: sd of the group-level log-strengths (the annotator level has sd ``heterogeneity / 2``);
            0 means every annotator has strength ``base_strength``.
        seed: seed of every random draw (strengths, prompts, responses, labels).
        annotators_per_group: annotators nested in each group.
        base_strength: expected Bradley-Terry strength of an annotator (per unit of oracle reward).
        response_words: words in each response.
        min_oracle_gap: responses whose oracle rewards differ by less are redrawn (no near ties).

    Returns:
        ``datasets.Dataset`` with ``n_pairs`` rows and columns ``prompt`` (str), ``chosen`` and ``rejected``
        (str, each starting with a space so that ``prompt + chosen`` tokenizes at a word boundary), ``group``,
        ``annotator`` (str), ``strength`` (the annotator's true beta, float) and ``oracle_margin``
        (``r(chosen) - r(rejected)``, negative where the annotator preferred the worse response).
    """
    import datasets

    check_count("n_pairs", n_pairs)
    check_non_negative("heterogeneity", heterogeneity)
    check_count("annotators_per_group", annotators_per_group)
    check_count("response_words", response_words)
    check_positive("base_strength", base_strength)
    names = _group_names(groups)
    rng = np.random.default_rng(seed)
    h, h_a = float(heterogeneity), float(heterogeneity) / 2
    log_group = math.log(base_strength) - h**2 / 2 + h * rng.standard_normal(len(names))
    log_annot = (
        log_group[:, None] - h_a**2 / 2 + h_a * rng.standard_normal((len(names), annotators_per_group))
    )
    strengths = np.exp(log_annot)

    words = list(WORD_VALUES)
    values = np.array([WORD_VALUES[w] for w in words])
    rows: dict[str, list] = {k: [] for k in ("prompt", "chosen", "rejected", "group", "annotator")}
    rows["strength"], rows["oracle_margin"] = [], []
    for _ in range(n_pairs):
        g = int(rng.integers(len(names)))
        a = int(rng.integers(annotators_per_group))
        item = _ITEMS[int(rng.integers(len(_ITEMS)))]
        verb = _VERBS[int(rng.integers(len(_VERBS)))]
        while True:
            idx = rng.integers(len(words), size=(2, response_words))
            r1, r2 = values[idx[0]].sum(), values[idx[1]].sum()
            if abs(r1 - r2) >= min_oracle_gap:
                break
        y1 = " " + " ".join(words[i] for i in idx[0])
        y2 = " " + " ".join(words[i] for i in idx[1])
        beta = float(strengths[g, a])
        p1 = 1.0 / (1.0 + math.exp(-beta * (r1 - r2)))
        if rng.random() < p1:
            chosen, rejected, margin = y1, y2, r1 - r2
        else:
            chosen, rejected, margin = y2, y1, r2 - r1
        rows["prompt"].append(f"{verb} the {item} :")
        rows["chosen"].append(chosen)
        rows["rejected"].append(rejected)
        rows["group"].append(names[g])
        rows["annotator"].append(f"{names[g]}-a{a}")
        rows["strength"].append(beta)
        rows["oracle_margin"].append(float(margin))
    return datasets.Dataset.from_dict(rows)


def train_test_split(dataset, test_size: float = 0.2, seed: int = 0, oracle_labels: bool = True):
    """Split a :func:`pluralistic_task` dataset into train and held-out parts.

    Args:
        dataset: output of :func:`pluralistic_task`.
        test_size: share of rows held out (0 < test_size < 1).
        seed: seed of the shuffle.
        oracle_labels: relabel the held-out pairs by the oracle (``chosen`` is the response with the higher oracle
            reward), so that held-out preference accuracy measures agreement with the oracle rather than with
            noisy annotators.

    Returns:
        ``(train, test)`` datasets with the same columns.
    """
    check_fraction("test_size", test_size)
    parts = dataset.train_test_split(test_size=test_size, seed=seed)
    train, test = parts["train"], parts["test"]
    if oracle_labels:

        def relabel(ex):
            if ex["oracle_margin"] < 0:
                ex["chosen"], ex["rejected"] = ex["rejected"], ex["chosen"]
                ex["oracle_margin"] = -ex["oracle_margin"]
            return ex

        test = test.map(relabel, desc="Relabeling held-out pairs by the oracle")
    return train, test


def task_texts(dataset=None) -> list[str]:
    """Texts of the task for tokenizer training and causal-LM pretraining.

    Every prompt followed by each of its two responses when ``dataset`` is given, plus one line listing the whole
    vocabulary so that no task word is ever unknown.
    """
    texts = [" ".join(_VERBS + ["the"] + _ITEMS + [":"] + list(WORD_VALUES))]
    if dataset is not None:
        for p, c, r in zip(dataset["prompt"], dataset["chosen"], dataset["rejected"], strict=True):
            texts.append(p + c)
            texts.append(p + r)
    return texts


def build_tokenizer(texts: Sequence[str] | None = None):
    """Train a word-level tokenizer in memory and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: training texts (default: :func:`task_texts`), split on whitespace.

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with ``<pad>``, ``<eos>`` and ``<unk>`` special tokens, left
        padding for prompts as TRL expects, and a plain chat template; no hub access.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD_TOKEN, EOS_TOKEN, UNK_TOKEN], min_frequency=1)
    tok.train_from_iterator(list(texts) if texts is not None else task_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN
    )
    fast.padding_side = "left"
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    return fast


# ---------------------------------------------------------------------------------------------- the benchmark task
#: Heterogeneity levels of the benchmark task: the sd of the annotators' log-strength.
LEVELS = (0.0, 0.5, 1.0, 1.5)
#: Arms of the benchmark task: what else differs between annotators.
ARMS = {
    "strength": "strength heterogeneity only",
    "direction": "one group in four values 'superb' and 'awful' the other way (their own reward flips those words)",
    "clickers": "one annotator in five labels uniformly at random",
}
_FLIPPED_WORDS = ("superb", "awful")
_HELDOUT_PROMPTS = 8  # of the 40 prompts, never in a pair: the prompts of the sampling-based metrics


@dataclass
class BenchmarkTask:
    """One draw of the benchmark task (see :func:`benchmark_task`): three splits and what generated them.

    Every split has the columns ``prompt``, ``chosen``, ``rejected`` (the annotator's noisy label), ``annotator_id``,
    ``group``, ``true_strength`` (the annotator's beta per unit of reward; 0 for a random clicker),
    ``oracle_margin`` (``r(chosen) - r(rejected)`` under the annotator's group's own reward: positive where the
    label agrees with the oracle), ``common_margin`` (the same under the majority's reward, the one the win rate
    scores), ``p_true`` (the generator's probability that this annotator prefers ``chosen``), ``minority`` and
    ``clicker`` (bool).
    """

    train: Any
    validation: Any
    test: Any
    heldout_prompts: list[str]
    annotators: Any  # pandas DataFrame: annotator_id, group, true_strength, log_strength, minority, clicker
    base_strength: float
    level: float
    arm: str
    seed: int
    expected_label_accuracy: float
    label_accuracy: dict[str, float]
    realized_sd_log_strength: float


def _check_level_arm(level: float, arm: str) -> float:
    matches = [v for v in LEVELS if abs(float(level) - v) < 1e-9]
    if not matches:
        raise ValueError(f"unknown heterogeneity level {level!r}; accepted: {', '.join(map(str, LEVELS))}")
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; accepted: {', '.join(ARMS)}")
    return matches[0]


def _balanced(rng, n_annotators: int, n: int) -> np.ndarray:
    """Annotator of each of n pairs, every annotator labelling n / n_annotators of them (+-1)."""
    out = np.resize(rng.permutation(n_annotators), n)
    rng.shuffle(out)
    return out


def _draw_pairs(rng, n: int, response_words: int, min_gap: float, *rewards: np.ndarray) -> np.ndarray:
    """Word indices of n response pairs, shape (n, 2, response_words), whose gap under every reward (word values)
    is at least ``min_gap``: no near ties for the majority or for the minority of the "direction" arm."""
    idx = rng.integers(len(rewards[0]), size=(n, 2, response_words))
    while True:
        tie = np.zeros(n, bool)
        for values in rewards:
            tie |= np.abs(values[idx[:, 0]].sum(-1) - values[idx[:, 1]].sum(-1)) < min_gap
        if not tie.any():
            return idx
        idx[tie] = rng.integers(len(rewards[0]), size=(int(tie.sum()), 2, response_words))


def benchmark_task(level: float, arm: str = "strength", seed: int = 0, *, n_groups: int = 50,
                   annotators_per_group: int = 4, n_train: int = 2000, n_validation: int = 1000, n_test: int = 5000,
                   label_accuracy: float = 0.80, clicker_share: float = 0.2, response_words: int = 3,
                   min_oracle_gap: float = 0.25) -> BenchmarkTask:
    """The pluralistic benchmark's task: many annotators, known strengths, a label accuracy fixed across levels.

    Annotator a (of ``n_groups * annotators_per_group``, nested in groups) has strength
    ``beta_a = b * exp(level * (sqrt(3/4) z_g + sqrt(1/4) z_a))`` with standard normal z's, so the sd of log-strength
    is ``level`` (three quarters of its variance between groups), and prefers the first response of a pair with
    probability ``sigmoid(beta_a * (r_a(y1) - r_a(y2)))``, r_a the bag-of-words reward of its group. The base
    strength b is solved for so that the expected share of labels agreeing with the annotator's own oracle is
    ``label_accuracy`` at every level and arm. The texts (prompts, responses, who labels what), the z's and the
    uniforms deciding each label depend on ``seed`` only, so levels and arms of one seed are paired draws.

    Args:
        level: sd of log-strength, one of :data:`LEVELS`.
        arm: one of :data:`ARMS`.
        seed: seed of every draw.
        n_groups, annotators_per_group: annotators, nested in groups (every fourth group is the minority of the
            "direction" arm).
        n_train, n_validation, n_test: pairs per split, each annotator labelling an equal share of each split.
        label_accuracy: expected agreement of the labels with the annotators' own oracle (0.5 < it < 1).
        clicker_share: share of annotators who click at random in the "clickers" arm.
        response_words, min_oracle_gap: words per response; pairs whose rewards differ by less (under the majority's
            or the direction arm minority's values, in every arm) are redrawn.

    Returns:
        :class:`BenchmarkTask`. Prompts of :attr:`BenchmarkTask.heldout_prompts` appear in no pair.

    Raises:
        ValueError: an unknown level or arm (the accepted ones are listed), or a label accuracy that no base strength
            reaches at this level and arm.
    """
    import datasets
    import pandas as pd
    from scipy import optimize, special

    level = _check_level_arm(level, arm)
    for name, value in (("n_groups", n_groups), ("annotators_per_group", annotators_per_group),
                        ("n_train", n_train), ("n_validation", n_validation), ("n_test", n_test),
                        ("response_words", response_words)):
        check_count(name, value)
    check_fraction("label_accuracy", label_accuracy)
    check_fraction("clicker_share", clicker_share)
    words = list(WORD_VALUES)
    common = np.array([WORD_VALUES[w] for w in words])
    own = common.copy()
    for w in _FLIPPED_WORDS:
        own[words.index(w)] *= -1

    text_rng = np.random.default_rng([seed, 11])
    prompts = [f"{v} the {i} :" for v in _VERBS for i in _ITEMS]
    order = text_rng.permutation(len(prompts))
    heldout = [prompts[k] for k in order[:_HELDOUT_PROMPTS]]
    seen = [prompts[k] for k in order[_HELDOUT_PROMPTS:]]
    n_annot = n_groups * annotators_per_group
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    who = np.concatenate([_balanced(text_rng, n_annot, n) for n in sizes.values()])
    n = len(who)
    prompt_of = text_rng.integers(len(seen), size=n)
    idx = _draw_pairs(text_rng, n, response_words, min_oracle_gap, common, own)

    z_rng = np.random.default_rng([seed, 12])
    dev = (math.sqrt(0.75) * z_rng.standard_normal(n_groups)[:, None]
           + math.sqrt(0.25) * z_rng.standard_normal((n_groups, annotators_per_group))).reshape(-1)
    group_of = np.repeat(np.arange(n_groups), annotators_per_group)
    clicker = np.zeros(n_annot, bool)
    if arm == "clickers":
        clicker[np.random.default_rng([seed, 13]).permutation(n_annot)[: round(clicker_share * n_annot)]] = True
    minority = (group_of % 4 == 3) if arm == "direction" else np.zeros(n_annot, bool)

    gap_common = common[idx[:, 0]].sum(-1) - common[idx[:, 1]].sum(-1)
    gap_own_all = own[idx[:, 0]].sum(-1) - own[idx[:, 1]].sum(-1)
    gap = np.where(minority[who], gap_own_all, gap_common)
    relative = np.exp(level * dev)  # beta_a / b

    def p_first(log_b: float) -> np.ndarray:
        p = special.expit(np.exp(log_b) * relative[who] * gap)
        return np.where(clicker[who], 0.5, p)

    def expected_accuracy(log_b: float) -> float:
        p = p_first(log_b)
        return float(np.mean(np.where(gap > 0, p, np.where(gap < 0, 1 - p, 0.5))))

    lo, hi = expected_accuracy(-10.0), expected_accuracy(10.0)
    if not lo < label_accuracy < hi:
        raise ValueError(
            f"no base strength gives label accuracy {label_accuracy} at level {level} (arm {arm!r}): the expected "
            f"accuracy ranges over ({lo:.3f}, {hi:.3f}) from b = e^-10 to e^10"
        )
    log_b = optimize.brentq(lambda t: expected_accuracy(t) - label_accuracy, -10.0, 10.0, xtol=1e-12)
    p1 = p_first(log_b)
    first = np.random.default_rng([seed, 14]).random(n) < p1
    b = math.exp(log_b)
    strength = np.where(clicker, 0.0, b * relative)

    def text(k: int, j: int) -> str:
        return " " + " ".join(words[i] for i in idx[k, j])

    sign = np.where(first, 1.0, -1.0)
    columns = {
        "prompt": [seen[k] for k in prompt_of],
        "chosen": [text(k, 0 if first[k] else 1) for k in range(n)],
        "rejected": [text(k, 1 if first[k] else 0) for k in range(n)],
        "annotator_id": [f"g{group_of[a]:02d}-a{a % annotators_per_group}" for a in who],
        "group": [f"g{group_of[a]:02d}" for a in who],
        "true_strength": strength[who].tolist(),
        "oracle_margin": (sign * gap).tolist(),
        "common_margin": (sign * gap_common).tolist(),
        "p_true": np.where(first, p1, 1 - p1).tolist(),
        "minority": minority[who].tolist(),
        "clicker": clicker[who].tolist(),
    }
    full = datasets.Dataset.from_dict(columns)
    bounds = np.cumsum([0, *sizes.values()])
    splits = {name: full.select(range(bounds[i], bounds[i + 1])) for i, name in enumerate(sizes)}

    def realized(split) -> float:
        m = np.asarray(split["oracle_margin"])
        return float(np.mean(np.where(m > 0, 1.0, np.where(m < 0, 0.0, 0.5))))

    annotators = pd.DataFrame({
        "annotator_id": [f"g{g:02d}-a{a % annotators_per_group}" for a, g in enumerate(group_of)],
        "group": [f"g{g:02d}" for g in group_of],
        "true_strength": strength,
        "log_strength": np.where(clicker, -np.inf, np.log(b * relative)),
        "minority": minority,
        "clicker": clicker,
    })
    informative = ~clicker
    return BenchmarkTask(
        train=splits["train"], validation=splits["validation"], test=splits["test"], heldout_prompts=heldout,
        annotators=annotators, base_strength=b, level=level, arm=arm, seed=seed,
        expected_label_accuracy=expected_accuracy(log_b),
        label_accuracy={name: realized(split) for name, split in splits.items()},
        realized_sd_log_strength=float(np.std(np.log(b * relative[informative]), ddof=1)),
    )
