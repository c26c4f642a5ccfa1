"""``mixdpo train`` for a new user: its flags (threads, reporting, checkpointing), help with defaults, the run
folder (log history, absolute paths, units), its warnings and errors, and MixDPOConfig's defaults on a CPU."""

import contextlib
import io
import json
import math
import os
import re
import warnings

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

pytest.importorskip("trl")

import torch
from datasets.utils.logging import disable_progress_bar

from alignment import experiments, run_checks, run_dir, synthetic
from alignment.cli import build_parser, main
from alignment.config import MixDPOConfig, checkpointing_default, default_bf16
from alignment.data import load_preference_data
from alignment.trainer import MixDPOTrainer

disable_progress_bar()

TRAIN = ["--max-length", "32", "--lr", "1e-3", "--cpu", "--logging-steps", "1"]


def _checkpointing_on(model) -> bool:
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, name))


@pytest.fixture(scope="module")
def task():
    ds = synthetic.pluralistic_task(24, groups=3, heterogeneity=1.0, seed=0)
    tok = synthetic.build_tokenizer(synthetic.task_texts(ds))
    model = synthetic.tiny_gpt_neox(tok, hidden_size=16, num_layers=1, seed=0)
    return ds, tok, model


@pytest.fixture(scope="module")
def root(task, tmp_path_factory):
    """A folder with the base model (``base``) and the pairs (``pairs.jsonl``)."""
    ds, tok, model = task
    folder = tmp_path_factory.mktemp("mixdpo-cli")
    model.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ds))
    (folder / "elsewhere").mkdir()
    return folder


def _train(folder, argv):
    """``mixdpo train argv`` run from ``folder``, recording the config's arguments, the trainer, the calls of
    ``torch.set_num_threads`` and what went to stdout and stderr."""
    seen = {"threads": [], "trainers": [], "config": None}

    class RecordingTrainer(MixDPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["trainers"].append(self)

    def config(**kwargs):
        seen["config"] = kwargs
        return MixDPOConfig(**kwargs)

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setattr(experiments, "MixDPOTrainer", RecordingTrainer)
        mp.setattr(experiments, "MixDPOConfig", config)
        mp.setattr(torch, "set_num_threads", seen["threads"].append)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            seen["rc"] = main(["train", *argv])
    seen["out"], seen["err"] = out.getvalue(), err.getvalue()
    return seen


@pytest.fixture(scope="module")
def trained(root):
    """A run trained from ``root`` with relative paths: 3 steps, groups, ``--threads 1 --report-to all``."""
    seen = _train(root, ["--model", "base", "--data", "pairs.jsonl", "--eval-data", "pairs.jsonl", "--output", "run",
                         "--max-steps", "3", "--batch-size", "8", "--group-column", "group", "--threads", "1",
                         "--report-to", "all", *TRAIN])
    assert seen["rc"] == 0, seen["err"]
    return seen


# ---------------------------------------------------------------------------------------------- the flags
def test_threads_sets_torch_threads_only_when_given(trained, root):
    assert trained["threads"] == [1]
    assert _train(root, ["--model", "base", "--data", "nope.jsonl", "--output", "o"])["threads"] == []


@pytest.mark.parametrize("command", ["train", "demo"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_threads_below_one_is_refused_by_argparse(command, value, tmp_path, capsys):
    argv = ["train", "--model", "m", "--data", "d.jsonl", "--output", str(tmp_path / "o")] if command == "train" \
        else ["demo"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--threads", value])
    assert exit_info.value.code == 2
    assert re.search(f"mixdpo {command}: error: argument --threads: must be a positive integer, got '{value}'\n$",
                     capsys.readouterr().err)


def test_report_to_reaches_the_config(trained):
    assert trained["config"]["report_to"] == "all"  # no longer the hard-coded "none"
    assert trained["trainers"][0].args.report_to == []  # transformers' "all": every installed integration (none)
    assert run_checks.check_report_to("none") == "none"
    assert build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output", "o"]).report_to == "none"


def test_report_to_refuses_unknown_and_uninstalled_integrations(tmp_path, capsys):
    train = ["train", "--model", "no/such-model", "--data", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "o")]
    assert main([*train, "--report-to", "tensorbord"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixdpo train: error: --report-to 'tensorbord': 'tensorbord' is not a transformers "
                          "reporting integration; accepted: none, all, or names joined by commas from "), err
    assert "tensorboard" in err and "wandb" in err
    assert main([*train, "--report-to", "none,wandb"]) == 2
    assert "pass none or all alone" in capsys.readouterr().err
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    if "wandb" not in get_available_reporting_integrations():
        assert main([*train, "--report-to", "wandb"]) == 2
        assert capsys.readouterr().err.startswith(
            "mixdpo train: error: --report-to 'wandb': the wandb integration is not installed (installed: ")


def test_gradient_checkpointing_flag_and_default(trained, root):
    # The default: None to the config, settled by the trainer: the model supports it, but training is on the CPU.
    assert trained["config"]["gradient_checkpointing"] is None
    trainer = trained["trainers"][0]
    assert type(trainer.model).supports_gradient_checkpointing
    assert trainer.args.gradient_checkpointing is False and not _checkpointing_on(trainer.model)
    # --gradient-checkpointing turns it on (and epochs decide the steps: 21 training pairs of 24, 8 a batch).
    seen = _train(root, ["--model", "base", "--data", "pairs.jsonl", "--output", "run-ckpt", "--batch-size", "8",
                         "--gradient-checkpointing", *TRAIN])
    assert seen["rc"] == 0, seen["err"]
    trainer = seen["trainers"][0]
    assert trainer.args.gradient_checkpointing is True and _checkpointing_on(trainer.model)
    assert len(trainer.train_dataset) == 21 and trainer.state.max_steps == 3
    assert run_checks.planned_optimizer_steps(21, 8) == trainer.state.max_steps
    assert "mixdpo train: warning: only 3 optimizer steps will run (fewer than 20)" in seen["err"]
    parser = build_parser()
    base = ["train", "--model", "m", "--data", "d", "--output", "o"]
    assert parser.parse_args([*base, "--no-gradient-checkpointing"]).gradient_checkpointing is False
    assert parser.parse_args(base).gradient_checkpointing is None


def test_checkpointing_default_follows_the_model_and_the_device():
    class Supports:
        supports_gradient_checkpointing = True

    class Lacks:
        supports_gradient_checkpointing = False

    assert checkpointing_default(Supports(), "cuda") is True
    assert checkpointing_default(Lacks(), "cuda") is False
    assert checkpointing_default(Supports(), "cpu") is False
    assert checkpointing_default("org/model", "cuda") is True


def test_every_option_says_its_default(capsys):
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.choices and "train" in a.choices]
    for name, command in sub.choices.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._expand_help(action)
            flag = f"{name} {action.option_strings[-1]}"
            assert "default" in text or action.required or action.const is True, f"{flag}: {text!r}"
            if action.required:
                assert "required" in text, flag
        command.format_help()  # renders (no stray %)
    assert "(default: 8)" in sub.choices["train"].format_help().replace("\n", " ")


# ---------------------------------------------------------------------------------------------- the run folder
def test_log_history_is_written_without_checkpoints(trained, root):
    run = root / "run"
    assert not list(run.glob("checkpoint-*"))
    history = json.loads((run / run_dir.LOG_HISTORY_FILE).read_text())
    assert history == json.loads(json.dumps(trained["trainers"][0].state.log_history))
    losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    assert [step for step, _ in losses] == [1, 2, 3]
    # Policy and reference start equal, so every margin of the first step is 0: loss log 2.
    assert losses[0][1] == pytest.approx(math.log(2.0), abs=1e-4)
    assert history[-1]["eval_loss"] == pytest.approx(json.loads((run / "metrics.json").read_text())["eval_loss"])


def test_few_steps_warning_names_the_steps_and_the_flags(trained):
    assert trained["trainers"][0].state.max_steps == 3
    assert ("mixdpo train: warning: only 3 optimizer steps will run (fewer than 20)" in trained["err"]
            and "--epochs or --max-steps" in trained["err"] and "--batch-size" in trained["err"])
    assert run_checks.few_steps_warning(20) is None
    assert run_checks.few_steps_warning(1).startswith("only 1 optimizer step will run")
    # transformers' count: a partial last batch and a partial last accumulation are steps, epochs round up.
    assert [run_checks.planned_optimizer_steps(*args) for args in
            [(48, 8), (48, 8, 4), (50, 8, 1, 2.5), (50, 8, 1, 1.0, 5), (48, 8, 1, 1.0, 0, 2)]] == [6, 2, 18, 5, 3]


def test_run_record_holds_absolute_paths(trained, root):
    record = json.loads((root / "run" / run_dir.RUN_FILE).read_text())
    assert record["model"] == record["ref_model"] == str(root / "base")
    assert record["data"] == record["eval_data"] == str(root / "pairs.jsonl")
    assert run_checks.recorded_path("smollm2") == "smollm2" and run_checks.recorded_path(None) is None


def test_evaluate_and_report_from_another_directory(trained, root, monkeypatch, capsys):
    monkeypatch.chdir(root / "elsewhere")
    out = root / "eval.json"
    assert main(["evaluate", "--model", "../run", "--data", "../pairs.jsonl", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    # The run's group column is the default: 3 groups, the macro accuracy of the trainer's final evaluation.
    assert res["n_groups"] == 3 and res["n_pairs"] == 24 and res["margin_unit"] == "nats"
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert res["accuracy_macro"] == pytest.approx(metrics["eval_rewards/accuracies_macro"], abs=1e-6)
    margins = np.load(root / "run" / run_dir.MARGINS_FILE)
    assert str(margins["margin_unit"]) == "nats"
    assert res["margin_mean"] == pytest.approx(float(margins["margin"].mean()), abs=1e-4)
    assert text.startswith("margins h in nats: the policy's log-ratio minus the reference's")
    assert re.search(r"\| +margin_mean \| +-?\d\.\d{4} \| +nats \|", text), text
    assert "margin_mean (nats)" in text  # the per-group table's header
    # report --data reloads both models from the run's record.
    assert main(["report", "../run", "--data", "../pairs.jsonl"]) == 0
    report = (root / "run" / "report" / "report.md").read_text()
    assert re.search(r"\| +eval_rewards/margins \| +\S+ \| +beta\*h \(logits\) \|", report), report
    assert re.search(r"\| +eval_loss \| +\S+ \| +nats \|", report)
    assert set(run_dir.read_margins(str(root / "run"))) == {"row", "margin", "chosen_logratio", "rejected_logratio",
                                                            "group"}


def test_train_table_names_units(trained):
    assert re.search(r"\| +eval_rewards/margins \| +\S+ \| +beta\*h \(logits\) \|", trained["out"]), trained["out"]
    assert re.search(r"\| +eval_loss \| +\S+ \| +nats \|", trained["out"])
    assert run_dir.metric_unit("eval_rewards/accuracies_macro") == "" and run_dir.metric_unit("margin_mean") == "nats"


# ---------------------------------------------------------------------------------------------- errors
def test_ref_model_with_lora_is_refused(tmp_path, capsys):
    assert main(["train", "--model", "no/such-model", "--ref-model", "other", "--lora", "8", "--data",
                 str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == ("mixdpo train: error: --ref-model other cannot be used with --lora 8: with LoRA the reference is "
                   "--model with the adapter disabled, so a separate reference would be ignored; drop --ref-model, or "
                   "drop --lora to fine-tune the whole model against --ref-model\n")


def test_csv_data_is_named_as_csv(tmp_path, capsys):
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\nQ,yes,no\n")
    assert main(["train", "--model", "no/such-model", "--data", str(csv), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mixdpo train: error: {str(csv)!r} is a CSV file, which is not read as preference pairs: "
                          "pass JSONL (one JSON object per line with prompt, chosen and rejected), a .json list of "
                          "such objects, or a `datasets` save_to_disk directory"), err
    assert "not valid JSON" not in err
    renamed = tmp_path / "pairs.txt"  # a CSV under another name: its header line gives it away
    renamed.write_text(csv.read_text())
    with pytest.raises(ValueError, match=r"is a CSV file"):
        load_preference_data(renamed)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{oops\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        load_preference_data(broken)


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"mixdpo report: error: RUN_DIR {tmp_path} is not a mixdpo train run directory (it has no strength.json); "
        "pass the --output directory of a mixdpo train run\n")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith(f"mixdpo report: error: RUN_DIR {tmp_path / 'missing'} is not a "
                                              "directory")
    assert not (tmp_path / "report").exists()


# ---------------------------------------------------------------------------------------------- the config
def test_mixdpo_config_as_written_trains_on_a_cpu(task, tmp_path):
    """The README's ``MixDPOConfig(output_dir=..., strength="lognormal")``, no other option."""
    ds, tok, model = task
    cfg = MixDPOConfig(output_dir=str(tmp_path / "out"), strength="lognormal")
    expected = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert cfg.bf16 is expected  # TRL's DPOConfig says True, emulated (slow) on a CPU
    import copy

    policy, ref = copy.deepcopy(model), copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = MixDPOTrainer(model=policy, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok)
        trainer.train()
    assert not [w for w in caught if "ran away" in str(w.message)]
    assert trainer.args.gradient_checkpointing is (trainer.args.device.type != "cpu")
    assert trainer.state.global_step == 3 * math.ceil(24 / 8)  # TRL's 3 epochs of batches of 8
    assert next(policy.parameters()).dtype == torch.float32
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_default_bf16_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_bf16() is True
    assert default_bf16(use_cpu=True) is False and default_bf16(fp16=True) is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_bf16() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if hasattr(torch, "accelerator"):
        monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert default_bf16() is False


# ---------------------------------------------------------------------------------------------- the guard
def test_strength_drift_warning_numbers():
    assert run_checks.strength_drift_warning(0.1, 0.9, 0.5) is None
    assert run_checks.strength_drift_warning(0.1, 0.011, 9.9) is None
    moved = run_checks.strength_drift_warning(0.1, 1.5, 0.5)
    assert "E[beta] went from 0.1 to 1.5 (15x its start) and its CV is 0.5" in moved
    assert "keep the mean pinned (strength_fix_mean=True, the default; drop --no-fix-mean)" in moved
    assert "E[beta] went from 0.1 to 0.005 (0.05x its start)" in run_checks.strength_drift_warning(0.1, 0.005, 0.5)
    wide = run_checks.strength_drift_warning(0.1, 0.1, 12.0, fix_mean=True)
    assert "its CV is 12" in wide and "the mean is pinned" in wide and "--strength-lr" in wide


def test_trainer_warns_when_the_strength_runs_away(task, tmp_path):
    from transformers import TrainerCallback

    ds, tok, model = task
    import copy

    class Inflate(TrainerCallback):  # E[beta] x 20 as training ends
        def on_train_end(self, args, state, control, **kwargs):
            with torch.no_grad():
                trainer.strength.mu += math.log(20.0)

    # Gradient updates: the only change to the strength is the callback's (a refit would move it as well).
    cfg = MixDPOConfig(output_dir=str(tmp_path / "out"), strength="lognormal", strength_fix_mean=False, max_steps=1,
                       strength_update="gradient", use_cpu=True, report_to="none", save_strategy="no", per_device_train_batch_size=8)
    trainer = MixDPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=cfg, train_dataset=ds,
                            processing_class=tok, callbacks=[Inflate()])
    with pytest.warns(RuntimeWarning, match=r"ran away: E\[beta\] went from 0\.1 to ") as record:
        trainer.train()
    (message,) = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    mean = float(trainer.strength.mean().detach())
    assert f"to {mean:.4g} ({mean / 0.1:.3g}x its start)" in message and 19 < mean / 0.1 < 21
    assert "keep the mean pinned (strength_fix_mean=True, the default" in message


def test_precompute_ref_uses_the_given_ref_model(root):
    """--precompute-ref with --ref-model precomputes with that reference (it used to be dropped silently)."""
    seen = _train(root, ["--model", "base", "--ref-model", "base", "--precompute-ref", "--data", "pairs.jsonl",
                         "--output", "run-precompute", "--max-steps", "1", "--batch-size", "8", *TRAIN])
    assert seen["rc"] == 0, seen["err"]
    trainer = seen["trainers"][0]
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
