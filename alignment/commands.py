"""The ``mixdpo`` subcommands: ``train``, ``evaluate``, ``report`` and ``demo``, each with the check of its flags.

A ``check_*`` function runs before anything is loaded and raises a ValueError that names the flag; a command
function does the work and returns the exit status. Only ``train`` and ``demo`` need TRL, and they import it (via
:mod:`alignment.config`, :mod:`alignment.trainer` and :mod:`alignment.experiments`) when they run, so ``mixdpo
report`` works without TRL. ``evaluate`` and ``report --data`` import it only for implicit-prompt pairs, which
TRL's ``maybe_extract_prompt`` splits into prompt and completions before the margins are computed.
"""

from __future__ import annotations

import math
import os
import sys
import time

from mixlogit.persistence import refuse_to_overwrite, write_json
from mixlogit.tables import markdown_table

from . import checkpoints, run_checks, run_dir
from .annotator_diagnostics import (
    ANNOTATOR_PLOT_FILE,
    annotator_group_summary,
    plot_annotator_strength,
    population_strength,
    read_annotator_table,
)
from .data import load_preference_data, validate_preference_dataset
from .diagnostics import PLOT_FILES, plot_strength, strength_to_arviz
from .evaluate import evaluate
from .losses import OBJECTIVES
from .models import load_causal_lm
from .panel import panel_integrator
from .strength import STRENGTHS, build_strength, default_strength_init, parse_strength_init

__all__ = [
    "check_evaluate",
    "check_report",
    "check_train",
    "demo_command",
    "evaluate_command",
    "report_command",
    "train_command",
]


# ---------------------------------------------------------------------------------------------- flag checks
def _listing(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _check_not_file(flag: str, path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a directory; choose a directory for {flag}")


def _refuse_replacing(flag: str, folder: str, names, overwrite: bool, hint: str = "") -> None:
    """:func:`mixlogit.persistence.refuse_to_overwrite`, its error worded for the flag that chose ``folder``
    (the files listed up to six, and the ``hint``)."""
    try:
        refuse_to_overwrite(folder, names, overwrite)
    except FileExistsError:
        present = [n for n in names if os.path.exists(os.path.join(folder, n))]
        raise ValueError(
            f"{flag} {folder} already holds {_listing(present)}; pass --overwrite to replace them or choose "
            f"another {flag}{hint}"
        ) from None


def _naming(flag: str, fn, *args):
    """``fn(*args)``, with a ValueError or TypeError re-raised as a ValueError that names ``flag``."""
    try:
        return fn(*args)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{flag}: {e}") from None


def check_train(a) -> None:
    """Check the flags of ``train`` that argparse's types cannot, before any data or model is loaded."""
    import torch

    if a.resume and not os.path.isdir(a.resume):
        raise ValueError(f"--resume {a.resume} is not a directory; pass a checkpoint-N directory of an earlier run")
    if a.resume and (problem := checkpoints.checkpoint_problem(a.resume)):
        last = checkpoints.last_complete(os.path.dirname(os.path.abspath(a.resume)))
        raise ValueError(f"--resume {a.resume} {problem}" + (f"; resume from {last}, the last complete checkpoint"
                                                           " of that run" if last else ""))
    _check_not_file("--output", a.output)
    if os.path.isdir(a.output) and a.resume:
        # Resuming continues the run that wrote the checkpoint: its own files in --output (checkpoints with its
        # id, TRL's model card, what a killed final save left) are expected there; another run's are not.
        foreign = checkpoints.foreign_entries(a.output, checkpoints.checkpoint_run_id(a.resume), a.resume)
        _refuse_replacing("--output", a.output, foreign, a.overwrite,
                          " (they are not the files of the run that wrote --resume's checkpoint)")
    elif os.path.isdir(a.output):
        present, _ = run_dir.run_files_present(a.output)
        latest = checkpoints.last_complete(a.output)
        hint = f" (or continue that run with --resume {latest})" if latest else ""
        _refuse_replacing("--output", a.output, present, a.overwrite, hint)
    if a.ref_model and a.lora:
        raise ValueError(f"--ref-model {a.ref_model} cannot be used with --lora {a.lora}: with LoRA the reference is "
                         "--model with the adapter disabled, so a separate reference would be ignored; drop "
                         "--ref-model, or drop --lora to fine-tune the whole model against --ref-model")
    a.report_to = run_checks.check_report_to(a.report_to)
    if a.objective not in OBJECTIVES:
        raise ValueError(f"--objective {a.objective!r} is not an objective; accepted: {', '.join(OBJECTIVES)}")
    if a.strength not in STRENGTHS:
        raise ValueError(f"--strength {a.strength!r} is not a strength family; accepted: {', '.join(STRENGTHS)}")
    # Build the strength from the flags with the library's own checks, one flag at a time so the error names it.
    init_flag = f"--strength-init '{a.strength_init}'" if a.strength_init is not None else f"--beta {a.beta}"
    a.strength_init = parse_strength_init(a.strength_init, "--strength-init")
    init = _naming(init_flag, default_strength_init, a.strength, a.beta, a.strength_init, a.fix_mean)
    strength = _naming(init_flag, build_strength, a.strength, init, None, None, a.fix_mean, a.beta)
    if a.integrator is not None:
        strength = _naming(f"--integrator {a.integrator!r}", build_strength, a.strength, init, a.integrator, None,
                           a.fix_mean, a.beta)
    if a.nodes is not None:
        _naming(f"--nodes {a.nodes}", build_strength, a.strength, init, a.integrator, a.nodes, a.fix_mean, a.beta)
    # The trainer's log-probabilities are float32 (half precision is upcast): E[beta] must be finite there.
    _naming(init_flag, strength.check_range, torch.float32)
    if a.strength_level == "annotator":
        # MixDPOConfig's checks of the panel (a random strength, a rule with a panel form), named by their flags.
        rule = f" --integrator {a.integrator!r}" if a.integrator is not None else ""
        _naming(f"--strength-level annotator with --strength {a.strength}{rule}", panel_integrator, a.strength,
                a.integrator)
        if a.objective != "marginal":
            raise ValueError(f"--strength-level annotator fits the panel marginal likelihood; --objective "
                             f"{a.objective!r} has no panel form: use --objective marginal")
        if not a.annotator_column:
            raise ValueError("--annotator-column must name the column of each pair's annotator")


def check_evaluate(a) -> None:
    """Check ``evaluate``'s ``--json`` before the models load: a file name, in a folder that exists, new unless
    ``--overwrite``."""
    if not a.json:
        return
    if os.path.isdir(a.json):
        raise ValueError(f"--json {a.json} is a directory; pass a file name for the metrics")
    if not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        raise ValueError(f"--json {a.json}: its directory does not exist")
    if os.path.exists(a.json) and not a.overwrite:
        raise ValueError(f"--json {a.json} already exists; pass --overwrite to replace it or choose another --json")


def check_report(a) -> None:
    """Check ``report``'s ``RUN_DIR`` (a run folder: it has ``strength.json``) and ``--out`` (a folder whose earlier
    report is kept unless ``--overwrite``)."""
    if not os.path.isdir(a.run_dir):
        raise ValueError(f"RUN_DIR {a.run_dir} is not a directory; pass the --output directory of a mixdpo train run")
    if run_dir.read_strength_config(a.run_dir) is None:
        raise ValueError(f"RUN_DIR {a.run_dir} is not a mixdpo train run directory (it has no "
                         f"{run_dir.STRENGTH_CONFIG_NAME}); pass the --output directory of a mixdpo train run")
    out = _report_dir(a)
    _check_not_file("--out", out)
    _refuse_replacing("--out", out, (run_dir.REPORT_FILE, *PLOT_FILES, ANNOTATOR_PLOT_FILE), a.overwrite)


def _report_dir(a) -> str:
    return a.out or os.path.join(a.run_dir, run_dir.REPORT_DIR)


# ---------------------------------------------------------------------------------------------- subcommands
def _trl_side():
    """:mod:`alignment.experiments`, the TRL side (``MixDPOConfig``, ``MixDPOTrainer``, the harness), imported
    when a command first needs it. This is alignment's one deferred import, and it runs down the layers: TRL loads
    only for training, the demo and implicit-prompt pairs, so ``mixdpo report`` and ``mixdpo evaluate`` on pairs
    with a prompt run without it."""
    from . import experiments

    return experiments


def _load_data(path: str, flag: str = "--data", group_column: str | None = None, explicit_prompt: bool = False,
               annotator_column: str | None = None):
    """Preference pairs from ``path``; a missing ``--group-column`` or ``--annotator-column`` (or an annotator
    missing in a row) is named by its flag.

    With ``explicit_prompt`` (for the commands that evaluate, which need a prompt per pair), implicit-prompt pairs
    are split by TRL (:func:`alignment.experiments.with_explicit_prompt`); ``train`` leaves that to the trainer,
    since TRL's ``DPOTrainer`` splits its datasets itself.
    """
    data = load_preference_data(path)
    if group_column is not None and group_column not in data.column_names:
        raise ValueError(
            f"--group-column {group_column!r} is not a column of {flag} {path} (its columns: "
            f"{', '.join(data.column_names)})"
        )
    if annotator_column is not None:
        _check_annotators(data, flag, path, annotator_column)
    if not explicit_prompt or "prompt" in data.column_names:
        return data
    try:
        return _trl_side().with_explicit_prompt(data)
    except ImportError:  # only implicit-prompt pairs need TRL (mixdpo report works without it otherwise)
        raise ValueError(
            f"{flag} {path} holds implicit-prompt pairs (chosen and rejected only), and splitting them into prompt "
            "and completions needs TRL (trl.data_utils.maybe_extract_prompt), which cannot be imported: install "
            "trl, or give the pairs a 'prompt' field"
        ) from None


def _check_annotators(data, flag: str, path: str, column: str) -> None:
    """Every pair of ``data`` names its annotator in ``column`` (before any split, so the row is the file's)."""
    if column not in data.column_names:
        raise ValueError(f"--annotator-column {column!r} is not a column of {flag} {path} (its columns: "
                         f"{', '.join(data.column_names)}); --strength-level annotator needs each pair's annotator")
    for i, v in enumerate(data[column]):
        if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
            raise ValueError(f"--annotator-column {column!r} of {flag} {path} is missing in row {i} (value {v!r}): "
                             "every pair needs its annotator with --strength-level annotator")


def train_command(a) -> int:
    """``mixdpo train``: train, evaluate, and save the model, the strength and the run records into ``--output``.

    The printed table names each metric's unit: ``eval_loss`` in nats, TRL's ``eval_rewards/margins`` in beta*h
    (logits; h, the margin, is the policy log-ratio minus the reference log-ratio, in nats).
    """
    import torch

    if a.threads is not None:  # otherwise torch keeps its own setting (or OMP_NUM_THREADS)
        torch.set_num_threads(a.threads)
    trl_side = _trl_side()
    annotators = a.annotator_column if a.strength_level == "annotator" else None
    data = _load_data(a.data, "--data", a.group_column, annotator_column=annotators)
    if a.eval_data:
        train, test = data, _load_data(a.eval_data, "--eval-data", a.group_column, annotator_column=annotators)
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
    elif a.ref_model or not a.precompute_ref:  # --precompute-ref computes with --ref-model when it is given
        ref_model, _ = load_causal_lm(a.ref_model or a.model)
    cfg = trl_side.MixDPOConfig(
        output_dir=a.output,
        strength=a.strength,
        strength_init=a.strength_init,
        strength_integrator=a.integrator,
        strength_nodes=a.nodes,
        strength_learning_rate=a.strength_lr,
        strength_fix_mean=a.fix_mean,
        objective=a.objective,
        group_column=a.group_column,
        strength_level=a.strength_level,
        annotator_column=a.annotator_column,
        strength_update=a.strength_update,  # None: MixDPOConfig's default (refit where there is a phi to fit)
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
        report_to=a.report_to,
        logging_steps=a.logging_steps,
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        use_cpu=a.cpu,
        dataloader_num_workers=0,
        # None: on where the model supports it, off on the CPU (MixDPOConfig); bf16 is the config's default too.
        gradient_checkpointing=a.gradient_checkpointing,
    )
    trainer = trl_side.MixDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=cfg,
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    steps = run_checks.planned_optimizer_steps(len(trainer.train_dataset), a.batch_size, a.grad_accum, a.epochs,
                                               a.max_steps, cfg.world_size)
    main_rank = trainer.is_world_process_zero()  # under torchrun/accelerate only rank 0 prints and writes run files
    if main_rank and (note := run_checks.few_steps_warning(steps)):
        print(f"mixdpo train: warning: {note}", file=sys.stderr)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=a.resume or None)
    wall = time.perf_counter() - t0
    metrics = trainer.evaluate()
    if main_rank and a.overwrite and not a.lora:
        run_dir.remove_stale_adapter(a.output)
    trainer.save_model(a.output)  # every rank calls it (a collective under FSDP/ZeRO); it writes on rank 0
    margins = trainer.pair_margins(test)
    if not main_rank:
        return 0
    tokenizer.save_pretrained(a.output)
    run_dir.save_margins(a.output, margins)
    run = {  # absolute paths: the run folder works from any working directory
        "model": run_checks.recorded_path(a.model),
        "ref_model": run_checks.recorded_path(a.ref_model or a.model),
        "data": run_checks.recorded_path(a.data),
        "eval_data": run_checks.recorded_path(a.eval_data),
        "lora": a.lora,
        "group_column": a.group_column,
        "max_length": a.max_length,
        "strength": a.strength,
        "strength_level": a.strength_level,
        "annotator_column": a.annotator_column if a.strength_level == "annotator" else None,
        "beta": a.beta,
        "train_seconds": wall,
        "steps": trainer.state.global_step,
        "run_id": trainer.run_id,
    }
    # (resuming, check_train let through only a record of this run: the run replaces its own records)
    run_dir.write_run_records(a.output, run, metrics, overwrite=a.overwrite or bool(a.resume),
                              log_history=trainer.state.log_history)
    keys = ["eval_loss", "eval_rewards/accuracies", "eval_rewards/accuracies_macro", "eval_rewards/margins",
            "eval_beta/mean", "eval_beta/cv"]
    rows = [{"metric": k, "value": float(metrics[k]), "unit": run_dir.metric_unit(k)} for k in keys if k in metrics]
    print(markdown_table(rows, floatfmt=".4g", missing="nan"))
    print(f"trained {trainer.state.global_step} steps in {wall:.1f} s; run saved in {a.output}")
    return 0


def evaluate_command(a) -> int:
    """``mixdpo evaluate``: preference accuracy and margins of a policy (or a run) against its reference.

    A margin is h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)], in nats (DPO's logit is
    beta*h): the printed table's ``unit`` column, its header and the ``--json`` file's ``margin_unit`` (for every
    ``margin_mean*``, per group too) say so. On a run folder the run's reference, group column and max length are
    the defaults of ``--ref-model``, ``--group-column`` and ``--max-length``.
    """
    run = run_dir.read_run_record(a.model)
    data = _load_data(a.data, "--data", a.group_column, explicit_prompt=True)
    group_column = a.group_column
    if group_column is None and run.get("group_column"):
        if run["group_column"] in data.column_names:
            group_column = run["group_column"]
        else:
            print(f"mixdpo evaluate: note: the run's group column {run['group_column']!r} is not a column of --data "
                  f"{a.data}: no per-group statistics", file=sys.stderr)
    model, tokenizer = load_causal_lm(a.model, adapter_base=run.get("model") if run.get("lora") else None)
    ref_path = a.ref_model or (None if run.get("lora") else run.get("ref_model"))
    ref_model = load_causal_lm(ref_path)[0] if ref_path else None
    res = evaluate(model, ref_model, data, tokenizer, group_column=group_column, batch_size=a.batch_size,
                   max_length=a.max_length or run.get("max_length"))
    keys = ("n_pairs", "n_dropped", "accuracy", "accuracy_macro", "margin_mean", "margin_mean_macro", "n_groups")
    by_group = None if res["by_group"] is None else res["by_group"].reset_index().to_dict("records")
    unit = run_dir.MARGIN_UNIT
    print(f"margins h in {unit}: the policy's log-ratio minus the reference's, chosen over rejected (beta*h is DPO's "
          "logit)")
    print(markdown_table([{"metric": k, "value": res[k], "unit": run_dir.metric_unit(k)} for k in keys],
                         floatfmt=".4f", missing="nan"))
    if by_group is not None:
        print()
        print(markdown_table([{f"{k} ({unit})" if k == "margin_mean" else k: v for k, v in row.items()}
                              for row in by_group], floatfmt=".4f", missing="nan"))
    if a.json:
        summary = {k: res[k] for k in keys} | {"margin_unit": unit, "by_group": by_group}
        write_json(a.json, summary, overwrite=a.overwrite, indent=2)
    return 0


def report_command(a) -> int:
    """``mixdpo report``: plots of the fitted strength (exact density, course over training, per group), and a table
    of its exact moments and of the run's metrics (no TRL) whose ``unit`` column says which numbers are nats (losses,
    margins h) and which beta*h (TRL's ``rewards/*``)."""
    info = run_dir.read_strength_config(a.run_dir)  # check_report refused a folder without one
    data = _load_data(a.data, explicit_prompt=True) if a.data else None
    idata = strength_to_arviz(a.run_dir, data)
    out = _report_dir(a)
    paths = plot_strength(idata, out, dpo_beta=info.get("beta"))
    annotators = ""
    if os.path.isfile(os.path.join(a.run_dir, run_dir.STRENGTH_BY_ANNOTATOR)):
        paths.append(plot_annotator_strength(a.run_dir, out))
        annotators = _annotator_section(a.run_dir)
    # Exact moments and quantiles of the fitted distribution (the family's formulas), never sampled ones.
    strength, _ = run_dir.load_strength(a.run_dir)
    dist = strength.exact_distribution()
    rows = [{"quantity": f"fitted beta/{k}", "value": float(v), "unit": ""} for k, v in info.get("params", {}).items()]
    rows += [{"quantity": f"fitted {k} of beta (exact)", "value": float(f().detach()), "unit": ""}
             for k, f in (("mean", strength.mean), ("sd", strength.std), ("CV", strength.cv))]
    rows += [{"quantity": f"fitted {q:.0%} quantile of beta (exact)", "value": float(dist.ppf(q)), "unit": ""}
             for q in (0.05, 0.5, 0.95) if dist is not None]
    metrics = run_dir.read_metrics(a.run_dir)
    if metrics is not None:
        rows += [{"quantity": k, "value": float(v), "unit": run_dir.metric_unit(k)} for k, v in metrics.items()
                 if isinstance(v, (int, float)) and ("rewards" in k or k == "eval_loss")]
    table = markdown_table(rows, floatfmt=".4g", missing="nan")
    text = (
        f"# MixDPO run {a.run_dir}\n\nfitted strength family: {info['family']} (fix_mean={info.get('fix_mean')}, "
        f"objective={info.get('objective')})\n\n{table}\n\n{annotators}"
        + "\n".join(f"![]({os.path.basename(p)})" for p in paths)
        + "\n"
    )
    with open(os.path.join(out, run_dir.REPORT_FILE), "w") as f:
        f.write(text)
    print(text)
    print("plots:", *paths, sep="\n  ")
    return 0


def _annotator_section(folder: str) -> str:
    """The report's per-annotator part: the spread of the annotators' posterior means against the population, and
    the per-group table when the run has groups."""
    table = read_annotator_table(folder)
    pop = population_strength(run_dir.load_strength(folder)[0])
    text = (f"## Per-annotator strength\n\n{len(table)} annotators, {int(table['n_pairs'].sum())} pairs; posterior "
            f"means {table['mean'].min():.4g} to {table['mean'].max():.4g} (sd {table['mean'].std():.4g}); the "
            f"population (an annotator unseen in training) has mean {pop['mean']:.4g}, 90% interval "
            f"{pop['low']:.4g} to {pop['high']:.4g}.\n\n")
    groups = annotator_group_summary(table)
    if groups is not None:
        text += markdown_table(groups.reset_index().to_dict("records"), floatfmt=".4g", missing="nan") + "\n\n"
    return text


def demo_command(a) -> int:
    """``mixdpo demo``: DPO against MixDPO on the synthetic pluralistic task over seeds, or a few SmolLM2 LoRA steps."""
    import torch

    trl_side = _trl_side()
    # A tiny model gains nothing from intra-op threads, and spinning OpenMP threads are slow when the cores are
    # shared with other work.
    torch.set_num_threads(a.threads)  # --threads is a positive integer (argparse refuses 0 and negatives)
    if a.model == "smollm2":
        trl_side.demo_smollm2(a.output or os.path.join(os.getcwd(), "mixdpo-smollm2"), a.steps, a.seed)
    else:
        from .demo import run_demo

        run_demo(a.output, a.overwrite, a.heterogeneity, tuple(range(a.seed, a.seed + a.seeds)), a.pairs, a.test_pairs,
                 a.steps, a.pretrain_steps, a.beta)
    return 0
