"""Stochastic variational inference: the fit loop around Pyro's ELBO.

SVI minimizes the negative ELBO (``TraceMeanField_ELBO``: analytic KL terms for the units) with Adam, the
population parameters at 5 x ``learning_rate``, the learning rate decaying 0.7x per window of steps to a tenth;
it stops at the first window (after five) whose average ELBO does not beat the previous one by more than ``tol``
(relative) or twice the noise of the averages, and over which the window-averaged population parameters moved
less than 0.1 posterior sd. A NaN ELBO stops the run with the best parameters so far.

The default guide is ``"marginal"`` (:mod:`mixlogit.bayes.marginal`): a full-rank normal over the population
parameters alone, every unit's coefficients integrated out by the kernel's simulated likelihood on fixed
importance points, started at the Laplace approximation of that marginal posterior. On the electricity data (E1)
its 12 posterior sds are 0.86-1.09x those of NUTS (2 chains x 1,000 draws) and its means within 0.23 NUTS sd
(seed 0, ``benchmarks/bench_bayes.py --e1-marginal``; seeds 1 and 2: 0.80-1.14x, within 0.46 sd). It is not
faster than MSL at 1,000 draws: 18.7 s against MSL's 5.3 s with the ``bfgs-hessian`` optimizer (one thread, medians
of 3 in one process; against MSL's earlier BFGS it was 20.5 s against 22.7 s on a busier machine). About 30% of
the time is the trust check (200 evaluations of the marginal likelihood), 25% the ELBO steps, 15% the pilot. With ``subsample=`` (minibatches of units, for very large panels)
the default is ``"fullrank"``, which has a guide per unit.

Every fit without ``subsample`` ends with the trust check (:mod:`mixlogit.bayes.trust`): the Pareto k of p/q over
``trust_draws`` draws of the guide's population parameters; ``k >= 0.7`` warns and suggests NUTS. Minibatch fits
skip it unless ``trust_draws`` is given: on a panel large enough to need minibatches the simulation error of ``p``
would exceed the posterior's width (on 10,000 persons with 32 points per person k came out 1.4 for a good fit).
"""

from __future__ import annotations

import copy
import math
import time
import warnings

import numpy as np
import pyro
import torch
from pyro.infer import TraceMeanField_ELBO

from ..data import ChoiceData
from ..progress import progress_bar
from ..validation import check_int
from .guides import GUIDES, Guide
from .marginal import (
    MARGINAL_DRAWS,
    MarginalGuide,
    MarginalLikelihood,
    MarginalModel,
    MarginalSampler,
    laplace_whitening,
)
from .model import prepare
from .pilot import initialize
from .priors import describe
from .results import BayesResults
from .samplers import SVISampler
from .trust import TRUST_DRAWS, trust_check

#: Learning rate of the (standardized) population parameters relative to ``learning_rate``.
GLOBAL_LR_FACTOR = 5.0
#: Per-window decay of the learning rate, its floor (relative), and the fewest windows before stopping.
LR_DECAY, LR_FLOOR, MIN_WINDOWS = 0.7, 0.1, 5
#: Largest move of the window-averaged population parameters (whitened: posterior sds) that counts as converged.
MAX_DRIFT = 0.1
#: Steps per convergence window of the marginal guide (at most; fewer when ``steps`` is small).
MARGINAL_WINDOW = 20


class _SnapshotState:
    """Best parameters so far (by windowed ELBO), to return them if the run breaks down."""

    def __init__(self, module):
        self.module = module
        self.state = copy.deepcopy(module.state_dict())
        self.step = 0
        self.elbo = -math.inf

    def save(self, step, elbo):
        self.state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.step, self.elbo = step, elbo

    def restore(self):
        self.module.load_state_dict(self.state)


def fit_svi(model, data, *, steps=3000, guide=None, subsample=None, learning_rate=0.01, seed=0, priors=None,
            progress=False, init="msl", tol=1e-4, num_draws=4000, init_draws=200, init_units=2000, window=None,
            num_particles=1, marginal_draws=MARGINAL_DRAWS, trust_draws=None) -> BayesResults:
    """SVI of ``model`` on ``data``; the options are those of :func:`mixlogit.bayes.fit.fit`."""
    t0 = time.perf_counter()
    steps = check_int("steps", steps)
    if guide is None:  # the marginal guide integrates every unit at each step: minibatches need unit guides
        guide = "marginal" if subsample is None else "fullrank"
    if guide not in GUIDES:
        raise ValueError(f"unknown guide {guide!r}; accepted: {', '.join(GUIDES)}")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not (
            math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive finite number, got {learning_rate!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    num_draws = check_int("num_draws", num_draws, 2)
    num_particles = check_int("num_particles", num_particles)
    init_draws = check_int("init_draws", init_draws)
    init_units = check_int("init_units", init_units)
    if trust_draws is None:
        # Minibatch fits are for panels so large that the check's simulated likelihood, evaluated 200 times on
        # every unit, would outlast the fit, and its simulation error (which grows like N / R) would exceed the
        # posterior's width (which shrinks like 1 / sqrt(N)): k would then judge the simulation, not the guide.
        trust_draws = TRUST_DRAWS if subsample is None else 0
    marginal_draws = check_int("marginal_draws", marginal_draws, 2)
    trust_draws = check_int("trust_draws", trust_draws, 0)
    if 0 < trust_draws < 20:
        raise ValueError(f"trust_draws must be 0 (no trust check) or at least 20 (PSIS fits the tail of the "
                         f"largest ratios), got {trust_draws}")
    n_units = data.n_units if isinstance(data, ChoiceData) else 0
    if subsample is not None:
        subsample = check_int("subsample", subsample)
        if subsample > n_units:
            raise ValueError(f"subsample={subsample} exceeds the number of units ({n_units}); use subsample=None "
                             "for full-batch SVI")
        if subsample == n_units:
            subsample = None
    if window is None:  # at least MIN_WINDOWS windows fit into the step budget
        # The marginal guide has a dozen or so parameters and starts near the posterior: shorter windows.
        longest = MARGINAL_WINDOW if guide == "marginal" else int(np.clip(steps // 60, 50, 100))
        window = max(10, min(longest, steps // MIN_WINDOWS))
    window = check_int("window", window)

    if guide == "marginal" and subsample is not None:
        raise ValueError("guide='marginal' integrates every unit out at each step and takes no subsample; for "
                         "minibatches of units use guide='fullrank' (or 'amortized') with subsample=")
    hm = prepare(model, data, priors, subsample)
    if hm.n_scale and guide in ("fullrank", "amortized"):
        raise ValueError(f"guide={guide!r} builds each unit's posterior on the linear predictor mu + C z, which a "
                         "random scale (scale='lognormal') multiplies away; use guide='marginal' (the default) or "
                         "'meanfield'")
    with Guide.param_context(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        start = initialize(model, data, hm, how=init, seed=int(seed), init_draws=init_draws, init_units=init_units,
                           slopes=guide != "marginal")
        # The units' integrated likelihood: the marginal guide's target, and every guide's trust check.
        likelihood = (MarginalLikelihood(hm, start, draws=marginal_draws, seed=int(seed))
                      if guide == "marginal" or trust_draws else None)
        if guide == "marginal":
            # Start at the Laplace approximation of the marginal posterior (in coordinates where it is N(0, I)).
            if laplace_whitening(hm, likelihood, hm.standardized(start.globals)):
                start.globals = hm.natural(torch.zeros(hm.dim, dtype=torch.float64))
            target = MarginalModel(hm, likelihood)
            g = MarginalGuide(target, start)
        else:
            target, g = hm, Guide(hm, guide, start)
        # Several particles are drawn in one vectorized pass (the kernel takes them as draws).
        elbo_fn = TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                                      max_plate_nesting=1)
        with warnings.catch_warnings(), pyro.validation_enabled(False):
            warnings.filterwarnings("ignore", message=".*mean field.*")
            g()  # builds the autoguide's parameters
            # The whitening gives the population parameters a posterior sd near one; the unit guides start from
            # their Laplace sites, which fit the data only at the start: their globals start narrower.
            g.set_initial_scales(torch.ones_like(start.u_scale) if guide == "marginal" else start.u_scale)
            params = [p for p in g.parameters() if p.requires_grad]
            global_params = [p for p in g.globals.parameters() if p.requires_grad]
            ids = {id(p) for p in global_params}
            local_params = [p for p in params if id(p) not in ids]
            # The population parameters are standardized (posterior sd about one): they take larger steps.
            groups = [{"params": global_params, "base_lr": GLOBAL_LR_FACTOR * learning_rate}]
            if local_params:
                groups.append({"params": local_params, "base_lr": learning_rate})
            opt = torch.optim.Adam([{**gr, "lr": gr["base_lr"]} for gr in groups])
            trace, best = [], _SnapshotState(g)
            converged, message, windows, centers = False, "", [], []
            center_sum = torch.zeros(target.dim, dtype=torch.float64)
            bar = progress_bar(progress, steps, desc="SVI", unit="step")
            for step in range(1, steps + 1):
                opt.zero_grad(set_to_none=True)
                loss = elbo_fn.differentiable_loss(target.model, g)
                value = float(loss.detach())
                if not math.isfinite(value):
                    best.restore()
                    message = (f"ELBO is NaN/infinite at step {step}; stopped and kept the best parameters so far "
                               f"(step {best.step}). Try a smaller learning_rate (e.g. {learning_rate / 10:g}).")
                    warnings.warn(message, RuntimeWarning, stacklevel=3)
                    break
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 100.0 * math.sqrt(len(params)))
                opt.step()
                trace.append(-value)
                center_sum += g.globals.loc.detach()
                if bar is not None:
                    bar.update(1)
                if step % window:
                    continue
                mean = float(np.mean(trace[-window:]))
                windows.append(mean)
                centers.append(center_sum / window)
                center_sum = torch.zeros_like(center_sum)
                if bar is not None:
                    bar.set_postfix(elbo=f"{mean:.1f}")
                if mean > best.elbo:
                    best.save(step, mean)
                # Learning rate: 0.7x per window down to a tenth; converged at the first plateau after that.
                decay = max(LR_FLOOR, LR_DECAY ** len(windows))
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * decay
                # Converged: the windowed ELBO stopped improving and the population parameters stopped moving
                # (their window averages, on the whitened scale where a posterior sd is about one).
                drift = float((centers[-1] - centers[-2]).abs().max()) if len(centers) > 1 else math.inf
                if len(windows) >= MIN_WINDOWS and drift < MAX_DRIFT and _plateau(windows, trace, window, tol):
                    converged = True
                    message = (f"converged after {step} steps (windowed ELBO: no improvement beyond {tol:g} "
                               f"relative or its noise; population parameters moved < {MAX_DRIFT} posterior sd)")
                    break
            if bar is not None:
                bar.close()
            if not message:
                message = f"ELBO still improving after {steps} steps"
                warnings.warn(f"SVI did not converge: {message}; increase steps", RuntimeWarning, stacklevel=3)
        sampler = MarginalSampler(g, likelihood) if guide == "marginal" else SVISampler(g)
        draws = sampler.draw_theta(num_draws, seed=int(seed) + 1)
        ind_mean, ind_sd = sampler.individual_moments(n=50 if guide == "marginal" else 200, seed=int(seed) + 2)
        trust = trust_check(g, likelihood, trust_draws, seed=int(seed) + 3) if trust_draws else None
    if trust is not None and not trust.usable:
        other = "" if guide == "marginal" else " or guide='marginal'"
        warnings.warn(f"SVI's trust check fails: {trust}. The guide misses part of the posterior of the population "
                      "parameters and its draws are not reweighted (PSIS is unreliable there too); use "
                      f"method='nuts', or refit with more steps{other}", RuntimeWarning, stacklevel=3)
    settings = {"method": "svi", "steps": steps, "guide": guide, "subsample": subsample,
                "learning_rate": learning_rate, "seed": int(seed), "init": init, "tol": tol, "window": window,
                "num_draws": num_draws, "init_draws": init_draws, "init_units": init_units,
                "num_particles": num_particles, "steps_run": len(trace), "marginal_draws": marginal_draws,
                "trust_draws": trust_draws}
    return BayesResults.from_fit(
        method="svi", model=model, data=data, spec=hm.spec, sampler=sampler, draws=draws[None],
        individual_mean=ind_mean, individual_sd=ind_sd, elbo=np.asarray(trace), sample_stats={}, converged=converged,
        trust=trust,
        message=message, n_iter=len(trace), settings=settings, priors=describe(hm.priors),
        fit_time=time.perf_counter() - t0)


def _plateau(windows, trace, window, tol) -> bool:
    """True when the last window's mean ELBO is not better than the previous one by more than ``tol`` (relative)
    or by more than twice the standard error of the difference (the noise of the estimate)."""
    prev, cur = windows[-2], windows[-1]
    a, b = np.asarray(trace[-2 * window:-window]), np.asarray(trace[-window:])
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return (cur - prev) < max(tol * abs(cur), 2.0 * se)

