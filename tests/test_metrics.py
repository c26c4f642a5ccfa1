"""alignment.metrics against closed forms: likelihood, KL and calibration on hand-made arrays, the Monte Carlo
KL against an exact sum over every completion, win rates and the matched-KL interpolation."""

import copy
import math
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from alignment import metrics, synthetic
from alignment.evaluate import sequence_logps


def _peaked(tokenizer, seed, scale=40.0):
    """A one-layer tiny GPT-NeoX whose output layer is scaled up, so its next-token distributions are far from
    uniform (a freshly initialised one is nearly uniform, and any two would be nearly equal)."""
    model = synthetic.tiny_gpt_neox(tokenizer, hidden_size=16, num_layers=1, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model.eval()


# ----------------------------------------------------------------------------------------------- pair metrics
def test_nll_ece_brier_and_kl_match_their_closed_forms():
    # 10 pairs at p = .9 (8 labels agree) and 10 at p = .3 (6 labels agree with the predicted second one).
    p = np.r_[np.full(10, 0.9), np.full(10, 0.3)]
    label = np.r_[np.ones(8), np.zeros(2), np.zeros(6), np.ones(4)]
    res = metrics.pair_probability_metrics(p, label, p_true=np.full(20, 0.5), bins=2)
    nll = -(8 * math.log(0.9) + 2 * math.log(0.1) + 6 * math.log(0.7) + 4 * math.log(0.3)) / 20
    assert res["nll"] == pytest.approx(nll, rel=1e-12)
    assert res["brier"] == pytest.approx((8 * 0.01 + 2 * 0.81 + 6 * 0.09 + 4 * 0.49) / 20, rel=1e-12)
    # Bins by confidence: {0.7 x 10, 6 correct} and {0.9 x 10, 8 correct}.
    assert res["ece"] == pytest.approx(0.5 * abs(0.6 - 0.7) + 0.5 * abs(0.8 - 0.9), rel=1e-12)
    kl = 0.5 * (0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)) + 0.5 * (
        0.5 * math.log(0.5 / 0.3) + 0.5 * math.log(0.5 / 0.7))
    assert res["kl_true"] == pytest.approx(kl, rel=1e-12)
    assert res["n"] == 20 and res["by_group"] is None
    # A constant 0.8 on labels of which 60% agree: every bin is over-confident, so ECE = 0.8 - 0.6 exactly.
    flat = metrics.pair_probability_metrics(np.full(50, 0.8), np.r_[np.ones(30), np.zeros(20)])
    assert flat["ece"] == pytest.approx(0.2, abs=1e-12) and "kl_true" not in flat
    # A certain wrong prediction costs -log(1e-12) nats, not infinity.
    assert metrics.pair_probability_metrics([1.0], [0])["nll"] == pytest.approx(-math.log(1e-12), rel=1e-5)


def test_calibrated_probabilities_and_orientation():
    rng = np.random.default_rng(0)
    n, bins = 20_000, 10
    p_true = rng.uniform(size=n)
    label = (rng.uniform(size=n) < p_true).astype(float)
    res = metrics.pair_probability_metrics(p_true, label, p_true=p_true, bins=bins)
    assert res["kl_true"] == 0.0
    # Calibrated: each bin's accuracy misses its confidence by binomial noise only, sd <= sqrt(.25 / 2000).
    bound = 3 * math.sqrt(0.25 / (n / bins))
    assert res["ece"] < bound
    # Expected NLL of calibrated p is the mean Bernoulli entropy, 1/2 nat for p ~ U(0, 1).
    assert res["nll"] == pytest.approx(0.5, abs=0.02)
    # Over-confident (logits tripled): the calibration error is well above the noise.
    sharp = 1 / (1 + np.exp(-3 * np.log(p_true / (1 - p_true))))
    over = metrics.pair_probability_metrics(sharp, label, p_true=p_true, bins=bins)
    assert over["ece"] > 3 * bound and over["kl_true"] > 0.05 and over["nll"] > res["nll"]
    # Writing half of the pairs the other way round changes no metric.
    flip = rng.uniform(size=n) < 0.5
    turned = metrics.pair_probability_metrics(np.where(flip, 1 - sharp, sharp),
                                              np.where(flip, 1 - label, label),
                                              p_true=np.where(flip, 1 - p_true, p_true), bins=bins)
    for key in ("nll", "kl_true", "ece", "brier"):
        assert turned[key] == pytest.approx(over[key], rel=1e-9, abs=1e-15), key


def test_by_group_repeats_the_metrics_on_each_group():
    rng = np.random.default_rng(1)
    p, q = rng.uniform(size=300), rng.uniform(size=300)
    label = (rng.uniform(size=300) < q).astype(int)
    group = np.array(["b", "a", "c"] * 100)
    res = metrics.pair_probability_metrics(p, label, p_true=q, group=group, bins=5)
    by = res["by_group"]
    assert list(by.index) == ["a", "b", "c"] and list(by.columns) == ["n", "nll", "ece", "brier", "kl_true"]
    for name in "abc":
        mine = group == name
        sub = metrics.pair_probability_metrics(p[mine], label[mine], p_true=q[mine], bins=5)
        assert by.loc[name, "n"] == 100
        for key in ("nll", "ece", "brier", "kl_true"):
            assert by.loc[name, key] == pytest.approx(sub[key], rel=1e-12), (name, key)


def test_pair_metric_inputs_are_checked_by_name():
    p, y = np.array([0.2, 0.7, 0.5]), np.array([0, 1, 1])
    with pytest.raises(ValueError, match=r"p_hat must be finite; index 1 is nan"):
        metrics.pair_probability_metrics([0.2, np.nan, 0.5], y)
    with pytest.raises(ValueError, match=r"p_hat must be probabilities in \[0, 1\]; index 2 is 1\.5"):
        metrics.pair_probability_metrics([0.2, 0.7, 1.5], y)
    with pytest.raises(ValueError, match=r"label must be 0 or 1 .*index 1 is 2\.0"):
        metrics.pair_probability_metrics(p, [0, 2, 1])
    with pytest.raises(ValueError, match=r"label must be finite; index 0 is inf"):
        metrics.pair_probability_metrics(p, [np.inf, 1, 1])
    with pytest.raises(ValueError, match=r"label must have one value per pair \(3\), got 2"):
        metrics.pair_probability_metrics(p, [0, 1])
    with pytest.raises(ValueError, match=r"p_true must be finite; index 2 is nan"):
        metrics.pair_probability_metrics(p, y, p_true=[0.5, 0.5, np.nan])
    with pytest.raises(ValueError, match=r"group must have a label for every pair; index 1 is None"):
        metrics.pair_probability_metrics(p, y, group=["a", None, "b"])
    with pytest.raises(ValueError, match=r"bins must be a positive integer, got 0"):
        metrics.pair_probability_metrics(p, y, bins=0)
    with pytest.raises(ValueError, match=r"p_hat must be a non-empty 1-D array"):
        metrics.pair_probability_metrics([], [])


def test_oracle_accuracy_micro_macro_and_worst_group():
    margin = np.array([1.0, -1.0, 0.0, 2.0, -3.0])
    gap = np.array([1.0, 1.0, -1.0, -0.5, -2.0])  # hits: yes, no, a zero margin is a miss, no, yes
    res = metrics.oracle_accuracy(margin, gap, group=["a", "a", "a", "b", "b"])
    assert res["accuracy"] == pytest.approx(2 / 5)
    assert res["accuracy_macro"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert (res["worst_group"], res["worst_accuracy"]) == ("a", pytest.approx(1 / 3))
    assert res["by_group"]["n"].to_dict() == {"a": 3, "b": 2} and res["n_groups"] == 2
    plain = metrics.oracle_accuracy(margin, gap)
    assert plain["accuracy"] == plain["accuracy_macro"] == plain["worst_accuracy"] == pytest.approx(0.4)
    assert plain["worst_group"] is None and plain["by_group"] is None
    with pytest.raises(ValueError, match=r"oracle_gap must be non-zero .*index 1 is 0"):
        metrics.oracle_accuracy(margin, [1.0, 0.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"margin must be finite; index 3 is -inf"):
        metrics.oracle_accuracy([1.0, 1.0, 1.0, -np.inf, 1.0], gap)


# --------------------------------------------------------------------------------------------- policy metrics
@pytest.fixture(scope="module")
def small():
    """A 5-token vocabulary (pad, eos, unk, a, b), two peaked models and two prompts of different lengths (so
    the batch is left-padded)."""
    tok = synthetic.build_tokenizer(["a b"])
    # Seeds and scale where both models stop within 2 tokens about as often as not, so eos-ended and cut
    # completions both count in the sums.
    return tok, _peaked(tok, 3, scale=20.0), _peaked(tok, 1, scale=20.0), ["a", "b a b"]


def _exact(model, tok, prompt):
    """log-probabilities of every completion of at most 2 tokens: eos alone, or two tokens whose second may be
    eos or not (a completion cut at 2 tokens is scored without an eos)."""
    vocab, eos = range(len(tok)), tok.eos_token_id
    seqs = [[eos]] + [[a, b] for a in vocab if a != eos for b in vocab]
    prompt_ids = tok(prompt)["input_ids"]
    return seqs, sequence_logps(model, [(prompt_ids, s) for s in seqs], tok.pad_token_id, batch_size=64)


def test_policy_kl_matches_the_exact_sum_over_completions(small):
    tok, policy, ref, prompts = small
    exact_kl, truncated = [], []
    for prompt in prompts:
        seqs, lp = _exact(policy, tok, prompt)
        _, lq = _exact(ref, tok, prompt)
        assert np.exp(lp).sum() == pytest.approx(1.0, abs=1e-5)  # the enumeration is complete
        exact_kl.append(float(np.sum(np.exp(lp) * (lp - lq))))
        cut = np.array([s[-1] != tok.eos_token_id for s in seqs])
        truncated.append(float(np.exp(lp[cut]).sum()))
    exact = float(np.mean(exact_kl))
    n = 3000
    res = metrics.policy_kl(policy, ref, tok, prompts, n_per_prompt=n, max_new_tokens=2, seed=0)
    assert exact > 0.3 and 0 < res["se"] < 0.05 * exact
    assert abs(res["kl"] - exact) < 4 * res["se"], (res["kl"], exact, res["se"])
    assert res["kl_by_prompt"].shape == (2,) and res["n_per_prompt"] == n
    for k in range(2):  # each prompt's own standard error is at most twice the pooled one
        assert abs(res["kl_by_prompt"][k] - exact_kl[k]) < 4 * 2 * res["se"]
    # The share of completions cut at max_new_tokens is the exact probability of no eos within 2 tokens.
    p_cut = float(np.mean(truncated))
    assert 0.2 < p_cut < 0.8
    assert abs(res["truncated"] - p_cut) < 4 * math.sqrt(p_cut * (1 - p_cut) / (2 * n))
    # The same seed gives the same completions as sample_completions.
    assert res["samples"][1][:50] == metrics.sample_completions(policy, tok, prompts, n, 2, seed=0)[1][:50]


def test_kl_of_a_policy_from_itself_is_exactly_zero(small):
    tok, policy, _, prompts = small
    for ref in (policy, copy.deepcopy(policy)):
        res = metrics.policy_kl(policy, ref, tok, prompts, n_per_prompt=64, max_new_tokens=3, seed=3)
        assert res["kl"] == 0.0 and res["se"] == 0.0 and not res["kl_by_prompt"].any()


def test_sampling_is_seeded_and_leaves_the_global_generator_alone(small):
    tok, policy, _, prompts = small
    policy.train()
    state = torch.get_rng_state()
    first = metrics.sample_completions(policy, tok, prompts, 32, 3, seed=5)
    assert torch.equal(state, torch.get_rng_state()) and policy.training  # mode restored too
    policy.eval()
    assert metrics.sample_completions(policy, tok, prompts, 32, 3, seed=5) == first
    assert metrics.sample_completions(policy, tok, prompts, 32, 3, seed=6) != first
    assert [len(per) for per in first] == [32, 32]
    assert all(len(y.split()) <= 3 and set(y.split()) <= {"a", "b"} for per in first for y in per)


@pytest.fixture(scope="module")
def task():
    tok = synthetic.build_tokenizer()
    items = ("film", "book", "song", "meal", "game", "hotel", "park", "show")
    prompts = [f"review the {item} :" for item in items]
    return tok, _peaked(tok, 0, scale=10.0), _peaked(tok, 1, scale=10.0), prompts


def test_win_rate_of_a_policy_against_itself_is_one_half(task):
    tok, policy, _, prompts = task
    res = metrics.win_rate(policy, policy, tok, prompts, synthetic.oracle_reward, n_per_prompt=128, seed=0)
    assert 0 < res["se"] < 0.02 and res["tie_rate"] < 0.9 and res["n_pairs"] == 8 * 128
    assert abs(res["win_rate"] - 0.5) < 3 * res["se"], res
    assert res["reward_policy"] != res["reward_ref"]  # independent samples, not the same ones twice


def test_win_rate_reuses_given_samples(task):
    tok, policy, ref, prompts = task
    full = metrics.win_rate(policy, ref, tok, prompts, synthetic.oracle_reward, n_per_prompt=16, seed=2)
    ref_samples = metrics.sample_completions(ref, tok, prompts, 16, 6, seed=3)
    kl = metrics.policy_kl(policy, ref, tok, prompts, n_per_prompt=16, seed=2)
    given = metrics.win_rate(None, None, tok, prompts, synthetic.oracle_reward, n_per_prompt=16, seed=2,
                             policy_samples=kl["samples"], ref_samples=ref_samples)
    for key in ("win_rate", "se", "tie_rate", "reward_policy", "reward_ref", "samples", "ref_samples"):
        assert given[key] == full[key], key
    # By hand: scores [[1, 1/2], [1/2, 1]]; each prompt's scores have sample variance 1/8.
    res = metrics.win_rate(None, None, tok, ["rate the film :", "rate the book :"], synthetic.oracle_reward,
                           n_per_prompt=2, policy_samples=[["good", "bad"], ["plain", "superb great"]],
                           ref_samples=[["bad", "bad"], ["plain", "good"]])
    assert res["win_rate"] == 0.75 and res["tie_rate"] == 0.5
    assert res["se"] == pytest.approx(math.sqrt((1 / 8 + 1 / 8) / 2) / 2)
    assert res["reward_policy"] == pytest.approx((0.5 - 0.75 + 0 + 1.75) / 4)


def test_sampling_inputs_are_checked_by_name(task):
    tok, policy, ref, prompts = task
    with pytest.raises(ValueError, match=r"n_per_prompt must be an integer >= 2, got 1"):
        metrics.policy_kl(policy, ref, tok, prompts, n_per_prompt=1)
    with pytest.raises(ValueError, match=r"max_new_tokens must be a positive integer, got 0"):
        metrics.sample_completions(policy, tok, prompts, 2, 0, seed=0)
    with pytest.raises(ValueError, match=r"prompts must be a non-empty list of strings"):
        metrics.sample_completions(policy, tok, "review the film :", 2, 3, seed=0)
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a string, got int"):
        metrics.sample_completions(policy, tok, ["review the film :", 3], 2, 3, seed=0)
    with pytest.raises(ValueError, match=r"ref_samples must be 8 lists \(one per prompt\) of 4 completions"):
        metrics.win_rate(policy, None, tok, prompts, synthetic.oracle_reward, n_per_prompt=4,
                         ref_samples=[["good"] * 4] * 7)
    with pytest.raises(ValueError, match=r"reward_fn returned nan for policy_samples\[0\]\[0\]"):
        metrics.win_rate(policy, ref, tok, prompts, lambda y: math.nan, n_per_prompt=2)


# ----------------------------------------------------------------------------------------------- frontier
def test_matched_kl_gain_interpolates_in_log_kl():
    frontier_kl, frontier_win = [10.0, 0.1, 1.0], [0.8, 0.5, 0.6]  # any order
    # sqrt(10) lies halfway from 1 to 10 in log KL.
    mid = metrics.matched_kl_gain(math.sqrt(10.0), 0.75, frontier_kl, frontier_win)
    assert mid["inside"] and mid["frontier_win"] == pytest.approx(0.7) and mid["gain"] == pytest.approx(0.05)
    at = metrics.matched_kl_gain(0.1, 0.5, frontier_kl, frontier_win)  # an end point is inside
    assert at["inside"] and at["gain"] == pytest.approx(0.0, abs=1e-15)
    for kl in (20.0, 0.05, -0.01):
        out = metrics.matched_kl_gain(kl, 0.9, frontier_kl, frontier_win)
        assert not out["inside"] and math.isnan(out["gain"]) and math.isnan(out["frontier_win"])
    with pytest.raises(ValueError, match=r"frontier_kl must be positive .*index 1 is 0\.0"):
        metrics.matched_kl_gain(1.0, 0.5, [0.1, 0.0], [0.5, 0.6])
    with pytest.raises(ValueError, match=r"frontier_kl must have at least 2 points"):
        metrics.matched_kl_gain(1.0, 0.5, [1.0], [0.5])
    with pytest.raises(ValueError, match=r"frontier_kl must be distinct; 1\.0 appears more than once"):
        metrics.matched_kl_gain(1.0, 0.5, [1.0, 1.0, 2.0], [0.5, 0.6, 0.7])
    with pytest.raises(ValueError, match=r"frontier_win must have one value per frontier point \(3\), got 2"):
        metrics.matched_kl_gain(1.0, 0.5, frontier_kl, [0.5, 0.6])
    with pytest.raises(ValueError, match=r"kl must be a finite real number, got nan"):
        metrics.matched_kl_gain(math.nan, 0.5, frontier_kl, frontier_win)
