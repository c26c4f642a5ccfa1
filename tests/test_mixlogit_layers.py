"""Pyro loads only when a Bayesian fit runs: importing mixlogit, fitting by MSL and reading, summarizing and
describing a saved Bayesian result all work without it (the one deferred import is MixedLogit.fit ->
mixlogit.bayes.fit)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "svi_results_v1.json"


def test_pyro_loads_only_for_bayesian_fitting():
    code = f"""
import sys
import mixlogit as ml
heavy = lambda: sorted(m for m in ("pyro", "arviz", "matplotlib") if m in sys.modules)
assert heavy() == [], heavy()
sim = ml.simulate(n_persons=20, n_situations=3, random={{"x1": ("normal", 1.0, 0.5)}}, seed=0)
sim.model.fit(sim.data, draws=20)
res = ml.load({str(FIXTURE)!r})
res.summary(); res.heterogeneity()
assert "pyro" not in sys.modules, heavy()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
