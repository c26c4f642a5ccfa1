"""Bayesian estimation: speed and accuracy of SVI against MSL, NUTS against SVI, calibration, and scale.

Default: spec E1 on Train's electricity data (six normal coefficients, panel by id), MSL at 1000 Halton draws
and SVI (full-rank guide) side by side in this process; prints wall times, their ratio (MSL / SVI), each
posterior mean against the MSL estimate in MSL standard errors, and ``az.loo`` (elpd, Pareto-k table).

    python benchmarks/bench_bayes.py [--guide fullrank] [--repeats 1]
    python benchmarks/bench_bayes.py --nuts          # simulated panel of 200 persons: NUTS vs SVI
    python benchmarks/bench_bayes.py --e1-nuts       # E1 by NUTS: posterior sds against MSL's SEs and SVI's
    python benchmarks/bench_bayes.py --e1-marginal [--repeats 3] [--seed 0]
        # default SVI (marginal guide) against NUTS (2 chains x 1,000 draws, cached under benchmarks/results/bayes_e1)
        # and MSL at 1,000 draws, one torch thread: sd ratios, mean differences in NUTS sds, times, Pareto k
    python benchmarks/bench_bayes.py --calibration [--reps 30 --persons 60 --situations 5 --methods svi nuts]
    python benchmarks/bench_bayes.py --scale         # minibatch SVI on 100,000 persons x 10 situations

Timings depend on the machine's load: both estimators of a comparison run in the same process, interleaved.
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings
from pathlib import Path

import numpy as np

import mixlogit as ml

COLS = ["pf", "cl", "loc", "wk", "tod", "seas"]
TRUTH = {"x1": ("normal", 1.0, 0.7), "x2": ("normal", -0.5, 0.5)}


def electricity(args):
    import arviz as az

    from mixlogit.diagnostics import loo_table

    data, model = _e1()
    _warm_up_torch_optim()
    t_msl, t_svi = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine state
        t = time.perf_counter()
        msl = model.fit(data, draws=1000)
        t_msl.append(time.perf_counter() - t)
        t = time.perf_counter()
        svi = model.fit(data, method="svi", guide=args.guide, seed=args.seed)
        t_svi.append(time.perf_counter() - t)
    tm, ts = float(np.median(t_msl)), float(np.median(t_svi))
    print(f"E1 electricity: MSL (1000 Halton draws) {tm:.2f} s, SVI ({args.guide}) {ts:.2f} s, "
          f"ratio MSL/SVI {tm / ts:.2f}; SVI {svi.n_iter} steps, converged {svi.converged}")
    print(f"MSL LL {msl.loglik:.3f}")
    z = (svi.params - msl.params) / msl.bse
    print(f"{'param':>8} {'MSL':>9} {'se':>7} {'SVI mean':>9} {'SVI sd':>7} {'z':>6}")
    for name in msl.param_names:
        print(f"{name:>8} {msl.params[name]:>9.3f} {msl.bse[name]:>7.3f} {svi.params[name]:>9.3f} "
              f"{svi.bse[name]:>7.3f} {z[name]:>6.2f}")
    print(f"max |z| = {z.abs().max():.2f} (all within 2 MSL se: {bool((z.abs() < 2).all())})")
    idata = svi.to_arviz(n=1000)
    est, kt = loo_table(idata)
    print(f"az.loo (marginal log-likelihood per person): elpd_loo {est.loc['elpd_loo', 'value']:.2f} "
          f"(se {est.loc['se', 'value']:.2f}), p_loo {est.loc['p_loo', 'value']:.2f}")
    print(kt.to_string())
    msl_loo = az.loo(msl.to_arviz(data=data, n=1000))
    print(f"MSL (asymptotic normal draws) elpd_loo {float(msl_loo.elpd_loo):.2f}")


def _e1():
    """Train's electricity data and spec E1 (six normal coefficients, panel by person)."""
    df = ml.datasets.load_electricity()
    data = ml.ChoiceData.from_long(df, choice="choice", alt="alt", situation="chid", panel="id")
    return data, ml.MixedLogit(random={c: "normal" for c in COLS})


def electricity_nuts(args):
    """E1 by NUTS, the reference for the uncertainty of the spreads, against MSL's standard errors and SVI."""
    data, model = _e1()
    msl = model.fit(data, draws=1000)
    t = time.perf_counter()
    res = model.fit(data, method="nuts", num_samples=args.num_samples, num_warmup=args.num_samples, chains=2,
                    seed=args.seed)
    tn = time.perf_counter() - t
    svi = model.fit(data, method="svi", guide=args.guide, seed=args.seed)
    frame = res.summary_frame()
    print(f"E1 by NUTS, 2 chains x {args.num_samples} draws: {tn:.0f} s; divergences "
          f"{int(res.sample_stats['diverging'].sum())}, max r_hat {frame['r_hat'].max():.4f}, "
          f"min ess_bulk {frame['ess_bulk'].min():.0f}")
    print(f"{'param':>8} {'MSL':>8} {'se':>6} {'NUTS':>8} {'sd':>6} {'sd/se':>6} {'SVI':>8} {'sd':>6} {'sd/se':>6}")
    for n in msl.param_names:
        print(f"{n:>8} {msl.params[n]:>8.3f} {msl.bse[n]:>6.3f} {res.params[n]:>8.3f} {res.bse[n]:>6.3f} "
              f"{res.bse[n] / msl.bse[n]:>6.2f} {svi.params[n]:>8.3f} {svi.bse[n]:>6.3f} {svi.bse[n] / msl.bse[n]:>6.2f}")


NUTS_REFERENCE = Path(__file__).parent / "results" / "bayes_e1" / "nuts_2x1000_seed{seed}.json"


def _e1_nuts_reference(data, model, seed):
    """E1 by NUTS, 2 chains x 1,000 draws after 1,000 warmup: read from its file when an earlier run saved it
    (about 9 minutes on one thread here), else fitted and saved."""
    path = Path(str(NUTS_REFERENCE).format(seed=seed))
    if path.exists():
        return ml.load(path), f"read from {path.relative_to(Path(__file__).parent.parent)}"
    res = model.fit(data, method="nuts", num_samples=1000, num_warmup=1000, chains=2, seed=seed)
    res.save(path)
    return res, f"fitted now and saved to {path.relative_to(Path(__file__).parent.parent)}"


def electricity_marginal(args):
    """The default SVI (marginal guide) on E1 against NUTS, and its time against MSL at 1,000 draws."""
    import torch

    torch.set_num_threads(1)
    data, model = _e1()
    nuts, where = _e1_nuts_reference(data, model, seed=0)
    _warm_up_torch_optim()
    t_msl, t_svi = [], []
    for r in range(args.repeats):  # interleaved, so both see the same machine state
        t = time.perf_counter()
        model.fit(data, draws=1000)
        t_msl.append(time.perf_counter() - t)
        t = time.perf_counter()
        svi = model.fit(data, method="svi", seed=args.seed)
        t_svi.append(time.perf_counter() - t)
    tm, ts = float(np.median(t_msl)), float(np.median(t_svi))
    ratio = svi.bse / nuts.bse
    diff = (svi.params - nuts.params) / nuts.bse
    print(f"E1, one torch thread. NUTS 2 chains x 1000 draws ({nuts.fit_time:.0f} s when fitted; {where}); "
          f"SVI guide={svi.settings['guide']}, {svi.settings['marginal_draws']} importance points per person, "
          f"{svi.n_iter} steps, seed {args.seed}")
    print(f"{'param':>8} {'NUTS':>8} {'sd':>6} {'SVI':>8} {'sd':>6} {'sd ratio':>9} {'(SVI-NUTS)/sd':>14}")
    for n in nuts.param_names:
        print(f"{n:>8} {nuts.params[n]:>8.3f} {nuts.bse[n]:>6.3f} {svi.params[n]:>8.3f} {svi.bse[n]:>6.3f} "
              f"{ratio[n]:>9.2f} {diff[n]:>14.2f}")
    print(f"sd ratios {ratio.min():.2f}-{ratio.max():.2f} (all in [0.8, 1.25]: "
          f"{bool(((ratio >= 0.8) & (ratio <= 1.25)).all())}); max |mean difference| {diff.abs().max():.2f} NUTS sd "
          f"(all < 0.5: {bool((diff.abs() < 0.5).all())})")
    print(f"time, median of {args.repeats}: MSL (1000 Halton draws) {tm:.2f} s, SVI {ts:.2f} s, ratio MSL/SVI "
          f"{tm / ts:.2f} (SVI no slower: {ts <= tm})")
    print(f"trust check: {svi.trust_check()}")


def _warm_up_torch_optim():
    """The first step of any ``torch.optim`` optimizer in a process imports TorchDynamo (about 2 s here): a
    one-time cost of the process, not of the estimator, so it is paid before the clocks start."""
    import torch

    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([p])
    p.sum().backward()
    opt.step()


def nuts(args):
    sim = ml.simulate(n_persons=200, n_situations=10, n_alts=3, random=TRUTH, fixed={"x3": 0.8}, seed=1)
    data = sim.data
    t = time.perf_counter()
    res = sim.model.fit(data, method="nuts", num_samples=args.num_samples, num_warmup=args.num_samples, chains=2,
                        seed=args.seed)
    tn = time.perf_counter() - t
    t = time.perf_counter()
    svi = sim.model.fit(data, method="svi", seed=args.seed)
    tsv = time.perf_counter() - t
    frame = res.summary_frame()
    print(f"NUTS, 200 persons x 10 situations, 2 chains x {args.num_samples} draws: {tn:.1f} s; SVI {tsv:.1f} s")
    print(f"divergences: {int(res.sample_stats['diverging'].sum())}, max r_hat: {frame['r_hat'].max():.4f}, "
          f"min ess_bulk: {frame['ess_bulk'].min():.0f}, tree depth: {np.bincount(res.sample_stats['tree_depth'].ravel())}")
    diff = (svi.params - res.params) / res.bse
    print(f"{'param':>6} {'truth':>7} {'NUTS':>8} {'sd':>6} {'SVI':>8} {'sd':>6} {'(SVI-NUTS)/sd':>14}")
    for name in res.param_names:
        print(f"{name:>6} {sim.truth[name]:>7.3f} {res.params[name]:>8.3f} {res.bse[name]:>6.3f} "
              f"{svi.params[name]:>8.3f} {svi.bse[name]:>6.3f} {diff[name]:>14.2f}")


def _coverage(method, reps, n_persons, n_situations, level, **kw):
    hits = []
    for r in range(reps):
        sim = ml.simulate(n_persons=n_persons, n_situations=n_situations, n_alts=3, random=TRUTH,
                          fixed={"x3": 0.8}, seed=1000 + r)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = sim.model.fit(sim.data, method=method, seed=r, **kw)
        ci = res.conf_int(alpha=1 - level)
        hits.append([bool(ci.loc[n, "lower"] <= sim.truth[n] <= ci.loc[n, "upper"]) for n in res.param_names])
    return np.array(hits), res.param_names


def calibration(args):
    runs = {"svi": ("SVI full-rank", {"guide": "fullrank", "steps": 400}),
            "nuts": ("NUTS", {"num_samples": 200, "num_warmup": 200, "chains": 1})}
    for method in args.methods:
        label, kw = runs[method]
        t = time.perf_counter()
        hits, names = _coverage(method, args.reps, args.persons, args.situations, 0.9, **kw)
        means = hits[:, [names.index("x1"), names.index("x2")]]
        print(f"{label}: {args.reps} replications ({args.persons} persons x {args.situations} situations), "
              f"90% intervals, {time.perf_counter() - t:.0f} s")
        print("  coverage per parameter: " + ", ".join(f"{n} {c:.2f}" for n, c in zip(names, hits.mean(0))))
        print(f"  population means (x1, x2): {means.mean():.3f}; all parameters: {hits.mean():.3f}")


def scale(args):
    t = time.perf_counter()
    sim = ml.simulate(n_persons=100_000, n_situations=10, n_alts=3, random=TRUTH, fixed={"x3": 0.8}, seed=3)
    data = sim.data
    t_data = time.perf_counter() - t
    t = time.perf_counter()
    res = sim.model.fit(data, method="svi", guide=args.guide, subsample=args.subsample, seed=args.seed)
    t_fit = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    err = (res.params - sim.truth).abs()
    print(f"minibatch SVI ({args.guide}, subsample {args.subsample}) on 100,000 persons x 10 situations: data "
          f"{t_data:.1f} s, fit {t_fit:.1f} s ({res.n_iter} steps, converged {res.converged}); "
          f"peak RSS {peak:.2f} GiB")
    for name in res.param_names:
        print(f"{name:>6} truth {sim.truth[name]:>7.3f}  posterior mean {res.params[name]:>7.4f} "
              f"(sd {res.bse[name]:.4f})  |error| {err[name]:.4f}")
    means = [n for n in res.param_names if not n.startswith("sd.")]
    print(f"max |error| of the population means {err[means].max():.4f} (< 0.05: {bool(err[means].max() < 0.05)})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nuts", action="store_true")
    ap.add_argument("--e1-nuts", action="store_true", help="E1 by NUTS against MSL and SVI")
    ap.add_argument("--e1-marginal", action="store_true", help="E1: default SVI against NUTS (cached) and MSL")
    ap.add_argument("--calibration", action="store_true")
    ap.add_argument("--scale", action="store_true")
    ap.add_argument("--guide", default="fullrank")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30, help="calibration replications")
    ap.add_argument("--persons", type=int, default=60, help="calibration: persons per replication")
    ap.add_argument("--situations", type=int, default=5, help="calibration: situations per person")
    ap.add_argument("--methods", nargs="+", default=["svi", "nuts"], choices=["svi", "nuts"])
    ap.add_argument("--num-samples", type=int, default=500, help="NUTS draws (and warmup) per chain")
    ap.add_argument("--subsample", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.nuts:
        nuts(args)
    elif args.e1_nuts:
        electricity_nuts(args)
    elif args.e1_marginal:
        electricity_marginal(args)
    elif args.calibration:
        calibration(args)
    elif args.scale:
        scale(args)
    else:
        electricity(args)


if __name__ == "__main__":
    main()
