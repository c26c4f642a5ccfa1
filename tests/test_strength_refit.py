"""The strength fitted to fixed margins (alignment.strength_fit) and the trainer's refit mode (strength_update="refit").

Numbers are checked against direct maximization (scipy on a grid-free 1-D problem), the chi-square calibration of
the profile interval on simulated margins, and, in the trainer, against a refit of the final margins by hand.
"""

import math
import os

import numpy as np
import pytest
import torch
from scipy import optimize, stats

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from alignment.strength import make_strength
from alignment.strength_fit import fit_strength, profile_spread, sd_log_strength


def _labelled_margins(n, sigma, seed, scale=2.0):
    """Margins oriented to the observed label of a lognormal-strength Bradley-Terry simulation (E[log beta] = 0)."""
    g = torch.Generator().manual_seed(seed)
    h = scale * torch.randn(n, generator=g, dtype=torch.float64)
    beta = torch.exp(sigma * torch.randn(n, generator=g, dtype=torch.float64))
    first = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(beta * h)
    return torch.where(first, h, -h)


def test_point_refit_is_the_logistic_mle():
    h = _labelled_margins(3000, 0.0, 0)
    point = make_strength("point", init={"beta": 0.1}, learnable=True)
    fit = fit_strength(point, h)
    hn = h.numpy()
    best = optimize.minimize_scalar(lambda b: -np.sum(-np.logaddexp(0, -b * hn)), bounds=(0.01, 10), method="bounded",
                                    options={"xatol": 1e-10})
    assert float(point.mean()) == pytest.approx(best.x, rel=1e-5)
    assert fit["loglik"] == pytest.approx(-best.fun, abs=1e-6)
    assert fit["converged"]


@pytest.mark.parametrize("family", ["lognormal", "gamma"])
def test_refit_is_stationary_and_recovers_the_spread(family):
    h = _labelled_margins(20000, 1.0, 1)
    s = make_strength(family)
    fit = fit_strength(s, h)
    assert fit["converged"] and fit["grad_norm"] < 1e-6
    again = fit_strength(s, h)
    assert again["loglik"] == pytest.approx(fit["loglik"], abs=1e-6)  # a second fit cannot improve it
    prof = profile_spread(s, h)
    # The true sd of log beta is 1.0; the Gamma is misspecified but close (sd of log of a Gamma of CV ~0.9).
    assert prof["sd_log_low"] < prof["sd_log"] < prof["sd_log_high"]
    assert abs(prof["sd_log"] - 1.0) < (0.15 if family == "lognormal" else 0.25)
    if family == "lognormal":
        assert prof["sd_log_low"] < 1.0 < prof["sd_log_high"]
    assert prof["lr_stat"] > 100 and prof["lr_pvalue"] < 1e-10
    assert sd_log_strength(s) == pytest.approx(prof["sd_log"], rel=1e-6)


def test_profile_interval_end_is_where_the_profile_drops_by_the_chi2_quantile():
    h = _labelled_margins(5000, 0.8, 2)
    s = make_strength("lognormal", init={"sigma": 0.5, "mean": 1.0}, fix_mean=True)
    prof = profile_spread(s, h, level=0.9)
    crit = stats.chi2.ppf(0.9, 1)
    for end in (prof["sd_log_low"], prof["sd_log_high"]):
        probe = make_strength("lognormal", init={"sigma": end, "mean": 1.0}, fix_mean=True)
        ll = float(probe.log_prob_preferred(h).sum())
        assert 2 * (prof["loglik"] - ll) == pytest.approx(crit, abs=1e-3)


def test_zero_spread_gives_an_interval_from_zero_and_no_significant_lr():
    h = _labelled_margins(4000, 0.0, 3)
    prof = profile_spread(make_strength("lognormal"), h)
    assert prof["sd_log_low"] == 0.0 and prof["cv_low"] == 0.0
    assert prof["lr_pvalue"] > 0.05
    assert prof["loglik"] >= prof["loglik_point"] - 1e-4  # the range ends at sigma = 1e-3, not at 0


def test_lr_statistic_under_the_null_follows_the_boundary_mixture():
    # 0.5 chi2_0 + 0.5 chi2_1: about half the statistics are exactly 0 and P(LR > 2.71) is about 0.05.
    lrs = [profile_spread(make_strength("lognormal"), _labelled_margins(800, 0.0, 100 + i))["lr_stat"]
           for i in range(40)]
    zero_share = np.mean(np.array(lrs) < 1e-6)
    assert 0.25 <= zero_share <= 0.8
    assert np.mean(np.array(lrs) > stats.chi2.ppf(0.9, 1)) <= 0.2


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="margin 1 is nan"):
        fit_strength(make_strength("lognormal"), [0.1, math.nan])
    with pytest.raises(ValueError, match="deterministic integrator"):
        fit_strength(make_strength("lognormal", integrator="mc"), [0.1, 0.2])
    with pytest.raises(ValueError, match="strength family"):
        profile_spread(make_strength("point"), [0.1, 0.2])
    with pytest.raises(ValueError, match="strength_learnable applies to the point strength"):
        from alignment.strength import build_strength

        build_strength("gamma", {"shape": 2.0, "rate": 20.0}, learnable=True)


# ---------------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def tiny():
    from alignment import synthetic

    ds = synthetic.pluralistic_task(64, groups=2, heterogeneity=1.0, seed=0)
    tok = synthetic.build_tokenizer(synthetic.task_texts(ds))
    return ds, tok, synthetic.tiny_gpt_neox(tok, hidden_size=32, num_layers=1, seed=0)


def _trainer(tmp_path, tiny, **over):
    import copy

    from alignment.config import MixDPOConfig
    from alignment.trainer import MixDPOTrainer

    ds, tok, model = tiny
    kw = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 8, "max_steps": 6,
          "learning_rate": 1e-3, "beta": 0.1, "max_length": 32, "seed": 0, "report_to": "none", "use_cpu": True,
          "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True, "bf16": False,
          "strength_update": "refit", "strength_refit_steps": 2}
    kw.update(over)
    return MixDPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=MixDPOConfig(**kw),
                         train_dataset=ds, processing_class=tok)


def test_trainer_refit_ends_at_the_maximum_on_the_final_margins(tmp_path, tiny):
    tr = _trainer(tmp_path, tiny, strength="lognormal", strength_fix_mean=False)
    before = {k: v.clone() for k, v in tr.strength.state_dict().items()}
    assert all(p is not q for g in tr.create_optimizer().param_groups for p in g["params"]
               for q in tr.strength.parameters())  # phi is not in the optimizer
    tr.train()
    steps = [step for step, _ in tr.strength_refit.history]
    assert steps == [2, 4, 6, 6]  # every 2 steps, then once on fresh margins
    assert any(not torch.equal(before[k], v) for k, v in tr.strength.state_dict().items())
    fresh = tr.pair_margins(tr.train_dataset)
    refit = make_strength("lognormal")
    fit_strength(refit, fresh["margin"])
    assert float(refit.mean()) == pytest.approx(float(tr.strength.mean()), rel=1e-4)
    assert float(refit.sigma) == pytest.approx(float(tr.strength.sigma), rel=1e-3, abs=1e-4)


def test_learned_beta_dpo_moves_beta_and_resumes_with_its_cache(tmp_path, tiny):
    tr = _trainer(tmp_path, tiny, strength="point", strength_learnable=True, save_strategy="steps", save_steps=3)
    tr.train()
    assert float(tr.strength.mean()) != pytest.approx(0.1)
    assert os.path.isfile(os.path.join(tmp_path, "out", "checkpoint-3", "margin_cache.pt"))
    resumed = _trainer(tmp_path, tiny, strength="point", strength_learnable=True, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "out", "checkpoint-3"))
    assert float(resumed.strength.mean()) == pytest.approx(float(tr.strength.mean()), rel=1e-6)
    with pytest.raises(ValueError, match="strength_learnable"):
        _trainer(tmp_path, tiny, strength="point", save_strategy="steps").train(
            resume_from_checkpoint=os.path.join(tmp_path, "out", "checkpoint-3"))


def test_config_refuses_bad_refit_settings(tmp_path):
    from alignment.config import MixDPOConfig

    with pytest.raises(ValueError, match="strength_update must be 'gradient' or 'refit'"):
        MixDPOConfig(output_dir=str(tmp_path), strength_update="newton", bf16=False, use_cpu=True)
    with pytest.raises(ValueError, match="strength_learnable=True applies to strength='point'"):
        MixDPOConfig(output_dir=str(tmp_path), strength="gamma", strength_learnable=True, bf16=False, use_cpu=True)


@pytest.mark.parametrize("every, refreshes, refits", [(3, [3, 6], [2, 3, 4, 6, 6]), (4, [4, 6], [2, 4, 6, 6])])
def test_refresh_steps_refit_on_the_current_policys_margins(tmp_path, tiny, every, refreshes, refits):
    tr = _trainer(tmp_path, tiny, strength="gamma", strength_fix_mean=True, strength_refresh_steps=every)
    seen = []
    original = tr.strength_refit.refresh

    def spy():
        seen.append(tr.state.global_step)
        original()

    tr.strength_refit.refresh = spy
    tr.train()
    # Every `every` steps, and when training ends unless the last step refreshed (no optimizer step since).
    assert seen == refreshes
    assert [step for step, _ in tr.strength_refit.history] == refits
    assert not torch.isnan(tr.margin_cache.margins).any()  # a refresh fills every pair, visited or not


@pytest.mark.parametrize("family, fix_mean", [("lognormal", True), ("lognormal", False), ("gamma", False)])
def test_newton_step_tracks_the_maximum_and_never_lowers_the_objective(family, fix_mean):
    from alignment.strength_fit import newton_step

    h = _labelled_margins(4000, 1.0, 2)
    init = {"mean": 1.65, "sigma": 1.0} if fix_mean else None  # the mean pinned at the truth's, e^0.5
    s = make_strength(family, init=init, fix_mean=fix_mean)
    fit_strength(s, h)
    # 5% of the margins move by 30% (more than between two refits in training).
    moved = h.clone()
    moved[:200] *= 1.3
    reference = make_strength(family, init=init, fix_mean=fix_mean)
    reference.load_state_dict(s.state_dict())
    target = fit_strength(reference, moved)
    step = newton_step(s, moved)
    assert step["accepted"]
    # One step from the old maximum lands within 1e-4 nats of the new one (out of ~2,000), and within 5e-3 in each
    # parameter: a few percent of their standard errors here (0.05-0.2 on 4,000 pairs; the Gamma's log rate
    # lies on a ridge with its log shape).
    assert step["loglik"] <= target["loglik"] + 1e-9
    assert step["loglik"] == pytest.approx(target["loglik"], abs=1e-4)
    for name, value in target["params"].items():
        assert step["params"][name] == pytest.approx(value, abs=5e-3)
    # Far from the maximum a step may fall short but the objective never drops.
    far = make_strength(family, init=init, fix_mean=fix_mean)
    with torch.no_grad():
        start = float(far.log_prob_preferred(moved).sum())
    assert newton_step(far, moved)["loglik"] >= start
