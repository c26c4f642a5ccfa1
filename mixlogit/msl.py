"""Maximum simulated likelihood: objective, exact derivatives and the optimizer loop.

The log-likelihood is ``sum_n w_n log sum_r w_r prod_t L_nt(beta_nr)`` (see :mod:`mixlogit.kernel`).
Units are independent given theta, so the work is split into chunks of units: memory stays bounded at any
number of draws, and the gradient, the per-unit scores and the Hessian are sums over chunks, each exact in
float64 (the kernel's gradient in closed form, the Hessian by autograd).

Chunks run on a small pool of threads, each running torch single-threaded (:mod:`mixlogit.parallel`), and in a
torch.distributed run each process computes a shard of them (:mod:`mixlogit.distributed`). The chunking depends on
neither the number of threads nor of processes, and chunk results are summed in chunk order, so every thread and
process count gives bit-identical results. ``precision="mixed"`` runs the largest pass in float32
(:mod:`mixlogit.precision`); every tensor lives on the design's device.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from scipy import optimize

from .budget import MSL_CHUNK_ELEMENTS, chunk_size
from .data import Design
from .distributed import Shard
from .draws import IntegrationRule
from .information import scaled_information
from .kernel import conditional_loglik, log_mixed_prob
from .kernel_grad import mixed_loglik_hessian
from .parallel import MAX_WORKERS, default_workers, map_chunks
from .precision import kernel_dtype
from .spec import Spec


@dataclass
class MSLProblem:
    """The simulated log-likelihood of one model on one data set with one integration rule."""

    spec: Spec
    design: Design
    rule: IntegrationRule
    #: Elements of the largest per-chunk tensor (units x situations x alternatives x draws).
    chunk_elements: int = MSL_CHUNK_ELEMENTS
    #: Threads for the chunks; None: :func:`default_workers` at each call. 1 runs them in the calling thread.
    workers: int | None = None
    #: The kernel's gradient in closed form (False: autograd through the kernel's operations, the old path).
    closed_form_grad: bool = True
    #: The Hessian from per-draw closed forms (:mod:`mixlogit.kernel_grad`); False: nested autograd.
    closed_form_hessian: bool = True
    #: "double", or "mixed" for a float32 N x T x A x R pass in values, gradients and scores (the Hessian stays
    #: float64): see :mod:`mixlogit.precision`.
    precision: str = "double"
    #: This process's share of the chunks in a torch.distributed run (:mod:`mixlogit.distributed`), or None.
    shard: Shard | None = None

    def __post_init__(self):
        d = self.design
        per_unit = d.x_rand_diff.shape[1] * max(1, d.x_rand_diff.shape[2]) * self.rule.n_points
        size = chunk_size(per_unit, budget=self.chunk_elements)
        if self.rule.n_points > 1:  # enough chunks to keep every thread busy (a plain logit is too cheap to split)
            size = min(size, max(1, -(-d.n_units // (2 * MAX_WORKERS))))
        self.chunks = [slice(i, min(i + size, d.n_units)) for i in range(0, d.n_units, size)]
        self._needs_avail = d.has_unavailable
        self._needs_mask = not bool(d.situation_mask.all())  # balanced panels have no padded situations
        self._x_cache: dict = {}

    @property
    def device(self) -> torch.device:
        return self.design.device

    def _theta(self, theta) -> torch.Tensor:
        return torch.tensor(np.asarray(theta, dtype=np.float64), device=self.device)

    def _x(self, which: str) -> torch.Tensor:
        """Attribute differences in the dtype of the N x T x A x R pass, cast once: ``"rand"`` (N, T, A, Kr),
        ``"fixed"`` (N, T, A, Kf) or ``"all"`` (every column, for a random scale)."""
        key = (which, kernel_dtype(self.precision))
        if key not in self._x_cache:  # float64 in double precision: the design's own tensors, no copy
            full = {"rand": self.design.x_rand_diff, "fixed": self.design.x_fixed_diff}
            self._x_cache[key] = (self.x_all_diff if which == "all" else full[which]).to(key[1])
        return self._x_cache[key]

    @cached_property
    def x_all_diff(self) -> torch.Tensor:
        """(N, T, A, Kr + Kf) every column's differences, built once: for a random scale (which multiplies the
        fixed coefficients too, so every column enters the kernel per draw) and the closed-form Hessian."""
        return self.design.x_diff

    # ------------------------------------------------------------------ values
    def _workers(self) -> int:
        return default_workers() if self.workers is None else max(1, int(self.workers))

    def unit_loglik(self, theta: torch.Tensor, index: slice, rule: IntegrationRule | None = None, *,
                    closed_form_grad: bool | None = None) -> torch.Tensor:
        """log P_n for the units in ``index``. theta: (P,) or (len(index), P). Returns (len(index),)."""
        rule = rule or self.rule
        cond = self.unit_cond_loglik(theta, index, rule, closed_form_grad=closed_form_grad)
        return log_mixed_prob(cond, rule.log_weights)

    def unit_cond_loglik(self, theta: torch.Tensor, index: slice, rule: IntegrationRule | None = None, *,
                         closed_form_grad: bool | None = None):
        """sum_t log L_nt(beta_nr) for the units in ``index``: (len(index), R)."""
        rule = rule or self.rule
        cf = self.closed_form_grad if closed_form_grad is None else closed_form_grad
        cf = cf and rule.n_points > 1  # one point (no draws, plain logit): no graph worth replacing
        d, dtype = self.design, kernel_dtype(self.precision)
        avail = d.avail_diff[index] if self._needs_avail else None
        mask = d.situation_mask[index] if self._needs_mask else None
        if self.spec.scale:
            beta = self.spec.scaled_coefficients(theta, rule.for_units(index))  # (n, R, Kr + Kf)
            ll = conditional_loglik(self._x("all")[index], beta.to(dtype), avail=avail, situation_mask=mask,
                                    closed_form_grad=cf)
        else:
            beta = self.spec.coefficients(theta, rule.for_units(index))
            fixed = None
            if self.spec.n_fixed:
                bf = self.spec.fixed_coefficients(theta).to(dtype)
                xf = self._x("fixed")[index]
                fixed = xf @ bf if bf.dim() == 1 else torch.einsum("ntak,nk->nta", xf, bf)
            ll = conditional_loglik(self._x("rand")[index], beta.to(dtype), fixed_diff=fixed, avail=avail,
                                    situation_mask=mask, closed_form_grad=cf)
        # Averages over draws and sums over units in float64 (the casts are no-ops in double precision).
        return ll.to(torch.float64)

    def _map(self, fn, shape, pieces: list[slice] | None = None) -> list[torch.Tensor]:
        """``[fn(c) for c in pieces]`` (default: the chunks), ``fn`` giving a float64 tensor of ``shape(c)``.

        Each result is copied into one table allocated before the first chunk, so no small result is left behind
        in the memory a chunk's temporaries freed (the allocator could not reuse those holes for the next chunk,
        and memory would grow with the number of chunks). Sharded (a torch.distributed run), this process fills
        its own pieces and the table is all-reduced: every rank sums the same numbers in one process's order.
        """
        pieces = self.chunks if pieces is None else pieces
        sizes = [math.prod(shape(c)) for c in pieces]
        starts = np.cumsum([0, *sizes[:-1]]).tolist()
        table = torch.zeros(sum(sizes), dtype=torch.float64, device=self.device)

        def run(i):
            table[starts[i]:starts[i] + sizes[i]] = fn(pieces[i]).reshape(-1)

        mine = [i for i, c in enumerate(pieces) if self.shard is None or self.shard.owns(c)]
        map_chunks(run, mine, self._workers())
        if self.shard is not None:
            self.shard.reduce(table)
        return [table[s:s + n].view(shape(c)) for c, s, n in zip(pieces, starts, sizes)]

    def loglik(self, theta: np.ndarray | torch.Tensor, rule: IntegrationRule | None = None) -> float:
        th = torch.as_tensor(theta, dtype=torch.float64, device=self.device)

        def one(c):
            with torch.no_grad():
                return (self.design.weights[c] * self.unit_loglik(th, c, rule)).sum()

        return float(sum(float(v) for v in self._map(one, lambda c: ())))

    def null_loglik(self) -> float:
        """Log-likelihood of equal shares among the available alternatives (all coefficients zero)."""
        d = self.design
        n_avail = (d.avail_diff.sum(-1) + 1).to(torch.float64)  # non-chosen available + the chosen one
        return float(-(d.weights * (torch.log(n_avail) * d.situation_mask).sum(1)).sum())

    def value_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Weighted log-likelihood and its exact gradient. theta: (P,) numpy."""
        th0 = self._theta(theta)

        def one(c):
            th = th0.clone().requires_grad_(True)
            ll = (self.design.weights[c] * self.unit_loglik(th, c)).sum()
            (grad,) = torch.autograd.grad(ll, th)
            return torch.cat([ll.detach().reshape(1), grad])

        total, grad = 0.0, torch.zeros_like(th0)
        for value_grad in self._map(one, lambda c: (1 + th0.numel(),)):  # in chunk order: deterministic
            total += float(value_grad[0])
            grad += value_grad[1:]
        return total, grad.cpu().numpy()

    def scores(self, theta: np.ndarray) -> np.ndarray:
        """Per-unit scores d log P_n / d theta (unweighted): (N, P).

        Each unit gets its own copy of theta, so one backward pass yields every unit's gradient.
        """

        th0 = self._theta(theta)

        def one(c):
            th = th0.expand(c.stop - c.start, -1).clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.unit_loglik(th, c).sum(), th)
            return grad

        return torch.cat(self._map(one, lambda c: (c.stop - c.start, th0.numel())), dim=0).cpu().numpy()

    def hessian(self, theta: np.ndarray) -> np.ndarray:
        """Exact Hessian of the weighted log-likelihood (float64): (P, P).

        In closed form from per-draw quantities (:func:`mixlogit.kernel_grad.mixed_loglik_hessian`) for models
        with draws; by nested autograd otherwise, or with ``closed_form_hessian=False``.
        """
        th0 = self._theta(theta)
        p = th0.numel()
        if self.closed_form_hessian and self.spec.n_draw_dims:
            pieces, one = self.chunks, self._hessian_closed_form(th0)
        else:
            # Hessian chunks carry P tangents at once; shrink them so memory stays as for the gradient.
            small = max(1, (self.chunks[0].stop - self.chunks[0].start) // max(1, p // 2))
            pieces = [slice(s, min(s + small, c0.stop)) for c0 in self.chunks
                      for s in range(c0.start, c0.stop, small)]

            def one(c):
                w = self.design.weights[c]

                def f(th):  # plain autograd through the kernel: vmap over P tangents of a second derivative
                    return (w * self.unit_loglik(th, c, closed_form_grad=False)).sum()

                return torch.autograd.functional.hessian(f, th0, vectorize=True)

        hess = np.zeros((p, p))
        for h in self._map(one, lambda c: (p, p), pieces):
            hess += h.cpu().numpy()
        return 0.5 * (hess + hess.T)

    def _hessian_closed_form(self, th0: torch.Tensor):
        d, spec = self.design, self.spec

        def one(c):
            return mixed_loglik_hessian(
                spec.scaled_coefficients, th0, self.rule.for_units(c), self.x_all_diff[c], d.weights[c],
                self.rule.log_weights, avail=d.avail_diff[c] if self._needs_avail else None,
                situation_mask=d.situation_mask[c] if self._needs_mask else None)

        return one


@dataclass
class OptimizeResult:
    theta: np.ndarray
    loglik: float
    converged: bool
    n_iter: int
    message: str
    grad_norm: float
    grad: np.ndarray


def maximize(problem: MSLProblem, start: np.ndarray, *, maxiter: int = 2000, gtol: float = 1e-5,
             callback=None, stop_gain: float | None = None, hess_inv0: np.ndarray | None = None) -> OptimizeResult:
    """Maximize the simulated log-likelihood by BFGS with the exact gradient.

    Convergence: the largest absolute gradient entry below ``gtol`` (scipy's BFGS criterion), checked again
    at the returned point; anything else is reported as not converged, never raised. ``stop_gain``: also stop
    after an iteration that raises the log-likelihood by less than this (a search in mixed precision, whose line
    searches cannot resolve smaller gains; its caller judges the end point in float64). ``hess_inv0``: BFGS's
    starting inverse Hessian of ``-loglik`` (positive definite); default the inverse of the BHHH matrix at ``start``.
    """
    n_iter = 0
    previous = math.inf

    def fun(x):
        v, g = problem.value_and_grad(x)
        if not math.isfinite(v) or not np.all(np.isfinite(g)):
            return np.inf, np.zeros_like(g)
        return -v, -g

    def cb(intermediate_result):
        nonlocal n_iter, previous
        n_iter += 1
        if callback is not None:
            callback(n_iter, intermediate_result.x)
        gain, previous = previous - intermediate_result.fun, intermediate_result.fun  # fun is -loglik
        if stop_gain is not None and gain < stop_gain:
            raise StopIteration  # scipy ends the search at this iteration's point

    # Start BFGS from the BHHH matrix (outer product of the per-unit scores) instead of the identity: it has
    # the right scale in every direction, which saves most of the early iterations.
    if hess_inv0 is None:
        scores = problem.scores(start)
        bhhh = scores.T @ (problem.design.weights.cpu().numpy()[:, None] * scores)
        hess_inv0 = positive_definite_inverse(bhhh + 1e-8 * np.eye(len(start)) * max(1.0, np.trace(bhhh) / len(start)))
        # None: scores rank-deficient at the start, so BFGS starts from the identity
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = optimize.minimize(fun, start, jac=True, method="BFGS", callback=cb,
                              options={"maxiter": maxiter, "gtol": gtol, "hess_inv0": hess_inv0})
    return judge(problem, r.x, gtol, int(r.nit), str(r.message))


def positive_definite_inverse(matrix: np.ndarray) -> np.ndarray | None:
    """The symmetrized inverse of ``matrix`` when it is positive definite (to rounding), else None."""
    try:
        inverse = np.linalg.inv(matrix)
        inverse = 0.5 * (inverse + inverse.T)
        np.linalg.cholesky(inverse)
    except np.linalg.LinAlgError:
        return None
    return inverse


def judge(problem: MSLProblem, theta: np.ndarray, gtol: float, n_iter: int, message: str) -> OptimizeResult:
    """The optimizer's end point with ``problem``'s value and gradient there, converged when the largest absolute
    gradient entry is below ``gtol`` (at least 1e-4). scipy reports "precision loss" when the line search cannot
    improve although the gradient is tiny, so convergence is judged by the gradient itself; a search run in mixed
    precision is judged again by the float64 problem."""
    value, grad = problem.value_and_grad(theta)
    gnorm = float(np.max(np.abs(grad)))
    converged = bool(math.isfinite(value) and gnorm < max(gtol, 1e-4))
    return OptimizeResult(theta=theta, loglik=value, converged=converged, n_iter=n_iter, message=message,
                          grad_norm=gnorm, grad=grad)


#: A coefficient whose utility range ``|beta| * max|x difference|`` exceeds this, and whose doubling does not lower
#: the log-likelihood, runs off toward infinity (perfect separation).
SEPARATION_UTILITY = 5.0
#: A lognormal coefficient whose 3-sd upper point times the attribute's range is below this has been pushed to 0.
VANISHED_UTILITY = 1e-6
#: Eigenvalues of the information matrix scaled to unit diagonal below this (relative to the largest) are null
#: directions.
NULL_EIGENVALUE = 1e-10
SEPARATION = "perfect separation"


def identification_problems(problem: MSLProblem, theta: np.ndarray, hessian: np.ndarray) -> dict[str, str]:
    """Parameters that the data do not identify at ``theta``: name -> reason. The one place these checks live.

    - a coefficient on a column that is constant within every choice situation (never changes a choice): its
      location, and its spread for a random one;
    - perfect separation: a coefficient that runs off toward infinity (doubling it does not lower the
      log-likelihood, although it moves utilities by more than :data:`SEPARATION_UTILITY`); the reason starts
      with :data:`SEPARATION`;
    - a lognormal coefficient pushed to zero (location toward -inf): its location and spread;
    - any other null direction of the information matrix scaled to unit diagonal, naming its parameters.
    """
    spec, d = problem.spec, problem.design
    names, sl = spec.param_names, spec.slices()
    theta = np.asarray(theta, dtype=float)
    real = (d.situation_mask.unsqueeze(-1) & d.avail_diff).unsqueeze(-1)

    def span(x):  # largest |difference| over real (situation, alternative) pairs, per column
        if x.shape[-1] == 0 or x.shape[2] == 0:
            return np.zeros(x.shape[-1])
        return torch.where(real, x.abs(), 0.0).amax((0, 1, 2)).cpu().numpy()

    span_f, span_r = span(d.x_fixed_diff), span(d.x_rand_diff)
    out: dict[str, str] = {}
    constant = "column {!r} is constant within every choice situation, so it never changes a choice"
    for k, col in enumerate(spec.fixed):
        if span_f[k] == 0:
            out[col] = constant.format(col)
    for k, (col, dist) in enumerate(spec.random.items()):
        if span_r[k] == 0:
            out[col] = out[f"sd.{col}"] = constant.format(col) + " (neither its location nor its spread is identified)"
        elif dist in ("lognormal", "-lognormal"):
            loc, s = theta[sl["loc"]][k], abs(theta[sl["spread"]][k])
            if loc + 3 * s + math.log(span_r[k]) < math.log(VANISHED_UTILITY):
                out[col] = out[f"sd.{col}"] = (f"the {dist} coefficient {col!r} is pushed to zero (location {loc:.3g} "
                                               "heads to -inf): its location and spread are not identified")
    base = problem.loglik(theta)
    candidates = [(i, span_f[k]) for k, i in enumerate(range(sl["fixed"].start, sl["fixed"].stop))]
    candidates += [(sl["loc"].start + k, span_r[k]) for k, dist in enumerate(spec.random.values()) if dist == "normal"]
    for i, width in candidates:
        if names[i] in out or abs(theta[i]) * width <= SEPARATION_UTILITY:
            continue
        doubled = theta.copy()
        doubled[i] *= 2
        if problem.loglik(doubled) >= base - 1e-6:
            out[names[i]] = (f"{SEPARATION}: the log-likelihood keeps rising as {names[i]!r} grows (estimate "
                             f"{theta[i]:.4g}); it runs off to {'+' if theta[i] > 0 else '-'}inf")
    h = -0.5 * (hessian + hessian.T)
    diag = np.diag(h)
    ok = [i for i in range(len(names)) if names[i] not in out and np.isfinite(diag[i]) and diag[i] > 0]
    for i in range(len(names)):
        if names[i] not in out and i not in ok:
            out[names[i]] = "the log-likelihood has no curvature in this parameter"
    scaled = scaled_information(h[np.ix_(ok, ok)]) if len(ok) > 1 else None
    if scaled is not None:
        vals, vecs = np.linalg.eigh(scaled[0])
        for j in np.flatnonzero(vals < NULL_EIGENVALUE * max(vals.max(), 1.0)):
            involved = [names[ok[m]] for m in np.flatnonzero(np.abs(vecs[:, j]) > 0.3)]
            for n in involved:
                out.setdefault(n, f"the information matrix is singular along a combination of {', '.join(involved)} "
                                  "(collinear columns or an unidentified parameter)")
    return out
