"""Calibration of the default SVI (marginal guide), a smaller version of ``benchmarks/bayes_calibration.py``.

Ten replications of 80 persons x 6 situations with the benchmark's three random coefficients (one lognormal):
30 intervals per group (locations, spreads). If the 90% intervals were calibrated, the number covering the truth
would be about Binomial(30, 0.9) (the parameters of one replication are nearly independent); each group must
reach that distribution's 0.5% quantile (22 of 30), so a calibrated estimator fails a group with probability
below 0.005 while one whose intervals cover 60% of the time (half as wide as they should be) fails with
probability 0.91.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats

import mixlogit as ml

TRUTH = {"x1": ("normal", 1.0, 0.7), "x2": ("normal", -0.5, 0.5), "x3": ("lognormal", -0.3, 0.5)}
REPS, LEVEL, FALSE_ALARM = 10, 0.9, 0.005


def threshold(n_intervals: int) -> float:
    """The least coverage a calibrated estimator reaches with probability 1 - FALSE_ALARM."""
    return stats.binom.ppf(FALSE_ALARM, n_intervals, LEVEL) / n_intervals


def test_threshold_is_the_binomial_quantile():
    assert threshold(30) == pytest.approx(22 / 30)  # P(Binomial(30, .9) <= 21) < 0.005 <= P(... <= 22)
    assert stats.binom.cdf(21, 30, LEVEL) < FALSE_ALARM <= stats.binom.cdf(22, 30, LEVEL)
    assert stats.binom.cdf(21, 30, 0.6) > 0.9  # intervals that cover 60% of the time fail (p = 0.91)


@pytest.mark.slow
def test_default_svi_intervals_cover_locations_and_spreads():
    hits = {"means": [], "spreads": []}
    for r in range(REPS):
        sim = ml.simulate(n_persons=80, n_situations=6, n_alts=3, random=TRUTH, seed=7000 + r)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = sim.model.fit(sim.data, method="svi", seed=r)
        ci = res.conf_int(alpha=1 - LEVEL)
        for n in res.param_names:
            covered = bool(ci.loc[n, "lower"] <= sim.truth[n] <= ci.loc[n, "upper"])
            hits["spreads" if n.startswith("sd.") else "means"].append(covered)
    for group, h in hits.items():
        assert len(h) == 3 * REPS
        assert np.mean(h) >= threshold(len(h)), (group, np.mean(h))
