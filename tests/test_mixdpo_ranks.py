"""``mixdpo train`` under torchrun on 2 CPU ranks (gloo): one strength on both ranks, one set of run files, one
printed table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from alignment import synthetic

# Each rank runs the CLI, then records what it printed, its strength and which run files it wrote.
DRIVER = r"""
import contextlib, io, json, os, sys
import torch
from alignment import commands, run_dir
from alignment.cli import main

rank = int(os.environ["RANK"])
torch.set_num_threads(1)
written, trainers = [], []
for name in ("write_run_records", "save_margins"):
    original = getattr(run_dir, name)
    def record(*args, _name=name, _original=original, **kwargs):
        written.append(_name)
        return _original(*args, **kwargs)
    setattr(run_dir, name, record)
from alignment import experiments
Base = experiments.MixDPOTrainer
class Recording(Base):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        trainers.append(self)
experiments.MixDPOTrainer = Recording
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(sys.argv[1:])
strength = {k: v.tolist() for k, v in trainers[0].strength.state_dict().items()}
with open(f"rank{rank}.json", "w") as f:
    json.dump({"rc": rc, "stdout": out.getvalue(), "written": written, "strength": strength,
               "world": trainers[0].args.world_size}, f)
"""


def test_two_cpu_ranks_share_the_strength_and_only_rank_0_writes(tmp_path):
    ds = synthetic.pluralistic_task(32, groups=2, heterogeneity=1.0, seed=0)
    tok = synthetic.build_tokenizer(synthetic.task_texts(ds))
    model = synthetic.tiny_gpt_neox(tok, hidden_size=32, num_layers=1, seed=0)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ds))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "driver.py", "train", "--model", "base", "--data", "pairs.jsonl", "--output", "run", "--max-steps", "2",
           "--batch-size", "4", "--max-length", "32", "--lr", "1e-3", "--cpu", "--strength", "lognormal",
           "--strength-lr", "0.05", "--no-fix-mean"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["rc"] == 0 and r["world"] == 2 for r in ranks)
    assert ranks[0]["strength"] == ranks[1]["strength"]  # identical, not just close: DDP averages the gradients
    assert ranks[0]["written"] == ["save_margins", "write_run_records"] and ranks[1]["written"] == []
    assert "eval_loss" in ranks[0]["stdout"] and "run saved in" in ranks[0]["stdout"]
    assert ranks[1]["stdout"] == ""
    assert (tmp_path / "run" / "strength.json").is_file() and (tmp_path / "run" / "log_history.json").is_file()
