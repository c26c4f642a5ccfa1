"""``mixdpo train`` killed with SIGKILL at 10 moments, and resumed each time, ends where an uninterrupted run ends.

The data order is restored on resume: transformers' Trainer reloads the RNG states of the checkpoint and skips
the batches already seen in the epoch, and the sampler is seeded by ``--seed`` and the epoch (measured: the rows
of every batch after a resume are those of the uninterrupted run). With the weights restored in full and the
strength's gradients zeroed after every step (see :mod:`alignment.trainer`), a resumed run is the uninterrupted
run: on one CPU thread its final strength parameters are equal (measured difference 0.0), tested to 1e-6.
"""

import json
import os
import random
import shutil
import signal
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from forked_launcher import Launcher

from alignment import checkpoints, synthetic
from alignment.cli import main

STEPS = 30
KILLS = 10


def _train_args(base, data, out):
    return ["train", "--model", str(base), "--data", str(data), "--output", str(out), "--max-steps", str(STEPS),
            "--batch-size", "4", "--max-length", "32", "--lr", "1e-3", "--strength-lr", "0.05", "--cpu",
            "--save-steps", "1", "--logging-steps", "1", "--eval-fraction", "0.2", "--seed", "3"]


def _step(path):
    return int(os.path.basename(path).rsplit("-", 1)[1]) if path else 0


def _hint(capsys, args):
    """The checkpoint that ``mixdpo train`` without --resume names in its refusal (None when it names none)."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds" in err, err
    if "--resume " not in err:
        return None
    return err.split("--resume ", 1)[1].split(")", 1)[0]


def _staged(run):
    return os.path.isdir(run) and any(n.startswith(checkpoints.STAGING_PREFIX) for n in os.listdir(run))


def _params(run):
    return json.loads((run / "strength.json").read_text())["params"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    ds = synthetic.pluralistic_task(40, groups=2, heterogeneity=1.0, seed=0)
    tok = synthetic.build_tokenizer(synthetic.task_texts(ds))
    model = synthetic.tiny_gpt_neox(tok, hidden_size=16, num_layers=1, seed=0)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    with open(root / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in ds)
    return root, root / "base", root / "pairs.jsonl"


def _until(condition, launcher):
    """Poll until ``condition()`` holds or the run ends: the run's status line if it ended first, else None."""
    while not condition():
        status = launcher.line(0.002)
        if status is not None:
            return status
    return None


def test_kills_at_random_moments_resume_to_the_uninterrupted_result(task, capsys):
    root, base, data = task
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed processes (OMP_NUM_THREADS=1): the same sums, bit for bit
    try:
        assert main(_train_args(base, data, root / "whole")) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    run = root / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    # Each run is a fork of one process that has imported torch, transformers and TRL once, so the kills land in
    # training and saving rather than in Python's start (tests/forked_launcher.py).
    launcher = Launcher("alignment.cli", env=env)
    log = root / "run.log"
    try:
        rng = random.Random(12)
        # The first kill comes after a checkpoint (a run killed before its first one has nothing to resume).
        modes = ["random"] + rng.sample(["save"] * 3 + ["random"] * (KILLS - 4), KILLS - 1)
        kills, mid_save, resume = 0, 0, None
        for mode in modes:
            args = _train_args(base, data, run) + (["--resume", resume] if resume else [])
            if mode == "save":  # (a staging folder an earlier kill left would be taken for this process's)
                checkpoints.remove_staging(str(run))
            pid = launcher.start(args, log=str(log))
            start = _step(resume)
            if mode == "save":  # kill as soon as a staging folder appears: the save is under way
                status = _until(lambda: _staged(run), launcher)
            else:  # a random moment after the process made a new complete checkpoint
                status = _until(lambda start=start: _step(checkpoints.last_complete(run)) > start, launcher)
                # ... up to 0.3 s later, but before a second new checkpoint: each kill moves the run on by one or
                # two steps, so all KILLS land before the run ends (its final checkpoint is resumed from below).
                deadline = time.monotonic() + rng.uniform(0.0, 0.3)
                while status is None and time.monotonic() < deadline:
                    if _step(checkpoints.last_complete(run)) >= start + 2:
                        break
                    status = launcher.line(0.002)
            if status is None:
                status = launcher.line(0)
            if status is None:
                os.kill(pid, signal.SIGKILL)
                kills += 1
                status = launcher.line(120)
            assert status in ("done 0", "done -9"), (status, log.read_text())
            mid_save += _staged(run)
            # The refusal without --resume names the last complete checkpoint, never a staged one.
            named = _hint(capsys, _train_args(base, data, run))
            last = checkpoints.last_complete(str(run))
            assert named == last and checkpoints.checkpoint_problem(named) is None
            resume = named
        assert kills == KILLS, kills
        assert mid_save >= 1  # at least one kill landed while a checkpoint was being written

        # An incomplete checkpoint is refused, naming the last complete one.
        broken = run / f"checkpoint-{STEPS + 5}"
        shutil.copytree(resume, broken)
        with open(broken / "optimizer.pt", "r+b") as f:
            f.truncate(10)
        assert main([*_train_args(base, data, run), "--resume", str(broken)]) == 2
        err = capsys.readouterr().err
        assert f"--resume {broken} is incomplete (optimizer.pt has 10 bytes" in err
        assert f"resume from {resume}, the last complete checkpoint of that run" in err
        shutil.rmtree(broken)
        # Another run's checkpoint in the folder is not this run's file: resuming there is refused.
        shutil.copytree(root / "whole" / "checkpoint-2", run / "checkpoint-999")
        assert main([*_train_args(base, data, run), "--resume", resume]) == 2
        err = capsys.readouterr().err
        assert f"--output {run} already holds checkpoint-999; pass --overwrite" in err
        assert "not the files of the run that wrote --resume's checkpoint" in err
        shutil.rmtree(run / "checkpoint-999")

        # The last resume runs to the end, into the run's own folder, without --overwrite.
        launcher.start([*_train_args(base, data, run), "--resume", resume], log=str(log))
        status = launcher.line(300)
        assert status == "done 0", (status, log.read_text())
        # A run killed after its final checkpoint but before its final save resumes from that checkpoint to the
        # same end: no step past --max-steps (transformers alone would run the epoch on).
        final = run / f"checkpoint-{STEPS}"
        assert checkpoints.last_complete(str(run)) == str(final)
        launcher.start([*_train_args(base, data, run), "--resume", str(final)], log=str(log))
        status = launcher.line(300)
        assert status == "done 0", (status, log.read_text())
    finally:
        launcher.close()
    record = json.loads((run / "mixdpo_run.json").read_text())
    assert record["steps"] == STEPS and record["run_id"] == checkpoints.checkpoint_run_id(str(run / "checkpoint-1"))
    assert not _staged(run)
    whole, killed = _params(root / "whole"), _params(run)
    for name, value in whole.items():
        assert killed[name] == pytest.approx(value, abs=1e-6), (name, killed[name], value)
