"""The synthetic pluralistic task: reproducible, in TRL's format, preferences following the stated model."""

import math
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: F401 (the task builders return datasets.Dataset)

from alignment import synthetic


def test_columns_format_and_reproducibility():
    a = synthetic.pluralistic_task(50, groups=3, heterogeneity=1.0, seed=7)
    b = synthetic.pluralistic_task(50, groups=3, heterogeneity=1.0, seed=7)
    c = synthetic.pluralistic_task(50, groups=3, heterogeneity=1.0, seed=8)
    assert a.column_names == [
        "prompt",
        "chosen",
        "rejected",
        "group",
        "annotator",
        "strength",
        "oracle_margin",
    ]
    assert len(a) == 50
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()
    assert set(a["group"]) <= {"g0", "g1", "g2"}
    for row in a:
        assert (
            isinstance(row["prompt"], str)
            and row["chosen"].startswith(" ")
            and row["rejected"].startswith(" ")
        )
        # The oracle margin is r(chosen) - r(rejected), never a near tie.
        r = synthetic.oracle_reward
        assert row["oracle_margin"] == pytest.approx(r(row["chosen"]) - r(row["rejected"]))
        assert abs(row["oracle_margin"]) >= 0.25 - 1e-12


def test_zero_heterogeneity_gives_one_strength_and_named_groups():
    ds = synthetic.pluralistic_task(
        40, groups=["north", "south"], heterogeneity=0.0, seed=0, base_strength=1.5
    )
    assert set(ds["strength"]) == {1.5}
    assert set(ds["group"]) == {"north", "south"}


def test_strength_spread_follows_heterogeneity():
    # Many groups: the sd of log group strength approaches h and E[beta] stays base_strength.
    ds = synthetic.pluralistic_task(4000, groups=200, heterogeneity=1.0, seed=3, annotators_per_group=1)
    by_group = {}
    for g, s in zip(ds["group"], ds["strength"], strict=True):
        by_group[g] = s
    logs = np.log(list(by_group.values()))
    # group sd 1.0 and annotator sd 0.5 add in quadrature: sqrt(1.25) = 1.118
    assert np.std(logs) == pytest.approx(math.sqrt(1.25), rel=0.15)
    assert np.mean(np.exp(logs)) == pytest.approx(2.0, rel=0.25)


def test_labels_follow_bradley_terry():
    # With one strength beta, P(chosen is the oracle-better response) = E[sigmoid(beta |gap|)].
    ds = synthetic.pluralistic_task(6000, groups=1, heterogeneity=0.0, seed=1, base_strength=1.0)
    m = np.asarray(ds["oracle_margin"])
    expected = np.mean(1 / (1 + np.exp(-np.abs(m))))
    assert np.mean(m > 0) == pytest.approx(expected, abs=0.02)


def test_split_relabels_heldout_by_oracle():
    ds = synthetic.pluralistic_task(200, groups=2, heterogeneity=2.0, seed=0)
    assert min(ds["oracle_margin"]) < 0  # some annotators chose the worse response
    train, test = synthetic.train_test_split(ds, test_size=0.25, seed=0)
    assert len(train) == 150 and len(test) == 50
    assert min(test["oracle_margin"]) > 0
    assert min(train["oracle_margin"]) < 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="heterogeneity"):
        synthetic.pluralistic_task(10, 2, -1.0, 0)
    with pytest.raises(ValueError, match="n_pairs"):
        synthetic.pluralistic_task(0, 2, 1.0, 0)
    with pytest.raises(ValueError, match="groups"):
        synthetic.pluralistic_task(10, 0, 1.0, 0)
    with pytest.raises(ValueError, match="test_size"):
        synthetic.train_test_split(synthetic.pluralistic_task(10, 2, 1.0, 0), test_size=1.5)


def test_tokenizer_and_tiny_model_offline():
    import torch

    ds = synthetic.pluralistic_task(30, 2, 1.0, 0)
    tok = synthetic.build_tokenizer(synthetic.task_texts(ds))
    # Every task word is a single known token; the EOS string is split off as its special token.
    text = ds[0]["prompt"] + ds[0]["chosen"] + tok.eos_token
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert ids[-1] == tok.eos_token_id
    assert len(ids) == len(text.replace(tok.eos_token, "").split()) + 1
    model = synthetic.tiny_gpt_neox(tok, hidden_size=32, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads, which spin badly on a loaded machine
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    try:
        losses = synthetic.pretrain(
            model, tok, synthetic.task_texts(ds), steps=30, batch_size=16, seed=0, progress=False
        )
    finally:
        torch.set_num_threads(threads)
    # Uniform guessing over the vocabulary costs log(V) nats per token; pretraining must go well below it.
    assert losses[0] == pytest.approx(math.log(len(tok)), rel=0.1)
    assert losses[-1] < 0.75 * losses[0]
    assert torch.isfinite(torch.tensor(losses)).all()
