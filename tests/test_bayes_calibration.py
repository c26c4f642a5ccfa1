"""Calibration of the Bayesian estimators on simulated data (slow statistical checks).

Thirty replications of a small simulated panel; the 90% credible intervals of the population means must
cover the truth at least 80% of the time with the full-rank SVI guide. NUTS's calibration over 60 replications
takes about 17 minutes on one core, so it lives in the benchmark (``python benchmarks/bench_bayes.py
--calibration --reps 60``; measured: NUTS 0.892 and full-rank SVI 0.875 on 60 persons x 5 situations, NUTS 0.883
on 100 x 8); here a short NUTS check guards against a broken sampler.
"""

from __future__ import annotations

import numpy as np
import pytest

import mixlogit as ml

TRUTH = {"x1": ("normal", 1.0, 0.7), "x2": ("normal", -0.5, 0.5)}


@pytest.mark.slow
def test_fullrank_svi_intervals_cover_the_population_means():
    hits = []
    for r in range(30):
        sim = ml.simulate(n_persons=60, n_situations=5, n_alts=3, random=TRUTH, fixed={"x3": 0.8}, seed=1000 + r)
        res = sim.model.fit(sim.data, method="svi", guide="fullrank", steps=400, seed=r)
        ci = res.conf_int(alpha=0.1)
        hits.append([ci.loc[n, "lower"] <= sim.truth[n] <= ci.loc[n, "upper"] for n in ("x1", "x2", "x3")])
    hits = np.array(hits)
    assert hits[:, :2].mean() >= 0.8, hits.mean(0)
    assert hits.mean() >= 0.75, hits.mean(0)


@pytest.mark.slow
def test_nuts_intervals_cover_the_truth_on_a_small_panel():
    """A shorter NUTS check (6 replications of 30 persons, 12 intervals): at least 75% cover the truth."""
    hits = []
    for r in range(6):
        sim = ml.simulate(n_persons=30, n_situations=5, n_alts=3, random={"x1": ("normal", 1.0, 0.7)},
                          fixed={"x3": 0.8}, seed=2000 + r)
        res = sim.model.fit(sim.data, method="nuts", num_samples=100, num_warmup=100, chains=1, seed=r)
        ci = res.conf_int(alpha=0.1)
        hits.append([ci.loc[n, "lower"] <= sim.truth[n] <= ci.loc[n, "upper"] for n in ("x1", "x3")])
    assert np.mean(hits) >= 0.75, hits
