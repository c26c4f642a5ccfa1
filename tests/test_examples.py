"""Every example in examples/ runs as a user would run it (a fresh process, from the repository root) and prints the
numbers its header promises. The examples are the documentation's code, so a broken one is a broken promise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, tmp_path: Path, timeout: int = 240) -> str:
    """Run ``examples/<name>`` with the working directory ``tmp_path`` (its outputs land there); its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], check=False, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in the output:\n{text[-2000:]}"
    return float(m.group(1))


def test_every_example_has_a_header_and_a_test():
    tested = {name for name in re.findall(r'"(\d\d_[a-z0-9_]+\.py)"', Path(__file__).read_text())}
    for path in sorted(EXAMPLES.glob("*.py")):
        doc = path.read_text().split('"""')[1]
        assert "Shows:" in doc and "Takes:" in doc and "Prints:" in doc, path.name
        assert path.name in tested, f"{path.name} has no test in {Path(__file__).name}"


def test_example_msl_electricity(tmp_path):
    out = run_example("01_msl_electricity.py", tmp_path)
    assert number(r"LL (-\d+\.\d+)", out) == pytest.approx(-3891.7177, abs=1e-3)  # xlogit 0.2.7's optimum
    # loc's mean over the price coefficient (about 2.3 / 0.95): a local supplier is worth 2-3 cents/kWh.
    assert 2.0 < number(r"WTP for a local supplier: mean ([\d.]+)", out) < 3.0
    assert number(r"mean own price elasticity: (-[\d.]+)", out) < 0
    assert "individual-level estimates" in out


@pytest.mark.slow  # about 70 s on 2 cores: over the 60 s of the examples that run unmarked
def test_example_bayes_heterogeneity(tmp_path):
    out = run_example("02_bayes_heterogeneity.py", tmp_path, timeout=480)
    assert number(r"pf mean (-[\d.]+)", out) == pytest.approx(-0.9, abs=0.2)
    for name in ("densities", "forest", "individual"):
        assert (tmp_path / "examples-out" / "bayes" / f"{name}.png").stat().st_size > 10_000


def test_example_quadrature_vs_simulation(tmp_path):
    out = run_example("03_quadrature_vs_simulation.py", tmp_path)
    assert abs(number(r"LL difference: ([-+][\d.]+)", out)) < 0.05
    assert number(r"quadrature +64: LL (-[\d.]+)", out) > number(r"halton +100: LL (-[\d.]+)", out)


def test_example_scale_heterogeneity_train(tmp_path):
    out = run_example("04_scale_heterogeneity_train.py", tmp_path)
    assert number(r"MNL LL (-[\d.]+)", out) == pytest.approx(-1724.150, abs=0.002)
    assert number(r"S-MNL LL (-[\d.]+)", out) == pytest.approx(-1662.001, abs=0.01)
    assert number(r"sd.scale ([\d.]+)", out) == pytest.approx(1.099, abs=0.005)
    assert number(r"statistic against MNL: ([\d.]+)", out) == pytest.approx(124.3, abs=0.2)


def test_example_mixdpo_loss_on_tensors(tmp_path):
    out = run_example("05_mixdpo_loss_on_tensors.py", tmp_path)
    assert number(r"point strength vs DPO: max \|difference\| ([\d.e+-]+)", out) < 1e-15
    assert number(r"quadrature\(4096\): max \|difference\| ([\d.e+-]+)", out) < 1e-4


def test_example_mixdpo_trainer_tiny(tmp_path):
    out = run_example("06_mixdpo_trainer_tiny.py", tmp_path)
    acc = number(r"held-out oracle accuracy ([\d.]+)", out)
    labels = number(r"label accuracy ([\d.]+)", out)
    assert labels == pytest.approx(0.80, abs=0.03)
    assert acc > labels + 0.05
    assert number(r"E\[beta\] ([\d.]+)", out) == pytest.approx(0.3, abs=1e-3)  # pinned at DPO's beta
    assert number(r"sd of log beta ([\d.]+)", out) >= 0


def _smollm2_ready(request) -> None:
    """Example 07 needs the GGUF (`make smollm2`) and minutes of CPU: run it only when asked, as tests/test_smollm2.py."""
    from alignment.models import smollm2_dir, smollm2_gguf

    if smollm2_gguf() is None and not os.path.isdir(os.path.join(smollm2_dir(), "hf")):
        pytest.skip("SmolLM2 GGUF not fetched: run `make smollm2`")
    if "smollm2" not in (request.config.getoption("markexpr") or "") and os.environ.get("MIXDPO_TEST_SMOLLM2") != "1":
        pytest.skip("opt-in: run with `pytest -m smollm2` or MIXDPO_TEST_SMOLLM2=1")


@pytest.mark.smollm2
def test_example_smollm2_lora_mixdpo(tmp_path, request):
    _smollm2_ready(request)
    out = run_example("07_smollm2_lora_mixdpo.py", tmp_path, timeout=900)
    assert 0.3 < number(r"trainable parameters ([\d.]+)M", out) < 0.7  # rank-8 q/v adapters of 30 layers
    assert number(r"of ([\d.]+)M \(LoRA", out) == pytest.approx(134.5, rel=0.01)
    assert number(r"E\[beta\] ([\d.]+) \(pinned\)", out) == pytest.approx(0.1, abs=1e-6)
    assert number(r"mean margin after (-?[\d.]+) nats", out) > 0  # the policy moved toward the right answers
    assert number(r"preference accuracy after ([\d.]+)", out) >= 0.75


def test_example_annotator_strengths(tmp_path):
    out = run_example("08_annotator_strengths.py", tmp_path)
    assert "40 annotators, 30 pairs each" in out
    assert number(r"E\[beta\] ([\d.]+) \(pinned\)", out) == pytest.approx(1.0, abs=1e-6)
    assert 0.3 < number(r"sd of log beta ([\d.]+) \(truth", out) < 2.5
    assert number(r"Spearman correlation with the true strengths: ([\d.]+)", out) > 0.6
    assert number(r"\|difference\| ([\d.e+-]+)", out) < 1e-9  # one model in both front ends
    assert (tmp_path / "examples-out" / "annotator-mixdpo" / "strength_by_annotator.csv").is_file()
