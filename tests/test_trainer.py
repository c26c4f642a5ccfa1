"""MixDPOTrainer against trl.DPOTrainer on a tiny GPT-NeoX built from a config (no hub, CPU, a few steps)."""

import copy
import json
import math
import os
import re
import shutil

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import datasets
import torch
from datasets.utils.logging import disable_progress_bar
from trl import DPOConfig, DPOTrainer

from alignment import synthetic
from alignment.config import MixDPOConfig
from alignment.diagnostics import plot_strength, strength_to_arviz
from alignment.evaluate import evaluate
from alignment.run_dir import load_strength
from alignment.trainer import MixDPOTrainer

disable_progress_bar()


@pytest.fixture(scope="module")
def task():
    ds = synthetic.pluralistic_task(48, groups=3, heterogeneity=1.0, seed=0)
    tok = synthetic.build_tokenizer(synthetic.task_texts(ds))
    model = synthetic.tiny_gpt_neox(tok, hidden_size=32, num_layers=2, seed=0)
    return ds, tok, model


def _kw(tmp_path, **over):
    kw = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "beta": 0.1,
        "max_length": 32,
        "seed": 0,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "lr_scheduler_type": "constant",
        "bf16": False,  # TRL's default bf16 autocast is emulated (slow) on CPUs without native bf16
    }
    kw.update(over)
    return kw


def _mix(task, tmp_path, ref=True, **over):
    ds, tok, model = task
    policy = copy.deepcopy(model)
    return MixDPOTrainer(
        model=policy,
        ref_model=copy.deepcopy(model) if ref else None,
        args=MixDPOConfig(**_kw(tmp_path, **over)),
        train_dataset=ds,
        eval_dataset=ds,
        processing_class=tok,
    )


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_point_strength_matches_trl_dpotrainer(task, tmp_path):
    ds, tok, model = task
    dpo = DPOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(model),
        args=DPOConfig(**_kw(tmp_path / "dpo")),
        train_dataset=ds,
        eval_dataset=ds,
        processing_class=tok,
    )
    mix = _mix(task, tmp_path / "mix", strength="point")
    before = dpo.evaluate()["eval_loss"], mix.evaluate()["eval_loss"]
    dpo.train()
    mix.train()
    after_dpo, after_mix = dpo.evaluate(), mix.evaluate()
    assert before[1] == pytest.approx(before[0], abs=1e-5)
    assert after_mix["eval_loss"] == pytest.approx(after_dpo["eval_loss"], abs=1e-5)
    assert after_mix["eval_loss"] < before[1] - 1e-3  # training moved the policy
    np.testing.assert_allclose(_logged(mix, "loss"), _logged(dpo, "loss"), atol=1e-5)
    for key in (
        "eval_rewards/margins",
        "eval_rewards/accuracies",
        "eval_logps/chosen",
        "eval_entropy",
        "eval_mean_token_accuracy",
        "eval_logits/chosen",
    ):
        assert after_mix[key] == pytest.approx(after_dpo[key], abs=1e-5), key
    assert after_mix["eval_beta/mean"] == pytest.approx(0.1) and after_mix["eval_beta/cv"] == 0.0
    assert list(mix.strength.parameters()) == []  # beta is DPO's hyperparameter, not learned


def test_strength_is_learned_with_its_own_lr_and_logged(task, tmp_path):
    trainer = _mix(task, tmp_path, strength="lognormal", strength_learning_rate=0.05, strength_fix_mean=False,
                   strength_update="gradient")  # phi in the optimizer (the default, "refit", sets it by refits)
    s0 = {k: v.detach().clone() for k, v in trainer.strength.state_dict().items()}
    assert trainer.strength.family_params()["mu"] == pytest.approx(math.log(0.1) - 0.125)
    assert float(trainer.strength.mean().detach()) == pytest.approx(0.1)
    trainer.train()
    groups = trainer.optimizer.param_groups
    strength_ids = {id(p) for p in trainer.strength.parameters()}
    own = [g for g in groups if {id(p) for p in g["params"]} == strength_ids]
    assert len(own) == 1 and own[0]["lr"] == pytest.approx(0.05) and own[0]["weight_decay"] == 0.0
    assert all(g["lr"] == pytest.approx(1e-3) for g in groups if g is not own[0])
    for k, v in trainer.strength.state_dict().items():
        if k in ("mu", "log_sigma"):
            # Adam moves each parameter by about its learning rate per step.
            assert 0.02 < float((v - s0[k]).abs()) < 0.2, k
    # beta/* next to TRL's metrics, one log per step, consistent with the family's formulas.
    for key in (
        "beta/mean",
        "beta/std",
        "beta/cv",
        "beta/mu",
        "beta/sigma",
        "rewards/margins",
        "logps/chosen",
    ):
        assert len(_logged(trainer, key)) == 3, key
    last = [h for h in trainer.state.log_history if "beta/sigma" in h][-1]
    assert last["beta/cv"] == pytest.approx(math.sqrt(math.expm1(last["beta/sigma"] ** 2)), rel=1e-6)
    assert last["beta/mean"] == pytest.approx(
        math.exp(last["beta/mu"] + last["beta/sigma"] ** 2 / 2), rel=1e-6
    )
    assert last["beta/std"] == pytest.approx(last["beta/cv"] * last["beta/mean"], rel=1e-6)


def test_default_strength_lr_and_fix_mean(task, tmp_path):
    cfg = MixDPOConfig(**_kw(tmp_path, learning_rate=5e-6))
    assert cfg.resolved_strength_learning_rate == pytest.approx(5e-3)
    assert MixDPOConfig(**_kw(tmp_path, learning_rate=1e-3)).resolved_strength_learning_rate == 1e-2
    trainer = _mix(task, tmp_path, strength="gamma", strength_fix_mean=True, beta=0.2, max_steps=2)
    assert [n for n, _ in trainer.strength.named_parameters()] == ["log_shape"]
    assert trainer.strength.family_params()["shape"] == pytest.approx(4.0)
    trainer.train()
    assert float(trainer.strength.mean().detach()) == pytest.approx(0.2, rel=1e-9)  # pinned
    assert trainer.strength.family_params()["shape"] != pytest.approx(4.0, abs=1e-4)  # shape learned


def test_checkpoint_resume_restores_strength(task, tmp_path):
    from transformers import TrainerCallback

    common = {
        "strength": "lognormal",
        "strength_fix_mean": False,
        "strength_learning_rate": 0.05,
        "strength_update": "gradient",  # the optimizer's state of phi is what the checkpoint must restore
        "save_strategy": "steps",
        "save_steps": 2,
    }
    part = _mix(task, tmp_path, max_steps=2, **common)
    part.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    info = json.loads((ckpt / "strength.json").read_text())
    assert info["family"] == "lognormal" and info["beta"] == 0.1 and info["fix_mean"] is False
    assert info["params"]["sigma"] == pytest.approx(part.strength.family_params()["sigma"])
    saved = torch.load(ckpt / "strength.pt", weights_only=True)
    assert float(saved["log_sigma"]) == pytest.approx(float(part.strength.log_sigma.detach()))
    assert float(saved["log_sigma"]) != pytest.approx(math.log(0.5), abs=1e-3)  # it moved before the save

    seen = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            seen["strength"] = {k: v.clone() for k, v in resumed.strength.state_dict().items()}
            group = optimizer.param_groups[-1]
            seen["lr"] = group["lr"]
            seen["exp_avg"] = [optimizer.state[p]["exp_avg"].clone() for p in group["params"]]

    resumed = _mix(task, tmp_path, max_steps=4, **common)
    resumed.add_callback(Probe())
    resumed.train(resume_from_checkpoint=str(ckpt))
    # The strength parameters and their Adam moments are those of the checkpoint when training resumes.
    for k, v in saved.items():
        assert torch.equal(seen["strength"][k].cpu(), v), k
    opt = torch.load(ckpt / "optimizer.pt", weights_only=False)
    last = opt["param_groups"][-1]
    assert seen["lr"] == pytest.approx(0.05) and last["lr"] == pytest.approx(0.05)
    for i, p in enumerate(last["params"]):
        assert torch.equal(seen["exp_avg"][i].cpu(), opt["state"][p]["exp_avg"])
    assert resumed.state.global_step == 4 and len(_logged(resumed, "beta/sigma")) == 4

    # Resuming with another family (or another fix_mean) is refused with the reason.
    other = _mix(task, tmp_path, max_steps=4, strength="gamma", save_strategy="steps", save_steps=2)
    with pytest.raises(
        ValueError, match="its strength family is 'lognormal' but this run has strength='gamma'"
    ):
        other.train(resume_from_checkpoint=str(ckpt))
    pinned = _mix(task, tmp_path, max_steps=4, **{**common, "strength_fix_mean": True})
    with pytest.raises(ValueError, match="strength_fix_mean=False but this run has strength_fix_mean=True"):
        pinned.train(resume_from_checkpoint=str(ckpt))
    with pytest.raises(ValueError, match="has no strength.json"):
        _mix(task, tmp_path, max_steps=4, **common).train(resume_from_checkpoint=str(tmp_path))


def test_resume_from_the_final_checkpoint_trains_no_further(task, tmp_path):
    """A run killed after its last checkpoint but before its final save resumes to the same end, not past it.

    max_steps=3 ends inside the first epoch, where transformers' resume arithmetic would run the epoch on.
    """
    common = {"strength": "lognormal", "strength_learning_rate": 0.05, "save_strategy": "steps", "save_steps": 1}
    whole = _mix(task, tmp_path, max_steps=3, **common)
    whole.train()
    resumed = _mix(task, tmp_path, max_steps=3, **common)
    out = resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    assert resumed.state.global_step == out.global_step == 3
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.strength.family_params() == whole.strength.family_params()
    assert out.training_loss == pytest.approx(sum(_logged(whole, "loss")) / 3)


def test_group_column_survives_and_macro_accuracy(task, tmp_path):
    trainer = _mix(task, tmp_path, strength="gamma", group_column="group", max_steps=2)
    assert {"group", "mixdpo_group_id"} <= set(trainer.train_dataset.column_names)
    assert trainer.group_names == sorted(set(task[0]["group"]), key=task[0]["group"].index)
    trainer.train()
    metrics = trainer.evaluate()
    margins = trainer.pair_margins()
    hits = margins["margin"] > 0
    per_group = {g: hits[margins["group"] == g].mean() for g in trainer.group_names}
    assert metrics["eval_rewards/accuracies"] == pytest.approx(hits.mean(), abs=1e-6)
    assert metrics["eval_rewards/accuracies_macro"] == pytest.approx(
        np.mean(list(per_group.values())), abs=1e-6
    )
    for g, acc in per_group.items():
        assert metrics[f"eval_rewards/accuracies/{g}"] == pytest.approx(acc, abs=1e-6)
    np.testing.assert_array_equal(margins["row"], np.arange(len(task[0])))

    # The standalone evaluation agrees with the trainer's margins, micro and macro.
    res = evaluate(trainer.model, trainer.ref_model, task[0], task[1], group_column="group", max_length=32)
    np.testing.assert_allclose(res["pairs"]["margin"].to_numpy(), margins["margin"], atol=1e-4)
    assert res["accuracy"] == pytest.approx(hits.mean())
    assert res["accuracy_macro"] == pytest.approx(metrics["eval_rewards/accuracies_macro"], abs=1e-6)
    assert res["margin_mean"] == pytest.approx(margins["margin"].mean(), abs=1e-4)
    assert list(res["by_group"].index) == sorted(per_group)

    # ArviZ: draws from the learned distribution, per-pair posterior strengths, observed margins.
    import arviz as az

    idata = strength_to_arviz(trainer, n_draws=400, seed=1)
    assert idata.posterior["beta"].shape == (1, 400)
    assert idata.posterior["beta_pair"].shape == (1, 400, len(task[0]))
    post = trainer.strength.posterior(torch.as_tensor(margins["margin"], dtype=torch.float64))
    np.testing.assert_allclose(idata.constant_data["beta_pair_mean"].values, post.mean.detach().numpy())
    np.testing.assert_allclose(idata.observed_data["margin"].values, margins["margin"], rtol=1e-6)
    # Resampled posterior draws agree with the closed-form posterior means within Monte Carlo error.
    sir = idata.posterior["beta_pair"].values[0].mean(axis=0)
    sd = idata.constant_data["beta_pair_sd"].values
    assert np.all(np.abs(sir - post.mean.detach().numpy()) < 5 * sd / math.sqrt(400) + 0.1 * sd)
    assert float(idata.posterior["beta"].mean()) == pytest.approx(float(trainer.strength.mean().detach()), rel=0.15)
    summary = az.summary(idata, var_names=["beta"], kind="stats")
    assert summary.loc["beta", "mean"] > 0
    paths = plot_strength(idata, str(tmp_path / "plots"))
    assert [os.path.basename(p) for p in paths] == [
        "strength_density.png",
        "strength_steps.png",
        "strength_by_group.png",
    ]
    assert all(os.path.getsize(p) > 1000 for p in paths)


def test_lora_and_precompute_ref_log_probs(task, tmp_path):
    from peft import LoraConfig

    ds, tok, model = task
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query_key_value"], task_type="CAUSAL_LM"
    )
    trainer = MixDPOTrainer(
        model=copy.deepcopy(model),
        args=MixDPOConfig(
            **_kw(tmp_path / "lora", strength="lognormal", max_steps=2, precompute_ref_log_probs=True,
                  strength_update="gradient")  # phi stepped with the adapter; a refit of 2 steps' margins barely moves
        ),
        train_dataset=ds,
        eval_dataset=ds,
        processing_class=tok,
        peft_config=lora,
    )
    assert trainer.ref_model is None and "ref_chosen_logps" in trainer.train_dataset.column_names
    before = trainer.evaluate()["eval_loss"]
    # With a fresh adapter the policy is the reference: h = 0 and the loss is -log E[sigmoid(0)] = log 2.
    assert before == pytest.approx(math.log(2), abs=1e-5)
    base = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora" not in k}
    s0 = trainer.strength.family_params()["sigma"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before
    assert trainer.strength.family_params()["sigma"] != pytest.approx(s0, abs=1e-6)
    for k, v in trainer.model.named_parameters():
        if "lora" not in k:
            assert torch.equal(v, base[k]), k  # only the adapter trains
    # The reference of a PEFT policy is the base model with the adapter disabled.
    res = evaluate(trainer.model, None, ds, tok, max_length=32)
    np.testing.assert_allclose(res["pairs"]["margin"].to_numpy(), trainer.pair_margins()["margin"], atol=1e-4)

    # precompute_ref_log_probs with an explicit reference gives the same losses as on-the-fly reference passes.
    runs = [
        _mix(task, tmp_path / f"pre{flag}", strength="gamma", max_steps=2, precompute_ref_log_probs=flag)
        for flag in (False, True)
    ]
    for r in runs:
        r.train()
    np.testing.assert_allclose(_logged(runs[1], "loss"), _logged(runs[0], "loss"), atol=1e-5)


def test_bad_inputs(task, tmp_path, caplog):
    ds, tok, model = task
    with pytest.raises(ValueError, match=r"train_dataset is missing the field\(s\) \['rejected'\].*standard"):
        _mix((ds.remove_columns("rejected"), tok, model), tmp_path)
    with pytest.raises(ValueError, match="group_column='annotatr' is not a column of train_dataset"):
        _mix(task, tmp_path, group_column="annotatr")
    with pytest.raises(
        ValueError, match=r"Unknown strength 'weibull'; accepted: \['point', 'lognormal', 'gamma'\]"
    ):
        MixDPOConfig(**_kw(tmp_path, strength="weibull"))
    with pytest.raises(ValueError, match="loss_type=\\['hinge'\\] is not supported"):
        _mix(task, tmp_path, loss_type="hinge")
    # A prompt that fills max_length leaves no completion token: the pair is dropped and counted, no NaN.
    long = datasets.Dataset.from_dict(
        {
            "prompt": ["rate the " + "film " * 40 + ":", ds[0]["prompt"], ds[1]["prompt"]],
            "chosen": [ds[0]["chosen"], ds[0]["chosen"], ds[1]["chosen"]],
            "rejected": [ds[0]["rejected"], ds[0]["rejected"], ds[1]["rejected"]],
        }
    )
    with caplog.at_level("WARNING"):
        trainer = _mix((long, tok, model), tmp_path, max_steps=1)
    assert len(trainer.train_dataset) == 2
    assert "dropped 1 of 3 pairs of the train dataset" in caplog.text
    trainer.train()
    # Policy and reference start equal (no dropout), so every margin of the first step is 0: loss log 2.
    assert _logged(trainer, "loss")[0] == pytest.approx(math.log(2.0), abs=1e-5)


def test_evaluate_checks_its_batching_arguments(task):
    ds, tok, model = task
    for kw, match in [
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"max_length": 0}, "max_length must be a positive integer or None, got 0"),
        ({"truncation_mode": "middle"}, "truncation_mode must be 'keep_start' or 'keep_end', got 'middle'"),
    ]:
        with pytest.raises(ValueError, match=match):
            evaluate(model, model, ds, tok, **kw)


def test_cli_train_evaluate_report(task, tmp_path, capsys):
    from alignment.cli import main

    ds, tok, model = task
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in ds)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(base),
                "--data",
                str(data),
                "--eval-data",
                str(data),
                "--output",
                str(run),
                "--strength",
                "gamma",
                "--max-steps",
                "2",
                "--batch-size",
                "8",
                "--max-length",
                "32",
                "--lr",
                "1e-3",
                "--group-column",
                "group",
                "--cpu",
                "--logging-steps",
                "1",
                "--save-steps",
                "1",
            ]
        )
        == 0
    )
    for name in ("strength.pt", "strength.json", "margins.npz", "mixdpo_run.json", "metrics.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoint-1").is_dir() and (run / "checkpoint-2").is_dir()
    margins = np.load(run / "margins.npz")
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(run),
                "--data",
                str(data),
                "--group-column",
                "group",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["n_pairs"] == len(ds) and res["n_groups"] == 3
    # A second evaluate does not replace the metrics file unless asked to.
    capsys.readouterr()
    evaluate_again = ["evaluate", "--model", str(run), "--data", str(data), "--group-column", "group", "--json",
                      str(out)]
    out.write_text("{}")
    assert main(evaluate_again) == 2
    assert f"--json {out} already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert out.read_text() == "{}"
    assert main([*evaluate_again, "--overwrite"]) == 0
    assert json.loads(out.read_text()) == res
    assert main([*evaluate_again[:-1], str(tmp_path / "no" / "eval.json")]) == 2
    assert "eval.json: its directory does not exist" in capsys.readouterr().err
    assert res["accuracy"] == pytest.approx(float((margins["margin"] > 0).mean()))
    metrics = json.loads((run / "metrics.json").read_text())
    assert res["accuracy_macro"] == pytest.approx(metrics["eval_rewards/accuracies_macro"], abs=1e-6)
    # From a run directory and a dataset, the models are reloaded and the margins recomputed.
    idata = strength_to_arviz(str(run), ds, n_draws=50)
    np.testing.assert_allclose(idata.observed_data["margin"].values, margins["margin"], atol=1e-4)
    assert (
        idata.attrs["family"] == "gamma" and list(idata.constant_data["group"].values[:3]) == ds["group"][:3]
    )
    assert main(["report", str(run)]) == 0
    text = capsys.readouterr().out
    assert "strength family: gamma" in text and "beta/shape" in text
    fitted, _ = load_strength(str(run))  # exact moments of the fitted distribution, not moments of draws
    exact = re.search(r"fitted mean of beta \(exact\) +\| +(\S+) ", text)
    assert exact and float(exact.group(1)) == pytest.approx(float(fitted.mean()), rel=1e-3) and "posterior" not in text
    for name in ("strength_density.png", "strength_steps.png", "strength_by_group.png", "report.md"):
        assert (run / "report" / name).is_file(), name
    # A second report does not replace the first unless asked to.
    (run / "report" / "report.md").write_text("my notes")
    assert main(["report", str(run)]) == 2
    assert (
        f"--out {run / 'report'} already holds report.md, strength_density.png, strength_steps.png, "
        "strength_by_group.png; pass --overwrite" in capsys.readouterr().err
    )
    assert (run / "report" / "report.md").read_text() == "my notes"
    assert main(["report", str(run), "--overwrite"]) == 0
    assert "strength family: gamma" in (run / "report" / "report.md").read_text()
    # Errors are reported, not raised, with a non-zero exit status.
    assert main(["train", "--model", "no/such-model", "--data", str(data), "--output", str(tmp_path / "new")]) == 2
    assert "is not a local directory" in capsys.readouterr().err
    _check_train_output_is_kept(run, base, data, tmp_path, capsys)


def _check_train_output_is_kept(run, base, data, tmp_path, capsys):
    """A second ``mixdpo train`` into a run directory is refused before any model is loaded; resuming from a
    checkpoint of an interrupted run in it still works."""
    from alignment.cli import main

    saved = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    # --eval-data as the run had: the same training pairs, whose cached margins the checkpoint holds.
    train = ["train", "--data", str(data), "--eval-data", str(data), "--strength", "gamma", "--max-steps", "2",
             "--batch-size", "8", "--max-length", "32", "--cpu"]
    # --model no/such-model: had the model been loaded first, its error would come instead.
    assert main([*train, "--model", "no/such-model", "--output", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"mixdpo train: error: --output {run} already holds metrics.json, model.safetensors, strength.pt, "
        "strength.json, mixdpo_run.json, margins.npz, ... ("
    ) and err.count("\n") == 1, err
    assert f"pass --overwrite to replace them or choose another --output (or continue that run with --resume " \
           f"{run / 'checkpoint-2'})" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == saved
    # With --overwrite the check passes (and the bad model is the next error).
    assert main([*train, "--model", "no/such-model", "--output", str(run), "--overwrite"]) == 2
    assert "--model 'no/such-model' is not a local directory" in capsys.readouterr().err
    assert main([*train, "--model", "no/such-model", "--output", str(data)]) == 2
    assert f"--output {data} is a file, not a directory" in capsys.readouterr().err
    # An interrupted run left only its checkpoint: resuming into the same --output needs no --overwrite.
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoint-1", resumed / "checkpoint-1")
    assert main([*train, "--model", str(base), "--output", str(resumed)]) == 2
    assert "already holds checkpoint-1; pass --overwrite" in capsys.readouterr().err
    resume = ["--model", str(base), "--output", str(resumed), "--resume", str(resumed / "checkpoint-1")]
    # (the checkpoint is read: a family other than the run's is refused by the trainer)
    assert main([*train, *resume, "--strength", "lognormal"]) == 2
    assert "its strength family is 'gamma' but this run has strength='lognormal'" in capsys.readouterr().err
    assert main([*train, *resume]) == 0
    assert json.loads((resumed / "mixdpo_run.json").read_text())["steps"] == 2
    assert (resumed / "metrics.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grad-accum", "0"], "argument --grad-accum: must be a positive integer, got '0'"),
        (["--batch-size", "-2"], "argument --batch-size: must be a positive integer, got '-2'"),
        (["--nodes", "0"], "argument --nodes: must be a positive integer, got '0'"),
        (
            ["--eval-fraction", "1.5"],
            r"argument --eval-fraction: must be a number between 0 and 1 \(exclusive\), got '1.5'",
        ),
        (["--strength-lr", "-1"], "argument --strength-lr: must be a finite number >= 0, got '-1'"),
        (["--lora", "-1"], "argument --lora: must be an integer >= 0, got '-1'"),
        (["--beta", "nan"], "argument --beta: must be a finite number > 0, got 'nan'"),
    ],
)
def test_cli_numeric_flags_are_checked_by_argparse(args, message, tmp_path, capsys):
    from alignment.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "m", "--data", "d.jsonl", "--output", str(tmp_path / "o"), *args])
    assert exit_info.value.code == 2
    assert re.search(f"mixdpo train: error: {message}\n$", capsys.readouterr().err)


def test_cli_evaluate_batch_size_zero(capsys):
    from alignment.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--model", "m", "--data", "d.jsonl", "--batch-size", "0"])
    err = capsys.readouterr().err
    assert "mixdpo evaluate: error: argument --batch-size: must be a positive integer, got '0'" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strength-init", '{"sigma": -1}'], "--strength-init '{\"sigma\": -1}': sigma must be a positive finite"),
        (
            ["--strength-init", '{"sgima": 1}'],
            r"--strength-init '{\"sgima\": 1}': strength_init has parameter\(s\) \['sgima'\] that the 'lognormal'",
        ),
        (["--strength-init", "sigma=1"], "--strength-init must be a JSON object of the family's initial parameters"),
        (
            ["--strength-init", '{"mu": 100}', "--no-fix-mean"],
            (
                r"--strength-init '{\"mu\": 100}': the lognormal strength \(mu=100, sigma=0.5\) has "
                r"E\[beta\] = 3.046e\+43, which is not finite in torch.float32"
            ),
        ),
        (
            ["--beta", "1e40", "--strength", "gamma"],
            r"--beta 1e\+40: the gamma strength \(shape=4, rate=4e-40\) has E\[beta\] = 1e\+40",
        ),
        (
            ["--integrator", "simpson"],
            (
                "--integrator 'simpson': integrator 'simpson' is not available for the lognormal strength; "
                "accepted: gauss-hermite, quadrature, mc, qmc"
            ),
        ),
        (["--strength", "gamma", "--integrator", "qmc"], "--integrator 'qmc': .* accepted: closed-form, quadrature, mc"),
        (["--strength", "weibull"], "--strength 'weibull' is not a strength family; accepted: point, lognormal, gamma"),
        (["--objective", "mean"], "--objective 'mean' is not an objective; accepted: marginal, expected"),
        (["--resume", "no/such-checkpoint"], "--resume no/such-checkpoint is not a directory"),
    ],
)
def test_cli_flags_are_checked_before_data_and_model_load(args, message, tmp_path, capsys):
    from alignment.cli import main

    # Neither the data file nor the model exist: their errors would come first if the flags were checked later.
    assert main(["train", "--model", "no/such-model", "--data", str(tmp_path / "none.jsonl"), "--output",
                 str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert re.match(f"mixdpo train: error: {message}", err) and err.count("\n") == 1, err


def test_cli_data_errors_are_one_line(tmp_path, capsys):
    from alignment.cli import main

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": [{"role": "assistant", "content": "a"}], '
                     '"rejected": "b"}\n')
    assert main(["train", "--model", "no/such-model", "--data", str(mixed), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == (f"mixdpo train: error: '{mixed}' column 'chosen' holds a list in row 1 (line 2) but a string in "
                   "row 0 (line 1): a column must have one type in every row (prompt, chosen and rejected: all "
                   "strings, or all lists of {'role', 'content'} messages).\n")
    few = tmp_path / "few.jsonl"
    few.write_text('{"chosen": "a", "rejected": "b"}\n' * 3)
    assert main(["train", "--model", "no/such-model", "--data", str(few), "--output", str(tmp_path / "o"),
                 "--eval-fraction", "0.9"]) == 2
    assert "--eval-fraction 0.9 cannot split the 3 pairs of --data" in capsys.readouterr().err
    assert main(["train", "--model", "no/such-model", "--data", str(few), "--output", str(tmp_path / "o"),
                 "--group-column", "annotator"]) == 2
    assert (f"--group-column 'annotator' is not a column of --data {few} (its columns: chosen, rejected)"
            in capsys.readouterr().err)


def test_overwrite_drops_the_adapter_of_an_earlier_lora_run(tmp_path, capsys):
    from alignment.run_dir import remove_stale_adapter

    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json"):
        (tmp_path / name).write_text("{}")
    remove_stale_adapter(str(tmp_path))  # else the new full model would load as the old adapter
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert "removed" in capsys.readouterr().err
