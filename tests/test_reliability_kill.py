"""A fit killed with SIGKILL at a random moment leaves its ``--out`` folder holding either the old complete set of
files or the new one, never a mix or a partial file."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from pathlib import Path

import pytest
from forked_launcher import Launcher

import mixlogit as ml

FILES = ("results.json", "params.csv", "summary.txt")
ROLES = ["--choice", "choice", "--alt", "alt", "--situation", "situation", "--panel", "person"]
MODEL = ["--random", "x1=normal", "--fixed", "x2", "--draws", "20"]


@pytest.fixture(scope="module")
def sim_csv(tmp_path_factory):
    """A small simulated panel (a fit takes about a second)."""
    path = tmp_path_factory.mktemp("csv") / "sim.csv"
    ml.simulate(n_persons=60, n_situations=4, n_alts=3, random={"x1": ("normal", 1.0, 0.5)}, fixed={"x2": -1.0},
                seed=11).df.to_csv(path, index=False)
    return path


def _fit_argv(csv, out, seed):
    return ["fit", str(csv), *ROLES, *MODEL, "--seed", str(seed), "--out", str(out), "--overwrite"]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _temporaries(out: Path) -> set[str]:
    return {n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.")}


def _is_complete_new_set(out: Path, files: dict[str, bytes]) -> bool:
    if set(files) != set(FILES):
        return False
    res = ml.load(out / "results.json")
    return (files["summary.txt"].decode() == res.summary() + "\n"
            and files["params.csv"].decode() == res.summary_frame().to_csv())


def test_sigkill_during_fit_leaves_the_old_set_or_the_new_one(sim_csv, tmp_path):
    """Ten SIGKILLs at seeded random moments of ``mixlogit fit --overwrite``: some anywhere in the run, some
    just after the new set's temporary folder appears (during the save). Each time the folder holds the old set
    byte for byte or a complete, consistent new set."""
    out = tmp_path / "out"
    launcher = Launcher("mixlogit.cli")
    try:
        launcher.start(_fit_argv(sim_csv, out, 0))
        t0 = time.monotonic()  # after the launcher's imports
        assert launcher.line(120) == "done 0"
        run_time = time.monotonic() - t0
        rng = random.Random(2024)
        outcomes, during_save = [], 0
        for i in range(10):
            old = _files(out)
            before = _temporaries(out)
            pid = launcher.start(_fit_argv(sim_csv, out, i + 1))
            if i % 3 == 1:  # during the save: as soon as the new set's temporary folder exists, plus 0-20 ms
                end = time.monotonic() + 60
                while not (_temporaries(out) - before) and time.monotonic() < end:
                    time.sleep(0.0002)
                time.sleep(rng.uniform(0.0, 0.02))
            else:
                time.sleep(rng.uniform(0.0, 1.2 * run_time))
            saving = bool(_temporaries(out) - before)
            status = launcher.line(0)  # the fit may have ended (and its pid been reaped) already
            if status is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                status = launcher.line(60)
            assert status in ("done -9", "done 0"), status
            during_save += saving and status == "done -9"
            now = _files(out)
            assert not any(n.startswith(".") for n in now), now.keys()
            if now == old:
                outcomes.append("old")
            else:
                assert _is_complete_new_set(out, now), f"kill {i}: a mix of sets or a partial file: {sorted(now)}"
                outcomes.append("new")
    finally:
        launcher.close()
    assert during_save >= 1, outcomes
    assert len(_temporaries(out)) <= 1  # each write clears what the killed ones before it left
    assert _is_complete_new_set(out, _files(out))
