"""MSL on 2 CPU processes (torchrun, gloo) against one process, on a simulated panel.

Each rank holds the draws of half the persons; the value, gradient, scores and Hessian are all-reduced. The
estimates, standard errors and log-likelihood must be those of one process: bit for bit, since the reduction is
exact (the issue asks for 1e-8). ``torchrun -m mixlogit fit`` must print and write on rank 0 only, and ranks that
hold different draws or models must be refused before any fitting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mixlogit as ml
from mixlogit.cli import main

MODEL = {"random": {"x1": "normal", "x2": "normal"}, "fixed": ["x3"]}
DRAWS = 40
THETA = [0.4, 0.9, -0.4, 0.5, 0.3]  # x3, x1, x2, sd.x1, sd.x2: a point away from the optimum

# Every rank: a fit refused because rank 1 uses other draws, then the sharded problem's derivatives at THETA,
# then a distributed fit; each rank writes what it got.
DRIVER = r"""
import json, os, sys
import numpy as np, pandas as pd, torch
import torch.distributed as dist
import mixlogit as ml

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
model_args, draws, theta = json.loads(sys.argv[1]), int(sys.argv[2]), np.array(json.loads(sys.argv[3]))
data = ml.ChoiceData.from_long(pd.read_csv("panel.csv"), choice="choice", alt="alt", situation="situation",
                               panel="person")
model = ml.MixedLogit(**model_args)
out = {}
try:
    model.fit(data, draws=draws, seed=1 + rank, distributed=True)  # rank 1 draws others
except ValueError as e:
    out["refused"] = str(e)
other = dict(model_args, random={**model_args["random"], "x2": "lognormal" if rank else "normal"})
try:
    ml.MixedLogit(**other).fit(data, draws=draws, seed=1, distributed=True)  # rank 1 fits another model
except ValueError as e:
    out["refused_model"] = str(e)
problem = model.make_problem(data, draws=draws, seed=1)
ml.distributed.shard_problem(problem, {"draws": draws})
value, grad = problem.value_and_grad(theta)
out.update(units=[problem.shard.units.start, problem.shard.units.stop], draw_rows=problem.rule.z.shape[0],
           value=value, grad=grad.tolist(), scores=problem.scores(theta).tolist(),
           hessian=problem.hessian(theta).tolist(), loglik=problem.loglik(theta))
res = model.fit(data, draws=draws, seed=1, distributed=True)
out.update(params=res.params.tolist(), bse=res.bse.tolist(), fit_loglik=res.loglik, ranks=res.settings["ranks"])
out["mixed_params"] = model.fit(data, draws=draws, seed=1, distributed=True, precision="mixed").params.tolist()
json.dump(out, open(f"rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def _torchrun(tmp_path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("panel")
    sim = ml.simulate(n_persons=90, n_situations=4, n_alts=3, fixed={"x3": 0.5},
                      random={"x1": ("normal", 1.0, 0.6), "x2": ("normal", -0.5, 0.4)}, seed=5)
    sim.df.to_csv(folder / "panel.csv", index=False)
    return folder, sim.data


def test_two_gloo_ranks_reduce_to_the_one_process_numbers(panel):
    folder, data = panel
    (folder / "driver.py").write_text(DRIVER)
    _torchrun(folder, "driver.py", json.dumps(MODEL), str(DRAWS), json.dumps(THETA))
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    model = ml.MixedLogit(**MODEL)
    one = model.make_problem(data, draws=DRAWS, seed=1)
    # Each rank held the draws of its own persons only, and together they cover every person once.
    assert ranks[0]["units"][0] == 0 and ranks[0]["units"][1] == ranks[1]["units"][0]
    assert ranks[1]["units"][1] == data.n_units and 0 < ranks[0]["units"][1] < data.n_units
    assert [r["draw_rows"] for r in ranks] == [r["units"][1] - r["units"][0] for r in ranks]
    value, grad = one.value_and_grad(np.array(THETA))
    for r in ranks:
        assert r["value"] == value and r["loglik"] == one.loglik(np.array(THETA))
        np.testing.assert_array_equal(r["grad"], grad)
        np.testing.assert_array_equal(r["scores"], one.scores(np.array(THETA)))
        np.testing.assert_array_equal(r["hessian"], one.hessian(np.array(THETA)))
    ref = model.fit(data, draws=DRAWS, seed=1)
    for r in ranks:
        assert r["ranks"] == 2
        # Exact: the reduction adds zeros only, and every rank sums the chunks in one process's order.
        np.testing.assert_array_equal(r["params"], ref.params.to_numpy())
        np.testing.assert_array_equal(r["bse"], ref.bse.to_numpy())
        assert r["fit_loglik"] == ref.loglik
    mixed = model.fit(data, draws=DRAWS, seed=1, precision="mixed")
    for r in ranks:
        np.testing.assert_array_equal(r["mixed_params"], mixed.params.to_numpy())
    # Rank 1 fitted other draws, or another model: refused on both ranks, before fitting, naming the rank and
    # what differs.
    for r in ranks:
        assert "rank 1 differs from rank 0 in draws, settings" in r["refused"]
        assert "rank 1 differs from rank 0 in spec" in r["refused_model"]


def test_torchrun_mixlogit_fit_writes_the_one_process_results_from_rank_0(panel, tmp_path, capsys):
    folder, _ = panel
    args = ["fit", str(folder / "panel.csv"), "--choice", "choice", "--alt", "alt", "--situation", "situation",
            "--panel", "person", "--random", "x1=normal,x2=normal", "--fixed", "x3", "--draws", str(DRAWS),
            "--seed", "1"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    proc = _torchrun(tmp_path, "-m", "mixlogit", *args, "--out", "two")
    assert proc.stdout.count("results written to two/") == 1 and proc.stdout.count("log-likelihood:") == 1
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["settings"]["ranks"] == 2 and "ranks" not in one["settings"]
    np.testing.assert_array_equal(two["theta"], one["theta"])
    assert two["loglik"] == one["loglik"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no stray files from rank 1
