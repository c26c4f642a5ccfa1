"""MSL speed and accuracy against xlogit, side by side in one process.

Fits spec E1 (six normal coefficients, panel by id) on Train's electricity data with xlogit and with mixlogit
at 500, 1000 and 2000 Halton draws, and prints wall times, their ratio (xlogit / mixlogit) and both
log-likelihoods. mixlogit uses ``draw_type="halton-plain"``, the same draws as xlogit (unscrambled Halton,
first 100 dropped), so the log-likelihoods must agree to optimizer precision and the ratio compares the
estimators alone; the last column is mixlogit's default scrambled Halton at the same count, whose LL differs by
simulation noise (a different, equally valid set of draws). Each tool's time covers the whole fit including its standard errors (xlogit: BFGS with a
BHHH-based covariance; mixlogit: BFGS, then the exact Hessian and robust sandwich). With ``--memory`` it also
measures mixlogit's peak memory (max RSS of a separate process) at 10,000 draws.

    python benchmarks/bench_msl.py [--draws 500 1000 2000] [--memory] [--repeats 1]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import numpy as np

import mixlogit as ml

COLS = ["pf", "cl", "loc", "wk", "tod", "seas"]


def fit_xlogit(df, draws):
    from xlogit import MixedLogit as XMixedLogit

    m = XMixedLogit()
    t = time.perf_counter()
    m.fit(X=df[COLS], y=df["choice"], varnames=COLS, ids=df["chid"], alts=df["alt"], panels=df["id"],
          randvars={c: "n" for c in COLS}, n_draws=draws, halton=True, verbose=0)
    return time.perf_counter() - t, float(m.loglikelihood), bool(m.convergence)


def fit_mixlogit(df, draws, draw_type="halton-plain"):
    t = time.perf_counter()
    data = ml.ChoiceData.from_long(df, choice="choice", alt="alt", situation="chid", panel="id")
    res = ml.MixedLogit(random={c: "normal" for c in COLS}).fit(data, draws=draws, draw_type=draw_type)
    return time.perf_counter() - t, res.loglik, res.converged


def peak_memory_gib(draws: int) -> tuple[float, float, float]:
    code = (
        "import resource, time, mixlogit as ml\n"
        "df = ml.datasets.load_electricity()\n"
        "d = ml.ChoiceData.from_long(df, choice='choice', alt='alt', situation='chid', panel='id')\n"
        f"t = time.perf_counter(); r = ml.MixedLogit(random={{c: 'normal' for c in {COLS!r}}}).fit(d, draws={draws})\n"
        "print(r.loglik, time.perf_counter() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ll, seconds = map(float, out.stdout.split())
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, ll, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, nargs="+", default=[500, 1000, 2000])
    ap.add_argument("--memory", action="store_true", help="also measure peak memory at 10,000 draws")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: on 2 shared cores "
                    "two threads collapse under any other load)")
    ap.add_argument("--no-scrambled", action="store_true", help="skip the extra fit with scrambled Halton draws")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    df = ml.datasets.load_electricity()
    rows = []
    for draws in args.draws:
        tx, tm = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine state
            t, llx, cx = fit_xlogit(df, draws)
            tx.append(t)
            t, llm, cm = fit_mixlogit(df, draws)
            tm.append(t)
        lls = float("nan") if args.no_scrambled else fit_mixlogit(df, draws, "halton")[1]
        rows.append((draws, np.median(tx), np.median(tm), llx, llm, cx, cm, lls))
    print(f"{'draws':>6} {'xlogit s':>9} {'mixlogit s':>10} {'ratio':>6} {'LL xlogit':>11} {'LL mixlogit':>11} "
          f"{'|dLL|':>6} converged  LL scrambled")
    for draws, tx, tm, llx, llm, cx, cm, lls in rows:
        print(f"{draws:>6} {tx:>9.2f} {tm:>10.2f} {tx / tm:>6.2f} {llx:>11.3f} {llm:>11.3f} {abs(llx - llm):>6.2f} "
              f"{cx}/{cm}  {lls:>11.3f}")
    if args.memory:
        gib, ll, seconds = peak_memory_gib(10_000)
        print(f"mixlogit at 10,000 draws: peak RSS {gib:.2f} GiB, LL {ll:.3f}, {seconds:.1f} s")


if __name__ == "__main__":
    main()
