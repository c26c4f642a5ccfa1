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


# ---------------------------------------------------------------------------------------------- benchmark task
@pytest.fixture(scope="module")
def bench_tasks():
    return {(arm, lv): synthetic.benchmark_task(lv, arm, seed=5, n_train=800, n_validation=400, n_test=800)
            for arm in synthetic.ARMS for lv in (0.0, 1.5)}


def test_benchmark_task_label_accuracy_is_fixed_across_levels_and_arms(bench_tasks):
    for (arm, lv), task in bench_tasks.items():
        assert task.expected_label_accuracy == pytest.approx(0.80, abs=1e-9), (arm, lv)
        for split, acc in task.label_accuracy.items():
            # binomial sd of a realized share over 400-800 labels is at most 0.02
            assert abs(acc - 0.80) < 0.06, (arm, lv, split)
        if lv == 0.0 and arm != "clickers":
            assert task.realized_sd_log_strength == pytest.approx(0.0, abs=1e-12)


def test_benchmark_task_rows_follow_the_generator(bench_tasks):
    task = bench_tasks[("clickers", 1.5)]
    t = task.test.to_pandas()
    informative = ~t["clicker"]
    expected = 1 / (1 + np.exp(-t["true_strength"] * t["oracle_margin"]))
    np.testing.assert_allclose(t.loc[informative, "p_true"], expected[informative], rtol=1e-12)
    assert (t.loc[~informative, "p_true"] == 0.5).all()
    assert task.annotators["clicker"].mean() == pytest.approx(0.2)
    assert len(task.annotators) == 200 and task.train.to_pandas()["annotator_id"].value_counts().eq(4).all()
    r = synthetic.oracle_reward
    for row in task.test.select(range(20)):
        assert row["common_margin"] == pytest.approx(r(row["chosen"]) - r(row["rejected"]))
    assert not set(task.heldout_prompts) & set(t["prompt"]) and len(task.heldout_prompts) == 8
    assert task.realized_sd_log_strength == pytest.approx(1.5, rel=0.35)


def test_benchmark_task_direction_arm_flips_the_minority_reward(bench_tasks):
    t = bench_tasks[("direction", 1.5)].train.to_pandas()
    minority = t[t["minority"]]
    assert set(minority["group"].str[1:].astype(int) % 4) == {3}
    assert (minority["oracle_margin"] != minority["common_margin"]).any()
    assert (t.loc[~t["minority"], "oracle_margin"] == t.loc[~t["minority"], "common_margin"]).all()


def test_benchmark_task_levels_and_arms_of_a_seed_share_their_texts(bench_tasks):
    a, b = bench_tasks[("strength", 0.0)].train, bench_tasks[("clickers", 1.5)].train
    assert a["prompt"] == b["prompt"] and a["annotator_id"] == b["annotator_id"]
    pairs_a = [frozenset(p) for p in zip(a["chosen"], a["rejected"], strict=True)]
    pairs_b = [frozenset(p) for p in zip(b["chosen"], b["rejected"], strict=True)]
    assert pairs_a == pairs_b


def test_benchmark_task_bad_input():
    with pytest.raises(ValueError, match=r"unknown heterogeneity level 0\.7; accepted: 0\.0, 0\.5, 1\.0, 1\.5"):
        synthetic.benchmark_task(0.7)
    with pytest.raises(ValueError, match="unknown arm 'noise'; accepted: strength, direction, clickers"):
        synthetic.benchmark_task(0.5, "noise")
    with pytest.raises(ValueError, match=r"no base strength gives label accuracy 0\.95 at level 1\.0 \(arm 'clickers'\)"):
        synthetic.benchmark_task(1.0, "clickers", n_train=200, n_validation=200, n_test=200, label_accuracy=0.95)


def test_benchmark_task_has_no_oracle_ties_in_any_arm(bench_tasks):
    for (arm, lv), task in bench_tasks.items():
        for split in (task.train, task.validation, task.test):
            assert np.min(np.abs(split["oracle_margin"])) >= 0.25 - 1e-12, (arm, lv)
