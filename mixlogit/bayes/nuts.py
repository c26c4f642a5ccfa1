"""NUTS (Pyro's sampler) in Laplace coordinates.

NUTS samples the whitened population parameters ``u`` and, per unit, ``e_n`` with
``z_n = a_n + B_n (u - u_0) + chol(V_n) e_n`` (see :class:`_LaplaceCoordinates`; ``a_n``, ``B_n``, ``V_n`` from
:mod:`mixlogit.bayes.pilot`), chains one after the other, each after the first from a jittered start.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pyro
import torch
from pyro.infer import MCMC
from pyro.poutine.messenger import Messenger

from ..validation import check_int
from .model import HierarchicalMixedLogit, prepare
from .pilot import Init, initialize
from .priors import describe
from .results import BayesResults
from .samplers import NUTSSampler


class _DepthCounter(Messenger):
    """Counts the tree doublings of one NUTS iteration (Pyro samples one direction per doubling)."""

    def __init__(self):
        super().__init__()
        self.depth = 0

    def _pyro_sample(self, msg):
        if msg["name"].startswith("direction_t="):
            self.depth += 1


class _NUTS(pyro.infer.NUTS):
    """Pyro's NUTS, recording the tree depth of every iteration."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tree_depths: list[int] = []

    def sample(self, params):
        counter = _DepthCounter()
        with counter:
            out = super().sample(params)
        self.tree_depths.append(counter.depth)
        return out


def fit_nuts(model, data, *, num_samples=1000, num_warmup=1000, chains=2, seed=0, priors=None, progress=False,
             init="msl", target_accept=0.8, max_tree_depth=10, init_draws=200, init_units=2000) -> BayesResults:
    """NUTS of ``model`` on ``data``; the options are those of :func:`mixlogit.bayes.fit.fit`."""
    t0 = time.perf_counter()
    num_samples = check_int("num_samples", num_samples)
    num_warmup = check_int("num_warmup", num_warmup, 0)
    chains = check_int("chains", chains)
    max_tree_depth = check_int("max_tree_depth", max_tree_depth)
    if not (isinstance(target_accept, float) and 0 < target_accept < 1):
        raise ValueError(f"target_accept must be a float in (0, 1), got {target_accept!r}")
    init_draws = check_int("init_draws", init_draws)
    init_units = check_int("init_units", init_units)
    hm = prepare(model, data, priors)
    samples, diverging, depths, accept = [], [], [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        start = initialize(model, data, hm, how=init, seed=int(seed), init_draws=init_draws, init_units=init_units)
        lat = _LaplaceCoordinates(hm, start)
        rng = np.random.default_rng(int(seed) + 17)
        for c in range(chains):
            values = _jittered(hm, start, rng if c else None)
            kernel = _NUTS(potential_fn=lat.potential_energy, target_accept_prob=target_accept,
                           max_tree_depth=max_tree_depth)
            torch.manual_seed(int(seed) * 1000 + c)
            mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup, num_chains=1,
                        initial_params=lat.initial(values), disable_progbar=not progress)
            with warnings.catch_warnings(), pyro.validation_enabled(False):
                warnings.simplefilter("ignore", UserWarning)
                mcmc.run()
            s = lat.natural_samples({k: v.detach() for k, v in mcmc.get_samples().items()})
            samples.append(s)
            div = np.zeros(num_samples, dtype=bool)
            diag = mcmc.diagnostics()
            idx = [i for i in diag.get("divergences", {}).get("chain 0", []) if 0 <= i < num_samples]
            div[idx] = True
            diverging.append(div)
            depths.append(np.asarray(kernel.tree_depths[num_warmup:num_warmup + num_samples]))
            accept.append(float(diag.get("acceptance rate", {}).get("chain 0", float("nan"))))
    stacked = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    theta = hm.theta({k: v for k, v in stacked.items() if k != "z"}).numpy()  # (C, S, P)
    z = stacked.get("z")
    sampler = NUTSSampler(hm, torch.as_tensor(theta), z)
    ind_mean, ind_sd = sampler.individual_moments()
    sample_stats = {"diverging": np.stack(diverging), "tree_depth": np.stack(depths)}
    n_div = int(sample_stats["diverging"].sum())
    rhat = _max_rhat(theta) if chains > 1 else float("nan")
    converged = n_div == 0 and (chains == 1 or rhat < 1.01)
    message = (f"{chains} chain(s) x {num_samples} draws after {num_warmup} warmup; divergences: {n_div}; "
               f"max r_hat: {rhat:.3f}; acceptance rate: {', '.join(f'{a:.2f}' for a in accept)}")
    if not converged:
        warnings.warn(f"NUTS diagnostics flag a problem: {message}", RuntimeWarning, stacklevel=3)
    settings = {"method": "nuts", "num_samples": num_samples, "num_warmup": num_warmup, "chains": chains,
                "seed": int(seed), "init": init, "target_accept": target_accept, "max_tree_depth": max_tree_depth,
                "init_draws": init_draws, "init_units": init_units}
    return BayesResults.from_fit(
        method="nuts", model=model, data=data, spec=hm.spec, sampler=sampler, draws=theta, individual_mean=ind_mean,
        individual_sd=ind_sd, elbo=None, sample_stats=sample_stats, converged=converged, message=message,
        n_iter=num_samples, settings=settings, priors=describe(hm.priors), fit_time=time.perf_counter() - t0)


class _LaplaceCoordinates:
    """Coordinates in which NUTS samples: the whitened globals ``u`` and, per unit, ``e_n`` with
    ``z_n = a_n + B_n (u - u_0) + L_n e_n`` (``a_n``, ``B_n``, ``L_n L_n' = V_n``: the unit's Laplace mode, its slope
    in the globals, and covariance). For a Gaussian posterior ``(u, e)`` would be independent standard normals,
    which is what NUTS with a diagonal mass matrix samples best. The map is affine in ``e`` with a constant
    Jacobian, so the target density is the model's: ``p(u, z(u, e))``.
    """

    def __init__(self, hm: HierarchicalMixedLogit, start: Init):
        self.hm = hm
        self.u0 = hm.standardized(start.globals)
        if hm.Kz:
            self.a, self.B = start.a, start.B
            self.L = torch.linalg.cholesky(start.V)

    def z(self, u: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """z (..., N, K) from u (..., D) and e (..., N, K)."""
        shift = (self.B @ (u - self.u0).unsqueeze(-2).unsqueeze(-1)).squeeze(-1)
        return self.a + shift + (self.L @ e.unsqueeze(-1)).squeeze(-1)

    def potential_energy(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Minus the log density of the model (up to a constant) at ``{"globals": u, "e": e}``."""
        u = params["globals"]
        z = self.z(u, params["e"]) if self.hm.Kz else None
        return self.hm.potential_energy({"globals": u, "z": z})

    def initial(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"globals": values["globals"]}
        if self.hm.Kz:
            rhs = (values["z"] - self.z(values["globals"], torch.zeros_like(values["z"]))).unsqueeze(-1)
            out["e"] = torch.linalg.solve_triangular(self.L, rhs, upper=False).squeeze(-1)
        return out

    def natural_samples(self, samples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Natural globals and z from draws of (u, e)."""
        out = self.hm.natural(samples["globals"])
        if self.hm.Kz:
            out["z"] = self.z(samples["globals"], samples["e"])
        return out


def _jittered(hm: HierarchicalMixedLogit, start: Init, rng) -> dict[str, torch.Tensor]:
    """Initial values of a chain: the pilot start, perturbed by about one posterior sd (on the whitened scale)
    for chains after the first, so that r_hat compares chains from different starting points."""
    u = hm.standardized(start.globals)
    z0 = None if start.a is None else start.a.clone()
    if rng is not None:
        u = u + torch.as_tensor(rng.normal(size=tuple(u.shape)))
        if z0 is not None:
            z0 = z0 + 0.1 * torch.as_tensor(rng.normal(size=tuple(z0.shape)))
    values = {"globals": u}
    if z0 is not None:
        values["z"] = z0
    return values


def _max_rhat(theta: np.ndarray) -> float:
    import arviz as az

    r = az.rhat(az.convert_to_dataset(theta))
    return float(np.nanmax(np.asarray(r.to_array())))
