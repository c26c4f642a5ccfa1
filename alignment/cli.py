"""``mixdpo``: train, evaluate, report and demo MixDPO from the command line (the parser and ``main``).

Subcommands (implemented in :mod:`alignment.commands`):

- ``mixdpo train --model DIR --data FILE.jsonl|DIR --strength lognormal ... --output DIR`` (``--strength-level
  annotator --annotator-column annotator_id``: one strength per annotator, panel MixDPO)
- ``mixdpo evaluate --model DIR --ref-model DIR --data FILE [--group-column group]``
- ``mixdpo report RUN_DIR`` (PNG plots of the learned distribution and per-pair strengths, a metrics table; for
  an annotator-level run also the per-annotator caterpillar plot and the per-group table)
- ``mixdpo demo [--model tiny|smollm2]``: DPO against three MixDPO variants on the pluralistic benchmark's task over
  3 seeds with tiny GPT-NeoX models built from a config (default: the true and fitted strength distributions, a
  takeaway, and demo.md, demo.csv and two PNGs in ``--output``), or a few LoRA MixDPO steps on
  SmolLM2-135M-Instruct (``make smollm2``).

Every option's help ends with its default (``mixdpo train --help``). ``train`` also takes ``--threads N`` (torch's
intra-op threads), ``--report-to`` (transformers' ``report_to``: none, all, tensorboard, wandb, ...) and
``--gradient-checkpointing/--no-gradient-checkpointing`` (default: on where the model supports it, off on the CPU);
it warns on stderr when fewer than 20 optimizer steps will run. Margins are in nats, TRL's ``rewards/*`` in beta*h.

Models are loaded from local directories only (``save_pretrained`` output) or from the SmolLM2 GGUF cache; a hub
model name is refused, since this tool runs offline.
"""

from __future__ import annotations

import argparse
import sys

from mixlogit.validation import check_count, check_fraction, check_int, check_non_negative, check_positive

from .commands import (
    check_evaluate,
    check_report,
    check_train,
    demo_command,
    evaluate_command,
    report_command,
    train_command,
)
from .demo import check_demo
from .models import offline_hub
from .panel import STRENGTH_LEVELS
from .run_checks import STRENGTH_UPDATES
from .strength import STRENGTHS
from .synthetic import LEVELS

__all__ = [
    "build_parser",
    "main",
    "non_negative_float",
    "non_negative_int",
    "open_fraction",
    "positive_float",
    "positive_int",
]


# ---------------------------------------------------------------------------------------------- flag types
def _flag_type(name: str, convert, check, what: str):
    """An argparse type: ``convert`` the text, then ``check`` it with :mod:`mixlogit.validation`; argparse puts
    the flag before the message ("argument --nodes: must be a positive integer, got '0'")."""

    def parse(text: str):
        try:
            return check("value", convert(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None

    parse.__name__ = parse.__qualname__ = name
    return parse


#: argparse type: an integer >= 1.
positive_int = _flag_type("positive_int", int, check_count, "a positive integer")
#: argparse type: an integer >= 0.
non_negative_int = _flag_type("non_negative_int", int, lambda n, v: check_int(n, v, 0), "an integer >= 0")
#: argparse type: a finite number > 0.
positive_float = _flag_type("positive_float", float, check_positive, "a finite number > 0")
#: argparse type: a finite number >= 0.
non_negative_float = _flag_type("non_negative_float", float, check_non_negative, "a finite number >= 0")
#: argparse type: a number strictly between 0 and 1.
open_fraction = _flag_type("open_fraction", float, check_fraction, "a number between 0 and 1 (exclusive)")


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default ("(default: 8)"), unless its help already says what the default
    is, or the option is required or an on/off switch (``store_true``: off unless given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction)):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mixdpo",
        description="MixDPO: DPO with a learned distribution of preference "
        "strength, for Hugging Face causal LMs.",
        formatter_class=_HelpWithDefaults,
    )
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=_HelpWithDefaults)

    t = command("train", "train a causal LM with MixDPO")
    t.add_argument("--model", required=True, help="local save_pretrained directory, or 'smollm2' (required)")
    t.add_argument("--ref-model", help="reference model directory (default: --model; not with --lora, whose "
                   "reference is --model with the adapter disabled)")
    t.add_argument("--data", required=True,
                   help="preference pairs: FILE.jsonl, FILE.json or a save_to_disk directory (required)")
    t.add_argument("--eval-data", help="held-out pairs (default: --eval-fraction of --data)")
    t.add_argument("--eval-fraction", type=open_fraction, default=0.1,
                   help="share of --data held out for evaluation when there is no --eval-data (0 to 1)")
    t.add_argument("--output", required=True,
                   help="run directory (required; refused if it holds files, unless --overwrite)")
    t.add_argument("--overwrite", action="store_true", help="write the run over the files already in --output")
    t.add_argument("--strength", default="lognormal", help="strength family: " + " | ".join(STRENGTHS))
    t.add_argument("--strength-init", help="initial family parameters as JSON, e.g. '{\"sigma\": 1.0}' "
                   "(default: the family's, with E[beta] = --beta)")
    t.add_argument("--integrator", help="integrator of E_beta (default: the family's)")
    t.add_argument("--nodes", type=positive_int, help="quadrature nodes or draws (default: the integrator's)")
    t.add_argument("--strength-lr", type=non_negative_float,
                   help="strength learning rate (default: min(1000 * --lr, 1e-2))")
    t.add_argument("--fix-mean", action=argparse.BooleanOptionalAction, default=True,
                   help="pin E[beta] to --beta and learn only the spread (the default, as the pluralistic benchmark "
                   "supports); --no-fix-mean learns the mean too")
    t.add_argument("--strength-update", choices=STRENGTH_UPDATES, default=None,
                   help="refit: phi is refitted on every pair's cached margin every 10 steps and when training ends "
                   "(the pluralistic benchmark's setting); gradient: phi moves with the optimizer, at --strength-lr "
                   "(default: refit for a random --strength on a deterministic --integrator, else gradient)")
    t.add_argument("--objective", default="marginal", help="marginal | expected")
    t.add_argument("--group-column", help="subgroup or annotator column (macro accuracy; default: none)")
    t.add_argument("--strength-level", choices=STRENGTH_LEVELS, default="pair",
                   help="what one draw of beta belongs to: every pair (MixDPO) or every annotator (panel MixDPO, "
                   "trained by EM with cached margins and refits of the strength; needs a random --strength)")
    t.add_argument("--annotator-column", default="annotator_id",
                   help="column naming each pair's annotator (with --strength-level annotator)")
    t.add_argument("--beta", type=positive_float, default=0.1, help="DPO's beta: E[beta] at the start")
    t.add_argument("--lr", type=non_negative_float, default=1e-6, help="the policy's learning rate")
    t.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the training pairs")
    t.add_argument("--max-steps", type=non_negative_int, default=0,
                   help="optimizer steps (0: --epochs decides)")
    t.add_argument("--batch-size", type=positive_int, default=8, help="pairs per batch")
    t.add_argument("--grad-accum", type=positive_int, default=1, help="batches per optimizer step")
    t.add_argument("--max-length", type=positive_int, default=1024, help="tokens of prompt + completion")
    t.add_argument("--lora", type=non_negative_int, default=0, help="LoRA rank (0: full fine-tuning)")
    t.add_argument("--precompute-ref", action="store_true", help="precompute the reference log-probs")
    t.add_argument("--seed", type=int, default=42, help="seed of the split, the data order and the model")
    t.add_argument("--logging-steps", type=positive_int, default=10, help="optimizer steps between logs")
    t.add_argument("--save-steps", type=non_negative_int, default=0,
                   help="checkpoint every N steps (0: no checkpoints)")
    t.add_argument("--resume", help="checkpoint directory to resume from (default: start afresh)")
    t.add_argument("--cpu", action="store_true", help="train on the CPU even if an accelerator is present")
    t.add_argument("--threads", type=positive_int,
                   help="torch intra-op threads, torch.set_num_threads (default: torch's own setting)")
    t.add_argument("--report-to", default="none",
                   help="where transformers reports the logs: none, all (every installed integration), or "
                   "integration names joined by commas (tensorboard, wandb, mlflow, ...)")
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass to save memory, at about a quarter more "
                   "compute per step (default: on where the model supports it, off on the CPU, where memory is "
                   "rarely the limit and the recomputation only costs time)")
    t.set_defaults(func=train_command, check=check_train)

    e = command("evaluate", "preference accuracy and margins (nats) of a policy against a reference")
    e.add_argument("--model", required=True, help="policy directory, or a mixdpo train run directory (required)")
    e.add_argument("--ref-model", help="reference directory (default: the run's reference)")
    e.add_argument("--data", required=True, help="preference pairs: FILE.jsonl, FILE.json or a save_to_disk "
                   "directory (required)")
    e.add_argument("--group-column", help="subgroup column (default: the run's --group-column, if --data has it)")
    e.add_argument("--batch-size", type=positive_int, default=16, help="pairs per forward pass")
    e.add_argument("--max-length", type=positive_int,
                   help="tokens of prompt + completion (default: the run's --max-length, else no limit)")
    e.add_argument("--json", help="also write the metrics to this JSON file (default: print only)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    e.set_defaults(func=evaluate_command, check=check_evaluate)

    r = command("report", "plots and a metrics table of a mixdpo train run")
    r.add_argument("run_dir", help="the --output directory of a mixdpo train run")
    r.add_argument("--data", help="pairs for the per-pair strengths (default: the run's held-out margins)")
    r.add_argument("--out", help="output directory (default: RUN_DIR/report)")
    r.add_argument("--overwrite", action="store_true", help="replace an earlier report.md and plots in --out")
    r.set_defaults(func=report_command, check=check_report)

    d = command("demo", "DPO vs MixDPO on the synthetic pluralistic task over seeds (tiny model), or SmolLM2")
    d.add_argument("--model", default="tiny", choices=["tiny", "smollm2"], help="which demo")
    d.add_argument("--pairs", type=positive_int, default=2000, help="training pairs of each seed's task (tiny)")
    d.add_argument("--test-pairs", type=positive_int, default=2000, help="held-out pairs of each seed's task (tiny)")
    d.add_argument("--heterogeneity", type=float, default=1.5, choices=LEVELS,
                   help="sd of the annotators' log-strengths (tiny)")
    d.add_argument("--beta", type=positive_float, default=1.0,
                   help="DPO's beta, and the pinned mean of the MixDPO strengths (tiny; 1 is DPO's best beta on "
                   "this task's validation pairs in the README's benchmark)")
    d.add_argument("--steps", type=positive_int, default=None,
                   help="training steps per method (default: 150 for tiny, 5 for smollm2)")
    d.add_argument("--pretrain-steps", type=non_negative_int, default=200, help="pretraining steps of the tiny LM")
    d.add_argument("--seed", type=int, default=0, help="first seed of the tasks and the models")
    d.add_argument("--seeds", type=positive_int, default=3, help="seeds to run, from --seed on (tiny)")
    d.add_argument("--output", help="output folder (default: ./mixdpo-demo for tiny, ./mixdpo-smollm2 for "
                   "smollm2); the tiny demo writes demo.md, demo.csv and two PNGs there")
    d.add_argument("--overwrite", action="store_true", help="replace the files of an earlier demo in --output")
    d.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch intra-op threads (default 1: spinning OpenMP threads are slow on a loaded machine; "
        "try 2 on an idle 2-core machine for SmolLM2)",
    )
    d.set_defaults(func=demo_command, check=check_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mixdpo`` console script."""
    offline_hub()
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command == "demo" and a.steps is None:
        a.steps = 5 if a.model == "smollm2" else 150
    if a.command == "demo" and a.output is None and a.model == "tiny":
        a.output = "mixdpo-demo"
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
