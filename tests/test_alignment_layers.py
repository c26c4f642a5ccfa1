"""The alignment package's structure: one-way layers, TRL only where it is needed, one strength registry."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import alignment
from alignment import run_dir

PACKAGE = Path(alignment.__file__).parent


def _contract_layers() -> tuple[str, ...]:
    """The alignment layer order of the import-linter contract in pyproject.toml (one source), bottom-up."""
    import tomllib

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    (contract,) = [c for c in config["tool"]["importlinter"]["contracts"] if c["name"] == "alignment layers"]
    # "a | b" is one layer of independent modules; order them arbitrarily (they import neither each other).
    return tuple(m.strip() for layer in reversed(contract["layers"]) for m in layer.split("|"))


#: Bottom-up: a module may import only modules listed before it (the package's __init__ is the facade).
LAYERS = _contract_layers()
#: The only modules that may import TRL (anywhere, including inside functions).
TRL_MODULES = {"config", "trainer", "experiments", "commands"}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(alignment modules, top-level packages) that a file imports, at any depth (functions included)."""
    own, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                (own.add(parts[1]) if parts[0] == "alignment" and len(parts) > 1 else other.add(parts[0]))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level or module.split(".")[0] == "alignment":
                inner = module if node.level else module.partition(".")[2]
                # `from . import run_dir` names modules; `from .data import x` names one.
                own.update([inner.split(".")[0]] if inner else [a.name for a in node.names])
            else:
                other.add(module.split(".")[0])
    return own, other


def test_every_module_is_in_a_layer_and_short():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS)
    for p in PACKAGE.glob("*.py"):
        assert len(p.read_text().splitlines()) <= 450, p.name


def test_imports_go_down_the_layers_only_and_trl_stays_in_its_modules():
    for name in LAYERS:
        own, other = _imports(PACKAGE / f"{name}.py")
        above = sorted(m for m in own if m not in LAYERS[: LAYERS.index(name)])
        assert not above, f"alignment.{name} imports {above}, which are not below it"
        assert ("trl" in other) <= (name in TRL_MODULES), f"alignment.{name} imports trl"


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300, check=False)


def test_package_diagnostics_and_cli_import_without_loading_trl(tmp_path):
    code = ("import sys, alignment, alignment.diagnostics, alignment.cli, alignment.run_dir; "
            "print(sorted(m for m in ('trl', 'transformers') if m in sys.modules))")
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_report_works_with_trl_blocked(tmp_path):
    """``mixdpo report`` on a run folder written with the strength / run-folder API, with ``import trl`` failing."""
    run = tmp_path / "run"
    code = f"""
import sys
sys.modules["trl"] = None  # any `import trl` now raises ImportError
import numpy as np
import alignment.diagnostics
from alignment import run_dir
from alignment.cli import main

settings = run_dir.strength_settings("gamma", 0.1, {{"shape": 3.0}}, objective="marginal")
strength = run_dir.strength_from_settings(settings)
run_dir.save_strength(strength, {str(run)!r}, {{**settings, "group_column": "group", "group_names": ["a", "b"]}})
run_dir.save_margins({str(run)!r}, {{"row": np.arange(6), "margin": np.linspace(-2.0, 3.0, 6),
                                     "group": np.array(["a", "b"] * 3, dtype=object)}})
assert main(["report", {str(run)!r}]) == 0
"""
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "strength family: gamma" in out.stdout and "beta/shape" in out.stdout
    for name in ("report.md", "strength_density.png", "strength_by_group.png"):  # no log history: no steps plot
        assert (run / "report" / name).is_file(), name
    info = json.loads((run / "strength.json").read_text())
    # The strength.json layout MixDPOTrainer writes ("learnable" joined it with the learned-beta DPO).
    assert list(info) == ["family", "init", "integrator", "nodes", "fix_mean", "beta", "objective", "learnable",
                          "format_version", "group_column", "group_names", "params", "mean", "std", "cv"]
    assert info["init"] == {"shape": 3.0, "rate": 30.0} and info["format_version"] == 1
    # A point strength's file written before "learnable" existed still reads, as the fixed beta of DPO.
    point = run_dir.strength_settings("point", 0.3, learnable=True)
    assert [p.requires_grad for p in run_dir.strength_from_settings(point).parameters()] == [True]
    del point["learnable"]
    assert list(run_dir.strength_from_settings(point).parameters()) == []  # beta is a buffer


def test_implicit_prompts_are_split_by_trl_before_evaluation(tmp_path, capsys):
    """Below TRL an implicit-prompt pair is refused with how to split it; ``mixdpo evaluate`` splits it with TRL's
    ``maybe_extract_prompt`` and gives what the same pairs written with their prompt give."""
    pytest.importorskip("trl")
    from datasets.utils.logging import disable_progress_bar

    from alignment import evaluate, synthetic
    from alignment.cli import main
    from alignment.experiments import with_explicit_prompt

    disable_progress_bar()
    ds = synthetic.pluralistic_task(24, groups=2, heterogeneity=1.0, seed=0)
    # Pairs whose completions differ from their first word on, so that the shared prefix is the prompt.
    explicit = ds.filter(lambda ex: ex["chosen"].split()[0] != ex["rejected"].split()[0])
    explicit = explicit.select_columns(["prompt", "chosen", "rejected", "group"])
    implicit = explicit.map(lambda ex: {"chosen": ex["prompt"] + ex["chosen"],
                                        "rejected": ex["prompt"] + ex["rejected"]}, remove_columns=["prompt"])
    assert len(explicit) >= 8 and implicit.column_names == ["chosen", "rejected", "group"]
    tok = synthetic.build_tokenizer(synthetic.task_texts(ds))
    policy, ref = (synthetic.tiny_gpt_neox(tok, hidden_size=16, num_layers=1, seed=s) for s in (0, 1))

    # (a) the lower layer refuses it up front, naming the row and the conversion.
    message = (r"^dataset row 0 has no 'prompt' \(its columns: \['chosen', 'rejected', 'group'\]\): implicit-prompt "
               r"pairs \(chosen and rejected only\) must be split into prompt and completions first, e\.g\. "
               r"dataset\.map\(trl\.data_utils\.maybe_extract_prompt\)$")
    with pytest.raises(ValueError, match=message):
        evaluate(policy, ref, implicit, tok)
    # TRL's split gives back the pairs as written with their prompt; a dataset with a prompt is left as it is.
    split = with_explicit_prompt(implicit)
    assert {k: split[k] for k in explicit.column_names} == explicit.to_dict()
    assert with_explicit_prompt(explicit) is explicit
    margins = [evaluate(policy, ref, pairs, tok)["pairs"]["margin"].tolist() for pairs in (split, explicit)]
    assert margins[0] == margins[1] and any(margins[0])

    # (b) mixdpo evaluate on the implicit-prompt JSONL: the accuracy and margins of the explicit one.
    for name, model in (("policy", policy), ("ref", ref)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    results = {}
    for label, pairs in (("explicit", explicit), ("implicit", implicit)):
        data = tmp_path / f"{label}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in pairs))
        out = tmp_path / f"{label}.json"
        argv = ["evaluate", "--model", str(tmp_path / "policy"), "--ref-model", str(tmp_path / "ref"), "--data",
                str(data), "--group-column", "group", "--json", str(out)]
        assert main(argv) == 0, capsys.readouterr().err
        results[label] = json.loads(out.read_text())
    assert results["implicit"] == results["explicit"]
    assert results["explicit"]["n_pairs"] == len(explicit) and results["explicit"]["margin_mean"] != 0.0


def test_a_registered_family_is_accepted_by_the_config_and_the_trainer(tmp_path):
    """The trainer takes its families and their parameter names from the registry (no list of its own)."""
    pytest.importorskip("trl")
    from datasets.utils.logging import disable_progress_bar

    from alignment import LogNormalStrength, load_strength, register_strength, synthetic
    from alignment.cli import build_parser
    from alignment.commands import check_train
    from alignment.config import MixDPOConfig
    from alignment.strength import STRENGTHS, default_strength_init
    from alignment.trainer import MixDPOTrainer

    disable_progress_bar()

    class WideLogNormal(LogNormalStrength):
        """A LogNormal that starts wider (sigma 1), under a name of its own."""

        family = "wide-lognormal"

        @classmethod
        def default_init(cls, beta, init, fix_mean=False):
            return super().default_init(beta, {"sigma": 1.0, **init}, fix_mean)

    register_strength("wide-lognormal", WideLogNormal)
    try:
        assert default_strength_init("wide-lognormal", 0.1) == pytest.approx({"mu": -2.8025850929940455, "sigma": 1.0})
        with pytest.raises(ValueError, match=r"\['sgima'\] that the 'wide-lognormal' family does not have; its "
                                             r"parameters are \['mu', 'sigma'\]"):
            default_strength_init("wide-lognormal", 0.1, {"sgima": 1.0})
        # The command line checks its flags against the same registry.
        flags = build_parser().parse_args(["train", "--model", "m", "--data", "d.jsonl", "--output",
                                           str(tmp_path / "cli"), "--strength", "wide-lognormal"])
        check_train(flags)
        ds = synthetic.pluralistic_task(16, groups=2, heterogeneity=1.0, seed=0)
        tok = synthetic.build_tokenizer(synthetic.task_texts(ds))
        model = synthetic.tiny_gpt_neox(tok, hidden_size=16, num_layers=1, seed=0)
        cfg = MixDPOConfig(output_dir=str(tmp_path), strength="wide-lognormal", strength_fix_mean=True,
                           max_steps=1, per_device_train_batch_size=8, max_length=32, report_to="none",
                           use_cpu=True, save_strategy="no", disable_tqdm=True, bf16=False)
        trainer = MixDPOTrainer(model=model, ref_model=synthetic.tiny_gpt_neox(tok, hidden_size=16, num_layers=1,
                                                                                 seed=0),
                                args=cfg, train_dataset=ds, processing_class=tok)
        assert type(trainer.strength) is WideLogNormal and trainer.strength.fix_mean
        assert float(trainer.strength.sigma.detach()) == pytest.approx(1.0)
        trainer.train()
        trainer.save_model(str(tmp_path))
        loaded, info = load_strength(str(tmp_path))
        assert type(loaded) is WideLogNormal and info["family"] == "wide-lognormal"
        assert float(loaded.mean()) == pytest.approx(0.1)
    finally:
        STRENGTHS.pop("wide-lognormal")


def test_the_shared_argument_checks_name_the_argument():
    import torch

    from mixlogit.validation import (
        check_choice,
        check_count,
        check_finite,
        check_fraction,
        check_non_negative,
        check_positive_number,
    )

    assert check_count("nodes", 3) == 3 and check_count("max_length", None, allow_none=True) is None
    for value in (0, 2.0, True):
        with pytest.raises(ValueError, match=f"^nodes must be a positive integer, got {value!r}$"):
            check_count("nodes", value)
    with pytest.raises(ValueError, match="max_length must be a positive integer or None, got 0"):
        check_count("max_length", 0, allow_none=True)
    assert check_positive_number("sigma", torch.tensor(0.5)) == 0.5
    with pytest.raises(TypeError, match="sigma must be a positive finite number, got 'wide'"):
        check_positive_number("sigma", "wide")
    with pytest.raises(ValueError, match="sigma must be a positive finite number, got -1"):
        check_positive_number("sigma", -1)
    assert check_finite("mu", torch.tensor([-2.0])) == -2.0
    with pytest.raises(ValueError, match="mu must be a finite real number, got nan"):
        check_finite("mu", float("nan"))
    assert check_non_negative("lr", 0) == 0.0
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got inf"):
        check_non_negative("lr", float("inf"))
    assert check_fraction("eps", 1.0, closed=True) == 1.0
    with pytest.raises(ValueError, match=r"eps must be a number between 0 and 1 \(exclusive\), got 1.0"):
        check_fraction("eps", 1.0)
    with pytest.raises(ValueError, match=r"eps must be a number in \[0, 1\], got nan"):
        check_fraction("eps", float("nan"), closed=True)
    assert check_choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match="^mode must be 'a', 'b' or 'c', got 'd'$"):
        check_choice("mode", "d", ("a", "b", "c"))
