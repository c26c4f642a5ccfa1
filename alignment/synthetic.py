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

The tiny model helpers (:func:`build_tokenizer`, :func:`tiny_gpt_neox`, :func:`pretrain`) build everything from
configs in memory, so nothing is fetched from a model hub.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mixlogit.validation import check_count, check_fraction, check_non_negative, check_positive

__all__ = [
    "WORD_VALUES",
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


def tiny_gpt_neox(
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    max_positions: int = 64,
):
    """A tiny GPT-NeoX (Pythia's architecture) built from a config, randomly initialised with ``seed``.

    Args:
        tokenizer: gives the vocabulary size and the pad/eos ids.
        hidden_size, num_layers, num_heads: model width, depth and attention heads.
        seed: seed of the weight initialisation.
        max_positions: maximum sequence length in tokens.

    Returns:
        ``transformers.GPTNeoXForCausalLM`` in float32, in train mode.
    """
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config)


def pretrain(
    model,
    tokenizer,
    texts: Sequence[str],
    steps: int = 150,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Briefly pretrain a causal LM on ``texts`` (next-token loss, AdamW), in place.

    Returns:
        The loss of each step (nats per token).
    """
    import torch
    from tqdm.auto import tqdm

    texts = [t + tokenizer.eos_token for t in texts]
    # Right padding, as TRL's preference collator pads: positions then count from the first real token.
    enc = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="Pretraining the tiny LM", disable=not progress, leave=False):
        idx = torch.randint(len(texts), (batch_size,), generator=gen)
        out = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    model.eval()
    return losses
