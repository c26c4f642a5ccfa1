"""Parameter recovery on simulated data: 95% Wald intervals cover the truth at the nominal rate.

For every distribution, with panel data and with cross-sectional data, 20 replications (fixed seeds) of a
model with one random and one fixed coefficient; all intervals of a setting are pooled and a two-sided
binomial test at the 1% level must not reject a 95% coverage rate.
"""

import warnings

import pytest
from scipy import stats

import mixlogit as ml

TRUTH = {  # distribution -> (location, spread)
    "normal": (1.0, 0.8),
    "lognormal": (0.0, 0.6),
    "-lognormal": (0.0, 0.6),
    "uniform": (1.0, 1.2),
    "triangular": (1.0, 1.5),
    "truncated_normal": (0.8, 1.0),
    "censored_normal": (0.5, 1.2),
}
REPLICATIONS = 20


def coverage(dist: str, panel: bool) -> tuple[int, int, list]:
    loc, spread = TRUTH[dist]
    covered, total, misses = 0, 0, []
    for rep in range(REPLICATIONS):
        sim = ml.simulate(n_persons=200 if panel else 1500, n_situations=4 if panel else 1, n_alts=3,
                          random={"x1": (dist, loc, spread)}, fixed={"x2": -1.0}, panel=panel, seed=1000 + rep)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = sim.model.fit(sim.data, draws=100, draw_type="sobol", seed=rep)
        assert res.converged, (dist, panel, rep)
        ci = res.conf_int(0.05)
        ok = (ci["lower"] <= sim.truth) & (sim.truth <= ci["upper"])
        covered += int(ok.sum())
        total += len(ok)
        misses += [(rep, name) for name in ok.index[~ok]]
    return covered, total, misses


@pytest.mark.slow
@pytest.mark.parametrize("panel", [True, False], ids=["panel", "cross-section"])
@pytest.mark.parametrize("dist", list(TRUTH))
def test_wald_intervals_cover_at_nominal_rate(dist, panel):
    covered, total, misses = coverage(dist, panel)
    p = stats.binomtest(covered, total, 0.95).pvalue
    assert p > 0.01, f"{dist} panel={panel}: {covered}/{total} covered; misses {misses}"
